"""Killed jobs and jobs sharing a node, with real processes and real signals.

A killed trainer's dataloader workers exit at once; the shared memory of a job killed
outright (its whole process group) is reclaimed by the next job on the node, never a live
job's; a killed ``shard-tools convert`` leaves staging that the next conversion of the same
output removes, never a live conversion's; and a 2-rank job agrees on its shared-memory
prefix while another job on the node starts and stops datasets.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from helpers import make_docs, write_jsonl
from mixture_harness import churn_datasets, construct_repeatedly, convert_corpus, write_corpus

from mixstream import DynamicStreamingDataset
from mixstream.testing.distributed import run_ranks

TRAINER = """
import sys, time
from torch.utils.data import DataLoader
from mixstream import DynamicStreamingDataset
ds = DynamicStreamingDataset(manifest=sys.argv[1], batch_size=4, num_workers=2)
batches = iter(DataLoader(ds, batch_size=4, num_workers=2))
next(batches)
print(ds._shm_prefix_int, *(w.pid for w in batches._workers), flush=True)
time.sleep(600)
"""
SHARD_TOOLS = "import sys; from shard_tools.cli import main; sys.exit(main())"
CHURN_CONSTRUCTIONS = 20  # per rank; the old code failed within 10 in every trial


@pytest.fixture(scope="module")
def local_mixture(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("mixture")
    write_corpus(root / "corpus", docs_per_group=100)
    convert_corpus(root / "corpus", str(root / "out"))
    return str(root / "out")


def _fields(path: str) -> list[str] | None:
    """Fields of a ``stat`` file after the command name; None once gone."""
    try:
        return Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _stat(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` fields; None once gone or a zombie (the container's init may
    never reap re-parented children)."""
    fields = _fields(f"/proc/{pid}/stat")
    return None if fields is None or fields[0] in "ZX" else fields


