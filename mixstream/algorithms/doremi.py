"""DoReMi's pure update rule (Xie et al. 2023, "DoReMi", Algorithm 1).

Per step, with a proxy model being trained and a fixed reference model:

* per-group excess loss ``lambda_i = mean over group i's tokens of max(l_proxy - l_ref, 0)``
  (clip each token, then average: a group whose tokens are mostly learnt but a few are far
  behind still gets a positive score, which clipping the mean would hide);
* ``alpha ∝ alpha_prev exp(eta * lambda)``, then ``alpha = (1 - c) alpha + c / k``;
* the output mixture is the time average of the ``alpha`` of every step.

LMO view (Aioli, Sec. 4): DoReMi is the linear dynamic law with ``A^t = diag(lambda^t)``; the
column sums of a diagonal matrix are its diagonal, so the EG step of ``lmo`` with
``grad = lambda`` and ``smoothing = c`` *is* DoReMi's step. The smoothed ``alpha`` is what is
fed into the next step (as in Algorithm 1 and sangmichaelxie/doremi).

Groups absent from a batch keep their previous score (as the official code does), so their
weight keeps moving rather than collapsing toward those that happen to be present.

Token losses may be numpy arrays or torch tensors (any device); the per-group reduction is
deterministic (a masked sum per group: no atomics) and only ``k`` numbers leave the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .lmo import (
    as_finite_array,
    check_fraction,
    check_positive,
    exponentiated_gradient_log_step,
    is_tensor,
)

__all__ = ["DoReMiState", "doremi_update", "excess_loss"]


def _broadcast_ids(group_ids: Any, shape: tuple[int, ...], xp: Any) -> Any:
    """Per-sequence ids ``(B,)`` for ``(B, T)`` losses become per-token ids."""
    if tuple(group_ids.shape) == shape:
        return group_ids
    if len(shape) >= 2 and group_ids.ndim == 1 and group_ids.shape[0] == shape[0]:
        view = group_ids.reshape((shape[0],) + (1,) * (len(shape) - 1))
        return xp.broadcast_to(view, shape)
    raise ValueError(
        f"group_ids has shape {tuple(group_ids.shape)}; expected the loss shape {shape} "
        f"or one id per sequence ({shape[0] if shape else '?'},)"
    )


def excess_loss(
    proxy_token_loss: Any,
    ref_token_loss: Any,
    group_ids: Any,
    num_groups: int,
    previous: Any | None = None,
    token_mask: Any | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-group clipped excess loss ``lambda`` and the mask of groups present in the batch.

    ``proxy_token_loss``/``ref_token_loss``: per-token losses, same shape (e.g. ``(B, T)``).
    ``group_ids``: one id per token (same shape) or per sequence (``(B,)``).
    ``token_mask``: optional bool, True for tokens that count (padding/ignored = False).
    ``previous``: the last scores (default 0), used for groups with no counted token.
    Returns float64 numpy arrays ``(lambda, present)`` of length ``num_groups``.
    """
    k = int(num_groups)
    if k < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    prev = np.zeros(k) if previous is None else as_finite_array("previous", previous, ndim=1)
    if prev.size != k:
        raise ValueError(f"previous has {prev.size} scores for {k} groups")
    tensors = [x for x in (proxy_token_loss, ref_token_loss, group_ids, token_mask) if is_tensor(x)]
    if tensors:
        sums, counts = _group_sums_torch(proxy_token_loss, ref_token_loss, group_ids, k, token_mask)
    else:
        sums, counts = _group_sums_numpy(proxy_token_loss, ref_token_loss, group_ids, k, token_mask)
    present = counts > 0
    scores = np.where(present, sums / np.maximum(counts, 1), prev)
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise ValueError(f"excess loss is not finite for group(s) {bad.tolist()} (NaN/inf loss)")
    return scores, present


def _check_ids_range(lo: int, hi: int, k: int) -> None:
    if lo < 0 or hi >= k:
        raise ValueError(f"group ids must be in [0, {k}), got values in [{lo}, {hi}]")


