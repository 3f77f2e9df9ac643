"""``MixingAlgorithm``: the Composer side shared by every mixing method.

A method is a pure update rule (``mixstream.algorithms``) plus a subclass of this class that
says *when* to update. This base does the wiring every method needs, once:

* finds the :class:`~mixstream.dataset.DynamicStreamingDataset` behind the train dataloader
  and announces every finished batch to it (``advance``), so lockstep workers never plan a
  batch whose weights could still change;
* collects per-group training loss from the training forward pass (no extra forward) and
  per-group validation loss from the manifest's ``val`` split, all-reduced across ranks:
  over the logging window (``flush_train_losses``), or for the batch just trained
  (``step_train_losses``, what ODM and ADO learn from);
* hands weight changes to the dataset, logs them to Composer's loggers
  (``mixture/weight/<group>``, ``mixture/val_loss/<group>``, ...) and appends them to
  ``mixture_history.jsonl`` in the run folder; writes ``weights.json`` (final and
  time-averaged weights, and the schedule) when training ends;
* checkpoints the method's state with the trainer's, so resume is exact -- including the
  RNG streams: Composer restores them mid-epoch only when it replays the dataloader, which
  a dataset with its own resumption skips, so dropout would otherwise draw differently after
  a resume. They are restored right after the first batch is fetched, where Composer's own
  replay restores them (the dataloader's iterator draws a seed from the torch RNG).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from composer.core import Algorithm, Event, State, TimeUnit
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from composer.utils import dist, reproducibility

from mixstream.composer.history import MixtureHistory, read_history
from mixstream.composer.signals import (
    GroupSamples,
    all_reduce_sum,
    evaluate_group_losses,
    group_loss_sums,
    token_losses,
    unwrap_model,
)
from mixstream.dataset import DynamicStreamingDataset
from mixstream.weights import WeightSchedule, normalize_weights

__all__ = ["WEIGHTS_FILE", "MixingAlgorithm", "find_dataset", "total_steps"]

WEIGHTS_FILE = "weights.json"
_EVENTS = (
    Event.FIT_START, Event.AFTER_DATALOADER, Event.AFTER_LOSS, Event.BATCH_END, Event.FIT_END,
)  # fmt: skip


def find_dataset(state: State) -> DynamicStreamingDataset:
    loader = state.train_dataloader
    dataset = getattr(loader, "dataset", None)
    if not isinstance(dataset, DynamicStreamingDataset):
        raise TypeError(
            "mixing algorithms steer a DynamicStreamingDataset, but the train dataloader reads "
            f"{type(dataset).__name__}; build it with DataLoader(DynamicStreamingDataset(...))"
        )
    return dataset


class MixingAlgorithm(Algorithm):
    """Base class of the mixing algorithms (see the module docstring).

    Args:
        groups: the groups this method mixes, checked against the dataset's (default: the
            dataset's groups, in its order).
        run_dir: folder for ``mixture_history.jsonl`` and ``weights.json`` (default:
            ``./<run name>``).
        log_interval: log per-group training loss every this many batches.
        val_interval: also evaluate and log per-group validation loss every this many
            batches (``None``: only when the method itself needs it).
        val_samples_per_group, val_batch_size: size of the validation measurement.
        val_manifest: where the ``val`` split lives (default: the training manifest).
    """

    #: history/log name of the method's own rows (``None``: none)
    kind: str | None = None

    def __init__(
        self,
        *,
        groups: Sequence[str] | None = None,
        run_dir: str | os.PathLike | None = None,
        log_interval: int = 50,
        val_interval: int | None = None,
        val_samples_per_group: int = 64,
        val_batch_size: int | None = None,
        val_manifest: str | None = None,
    ) -> None:
        if log_interval < 1:
            raise ValueError(f"log_interval must be >= 1, got {log_interval}")
        if val_interval is not None and val_interval < 1:
            raise ValueError(f"val_interval must be >= 1 or None, got {val_interval}")
        if val_samples_per_group < 1:
            raise ValueError(f"val_samples_per_group must be >= 1, got {val_samples_per_group}")
        self.groups = list(groups) if groups is not None else None
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.log_interval = int(log_interval)
        self.val_interval = val_interval
        self.val_samples_per_group = int(val_samples_per_group)
        self.val_batch_size = val_batch_size
        self.val_manifest = val_manifest
        self.dataset: DynamicStreamingDataset | None = None
        self._loaded_step: int | None = None
        self._pending_rng: list[dict[str, Any]] | None = None
        self._step = 0
        self._val_set: GroupSamples | None = None
        self._history: MixtureHistory | None = None
        self._train_sums: torch.Tensor | None = None
        self._train_counts: torch.Tensor | None = None
        # This rank's sums over the current batch's microbatches (folded into the window
        # above at BATCH_END, after on_step has had the chance to read them).
        self._step_sums: torch.Tensor | None = None
        self._step_counts: torch.Tensor | None = None
        #: wall-clock seconds spent measuring validation losses (the method's own overhead)
        self.eval_seconds = 0.0
        self._val_step: int | None = None  # batch of the last measurement (one per batch)

    # --------------------------------------------------------------- subclass hooks
    def setup(self, state: State, logger: Logger, fresh: bool) -> None:
        """At FIT_START, once the dataset is known; ``fresh`` is False after a resume."""

    def on_loss(self, state: State, logger: Logger) -> None:
        """After the loss of each (micro)batch; ``state.loss`` may be replaced here."""

    def on_step(self, state: State, logger: Logger, step: int) -> None:
        """After ``step`` batches are done (the trainer's BATCH_END)."""

    def method_state(self) -> dict[str, Any]:
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`method_state` returned."""

    def summary(self, step: int) -> dict[str, Any]:
        """Extra JSON-able entries of ``weights.json`` (e.g. the method's resolved settings)."""
        return {}

    def recommended_weights(self, step: int) -> dict[str, np.ndarray]:
        """The mixture this run recommends: ``final`` and time-``average`` weights."""
        schedule = self._schedule()
        return {"final": schedule.at(step), "average": schedule.average(step)}

    # --------------------------------------------------------------- Composer events
    def match(self, event: Event, state: State) -> bool:
        return event in _EVENTS

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            self._fit_start(state, logger)
        elif event == Event.AFTER_DATALOADER:
            if self._pending_rng is not None:
                reproducibility.load_rng_state(self._pending_rng)
                self._pending_rng = None
        elif event == Event.AFTER_LOSS:
            self._collect_train_loss(state)
            self.on_loss(state, logger)
        elif event == Event.BATCH_END:
            step = int(state.timestamp.batch)
            self._step = step
            self.mixing_dataset.advance(step)
            self.on_step(state, logger, step)
            self._end_step()
            if step % self.log_interval == 0:
                self.record("train_loss", step, logger, losses=self.flush_train_losses())
            if self.val_interval and step % self.val_interval == 0 and self._val_step != step:
                self.record("val_loss", step, logger, losses=self.validation_losses(state))
        elif event == Event.FIT_END:
            self._fit_end(state, logger)

    def _fit_start(self, state: State, logger: Logger) -> None:
        dataset = find_dataset(state)
        if self.groups is not None:
            unknown = [g for g in self.groups if g not in dataset.group_names]
            if unknown:
                raise ValueError(
                    f"{type(self).__name__}: group(s) {', '.join(unknown)} are not in the "
                    f"dataset (groups: {', '.join(dataset.group_names)})"
                )
            if self.groups != dataset.group_names:
                raise ValueError(
                    f"{type(self).__name__} mixes groups {self.groups} but the dataset has "
                    f"{dataset.group_names}; pass the same groups, in the same order"
                )
        self.dataset = dataset
        self.groups = list(dataset.group_names)
        step = int(state.timestamp.batch)
        self._step = step
        fresh = self._loaded_step is None and step == 0
        if dist.get_global_rank() == 0:
            if self.run_dir is None:
                self.run_dir = Path(state.run_name)
            self._history = MixtureHistory(self.run_dir)
            if fresh:
                self._history.truncate_after(-1)
            else:
                self._history.truncate_after(step)
        self._reset_train_loss()
        self._reset_step_loss()
        self.setup(state, logger, fresh)

    def _fit_end(self, state: State, logger: Logger) -> None:
        step = int(state.timestamp.batch)
        weights = self.recommended_weights(step)
        self.record("final", step, logger, **{k: self._named(v) for k, v in weights.items()})
        if dist.get_global_rank() == 0 and self.run_dir is not None:
            schedule = self._whole_schedule()
            past = {}
            if not schedule.past.empty:  # the history file did not have it all
                past = {
                    "schedule_past": {
                        "entries": schedule.past.entries,
                        "digest": schedule.past.digest.hex(),
                    }
                }
            payload = {
                "method": type(self).__name__,
                "groups": self.groups,
                "steps": step,
                **{k: self._named(v) for k, v in weights.items()},
                "schedule": schedule.to_list(),
                **past,
                **self.summary(step),
            }
            tmp = self.run_dir / (WEIGHTS_FILE + ".tmp")
            tmp.write_text(json.dumps(payload, indent=2) + "\n")
            os.replace(tmp, self.run_dir / WEIGHTS_FILE)

    # --------------------------------------------------------------- for subclasses
    @property
    def mixing_dataset(self) -> DynamicStreamingDataset:
        if self.dataset is None:
            raise RuntimeError(f"{type(self).__name__} is used before Composer's FIT_START")
        return self.dataset

    @property
    def num_groups(self) -> int:
        return len(self.mixing_dataset.group_names)

    def _schedule(self) -> WeightSchedule:
        """A copy of the dataset's schedule: O(changes kept); per step use :meth:`_weights_at`."""
        return self.mixing_dataset.weight_schedule

    def _weights_at(self, step: int) -> np.ndarray:
        """The weights in force at global batch ``step``, without copying the schedule."""
        return self.mixing_dataset.weights_at(step)

    def _whole_schedule(self) -> WeightSchedule:
        """The run's whole schedule for ``weights.json``.

        The dataset keeps only its last changes (``history_entries``) and a digest of the
        rest; the history file has every change, so they are replayed from it, and used when
        the replay's digest is the dataset's (else the dataset's kept part is written, with
        ``schedule_past`` saying what it lacks).
        """
        schedule = self._schedule()
        if schedule.past.empty or self._history is None or not self._history.path.exists():
            return schedule
        replayed = WeightSchedule()
        for row in read_history(self._history.path):
            if row.get("kind") != "weights":
                continue
            values = row["weights"]
            if not replayed.entries and row["effective_step"] != 0:
                return schedule  # the initial weights were not recorded
            replayed.set(int(row["effective_step"]), [values[g] for g in self.groups])
        return replayed if len(replayed) and replayed.digest == schedule.digest else schedule

    def _named(self, values: Any) -> dict[str, float]:
        vec = np.asarray(values, dtype=np.float64).reshape(-1)
        return {g: float(v) for g, v in zip(self.mixing_dataset.group_names, vec, strict=True)}

    def normalize(self, weights: Mapping[str, float] | Sequence[float] | np.ndarray) -> np.ndarray:
        return normalize_weights(weights, self.mixing_dataset.group_names)

    def set_weights(
        self, weights: Any, step: int, logger: Logger, effective_step: int | None = None
    ) -> int:
        """Hand ``weights`` to the dataset (collective), log and record the change."""
        effective = self.mixing_dataset.set_weights(weights, step, effective_step)
        vec = self.mixing_dataset.weights_at(effective)
        self.record("weights", step, logger, effective_step=effective, weights=vec)
        return effective

    def record(self, kind: str, step: int, logger: Logger, **values: Any) -> None:
        """Log ``values`` as ``mixture/<kind>/<group>`` and append a history row (rank 0).

        Per-group vectors (length = number of groups) are named by group; other values are
        written as they are.
        """
        row: dict[str, Any] = {"step": int(step), "kind": kind}
        metrics: dict[str, float] = {}
        for key, value in values.items():
            if isinstance(value, np.ndarray | torch.Tensor | list | tuple):
                arr = np.asarray(value, dtype=np.float64)
                if arr.ndim == 1 and arr.size == self.num_groups:
                    value = self._named(arr)
                else:
                    value = arr.tolist()
            if isinstance(value, Mapping) and key in ("weights", "losses"):
                name = "weight" if key == "weights" else kind
                for g, v in value.items():
                    if np.isfinite(v):
                        metrics[f"mixture/{name}/{g}"] = float(v)
            row[key] = value
        if metrics:
            logger.log_metrics(metrics, step=int(step))
        if self._history is not None:
            self._history.append(_json_safe(row))

    def _reset_train_loss(self) -> None:
        self._train_sums = torch.zeros(self.num_groups, dtype=torch.float64)
        self._train_counts = torch.zeros(self.num_groups, dtype=torch.float64)

    def _reset_step_loss(self) -> None:
        self._step_sums = torch.zeros(self.num_groups, dtype=torch.float64)
        self._step_counts = torch.zeros(self.num_groups, dtype=torch.float64)

    def _collect_train_loss(self, state: State) -> None:
        if "group" not in state.batch:
            raise KeyError("the batch has no 'group' ids; keep the dataset's 'group' column")
        losses = self.batch_token_losses(state).detach()
        sums, counts = group_loss_sums(losses, state.batch["group"], self.num_groups)
        assert self._step_sums is not None and self._step_counts is not None
        self._step_sums += sums.cpu()
        self._step_counts += counts.cpu()

    def _end_step(self) -> None:
        """Fold the finished batch's sums into the logging window."""
        assert self._train_sums is not None and self._train_counts is not None
        assert self._step_sums is not None and self._step_counts is not None
        self._train_sums += self._step_sums
        self._train_counts += self._step_counts
        self._reset_step_loss()

    def batch_token_losses(self, state: State) -> torch.Tensor:
        """Per-token losses of the current (micro)batch, from the training forward pass."""
        cached = getattr(unwrap_model(state.model), "token_losses", None)
        if cached is not None:
            return cached
        return token_losses(state.model, state.outputs, state.batch)

    def flush_train_losses(self, device: Any | None = None) -> np.ndarray:
        """Mean training token loss per group since the last flush, across ranks (collective).

        Groups without tokens in that window are NaN.
        """
        assert self._train_sums is not None and self._train_counts is not None
        totals = torch.stack([self._train_sums, self._train_counts])
        self._reset_train_loss()
        if device is not None:
            totals = device.tensor_to_device(totals)
        totals = all_reduce_sum(totals).cpu()
        with np.errstate(invalid="ignore", divide="ignore"):
            return (totals[0] / totals[1]).numpy()

    def step_train_losses(self, device: Any | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The batch just trained: mean training token loss and token count per group.

        Summed over every microbatch of the batch and across ranks (collective: call it from
        :meth:`on_step` on every rank). Groups without tokens in the batch have loss NaN and
        count 0. It does not disturb the logging window (``flush_train_losses``).
        """
        assert self._step_sums is not None and self._step_counts is not None
        totals = torch.stack([self._step_sums, self._step_counts])
        if device is not None:
            totals = device.tensor_to_device(totals)
        totals = all_reduce_sum(totals).cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            return totals[0] / totals[1], totals[1]

    def validation_losses(self, state: State) -> np.ndarray:
        """Mean validation token loss per group, across ranks (collective)."""
        self._val_step = int(state.timestamp.batch)
        started = time.perf_counter()
        if self._val_set is None:
            manifest = self.val_manifest or self.mixing_dataset.manifest
            if manifest is None:
                raise ValueError(
                    f"{type(self).__name__} needs per-group validation data: build the dataset "
                    "from a manifest with a 'val' split, or pass val_manifest="
                )
            self._val_set = GroupSamples(
                manifest,
                "val",
                self.mixing_dataset.group_names,
                self.val_samples_per_group,
                local=self.mixing_dataset.cache_root,
            )
        batch_size = self.val_batch_size or self.mixing_dataset.device_batch_size
        try:
            return evaluate_group_losses(
                state.model,
                self._val_set,
                batch_size,
                device=state.device,
                precision_context=lambda: get_precision_context(
                    state.precision, state.precision_config
                ),
            )
        finally:
            self.eval_seconds += time.perf_counter() - started

    # --------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Collective (gathers every rank's RNG state), like Composer's checkpointing."""
        return {
            **super().state_dict(),
            "step": self._step,
            "method": self.method_state(),
            "rng": reproducibility.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loaded_step = int(state["step"])
        self._step = self._loaded_step
        self._pending_rng = state.get("rng")
        self.load_method_state(state.get("method", {}))


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


def total_steps(state: State) -> int | None:
    """The run's length in global batches, where Composer knows it (else None)."""
    duration = state.max_duration
    if duration is None:
        return None
    if duration.unit == TimeUnit.BATCH:
        return int(duration.value)
    if duration.unit == TimeUnit.EPOCH and state.dataloader_len is not None:
        return int(duration.value) * int(state.dataloader_len)
    return None
