"""Per-group perplexity of a model on a held-out split, and the table that reports it.

Every group is measured on the same fixed sequences (:class:`GroupSamples`: a seeded sample
spread over the whole split, or all of it), so numbers from different runs of one corpus are
comparable. The average row is the plain mean over groups: each group counts once, whatever
its size.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "GroupResults",
    "evaluate_groups",
    "find_run_recipe",
    "format_table",
    "load_model_weights",
]


@dataclass
class GroupResults:
    """Mean token loss per group (and the perplexity ``exp(loss)``) on one split."""

    split: str
    losses: dict[str, float]
    samples: dict[str, int]

    @property
    def perplexities(self) -> dict[str, float]:
        return {g: _exp(v) for g, v in self.losses.items()}

    @property
    def average_loss(self) -> float:
        return sum(self.losses.values()) / len(self.losses)

    @property
    def average_perplexity(self) -> float:
        ppl = self.perplexities
        return sum(ppl.values()) / len(ppl)

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "groups": {
                g: {"loss": self.losses[g], "perplexity": p, "samples": self.samples[g]}
                for g, p in self.perplexities.items()
            },
            "average": {"loss": self.average_loss, "perplexity": self.average_perplexity},
        }


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


def evaluate_groups(
    model: Any,
    manifest: Any,
    split: str,
    groups: Sequence[str],
    samples_per_group: int | None,
    batch_size: int,
    device: Any | None = None,
    precision_context: Callable[[], Any] | None = None,
    local: str | None = None,
) -> GroupResults:
    """Mean token loss per group of ``model`` on ``split`` (collective across ranks)."""
    from mixstream.mixing.signals import GroupSamples, evaluate_group_losses

    samples = GroupSamples(manifest, split, groups, samples_per_group, local=local)
    losses = evaluate_group_losses(model, samples, batch_size, device, precision_context)
    return GroupResults(
        split=split,
        losses={g: float(v) for g, v in zip(groups, losses, strict=True)},
        samples={g: len(s) for g, s in zip(groups, samples.samples, strict=True)},
    )


def format_table(
    results: GroupResults, weights: Mapping[str, Mapping[str, float]] | None = None
) -> str:
    """A plain-text table: loss and perplexity per group, the average, and optional weights.

    ``weights`` maps a column title (``final``, ``average``) to {group: weight}.
    """
    weights = {k: v for k, v in (weights or {}).items() if v}
    header = ["group", f"{results.split} loss", "perplexity", "samples"]
    header += [f"{name} weight" for name in weights]
    rows = []
    for g, loss in results.losses.items():
        row = [g, f"{loss:.4f}", f"{_exp(loss):.2f}", str(results.samples[g])]
        row += [f"{w.get(g, float('nan')):.4f}" for w in weights.values()]
        rows.append(row)
    rows.append(
        ["average", f"{results.average_loss:.4f}", f"{results.average_perplexity:.2f}", ""]
        + [""] * len(weights)
    )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows[:-1]]
    out += [line(["-" * w for w in widths]), line(rows[-1])]
    return "\n".join(out)


def find_run_recipe(checkpoint: str | os.PathLike) -> Path | None:
    """The ``recipe.yaml`` of the run a checkpoint belongs to: the nearest parent folder's."""
    path = Path(checkpoint).absolute()
    for folder in path.parents:
        candidate = folder / "recipe.yaml"
        if candidate.is_file():
            return candidate
    return None


def load_model_weights(model: Any, checkpoint: str) -> int:
    """Load a Composer checkpoint's model weights into ``model``; returns its batch count.

    Takes a local path (a ``latest-rank0.pt`` symlink is followed) or any URI Composer can
    download (``s3://...``).
    """
    import torch

    if "://" in checkpoint:
        from composer.utils import get_file

        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "checkpoint.pt")
            get_file(checkpoint, local)
            return load_model_weights(model, local)
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    if path.is_dir():
        raise ValueError(
            f"{checkpoint} is a folder (a sharded checkpoint?); pass a monolithic .pt checkpoint"
        )
    with open(path.resolve(), "rb") as f:
        data = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=False)
    try:
        state = data["state"]["model"]
    except (KeyError, TypeError):
        raise ValueError(f"{checkpoint} is not a Composer checkpoint (no state.model)") from None
    prefix = "module."
    if all(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    timestamp = data["state"].get("timestamp") or {}
    timestamp = timestamp.get("Timestamp", timestamp)
    return int(timestamp.get("batch", 0))
