"""Token-true weights (``weight_unit="tokens"``): a group's weight is its share of tokens.

With variable-length samples (raw text, unpacked documents) a weight over samples is not a
weight over tokens: a group of long documents gets more tokens than its weight says, by the
ratio of its mean length to the mixture's. In tokens mode the global batch still holds
``B`` samples, but which groups fill its slots follows the tokens delivered.

**Where the lengths come from.** Allocating a slot needs the length of each group's *next*
sample, which is known without reading it: the group's cursor is deterministic, so its
position maps to a sample id (:mod:`mixstream.permutation`) and the id to a length. So every
length must be known up front, in every process, before any shard is read. Three sources,
in this order:

* ``token_lengths=`` given to the dataset: one array (or one constant) per group.
* A *length sidecar* per stream, ``lengths.npy`` (one unsigned integer per sample, in
  sample order) written by ``shard-tools convert`` next to ``index.json`` and listed in
  ``mixture.json`` with its size and xxh64. It is 4 bytes a sample, one small download per
  stream instead of every shard. It is network data: :func:`load_sidecar` checks its size
  and hash against the manifest, then its dtype, its shape (one length per sample of the
  stream) and its values (1 to 2**31 - 1) before any are used.
* Packed streams (``sample.format == "tokens"`` in the manifest): every sample is
  ``seq_len`` tokens; nothing is downloaded.

A numeric column or a variable-length token column inside the shards is not offered as a
source: reading it would mean downloading and decoding every shard of every group at
construction, on every rank, which is what streaming is for avoiding.

**Packed corpora.** When every group's samples have one and the same length ``L``, a token
share is a sample share, and the plan uses the samples rule itself (:mod:`mixstream.
apportion`): the sequence is exactly the samples-mode one, token counts are ``L x`` sample
counts. The token rule below is used only when lengths differ.

**The rule** (:func:`allocate_tokens`). Each group ``g`` has a cumulative token target
``T_g`` (the sum over past slots of ``w_g x`` the tokens that slot delivered, so for fixed
weights ``T_g = w_g D`` with ``D`` the tokens delivered so far) and its realised tokens
``R_g``. This is packet scheduling with every queue always backlogged, and the rule is WF2Q
(Bennett and Zhang, "WF2Q: worst-case fair weighted fair queueing", 1996) with the fluid
reference ``w_g D``: a group is *eligible* when its next sample has started in the fluid
reference (``R_g <= T_g``); among eligible groups the slot goes to the one whose next sample
(length ``l_g``) the fluid reference finishes first, smallest ``(R_g + l_g - T_g) / w_g``,
ties to the lower index. Groups with weight 0 are never drawn. If no group is eligible
(possible only after a weight change), the smallest finish time among positive weights wins.

**Guarantee**, fixed weights, at every slot (so at every batch), with ``Lmax_g`` the longest
sample of group ``g`` and ``Lmax`` the longest of all groups with positive weight::

    -(Lmax_g + w_g Lmax)  <  R_g - T_g  <  Lmax_g

Ahead: ``g`` is only given a slot while ``R_g <= T_g``, so it ends a slot less than one of
its own samples ahead, and falls back from there until its next slot. Behind: WF2Q finishes
every sample at most ``Lmax`` tokens after the fluid reference does, so ``g`` trails the
reference by at most its unfinished sample plus ``w_g Lmax`` (while any long sample is
delivered, every group's target moves on by ``w_g`` of it: no rule does much better). With
one length ``L`` everywhere this is a gap below ``1 + w_g`` samples, a little looser than
quota's 1, which is one more reason equal lengths use the samples rule. When weights change
no online rule keeps the bound; empirically ``|R_g - T_g| < Lmax_g + Lmax`` (the bound with
``w_g = 1``, reached to 0.79 of it in 1,500 random schedules), and tests pin both.

**Cost.** Per batch: O(groups) to set up (each positive-weight group's next length and two
numbers), then O(log groups) per slot with two heaps (see :func:`allocate_tokens`), plus
one length look-up per sample drawn (each group's next positions are looked up a window at
a time from the plan's cached position chunks). Measured on 2 busy cores, a batch of 512:
~3 ms with 3 groups, ~12 ms with 100, ~35 ms with 1,000 (the literal scan over groups at
every slot: ~4, 58 and 580 ms); the samples rule, untouched, takes ~0.6, 6 and 9 ms (best
of three). The state is O(groups): per group the token target, the realised tokens and
the cursor.
"""

from __future__ import annotations

import hashlib
import heapq
import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import xxhash

