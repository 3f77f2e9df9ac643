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

With per-sample token lengths whose lengths differ (``weight_unit="tokens"``, see
:mod:`mixstream.tokens`), step 1 counts tokens instead: :func:`mixstream.tokens.
allocate_tokens` fills the batch's slots knowing each group's next sample length (its
cursor is deterministic), the targets are token targets, and the state adds each group's
realised tokens. Steps 2 and 3 are unchanged, and so is the purity: the sequence is a
function of (seed, streams, global batch size, schedule, lengths).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mixstream.apportion import advance_targets, allocate
from mixstream.permutation import BlockShuffle, map_many, shuffled_order
from mixstream.tokens import TokenLengths, allocate_tokens
from mixstream.weights import WeightSchedule

__all__ = ["BatchDraw", "MixturePlan", "PlanState"]

_LAYOUT_STREAM = 1 << 20  # permutation stream id for in-batch layouts, apart from group ids
_CHUNK = 4096  # group positions are mapped to sample ids a chunk at a time, and cached
_CHUNK_MIN = 64
_CHUNK_BUDGET = 1 << 16  # positions in one chunk of every group (above _CHUNK_MIN each)


@dataclass(frozen=True)
class PlanState:
    """Where the sequence stands before global batch ``batch``.

    ``targets`` are in the plan's unit (samples, or tokens for a token plan); ``counts`` are
    samples drawn per group (each group's cursor) either way; ``tokens`` are the tokens
    drawn per group, held by token plans only (``None`` otherwise).
    """

    batch: int
    targets: tuple[float, ...]
    counts: tuple[int, ...]
    tokens: tuple[int, ...] | None = None

    @classmethod
    def initial(cls, num_groups: int, tokens: bool = False) -> PlanState:
        zeros = (0,) * num_groups
        return cls(0, (0.0,) * num_groups, zeros, zeros if tokens else None)

    def to_dict(self) -> dict:
        out = {"batch": self.batch, "targets": list(self.targets), "counts": list(self.counts)}
        if self.tokens is not None:
            out["tokens"] = list(self.tokens)
        return out

    @classmethod
    def from_dict(cls, obj: dict) -> PlanState:
        tokens = obj.get("tokens")
        return cls(
            int(obj["batch"]),
            tuple(float(x) for x in obj["targets"]),
            tuple(int(x) for x in obj["counts"]),
            None if tokens is None else tuple(int(x) for x in tokens),
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
        lengths: TokenLengths | None = None,
    ) -> None:
        """``lengths`` (per-sample token lengths of each group) makes a token plan, unless
        every sample has the same length: then shares of tokens are shares of samples and the
        plan is the samples plan (:attr:`counts_tokens` is False), bit for bit."""
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
        if lengths is not None and len(lengths.per_group) != len(self.group_sizes):
            raise ValueError(f"lengths for {len(lengths.per_group)} groups, not {len(group_sizes)}")
        self.lengths = lengths
        self.counts_tokens = lengths is not None and lengths.uniform is None
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
        self._chunk_widths = np.asarray(self._chunk_sizes, dtype=np.int64)

    @property
    def num_groups(self) -> int:
        return len(self.group_sizes)

    def initial_state(self) -> PlanState:
        """The state before batch 0."""
        return PlanState.initial(self.num_groups, tokens=self.counts_tokens)

    def tokens_of(self, state: PlanState) -> tuple[int, ...] | None:
        """Tokens drawn per group before ``state.batch`` (``None`` without lengths)."""
        if state.tokens is not None:
            return state.tokens
        if self.lengths is None or self.lengths.uniform is None:
            return None
        return tuple(c * self.lengths.uniform for c in state.counts)

    def step(self, state: PlanState, schedule: WeightSchedule) -> tuple[BatchDraw, PlanState]:
        """Draw batch ``state.batch`` and return the state before the next one."""
        weights = schedule.at(state.batch)
        if self.counts_tokens:
            return self._step_tokens(state, weights)
        n = allocate(state.targets, state.counts, weights, self.global_batch_size)
        draw = BatchDraw(state.batch, tuple(n), state.counts)
        targets = advance_targets(np.asarray(state.targets), weights, self.global_batch_size)
        if len(n) < 64:
            counts = tuple(c + k for c, k in zip(state.counts, n, strict=True))
        else:
            counts = tuple((np.asarray(state.counts, dtype=np.int64) + n).tolist())
        return draw, PlanState(state.batch + 1, tuple(targets.tolist()), counts)

    def _step_tokens(self, state: PlanState, weights: np.ndarray) -> tuple[BatchDraw, PlanState]:
        """:meth:`step` of a token plan: lengths of each group's next positions are looked up
        a window at a time (doubling from 8 up to the batch size) as its cursor moves."""
        assert self.lengths is not None and state.tokens is not None
        lengths = self.lengths
        cursors = state.counts
        windows: dict[int, list[int]] = {}

        def next_length(g: int, k: int) -> int:
            window = windows.setdefault(g, [])
            if k >= len(window):
                more = min(self.global_batch_size, max(8, 2 * len(window)))
                ids = self.group_positions(g, cursors[g] + len(window), more) - self.offsets[g]
                window.extend(lengths.lookup(g, ids))
            return window[k]

        n, targets, tokens = allocate_tokens(
            state.targets, state.tokens, weights, self.global_batch_size, next_length
        )
        counts = tuple(c + k for c, k in zip(state.counts, n, strict=True))
        draw = BatchDraw(state.batch, tuple(n), state.counts)
        return draw, PlanState(state.batch + 1, tuple(targets), counts, tuple(tokens))

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
        if not len(slots):
            return np.empty(0, dtype=np.int64), groups
        # Each slot's position in its group's sequence, and the cached chunk holding it:
        # the chunks the slice needs are gathered into one array and indexed at once, so
        # the Python work is one dictionary look-up per chunk, not numpy calls per group.
        cursors = np.asarray(draw.cursors, dtype=np.int64)
        pos = cursors[groups] + slots - (bounds - counts)[groups]
        widths = self._chunk_widths[groups]
        index = pos // widths
        keys, inverse = np.unique(groups * (int(index.max(initial=0)) + 1) + index,
                                  return_inverse=True)  # fmt: skip
        picks = np.zeros(len(keys), dtype=np.int64)
        picks[inverse] = np.arange(len(slots))
        needed = list(zip(groups[picks].tolist(), index[picks].tolist(), strict=True))
        missing = [key for key in needed if key not in self._chunks]
        if missing:
            self._compute(missing)
        chunks = [self._chunk(g, i) for g, i in needed]
        starts = np.concatenate([[0], np.cumsum([len(c) for c in chunks])[:-1]]).astype(np.int64)
        ids = np.concatenate(chunks)[starts[inverse] + pos - index * widths]
        return ids, groups
