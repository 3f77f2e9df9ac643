"""DGA's pure rule: gradient alignment, the EG step (+ sign), and the EMA on the weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mixstream.algorithms.dga import alignment, dga_update

G = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
TARGET = [2.0, 1.0]
# a = [<(1,0),(2,1)>, <(0,1),(2,1)>, <(1,1),(2,1)>] = [2, 1, 3]


def test_alignment_by_hand_for_arrays_lists_and_tensors() -> None:
    np.testing.assert_allclose(alignment(np.array(G), TARGET), [2.0, 1.0, 3.0])
    # A list of gradients of any shape is flattened; nothing is stacked.
    grads = [np.array([[1.0], [0.0]]), np.array([0.0, 1.0]), np.array([1.0, 1.0])]
    np.testing.assert_allclose(alignment(grads, TARGET), [2.0, 1.0, 3.0])
    a = alignment(torch.tensor(G), torch.tensor(TARGET))
    assert isinstance(a, np.ndarray) and a.dtype == np.float64
    np.testing.assert_allclose(a, [2.0, 1.0, 3.0])
    a = alignment([torch.tensor(g, dtype=torch.bfloat16) for g in G], torch.tensor(TARGET))
    np.testing.assert_allclose(a, [2.0, 1.0, 3.0])
    a = alignment([torch.tensor(g) for g in G], np.array(TARGET))  # mixed inputs
    np.testing.assert_allclose(a, [2.0, 1.0, 3.0])


def test_alignment_with_several_targets_sums_them() -> None:
    # Targets (2, 1) and (0, -1) sum to (2, 0): a = [2, 0, 2] (LMO column sums).
    np.testing.assert_allclose(alignment(G, [[2.0, 1.0], [0.0, -1.0]]), [2.0, 0.0, 2.0])


def test_alignment_bad_inputs() -> None:
    with pytest.raises(ValueError, match="group 1 gradient has 3 entries, target has 2"):
        alignment([[1.0, 0.0], [1.0, 0.0, 0.0]], TARGET)
    with pytest.raises(ValueError, match="at least one group"):
        alignment([], TARGET)
    with pytest.raises(ValueError, match=r"\(d,\) or \(r, d\)"):
        alignment(G, np.zeros((1, 1, 2)))
    with pytest.raises(ValueError, match=r"not finite for group\(s\) \[0\]"):
        alignment([[math.nan, 0.0], [0.0, 1.0]], TARGET)


def test_dga_update_by_hand() -> None:
    # eta = ln 2: exp(eta * [2, 1, 3]) = [4, 2, 8] -> alpha_hat = [2/7, 1/7, 4/7] from uniform.
    a = [2.0, 1.0, 3.0]
    np.testing.assert_allclose(
        dga_update(np.full(3, 1 / 3), a, eta=math.log(2)), [2 / 7, 1 / 7, 4 / 7], rtol=1e-12
    )
    # EMA 0.5 on the previous weights: .5 * 1/3 + .5 * [2/7, 1/7, 4/7]
    # = [1/6 + 1/7, 1/6 + 1/14, 1/6 + 2/7] = [13/42, 10/42, 19/42]
    out = dga_update(np.full(3, 1 / 3), a, eta=math.log(2), ema_decay=0.5)
    np.testing.assert_allclose(out, [13 / 42, 10 / 42, 19 / 42], rtol=1e-12)


def test_dga_sign_positive_alignment_upweights() -> None:
    # A group whose gradient points along the target's gains weight; opposed loses it.
    out = dga_update([0.5, 0.5], [1.0, -1.0], eta=0.1)
    assert out[0] > 0.5 > out[1]


def test_dga_huge_alignment_is_stable() -> None:
    out = dga_update([0.25, 0.75], [1e6, 0.0], eta=1.0, ema_decay=0.2)
    # alpha_hat = [1, 0] -> .2 * [.25, .75] + .8 * [1, 0] = [.85, .15]
    np.testing.assert_allclose(out, [0.85, 0.15], rtol=1e-12)


@pytest.mark.parametrize(
    ("alpha", "a", "eta", "decay", "message"),
    [
        ([0.5, 0.5], [1.0, 0.0], 0.0, 0.0, "eta must be a finite number > 0"),
        ([0.5, 0.5], [1.0, 0.0], 1.0, 1.0, "ema_decay must be in [0, 1)"),
        ([0.5, 0.5], [1.0, 0.0], 1.0, -0.5, "ema_decay must be in [0, 1)"),
        ([0.5, 0.7], [1.0, 0.0], 1.0, 0.0, "must sum to 1"),
        ([0.5, 0.5], [1.0, math.inf], 1.0, 0.0, "grad must be finite"),
        ([0.5, 0.5], [1.0], 1.0, 0.0, "grad has shape (1,)"),
    ],
)
def test_dga_update_bad_inputs(
    alpha: list[float], a: list[float], eta: float, decay: float, message: str
) -> None:
    with pytest.raises(ValueError) as info:
        dga_update(alpha, a, eta, decay)
    assert message in str(info.value)


def test_dga_upweights_the_group_aligned_with_the_target() -> None:
    # Group gradients are noisy draws around fixed directions; the target is close to group
    # 2's direction, orthogonal to group 0's and opposed to group 1's.
    rng = np.random.default_rng(0)
    d = 64
    e = np.linalg.qr(rng.normal(size=(d, 3)))[0].T  # 3 orthonormal directions
    dirs = np.stack([e[0], 0.8 * e[1] - 0.6 * e[2], e[2]])
    target = e[2] + 0.01 * rng.normal(size=d)
    aligns = [alignment(dirs + 0.3 * rng.normal(size=(3, d)), target) for _ in range(40)]
    smoothed = plain = np.full(3, 1 / 3)
    w_smoothed, w_plain = [], []
    for a in aligns:
        smoothed = dga_update(smoothed, a, eta=0.2, ema_decay=0.5)
        plain = dga_update(plain, a, eta=0.2)
        w_smoothed.append(smoothed[2])
        w_plain.append(plain[2])
    assert int(np.argmax(smoothed)) == 2
    assert smoothed[2] > 0.9
    assert smoothed[1] < smoothed[0]  # anti-aligned loses more than orthogonal
    # The EMA damps the move: on the same alignments, plain DGA is ahead at every step.
    assert all(p > s for p, s in zip(w_plain, w_smoothed, strict=True))
