"""What a job shares with, and leaves behind on, its node: streaming's shared memory and
the dataloader workers.

streaming coordinates the ranks and workers of a node through POSIX shared memory named
``<prefix>_<what>`` (in ``/dev/shm``) and lock files ``<prefix>_*_filelock`` in the temp
dir, where a job's *prefix* is the first number no other job uses. On a node running
several jobs (training plus evaluation, sweeps, ``mixstream search``) that goes wrong in
three ways, handled here:

* **Agreement** (:func:`agreeing_prefix`). streaming has every rank scan for a free prefix
  and then the local leader create it. A job starting or stopping datasets meanwhile makes
  two jobs pick one prefix (``FileExistsError: '/000326_locals'``) or a rank's scan
  disagree with its leader's ("prefix=289 was not registered by local leader"). Here only
  the local leader scans and creates, holding a node-wide ``flock`` that every mixstream
  job takes for that, and tells the node's other ranks what it chose.
* **Ownership** (:class:`PrefixOwner`). Every process using a prefix holds a shared
  ``flock`` on its owner file (forked dataloader workers inherit it), so a prefix whose
  owner file no process holds provably belongs to no live process. The next leader on the
  node removes its segments and lock files: a job killed outright (its whole process group,
  or by the OOM killer) otherwise leaves them until reboot, and every later job skips the
  prefix. Prefixes without an owner file (plain streaming, older mixstream) are left alone.
* **Release** (:class:`Holdings`). streaming registers every segment it creates or attaches
  with ``atexit``, so none is freed before the process ends: fds and ``/dev/shm`` entries
  pile up per dataset. A dataset's are freed at ``close()`` or garbage collection.

And :func:`exit_with_parent`: a dataloader (or ``shard-tools convert``) worker whose parent
was killed exits within a fraction of a second instead of running on. torch's own check
runs only between batches and polls every 5 s.

streaming (and torch under it) is imported lazily: ``shard-tools`` uses the process guard
without them.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import re
import signal
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no flock; prefixes are agreed as streaming does
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "Holdings",
    "PrefixOwner",
    "agreeing_prefix",
    "enter_worker",
    "exit_with_parent",
    "node_lock",
    "process_alive",
    "process_start_time",
    "reclaim_dead_prefixes",
    "reclaim_stale_filelocks",
    "recording",
]

log = logging.getLogger(__name__)

_SHM = Path("/dev/shm")
_NODE_LOCK = "mixstream.prefix.lock"
_OWNER = re.compile(r"^mixstream\.prefix\.(\d+)\.owner$")
_STREAMING_FILELOCK = re.compile(r"^(\d{6})_(?:barrier|cache)_filelock$")
_CREATE_ATTEMPTS = 8  # prefixes taken by jobs that do not take the node lock, in a row
NODE_LOCK_TIMEOUT = 300.0
WATCH_INTERVAL = 0.2


def _ownership() -> bool:
    """Owner files need flock and a listable segment directory (Linux); elsewhere there is
    nothing to reclaim with, and an owner file could only keep a prefix taken forever."""
    return fcntl is not None and _SHM.is_dir()


def _lock_dir() -> str:
    """Beside the segments where there is a ``/dev/shm``: jobs with different ``TMPDIR``
    share the segment namespace, so they must share these locks too."""
    return str(_SHM) if _SHM.is_dir() else tempfile.gettempdir()


def _open_lock_file(path: str, create: bool = True) -> int:
    try:
        return os.open(path, (os.O_RDWR | os.O_CREAT) if create else os.O_RDWR, 0o666)
    except PermissionError:  # another user's file; flock needs no write access
        return os.open(path, os.O_RDONLY)


_node_lock_fds: set[int] = set()


def _drop_node_locks_in_child() -> None:
    """A process forked (by another thread) while this one holds the node lock would share
    the lock's open file, and hold it for as long as it lives."""
    for fd in _node_lock_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    _node_lock_fds.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_node_locks_in_child)


