"""``mixstream plot``: the mixture of a run over time, from its ``mixture_history.jsonl``.

Two panels sharing the global-step axis: the weights in force (a step function: a weight
change holds from its effective step until the next one) and the per-group losses
(validation solid with markers, training faint). Written with matplotlib's Agg backend, so
it works on machines without a display.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from mixstream.mixing.history import HISTORY_FILE

__all__ = ["PLOT_FILE", "plot_run", "weight_steps"]

PLOT_FILE = "mixture.png"


def _read_rows(run_dir: Path) -> list[dict[str, Any]]:
    # Read without importing mixstream.composer's dependencies (torch, Composer) at all.
    path = run_dir / HISTORY_FILE if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise FileNotFoundError(
            f"no mixture history at {path}; pass the run folder of a mixstream training run"
        )
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{number}: not a JSON row") from None
    if not rows:
        raise ValueError(f"{path} is empty: the run has not recorded anything yet")
    return rows


def weight_steps(rows: list[dict[str, Any]]) -> list[tuple[int, dict[str, float]]]:
    """``(effective step, weights)`` of the schedule the ``weights`` rows describe.

    A change replaces every entry at or after its effective step (the dataset's rule), so a
    later decision about the same future wins.
    """
    schedule: list[tuple[int, dict[str, float]]] = []
    for row in rows:
        if row.get("kind") != "weights":
            continue
        effective = int(row.get("effective_step", row["step"]))
        schedule = [(b, w) for b, w in schedule if b < effective]
        schedule.append((effective, dict(row["weights"])))
    return schedule


def _value(x: Any) -> float:
    return float("nan") if x is None else float(x)


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw the run's weights and per-group losses; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = _read_rows(run_dir)
    folder = run_dir if run_dir.is_dir() else run_dir.parent
    out = Path(out) if out is not None else folder / PLOT_FILE
    schedule = weight_steps(rows)
    last = max(int(r["step"]) for r in rows)
    groups: list[str] = []
    for row in rows:
        for key in ("weights", "losses"):
            for g in row.get(key) or {}:
                if g not in groups:
                    groups.append(g)
    if not groups:
        raise ValueError(f"the history of {run_dir} has no weights or losses to plot")
    # Changes scheduled past the end (e.g. the sweeps of a round that never ran) never took
    # effect; the x axis ends with training.
    schedule = [(b, w) for b, w in schedule if b < last] or schedule[:1]
    colors = {g: f"C{i % 10}" for i, g in enumerate(groups)}

    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(10, 7), layout="constrained")
    for g in groups:
        if schedule:
            xs = [b for b, _ in schedule] + [last]
            ys = [w.get(g, 0.0) for _, w in schedule]
            top.step(xs, [*ys, ys[-1]], where="post", color=colors[g], label=g, linewidth=1.8)
        for kind, style in (
            ("train_loss", {"alpha": 0.3, "linewidth": 1.0}),
            ("val_loss", {"marker": "o", "markersize": 3, "linewidth": 1.6}),
        ):
            points = [
                (int(r["step"]), _value((r.get("losses") or {}).get(g)))
                for r in rows
                if r.get("kind") == kind
            ]
            points = [(x, y) for x, y in points if not math.isnan(y)]
            if points:
                label = f"{g} ({'val' if kind == 'val_loss' else 'train'})"
                bottom.plot(*zip(*points, strict=True), color=colors[g], label=label, **style)
    method = _method(folder)
    top.set_title(f"{folder.name}" + (f" ({method})" if method else ""))
    top.set_ylabel("weight")
    top.set_ylim(0, 1.05 * max([w for _, ws in schedule for w in ws.values()], default=1.0))
    top.grid(alpha=0.3)
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    bottom.set_ylabel("loss (nats/token)")
    bottom.set_xlabel("global step (batches)")
    bottom.grid(alpha=0.3)
    if bottom.lines:
        bottom.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _method(folder: Path) -> str | None:
    try:
        return json.loads((folder / "weights.json").read_text()).get("method")
    except (OSError, ValueError, AttributeError):
        return None
