"""ODM's pure rule: the exploration rate, the importance-weighted rewards and the policy, by
hand against the reference's EXP3 update (alon-albalak/online-data-mixing)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mixstream.algorithms.odm import (
    ODMConfig,
    ODMState,
    exploration_rate,
    odm_policy,
    odm_rewards,
    odm_update,
)


def test_exploration_rate_by_hand() -> None:
    assert exploration_rate(4, 0) == 0.25  # eps_0 = 1/K
    assert exploration_rate(4, 1) == 0.25  # sqrt(ln 4 / 4) = 0.589 > 1/4
    assert exploration_rate(4, 100) == pytest.approx(math.sqrt(math.log(4) / 400))
    assert exploration_rate(2, 8) == pytest.approx(math.sqrt(math.log(2)) / 4)


def test_one_update_by_hand() -> None:
    # K = 2, after batch t = 8, from the initial state (R = 0, eps_0 = 1/2). The batch was
    # drawn with pi = [0.75, 0.25]; its mean training losses were [3, 2]; rewards are loss/10.
    config = ODMConfig(num_groups=2)
    state = ODMState.initial(config)
    policy = odm_update(config, state, 8, [3.0, 2.0], [0.75, 0.25])
    # R = [0.1 * 3 / 0.75, 0.1 * 2 / 0.25] = [0.4, 0.8]
    assert state.rewards == pytest.approx([0.4, 0.8])
    # eps_8 = sqrt(ln 2 / 16); pi_i = (1 - 2 eps_8) exp(0.5 R_i) / sum_j exp(0.5 R_j) + eps_8
    eps = math.sqrt(math.log(2) / 16)
    gibbs = np.exp([0.2, 0.4]) / np.exp([0.2, 0.4]).sum()
    np.testing.assert_allclose(policy, (1 - 2 * eps) * gibbs + eps, rtol=1e-12)
    assert state.eps == pytest.approx(eps) and state.updates == 1
    assert state.weights == pytest.approx(list(policy))
    # The next step's Gibbs temperature is eps_8: group 1 absent (NaN) keeps its reward.
    policy = odm_update(config, state, 9, [2.0, math.nan], list(policy))
    R = [0.4 + 0.1 * 2.0 / ((1 - 2 * eps) * gibbs[0] + eps), 0.8]
    assert state.rewards == pytest.approx(R)
    eps9 = math.sqrt(math.log(2) / 18)
    gibbs = np.exp(eps * np.array(R)) / np.exp(eps * np.array(R)).sum()
    np.testing.assert_allclose(policy, (1 - 2 * eps9) * gibbs + eps9, rtol=1e-12)


def test_policy_is_uniform_while_exploration_is_full_and_never_overflows() -> None:
    # eps = 1/K: (1 - K eps) = 0, the policy is the exploration floor alone
    np.testing.assert_allclose(odm_policy([5.0, 0.0, 1.0], 1 / 3, 1 / 3), [1 / 3] * 3)
    # exp(0.1 * 1e5) overflows float64; in log space it is one-hot plus the floor eps
    p = odm_policy([1e5, 0.0, 10.0], 0.1, 0.01)
    assert np.all(np.isfinite(p)) and p.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(p, [(1 - 3 * 0.01) + 0.01, 0.01, 0.01], atol=1e-12)


def test_rewards_skip_absent_groups_and_refuse_impossible_draws() -> None:
    np.testing.assert_allclose(
        odm_rewards([1.0, 2.0, 3.0], [4.0, math.nan, 1.0], [0.5, 0.25, 0.25], 0.5),
        [1.0 + 0.5 * 4 / 0.5, 2.0, 3.0 + 0.5 * 1 / 0.25],
    )
    with pytest.raises(ValueError, match=r"group\(s\) \[1\] have a loss but were drawn"):
        odm_rewards([0.0, 0.0], [1.0, 1.0], [1.0, 0.0], 0.1)
    with pytest.raises(ValueError, match="one entry per group"):
        odm_rewards([0.0, 0.0], [1.0], [0.5, 0.5], 0.1)
    with pytest.raises(ValueError, match="finite or NaN"):
        odm_rewards([0.0, 0.0], [math.inf, 1.0], [0.5, 0.5], 0.1)


def test_with_mixed_batches_the_policy_settles_near_the_loss_proportions() -> None:
    # Every group in every batch (mixed batches): R_i grows like sum L_i / pi_i, stable where
    # L_i / pi_i is equal for all i, i.e. pi ∝ L (module doc).
    config = ODMConfig(num_groups=3)
    state = ODMState.initial(config)
    losses = np.array([3.0, 1.0, 2.0])
    pi = np.full(3, 1 / 3)
    for t in range(1, 3001):
        pi = state.update(config, t, losses, pi)
    np.testing.assert_allclose(pi, losses / losses.sum(), atol=0.01)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_groups": 1}, "num_groups must be >= 2"),
        ({"num_groups": 2, "reward_scale": 0.0}, "reward_scale must be a finite number > 0"),
        ({"num_groups": 2, "reward_scale": math.inf}, "reward_scale must be a finite number"),
        ({"num_groups": 2, "warmup_steps": -1}, "warmup_steps must be >= 0"),
        ({"num_groups": 2, "warmup_steps": 1.5}, "warmup_steps must be an integer"),
    ],
)
def test_bad_settings_name_the_option(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ODMConfig(**kwargs)


def test_warmup_and_state_round_trip() -> None:
    config = ODMConfig(num_groups=2, warmup_steps=3)
    assert [config.learns_at(t) for t in (1, 3, 4)] == [False, False, True]
    state = ODMState.initial(config)
    state.update(config, 4, [1.0, 2.0], [0.5, 0.5])
    clone = ODMState.from_state_dict(state.state_dict())
    assert clone == state
    a = clone.update(config, 5, [1.5, 1.0], clone.weights)
    b = state.update(config, 5, [1.5, 1.0], state.weights)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="state has 2 groups, the config 3"):
        state.update(ODMConfig(num_groups=3), 6, [1.0] * 3, [1 / 3] * 3)
