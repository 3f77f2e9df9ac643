"""ODM's pure update rule (Albalak, Pan, Raffel, Wang 2023, "Efficient Online Data Mixing For
Language Model Pre-Training", arXiv 2312.02406): an EXP3 bandit whose arms are the groups.

The paper could not be read from here; every formula below follows the authors' code,
alon-albalak/online-data-mixing (``megatron/data/data_sampling_utils.py``,
``Exp3WeightUpdater.group_update``, as called by ``train_mixed_minibatch`` in
``megatron/training.py`` with ``scripts/train_1B_exp3_mixed_minibatches.sh``). Each step
``t`` (global batches done), for the K groups:

* exploration rate ``eps_t = min(1/K, sqrt(ln K / (K t)))`` (``eps_0 = 1/K``);
* reward of group i = its mean training loss on the batch just trained, scaled
  (``reward_scale``; the reference divides by 10 "so that the cumulative reward doesn't
  explode"), importance-weighted by the probability ``pi_i`` the batch was drawn with, and
  accumulated: ``R_i += reward_scale * L_i / pi_i`` for every group present in the batch
  (absent groups are unchanged);
* policy ``pi_i = (1 - K eps_t) exp(eps_{t-1} R_i) / sum_j exp(eps_{t-1} R_j) + eps_t``: a
  Gibbs distribution over the cumulative rewards with the previous step's rate as its
  temperature, mixed with the exploration floor ``eps_t`` (the "exploration smoothing").

High training loss is rewarded: ODM samples what the model has not learnt yet. No
validation pass is needed, only the training forward pass's per-group losses.

LMO view (Aioli, Sec. 4): the policy is one EG step from the *uniform* mixture with
gradient ``R`` (the cumulative importance-weighted losses), step size ``eta = eps_{t-1}`` and
smoothing ``c = K eps_t`` (``(1 - c) q + c / K = (1 - K eps_t) q + eps_t``), which is how it
is computed here (``lmo.exponentiated_gradient_step``, in log space: the reference
exponentiates ``eps R`` directly, hence its reward scaling).

Choices (ours):

* ``pi_i`` is the weight the dataset actually used for the batch (with a data-loader
  update lag, the policy set ``lag`` batches before), not the latest policy: that is the
  probability the importance weight must divide by.
* With mixed batches (as in the reference's final setting) a group with a fair weight is in
  nearly every batch, so ``R_i`` grows like ``sum_t L_i / pi_i`` rather than an unbiased
  ``sum_t L_i``; the Gibbs policy is then stable where ``L_i / pi_i`` is the same for every
  group, i.e. it drifts toward ``pi ∝ L`` (sampling in proportion to training loss). This is
  the published update, kept as it is.
* Before ``warmup_steps`` nothing is learnt and the starting mixture is sampled (the
  reference warms up for 2000 of 100k steps, ``requires_update: iteration > warmup``);
  rewards are learnt, and the policy updated, at every step after it.
* ``t`` is the global step, so ``eps`` keeps decaying through the warm-up (as in the
  reference, whose first update after 2000 warm-up steps uses ``t = 2001``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .lmo import as_finite_array, check_positive, check_simplex, exponentiated_gradient_step

__all__ = ["ODMConfig", "ODMState", "exploration_rate", "odm_policy", "odm_rewards", "odm_update"]


def exploration_rate(num_groups: int, step: int) -> float:
    """``eps_t = min(1/K, sqrt(ln K / (K t)))``; ``eps_0 = 1/K``."""
    k = _check_int("num_groups", num_groups, 2)
    t = _check_int("step", step, 0)
    if t == 0:
        return 1.0 / k
    return min(1.0 / k, math.sqrt(math.log(k) / (k * t)))


def odm_rewards(rewards: Any, losses: Any, probabilities: Any, reward_scale: float) -> np.ndarray:
    """``R_i + reward_scale * L_i / pi_i`` for the groups with a (finite) loss in the batch.

    ``losses``: mean training loss per group, NaN for a group absent from the batch.
    ``probabilities``: the mixture the batch was drawn with.
    """
    R = as_finite_array("rewards", rewards, ndim=1)
    losses = np.array(losses, dtype=np.float64)
    pi = check_simplex("probabilities", probabilities)
    scale = check_positive("reward_scale", reward_scale)
    if not (losses.shape == pi.shape == R.shape):
        raise ValueError(
            f"rewards {R.shape}, losses {losses.shape} and probabilities {pi.shape} must have "
            "one entry per group"
        )
    if np.any(np.isinf(losses)):
        raise ValueError(f"losses must be finite or NaN (absent group), got {losses}")
    present = ~np.isnan(losses)
    if np.any(pi[present] <= 0):
        bad = np.flatnonzero(present & (pi <= 0)).tolist()
        raise ValueError(f"group(s) {bad} have a loss but were drawn with probability 0")
    out = R.copy()
    out[present] += scale * losses[present] / pi[present]
    return out


def odm_policy(rewards: Any, eps_prev: float, eps: float) -> np.ndarray:
    """``(1 - K eps) softmax(eps_prev * R) + eps``: one EG step from uniform (module doc)."""
    R = as_finite_array("rewards", rewards, ndim=1)
    k = R.size
    eps_prev = check_positive("eps_prev", eps_prev)
    eps = check_positive("eps", eps)
    if eps * k > 1 + 1e-12:
        raise ValueError(f"eps={eps} is more than 1/K = {1 / k:.4g}")
    return exponentiated_gradient_step(np.full(k, 1.0 / k), R, eps_prev, min(1.0, k * eps))


@dataclass(frozen=True)
class ODMConfig:
    """ODM's settings (module doc); the defaults are the reference's.

    ``reward_scale``: rewards are ``reward_scale * loss`` (the reference: loss / 10).
    ``warmup_steps``: global batches on the starting mixture before the bandit learns.
    """

    num_groups: int
    reward_scale: float = 0.1
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        _check_int("num_groups", self.num_groups, 2)
        check_positive("reward_scale", self.reward_scale)
        _check_int("warmup_steps", self.warmup_steps, 0)

    def learns_at(self, step: int) -> bool:
        """Whether the batch that ends at ``step`` (batches done) is learnt from."""
        return step > self.warmup_steps


@dataclass
class ODMState:
    """The bandit: cumulative estimated rewards, the last ``eps``, the number of updates."""

    rewards: list[float]
    eps: float
    updates: int = 0
    weights: list[float] | None = field(default=None)

    @classmethod
    def initial(cls, config: ODMConfig) -> ODMState:
        return cls(rewards=[0.0] * config.num_groups, eps=1.0 / config.num_groups)

    def update(self, config: ODMConfig, step: int, losses: Any, probabilities: Any) -> np.ndarray:
        """Learn from the batch that ends at ``step`` and return the next policy.

        ``losses``/``probabilities``: per-group mean training loss of the batch (NaN if
        absent) and the mixture it was drawn with.
        """
        if len(self.rewards) != config.num_groups:
            raise ValueError(
                f"ODM state has {len(self.rewards)} groups, the config {config.num_groups}"
            )
        eps = exploration_rate(config.num_groups, step)
        R = odm_rewards(self.rewards, losses, probabilities, config.reward_scale)
        policy = odm_policy(R, self.eps, eps)
        self.rewards = [float(x) for x in R]
        self.eps = eps
        self.updates += 1
        self.weights = [float(x) for x in policy]
        return policy

    def state_dict(self) -> dict[str, Any]:
        return {
            "rewards": list(self.rewards),
            "eps": self.eps,
            "updates": self.updates,
            "weights": None if self.weights is None else list(self.weights),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ODMState:
        weights = state.get("weights")
        return cls(
            rewards=[float(x) for x in state["rewards"]],
            eps=float(state["eps"]),
            updates=int(state.get("updates", 0)),
            weights=None if weights is None else [float(x) for x in weights],
        )


def odm_update(
    config: ODMConfig, state: ODMState, step: int, losses: Any, probabilities: Any
) -> np.ndarray:
    """One ODM step (``state`` is updated in place): see :meth:`ODMState.update`."""
    return state.update(config, step, losses, probabilities)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)
