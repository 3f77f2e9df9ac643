"""Skill-It's pure update rule (Chen, Roberts, Bhatia, Wang, Zhang, Sala, Ré 2023, "Skill-It!
A Data-Driven Skills Framework for Understanding and Training Language Models", online
setting, Algorithm 1).

A *skills graph* ``G`` (``m x n``: ``m`` training groups, ``n`` evaluated groups) says how
much training on group j helps group i: ``G[j, i]``. Every update, with ``L`` the sum of the
last ``window`` per-group validation losses::

    p_j  ∝  prior_j * exp(eta * sum_i G[j, i] * L_i)

Each update restarts from ``prior`` (uniform by default) rather than from the previous
mixture: the window of losses carries the history. Groups that help groups whose loss is
still high are sampled more.

Sources: the formulas follow the authors' code, HazyResearch/skill-it
(``trainer/mw_trainer.py``) and its reimplementation in HazyResearch/aioli
(``trainer/skillit_trainer.py``: ``weights = weights_init * exp(eta * graph @ loss_arr)``,
``loss_arr`` the sum of the last ``skillit_window`` evaluations, ``weights_init`` ones; its
SlimPajama scripts use ``eta=0.2``, ``skillit_window=3``, ``update_steps`` a tenth of the run).

**The graph** (``learn_graph``): the reference learns it in separate runs, one per group
trained on that group alone, and keeps the relative drop of every group's validation loss.
Here it is a short first phase of the same run, Aioli's LearnParams plan with one-hot
sweeps: ``G[j, i]`` = the relative drop ``(L_i before - L_i after) / L_i before`` of group
i's validation loss over the sweeps on group j, averaged over ``rounds`` repetitions.
Choice (ours): negative drops (training on j *raised* i's loss) are set to 0, so ``G`` is
the non-negative adjacency matrix the method assumes (an edge helps or is absent).

LMO view (Aioli, Sec. 4): Skill-It is the linear dynamic law with
``A^t_ij = G[j, i] * L_i^t``; the column sums of ``A^t`` are ``(G @ L)_j``, so the update is
the core's EG step (``lmo.exponentiated_gradient_step``) from ``prior``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .aioli import beta_from_losses
from .lmo import (
    as_finite_array,
    check_positive,
    check_simplex,
    exponentiated_gradient_step,
)

__all__ = [
    "SkillItState",
    "learn_graph",
    "skillit_mixing_matrix",
    "skillit_update",
]


def check_graph(graph: Any, num_groups: int | None = None) -> np.ndarray:
    """``graph`` as a float64 ``(m, n)`` matrix, or a ValueError saying what is wrong."""
    G = as_finite_array("skills graph", graph, ndim=2)
    if G.shape[0] < 2 or G.shape[1] < 1:
        raise ValueError(f"skills graph must be (groups x evaluated groups), got {G.shape}")
    if num_groups is not None and G.shape[0] != num_groups:
        raise ValueError(
            f"skills graph has {G.shape[0]} rows but there are {num_groups} groups; row j "
            "is how much training on group j helps each group"
        )
    if np.any(G < 0):
        raise ValueError(f"skills graph entries must be >= 0 (an edge helps or is absent), got {G}")
    return G


def skillit_mixing_matrix(graph: Any, losses: Any) -> np.ndarray:
    """Skill-It's LMO matrix ``A_ij = G[j, i] * L_i`` (rows: evaluated groups i)."""
    G = check_graph(graph)
    L = as_finite_array("losses", losses, ndim=1)
    if L.size != G.shape[1]:
        raise ValueError(f"{L.size} losses for a skills graph with {G.shape[1]} columns")
    return G.T * L[:, None]


def skillit_update(
    graph: Any, loss_window: Sequence[Any], eta: float, prior: Any | None = None
) -> np.ndarray:
    """``p_j ∝ prior_j exp(eta * sum_i G[j, i] * sum_w L_i^w)`` over the window's evaluations."""
    if len(loss_window) == 0:
        raise ValueError("Skill-It's update needs at least one validation-loss evaluation")
    losses = np.sum([as_finite_array("losses", L, ndim=1) for L in loss_window], axis=0)
    A = skillit_mixing_matrix(graph, losses)
    m = A.shape[1]
    base = np.full(m, 1.0 / m) if prior is None else check_simplex("prior", prior)
    if base.size != m:
        raise ValueError(f"prior has {base.size} weights for {m} groups")
    return exponentiated_gradient_step(base, A.sum(axis=0), check_positive("eta", eta))


def learn_graph(order: Sequence[int], losses: Any, rounds: int) -> np.ndarray:
    """``G[j, i]``: mean relative drop of loss i over the sweeps on group j, floored at 0.

    ``losses``/``order`` as in :func:`~mixstream.algorithms.aioli.beta_from_losses`: one
    evaluation of every group before the first sweep and after each.
    """
    beta = beta_from_losses(order, losses, rounds, relative=True)
    return np.maximum(beta.T, 0.0)


@dataclass
class SkillItState:
    """Everything Skill-It carries between updates, as plain values (JSON-able).

    ``graph_losses``: evaluations of the graph-learning phase so far (before the first
    sweep and after each); ``window``: the last ``window`` evaluations after it.
    """

    graph: list[list[float]] | None = None
    graph_losses: list[list[float]] = field(default_factory=list)
    window: list[list[float]] = field(default_factory=list)
    weights: list[float] | None = None
    updates: int = 0

    def record(self, losses: Any, window: int) -> None:
        """Keep one evaluation in the window (the oldest beyond ``window`` is dropped)."""
        vec = as_finite_array("validation losses", losses, ndim=1)
        self.window = [*self.window, [float(x) for x in vec]][-int(window) :]

    def update(self, eta: float, prior: Any | None = None) -> np.ndarray:
        if self.graph is None:
            raise ValueError("Skill-It has no skills graph yet (learn it or pass graph=)")
        p = skillit_update(self.graph, self.window, eta, prior)
        self.weights = [float(x) for x in p]
        self.updates += 1
        return p

    def state_dict(self) -> dict[str, Any]:
        return {
            "graph": None if self.graph is None else [list(r) for r in self.graph],
            "graph_losses": [list(r) for r in self.graph_losses],
            "window": [list(r) for r in self.window],
            "weights": None if self.weights is None else list(self.weights),
            "updates": self.updates,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> SkillItState:
        def rows(x: Any) -> list[list[float]]:
            return [[float(v) for v in r] for r in x]

        graph = state.get("graph")
        weights = state.get("weights")
        return cls(
            graph=None if graph is None else rows(graph),
            graph_losses=rows(state.get("graph_losses", [])),
            window=rows(state.get("window", [])),
            weights=None if weights is None else [float(x) for x in weights],
            updates=int(state.get("updates", 0)),
        )
