"""Shard files kept open and read by ``pread``: the same samples, bounded, released."""

from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path
from typing import Any

import pytest
from helpers import local_streams_dataset, write_uncompressed_groups

import mixstream.reader as reader_module
from mixstream import DynamicStreamingDataset
from mixstream.reader import open_shard_files


def _dataset(folders: list[Path], cache: Path, **options: Any) -> DynamicStreamingDataset:
    return local_streams_dataset(folders, cache, batch_size=5, seed=5, **options)


def _shard_fds(root: Path) -> int:
    """File descriptors of this process open on files under ``root``."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(str(root))
    return count


def test_kept_open_files_read_the_same_samples_and_are_released(tmp_path: Path) -> None:
    folders = write_uncompressed_groups(tmp_path / "corpus", samples=150)
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
    folders = write_uncompressed_groups(tmp_path / "corpus", samples=150)
    ds = _dataset(folders, tmp_path / "cache")
    peak = 0
    for _ in ds:
        peak = max(peak, open_shard_files(), _shard_fds(tmp_path))
    assert peak == 4  # many more shards than that were read
    del ds  # dropped without close: the readers' finalizers close their files
    gc.collect()
    assert open_shard_files() == 0 and _shard_fds(tmp_path) == 0
