"""Linear Mixing Optimization (LMO): the core shared by Aioli, DoReMi and DGA.

Aioli (Chen et al. 2024, "Aioli: A Unified Optimization Framework for Language Model Data
Mixing", Sec. 3) shows that many online mixing methods pick proportions ``p`` in the simplex
to minimise the total validation loss ``sum_i L_i`` under a *mixing law*:

* linear dynamic:     ``L_i^{t+1} = L_i^t - sum_j A^t_ij p^t_j``
* log-linear static:  ``L_i(p) = c_i + b_i exp(-sum_j A_ij p_j)``

and then take one exponentiated-gradient (mirror-descent) step on the simplex. Under the
linear dynamic law the gradient of ``-sum_i L_i^{t+1}`` w.r.t. ``p_j`` is the column sum
``sum_i A^t_ij``, so every method's step is::

    p^{t+1}_j  ∝  p^t_j exp(eta * sum_i A^t_ij)

and the methods differ only in how they set ``A^t``: Aioli estimates it from short training
sweeps (``LearnParams``), DoReMi uses ``diag(excess loss)``, DGA uses gradient inner products.

Everything here is numpy in float64 and works in log space: ``exp(eta * grad)`` overflows for
``eta * grad > ~709``, a softmax written as ``x - logsumexp(x)`` never does.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

__all__ = [
    "ema",
    "exponentiated_gradient_log_step",
    "exponentiated_gradient_step",
    "floor_probabilities",
    "linear_dynamic_law",
    "log_linear_static_law",
    "logsumexp",
    "normalize_mixing_matrix",
    "smooth_toward_uniform",
    "solve_mixing_matrix",
]

# A probability vector may be off by rounding; anything further is a caller bug.
SIMPLEX_ATOL = 1e-6
# Condition number above which W is treated as singular: the solve would amplify measurement
# noise in beta by this factor, so the "estimate" would be noise.
MAX_CONDITION = 1e12


# ---------------------------------------------------------------------------------- validation
def check_positive(name: str, value: float) -> float:
    """``value`` as a float, or a ValueError unless it is finite and > 0."""
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def check_fraction(name: str, value: float, *, allow_one: bool = True) -> float:
    """``value`` as a float in ``[0, 1]`` (or ``[0, 1)``), or a ValueError."""
    value = float(value)
    upper_ok = value <= 1 if allow_one else value < 1
    if not (math.isfinite(value) and value >= 0 and upper_ok):
        interval = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return value


def as_finite_array(name: str, x: Any, ndim: int | None = None) -> np.ndarray:
    """``x`` as a float64 array (a copy), or a ValueError on bad shape, type or NaN/inf."""
    try:
        arr = np.array(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numbers, got {x!r}") from None
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite (no NaN/inf), got {arr}")
    return arr


def check_simplex(name: str, p: Any) -> np.ndarray:
    """``p`` as a float64 probability vector, or a ValueError saying how it is not one."""
    arr = as_finite_array(name, p, ndim=1)
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty")
    if np.any(arr < 0):
        raise ValueError(f"{name} must be >= 0 (a point of the simplex), got {arr}")
    total = arr.sum()
    if abs(total - 1.0) > SIMPLEX_ATOL:
        raise ValueError(f"{name} must sum to 1 (a point of the simplex), sums to {total!r}")
    return arr / total


def torch_tensor_type() -> type | None:
    """``torch.Tensor`` if torch is already imported, else None (never imports torch)."""
    torch = sys.modules.get("torch")
    return None if torch is None else torch.Tensor


def is_tensor(x: Any) -> bool:
    tensor = torch_tensor_type()
    return tensor is not None and isinstance(x, tensor)


# ------------------------------------------------------------------------------- the EG step
def logsumexp(x: np.ndarray) -> float:
    """``log(sum(exp(x)))`` without overflow: shift by the max first."""
    top = float(np.max(x))
    if top == -math.inf:
        return -math.inf
    return top + math.log(float(np.sum(np.exp(x - top))))


def exponentiated_gradient_log_step(
    log_p: Any, grad: Any, eta: float, smoothing: float = 0.0
) -> np.ndarray:
    """One EG step on log-weights: returns normalised ``log p^{t+1}``.

    ``log_p`` may be unnormalised (any finite vector, or -inf for a zero weight). The result is
    ``log((1 - smoothing) softmax(log_p + eta * grad) + smoothing / m)``, computed with
    ``logaddexp`` so it stays finite (when ``smoothing > 0``) even for ``eta * grad ~ 1e6``.
    """
    eta = check_positive("eta", eta)
    smoothing = check_fraction("smoothing", smoothing)
    log_p = np.array(log_p, dtype=np.float64)
    if log_p.ndim != 1 or log_p.size == 0:
        raise ValueError(f"log_p must be a non-empty vector, got shape {log_p.shape}")
    if np.any(np.isnan(log_p)) or np.any(log_p == math.inf):
        raise ValueError(f"log_p must not hold NaN or +inf, got {log_p}")
    grad = as_finite_array("grad", grad, ndim=1)
    if grad.shape != log_p.shape:
        raise ValueError(f"grad has shape {grad.shape}, weights have shape {log_p.shape}")
    with np.errstate(invalid="ignore", over="ignore"):  # overflow is reported just below
        z = log_p + eta * grad
    z[log_p == -math.inf] = -math.inf  # a zero weight stays zero, even against an inf step
    if not np.all(np.isfinite(z[np.isfinite(log_p)])):
        raise ValueError(f"eta * grad overflows float64 (eta={eta}, max |grad|={abs(grad).max()})")
    if not np.any(np.isfinite(z)):
        raise ValueError("all weights are zero; the EG step needs at least one positive weight")
    log_q = z - logsumexp(z)
    if smoothing == 0.0:
        return log_q
    m = log_q.size
    with np.errstate(divide="ignore"):  # log(0) = -inf is the right answer for smoothing=1
        return np.logaddexp(np.log1p(-smoothing) + log_q, math.log(smoothing / m))


def exponentiated_gradient_step(
    p: Any, grad: Any, eta: float, smoothing: float = 0.0
) -> np.ndarray:
    """LMO's update ``p^{t+1}_j ∝ p^t_j exp(eta * grad_j)``, then mix ``smoothing`` of uniform.

    ``grad`` is the LMO gradient ``sum_i A_ij`` (column sums of the mixing matrix). ``p`` must
    be a point of the simplex (a zero stays zero unless ``smoothing > 0``). Done in log space,
    so huge ``eta * grad`` gives a (near) one-hot vector, never an overflow or NaN.
    """
    p = check_simplex("p", p)
    with np.errstate(divide="ignore"):
        log_p = np.log(p)
    out = np.exp(exponentiated_gradient_log_step(log_p, grad, eta, smoothing))
    return out / out.sum()  # remove the last ulp of drift so callers can rely on sum == 1


def smooth_toward_uniform(p: Any, smoothing: float) -> np.ndarray:
    """``(1 - c) p + c / m``: keeps every weight >= c/m (DoReMi's ``c``; exploration floor)."""
    p = check_simplex("p", p)
    smoothing = check_fraction("smoothing", smoothing)
    return (1.0 - smoothing) * p + smoothing / p.size


def floor_probabilities(p: Any, floor: float) -> np.ndarray:
    """``max(p, floor)`` renormalised: an exploration floor that leaves larger weights' ratios.

    Unlike :func:`smooth_toward_uniform`, weights above ``floor`` keep their ratios exactly;
    only the ones below are raised (ADO's ``delta_min``, Jiang et al. 2024). After the
    renormalisation a floored weight is ``floor / sum(max(p, floor))``, a little under
    ``floor`` when some weights were raised. ``floor`` must leave room: ``floor * m <= 1``.
    """
    p = check_simplex("p", p)
    floor = check_fraction("floor", floor)
    if floor * p.size > 1 + SIMPLEX_ATOL:
        raise ValueError(
            f"floor={floor} is more than 1/m = {1 / p.size:.4g}: {p.size} weights of at least "
            "floor cannot sum to 1"
        )
    out = np.maximum(p, floor)
    return out / out.sum()


def ema(prev: Any | None, new: Any, decay: float) -> np.ndarray:
    """Exponential moving average ``decay * prev + (1 - decay) * new``.

    ``decay`` is the weight on the *previous* value (Aioli's ``--ema``; 0 = no smoothing).
    ``prev=None`` (the first observation) returns ``new``, as the reference code does, instead
    of biasing toward zero.
    """
    decay = check_fraction("decay", decay)
    new = as_finite_array("new", new)
    if prev is None:
        return new
    prev = as_finite_array("prev", prev)
    if prev.shape != new.shape:
        raise ValueError(f"ema: prev has shape {prev.shape}, new has shape {new.shape}")
    return decay * prev + (1.0 - decay) * new


# --------------------------------------------------------------------------------- the laws
def _check_law_inputs(A: Any, p: Any) -> tuple[np.ndarray, np.ndarray]:
    A = as_finite_array("A", A, ndim=2)
    p = check_simplex("p", p)
    if A.shape[1] != p.size:
        raise ValueError(f"A has shape {A.shape}; it needs {p.size} columns, one per group")
    return A, p


def linear_dynamic_law(losses: Any, A: Any, p: Any) -> np.ndarray:
    """Aioli's linear dynamic mixing law: ``L^{t+1} = L^t - A^t p^t``.

    ``A`` is ``(n_eval, m)``: row i is how much one round on each training group lowers
    validation loss i (a round's worth of steps is folded into ``A``).
    """
    losses = as_finite_array("losses", losses, ndim=1)
    A, p = _check_law_inputs(A, p)
    if A.shape[0] != losses.size:
        raise ValueError(f"A has shape {A.shape}; it needs {losses.size} rows, one per loss")
    return losses - A @ p


def log_linear_static_law(c: Any, b: Any, A: Any, p: Any) -> np.ndarray:
    """Aioli's log-linear static mixing law: ``L_i(p) = c_i + b_i exp(-sum_j A_ij p_j)``.

    Static: it predicts the loss at the end of training on the fixed mixture ``p``.
    """
    c = as_finite_array("c", c, ndim=1)
    b = as_finite_array("b", b, ndim=1)
    A, p = _check_law_inputs(A, p)
    if not (c.size == b.size == A.shape[0]):
        raise ValueError(f"c ({c.size}), b ({b.size}) and A's rows ({A.shape[0]}) must match")
    return c + b * np.exp(-(A @ p))


# ------------------------------------------------------------------- estimating/normalising A
def solve_mixing_matrix(W: Any, beta: Any) -> np.ndarray:
    """``A`` from sweep measurements: solves ``beta_i = W A_i`` for every row i.

    Sweep j trains on mixture ``W[j]``; under the linear dynamic law the drop of loss i over
    that sweep is ``beta[i, j] = sum_k A[i, k] W[j, k]``, i.e. ``beta = A W^T``. Each row of A
    is one linear solve against W (Aioli, LearnParams with smoothed one-hot mixtures).
    """
    W = as_finite_array("W", W, ndim=2)
    beta = as_finite_array("beta", beta, ndim=2)
    m = W.shape[0]
    if W.shape != (m, m):
        raise ValueError(f"W must be square (one sweep mixture per group), got shape {W.shape}")
    if beta.shape[1] != m:
        raise ValueError(f"beta has shape {beta.shape}; it needs {m} columns, one per sweep")
    cond = np.linalg.cond(W)
    if not (math.isfinite(cond) and cond < MAX_CONDITION):
        raise ValueError(
            f"W is singular (condition number {cond:.3g}): the sweep mixtures are not linearly "
            "independent, so A cannot be recovered from beta"
        )
    return np.linalg.solve(W, beta.T).T


def normalize_mixing_matrix(A: Any) -> np.ndarray:
    """Aioli's normalisation of ``A^t`` before the EG step (reference: ``aioli_normalize_A``).

    If any entry is negative, shift every entry up by ``-min(A)``; then divide by the sum of
    all entries, so ``A >= 0`` and ``sum(A) = 1``. Why: raw A scales with the learning rate,
    ``lp_steps`` and the loss scale, so without it ``eta`` would mean something different at
    every step of training. The uniform shift adds the same amount to every column sum, so it
    changes nothing but the scale (the softmax is shift invariant). An all-zero result (A was
    constant) has no preference: it is returned as zeros, which leaves p unchanged.
    """
    A = as_finite_array("A", A, ndim=2)
    low = A.min()
    if low < 0:
        A = A - low
    total = A.sum()
    if total <= 0:
        return np.zeros_like(A)
    return A / total
