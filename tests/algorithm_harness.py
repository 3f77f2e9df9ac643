"""Train a tiny GPT with a mixing algorithm in Composer, for the algorithm tests.

``fit`` runs in the calling process; ``python algorithm_harness.py CONFIG.json`` runs the
same in a fresh process (so a test can SIGKILL it and autoresume), and ``rank_fit`` is the
entry point for ``mixstream.testing.distributed.run_ranks``.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from composer import Callback, Event, State, Trainer
from composer.loggers import Logger
from torch.utils.data import DataLoader

from mixstream import DynamicStreamingDataset
from mixstream.composer.model import MixtureLM


class BatchLog(Callback):
    """Writes each batch's per-sample token sums (its content) and kills the run on request."""

    def __init__(self, path: str, kill_at: int | None = None) -> None:
        self.path = path
        self.kill_at = kill_at

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.AFTER_DATALOADER:
            ids = state.batch["input_ids"].long()
            row = {"batch": int(state.timestamp.batch), "sums": ids.sum(dim=1).tolist()}
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        elif event == Event.BATCH_CHECKPOINT and int(state.timestamp.batch) == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def build_algorithm(spec: dict[str, Any]) -> Any:
    """``{"class": "Aioli", "kwargs": {...}}`` -> ``mixstream.algorithms.Aioli(**kwargs)``."""
    module = importlib.import_module("mixstream.algorithms")
    return getattr(module, spec["class"])(**spec.get("kwargs", {}))


def fit(cfg: dict[str, Any]) -> tuple[Trainer, Any]:
    """Train per ``cfg``; returns the (closed) trainer and the algorithm."""
    torch.manual_seed(cfg.get("seed", 5))
    dataset = DynamicStreamingDataset(
        manifest=cfg["manifest"],
        batch_size=cfg.get("batch_size", 8),
        num_workers=cfg.get("num_workers", 0),
        seed=cfg.get("seed", 5),
        lockstep=True,
    )
    workers = cfg.get("num_workers", 0)
    loader = DataLoader(dataset, batch_size=dataset.device_batch_size, num_workers=workers)
    model = MixtureLM("gpt2", 257, cfg.get("seq_len", 32), n_layer=2, n_head=2, n_embd=32)
    algorithm = build_algorithm(cfg["algorithm"])
    callbacks = [BatchLog(cfg["log_path"], cfg.get("kill_at"))] if cfg.get("log_path") else []
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        max_duration=cfg.get("max_duration", "12ba"),
        optimizers=torch.optim.AdamW(model.parameters(), lr=cfg.get("lr", 3e-3)),
        algorithms=[algorithm],
        callbacks=callbacks,
        save_folder=cfg.get("save_folder"),
        save_interval=cfg.get("save_interval", "4ba"),
        save_num_checkpoints_to_keep=-1,
        run_name=cfg.get("run_name", "algo-test"),
        autoresume=cfg.get("autoresume", False),
        load_path=cfg.get("load_path"),
        device="cpu",
        progress_bar=False,
        log_to_console=False,
        loggers=[],
        seed=cfg.get("seed", 5),
    )
    try:
        trainer.fit()
    finally:
        trainer.close()
        dataset.close()
    return trainer, algorithm


def rank_fit(rank: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """One rank of a distributed run: what this rank's algorithm decided."""
    if cfg.get("log_path"):
        cfg = {**cfg, "log_path": f"{cfg['log_path']}.rank{rank}"}
    _, algorithm = fit(cfg)
    # Plain values only: tensors (e.g. RNG states) would outlive the rank process in the queue.
    return {"schedule": algorithm.mixing_dataset.schedule, "method": algorithm.mixer.method_state()}


def run_script(
    cfg: dict[str, Any], tmp: Path, name: str, expect_kill: bool = False, timeout: float = 600
) -> None:
    """``fit(cfg)`` in a fresh process (cwd ``tmp``); it must end killed or cleanly as expected."""
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(cfg))
    proc = subprocess.run(
        [sys.executable, __file__, str(path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=tmp,
    )
    assert proc.returncode == (-9 if expect_kill else 0), proc.stderr[-3000:]


def kill_and_resume(
    base: dict[str, Any], algorithm: Callable[[Path], dict[str, Any]], tmp: Path, kill_at: int = 10
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A reference run of ``base``, and the same run SIGKILLed after batch ``kill_at`` (in a
    child process) then autoresumed here. ``algorithm(run_dir)`` gives each run's spec; the
    runs' folders are ``tmp/ref-run`` and ``tmp/run``. Returns the batch logs (reference,
    resumed)."""
    fit({**base, "algorithm": algorithm(tmp / "ref-run"), "save_folder": str(tmp / "ref-ckpt"),
         "log_path": str(tmp / "ref.log")})  # fmt: skip
    crash = {**base, "algorithm": algorithm(tmp / "run"), "save_folder": str(tmp / "ckpt"),
             "autoresume": True}  # fmt: skip
    run_script({**crash, "kill_at": kill_at, "log_path": str(tmp / "killed.log")}, tmp,
               "killed", expect_kill=True)  # fmt: skip
    fit({**crash, "log_path": str(tmp / "resumed.log")})
    return read_jsonl(tmp / "ref.log"), read_jsonl(tmp / "resumed.log")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        fit(json.load(f))