@contextlib.contextmanager
def node_lock(timeout: float = NODE_LOCK_TIMEOUT) -> Iterator[None]:
    """Exclusive, node-wide: serializes prefix scan+create and reclaim between mixstream jobs.

    Held for milliseconds (no collective, no network inside). A timeout instead of waiting
    forever: a holder that is stopped (SIGSTOP, a debugger) would otherwise hang every job.
    """
    if fcntl is None:
        yield
        return
    path = os.path.join(_lock_dir(), _NODE_LOCK)
    fd = _open_lock_file(path)
    _node_lock_fds.add(fd)
    try:
        deadline = time.monotonic() + timeout
        pause = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"waited {timeout:g} s for {path}, which another job on this node "
                        "holds while it picks its shared-memory prefix; is a process stopped?"
                    ) from None
                time.sleep(pause)
                pause = min(2 * pause, 0.02)
        yield
    finally:
        _node_lock_fds.discard(fd)
        os.close(fd)  # releases the lock


# ---------------------------------------------------------------------------- ownership
def _owner_path(prefix: int) -> str:
    return os.path.join(_lock_dir(), f"mixstream.prefix.{prefix:06}.owner")


def _locals_inode(prefix: int) -> int | None:
    try:
        return (_SHM / f"{prefix:06}_locals").stat().st_ino
    except OSError:
        return None


class PrefixOwner:
    """This process's shared hold on a prefix: while any process holds one, the prefix is
    in use. Closing the fd (never ``LOCK_UN``, which would also drop the hold of forked
    workers sharing it) gives it up."""

    def __init__(self, prefix: int, fd: int) -> None:
        self.prefix = prefix
        self.fd: int | None = fd

    @classmethod
    def take(cls, prefix: int, create: bool) -> PrefixOwner | None:
        """Hold ``prefix``; the leader ``create``s its owner file (and records the inode of
        its ``_locals`` segment in it: see :func:`_reclaim_if_dead`). None where ownership is
        unsupported, or where the prefix is being reclaimed (its job is gone)."""
        if not _ownership():
            return None
        path = _owner_path(prefix)
        try:
            fd = _open_lock_file(path, create)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        if create:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.write(fd, f"{_locals_inode(prefix)}\n".encode())
        return cls(prefix, fd)

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def _reclaim_if_dead(prefix: int) -> int | None:
    """Remove ``prefix``'s segments, lock files and owner file if no process holds it.

    Returns how many segments went, or None if the prefix is in use. Call with the node
    lock held. The owner file records the inode of the ``_locals`` segment its leader made:
    a ``_locals`` with another inode is a later job's that took the number without this
    lock (plain streaming), and its files are left alone.
    """
    path = _owner_path(prefix)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return None  # held: some process of the job is alive
        try:
            recorded: int | None = int(os.read(fd, 64).split()[0])
        except (OSError, ValueError, IndexError):
            recorded = None
        present = _locals_inode(prefix)
        removed = 0
        if present is None or present == recorded:
            head = f"{prefix:06}_"
            for name in os.listdir(_SHM):
                if name.startswith(head):
                    with contextlib.suppress(OSError):
                        os.unlink(_SHM / name)
                        removed += 1
            for what in ("barrier", "cache"):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(tempfile.gettempdir(), f"{head}{what}_filelock"))
        with contextlib.suppress(OSError):
            os.remove(path)
        return removed
    finally:
        os.close(fd)


def reclaim_dead_prefixes() -> list[int]:
    """Free the prefixes of jobs of which no process is left; returns those that had
    segments. Call with the node lock held."""
    if not _ownership():
        return []
    reclaimed = []
    for name in os.listdir(_lock_dir()):
        match = _OWNER.match(name)
        if match:
            removed = _reclaim_if_dead(int(match.group(1)))
            if removed:
                reclaimed.append(int(match.group(1)))
                log.info(
                    "removed %d shared-memory segments of prefix %s, left by a job no "
                    "process of which is alive",
                    removed,
                    match.group(1),
                )
    return reclaimed


