"""The global sample order: a pure function of (seed, streams, global batch size, schedule).

Global batch ``k`` is built in three steps:

1. *Counts.* :func:`mixstream.apportion.allocate` turns the weights in force at ``k`` into
   ``n_g(k)`` samples per group, carrying rounding error across batches.
2. *Draws.* Group ``g`` contributes the next ``n_g(k)`` positions of its own endless
   sequence: pass after pass over its samples, each pass a fresh lazy block shuffle
   (:mod:`mixstream.permutation`) seeded by the pass number. A group's cursor is simply its
   realized count, so the per-group state is two numbers.
3. *Layout.* The draws are concatenated in group order and, when shuffling, permuted within
   the batch (seeded by ``k``) so every rank's slice is a fair sample of the mixture. Rank
   ``r`` of ``R`` takes positions ``[r*b, (r+1)*b)``.

Nothing depends on the number of ranks or dataloader workers, so the sequence is the same
for any layout with the same global batch size, and the whole state needed to continue from
batch ``k`` is :class:`PlanState`: O(groups), whatever the position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mixstream.apportion import advance_targets, allocate
from mixstream.permutation import BlockShuffle, map_many, shuffled_order
from mixstream.weights import WeightSchedule

__all__ = ["BatchDraw", "MixturePlan", "PlanState"]

_LAYOUT_STREAM = 1 << 20  # permutation stream id for in-batch layouts, apart from group ids
_CHUNK = 4096  # group positions are mapped to sample ids a chunk at a time, and cached
_CHUNK_MIN = 64
_CHUNK_BUDGET = 1 << 16  # positions in one chunk of every group (above _CHUNK_MIN each)


@dataclass(frozen=True)
class PlanState:
    """Where the sequence stands before global batch ``batch``."""

    batch: int
    targets: tuple[float, ...]
    counts: tuple[int, ...]

    @classmethod
    def initial(cls, num_groups: int) -> PlanState:
        return cls(0, (0.0,) * num_groups, (0,) * num_groups)

    def to_dict(self) -> dict:
        return {"batch": self.batch, "targets": list(self.targets), "counts": list(self.counts)}

    @classmethod
    def from_dict(cls, obj: dict) -> PlanState:
        return cls(
            int(obj["batch"]),
            tuple(float(x) for x in obj["targets"]),
            tuple(int(x) for x in obj["counts"]),
        )


@dataclass(frozen=True)
class BatchDraw:
    """One global batch: per-group counts and each group's cursor before the batch."""

    batch: int
    counts: tuple[int, ...]
    cursors: tuple[int, ...]


