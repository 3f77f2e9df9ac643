"""Shards are checked against their index by default, and local corpora are only ever read.

Tampered shards on the real SeaweedFS (a flipped byte that zstd still decodes, a truncated
file, an undecodable one), a byte flipped in a decompressed shard already in the cache, and
a read-only corpus read by a process that cannot write it (another uid).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstd
from helpers import local_streams_dataset, tree_bytes, write_uncompressed_groups
from mixture_harness import fingerprint, write_index
from streaming.base.dataset import _ShardState

from mixstream import DynamicStreamingDataset, storage
from mixstream.stream import ShardCorruptError, file_hash

SHARD = "beta/train/shard.00001.mds.zstd"


def _epoch(ds: DynamicStreamingDataset) -> list[tuple[int, int]]:
    import torch

    try:
        return [(fingerprint(torch.as_tensor(s["input_ids"])), int(s["group"])) for s in ds]
    finally:
        ds.close()


def _dataset(manifest: str, cache: Path, **options: Any) -> DynamicStreamingDataset:
    return DynamicStreamingDataset(
        manifest=manifest, batch_size=4, local=str(cache), seed=3, **options
    )


def _fresh_copy(mixture: str, dest: Path) -> Path:
    """The converted corpus as shard-tools wrote it (no decompressed shards beside it)."""
    shutil.copytree(mixture, dest, ignore=shutil.ignore_patterns("*.mds", "*.tmp"))
    return dest


def _decodable_flip(data: bytes) -> bytes:
    """``data`` with one byte changed such that zstd still decodes it, to other content."""
    original = zstd.decompress(data)
    for pos in range(len(data) - 1, len(data) // 2, -1):
        tampered = bytearray(data)
        tampered[pos] ^= 0x01
        try:
            if zstd.decompress(bytes(tampered)) != original:
                return bytes(tampered)
        except zstd.Error:
            continue
    raise AssertionError("no byte of the shard can be flipped undetected by zstd")


def _undecodable(data: bytes) -> bytes:
    tampered = bytearray(data)
    tampered[4:12] = b"\xff" * 8  # the frame header: zstd refuses it
    return bytes(tampered)


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        (_decodable_flip, "its xxh64 hash does not match its index"),
        (lambda d: d[: len(d) // 2], "bytes but its index says"),
    ],
    ids=["flipped-byte", "truncated"],
)
def test_a_tampered_shard_on_s3_is_refused_by_default_naming_it(
    mixture: str, tmp_path: Path, s3_env: Any, s3_prefix: str, tamper: Any, problem: str
) -> None:
    """Without any option: the shard is fetched again once, then refused by name -- never a
    wrong sample, never a bare ``zstd.Error``."""
    corpus = _fresh_copy(mixture, tmp_path / "corpus")
    shard = corpus / SHARD
    shard.write_bytes(tamper(shard.read_bytes()))
    storage.upload_tree(corpus, s3_prefix)
    with pytest.raises(ShardCorruptError) as info:
        _epoch(_dataset(s3_prefix, tmp_path / "cache"))
    message = str(info.value)
    assert message.startswith(f"shard {s3_prefix}/{SHARD} is corrupt: ") and problem in message
    assert "A fresh download did not match either" in message
    assert not (tmp_path / "cache" / SHARD).exists()  # no bad copy left in the cache


def test_an_undecodable_shard_is_named_even_without_hashes(
    mixture: str, tmp_path: Path, s3_env: Any, s3_prefix: str
) -> None:
    corpus = _fresh_copy(mixture, tmp_path / "corpus")
    shard = corpus / SHARD
    shard.write_bytes(_undecodable(shard.read_bytes()))
    storage.upload_tree(corpus, s3_prefix)
    with pytest.raises(ShardCorruptError) as info:
        _epoch(_dataset(s3_prefix, tmp_path / "cache", validate_hash=None))
    message = str(info.value)
    assert message.startswith(f"shard {s3_prefix}/{SHARD} cannot be decompressed (zstd: ")


def test_shards_without_hashes_are_read_checked_by_size_with_a_warning(
    mixture: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Plain streaming writes no hashes unless asked: such a stream is still read (with a
    warning saying it is checked by size only), and a truncated shard is still refused."""
    corpus = _fresh_copy(mixture, tmp_path / "corpus")
    for group in ("alpha", "beta"):
        obj = json.loads((corpus / group / "train" / "index.json").read_text())
        for entry in obj["shards"]:
            for key in ("raw_data", "zip_data"):
                entry[key]["hashes"] = {}
        write_index(corpus, f"{group}/train", obj)
    with caplog.at_level(logging.WARNING):
        expected = _epoch(_dataset(str(corpus), tmp_path / "cache"))
    # One warning for the dataset, not one per stream (a corpus can have thousands).
    unhashed = [r for r in caplog.records if "checked by size only" in r.getMessage()]
    assert len(unhashed) == 1, caplog.text
    message = unhashed[0].getMessage()
    assert re.search(r"(alpha|beta)/train/index\.json: (\d+) of \2 shards have no xxh64", message)
    assert "and 1 more of the" in message
    assert expected == _epoch(_dataset(mixture, tmp_path / "cache2"))
    shard = corpus / SHARD
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ShardCorruptError, match=r"is \d+ bytes but its index says"):
        _epoch(_dataset(str(corpus), tmp_path / "cache3"))


