"""Baselines: ``Stratified`` (uniform) and ``StaticMixture`` (fixed weights or a replayed schedule).

``StaticMixture`` is also how a mixture learned in one run is reused in another: every
mixing run writes ``weights.json`` (its ``final`` and time-``average`` weights and the
whole ``schedule``), and ``StaticMixture(weights_file=..., use=...)`` trains on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from composer.core import State
from composer.loggers import Logger

from mixstream.composer.mixing import MixingAlgorithm
from mixstream.mixing.history import load_weights_file

__all__ = ["StaticMixture", "Stratified", "load_weights_file"]


class StaticMixture(MixingAlgorithm):
    """Train on fixed ``weights``, a ``schedule`` of ``(step, weights)``, or a weights file.

    Args:
        weights: {group: weight} (or one weight per dataset group); ``None`` is uniform.
        schedule: ``[(global batch, weights), ...]`` replayed exactly ("from batch b on").
        weights_file: a ``weights.json`` written by an earlier run; ``use`` picks its
            ``average`` (the default, DoReMi's output), ``final`` weights or ``schedule``.
        **kwargs: see :class:`~mixstream.composer.mixing.MixingAlgorithm`.
    """

    def __init__(
        self,
        weights: Mapping[str, float] | Sequence[float] | None = None,
        *,
        schedule: Sequence[tuple[int, Any]] | None = None,
        weights_file: str | None = None,
        use: str = "average",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        given = [x is not None for x in (weights, schedule, weights_file)]
        if sum(given) > 1:
            raise ValueError("pass at most one of weights=, schedule= or weights_file=")
        if weights_file is not None:
            schedule = load_weights_file(weights_file, use)
        elif weights is not None:
            schedule = [(0, weights)]
        entries = [(int(b), w) for b, w in schedule or []]
        steps = [b for b, _ in entries]
        if any(b < 0 for b in steps) or steps != sorted(set(steps)):
            raise ValueError(f"schedule steps must be >= 0, distinct and ascending, got {steps}")
        self.entries = entries
        self.weights_file = weights_file

    def setup(self, state: State, logger: Logger, fresh: bool) -> None:
        checked = [
            (b, self.mixer.normalize(w)) for b, w in self.entries
        ]  # unknown groups fail here
        if not fresh:
            return  # the dataset's checkpoint holds the schedule
        if not checked or checked[0][0] > 0:
            checked.insert(0, (0, self.mixer.normalize([1.0] * self.num_groups)))
        for step, weights in checked:
            self.mixer.set_weights(weights, 0, effective_step=step)


class Stratified(StaticMixture):
    """Uniform sampling over groups: the baseline every mixing method is compared to."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(None, **kwargs)
