"""Lazy, shard-local shuffle of one pass over a data group.

A group is read without replacement, pass after pass, each pass in a fresh order keyed by
``(seed, stream, epoch)``. Groups can hold ~1e9 samples, so the order must never exist as an
array: materializing ``np.random.permutation(n)`` costs O(n) memory and time per pass, and
resuming mid-pass would mean rebuilding it. Instead the order is a keyed *pseudorandom
permutation*: position ``p`` maps to a sample id through a few rounds of integer hashing, so any
position (the first, the resume point, the last) costs O(1) and nothing is stored.

The permutation is a balanced Feistel network over the smallest power-of-two domain with an
even number of bits that covers ``n`` (at most ~4n), with *cycle walking*: an output >= n is
encrypted again until it lands in ``[0, n)``. Because the network is a bijection of the domain,
this restricts to a bijection of ``[0, n)``; the expected number of walks is below 4. Eight
rounds: with six, chi-square tests on where pairs of positions land still showed bias for
domains of 64-256 values. Domains of at most 16 values are different: balanced Feistel
networks on them only reach even permutations, and cycle walking then favours some orders of
a 5-element block by ~8% whatever the round count. Such tiny permutations (short last blocks,
tiny groups) instead sort the ``n`` keyed hashes of ``0..n-1``, which is O(1) for ``n <= 16``.

A uniform shuffle would jump between shards on every sample. As in mosaicml-streaming's
"py1e"/block shuffle, sample ids are cut into blocks of ``block_size`` consecutive ids; a pass
visits blocks in a shuffled order and the samples of each block in their own shuffled order, so
a reader only needs the shards of one block at a time.

When ``block_size`` does not divide ``n``, the last block is short. Permuting it together with
the full blocks would shift the start position of every later block by a data-dependent amount
that needs O(num_blocks) work to compute. Here the full blocks are permuted among themselves and
the short block is *inserted* at one keyed slot among the ``num_full_blocks + 1`` gaps of that
order. Every block start is then ``slot * block_size`` (plus ``tail`` after the insertion
point), which is O(1), and the short block does not always come last in the pass.

All arithmetic is on unsigned 64-bit integers (numpy ``uint64`` for arrays, masked Python ints
for scalars), with no ``hash()`` or platform RNG, so every process on every machine computes the
same order. The scalar path is pure Python because numpy's per-call overhead would cost more
than the whole computation.
"""

from __future__ import annotations

import operator

import numpy as np

__all__ = ["BlockShuffle", "map_many", "shuffled_order"]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_ROUNDS = 8
# Distinct per-round constants, so the rounds use different functions under one key.
_ROUND_C = tuple((_GOLDEN * (r + 1)) & _MASK64 for r in range(_ROUNDS))
# Permutations of at most this many values sort keyed hashes instead of using Feistel.
_SMALL = 16
# Domain-separation tags: block order, per-block order, short-block slot.
_TAG_ORDER, _TAG_WITHIN, _TAG_SLOT = 1, 2, 3
_MAX_SAMPLES = 1 << 62

_U_M1 = np.uint64(_M1)
_U_M2 = np.uint64(_M2)
_U_GOLDEN = np.uint64(_GOLDEN)
_U_ROUND_C = tuple(np.uint64(c) for c in _ROUND_C)
_U30, _U27, _U31 = np.uint64(30), np.uint64(27), np.uint64(31)


def _mix64(z: int) -> int:
    """splitmix64 finalizer: a bijective 64-bit mixer with full avalanche."""
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return z ^ (z >> 31)


def _mix64_np(z: np.ndarray) -> np.ndarray:
    """:func:`_mix64` on a uint64 array (multiplication wraps mod 2**64)."""
    z = (z ^ (z >> _U30)) * _U_M1
    z = (z ^ (z >> _U27)) * _U_M2
    return z ^ (z >> _U31)


def _absorb(h: int, word: int) -> int:
    """Fold one 64-bit word into a running key."""
    return _mix64(((h ^ word) + _GOLDEN) & _MASK64)


def _absorb_np(h: int, words: np.ndarray) -> np.ndarray:
    return _mix64_np((np.uint64(h) ^ words) + _U_GOLDEN)


