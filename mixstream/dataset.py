"""``DynamicStreamingDataset``: streaming groups from S3 with weights that change mid-epoch.

Built on :class:`streaming.StreamingDataset` for everything it does well -- streams, index
loading, shard download, decompression, ``cache_limit`` and eviction, all coordinated across
ranks and workers of a node through its shared memory. What we replace is its sample->shard
table (:mod:`mixstream.spanner`, O(shards) instead of O(samples) memory) and its epoch
planning (``__iter__``/``generate_work``/``state_dict``): streaming fixes each stream's
proportion at construction and materializes an O(samples) plan on every start and resume.
Here the sample order comes from :class:`mixstream.plan.MixturePlan`, which draws global
batch by batch from a weight schedule that the trainer may change at any step, and whose
whole state at any position is O(groups).

Weight changes: :meth:`set_weights` is a collective call from the training loop (rank 0's
values win) and takes effect at global batch ``step + update_lag``. The lag covers the
batches the DataLoader may already have asked its workers for, so no prefetched batch is
ever re-planned. Updates reach the workers through :class:`mixstream.channel.ScheduleChannel`.

``weight_unit="tokens"`` makes weights shares of tokens rather than samples (see
:mod:`mixstream.tokens` for the rule, its bound and where the lengths come from); the
state then records the unit, a digest of the lengths and each group's realised tokens.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import numbers
import os
import tempfile
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import streaming.base.dataset as streaming_dataset_module
from filelock import FileLock
from streaming import Stream, StreamingDataset
from streaming.base.dataset import _ShardState
from streaming.base.format.mds.reader import MDSReader
from streaming.base.hashing import get_hashes, is_hash
from torch.utils.data import get_worker_info

from mixstream import sharedmem, storage
from mixstream.channel import UNBOUNDED, ScheduleChannel
from mixstream.manifest import Manifest, ManifestError
from mixstream.plan import MixturePlan, PlanState
from mixstream.reader import CheckedMDSReader
from mixstream.shardindex import check_path, checked_get_shards, index_location
from mixstream.spanner import ShardSpanner
from mixstream.stream import (
    DEFAULT_RETRY_SECONDS,
    ResilientStream,
    check_retry_seconds,
    limit_decompression,
    shared_downloader,
)
from mixstream.tokens import TokenLengths, load_sidecar
from mixstream.weights import SchedulePast, Weights, WeightSchedule, normalize_weights

__all__ = ["DynamicStreamingDataset", "MixtureStateError"]

WeightUnit = Literal["samples", "tokens"]
WEIGHT_UNITS = ("samples", "tokens")

log = logging.getLogger(__name__)
STATE_VERSION = 2  # 2: compacted schedule (schedule_past, schedule_digest); 1 still loads
_REMOTE_SHARD = int(_ShardState.REMOTE)
_LOCAL_SHARD = int(_ShardState.LOCAL)
_download_lock = threading.Lock()
MAX_BATCH = 2**53 - 1  # batch indexes cross to workers as float64, exact up to here
_KNOWN_STATES = 8  # plan states remembered besides the initial and the resumed one
_HISTORY_FLOATS = 1 << 16  # weights of past schedule entries kept in memory and in a state
_HISTORY_ENTRIES = 1024


def history_entries(num_groups: int) -> int:
    """Past schedule entries a dataset keeps (in memory and in its state) before the current
    step: at most 1,024 and at most 65,536 weights' worth, at least 1. Older ones are
    summarized by their count, digest and weight sum (:class:`~mixstream.weights.SchedulePast`).
    """
    return max(1, min(_HISTORY_ENTRIES, _HISTORY_FLOATS // max(1, num_groups)))


class MixtureStateError(ValueError):
    """A saved state is malformed, inconsistent, or belongs to another mixture (other
    streams, seed or batch size)."""


@dataclass(frozen=True)
class _Resume:
    epoch: int
    state: PlanState


def _default_cache_root(key: str) -> str:
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "mixstream-cache", digest)


def _streams_from_manifest(
    manifest: Manifest, split: str, groups: Sequence[str] | None, cache_root: str | None
) -> tuple[list[str], list[Stream]]:
    names = list(groups) if groups is not None else manifest.group_names
    for name in names:
        manifest.split(name, split)  # raises a clear error for unknown groups/splits
    root = cache_root or _default_cache_root(f"{manifest.root}|{split}")
    # A local corpus is read like a remote one: its shards are copied and decompressed into
    # the cache, never into the corpus (which may be a read-only shared mount).
    streams: list[Stream] = [
        ResilientStream(
            remote=manifest.stream_url(name, split),
            local=os.path.join(root, name, split),
            index_digest=manifest.split(name, split).index_digest,
            index_named_by=manifest.location,
        )
        for name in names
    ]
    return names, streams


def _manifest_lengths(
    manifest: Manifest,
    split: str,
    names: Sequence[str],
    sizes: Sequence[int],
    retry_seconds: float,
) -> TokenLengths:
    """Each group's token lengths from the manifest: ``seq_len`` for packed streams, else the
    stream's length sidecar, downloaded and checked (:func:`mixstream.tokens.load_sidecar`)."""
    sample = manifest.sample
    if sample.get("format") == "tokens":
        seq_len = sample.get("seq_len")
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ManifestError(
                f"{manifest.location}: sample.seq_len is {seq_len!r}; expected a positive integer"
            )
        return TokenLengths([seq_len] * len(names))
    per_group: list[int | np.ndarray] = []
    for name, size in zip(names, sizes, strict=True):
        info = manifest.split(name, split)
        entry = info.lengths
        if entry is None:
            raise ManifestError(
                f"weight_unit='tokens' needs each sample's token count, but {name}/{split} in "
                f"{manifest.location} has no length sidecar; re-convert the corpus with this "
                "shard-tools (it writes one per text stream) or pass token_lengths="
            )
        where = f"{name}/{split} length sidecar in {manifest.location}"
        if not isinstance(entry, Mapping):
            raise ManifestError(f"{where}: expected an object, got {entry!r:.80}")
        if info.samples != size:
            raise ManifestError(
                f"{manifest.location} says {name}/{split} holds {info.samples} samples but its "
                f"index holds {size}; re-convert the corpus"
            )
        basename = check_path(entry.get("basename"), "", "length sidecar", where, ManifestError)
        url = storage.join(manifest.stream_url(name, split), basename)
        stored, limit = entry.get("bytes"), 8 * size + 4096
        if isinstance(stored, bool) or not isinstance(stored, int) or stored > limit:
            raise ManifestError(  # checked before the download: it is read into memory
                f"{where}: bytes is {stored!r}; a sidecar of {size} lengths is at most "
                f"{limit} bytes: the manifest is corrupt, re-convert the corpus"
            )
        try:
            data = storage.read_bytes(url, retry_seconds)
        except storage.StorageError as exc:
            raise ManifestError(f"cannot read {url}, the {where}: {exc}") from None
        per_group.append(load_sidecar(data, entry, size, url))
    return TokenLengths(per_group)


