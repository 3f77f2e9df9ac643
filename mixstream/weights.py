"""Mixture weights: validation and the schedule of weight changes over global batches."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["SchedulePast", "WeightSchedule", "Weights", "normalize_weights"]

Weights = Mapping[str, float] | Sequence[float] | np.ndarray


def normalize_weights(weights: Weights, groups: Sequence[str]) -> np.ndarray:
    """A probability vector in ``groups`` order, or a ValueError saying what is wrong.

    A mapping may leave groups out (they get weight 0) but may not name unknown ones; a
    vector must have one entry per group. Weights are relative: they are divided by their sum.
    """
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(groups))
        if unknown:
            raise ValueError(
                f"unknown group(s) {', '.join(map(repr, unknown))} in weights; "
                f"groups are: {', '.join(groups)}"
            )
        values = [weights.get(g, 0.0) for g in groups]
        try:
            vec = np.array([float(v) for v in values], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"weights must be numbers, got {values!r}") from None
    else:
        try:
            vec = np.array(weights, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise ValueError(f"weights must be numbers, got {weights!r}") from None
        if len(vec) != len(groups):
            raise ValueError(
                f"got {len(vec)} weights for {len(groups)} groups ({', '.join(groups)})"
            )
    # Vectorized checks (O(groups) in numpy); names are only gathered for a message.
    finite = np.isfinite(vec)
    if not finite.all():
        bad = [g for g, ok in zip(groups, finite.tolist(), strict=True) if not ok]
        raise ValueError(f"weights must be finite; not finite for {', '.join(bad)}")
    if (vec < 0).any():
        negative = [g for g, v in zip(groups, vec.tolist(), strict=True) if v < 0]
        raise ValueError(f"weights must be >= 0; negative for {', '.join(negative)}")
    total = vec.sum()
    if total <= 0:
        raise ValueError("weights are all zero; at least one group needs a positive weight")
    return vec / total


_DIGEST_SIZE = 16
_DIGEST_START = hashlib.blake2b(b"mixstream weight schedule", digest_size=_DIGEST_SIZE).digest()


def _chain(previous: bytes, batch: int, weights: np.ndarray) -> bytes:
    """The schedule digest after appending ``(batch, weights)`` to one whose digest is given."""
    h = hashlib.blake2b(previous, digest_size=_DIGEST_SIZE)
    h.update(struct.pack("<q", int(batch)))
    h.update(np.ascontiguousarray(weights, dtype="<f8").tobytes())
    return h.digest()


@dataclass(frozen=True)
class SchedulePast:
    """What a compacted schedule keeps of the entries it dropped (those before its first).

    ``entries``: how many; ``digest``: the digest chained through them (the same bytes the
    whole schedule would have had at that point, so digests stay comparable across
    compaction and resumption); ``weight_batches``: the sum over the batches they covered of
    their weights (``None``: zeros), which is all the time average and the plan's targets
    need of them.
    """

    entries: int = 0
    digest: bytes = _DIGEST_START
    weight_batches: np.ndarray | None = field(default=None, compare=False)

    @property
    def empty(self) -> bool:
        return self.entries == 0


class WeightSchedule:
    """Weights in force per global batch: a sorted list of ``(effective_batch, weights)``.

    ``set(batch, w)`` means "from ``batch`` on, use ``w``": it replaces every entry at or
    after ``batch``, so the most recent decision wins for the future without rewriting the
    past. Replaying the same sequence of ``set`` calls always yields the same schedule,
    which is how worker processes follow the trainer.

    Entries are stored in arrays (about ``16 m + 24`` bytes each for m groups), each with the
    running sum of weight x batches before it and a chained digest of the schedule up to it,
    so :meth:`average`, :meth:`digest` and saving the tail (:meth:`tail`) cost O(m) whatever
    the length. :meth:`compact` drops old entries into :attr:`past` (their count, digest and
    weight sum): a compacted schedule answers every question about batches from its first
    entry on, exactly as the whole one would.
    """

    def __init__(
        self, entries: Iterable[tuple[int, Any]] = (), past: SchedulePast | None = None
    ) -> None:
        self.past = past if past is not None else SchedulePast()
        self._n = 0
        self._starts = np.zeros(0, dtype=np.int64)
        self._weights = np.zeros((0, 0))
        self._sums = np.zeros((0, 0))
        self._digests = np.zeros((0, _DIGEST_SIZE), dtype=np.uint8)
        for batch, weights in entries:
            self.set(batch, weights)

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return self._n

    @property
    def entries(self) -> list[tuple[int, np.ndarray]]:
        """The kept entries as ``(effective_batch, weights)`` (copies), ascending."""
        return [(int(self._starts[i]), self._weights[i].copy()) for i in range(self._n)]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(effective batches, weights)`` of the kept entries, as arrays (copies)."""
        return self._starts[: self._n].copy(), self._weights[: self._n].copy()

    @property
    def first_batch(self) -> int:
        """Effective batch of the first kept entry (0 unless compacted)."""
        return int(self._starts[0]) if self._n else 0

    def covers(self, batch: int) -> bool:
        """Whether the weights in force at ``batch`` are known (not compacted away)."""
        return self._n > 0 and (self.past.empty or batch >= self._starts[0])

    def _index(self, batch: int) -> int:
        """Index of the entry in force at ``batch`` (the first one for earlier batches)."""
        i = int(np.searchsorted(self._starts[: self._n], batch, side="right")) - 1
        if i < 0 and not self.past.empty:
            raise ValueError(
                f"batch {batch} precedes the kept part of the weight schedule (from batch "
                f"{self.first_batch}; {self.past.entries} earlier entries were compacted)"
            )
        return max(i, 0)

    def at(self, batch: int) -> np.ndarray:
        """Weights in force at global batch ``batch`` (a copy)."""
        if not self._n:
            raise ValueError("the weight schedule is empty")
        return self._weights[self._index(batch)].copy()

    def weight_batches(self, end: int) -> np.ndarray:
        """Sum over global batches ``[0, end)`` of the weights in force (each batch once)."""
        i = int(np.searchsorted(self._starts[: self._n], end, side="left")) - 1
        if i < 0:
            if not self.past.empty and end < self.first_batch:
                self._index(end)  # raises: that part was compacted
            return self._sums[0].copy()
        return self._sums[i] + (end - int(self._starts[i])) * self._weights[i]

    def average(self, end: int) -> np.ndarray:
        """Time average of the weights over global batches ``[0, end)`` (each batch counts once)."""
        if end <= 0:
            return self.at(0).copy()
        return self.weight_batches(end) / end

    @property
    def digest(self) -> bytes:
        """Digest of the whole schedule, compacted entries included."""
        return bytes(self._digests[self._n - 1]) if self._n else self.past.digest

    # ------------------------------------------------------------------ changing
    def set(self, batch: int, weights: Any) -> None:
        batch = int(batch)
        vec = np.array(weights, dtype=np.float64).reshape(-1)
        if self._n and batch < self._starts[0]:
            raise ValueError(f"batch {batch} precedes the start of the schedule")
        self._n = int(np.searchsorted(self._starts[: self._n], batch, side="left"))
        self._append(batch, vec)

    def _append(self, batch: int, vec: np.ndarray) -> None:
        n = self._n
        if n == len(self._starts) or self._weights.shape[1] != vec.size:
            if n and self._weights.shape[1] != vec.size:
                raise ValueError(
                    f"got {vec.size} weights for a schedule of {self._weights.shape[1]}"
                )
            cap = max(8, 2 * n)
            self._starts = _grown(self._starts, cap, ())
            self._weights = _grown(self._weights, cap, (vec.size,))
            self._sums = _grown(self._sums, cap, (vec.size,))
            self._digests = _grown(self._digests, cap, (_DIGEST_SIZE,))
        if n:
            previous = bytes(self._digests[n - 1])
            self._sums[n] = (
                self._sums[n - 1] + (batch - int(self._starts[n - 1])) * self._weights[n - 1]
            )
        else:
            previous = self.past.digest
            past = self.past.weight_batches
            self._sums[n] = 0.0 if past is None else past
        self._starts[n] = batch
        self._weights[n] = vec
        self._digests[n] = np.frombuffer(_chain(previous, batch, vec), dtype=np.uint8)
        self._n = n + 1

    def compact(self, before: int, keep: int) -> int:
        """Drop entries older than the ``keep`` before the one in force at ``before``.

        Nothing is dropped until at least ``max(keep, 1)`` entries can go at once, so calling
        this after every change costs O(1) amortized. Returns the number dropped.
        """
        if self._n < 2 or before < self.first_batch:
            return 0
        drop = self._index(before) - keep
        if drop < max(keep, 1):
            return 0
        self.past = self._past_at(drop)
        rest = self._n - drop
        for name in ("_starts", "_weights", "_sums", "_digests"):
            arr = getattr(self, name)
            arr[:rest] = arr[drop : self._n]
        self._n = rest
        return drop

    def _past_at(self, j: int) -> SchedulePast:
        """The past as seen from entry ``j`` (everything before it dropped)."""
        if j == 0:
            return self.past
        return SchedulePast(
            self.past.entries + j, bytes(self._digests[j - 1]), self._sums[j].copy()
        )

    def tail(self, batch: int, history: int) -> WeightSchedule:
        """A copy holding the entry in force at ``batch``, everything after it, and the
        ``history`` entries before it; older entries summarized in its :attr:`past`."""
        j = max(0, self._index(batch) - max(0, history))
        out = WeightSchedule(past=self._past_at(j))
        out._copy_rows(self, j)
        return out

    def copy(self) -> WeightSchedule:
        out = WeightSchedule(past=self.past)
        out._copy_rows(self, 0)
        return out

    def _copy_rows(self, other: WeightSchedule, j: int) -> None:
        self._n = other._n - j
        for name in ("_starts", "_weights", "_sums", "_digests"):
            setattr(self, name, getattr(other, name)[j : other._n].copy())

    def to_list(self) -> list[list]:
        return [[int(self._starts[i]), self._weights[i].tolist()] for i in range(self._n)]

    @classmethod
    def from_arrays(
        cls, starts: np.ndarray, weights: np.ndarray, past: SchedulePast | None = None
    ) -> WeightSchedule:
        """A schedule of strictly increasing ``starts`` (one row of ``weights`` each), built
        at once: the same sums and digests as setting the entries one by one."""
        starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        weights = np.asarray(weights, dtype=np.float64).reshape(len(starts), -1)
        if len(starts) > 1 and not (np.diff(starts) > 0).all():
            raise ValueError("schedule batches must be strictly increasing")
        out = cls(past=past)
        n, m = weights.shape
        if not n:
            return out
        out._starts, out._weights = starts.copy(), weights.copy()
        steps = np.empty((n, m))
        steps[0] = 0.0 if out.past.weight_batches is None else out.past.weight_batches
        steps[1:] = np.diff(starts)[:, None] * weights[:-1]
        out._sums = np.add.accumulate(steps, axis=0)  # sequential: as set() would add them
        out._digests = np.empty((n, _DIGEST_SIZE), dtype=np.uint8)
        digest = out.past.digest
        for i in range(n):
            digest = _chain(digest, int(starts[i]), weights[i])
            out._digests[i] = np.frombuffer(digest, dtype=np.uint8)
        out._n = n
        return out

    @classmethod
    def from_list(cls, data: list, past: SchedulePast | None = None) -> WeightSchedule:
        return cls([(int(b), np.asarray(w, dtype=np.float64)) for b, w in data], past=past)


def _grown(arr: np.ndarray, rows: int, shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros((rows, *shape), dtype=arr.dtype)
    if arr.size and arr.shape[1:] == shape:
        out[: len(arr)] = arr
    return out
