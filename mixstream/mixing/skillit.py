"""``SkillItMixer``: Skill-It's online data selection (Chen et al. 2023), in any loop.

The rule is :mod:`mixstream.algorithms.skillit`; this mixer decides *when*:

1. **Graph phase** (unless ``graph=`` is given): Aioli's LearnParams plan with one-hot
   sweeps (``LearnParamsPlan.build``): ``graph_rounds`` keyed orders of the groups, each
   group trained alone (``one_hot_factor=1``) for ``graph_steps`` batches, the validation
   loss of every group measured before the first sweep and after each. The whole phase is
   scheduled on the dataset at ``start()``, so each sweep trains on its mixture from its
   first batch despite the loader's update lag; ``prior`` is scheduled right after it, until
   the first learned mixture takes effect.
2. **Updates**: at the end of the phase (or at batch 0 with a given graph) and every
   ``update_steps`` batches after it, the per-group validation loss is measured (all-reduced
   across ranks), the last ``window`` measurements are summed and the mixture becomes
   ``prior * exp(eta * G @ L)`` (normalised). ``set_weights`` broadcasts rank 0's mixture.

The graph, the phase's measurements and the window are in the checkpoint, so a resumed run
decides exactly as an uninterrupted one. ``weights.json`` holds the graph (``skillit.graph``)
so a later run can reuse it: ``SkillItMixer(graph="runs/x/weights.json")`` (or
``SkillIt(...)`` in Composer).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mixstream import storage
from mixstream.algorithms import scale
from mixstream.algorithms.aioli import LearnParamsPlan, sweep_mixtures
from mixstream.algorithms.lmo import check_fraction, check_positive
from mixstream.algorithms.skillit import SkillItState, check_graph, learn_graph
from mixstream.dataset import DynamicStreamingDataset
from mixstream.mixing.base import Mixer
from mixstream.mixing.history import load_weights_file
from mixstream.weights import normalize_weights

__all__ = ["SkillItMixer", "load_graph"]


def load_graph(source: Any) -> np.ndarray:
    """A skills graph from a matrix, a ``.npy`` file, or a ``.json`` file.

    A JSON file holds the matrix itself, ``{"graph": matrix}``, or a Skill-It run's
    ``weights.json`` (``{"skillit": {"graph": matrix}}``).
    """
    if not isinstance(source, str | os.PathLike):
        return check_graph(source)
    path = os.fspath(source)
    if not storage.exists(path):
        raise FileNotFoundError(
            f"SkillIt graph file {path} does not exist; pass a .npy or .json matrix, a "
            "SkillIt run's weights.json, or graph=None to learn the graph"
        )
    raw = storage.read_bytes(path)
    if path.endswith(".npy"):
        import io

        try:
            return check_graph(np.load(io.BytesIO(raw), allow_pickle=False))
        except ValueError as exc:
            raise ValueError(f"SkillIt graph file {path}: {exc}") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"SkillIt graph file {path} is neither .npy nor JSON ({exc}); save the matrix with "
            "numpy.save or as a JSON list of rows"
        ) from None
    if isinstance(data, dict):
        inner = data.get("skillit", data)
        data = inner.get("graph") if isinstance(inner, dict) else None
    if data is None:
        raise ValueError(
            f"SkillIt graph file {path} has no graph: expected a JSON matrix, "
            '{"graph": matrix}, or the weights.json of a SkillIt run'
        )
    try:
        return check_graph(data)
    except ValueError as exc:
        raise ValueError(f"SkillIt graph file {path}: {exc}") from None


class SkillItMixer(Mixer):
    """Sample the groups that help the groups whose validation loss is high (Skill-It).

    Needs ``evaluate`` (per-group validation losses: the graph phase and every update).

    Args:
        dataset: see :class:`~mixstream.mixing.base.Mixer`.
        graph: the skills graph ``G`` (``G[j][i]``: how much training on group j helps group
            i; one row and one column per group, in the dataset's order), or the path of a
            ``.npy``/``.json`` file holding it (a SkillIt run's ``weights.json`` works);
            default ``None``: learn it in a first phase of the run.
        eta: step size of the exponentiated update (reference SlimPajama scripts: 0.2).
        update_steps: batches between updates (reference: a tenth of the run).
        window: how many recent validation measurements are summed (reference: 3).
        graph_steps: batches each group is trained alone for in the graph phase.
        graph_rounds: repetitions of the phase's sweeps (their drops are averaged).
        one_hot_factor: share of the swept group in its sweep's batches (1: alone).
        prior: the mixture each update restarts from and the one trained between the graph
            phase and the first update ({group: weight}, one per group, or a
            ``weights.json`` whose ``average`` is used); default uniform.
        seed: keys the sweep orders (default: the dataset's seed).
        **kwargs: see :class:`~mixstream.mixing.base.Mixer`.
    """

    kind = "skillit"

    def __init__(
        self,
        dataset: DynamicStreamingDataset | None = None,
        *,
        graph: Any | None = None,
        eta: float = 0.2,
        update_steps: int = 100,
        window: int = 3,
        graph_steps: int = 10,
        graph_rounds: int = 1,
        one_hot_factor: float = 1.0,
        prior: Mapping[str, float] | Sequence[float] | str | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, **kwargs)
        self.eta = check_positive("SkillIt eta", eta)
        for name, value in (
            ("update_steps", update_steps),
            ("window", window),
            ("graph_steps", graph_steps),
            ("graph_rounds", graph_rounds),
        ):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"SkillIt {name} must be an integer >= 1, got {value!r}")
        self.update_steps, self.window = int(update_steps), int(window)
        self.graph_steps, self.graph_rounds = int(graph_steps), int(graph_rounds)
        self.one_hot_factor = check_fraction("SkillIt one_hot_factor", one_hot_factor)
        self.given_graph = None if graph is None else load_graph(graph)
        if isinstance(prior, str):
            prior = load_weights_file(prior, "average")[0][1]
        self.prior_spec = prior
        self.seed = seed
        self.state: SkillItState | None = None
        self.plan: LearnParamsPlan | None = None
        self.prior: np.ndarray | None = None
        self._loaded: dict[str, Any] | None = None
        if self.groups is not None:
            self._check_groups(self.groups)  # fail now, not at start()

    def _check_groups(self, groups: Sequence[str]) -> np.ndarray:
        m = len(groups)
        if m < 2:
            raise ValueError(f"SkillIt mixes at least 2 groups, got {m}")
        if self.given_graph is not None and self.given_graph.shape != (m, m):
            raise ValueError(
                f"SkillIt graph has shape {self.given_graph.shape}; it needs one row and one "
                f"column per group ({m} x {m}, in the order {', '.join(groups)})"
            )
        if self.given_graph is None and self.one_hot_factor <= 1.0 / m:
            raise ValueError(
                f"SkillIt one_hot_factor must be > 1/groups = {1 / m:.4g} (a sweep must "
                f"emphasise its group), got {self.one_hot_factor}"
            )
        if self.prior_spec is None:
            return np.full(m, 1.0 / m)
        return normalize_weights(self.prior_spec, list(groups))

    @property
    def graph_duration(self) -> int:
        """Batches of the graph phase (0 with a given graph)."""
        if self.given_graph is not None:
            return 0
        return self.graph_rounds * self.num_groups * self.graph_steps

    @property
    def first_update(self) -> int:
        return self.graph_duration

    def setup(self, fresh: bool) -> None:
        self.prior = self._check_groups(self.dataset.group_names)
        total = self.total_steps
        if total is not None and self.graph_duration >= total:
            raise ValueError(
                f"SkillIt's graph phase takes graph_rounds * groups * graph_steps = "
                f"{self.graph_rounds} * {self.num_groups} * {self.graph_steps} = "
                f"{self.graph_duration} batches, not less than the run's {total}; lower "
                "graph_steps/graph_rounds or pass graph="
            )
        if self.given_graph is None:
            scale.warn(scale.many_groups_warning(
                "Skill-It", self.num_groups,
                f"learning its skills graph trains graph_rounds * groups * graph_steps = "
                f"{self.graph_duration:,} batches of one-hot sweeps (pass graph= to skip them)",
            ))  # fmt: skip
        if self._loaded is not None and not fresh:
            self.state = SkillItState.from_state_dict(self._loaded)
        else:
            self.state = SkillItState()
            if self.given_graph is not None:
                self.state.graph = self.given_graph.tolist()
        if self.given_graph is None:
            seed = self.dataset.seed if self.seed is None else self.seed
            W = sweep_mixtures(self.num_groups, self.one_hot_factor)
            self.plan = LearnParamsPlan.build(W, self.graph_rounds, self.graph_steps, seed, 0, 0)
        step = self.steps_done
        if fresh:
            entries = [(0, tuple(self.prior))]
            if self.plan is not None:
                entries = self.plan.weight_schedule(tuple(self.prior))
            for effective, weights in entries:
                self.set_weights(weights, step, effective_step=effective)
            self._maybe_act(step)

    def update(self, step: int) -> None:
        self._maybe_act(step)

    def _maybe_act(self, step: int) -> None:
        """Measure and learn the graph, or measure and update, if batch ``step`` calls for it."""
        assert self.state is not None
        if self.state.graph is None:
            assert self.plan is not None
            done = len(self.state.graph_losses)
            if self.plan.eval_steps[done] != step:
                return
            losses = self.validation_losses()
            self.record("val_loss", step, losses=losses)
            self.state.graph_losses.append([float(x) for x in losses])
            if len(self.state.graph_losses) < len(self.plan.eval_steps):
                return
            G = learn_graph(self.plan.order, self.state.graph_losses, self.graph_rounds)
            self.state.graph = G.tolist()
            self.record("skillit_graph", step, graph=G)
            self._update(step, losses)
        elif step >= self.first_update and (step - self.first_update) % self.update_steps == 0:
            losses = self.validation_losses()
            self.record("val_loss", step, losses=losses)
            self._update(step, losses)

    def _update(self, step: int, losses: np.ndarray) -> None:
        assert self.state is not None
        self.state.record(losses, self.window)
        p = self.state.update(self.eta, self.prior)
        self.record("skillit", step, window_losses=np.sum(self.state.window, axis=0),
                    update=self.state.updates)  # fmt: skip
        effective = self.set_weights(p, step)
        # Rank 0's mixture (set_weights broadcasts it) is the one every rank keeps.
        self.state.weights = [float(x) for x in self.weights_at(effective)]

    def summary(self, step: int) -> dict[str, Any]:
        if self.state is None:
            return {}
        return {
            "skillit": {
                "graph": self.state.graph,
                "graph_learned": self.given_graph is None,
                "eta": self.eta,
                "update_steps": self.update_steps,
                "window": self.window,
                "graph_steps": self.graph_steps,
                "graph_rounds": self.graph_rounds,
                "one_hot_factor": self.one_hot_factor,
                "updates": self.state.updates,
            }
        }

    def method_state(self) -> dict[str, Any]:
        return {} if self.state is None else self.state.state_dict()

    def load_method_state(self, state: dict[str, Any]) -> None:
        self._loaded = dict(state) if state else None
