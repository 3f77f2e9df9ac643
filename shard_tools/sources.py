"""Corpus inputs: discovering files, planning them into tasks, and reading documents.

A *task* is a slice of the input (a byte range of a JSONL file, row groups of a Parquet
file, a batch of text files) whose boundaries depend only on the input itself. Output is
assembled task by task in plan order, so it is byte-identical for any number of worker
processes.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from mixstream.manifest import ManifestError, check_group_name

__all__ = [
    "Document",
    "InputError",
    "InputSpec",
    "ReadOptions",
    "Task",
    "detect_format",
    "plan_tasks",
    "read_documents",
]

JSONL_SUFFIXES = {".jsonl": "jsonl", ".jsonl.gz": "jsonl.gz", ".jsonl.zst": "jsonl.zst"}
JSONL_SUFFIXES[".jsonl.zstd"] = "jsonl.zst"
TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst"}
FORMATS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet", "text")
DEFAULT_CHUNK_BYTES = 32 << 20


class InputError(ValueError):
    """Bad input, with the file (and line) to look at."""


@dataclass(frozen=True)
class InputSpec:
    """An input path and its group; ``group=None`` reads the group from each record."""

    path: str
    group: str | None = None


@dataclass(frozen=True)
class ReadOptions:
    text_field: str = "text"
    group_field: str | None = None
    skip_bad: bool = False
    format: str | None = None


@dataclass(frozen=True)
class Task:
    """A slice of the input converted by one worker call."""

    index: int
    format: str
    group: str | None
    files: tuple[str, ...]
    start: int = 0
    end: int | None = None
    first_line: int = 1
    size: int = 0


@dataclass
class Document:
    text: str
    group: str


@dataclass
class ReadStats:
    bad_records: int = 0
    empty_documents: int = 0
    first_errors: list[str] = field(default_factory=list)


def detect_format(path: str, forced: str | None = None) -> str:
    if forced is not None:
        if forced not in FORMATS:
            raise InputError(f"unknown --format {forced!r}; choose one of {', '.join(FORMATS)}")
        return forced
    name = os.path.basename(path).lower()
    for suffix, fmt in JSONL_SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    if name.endswith(".parquet"):
        return "parquet"
    if os.path.splitext(name)[1] in TEXT_SUFFIXES:
        return "text"
    raise InputError(
        f"{path}: unknown input format; expected .jsonl, .jsonl.gz, .jsonl.zst, .parquet or a "
        "text file (.txt, .md, .rst); pass --format to say what it is"
    )


def _expand(spec: InputSpec, forced: str | None) -> list[tuple[str, str]]:
    """(file, format) pairs for one input path, directories walked in sorted order."""
    path = spec.path
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        _check_readable(path)
        return [(path, detect_format(path, forced))]
    files = []

    def unreadable(exc: OSError) -> None:
        # os.walk skips what it cannot list; a corpus silently missing a folder is worse.
        raise InputError(f"{exc.filename}: directory is not readable ({_reason(exc)})")

    for dirpath, dirnames, filenames in os.walk(path, onerror=unreadable):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith("."))
    if not files:
        raise InputError(f"{path}: directory contains no files")
    for f in files:
        _check_readable(f)
    return [(f, detect_format(f, forced)) for f in sorted(files)]


def _reason(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    return exc.strerror or type(exc).__name__


def _check_readable(path: str) -> None:
    """Open each input once up front: an unreadable one is one line, before any work."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise InputError(f"{path}: cannot read the file ({_reason(exc)})") from None


