"""``mixture_history.jsonl``: one JSON row per mixing event, in the run folder.

Rows are ``{"step": batches done, "kind": ..., ...}``. Kinds written by the algorithms:

* ``weights``   -- ``effective_step`` and ``weights`` ({group: weight}) of a weight change;
* ``train_loss``/``val_loss`` -- ``losses`` ({group: mean token loss});
* method-specific rows (``aioli`` with the estimated ``A``, ``doremi`` with excess losses,
  ``dga`` with alignments, ``odm`` with the bandit's rewards and the batch's losses,
  ``ado_fit`` with the refit laws and ``ado`` with the preference, ``skillit_graph`` with
  the learned skills graph and ``skillit`` with the summed window of losses, ``doge`` with
  the probe's inner products, norms, learning rate, scores and weights), and ``final`` at
  the end of training.

On resume the rows past the checkpoint are dropped (they will be written again), so the
file always describes one consistent run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["HISTORY_FILE", "MixtureHistory", "read_history"]

HISTORY_FILE = "mixture_history.jsonl"


def read_history(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a history file (or of ``RUN_DIR/mixture_history.jsonl``)."""
    path = Path(path)
    if path.is_dir():
        path = path / HISTORY_FILE
    if not path.exists():
        raise FileNotFoundError(f"no mixture history at {path}; is this a mixstream run folder?")
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{number}: not a JSON row") from None
    return rows


class MixtureHistory:
    """Appends rows to the history file; only one process (rank 0) should hold one."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / HISTORY_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """Drop rows written after batch ``step`` (by a run that was later resumed)."""
        if not self.path.exists():
            return
        keep = [r for r in read_history(self.path) if int(r["step"]) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w") as f:
            for row in keep:
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, self.path)

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
