"""A toy training run whose losses follow a *known* linear dynamic mixing law.

``L_{s+1} = L_s - A p_s + noise`` per global batch. Because ``A`` is planted, it checks that
Aioli's LearnParams recovers it and that the weights head for the optimum (all weight on the
group with the largest column sum of ``A``, the one whose batches lower the summed loss
most), and it lets benchmarks exercise the exact call sequence a trainer makes, with no model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .aioli import AioliConfig, AioliState
from .lmo import as_finite_array, check_simplex, normalize_mixing_matrix

__all__ = ["AioliRound", "LinearDynamicSimulator", "run_aioli"]


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
        A_raw = np.asarray(state.last_A)
        if state.ema_A is not None:
            A_used = np.asarray(state.ema_A)
        else:
            A_used = normalize_mixing_matrix(A_raw) if config.normalize else A_raw
        history.append(AioliRound(A_raw=A_raw, A_used=A_used, weights=np.asarray(weights)))
    return history, state
