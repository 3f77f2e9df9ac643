"""One console line per log interval: loss, learning rate, speed and the mixture in force.

Composer's own console logger prints every metric on its own line (dozens per interval once
each group has weight and loss metrics); a mixing run is easier to follow as a table.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from composer.core import State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist

__all__ = ["MixtureConsoleLogger"]


class MixtureConsoleLogger(LoggerDestination):
    """Prints ``[batch/max] loss lr s/ba | group weights`` every ``interval`` batches (rank 0).

    The loss is the mean training loss over the interval; the weights are those the dataset
    uses at that batch. Per-group validation losses, when the algorithm measured them since
    the last line, follow on a second line.
    """

    def __init__(self, interval: int, max_batches: int, stream: TextIO | None = None) -> None:
        self.interval = max(1, int(interval))
        self.max_batches = int(max_batches)
        self.stream = stream or sys.stdout
        self._losses: list[float] = []
        self._val: dict[str, float] = {}
        self._val_step: int | None = None
        self._since = time.perf_counter()
        self._since_batch = 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            if key == "loss/train/total":
                self._losses.append(float(value))
            elif key.startswith("mixture/val_loss/"):
                self._val[key.rsplit("/", 1)[-1]] = float(value)
                self._val_step = step

    def fit_start(self, state: State, logger: Logger) -> None:
        self._since = time.perf_counter()
        self._since_batch = int(state.timestamp.batch)
        self._losses.clear()
        self._val.clear()

    def batch_end(self, state: State, logger: Logger) -> None:
        step = int(state.timestamp.batch)
        if step % self.interval and step != self.max_batches:
            return
        now = time.perf_counter()
        per_batch = (now - self._since) / max(1, step - self._since_batch)
        loss = sum(self._losses) / len(self._losses) if self._losses else float("nan")
        lr = state.optimizers[0].param_groups[0]["lr"] if state.optimizers else float("nan")
        width = len(str(self.max_batches))
        line = f"[{step:>{width}}/{self.max_batches}] loss {loss:.4f}  lr {lr:.2e}"
        line += f"  {per_batch:.3f} s/ba"
        weights = _dataset_weights(state)
        if weights:
            line += " | " + " ".join(f"{g} {w:.3f}" for g, w in weights.items())
        if dist.get_global_rank() == 0:
            print(line, file=self.stream, flush=True)
            if self._val:
                label = "val loss" if self._val_step == step else f"val loss @{self._val_step}"
                vals = " ".join(f"{g} {v:.4f}" for g, v in self._val.items())
                print(f"{label:>{2 * width + 3}} | {vals}", file=self.stream, flush=True)
        self._losses.clear()
        self._val.clear()
        self._since, self._since_batch = now, step


def _dataset_weights(state: State) -> dict[str, Any]:
    dataset = getattr(state.train_dataloader, "dataset", None)
    weights = getattr(dataset, "weights", None)
    return dict(weights) if isinstance(weights, dict) else {}
