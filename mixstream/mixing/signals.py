"""Per-group loss signals for the mixers, taken without disturbing training.

* Training loss per group comes from the training forward pass itself: the model's
  per-token losses (``token_losses``) summed by the batch's ``group`` ids. A model says how
  through ``per_token_loss(outputs, batch)`` (:class:`~mixstream.composer.model.MixtureLM`);
  a Composer ``HuggingFaceModel`` without one (LLM Foundry's MPT and HF causal LMs) is
  read from its logits and the batch's ``labels`` (:func:`causal_lm_batch`).
* Validation (or test) loss per group comes from :class:`GroupSamples`, a fixed set of each
  group's held-out sequences read by index. Evaluating leaves the model's mode, the RNG
  streams and the training dataloader exactly as they were.
* With several ranks every signal is all-reduced before use, so every rank computes the
  same mixture (and ``set_weights`` broadcasts rank 0's anyway).

Framework-free: ranks are ``torch.distributed``'s default process group (the one Composer,
torchrun scripts and :mod:`mixstream.testing.distributed` initialise), and a model is any
``torch.nn.Module``.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mixstream.manifest import Manifest

__all__ = [
    "GroupEvaluator",
    "GroupSamples",
    "all_reduce_sum",
    "causal_lm_batch",
    "evaluate_group_losses",
    "forked_rng",
    "group_loss_sums",
    "group_sums",
    "rank_and_world",
    "sample_indices",
    "token_losses",
    "unwrap_model",
]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The ComposerModel inside a DDP wrapper (FSDP wraps in place and needs nothing)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


#: label of a token without a loss in Hugging Face (and LLM Foundry) batches
IGNORE_INDEX = -100


def causal_lm_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` as a causal LM of ``transformers``/LLM Foundry takes it.

    Token ids become int64 (they are stored as uint16; embeddings index with int64) and
    ``labels`` defaults to the ids (packed sequences: every token is a target, the model
    shifts). Models with their own ``per_token_loss`` ignore the extra key. Used by the LLM
    Foundry loader's collate and for the held-out batches a method evaluates itself, so
    both reach the model in one format.
    """
    if "input_ids" not in batch:
        return batch
    out = dict(batch)
    out["input_ids"] = torch.as_tensor(batch["input_ids"]).long()
    out["labels"] = torch.as_tensor(batch.get("labels", out["input_ids"])).long()
    return out