def reclaim_stale_filelocks(directory: str | None = None) -> list[str]:
    """Remove streaming lock files of shared-memory prefixes no job holds any more.

    streaming creates ``<prefix>_barrier_filelock``/``_cache_filelock`` in the temp dir and
    never removes them; a prefix whose lock files exist is skipped by every later job, so
    killed runs leave hundreds behind and push prefixes ever higher. A prefix is held while
    any ``/dev/shm/<prefix>_*`` segment exists (they are created before, and removed after,
    its locks); lock files of a prefix without one are stale. Segments of a killed run keep
    their locks unless :func:`reclaim_dead_prefixes` proves the run dead. Returns the
    removed names.
    """
    if not _SHM.is_dir():
        return []
    directory = directory or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    held = {n.split("_", 1)[0] for n in os.listdir(_SHM)}
    for name in names:
        match = _STREAMING_FILELOCK.match(name)
        if match and match.group(1) not in held:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(directory, name))
                removed.append(name)
    return removed


# ---------------------------------------------------------------------------- agreement
def _segment_exists(name: str) -> bool:
    if _SHM.is_dir():
        return (_SHM / name).exists()
    from streaming.base.shared import prefix as streaming_prefix

    try:  # (name, create, size, auto_cleanup): attach without an atexit registration
        streaming_prefix.SharedMemory(name, False, 0, False).cleanup()
    except FileNotFoundError:
        return False
    return True


def _check_overlap(
    streams_local: Sequence[str], streams_remote: Sequence[str | None], theirs: Sequence[str]
) -> None:
    """streaming's rule: two live datasets on a node may not cache remote streams in one
    local directory (they would evict and overwrite each other's shards)."""
    for local, remote in zip(streams_local, streams_remote, strict=True):
        if remote is not None and local in theirs:
            raise ValueError(
                f"Reused local directory: {local} is the cache of another dataset running on "
                "this node; give each job its own local= directory"
            )


def _users_of(prefix: int) -> list[str] | None:
    """None if ``prefix`` is free: no owner file, no streaming lock file, no segment; else
    the local directories its ``_locals`` segment lists (maybe none)."""
    from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, LOCALS, SHM_TO_CLEAN
    from streaming.base.shared import prefix as streaming_prefix

    tmp = tempfile.gettempdir()
    if os.path.exists(_owner_path(prefix)) or any(
        os.path.exists(os.path.join(tmp, f"{prefix:06}_{n}"))
        for n in (BARRIER_FILELOCK, CACHE_FILELOCK)
    ):
        return []
    try:  # (name, create, size, auto_cleanup)
        shm = streaming_prefix.SharedMemory(f"{prefix:06}_{LOCALS}", False, 0, False)
    except FileNotFoundError:
        return [] if any(_segment_exists(f"{prefix:06}_{n}") for n in SHM_TO_CLEAN) else None
    try:
        return streaming_prefix._unpack_locals(bytes(shm.buf))[0]
    finally:
        shm.cleanup()


def _free_prefix(streams_local: Sequence[str], streams_remote: Sequence[str | None]) -> int:
    """The first prefix nobody uses, checking ours against the directories of those in use.

    streaming takes the largest of each segment name's first free prefix, which can land
    on a prefix where another of its names still exists; here every name must be free.
    """
    for prefix in itertools.count():
        try:
            theirs = _users_of(prefix)
        except PermissionError:  # another user's
            continue
        if theirs is None:
            return prefix
        _check_overlap(streams_local, streams_remote, theirs)
    raise AssertionError("unreachable")


