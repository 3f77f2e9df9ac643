"""Looking at a converted corpus: ``inspect`` summarizes it, ``verify`` re-reads every byte.

``verify`` checks what a reader will rely on: each shard's stored hash, its decompressed
size and hash, the sample count and offsets in the MDS header against ``index.json``, and
the index against ``mixture.json`` (its digest, where the manifest records one, and its
counts), and a text stream's length sidecar (size, hash, one valid length per sample:
:func:`mixstream.tokens.load_sidecar`). Shards are fetched and checked in a thread pool
(zstd and xxhash release the GIL).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from mixstream import storage
from mixstream.manifest import Manifest
from mixstream.shardindex import ShardIndexError, check_digest, check_index, check_path
from mixstream.tokens import load_sidecar

__all__ = ["StreamSummary", "VerifyReport", "format_table", "inspect_mixture", "verify_mixture"]


@dataclass(frozen=True)
class StreamSummary:
    group: str
    split: str
    documents: int
    samples: int
    tokens: int | None
    raw_bytes: int
    stored_bytes: int
    shards: int

    @property
    def ratio(self) -> float:
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else 1.0


def _load_index(
    manifest: Manifest, group: str, split: str, problems: list[str] | None = None
) -> list[dict[str, Any]]:
    """The shard entries of a stream's index, refused if it names files outside the stream.

    An index that is not the one the manifest records (where it records one) is refused too,
    or, given ``problems`` (``verify``, which reports everything it finds), noted there.
    """
    stream = manifest.stream_url(group, split)
    url = storage.join(stream, "index.json")
    data = storage.read_bytes(url)
    expected = manifest.split(group, split).index_digest
    if expected is not None:
        try:
            check_digest(data, expected, url, manifest.location)
        except ShardIndexError as exc:
            if problems is None:
                raise
            problems.append(str(exc))
    return check_index(json.loads(data), url, stream)


def inspect_mixture(root: str) -> tuple[Manifest, list[StreamSummary]]:
    """Per-stream counts, read from each stream's ``index.json`` (not just the manifest)."""
    manifest = Manifest.load(root)
    rows = []
    for group, info in manifest.groups.items():
        for split, s in info.splits.items():
            shards = _load_index(manifest, group, split)
            rows.append(
                StreamSummary(
                    group=group,
                    split=split,
                    documents=s.documents,
                    samples=sum(x["samples"] for x in shards),
                    tokens=s.tokens,
                    raw_bytes=sum(x["raw_data"]["bytes"] for x in shards),
                    stored_bytes=sum((x["zip_data"] or x["raw_data"])["bytes"] for x in shards),
                    shards=len(shards),
                )
            )
    return manifest, rows


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_table(rows: list[StreamSummary]) -> str:
    """A plain-text table with one row per (group, split) and a total per split."""
    header = ["group", "split", "docs", "samples", "tokens", "bytes", "stored", "shards", "ratio"]
    body: list[list[str]] = []

    def line(r: StreamSummary) -> list[str]:
        return [
            r.group,
            r.split,
            f"{r.documents:,}",
            f"{r.samples:,}",
            "-" if r.tokens is None else f"{r.tokens:,}",
            _human(r.raw_bytes),
            _human(r.stored_bytes),
            str(r.shards),
            f"{r.ratio:.2f}x",
        ]

    body = [line(r) for r in rows]
    for split in dict.fromkeys(r.split for r in rows):
        part = [r for r in rows if r.split == split]
        tokens = None if any(r.tokens is None for r in part) else sum(r.tokens or 0 for r in part)
        total = StreamSummary(
            "TOTAL",
            split,
            sum(r.documents for r in part),
            sum(r.samples for r in part),
            tokens,
            sum(r.raw_bytes for r in part),
            sum(r.stored_bytes for r in part),
            sum(r.shards for r in part),
        )
        body.append(line(total))
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        cells = [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(r) for r in body)])


@dataclass
class VerifyReport:
    streams: int = 0
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_hashes(name: str, data: bytes, info: dict[str, Any]) -> list[str]:
    problems = []
    if len(data) != info["bytes"]:
        problems.append(f"{name}: {len(data)} bytes, index says {info['bytes']}")
    expected = info.get("hashes", {}).get("xxh64")
    if expected is not None and xxhash.xxh64_hexdigest(data) != expected:
        problems.append(f"{name}: xxh64 mismatch (corrupted or replaced)")
    return problems


def _verify_shard(stream_url: str, entry: dict[str, Any]) -> list[str]:
    zip_info, raw_info = entry["zip_data"], entry["raw_data"]
    stored = zip_info or raw_info
    name = storage.join(stream_url, stored["basename"])
    try:
        data = storage.read_bytes(name)
    except storage.StorageError as exc:
        return [str(exc)]
    problems = _check_hashes(name, data, stored)
    if problems:
        return problems
    if zip_info:
        from streaming.base.compression import decompress

        try:
            data = decompress(entry["compression"], data)
        except Exception as exc:  # each codec raises its own error type
            return [f"{name}: cannot decompress {entry['compression']} data ({exc})"]
        problems = _check_hashes(f"{name} (decompressed)", data, raw_info)
        if problems:
            return problems
    samples = int(np.frombuffer(data, np.uint32, 1)[0]) if len(data) >= 4 else -1
    if samples != entry["samples"]:
        return [f"{name}: holds {samples} samples, index says {entry['samples']}"]
    offsets = np.frombuffer(data, np.uint32, samples + 1, offset=4).astype(np.int64)
    if np.any(np.diff(offsets) < 0) or offsets[-1] != len(data):
        return [f"{name}: sample offsets are inconsistent with the shard size"]
    return []


def _verify_lengths(stream_url: str, entry: Any, samples: int) -> list[str]:
    """Problems with a stream's length sidecar (none if it is what the manifest says)."""
    where = f"{stream_url}: length sidecar"
    try:
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object, got {entry!r:.80}")
        name = check_path(entry.get("basename"), "", "length sidecar", where, ValueError)
        url = storage.join(stream_url, name)
        load_sidecar(storage.read_bytes(url), entry, samples, url)
    except (ValueError, storage.StorageError) as exc:
        return [str(exc)]
    return []


def verify_mixture(root: str, threads: int = 8) -> VerifyReport:
    """Re-read every shard of every stream and check it against its index and the manifest."""
    manifest = Manifest.load(root)
    report = VerifyReport()
    jobs: list[tuple[str, dict[str, Any]]] = []
    for group, info in manifest.groups.items():
        for split, s in info.splits.items():
            url = manifest.stream_url(group, split)
            try:
                shards = _load_index(manifest, group, split, report.problems)
            except ShardIndexError as exc:
                report.problems.append(str(exc))
                continue
            except (storage.StorageError, json.JSONDecodeError, KeyError) as exc:
                report.problems.append(f"{url}/index.json: unreadable ({exc})")
                continue
            report.streams += 1
            samples = sum(x["samples"] for x in shards)
            if samples != s.samples or len(shards) != s.shards:
                report.problems.append(
                    f"{url}: index has {samples} samples in {len(shards)} shards, "
                    f"mixture.json says {s.samples} in {s.shards}"
                )
            report.shards += len(shards)
            report.samples += samples
            report.bytes += sum((x["zip_data"] or x["raw_data"])["bytes"] for x in shards)
            jobs.extend((url, entry) for entry in shards)
            if s.lengths is not None:
                report.problems.extend(_verify_lengths(url, s.lengths, samples))
    with ThreadPoolExecutor(threads) as pool:
        for problems in pool.map(lambda job: _verify_shard(*job), jobs):
            report.problems.extend(problems)
    return report