@pytest.mark.parametrize("source", ["s3", "local"])
def test_a_byte_flipped_in_a_cached_shard_is_caught_and_fetched_again(
    mixture: str,
    tmp_path: Path,
    s3_env: Any,
    s3_prefix: str,
    source: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A decompressed shard damaged in the cache after an earlier run: the next run reads it
    once, finds it does not match its index, fetches it again, and delivers the exact
    sequence."""
    corpus = _fresh_copy(mixture, tmp_path / "corpus")
    manifest = str(corpus)
    if source == "s3":
        storage.upload_tree(corpus, s3_prefix)
        manifest = s3_prefix
    cache = tmp_path / "cache"
    expected = _epoch(_dataset(manifest, cache))
    raw = cache / SHARD.removesuffix(".zstd")
    data = bytearray(raw.read_bytes())
    data[-3] ^= 0x40  # inside the shard's last sample
    raw.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="mixstream.stream"):
        got = _epoch(_dataset(manifest, cache))
    assert got == expected
    assert f"cached shard {raw} does not match its index" in caplog.text
    assert raw.read_bytes() != bytes(data)


@contextlib.contextmanager
def _unwritable_copy(mixture: str) -> Iterator[Path]:
    # Outside pytest's private (0700) temp dir, so another uid can reach it.
    base = Path(tempfile.mkdtemp(prefix="mixstream-ro-"))
    try:
        base.chmod(0o755)
        corpus = _fresh_copy(mixture, base / "corpus")
        for path in [corpus, *corpus.rglob("*")]:
            mode = path.stat().st_mode
            path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) | 0o444)
            if path.is_dir():
                path.chmod(0o555)
        yield corpus
    finally:
        for path in [base, *base.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
        shutil.rmtree(base)


def _read_as(uid: int, corpus: Path, cache: Path) -> list[tuple[int, int]]:
    """Read one epoch in a forked child running as ``uid`` (which cannot write the corpus)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        os.close(read_fd)
        try:
            os.setgid(uid)
            os.setuid(uid)
            result: Any = _epoch(_dataset(str(corpus), cache))
        except BaseException as exc:
            result = f"{type(exc).__name__}: {exc}"
        with os.fdopen(write_fd, "wb") as f:
            pickle.dump(result, f)
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        result = pickle.load(f)
    os.waitpid(pid, 0)
    assert not isinstance(result, str), result
    return result


@pytest.mark.parametrize("algo", ["xxh64", "xxh3_64", "sha1", "md5"])
@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, 1 << 20, (3 << 20) + 17])
def test_file_hash_is_get_hash_of_the_whole_file(tmp_path: Path, algo: str, size: int) -> None:
    """The cached-shard check hashes in chunks: the digest must be the whole file's, at and
    across chunk boundaries, for every hash streaming offers."""
    from streaming.base.hashing import get_hash

    data = os.urandom(size)
    path = tmp_path / "shard.mds"
    path.write_bytes(data)
    assert file_hash(algo, str(path)) == get_hash(algo, data)
    with pytest.raises(ValueError, match="not a supported hash"):
        file_hash("crc-nope", str(path))


def test_a_read_only_corpus_is_read_through_the_cache_and_never_written(
    mixture: str, tmp_path: Path
) -> None:
    """Shards are decompressed into ``local=``, never beside the corpus: the corpus tree is
    byte-for-byte unchanged with no new file, and a process that cannot write it at all
    (another uid, as on a shared read-only mount) reads the same sequence."""
    with _unwritable_copy(mixture) as corpus:
        before = tree_bytes(corpus)
        expected = _epoch(_dataset(str(corpus), tmp_path / "cache"))
        assert tree_bytes(corpus) == before
        assert any((tmp_path / "cache").rglob("*.mds"))
        if os.geteuid() == 0:  # root writes anywhere: the real check is another uid
            cache = Path(tempfile.mkdtemp(prefix="mixstream-ro-cache-"))
            try:
                cache.chmod(0o777)
                assert _read_as(65534, corpus, cache) == expected
            finally:
                shutil.rmtree(cache)
            assert tree_bytes(corpus) == before


def _uncompressed_dataset(folders: list[Path], cache: Path, **options: Any) -> Any:
    return local_streams_dataset(folders, cache, batch_size=4, seed=3, **options)


