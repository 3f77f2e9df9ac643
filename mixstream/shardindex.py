"""Checks on ``index.json`` files and the paths they name, before any shard is touched.

An index (like a manifest) is data from the network: whoever can write the bucket decides
the shard ``basename`` that streaming joins onto the cache directory and then downloads to,
decompresses to and deletes. A basename such as ``../../../x.mds`` or ``/etc/x`` would make
the loader write outside its cache, and a manifest stream path would make it read outside
the corpus. Every such name is refused here, with the file it came from, before any I/O.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import xxhash

__all__ = [
    "IndexDigest",
    "ShardIndexError",
    "check_digest",
    "check_index",
    "checked_get_shards",
    "index_location",
    "unsafe_path_reason",
]

INDEX_NAME = "index.json"
_MDS_LIMIT = 1 << 32  # MDS offsets are uint32
# What streaming's MDS writer puts in each shard's header (as sorted JSON) besides samples.
_MDS_CONFIG_KEYS = (
    "version",
    "format",
    "compression",
    "hashes",
    "size_limit",
    "column_names",
    "column_encodings",
    "column_sizes",
)


class ShardIndexError(ValueError):
    """An ``index.json`` is malformed, inconsistent with its shards or its manifest, or names
    a file outside its stream."""


@dataclass(frozen=True)
class IndexDigest:
    """Size and xxh64 of an ``index.json``'s bytes, as ``shard-tools convert`` records them in
    ``mixture.json``: a reader tells a cached index from the stream's current one without a
    request to the store, and refuses an index its manifest does not name."""

    size: int
    xxh64: str

    @classmethod
    def of(cls, data: bytes) -> IndexDigest:
        return cls(len(data), xxhash.xxh64_hexdigest(data))

    def matches(self, data: bytes) -> bool:
        return len(data) == self.size and xxhash.xxh64_hexdigest(data) == self.xxh64

    def __str__(self) -> str:
        return f"{self.size} bytes, xxh64 {self.xxh64}"


def check_digest(data: bytes, expected: IndexDigest, where: str, named_by: str) -> None:
    """Refuse index bytes ``data`` (read from ``where``) unless they are the index that
    ``named_by`` (a manifest) records: checked before the index is parsed or used."""
    if expected.matches(data):
        return
    raise ShardIndexError(
        f"{where} ({IndexDigest.of(data)}) is not the index {named_by} records for it "
        f"({expected}): the corpus is being re-converted, or the index was changed after the "
        "manifest was written. Wait for a running `shard-tools convert` to finish and start "
        "again (the manifest is then read anew), or re-convert the corpus; `shard-tools "
        "verify` checks a corpus against its manifest"
    )


def unsafe_path_reason(path: Any) -> str | None:
    """Why ``path`` may not be used as a path relative to a root, or ``None`` if it may.

    Purely lexical (no I/O): a relative path without ``..`` components, in either separator
    convention, cannot leave its root except through a symlink (see :func:`resolves_within`).
    """
    if not isinstance(path, str) or not path:
        return "it is not a non-empty string"
    if "\0" in path:
        return "it contains a NUL character"
    if path.startswith(("/", "\\")) or os.path.isabs(path) or (len(path) > 1 and path[1] == ":"):
        return "it is an absolute path"
    if "://" in path:
        return "it is a URL, not a relative path"
    if ".." in path.replace("\\", "/").split("/"):
        return "it contains '..'"
    if os.path.normpath(path.replace("\\", "/")) == ".":
        return "it names the root itself"
    return None


def resolves_within(root: str, path: str) -> bool:
    """Whether local ``root/path`` stays inside ``root`` once symlinks are resolved.

    A path of plain components none of which is a symlink stays inside lexically: that
    costs one ``lstat`` per component, where resolving both paths costs one per component
    of each absolute path (an index names every shard, and a corpus can have thousands of
    streams). Anything else is resolved.
    """
    parts = [p for p in path.split(os.sep) if p not in ("", ".")]  # as open() will see it
    if parts and ".." not in parts and not os.path.isabs(path):
        current = root
        for part in parts:
            current = os.path.join(current, part)
            if os.path.islink(current):
                break
        else:
            return True
    base = os.path.realpath(root)
    target = os.path.realpath(os.path.join(root, path))
    return target == base or target.startswith(base.rstrip(os.sep) + os.sep)


def check_path(path: Any, root: str, what: str, where: str, error: type[ValueError]) -> str:
    """``path`` if it is safe to join onto ``root``; otherwise ``error`` naming ``where``.

    ``root`` may be an ``s3://`` URL (lexical check only) or a local directory (also
    resolved, so a symlink out of the root is refused too).
    """
    reason = unsafe_path_reason(path)
    if reason is None and root and not root.startswith("s3://") and not resolves_within(root, path):
        reason = "it resolves outside its root (through a symlink)"
    if reason is not None:
        raise error(
            f"{where}: refusing {what} {path!r}: {reason}; it must be a path inside "
            f"{root or 'its root'}. The file was tampered with or not written by mixstream/"
            "streaming; re-convert the corpus or fix the file"
        )
    return path


def check_index(
    obj: Any, where: str, local_dir: str | Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """The shard entries of a parsed ``index.json``, after checking them for consistency.

    Every file an entry names must stay inside the stream; counts and sizes must be
    non-negative integers within MDS's 32-bit offsets and agree with each other (see
    :func:`_check_mds_entry`). ``where`` names the index in messages; ``local_dir`` (the
    directory, or directories, shards are read from or downloaded to) is also checked:
    a name may not leave it through a symlink.
    """
    dirs = [local_dir] if isinstance(local_dir, str) else list(local_dir or [])
    entries = _checked_entries(obj, where)
    for directory in dirs:
        links = _symlinks_in(directory)
        for i, entry in enumerate(entries):
            for key in ("raw_data", "zip_data"):
                info = entry.get(key)
                if info is None:
                    continue
                name = info["basename"]
                plain = os.sep not in name and (not os.altsep or os.altsep not in name)
                if plain and name not in links:  # a file name that is no symlink: inside
                    continue
                check_path(name, directory, f"shard {i} {key} basename", where, ShardIndexError)
    return entries


def _symlinks_in(directory: str) -> set[str]:
    """Names of the symlinks directly in ``directory`` (one listing, not one lstat a shard)."""
    try:
        with os.scandir(directory) as it:
            return {e.name for e in it if e.is_symlink()}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def _checked_entries(obj: Any, where: str) -> list[dict[str, Any]]:
    """The index's shard entries, each checked lexically and for consistency (no I/O)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("shards"), list):
        raise ShardIndexError(f"{where} is not a streaming index (no 'shards' list)")
    entries = obj["shards"]
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ShardIndexError(f"{where}: shard {i} is not an object")
        for key in ("raw_data", "zip_data"):
            info = entry.get(key)
            if info is None and key == "zip_data":
                continue
            if not isinstance(info, dict):
                raise ShardIndexError(f"{where}: shard {i} has no {key} object")
            name = check_path(
                info.get("basename"), "", f"shard {i} {key} basename", where, ShardIndexError
            )
            if name in seen:
                raise ShardIndexError(
                    f"{where}: shards {seen[name]} and {i} both name the file {name!r}"
                )
            seen[name] = i
            _count(info.get("bytes"), f"shard {i} {key} bytes", where)
        _count(entry.get("samples"), f"shard {i} samples", where)
        if entry.get("format") == "mds":
            _check_mds_entry(entry, f"{where}: shard {i} ({entry['raw_data']['basename']})")
    return entries


