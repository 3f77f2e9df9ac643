"""``DGA``: Dynamic Gradient Alignment (Fan, Grangier, Ablin 2024) as a Composer algorithm.

Every ``update_steps`` batches DGA asks which groups' gradients point where the *target*
set's gradient points, and moves weight toward them (the rule, its sign and its EMA are in
:mod:`mixstream.algorithms.dga`). The gradients come from *probes*: a few fixed sequences
per group, drawn from a small in-memory pool of each group's train split, and a batch of the
target set (a group's ``val`` split, possibly of another ``mixture.json``).

A probe must not disturb training (:mod:`mixstream.composer.probes`, shared with DoGE): it
takes ``torch.autograd.grad`` on the unwrapped module (``param.grad``, the optimizer state
and DDP's hooks are never touched), forks the RNG, and draws its sequences keyed by
``(dataset seed, step, group)``: the same on every rank and after a resume.

Alignment is the cosine ``<g_i, g_t> / (|g_i| |g_t|)`` by default (``normalize=True``), so
``eta`` does not depend on the model's size, loss scale or learning rate: a one-step move of
the log-weights is at most ``2 eta`` whatever the model. ``normalize=False`` uses the raw
inner products (the first-order hyper-gradient, up to the learning rate), and ``eta`` must
then absorb their scale.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from composer.core import State
from composer.core.precision import get_precision_context
from composer.loggers import Logger

from mixstream.algorithms import scale
from mixstream.algorithms.dga import dga_update
from mixstream.algorithms.lmo import check_fraction, check_positive
from mixstream.composer.mixing import MixingAlgorithm
from mixstream.composer.probes import TARGET, draw_probe, probe_alignment, require_whole_model
from mixstream.manifest import Manifest
from mixstream.mixing.signals import GroupSamples

__all__ = ["DGA", "draw_probe", "probe_alignment"]


class DGA(MixingAlgorithm):
    """Upweight the groups whose gradients align with a target set's (DGA).

    Args:
        target: the group whose ``target_split`` split is the target set (required). It may
            be any group of the target manifest, trained on or not.
        target_manifest: the ``mixture.json`` holding the target group (default: the
            training manifest), e.g. a held-out mixture.
        target_split: which split of the target group is the target set.
        eta: step size of the mirror-descent step on the log-weights. With cosine
            alignment and ``ema=0.9``, one update moves ``log(alpha_i / alpha_j)`` by about
            ``(1 - ema) * eta * (a_i - a_j)``, at most 0.2 for the default 1.0: a few hundred
            updates over a run can move the mixture a lot, one noisy probe cannot.
        ema: ``beta``, the weight on the previous weights, in ``[0, 1)`` (0: plain DGA).
        update_steps: ``T_r``, update every this many batches.
        probe_batch_size: sequences per group (and of the target) in one probe.
        probe_samples_per_group: size of the fixed pool each probe draws from, per group.
        normalize: cosine alignment (default; ``eta`` is scale-free) or raw inner products.
        initial_weights: starting mixture (default: the dataset's weights at the start).
        **kwargs: see :class:`~mixstream.composer.mixing.MixingAlgorithm`.
    """

    kind = "dga"

    def __init__(
        self,
        target: str | None = None,
        *,
        target_manifest: str | None = None,
        target_split: str = "val",
        eta: float = 1.0,
        ema: float = 0.9,
        update_steps: int = 50,
        probe_batch_size: int = 4,
        probe_samples_per_group: int = 64,
        normalize: bool = True,
        initial_weights: Mapping[str, float] | Sequence[float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if target is None:
            raise ValueError(
                "DGA needs target=: the group whose held-out split the mixture should serve "
                "(e.g. DGA(target='code'); add target_manifest= for another mixture.json)"
            )
        if not isinstance(target, str):
            raise ValueError(f"DGA target= must be one group name, got {target!r}")
        self.eta = check_positive("DGA eta", eta)
        self.ema = check_fraction("DGA ema", ema, allow_one=False)
        for name, value in (
            ("update_steps", update_steps),
            ("probe_batch_size", probe_batch_size),
            ("probe_samples_per_group", probe_samples_per_group),
        ):
            if int(value) != value or value < 1:
                raise ValueError(f"DGA {name} must be an integer >= 1, got {value!r}")
        self.target = target
        self.target_manifest = target_manifest
        self.target_split = target_split
        self.update_steps = int(update_steps)
        self.probe_batch_size = int(probe_batch_size)
        self.probe_samples_per_group = int(probe_samples_per_group)
        self.normalize_alignment = bool(normalize)
        self.initial_weights = initial_weights
        self.alpha: np.ndarray | None = None
        self.updates = 0
        self.last_alignment: np.ndarray | None = None
        self._pool: GroupSamples | None = None
        self._target_pool: GroupSamples | None = None

    # ------------------------------------------------------------------ setup
    def setup(self, state: State, logger: Logger, fresh: bool) -> None:
        require_whole_model(state, "DGA")
        dataset = self.mixing_dataset
        scale.warn(scale.many_groups_warning(
            "DGA", len(dataset.group_names),
            f"every update_steps={self.update_steps} batches it takes one gradient probe "
            f"(forward and backward of probe_batch_size={self.probe_batch_size} sequences) "
            f"per group, {len(dataset.group_names):,} in all",
        ))  # fmt: skip
        train_manifest = dataset.manifest
        if train_manifest is None:
            raise ValueError(
                "DGA probes each group's train split through the manifest: build the dataset "
                "with manifest= (not streams=)"
            )
        target_manifest = (
            train_manifest if self.target_manifest is None else Manifest.load(self.target_manifest)
        )
        if self.target not in target_manifest.group_names:
            raise ValueError(
                f"DGA target={self.target!r} is not a group of {target_manifest.location}; "
                f"groups: {', '.join(target_manifest.group_names)}"
            )
        try:
            target_manifest.split(self.target, self.target_split)
        except ValueError as exc:
            raise ValueError(f"DGA target: {exc}") from None
        self._pool = GroupSamples(
            train_manifest, "train", dataset.group_names, self.probe_samples_per_group
        )
        self._target_pool = GroupSamples(
            target_manifest, self.target_split, [self.target], self.probe_samples_per_group
        )
        step = int(state.timestamp.batch)
        if fresh:
            self.updates, self.last_alignment = 0, None
            if self.initial_weights is not None:
                weights = self.mixer.normalize(self.initial_weights)
                self.mixer.set_weights(weights, step, effective_step=step)
        if fresh or self.alpha is None:  # after a resume alpha is the checkpointed one
            self.alpha = self.mixer.weights_at(step).copy()
        if self.alpha.shape != (self.num_groups,):
            raise ValueError(
                f"DGA's saved weights have {self.alpha.size} entries but the dataset has "
                f"{self.num_groups} groups; resume with the same groups"
            )

    # ------------------------------------------------------------------ the update
    def on_step(self, state: State, logger: Logger, step: int) -> None:
        if step % self.update_steps:
            return
        a = self.probe(state, step)
        assert self.alpha is not None
        alpha = dga_update(self.alpha, a, self.eta, self.ema)
        self.last_alignment = a
        self.updates += 1
        self.mixer.record("dga", step, alignment=a, update=self.updates)
        logger.log_metrics(
            {f"mixture/dga_alignment/{g}": float(v) for g, v in self.mixer.named(a).items()},
            step=step,
        )
        effective = self.mixer.set_weights(alpha, step)
        # Rank 0's weights (set_weights broadcasts them), so every rank continues from them.
        self.alpha = self.mixer.weights_at(effective).copy()

    def probe(self, state: State, step: int) -> np.ndarray:
        """The alignment of every group with the target at ``step`` (see module doc)."""
        assert self._pool is not None and self._target_pool is not None
        seed = self.mixing_dataset.seed
        batches = [
            draw_probe(self._pool, g, self.probe_batch_size, seed, step)
            for g in range(self.num_groups)
        ]
        target = draw_probe(self._target_pool, 0, self.probe_batch_size, seed, step, TARGET)
        return probe_alignment(
            state.model,
            batches,
            target,
            normalize=self.normalize_alignment,
            device=state.device,
            precision_context=lambda: get_precision_context(
                state.precision, state.precision_config
            ),
        )

    # ------------------------------------------------------------------ checkpointing
    def method_state(self) -> dict[str, Any]:
        return {
            "alpha": None if self.alpha is None else [float(x) for x in self.alpha],
            "updates": self.updates,
            "last_alignment": (
                None if self.last_alignment is None else [float(x) for x in self.last_alignment]
            ),
        }

    def load_method_state(self, state: dict[str, Any]) -> None:
        alpha = state.get("alpha")
        self.alpha = None if alpha is None else np.asarray(alpha, dtype=np.float64)
        self.updates = int(state.get("updates", 0))
        last = state.get("last_alignment")
        self.last_alignment = None if last is None else np.asarray(last, dtype=np.float64)
