"""``ODMMixer``: Online Data Mixing (Albalak et al. 2023), in any training loop.

An EXP3 bandit over the groups (the rule is :mod:`mixstream.algorithms.odm`): after every
batch, each group present in it is rewarded with its training loss on that batch, divided
by the weight the batch was drawn with, and the next mixture is the bandit's policy. The
losses are those the loop observed from the training forward pass itself
(:meth:`~mixstream.mixing.base.Mixer.step_train_losses`: summed over every microbatch,
all-reduced across ranks), so ODM costs no extra forward, backward or validation pass.

Every rank computes the same policy from the same reduced losses, and ``set_weights``
broadcasts rank 0's anyway. The bandit (cumulative rewards, the last exploration rate) is
in the state, so a resumed run makes exactly the decisions of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mixstream.algorithms.odm import ODMConfig, ODMState
from mixstream.dataset import DynamicStreamingDataset
from mixstream.mixing.base import Mixer
from mixstream.weights import normalize_weights

__all__ = ["ODMMixer"]


class ODMMixer(Mixer):
    """Sample the groups an EXP3 bandit picks, rewarded by their training loss (ODM).

    Args:
        dataset: see :class:`~mixstream.mixing.base.Mixer`.
        reward_scale: rewards are ``reward_scale * loss / weight`` (the reference: loss / 10).
            With the exploration rate ``eps_t ~ sqrt(ln K / (K t))`` as the Gibbs policy's
            temperature it sets how fast the mixture follows the losses.
        warmup_steps: batches on the starting mixture before the bandit learns (the
            reference: 2000 of 100k).
        initial_weights: the starting mixture (default: the dataset's weights at the start).
        **kwargs: see :class:`~mixstream.mixing.base.Mixer`.
    """

    kind = "odm"

    def __init__(
        self,
        dataset: DynamicStreamingDataset | None = None,
        *,
        reward_scale: float = 0.1,
        warmup_steps: int = 0,
        initial_weights: Mapping[str, float] | Sequence[float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, **kwargs)
        self.settings = {"reward_scale": reward_scale, "warmup_steps": warmup_steps}
        self.initial_weights = initial_weights
        self.config: ODMConfig | None = None
        self.bandit: ODMState | None = None
        self._loaded: dict[str, Any] | None = None
        self.make_config(len(self.groups) if self.groups else 2)  # bad settings fail now
        if self.groups is not None and initial_weights is not None:
            normalize_weights(initial_weights, self.groups)

    def make_config(self, num_groups: int) -> ODMConfig:
        try:
            return ODMConfig(num_groups=num_groups, **self.settings)
        except ValueError as exc:
            raise ValueError(f"ODM {exc}") from None

    def setup(self, fresh: bool) -> None:
        self.config = self.make_config(self.num_groups)
        if self._loaded is not None and not fresh:
            self.bandit = ODMState.from_state_dict(self._loaded)
            if len(self.bandit.rewards) != self.num_groups:
                raise ValueError(
                    f"the checkpointed ODM state has {len(self.bandit.rewards)} groups, the "
                    f"dataset {self.num_groups} ({', '.join(self.groups or [])}); resume with "
                    "the same groups"
                )
        else:
            self.bandit = ODMState.initial(self.config)
            if self.initial_weights is not None:
                step = self.steps_done
                self.set_weights(self.normalize(self.initial_weights), step, effective_step=step)

    def update(self, step: int) -> None:
        assert self.config is not None and self.bandit is not None
        if not self.config.learns_at(step):
            return
        losses, tokens = self.step_train_losses()  # collective, every rank
        drawn = self.weights_at(step - 1)  # the weights batch step-1 was drawn with
        policy = self.bandit.update(self.config, step, losses, drawn)
        rewards = np.asarray(self.bandit.rewards)
        self.record("odm", step, rewards=rewards, train_loss=losses, tokens=tokens,
                    drawn=drawn, eps=self.bandit.eps, update=self.bandit.updates)  # fmt: skip
        self.log({f"mixture/odm_reward/{g}": v for g, v in self.named(rewards).items()}, step)
        effective = self.set_weights(policy, step)
        # Rank 0's policy (set_weights broadcasts it): every rank continues from it.
        self.bandit.weights = [float(x) for x in self.weights_at(effective)]

    def summary(self, step: int) -> dict[str, Any]:
        if self.config is None or self.bandit is None:
            return {}
        config = dataclasses.asdict(self.config)
        return {"odm": {"config": config, "updates": self.bandit.updates}}

    def method_state(self) -> dict[str, Any]:
        return {} if self.bandit is None else self.bandit.state_dict()

    def load_method_state(self, state: dict[str, Any]) -> None:
        self._loaded = dict(state) if state else None