def _count(value: Any, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _MDS_LIMIT:
        raise ShardIndexError(
            f"{where}: {what} is {value!r}; expected an integer from 0 to {_MDS_LIMIT - 1}"
        )
    return value


def _check_mds_entry(entry: dict[str, Any], where: str) -> None:
    """Sample count against shard size, from what the MDS layout fixes.

    A raw MDS shard is its sample count, ``samples + 1`` offsets (uint32 each), the writer's
    config as JSON, then the samples; fixed-size columns take their size, each variable one
    4 bytes of length plus its data. So the size bounds the count from above, and with only
    fixed-size columns determines it: an index claiming more samples than the shard holds
    would fail deep inside reading, and one claiming fewer would silently skip the rest.
    """
    columns = [entry.get(k) for k in ("column_names", "column_encodings", "column_sizes")]
    if not all(isinstance(c, list) for c in columns) or len({len(c) for c in columns}) != 1:
        raise ShardIndexError(
            f"{where}: column_names, column_encodings and column_sizes must be lists of one "
            "entry per column"
        )
    sizes = columns[2]
    for size in sizes:
        if size is not None:
            _count(size, "a column size", where)
    samples, size = entry["samples"], entry["raw_data"]["bytes"]
    per_sample = sum(s if s is not None else 4 for s in sizes)
    if sizes and None not in sizes and per_sample:
        config = {k: entry.get(k) for k in _MDS_CONFIG_KEYS}
        rest = size - 8 - len(json.dumps(config, sort_keys=True).encode())
        held, remainder = divmod(rest, per_sample + 4)
        if remainder == 0 and held != samples:
            raise ShardIndexError(
                f"{where}: a {size}-byte shard of {per_sample}-byte samples holds {held} "
                f"samples, but the index says {samples}; the index does not match its shards: "
                "re-convert the stream"
            )
    least = 4 * (samples + 2) + samples * per_sample
    if size < least:
        raise ShardIndexError(
            f"{where}: the index says {samples} samples of at least {per_sample} bytes, which "
            f"need at least {least} bytes, but the shard is {size} bytes; the index does not "
            "match its shards: re-convert the stream"
        )


def index_location(stream: Any) -> str:
    """Where a stream's index comes from, for messages: the remote URL, or the local file."""
    split = f"{stream.split}/" if stream.split else ""
    if stream.remote:
        return f"{stream.remote.rstrip('/')}/{split}{INDEX_NAME}"
    return os.path.join(stream.local, split, INDEX_NAME)


def checked_get_shards(stream: Any) -> Callable[..., list[Any]]:
    """A replacement for ``stream.get_shards`` that checks the index before returning.

    streaming's own ``get_shards`` only downloads ``index.json`` (to a fixed name) and builds
    the shard readers; the first shard I/O (listing, eviction, download) comes after it. A
    refused index downloaded from a remote is removed from the cache, so the next attempt
    fetches the fixed one instead of failing on the stale copy.
    """
    original = type(stream).get_shards

    def get_shards(world: Any, allow_unsafe_types: bool) -> list[Any]:
        local_dir = os.path.join(stream.local, stream.split)
        filename = os.path.join(local_dir, INDEX_NAME)
        where = index_location(stream)
        # Files are written in the cache and, from a local source, copied from its directory:
        # a name may leave neither (a symlink in the source pointing out of it included).
        dirs = [local_dir]
        if stream.remote and "://" not in stream.remote:
            dirs.append(os.path.join(stream.remote, stream.split))

        def check() -> None:
            with open(filename) as f:
                obj = json.load(f)
            check_index(obj, where, dirs)

        try:
            try:
                shards = original(stream, world, allow_unsafe_types)
            except (KeyError, TypeError, AttributeError) as exc:
                check()
                raise ShardIndexError(f"{where} is malformed ({exc!r})") from None
            check()
        except ShardIndexError:
            if stream.remote and world.is_local_leader:
                with contextlib.suppress(OSError):
                    os.remove(filename)
            raise
        return shards

    return get_shards
