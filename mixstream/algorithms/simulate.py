"""Toy training runs under *known* laws: how close each mixing method gets to the optimum.

Two simulators, no model:

* :class:`LinearDynamicSimulator`: validation losses only, ``L_{s+1} = L_s - A p_s + noise``
  with a planted ``A`` (optimum: all weight on the group with the largest column sum of
  ``A``). :func:`run_aioli` drives Aioli on it without an update lag; it checks that
  LearnParams recovers ``A``.
* :class:`PlantedLaw` / :class:`PlantedRun`: a shared parameter trained by SGD on the
  mixture's batches, which gives *every* method the signal it learns from, exactly when a
  trainer would, and whose optimal static mixture is computable. :func:`simulate` runs one
  method on it through an adapter (:data:`ADAPTERS`), with the dataset's update lag and
  batch apportioning. ODM, ADO, Aioli and Skill-It are their real
  :class:`~mixstream.mixing.base.Mixer`, steering the run as they steer the dataset
  (:class:`MixerAdapter`), so what is simulated is what trains, with no second copy of any
  decision. DoReMi, DGA and DoGE collect their signals in Composer only (a reference model,
  gradient probes); their adapters make the calls their Composer algorithm
  (``mixstream.composer.*``) makes, in the same order, on the same pure rules and states.

**The planted model.** ``u = theta - theta*`` in ``R^d``. A sample of group j with noise
``z ~ N(0, sigma^2 I)`` has loss ``l = c_j + 1/2 sum_k s_jk ((u_k - delta_jk - z_k)^2 - sigma^2)``
(so ``c_j`` is group j's expected loss at its own optimum, whatever the noise). Why this
model:

1. every signal is a quantity of it: per-sample training losses of the batch (ODM, ADO; and
   DoReMi's excess over a reference parameter on the same samples), validation losses on a
   fixed validation set (Aioli, Skill-It), per-group probe gradients and the gradient of a
   target set (DGA, DoGE);
2. the curvatures ``s_j`` are diagonal in one basis, so SGD on a static mixture is a linear
   recursion per coordinate and its *expected* final loss has a closed form
   (:meth:`PlantedLaw.expected_losses`): the optimal static mixture for the mean final
   validation loss over groups is a smooth minimisation on the simplex
   (:meth:`PlantedLaw.optimum`), not a guess (a mixture that changes during the run may
   still beat it: a method's gap to it can be negative);
3. within a block of directions the curvature spans a spectrum ``lambda_l = l^-decay``, so
   a loss is a sum of exponentials over a spectrum and falls like a power law in the steps,
   the law ADO fits, until SGD's noise floor (``eps``);
4. coverage sets transfer: training on group j lowers group i's loss through the directions
   both cover (to first order ``A_ij = lr sum_k s_ik s_jk u_k^2``, the ``A = lr G G^T`` of a
   gradient model); offsets ``delta`` set conflict (groups pull shared directions to
   different targets). A group that covers everything is a corner optimum; specialists
   whose blocks differ in size, curvature and error make an interior one.

The learning rate is constant: the power law comes from the spectrum, not a schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from ..apportion import advance_targets, allocate
from ..mixing import ADOMixer, AioliMixer, Mixer, ODMMixer, SkillItMixer
from ..weights import WeightSchedule
from .aioli import AioliConfig, AioliState
from .dga import cosine_alignment, dga_update
from .doge import DoGEState, doge_scores
from .doremi import DoReMiState
from .lmo import (
    as_finite_array,
    check_fraction,
    check_positive,
    check_simplex,
    normalize_mixing_matrix,
)

__all__ = [
    "ADAPTERS",
    "ADOAdapter",
    "Adapter",
    "AioliAdapter",
    "AioliRound",
    "Batch",
    "DGAAdapter",
    "DoGEAdapter",
    "DoReMiAdapter",
    "LinearDynamicSimulator",
    "MixerAdapter",
    "ODMAdapter",
    "PlantedLaw",
    "PlantedRun",
    "Probe",
    "SimResult",
    "SkillItAdapter",
    "StaticAdapter",
    "project_to_simplex",
    "run_aioli",
    "simulate",
]


@dataclass
class LinearDynamicSimulator:
    """Per-group validation losses under ``L_{s+1} = L_s - A p_s + N(0, noise^2)``."""

    A: Any
    losses: Any
    noise: float = 0.0
    seed: int = 0
    steps: int = 0
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.A = as_finite_array("A", self.A, ndim=2)
        self.losses = as_finite_array("losses", self.losses, ndim=1)
        if self.A.shape != (self.losses.size, self.losses.size):
            raise ValueError(f"A has shape {self.A.shape} for {self.losses.size} groups")
        self._rng = np.random.default_rng(self.seed)

    def train(self, mixture: Any, steps: int = 1) -> None:
        """``steps`` global batches on ``mixture``."""
        p = check_simplex("mixture", mixture)
        for _ in range(int(steps)):
            self.losses = self.losses - self.A @ p
            if self.noise:
                self.losses = self.losses + self._rng.normal(0.0, self.noise, self.losses.size)
            self.steps += 1

    def evaluate(self) -> np.ndarray:
        return self.losses.copy()


@dataclass(frozen=True)
class AioliRound:
    """What one Aioli round saw and decided."""

    A_raw: np.ndarray  # LearnParams' un-normalised estimate (about lp_steps * A)
    A_used: np.ndarray  # after normalisation and EMA: what the EG step used
    weights: np.ndarray  # the mixture trained for the rest of the round


def run_aioli(
    config: AioliConfig,
    sim: LinearDynamicSimulator,
    rounds: int,
    seed: int = 0,
    state: AioliState | None = None,
) -> tuple[list[AioliRound], AioliState]:
    """Drive ``rounds`` Aioli rounds on ``sim`` exactly as a trainer would.

    Warm-up on the prior (round 0 only), then per round: evaluate, each planned sweep then
    evaluate, finish the round (estimate A, EG step), train the rest of the round on the new
    weights. Pass ``state`` to continue a run (e.g. after ``AioliState.from_state_dict``).
    """
    if state is None:
        state = AioliState.initial(config, seed)
        sim.train(state.weights, config.prior_steps)
    history: list[AioliRound] = []
    for _ in range(int(rounds)):
        plan = state.plan(config)
        if not state.losses:
            state.record_losses(config, sim.evaluate())
        for sweep in plan.sweeps[len(state.losses) - 1 :]:
            sim.train(sweep.mixture, sweep.end_step - sweep.start_step)
            state.record_losses(config, sim.evaluate())
        weights = state.finish_round(config)
        sim.train(weights, plan.end_step - plan.mix_start_step)
        history.append(_aioli_round(config, state))
    return history, state


# ========================================================================= the planted model
def project_to_simplex(x: Any) -> np.ndarray:
    """Euclidean projection of a vector (or of each row of a matrix) onto the simplex.

    The sort-based algorithm of Duchi et al. (2008): exact, so a projected step can land on
    a face or a corner, where a corner optimum lies.
    """
    v = np.atleast_2d(as_finite_array("x", x))
    m = v.shape[1]
    desc = -np.sort(-v, axis=1)
    excess = np.cumsum(desc, axis=1) - 1.0
    positive = desc - excess / np.arange(1, m + 1) > 0
    last = m - 1 - np.argmax(positive[:, ::-1], axis=1)
    shift = excess[np.arange(v.shape[0]), last] / (last + 1)
    out = np.maximum(v - shift[:, None], 0.0)
    return out[0] if np.ndim(x) == 1 else out


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


@dataclass(frozen=True, eq=False)
class PlantedLaw:
    """A planted training run: per-group losses of one shared parameter under SGD.

    ``curvature`` (``s``, groups x d, >= 0): how strongly each group's samples pull each
    direction; ``init`` (``u_0``, d): the initial error; ``offsets`` (``delta``, groups x d,
    default 0): each group's target shift (conflict); ``floor`` (``c``, groups, default 0):
    irreducible losses; ``noise``: ``sigma`` of every sample's ``z``. A run is ``steps``
    global batches of ``batch_size`` samples at learning rate ``lr``; the validation set is
    ``val_samples`` fixed samples per group. See the module docstring for the loss.
    """

    curvature: Any
    init: Any
    offsets: Any = None
    floor: Any = None
    noise: float = 1.0
    lr: float = 0.5
    batch_size: int = 16
    steps: int = 1000
    val_samples: int = 128
    name: str = "planted"

    def __post_init__(self) -> None:
        s = as_finite_array("curvature", self.curvature, ndim=2)
        m, d = s.shape
        if m < 2 or np.any(s < 0):
            raise ValueError(f"curvature must be >= 0 with at least 2 groups (rows), got {s.shape}")
        if np.any(s.sum(axis=1) <= 0):
            bad = np.flatnonzero(s.sum(axis=1) <= 0).tolist()
            raise ValueError(f"group(s) {bad} have zero curvature: their samples train nothing")
        u0 = as_finite_array("init", self.init, ndim=1)
        if u0.size != d:
            raise ValueError(f"init has {u0.size} entries for {d} directions")
        delta = np.zeros((m, d)) if self.offsets is None else self.offsets
        delta = as_finite_array("offsets", delta, ndim=2)
        if delta.shape != (m, d):
            raise ValueError(f"offsets has shape {delta.shape}, curvature {(m, d)}")
        c = as_finite_array("floor", np.zeros(m) if self.floor is None else self.floor, ndim=1)
        if c.size != m:
            raise ValueError(f"floor has {c.size} entries for {m} groups")
        noise = float(self.noise)
        if not (math.isfinite(noise) and noise >= 0):
            raise ValueError(f"noise must be a finite number >= 0, got {self.noise!r}")
        lr = check_positive("lr", self.lr)
        if lr * s.max() >= 1:
            raise ValueError(
                f"lr * max curvature = {lr * s.max():.3g} must be < 1: a batch of the most "
                "curved group would overshoot (1 - lr s <= 0); lower lr or the curvature"
            )
        for name, value in (("curvature", s), ("init", u0), ("offsets", delta), ("floor", c),
                            ("noise", noise), ("lr", lr)):  # fmt: skip
            object.__setattr__(self, name, value)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("steps", self.steps, 1)
        _check_int("val_samples", self.val_samples, 1)

    @classmethod
    def from_blocks(
        cls,
        coverage: Any,
        *,
        block_size: int = 24,
        decay: float = 1.5,
        offsets: Any = None,
        init: Any = 1.0,
        floor: Any = 3.0,
        **kwargs: Any,
    ) -> PlantedLaw:
        """A law over ``blocks x block_size`` directions: ``s_jk = coverage[j, b] * l^-decay``
        for direction k, the l-th (1-based) of block b (module doc, point 3).

        ``offsets[j, b]``: group j's target shift in block b; ``init``: the initial error per
        block (a number or one per block); ``floor``: per group (a number or one per group).
        """
        G = as_finite_array("coverage", coverage, ndim=2)
        m, blocks = G.shape
        size = _check_int("block_size", block_size, 1)
        spectrum = np.arange(1, size + 1, dtype=np.float64) ** -check_positive("decay", decay)
        delta = None
        if offsets is not None:
            delta = as_finite_array("offsets", offsets, ndim=2)
            if delta.shape != (m, blocks):
                raise ValueError(f"offsets has shape {delta.shape}, coverage {(m, blocks)}")
            delta = np.repeat(delta, size, axis=1)
        u0 = np.repeat(np.broadcast_to(np.asarray(init, dtype=np.float64), (blocks,)), size)
        c = np.broadcast_to(np.asarray(floor, dtype=np.float64), (m,))
        return cls(np.kron(G, spectrum[None, :]), u0, delta, c, **kwargs)

    @property
    def num_groups(self) -> int:
        return int(self.curvature.shape[0])

    @property
    def dim(self) -> int:
        return int(self.curvature.shape[1])

    def population_losses(self, u: Any) -> np.ndarray:
        """Expected loss per group of a fresh sample at error ``u`` (the test loss)."""
        r = np.asarray(u, dtype=np.float64)[None, :] - self.offsets
        return self.floor + 0.5 * np.sum(self.curvature * r * r, axis=1)

    def expected_losses(self, mixtures: Any) -> np.ndarray:
        """Expected final population loss per group after ``steps`` batches on static mixtures.

        Row n of ``mixtures`` trains every batch on ``p_j * batch_size`` samples of group j
        (the continuous version of the dataset's apportioning; rows need only be >= 0). Per
        direction the SGD step is ``u <- a u + lr r + lr xi`` with ``h = sum_j p_j s_j``,
        ``a = 1 - lr h``, ``r = sum_j p_j s_j delta_j`` and noise ``xi`` of variance
        ``sigma^2 q / B``, ``q = sum_j p_j s_j^2``. With ``u* = r / h``:
        ``E u_T = u* + a^T (u_0 - u*)``, ``Var u_T = lr^2 sigma^2 q / B (1 - a^2T) / (1 - a^2)``,
        and group i's loss is ``c_i + 1/2 sum_k s_ik ((E u_k - delta_ik)^2 + Var u_k)``.
        Returns ``(rows, groups)``.
        """
        P = np.atleast_2d(as_finite_array("mixtures", mixtures))
        m = self.num_groups
        if P.shape[1] != m or np.any(P < 0):
            raise ValueError(f"mixtures must be >= 0 with {m} columns, got shape {P.shape}")
        s, delta, lr, steps = self.curvature, self.offsets, self.lr, self.steps
        h, r, q = P @ s, P @ (s * delta), P @ (s * s)
        a = 1.0 - lr * h
        covered = h > 0
        u_star = np.where(covered, r / np.where(covered, h, 1.0), self.init)
        a_T = a**steps
        mean = u_star + a_T * (self.init - u_star)
        gap = 1.0 - a * a
        tiny = gap < 1e-15  # h ~ 0: the sum of a^2t is the number of steps
        geometric = np.where(tiny, float(steps), (1.0 - a_T * a_T) / np.where(tiny, 1.0, gap))
        var = lr * lr * self.noise**2 * q / self.batch_size * geometric
        fixed = np.sum(s * delta * delta, axis=1)
        quad = (mean * mean + var) @ s.T - 2.0 * mean @ (s * delta).T + fixed
        return self.floor + 0.5 * quad

    def objective(self, mixtures: Any) -> np.ndarray:
        """The mean over groups of :meth:`expected_losses` (what a mixture is judged by)."""
        return self.expected_losses(mixtures).mean(axis=1)

    @cached_property
    def optimum(self) -> tuple[np.ndarray, float]:
        """``(p*, objective(p*))``: the best static mixture and its expected mean final loss.

        A global look first (every corner, edge midpoint, the uniform mixture and 4096
        Dirichlet draws), then projected gradient descent with backtracking from the best 4
        (the objective is smooth; forward-difference gradients), so a corner or face optimum
        is reached exactly.
        """
        m = self.num_groups
        eye = np.eye(m)
        pairs = [(eye[i] + eye[j]) / 2 for i in range(m) for j in range(i + 1, m)]
        draws = np.random.default_rng(0).dirichlet(np.ones(m), size=4096)
        candidates = np.vstack([eye, np.full((1, m), 1.0 / m), *pairs, draws])
        values = self.objective(candidates)
        best = (candidates[0], math.inf)
        for start in candidates[np.argsort(values)[:4]]:
            p, value = self._descend(start)
            if value < best[1]:
                best = (p, value)
        return best

    def _descend(self, p: np.ndarray, iterations: int = 400) -> tuple[np.ndarray, float]:
        """Projected gradient descent on :meth:`objective` from ``p`` (sufficient decrease)."""
        m = self.num_groups
        value = float(self.objective(p)[0])
        step, eps = 1.0, 1e-7
        for _ in range(iterations):
            grad = (self.objective(p[None, :] + eps * np.eye(m)) - value) / eps
            while step > 1e-12:
                q = project_to_simplex(p - step * grad)
                moved = q - p
                trial = float(self.objective(q)[0])
                if trial <= value + grad @ moved + moved @ moved / (2 * step):
                    break
                step /= 2
            else:
                break
            if np.abs(moved).sum() < 1e-12 or trial >= value:
                break
            p, value, step = q, trial, step * 2
        return p, value


@dataclass(frozen=True)
class Batch:
    """One trained global batch: each sample's group, noise and training loss (forward pass)."""

    index: int  #: 0-based global batch index
    groups: np.ndarray  #: (B,) group of each sample
    noise: np.ndarray  #: (B, d) each sample's z
    losses: np.ndarray  #: (B,) each sample's loss at the parameters before the step
    num_groups: int

    def group_losses(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean training loss and sample count per group, NaN for an absent group (what a
        loop hands ``Mixer.observe_group_losses``; a sample is one token here)."""
        counts = np.bincount(self.groups, minlength=self.num_groups).astype(np.float64)
        sums = np.bincount(self.groups, weights=self.losses, minlength=self.num_groups)
        with np.errstate(invalid="ignore", divide="ignore"):
            return sums / counts, counts


@dataclass(frozen=True)
class Probe:
    """``inner[i] = <g_i, g_t>``, ``group_norms[i] = |g_i|``, ``target_norm = |g_t|``
    (``mixstream.composer.probes.ProbeResult``)."""

    inner: np.ndarray
    group_norms: np.ndarray
    target_norm: float


class PlantedRun:
    """One seeded run of a :class:`PlantedLaw`: what the trainer and the dataset do per batch.

    Batch ``b`` trains on the mixture the :class:`~mixstream.weights.WeightSchedule` has in
    force at ``b``, apportioned into samples per group as the dataset does
    (:func:`mixstream.apportion.allocate`); :meth:`set_weights` takes effect ``update_lag``
    batches later, as ``DynamicStreamingDataset.set_weights`` does. It has the dataset's
    trainer side (:class:`~mixstream.mixing.base.SteeredDataset`: groups ``g0, g1, ...``,
    ``seed``, ``update_lag``, ``step``, ``advance``, ``set_weights``, the schedule), so a
    :class:`~mixstream.mixing.base.Mixer` steers it as it steers the dataset. Every batch draws
    ``batch_size x d`` noise from the run's stream whatever the mixture, so runs with one
    seed see the same noise (paired comparisons); the validation set is drawn once per seed,
    and probes are keyed by ``(seed, step, tag, group)`` like ``composer.probes.draw_probe``.
    """

    def __init__(self, law: PlantedLaw, seed: int = 0, update_lag: int = 1) -> None:
        self.law = law
        self.seed = _check_int("seed", seed, 0)
        self.update_lag = _check_int("update_lag", update_lag, 1)
        m, d = law.num_groups, law.dim
        self.group_names = [f"g{j}" for j in range(m)]
        self.u = law.init.copy()
        self.step = 0  #: batches trained (the trainer's announced step)
        self.schedule = WeightSchedule([(0, np.full(m, 1.0 / m))])
        self._targets = np.zeros(m)
        self._counts = np.zeros(m, dtype=np.int64)
        self._rng = np.random.default_rng([self.seed, 0])
        self._val = np.random.default_rng([self.seed, 1]).normal(
            0.0, law.noise, (m, law.val_samples, d)
        )
        self._val_mean = self._val.mean(axis=1)
        self._val_square = (self._val * self._val).mean(axis=1)

    @property
    def num_groups(self) -> int:
        return self.law.num_groups

    @property
    def lr(self) -> float:
        return self.law.lr

    @property
    def started(self) -> bool:
        """Whether a batch has been planned (trained): set_weights then respects the lag."""
        return self.step > 0

    @property
    def weight_schedule(self) -> WeightSchedule:
        return self.schedule.copy()

    def weights_at(self, batch: int) -> np.ndarray:
        return self.schedule.at(batch)

    def advance(self, step: int) -> None:
        """The trainer's announcement that ``step`` batches are done (they are, here)."""
        if step != self.step:
            raise ValueError(f"advance({step}), but {self.step} batches are done")

    def set_weights(self, weights: Any, step: int, effective_step: int | None = None) -> int:
        """Use ``weights`` from batch ``step + update_lag`` (or a later ``effective_step``);
        before the first batch, from ``step`` on. Returns the effective batch."""
        vec = check_simplex("weights", weights)
        if vec.size != self.num_groups:
            raise ValueError(f"got {vec.size} weights for {self.num_groups} groups")
        if step != self.step:
            raise ValueError(f"set_weights at step {step}, but {self.step} batches are done")
        earliest = step + self.update_lag
        effective = earliest if effective_step is None else int(effective_step)
        if effective < (earliest if self.started else step):
            raise ValueError(
                f"effective step {effective} is inside the update lag window: batches before "
                f"{earliest} (step {step} + lag {self.update_lag}) may already be prefetched"
            )
        self.schedule.set(effective, vec)
        return effective

    def sample_losses(self, groups: np.ndarray, noise: np.ndarray, u: Any) -> np.ndarray:
        """Each sample's loss at error ``u`` (e.g. a reference run's, on the same batch)."""
        law = self.law
        r = np.asarray(u)[None, :] - law.offsets[groups] - noise
        curvature = law.curvature[groups]
        return law.floor[groups] + 0.5 * np.einsum("bk,bk->b", curvature, r * r - law.noise**2)

    def train(self, loss_weights: Any | None = None) -> Batch:
        """Draw the next batch, take one SGD step on its mean loss, return what it saw.

        ``loss_weights``: DoReMi's and DoGE's ``reweight_loss`` (``weighted_token_loss``):
        the step is on ``sum_b w[g_b] l_b / sum_b w[g_b]`` instead of the plain mean.
        """
        law, m = self.law, self.num_groups
        weights = self.schedule.at(self.step)
        n = allocate(self._targets, self._counts, weights, law.batch_size)
        self._targets = advance_targets(self._targets, weights, law.batch_size)
        self._counts += np.asarray(n, dtype=np.int64)
        groups = np.repeat(np.arange(m), n)
        noise = self._rng.normal(0.0, law.noise, (law.batch_size, law.dim))
        residual = self.u[None, :] - law.offsets[groups] - noise
        curvature = law.curvature[groups]
        squares = residual * residual - law.noise**2
        losses = law.floor[groups] + 0.5 * np.einsum("bk,bk->b", curvature, squares)
        grads = curvature * residual
        if loss_weights is None:
            grad = grads.mean(axis=0)
        else:
            per = as_finite_array("loss_weights", loss_weights, ndim=1)[groups]
            if np.any(per < 0) or per.sum() <= 0:
                raise ValueError("loss_weights must be >= 0 with a positive weight in the batch")
            grad = per @ grads / per.sum()
        batch = Batch(self.step, groups, noise, losses, m)
        self.u = self.u - law.lr * grad
        self.step += 1
        return batch

    def validation_losses(self) -> np.ndarray:
        """Mean loss per group on the fixed validation set (``validation_losses``)."""
        law = self.law
        r = self.u[None, :] - law.offsets
        inner = r * r - 2.0 * r * self._val_mean + self._val_square - law.noise**2
        return law.floor + 0.5 * np.sum(law.curvature * inner, axis=1)

    def test_losses(self) -> np.ndarray:
        """Expected loss per group at the current parameters (an infinite test set)."""
        return self.law.population_losses(self.u)

    def probe(self, step: int, size: int) -> Probe:
        """Gradients of ``size`` fresh samples per group and of a target batch of ``size``
        validation samples of every group (DoGE's default target: the mean over groups)."""
        law, u, m = self.law, self.u, self.num_groups
        size = _check_int("probe size", size, 1)
        grads = np.empty((m, law.dim))
        target = np.zeros(law.dim)
        for j in range(m):
            rng = np.random.default_rng([self.seed, int(step), 0, j])
            z = rng.normal(0.0, law.noise, (size, law.dim)).mean(axis=0)
            grads[j] = law.curvature[j] * (u - law.offsets[j] - z)
            rng = np.random.default_rng([self.seed, int(step), 1, j])
            rows = rng.choice(law.val_samples, size=min(size, law.val_samples), replace=False)
            target += law.curvature[j] * (u - law.offsets[j] - self._val[j, rows].mean(axis=0))
        target /= m
        norms = np.linalg.norm(grads, axis=1)
        return Probe(grads @ target, norms, float(np.linalg.norm(target)))


# ================================================================================ adapters
class Adapter:
    """A mixing method's trainer-side calls on a :class:`PlantedRun`, as its Composer adapter.

    ``setup(run)`` is FIT_START of a fresh run; ``on_step(run, step, batch)`` comes after
    batch ``step`` (batches done) with the batch just trained (``MixingAlgorithm.on_step``).
    A proxy that samples uniformly and weights the loss (DoReMi, DoGE with
    ``objective="reweight_loss"``) returns the weights from ``loss_weights`` and its result
    from ``output``; :func:`simulate` then trains the main run on that static mixture.
    """

    name = "adapter"

    def setup(self, run: PlantedRun) -> None:
        raise NotImplementedError

    def on_step(self, run: PlantedRun, step: int, batch: Batch) -> None:
        return None

    def loss_weights(self) -> np.ndarray | None:
        return None

    def output(self) -> np.ndarray | None:
        return None


class StaticAdapter(Adapter):
    """``StaticMixture`` (``weights``) or ``Stratified`` (``None``: uniform)."""

    name = "static"

    def __init__(self, weights: Any | None = None) -> None:
        self.weights = None if weights is None else check_simplex("weights", weights)

    def setup(self, run: PlantedRun) -> None:
        m = run.num_groups
        w = np.full(m, 1.0 / m) if self.weights is None else self.weights
        run.set_weights(w, 0, effective_step=0)


def _aioli_round(config: AioliConfig, state: AioliState) -> AioliRound:
    """What the round just finished saw and decided (``state.finish_round`` was called)."""
    A_raw = np.asarray(state.last_A)
    if state.ema_A is not None:
        A_used = np.asarray(state.ema_A)
    else:
        A_used = normalize_mixing_matrix(A_raw) if config.normalize else A_raw
    return AioliRound(A_raw=A_raw, A_used=A_used, weights=np.asarray(state.weights))


class MixerAdapter(Adapter):
    """A method that is a :class:`~mixstream.mixing.base.Mixer`, run by the Mixer itself.

    The run is the mixer's dataset; per batch the adapter does what a training loop does:
    ``observe_group_losses`` with the batch's per-group training losses and sample counts,
    then ``step``. Validation losses come from ``evaluate=run.validation_losses`` (called only
    by the methods that learn from them, at their steps). So the simulated method is the
    trained one, a subclass or an override included, not a copy of its decisions.

    ``mixer_class`` defaults to the class attribute (the named adapters below); ``settings``
    are its keyword arguments. ``mixer`` is the Mixer of the last :meth:`setup`.
    """

    name = "mixer"
    mixer_class: type[Mixer] = Mixer
    mixer: Mixer

    def __init__(self, mixer_class: type[Mixer] | None = None, /, **settings: Any) -> None:
        if mixer_class is not None:
            self.mixer_class = mixer_class
        self.settings = settings
        self.mixer_class(**settings)  # bad settings fail here, not at setup

    def setup(self, run: PlantedRun) -> None:
        self.mixer = self.mixer_class(
            run, evaluate=run.validation_losses, total_steps=run.law.steps, **self.settings
        )
        self.mixer.start()

    def on_step(self, run: PlantedRun, step: int, batch: Batch) -> None:
        self.mixer.observe_group_losses(*batch.group_losses())
        self.mixer.step(step)


class ODMAdapter(MixerAdapter):
    """:class:`~mixstream.mixing.odm.ODMMixer` (what ``composer.ODM`` drives)."""

    name = "odm"
    mixer_class = ODMMixer


class ADOAdapter(MixerAdapter):
    """:class:`~mixstream.mixing.ado.ADOMixer` (what ``composer.ADO`` drives)."""

    name = "ado"
    mixer_class = ADOMixer


class SkillItAdapter(MixerAdapter):
    """:class:`~mixstream.mixing.skillit.SkillItMixer` (what ``composer.SkillIt`` drives)."""

    name = "skillit"
    mixer_class = SkillItMixer


class AioliAdapter(MixerAdapter):
    """:class:`~mixstream.mixing.aioli.AioliMixer` (what ``composer.Aioli`` drives);
    ``rounds`` records what every round saw and decided."""

    name = "aioli"
    mixer_class = AioliMixer

    def setup(self, run: PlantedRun) -> None:
        self.rounds: list[AioliRound] = []
        super().setup(run)

    def on_step(self, run: PlantedRun, step: int, batch: Batch) -> None:
        super().on_step(run, step, batch)
        mixer = self.mixer
        assert isinstance(mixer, AioliMixer) and mixer.config and mixer.state
        if mixer.state.round_index > len(self.rounds):  # a round finished at this step
            self.rounds.append(_aioli_round(mixer.config, mixer.state))


class DGAAdapter(Adapter):
    """``composer.DGA`` with the mean over groups' validation sets as its target: every
    ``update_steps`` batches, probe alignments (cosines by default) and a ``dga_update``."""

    name = "dga"

    def __init__(
        self,
        *,
        eta: float = 1.0,
        ema: float = 0.9,
        update_steps: int = 50,
        probe_batch_size: int = 4,
        normalize: bool = True,
    ) -> None:
        self.eta = check_positive("eta", eta)
        self.ema = check_fraction("ema", ema, allow_one=False)
        self.update_steps = _check_int("update_steps", update_steps, 1)
        self.probe_batch_size = _check_int("probe_batch_size", probe_batch_size, 1)
        self.normalize = bool(normalize)

    def setup(self, run: PlantedRun) -> None:
        self.alpha = run.weights_at(0)

    def on_step(self, run: PlantedRun, step: int, batch: Batch) -> None:
        if step % self.update_steps:
            return
        probe = run.probe(step, self.probe_batch_size)
        a = probe.inner
        if self.normalize:
            a = cosine_alignment(probe.inner, probe.group_norms, probe.target_norm)
        effective = run.set_weights(dga_update(self.alpha, a, self.eta, self.ema), step)
        self.alpha = run.weights_at(effective)


class DoReMiAdapter(Adapter):
    """``composer.DoReMi`` (``objective="reweight_loss"``): uniform batches, the loss weighted
    by ``alpha``; every ``update_steps`` batches, the clipped excess of the proxy's per-sample
    losses over the reference parameters' on the same samples. Output: the average alpha."""

    name = "doremi"

    def __init__(
        self, reference: Any, *, eta: float = 1.0, smoothing: float = 1e-3, update_steps: int = 1
    ) -> None:
        self.reference = as_finite_array("reference", reference, ndim=1)
        self.eta, self.smoothing = eta, smoothing
        self.update_steps = _check_int("update_steps", update_steps, 1)

    def setup(self, run: PlantedRun) -> None:
        m = run.num_groups
        if self.reference.size != run.law.dim:
            raise ValueError(f"reference has {self.reference.size} entries for {run.law.dim}")
        self.doremi = DoReMiState(num_groups=m, eta=self.eta, smoothing=self.smoothing)
        self._sums, self._counts = np.zeros(m), np.zeros(m)
        run.set_weights(np.full(m, 1.0 / m), 0, effective_step=0)

    def loss_weights(self) -> np.ndarray:
        return self.doremi.weights

    def on_step(self, run: PlantedRun, step: int, batch: Batch) -> None:
        m = run.num_groups
        reference = run.sample_losses(batch.groups, batch.noise, self.reference)
        clipped = np.maximum(batch.losses - reference, 0.0)
        self._sums += np.bincount(batch.groups, weights=clipped, minlength=m)
        self._counts += np.bincount(batch.groups, minlength=m)
        if step % self.update_steps:
            return
        previous = np.asarray(self.doremi.scores)
        excess = np.where(self._counts > 0, self._sums / np.maximum(self._counts, 1), previous)
        self._sums, self._counts = np.zeros(m), np.zeros(m)
        self.doremi.update_from_excess(excess)

    def output(self) -> np.ndarray:
        return self.doremi.average


class DoGEAdapter(Adapter):
    """``composer.DoGE`` (``objective="reweight_loss"``): uniform batches, the loss weighted
    by ``w``; every ``update_steps`` batches, DoGE's scores from a probe at the current
    learning rate and a step. Output: the average ``w``."""

    name = "doge"

    def __init__(
        self,
        *,
        mu: float = 0.05,
        dw_min: float = 0.0,
        dw_max: float = 5.0,
        max_grad_norm: float | None = 1.0,
        smoothing: float = 0.0,
        update_steps: int = 10,
        probe_batch_size: int = 4,
    ) -> None:
        self.mu = check_positive("mu", mu)
        self.dw_min, self.dw_max, self.max_grad_norm = dw_min, dw_max, max_grad_norm
        self.smoothing = smoothing
        self.update_steps = _check_int("update_steps", update_steps, 1)
        self.probe_batch_size = _check_int("probe_batch_size", probe_batch_size, 1)

    def setup(self, run: PlantedRun) -> None:
        m = run.num_groups
        self.doge = DoGEState.initial(np.full(m, 1.0 / m))
        run.set_weights(np.full(m, 1.0 / m), 0, effective_step=0)

    def loss_weights(self) -> np.ndarray:
        return np.asarray(self.doge.weights)

    def on_step(self, run: PlantedRun, step: int, batch: Batch) -> None:
        if step % self.update_steps:
            return
        probe = run.probe(step, self.probe_batch_size)
        scores = doge_scores(
            probe.inner, probe.group_norms, probe.target_norm, run.lr,
            max_grad_norm=self.max_grad_norm, dw_min=self.dw_min, dw_max=self.dw_max,
        )  # fmt: skip
        self.doge.update(scores, self.mu, self.smoothing)

    def output(self) -> np.ndarray:
        return self.doge.average


#: adapter classes by the method's ``kind`` (the Composer algorithm's and the Mixer's)
ADAPTERS: dict[str, type[Adapter]] = {
    cls.name: cls
    for cls in (StaticAdapter, AioliAdapter, DoReMiAdapter, DGAAdapter, ODMAdapter, ADOAdapter,
                SkillItAdapter, DoGEAdapter)
}  # fmt: skip


# ================================================================================ the driver
@dataclass(frozen=True)
class SimResult:
    """One method's run on a planted law.

    ``losses``: final expected loss per group and ``params`` the final error ``u`` (of the
    main run, for a proxy method);
    ``trained``: ``(steps, groups)``, the mixture each batch trained on (the sampling
    weights, or a proxy's loss weights); ``average``: the time-averaged sampling weights, or
    a proxy's output (what its main run trained on); ``proxy_losses``: a proxy's own.
    """

    losses: np.ndarray
    params: np.ndarray
    trained: np.ndarray
    average: np.ndarray
    proxy_losses: np.ndarray | None = None

    @property
    def mean_loss(self) -> float:
        return float(self.losses.mean())

    def distance(self, target: Any) -> float:
        """``|average - target|_1``."""
        return float(np.abs(self.average - np.asarray(target)).sum())

    def steps_to_reach(self, target: Any, radius: float, window: int = 1) -> int | None:
        """Batches trained before the first ``window`` batches whose mean mixture is within
        ``radius`` (L1) of ``target``; None if there are none.

        A window longer than one batch keeps a single sweep or one noisy update that passes
        near ``target`` from counting as having got there.
        """
        window = _check_int("window", window, 1)
        steps = self.trained.shape[0]
        if window > steps:
            return None
        sums = np.cumsum(np.vstack([np.zeros((1, self.trained.shape[1])), self.trained]), axis=0)
        means = (sums[window:] - sums[:-window]) / window
        near = np.abs(means - np.asarray(target)[None, :]).sum(axis=1) <= radius
        return int(np.argmax(near)) if near.any() else None


def simulate(
    law: PlantedLaw,
    adapter: Adapter,
    seed: int = 0,
    *,
    update_lag: int = 1,
    on_batch: Callable[[PlantedRun, Batch], None] | None = None,
) -> SimResult:
    """Train ``law.steps`` batches with ``adapter`` making its method's calls, as a trainer.

    Per batch: the loss weights (a proxy's), the batch and its SGD step, then
    ``adapter.on_step``. A proxy's ``output`` is then trained on as a static mixture with the
    same seed (its main run), whose final losses are the result's. ``on_batch`` sees every
    run and batch (e.g. to record training losses).
    """
    run = PlantedRun(law, seed, update_lag)
    adapter.setup(run)
    trained = np.empty((law.steps, law.num_groups))
    for step in range(1, law.steps + 1):
        weights = adapter.loss_weights()
        trained[step - 1] = run.weights_at(step - 1) if weights is None else weights
        batch = run.train(weights)
        if on_batch is not None:
            on_batch(run, batch)
        adapter.on_step(run, step, batch)
    output = adapter.output()
    if output is None:
        return SimResult(run.test_losses(), run.u, trained, run.schedule.average(law.steps))
    main = simulate(law, StaticAdapter(output), seed, update_lag=update_lag)
    average = np.asarray(output)
    return SimResult(main.losses, main.params, trained, average, run.test_losses())