__all__ = [
    "LENGTHS_NAME",
    "MAX_LENGTH",
    "TokenLengths",
    "allocate_tokens",
    "check_lengths",
    "encode_sidecar",
    "load_sidecar",
    "sidecar_entry",
]

LENGTHS_NAME = "lengths.npy"
MAX_LENGTH = 2**31 - 1  # token counts are held as int64 sums of these; one sample is < 2**31


def allocate_tokens(
    targets: Sequence[float],
    tokens: Sequence[int],
    weights: Sequence[float],
    batch_size: int,
    next_length: Callable[[int, int], int],
) -> tuple[list[int], list[float], list[int]]:
    """Samples per group for the next batch, and the token targets and counts after it.

    ``next_length(g, k)`` is the length of the ``k``-th sample group ``g`` would contribute
    to this batch (``k = 0`` its next one); it is only asked for groups with positive weight,
    for ``k`` one past what the group has been given so far. Pure and deterministic: the
    same inputs give the same answer bit for bit in every process.

    Within a batch the weights are fixed, so with ``d`` the tokens the batch has delivered
    so far a group's target is ``t0 + w d``: it is eligible once ``d >= (R - t0) / w`` and
    its fluid finish is ``(R + l - t0) / w - d``, whose order does not depend on ``d``. So
    each group has two numbers that change only when it is drawn, and two heaps (waiting by
    eligibility, ready by finish, ties to the lower index) replace the scan over groups.
    """
    w = weights.tolist() if isinstance(weights, np.ndarray) else [float(x) for x in weights]
    t_all = targets.tolist() if isinstance(targets, np.ndarray) else [float(x) for x in targets]
    r_all = tokens.tolist() if isinstance(tokens, np.ndarray) else [int(x) for x in tokens]
    active = [g for g, x in enumerate(w) if x > 0.0]
    if not active:
        raise ValueError("no group has a positive weight")
    t0 = [t_all[g] for g in active]
    wa = [w[g] for g in active]
    r = [r_all[g] for g in active]
    taken = [0] * len(active)
    upcoming = [next_length(g, 0) for g in active]
    start = [(r[i] - t0[i]) / wa[i] for i in range(len(active))]  # eligible from d = start
    finish = [(r[i] + upcoming[i] - t0[i]) / wa[i] for i in range(len(active))]
    ready = [(finish[i], i) for i in range(len(active)) if start[i] <= 0]
    waiting = [(start[i], i) for i in range(len(active)) if start[i] > 0]
    heapq.heapify(ready)
    heapq.heapify(waiting)
    done = 0  # tokens delivered in this batch so far
    for _ in range(batch_size):
        while waiting and waiting[0][0] <= done:
            i = heapq.heappop(waiting)[1]
            heapq.heappush(ready, (finish[i], i))
        if ready:
            i = heapq.heappop(ready)[1]
        else:  # nobody eligible (only after a weight change): the earliest finish, O(groups)
            i = min(range(len(active)), key=lambda j: (finish[j], j))
            waiting.remove((start[i], i))
            heapq.heapify(waiting)
        length = upcoming[i]
        r[i] += length
        done += length
        taken[i] += 1
        upcoming[i] = next_length(active[i], taken[i])
        start[i] = (r[i] - t0[i]) / wa[i]
        finish[i] = (r[i] + upcoming[i] - t0[i]) / wa[i]
        if start[i] <= done:
            heapq.heappush(ready, (finish[i], i))
        else:
            heapq.heappush(waiting, (start[i], i))
    n = [0] * len(w)
    new_targets = list(t_all)
    new_tokens = list(r_all)
    for i, g in enumerate(active):
        n[g] = taken[i]
        new_targets[g] = t0[i] + wa[i] * done
        new_tokens[g] = r[i]
    return n, new_targets, new_tokens


def check_lengths(values: Any, samples: int, where: str) -> np.ndarray:
    """``values`` as a uint32 array of ``samples`` lengths, or a ValueError naming ``where``.

    Lengths decide the sample order, so a wrong one would not fail later: it would silently
    skew the mixture. Integers only (a float array is refused, not truncated), one per
    sample, each from 1 to :data:`MAX_LENGTH`.
    """
    arr = np.asarray(values)
    if arr.dtype.kind not in "iu":
        raise ValueError(
            f"{where}: token lengths must be integers, got dtype {arr.dtype}; pass one "
            "integer token count per sample"
        )
    if arr.shape != (samples,):
        raise ValueError(
            f"{where}: {arr.size} token lengths (shape {arr.shape}) for a stream of {samples} "
            "samples; there must be exactly one per sample, in sample order"
        )
    if samples:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 1 or hi > MAX_LENGTH:
            bad = int(np.flatnonzero((arr < 1) | (arr > MAX_LENGTH))[0])
            raise ValueError(
                f"{where}: sample {bad} has token length {int(arr[bad])}; every length must be "
                f"from 1 to {MAX_LENGTH} (empty samples carry no tokens to weight)"
            )
    return arr.astype(np.uint32, copy=False)


