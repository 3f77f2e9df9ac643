"""``DoReMi``: online domain reweighting against a fixed reference model (Xie et al. 2023).

The DoReMi pipeline has three runs:

1. **reference**: a small model trained on a fixed mixture (e.g. ``Stratified()``), saving a
   Composer checkpoint;
2. **proxy** (this algorithm): a fresh model of the same architecture. Every step the
   reference scores the *same* batch; a group's excess loss is the mean over its tokens
   (all ranks, all microbatches since the last update) of ``max(l_proxy - l_ref, 0)``, and
   the weights ``alpha`` take an exponentiated-gradient step toward the groups with the
   most excess (:mod:`mixstream.algorithms.doremi`). The run writes ``weights.json`` whose
   ``average`` is the time-averaged ``alpha``, DoReMi's output;
3. **main**: ``StaticMixture(weights_file=".../weights.json", use="average")``.

Two ways to make the proxy "train on" ``alpha``:

* ``objective="reweight_loss"`` (the paper's and the official code's): the data is sampled
  uniformly and the training loss becomes the ``alpha``-weighted token mean
  ``sum_t alpha[g(t)] l_t / sum_t alpha[g(t)]`` (per microbatch), so no sample is wasted on
  a stale mixture and weights act at once;
* ``objective="resample"``: the loss is untouched and ``alpha`` is handed to the dataset
  (it takes effect after the loader's update lag): no compute is spent on groups whose
  weight is near zero, at the price of sampling noise and a delayed response.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from composer.core import State
from composer.core.precision import get_precision_context
from composer.loggers import Logger

from mixstream import storage
from mixstream.algorithms.doremi import DoReMiState
from mixstream.composer.mixing import MixingAlgorithm
from mixstream.mixing.signals import all_reduce_sum, group_sums, token_losses, unwrap_model

__all__ = ["OBJECTIVES", "DoReMi", "load_reference_model", "weighted_token_loss"]

OBJECTIVES = ("reweight_loss", "resample")


def weighted_token_loss(
    losses: torch.Tensor, group_ids: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``sum_t w[g(t)] l_t / sum_t w[g(t)]``: the token mean with each group weighted by ``w``.

    ``losses``: per-token losses ``(B, ...)`` (keeps their graph); ``group_ids``: one group per
    sequence ``(B,)``; ``weights``: one weight per group. Uniform weights give the plain mean.
    """
    ids = group_ids.to(losses.device).long().reshape(-1)
    if ids.numel() != losses.shape[0]:
        raise ValueError(
            f"{ids.numel()} group ids for {losses.shape[0]} sequences; pass one per sequence"
        )
    w = weights.to(device=losses.device, dtype=torch.float32)[ids]
    w = w.reshape((-1,) + (1,) * (losses.dim() - 1)).expand_as(losses)
    return (w * losses.float()).sum() / w.sum()


