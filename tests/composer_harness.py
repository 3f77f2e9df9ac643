"""A trivial Composer model and a training run over DynamicStreamingDataset, for tests.

Run as a script (``python composer_harness.py CONFIG.json``) so a test can kill the whole
process mid-run and autoresume in a fresh one.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

import torch
import torch.nn.functional as F
from composer import Callback, Event, State, Trainer
from composer.loggers import Logger
from composer.models import ComposerModel
from torch.utils.data import DataLoader

from mixstream import DynamicStreamingDataset


class TinyLM(ComposerModel):
    def __init__(self, vocab: int = 257, dim: int = 16) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.embed(batch["input_ids"][:, :-1].long()))

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        targets = batch["input_ids"][:, 1:].long()
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))


class Recorder(Callback):
    """Records each batch's content and changes weights at given steps, like an algorithm."""

    def __init__(self, dataset: DynamicStreamingDataset, cfg: dict[str, Any]) -> None:
        self.dataset = dataset
        self.changes = {int(k): v for k, v in cfg.get("changes", {}).items()}
        self.kill_at = cfg.get("kill_at")
        self.log_path = cfg["log_path"]

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.AFTER_DATALOADER:
            ids = state.batch["input_ids"].long()
            row = {"batch": int(state.timestamp.batch), "sums": ids.sum(dim=1).tolist()}
            with open(self.log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        elif event == Event.BATCH_END:
            step = int(state.timestamp.batch)
            self.dataset.advance(step)
            if step in self.changes:
                self.dataset.set_weights(self.changes[step], step=step)
            if self.kill_at is not None and step == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)


def train(cfg: dict[str, Any]) -> None:
    dataset = DynamicStreamingDataset(
        manifest=cfg["manifest"],
        batch_size=cfg["batch_size"],
        num_workers=cfg.get("num_workers", 0),
        seed=cfg.get("seed", 11),
        lockstep=True,
    )
    loader = DataLoader(
        dataset,
        batch_size=cfg["batch_size"],
        num_workers=cfg.get("num_workers", 0),
    )
    model = TinyLM()
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        max_duration=cfg["max_duration"],
        optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
        callbacks=[Recorder(dataset, cfg)],
        save_folder=cfg["save_folder"],
        save_interval=cfg.get("save_interval", "4ba"),
        save_num_checkpoints_to_keep=-1,
        run_name=cfg.get("run_name", "mixstream-test"),
        autoresume=cfg.get("autoresume", False),
        load_path=cfg.get("load_path"),
        device="cpu",
        progress_bar=False,
        log_to_console=False,
        loggers=[],
        seed=cfg.get("seed", 11),
    )
    trainer.fit()
    trainer.close()
    dataset.close()


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        train(json.load(f))
