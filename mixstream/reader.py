"""``CheckedMDSReader``: streaming's MDS shard reader, checked on first use and read by ``pread``.

On its first read in a process a shard is checked: its cached file against the index
(``verify_cache``, :meth:`~mixstream.stream.ResilientStream.check_cached`) and its own
sample count against the index's. The index alone cannot fix the count of a shard with
variable-size columns (text): one claiming fewer samples than the shard holds would silently
skip the rest, one claiming more would fail deep inside with "Relative sample index 74 is
not present". The count is the file's first 4 bytes.

streaming opens the shard file for every sample it reads. Path lookup is the part of a read
that grows with the number of files touched: with samples drawn from 1,000 groups (1,000
files) an open-read-close costs ~6 us more than from 3, a fifth of the loader's time per
sample. Shards are therefore kept open and read with ``os.pread`` (no file position, so a
forked worker sharing the descriptor is safe), at most :data:`MAX_OPEN` of them per process,
least recently opened closed first; a forked worker keeps using the descriptors it inherits.
Only where no ``cache_limit`` is set: an evicted file kept open would hold its disk space.
"""

from __future__ import annotations

import itertools
import os
import resource
import weakref
from collections import OrderedDict
from typing import Any

import numpy as np
from streaming.base.format.mds.reader import MDSReader

from mixstream.shardindex import ShardIndexError

__all__ = ["MAX_OPEN", "CheckedMDSReader", "open_shard_files"]


def _max_open() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(1024, soft // 4 if soft != resource.RLIM_INFINITY else 1024))


#: shard files kept open per process: a quarter of the descriptor limit, 16 to 1,024
MAX_OPEN = _max_open()

# Kept-open files, oldest first: token -> the reader holding it (weakly: a dropped dataset's
# readers are collected, and their finalizers close the files).
_open: OrderedDict[int, weakref.ref[CheckedMDSReader]] = OrderedDict()
_tokens = itertools.count()


def open_shard_files() -> int:
    """How many shard files this process keeps open (for tests and monitoring)."""
    return sum(1 for ref in _open.values() if ref() is not None)


class CheckedMDSReader(MDSReader):
    """An MDS shard reader checked on its first read in a process, reading by ``pread``."""

    index_name = ""  # the index the reader came from, for messages
    stream: Any = None  # a ResilientStream: checks the cached file on first read, if set
    keep_open = False  # keep the file open between reads (no cache limit)
    _count_checked = False
    _fd: int | None = None
    _closer: weakref.finalize | None = None
    _token = -1

    def get_sample_data(self, idx: int) -> bytes:
        if not self._count_checked:
            self._check_first_use()
        if not self.keep_open:
            return super().get_sample_data(idx)
        fd = self._descriptor()
        begin, end = np.frombuffer(os.pread(fd, 8, (1 + idx) * 4), np.uint32)
        data = os.pread(fd, int(end) - int(begin), int(begin)) if end > begin else b""
        if not data:
            raise IndexError(
                f"Relative sample index {idx} is not present in the {self.raw_data.basename} file."
            )
        return data

    def _check_first_use(self) -> None:
        if self.stream is not None:
            self.stream.check_cached(self)
        filename = os.path.join(self.dirname, self.split, self.raw_data.basename)
        if self.keep_open:  # opened once, checked, then read from (after check_cached)
            head = os.pread(self._descriptor(), 4, 0)
        else:
            with open(filename, "rb", 0) as f:  # FileNotFoundError: streaming fetches it
                head = f.read(4)
        held = int(np.frombuffer(head, np.uint32)[0]) if len(head) == 4 else None
        if held != self.samples:
            raise ShardIndexError(
                f"{filename} holds {'no sample count' if held is None else held} samples "
                f"but {self.index_name or 'its index'} says {self.samples}; the index does "
                "not match its shards: re-convert the stream (or run shard-tools verify)"
            )
        self._count_checked = True

    def _descriptor(self) -> int:
        """The kept-open file's descriptor, opening it on first use."""
        return self._fd if self._fd is not None else self._open_file()

    def _open_file(self) -> int:
        filename = os.path.join(self.dirname, self.split, self.raw_data.basename)
        fd = os.open(filename, os.O_RDONLY | os.O_CLOEXEC)  # FileNotFoundError: fetched
        while len(_open) >= MAX_OPEN:
            oldest = _open.popitem(last=False)[1]()
            if oldest is not None:
                oldest.close_file()
        self._fd, self._token = fd, next(_tokens)
        self._closer = weakref.finalize(self, os.close, fd)
        _open[self._token] = weakref.ref(self)
        return fd

    def close_file(self) -> None:
        """Close the kept-open file, if any (the next read opens it again)."""
        if self._closer is not None:
            self._closer()  # closes the file once, whoever calls first
        self._fd = self._closer = None
        _open.pop(self._token, None)

    def evict(self) -> int:
        self.close_file()
        return super().evict()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_fd", None)  # a spawned process opens its own
        state.pop("_closer", None)
        return state
