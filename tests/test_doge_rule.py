"""DoGE's pure rule by hand against the reference's update (Olivia-fsm/DoGE): clipped
gradients, lr-scaled inner products over the mean gradient norm, the score clip, the
``1/mu`` step on the log-weights and the time average."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mixstream.algorithms.doge import DoGEState, doge_scores, doge_update


def test_scores_by_hand() -> None:
    # Raw <g_j, g_t> = [2, -1, 0.5], |g_j| = [2, 0.5, 1], |g_t| = 4, lr = 0.1, clip norm 1:
    # g_0 is scaled by 1/2, g_t by 1/4: <g~, g~_t> = [0.25, -0.25, 0.125], |g~| = [1, 0.5, 1].
    scores = doge_scores([2.0, -1.0, 0.5], [2.0, 0.5, 1.0], 4.0, 0.1)
    mean_norm = 2.5 / 3 + 1e-6
    raw = 0.1 * np.array([0.25, -0.25, 0.125]) / mean_norm
    # clipped to [lr * 0, lr * 5]: the negative score becomes 0
    np.testing.assert_allclose(scores, [raw[0], 0.0, raw[2]], rtol=1e-12)
    # without clipping the gradients, and with a tight upper clip
    unclipped = doge_scores([2.0, -1.0, 0.5], [2.0, 0.5, 1.0], 4.0, 0.1, max_grad_norm=None)
    np.testing.assert_allclose(unclipped, [0.2 / (3.5 / 3 + 1e-6), 0.0, 0.05 / (3.5 / 3 + 1e-6)])
    tight = doge_scores([2.0, -1.0, 0.5], [2.0, 0.5, 1.0], 4.0, 0.1, dw_max=0.2, dw_min=-1.0)
    np.testing.assert_allclose(tight, [0.02, raw[1], raw[2]])  # raw = [0.03, -0.03, 0.015]


def test_one_update_by_hand() -> None:
    # log w += score / mu from uniform: scores [0.03, 0, 0.015], mu = 0.05 -> [0.6, 0, 0.3]
    w = doge_update([1 / 3] * 3, [0.03, 0.0, 0.015], mu=0.05)
    expected = np.exp([0.6, 0.0, 0.3]) / np.exp([0.6, 0.0, 0.3]).sum()
    np.testing.assert_allclose(w, expected, rtol=1e-12)
    smoothed = doge_update([1 / 3] * 3, [0.03, 0.0, 0.015], mu=0.05, smoothing=0.1)
    np.testing.assert_allclose(smoothed, 0.9 * expected + 0.1 / 3, rtol=1e-12)


def test_state_accumulates_and_averages_the_weights() -> None:
    state = DoGEState.initial([0.5, 0.5])
    np.testing.assert_allclose(state.average, [0.5, 0.5])  # no update yet: the start
    first = state.update([0.05, 0.0], mu=0.05)  # log-odds +1
    assert first[0] == pytest.approx(math.e / (1 + math.e))
    second = state.update([0.05, 0.0], mu=0.05)  # from first: log-odds +2
    assert second[0] == pytest.approx(math.e**2 / (1 + math.e**2))
    np.testing.assert_allclose(state.average, (first + second) / 2, rtol=1e-12)
    clone = DoGEState.from_state_dict(state.state_dict())
    assert clone == state and clone.updates == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"inner": [1.0], "group_norms": [1.0, 2.0]}, "2 gradient norms for 1"),
        ({"group_norms": [-1.0]}, "norms must be finite and >= 0"),
        ({"lr": 0.0}, "lr must be a finite number > 0"),
        ({"dw_min": 1.0, "dw_max": 0.0}, "dw_min <= dw_max"),
        ({"max_grad_norm": 0.0}, "max_grad_norm must be"),
        ({"inner": [math.nan]}, "must be finite"),
    ],
)
def test_bad_input_is_refused(kwargs: dict, message: str) -> None:
    args = {"inner": [1.0], "group_norms": [1.0], "target_norm": 1.0, "lr": 0.1, **kwargs}
    with pytest.raises(ValueError, match=message):
        doge_scores(**args)
