"""Document-level helpers: held-out assignment by content hash, and sequence packing."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import xxhash

__all__ = ["SequencePacker", "assign_split"]

_SCALE = float(1 << 64)


def assign_split(text: str, val_fraction: float, test_fraction: float, seed: int = 0) -> str:
    """``"val"``, ``"test"`` or ``"train"`` from a hash of the document itself.

    Depends only on the text (and seed), so the split is the same whatever the input order,
    chunking or worker count, and duplicated documents never straddle train and test.
    """
    u = xxhash.xxh64_intdigest(text.encode("utf-8"), seed=seed) / _SCALE
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


class SequencePacker:
    """Concatenates documents, each followed by EOS, and cuts fixed-length sequences."""

    def __init__(self, seq_len: int, eos_id: int, dtype: str) -> None:
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.seq_len = seq_len
        self.dtype = np.dtype(dtype)
        self._eos = np.array([eos_id], dtype=self.dtype)
        self._parts: list[np.ndarray] = []
        self._size = 0

    def add(self, ids: np.ndarray) -> Iterator[np.ndarray]:
        """Add one document's token ids; yields every sequence that became complete."""
        if len(ids) and (ids.max() > np.iinfo(self.dtype).max or ids.min() < 0):
            raise ValueError(
                f"token id {int(ids.max())} does not fit in {self.dtype}; the tokenizer "
                "produced an id outside its declared vocabulary"
            )
        self._parts.append(ids.astype(self.dtype, copy=False))
        self._parts.append(self._eos)
        self._size += len(ids) + 1
        if self._size < self.seq_len:
            return
        flat = np.concatenate(self._parts)
        full = len(flat) // self.seq_len * self.seq_len
        yield from flat[:full].reshape(-1, self.seq_len)
        rest = flat[full:]
        self._parts, self._size = [rest], len(rest)

    def tail(self) -> np.ndarray:
        """Tokens not yet part of a full sequence (fewer than ``seq_len``)."""
        return np.concatenate(self._parts) if self._parts else np.empty(0, self.dtype)
