"""DoReMi's pure rule: per-token clipped excess loss, the smoothed EG step, the time average."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from mixstream.algorithms.doremi import DoReMiState, doremi_update, excess_loss
from mixstream.algorithms.lmo import exponentiated_gradient_step

# Two sequences of 3 tokens; sequence 0 is group 0, sequence 1 is group 1; group 2 is absent.
PROXY = [[2.0, 3.0, 1.0], [4.0, 1.5, 2.0]]
REF = [[1.0, 3.5, 2.0], [1.0, 1.0, 2.5]]
# proxy - ref = [[1, -.5, -1], [3, .5, -.5]]; clipped per token = [[1, 0, 0], [3, .5, 0]]
# group 0: (1 + 0 + 0) / 3 = 1/3 (the mean of the unclipped diffs, -1/6, would clip to 0)
# group 1: (3 + .5 + 0) / 3 = 7/6
IDS = [0, 1]


def test_excess_loss_clips_per_token_then_averages() -> None:
    excess, present = excess_loss(PROXY, REF, IDS, num_groups=3, previous=[9.0, 9.0, 0.25])
    np.testing.assert_allclose(excess, [1 / 3, 7 / 6, 0.25])  # group 2 keeps its last score
    np.testing.assert_array_equal(present, [True, True, False])


def test_excess_loss_token_mask_and_per_token_ids() -> None:
    # Masking sequence 1's last token: group 1 = (3 + .5) / 2 = 1.75.
    mask = [[True, True, True], [True, True, False]]
    excess, _ = excess_loss(PROXY, REF, IDS, 3, token_mask=mask)
    np.testing.assert_allclose(excess, [1 / 3, 1.75, 0.0])  # previous defaults to 0
    # Per-token ids: token (0, 0) -> group 2, the rest as before.
    # group 2 = 1 / 1; group 0 = (0 + 0) / 2 = 0; group 1 = 7/6
    ids = [[2, 0, 0], [1, 1, 1]]
    excess, present = excess_loss(PROXY, REF, ids, 3)
    np.testing.assert_allclose(excess, [0.0, 7 / 6, 1.0])
    assert present.all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_excess_loss_accepts_torch_tensors(dtype: torch.dtype) -> None:
    proxy = torch.tensor(PROXY, dtype=dtype)
    ref = torch.tensor(REF, dtype=dtype)
    excess, present = excess_loss(proxy, ref, torch.tensor(IDS), 3, previous=[0, 0, 0.25])
    assert isinstance(excess, np.ndarray) and excess.dtype == np.float64
    np.testing.assert_allclose(excess, [1 / 3, 7 / 6, 0.25], rtol=1e-6)
    np.testing.assert_array_equal(present, [True, True, False])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    excess, _ = excess_loss(proxy, ref, torch.tensor(IDS), 3, token_mask=mask)
    np.testing.assert_allclose(excess, [1 / 3, 1.75, 0.0], rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"group_ids": [0, 3]}, "group ids must be in [0, 3)"),
        ({"group_ids": [0, -1]}, "group ids must be in [0, 3)"),
        ({"group_ids": [0.0, 1.0]}, "group_ids must be integers"),
        ({"group_ids": [0, 1, 2]}, "group_ids has shape (3,)"),
        ({"ref_token_loss": [[1.0, 2.0]]}, "reference loss"),
        ({"previous": [0.0, 0.0]}, "previous has 2 scores for 3 groups"),
        ({"proxy_token_loss": [[math.nan, 1.0, 1.0], [1.0, 1.0, 1.0]]}, "not finite"),
        ({"token_mask": [True, False]}, "token_mask has shape"),
    ],
)
def test_excess_loss_bad_inputs(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "proxy_token_loss": PROXY,
        "ref_token_loss": REF,
        "group_ids": IDS,
        "num_groups": 3,
    }
    args.update(kwargs)
    with pytest.raises(ValueError) as info:
        excess_loss(**args)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_doremi_update_by_hand() -> None:
    # From uniform, eta = 1, lambda = [1/3, 7/6, 1/4], c = 0:
    # exp(lambda) = [1.395612, 3.211271, 1.284025], sum 5.890908
    # alpha = [0.236910, 0.545123, 0.217967]
    log_alpha, alpha = doremi_update(np.log(np.full(3, 1 / 3)), [1 / 3, 7 / 6, 0.25], 1.0, 0.0)
    np.testing.assert_allclose(alpha, [0.23690954, 0.54512315, 0.2179673], rtol=1e-7)
    np.testing.assert_allclose(np.exp(log_alpha), alpha, rtol=1e-12)
    # c = 1e-3: 0.999 * alpha + 1e-3 / 3 = [0.237006, 0.544911, 0.218083]
    _, alpha_c = doremi_update(np.log(np.full(3, 1 / 3)), [1 / 3, 7 / 6, 0.25], 1.0, 1e-3)
    np.testing.assert_allclose(alpha_c, [0.23700597, 0.54491136, 0.21808267], rtol=1e-7)
    # It is the shared LMO step with A = diag(lambda) (column sums = lambda).
    np.testing.assert_allclose(
        alpha_c, exponentiated_gradient_step(np.full(3, 1 / 3), [1 / 3, 7 / 6, 0.25], 1.0, 1e-3)
    )


def test_doremi_update_bad_inputs_and_huge_scores() -> None:
    with pytest.raises(ValueError, match="eta"):
        doremi_update(np.zeros(2), [1.0, 0.0], eta=0.0)
    with pytest.raises(ValueError, match="smoothing"):
        doremi_update(np.zeros(2), [1.0, 0.0], smoothing=2.0)
    with pytest.raises(ValueError, match="clipped at 0"):
        doremi_update(np.zeros(2), [-1.0, 0.0])
    with pytest.raises(ValueError, match="grad has shape"):
        doremi_update(np.zeros(2), [1.0, 0.0, 0.0])
    log_alpha, alpha = doremi_update(np.zeros(2), [1e6, 0.0], eta=1.0, smoothing=1e-3)
    assert np.all(np.isfinite(log_alpha))
    np.testing.assert_allclose(alpha, [1 - 5e-4, 5e-4])


def test_state_time_average_by_hand_and_resume() -> None:
    state = DoReMiState(num_groups=3, eta=1.0, smoothing=0.0)
    a1 = state.update(PROXY, REF, IDS)  # scores [1/3, 7/6, 0] (group 2 unseen: initial 0)
    # exp([1/3, 7/6, 0]) = [1.395612, 3.211271, 1], sum 5.606883
    np.testing.assert_allclose(a1, [0.248911, 0.572737, 0.178352], rtol=1e-5)
    saved = json.loads(json.dumps(state.state_dict()))
    # Step 2 gives group 2 score 1 and groups 0/1 score 0: alpha2 ∝ a1 * exp([0, 0, 1])
    # = [0.248911, 0.572737, 0.484812] / 1.306459 = [0.190523, 0.438389, 0.371088]
    a2 = state.update_from_excess([0.0, 0.0, 1.0])
    np.testing.assert_allclose(a2, [0.190523, 0.438389, 0.371088], rtol=1e-5)
    # The output is the time average of alpha_1 and alpha_2.
    np.testing.assert_allclose(state.average, (a1 + a2) / 2, rtol=1e-12)
    assert state.num_updates == 2

    resumed = DoReMiState.from_state_dict(saved)
    np.testing.assert_array_equal(resumed.update_from_excess([0.0, 0.0, 1.0]), a2)
    assert resumed == state
    other = DoReMiState(num_groups=3)
    other.load_state_dict(saved)
    assert other == DoReMiState.from_state_dict(saved)


def test_absent_group_keeps_its_last_score() -> None:
    state = DoReMiState(num_groups=2, eta=1.0, smoothing=0.0)
    state.update_from_excess([0.5, 2.0])
    # Only group 0 in this batch (score 1): group 1 reuses 2.0, so alpha ∝ a * exp([1, 2]).
    before = state.weights
    after = state.update([[2.0, 2.0]], [[1.0, 1.0]], [0])
    expected = before * np.exp([1.0, 2.0])
    np.testing.assert_allclose(after, expected / expected.sum(), rtol=1e-12)
    assert state.scores == [1.0, 2.0]


def test_doremi_upweights_the_group_with_the_largest_excess_loss() -> None:
    rng = np.random.default_rng(0)
    state = DoReMiState(num_groups=3)  # defaults: eta 1, c 1e-3
    gaps = np.array([0.1, 0.6, 0.3])  # mean proxy-minus-reference gap per group
    history = []
    for _ in range(30):
        ids = rng.integers(0, 3, size=8)
        ref = rng.uniform(2.0, 4.0, size=(8, 16))
        proxy = ref + gaps[ids][:, None] + rng.normal(0, 0.05, size=(8, 16))
        history.append(state.update(proxy, ref, ids))
    w1 = [a[1] for a in history]
    assert all(b > a for a, b in itertools.pairwise(w1))
    assert int(np.argmax(state.average)) == 1
    assert state.average[1] > 0.5 and state.weights[0] < state.weights[2] < state.weights[1]
    assert state.weights.min() >= 1e-3 / 3  # smoothing keeps a floor


def test_state_validation() -> None:
    with pytest.raises(ValueError, match="eta"):
        DoReMiState(num_groups=2, eta=-1.0)
    with pytest.raises(ValueError, match="num_groups"):
        DoReMiState(num_groups=0)
    with pytest.raises(ValueError, match="initial_score"):
        DoReMiState(num_groups=2, initial_score=-1.0)
    with pytest.raises(ValueError, match="log_alpha has 3 entries for 2 groups"):
        DoReMiState(num_groups=2, log_alpha=[0.0, 0.0, 0.0])
    start = DoReMiState.with_initial_weights([1.0, 3.0])
    np.testing.assert_allclose(start.weights, [0.25, 0.75])
    np.testing.assert_allclose(start.average, [0.25, 0.75])  # no update yet
