"""ADO's pure update rule (Jiang, Zhou, Feng, Malladi, Kolter 2024, "Adaptive Data
Optimization: Dynamic Sample Selection with Scaling Laws", arXiv 2410.11820).

ADO fits, online, a power law of each group's *training* loss against the data seen,
``L_k(n) = eps_k + beta_k n^(-alpha_k)`` (the paper's per-domain scaling law), and samples
each group in proportion to how fast its law says its loss is still falling:
``-dL_k/dn = alpha_k (L_k(n) - eps_k) / n``, times a prior and a credit term.

The paper itself could not be read from here (only its abstract and summaries); the steps
below follow the authors' code, yidingjiang/ado (``src/data_selectors/ado.py``,
``AdoSelector`` at commit bc3d8d0, "Fixing update rule to the correct version", with
``src/dataloader/adaptive_loader.py`` and ``configs/loader/pile_ado.yaml``). After every
batch t (global batches done):

1. record each group's token count ``c_k`` and mean training loss in the batch; the credit
   ``h_k`` is an EMA of the batch's composition: ``h <- g2 h + (1 - g2) c / sum(c)``
   (``credit_ema = g2 = 0.9``; ``h`` starts at the prior);
2. every ``fit_interval`` batches from ``warmup_steps`` on, refit each group's law to its
   (cumulative data seen, training loss) points, leaving out the first ``ignore_steps``;
3. from ``warmup_steps`` on, with ``n`` the data seen so far and ``a_k = max(alpha_k,
   min_exponent)`` (the reference bounds the exponent below by 0.05):
   ``rho_k ∝ a_k (L_k(n) - eps_k) / n * mu_k * h_k^s`` (``mu`` the prior, ``s =
   credit_power = 0.5``), then a floor ``max(rho, min_prob)`` renormalised (``min_prob =
   0.01``, ``lmo.floor_probabilities``);
4. the sampled mixture is ``pi = g1 * avg + (1 - g1) * rho`` (``policy_ema = g1 = 0.9``)
   with ``avg`` the running time average of ``rho``, ``avg <- (1 - 1/(t+1)) avg + rho/(t+1)``
   (starting from the prior, which therefore weighs like ``warmup_steps`` observations).
   Before ``warmup_steps`` the prior is sampled.

Choices (ours):

* **The fit.** The reference smooths the per-step losses (Savitzky-Golay, window 101),
  keeps every 10th point and runs L-BFGS from 512 starting points on a Huber loss of
  ``log L`` with soft bounds (``alpha`` in [0, 0.8], ``eps >= e^0.5``). Here: least squares
  on the raw points (which averages their noise), solved exactly: for a fixed ``alpha`` the
  law is linear in ``(eps, beta)``, a 2-variable least squares with bounds ``eps >= 0`` and
  ``beta >= 0`` (a law never rises: a loss that does is fit flat, ``beta = 0``, rate 0);
  ``alpha`` in ``(0, max_exponent]`` by a grid and a golden-section refinement.
  Milliseconds per refit in numpy, and deterministic (the same decision on every rank and
  after a resume). The reference's soft bound ``eps >= e^0.5`` (a loss scale of its corpus)
  is not kept. Groups absent from a batch give no point (the reference imputes the previous
  loss, which only its smoothing filter needs).
* **n.** ``counts="total"`` (default): n is all data seen, the same for every group, as in
  the reference (``use_same_step_size=True``, the default its configs keep): a group's law
  is its loss against training progress, and the credit ``h`` says how much of that
  progress was its own data. ``counts="group"``: n is the group's own data. Data is counted
  in tokens (the reference counts sequences; with a fixed sequence length the two differ
  by a constant factor, which changes ``beta`` only, not ``rho``).
* The prior ``mu`` defaults to the starting mixture (the reference uses the groups' token
  counts, the "natural" mixture; pass those as the prior to match it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .lmo import (
    as_finite_array,
    check_fraction,
    check_positive,
    check_simplex,
    ema,
    floor_probabilities,
)

__all__ = [
    "COUNTS",
    "ADOConfig",
    "ADOState",
    "PowerLaw",
    "ado_policy",
    "ado_preference",
    "ado_update",
    "fit_power_law",
]

COUNTS = ("total", "group")
#: points a law needs (it has 3 parameters)
MIN_FIT_POINTS = 3
_GRID = 160  # alpha grid points in (0, max_exponent]
_REFINE = 40  # golden-section steps around the best grid point
_GOLDEN = (math.sqrt(5) - 1) / 2


# ------------------------------------------------------------------------------ the law
@dataclass(frozen=True)
class PowerLaw:
    """``L(n) = eps + beta * n^(-alpha)``."""

    eps: float
    beta: float
    alpha: float

    def __call__(self, n: Any) -> np.ndarray:
        return self.eps + self.beta * np.asarray(n, dtype=np.float64) ** (-self.alpha)

    def rate(self, n: Any, min_exponent: float = 0.0) -> np.ndarray:
        """``-dL/dn = a (L(n) - eps) / n`` with ``a = max(alpha, min_exponent)`` (reference)."""
        n = np.asarray(n, dtype=np.float64)
        return max(self.alpha, min_exponent) * (self(n) - self.eps) / n

    def to_list(self) -> list[float]:
        return [self.eps, self.beta, self.alpha]


def _solve_linear(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """min over ``eps >= 0``, ``b >= 0`` of ``|y - eps - b x|^2``: (sse, eps, b).

    A convex quadratic in 2 variables: the unconstrained minimum if it is feasible, else the
    better of the minima along the two edges of the feasible quadrant.
    """

    def sse(e: float, b: float) -> float:
        r = y - e - b * x
        return float(r @ r)

    xm, ym = float(x.mean()), float(y.mean())
    dx = x - xm
    sxx = float(dx @ dx)
    if sxx > 0:
        b = float(dx @ (y - ym)) / sxx
        e = ym - b * xm
        if b >= 0 and e >= 0:
            return sse(e, b), e, b
    candidates = [(max(ym, 0.0), 0.0), (0.0, max(0.0, float(x @ y) / float(x @ x)))]
    return min((sse(e, b), e, b) for e, b in candidates)


def fit_power_law(n: Any, losses: Any, max_exponent: float = 0.8) -> PowerLaw | None:
    """Least-squares fit of ``L(n) = eps + beta n^(-alpha)`` (module doc, "The fit").

    Bounds: ``eps >= 0``, ``beta >= 0``, ``0 < alpha <= max_exponent``.
    Points with a NaN loss or ``n <= 0`` are left out; ``None`` if fewer than 3 remain.
    """
    n = np.asarray(n, dtype=np.float64).reshape(-1)
    y = np.asarray(losses, dtype=np.float64).reshape(-1)
    if n.shape != y.shape:
        raise ValueError(f"n has {n.size} points, losses {y.size}")
    max_exponent = check_positive("max_exponent", max_exponent)
    keep = np.isfinite(y) & np.isfinite(n) & (n > 0)
    n, y = n[keep], y[keep]
    if n.size < MIN_FIT_POINTS:
        return None
    scale = float(n.max())
    u = n / scale  # in (0, 1]: x = u^-alpha >= 1, no overflow for any n

    def solve(alpha: float) -> tuple[float, float, float]:
        return _solve_linear(u ** (-alpha), y)

    grid = max_exponent * np.arange(1, _GRID + 1) / _GRID
    values = [solve(float(a))[0] for a in grid]
    best = int(np.argmin(values))
    lo = float(grid[best - 1]) if best > 0 else 0.5 * float(grid[0])
    hi = float(grid[min(best + 1, _GRID - 1)])
    c, d = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    fc, fd = solve(c)[0], solve(d)[0]
    for _ in range(_REFINE):
        if fc <= fd:
            hi, d, fd = d, c, fc
            c = hi - _GOLDEN * (hi - lo)
            fc = solve(c)[0]
        else:
            lo, c, fc = c, d, fd
            d = lo + _GOLDEN * (hi - lo)
            fd = solve(d)[0]
    alpha = min((values[best], float(grid[best])), (fc, c), (fd, d))[1]
    _, eps, b = solve(alpha)
    return PowerLaw(eps=eps, beta=b * scale**alpha, alpha=alpha)


# ----------------------------------------------------------------------------- the policy
def ado_preference(
    laws: list[PowerLaw],
    n: Any,
    prior: Any,
    credit: Any,
    *,
    credit_power: float = 0.5,
    min_exponent: float = 0.05,
    min_prob: float = 0.01,
) -> tuple[np.ndarray, np.ndarray]:
    """``rho ∝ rate_k(n_k) * mu_k * h_k^s``, floored at ``min_prob``; and the rates.

    ``n``: data seen per group (all equal under ``counts="total"``). If no group has a
    positive score (every law flat), ``rho`` is the prior (floored): there is nothing to
    prefer.
    """
    mu = check_simplex("prior", prior)
    h = check_simplex("credit", credit)
    n = as_finite_array("n", n, ndim=1)
    if not (len(laws) == mu.size == h.size == n.size):
        raise ValueError(
            f"{len(laws)} laws, {n.size} counts, prior {mu.size} and credit {h.size}: one per group"
        )
    if np.any(n <= 0):
        raise ValueError(f"n must be > 0 (data seen per group), got {n}")
    rates = np.array([law.rate(x, min_exponent) for law, x in zip(laws, n, strict=True)])
    score = rates * mu * h ** float(credit_power)
    total = float(score.sum())
    rho = score / total if total > 0 and math.isfinite(total) else mu
    return floor_probabilities(rho, min_prob), rates


def ado_policy(
    average: Any, rho: Any, step: int, policy_ema: float = 0.9
) -> tuple[np.ndarray, np.ndarray]:
    """``(pi, new average)``: ``pi = g1 avg + (1 - g1) rho``; ``avg`` takes ``rho`` at 1/(t+1)."""
    average = check_simplex("average", average)
    rho = check_simplex("rho", rho)
    t = int(step)
    if t < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    pi = ema(average, rho, policy_ema)
    new_average = ema(average, rho, t / (t + 1))
    return pi / pi.sum(), new_average / new_average.sum()


# ---------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class ADOConfig:
    """ADO's settings (module doc). Defaults are the reference's except ``ignore_steps``.

    The reference starts at 1000 batches and leaves the first 1000 out of the fit, so its
    first fit has a single point; here the fit leaves out the first ``ignore_steps`` and
    must have at least 3 batches between that and ``warmup_steps``.
    """

    num_groups: int
    prior: tuple[float, ...] | None = None
    warmup_steps: int = 1000
    ignore_steps: int = 500
    fit_interval: int = 1000
    policy_ema: float = 0.9
    credit_ema: float = 0.9
    credit_power: float = 0.5
    min_prob: float = 0.01
    min_exponent: float = 0.05
    max_exponent: float = 0.8
    counts: str = "total"

    def __post_init__(self) -> None:
        m = _check_int("num_groups", self.num_groups, 2)
        _check_int("warmup_steps", self.warmup_steps, 1)
        _check_int("ignore_steps", self.ignore_steps, 0)
        _check_int("fit_interval", self.fit_interval, 1)
        if self.warmup_steps - self.ignore_steps < MIN_FIT_POINTS:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} must exceed ignore_steps="
                f"{self.ignore_steps} by at least {MIN_FIT_POINTS}: the first fit, at "
                "warmup_steps, needs that many batches after the ignored ones"
            )
        check_fraction("policy_ema", self.policy_ema, allow_one=False)
        check_fraction("credit_ema", self.credit_ema, allow_one=False)
        power = float(self.credit_power)
        if not (math.isfinite(power) and power >= 0):
            raise ValueError(f"credit_power must be a finite number >= 0, got {power!r}")
        if check_fraction("min_prob", self.min_prob) * m > 1:
            raise ValueError(
                f"min_prob={self.min_prob} is more than 1/num_groups = {1 / m:.4g}: every "
                "group's floor together would exceed 1"
            )
        check_positive("max_exponent", self.max_exponent)
        low = float(self.min_exponent)
        if not (math.isfinite(low) and 0 <= low <= self.max_exponent):
            raise ValueError(
                f"min_exponent must be in [0, max_exponent={self.max_exponent}], got {low!r}"
            )
        if self.counts not in COUNTS:
            raise ValueError(f"counts must be one of {', '.join(COUNTS)}, got {self.counts!r}")
        if self.prior is not None:
            prior = as_finite_array("prior", self.prior, ndim=1)
            if prior.size != m:
                raise ValueError(f"prior has {prior.size} weights for {m} groups")
            if np.any(prior < 0) or prior.sum() <= 0:
                raise ValueError(f"prior must be >= 0 with a positive sum, got {prior}")
            object.__setattr__(self, "prior", tuple(float(x) for x in prior / prior.sum()))

    def initial_weights(self) -> np.ndarray:
        m = self.num_groups
        return np.asarray(self.prior if self.prior is not None else (1.0 / m,) * m)

    def fits_at(self, step: int) -> bool:
        """Whether the laws are refit after batch ``step`` (batches done)."""
        return step >= self.warmup_steps and (step - self.warmup_steps) % self.fit_interval == 0


# ----------------------------------------------------------------------------------- state
@dataclass
class ADOState:
    """Everything ADO has seen and decided; plain lists, so a resume is exact.

    ``prior``: the config's (kept so a resume uses the same one). ``tokens``/``losses``: one
    row per batch (token count and mean training loss per group; NaN for an absent group).
    ``laws``: per group ``[eps, beta, alpha]``, or None before its first fit. ``weights``: the
    last mixture handed to the data (the prior at first).
    """

    prior: list[float]
    credit: list[float]
    average: list[float]
    weights: list[float]
    tokens: list[list[float]] = field(default_factory=list)
    losses: list[list[float]] = field(default_factory=list)
    laws: list[list[float] | None] | None = None
    fits: int = 0
    last_preference: list[float] | None = None
    last_rates: list[float] | None = None

    @classmethod
    def initial(cls, config: ADOConfig) -> ADOState:
        prior = [float(x) for x in config.initial_weights()]
        return cls(prior=prior, credit=list(prior), average=list(prior), weights=list(prior))

    @property
    def steps(self) -> int:
        return len(self.tokens)

    def observe(self, config: ADOConfig, tokens: Any, losses: Any) -> None:
        """Record one batch: per-group token counts and mean training loss (NaN: absent)."""
        c = as_finite_array("tokens", tokens, ndim=1)
        y = np.array(losses, dtype=np.float64).reshape(-1)
        if not (c.size == y.size == config.num_groups):
            raise ValueError(f"tokens ({c.size}) and losses ({y.size}): one per group")
        if np.any(c < 0) or c.sum() <= 0:
            raise ValueError(f"tokens must be >= 0 with a positive sum, got {c}")
        if np.any(np.isinf(y)):
            raise ValueError(f"losses must be finite or NaN (absent group), got {y}")
        self.tokens.append([float(x) for x in c])
        self.losses.append([float(x) for x in y])
        self.credit = [float(x) for x in ema(self.credit, c / c.sum(), config.credit_ema)]

    def seen(self, config: ADOConfig) -> np.ndarray:
        """``(batches, groups)``: data seen through each batch (module doc, "n")."""
        cum = np.cumsum(np.asarray(self.tokens, dtype=np.float64), axis=0)
        if config.counts == "total":
            return np.repeat(cum.sum(axis=1, keepdims=True), config.num_groups, axis=1)
        return cum

    def refit(self, config: ADOConfig) -> None:
        """Fit every group's law to its points after ``ignore_steps`` (keeps old laws if short)."""
        seen = self.seen(config)[config.ignore_steps :]
        losses = np.asarray(self.losses, dtype=np.float64)[config.ignore_steps :]
        laws = list(self.laws) if self.laws is not None else [None] * config.num_groups
        for k in range(config.num_groups):
            law = fit_power_law(seen[:, k], losses[:, k], config.max_exponent)
            if law is not None:
                laws[k] = law.to_list()
        self.laws = laws
        self.fits += 1

    def update(self, config: ADOConfig, step: int) -> np.ndarray | None:
        """The mixture after batch ``step``: the prior before ``warmup_steps`` or before every
        group has a law (``None``: keep the current one), then ADO's policy."""
        if step < config.warmup_steps or not self.laws or any(x is None for x in self.laws):
            return None
        laws = [PowerLaw(*law) for law in self.laws if law is not None]
        n = self.seen(config)[-1]
        rho, rates = ado_preference(
            laws, n, config.initial_weights(), self.credit,
            credit_power=config.credit_power, min_exponent=config.min_exponent,
            min_prob=config.min_prob,
        )  # fmt: skip
        pi, average = ado_policy(self.average, rho, step, config.policy_ema)
        self.average = [float(x) for x in average]
        self.weights = [float(x) for x in pi]
        self.last_preference = [float(x) for x in rho]
        self.last_rates = [float(x) for x in rates]
        return pi

    def _laws_list(self) -> list[list[float] | None] | None:
        if self.laws is None:
            return None
        return [None if x is None else list(x) for x in self.laws]

    def state_dict(self) -> dict[str, Any]:
        return {
            "prior": list(self.prior),
            "credit": list(self.credit),
            "average": list(self.average),
            "weights": list(self.weights),
            "tokens": [list(r) for r in self.tokens],
            "losses": [list(r) for r in self.losses],
            "laws": self._laws_list(),
            "fits": self.fits,
            "last_preference": self.last_preference,
            "last_rates": self.last_rates,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ADOState:
        def floats(x: Any) -> list[float] | None:
            return None if x is None else [float(v) for v in x]

        laws = state.get("laws")
        return cls(
            prior=[float(x) for x in state["prior"]],
            credit=[float(x) for x in state["credit"]],
            average=[float(x) for x in state["average"]],
            weights=[float(x) for x in state["weights"]],
            tokens=[[float(v) for v in r] for r in state.get("tokens", [])],
            losses=[[float(v) for v in r] for r in state.get("losses", [])],
            laws=None if laws is None else [floats(x) for x in laws],
            fits=int(state.get("fits", 0)),
            last_preference=floats(state.get("last_preference")),
            last_rates=floats(state.get("last_rates")),
        )


def ado_update(
    config: ADOConfig, state: ADOState, step: int, tokens: Any, losses: Any
) -> np.ndarray | None:
    """One ADO step after batch ``step`` (``state`` updated in place): record the batch,
    refit when due, and return the next mixture (``None``: keep the current one)."""
    state.observe(config, tokens, losses)
    if config.fits_at(step):
        state.refit(config)
    return state.update(config, step)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)