def _alive(pid: int) -> bool:
    """Whether any thread of ``pid`` is still running. Not the main thread's state alone:
    killed, it turns zombie while other threads still exit -- and hold the process's open
    files (its flocks) until the last one is done."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    return any(
        (f := _fields(f"/proc/{pid}/task/{t}/stat")) is not None and f[0] not in "ZX" for t in tasks
    )


def _running(pids: Iterable[int]) -> list[int]:
    return [p for p in pids if _alive(p)]


def _wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait up to ``timeout`` s for ``pids`` to exit; returns those still running."""
    deadline = time.monotonic() + timeout
    while (left := _running(pids)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


def _all_pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def _children(pid: int) -> list[int]:
    return [p for p in _all_pids() if (s := _stat(p)) is not None and int(s[1]) == pid]


def _group(pgid: int) -> list[int]:
    """Processes of the group, zombies included (their threads may still be exiting)."""
    stats = ((p, _fields(f"/proc/{p}/stat")) for p in _all_pids())
    return [p for p, s in stats if s is not None and int(s[2]) == pgid]


def _segments(prefix: int) -> dict[str, int]:
    """streaming's segments of ``prefix``, by inode (another job may reuse the names)."""
    head = f"{prefix:06}_"
    found = {}
    for name in os.listdir("/dev/shm"):
        if name.startswith(head):
            with contextlib.suppress(FileNotFoundError):
                found[name] = os.stat(f"/dev/shm/{name}").st_ino
    return found


def _surviving(segments: dict[str, int], prefix: int) -> dict[str, int]:
    now = _segments(prefix)
    return {name: ino for name, ino in segments.items() if now.get(name) == ino}


def _start_trainer(manifest: str, **popen: object) -> tuple[subprocess.Popen[str], int, list[int]]:
    """A training process iterating a DataLoader with 2 workers: (process, prefix, workers)."""
    trainer = subprocess.Popen(
        [sys.executable, "-c", TRAINER, manifest], stdout=subprocess.PIPE, text=True, **popen
    )
    assert trainer.stdout is not None
    line = trainer.stdout.readline()
    assert line, f"the trainer exited with {trainer.wait()}"
    prefix, *workers = (int(x) for x in line.split())
    assert len(workers) == 2 and not set(workers) - set(_children(trainer.pid))
    return trainer, prefix, workers


def test_dataloader_workers_exit_when_the_trainer_is_killed(local_mixture: str) -> None:
    """They ran on for ~5 s (torch checks its parent between batches, every 5 s), holding
    the job's shared memory; now they exit at once, and with them gone the trainer's
    resource tracker unlinks its segments."""
    trainer, prefix, workers = _start_trainer(local_mixture)
    segments = _segments(prefix)
    assert any(name.endswith("_locals") for name in segments)
    trainer.kill()
    trainer.wait()
    assert _wait_gone(workers, 2.0) == [], "workers still running 2 s after the trainer died"
    deadline = time.monotonic() + 5
    while _surviving(segments, prefix) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _surviving(segments, prefix)


def test_shared_memory_of_a_job_killed_outright_is_reclaimed_by_the_next(
    local_mixture: str,
) -> None:
    """Killing the whole process group (trainer, workers, resource tracker) left the job's
    segments until reboot: nothing cleaned them, and every later job skipped the prefix. The
    next dataset built on the node removes them -- and never a live job's."""
    live = DynamicStreamingDataset(manifest=local_mixture, batch_size=4)
    try:
        mine = _segments(live._shm_prefix_int)
        trainer, prefix, _ = _start_trainer(local_mixture, start_new_session=True)
        segments = _segments(prefix)
        os.killpg(trainer.pid, signal.SIGKILL)
        trainer.wait()
        assert _wait_gone(_group(trainer.pid), 10) == []
        assert _surviving(segments, prefix) == segments  # nothing of the job is left to do it
        DynamicStreamingDataset(manifest=local_mixture, batch_size=4).close()
        assert not _surviving(segments, prefix)
        assert _surviving(mine, live._shm_prefix_int) == mine
    finally:
        live.close()


def test_a_live_prefix_is_never_reclaimed(local_mixture: str) -> None:
    """Held by a live process (here this one), a prefix survives any number of reclaims; its
    owner file goes once the last holder lets go."""
    from mixstream.sharedmem import _owner_path, node_lock, reclaim_dead_prefixes

    ds = DynamicStreamingDataset(manifest=local_mixture, batch_size=4)
    prefix = ds._shm_prefix_int
    segments = _segments(prefix)
    owner = Path(_owner_path(prefix))
    inode = owner.stat().st_ino
    with node_lock():
        assert prefix not in reclaim_dead_prefixes()
    assert _surviving(segments, prefix) == segments
    ds.close()
    assert not _surviving(segments, prefix)
    assert not owner.exists() or owner.stat().st_ino != inode


def _convert_args(tmp_path: Path, docs: int) -> list[str]:
    inputs = []
    for group, seed in (("a", 1), ("b", 2)):
        path = tmp_path / "corpus" / f"{group}.jsonl"
        if not path.exists():
            write_jsonl(path, [{"text": d} for d in make_docs(docs, seed, group)])
        inputs += ["-g", f"{group}={path}"]
    flags = ["--tokenizer", "byte", "--seq-len", "64", "--shard-size", "64kb"]
    flags += ["--chunk-size", "8kb", "--workers", "2", "--no-progress"]
    return ["convert", str(tmp_path / "out"), *inputs, *flags]


def test_a_killed_convert_leaves_staging_that_the_next_convert_removes(tmp_path: Path) -> None:
    """A SIGKILLed conversion left its ``.shard-tools-*`` staging folder, and its workers ran
    on; now the workers die with it, and the next conversion of the output removes it."""
    from shard_tools.cli import main

    args = _convert_args(tmp_path, docs=3000)
    convert = subprocess.Popen([sys.executable, "-c", SHARD_TOOLS, *args], text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".shard-tools-*/task-*")):  # workers are writing
        assert convert.poll() is None, "the conversion ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    workers = _children(convert.pid)
    convert.kill()
    convert.wait()
    assert _wait_gone(workers, 2.0) == [], "convert workers still running 2 s after it died"
    assert list(tmp_path.glob(".shard-tools-*")), "the kill came too late to test anything"
    assert main(args) == 0
    assert not list(tmp_path.glob(".shard-tools-*"))
    assert (tmp_path / "out" / "mixture.json").is_file()


def test_a_live_conversions_staging_is_never_removed(tmp_path: Path) -> None:
    from shard_tools.cli import main
    from shard_tools.convert import _open_staging

    args = _convert_args(tmp_path, docs=200)
    staging, hold = _open_staging(str((tmp_path / "out").resolve()), str(tmp_path))
    assert hold is not None
    try:
        assert main(args) == 0
        assert Path(staging).is_dir()  # held by this (live) process
    finally:
        os.close(hold)
    assert main([*args, "--overwrite"]) == 0
    assert not list(tmp_path.glob(".shard-tools-*"))


def test_a_two_rank_job_agrees_on_its_prefix_while_another_job_churns(
    local_mixture: str,
) -> None:
    """Before: every trial (a 2-rank job building its dataset 10 times while another job
    builds and closes datasets) failed within the 10, with "prefix=N was not registered by
    local leader", "File exists: '/00000N_locals'" or "No such file: '/00000N_barrier'"."""
    ctx = mp.get_context("spawn")
    stop, cycles, errors = ctx.Event(), ctx.Value("i", 0), ctx.Queue()
    churner = ctx.Process(target=churn_datasets, args=(local_mixture, stop, cycles, errors))
    churner.start()
    try:
        churned = run_ranks(
            construct_repeatedly, 2, local_mixture, CHURN_CONSTRUCTIONS, cycles, timeout=180
        )
    finally:
        stop.set()
        churner.join(60)
        if churner.is_alive():
            churner.kill()
    assert min(churned) >= 5, churned  # the other job really ran meanwhile
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert not failures