def _claim(
    streams_local: Sequence[str], streams_remote: Sequence[str | None], retry: int
) -> tuple[int, Any, PrefixOwner | None]:
    """The local leader's part: under the node lock, reclaim, scan, create ``_locals``."""
    from streaming.base.constant import LOCALS, TICK
    from streaming.base.shared import prefix as streaming_prefix

    with node_lock():
        reclaim_dead_prefixes()
        reclaim_stale_filelocks()
        for attempt in range(_CREATE_ATTEMPTS):
            for tries_left in range(retry, -1, -1):
                try:
                    prefix = _free_prefix(streams_local, streams_remote)
                    break
                except ValueError:
                    # As streaming: a dataset just closed may still show its directories.
                    if not tries_left:
                        raise
                    time.sleep(TICK)
            data = streaming_prefix._pack_locals(list(streams_local), prefix)
            try:
                shm = streaming_prefix.SharedMemory(f"{prefix:06}_{LOCALS}", True, len(data))
            except FileExistsError:
                # A job that does not take the node lock (plain streaming) got there first.
                if attempt + 1 == _CREATE_ATTEMPTS:
                    raise
                log.warning("shared-memory prefix %d taken by another job; trying the next", prefix)
                continue
            shm.buf[: len(data)] = data
            return prefix, shm, PrefixOwner.take(prefix, create=True)
    raise AssertionError("unreachable")


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _agreed_prefix(
    holdings: Holdings,
    original: Any,
    streams_local: list[str],
    streams_remote: list[str | None],
    world: Any,
    retry: int = 100,
) -> tuple[int, Any]:
    """Stands in for streaming's ``get_shm_prefix`` (same arguments and result)."""
    from streaming.base.constant import LOCALS
    from streaming.base.shared import prefix as streaming_prefix

    streaming_prefix._check_self(streams_local)
    distributed = _distributed()
    if not world.is_local_leader and not distributed:
        return original(streams_local, streams_remote, world, retry)  # no way to be told
    error: BaseException | None = None
    mine: int | str | None = None
    if world.is_local_leader:
        try:
            prefix, shm, holdings.owner = _claim(streams_local, streams_remote, retry)
            mine = prefix
        except Exception as exc:
            error, mine = exc, f"{type(exc).__name__}: {exc}"
    if not distributed:
        if error is not None:
            raise error
        return prefix, shm
    import torch.distributed as dist

    # One collective in place of streaming's two barriers: every rank learns its node
    # leader's prefix, and every rank fails (rather than hangs) if any leader failed.
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (world.node, world.is_local_leader, mine))
    if error is not None:
        raise error
    failed = [v for _, leader, v in gathered if leader and not isinstance(v, int)]
    if failed:
        raise RuntimeError(f"a node's local leader found no shared-memory prefix: {failed[0]}")
    if world.is_local_leader:
        return prefix, shm
    leaders = [v for node, leader, v in gathered if leader and node == world.node]
    if len(leaders) != 1:
        raise RuntimeError(f"expected one local leader on node {world.node}, found {leaders}")
    prefix = leaders[0]
    try:
        shm = streaming_prefix.SharedMemory(f"{prefix:06}_{LOCALS}", False)
    except FileNotFoundError:
        raise RuntimeError(
            f"shared memory prefix={prefix} of this node's local leader is gone: did it exit?"
        ) from None
    theirs, their_prefix = streaming_prefix._unpack_locals(bytes(shm.buf))
    if theirs != streams_local or their_prefix != prefix:
        raise RuntimeError(
            f"this rank's local directories {streams_local} differ from its local leader's "
            f"{theirs} (prefix {their_prefix}); pass the same local= on every rank"
        )
    holdings.owner = PrefixOwner.take(prefix, create=False)
    return prefix, shm


@contextlib.contextmanager
def agreeing_prefix(holdings: Holdings) -> Iterator[None]:
    """Inside streaming's constructor: prefixes are chosen by :func:`_agreed_prefix`, and
    the hold on the chosen one goes to ``holdings``."""
    import streaming.base.dataset as streaming_dataset

    original = streaming_dataset.get_shm_prefix

    def agreed(*args: Any, **kwargs: Any) -> tuple[int, Any]:
        return _agreed_prefix(holdings, original, *args, **kwargs)

    streaming_dataset.get_shm_prefix = agreed
    try:
        yield
    finally:
        streaming_dataset.get_shm_prefix = original


