"""The two jobs behind ``mixstream train`` and ``mixstream eval``.

``train``: build the run from its recipe, fit (resuming from the run's own checkpoints when
there are any), then measure per-group test perplexity, write ``results.json`` and the
mixture plot into the run folder. ``evaluate_checkpoint``: the same table for any checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from composer import Callback
from composer.core.precision import Precision, get_precision_context
from composer.utils import dist, get_device

from mixstream.train.build import (
    build_model,
    build_training,
    init_distributed,
    resolve_device,
)
from mixstream.train.evaluate import GroupResults, evaluate_groups, format_table
from mixstream.train.recipe import Recipe

__all__ = ["RESULTS_FILE", "RUN_RECIPE_FILE", "evaluate_checkpoint", "train"]

RESULTS_FILE = "results.json"
RUN_RECIPE_FILE = "recipe.yaml"


def _say(message: str, stream: TextIO) -> None:
    if dist.get_global_rank() == 0:
        print(message, file=stream, flush=True)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def train(
    recipe: Recipe, callbacks: Sequence[Callback] = (), stream: TextIO = sys.stdout
) -> dict[str, Any] | None:
    """Train per ``recipe``; returns the results (on rank 0; ``None`` on other ranks)."""
    training = build_training(recipe, callbacks)
    rank0 = dist.get_global_rank() == 0
    if rank0:
        _write_atomic(recipe.run_dir / RUN_RECIPE_FILE, recipe.to_yaml())
    trainer = training.trainer
    tokens = recipe.max_batches * recipe.global_batch_size * recipe.seq_len
    start = int(trainer.state.timestamp.batch)
    _say(
        f"mixstream train: {recipe.run_name} | {recipe.algorithm_name} over "
        f"{', '.join(recipe.groups)} | {training.model.num_parameters / 1e6:.2f}M parameters | "
        f"{recipe.max_batches} batches of {recipe.global_batch_size} x {recipe.seq_len} "
        f"({tokens / 1e6:.2f}M tokens) on {recipe.world_size} x {training.device}"
        + (f" | resuming at batch {start}" if start else ""),
        stream,
    )
    try:
        if start >= recipe.max_batches:
            _say(f"the run is complete (batch {start}); measuring its test loss only", stream)
        else:
            trainer.fit()
        state = trainer.state
        results = evaluate_groups(
            state.model,
            recipe.manifest,
            "test",
            recipe.groups,
            recipe.data["test_samples_per_group"],
            recipe.device_batch_size,
            device=state.device,
            precision_context=lambda: get_precision_context(
                state.precision, state.precision_config
            ),
            local=recipe.data["local"],
        )
    finally:
        training.close()
    if not rank0:
        return None
    weights = _read_weights(recipe.run_dir)
    payload = {
        "run_name": recipe.run_name,
        "method": weights.get("method", training.algorithm.__class__.__name__),
        "steps": recipe.max_batches,
        "tokens": tokens,
        "groups": recipe.groups,
        "test": results.to_dict(),
        "weights": {k: weights[k] for k in ("final", "average") if k in weights},
    }
    _write_atomic(recipe.run_dir / RESULTS_FILE, json.dumps(payload, indent=2) + "\n")
    print(format_table(results, payload["weights"]), file=stream, flush=True)
    print(f"results: {recipe.run_dir / RESULTS_FILE}", file=stream, flush=True)
    try:
        from mixstream.plot import plot_run

        print(f"plot: {plot_run(recipe.run_dir)}", file=stream, flush=True)
    except Exception as exc:  # the run itself succeeded; a plot is a convenience
        print(f"warning: no plot ({exc})", file=sys.stderr, flush=True)
    return payload


def _read_weights(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "weights.json").read_text())
    except (OSError, ValueError):
        return {}


def evaluate_checkpoint(
    recipe: Recipe,
    checkpoint: str,
    split: str = "test",
    samples_per_group: int | None = None,
    batch_size: int | None = None,
) -> tuple[GroupResults, int]:
    """Per-group loss of a checkpoint's model on ``split``, and the checkpoint's batch count.

    ``batch_size`` defaults to the recipe's per-device batch.
    """
    from mixstream.train.evaluate import load_model_weights

    device_name = resolve_device(recipe.config["device"])
    init_distributed(device_name)
    model = build_model(recipe)
    batch = load_model_weights(model, checkpoint)
    device = get_device(device_name)
    model = device.module_to_device(model)
    precision = Precision(recipe.config["precision"])
    results = evaluate_groups(
        model,
        recipe.manifest,
        split,
        recipe.groups,
        samples_per_group,
        batch_size or recipe.device_batch_size,
        device=device,
        precision_context=lambda: get_precision_context(precision),
        local=recipe.data["local"],
    )
    return results, batch