def _group_sums_numpy(
    proxy: Any, ref: Any, group_ids: Any, k: int, token_mask: Any | None
) -> tuple[np.ndarray, np.ndarray]:
    proxy = np.asarray(proxy, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if proxy.shape != ref.shape:
        raise ValueError(f"proxy loss has shape {proxy.shape}, reference loss {ref.shape}")
    ids = np.asarray(group_ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"group_ids must be integers, got dtype {ids.dtype}")
    ids = _broadcast_ids(ids, proxy.shape, np).reshape(-1)
    clipped = np.maximum(proxy - ref, 0.0).reshape(-1)
    if token_mask is not None:
        mask = np.asarray(token_mask, dtype=bool)
        if mask.shape != proxy.shape:
            raise ValueError(f"token_mask has shape {mask.shape}, losses have {proxy.shape}")
        mask = mask.reshape(-1)
        ids, clipped = ids[mask], clipped[mask]
    if ids.size:
        _check_ids_range(int(ids.min()), int(ids.max()), k)
    sums = np.bincount(ids, weights=clipped, minlength=k).astype(np.float64)
    counts = np.bincount(ids, minlength=k).astype(np.float64)
    return sums, counts


def _group_sums_torch(
    proxy: Any, ref: Any, group_ids: Any, k: int, token_mask: Any | None
) -> tuple[np.ndarray, np.ndarray]:
    import torch

    proxy = torch.as_tensor(proxy)
    device = proxy.device
    ref = torch.as_tensor(ref, device=device)
    if proxy.shape != ref.shape:
        raise ValueError(
            f"proxy loss has shape {tuple(proxy.shape)}, reference loss {tuple(ref.shape)}"
        )
    ids = torch.as_tensor(group_ids, device=device)
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be integers, got dtype {ids.dtype}")
    ids = _broadcast_ids(ids, tuple(proxy.shape), torch)
    # float32 at least: bf16 sums over thousands of tokens would lose the signal.
    dtype = torch.promote_types(torch.promote_types(proxy.dtype, ref.dtype), torch.float32)
    clipped = (proxy.to(dtype) - ref.to(dtype)).clamp_min(0.0)
    if token_mask is not None:
        mask = torch.as_tensor(token_mask, device=device).to(torch.bool)
        if mask.shape != proxy.shape:
            raise ValueError(
                f"token_mask has shape {tuple(mask.shape)}, losses have {tuple(proxy.shape)}"
            )
    else:
        mask = torch.ones_like(clipped, dtype=torch.bool)
    if ids.numel():
        lo, hi = torch.aminmax(torch.where(mask, ids, ids.new_zeros(())))
        _check_ids_range(int(lo), int(hi), k)
    # One masked reduction per group: deterministic on every device, unlike bincount/scatter
    # with float weights on CUDA (atomics). k is small, so the k passes are cheap.
    zero = clipped.new_zeros(())
    sums = torch.stack([torch.where(mask & (ids == g), clipped, zero).sum() for g in range(k)])
    counts = torch.stack([(mask & (ids == g)).sum() for g in range(k)])
    return (
        sums.detach().to("cpu", torch.float64).numpy(),
        counts.to("cpu", torch.float64).numpy(),
    )


def doremi_update(
    log_alpha: Any, excess: Any, eta: float = 1.0, smoothing: float = 1e-3
) -> tuple[np.ndarray, np.ndarray]:
    """DoReMi's step: ``(log alpha_new, alpha_new)``.

    ``alpha' = softmax(log_alpha + eta * lambda)``, ``alpha = (1 - c) alpha' + c / k``;
    ``log alpha_new = log(alpha)`` (normalised, finite when ``c > 0``), ready to be passed back.
    """
    log_alpha = np.asarray(log_alpha, dtype=np.float64)
    excess = as_finite_array("excess", excess, ndim=1)
    if np.any(excess < 0):
        raise ValueError(f"excess losses are clipped at 0, got {excess}")
    new_log = exponentiated_gradient_log_step(log_alpha, excess, eta, smoothing)
    alpha = np.exp(new_log)
    return new_log, alpha / alpha.sum()


@dataclass
class DoReMiState:
    """DoReMi's running state as plain values: weights, last scores, the time average.

    ``initial_score`` is the score of a group before it is first seen (official code:
    ``log(vocab_size)``, which makes an unseen group look maximally behind; 0 here = no push).
    """

    num_groups: int
    eta: float = 1.0
    smoothing: float = 1e-3
    initial_score: float = 0.0
    log_alpha: list[float] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    alpha_sum: list[float] = field(default_factory=list)
    num_updates: int = 0

    def __post_init__(self) -> None:
        k = int(self.num_groups)
        if k < 1:
            raise ValueError(f"num_groups must be >= 1, got {self.num_groups}")
        check_positive("eta", self.eta)
        check_fraction("smoothing", self.smoothing)
        if not math.isfinite(self.initial_score) or self.initial_score < 0:
            raise ValueError(f"initial_score must be finite and >= 0, got {self.initial_score}")
        if not self.log_alpha:
            self.log_alpha = [-math.log(k)] * k
        if not self.scores:
            self.scores = [float(self.initial_score)] * k
        if not self.alpha_sum:
            self.alpha_sum = [0.0] * k
        for name in ("log_alpha", "scores", "alpha_sum"):
            if len(getattr(self, name)) != k:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {k} groups")

    @classmethod
    def with_initial_weights(cls, weights: Any, **kwargs: Any) -> DoReMiState:
        """Start from ``weights`` instead of uniform (e.g. the reference model's mixture)."""
        w = as_finite_array("weights", weights, ndim=1)
        if np.any(w <= 0):
            raise ValueError(f"initial weights must be > 0 (log space), got {w}")
        log_alpha = np.log(w / w.sum())
        return cls(num_groups=w.size, log_alpha=[float(x) for x in log_alpha], **kwargs)

    @property
    def weights(self) -> np.ndarray:
        """The current ``alpha_t`` (what the proxy's loss is weighted by)."""
        a = np.exp(np.asarray(self.log_alpha))
        return a / a.sum()

    @property
    def average(self) -> np.ndarray:
        """DoReMi's output: ``mean_t alpha_t`` over the updates so far (Algorithm 1).

        The paper averages the T updated weights; the official code also counts the initial
        weights once. Before any update this is the current weights.
        """
        if self.num_updates == 0:
            return self.weights
        avg = np.asarray(self.alpha_sum) / self.num_updates
        return avg / avg.sum()

    def update_from_excess(self, excess: Any) -> np.ndarray:
        """One step from already reduced per-group scores; returns the new ``alpha``."""
        log_alpha, alpha = doremi_update(self.log_alpha, excess, self.eta, self.smoothing)
        self.scores = [float(x) for x in np.asarray(excess, dtype=np.float64)]
        self.log_alpha = [float(x) for x in log_alpha]
        self.alpha_sum = [float(s + a) for s, a in zip(self.alpha_sum, alpha, strict=True)]
        self.num_updates += 1
        return alpha

    def update(
        self,
        proxy_token_loss: Any,
        ref_token_loss: Any,
        group_ids: Any,
        token_mask: Any | None = None,
    ) -> np.ndarray:
        """One step from token losses; absent groups reuse their last score."""
        excess, _ = excess_loss(
            proxy_token_loss,
            ref_token_loss,
            group_ids,
            self.num_groups,
            previous=self.scores,
            token_mask=token_mask,
        )
        return self.update_from_excess(excess)

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_groups": self.num_groups,
            "eta": self.eta,
            "smoothing": self.smoothing,
            "initial_score": self.initial_score,
            "log_alpha": list(self.log_alpha),
            "scores": list(self.scores),
            "alpha_sum": list(self.alpha_sum),
            "num_updates": self.num_updates,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> DoReMiState:
        return cls(
            num_groups=int(state["num_groups"]),
            eta=float(state["eta"]),
            smoothing=float(state["smoothing"]),
            initial_score=float(state["initial_score"]),
            log_alpha=[float(x) for x in state["log_alpha"]],
            scores=[float(x) for x in state["scores"]],
            alpha_sum=[float(x) for x in state["alpha_sum"]],
            num_updates=int(state["num_updates"]),
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        loaded = DoReMiState.from_state_dict(state)
        self.__dict__.update(loaded.__dict__)
