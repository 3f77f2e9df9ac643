"""Mixture weights: validation and the schedule of weight changes over global batches."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["WeightSchedule", "Weights", "normalize_weights"]

Weights = Mapping[str, float] | Sequence[float] | np.ndarray


def normalize_weights(weights: Weights, groups: Sequence[str]) -> np.ndarray:
    """A probability vector in ``groups`` order, or a ValueError saying what is wrong.

    A mapping may leave groups out (they get weight 0) but may not name unknown ones; a
    vector must have one entry per group. Weights are relative: they are divided by their sum.
    """
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(groups))
        if unknown:
            raise ValueError(
                f"unknown group(s) {', '.join(map(repr, unknown))} in weights; "
                f"groups are: {', '.join(groups)}"
            )
        values = [weights.get(g, 0.0) for g in groups]
    else:
        try:
            values = list(np.asarray(weights, dtype=np.float64).reshape(-1))
        except (TypeError, ValueError):
            raise ValueError(f"weights must be numbers, got {weights!r}") from None
        if len(values) != len(groups):
            raise ValueError(
                f"got {len(values)} weights for {len(groups)} groups ({', '.join(groups)})"
            )
    try:
        vec = np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"weights must be numbers, got {values!r}") from None
    bad = [g for g, v in zip(groups, vec, strict=True) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"weights must be finite; not finite for {', '.join(bad)}")
    negative = [g for g, v in zip(groups, vec, strict=True) if v < 0]
    if negative:
        raise ValueError(f"weights must be >= 0; negative for {', '.join(negative)}")
    total = vec.sum()
    if total <= 0:
        raise ValueError("weights are all zero; at least one group needs a positive weight")
    return vec / total


@dataclass
class WeightSchedule:
    """Weights in force per global batch: a sorted list of ``(effective_batch, weights)``.

    ``set(batch, w)`` means "from ``batch`` on, use ``w``": it replaces every entry at or
    after ``batch``, so the most recent decision wins for the future without rewriting the
    past. Replaying the same sequence of ``set`` calls always yields the same schedule,
    which is how worker processes follow the trainer.
    """

    entries: list[tuple[int, np.ndarray]] = field(default_factory=list)

    def set(self, batch: int, weights: np.ndarray) -> None:
        if self.entries and batch < self.entries[0][0]:
            raise ValueError(f"batch {batch} precedes the start of the schedule")
        while self.entries and self.entries[-1][0] >= batch:
            self.entries.pop()
        self.entries.append((int(batch), np.asarray(weights, dtype=np.float64)))

    def at(self, batch: int) -> np.ndarray:
        """Weights in force at global batch ``batch``."""
        lo, hi = 0, len(self.entries)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.entries[mid][0] <= batch:
                lo = mid
            else:
                hi = mid
        return self.entries[lo][1]

    def average(self, end: int) -> np.ndarray:
        """Time average of the weights over global batches ``[0, end)`` (each batch counts once)."""
        if end <= 0:
            return self.at(0).copy()
        total = np.zeros_like(self.entries[0][1])
        for i, (start, w) in enumerate(self.entries):
            stop = self.entries[i + 1][0] if i + 1 < len(self.entries) else end
            span = min(stop, end) - start
            if span > 0:
                total += span * w
        return total / end

    def to_list(self) -> list[list]:
        return [[b, [float(x) for x in w]] for b, w in self.entries]

    @classmethod
    def from_list(cls, data: list) -> WeightSchedule:
        return cls([(int(b), np.asarray(w, dtype=np.float64)) for b, w in data])
