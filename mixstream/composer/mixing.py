"""``MixingAlgorithm``: a Composer front end for a :class:`~mixstream.mixing.base.Mixer`.

The mixer (:mod:`mixstream.mixing`) holds every method's logic and the wiring they share;
this adapter only feeds it Composer's events:

* ``FIT_START``: the :class:`~mixstream.dataset.DynamicStreamingDataset` behind the train
  dataloader, the run folder (default ``./<run name>``), Composer's loggers, the run's
  length and a :class:`~mixstream.mixing.signals.GroupEvaluator` over the manifest's ``val``
  split with the trainer's model, device and precision; then ``Mixer.start``;
* ``AFTER_LOSS``: the model's per-token losses of the (micro)batch and its ``group`` ids
  (``Mixer.observe``: from the training forward pass, no extra forward);
* ``BATCH_END``: ``Mixer.step``; ``FIT_END``: ``Mixer.finish`` (``weights.json``);
* checkpoints: the mixer's state with the trainer's, plus the RNG streams -- Composer
  restores them mid-epoch only when it replays the dataloader, which a dataset with its own
  resumption skips, so dropout would otherwise draw differently after a resume. They are
  restored right after the first batch is fetched, where Composer's own replay restores
  them (the dataloader's iterator draws a seed from the torch RNG).

A method with a mixer of its own (``ODM``, ``ADO``, ``Aioli``, ``SkillIt``) names it in
``mixer_class`` and takes its options. DoReMi, DGA, DoGE and the static mixtures collect
their signals from Composer's state (a reference model, gradient probes through the
trainer's model); they keep the hooks :meth:`MixingAlgorithm.setup`, :meth:`on_loss` and
:meth:`on_step`, which their base mixer calls at its ``start`` and ``step``, so state,
history and ``weights.json`` still come from the one Mixer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from composer.core import Algorithm, Event, State, TimeUnit
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from composer.utils import reproducibility

from mixstream.dataset import DynamicStreamingDataset
from mixstream.mixing.base import Mixer
from mixstream.mixing.history import WEIGHTS_FILE
from mixstream.mixing.signals import GroupEvaluator, token_losses, unwrap_model

__all__ = ["WEIGHTS_FILE", "MixingAlgorithm", "find_dataset", "total_steps"]

_EVENTS = (
    Event.FIT_START, Event.AFTER_DATALOADER, Event.AFTER_LOSS, Event.BATCH_END, Event.FIT_END,
)  # fmt: skip
#: Mixer arguments the adapter supplies itself
_SUPPLIED = ("dataset", "log_metrics")


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
    """Base class of the Composer mixing algorithms (see the module docstring).

    Args:
        val_samples_per_group, val_batch_size: size of the validation measurement.
        val_manifest: where the ``val`` split lives (default: the training manifest).
        **kwargs: the options of ``mixer_class`` (for every method: ``groups``, ``run_dir``,
            ``log_interval``, ``val_interval``; see :class:`~mixstream.mixing.base.Mixer`).
    """

    #: the mixer this algorithm drives; the base Mixer: the decisions are this class's hooks
    mixer_class: type[Mixer] = Mixer

    def __init__(
        self,
        *,
        val_samples_per_group: int = 64,
        val_batch_size: int | None = None,
        val_manifest: str | None = None,
        **kwargs: Any,
    ) -> None:
        supplied = [k for k in _SUPPLIED if k in kwargs]
        if supplied:
            raise TypeError(
                f"{type(self).__name__}: {', '.join(supplied)} come(s) from the Trainer (its "
                "train dataloader's dataset, its loggers); drop the argument"
            )
        if val_samples_per_group < 1:
            raise ValueError(f"val_samples_per_group must be >= 1, got {val_samples_per_group}")
        if val_batch_size is not None and val_batch_size < 1:
            raise ValueError(f"val_batch_size must be >= 1, got {val_batch_size}")
        self.val_samples_per_group = int(val_samples_per_group)
        self.val_batch_size = val_batch_size
        self.val_manifest = val_manifest
        if self.mixer_class is Mixer:
            self.mixer: Mixer = _HookMixer(self, **kwargs)
        else:
            self.mixer = self.mixer_class(**kwargs)
        self.mixer.name = type(self).__name__
        self._pending_rng: list[dict[str, Any]] | None = None
        # The event being handled, for the hooks the mixer calls (_HookMixer).
        self._event: tuple[State, Logger] | None = None

    # --------------------------------------------------------------- hooks (own signals)
    def setup(self, state: State, logger: Logger, fresh: bool) -> None:
        """At ``Mixer.start`` (FIT_START), once the dataset is known; False after a resume."""

    def on_loss(self, state: State, logger: Logger) -> None:
        """After the loss of each (micro)batch; ``state.loss`` may be replaced here."""

    def on_step(self, state: State, logger: Logger, step: int) -> None:
        """After ``step`` batches are done (in ``Mixer.step``, at the trainer's BATCH_END)."""

    def method_state(self) -> dict[str, Any]:
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`method_state` returned."""

    def summary(self, step: int) -> dict[str, Any]:
        """Extra JSON-able entries of ``weights.json``."""
        return {}

    def recommended_weights(self, step: int) -> dict[str, np.ndarray]:
        """Replacements for the mixer's ``final``/``average`` weights (default: none)."""
        return {}

    # --------------------------------------------------------------- for subclasses
    @property
    def mixing_dataset(self) -> DynamicStreamingDataset:
        if not self.mixer.attached:
            raise RuntimeError(f"{type(self).__name__} is used before Composer's FIT_START")
        return self.mixer.dataset

    @property
    def num_groups(self) -> int:
        return len(self.mixing_dataset.group_names)

    @property
    def eval_seconds(self) -> float:
        """Wall-clock seconds spent measuring validation losses (the method's own overhead)."""
        return self.mixer.eval_seconds

    def batch_token_losses(self, state: State) -> torch.Tensor:
        """Per-token losses of the current (micro)batch, from the training forward pass."""
        cached = getattr(unwrap_model(state.model), "token_losses", None)
        if cached is not None:
            return cached
        return token_losses(state.model, state.outputs, state.batch)

    # --------------------------------------------------------------- Composer events
    def match(self, event: Event, state: State) -> bool:
        return event in _EVENTS

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        self._event = (state, logger)
        try:
            self._apply(event, state, logger)
        finally:
            self._event = None

    def _apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            self._fit_start(state, logger)
        elif event == Event.AFTER_DATALOADER:
            if self._pending_rng is not None:
                reproducibility.load_rng_state(self._pending_rng)
                self._pending_rng = None
        elif event == Event.AFTER_LOSS:
            if "group" not in state.batch:
                raise KeyError("the batch has no 'group' ids; keep the dataset's 'group' column")
            self.mixer.observe(self.batch_token_losses(state), state.batch["group"])
            self.on_loss(state, logger)
        elif event == Event.BATCH_END:
            self.mixer.step(int(state.timestamp.batch))
        elif event == Event.FIT_END:
            self.mixer.finish(int(state.timestamp.batch))

    def _fit_start(self, state: State, logger: Logger) -> None:
        mixer = self.mixer
        dataset = find_dataset(state)
        mixer.attach(dataset)
        if mixer.run_dir is None:
            mixer.run_dir = Path(state.run_name)
        mixer.log_metrics = logger.log_metrics
        if mixer.total_steps is None:
            mixer.total_steps = total_steps(state)
        if mixer.evaluate is None:
            mixer.evaluate = GroupEvaluator(
                dataset,
                state.model,
                samples_per_group=self.val_samples_per_group,
                batch_size=self.val_batch_size,
                manifest=self.val_manifest,
                device=state.device,
                precision_context=lambda: get_precision_context(
                    state.precision, state.precision_config
                ),
            )
        mixer.start(int(state.timestamp.batch))

    # --------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Collective (gathers every rank's RNG state), like Composer's checkpointing."""
        return {
            **super().state_dict(),
            **self.mixer.state_dict(),
            "rng": reproducibility.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending_rng = state.get("rng")
        self.mixer.load_state_dict(state)


class _HookMixer(Mixer):
    """The mixer of an algorithm whose decisions are its own Composer hooks (DoReMi, DGA,
    DoGE, the static mixtures), called with the event being handled."""

    def __init__(self, algorithm: MixingAlgorithm, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.algorithm = algorithm

    def _current(self) -> tuple[State, Logger]:
        assert self.algorithm._event is not None, "called outside a Composer event"
        return self.algorithm._event

    def setup(self, fresh: bool) -> None:
        self.algorithm.setup(*self._current(), fresh)

    def update(self, step: int) -> None:
        self.algorithm.on_step(*self._current(), step)

    def method_state(self) -> dict[str, Any]:
        return self.algorithm.method_state()

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.algorithm.load_method_state(state)

    def summary(self, step: int) -> dict[str, Any]:
        return self.algorithm.summary(step)

    def recommended_weights(self, step: int) -> dict[str, np.ndarray]:
        return {**super().recommended_weights(step), **self.algorithm.recommended_weights(step)}


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
