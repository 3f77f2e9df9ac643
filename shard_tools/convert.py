"""Corpus -> one MDS stream per group and split, plus ``mixture.json``.

The pipeline, and why it is shaped this way:

1. *Plan.* Inputs are cut into tasks whose boundaries depend only on the input
   (:mod:`shard_tools.sources`), so the output never depends on the worker count.
2. *Convert in parallel.* Each task runs in a worker process and writes its documents with
   streaming's ``MDSWriter`` into a private staging folder, one writer per (group, split).
   Tokenized documents are packed into ``seq_len`` sequences; the partial sequence left at
   the end of a task is returned to the parent instead of being padded or dropped. The
   small held-out splits (val/test) are returned to the parent too, so they end up in a few
   full shards rather than one sliver of a shard per task. Raw-text samples vary in length,
   so each task also returns every sample's length in tokens (``--length-tokenizer``).
3. *Merge.* The parent renumbers every task's train shards into one flat stream per group,
   in plan order, writes the returned samples and packs the task tails in the same order
   into final shards, and writes each ``index.json``. This is the job of streaming's
   ``merge_index``, done here because ``merge_index`` keeps per-partition subfolders whose
   names would depend on how the work was split; a flat stream is identical for 1 or N
   workers. A text stream also gets its length sidecar ``lengths.npy``
   (:mod:`mixstream.tokens`, for ``weight_unit="tokens"``) in the same sample order,
   recorded with its size and hash in ``mixture.json``.
4. *Publish atomically.* Locally the finished tree is renamed into place; on S3 every
   stream's shards are uploaded before its ``index.json``, and ``mixture.json`` goes last.
   A failed run removes what it wrote, so an interrupted conversion never looks complete;
   the staging folder of a killed one is removed by the next conversion of the same output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: staging is not locked, and never reclaimed
    fcntl = None  # type: ignore[assignment]

from mixstream import storage
from mixstream.manifest import MANIFEST_NAME, SPLITS, GroupInfo, Manifest, ManifestError, SplitInfo
from mixstream.shardindex import IndexDigest
from mixstream.sharedmem import exit_with_parent, process_alive, process_start_time
from mixstream.tokens import LENGTHS_NAME, encode_sidecar, sidecar_entry
from shard_tools.packing import SequencePacker, assign_split
from shard_tools.sources import (
    DEFAULT_CHUNK_BYTES,
    InputSpec,
    ReadOptions,
    ReadStats,
    Task,
    plan_tasks,
    read_documents,
)
from shard_tools.tokenizer import BYTE, Tokenizer, TokenizerSpec, token_dtype

__all__ = ["ConvertError", "ConvertOptions", "ConvertReport", "convert"]

TEXT_COLUMN = "text"
TOKENS_COLUMN = "input_ids"
HASH = "xxh64"
DEFAULT_SHARD_SIZE = "64mb"
Key = tuple[str, str]


class ConvertError(RuntimeError):
    """The conversion cannot proceed; the message names what to fix."""


@dataclass(frozen=True)
class ConvertOptions:
    """Everything that shapes the output (all of it recorded in the manifest or index)."""

    tokenizer: str | None = None
    eos_token: str | None = None
    # Raw-text output: the tokenizer whose token count of each sample (plus one EOS) the
    # length sidecar records; "byte" counts UTF-8 bytes and needs nothing loaded.
    length_tokenizer: str = BYTE
    seq_len: int = 2048
    dtype: str | None = None
    text_field: str = "text"
    group_field: str | None = None
    format: str | None = None
    skip_bad: bool = False
    val_fraction: float = 0.01
    test_fraction: float = 0.01
    split_seed: int = 0
    shard_size: int | str = DEFAULT_SHARD_SIZE
    compression: str = "zstd"
    workers: int = 0
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    overwrite: bool = False
    progress: bool = True

    def read_options(self) -> ReadOptions:
        return ReadOptions(self.text_field, self.group_field, self.skip_bad, self.format)

    def validate(self) -> None:
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConvertError(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConvertError("--val-fraction + --test-fraction must leave some data for train")
        if self.tokenizer is not None and self.length_tokenizer != BYTE:
            raise ConvertError(
                "--length-tokenizer applies to raw-text output (omit --tokenizer); packed "
                "samples are --seq-len tokens each"
            )
        if self.tokenizer is not None and self.seq_len < 2:
            raise ConvertError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.chunk_bytes <= 0:
            raise ConvertError("--chunk-size must be positive")


@dataclass
class StreamCounts:
    documents: int = 0
    tokens: int = 0
    text_bytes: int = 0

    def add(self, other: StreamCounts) -> None:
        self.documents += other.documents
        self.tokens += other.tokens
        self.text_bytes += other.text_bytes


@dataclass
class TaskResult:
    index: int
    counts: dict[Key, StreamCounts]
    heldout: dict[Key, list[dict[str, Any]]]
    tails: dict[Key, np.ndarray]
    stats: ReadStats
    # Text output: each sample's length in tokens, in the order the task wrote (train) or
    # returned (held out) them.
    lengths: dict[Key, list[int]] = field(default_factory=dict)


@dataclass
class ConvertReport:
    """What a conversion produced and what it skipped."""

    manifest: Manifest
    input_bytes: int
    seconds: float
    bad_records: int = 0
    empty_documents: int = 0
    dropped_tokens: int = 0
    first_errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Layout:
    """Sample encoding shared by the parent and the workers."""

    columns: dict[str, str]
    dtype: str | None
    eos_id: int | None


def _staging_dir(base: str, index: int) -> str:
    return os.path.join(base, f"task-{index:06d}")


_tokenizers: dict[TokenizerSpec, Tokenizer] = {}


def _tokenizer(spec: TokenizerSpec) -> Tokenizer:
    if spec not in _tokenizers:
        _tokenizers[spec] = spec.load()
    return _tokenizers[spec]


def _writer(out: str, layout: _Layout, options: ConvertOptions) -> Any:
    from streaming import MDSWriter

    return MDSWriter(
        out=out,
        columns=layout.columns,
        compression=options.compression or None,
        hashes=[HASH],
        size_limit=options.shard_size,
    )


def _run_task(task: Task, options: ConvertOptions, layout: _Layout, staging: str) -> TaskResult:
    """Convert one task into its own staging folder (runs in a worker process)."""
    tok = None
    if options.tokenizer is not None:
        tok = _tokenizer(TokenizerSpec(options.tokenizer, options.eos_token))
    counter = None
    if options.tokenizer is None and options.length_tokenizer != BYTE:
        counter = _tokenizer(TokenizerSpec(options.length_tokenizer, None))
    lengths: dict[Key, list[int]] = {}
    writers: dict[Key, Any] = {}
    heldout: dict[Key, list[dict[str, Any]]] = {}
    packers: dict[Key, SequencePacker] = {}
    counts: dict[Key, StreamCounts] = {}
    stats = ReadStats()
    base = _staging_dir(staging, task.index)

    def write(key: Key, sample: dict[str, Any]) -> None:
        if key[1] != "train":
            heldout.setdefault(key, []).append(sample)
            return
        if key not in writers:
            writers[key] = _writer(os.path.join(base, *key), layout, options)
        writers[key].write(sample)

    try:
        for doc in read_documents(task, options.read_options(), stats):
            split = assign_split(
                doc.text, options.val_fraction, options.test_fraction, options.split_seed
            )
            key = (doc.group, split)
            c = counts.setdefault(key, StreamCounts())
            c.documents += 1
            size = len(doc.text.encode("utf-8"))
            c.text_bytes += size
            if tok is None:
                count = size if counter is None else len(counter.encode(doc.text))
                lengths.setdefault(key, []).append(count + 1)  # + EOS, as packing counts
                write(key, {TEXT_COLUMN: doc.text})
                continue
            ids = tok.encode(doc.text)
            c.tokens += len(ids) + 1
            if key not in packers:
                assert layout.dtype is not None and layout.eos_id is not None
                packers[key] = SequencePacker(options.seq_len, layout.eos_id, layout.dtype)
            for seq in packers[key].add(ids):
                write(key, {TOKENS_COLUMN: seq})
    finally:
        for w in writers.values():
            w.finish()
    tails = {key: p.tail() for key, p in packers.items()}
    return TaskResult(task.index, counts, heldout, tails, stats, lengths)


def _resolve_layout(options: ConvertOptions) -> tuple[_Layout, dict[str, Any] | None]:
    """Check the tokenizer and dtype up front, before any work is spent."""
    if options.tokenizer is None:
        if options.dtype is not None:
            raise ConvertError("--dtype applies to tokenized output; add --tokenizer")
        if options.length_tokenizer != BYTE:
            try:  # fail now on a tokenizer that cannot load, not in every worker
                _tokenizer(TokenizerSpec(options.length_tokenizer, None))
            except ValueError as exc:
                raise ConvertError(f"--length-tokenizer: {exc}") from None
        return _Layout({TEXT_COLUMN: "str"}, None, None), None
    try:
        tok = _tokenizer(TokenizerSpec(options.tokenizer, options.eos_token))
        dtype = token_dtype(tok.id_bound, options.dtype)
    except ValueError as exc:
        raise ConvertError(str(exc)) from None
    info = tok.describe()
    columns = {TOKENS_COLUMN: f"ndarray:{dtype}:{options.seq_len}"}
    return _Layout(columns, dtype, tok.eos_id), info


def _check_destination(out: str, overwrite: bool) -> Manifest | None:
    """Fail before any work if ``out`` cannot take the output; returns what it holds.

    A non-empty output needs ``overwrite``, and then only what a previous conversion wrote
    there is replaced: the streams its ``mixture.json`` names, and the manifest itself.
    Anything else stays. Returns that previous manifest (``None`` if there is none).
    """
    if storage.is_remote(out):
        storage.check_writable(out)
        present = bool(storage.list_files(out))
    else:
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise ConvertError(f"{out} exists and is not a directory")
        present = path.exists() and any(path.iterdir())
    if not present:
        return None
    if not overwrite:
        raise ConvertError(f"{out} is not empty; pass --overwrite to replace its contents")
    if not storage.exists(storage.join(out, MANIFEST_NAME)):
        return None
    try:
        return Manifest.load(out)
    except ManifestError as exc:
        raise ConvertError(
            f"{exc}; --overwrite only deletes the streams a previous conversion's manifest "
            f"names, so it cannot tell what to replace in {out}: fix or remove the manifest"
        ) from None


def _stream_paths(manifest: Manifest | None) -> list[str]:
    if manifest is None:
        return []
    return [info.path for g in manifest.groups.values() for info in g.splits.values()]


def _check_inputs_outside(tasks: Sequence[Task], out: str) -> None:
    """Refuse inputs inside the output: replacing the output could delete them."""
    if storage.is_remote(out):
        return
    root = os.path.realpath(out)
    for task in tasks:
        for name in task.files:
            real = os.path.realpath(name)
            if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
                raise ConvertError(
                    f"input {name} is inside the output {out}; writing the output could "
                    "replace or delete it: move the input out, or choose another output"
                )


def _check_collisions(out: str, new: Sequence[str], old: Sequence[str]) -> None:
    """Refuse to put a new stream where a file or folder not from a previous conversion is."""
    for rel in new:
        if rel in old:
            continue
        url = storage.join(out, rel)
        if storage.is_remote(out):
            taken = bool(storage.list_files(url))
        else:
            parts = Path(rel).parts
            taken = Path(url).exists() or any(
                (Path(out).joinpath(*parts[:i])).is_file() for i in range(1, len(parts))
            )
        if taken:
            raise ConvertError(
                f"{url} already exists and was not written by a previous conversion into {out} "
                "(its mixture.json does not name it); move it away or choose another output"
            )


def _merge_stream(
    key: Key,
    results: Sequence[TaskResult],
    staging: str,
    final: str,
    layout: _Layout,
    options: ConvertOptions,
) -> tuple[list[dict[str, Any]], int, IndexDigest]:
    """Renumber task shards (plan order) into one flat stream; returns (shards, dropped, the
    digest of its index, which the manifest records)."""
    os.makedirs(final, exist_ok=True)
    shards: list[dict[str, Any]] = []

    def take(folder: str) -> None:
        index_path = os.path.join(folder, "index.json")
        if not os.path.exists(index_path):
            return
        with open(index_path) as f:
            entries = json.load(f)["shards"]
        for entry in entries:
            source = (entry["zip_data"] or entry["raw_data"])["basename"]
            name = f"shard.{len(shards):05d}.mds"
            entry["raw_data"]["basename"] = name
            if entry["zip_data"]:
                name = f"{name}.{options.compression.split(':')[0]}"
                entry["zip_data"]["basename"] = name
            os.replace(os.path.join(folder, source), os.path.join(final, name))
            shards.append(entry)

    for result in results:
        take(os.path.join(_staging_dir(staging, result.index), *key))
    extra = [sample for r in results for sample in r.heldout.get(key, [])]
    dropped = 0
    tails = [r.tails[key] for r in results if key in r.tails and len(r.tails[key])]
    if tails:
        flat = np.concatenate(tails)
        full = len(flat) // options.seq_len * options.seq_len
        dropped = len(flat) - full
        extra.extend({TOKENS_COLUMN: seq} for seq in flat[:full].reshape(-1, options.seq_len))
    if extra:
        extra_dir = os.path.join(staging, "merged", *key)
        writer = _writer(extra_dir, layout, options)
        for sample in extra:
            writer.write(sample)
        writer.finish()
        take(extra_dir)
    index = json.dumps({"version": 2, "shards": shards}, sort_keys=True).encode()
    with open(os.path.join(final, "index.json"), "wb") as f:
        f.write(index)
    return shards, dropped, IndexDigest.of(index)


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="convert",
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
    )


_STAGING_LOCK = ".lock"
STALE_STAGING_WAIT = 5.0


def _staging_prefix(out: str) -> str:
    """Staging folders of one output share a name prefix (the output may be remote, with
    its staging in the temp dir beside other outputs')."""
    return f".shard-tools-{hashlib.sha256(out.encode()).hexdigest()[:12]}-"


def _open_staging(out: str, base: str) -> tuple[str, int | None]:
    """A fresh staging folder for ``out`` under ``base``, and the fd that holds it.

    The folder's ``.lock`` is ``flock``-ed from before it is visible (it is locked under a
    temporary name, then renamed) until this conversion ends; forked workers inherit the
    hold. So a staging folder whose lock nobody holds belongs to no live process: one left
    by a killed conversion of the same output is removed here, and a live one never is.
    """
    _reclaim_staging(out, base)
    staging = tempfile.mkdtemp(prefix=_staging_prefix(out), dir=base)
    if fcntl is None:
        return staging, None
    pending = os.path.join(staging, f"{_STAGING_LOCK}.{uuid.uuid4().hex[:8]}")
    fd = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    pid = os.getpid()
    os.write(fd, json.dumps({"out": out, "pid": pid, "start": process_start_time(pid)}).encode())
    os.replace(pending, os.path.join(staging, _STAGING_LOCK))
    return staging, fd


def _reclaim_staging(out: str, base: str, wait: float = STALE_STAGING_WAIT) -> list[str]:
    """Remove staging folders of ``out`` left by conversions no process of which is alive.

    Only folders whose lock can be taken: a live conversion (or a worker of one) holds its
    own. A folder of a conversion that is dead while its lock is still held has workers
    exiting (they die with their parent, within a fraction of a second); it is waited for
    up to ``wait`` s, then left. Folders without a lock (older versions) are left alone.
    """
    if fcntl is None:
        return []
    prefix = _staging_prefix(out)
    try:
        names = [n for n in os.listdir(base) if n.startswith(prefix)]
    except OSError:
        return []
    removed = []
    for name in names:
        folder = os.path.join(base, name)
        try:
            fd = os.open(os.path.join(folder, _STAGING_LOCK), os.O_RDONLY)
        except OSError:
            continue
        try:
            try:
                owner = json.loads(os.read(fd, 4096))
            except (OSError, ValueError):
                continue
            if owner.get("out") != out:
                continue
            alive = process_alive(int(owner.get("pid", 0)), int(owner.get("start", 0)))
            if not _lock_within(fd, 0 if alive else wait):
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            os.close(fd)
    return removed


def _lock_within(fd: int, wait: float) -> bool:
    """Take ``fd``'s exclusive flock, trying for up to ``wait`` s."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def _start_method() -> str:
    """fork where available: workers inherit the imports (streaming pulls in torch, ~3 s)
    and the tokenizer, and callers need no ``__main__`` guard. Our workers only parse,
    tokenize and compress, so no lock of the parent's threads is ever needed after the fork.
    """
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


def _run_all(
    tasks: list[Task],
    options: ConvertOptions,
    layout: _Layout,
    staging: str,
    workers: int,
    start_method: str,
) -> list[TaskResult]:
    results: list[TaskResult] = []
    # Import streaming (and torch under it, ~3 s) once here, so forked workers inherit it
    # instead of each importing it again.
    import streaming  # noqa: F401

    with _progress(sum(t.size for t in tasks), options.progress) as bar:
        if workers <= 1:
            for task in tasks:
                results.append(_run_task(task, options, layout, staging))
                bar.update(task.size)
            return results
        context = multiprocessing.get_context(start_method)
        with ProcessPoolExecutor(
            max_workers=workers, mp_context=context, initializer=exit_with_parent
        ) as pool:
            sizes: dict[Future[TaskResult], int] = {
                pool.submit(_run_task, t, options, layout, staging): t.size for t in tasks
            }
            pending = set(sizes)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    if future.exception() is not None:
                        for other in pending:
                            other.cancel()
                        raise future.exception()  # type: ignore[misc]
                    results.append(future.result())
                    bar.update(sizes[future])
    return sorted(results, key=lambda r: r.index)


def convert(
    inputs: Sequence[InputSpec], out: str | os.PathLike[str], options: ConvertOptions
) -> ConvertReport:
    """Convert ``inputs`` into per-group MDS streams and a ``mixture.json`` under ``out``."""
    started = time.perf_counter()
    start_method = _start_method()
    out = str(out).rstrip("/")
    options.validate()
    layout, tokenizer_info = _resolve_layout(options)
    tasks = plan_tasks(inputs, options.read_options(), options.chunk_bytes)
    _check_inputs_outside(tasks, out)
    previous = _check_destination(out, options.overwrite)
    workers = options.workers or os.cpu_count() or 1

    remote = storage.is_remote(out)
    parent = None if remote else str(Path(out).resolve().parent)
    if parent:
        os.makedirs(parent, exist_ok=True)
    identity = out if remote else str(Path(out).resolve())
    staging, hold = _open_staging(identity, parent or tempfile.gettempdir())
    try:
        results = _run_all(tasks, options, layout, staging, workers, start_method)
        report = _assemble(inputs, results, staging, layout, tokenizer_info, options, out)
        _publish(os.path.join(staging, "out"), out, report.manifest, previous)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if hold is not None:
            os.close(hold)
    report.input_bytes = sum(t.size for t in tasks)
    report.seconds = time.perf_counter() - started
    return report


def _assemble(
    inputs: Sequence[InputSpec],
    results: list[TaskResult],
    staging: str,
    layout: _Layout,
    tokenizer_info: dict[str, Any] | None,
    options: ConvertOptions,
    out: str,
) -> ConvertReport:
    totals: dict[Key, StreamCounts] = {}
    stats = ReadStats()
    for r in results:
        for key, c in r.counts.items():
            totals.setdefault(key, StreamCounts()).add(c)
        stats.bad_records += r.stats.bad_records
        stats.empty_documents += r.stats.empty_documents
        stats.first_errors.extend(r.stats.first_errors[: 5 - len(stats.first_errors)])

    named = sorted({s.group for s in inputs if s.group is not None})
    seen = sorted({g for g, _ in totals})
    for group in named:
        if group not in seen:
            paths = ", ".join(s.path for s in inputs if s.group == group)
            raise ConvertError(f"group {group!r} has no documents (inputs: {paths})")
    if not seen:
        raise ConvertError("the inputs contain no documents")

    wanted = {"train": True, "val": options.val_fraction > 0, "test": options.test_fraction > 0}
    groups: dict[str, GroupInfo] = {}
    dropped_total = 0
    for group in seen:
        splits: dict[str, SplitInfo] = {}
        for split in SPLITS:
            if not wanted[split]:
                continue
            key = (group, split)
            counts = totals.get(key, StreamCounts())
            rel = f"{group}/{split}"
            shards, dropped, digest = _merge_stream(
                key, results, staging, os.path.join(staging, "out", rel), layout, options
            )
            dropped_total += dropped
            samples = sum(s["samples"] for s in shards)
            sidecar = None
            if not layout.dtype and samples:
                sidecar = _write_lengths(key, results, samples, staging, rel)
            if samples == 0:
                hint = f"raise --{split}-fraction" if split != "train" else "add data to the group"
                unit = "one sequence of tokens" if layout.dtype else "one document"
                raise ConvertError(
                    f"group {group!r} has no {split} samples ({counts.documents} documents, "
                    f"need at least {unit}); {hint}"
                )
            splits[split] = SplitInfo(
                path=rel,
                documents=counts.documents,
                samples=samples,
                tokens=samples * options.seq_len if layout.dtype else None,
                text_bytes=counts.text_bytes,
                stored_bytes=sum((s["zip_data"] or s["raw_data"])["bytes"] for s in shards),
                raw_bytes=sum(s["raw_data"]["bytes"] for s in shards),
                shards=len(shards),
                lengths=sidecar,
                index_bytes=digest.size,
                index_xxh64=digest.xxh64,
            )
        sources = [s.path for s in inputs if s.group in (group, None)]
        groups[group] = GroupInfo(group, splits, sources)

    if layout.dtype:
        sample = {
            "format": "tokens",
            "column": TOKENS_COLUMN,
            "seq_len": options.seq_len,
            "dtype": layout.dtype,
        }
    else:
        sample = {
            "format": "text",
            "column": TEXT_COLUMN,
            "length_tokenizer": options.length_tokenizer,
        }
    holdout = {
        "val_fraction": options.val_fraction,
        "test_fraction": options.test_fraction,
        "seed": options.split_seed,
        "hash": HASH,
    }
    manifest = Manifest(groups, sample, tokenizer_info, holdout, root=out)
    return ConvertReport(
        manifest=manifest,
        input_bytes=0,
        seconds=0.0,
        bad_records=stats.bad_records,
        empty_documents=stats.empty_documents,
        dropped_tokens=dropped_total,
        first_errors=stats.first_errors,
    )


def _write_lengths(
    key: Key, results: Sequence[TaskResult], samples: int, staging: str, rel: str
) -> dict[str, Any]:
    """Write a text stream's length sidecar; returns its manifest entry.

    :func:`_merge_stream` lays the stream out as every task's samples in plan order (train:
    the task's shards; held out: what it returned), so the lengths are concatenated in the
    same order.
    """
    lengths = [n for r in results for n in r.lengths.get(key, [])]
    if len(lengths) != samples:  # a bug, not bad input: the sidecar would misalign
        raise ConvertError(f"{rel}: {len(lengths)} lengths for {samples} samples")
    data = encode_sidecar(lengths)
    with open(os.path.join(staging, "out", rel, LENGTHS_NAME), "wb") as f:
        f.write(data)
    return sidecar_entry(data)


def _publish(tree: str, out: str, manifest: Manifest, previous: Manifest | None) -> None:
    """Make ``tree`` visible at ``out`` with ``mixture.json`` last; roll back on failure.

    Into an empty output the whole tree goes at once. Otherwise (``--overwrite``) only the
    previous conversion's manifest and streams are replaced -- the manifest first, so no
    reader sees one naming streams that are gone -- and every other file stays.
    """
    new = _stream_paths(manifest)
    old = _stream_paths(previous)
    _check_collisions(out, new, old)
    if storage.is_remote(out):
        if previous is not None:
            storage.delete_file(storage.join(out, MANIFEST_NAME))
            for rel in old:
                storage.delete_prefix(storage.join(out, rel))
        try:
            storage.upload_tree(tree, out)
            manifest.save(out)
        except BaseException:
            # No index without its shards is left behind; what was not ours is untouched.
            with contextlib.suppress(storage.StorageError):
                for rel in new:
                    storage.delete_prefix(storage.join(out, rel))
            raise
        return
    manifest.save(tree)
    target = Path(out)
    if not target.exists() or not any(target.iterdir()):
        os.replace(tree, target)
        return
    trash = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    moved: list[str] = []
    installed: list[str] = []
    try:
        for rel in [MANIFEST_NAME, *old]:
            if (target / rel).exists():
                (trash / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(target / rel, trash / rel)
                moved.append(rel)
        for rel in [*new, MANIFEST_NAME]:
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(Path(tree) / rel, target / rel)
            installed.append(rel)
    except BaseException:
        for rel in reversed(installed):
            shutil.move(target / rel, Path(tree) / rel)
        for rel in reversed(moved):
            os.replace(trash / rel, target / rel)
        shutil.rmtree(trash, ignore_errors=True)
        raise
    shutil.rmtree(trash, ignore_errors=True)
    for rel in old:  # group folders the old streams leave empty
        parent = (target / rel).parent
        while parent != target and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
