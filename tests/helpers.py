"""Small helpers shared by the shard_tools tests: corpora, reading streams back, trees."""

from __future__ import annotations

import gzip
import json
import random
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
    "rho",
    "sigma",
    "tau",
    "upsilon",
    "phi",
    "chi",
    "psi",
    "omega",
    "Straße",
    "naïve",
    "café",
    "日本語",
    "emoji🙂",
    "tab\tsep",
]


def make_docs(n: int, seed: int = 0, tag: str = "doc", min_words: int = 5) -> list[str]:
    """``n`` distinct documents of a few to a few dozen words (some non-ASCII, some newlines)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, 60))]
        if rng.random() < 0.2:
            words.insert(rng.randint(0, len(words)), "\n")
        docs.append(f"{tag} {i}: " + " ".join(words))
    return docs


def write_lines(path: Path, lines: Iterable[str], compression: str | None = None) -> Path:
    """Text lines, each ended by a newline; ``compression`` is None, ``"gz"`` or ``"zst"``."""
    data = "".join(line + "\n" for line in lines).encode()
    if compression == "gz":
        data = gzip.compress(data, mtime=0)
    elif compression == "zst":
        data = zstandard.ZstdCompressor(level=3).compress(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_jsonl(path: Path, records: Iterable[Any], compression: str | None = None) -> Path:
    """One JSON value per line (see :func:`write_lines`)."""
    return write_lines(path, (json.dumps(r, ensure_ascii=False) for r in records), compression)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> content), hidden files included."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _shared_memories(obj: Any, depth: int = 0) -> Iterator[Any]:
    from streaming.base.shared import SharedArray, SharedBarrier, SharedMemory, SharedScalar

    if isinstance(obj, SharedMemory):
        yield obj
    elif depth < 3 and isinstance(obj, SharedArray | SharedScalar | SharedBarrier):
        for value in vars(obj).values():
            yield from _shared_memories(value, depth + 1)


def _release(dataset: Any) -> None:
    """Unlink a StreamingDataset's shared memory now instead of at interpreter exit."""
    for value in vars(dataset).values():
        for shm in _shared_memories(value):
            shm.cleanup()


def read_stream(stream: str | Path, scratch: Path, iterate: bool = False) -> list[dict[str, Any]]:
    """All samples of one MDS stream, in order, read with ``streaming.StreamingDataset``.

    A local stream is copied first: streaming decompresses shards into its ``local`` folder,
    which would otherwise add files to the converted tree. ``scratch`` gets a fresh folder
    per call, so no two datasets ever share a local cache. Random access (``dataset[i]``) is
    an order of magnitude faster than iterating for small streams, so ``iterate`` (the
    training code path) is opt-in.
    """
    from streaming import StreamingDataset

    local = scratch / f"stream-{uuid.uuid4().hex[:12]}"
    if str(stream).startswith("s3://"):
        remote: str | None = str(stream)
    else:
        shutil.copytree(stream, local)
        remote = None
    dataset = StreamingDataset(
        remote=remote, local=str(local), shuffle=False, batch_size=1, validate_hash="xxh64"
    )
    try:
        if iterate:
            return list(dataset)
        return [dataset[i] for i in range(dataset.num_samples)]
    finally:
        _release(dataset)
        del dataset


def texts_of(samples: list[dict[str, Any]]) -> list[str]:
    return [s["text"] for s in samples]


def tokens_of(samples: list[dict[str, Any]], seq_len: int, dtype: str) -> np.ndarray:
    """Concatenated ``input_ids`` of token samples, after checking each one's shape and dtype."""
    for s in samples:
        ids = s["input_ids"]
        assert ids.dtype == np.dtype(dtype), ids.dtype
        assert ids.shape == (seq_len,), ids.shape
    if not samples:
        return np.empty(0, dtype)
    return np.concatenate([s["input_ids"] for s in samples])


def write_uncompressed_groups(root: Path, groups: int = 3, samples: int = 200) -> list[Path]:
    """``groups`` uncompressed local MDS streams ``u0, u1, ...`` of many small shards with
    xxh64, as plain streaming writes them: ``x`` is ``1000 * group + i``, ``text`` 0-6 chars."""
    from streaming import MDSWriter

    folders = []
    for g in range(groups):
        folder = root / f"u{g}"
        with MDSWriter(
            out=str(folder),
            columns={"x": "int", "text": "str"},
            size_limit=1 << 10,
            hashes=["xxh64"],
        ) as writer:
            for i in range(samples):
                writer.write({"x": 1000 * g + i, "text": "y" * (i % 7)})
        folders.append(folder)
    return folders


def local_streams_dataset(folders: list[Path], cache: Path, **options: Any) -> Any:
    """A ``DynamicStreamingDataset`` over plain ``Stream(remote=folder, local=cache/name)``s,
    one group per folder."""
    from streaming import Stream

    from mixstream import DynamicStreamingDataset

    streams = [Stream(remote=str(f), local=str(cache / f.name)) for f in folders]
    return DynamicStreamingDataset(streams=streams, groups=[f.name for f in folders], **options)
