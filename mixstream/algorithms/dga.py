"""DGA's pure update rule (Fan, Grangier, Ablin 2024, "Dynamic Gradient Alignment for Online
Data Mixing", arXiv 2410.02498).

Every ``T_r`` steps, with per-group gradients ``g_i`` (each on a batch of group i) and the
gradient ``g_t`` of the target (specific) loss at the current parameters:

* alignment ``a_i = <g_i, g_t>``;
* ``alpha_hat ∝ alpha * exp(eta * a)`` (a mirror-descent / EG step on the simplex);
* ``alpha_new = beta * alpha + (1 - beta) * alpha_hat`` (``ema_decay = beta``; 0 = plain DGA).

**Convention (ours).** The paper's Algorithm 1 could not be consulted here, so this is the
form we chose, not a transcription of it:

* the EMA is on the *weights*, and ``beta`` is the weight on the *previous* weights (as in
  ``lmo.ema`` and Aioli's ``--ema``): ``beta -> 1`` is slow and stable, ``beta = 0`` is the
  plain mirror-descent step. The smoothed ``alpha`` is both what is sampled and where the
  next step starts, so one vector on the simplex is the whole state. Why smooth at all:
  per-step alignments are noisy, and a group aligns best right before it is overfit.
* scores are the raw inner products, with the learning rate folded into ``eta``. DoGE (Fan
  et al. 2023), DGA's predecessor, scales them by ``lr / mean gradient norm``; we do not
  (the Composer ``DGA`` instead offers cosine alignment, ``normalize=True``, so that ``eta``
  is scale-free).

**Sign.** One SGD step on the mixture, ``theta' = theta - lr sum_i alpha_i g_i``, changes the
target loss by ``-lr sum_i alpha_i <g_i, g_t>`` to first order, so descent on the simplex is
``alpha * exp(+eta a)``: groups whose gradient points the same way as the target's are
*upweighted* (as in DoGE and in HazyResearch/aioli's reimplementation, ``log w += score / mu``).

LMO view (Aioli, Sec. 4): with a single target, ``A^t`` is ``1 x m`` with ``A_1j = <g_t, g_j>``;
with several target groups ``A_ij = <g_t_i, g_j>`` and the column sum is the alignment with
the summed target gradient, which is what a 2-D ``target_grad`` gives here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .lmo import (
    as_finite_array,
    check_fraction,
    check_simplex,
    exponentiated_gradient_step,
    is_tensor,
)

__all__ = ["alignment", "cosine_alignment", "dga_update"]


def _flat_float(x: Any) -> Any:
    """A 1-D view of one gradient, upcast from half precision (a bf16 dot loses the signal)."""
    if is_tensor(x):
        import torch

        x = x.detach().reshape(-1)
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _dot(a: Any, b: Any) -> float:
    if is_tensor(a) or is_tensor(b):
        import torch

        a = torch.as_tensor(a)
        b = torch.as_tensor(b, device=a.device)
        dtype = torch.promote_types(a.dtype, b.dtype)
        return float(torch.dot(a.to(dtype), b.to(dtype)))
    return float(np.dot(a, b))


def alignment(group_grads: Any, target_grad: Any) -> np.ndarray:
    """``a_i = <g_i, g_t>`` for every group, as float64 numpy.

    ``group_grads``: an ``(m, d)`` array/tensor, or a sequence of m gradients of any shape
    (each is flattened; e.g. the concatenated ``p.grad`` of a model). ``target_grad``: ``(d,)``,
    or ``(r, d)`` for r target groups, which are summed (LMO column sums). Gradients are never
    stacked, so m full-model gradients do not need to fit twice in memory.
    """
    grads = [_flat_float(g) for g in group_grads]  # rows of an (m, d) array, or a list
    if not grads:
        raise ValueError("alignment needs at least one group gradient")
    target = target_grad
    ndim = target.dim() if is_tensor(target) else np.ndim(target)
    if ndim == 2:
        target = target.sum(0) if is_tensor(target) else np.asarray(target).sum(axis=0)
    elif ndim != 1:
        raise ValueError(f"target_grad must be (d,) or (r, d), got {ndim} dimensions")
    target = _flat_float(target)
    if is_tensor(grads[0]) and not is_tensor(target):
        import torch  # move the target to the gradients' device once, not once per group

        target = torch.as_tensor(target, device=grads[0].device)
    d = target.shape[0]
    for i, g in enumerate(grads):
        if g.shape[0] != d:
            raise ValueError(f"group {i} gradient has {g.shape[0]} entries, target has {d}")
    a = np.array([_dot(g, target) for g in grads], dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(a))
    if bad.size:
        raise ValueError(f"alignment is not finite for group(s) {bad.tolist()} (NaN/inf grads)")
    return a


def cosine_alignment(inner: Any, group_norms: Any, target_norm: float) -> np.ndarray:
    """``<g_i, g_t> / (|g_i| |g_t|)`` from inner products and norms; 0 for a zero gradient.

    DGA's default (``normalize=True``): cosines make ``eta`` independent of the model's size,
    loss scale and learning rate.
    """
    inner = as_finite_array("inner", inner, ndim=1)
    norms = as_finite_array("group_norms", group_norms, ndim=1)
    if norms.shape != inner.shape:
        raise ValueError(f"{norms.size} gradient norms for {inner.size} inner products")
    scale = norms * float(target_norm)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(scale > 0, inner / np.where(scale > 0, scale, 1.0), 0.0)


def dga_update(alpha: Any, a: Any, eta: float, ema_decay: float = 0.0) -> np.ndarray:
    """DGA's step: ``beta * alpha + (1 - beta) * normalize(alpha * exp(eta * a))``.

    ``beta = ema_decay`` in ``[0, 1)``: the weight on the previous weights (see module doc).
    """
    alpha = check_simplex("alpha", alpha)
    beta = check_fraction("ema_decay", ema_decay, allow_one=False)
    alpha_hat = exponentiated_gradient_step(alpha, a, eta)
    out = beta * alpha + (1.0 - beta) * alpha_hat
    return out / out.sum()
