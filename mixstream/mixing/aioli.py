"""``AioliMixer``: LearnParams sweeps, the A estimate and the EG step, live, in any loop.

The rule is :mod:`mixstream.algorithms.aioli`; this mixer only decides *when*. Because a
round's sweep mixtures depend on ``(config, seed, round)`` alone, the whole LearnParams
schedule of a round is handed to the dataset as soon as the previous round's mixture is
known (and round 0's at :meth:`~mixstream.mixing.base.Mixer.start`, before any batch is
planned). Every sweep therefore
trains exactly on its mixture from its first batch, despite the dataloader's update lag.

Timeline of round r (global batches; ``lag`` = the dataset's update lag)::

    start            sweep ends ...          mix_start       mix_start+lag      next start
      | eval | sweep | eval | sweep | eval ...  | eval+update |  learned p ...   |
                                                   p set here ^ takes effect ^

Between ``mix_start`` and ``mix_start + lag`` the previous round's mixture continues, so no
batch already prefetched is re-planned. Validation losses are all-reduced before use and
``set_weights`` broadcasts rank 0's decision, so every rank follows the same schedule.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mixstream.algorithms import scale
from mixstream.algorithms.aioli import AioliConfig, AioliState
from mixstream.dataset import DynamicStreamingDataset
from mixstream.mixing.base import Mixer
from mixstream.mixing.history import load_weights_file
from mixstream.weights import normalize_weights

__all__ = ["AioliMixer"]

log = logging.getLogger(__name__)

_CONFIG_KEYS = (
    "eta", "update_steps", "lp_rounds", "lp_steps", "one_hot_factor", "ema", "diagonal",
    "normalize", "smoothing",
)  # fmt: skip
_DEFAULT = object()


class AioliMixer(Mixer):
    """Aioli (Chen et al. 2024): estimate the mixing law online and follow it.

    Needs ``evaluate`` (per-group validation losses: before and after every sweep).

    Args:
        dataset: see :class:`~mixstream.mixing.base.Mixer`.
        eta, update_steps, lp_rounds, lp_steps, one_hot_factor, ema, diagonal, normalize,
            smoothing: see :class:`~mixstream.algorithms.aioli.AioliConfig`; any left out
            takes the paper's setting for the number of groups (``AioliConfig.defaults_for``).
            ``ema=None`` turns EMA off.
        prior: starting mixture ({group: weight}, one weight per group, or the path of a
            ``weights.json`` from an earlier run, whose ``average`` is used). With
            ``prior_steps`` > 0 it is trained for that many batches before round 0: the
            paper's "restricted" setting (weights learned on a short run, adjusted by Aioli).
        prior_steps: batches of ``prior`` (uniform if none) before the first round; default
            one round (``update_steps``), which keeps round 0's skewed sweeps out of the
            steepest part of training; 0 is the paper's protocol.
        seed: keys the sweep orders (the same on every rank and after resume); default:
            the dataset's seed.
        **kwargs: see :class:`~mixstream.mixing.base.Mixer`.
    """

    kind = "aioli"

    def __init__(
        self,
        dataset: DynamicStreamingDataset | None = None,
        *,
        eta: float = _DEFAULT,  # type: ignore[assignment]
        update_steps: int = _DEFAULT,  # type: ignore[assignment]
        lp_rounds: int = _DEFAULT,  # type: ignore[assignment]
        lp_steps: int = _DEFAULT,  # type: ignore[assignment]
        one_hot_factor: float = _DEFAULT,  # type: ignore[assignment]
        ema: float | None = _DEFAULT,  # type: ignore[assignment]
        diagonal: bool = _DEFAULT,  # type: ignore[assignment]
        normalize: bool = _DEFAULT,  # type: ignore[assignment]
        smoothing: float = _DEFAULT,  # type: ignore[assignment]
        prior: Mapping[str, float] | Sequence[float] | str | None = None,
        prior_steps: int = _DEFAULT,  # type: ignore[assignment]
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, **kwargs)
        values = dict(zip(_CONFIG_KEYS, (eta, update_steps, lp_rounds, lp_steps,
                                          one_hot_factor, ema, diagonal, normalize, smoothing),
                          strict=True))  # fmt: skip
        self.overrides = {k: v for k, v in values.items() if v is not _DEFAULT}
        if isinstance(prior, str):
            prior = load_weights_file(prior, "average")[0][1]
        self.prior = prior
        if prior_steps is not _DEFAULT:
            self.overrides["prior_steps"] = prior_steps
        self.seed = seed
        self.config: AioliConfig | None = None
        self.state: AioliState | None = None
        self._loaded: dict[str, Any] | None = None
        if self.groups is not None:
            self.config = self.make_config(self.groups)  # fail now, not at start()

    def make_config(self, groups: Sequence[str]) -> AioliConfig:
        """The full configuration for these groups (paper defaults + overrides)."""
        prior = None
        if self.prior is not None:
            prior = tuple(normalize_weights(self.prior, list(groups)))
        return AioliConfig.defaults_for(len(groups), **self.overrides, prior=prior)

    def setup(self, fresh: bool) -> None:
        config = self.make_config(self.dataset.group_names)
        lag = self.dataset.update_lag
        room = config.update_steps - config.lp_duration
        if room < lag:
            raise ValueError(
                f"Aioli: a round leaves {room} batches after LearnParams (update_steps="
                f"{config.update_steps} - lp_rounds*groups*lp_steps={config.lp_duration}), "
                f"fewer than the dataset's update lag ({lag}), so the next round's sweeps "
                "could not be scheduled in time; raise update_steps or lower num_workers/"
                "prefetch_factor"
            )
        scale.warn(config.check_scale(self.total_steps))
        self.config = config
        if self._loaded is not None:
            self.state = AioliState.from_state_dict(self._loaded)
        else:
            seed = self.dataset.seed if self.seed is None else self.seed
            self.state = AioliState.initial(config, seed)
        step = self.steps_done
        if fresh:
            entries = [(0, config.initial_weights())] if config.prior_steps else []
            entries += self.state.plan(config).weight_schedule(config.initial_weights())
            for effective, weights in entries:
                self.set_weights(weights, step, effective_step=effective)
        self._maybe_evaluate(step)

    def update(self, step: int) -> None:
        self._maybe_evaluate(step)

    def _maybe_evaluate(self, step: int) -> None:
        """Measure the validation losses if LearnParams needs them before batch ``step``."""
        assert self.config is not None and self.state is not None
        plan = self.state.plan(self.config)
        done = len(self.state.losses)
        if plan.eval_steps[done] != step:
            return
        losses = self.validation_losses()
        self.state.record_losses(self.config, losses)
        self.record("val_loss", step, losses=losses)
        if len(self.state.losses) < len(plan.eval_steps):
            return
        round_index = self.state.round_index
        learned = self.state.finish_round(self.config)
        assert self.state.last_A is not None
        self.record("aioli", step, round=round_index, A=np.asarray(self.state.last_A))
        self.set_weights(learned, step)
        following = self.state.plan(self.config)
        for effective, weights in following.weight_schedule(learned):
            self.set_weights(weights, step, effective_step=effective)

    def recommended_weights(self, step: int) -> dict[str, np.ndarray]:
        """``final``: the last learned mixture; ``average``: what was trained on, on average."""
        weights = super().recommended_weights(step)
        if self.state is not None:
            weights["final"] = np.asarray(self.state.weights)
        return weights

    def summary(self, step: int) -> dict[str, Any]:
        """The settings in force (paper defaults resolved) and the share of sweep batches."""
        if self.config is None or step < 1:
            return {}
        config = {k: v for k, v in dataclasses.asdict(self.config).items() if k != "prior"}
        config["prior"] = None if self.config.prior is None else list(self.config.prior)
        return {"aioli": {"config": config, "sweep_share": self.config.sweep_share(step)}}

    def method_state(self) -> dict[str, Any]:
        return {} if self.state is None else self.state.state_dict()

    def load_method_state(self, state: dict[str, Any]) -> None:
        self._loaded = dict(state) if state else None
