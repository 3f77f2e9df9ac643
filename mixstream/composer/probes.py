"""Per-group gradient probes that leave training untouched (DGA and DoGE).

A probe takes the gradient of the mean token loss of a small batch per group (and of a
target batch) at the current parameters and reduces them to inner products and norms. It

* takes ``torch.autograd.grad`` on the unwrapped module (not ``.backward``): ``param.grad``,
  the optimizer state and DDP's gradient hooks are never touched;
* keeps the model's (train) mode but forks the RNG, so its dropout draws do not shift the
  training run's;
* draws its sequences with a fresh generator keyed by ``(dataset seed, step, tag, group)``:
  the same on every rank and after a resume, and no RNG state is consumed.

Only two flat gradients are held at a time, so m full-model gradients never need to fit in
memory together.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mixstream.algorithms.dga import alignment, cosine_alignment
from mixstream.mixing.signals import (
    GroupSamples,
    causal_lm_batch,
    forked_rng,
    token_losses,
    unwrap_model,
)

__all__ = [
    "TARGET",
    "TRAIN",
    "ProbeResult",
    "concat_batches",
    "draw_probe",
    "probe_alignment",
    "probe_gradients",
    "require_whole_model",
]

# SeedSequence entropy tags, so a target probe never reuses a training group's draw.
TRAIN, TARGET = 0, 1


def require_whole_model(state: Any, method: str) -> None:
    """Refuse FSDP: a probe takes whole per-group gradients on the unwrapped model."""
    if getattr(state, "fsdp_enabled", False) or any(
        type(p).__name__ == "DTensor" for p in state.model.parameters()
    ):
        raise ValueError(
            f"{method} takes whole per-group gradients on the unwrapped model; FSDP-sharded "
            "models are not supported (train with DDP or on a single device)"
        )


def draw_probe(
    samples: GroupSamples, group: int, size: int, seed: int, step: int, tag: int = TRAIN
) -> dict[str, torch.Tensor]:
    """``size`` distinct sequences of ``group``'s pool, chosen by ``(seed, step, tag, group)``.

    Deterministic and stateless: every rank (and a resumed run) draws the same batch, and no
    global RNG moves.
    """
    pool = samples.samples[group]
    rng = np.random.default_rng([seed % 2**63, int(step), tag, group])
    rows = rng.choice(len(pool), size=min(size, len(pool)), replace=False)
    return {k: torch.stack([pool[i][k] for i in rows]) for k in pool[0]}


def concat_batches(batches: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One batch of the rows of several (e.g. one probe per group: a mixed target set)."""
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def _flat_grad(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    batch: dict[str, torch.Tensor],
    device: Any | None,
    precision_context: Callable[[], Any] | None,
) -> torch.Tensor:
    """Gradient of ``batch``'s mean token loss w.r.t. ``params``, flattened, in float32."""
    batch = causal_lm_batch(batch)
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


@dataclass(frozen=True)
class ProbeResult:
    """``inner[i] = <g_i, g_t>``, ``group_norms[i] = |g_i|`` and ``target_norm = |g_t|``."""

    inner: np.ndarray
    group_norms: np.ndarray
    target_norm: float


def probe_gradients(
    model: torch.nn.Module,
    group_batches: Sequence[dict[str, torch.Tensor]],
    target_batch: dict[str, torch.Tensor],
    *,
    device: Any | None = None,
    precision_context: Callable[[], Any] | None = None,
) -> ProbeResult:
    """Inner products and norms of each group batch's loss gradient and the target's (float64).

    Leaves ``param.grad``, the optimizer, the model's mode and every RNG stream as they were.
    """
    inner_model = unwrap_model(model)
    params = [p for p in inner_model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(inner_model).__name__} has no trainable parameters to probe")
    inner = np.empty(len(group_batches), dtype=np.float64)
    norms = np.empty(len(group_batches), dtype=np.float64)
    with forked_rng(), torch.enable_grad():
        target = _flat_grad(inner_model, params, target_batch, device, precision_context)
        target_norm = float(torch.linalg.vector_norm(target.double()))
        for i, batch in enumerate(group_batches):
            grad = _flat_grad(inner_model, params, batch, device, precision_context)
            inner[i] = alignment([grad], target)[0]
            norms[i] = float(torch.linalg.vector_norm(grad.double()))
            del grad
    return ProbeResult(inner, norms, target_norm)


def probe_alignment(
    model: torch.nn.Module,
    group_batches: Sequence[dict[str, torch.Tensor]],
    target_batch: dict[str, torch.Tensor],
    *,
    normalize: bool = True,
    device: Any | None = None,
    precision_context: Callable[[], Any] | None = None,
) -> np.ndarray:
    """DGA's alignment: cosine when ``normalize`` (0 for a zero gradient), else ``<g_i, g_t>``."""
    result = probe_gradients(
        model, group_batches, target_batch, device=device, precision_context=precision_context
    )
    if not normalize:
        return result.inner
    return cosine_alignment(result.inner, result.group_norms, result.target_norm)
