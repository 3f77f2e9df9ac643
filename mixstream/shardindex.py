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
from collections.abc import Callable
from typing import Any

__all__ = [
    "ShardIndexError",
    "check_index",
    "checked_get_shards",
    "unsafe_path_reason",
]

INDEX_NAME = "index.json"


class ShardIndexError(ValueError):
    """An ``index.json`` is malformed, or names a file outside its stream."""


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
    return None


def resolves_within(root: str, path: str) -> bool:
    """Whether local ``root/path`` stays inside ``root`` once symlinks are resolved."""
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


def check_index(obj: Any, where: str, local_dir: str | None = None) -> list[dict[str, Any]]:
    """The shard entries of a parsed ``index.json``, after checking every file they name.

    ``where`` names the index in messages; ``local_dir`` (the directory shards are read
    from or downloaded to) is also checked by resolving each name, when given.
    """
    if not isinstance(obj, dict) or not isinstance(obj.get("shards"), list):
        raise ShardIndexError(f"{where} is not a streaming index (no 'shards' list)")
    entries = obj["shards"]
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ShardIndexError(f"{where}: shard {i} is not an object")
        for key in ("raw_data", "zip_data"):
            info = entry.get(key)
            if info is None and key == "zip_data":
                continue
            if not isinstance(info, dict):
                raise ShardIndexError(f"{where}: shard {i} has no {key} object")
            check_path(
                info.get("basename"),
                local_dir or "",
                f"shard {i} {key} basename",
                where,
                ShardIndexError,
            )
    return entries


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
        where = (
            f"{stream.remote.rstrip('/')}/{stream.split + '/' if stream.split else ''}{INDEX_NAME}"
            if stream.remote
            else filename
        )
        try:
            try:
                shards = original(stream, world, allow_unsafe_types)
            except (KeyError, TypeError, AttributeError) as exc:
                with open(filename) as f:
                    check_index(json.load(f), where, local_dir)
                raise ShardIndexError(f"{where} is malformed ({exc!r})") from None
            with open(filename) as f:
                check_index(json.load(f), where, local_dir)
        except ShardIndexError:
            if stream.remote and world.is_local_leader:
                with contextlib.suppress(OSError):
                    os.remove(filename)
            raise
        return shards

    return get_shards
