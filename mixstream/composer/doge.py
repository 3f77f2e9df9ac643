"""``DoGE``: Domain reweighting with Generalization Estimation (Fan et al. 2023), proxy run.

The DoGE pipeline has two runs:

1. **proxy** (this algorithm): every ``update_steps`` batches, each group's training
   gradient is compared with the gradient of the generalization target (by default a batch
   of every group's ``val`` split; ``target=`` one group's), and the weights take DoGE's
   step (:mod:`mixstream.algorithms.doge`: ``lr``-scaled inner products, normalised by the
   mean gradient norm and clipped, then ``log w += score / mu``). The run writes
   ``weights.json`` whose ``average`` is the time-averaged ``w``, DoGE's output;
2. **main**: ``StaticMixture(weights_file=".../weights.json", use="average")``.

The gradients come from DGA's probes (:mod:`mixstream.composer.probes`): small keyed batches
of each group's train split and of the target, through ``torch.autograd.grad``, so neither
``param.grad`` nor the optimizer nor any RNG stream is disturbed, every rank draws the same
probes, and a resumed run draws them again. Choice (ours): the reference takes the per-group
gradients from the training batch itself at every step and trains on their weighted sum;
here the proxy trains as DoReMi's does (``objective="reweight_loss"``: uniform sampling,
the ``w``-weighted token loss, or ``"resample"``), and the probes cost ``groups + 1``
forward-backward passes per update, so ``update_steps`` sets their share.

``lr`` is the optimizer's current learning rate (its first parameter group), as in the
reference (``lr_scheduler.get_last_lr()``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from composer.core import State
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from composer.utils import dist

from mixstream.algorithms import scale
from mixstream.algorithms.doge import DoGEState, doge_scores
from mixstream.algorithms.lmo import check_fraction, check_positive
from mixstream.composer.doremi import OBJECTIVES, weighted_token_loss
from mixstream.composer.mixing import MixingAlgorithm
from mixstream.composer.probes import (
    TARGET,
    ProbeResult,
    concat_batches,
    draw_probe,
    probe_gradients,
    require_whole_model,
)
from mixstream.mixing.signals import GroupSamples, all_reduce_sum

__all__ = ["DoGE"]


class DoGE(MixingAlgorithm):
    """DoGE's proxy run: weights from per-group gradient alignment with the target.

    Args:
        mu: the Bregman step's scale: ``log w += score / mu`` (reference: 0.05).
        dw_min, dw_max: scores are clipped to ``[lr * dw_min, lr * dw_max]`` (0 and 5).
        max_grad_norm: every probed gradient is clipped to this norm first (reference: the
            trainer's 1.0); ``None``: no clipping.
        smoothing: ``eps`` of uniform mixed into the weights after each step, in [0, 1).
        target: the group whose ``val`` split is the target; default all groups' (the
            in-distribution generalization objective).
        objective: ``"reweight_loss"`` (uniform sampling, ``w``-weighted loss) or
            ``"resample"`` (``w`` becomes the sampling weights).
        update_steps: update every this many batches.
        probe_batch_size: sequences per group in a probe (the default target takes as many
            of every group's ``val`` split).
        probe_samples_per_group: size of each group's fixed probe pool.
        initial_weights: the starting ``w`` (default uniform).
        **kwargs: see :class:`~mixstream.composer.mixing.MixingAlgorithm`.
    """

    kind = "doge"

    def __init__(
        self,
        *,
        mu: float = 0.05,
        dw_min: float = 0.0,
        dw_max: float = 5.0,
        max_grad_norm: float | None = 1.0,
        smoothing: float = 0.0,
        target: str | None = None,
        objective: str = "reweight_loss",
        update_steps: int = 10,
        probe_batch_size: int = 4,
        probe_samples_per_group: int = 64,
        initial_weights: Mapping[str, float] | Sequence[float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.mu = check_positive("DoGE mu", mu)
        if not (np.isfinite(dw_min) and np.isfinite(dw_max) and dw_min <= dw_max):
            raise ValueError(
                f"DoGE needs finite dw_min <= dw_max, got dw_min={dw_min}, dw_max={dw_max}"
            )
        self.dw_min, self.dw_max = float(dw_min), float(dw_max)
        self.max_grad_norm = (
            None if max_grad_norm is None else check_positive("DoGE max_grad_norm", max_grad_norm)
        )
        self.smoothing = check_fraction("DoGE smoothing", smoothing, allow_one=False)
        if objective not in OBJECTIVES:
            raise ValueError(
                f"DoGE objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}"
            )
        for name, value in (
            ("update_steps", update_steps),
            ("probe_batch_size", probe_batch_size),
            ("probe_samples_per_group", probe_samples_per_group),
        ):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"DoGE {name} must be an integer >= 1, got {value!r}")
        if target is not None and not isinstance(target, str):
            raise ValueError(f"DoGE target= must be one group name or None, got {target!r}")
        self.target = target
        self.objective = objective
        self.update_steps = int(update_steps)
        self.probe_batch_size = int(probe_batch_size)
        self.probe_samples_per_group = int(probe_samples_per_group)
        self.initial_weights = initial_weights
        self.doge: DoGEState | None = None
        self.last_scores: np.ndarray | None = None
        self._pool: GroupSamples | None = None
        self._target_pool: GroupSamples | None = None
        self._w: torch.Tensor | None = None
        if self.mixer.groups is not None and initial_weights is not None:
            self.normalize_initial(self.mixer.groups)

    def normalize_initial(self, groups: Sequence[str]) -> np.ndarray:
        from mixstream.weights import normalize_weights

        if self.initial_weights is None:
            return np.full(len(groups), 1.0 / len(groups))
        return normalize_weights(self.initial_weights, list(groups))

    # --------------------------------------------------------------- setup
    def setup(self, state: State, logger: Logger, fresh: bool) -> None:
        require_whole_model(state, "DoGE")
        dataset = self.mixing_dataset
        scale.warn(scale.many_groups_warning(
            "DoGE", len(dataset.group_names),
            f"every update_steps={self.update_steps} batches it takes one gradient probe "
            f"(forward and backward of probe_batch_size={self.probe_batch_size} sequences) "
            f"per group, {len(dataset.group_names):,} in all",
        ))  # fmt: skip
        manifest = dataset.manifest
        if manifest is None:
            raise ValueError(
                "DoGE probes each group's train and val splits through the manifest: build the "
                "dataset with manifest= (not streams=)"
            )
        if self.target is not None and self.target not in dataset.group_names:
            raise ValueError(
                f"DoGE target={self.target!r} is not a group of the dataset; groups: "
                f"{', '.join(dataset.group_names)}"
            )
        if self.doge is None or fresh:
            self.doge = DoGEState.initial(self.normalize_initial(dataset.group_names))
            self.last_scores = None
        elif self.doge.num_groups != self.num_groups:
            raise ValueError(
                f"the checkpointed DoGE state has {self.doge.num_groups} groups, the dataset "
                f"{self.num_groups} ({', '.join(dataset.group_names)}); resume with the same "
                "groups"
            )
        self._pool = GroupSamples(
            manifest, "train", dataset.group_names, self.probe_samples_per_group
        )
        targets = dataset.group_names if self.target is None else [self.target]
        self._target_pool = GroupSamples(manifest, "val", targets, self.probe_samples_per_group)
        self._w = state.device.tensor_to_device(
            torch.as_tensor(self.doge.weights, dtype=torch.float32)
        )
        if fresh:
            start = self.doge.weights if self.objective == "resample" else None
            uniform = np.full(self.num_groups, 1.0 / self.num_groups)
            self.mixer.set_weights(uniform if start is None else start, 0, effective_step=0)

    # --------------------------------------------------------------- per microbatch / step
    def on_loss(self, state: State, logger: Logger) -> None:
        if self.objective != "reweight_loss":
            return
        if not isinstance(state.loss, torch.Tensor):
            raise TypeError(
                "DoGE(objective='reweight_loss') replaces the model's loss, which must be one "
                f"tensor (the mean token loss); got {type(state.loss).__name__}"
            )
        assert self._w is not None
        losses = self.batch_token_losses(state)
        state.loss = weighted_token_loss(losses, state.batch["group"], self._w)

    def on_step(self, state: State, logger: Logger, step: int) -> None:
        if step % self.update_steps:
            return
        assert self.doge is not None
        probe = self.probe(state, step)
        lr = float(state.optimizers[0].param_groups[0]["lr"])
        scores = doge_scores(
            probe.inner, probe.group_norms, probe.target_norm, lr,
            max_grad_norm=self.max_grad_norm, dw_min=self.dw_min, dw_max=self.dw_max,
        )  # fmt: skip
        w = self.doge.update(scores, self.mu, self.smoothing)
        self.last_scores = scores
        self._w = state.device.tensor_to_device(torch.as_tensor(w, dtype=torch.float32))
        self.mixer.record("doge", step, scores=scores, inner=probe.inner,
                    grad_norms=probe.group_norms, target_norm=probe.target_norm, lr=lr,
                    weights=w, update=self.doge.updates)  # fmt: skip
        logger.log_metrics(
            {f"mixture/doge_score/{g}": float(v) for g, v in self.mixer.named(scores).items()},
            step=step,
        )
        if self.objective == "resample":
            self.mixer.set_weights(w, step)

    def probe(self, state: State, step: int) -> ProbeResult:
        """Inner products and norms of every group's gradient and the target's at ``step``."""
        assert self._pool is not None and self._target_pool is not None
        seed = self.mixing_dataset.seed
        size = self.probe_batch_size
        batches = [draw_probe(self._pool, g, size, seed, step) for g in range(self.num_groups)]
        target = concat_batches(
            [
                draw_probe(self._target_pool, g, size, seed, step, TARGET)
                for g in range(len(self._target_pool))
            ]
        )
        result = probe_gradients(
            state.model,
            batches,
            target,
            device=state.device,
            precision_context=lambda: get_precision_context(
                state.precision, state.precision_config
            ),
        )
        # Every rank probed the same keyed batches; the mean over ranks makes the numbers
        # bit-identical everywhere, so every rank takes the same step.
        world = dist.get_world_size()
        if world == 1:
            return result
        packed = torch.as_tensor(
            [*result.inner, *result.group_norms, result.target_norm], dtype=torch.float64
        )
        packed = (all_reduce_sum(state.device.tensor_to_device(packed)).cpu() / world).numpy()
        m = self.num_groups
        return ProbeResult(packed[:m], packed[m : 2 * m], float(packed[2 * m]))

    # --------------------------------------------------------------- output and checkpoints
    def recommended_weights(self, step: int) -> dict[str, np.ndarray]:
        assert self.doge is not None
        return {"final": np.asarray(self.doge.weights), "average": self.doge.average}

    def summary(self, step: int) -> dict[str, Any]:
        if self.doge is None:
            return {}
        return {
            "doge": {
                "updates": self.doge.updates,
                "mu": self.mu,
                "dw_min": self.dw_min,
                "dw_max": self.dw_max,
                "max_grad_norm": self.max_grad_norm,
                "target": self.target,
                "objective": self.objective,
                "update_steps": self.update_steps,
            }
        }

    def method_state(self) -> dict[str, Any]:
        if self.doge is None:
            return {}
        last = None if self.last_scores is None else [float(x) for x in self.last_scores]
        return {"doge": self.doge.state_dict(), "last_scores": last}

    def load_method_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.doge = DoGEState.from_state_dict(state["doge"])
        last = state.get("last_scores")
        self.last_scores = None if last is None else np.asarray(last, dtype=np.float64)
