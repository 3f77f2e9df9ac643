"""``DGA``: Dynamic Gradient Alignment (Fan, Grangier, Ablin 2024) as a Composer algorithm.

Every ``update_steps`` batches DGA asks which groups' gradients point where the *target*
set's gradient points, and moves weight toward them (the rule, its sign and its EMA are in
:mod:`mixstream.algorithms.dga`). The gradients come from *probes*: a few fixed sequences
per group, drawn from a small in-memory pool of each group's train split, and a batch of the
target set (a group's ``val`` split, possibly of another ``mixture.json``).

A probe must not disturb training, so it

* takes ``torch.autograd.grad`` on the unwrapped module (not ``.backward``): ``param.grad``,
  the optimizer state and DDP's gradient hooks are never touched;
* keeps the model's (train) mode but forks the RNG, so its dropout draws do not shift the
  training run's;
* draws its sequences with a fresh generator keyed by ``(dataset seed, step, group)``: the
  same on every rank and after a resume, and no RNG state is consumed.

Alignment is the cosine ``<g_i, g_t> / (|g_i| |g_t|)`` by default (``normalize=True``), so
``eta`` does not depend on the model's size, loss scale or learning rate: a one-step move of
the log-weights is at most ``2 eta`` whatever the model. ``normalize=False`` uses the raw
inner products (the first-order hyper-gradient, up to the learning rate), and ``eta`` must
then absorb their scale.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from composer.core import State
from composer.core.precision import get_precision_context
from composer.loggers import Logger

from mixstream.algorithms.dga import alignment, dga_update
from mixstream.algorithms.lmo import check_fraction, check_positive
from mixstream.composer.mixing import MixingAlgorithm
from mixstream.composer.signals import GroupSamples, forked_rng, token_losses, unwrap_model
from mixstream.manifest import Manifest

__all__ = ["DGA", "draw_probe", "probe_alignment"]

# SeedSequence entropy tags, so a target probe never reuses a training group's draw.
_TRAIN, _TARGET = 0, 1


def draw_probe(
    samples: GroupSamples, group: int, size: int, seed: int, step: int, tag: int = _TRAIN
) -> dict[str, torch.Tensor]:
    """``size`` distinct sequences of ``group``'s pool, chosen by ``(seed, step, tag, group)``.

    Deterministic and stateless: every rank (and a resumed run) draws the same batch, and no
    global RNG moves.
    """
    pool = samples.samples[group]
    rng = np.random.default_rng([seed % 2**63, int(step), tag, group])
    rows = rng.choice(len(pool), size=min(size, len(pool)), replace=False)
    return {k: torch.stack([pool[i][k] for i in rows]) for k in pool[0]}


def _flat_grad(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    batch: dict[str, torch.Tensor],
    device: Any | None,
    precision_context: Callable[[], Any] | None,
) -> torch.Tensor:
    """Gradient of ``batch``'s mean token loss w.r.t. ``params``, flattened, in float32."""
    if device is not None:
        batch = device.batch_to_device(batch)
    with precision_context() if precision_context else contextlib.nullcontext():
        outputs = model(batch)
    loss = token_losses(model, outputs, batch).float().mean()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1).float()
            for g, p in zip(grads, params, strict=True)
        ]
    )


def probe_alignment(
    model: torch.nn.Module,
    group_batches: Sequence[dict[str, torch.Tensor]],
    target_batch: dict[str, torch.Tensor],
    *,
    normalize: bool = True,
    device: Any | None = None,
    precision_context: Callable[[], Any] | None = None,
) -> np.ndarray:
    """Alignment of each group batch's loss gradient with the target batch's (float64).

    Cosine when ``normalize`` (0 for a zero gradient), else the raw inner product. Leaves
    ``param.grad``, the optimizer, the model's mode and every RNG stream as they were. Only
    two flat gradients are held at a time.
    """
    inner = unwrap_model(model)
    params = [p for p in inner.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(inner).__name__} has no trainable parameters to probe")
    a = np.empty(len(group_batches), dtype=np.float64)
    with forked_rng(), torch.enable_grad():
        target = _flat_grad(inner, params, target_batch, device, precision_context)
        target_norm = float(torch.linalg.vector_norm(target.double()))
        for i, batch in enumerate(group_batches):
            grad = _flat_grad(inner, params, batch, device, precision_context)
            a[i] = alignment([grad], target)[0]
            if normalize:
                scale = float(torch.linalg.vector_norm(grad.double())) * target_norm
                a[i] = a[i] / scale if scale > 0 else 0.0
            del grad
    return a


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
        if state.fsdp_enabled or any(
            type(p).__name__ == "DTensor" for p in state.model.parameters()
        ):
            raise ValueError(
                "DGA takes whole per-group gradients on the unwrapped model; FSDP-sharded "
                "models are not supported (train with DDP or on a single device)"
            )
        dataset = self.mixing_dataset
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
                weights = self.normalize(self.initial_weights)
                self.set_weights(weights, step, logger, effective_step=step)
        if fresh or self.alpha is None:  # after a resume alpha is the checkpointed one
            self.alpha = self._weights_at(step).copy()
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
        self.record("dga", step, logger, alignment=a, update=self.updates)
        logger.log_metrics(
            {f"mixture/dga_alignment/{g}": float(v) for g, v in self._named(a).items()},
            step=step,
        )
        effective = self.set_weights(alpha, step, logger)
        # Rank 0's weights (set_weights broadcasts them), so every rank continues from them.
        self.alpha = self._weights_at(effective).copy()

    def probe(self, state: State, step: int) -> np.ndarray:
        """The alignment of every group with the target at ``step`` (see module doc)."""
        assert self._pool is not None and self._target_pool is not None
        seed = self.mixing_dataset.seed
        batches = [
            draw_probe(self._pool, g, self.probe_batch_size, seed, step)
            for g in range(self.num_groups)
        ]
        target = draw_probe(self._target_pool, 0, self.probe_batch_size, seed, step, _TARGET)
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
