"""``Mixer``: the driver every mixing method runs on, in any training loop.

A training loop tells its mixer two things: the per-token training losses of each
(micro)batch with the batch's ``group`` ids (:meth:`Mixer.observe`, or per-group losses
already reduced: :meth:`Mixer.observe_group_losses`), and that a batch is done
(:meth:`Mixer.step`). The mixer does, once for every method:

* announces every finished batch to the :class:`~mixstream.dataset.DynamicStreamingDataset`
  (``advance``), so lockstep workers never plan a batch whose weights could still change;
* sums the training losses per group over the batch (every microbatch) and over the logging
  window, all-reduced across ranks when torch.distributed is initialised; measures
  validation losses through ``evaluate`` (a callable returning one loss per group, e.g.
  :class:`~mixstream.mixing.signals.GroupEvaluator` over the manifest's ``val`` split);
* hands weight changes to the dataset (``set_weights``, collective: rank 0's decision is
  broadcast), logs them (``log_metrics``: ``mixture/weight/<group>``, ...) and appends them
  to ``mixture_history.jsonl`` in ``run_dir``; writes ``weights.json`` at :meth:`finish`;
* saves and restores the method's state (:meth:`state_dict`), so a resume is exact.

A method is a subclass that says what to do and when (:meth:`setup` at the start,
:meth:`update` after each batch), over a pure rule of :mod:`mixstream.algorithms`.

Lifecycle in a plain loop (``step`` counts finished batches, as Composer's timestamp does)::

    mixer = ODMMixer(dataset, run_dir="runs/odm")
    if resuming:                        # the states saved together at the same step
        dataset.load_state_dict(ckpt["dataset"])
        mixer.load_state_dict(ckpt["mixer"])
    mixer.start()                       # before iterating the DataLoader
    for batch in loader:
        token_losses = ...              # (batch, tokens), from the training forward pass
        mixer.observe(token_losses, batch["group"])
        ...                             # backward, optimizer step
        step += 1
        mixer.step(step)                # collective: every rank, every batch
    mixer.finish()                      # weights.json
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from mixstream.dataset import DynamicStreamingDataset
from mixstream.mixing.history import WEIGHTS_FILE, MixtureHistory, read_history
from mixstream.mixing.signals import all_reduce_sum, group_loss_sums, rank_and_world
from mixstream.weights import WeightSchedule, normalize_weights

__all__ = ["Mixer", "SteeredDataset"]

#: ``log_metrics(metrics, step)``: where a mixer's numbers go (Composer's ``Logger.log_metrics``)
MetricsSink = Callable[..., Any]


@runtime_checkable
class SteeredDataset(Protocol):
    """What a mixer uses of its dataset: the trainer side of
    :class:`~mixstream.dataset.DynamicStreamingDataset`.

    Spelled out so that a stand-in with the same members is steered by the same mixers: the
    planted-law simulator's :class:`~mixstream.algorithms.simulate.PlantedRun` runs the real
    methods, not copies of them.
    """

    group_names: list[str]
    seed: int
    update_lag: int
    step: int  #: global batches the trainer has announced
    started: bool  #: whether batches may already be planned (prefetched)

    @property
    def weight_schedule(self) -> WeightSchedule: ...

    def weights_at(self, batch: int) -> np.ndarray: ...

    def advance(self, step: int) -> None: ...

    def set_weights(self, weights: Any, step: int, effective_step: int | None = None) -> int: ...


class Mixer:
    """Drives a :class:`~mixstream.dataset.DynamicStreamingDataset` (or any
    :class:`SteeredDataset`) from a training loop.

    The base class makes no decisions (it keeps the weights the dataset has); the methods
    are its subclasses (``ODMMixer``, ``ADOMixer``, ``AioliMixer``, ``SkillItMixer``).

    Args:
        dataset: the training dataset (Composer's adapters pass it at ``FIT_START`` through
            :meth:`attach` instead).
        groups: the groups this method mixes, checked against the dataset's (default: the
            dataset's groups, in its order).
        run_dir: folder for ``mixture_history.jsonl`` and ``weights.json`` (``None``: none
            are written).
        log_interval: record per-group training loss every this many batches.
        val_interval: also measure and record per-group validation loss every this many
            batches (``None``: only when the method itself needs it).
        evaluate: ``evaluate() -> one loss per group``, the same on every rank (collective);
            needed by the methods that learn from validation losses (Aioli, Skill-It) and by
            ``val_interval``; see :class:`~mixstream.mixing.signals.GroupEvaluator`.
        log_metrics: ``log_metrics(metrics: dict[str, float], step: int)``, called with
            every recorded per-group value (``mixture/<kind>/<group>``); default: not logged.
        total_steps: the run's length in batches, where known: methods refuse or warn about
            plans that cannot finish in it.
    """

    #: history/log name of the method's own rows (``None``: none)
    kind: str | None = None

    def __init__(
        self,
        dataset: SteeredDataset | None = None,
        *,
        groups: Sequence[str] | None = None,
        run_dir: str | os.PathLike | None = None,
        log_interval: int = 50,
        val_interval: int | None = None,
        evaluate: Callable[[], Any] | None = None,
        log_metrics: MetricsSink | None = None,
        total_steps: int | None = None,
    ) -> None:
        if isinstance(log_interval, bool) or int(log_interval) != log_interval or log_interval < 1:
            raise ValueError(f"log_interval must be an integer >= 1, got {log_interval!r}")
        if val_interval is not None and (int(val_interval) != val_interval or val_interval < 1):
            raise ValueError(f"val_interval must be an integer >= 1 or None, got {val_interval!r}")
        for name, value in (("evaluate", evaluate), ("log_metrics", log_metrics)):
            if value is not None and not callable(value):
                raise TypeError(f"{name}= must be a callable (or None), got {value!r}")
        if total_steps is not None and (int(total_steps) != total_steps or total_steps < 1):
            raise ValueError(f"total_steps must be an integer >= 1 or None, got {total_steps!r}")
        #: the method's name in messages and ``weights.json``
        self.name = type(self).__name__.removesuffix("Mixer") or type(self).__name__
        self.groups = list(groups) if groups is not None else None
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.log_interval = int(log_interval)
        self.val_interval = None if val_interval is None else int(val_interval)
        self.evaluate = evaluate
        self.log_metrics = log_metrics
        self.total_steps = None if total_steps is None else int(total_steps)
        #: wall-clock seconds spent measuring validation losses, and how many measurements
        self.eval_seconds = 0.0
        self.evaluations = 0
        self._dataset: SteeredDataset | None = None
        self._loaded_step: int | None = None
        self._started = False
        self._step = 0
        self._val_step: int | None = None  # batch of the last measurement (one per batch)
        self._history: MixtureHistory | None = None
        self._train_sums = self._train_counts = torch.zeros(0, dtype=torch.float64)
        # This rank's sums over the current batch's microbatches (folded into the window
        # above at the end of step(), after update() has had the chance to read them).
        self._step_sums = self._step_counts = torch.zeros(0, dtype=torch.float64)
        if dataset is not None:
            self.attach(dataset)

    # --------------------------------------------------------------- method hooks
    def setup(self, fresh: bool) -> None:
        """At :meth:`start`, with the dataset known; ``fresh`` is False after a resume."""

    def update(self, step: int) -> None:
        """After ``step`` batches are done: the method's decision (called by :meth:`step`)."""

    def method_state(self) -> dict[str, Any]:
        """The method's checkpointed state (plain values)."""
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`method_state` returned (before :meth:`start`)."""

    def summary(self, step: int) -> dict[str, Any]:
        """Extra JSON-able entries of ``weights.json`` (e.g. the method's resolved settings)."""
        return {}

    def recommended_weights(self, step: int) -> dict[str, np.ndarray]:
        """The mixture this run recommends: ``final`` and time-``average`` weights."""
        schedule = self.weight_schedule
        return {"final": schedule.at(step), "average": schedule.average(step)}

    # --------------------------------------------------------------- lifecycle
    def attach(self, dataset: SteeredDataset) -> None:
        """Steer ``dataset`` (checked against ``groups``); the constructor's ``dataset=``."""
        # The real dataset first: the protocol's check reads (evaluates) every member.
        if not isinstance(dataset, DynamicStreamingDataset | SteeredDataset):
            raise TypeError(
                f"{self.name} steers a DynamicStreamingDataset (or a SteeredDataset), got "
                f"{type(dataset).__name__}"
            )
        if self.groups is not None:
            unknown = [g for g in self.groups if g not in dataset.group_names]
            if unknown:
                raise ValueError(
                    f"{self.name}: group(s) {', '.join(unknown)} are not in the dataset "
                    f"(groups: {', '.join(dataset.group_names)})"
                )
            if self.groups != dataset.group_names:
                raise ValueError(
                    f"{self.name} mixes groups {self.groups} but the dataset has "
                    f"{dataset.group_names}; pass the same groups, in the same order"
                )
        self._dataset = dataset
        self.groups = list(dataset.group_names)

    @property
    def attached(self) -> bool:
        return self._dataset is not None

    @property
    def dataset(self) -> SteeredDataset:
        if self._dataset is None:
            raise RuntimeError(f"{self.name} has no dataset yet: pass it to the constructor")
        return self._dataset

    @property
    def steps_done(self) -> int:
        """Batches finished: the last :meth:`step`, or where :meth:`start` began."""
        return self._step

    def start(self, step: int | None = None) -> None:
        """Begin (or resume) at ``step`` finished batches: call once before iterating.

        ``step`` defaults to the dataset's position (0, or where its checkpoint was saved).
        A fresh start may schedule the mixture from batch 0 on, so it must come before the
        DataLoader over the dataset is iterated.
        """
        dataset = self.dataset
        step = dataset.step if step is None else int(step)
        if self._loaded_step is not None and self._loaded_step != step:
            raise ValueError(
                f"{self.name}'s loaded state is from batch {self._loaded_step} but training "
                f"is at batch {step}; load the mixer's and the dataset's states from the same "
                "checkpoint"
            )
        fresh = self._loaded_step is None and step == 0
        if fresh and dataset.started:
            raise RuntimeError(
                f"{self.name}.start() came after the DataLoader began reading the dataset; "
                "call mixer.start() before iterating the DataLoader (the mixture of the first "
                "batches may be scheduled here)"
            )
        self._step = step
        self._history = None
        if self.run_dir is not None and rank_and_world()[0] == 0:
            self._history = MixtureHistory(self.run_dir)
            self._history.truncate_after(-1 if fresh else step)
        self._reset_train_loss()
        self._reset_step_loss()
        self.setup(fresh)
        self._started = True
        self._loaded_step = None  # a later start() (another fit) continues from here

    def step(self, step: int) -> None:
        """Batch ``step`` (a count of finished batches) is done: advance, decide, log.

        Collective: call it on every rank after every batch, with the same ``step``.
        """
        self._require_started(f"step({step})")
        step = int(step)
        self._step = step
        self.dataset.advance(step)
        self.update(step)
        self._train_sums += self._step_sums
        self._train_counts += self._step_counts
        self._reset_step_loss()
        if step % self.log_interval == 0:
            self.record("train_loss", step, losses=self.flush_train_losses())
        if self.val_interval and step % self.val_interval == 0 and self._val_step != step:
            self.record("val_loss", step, losses=self.validation_losses())

    def _require_started(self, call: str) -> None:
        if not self._started:
            raise RuntimeError(
                f"{self.name}.{call} before start(): call mixer.start() once, before "
                "iterating the DataLoader"
            )

    def finish(self, step: int | None = None) -> None:
        """End of training: record the ``final`` row and write ``weights.json`` (rank 0)."""
        step = self._step if step is None else int(step)
        weights = self.recommended_weights(step)
        self.record("final", step, **{k: self.named(v) for k, v in weights.items()})
        if rank_and_world()[0] != 0 or self.run_dir is None:
            return
        schedule = self.whole_schedule()
        past = {}
        if not schedule.past.empty:  # the history file did not have it all
            past = {
                "schedule_past": {
                    "entries": schedule.past.entries,
                    "digest": schedule.past.digest.hex(),
                }
            }
        payload = {
            "method": self.name,
            "groups": self.groups,
            "steps": step,
            **{k: self.named(v) for k, v in weights.items()},
            "schedule": schedule.to_list(),
            **past,
            **self.summary(step),
        }
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / (WEIGHTS_FILE + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, self.run_dir / WEIGHTS_FILE)

    # --------------------------------------------------------------- training losses
    def observe(self, token_losses: torch.Tensor, groups: Any) -> None:
        """Add one (micro)batch's per-token training losses, ``(batch, tokens)``, by group.

        ``groups`` is the batch's ``group`` column (one id per sequence). This rank's share
        only: :meth:`step` reduces across ranks. The losses are detached (no graph is kept).
        """
        self._require_started("observe()")
        losses = torch.as_tensor(token_losses).detach()
        if losses.dim() == 0:
            raise ValueError(
                "observe() takes per-token (or per-sequence) losses, shape (batch, tokens), "
                "not the mean loss; compute the loss with reduction='none'"
            )
        ids = torch.as_tensor(groups).reshape(-1)
        if ids.numel() != losses.shape[0]:
            raise ValueError(
                f"observe(): {ids.numel()} group ids for {losses.shape[0]} sequences; pass "
                "batch['group'] (one id per sequence) with losses of shape (batch, tokens)"
            )
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_groups):
            raise ValueError(
                f"observe(): group ids must be in [0, {self.num_groups}) (the dataset's "
                f"group_names), got {int(ids.min())}..{int(ids.max())}"
            )
        sums, counts = group_loss_sums(losses, ids, self.num_groups)
        self._step_sums += sums.cpu()
        self._step_counts += counts.cpu()

    def observe_group_losses(self, losses: Any, tokens: Any) -> None:
        """Add per-group mean training losses over ``tokens`` tokens each (this rank's).

        For a loop that reduces by group itself; groups with no tokens may have any loss.
        """
        self._require_started("observe_group_losses()")
        m = self.num_groups
        loss = np.asarray(torch.as_tensor(losses).detach().cpu(), dtype=np.float64).reshape(-1)
        count = np.asarray(torch.as_tensor(tokens).detach().cpu(), dtype=np.float64).reshape(-1)
        if loss.size != m or count.size != m:
            raise ValueError(
                f"observe_group_losses(): one loss and one token count per group ({m}: "
                f"{', '.join(self.groups or [])}), got {loss.size} and {count.size}"
            )
        if not np.all(np.isfinite(count) & (count >= 0)):
            raise ValueError(f"observe_group_losses(): token counts must be >= 0, got {count}")
        present = count > 0
        if not np.all(np.isfinite(loss[present])):
            raise ValueError(
                f"observe_group_losses(): groups with tokens need finite losses, got {loss}"
            )
        self._step_sums += torch.from_numpy(np.where(present, loss * count, 0.0))
        self._step_counts += torch.from_numpy(count)

    def step_train_losses(self) -> tuple[np.ndarray, np.ndarray]:
        """The batch just trained: mean training token loss and token count per group.

        Summed over every microbatch of the batch and across ranks (collective: call it from
        :meth:`update` on every rank). Groups without tokens in the batch have loss NaN and
        count 0. It does not disturb the logging window (:meth:`flush_train_losses`).
        """
        totals = all_reduce_sum(torch.stack([self._step_sums, self._step_counts])).numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            return totals[0] / totals[1], totals[1]

    def flush_train_losses(self) -> np.ndarray:
        """Mean training token loss per group since the last flush, across ranks (collective).

        Groups without tokens in that window are NaN.
        """
        totals = torch.stack([self._train_sums, self._train_counts])
        self._reset_train_loss()
        totals = all_reduce_sum(totals)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (totals[0] / totals[1]).numpy()

    def _reset_train_loss(self) -> None:
        self._train_sums = torch.zeros(self.num_groups, dtype=torch.float64)
        self._train_counts = torch.zeros(self.num_groups, dtype=torch.float64)

    def _reset_step_loss(self) -> None:
        self._step_sums = torch.zeros(self.num_groups, dtype=torch.float64)
        self._step_counts = torch.zeros(self.num_groups, dtype=torch.float64)

    # --------------------------------------------------------------- validation losses
    def validation_losses(self) -> np.ndarray:
        """Mean validation loss per group from ``evaluate`` (collective), timed."""
        if self.evaluate is None:
            raise ValueError(
                f"{self.name} needs per-group validation losses: pass evaluate= (a callable "
                "returning one loss per group, the same on every rank), e.g. "
                "GroupEvaluator(dataset, model, losses) over the manifest's val split"
            )
        self._val_step = self._step
        started = time.perf_counter()
        try:
            losses = np.asarray(self.evaluate(), dtype=np.float64).reshape(-1)
        finally:
            self.eval_seconds += time.perf_counter() - started
            self.evaluations += 1
        if losses.size != self.num_groups:
            raise ValueError(
                f"evaluate() returned {losses.size} losses; {self.name} needs one per group "
                f"({', '.join(self.groups or [])})"
            )
        return losses

    # --------------------------------------------------------------- weights and records
    @property
    def num_groups(self) -> int:
        return len(self.dataset.group_names)

    @property
    def weight_schedule(self) -> WeightSchedule:
        """A copy of the dataset's schedule: O(changes kept); per step use :meth:`weights_at`."""
        return self.dataset.weight_schedule

    def weights_at(self, step: int) -> np.ndarray:
        """The weights in force at global batch ``step``, without copying the schedule."""
        return self.dataset.weights_at(step)

    def whole_schedule(self) -> WeightSchedule:
        """The run's whole schedule for ``weights.json``.

        The dataset keeps only its last changes (``history_entries``) and a digest of the
        rest; the history file has every change, so they are replayed from it, and used when
        the replay's digest is the dataset's (else the dataset's kept part is written, with
        ``schedule_past`` saying what it lacks).
        """
        schedule = self.weight_schedule
        if schedule.past.empty or self._history is None or not self._history.path.exists():
            return schedule
        assert self.groups is not None
        replayed = WeightSchedule()
        for row in read_history(self._history.path):
            if row.get("kind") != "weights":
                continue
            values = row["weights"]
            if not replayed.entries and row["effective_step"] != 0:
                return schedule  # the initial weights were not recorded
            replayed.set(int(row["effective_step"]), [values[g] for g in self.groups])
        return replayed if len(replayed) and replayed.digest == schedule.digest else schedule

    def named(self, values: Any) -> dict[str, float]:
        """One value per group as ``{group: value}``."""
        vec = np.asarray(values, dtype=np.float64).reshape(-1)
        return {g: float(v) for g, v in zip(self.dataset.group_names, vec, strict=True)}

    def normalize(self, weights: Mapping[str, float] | Sequence[float] | np.ndarray) -> np.ndarray:
        return normalize_weights(weights, self.dataset.group_names)

    def set_weights(self, weights: Any, step: int, effective_step: int | None = None) -> int:
        """Hand ``weights`` to the dataset (collective), log and record the change."""
        effective = self.dataset.set_weights(weights, step, effective_step)
        vec = self.dataset.weights_at(effective)
        self.record("weights", step, effective_step=effective, weights=vec)
        return effective

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Send ``metrics`` to ``log_metrics`` (if any)."""
        if self.log_metrics is not None and metrics:
            self.log_metrics(dict(metrics), step=int(step))

    def record(self, kind: str, step: int, **values: Any) -> None:
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
                    value = self.named(arr)
                else:
                    value = arr.tolist()
            if isinstance(value, Mapping) and key in ("weights", "losses"):
                name = "weight" if key == "weights" else kind
                for g, v in value.items():
                    if np.isfinite(v):
                        metrics[f"mixture/{name}/{g}"] = float(v)
            row[key] = value
        self.log(metrics, step)
        if self._history is not None:
            self._history.append(_json_safe(row))

    # --------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The step and the method's state (plain values; save it with the dataset's)."""
        return {"step": self._step, "method": self.method_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s ``state``; call before :meth:`start`."""
        if not isinstance(state, Mapping) or "step" not in state:
            raise ValueError(
                f"not a mixer state of {self.name} (no 'step'); pass what mixer.state_dict() "
                "returned"
            )
        self._loaded_step = int(state["step"])
        self._step = self._loaded_step
        self.load_method_state(dict(state.get("method") or {}))


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