def _half_bits(n: int) -> int:
    """Half the bit width of the smallest even-bit power-of-two domain holding ``n`` values."""
    bits = max(2, (n - 1).bit_length())
    return (bits + 1) // 2


def _permute(x: int, n: int, key: int) -> int:
    """Keyed bijection of ``[0, n)`` at ``x``: hash sort if ``n <= 16``, else Feistel + walking."""
    if n == 1:
        return 0
    if n <= _SMALL:
        # mix64 is a bijection, so the hashes are distinct and the order is strict.
        return sorted(range(n), key=lambda j: _mix64(key ^ ((j + _GOLDEN) & _MASK64)))[x]
    h = _half_bits(n)
    hmask = (1 << h) - 1
    while True:
        left, right = x >> h, x & hmask
        for c in _ROUND_C:
            left, right = right, left ^ (_mix64(key ^ ((right + c) & _MASK64)) & hmask)
        x = (left << h) | right
        if x < n:
            return x


def _encrypt_np(x: np.ndarray, key: np.ndarray, h: int) -> np.ndarray:
    uh = np.uint64(h)
    hmask = np.uint64((1 << h) - 1)
    left, right = x >> uh, x & hmask
    for c in _U_ROUND_C:
        left, right = right, left ^ (_mix64_np(key ^ (right + c)) & hmask)
    return (left << uh) | right


def _permute_np(x: np.ndarray, n: int, key: np.ndarray) -> np.ndarray:
    """Vectorized :func:`_permute`; ``key`` is a uint64 scalar array or one key per element.

    Cycle walking re-encrypts only the elements still outside ``[0, n)``.
    """
    if n == 1:
        return np.zeros_like(x)
    if n <= _SMALL:
        j = np.arange(n, dtype=np.uint64) + _U_GOLDEN
        if key.ndim == 0:
            return np.argsort(_mix64_np(key ^ j)).astype(np.uint64)[x]
        order = np.argsort(_mix64_np(key[:, None] ^ j), axis=1)
        return order[np.arange(x.size), x.astype(np.intp)].astype(np.uint64)
    h = _half_bits(n)
    un = np.uint64(n)
    per_element = key.ndim > 0
    y = _encrypt_np(x, key, h)
    idx = np.flatnonzero(y >= un)
    while idx.size:
        z = _encrypt_np(y[idx], key[idx] if per_element else key, h)
        y[idx] = z
        idx = idx[z >= un]
    return y


