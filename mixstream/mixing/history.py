"""The files of a run folder: ``mixture_history.jsonl`` (one JSON row per mixing event) and
``weights.json`` (the run's recommended and time-averaged weights and its schedule).

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

``weights.json`` is written by :meth:`mixstream.mixing.Mixer.finish` and read back by
:func:`load_weights_file` (``StaticMixture(weights_file=...)``, the ``prior`` of Aioli, ADO
and Skill-It).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mixstream import storage

__all__ = ["HISTORY_FILE", "USES", "WEIGHTS_FILE", "MixtureHistory", "load_weights_file",
           "read_history"]  # fmt: skip

HISTORY_FILE = "mixture_history.jsonl"
WEIGHTS_FILE = "weights.json"
#: what :func:`load_weights_file` can take from a weights file
USES = ("average", "final", "schedule")


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


def load_weights_file(path: str, use: str = "average") -> list[tuple[int, Any]]:
    """``(effective step, weights)`` entries from a ``weights.json`` (local or ``s3://``)."""
    if use not in USES:
        raise ValueError(f"use must be one of {', '.join(USES)}, got {use!r}")
    try:
        data = json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"weights file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"weights file {path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or use not in data:
        raise ValueError(
            f"weights file {path} has no {use!r} entry; is it a mixstream weights.json?"
        )
    if use == "schedule":
        past = data.get("schedule_past") or {}
        if past.get("entries"):
            raise ValueError(
                f"weights file {path} holds only the last {len(data[use])} changes of its "
                f"run's schedule (the {past['entries']} before batch {data[use][0][0]} were "
                "not in its mixture_history.jsonl); replay it with use='average' or 'final'"
            )
        groups = data.get("groups")
        return [(int(b), dict(zip(groups, w, strict=True)) if groups else w) for b, w in data[use]]
    return [(0, data[use])]
