"""Aioli's pure update rule (Chen et al. 2024, Algorithms "LearnParams" and "Aioli").

Training is cut into rounds of ``update_steps`` global batches (after a static warm-up of
``prior_steps`` on ``prior``: one round by default, none in the paper). Each round:

1. **LearnParams** (the first ``lp_rounds * m * lp_steps`` batches): ``lp_rounds`` random
   orders of the m groups; "sweep" group j = ``lp_steps`` batches on the smoothed one-hot
   mixture ``W[j]`` (``one_hot_factor`` on j, the rest shared equally). The full per-group
   validation loss is measured before the first sweep and after every sweep;
   ``beta[i, j]`` = drop of ``L_i`` during group j's sweeps, averaged over ``lp_rounds``.
2. **Estimate** ``A``: solve ``beta_i = W A_i`` (``diagonal``: ``A_jj = beta_jj / W_jj``, as if
   groups did not transfer), normalise (shift by ``-min`` if negative, divide by the sum),
   optionally EMA across rounds.
3. **EG step** ``p_j ∝ base_j exp(eta * sum_i A_ij)`` and train on ``p`` for the rest of the
   round.

``base`` follows the reference implementation (HazyResearch/aioli, ``AioliTrainer.train``):
without EMA the steps accumulate (``base = p`` of the previous round, the paper's
``p^t ∝ p^{t-1} exp(...)``); with EMA the smoothed ``A`` already carries the history, so
``base`` is the uniform mixture every round (accumulating as well would count every old A
over and over). One deliberate difference: without EMA, the first round starts from ``prior``
(when given) rather than from uniform.

Everything is a pure function or a small dataclass; ``AioliState`` serialises to plain
Python values so a resumed run makes exactly the same decisions.

Cost in the number of groups m. LearnParams is O(m) per round in *training steps*: it sweeps
``lp_rounds * m * lp_steps`` batches on one-group-heavy mixtures and measures the validation
loss of all m groups ``lp_rounds * m + 1`` times (O(m^2) group evaluations), and
``AioliConfig.defaults_for`` grows ``update_steps`` with m to keep the sweeps' share of a
round. That is fine for the paper's 2 to 7 groups and impractical for hundreds:
:meth:`AioliConfig.check_scale` refuses a run whose first LearnParams cannot finish and warns
when sweeps would take a large share of it, pointing to methods that scale (``SCALABLE``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .lmo import (
    as_finite_array,
    check_fraction,
    check_positive,
    ema,
    exponentiated_gradient_step,
    normalize_mixing_matrix,
    solve_mixing_matrix,
)
from .scale import SCALABLE, many_groups_warning

__all__ = [
    "AioliConfig",
    "AioliState",
    "LearnParamsPlan",
    "Sweep",
    "aioli_step",
    "aioli_update",
    "beta_from_losses",
    "estimate_A",
    "sweep_mixtures",
]

# Hyper-parameters of the paper's SlimPajama scripts (HazyResearch/aioli, scripts/*/aioli/
# run.sh), keyed by the number of groups: arxiv+stackexchange, arxiv+book+stackexchange, and
# all 7 domains. m = 2 and 3 are the scripts' numbers, which the reference also trains on
# exactly. m = 7 is what the reference *effectively* ran, not its script's lp_steps=10,
# one_hot_factor=0.75: its sweep batches are built from per-group slot counts
# (max(1, int(p * batch)) with the remainder on the last group) and stop when the smallest
# group's share runs out, so a 7-group sweep trained about 33 sequences (4 batches of 8)
# with 55% from the swept group. We train each global batch on one exact mixture, so we
# take those effective values; the script's would sweep twice as long and more skewed than
# anything the paper's 7-group numbers came from.
_PAPER_DEFAULTS: dict[int, dict[str, Any]] = {
    2: {"eta": 0.2, "update_steps": 250, "lp_rounds": 4, "lp_steps": 4, "one_hot_factor": 0.625,
        "ema": 0.1},
    3: {"eta": 0.1, "update_steps": 250, "lp_rounds": 4, "lp_steps": 6, "one_hot_factor": 0.5,
        "ema": 0.5},
    7: {"eta": 1.0, "update_steps": 200, "lp_rounds": 2, "lp_steps": 4, "one_hot_factor": 0.55,
        "ema": 0.1},
}  # fmt: skip


MAX_SWEEP_SHARE = 0.5  # warn above this share of a run's steps spent in LearnParams sweeps


# ------------------------------------------------------------------------------- pure pieces
def sweep_mixtures(m: int, one_hot_factor: float) -> np.ndarray:
    """``W``: row j is the mixture of group j's sweep (``one_hot_factor`` on j, rest equal).

    ``W = (f - r) I + r 11^T`` with ``r = (1 - f) / (m - 1)``: eigenvalues ``1`` and ``f - r``
    (m - 1 times), so it is singular exactly when ``f = 1/m`` (every sweep is uniform).
    """
    m = int(m)
    if m < 2:
        raise ValueError(f"Aioli needs at least 2 groups, got {m}")
    f = check_fraction("one_hot_factor", one_hot_factor)
    rest = (1.0 - f) / (m - 1)
    W = np.full((m, m), rest)
    np.fill_diagonal(W, f)
    return W


def beta_from_losses(
    order: Sequence[int], losses: Any, lp_rounds: int, relative: bool = False
) -> np.ndarray:
    """LearnParams' ``beta``: ``beta[i, j]`` = mean drop of loss i over group j's sweeps.

    ``losses`` has one row per evaluation: before the first sweep, then after each sweep
    (``len(order) + 1`` rows); ``order[k]`` is the group swept between rows k and k + 1.
    ``relative``: each drop is divided by the loss before its sweep (Skill-It's skills graph
    is ``beta.T`` of the relative drops, Chen et al. 2023), so groups whose losses sit at
    different scales are compared on one.
    """
    losses = as_finite_array("losses", losses, ndim=2)
    order = [int(j) for j in order]
    if losses.shape[0] != len(order) + 1:
        raise ValueError(
            f"need {len(order) + 1} loss evaluations (before the sweeps and after each of "
            f"{len(order)}), got {losses.shape[0]}"
        )
    m = losses.shape[1]
    lp_rounds = int(lp_rounds)
    if lp_rounds < 1:
        raise ValueError(f"lp_rounds must be >= 1, got {lp_rounds}")
    if sorted(order) != sorted(list(range(m)) * lp_rounds):
        raise ValueError(f"order {order} must sweep each of {m} groups exactly {lp_rounds} times")
    drops = losses[:-1] - losses[1:]  # (n_sweeps, n_eval): drop of every loss over sweep k
    if relative:
        if np.any(losses[:-1] <= 0):
            raise ValueError("relative drops need losses > 0 before every sweep")
        drops = drops / losses[:-1]
    beta = np.zeros((m, m))
    for k, j in enumerate(order):
        beta[:, j] += drops[k]
    return beta / lp_rounds


def estimate_A(W: Any, beta: Any, diagonal: bool = False) -> np.ndarray:
    """LearnParams' estimate of ``A^t`` from the sweep drops ``beta`` (un-normalised).

    Full: ``A_i = W^{-1} beta_i`` (``solve_mixing_matrix``). Diagonal: assume group j's
    sweep only moves ``L_j`` through ``A_jj``, so ``A_jj = beta_jj / W_jj`` and the rest is 0
    (the reference's ``aioli_diagonal``; cheaper to trust when transfer is noise).
    """
    W = as_finite_array("W", W, ndim=2)
    beta = as_finite_array("beta", beta, ndim=2)
    if beta.shape != W.shape:
        raise ValueError(f"beta has shape {beta.shape}, W has shape {W.shape}")
    if not diagonal:
        return solve_mixing_matrix(W, beta)
    d = np.diag(W)
    if np.any(d <= 0):
        raise ValueError("diagonal estimate needs W_jj > 0 (one_hot_factor > 0)")
    return np.diag(np.diag(beta) / d)


def aioli_update(p: Any, A: Any, eta: float, smoothing: float = 0.0) -> np.ndarray:
    """Aioli's EG step ``p_j ∝ p_j exp(eta * sum_i A_ij)`` (A already normalised)."""
    A = as_finite_array("A", A, ndim=2)
    return exponentiated_gradient_step(p, A.sum(axis=0), eta, smoothing)


# ---------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class AioliConfig:
    """Aioli hyper-parameters; ``defaults_for(m)`` gives the paper's settings.

    ``ema`` is the weight on the *previous* smoothed A (reference ``--ema``; ``None`` = no
    EMA, the EG steps accumulate). ``normalize`` is the reference ``--aioli_normalize_A`` (on in
    every paper script). ``prior`` is trained for ``prior_steps`` before round 0 and is the
    starting mixture; ``smoothing`` mixes that much of uniform into every new mixture.
    """

    num_groups: int
    eta: float
    update_steps: int
    lp_rounds: int
    lp_steps: int
    one_hot_factor: float
    ema: float | None = None
    diagonal: bool = False
    normalize: bool = True
    prior: tuple[float, ...] | None = None
    prior_steps: int = 0
    smoothing: float = 0.0

    def __post_init__(self) -> None:
        m = _check_int("num_groups", self.num_groups, 2)
        check_positive("eta", self.eta)
        _check_int("update_steps", self.update_steps, 1)
        _check_int("lp_rounds", self.lp_rounds, 1)
        _check_int("lp_steps", self.lp_steps, 1)
        _check_int("prior_steps", self.prior_steps, 0)
        check_fraction("smoothing", self.smoothing)
        f = check_fraction("one_hot_factor", self.one_hot_factor)
        if abs(f - 1.0 / m) < 1e-9:
            raise ValueError(
                f"one_hot_factor={f} equals 1/num_groups: every sweep would train on the "
                "uniform mixture, so the sweep matrix W is singular and A cannot be estimated"
            )
        if f < 1.0 / m:
            raise ValueError(
                f"one_hot_factor must be > 1/num_groups = {1.0 / m:.4g} (sweep j must "
                f"emphasise group j), got {f}"
            )
        if self.ema is not None:
            check_fraction("ema", self.ema, allow_one=False)
        if self.lp_duration >= self.update_steps:
            raise ValueError(
                f"LearnParams takes lp_rounds * num_groups * lp_steps = {self.lp_duration} "
                f"steps, which leaves none of update_steps={self.update_steps} for the learned "
                "mixture; raise update_steps or lower lp_rounds/lp_steps"
                + (f" (its cost grows with the {m} groups; {SCALABLE})" if m > 7 else "")
            )
        if self.prior is not None:
            prior = as_finite_array("prior", self.prior, ndim=1)
            if prior.size != m:
                raise ValueError(f"prior has {prior.size} weights for {m} groups")
            if np.any(prior < 0) or prior.sum() <= 0:
                raise ValueError(f"prior must be >= 0 with a positive sum, got {prior}")
            object.__setattr__(self, "prior", tuple(float(x) for x in prior / prior.sum()))

    @classmethod
    def defaults_for(cls, num_groups: int, **overrides: Any) -> AioliConfig:
        """The paper's settings for ``num_groups`` (scripts for m = 2, 3 and 7).

        Other m take the nearest of 2/3/7 (ties to the larger, whose ``lp_rounds=2`` keeps
        LearnParams short). Above 7, ``update_steps`` grows so LearnParams keeps the share of
        a round it has at m = 7 (56 of 200 steps), since it costs ``lp_rounds*m*lp_steps``.
        m = 7 follows what the reference code effectively trained on (see _PAPER_DEFAULTS):
        4-batch sweeps at 0.55, not its script's 10 batches at 0.75.

        One addition to the paper: a warm-up of one round (``prior_steps = update_steps``)
        on ``prior`` (uniform if none) before round 0; pass ``prior_steps=0`` for the
        paper's protocol. Round 0's alternating one-group-heavy sweeps otherwise hit the
        steepest part of training: at lr 3e-3 that cost 0.27-0.55 nats on 3 of 4 paired seeds
        and the warm-up removed it (+0.01 left, the sweeps' own cost); at lr 1e-3, where
        they are harmless, the two are within noise (benchmarks/RESULTS.md, "Aioli's
        sweeps: paired ablations").
        """
        m = _check_int("num_groups", num_groups, 2)
        ref = min(_PAPER_DEFAULTS, key=lambda k: (abs(k - m), -k))
        params = dict(_PAPER_DEFAULTS[ref])
        if m > 7:
            seven = _PAPER_DEFAULTS[7]
            share = seven["lp_rounds"] * 7 * seven["lp_steps"] / seven["update_steps"]
            params["update_steps"] = math.ceil(params["lp_rounds"] * m * params["lp_steps"] / share)
        params.update(overrides)
        params.setdefault("prior_steps", params["update_steps"])
        return cls(num_groups=m, **params)

    @property
    def lp_duration(self) -> int:
        """Global batches spent in LearnParams per round (the paper's delta-fraction)."""
        return self.lp_rounds * self.num_groups * self.lp_steps

    def sweep_share(self, total_steps: int) -> float:
        """Fraction of the first ``total_steps`` global batches spent in LearnParams sweeps.

        Sweeps leave the learned mixture, so this is the share of a run that trains on
        skewed one-group-heavy batches (the cost of estimating ``A``).
        """
        total = _check_int("total_steps", total_steps, 1)
        swept = 0
        start = self.prior_steps
        while start < total:
            swept += min(self.lp_duration, total - start)
            start += self.update_steps
        return swept / total

    @property
    def evaluations_per_round(self) -> int:
        """Validation-loss measurements of all groups per round (before and after each sweep)."""
        return self.lp_rounds * self.num_groups + 1

    def check_scale(self, total_steps: int | None = None) -> str | None:
        """Refuse where the number of groups makes Aioli impractical; else a warning or None.

        Raises ValueError when the first round's LearnParams cannot finish within
        ``total_steps`` (the run would train on sweeps and never on a learned mixture).
        Returns a warning when the sweeps would take more than ``MAX_SWEEP_SHARE`` of the
        run, or when there are more than ``MANY_GROUPS`` groups; None otherwise.
        """
        m = self.num_groups
        cost = (
            f"with {m} groups a round of LearnParams sweeps lp_rounds * groups * lp_steps = "
            f"{self.lp_rounds} * {m} * {self.lp_steps} = {self.lp_duration:,} batches and "
            f"measures all {m} groups' validation loss {self.evaluations_per_round:,} times "
            f"({self.evaluations_per_round * m:,} group evaluations), once every "
            f"update_steps={self.update_steps:,} steps"
        )
        if total_steps is not None:
            total = _check_int("total_steps", total_steps, 1)
            end = self.prior_steps + self.lp_duration
            if end >= total:
                prior = f" after {self.prior_steps} prior steps" if self.prior_steps else ""
                raise ValueError(
                    f"Aioli cannot finish one round of LearnParams in this run of {total:,} "
                    f"steps{prior}: {cost}. Its cost grows linearly with the number of "
                    f"groups; {SCALABLE}"
                )
            share = self.sweep_share(total)
            if share > MAX_SWEEP_SHARE:
                return (
                    f"Aioli would spend {share:.0%} of this run's {total:,} steps in "
                    f"LearnParams sweeps ({cost}); {SCALABLE}"
                )
        return many_groups_warning("Aioli", m, cost)

    @property
    def W(self) -> np.ndarray:
        return sweep_mixtures(self.num_groups, self.one_hot_factor)

    def initial_weights(self) -> tuple[float, ...]:
        m = self.num_groups
        return self.prior if self.prior is not None else (1.0 / m,) * m

    def round_start(self, round_index: int) -> int:
        """First global batch of round ``round_index`` (rounds follow the prior warm-up)."""
        return self.prior_steps + _check_int("round_index", round_index, 0) * self.update_steps


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


# -------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Sweep:
    """``lp_steps`` global batches ``[start_step, end_step)`` on ``mixture`` (group's sweep)."""

    group: int
    start_step: int
    end_step: int
    mixture: tuple[float, ...]


def _sweep_order(seed: int, round_index: int, m: int, lp_rounds: int) -> list[int]:
    """``lp_rounds`` keyed permutations of ``range(m)``, concatenated.

    Keyed hashing (not numpy's RNG) so every rank, and a run resumed on another numpy
    version, derives the same order from ``(seed, round_index)`` alone.
    """
    order: list[int] = []
    for rep in range(lp_rounds):

        def key(j: int, rep: int = rep) -> bytes:
            msg = f"aioli-sweep:{seed}:{round_index}:{rep}:{j}".encode()
            return hashlib.blake2b(msg, digest_size=8).digest()

        order.extend(sorted(range(m), key=key))
    return order


@dataclass(frozen=True)
class LearnParamsPlan:
    """The deterministic LearnParams schedule of one round, known before the round starts.

    Because it depends only on ``(config, seed, round_index)``, every sweep mixture can be
    handed to the dataset ahead of time with its effective step (``weight_schedule``), which
    is what a dataset with an update lag needs.
    """

    round_index: int
    start_step: int
    sweeps: tuple[Sweep, ...]
    mix_start_step: int
    end_step: int

    @classmethod
    def for_round(cls, config: AioliConfig, seed: int, round_index: int) -> LearnParamsPlan:
        return cls.build(
            config.W,
            config.lp_rounds,
            config.lp_steps,
            seed,
            round_index,
            start_step=config.round_start(round_index),
            end_step=config.round_start(round_index) + config.update_steps,
        )

    @classmethod
    def build(
        cls,
        W: Any,
        lp_rounds: int,
        lp_steps: int,
        seed: int,
        round_index: int,
        start_step: int,
        end_step: int | None = None,
    ) -> LearnParamsPlan:
        """Sweeps of every group on its row of ``W``, ``lp_rounds`` keyed orders, from
        ``start_step``; ``end_step`` defaults to the end of the last sweep.

        Aioli's rounds and Skill-It's graph-learning phase are both this plan.
        """
        W = as_finite_array("W", W, ndim=2)
        m = W.shape[0]
        seed = _check_int("seed", seed, 0)
        lp_rounds = _check_int("lp_rounds", lp_rounds, 1)
        lp_steps = _check_int("lp_steps", lp_steps, 1)
        start = _check_int("start_step", start_step, 0)
        order = _sweep_order(seed, _check_int("round_index", round_index, 0), m, lp_rounds)
        sweeps = tuple(
            Sweep(
                group=j,
                start_step=start + k * lp_steps,
                end_step=start + (k + 1) * lp_steps,
                mixture=tuple(float(x) for x in W[j]),
            )
            for k, j in enumerate(order)
        )
        mix_start = start + len(order) * lp_steps
        end = mix_start if end_step is None else int(end_step)
        if end < mix_start:
            raise ValueError(f"end_step={end} is before the sweeps end ({mix_start})")
        return cls(
            round_index=round_index,
            start_step=start,
            sweeps=sweeps,
            mix_start_step=mix_start,
            end_step=end,
        )

    @property
    def order(self) -> tuple[int, ...]:
        return tuple(s.group for s in self.sweeps)

    @property
    def eval_steps(self) -> tuple[int, ...]:
        """Global batches *before* which the validation loss is measured (len(sweeps) + 1)."""
        return (self.start_step, *(s.end_step for s in self.sweeps))

    def weight_schedule(
        self, mixture_after: Sequence[float] | None = None
    ) -> list[tuple[int, tuple[float, ...]]]:
        """``(effective_step, mixture)`` for every sweep, ascending.

        Apply in order: ``WeightSchedule.set`` drops entries after the one it sets.
        ``mixture_after`` (e.g. the previous round's p) fills the gap between the last sweep
        and the step at which the new p can take effect (the dataset's update lag).
        """
        out = [(s.start_step, s.mixture) for s in self.sweeps]
        if mixture_after is not None:
            out.append((self.mix_start_step, tuple(float(x) for x in mixture_after)))
        return out


# ------------------------------------------------------------------------------ the update
def aioli_step(
    config: AioliConfig,
    weights: Any,
    ema_A: Any | None,
    A_raw: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Normalise ``A_raw``, smooth it into ``ema_A``, take the EG step: ``(p_new, ema_A)``.

    See the module docstring for the ``base`` of the step (uniform with EMA, else ``weights``).
    """
    A = as_finite_array("A_raw", A_raw, ndim=2)
    m = config.num_groups
    if A.shape != (m, m):
        raise ValueError(f"A has shape {A.shape}, expected ({m}, {m})")
    if config.normalize:
        A = normalize_mixing_matrix(A)
    if config.ema is not None:
        A = ema(ema_A, A, config.ema)
        base = np.full(m, 1.0 / m)
    else:
        base = np.asarray(weights, dtype=np.float64)
    return aioli_update(base, A, config.eta, config.smoothing), A


@dataclass
class AioliState:
    """Everything Aioli carries between rounds, as plain values (``state_dict`` is JSON-able).

    ``losses`` are the validation losses measured so far in the current round's LearnParams,
    so a run checkpointed mid-round resumes with the same ``beta``. The sweep order is not
    stored: ``LearnParamsPlan.for_round(config, seed, round_index)`` recomputes it.
    """

    seed: int
    round_index: int = 0
    weights: tuple[float, ...] = ()
    ema_A: tuple[tuple[float, ...], ...] | None = None
    losses: list[tuple[float, ...]] = field(default_factory=list)
    last_A: tuple[tuple[float, ...], ...] | None = None

    @classmethod
    def initial(cls, config: AioliConfig, seed: int) -> AioliState:
        return cls(seed=_check_int("seed", seed, 0), weights=config.initial_weights())

    def plan(self, config: AioliConfig) -> LearnParamsPlan:
        return LearnParamsPlan.for_round(config, self.seed, self.round_index)

    def record_losses(self, config: AioliConfig, losses: Any) -> None:
        """Store one evaluation (before the first sweep, or after a sweep) of all groups."""
        vec = as_finite_array("losses", losses, ndim=1)
        if vec.size != config.num_groups:
            raise ValueError(f"got {vec.size} losses for {config.num_groups} groups")
        if len(self.losses) > config.lp_rounds * config.num_groups:
            raise ValueError("this round's LearnParams already has all its evaluations")
        self.losses.append(tuple(float(x) for x in vec))

    def finish_round(self, config: AioliConfig) -> tuple[float, ...]:
        """Estimate A from this round's losses, update the mixture, move to the next round."""
        plan = self.plan(config)
        beta = beta_from_losses(plan.order, self.losses, config.lp_rounds)
        A_raw = estimate_A(config.W, beta, config.diagonal)
        p, ema_A = aioli_step(config, self.weights, self.ema_A, A_raw)
        self.weights = tuple(float(x) for x in p)
        self.ema_A = None if config.ema is None else _matrix_tuple(ema_A)
        self.last_A = _matrix_tuple(A_raw)
        self.losses = []
        self.round_index += 1
        return self.weights

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "round_index": self.round_index,
            "weights": list(self.weights),
            "ema_A": None if self.ema_A is None else [list(r) for r in self.ema_A],
            "losses": [list(r) for r in self.losses],
            "last_A": None if self.last_A is None else [list(r) for r in self.last_A],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> AioliState:
        def matrix(x: Any) -> tuple[tuple[float, ...], ...] | None:
            return None if x is None else tuple(tuple(float(v) for v in r) for r in x)

        return cls(
            seed=int(state["seed"]),
            round_index=int(state["round_index"]),
            weights=tuple(float(x) for x in state["weights"]),
            ema_A=matrix(state["ema_A"]),
            losses=[tuple(float(v) for v in r) for r in state["losses"]],
            last_A=matrix(state.get("last_A")),
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        loaded = AioliState.from_state_dict(state)
        for name in ("seed", "round_index", "weights", "ema_A", "losses", "last_A"):
            setattr(self, name, getattr(loaded, name))


def _matrix_tuple(A: np.ndarray) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(v) for v in row) for row in A)