def _check_int(name: str, value: int, minimum: int) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class BlockShuffle:
    """Lazy permutation of ``range(num_samples)`` for one pass of one group.

    ``perm(p)`` is the sample id read at position ``p`` of the pass, for an int or an
    integer array of positions. Different ``seed``/``stream``/``epoch`` give independent
    orders. ``seed`` is taken modulo 2**64. With ``shuffle=False`` the order is the identity.
    Construction and scalar calls are O(1); array calls are O(len(positions)).
    """

    __slots__ = (
        "_full",
        "_order_key",
        "_slot_key",
        "_tail",
        "_tail_key",
        "_tail_start",
        "_within_key",
        "block_size",
        "epoch",
        "num_samples",
        "seed",
        "shuffle",
        "stream",
    )

    def __init__(
        self,
        num_samples: int,
        block_size: int,
        seed: int,
        stream: int = 0,
        epoch: int = 0,
        shuffle: bool = True,
    ) -> None:
        self.num_samples = _check_int("num_samples", num_samples, 1)
        if self.num_samples > _MAX_SAMPLES:
            raise ValueError(f"num_samples must be <= 2**62, got {self.num_samples}")
        # A block larger than the group is the whole group: one block, no short block.
        self.block_size = min(_check_int("block_size", block_size, 1), self.num_samples)
        self.seed = _check_int("seed", seed, -(1 << 63)) & _MASK64
        self.stream = _check_int("stream", stream, 0)
        self.epoch = _check_int("epoch", epoch, 0)
        self.shuffle = bool(shuffle)

        n, bs = self.num_samples, self.block_size
        self._full, self._tail = divmod(n, bs)
        base = _absorb(_absorb(_absorb(0, self.seed), self.stream & _MASK64), self.epoch & _MASK64)
        self._order_key = _absorb(base, _TAG_ORDER)
        self._within_key = _absorb(base, _TAG_WITHIN)
        self._slot_key = _absorb(base, _TAG_SLOT)
        # The short block (block index self._full) goes at one keyed slot of the block order;
        # the modulo bias, about num_blocks / 2**64, is below 1e-9 for up to 1e10 blocks.
        slot = self._slot_key % (self._full + 1) if self._tail else self._full
        self._tail_start = slot * bs if self.shuffle else self._full * bs
        self._tail_key = _absorb(self._within_key, self._full)

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return (
            f"BlockShuffle(num_samples={self.num_samples}, block_size={self.block_size}, "
            f"seed={self.seed}, stream={self.stream}, epoch={self.epoch}, "
            f"shuffle={self.shuffle})"
        )

    def __call__(self, positions: np.ndarray | int) -> np.ndarray | int:
        """Sample id(s) at ``positions``; an int gives an int, an array an int64 array."""
        if isinstance(positions, np.ndarray):
            return self._call_array(positions)
        try:
            p = operator.index(positions)
        except TypeError:
            return self._call_array(np.asarray(positions))
        if not 0 <= p < self.num_samples:
            raise IndexError(f"position {p} out of range for a pass of {self.num_samples}")
        return self._map_scalar(p)

    def _map_scalar(self, p: int) -> int:
        if not self.shuffle:
            return p
        bs, t0 = self.block_size, self._tail_start
        if self._tail and t0 <= p < t0 + self._tail:
            return self._full * bs + _permute(p - t0, self._tail, self._tail_key)
        if p >= t0:
            p -= self._tail
        slot, offset = divmod(p, bs)
        block = _permute(slot, self._full, self._order_key)
        key = _absorb(self._within_key, block)
        return block * bs + _permute(offset, bs, key)

    def _call_array(self, positions: np.ndarray) -> np.ndarray:
        if positions.size == 0:
            return np.zeros(positions.shape, dtype=np.int64)
        if positions.dtype.kind not in "iu":
            raise TypeError(f"positions must be integers, got dtype {positions.dtype}")
        lo, hi = positions.min(), positions.max()
        if lo < 0 or hi >= self.num_samples:
            bad = lo if lo < 0 else hi
            raise IndexError(f"position {int(bad)} out of range for a pass of {self.num_samples}")
        if not self.shuffle:
            return positions.astype(np.int64)
        with np.errstate(over="ignore"):
            out = self._map_array(positions.astype(np.uint64).ravel())
        return out.astype(np.int64).reshape(positions.shape)

    def _map_array(self, p: np.ndarray) -> np.ndarray:
        bs = np.uint64(self.block_size)
        out = np.empty_like(p)
        full_sel: np.ndarray | slice = slice(None)
        if self._tail:
            t0, tail = np.uint64(self._tail_start), np.uint64(self._tail)
            in_tail = (p >= t0) & (p < t0 + tail)
            if in_tail.any():
                offset = p[in_tail] - t0
                key = np.uint64(self._tail_key)
                out[in_tail] = np.uint64(self._full) * bs + _permute_np(offset, self._tail, key)
            full_sel = ~in_tail
            p = p[full_sel]
            p = np.where(p >= t0, p - tail, p)
        if p.size:
            slot, offset = p // bs, p % bs
            block = _permute_np(slot, self._full, np.uint64(self._order_key))
            keys = _absorb_np(self._within_key, block)
            out[full_sel] = block * bs + _permute_np(offset, self.block_size, keys)
        return out


def _permute_var(x: np.ndarray, n: np.ndarray, key: np.ndarray) -> np.ndarray:
    """:func:`_permute_np` with a domain size and a key per element (uint64 arrays).

    Elements are evaluated together per domain (Feistel half width, or small size), so a
    call costs as many numpy operations as one :func:`_permute_np`, whatever the number of
    distinct permutations among the elements.
    """
    out = np.zeros_like(x)
    small = (n > 1) & (n <= _SMALL)
    if small.any():
        for size in np.unique(n[small]).tolist():
            sel = np.flatnonzero(n == size)
            j = np.arange(size, dtype=np.uint64) + _U_GOLDEN
            order = np.argsort(_mix64_np(key[sel][:, None] ^ j), axis=1)
            out[sel] = order[np.arange(sel.size), x[sel].astype(np.intp)].astype(np.uint64)
    big = n > _SMALL
    if big.any():
        halves = {size: _half_bits(size) for size in np.unique(n[big]).tolist()}
        half = np.zeros(n.shape, dtype=np.int64)
        for size, h in halves.items():
            half[n == size] = h
        for h in sorted(set(halves.values())):
            sel = np.flatnonzero(big & (half == h))
            keys, limit = key[sel], n[sel]
            y = _encrypt_np(x[sel], keys, h)
            idx = np.flatnonzero(y >= limit)
            while idx.size:
                z = _encrypt_np(y[idx], keys[idx], h)
                y[idx] = z
                idx = idx[z >= limit[idx]]
            out[sel] = y
    return out