class DynamicStreamingDataset(StreamingDataset):
    """A mixture of groups whose sampling weights can change during the epoch.

    Args:
        manifest: a ``mixture.json`` (or the corpus root holding it), local or ``s3://``.
        streams: alternatively, one ``streaming.Stream`` per group (names via ``groups``).
        split: which split of the manifest to read (``train``, ``val``, ``test``).
        groups: subset/order of groups to use (default: all groups of the manifest).
        weights: initial weights (mapping or vector); ``None`` means uniform ("stratified").
        batch_size: per-device batch size; the global batch is ``batch_size x world size``.
        seed: seeds every shuffle; the sample order is a pure function of
            (seed, streams, global batch size, weight schedule, and token lengths with
            ``weight_unit="tokens"``).
        shuffle: shuffle within groups (block shuffle) and within each global batch.
        shuffle_block_size: samples per shuffle block; a reader works within one block of
            each group at a time, so this bounds the shards it touches.
        epoch_size: samples per epoch (default: all samples of all groups).
        local: cache directory (default: a temp dir keyed by manifest). Shards of a local
            corpus are decompressed here too; the corpus itself is only ever read.
        cache_limit, predownload, download_timeout: as in ``StreamingDataset``.
        download_retry_seconds: how long to keep retrying a file whose download fails with a
            transient error (unreachable store, resets, timeouts, 5xx, ``SlowDown``), with
            exponential backoff and jitter, before failing with a message naming the file
            and the endpoint (see :mod:`mixstream.stream`). ``download_retry`` is only used
            by ``streams=`` of a ``Stream`` subclass of the caller's own.
        validate_hash: hash every shard is checked against on download, on decompression
            and (with ``verify_cache``) on first use per process; ``xxh64`` (what shard-tools
            writes) by default, ``None`` to skip hashing. Sizes are always checked; shards
            whose index has no such hash (plain streaming writes none unless asked) are
            checked by size only, with a warning.
        verify_cache: check decompressed shards already in the cache against their index on
            first use in each process, and fetch damaged ones again.
        num_workers, prefetch_factor: what the DataLoader will use; they set the automatic
            update lag ``num_workers * prefetch_factor + 1`` (1 with no workers).
        update_lag: explicit lag in global batches (overrides the automatic one).
        lockstep: workers never run past the last step the trainer announced through
            :meth:`set_weights`/:meth:`advance` plus the lag (our Composer algorithms do
            announce every step). Without it, workers rely on the lag alone and a late update
            (one for a batch already produced) raises instead of being silently ignored.
        lockstep_timeout: seconds a worker waits for the trainer to announce a step before
            raising (a training loop that never calls :meth:`advance` would otherwise hang
            forever); ``None`` waits forever.
        weight_unit: ``"samples"`` (weights are shares of samples) or ``"tokens"`` (shares
            of tokens, for variable-length samples; see :mod:`mixstream.tokens`). Packed
            corpora, whose samples all have one length, give the same sequence either way.
        token_lengths: with ``weight_unit="tokens"``, each group's per-sample token counts
            (a mapping by group name or a sequence in group order; each an integer array
            of one count per sample, or one integer for all of the group's samples). Default:
            from the manifest (``seq_len`` of a packed corpus, or each stream's length
            sidecar written by ``shard-tools convert``); required with ``streams=``.
    """

    def __init__(
        self,
        *,
        manifest: str | Manifest | None = None,
        streams: Sequence[Stream] | None = None,
        split: str = "train",
        groups: Sequence[str] | None = None,
        weights: Weights | None = None,
        batch_size: int,
        seed: int = 9176,
        shuffle: bool = True,
        shuffle_block_size: int = 1 << 18,
        epoch_size: int | None = None,
        local: str | None = None,
        cache_limit: int | str | None = None,
        predownload: int | None = None,
        download_retry: int = 2,
        download_retry_seconds: float = DEFAULT_RETRY_SECONDS,
        download_timeout: float = 60,
        validate_hash: str | None = "xxh64",
        verify_cache: bool = True,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        update_lag: int | None = None,
        lockstep: bool = False,
        lockstep_timeout: float | None = 600.0,
        weight_unit: WeightUnit = "samples",
        token_lengths: Sequence[Any] | Mapping[str, Any] | None = None,
    ) -> None:
        if (manifest is None) == (streams is None):
            raise ValueError("pass exactly one of manifest= or streams=")
        if weight_unit not in WEIGHT_UNITS:
            raise ValueError(f"weight_unit must be 'samples' or 'tokens', got {weight_unit!r}")
        if token_lengths is not None and weight_unit != "tokens":
            raise ValueError(
                "token_lengths= is only used with weight_unit='tokens'; pass both or neither"
            )
        if streams is not None and weight_unit == "tokens" and token_lengths is None:
            raise ValueError(
                "weight_unit='tokens' with streams= needs token_lengths= (each group's "
                "per-sample token counts); a manifest provides them itself"
            )
        if batch_size is None or batch_size <= 0:
            raise ValueError(f"batch_size (per device) must be positive, got {batch_size}")
        retry_seconds = check_retry_seconds(download_retry_seconds)
        if manifest is not None:
            if not isinstance(manifest, Manifest):
                manifest = Manifest.load(manifest, retry_seconds)
            self.manifest: Manifest | None = manifest
            self.cache_root = local  # other splits of this manifest are cached beside it
            names, streams = _streams_from_manifest(manifest, split, groups, local)
            self._column = manifest.sample.get("column")
        else:
            assert streams is not None
            self.manifest = None
            self.cache_root = None
            names = (
                list(groups) if groups is not None else [f"group{i}" for i in range(len(streams))]
            )
            if len(names) != len(streams):
                raise ValueError(f"{len(names)} group names for {len(streams)} streams")
            self._column = None
        if len(set(names)) != len(names):
            raise ValueError(f"group names must be unique, got {names}")
        if validate_hash is not None and not is_hash(validate_hash):
            raise ValueError(
                f"validate_hash must be one of {sorted(get_hashes())} or None, got "
                f"{validate_hash!r}"
            )
        self.verify_cache = bool(verify_cache)
        # streaming builds its sample->shard table with O(samples) memory; swap in ours for
        # the duration of its constructor (the only place it is created).
        original = streaming_dataset_module.Spanner
        streaming_dataset_module.Spanner = ShardSpanner
        # Shared memory: the prefix is agreed among the node's ranks under a node-wide lock,
        # and what this process holds is released at close/GC (see mixstream.sharedmem).
        holdings = sharedmem.Holdings()
        try:
            # streaming's constructor fills in each stream's defaults; copies keep the
            # caller's as given. Each copy checks its index before any shard I/O.
            copies = [_resilient(copy.copy(s), retry_seconds) for s in streams]
            unhashed: list[tuple[str, int, int, int]] = []
            for s in copies:
                s.get_shards = _checked_get_shards(  # type: ignore[method-assign]
                    s, self.verify_cache, not cache_limit, unhashed
                )
                if isinstance(s, ResilientStream):
                    s.link_local = self.verify_cache and not cache_limit
            try:
                with sharedmem.agreeing_prefix(holdings), sharedmem.recording(holdings.segments):
                    super().__init__(
                        streams=copies,
                        batch_size=batch_size,
                        shuffle=False,
                        cache_limit=cache_limit,
                        predownload=predownload,
                        download_retry=download_retry,
                        download_timeout=download_timeout,
                        validate_hash=validate_hash,
                    )
            finally:
                for s in copies:
                    s.__dict__.pop("get_shards", None)  # keeps the streams picklable
        except BaseException:
            holdings.release()
            raise
        finally:
            streaming_dataset_module.Spanner = original
        _warn_unhashed(unhashed, len(copies), validate_hash)
        if sharedmem.created_prefix(holdings.segments):
            holdings.locks = [self._shared_barrier.filelock_path, self._cache_filelock_path]
        self._release = weakref.finalize(self, holdings.release)
        self.group_names = names
        self.split = split
        self.device_batch_size = int(batch_size)
        self.world_size = self._parallel_rank_world.num_ranks
        self.global_batch_size = self.device_batch_size * self.world_size
        self.num_workers = int(num_workers)
        if update_lag is None:
            update_lag = self.num_workers * int(prefetch_factor) + 1 if self.num_workers else 1
        if update_lag < 1:
            raise ValueError(f"update_lag must be >= 1, got {update_lag}")
        self.update_lag = int(update_lag)
        self.lockstep = bool(lockstep)
        if lockstep_timeout is not None and not lockstep_timeout > 0:
            raise ValueError(f"lockstep_timeout must be positive or None, got {lockstep_timeout}")
        self.lockstep_timeout = lockstep_timeout
        self.seed = int(seed)
        self.epoch_size = int(epoch_size) if epoch_size is not None else int(self.num_samples)
        self.batches_per_epoch = self.epoch_size // self.global_batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"epoch of {self.epoch_size} samples is smaller than one global batch of "
                f"{self.global_batch_size}; lower batch_size or raise epoch_size"
            )
        sizes = [int(n) for n in self.samples_per_stream]
        self.weight_unit: WeightUnit = weight_unit
        lengths = None
        if weight_unit == "tokens":
            if token_lengths is not None:
                lengths = TokenLengths.build(token_lengths, names, sizes)
            else:
                assert self.manifest is not None
                lengths = _manifest_lengths(self.manifest, split, names, sizes, retry_seconds)
        self.plan = MixturePlan(
            sizes,
            self.global_batch_size,
            seed=self.seed,
            shuffle=shuffle,
            block_size=shuffle_block_size,
            lengths=lengths,
        )
        # What the look-ahead expects of each unit of weight, in samples (tokens mode: a
        # group of short samples is drawn more often than its token weight).
        self._per_sample = (
            np.ones(len(names))
            if lengths is None
            else np.array([lengths.mean(g) for g in range(len(names))])
        )
        initial = (
            np.full(len(names), 1.0 / len(names))
            if weights is None
            else normalize_weights(weights, names)
        )
        self._schedule = WeightSchedule()
        self._schedule.set(0, initial)
        self._channel = ScheduleChannel(len(names))
        self._channel.publish(0, initial)
        self._step = 0  # last step announced by the trainer (batches consumed)
        # Plan states computed so far, by batch: any later one is reached by stepping from
        # the nearest earlier one. Only states consistent with the current schedule are kept.
        self._known: dict[int, PlanState] = {0: self.plan.initial_state()}
        self._resume: _Resume | None = None
        self._history = history_entries(len(names))
        self._iter_batch: int | None = None  # where an iterator in this process is planning
        self._creator_pid = os.getpid()
        self._publish_horizon()

    # ------------------------------------------------------------------ trainer side
    def __len__(self) -> int:
        """Samples per epoch on this rank (whole global batches only)."""
        return self.batches_per_epoch * self.device_batch_size

    @property
    def step(self) -> int:
        """Global batches the trainer has announced (``advance``/``set_weights``) or resumed at."""
        return self._step

    @property
    def started(self) -> bool:
        """Whether an iterator (here or in a DataLoader worker) has begun planning batches."""
        return self._channel.started

    @property
    def weights(self) -> dict[str, float]:
        """Weights in force at the trainer's current step."""
        return self._as_dict(self._schedule.at(self._step))

    @property
    def schedule(self) -> list[tuple[int, dict[str, float]]]:
        """The weight changes kept, as ``(effective global batch, weights)``.

        Every change from the one in force at the trainer's step on, and the
        :func:`history_entries` changes before it (all of them in runs with fewer updates);
        older ones are summarized in ``weight_schedule.past`` (their count, digest and
        weight sum, so ``weight_schedule.average`` stays exact).
        """
        return [(b, self._as_dict(w)) for b, w in self._schedule.entries]

    def weights_at(self, batch: int) -> np.ndarray:
        """The weight vector in force at global ``batch`` (O(groups), no schedule copy)."""
        return self._schedule.at(batch)

    @property
    def weight_schedule(self) -> WeightSchedule:
        """A copy of the schedule as a :class:`~mixstream.weights.WeightSchedule` (vectors)."""
        return self._schedule.copy()

    @property
    def realized_counts(self) -> dict[str, int]:
        """Samples drawn per group over all global batches before the current step."""
        counts = self._plan_state(self._step).counts
        return dict(zip(self.group_names, counts, strict=True))

    @property
    def realized_tokens(self) -> dict[str, int]:
        """Tokens drawn per group over all global batches before the current step
        (``weight_unit="tokens"`` only: the samples unit knows no lengths)."""
        tokens = self.plan.tokens_of(self._plan_state(self._step))
        if tokens is None:
            raise ValueError("realized_tokens needs weight_unit='tokens' (token lengths)")
        return dict(zip(self.group_names, tokens, strict=True))

    def _nearest_known(self, batch: int) -> PlanState:
        """The known plan state closest to, and not after, the one before ``batch``."""
        candidates = list(self._known.values())
        if self._resume is not None:
            candidates.append(self._resume.state)
        usable = [s for s in candidates if s.batch <= batch and self._schedule.covers(s.batch)]
        if not usable:
            raise ValueError(
                f"cannot plan global batch {batch}: it precedes every plan state kept (the "
                f"weight schedule keeps the last {self._history} changes before the current "
                f"step, from batch {self._schedule.first_batch}); save and query states at "
                "the trainer's current step"
            )
        return max(usable, key=lambda s: s.batch)

    def _remember(self, state: PlanState) -> None:
        self._known[state.batch] = state
        if len(self._known) > _KNOWN_STATES + 1:
            del self._known[next(b for b in self._known if b != 0)]  # oldest, never the initial

    def _plan_state(self, batch: int) -> PlanState:
        """The plan state before global ``batch`` under the current schedule.

        Any batch may be asked for in any order (a checkpoint ahead of the trainer's last
        announced step, then the step itself): the state is stepped from the nearest known
        state before it, never back from a later one.
        """
        state = self.plan.advance(self._nearest_known(batch), self._schedule, batch)
        self._remember(state)
        return state

    def _forget_after(self, batch: int) -> None:
        """Drop plan states that the weights in force from ``batch`` on went into."""
        for b in [b for b in self._known if b > batch]:
            del self._known[b]

    def _catch_up(self) -> None:
        """Plan up to the trainer's announced step and compact the schedule behind it.

        One allocation per announced step (what every worker computes per batch anyway), so
        :meth:`state_dict` at the current step costs O(groups), not a replay of every step
        since the last one. Schedule entries older than the :func:`history_entries` before
        the one in force at the step go into the schedule's summary (amortized O(1)).
        """
        self._plan_state(self._step)
        floor = self._step if self._iter_batch is None else min(self._step, self._iter_batch)
        if self._schedule.compact(floor, self._history):
            for b in [b for b in self._known if not self._schedule.covers(b)]:
                del self._known[b]

    def _as_dict(self, vec: np.ndarray) -> dict[str, float]:
        return {g: float(x) for g, x in zip(self.group_names, vec, strict=True)}

    def _publish_horizon(self) -> None:
        self._channel.set_horizon(self._step + self.update_lag if self.lockstep else UNBOUNDED)

    def _check_step(self, step: int, what: str = "step") -> int:
        step = _whole_batch(step, what, ValueError)
        if step < self._step:
            raise ValueError(
                f"step {step} is in the past: the dataset was already told about step "
                f"{self._step}; pass the trainer's current batch count"
            )
        return step

    def advance(self, step: int) -> None:
        """Announce that the trainer has consumed ``step`` global batches.

        Paces lockstep workers, and keeps :meth:`state_dict` O(groups): the plan is advanced
        here, one step at a time, instead of being replayed when a checkpoint is saved.
        """
        self._step = self._check_step(step)
        self._publish_horizon()
        self._catch_up()

    def set_weights(self, weights: Weights, step: int, effective_step: int | None = None) -> int:
        """Use ``weights`` from global batch ``step + update_lag`` (or a later ``effective_step``).

        Collective: call on every rank; rank 0's weights, step and effective step are
        broadcast so every rank applies the same change. Returns the effective batch.
        Until iteration has begun, ``effective_step`` may be as early as ``step`` itself.
        """
        payload: Any
        try:
            vec = normalize_weights(weights, self.group_names)
            step = self._check_step(step)
            earliest = step + self.update_lag
            effective = (
                earliest
                if effective_step is None
                else _whole_batch(effective_step, "effective_step", ValueError)
            )
            # Before the first batch is planned nothing can be prefetched: a schedule set up
            # front (e.g. at Composer's FIT_START) may start right at ``step``.
            floor = earliest if self._channel.started else step
            if effective < floor:
                raise ValueError(
                    f"effective step {effective} is inside the update lag window: batches "
                    f"before {earliest} (step {step} + lag {self.update_lag}) may already be "
                    "prefetched by dataloader workers"
                )
            payload = (vec, step, effective)
        except ValueError as exc:
            payload = exc
        payload = _broadcast_from_rank0(payload)
        if isinstance(payload, BaseException):
            raise ValueError(str(payload)) from None
        vec, step, effective = payload
        self._schedule.set(effective, vec)
        self._forget_after(effective)
        self._channel.publish(effective, vec)
        self._step = step
        self._publish_horizon()
        self._catch_up()
        return effective

    # ------------------------------------------------------------------ resumption
    def state_dict(self, num_samples: int, from_beginning: bool) -> dict[str, Any]:
        """What is needed to continue exactly (Composer's signature; ``num_samples`` is global).

        O(groups x kept schedule entries), whatever the position in the run: the plan state
        at the checkpoint (two numbers per group; with :meth:`advance` or
        :meth:`set_weights` called every step it is already computed), the schedule entry
        in force there and every later one (updates still pending included), the
        :func:`history_entries` before it, and a summary of all earlier ones
        (``schedule_past``: their count, chained digest and weight sum). ``schedule_digest``
        is the digest of the whole schedule, compacted part included.
        """
        if num_samples % self.global_batch_size:
            log.warning(
                "state_dict: %d samples is not a whole number of global batches of %d; "
                "rounding down",
                num_samples,
                self.global_batch_size,
            )
        batch = self._batch_for(num_samples, from_beginning)
        state = self._plan_state(batch)
        saved = self._schedule.tail(batch, self._history)
        past = saved.past.weight_batches
        return {
            "version": STATE_VERSION,
            "epoch": batch // self.batches_per_epoch,
            "sample_in_epoch": (batch % self.batches_per_epoch) * self.global_batch_size,
            "plan": state.to_dict(),
            "schedule": saved.to_list(),
            "schedule_past": {
                "entries": saved.past.entries,
                "digest": saved.past.digest.hex(),
                "weight_batches": [0.0] * self.plan.num_groups if past is None else past.tolist(),
            },
            "schedule_digest": saved.digest.hex(),
            "identity": self._identity(),
            "update_lag": self.update_lag,
        }

    def _batch_for(self, num_samples: int, from_beginning: bool) -> int:
        """Global batch index of the checkpoint, from the epoch counter and samples in epoch."""
        per = self.global_batch_size
        started = self.next_epoch - 1  # latest epoch whose iteration began (-1: none)
        if self._resume is not None and self._resume.epoch > started:
            # Resumed, and the resumed epoch has not started iterating yet.
            return self._resume.state.batch + (0 if from_beginning else num_samples // per)
        if not from_beginning and self._resume is not None and self._resume.epoch == started:
            return self._resume.state.batch + num_samples // per
        if started < 0:
            return num_samples // per
        if num_samples == 0:
            # Composer saves at sample 0 of an epoch only once the previous epoch ended.
            return (started + 1) * self.batches_per_epoch
        return started * self.batches_per_epoch + num_samples // per

    def _identity(self) -> dict[str, Any]:
        streams = []
        for name, stream, n in zip(
            self.group_names, self.streams, self.samples_per_stream, strict=True
        ):
            streams.append(
                {
                    "group": name,
                    "source": stream.remote or stream.local,
                    "samples": int(n),
                }
            )
        identity = {
            "streams": streams,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "shuffle": self.plan.shuffle,
            "shuffle_block_size": self.plan.block_size,
            "epoch_size": self.epoch_size,
            "weight_unit": self.weight_unit,
        }
        if self.plan.lengths is not None:
            identity["token_lengths"] = self._lengths_digest()
        return identity

    def _lengths_digest(self) -> str:
        if not hasattr(self, "_digest_of_lengths"):
            assert self.plan.lengths is not None
            self._digest_of_lengths = self.plan.lengths.digest()
        return self._digest_of_lengths

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        """Continue exactly where ``obj`` was saved, on any world size or worker count.

        The whole state is checked first (:func:`_check_state`): a checkpoint is a file that
        may be truncated, edited or from elsewhere, and a wrong count or weight would not
        fail later, it would silently change the sample order.
        """
        if not isinstance(obj, Mapping) or obj.get("version") not in (1, STATE_VERSION):
            raise MixtureStateError(
                "not a DynamicStreamingDataset state (or from another mixstream version); "
                "was it saved by plain StreamingDataset?"
            )
        saved, mine = _check_identity(obj), self._identity()
        unit = saved.get("weight_unit", "samples")  # states before weight_unit: samples
        if unit != self.weight_unit:
            raise MixtureStateError(
                f"cannot resume: state field identity.weight_unit is {unit!r} but this dataset "
                f"has weight_unit={self.weight_unit!r}; the two plan different sequences (a "
                f"share of samples is not a share of tokens): build the dataset with "
                f"weight_unit={unit!r} to continue that run"
            )
        if saved.get("token_lengths") != mine.get("token_lengths"):
            raise MixtureStateError(
                "cannot resume: state field identity.token_lengths (the digest of every "
                "sample's token count) differs from this dataset's: the lengths, and so the "
                "plan, are not the ones the state was saved with"
            )
        problems = []
        for key in ("seed", "global_batch_size", "shuffle", "shuffle_block_size", "epoch_size"):
            if saved[key] != mine[key]:
                problems.append(f"{key} {saved[key]} (saved) vs {mine[key]} (now)")
        old = [(s["group"], s["samples"]) for s in saved["streams"]]
        new = [(s["group"], s["samples"]) for s in mine["streams"]]
        if old != new:
            problems.append(f"streams {old} (saved) vs {new} (now)")
        if problems:
            hint = ""
            if saved["global_batch_size"] != mine["global_batch_size"]:
                hint = (
                    "; keep the global batch size when resuming on another world size "
                    f"(per-device batch = {saved['global_batch_size']} / world size)"
                )
            raise MixtureStateError(
                "cannot resume: the saved state belongs to a different mixture: "
                + "; ".join(problems)
                + hint
            )
        state, schedule, update_lag = _check_state(
            obj,
            self.plan.num_groups,
            self.global_batch_size,
            self.batches_per_epoch,
            self.plan.lengths if self.plan.counts_tokens else None,
        )
        self._schedule = schedule
        self._channel.publish_many(*schedule.arrays())
        if update_lag is not None and update_lag > self.update_lag:
            log.warning(
                "resuming with update_lag %d, smaller than the saved %d",
                self.update_lag,
                update_lag,
            )
        self._resume = _Resume(state.batch // self.batches_per_epoch, state)
        self._known = {0: self.plan.initial_state()}
        if not self._schedule.covers(0):
            self._known = {}
        self._step = state.batch
        self._publish_horizon()
        self._catch_up()

    # ------------------------------------------------------------------ worker side
    def _begin_epoch(self) -> tuple[int, PlanState]:
        """Agree on the epoch with the node's other workers; returns (epoch, start state)."""
        if not hasattr(self._shared_barrier, "lock"):
            self._shared_barrier.lock = FileLock(self._shared_barrier.filelock_path)
        presumed = self.next_epoch
        if self._resume is not None and self._resume.epoch >= presumed:
            epoch, start = self._resume.epoch, self._resume.state.batch
        else:
            epoch, start = presumed, presumed * self.batches_per_epoch
        self._shared_barrier(self._unique_worker_world.workers_per_node)
        # Every process, not only the local leader: one that finished its share of a short
        # epoch while the leader lagged behind would otherwise read the old counter and
        # replay the epoch. The value is the same in all of them.
        self.next_epoch = epoch + 1
        # The trainer's copy of the dataset (ours, pickled or forked) may hold states planned
        # with weights that updates published since then have replaced.
        applied = self._channel.sync(self._schedule)
        if applied:
            self._forget_after(min(applied))
        base = self._nearest_known(start)
        return epoch, base if base.batch == start else self._plan_to(base, start)

    def _plan_to(self, state: PlanState, batch: int) -> PlanState:
        while state.batch < batch:
            self._wait_final(state.batch)
            _, state = self.plan.step(state, self._schedule)
        return state

    def _wait_final(self, batch: int) -> None:
        """Make sure the weights for ``batch`` are final and in our copy of the schedule."""
        if self.lockstep:
            try:
                self._channel.wait_for(batch, timeout=self.lockstep_timeout)
            except TimeoutError:
                raise TimeoutError(
                    f"lockstep: waited {self.lockstep_timeout:g} s for the training loop to "
                    f"announce step {batch - self.update_lag + 1} (needed to plan global batch "
                    f"{batch} with update_lag {self.update_lag}); with lockstep=True call "
                    "dataset.advance(step) (or set_weights) after every batch, or build the "
                    "dataset with lockstep=False"
                ) from None
        late = [b for b in self._channel.sync(self._schedule) if b <= self._planned_through]
        if late:
            raise RuntimeError(
                f"a weight update effective at global batch {min(late)} arrived after batch "
                f"{self._planned_through} was already planned; raise update_lag "
                f"(now {self.update_lag}) to at least num_workers * prefetch_factor + 1, "
                "or call set_weights() before fetching the next batch"
            )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if os.getpid() != self._creator_pid:
            # A forked worker inherits the parent's S3 clients and their open keep-alive
            # sockets; two processes reading one socket get each other's bytes (stalls and
            # corrupt shards). Drop them so each worker opens its own connections.
            for stream in self.streams:
                stream._downloader.clean_up()
        if get_worker_info() is not None:
            # A worker of a killed trainer would otherwise run on for seconds (torch checks
            # its parent every 5 s, between batches), holding shared memory and CPU.
            sharedmem.enter_worker(self._shm_prefix_int)
        self._unique_worker_world = self._unique_rank_world.detect_workers()
        self._parallel_worker_world = self._parallel_rank_world.detect_workers()
        worker = self._parallel_worker_world
        workers_per_rank = worker.workers_per_rank
        if self.num_workers and workers_per_rank > self.num_workers:
            raise ValueError(
                f"the DataLoader runs {workers_per_rank} workers but the dataset was built "
                f"with num_workers={self.num_workers}; pass the same num_workers to both so "
                "the update lag covers every prefetched batch"
            )
        if not self.num_workers and workers_per_rank > 1 and self.update_lag <= workers_per_rank:
            raise ValueError(
                f"the DataLoader runs {workers_per_rank} workers but update_lag is "
                f"{self.update_lag}; pass num_workers={workers_per_rank} to the dataset"
            )
        # A thread claims a shard before it waits for a decompression slot: more threads than
        # slots would claim shards another process could have been working on. From an
        # object store, one more thread downloads while the others decompress.
        threads = limit_decompression(self._parallel_rank_world.ranks_per_node * workers_per_rank)
        if any("://" in (stream.remote or "") for stream in self.streams):
            threads += 1
        self._channel.mark_started()
        self._planned_through = -1
        self._group_sizes = np.asarray(self.plan.group_sizes, dtype=np.int64)
        self._lookahead = np.zeros(self.plan.num_groups, dtype=np.int64)
        epoch, state = self._begin_epoch()
        self._planned_through = state.batch - 1
        end = (epoch + 1) * self.batches_per_epoch
        rank = self._parallel_rank_world.rank
        lo, hi = rank * self.device_batch_size, (rank + 1) * self.device_batch_size
        first = state.batch
        here = os.getpid() == self._creator_pid  # iterating in the trainer's own process
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mixstream-prefetch")
        try:
            while state.batch < end:
                self._wait_final(state.batch)
                draw, state = self.plan.step(state, self._schedule)
                self._planned_through = draw.batch
                self._keep_plan(state, here)
                if (draw.batch - first) % workers_per_rank != worker.worker_of_rank:
                    continue
                ids, groups = self.plan.layout(draw, lo, hi)
                self._prefetch(pool, ids, state)
                for sample_id, group in zip(ids.tolist(), groups.tolist(), strict=True):
                    yield self._sample(sample_id, group)
        finally:
            # Let downloads already running finish: a shard left in the PREPARING state by an
            # exiting worker would block every other worker that needs it, forever.
            pool.shutdown(wait=True, cancel_futures=True)
            if here:
                self._iter_batch = None

    def _keep_plan(self, state: PlanState, here: bool) -> None:
        """Remember the state the iterator reached, and compact the schedule behind it.

        In the trainer's process (0 workers) the trainer's :meth:`advance` then finds the
        state already planned; a worker keeps its own copy of the schedule bounded (it never
        plans before where it is) and starts a next epoch (persistent workers) from here.
        """
        self._remember(state)
        if here:
            self._iter_batch = state.batch
        elif self._schedule.compact(state.batch, self._history):
            for b in [b for b in self._known if not self._schedule.covers(b)]:
                del self._known[b]

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        """streaming's, plus: a failed download returns the shard to REMOTE, and downloads
        are serialized within a process when a cache limit is set.

        streaming leaves it PREPARING, and every other worker waiting for it would then wait
        forever instead of retrying or failing.
        """
        try:
            if self.cache_limit:
                # A download counts against the cache only once complete; one at a time per
                # process keeps concurrent downloads from overshooting the limit together.
                with _download_lock:
                    super().prepare_shard(shard_id, blocking)
            else:
                super().prepare_shard(shard_id, blocking)
        except BaseException:
            if not hasattr(self, "_cache_filelock"):
                self._cache_filelock = FileLock(self._cache_filelock_path)
            with self._cache_filelock:
                if self._shard_states[shard_id] == _ShardState.PREPARING:
                    self._shard_states[shard_id] = _ShardState.REMOTE
            raise

    def _sample(self, sample_id: int, group: int) -> dict[str, Any]:
        # Columns keep their stored dtype (token ids are usually uint16): widening here would
        # multiply what crosses from workers to the trainer; models widen on device.
        sample = dict(self[sample_id])
        for key, value in sample.items():
            # MDS decodes arrays as read-only views of the shard; torch warns on those.
            if isinstance(value, np.ndarray) and not value.flags.writeable:
                sample[key] = value.copy()
        sample["group"] = group
        return sample

    def _shards_of(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.sample_offset_per_shard, ids, side="right") - 1

    def _prefetch(self, pool: ThreadPoolExecutor, ids: np.ndarray, after: PlanState) -> None:
        """Fetch this batch's shards concurrently, and start on each group's next shards.

        Look-ahead follows each group's own order, which does not depend on the weights, so it
        never guesses the mixture; only how far ahead it looks scales with the weights. Each
        group's positions are examined once: ``_lookahead`` remembers how far we got.
        """
        states = self._shard_states.numpy()
        shards = np.unique(self._shards_of(ids))
        needed = shards[states[shards] == _REMOTE_SHARD].tolist()
        if needed:
            # Workers of a rank need mostly the same shards for their first batches. Skip
            # those another process is preparing (as streaming's own prefetch does), so
            # processes split the work instead of queueing behind each other in one order,
            # then wait for the rest.
            wait([pool.submit(self.prepare_shard, s, False) for s in needed])
            for s in needed:
                if states[s] != _LOCAL_SHARD:
                    self.prepare_shard(s)
        # Vectorized over groups: only groups whose horizon moved (about those drawn in this
        # batch) are looked at one by one, so the cost per batch is O(groups) in numpy and
        # O(groups drawn) in Python.
        weights = self._schedule.at(after.batch)
        if self.plan.counts_tokens:
            weights = weights / self._per_sample
            weights /= weights.sum()
        budget = self.predownload or 8 * self.device_batch_size
        counts = np.asarray(after.counts, dtype=np.int64)
        ahead = np.minimum(self._group_sizes, np.ceil(budget * weights).astype(np.int64) + 1)
        target = counts + ahead
        start = np.maximum(counts, self._lookahead)
        moving = np.flatnonzero((weights > 0) & (target > start))
        if not moving.size:
            return
        self._lookahead[moving] = target[moving]
        if not (states == _REMOTE_SHARD).any():
            return  # every shard is local: nothing to start
        upcoming = self.plan.positions_many(
            moving.tolist(), start[moving].tolist(), (target - start)[moving].tolist()
        )
        ahead_shards = np.unique(self._shards_of(np.concatenate(upcoming)))
        for s in ahead_shards[states[ahead_shards] == _REMOTE_SHARD].tolist():
            pool.submit(self.prepare_shard, s, False)

    def __getstate__(self) -> dict[str, Any]:
        # Spawned workers get a copy without the finalizer: only the creating process (which
        # keeps it) releases the shared memory.
        state = self.__dict__.copy()
        state.pop("_release", None)
        return state

    def close(self) -> None:
        """Release what this dataset holds in this process (also done at garbage collection).

        Its weight channel, streaming's shared memory segments and their file descriptors,
        its S3 clients, and -- where this process registered the node's shared-memory prefix
        -- streaming's lock files for it. The dataset cannot be iterated afterwards. Call it
        on every rank once training is done.
        """
        self._channel.close()
        for shard in self.shards:
            if isinstance(shard, CheckedMDSReader):
                shard.close_file()
        for stream in self.streams:
            stream._downloader.clean_up()
        if hasattr(self, "_release"):
            self._release()


def _warn_unhashed(
    unhashed: Sequence[tuple[str, int, int, int]], streams: int, validate_hash: str | None
) -> None:
    """One warning for all streams whose shards are checked by size only (a corpus of
    thousands of groups would otherwise print a line per stream)."""
    if not unhashed:
        return
    where, count, total, first = unhashed[0]
    others = f" and {len(unhashed) - 1} more of the {streams} streams" if len(unhashed) > 1 else ""
    log.warning(
        "%s: %d of %d shards have no %s hash (shard %d first)%s; they are checked by size "
        "only. Re-convert the stream%s with shard-tools (which records xxh64) to have them "
        "verified",
        where,
        count,
        total,
        validate_hash,
        first,
        others,
        "s" if len(unhashed) > 1 else "",
    )


def _whole_batch(value: Any, what: str, error: type[ValueError]) -> int:
    """``value`` as a global batch index, or ``error``: an integer from 0 to ``MAX_BATCH``.

    Batch indexes travel through the worker channel as float64, exact only below 2**53; a
    float step (1.7) would silently be truncated.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise error(f"{what} must be an integer global batch index, got {value!r}")
    if not 0 <= int(value) <= MAX_BATCH:
        raise error(f"{what} {value} is outside the run: expected 0 to {MAX_BATCH}")
    return int(value)


def _field(obj: Mapping[str, Any], key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    """``obj[key]`` if present and of ``kind``, else a :class:`MixtureStateError` naming it."""
    if not isinstance(obj, Mapping):
        raise MixtureStateError(f"state field {where} must be an object, got {obj!r:.80}")
    path = f"{where}.{key}" if where else key
    if key not in obj:
        raise MixtureStateError(f"state field {path} is missing")
    value = obj[key]
    ok = isinstance(value, kind) and not (isinstance(value, bool) and bool not in _kinds(kind))
    if not ok:
        names = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in _kinds(kind))
        raise MixtureStateError(
            f"state field {path} must be {names}, got {type(value).__name__} {value!r:.80}"
        )
    return value


_KIND_NAMES = {
    numbers.Integral: "an integer",
    Mapping: "an object",
    list: "a list",
    str: "a string",
    bool: "true or false",
}


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _count_of(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise MixtureStateError(
            f"state field {where} must be a non-negative integer, got {value!r}"
        )
    return int(value)


def _vector(value: Any, where: str, num_groups: int) -> np.ndarray:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != num_groups:
        raise MixtureStateError(f"state field {where} must be a list of {num_groups} numbers")
    if all(type(x) is float for x in value):  # the usual case, checked in numpy
        vec = np.array(value, dtype=np.float64)
        if np.isfinite(vec).all() and (vec >= 0).all():
            return vec
    out = []
    for i, x in enumerate(value):
        if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x) or x < 0:
            raise MixtureStateError(
                f"state field {where}[{i}] must be a finite non-negative number, got {x!r}"
            )
        out.append(float(x))
    return np.array(out, dtype=np.float64)


def _matrix(rows: list[Any], where: str, num_groups: int) -> np.ndarray:
    """``rows`` (each ``where[i][1]``) as a (rows, groups) array, checked like :func:`_vector`.

    The usual case (lists of floats) is checked in numpy at once; anything else, row by row
    for the message.
    """
    if all(
        type(r) is list and len(r) == num_groups and all(type(x) is float for x in r) for r in rows
    ):
        out = np.array(rows, dtype=np.float64).reshape(len(rows), num_groups)
        if np.isfinite(out).all() and (out >= 0).all():
            return out
    return np.array(
        [_vector(r, f"{where}[{i}][1]", num_groups) for i, r in enumerate(rows)], dtype=np.float64
    ).reshape(len(rows), num_groups)


def _check_identity(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """The saved ``identity``, checked for the fields and types it is compared on."""
    identity = _field(obj, "identity", "", Mapping)
    for key in ("seed", "global_batch_size", "shuffle_block_size", "epoch_size"):
        _field(identity, key, "identity", numbers.Integral)
    _field(identity, "shuffle", "identity", bool)
    if "weight_unit" in identity:
        unit = _field(identity, "weight_unit", "identity", str)
        if unit not in WEIGHT_UNITS:
            raise MixtureStateError(
                f"state field identity.weight_unit must be 'samples' or 'tokens', got {unit!r:.40}"
            )
    if "token_lengths" in identity:
        _field(identity, "token_lengths", "identity", str)
    streams = _field(identity, "streams", "identity", list)
    for i, stream in enumerate(streams):
        _field(stream, "group", f"identity.streams[{i}]", str)
        _field(stream, "samples", f"identity.streams[{i}]", numbers.Integral)
    return identity


def _check_state(
    obj: Mapping[str, Any],
    num_groups: int,
    global_batch: int,
    batches_per_epoch: int,
    lengths: TokenLengths | None = None,
) -> tuple[PlanState, WeightSchedule, int | None]:
    """Parse a saved state, checking every field and how they agree with each other.

    Beyond types and ranges: the schedule starts at batch 0 (or, compacted, after the
    batches its ``schedule_past`` summarizes, and at or before ``plan.batch``) with strictly
    increasing batches and weights that sum to 1; the counts sum to the samples of ``batch``
    global batches; the targets are what the schedule implies (from the summary and the kept
    entries, O(kept entries), not by replaying anything); each count is within a batch of its
    target (the apportionment keeps them within about 2); epoch and sample_in_epoch name the
    same batch; ``schedule_digest`` is the digest chained from ``schedule_past.digest``
    through the kept entries. Every problem is a MixtureStateError naming the field.
    A token plan (``lengths``, see :func:`_check_tokens`) has token targets, which only a
    replay could derive from the schedule; they are checked against its tokens instead.
    Version 1 states (the whole schedule, no summary or digest) are read as uncompacted.
    """
    plan = _field(obj, "plan", "", Mapping)
    batch = _whole_batch(
        _field(plan, "batch", "plan", numbers.Integral), "state field plan.batch", MixtureStateError
    )
    counts_in = _field(plan, "counts", "plan", list)
    if len(counts_in) != num_groups:
        raise MixtureStateError(f"state field plan.counts must be a list of {num_groups} counts")
    counts = [_count_of(c, f"plan.counts[{g}]") for g, c in enumerate(counts_in)]
    targets = _vector(_field(plan, "targets", "plan", list), "plan.targets", num_groups)
    if sum(counts) != batch * global_batch:
        raise MixtureStateError(
            f"state field plan.counts sums to {sum(counts)}, but {batch} global batches of "
            f"{global_batch} hold {batch * global_batch} samples"
        )

    past = _check_past(obj, num_groups)
    entries = _field(obj, "schedule", "", list)
    if not entries:
        raise MixtureStateError("state field schedule is empty; it must start at batch 0")
    starts: list[int] = []
    rows: list[Any] = []
    previous = -1
    for i, entry in enumerate(entries):
        if type(entry) is list and len(entry) == 2 and type(entry[0]) is int:
            start = entry[0]  # the usual case; the range is checked with the order below
        else:
            start = -1
        if not 0 <= start <= MAX_BATCH:
            where = f"schedule[{i}]"
            if not isinstance(entry, Sequence) or isinstance(entry, str) or len(entry) != 2:
                raise MixtureStateError(f"state field {where} must be [batch, weights]")
            start = _whole_batch(entry[0], f"state field {where}[0]", MixtureStateError)
        if i == 0 and past.empty and start != 0:
            raise MixtureStateError(f"state field schedule[0] starts at batch {start}, not 0")
        if i == 0 and not past.empty and not 0 < start <= batch:
            raise MixtureStateError(
                f"state field schedule[0] starts at batch {start}: after {past.entries} compacted "
                f"entries the first kept one must start after 0 and at or before plan.batch "
                f"{batch} (it is the one in force there)"
            )
        if i and start <= previous:
            raise MixtureStateError(
                f"state field schedule[{i}] is at batch {start}, not after {previous}: "
                "schedule batches must be strictly increasing"
            )
        starts.append(start)
        rows.append(entry[1])
        previous = start
    weights = _matrix(rows, "schedule", num_groups)
    sums = weights.sum(axis=1)
    for i in np.flatnonzero(np.abs(sums - 1.0) > 1e-6 * np.maximum(np.abs(sums), 1.0))[:1]:
        raise MixtureStateError(
            f"state field schedule[{i}][1] sums to {sums[i]:.6g}; saved weights sum to 1"
        )
    schedule = WeightSchedule.from_arrays(np.asarray(starts, dtype=np.int64), weights, past)
    if not past.empty:
        covered = float(np.sum(past.weight_batches)) if past.weight_batches is not None else 0.0
        first = schedule.first_batch
        if abs(covered - first) > 1e-6 * max(1.0, first):
            raise MixtureStateError(
                f"state field schedule_past.weight_batches sums to {covered:.6g}, but it "
                f"summarizes the {first} batches before schedule[0] (weights sum to 1 per batch)"
            )

    tokens = None
    if lengths is not None:
        tokens = _check_tokens(plan, counts, targets, lengths)
    elif "tokens" in plan:
        raise MixtureStateError(
            "state field plan.tokens is present, but this dataset's plan counts samples (its "
            "samples all have one length); the state comes from a plan over other lengths"
        )
    expected = schedule.weight_batches(batch) * global_batch
    tolerance = 1e-6 * max(1.0, batch * global_batch)
    off_target = np.abs(targets - expected) > tolerance
    off_count = np.abs(np.asarray(counts, dtype=np.float64) - targets) > global_batch + 2
    if tokens is not None:
        off_target[:] = off_count[:] = False  # token targets: checked by _check_tokens
    for g in np.flatnonzero(off_target | off_count)[:1].tolist():  # the first, if any
        if off_target[g]:
            raise MixtureStateError(
                f"state field plan.targets[{g}] is {targets[g]:.6g}, but the schedule implies "
                f"{expected[g]:.6g} after {batch} batches"
            )
        if abs(counts[g] - targets[g]) > global_batch + 2:
            raise MixtureStateError(
                f"state field plan.counts[{g}] is {counts[g]}, more than a batch away from its "
                f"target {targets[g]:.6g}: the counts do not follow the schedule"
            )

    epoch = _count_of(_field(obj, "epoch", "", numbers.Integral), "epoch")
    in_epoch = _count_of(_field(obj, "sample_in_epoch", "", numbers.Integral), "sample_in_epoch")
    if (epoch, in_epoch) != (batch // batches_per_epoch, batch % batches_per_epoch * global_batch):
        raise MixtureStateError(
            f"state fields epoch {epoch} and sample_in_epoch {in_epoch} disagree with plan.batch "
            f"{batch} ({batches_per_epoch} batches of {global_batch} per epoch)"
        )
    lag = obj.get("update_lag")
    if lag is not None:
        lag = _count_of(lag, "update_lag")
    if obj.get("version") != 1:
        digest = _field(obj, "schedule_digest", "", str)
        if digest != schedule.digest.hex():
            raise MixtureStateError(
                f"state field schedule_digest {digest:.40} does not match the saved schedule "
                f"({schedule.digest.hex()} chained from schedule_past.digest through its "
                f"{len(entries)} entries): the state was edited or corrupted, or its parts come "
                "from different checkpoints"
            )
    state = PlanState(batch, tuple(float(t) for t in targets), tuple(counts), tokens)
    return state, schedule, lag


def _check_tokens(
    plan: Mapping[str, Any], counts: list[int], targets: np.ndarray, lengths: TokenLengths
) -> tuple[int, ...]:
    """A token plan's ``plan.tokens``, checked against its counts and targets in O(groups).

    The targets share out exactly the tokens drawn (weights sum to 1 at every slot); each
    group's tokens lie between its sample count times its shortest and longest sample; and
    each is within the rule's bound of its target (``Lmax_g + Lmax``, what weight changes
    stay under; :mod:`mixstream.tokens`). The exact tokens of a count would need the
    lengths of every position drawn: O(samples), not done.
    """
    raw = _field(plan, "tokens", "plan", list)
    if len(raw) != len(counts):
        raise MixtureStateError(f"state field plan.tokens must be a list of {len(counts)} counts")
    tokens = [_count_of(t, f"plan.tokens[{g}]") for g, t in enumerate(raw)]
    total = sum(tokens)
    if abs(float(targets.sum()) - total) > 1e-6 * max(1.0, total):
        raise MixtureStateError(
            f"state field plan.targets sums to {float(targets.sum()):.6g}, but plan.tokens "
            f"sums to {total}: token targets share out exactly the tokens drawn"
        )
    overall = max(lengths.longest)
    for g, (n, t) in enumerate(zip(counts, tokens, strict=True)):
        lo, hi = n * lengths.shortest[g], n * lengths.longest[g]
        if not lo <= t <= hi:
            raise MixtureStateError(
                f"state field plan.tokens[{g}] is {t}, but {n} samples of that group hold "
                f"{lo} to {hi} tokens (plan.counts[{g}]): the state does not match the lengths"
            )
        if abs(t - targets[g]) >= lengths.longest[g] + overall:
            raise MixtureStateError(
                f"state field plan.tokens[{g}] is {t}, more than the rule's bound "
                f"({lengths.longest[g] + overall} tokens) away from its target "
                f"{targets[g]:.6g}: the tokens do not follow the schedule"
            )
    return tuple(tokens)


def _check_past(obj: Mapping[str, Any], num_groups: int) -> SchedulePast:
    """The saved ``schedule_past`` (required from version 2; version 1 has none)."""
    if obj.get("version") == 1 and "schedule_past" not in obj:
        return SchedulePast()
    past = _field(obj, "schedule_past", "", Mapping)
    entries = _count_of(
        _field(past, "entries", "schedule_past", numbers.Integral), "schedule_past.entries"
    )
    text = _field(past, "digest", "schedule_past", str)
    try:
        digest = bytes.fromhex(text)
    except ValueError:
        digest = b""
    if len(digest) != len(SchedulePast().digest):
        raise MixtureStateError(
            f"state field schedule_past.digest must be {2 * len(SchedulePast().digest)} hex "
            f"digits, got {text!r:.60}"
        )
    sums = _vector(
        _field(past, "weight_batches", "schedule_past", list),
        "schedule_past.weight_batches",
        num_groups,
    )
    if entries == 0:
        if digest != SchedulePast().digest or sums.any():
            raise MixtureStateError(
                "state field schedule_past holds no entries but a digest or weight sum: "
                "edited or corrupted"
            )
        return SchedulePast()
    return SchedulePast(entries, digest, sums)


def _resilient(stream: Stream, retry_seconds: float) -> Stream:
    """A copy of a plain ``Stream`` made a :class:`ResilientStream` (retries, verification);
    a subclass of the caller's own keeps its class (its downloads are its own)."""
    if type(stream) is Stream:
        stream.__class__ = ResilientStream
        stream._verified = set()  # type: ignore[attr-defined]
        stream.download_retry_seconds = None  # type: ignore[attr-defined]
        stream.index_digest = None  # type: ignore[attr-defined]
        stream.index_named_by = "its manifest"  # type: ignore[attr-defined]
        stream.link_local = False  # type: ignore[attr-defined]
        stream._downloader = shared_downloader(stream._downloader)
    if isinstance(stream, ResilientStream) and stream.download_retry_seconds is None:
        stream.download_retry_seconds = retry_seconds
    return stream


def _checked_get_shards(
    stream: Stream,
    verify_cache: bool,
    keep_open: bool,
    unhashed: list[tuple[str, int, int, int]],
) -> Any:
    """``stream.get_shards`` that checks the index (:mod:`mixstream.shardindex`) before any
    shard I/O, and gives MDS shards :class:`~mixstream.reader.CheckedMDSReader` readers
    (checked on first use; files kept open with ``keep_open``). Streams with shards that have
    no ``validate_hash`` digest are appended to ``unhashed`` (index, count, total, first)."""
    get_shards = checked_get_shards(stream)

    def wrapped(world: Any, allow_unsafe_types: bool) -> list[Any]:
        shards = get_shards(world, allow_unsafe_types)
        missing = [
            i
            for i, shard in enumerate(shards)
            if isinstance(stream, ResilientStream) and stream.missing_hash(shard) is not None
        ]
        if missing:
            unhashed.append((index_location(stream), len(missing), len(shards), missing[0]))
        for shard in shards:
            if type(shard) is MDSReader:
                shard.__class__ = CheckedMDSReader
                shard.keep_open = keep_open
                shard.index_name = index_location(stream)
                if isinstance(stream, ResilientStream) and verify_cache:
                    shard.stream = stream
        return shards

    return wrapped


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _broadcast_from_rank0(payload: Any) -> Any:
    import torch.distributed as dist

    if not _distributed():
        return payload
    box = [payload]
    dist.broadcast_object_list(box, src=0)
    return box[0]