def encode_sidecar(lengths: Sequence[int] | np.ndarray) -> bytes:
    """A length sidecar's bytes: ``.npy`` of little-endian uint32 (what convert writes)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(lengths, dtype="<u4"), allow_pickle=False)
    return buf.getvalue()


def sidecar_entry(data: bytes) -> dict[str, Any]:
    """The manifest's record of a sidecar: name, size and xxh64 of its bytes."""
    return {"basename": LENGTHS_NAME, "bytes": len(data), "xxh64": xxhash.xxh64_hexdigest(data)}


def load_sidecar(data: bytes, entry: Mapping[str, Any], samples: int, where: str) -> np.ndarray:
    """The lengths of a downloaded sidecar, checked against its manifest ``entry`` first.

    Size and xxh64 first (a truncated or replaced file is named as such), then the ``.npy``
    header without pickles, then :func:`check_lengths`.
    """
    if len(data) != entry.get("bytes"):
        raise ValueError(
            f"{where} is {len(data)} bytes but the manifest says {entry.get('bytes')}; the "
            "file is truncated or was replaced: re-convert the corpus"
        )
    digest = xxhash.xxh64_hexdigest(data)
    if digest != entry.get("xxh64"):
        raise ValueError(
            f"{where} has xxh64 {digest} but the manifest says {entry.get('xxh64')}; the file "
            "is corrupt or was replaced: re-convert the corpus"
        )
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{where} is not a .npy array of lengths: {exc}") from None
    return check_lengths(arr, samples, where)


class TokenLengths:
    """Per-group sample lengths in tokens: a constant (packed streams) or one per sample.

    Arrays are indexed by a group's local sample id. ``uniform`` is the one length shared by
    every group, if there is one: then tokens mode is samples mode (see the module doc).
    """

    def __init__(self, per_group: Sequence[int | np.ndarray]) -> None:
        self.per_group: list[int | np.ndarray] = list(per_group)
        self.longest = [int(x) if isinstance(x, int) else int(x.max()) for x in self.per_group]
        self.shortest = [int(x) if isinstance(x, int) else int(x.min()) for x in self.per_group]
        single = set(self.longest) | set(self.shortest)
        self.uniform: int | None = single.pop() if len(single) == 1 else None

    @classmethod
    def build(
        cls,
        values: Sequence[Any] | Mapping[str, Any],
        names: Sequence[str],
        sizes: Sequence[int],
        option: str = "token_lengths",
    ) -> TokenLengths:
        """Checked lengths from one entry per group (a mapping by name or a sequence): an
        array of one length per sample or a single integer for every sample of the group."""
        if isinstance(values, Mapping):
            missing = [n for n in names if n not in values]
            if missing:
                raise ValueError(f"{option} has no lengths for groups {missing}")
            items = [values[n] for n in names]
        else:
            items = list(values)
            if len(items) != len(names):
                raise ValueError(f"{option} has {len(items)} entries for {len(names)} groups")
        out: list[int | np.ndarray] = []
        for name, size, item in zip(names, sizes, items, strict=True):
            where = f"{option}[{name!r}]"
            if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
                check_lengths(np.array([item]), 1, where)
                out.append(int(item))
            else:
                out.append(check_lengths(item, size, where))
        return cls(out)

    def digest(self) -> str:
        """A digest of every length, for a saved state's identity (a resume on other data is
        refused rather than silently planned differently)."""
        h = hashlib.sha256()
        for x in self.per_group:
            if isinstance(x, int):
                h.update(b"c" + x.to_bytes(8, "little"))
            else:
                h.update(b"a" + len(x).to_bytes(8, "little"))
                h.update(np.ascontiguousarray(x, dtype="<u4").tobytes())
        return h.hexdigest()

    def mean(self, group: int) -> float:
        """The mean length of a group's samples."""
        x = self.per_group[group]
        return float(x) if isinstance(x, int) else float(x.mean())

    def lookup(self, group: int, local_ids: np.ndarray) -> list[int]:
        """Lengths of the given samples of ``group``."""
        x = self.per_group[group]
        if isinstance(x, int):
            return [x] * len(local_ids)
        return x[local_ids].tolist()