class MixturePlan:
    """Maps global batches to sample ids for a fixed set of groups."""

    def __init__(
        self,
        group_sizes: Sequence[int],
        global_batch_size: int,
        seed: int,
        shuffle: bool = True,
        block_size: int = 1 << 18,
    ) -> None:
        if not group_sizes or min(group_sizes) <= 0:
            raise ValueError(f"every group needs at least one sample, got sizes {group_sizes}")
        if global_batch_size <= 0:
            raise ValueError(f"global batch size must be positive, got {global_batch_size}")
        self.group_sizes = tuple(int(n) for n in group_sizes)
        self.offsets = np.concatenate([[0], np.cumsum(self.group_sizes)[:-1]]).astype(np.int64)
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.block_size = int(block_size)
        self._passes: dict[tuple[int, int], BlockShuffle] = {}
        self._chunks: dict[tuple[int, int], np.ndarray] = {}
        # Chunk sizes (powers of two): 4096 positions for few groups, fewer for many (64 from
        # 1,024 groups on), and never much longer than a pass. Missing chunks of a batch are
        # computed together, so small chunks cost no more calls; large ones would compute
        # (and hold) positions a rarely drawn group needs thousands of batches later.
        per_group = max(_CHUNK_MIN, min(_CHUNK, _CHUNK_BUDGET // len(self.group_sizes)))
        self._chunk_sizes = [
            max(_CHUNK_MIN, min(1 << (per_group.bit_length() - 1), 1 << (n - 1).bit_length()))
            for n in self.group_sizes
        ]

    @property
    def num_groups(self) -> int:
        return len(self.group_sizes)

    def step(self, state: PlanState, schedule: WeightSchedule) -> tuple[BatchDraw, PlanState]:
        """Draw batch ``state.batch`` and return the state before the next one."""
        weights = schedule.at(state.batch)
        n = allocate(state.targets, state.counts, weights, self.global_batch_size)
        draw = BatchDraw(state.batch, tuple(n), state.counts)
        targets = advance_targets(np.asarray(state.targets), weights, self.global_batch_size)
        if len(n) < 64:
            counts = tuple(c + k for c, k in zip(state.counts, n, strict=True))
        else:
            counts = tuple((np.asarray(state.counts, dtype=np.int64) + n).tolist())
        return draw, PlanState(state.batch + 1, tuple(targets.tolist()), counts)

    def advance(self, state: PlanState, schedule: WeightSchedule, batch: int) -> PlanState:
        """Step from ``state`` to just before global batch ``batch``."""
        if batch < state.batch:
            raise ValueError(f"cannot step back from batch {state.batch} to {batch}")
        while state.batch < batch:
            _, state = self.step(state, schedule)
        return state

    def _pass(self, group: int, epoch: int) -> BlockShuffle:
        key = (group, epoch)
        perm = self._passes.get(key)
        if perm is None:
            if len(self._passes) > 4 * self.num_groups:
                self._passes.clear()
            perm = BlockShuffle(
                self.group_sizes[group],
                self.block_size,
                self.seed,
                stream=group,
                epoch=epoch,
                shuffle=self.shuffle,
            )
            self._passes[key] = perm
        return perm

    def group_positions(self, group: int, start: int, count: int) -> np.ndarray:
        """Sample ids (global, across groups) of positions ``[start, start+count)`` of a group.

        Consecutive batches read consecutive positions, so ids are computed for aligned
        chunks of positions and cached: one vectorized permutation call per chunk instead of
        several small ones per batch.
        """
        size = self._chunk_sizes[group]
        offset = start % size
        if offset + count <= size:  # the usual case: one chunk
            chunk = self._chunk(group, start // size)
            return chunk[offset : offset + count].copy()
        out = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            pos = start + done
            chunk = self._chunk(group, pos // size)
            offset = pos % size
            take = min(count - done, size - offset)
            out[done : done + take] = chunk[offset : offset + take]
            done += take
        return out

    def positions_many(
        self, groups: Sequence[int], starts: Sequence[int], counts: Sequence[int]
    ) -> list[np.ndarray]:
        """:meth:`group_positions` for several groups, their missing chunks computed together."""
        self._fill(list(zip(groups, starts, counts, strict=True)))
        return [
            self.group_positions(g, s, n) for g, s, n in zip(groups, starts, counts, strict=True)
        ]

    def _fill(self, spans: list[tuple[int, int, int]]) -> None:
        """Compute the missing chunks of ``(group, start, count)`` spans in one evaluation."""
        missing = []
        for g, start, count in spans:
            if count <= 0:
                continue
            width = self._chunk_sizes[g]
            for index in range(start // width, (start + count - 1) // width + 1):
                if (g, index) not in self._chunks:
                    missing.append((g, index))
        if missing:
            self._compute(list(dict.fromkeys(missing)))

    def _chunk(self, group: int, index: int) -> np.ndarray:
        chunk = self._chunks.get((group, index))
        if chunk is None:
            chunk = self._compute([(group, index)])[0]
        return chunk

    def _compute(self, keys: list[tuple[int, int]]) -> list[np.ndarray]:
        """Chunks ``(group, index)``: all their passes' permutations evaluated together
        (:func:`~mixstream.permutation.map_many`), which costs about what one chunk costs."""
        perms, positions, parts = [], [], []
        chunks = []
        for g, index in keys:
            size, width = self.group_sizes[g], self._chunk_sizes[g]
            lo, hi = index * width, (index + 1) * width
            chunk = np.empty(width, dtype=np.int64)
            chunks.append(chunk)
            for epoch in range(lo // size, (hi - 1) // size + 1):
                a, b = max(lo, epoch * size), min(hi, (epoch + 1) * size)
                perms.append(self._pass(g, epoch))
                positions.append(np.arange(a - epoch * size, b - epoch * size, dtype=np.int64))
                parts.append((chunk, a - lo, b - lo, self.offsets[g]))
        for (chunk, a, b, offset), ids in zip(parts, map_many(perms, positions), strict=True):
            chunk[a:b] = ids + offset
        limit = 4 * self.num_groups + 8
        for key, chunk in zip(keys, chunks, strict=True):
            if len(self._chunks) >= limit:
                del self._chunks[next(iter(self._chunks))]  # oldest first
            self._chunks[key] = chunk
        return chunks

    def layout(self, draw: BatchDraw, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(sample ids, group ids) for positions ``[lo, hi)`` of a drawn global batch."""
        B = self.global_batch_size
        if not 0 <= lo <= hi <= B:
            raise ValueError(f"slice [{lo}, {hi}) is outside the global batch of {B}")
        slots = np.arange(lo, hi, dtype=np.int64)
        if self.shuffle:
            slots = shuffled_order(B, self.seed, stream=_LAYOUT_STREAM, epoch=draw.batch)[lo:hi]
        counts = np.asarray(draw.counts, dtype=np.int64)
        bounds = np.cumsum(counts)
        groups = np.searchsorted(bounds, slots, side="right").astype(np.int64)
        # Position of each slot in its group's draw, then slots grouped by group (stable):
        # one look-up per group present in the slice, O(slice log slice) in all.
        within = slots - (bounds - counts)[groups]
        order = np.argsort(groups, kind="stable")
        sorted_groups = groups[order]
        cuts = np.flatnonzero(np.diff(sorted_groups)) + 1
        begins = [0, *cuts.tolist()]
        ends = [*cuts.tolist(), len(order)]
        ids = np.empty(len(slots), dtype=np.int64)
        cursors = draw.cursors
        runs = []
        for a, b in zip(begins, ends, strict=True):
            if a == b:
                continue
            members = order[a:b]
            g = int(sorted_groups[a])
            pos = within[members]
            first = int(pos.min())
            runs.append((members, g, pos, first, int(pos.max()) - first + 1))
        self._fill([(g, cursors[g] + first, count) for _, g, _, first, count in runs])
        for members, g, pos, first, count in runs:
            span = self.group_positions(g, cursors[g] + first, count)
            ids[members] = span[pos - first]
        return ids, groups