def _is_sharded(state: State, model: torch.nn.Module) -> bool:
    """FSDP (1 or 2) anywhere in the model: its parameters are shards, not whole tensors."""
    if getattr(state, "fsdp_enabled", False):
        return True
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def _fresh_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` that skips non-leaf tensors it keeps (e.g. cached losses)."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = None
    return copy.deepcopy(model, memo)


@contextlib.contextmanager
def _local_file(path: str) -> Iterator[str]:
    """``path`` itself, or a temporary download of a remote (``s3://``, ...) checkpoint."""
    if not storage.is_remote(path):
        yield path
        return
    from composer.utils import get_file

    with tempfile.TemporaryDirectory(prefix="doremi-reference-") as tmp:
        destination = os.path.join(tmp, "reference.pt")
        try:
            get_file(path, destination, overwrite=True, progress_bar=False)
        except FileNotFoundError:
            raise FileNotFoundError(f"reference_checkpoint {path} does not exist") from None
        yield destination


def _model_weights(checkpoint: Any, path: str) -> dict[str, torch.Tensor]:
    try:
        weights = checkpoint["state"]["model"]
    except (KeyError, TypeError):
        raise ValueError(
            f"reference_checkpoint {path} is not a Composer checkpoint (no ['state']['model']); "
            "pass a file written by the Trainer's save_folder (e.g. ep0-ba100-rank0.pt)"
        ) from None
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(
            f"reference_checkpoint {path} holds no model weights (a sharded checkpoint?); "
            "save the reference run with a monolithic (non-sharded) checkpoint"
        )
    prefix = "module."
    if all(k.startswith(prefix) for k in weights):
        weights = {k[len(prefix) :]: v for k, v in weights.items()}
    return dict(weights)


def load_reference_model(
    model: torch.nn.Module, checkpoint: str, device: Any | None = None
) -> torch.nn.Module:
    """A frozen copy of ``model``'s architecture with the weights of a Composer ``checkpoint``.

    ``checkpoint`` is a local file or a URL Composer's ``get_file`` reads (``s3://...``);
    ``device`` a Composer device. The copy is in eval mode with ``requires_grad=False``.
    """
    if Path(checkpoint).is_dir():
        raise ValueError(
            f"reference_checkpoint {checkpoint} is a folder; pass the checkpoint file inside "
            "it (e.g. latest-rank0.pt)"
        )
    with _local_file(checkpoint) as local:
        if not os.path.exists(local):
            raise FileNotFoundError(f"reference_checkpoint {checkpoint} does not exist")
        try:
            loaded = torch.load(local, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise ValueError(f"reference_checkpoint {checkpoint} cannot be read: {exc}") from exc
    weights = _model_weights(loaded, checkpoint)
    reference = _fresh_copy(unwrap_model(model))
    try:
        reference.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"reference_checkpoint {checkpoint} does not fit the training model's architecture "
            f"(DoReMi's reference must be the same model as the proxy): {exc}"
        ) from None
    reference.eval()
    reference.requires_grad_(False)
    if device is not None:
        reference = device.module_to_device(reference)
    return reference


class DoReMi(MixingAlgorithm):
    """DoReMi's proxy run: learn group weights from the excess loss over a reference model.

    Args:
        reference_checkpoint: the reference run's Composer checkpoint file (local path or
            ``s3://...``), of a model with the training model's architecture. Required.
        objective: ``"reweight_loss"`` (default: uniform sampling, ``alpha``-weighted
            training loss) or ``"resample"`` (``alpha`` becomes the sampling weights); see
            the module docstring.
        eta: step size of the exponentiated-gradient update.
        smoothing: ``c`` in ``alpha = (1 - c) alpha + c / k``, in ``[0, 1)``.
        update_steps: update ``alpha`` every this many batches, from the tokens of all of
            them (groups without tokens in the window keep their previous score).
        initial_weights: the starting ``alpha`` (mapping or vector; default uniform).
        **kwargs: see :class:`~mixstream.composer.mixing.MixingAlgorithm`.

    At the start of a fresh run the dataset is set to uniform sampling (``reweight_loss``) or
    to the initial ``alpha`` (``resample``); a resumed run keeps the checkpointed weights and
    DoReMi state. The reference is a frozen deep copy of the training model loaded with the
    checkpoint's weights: one extra forward pass per microbatch. DDP and single-device
    training are supported; FSDP is not (the copy would be unsharded) and is refused at
    FIT_START.
    In ``reweight_loss`` mode the model's loss must be its mean token loss (it is replaced).
    """

    kind = "doremi"

    def __init__(
        self,
        reference_checkpoint: str | None = None,
        *,
        objective: str = "reweight_loss",
        eta: float = 1.0,
        smoothing: float = 1e-3,
        update_steps: int = 1,
        initial_weights: Mapping[str, float] | Sequence[float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if reference_checkpoint is None or not str(reference_checkpoint):
            raise ValueError(
                "DoReMi needs reference_checkpoint=: the Composer checkpoint of a reference "
                "model (same architecture) trained on a fixed mixture, e.g. with Stratified()"
            )
        reference_checkpoint = os.fspath(reference_checkpoint)
        if not storage.is_remote(reference_checkpoint) and not os.path.exists(reference_checkpoint):
            raise FileNotFoundError(f"reference_checkpoint {reference_checkpoint} does not exist")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        if not (np.isfinite(eta) and eta > 0):
            raise ValueError(f"eta must be a finite number > 0, got {eta!r}")
        if not (np.isfinite(smoothing) and 0 <= smoothing < 1):
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
        if int(update_steps) != update_steps or update_steps < 1:
            raise ValueError(f"update_steps must be an integer >= 1, got {update_steps!r}")
        self.reference_checkpoint = reference_checkpoint
        self.objective = objective
        self.eta = float(eta)
        self.smoothing = float(smoothing)
        self.update_steps = int(update_steps)
        self.initial_weights = initial_weights
        self.doremi: DoReMiState | None = None
        self.reference: torch.nn.Module | None = None
        # Global (all-reduced) clipped-excess sums and token counts since the last update.
        self._window_sums = np.zeros(0)
        self._window_counts = np.zeros(0)
        # This rank's sums over the current step's microbatches, on the training device.
        self._step_totals: torch.Tensor | None = None
        self._alpha: torch.Tensor | None = None

    # --------------------------------------------------------------- setup
    def setup(self, state: State, logger: Logger, fresh: bool) -> None:
        if _is_sharded(state, state.model):
            raise ValueError(
                "DoReMi does not support FSDP: its reference model is an unsharded copy of the "
                "training model; train the proxy with DDP or on one device"
            )
        k = self.num_groups
        if self.doremi is None or fresh:
            kwargs = {"eta": self.eta, "smoothing": self.smoothing}
            if self.initial_weights is None:
                self.doremi = DoReMiState(num_groups=k, **kwargs)
            else:
                start = self.mixer.normalize(self.initial_weights)
                self.doremi = DoReMiState.with_initial_weights(start, **kwargs)
            self._window_sums, self._window_counts = np.zeros(k), np.zeros(k)
        elif self.doremi.num_groups != k:
            raise ValueError(
                f"the checkpointed DoReMi state has {self.doremi.num_groups} groups, the dataset "
                f"{k} ({', '.join(self.mixer.groups or [])}); resume with the same groups"
            )
        else:  # resumed: keep the learnt weights, follow this run's step size and smoothing
            self.doremi.eta, self.doremi.smoothing = self.eta, self.smoothing
        self.reference = load_reference_model(state.model, self.reference_checkpoint, state.device)
        self._step_totals = None
        self._alpha = state.device.tensor_to_device(
            torch.as_tensor(self.doremi.weights, dtype=torch.float32)
        )
        if fresh:
            start = self.doremi.weights if self.objective == "resample" else np.ones(k) / k
            self.mixer.set_weights(start, 0, effective_step=0)

    # --------------------------------------------------------------- per microbatch
    def on_loss(self, state: State, logger: Logger) -> None:
        assert self.reference is not None and self._alpha is not None
        proxy = self.batch_token_losses(state)
        with (
            torch.no_grad(),
            get_precision_context(state.precision, state.precision_config),
        ):
            outputs = self.reference(state.batch)
        with torch.no_grad():
            ref = token_losses(self.reference, outputs, state.batch)
            clipped = (proxy.detach().float() - ref.float()).clamp_min(0.0)
            per_seq = clipped.reshape(clipped.shape[0], -1).double()
            ids = state.batch["group"].to(per_seq.device).long().reshape(-1)
            # (2, k): clipped-excess sums and token counts; deterministic on every device
            # (no atomics) and O(batch log batch + groups), not batch x groups.
            tokens = torch.full_like(per_seq[:, 0], per_seq.shape[1])
            totals = torch.stack(
                [
                    group_sums(per_seq.sum(dim=1), ids, self.num_groups),
                    group_sums(tokens, ids, self.num_groups),
                ]
            )
        self._step_totals = totals if self._step_totals is None else self._step_totals + totals
        if self.objective == "reweight_loss":
            if not isinstance(state.loss, torch.Tensor):
                raise TypeError(
                    "DoReMi(objective='reweight_loss') replaces the model's loss, which must be "
                    f"one tensor (the mean token loss); got {type(state.loss).__name__}"
                )
            state.loss = weighted_token_loss(proxy, state.batch["group"], self._alpha)

    # --------------------------------------------------------------- per step
    def on_step(self, state: State, logger: Logger, step: int) -> None:
        assert self.doremi is not None
        totals = self._step_totals
        self._step_totals = None
        if totals is None:  # no microbatch on this rank (cannot happen in Composer's loop)
            totals = torch.zeros(2, self.num_groups, dtype=torch.float64)
        totals = all_reduce_sum(state.device.tensor_to_device(totals)).cpu().numpy()
        self._window_sums = self._window_sums + totals[0]
        self._window_counts = self._window_counts + totals[1]
        if step % self.update_steps:
            return
        sums, counts = self._window_sums, self._window_counts
        self._window_sums, self._window_counts = np.zeros_like(sums), np.zeros_like(counts)
        previous = np.asarray(self.doremi.scores)
        excess = np.where(counts > 0, sums / np.maximum(counts, 1), previous)
        alpha = self.doremi.update_from_excess(excess)
        self._alpha = state.device.tensor_to_device(torch.as_tensor(alpha, dtype=torch.float32))
        named = self.mixer.named(excess)
        logger.log_metrics({f"mixture/doremi_excess/{g}": v for g, v in named.items()}, step=step)
        self.mixer.record("doremi", step, excess=excess, tokens=counts, weights=alpha)
        if self.objective == "resample":
            self.mixer.set_weights(alpha, step)

    # --------------------------------------------------------------- output and checkpoints
    def recommended_weights(self, step: int) -> dict[str, np.ndarray]:
        assert self.doremi is not None
        return {"final": self.doremi.weights, "average": self.doremi.average}

    def method_state(self) -> dict[str, Any]:
        if self.doremi is None:
            return {}
        return {
            "doremi": self.doremi.state_dict(),
            "window_sums": [float(x) for x in self._window_sums],
            "window_counts": [float(x) for x in self._window_counts],
        }

    def load_method_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.doremi = DoReMiState.from_state_dict(state["doremi"])
        self._window_sums = np.asarray(state["window_sums"], dtype=np.float64)
        self._window_counts = np.asarray(state["window_counts"], dtype=np.float64)
