"""Run a function on N real ranks (processes, torch.distributed gloo on loopback).

Used by tests and benchmarks to exercise multi-rank and simulated multi-node behaviour with
real processes. Each rank gets the environment a launcher would set (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``NODE_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``), which both ``torch.distributed`` and ``streaming`` read.

Ranks are spawned (a fresh interpreter each) by default; ``start_method="forkserver"`` with
``preload`` forks them from a server that imported those modules once, which saves the
seconds each fresh interpreter spends importing torch and streaming when a test launches
many short jobs. A rank that ends without reporting (SIGKILL, ``os._exit``) raises
:class:`RankExited` as soon as it is gone, instead of waiting for ``timeout``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_module
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["RankExited", "free_port", "run_ranks"]

_EXIT_GRACE = 0.5  # a rank that returned has written its result before it exits


class RankExited(RuntimeError):
    """Ranks ended without reporting a result; ``exitcodes`` maps each to its exit code
    (negative: killed by that signal)."""

    def __init__(self, exitcodes: dict[int, int]) -> None:
        self.exitcodes = exitcodes
        super().__init__(
            "rank(s) exited without a result: "
            + ", ".join(f"rank {r} exit code {c}" for r, c in sorted(exitcodes.items()))
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(
    fn: Callable[..., Any],
    rank: int,
    env: dict[str, str],
    args: tuple[Any, ...],
    queue: Any,
) -> None:
    os.environ.update(env)
    try:
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=int(env["WORLD_SIZE"]))
        try:
            result = fn(rank, *args)
        finally:
            dist.destroy_process_group()
        queue.put((rank, True, result))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    ranks_per_node: int | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300.0,
    start_method: str = "spawn",
    preload: Sequence[str] = (),
) -> list[Any]:
    """Run ``fn(rank, *args)`` on ``world_size`` spawned ranks; returns results by rank.

    ``ranks_per_node`` < ``world_size`` simulates several nodes on this machine (each
    "node" should then use its own cache directory, as separate machines would). ``fn``
    must be importable (module-level) since ranks are spawned. ``timeout`` bounds the wait
    for each next result. ``preload`` (forkserver only) takes effect if this process has not
    started its fork server yet.
    """
    ranks_per_node = ranks_per_node or world_size
    if world_size % ranks_per_node:
        raise ValueError(f"world_size {world_size} is not a multiple of {ranks_per_node}")
    ctx = mp.get_context(start_method)
    if preload:
        if start_method != "forkserver":
            raise ValueError("preload needs start_method='forkserver'")
        ctx.set_forkserver_preload(list(preload))
    queue = ctx.Queue()
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        rank_env = {
            **(env or {}),
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank % ranks_per_node),
            "LOCAL_WORLD_SIZE": str(ranks_per_node),
            "NODE_RANK": str(rank // ranks_per_node),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        proc = ctx.Process(target=_entry, args=(fn, rank, rank_env, args, queue))
        proc.start()
        procs.append(proc)
    results: dict[int, Any] = {}
    errors = []
    exited: dict[int, int] = {}
    gone_since: dict[int, float] = {}
    last_result = time.monotonic()
    try:
        while len(results) + len(exited) < world_size:
            try:
                rank, ok, value = queue.get(timeout=0.2)
            except queue_module.Empty:
                now = time.monotonic()
                for r, proc in enumerate(procs):
                    if r in results or r in exited or proc.exitcode is None:
                        continue
                    # A rank that returned flushed its result before exiting; give the
                    # queue a moment to deliver it before calling the rank lost.
                    if now - gone_since.setdefault(r, now) > _EXIT_GRACE:
                        exited[r] = proc.exitcode
                if now - last_result > timeout:
                    missing = [r for r in range(world_size) if r not in results]
                    raise TimeoutError(
                        f"no result from rank(s) {missing} within {timeout:g} s"
                    ) from None
                continue
            last_result = time.monotonic()
            if ok:
                results[rank] = value
            else:
                errors.append(f"rank {rank} failed:\n{value}")
                break
    finally:
        # Let ranks exit on their own so their shared memory and dataloader workers are
        # cleaned up before the next run starts; kill only stragglers after a failure.
        for proc in procs:
            proc.join(timeout=2 if errors or exited else 120)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if errors:
        raise RuntimeError("\n".join(errors))
    if exited:
        raise RankExited(exited)
    return [results[r] for r in range(world_size)]