def map_many(perms: list[BlockShuffle], positions: list[np.ndarray]) -> list[np.ndarray]:
    """``[perm(p) for perm, p in zip(perms, positions)]``, computed together.

    The same values (the same arithmetic, element by element); but where calling each
    permutation costs its own ~200 numpy operations (the cycle walk's rounds), this costs
    about that many for all of them: what a plan of thousands of small groups needs when it
    maps a chunk of positions of hundreds of groups at once.
    """
    if not perms:
        return []
    sizes = [int(np.size(q)) for q in positions]
    owner = np.repeat(np.arange(len(perms)), sizes)
    p = np.concatenate([np.asarray(q, dtype=np.int64).ravel() for q in positions])
    limit = np.array([perm.num_samples for perm in perms], dtype=np.int64)[owner]
    if p.size and (p.min() < 0 or (p >= limit).any()):
        bad = int(np.flatnonzero((p < 0) | (p >= limit))[0])
        raise IndexError(f"position {int(p[bad])} out of range for a pass of {limit[bad]}")

    def column(values: list[int]) -> np.ndarray:
        return np.array(values, dtype=np.uint64)[owner]

    bs = column([perm.block_size for perm in perms])
    full = column([perm._full for perm in perms])
    tail = column([perm._tail for perm in perms])
    t0 = column([perm._tail_start for perm in perms])
    tail_key = column([perm._tail_key for perm in perms])
    order_key = column([perm._order_key for perm in perms])
    within_key = column([perm._within_key for perm in perms])
    shuffled = np.array([perm.shuffle for perm in perms], dtype=bool)[owner]
    u = p.astype(np.uint64)
    out = u.copy()  # unshuffled permutations are the identity
    with np.errstate(over="ignore"):
        in_tail = shuffled & (tail > 0) & (u >= t0) & (u < t0 + tail)
        if in_tail.any():
            sel = np.flatnonzero(in_tail)
            offset = u[sel] - t0[sel]
            out[sel] = full[sel] * bs[sel] + _permute_var(offset, tail[sel], tail_key[sel])
        sel = np.flatnonzero(shuffled & ~in_tail)
        if sel.size:
            q = u[sel]
            q = np.where((tail[sel] > 0) & (q >= t0[sel]), q - tail[sel], q)
            slot, offset = q // bs[sel], q % bs[sel]
            block = _permute_var(slot, full[sel], order_key[sel])
            keys = _mix64_np((within_key[sel] ^ block) + _U_GOLDEN)  # _absorb_np per element
            out[sel] = block * bs[sel] + _permute_var(offset, bs[sel], keys)
    result = out.astype(np.int64)
    return [
        part.reshape(np.shape(q))
        for part, q in zip(np.split(result, np.cumsum(sizes)[:-1]), positions, strict=True)
    ]


def shuffled_order(n: int, seed: int, stream: int = 0, epoch: int = 0) -> np.ndarray:
    """A whole keyed permutation of ``range(n)``, materialized: for small ``n`` only.

    Sorting ``n`` keyed 64-bit hashes is uniform and, for a few thousand elements, much
    cheaper than evaluating the Feistel network element by element; the plan uses it to lay
    out each global batch.
    """
    n = _check_int("n", n, 0)
    key = _absorb(_absorb(_absorb(0, seed & _MASK64), stream & _MASK64), epoch & _MASK64)
    hashes = _absorb_np(key, np.arange(n, dtype=np.uint64))
    return np.argsort(hashes, kind="stable").astype(np.int64)
