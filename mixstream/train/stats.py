"""Paired-seed statistics for comparing training runs (the quality benchmark and the demo).

Two methods trained with the same seed share the model's init and the data order, so their
difference is far less noisy than either run alone: compare per-seed differences, never
two means. :func:`paired` turns them into a mean, a 95% t-interval over seeds and wins.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Paired", "avg_test_loss", "avg_test_ppl", "paired", "relative_sd", "t975"]

#: two-sided 95% quantiles of Student's t, by degrees of freedom (1..30); larger df use 1.96
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def t975(df: int) -> float:
    """Student's t quantile for a two-sided 95% interval with ``df`` degrees of freedom."""
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.96


def avg_test_loss(results: Mapping[str, Any]) -> float:
    """Mean over groups of a run's per-group test loss (each group counts once)."""
    return statistics.fmean(r["loss"] for r in results["test"]["groups"].values())


def avg_test_ppl(results: Mapping[str, Any]) -> float:
    """Mean over groups of the per-group test perplexity (the Aioli paper's metric)."""
    return statistics.fmean(math.exp(r["loss"]) for r in results["test"]["groups"].values())


@dataclass(frozen=True)
class Paired:
    """Per-seed differences summarised: mean, 95% t-interval over seeds, wins (< 0)."""

    deltas: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.deltas)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.deltas)

    @property
    def sd(self) -> float:
        return statistics.stdev(self.deltas) if self.n > 1 else float("nan")

    @property
    def half_width(self) -> float:
        return t975(self.n - 1) * self.sd / math.sqrt(self.n) if self.n > 1 else float("inf")

    @property
    def interval(self) -> tuple[float, float]:
        return self.mean - self.half_width, self.mean + self.half_width

    @property
    def wins(self) -> int:
        return sum(d < 0 for d in self.deltas)

    @property
    def significant(self) -> bool:
        """The interval excludes 0."""
        return self.n > 1 and abs(self.mean) > self.half_width

    def cell(self, digits: int = 3) -> str:
        """``+0.012 [+0.004, +0.020] 5/5`` or, when the interval holds 0, ``... (noise)``."""
        lo, hi = self.interval
        text = f"{self.mean:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"
        return f"{text} {self.wins}/{self.n}" + ("" if self.significant else " (noise)")


def paired(values: Mapping[int, float], anchor: Mapping[int, float]) -> Paired | None:
    """Differences ``values[seed] - anchor[seed]`` over the seeds both have."""
    seeds = sorted(set(values) & set(anchor))
    return Paired(tuple(values[s] - anchor[s] for s in seeds)) if seeds else None


def relative_sd(values: Sequence[float]) -> float:
    """Sample sd / mean (the seed spread of one configuration)."""
    return statistics.stdev(values) / statistics.fmean(values) if len(values) > 1 else math.nan
