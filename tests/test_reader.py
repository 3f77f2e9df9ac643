"""Shard files kept open and read by ``pread``: the same samples, bounded, released."""

from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path
from typing import Any

import pytest

import mixstream.reader as reader_module
from mixstream import DynamicStreamingDataset
from mixstream.reader import open_shard_files


def _corpus(root: Path) -> list[Path]:
    """3 uncompressed local MDS streams of many small shards."""
    from streaming import MDSWriter

    folders = []
    for g in range(3):
        folder = root / f"g{g}"
        with MDSWriter(
            out=str(folder),
            columns={"x": "int", "text": "str"},
            size_limit=1 << 10,
            hashes=["xxh64"],
        ) as writer:
            for i in range(150):
                writer.write({"x": 1000 * g + i, "text": "y" * (i % 7)})
        folders.append(folder)
    return folders


def _dataset(folders: list[Path], cache: Path, **options: Any) -> DynamicStreamingDataset:
    from streaming import Stream

    streams = [Stream(remote=str(f), local=str(cache / f.name)) for f in folders]
    names = [f.name for f in folders]
    return DynamicStreamingDataset(streams=streams, groups=names, batch_size=5, seed=5, **options)


def _shard_fds(root: Path) -> int:
    """File descriptors of this process open on files under ``root``."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(str(root))
    return count


def test_kept_open_files_read_the_same_samples_and_are_released(tmp_path: Path) -> None:
    folders = _corpus(tmp_path / "corpus")
    ds = _dataset(folders, tmp_path / "a")
    kept = [(int(s["x"]), s["text"]) for s in ds]
    assert open_shard_files() > 3 and _shard_fds(tmp_path) == open_shard_files()
    ds.close()
    assert open_shard_files() == 0 and _shard_fds(tmp_path) == 0
    # With a cache limit files are opened per read, as streaming does (eviction must free
    # disk space): the same samples in the same order.
    limited = _dataset(folders, tmp_path / "b", cache_limit="1gb")
    assert [(int(s["x"]), s["text"]) for s in limited] == kept
    assert open_shard_files() == 0
    limited.close()
    assert len(kept) == len(set(kept)) == 450


def test_open_files_are_bounded_and_freed_with_a_dropped_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reader_module, "MAX_OPEN", 4)
    folders = _corpus(tmp_path / "corpus")
    ds = _dataset(folders, tmp_path / "cache")
    peak = 0
    for _ in ds:
        peak = max(peak, open_shard_files(), _shard_fds(tmp_path))
    assert peak == 4  # many more shards than that were read
    del ds  # dropped without close: the readers' finalizers close their files
    gc.collect()
    assert open_shard_files() == 0 and _shard_fds(tmp_path) == 0
