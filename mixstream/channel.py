"""Shared memory from the training process to its dataloader workers: weight updates and horizon.

Why our own segment: streaming's shared memory holds its fixed epoch plan and cache state,
and has no notion of values that change during an epoch. Workers are separate processes
(forked or spawned) holding a copy of the dataset, so updates made on the trainer's copy
would never reach them otherwise.

Layout (int64/float64 little endian): a header, then a ring of update records. The single
writer (the trainer's dataset object) appends a record ``(effective_batch, weights)`` and
then bumps the record count; readers replay new records into their own
:class:`~mixstream.weights.WeightSchedule`. The *horizon* is the first global batch whose
weights are not yet final; a worker asked for a batch at or past it waits.

The ring holds ``capacity`` records of ``1 + groups`` float64 each: 4,096 records, or fewer
for many groups so that a segment stays within ``BUDGET_BYTES`` (16 MiB; at least 256
records). A reader syncs before planning every batch, so it only falls behind by the updates
published while it plans one batch (Aioli publishes a round's ``lp_rounds * groups + 1``
sweep mixtures at once; 1,000 groups still fit).

Segments are named ``mixstream-<pid>-<start time>-<random>``: unique per dataset object, so
two datasets in a process or two jobs on a node never collide. A segment whose creator
process is gone (a crashed run) is unlinked when the next channel is created; a live
process's segments are never touched.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np

from mixstream.sharedmem import process_alive, process_start_time
from mixstream.weights import WeightSchedule

__all__ = ["UNBOUNDED", "ScheduleChannel", "default_capacity", "reclaim_stale_segments"]

PREFIX = "mixstream-"
MAGIC = 0x4D49585354524D31  # "MIXSTRM1"
UNBOUNDED = -1
_HEADER = 8  # int64 slots: magic, groups, capacity, horizon, records, pid, start, started
BUDGET_BYTES = 16 << 20  # the ring's size for many groups
MAX_RECORDS = 4096
MIN_RECORDS = 256


def default_capacity(num_groups: int) -> int:
    """Records in the ring for ``num_groups`` groups (see the module docstring)."""
    fit = BUDGET_BYTES // (8 * (1 + max(1, int(num_groups))))
    return max(MIN_RECORDS, min(MAX_RECORDS, fit))


_SHM_DIR = Path("/dev/shm")


def reclaim_stale_segments() -> list[str]:
    """Unlink segments whose creator process no longer exists; returns their names."""
    removed = []
    if not _SHM_DIR.is_dir():
        return removed
    for path in _SHM_DIR.glob(f"{PREFIX}*"):
        parts = path.name[len(PREFIX) :].split("-")
        if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
            continue
        if not process_alive(int(parts[0]), int(parts[1])):
            try:
                path.unlink()
                removed.append(path.name)
            except OSError:
                pass
    return removed


class ScheduleChannel:
    """One writer (trainer process), many readers (its dataloader workers)."""

    def __init__(self, num_groups: int, capacity: int | None = None) -> None:
        reclaim_stale_segments()
        pid, start = os.getpid(), process_start_time(os.getpid())
        self.name = f"{PREFIX}{pid}-{start}-{uuid.uuid4().hex[:12]}"
        self.num_groups = int(num_groups)
        self.capacity = default_capacity(num_groups) if capacity is None else int(capacity)
        size = 8 * (_HEADER + self.capacity * (1 + self.num_groups))
        self._shm: SharedMemory | None = SharedMemory(name=self.name, create=True, size=size)
        self._owner_pid = pid
        self._bind()
        self._header[:] = [MAGIC, num_groups, self.capacity, UNBOUNDED, 0, pid, start, 0]
        self._read = 0

    def _bind(self) -> None:
        assert self._shm is not None
        buf = self._shm.buf
        self._header = np.ndarray((_HEADER,), dtype=np.int64, buffer=buf)
        records = np.ndarray(
            (self.capacity, 1 + self.num_groups), dtype=np.float64, buffer=buf, offset=8 * _HEADER
        )
        self._records = records

    # Pickling: workers re-attach by name instead of copying the buffer.
    def __getstate__(self) -> dict:
        return {
            "name": self.name,
            "num_groups": self.num_groups,
            "capacity": self.capacity,
            "read": self._read,
        }

    def __setstate__(self, state: dict) -> None:
        self.name = state["name"]
        self.num_groups = state["num_groups"]
        self.capacity = state["capacity"]
        self._read = state["read"]
        self._owner_pid = -1
        self._shm = None

    def _attach(self) -> None:
        if self._shm is not None:
            return
        try:
            self._shm = SharedMemory(name=self.name, create=False)
        except FileNotFoundError:
            raise RuntimeError(
                f"shared memory {self.name} is gone: the training process that owns this "
                "dataset exited or closed it"
            ) from None
        self._bind()
        if int(self._header[0]) != MAGIC:
            raise RuntimeError(f"shared memory {self.name} is not a mixstream channel")

    # Writer side.
    def publish(self, effective_batch: int, weights: np.ndarray) -> None:
        self._attach()
        n = int(self._header[4])
        self._records[n % self.capacity, 0] = float(effective_batch)
        self._records[n % self.capacity, 1:] = weights
        self._header[4] = n + 1
        self._read = n + 1  # the writer's own schedule already holds what it publishes

    def publish_many(self, batches: np.ndarray, weights: np.ndarray) -> None:
        """:meth:`publish` each ``(batches[i], weights[i])`` in order, in one write."""
        self._attach()
        n, k = int(self._header[4]), len(batches)
        if not k:
            return
        first = max(0, k - self.capacity)  # a burst longer than the ring: its tail remains
        rows = (n + np.arange(first, k)) % self.capacity
        self._records[rows, 0] = np.asarray(batches[first:], dtype=np.float64)
        self._records[rows, 1:] = weights[first:]
        self._header[4] = n + k
        self._read = n + k

    def set_horizon(self, batch: int) -> None:
        self._attach()
        self._header[3] = int(batch)

    @property
    def started(self) -> bool:
        """Whether any reader has begun planning batches (see :meth:`mark_started`)."""
        self._attach()
        return bool(self._header[7])

    # Reader side.
    def mark_started(self) -> None:
        """Tell the writer that batches are being planned: updates must now respect the lag."""
        self._attach()
        self._header[7] = 1

    @property
    def horizon(self) -> int:
        self._attach()
        return int(self._header[3])

    def sync(self, schedule: WeightSchedule) -> list[int]:
        """Replay records this reader has not seen into ``schedule``.

        Returns the effective batches of the replayed records.
        """
        self._attach()
        n = int(self._header[4])
        if n - self._read > self.capacity:
            raise RuntimeError(
                f"a dataloader worker fell {n - self._read} weight updates behind, more than "
                f"the channel holds ({self.capacity} for {self.num_groups} groups); updates "
                "are coming faster than batches: make fewer set_weights calls per step"
            )
        applied = []
        for i in range(self._read, n):
            row = self._records[i % self.capacity]
            schedule.set(int(row[0]), row[1:].copy())
            applied.append(int(row[0]))
        self._read = n
        return applied

    def wait_for(self, batch: int, timeout: float | None = None, poll: float = 0.002) -> None:
        """Block until ``batch`` is below the horizon (weights for it are final)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            horizon = self.horizon
            if horizon == UNBOUNDED or batch < horizon:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"batch {batch} is past the published horizon {horizon}: the training "
                    "loop has not called set_weights()/advance() for it"
                )
            time.sleep(poll)

    def close(self) -> None:
        """Detach; the creating process also unlinks the segment."""
        shm, self._shm = self._shm, None
        if shm is None:
            return
        self._header = self._records = None  # type: ignore[assignment]
        try:
            shm.close()
        except BufferError:
            return
        if self._owner_pid == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                shm.unlink()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
