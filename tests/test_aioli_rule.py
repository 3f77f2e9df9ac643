"""Aioli's pure rule: sweep mixtures, LearnParams' plan and beta, A's estimate, the update,
resumable state, and recovery of a planted A in a simulated run."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from mixstream.algorithms.aioli import (
    AioliConfig,
    AioliState,
    LearnParamsPlan,
    aioli_step,
    aioli_update,
    beta_from_losses,
    estimate_A,
    sweep_mixtures,
)
from mixstream.algorithms.lmo import normalize_mixing_matrix
from mixstream.algorithms.simulate import LinearDynamicSimulator, run_aioli


def _config(m: int = 2, **kw: object) -> AioliConfig:
    base: dict[str, object] = {
        "eta": 1.0,
        "update_steps": 100,
        "lp_rounds": 2,
        "lp_steps": 3,
        "one_hot_factor": 0.75,
    }
    base.update(kw)
    return AioliConfig(num_groups=m, **base)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- by hand
def test_sweep_mixtures_by_hand() -> None:
    # m = 3, f = 0.5: the other two share 0.5 equally.
    np.testing.assert_allclose(
        sweep_mixtures(3, 0.5), [[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]]
    )
    np.testing.assert_array_equal(sweep_mixtures(2, 1.0), np.eye(2))  # pure one-hot


def test_beta_from_losses_by_hand() -> None:
    # lp_rounds = 2, order: group 1, 0, 0, 1; losses before and after each sweep:
    losses = [[10.0, 10.0], [9.5, 9.0], [8.5, 8.8], [7.7, 8.6], [7.5, 7.4]]
    # group 1's sweeps: [10-9.5, 10-9] = [.5, 1.0] and [7.7-7.5, 8.6-7.4] = [.2, 1.2]
    #   -> beta[:, 1] = [.7, 2.2] / 2 = [.35, 1.1]
    # group 0's sweeps: [9.5-8.5, 9-8.8] = [1.0, .2] and [8.5-7.7, 8.8-8.6] = [.8, .2]
    #   -> beta[:, 0] = [1.8, .4] / 2 = [.9, .2]
    beta = beta_from_losses([1, 0, 0, 1], losses, lp_rounds=2)
    np.testing.assert_allclose(beta, [[0.9, 0.35], [0.2, 1.1]], atol=1e-12)
    with pytest.raises(ValueError, match="need 5 loss evaluations"):
        beta_from_losses([1, 0, 0, 1], losses[:-1], lp_rounds=2)
    with pytest.raises(ValueError, match="exactly 2 times"):
        beta_from_losses([1, 1, 0, 1], losses, lp_rounds=2)


def test_estimate_A_full_and_diagonal_by_hand() -> None:
    W = sweep_mixtures(2, 0.75)  # [[.75, .25], [.25, .75]]
    # A = [[2, 0], [1, 1]] -> beta = A W^T = [[1.5, .5], [1.0, 1.0]] (see test_lmo)
    beta = [[1.5, 0.5], [1.0, 1.0]]
    np.testing.assert_allclose(estimate_A(W, beta), [[2.0, 0.0], [1.0, 1.0]], atol=1e-12)
    # diagonal: A_jj = beta_jj / f = [1.5 / .75, 1.0 / .75] = [2, 4/3], off-diagonal 0
    np.testing.assert_allclose(estimate_A(W, beta, diagonal=True), [[2.0, 0.0], [0.0, 4 / 3]])


def test_aioli_update_by_hand() -> None:
    # normalised A = [[.5, 0], [.25, .25]]: column sums [.75, .25]; eta = 1 from uniform:
    # p0 = e^.75 / (e^.75 + e^.25) = 1 / (1 + e^-.5) = 0.6224593312...
    p = aioli_update([0.5, 0.5], [[0.5, 0.0], [0.25, 0.25]], eta=1.0)
    np.testing.assert_allclose(p, [0.6224593312018546, 0.3775406687981454], rtol=1e-12)


def test_aioli_step_ema_anchors_at_uniform_by_hand() -> None:
    cfg = _config(ema=0.1)
    # Round 1: A_raw [[2, 0], [1, 1]] -> normalised [[.5, 0], [.25, .25]] (sum 4); first EMA
    # value is the matrix itself; base uniform -> p0 = 1 / (1 + e^-.5) (as above).
    p1, ema1 = aioli_step(cfg, [0.5, 0.5], None, [[2.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(ema1, [[0.5, 0.0], [0.25, 0.25]])
    np.testing.assert_allclose(p1[0], 1 / (1 + math.exp(-0.5)), rtol=1e-12)
    # Round 2: A_raw [[0, 0], [0, 4]] -> [[0, 0], [0, 1]];
    # EMA = .1 * [[.5, 0], [.25, .25]] + .9 * [[0, 0], [0, 1]] = [[.05, 0], [.025, .925]];
    # column sums [.075, .925]; base uniform again -> p0 = 1 / (1 + e^.85) = 0.29943...
    p2, ema2 = aioli_step(cfg, p1, ema1, [[0.0, 0.0], [0.0, 4.0]])
    np.testing.assert_allclose(ema2, [[0.05, 0.0], [0.025, 0.925]], atol=1e-12)
    np.testing.assert_allclose(p2[0], 1 / (1 + math.exp(0.85)), rtol=1e-12)


def test_aioli_step_without_ema_accumulates_by_hand() -> None:
    cfg = _config(ema=None)
    p1, _ = aioli_step(cfg, [0.5, 0.5], None, [[2.0, 0.0], [1.0, 1.0]])
    # Round 2 multiplies p1 by exp([0, 1]): p ∝ [e^.75, e^.25 * e^1] -> p0 = 1 / (1 + e^.5)
    p2, _ = aioli_step(cfg, p1, None, [[0.0, 0.0], [0.0, 4.0]])
    np.testing.assert_allclose(p2[0], 1 / (1 + math.exp(0.5)), rtol=1e-12)


def test_aioli_step_smoothing_and_no_normalize() -> None:
    # normalize=False uses A as is: column sums [3, 1], eta = ln(2)/2 -> p ∝ [2^1.5, 2^.5]
    # = [2, 1] * 2^.5 -> [2/3, 1/3]; smoothing .3: .7 * [2/3, 1/3] + .15 = [37/60, 23/60]
    cfg = _config(eta=math.log(2) / 2, normalize=False, smoothing=0.3)
    p, _ = aioli_step(cfg, [0.5, 0.5], None, [[2.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(p, [37 / 60, 23 / 60], rtol=1e-12)


# -------------------------------------------------------------------------------- config
def test_defaults_for_paper_settings() -> None:
    c2, c3, c7 = (AioliConfig.defaults_for(m) for m in (2, 3, 7))
    assert (c2.eta, c2.update_steps, c2.lp_rounds, c2.lp_steps, c2.one_hot_factor) == (
        0.2, 250, 4, 4, 0.625)  # fmt: skip
    assert (c3.eta, c3.update_steps, c3.lp_rounds, c3.lp_steps, c3.one_hot_factor) == (
        0.1, 250, 4, 6, 0.5)  # fmt: skip
    assert (c7.eta, c7.update_steps, c7.lp_rounds, c7.lp_steps, c7.one_hot_factor) == (
        1.0,
        200,
        2,
        4,
        0.55,
    )  # fmt: skip  (what the reference effectively trained)
    assert (c2.ema, c3.ema, c7.ema) == (0.1, 0.5, 0.1)
    assert c2.normalize and c3.normalize and c7.normalize
    # Nearest paper setting (ties to the larger); above 7 the round grows with m.
    assert AioliConfig.defaults_for(4).lp_steps == 6
    assert AioliConfig.defaults_for(5).lp_steps == 4
    big = AioliConfig.defaults_for(20)
    assert big.lp_duration == 2 * 20 * 4
    assert big.update_steps == math.ceil(160 * 200 / 56)
    assert AioliConfig.defaults_for(3, eta=0.5, ema=None).eta == 0.5


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"eta": 0.0}, "eta must be a finite number > 0"),
        ({"eta": -1.0}, "eta must be a finite number > 0"),
        ({"lp_rounds": 0}, "lp_rounds must be >= 1"),
        ({"lp_steps": 0}, "lp_steps must be >= 1"),
        ({"lp_rounds": 1.5}, "lp_rounds must be an integer"),
        ({"update_steps": 12}, "leaves none of update_steps=12"),
        ({"one_hot_factor": 0.5}, "W is singular"),
        ({"one_hot_factor": 0.3}, "must be > 1/num_groups"),
        ({"one_hot_factor": 1.2}, "one_hot_factor must be in [0, 1]"),
        ({"ema": 1.0}, "ema must be in [0, 1)"),
        ({"smoothing": -0.1}, "smoothing must be in [0, 1]"),
        ({"prior": (1.0, 2.0, 3.0)}, "prior has 3 weights for 2 groups"),
        ({"prior": (1.0, -2.0)}, "prior must be >= 0"),
        ({"prior_steps": -1}, "prior_steps must be >= 0"),
    ],
)
def test_bad_config_says_what_is_wrong(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        _config(**kw)
    assert message in str(info.value)


def test_singular_one_hot_factor_for_three_groups_and_too_few_groups() -> None:
    with pytest.raises(ValueError, match="singular"):
        _config(m=3, one_hot_factor=1 / 3)
    with pytest.raises(ValueError, match="num_groups must be >= 2"):
        _config(m=1)


def test_prior_is_normalised_and_starts_the_run() -> None:
    cfg = _config(prior=(1.0, 3.0), prior_steps=50)
    assert cfg.prior == (0.25, 0.75)
    assert AioliState.initial(cfg, seed=0).weights == (0.25, 0.75)
    assert cfg.round_start(0) == 50 and cfg.round_start(2) == 250


def test_defaults_warm_up_one_round_before_the_first_sweeps() -> None:
    """mixstream's one deviation from the paper: round 0 starts after a round of the prior
    (uniform here), so its skewed sweeps miss the steepest part of training."""
    from mixstream.algorithms import Aioli

    for m in (2, 3, 4, 7, 12):
        cfg = AioliConfig.defaults_for(m)
        assert cfg.prior_steps == cfg.update_steps == cfg.round_start(0)
        assert AioliConfig.defaults_for(m, update_steps=400).prior_steps == 400
        assert AioliConfig.defaults_for(m, prior_steps=0).round_start(0) == 0  # the paper
    assert Aioli().mixer.make_config(["a", "b", "c"]).prior_steps == 250
    assert Aioli(prior_steps=0).mixer.make_config(["a", "b", "c"]).round_start(0) == 0
    assert Aioli(prior_steps=30, update_steps=100).mixer.make_config(["a", "b"]).prior_steps == 30


# ---------------------------------------------------------------------------------- plan
def test_plan_layout_is_contiguous_and_uses_W() -> None:
    cfg = _config(m=3, lp_rounds=2, lp_steps=4, update_steps=60, prior_steps=10)
    plan = LearnParamsPlan.for_round(cfg, seed=7, round_index=2)
    start = 10 + 2 * 60
    assert plan.start_step == start and plan.end_step == start + 60
    assert len(plan.sweeps) == 6
    for k, sweep in enumerate(plan.sweeps):
        assert (sweep.start_step, sweep.end_step) == (start + 4 * k, start + 4 * k + 4)
        np.testing.assert_array_equal(sweep.mixture, cfg.W[sweep.group])
    assert plan.mix_start_step == start + 24
    assert plan.eval_steps == (start, *(start + 4 * k for k in range(1, 7)))
    # Each of the lp_rounds blocks is a permutation of the groups.
    assert sorted(plan.order[:3]) == [0, 1, 2] and sorted(plan.order[3:]) == [0, 1, 2]
    sched = plan.weight_schedule(mixture_after=[0.2, 0.3, 0.5])
    assert [s for s, _ in sched] == [start + 4 * k for k in range(6)] + [start + 24]
    assert sched[-1][1] == (0.2, 0.3, 0.5)


def test_plan_is_deterministic_and_keyed_by_seed_and_round() -> None:
    cfg = _config(m=7, lp_rounds=2, lp_steps=1, update_steps=20)
    orders = {LearnParamsPlan.for_round(cfg, 5, r).order for r in range(10)}
    assert LearnParamsPlan.for_round(cfg, 5, 3) == LearnParamsPlan.for_round(cfg, 5, 3)
    assert len(orders) == 10  # 7!^2 orders: ten rounds colliding would be a bug
    assert LearnParamsPlan.for_round(cfg, 6, 3).order != LearnParamsPlan.for_round(cfg, 5, 3).order


# ------------------------------------------------------------------------- state/resume
def test_state_dict_round_trips_through_json_and_resumes_exactly() -> None:
    A = np.array([[0.03, 0.01, 0.004], [0.005, 0.02, 0.006], [0.01, 0.003, 0.012]])
    cfg = AioliConfig.defaults_for(3)

    sim = LinearDynamicSimulator(A, [5.0, 5.0, 5.0])
    straight, _ = run_aioli(cfg, sim, rounds=3, seed=11)

    sim = LinearDynamicSimulator(A, [5.0, 5.0, 5.0])
    first, state = run_aioli(cfg, sim, rounds=1, seed=11)
    # Stop in the middle of round 1's LearnParams: 5 of its 12 sweeps done.
    plan = state.plan(cfg)
    state.record_losses(cfg, sim.evaluate())
    for sweep in plan.sweeps[:5]:
        sim.train(sweep.mixture, sweep.end_step - sweep.start_step)
        state.record_losses(cfg, sim.evaluate())
    saved = json.loads(json.dumps(state.state_dict()))
    resumed = AioliState.from_state_dict(saved)
    assert resumed == state
    rest, _ = run_aioli(cfg, sim, rounds=2, state=resumed)

    for a, b in zip(straight, first + rest, strict=True):
        np.testing.assert_array_equal(a.weights, b.weights)
        np.testing.assert_array_equal(a.A_used, b.A_used)

    other = AioliState(seed=0)
    other.load_state_dict(saved)
    assert other == AioliState.from_state_dict(saved)


def test_record_losses_checks_count_and_shape() -> None:
    cfg = _config(m=2, lp_rounds=1, lp_steps=1, update_steps=10)
    state = AioliState.initial(cfg, seed=0)
    with pytest.raises(ValueError, match="got 3 losses for 2 groups"):
        state.record_losses(cfg, [1.0, 2.0, 3.0])
    for _ in range(3):  # before + after each of the 2 sweeps
        state.record_losses(cfg, [1.0, 2.0])
    with pytest.raises(ValueError, match="already has all its evaluations"):
        state.record_losses(cfg, [1.0, 2.0])


# ---------------------------------------------------------------- planted A (simulation)
def _planted(m: int, seed: int) -> np.ndarray:
    """A positive A with a clear best column (largest column sum = most total loss drop)."""
    rng = np.random.default_rng(seed)
    A = rng.uniform(0.002, 0.01, size=(m, m)) + np.diag(rng.uniform(0.01, 0.03, size=m))
    A[:, 0] *= 1.5
    return A


@pytest.mark.parametrize("m", [2, 3, 7])
def test_learnparams_recovers_planted_A_exactly_without_noise(m: int) -> None:
    A = _planted(m, seed=m)
    cfg = AioliConfig.defaults_for(m, ema=None)
    history, _ = run_aioli(cfg, LinearDynamicSimulator(A, np.full(m, 8.0)), rounds=2, seed=1)
    for rnd in history:
        # Each sweep is lp_steps batches, so beta (and the estimate) is lp_steps * A.
        np.testing.assert_allclose(rnd.A_raw / cfg.lp_steps, A, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(rnd.A_used, normalize_mixing_matrix(A), atol=1e-12)


def test_learnparams_estimate_converges_to_planted_A_under_noise() -> None:
    m = 3
    A = np.array([[0.03, 0.01, 0.004], [0.005, 0.02, 0.006], [0.01, 0.003, 0.012]])
    target = normalize_mixing_matrix(A)
    cfg = AioliConfig.defaults_for(m, ema=0.9)
    sim = LinearDynamicSimulator(A, np.full(m, 8.0), noise=1e-3, seed=1)
    history, _ = run_aioli(cfg, sim, rounds=40, seed=3)

    # One round's estimate is noisy (loss noise 1e-3 per step vs entries of 4e-3 to 3e-2) ...
    single = np.mean([np.abs(normalize_mixing_matrix(r.A_raw) - target).max() for r in history])
    assert 0.003 < single < 0.03
    # ... the mean of the raw estimates converges to lp_steps * A ...
    mean_raw = np.mean([r.A_raw for r in history], axis=0) / cfg.lp_steps
    np.testing.assert_allclose(mean_raw, A, atol=5e-4)
    # ... and so does the EMA the update uses, well inside one round's error.
    ema_err = np.abs(history[-1].A_used - target).max()
    assert ema_err < 0.005
    assert ema_err < single / 2


def test_weights_move_toward_the_optimum() -> None:
    m = 3
    A = np.array([[0.03, 0.01, 0.004], [0.005, 0.02, 0.006], [0.01, 0.003, 0.012]])
    gain = A.sum(axis=0)  # total-loss drop per step per unit weight: best is group 0
    best = int(np.argmax(gain))

    # Without EMA the EG steps accumulate: weight on the best group rises every round
    # toward 1, and each round the mixture lowers the summed loss faster.
    cfg = AioliConfig.defaults_for(m, eta=1.0, ema=None)
    sim = LinearDynamicSimulator(A, np.full(m, 50.0), noise=1e-4, seed=2)
    history, _ = run_aioli(cfg, sim, rounds=40, seed=0)
    w_best = [r.weights[best] for r in history]
    assert all(b > a for a, b in itertools.pairwise(w_best))
    assert w_best[-1] > 0.95
    rate = [float(gain @ r.weights) for r in history]
    assert rate[-1] > rate[0] > gain.mean()

    # With EMA (the paper's setting) each round is one step from uniform with the smoothed
    # normalised A, so the weights settle at softmax(eta * column sums of normalised A).
    cfg = AioliConfig.defaults_for(m, eta=1.0, ema=0.5)
    sim = LinearDynamicSimulator(A, np.full(m, 50.0), noise=1e-4, seed=2)
    history, _ = run_aioli(cfg, sim, rounds=10, seed=0)
    col = normalize_mixing_matrix(A).sum(axis=0)
    expected = np.exp(col) / np.exp(col).sum()
    np.testing.assert_allclose(history[-1].weights, expected, atol=2e-3)
    assert int(np.argmax(history[-1].weights)) == best