# ---------------------------------------------------------------------------- release
@contextlib.contextmanager
def recording(owned: list[Any]) -> Iterator[None]:
    """Collect every streaming ``SharedMemory`` this thread makes inside the block."""
    import streaming.base.shared.memory as streaming_shared_memory

    cls = streaming_shared_memory.SharedMemory
    original = cls.__init__
    thread = threading.get_ident()

    def init(shm: Any, *args: Any, **kwargs: Any) -> None:
        original(shm, *args, **kwargs)
        if threading.get_ident() == thread:
            owned.append(shm)

    cls.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        cls.__init__ = original  # type: ignore[method-assign]


def created_prefix(segments: Sequence[Any]) -> bool:
    """Whether these segments include the prefix's ``_locals`` made by this process (the
    node's local leader)."""
    return any(shm.created_shms and shm.shm.name.endswith("_locals") for shm in segments)


@dataclass
class Holdings:
    """What a dataset holds in the process that built it, released once by :meth:`release`.

    ``segments``: streaming ``SharedMemory`` objects (closed, and unlinked where this
    process created them); ``locks``: streaming lock files to remove (the local leader's);
    ``owner``: the hold on the prefix. Forked workers inherit the object and must never
    release their trainer's segments, hence ``pid``.
    """

    pid: int = field(default_factory=os.getpid)
    segments: list[Any] = field(default_factory=list)
    locks: list[str] = field(default_factory=list)
    owner: PrefixOwner | None = None

    def release(self) -> None:
        if os.getpid() != self.pid:
            return
        for path in self.locks:  # before the prefix's segment goes: see reclaim_stale_filelocks
            with contextlib.suppress(OSError):
                os.remove(path)
        self.locks = []
        while self.segments:
            shm = self.segments.pop()
            atexit.unregister(shm.cleanup)
            with contextlib.suppress(Exception):
                shm.cleanup()
        owner, self.owner = self.owner, None
        if owner is not None:
            owner.close()
            # The last process of the job to let go also removes what other processes of it
            # left (and the owner file).
            with contextlib.suppress(OSError, TimeoutError), node_lock(timeout=10):
                _reclaim_if_dead(owner.prefix)


# ---------------------------------------------------------------------------- processes
def process_start_time(pid: int) -> int:
    """Process start time in clock ticks since boot (guards against pid reuse); 0 if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[19])


def process_alive(pid: int, start: int = 0) -> bool:
    """Whether process ``pid`` (started at ``start``, if known) still exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start == 0 or process_start_time(pid) in (0, start)


# ---------------------------------------------------------------------------- workers
_guarded_pid: int | None = None
_worker_holds: dict[tuple[int, int], PrefixOwner | None] = {}


def exit_with_parent(interval: float = WATCH_INTERVAL) -> None:
    """Kill this process (SIGKILL) within ``interval`` s of its parent's death.

    A thread polls ``os.getppid()``, which changes when the parent dies and the process is
    re-parented. Not ``PR_SET_PDEATHSIG``: that fires when the parent *thread* that started
    this process exits, so a DataLoader iterator made in a short-lived thread would kill
    healthy workers. Idempotent per process; a no-op where there is no re-parenting
    (Windows).
    """
    global _guarded_pid
    if os.name != "posix" or _guarded_pid == os.getpid():
        return
    _guarded_pid = os.getpid()
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="mixstream-exit-with-parent", daemon=True).start()


def enter_worker(prefix: int) -> None:
    """In a dataloader worker: die with the parent, and hold the prefix for as long as this
    worker lives (a spawned worker inherits no hold; a forked one already has one)."""
    exit_with_parent()
    key = (os.getpid(), prefix)
    if key not in _worker_holds:
        _worker_holds[key] = PrefixOwner.take(prefix, create=False)