def test_an_uncompressed_local_corpus_is_linked_into_the_cache_not_copied(
    tmp_path: Path,
) -> None:
    """A local corpus's uncompressed shards are hard-linked into the cache at construction
    (no copy, no per-shard lock at first use), the corpus is never written, and the sequence
    is the one read through copies (``verify_cache=False`` keeps copying on first use)."""
    folders = write_uncompressed_groups(tmp_path / "corpus")
    before = tree_bytes(tmp_path / "corpus")
    ds = _uncompressed_dataset(folders, tmp_path / "linked")
    shards = sorted((tmp_path / "linked" / "u1").glob("*.mds"))
    assert len(shards) > 1
    for shard in shards:  # present before any read, and the corpus file itself
        assert os.stat(shard).st_ino == os.stat(tmp_path / "corpus" / "u1" / shard.name).st_ino
    linked = [int(s["x"]) for s in ds]
    ds.close()
    copied_ds = _uncompressed_dataset(folders, tmp_path / "copied", verify_cache=False)
    assert [int(s["x"]) for s in copied_ds] == linked
    copied_ds.close()
    for shard in (tmp_path / "copied" / "u1").glob("*.mds"):
        assert os.stat(shard).st_ino != os.stat(tmp_path / "corpus" / "u1" / shard.name).st_ino
    assert tree_bytes(tmp_path / "corpus") == before
    assert len(set(linked)) == len(linked) == 600


def test_a_damaged_shard_of_a_linked_corpus_is_refused_on_first_use(tmp_path: Path) -> None:
    """A linked shard is checked on its first use in each process like any cached shard: a
    flipped byte in the corpus is refused, naming the shard, never read."""
    folders = write_uncompressed_groups(tmp_path / "corpus")
    victim = sorted(folders[2].glob("*.mds"))[1]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardCorruptError, match=re.escape(victim.name)):
        list(_uncompressed_dataset(folders, tmp_path / "cache"))


def test_a_compressed_local_corpus_is_read_in_place_not_copied_into_the_cache(
    mixture: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """streaming copies each compressed shard of a local corpus into the cache, reads the
    copy and deletes it; here it is read where it lies and only its decompressed form is
    written, with the same sequence as a read that keeps the copies (``keep_zip``)."""
    from mixstream.stream import ResilientStream

    copied: list[str] = []
    download = ResilientStream._download_file

    def spy(self: ResilientStream, name: str, *args: Any) -> str:
        copied.append(name)
        return download(self, name, *args)

    monkeypatch.setattr(ResilientStream, "_download_file", spy)
    in_place = _epoch(_dataset(mixture, tmp_path / "cache"))
    assert not [name for name in copied if name.endswith(".zstd")]
    assert not list((tmp_path / "cache").rglob("*.zstd"))
    assert len(list((tmp_path / "cache").rglob("*.mds"))) == len(
        list(Path(mixture).glob("*/train/*.mds.zstd"))
    )
    monkeypatch.setattr(ResilientStream, "_reads_in_place", False)
    assert _epoch(_dataset(mixture, tmp_path / "copies")) == in_place
    assert [name for name in copied if name.endswith(".zstd")]


@pytest.mark.parametrize(
    ("tamper", "error", "problem"),
    [
        (_decodable_flip, ShardCorruptError, "its xxh64 hash does not match its index"),
        (None, FileNotFoundError, "is missing: its index lists it"),
    ],
    ids=["flipped-byte", "missing"],
)
def test_a_bad_compressed_shard_of_a_local_corpus_is_refused_naming_it(
    mixture: str, tmp_path: Path, tamper: Any, error: type[Exception], problem: str
) -> None:
    corpus = _fresh_copy(mixture, tmp_path / "corpus")
    victim = corpus / SHARD
    if tamper is None:
        victim.unlink()
    else:
        victim.write_bytes(tamper(victim.read_bytes()))
    with pytest.raises(error, match=re.escape(str(victim)) + ".*" + re.escape(problem)):
        _epoch(_dataset(str(corpus), tmp_path / "cache"))
    assert not (tmp_path / "cache" / SHARD.removesuffix(".zstd")).exists()


def test_a_process_decompresses_at_most_its_share_of_the_cores_at_once(
    mixture: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Concurrent decompressions thrash the caches (each costs several times its CPU
    alone), so each loader process of a node gets its share of the cores; downloads are
    not bounded by it."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from mixstream import stream

    cpus = stream._cpus()
    assert stream.limit_decompression(1) == cpus
    assert stream.limit_decompression(cpus * 8) == 1
    assert stream.limit_decompression(0) == cpus
    running, most = 0, 0
    lock = threading.Lock()
    decompress = stream.decompress

    def counting(*args: Any) -> bytes:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            time.sleep(0.02)  # long enough for the threads to overlap where they may
            return decompress(*args)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(stream, "decompress", counting)
    ds = _dataset(mixture, tmp_path / "cache")
    try:
        for slots in (1, 2):
            stream.limit_decompression(max(1, cpus // slots))
            expected = min(slots, cpus)
            for shard in range(ds.num_shards):
                ds._shard_states[shard] = _ShardState.REMOTE  # prepare them all again
            for path in (tmp_path / "cache").rglob("*.mds"):
                path.unlink()
            most = 0
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(ds.prepare_shard, range(ds.num_shards)))
            assert most == expected
    finally:
        ds.close()
        stream.limit_decompression(1)
