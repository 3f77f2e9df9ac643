"""DoGE's pure update rule (Fan, Pagliardini, Jaggi 2023, "DoGE: Domain Reweighting with
Generalization Estimation", arXiv 2310.15393).

A proxy model is trained while the domain weights ``w`` follow how well each group's
training gradient ``g_j`` aligns with the gradient ``g_t`` of the generalization (target)
loss, at the current learning rate ``lr``::

    g~ = g * min(1, c / |g|)                       (each gradient clipped to norm c)
    score_j = lr <g~_j, g~_t> / (mean_k |g~_k| + 1e-6)
    score_j = clip(score_j, lr * dw_min, lr * dw_max)
    log w  += score / mu ;  w = softmax(log w) ;  w = (1 - eps) w + eps / m

and the output is the time average of ``w`` over the updates, which the main run trains on
(``StaticMixture(weights_file=..., use="average")``), as in DoReMi.

Sources: the formulas follow the authors' code, Olivia-fsm/DoGE (``src/trainer.py``,
``DoGETrainer.update_domain_weights``: defaults ``mu=0.05``, ``dw_min=0``, ``dw_max=5``,
``reweight_eps=0``, ``max_grad_norm`` clipping of every per-domain gradient), and its
reimplementation in HazyResearch/aioli (``trainer/doge_trainer.py``), whose target is a batch
of the validation sets of all groups (``g_t`` = gradient of its mean loss). The norms enter
the rule as numbers, so the clipping is applied here, to the inner products and norms a
probe measured, rather than to the gradients themselves: ``<g~_j, g~_t>`` is
``<g_j, g_t> * s_j * s_t`` with ``s = min(1, c / |g|)``.

LMO view (Aioli, Sec. 4): ``A^t`` is ``1 x m`` with ``A_1j = score_j`` and the step is the
core's EG step with ``eta = 1 / mu`` (``lmo.exponentiated_gradient_step``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .lmo import (
    as_finite_array,
    check_fraction,
    check_positive,
    check_simplex,
    exponentiated_gradient_step,
)

__all__ = ["DoGEState", "doge_scores", "doge_update"]

NORM_EPS = 1e-6  # the reference's guard in the mean-norm normalisation


def doge_scores(
    inner: Any,
    group_norms: Any,
    target_norm: float,
    lr: float,
    *,
    max_grad_norm: float | None = 1.0,
    dw_min: float = 0.0,
    dw_max: float = 5.0,
) -> np.ndarray:
    """DoGE's per-group scores from raw ``<g_j, g_t>``, ``|g_j|`` and ``|g_t|`` (module doc).

    ``max_grad_norm=None`` skips the gradient clipping.
    """
    inner = as_finite_array("inner", inner, ndim=1)
    norms = as_finite_array("group_norms", group_norms, ndim=1)
    if norms.shape != inner.shape:
        raise ValueError(f"{norms.size} gradient norms for {inner.size} inner products")
    if np.any(norms < 0) or not (np.isfinite(target_norm) and target_norm >= 0):
        raise ValueError("gradient norms must be finite and >= 0")
    lr = check_positive("lr", lr)
    if not (np.isfinite(dw_min) and np.isfinite(dw_max) and dw_min <= dw_max):
        raise ValueError(f"need finite dw_min <= dw_max, got dw_min={dw_min}, dw_max={dw_max}")
    if max_grad_norm is not None:
        c = check_positive("max_grad_norm", max_grad_norm)
        scale = np.minimum(1.0, c / np.maximum(norms, 1e-300))
        scale_t = min(1.0, c / max(float(target_norm), 1e-300))
        inner = inner * scale * scale_t
        norms = norms * scale
    scores = lr * inner / (norms.mean() + NORM_EPS)
    return np.clip(scores, lr * dw_min, lr * dw_max)


def doge_update(weights: Any, scores: Any, mu: float, smoothing: float = 0.0) -> np.ndarray:
    """``softmax(log w + score / mu)``, then ``smoothing`` of uniform mixed in."""
    mu = check_positive("mu", mu)
    return exponentiated_gradient_step(weights, scores, 1.0 / mu, smoothing)


@dataclass
class DoGEState:
    """The weights, their running sum over updates (for the average) and the update count."""

    weights: list[float]
    weight_sum: list[float] = field(default_factory=list)
    updates: int = 0

    @classmethod
    def initial(cls, weights: Any) -> DoGEState:
        w = check_simplex("initial weights", weights)
        return cls(weights=[float(x) for x in w], weight_sum=[0.0] * w.size)

    @property
    def num_groups(self) -> int:
        return len(self.weights)

    @property
    def average(self) -> np.ndarray:
        """DoGE's output: the mean of the weights after every update (the start if none)."""
        if self.updates == 0:
            return np.asarray(self.weights)
        avg = np.asarray(self.weight_sum) / self.updates
        return avg / avg.sum()

    def update(self, scores: Any, mu: float, smoothing: float = 0.0) -> np.ndarray:
        smoothing = check_fraction("smoothing", smoothing, allow_one=False)
        w = doge_update(self.weights, scores, mu, smoothing)
        self.weights = [float(x) for x in w]
        self.weight_sum = [float(s + x) for s, x in zip(self.weight_sum, w, strict=True)]
        self.updates += 1
        return w

    def state_dict(self) -> dict[str, Any]:
        return {
            "weights": list(self.weights),
            "weight_sum": list(self.weight_sum),
            "updates": self.updates,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> DoGEState:
        return cls(
            weights=[float(x) for x in state["weights"]],
            weight_sum=[float(x) for x in state["weight_sum"]],
            updates=int(state["updates"]),
        )