def plan_tasks(
    inputs: Sequence[InputSpec], options: ReadOptions, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> list[Task]:
    """Split the inputs into tasks of about ``chunk_bytes`` of input each."""
    if not inputs:
        raise InputError("no inputs given; pass files or directories (or --group NAME=PATH)")
    tasks: list[Task] = []
    for spec in inputs:
        if spec.group is None and options.group_field is None:
            raise InputError(
                f"{spec.path}: no group for this input; give it one with --group NAME={spec.path} "
                "or read groups from each record with --group-field"
            )
        if spec.group is not None:
            try:
                check_group_name(spec.group)
            except ManifestError as exc:
                raise InputError(str(exc)) from None
        text_batch: list[str] = []
        batch_bytes = 0

        def flush_text(spec: InputSpec = spec) -> None:
            nonlocal text_batch, batch_bytes
            if text_batch:
                tasks.append(_task(tasks, "text", spec.group, tuple(text_batch), size=batch_bytes))
                text_batch, batch_bytes = [], 0

        for path, fmt in _expand(spec, options.format):
            size = os.path.getsize(path)
            if fmt == "text":
                if spec.group is None:
                    raise InputError(
                        f"{path}: plain-text files carry no group field; give the input a group "
                        "with --group NAME=PATH"
                    )
                text_batch.append(path)
                batch_bytes += size
                if batch_bytes >= chunk_bytes:
                    flush_text()
                continue
            flush_text()
            if fmt == "jsonl":
                tasks.extend(_jsonl_chunks(tasks, path, spec.group, chunk_bytes))
            elif fmt == "parquet":
                tasks.extend(_parquet_chunks(tasks, path, spec.group, chunk_bytes))
            else:
                tasks.append(_task(tasks, fmt, spec.group, (path,), size=size))
        flush_text()
    return tasks


def _task(
    tasks: list[Task], fmt: str, group: str | None, files: tuple[str, ...], **kw: Any
) -> Task:
    return Task(index=len(tasks), format=fmt, group=group, files=files, **kw)


def _jsonl_chunks(tasks: list[Task], path: str, group: str | None, chunk_bytes: int) -> list[Task]:
    """Newline-aligned byte ranges, with the line number each starts at for error messages."""
    out: list[Task] = []
    size = os.path.getsize(path)
    start, line = 0, 1
    with open(path, "rb") as f:
        while start < size:
            end = size
            if start + chunk_bytes < size:
                f.seek(start + chunk_bytes - 1)
                f.readline()
                end = min(f.tell(), size)
            f.seek(start)
            lines, left = 0, end - start
            while left > 0:
                block = f.read(min(left, 1 << 22))
                lines += block.count(b"\n")
                left -= len(block)
            out.append(
                _task(
                    tasks + out,
                    "jsonl",
                    group,
                    (path,),
                    start=start,
                    end=end,
                    first_line=line,
                    size=end - start,
                )
            )
            start, line = end, line + lines
    return out


def _parquet_chunks(
    tasks: list[Task], path: str, group: str | None, chunk_bytes: int
) -> list[Task]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as exc:
        raise InputError(f"{path}: not a readable Parquet file ({exc})") from None
    out: list[Task] = []
    first, size = 0, 0
    for i in range(meta.num_row_groups):
        size += meta.row_group(i).total_byte_size
        if size >= chunk_bytes or i == meta.num_row_groups - 1:
            out.append(
                _task(tasks + out, "parquet", group, (path,), start=first, end=i + 1, size=size)
            )
            first, size = i + 1, 0
    return out


def _get_field(record: Any, dotted: str) -> Any:
    value = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def _record_to_document(
    record: Any, task: Task, options: ReadOptions, where: str
) -> Document | None:
    """Validate one record; None means an empty document, skipped and counted."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    try:
        text = _get_field(record, options.text_field)
    except KeyError:
        keys = ", ".join(sorted(record)[:8]) or "none"
        raise InputError(
            f"{where}: no text field {options.text_field!r} (record keys: {keys}); "
            "name the right field with --text-field"
        ) from None
    if not isinstance(text, str):
        raise InputError(
            f"{where}: field {options.text_field!r} is {type(text).__name__}, not text"
        )
    group = task.group
    if group is None:
        assert options.group_field is not None
        try:
            value = _get_field(record, options.group_field)
        except KeyError:
            raise InputError(
                f"{where}: no group field {options.group_field!r}; fix --group-field or give "
                "the input a group with --group NAME=PATH"
            ) from None
        try:
            group = check_group_name(str(value))
        except ManifestError as exc:
            raise InputError(f"{where}: {exc}") from None
    if not text.strip():
        return None
    return Document(text, group)


def _zstd_lines(path: str) -> Iterator[bytes]:
    """Lines of a (possibly multi-frame) zstd file; a truncated last frame is an error.

    zstandard's ``stream_reader`` ends quietly at a cut-off frame, which would turn a
    truncated download into silently missing documents.
    """
    pending = b""
    with open(path, "rb") as f:
        decomp, fed = zstandard.ZstdDecompressor().decompressobj(), False
        while chunk := f.read(1 << 20):
            while chunk:
                pending += decomp.decompress(chunk)
                fed = True
                if decomp.eof:
                    chunk = decomp.unused_data
                    decomp, fed = zstandard.ZstdDecompressor().decompressobj(), False
                else:
                    chunk = b""
            *lines, pending = pending.split(b"\n")
            yield from (line + b"\n" for line in lines)
        if fed:
            raise InputError(f"{path}: cannot read (truncated zstd stream: the file is incomplete)")
    if pending:
        yield pending


def _open_jsonl(task: Task) -> io.BufferedIOBase:
    path = task.files[0]
    if task.format == "jsonl.gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    f = open(path, "rb")  # noqa: SIM115 - the caller closes it
    f.seek(task.start)
    return f


def _iter_jsonl(task: Task) -> Iterator[tuple[int, bytes]]:
    if task.format == "jsonl.zst":
        yield from enumerate(_zstd_lines(task.files[0]), start=task.first_line)
        return
    remaining = None if task.end is None else task.end - task.start
    with _open_jsonl(task) as f:
        for number, line in enumerate(f, start=task.first_line):
            if remaining is not None:
                if remaining <= 0:
                    break
                remaining -= len(line)
            yield number, line


def read_documents(task: Task, options: ReadOptions, stats: ReadStats) -> Iterator[Document]:
    """Documents of one task, in input order; bad records raise or are counted in ``stats``."""

    def bad(message: str) -> None:
        if not options.skip_bad:
            raise InputError(message + " (use --skip-bad to skip bad records)")
        stats.bad_records += 1
        if len(stats.first_errors) < 5:
            stats.first_errors.append(message)

    def emit(doc: Document | None) -> Iterator[Document]:
        if doc is None:
            stats.empty_documents += 1
        else:
            yield doc

    if task.format.startswith("jsonl"):
        path = task.files[0]
        try:
            for number, line in _iter_jsonl(task):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    bad(f"{where}: malformed JSON ({exc})")
                    continue
                try:
                    doc = _record_to_document(record, task, options, where)
                except InputError as exc:
                    bad(str(exc))
                    continue
                yield from emit(doc)
        except (OSError, EOFError, zstandard.ZstdError) as exc:
            raise InputError(f"{path}: cannot read ({exc})") from None
    elif task.format == "parquet":
        yield from _read_parquet(task, options, bad, emit)
    elif task.format == "text":
        for path in task.files:
            data = Path(path).read_bytes()
            if b"\x00" in data:
                bad(f"{path}: looks binary (NUL bytes), not a text document")
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad(f"{path}: not valid UTF-8 at byte {exc.start}")
                continue
            assert task.group is not None
            yield from emit(Document(text, task.group) if text.strip() else None)
    else:
        raise InputError(f"unknown task format {task.format!r}")


def _read_parquet(task: Task, options: ReadOptions, bad: Any, emit: Any) -> Iterator[Document]:
    import pyarrow.parquet as pq

    path = task.files[0]
    pf = pq.ParquetFile(path)
    columns = {options.text_field.split(".")[0]}
    if options.group_field and task.group is None:
        columns.add(options.group_field.split(".")[0])
    missing = sorted(c for c in columns if c not in pf.schema_arrow.names)
    if missing:
        raise InputError(
            f"{path}: no column {missing[0]!r} (columns: {', '.join(pf.schema_arrow.names[:8])}); "
            "fix --text-field / --group-field"
        )
    for rg in range(task.start, task.end or pf.metadata.num_row_groups):
        table = pf.read_row_group(rg, columns=sorted(columns))
        for row, record in enumerate(table.to_pylist()):
            where = f"{path}:row group {rg}:row {row}"
            try:
                doc = _record_to_document(record, task, options, where)
            except InputError as exc:
                bad(str(exc))
                continue
            yield from emit(doc)