def _causal_lm_token_losses(model: Any, outputs: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Per-token cross-entropy of a Composer ``HuggingFaceModel``'s logits, in float32.

    The targets are the batch's ``labels``, shifted as the model shifts them
    (``shift_labels``): ``(batch, seq_len - 1)`` for a causal LM, as ``MixtureLM`` gives.
    """
    logits = outputs.logits if hasattr(outputs, "logits") else outputs
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"{type(model).__name__} returned {type(outputs).__name__} without logits; "
            "per-group losses need the model's logits"
        )
    if "labels" not in batch:
        raise KeyError("the batch has no 'labels'; build it with causal_lm_batch()")
    targets = batch["labels"].long()
    if getattr(model, "shift_labels", False):
        logits, targets = logits[:, :-1], targets[:, 1:]
    if bool((targets == IGNORE_INDEX).any()):
        raise ValueError(
            "the batch's labels mask tokens (-100); per-group losses average every token of "
            "a sequence, so train on packed sequences whose labels are the token ids "
            "(mixstream's loader does)"
        )
    flat = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    )
    return flat.view(targets.shape)


def token_losses(model: torch.nn.Module, outputs: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Per-token losses ``(batch, tokens)`` of ``outputs`` for ``batch``, from the model."""
    from composer.models import HuggingFaceModel

    inner = unwrap_model(model)
    per_token = getattr(inner, "per_token_loss", None)
    if per_token is not None:
        return per_token(outputs, batch)
    if isinstance(inner, HuggingFaceModel):
        return _causal_lm_token_losses(inner, outputs, batch)
    raise TypeError(
        f"{type(inner).__name__} has no per_token_loss(outputs, batch) and is not a Composer "
        "HuggingFaceModel; mixing algorithms need per-token losses to split the loss by group "
        "(see mixstream.composer.model)"
    )


def group_loss_sums(
    losses: torch.Tensor, groups: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of token losses, token count)`` per group, float64 on the losses' device."""
    losses = losses.detach().double()
    per_sample = losses.reshape(losses.shape[0], -1)
    groups = groups.to(per_sample.device).long().reshape(-1)
    sums = torch.zeros(num_groups, dtype=torch.float64, device=per_sample.device)
    counts = torch.zeros_like(sums)
    sums.index_add_(0, groups, per_sample.sum(dim=1))
    counts.index_add_(0, groups, torch.full_like(per_sample[:, 0], per_sample.shape[1]))
    return sums, counts


def group_sums(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``out[g] = sum of values[i] over rows i of group g``, on the values' device.

    Deterministic on every device (a stable sort, a prefix sum and a search, no atomics) and
    O(rows log rows + groups): a one-hot reduction costs rows x groups, 40 MB per batch of
    512 with 10,000 groups. Exact for integer-valued sums (counts); for others the prefix
    sum's rounding is that of float64 over the batch.
    """
    values = values.reshape(-1)
    groups = groups.to(values.device).long().reshape(-1)
    order = torch.argsort(groups, stable=True)
    prefix = torch.cat([values.new_zeros(1), torch.cumsum(values[order], dim=0)])
    edges = torch.searchsorted(
        groups[order], torch.arange(num_groups + 1, device=values.device, dtype=torch.long)
    )
    return prefix[edges[1:]] - prefix[edges[:-1]]


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size (``(0, 1)`` without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over all ranks (itself with one rank).

    NCCL reduces CUDA tensors only, so under it a CPU tensor makes the trip through the
    current CUDA device and comes back; the result is on ``tensor``'s device either way.
    """
    if rank_and_world()[1] == 1:
        return tensor
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        moved = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(moved)
        return moved.to(tensor.device)
    dist.all_reduce(tensor)
    return tensor


def _as_tensors(sample: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.array(v)) for k, v in sample.items() if k != "group"}


class GroupSamples:
    """A fixed, seeded sample of ``samples_per_group`` sequences of each group's ``split``.

    The sequences are drawn uniformly without replacement from the *whole* split (keyed by
    ``sample_seed``, the split and the group name), not taken from its start: a split's
    first sequences come from its first few documents, so a head sample measures those
    documents rather than the group. The sample depends only on the corpus and
    ``sample_seed``, never on the training seed, so every run of a corpus is measured on the
    same sequences (differences between runs are paired). ``samples_per_group=None`` takes
    the whole split. The sequences are read once (through a
    :class:`~mixstream.dataset.DynamicStreamingDataset` over the split, so S3 download and
    caching are streaming's) and kept in memory.

    Collective when constructed under torch.distributed (streaming coordinates its cache).
    """

    def __init__(
        self,
        manifest: str | Manifest,
        split: str,
        groups: Sequence[str],
        samples_per_group: int | None = 64,
        local: str | None = None,
        sample_seed: int = 0,
    ) -> None:
        from mixstream.dataset import DynamicStreamingDataset

        if samples_per_group is not None and samples_per_group < 1:
            raise ValueError(f"samples_per_group must be >= 1, got {samples_per_group}")
        if not isinstance(manifest, Manifest):
            manifest = Manifest.load(manifest)
        self.group_names = list(groups)
        self.split = split
        dataset = DynamicStreamingDataset(
            manifest=manifest, split=split, groups=self.group_names, batch_size=1,
            shuffle=False, local=local, epoch_size=None,
        )  # fmt: skip
        try:
            self.samples: list[list[dict[str, torch.Tensor]]] = []
            for g, name in enumerate(self.group_names):
                available = int(dataset.samples_per_stream[g])
                if available == 0:
                    raise ValueError(f"group {name!r} has no samples in its {split!r} split")
                offset = int(dataset.sample_offset_per_stream[g])
                picks = sample_indices(available, samples_per_group, sample_seed, split, name)
                self.samples.append([_as_tensors(dataset[offset + int(i)]) for i in picks])
        finally:
            dataset.close()

    def __len__(self) -> int:
        return len(self.group_names)

    def batches(
        self, group: int, batch_size: int, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """This rank's share of ``group``'s sequences as ``(batch, keep)`` pairs.

        Every rank yields the same number of batches (sharded models need every rank in
        every forward); padding rows repeat a sequence and have ``keep == 0``.
        """
        rows = self.samples[group][rank::world_size]
        per_rank = -(-len(self.samples[group]) // world_size)
        for start in range(0, per_rank, batch_size):
            chunk = rows[start : start + batch_size]
            size = min(batch_size, per_rank - start)
            keep = torch.zeros(size)
            keep[: len(chunk)] = 1
            chunk = chunk + [self.samples[group][0]] * (size - len(chunk))
            yield {k: torch.stack([r[k] for r in chunk]) for k in chunk[0]}, keep


def sample_indices(
    available: int, count: int | None, seed: int, split: str, group: str
) -> np.ndarray:
    """``count`` distinct indices of ``range(available)``, uniform and sorted (all if None).

    Keyed by ``(seed, split, group)`` through a hash, so the draw is the same on every rank,
    machine and numpy version that keeps ``Generator.choice`` stable.
    """
    if count is None or count >= available:
        return np.arange(available)
    key = hashlib.blake2b(f"{seed}:{split}:{group}".encode(), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(key, "little"))
    return np.sort(rng.choice(available, size=count, replace=False))


def forked_rng() -> contextlib.AbstractContextManager[None]:
    """Every torch RNG stream (CPU and each CUDA device in use) restored on exit."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=devices)


@contextlib.contextmanager
def _untouched(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode, no grad, and every RNG stream restored afterwards."""
    was_training = model.training
    with forked_rng(), torch.no_grad():
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)


def evaluate_group_losses(
    model: torch.nn.Module,
    samples: GroupSamples,
    batch_size: int,
    device: Any | None = None,
    precision_context: Callable[[], Any] | None = None,
    losses: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
) -> np.ndarray:
    """Mean token loss of each group over ``samples``, across all ranks (collective).

    ``losses(batch)`` gives the per-token losses ``(batch, tokens)`` of a batch of CPU tensors
    (default: ``model(batch)`` and the model's ``per_token_loss``, :func:`token_losses`);
    ``device`` is a Composer device (moves batches), ``precision_context`` a callable
    returning the autocast context the trainer uses.
    """
    rank, world = rank_and_world()
    sums = torch.zeros(len(samples), dtype=torch.float64)
    counts = torch.zeros_like(sums)
    with _untouched(model):
        for g in range(len(samples)):
            for batch, keep in samples.batches(g, batch_size, rank, world):
                if losses is not None:
                    per_token = losses(batch)
                else:
                    batch = causal_lm_batch(batch)
                    if device is not None:
                        batch = device.batch_to_device(batch)
                    context = precision_context() if precision_context else contextlib.nullcontext()
                    with context:
                        outputs = model(batch)
                    per_token = token_losses(model, outputs, batch)
                per_token = per_token.detach().double().cpu()
                per_token = per_token.reshape(per_token.shape[0], -1)
                sums[g] += (per_token.sum(dim=1) * keep).sum()
                counts[g] += keep.sum() * per_token.shape[1]
    totals = all_reduce_sum(torch.stack([sums, counts]))
    return (totals[0] / totals[1]).numpy()


class GroupEvaluator:
    """A mixer's ``evaluate``: each group's mean token loss over a fixed sample of its ``val``
    split (:class:`GroupSamples`), measured without disturbing training (collective).

    Args:
        dataset: the training :class:`~mixstream.dataset.DynamicStreamingDataset` (its
            manifest, groups, cache folder and per-device batch size).
        model: what is evaluated: in eval mode and without grad for the measurement, its
            mode and every RNG stream restored afterwards.
        losses: ``losses(batch) -> per-token losses (batch, tokens)`` for a dict of CPU
            tensors (``input_ids``, ...); it moves them to the model's device. Default:
            ``model(batch)`` and ``model.per_token_loss(outputs, batch)`` (``MixtureLM``'s).
        samples_per_group, batch_size: size of the measurement (batch size default: the
            dataset's per-device one).
        manifest: where the split lives (default: the dataset's manifest).
        split: which split is measured.
        device, precision_context: see :func:`evaluate_group_losses` (Composer's).

    The sequences are read on the first call (collective under torch.distributed) and kept.
    """

    def __init__(
        self,
        dataset: Any,
        model: torch.nn.Module,
        losses: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
        *,
        samples_per_group: int | None = 64,
        batch_size: int | None = None,
        manifest: str | Manifest | None = None,
        split: str = "val",
        device: Any | None = None,
        precision_context: Callable[[], Any] | None = None,
    ) -> None:
        if samples_per_group is not None and samples_per_group < 1:
            raise ValueError(
                f"val_samples_per_group must be >= 1 (or None: the whole split), got "
                f"{samples_per_group}"
            )
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"val_batch_size must be >= 1, got {batch_size}")
        self.manifest = manifest if manifest is not None else dataset.manifest
        if self.manifest is None:
            raise ValueError(
                "per-group validation data comes from a manifest's val split: build the "
                "dataset from a manifest, or pass val_manifest= (manifest= here)"
            )
        self.groups = list(dataset.group_names)
        self.local = dataset.cache_root
        self.model = model
        self.losses = losses
        self.samples_per_group = samples_per_group
        self.batch_size = batch_size or dataset.device_batch_size
        self.split = split
        self.device = device
        self.precision_context = precision_context
        self.samples: GroupSamples | None = None

    def __call__(self) -> np.ndarray:
        if self.samples is None:
            self.samples = GroupSamples(
                self.manifest, self.split, self.groups, self.samples_per_group, local=self.local
            )
        return evaluate_group_losses(
            self.model,
            self.samples,
            self.batch_size,
            device=self.device,
            precision_context=self.precision_context,
            losses=self.losses,
        )
