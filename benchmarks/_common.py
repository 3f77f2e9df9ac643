"""Shared helpers for the benchmarks: timing, machine description, and ``RESULTS.md`` sections.

Every benchmark writes one section of ``benchmarks/RESULTS.md`` with :func:`write_section`,
which replaces the section of the same title if it is there and appends it otherwise, so
re-running a benchmark updates its numbers in place and leaves the other sections alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

__all__ = [
    "RESULTS",
    "RESULTS_DIR",
    "LoadMeter",
    "OthersMeter",
    "command_line",
    "machine_info",
    "median",
    "publish",
    "source_digest",
    "stopwatch",
    "wait_for_idle",
    "write_results",
    "write_section",
]

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS = BENCH_DIR / "RESULTS.md"
RESULTS_DIR = BENCH_DIR / "results"
_HEADER = (
    "# Benchmark results\n\n"
    "Each section below is written by the benchmark script named in its command line; "
    "re-running that command replaces the section in place.\n"
)
# Versions are read from package metadata so that describing the machine imports nothing.
_PACKAGES = (
    ("torch", "torch"),
    ("streaming", "mosaicml-streaming"),
    ("tokenizers", "tokenizers"),
    ("numpy", "numpy"),
)


class Stopwatch:
    """Elapsed wall-clock seconds of a ``with stopwatch() as sw:`` block (``sw.seconds``)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds = 0.0


@contextmanager
def stopwatch() -> Iterator[Stopwatch]:
    """Time a block with ``time.perf_counter``."""
    sw = Stopwatch()
    try:
        yield sw
    finally:
        sw.seconds = time.perf_counter() - sw.started


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return float(statistics.median(values))


#: Set to 1 to run benchmarks beside background work kept at positive niceness (a shared
#: machine): "others' CPU" then counts only processes at nice <= 0 (the benchmark's own run
#: at 0, so niced work yields to them), and the machine line says so.
NICED_IS_IDLE = os.environ.get("MIXSTREAM_BENCH_NICED_IS_IDLE") == "1"


def _busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine spent busy since boot (``/proc/stat``), steal included.

    Under :data:`NICED_IS_IDLE`: the CPU seconds of the live processes at nice <= 0 and of
    the children they reaped (the time of a process that exits meanwhile unreaped is lost:
    its error is on the lenient side, which that mode accepts).
    """
    if NICED_IS_IDLE:
        return _unniced_cpu_seconds()
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _proc_stats() -> Iterator[list[bytes]]:
    """The ``/proc/<pid>/stat`` fields after ``(comm)`` of every live process."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue  # exited meanwhile
        # state ppid pgrp session ... utime stime cutime cstime priority nice ...
        yield data[data.rindex(b")") + 2 :].split()


def _unniced_cpu_seconds() -> float:
    total = sum(sum(int(x) for x in f[11:15]) for f in _proc_stats() if int(f[16]) <= 0)
    return total / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and of the children it has waited for (recursively)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def _session_cpu_seconds(session: int) -> float:
    """CPU seconds of the live processes of ``session`` (and of the children they reaped)."""
    total = sum(sum(int(x) for x in f[11:15]) for f in _proc_stats() if int(f[3]) == session)
    return total / os.sysconf("SC_CLK_TCK")


class LoadMeter:
    """CPU used by *other* processes (in cores) between ``start()`` and ``stop()``.

    Benchmarks on a shared machine are only comparable when nothing else runs. This is the
    machine's busy time (``/proc/stat``, hypervisor steal included) minus this process's
    own and its reaped children's. Start the measured command in a new session
    (``start_new_session=True``) and pass its pid to ``stop()`` so that descendants it left
    running are not counted either; descendants that were orphaned and have already exited
    are counted as others' (the error is on the safe side). None where ``/proc`` is missing.
    """

    def start(self) -> None:
        self._t = time.perf_counter()
        self._busy = _busy_cpu_seconds()
        self._own = _own_cpu_seconds()

    def stop(self, session: int | None = None) -> float | None:
        busy = _busy_cpu_seconds()
        if busy is None or self._busy is None:
            return None
        wall = max(time.perf_counter() - self._t, 1e-6)
        ours = _own_cpu_seconds() - self._own
        if session is not None:
            ours += _session_cpu_seconds(session)
        # /proc/stat on a VM occasionally jumps (more busy time than cores x wall); clamp.
        return min(max(busy - self._busy - ours, 0.0) / wall, float(os.cpu_count() or 1))


def _descendants_cpu() -> float:
    """CPU seconds used so far by this process's live descendants (the S3 server)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo, seen = 0.0, [os.getpid()], set()
    while todo:
        pid = todo.pop()
        kids: list[int] = []
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    kids += [int(x) for x in f.read().split()]
        except OSError:
            continue
        for kid in kids:
            if kid in seen:
                continue
            seen.add(kid)
            todo.append(kid)
            try:
                with open(f"/proc/{kid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
            except (OSError, IndexError, ValueError):
                pass
    return total


class OthersMeter(LoadMeter):
    """:class:`LoadMeter` that also leaves out our own S3 server's CPU."""

    def start(self) -> None:
        super().start()
        self._kids = _descendants_cpu()
        self._t0 = time.perf_counter()

    def stop(self) -> float | None:
        load = super().stop()
        if load is None:
            return None
        wall = max(time.perf_counter() - self._t0, 1e-6)
        load -= (_descendants_cpu() - self._kids) / wall
        # /proc/stat on a VM occasionally jumps (more busy time than cores x wall); clamp.
        return min(max(load, 0.0), float(os.cpu_count() or 1))


def wait_for_idle(
    max_cores: float = 0.15, window: float = 2.0, timeout: float = 300.0
) -> float | None:
    """Wait until other processes use less than ``max_cores`` over a ``window``.

    Gives up after ``timeout`` seconds and returns the last load seen (None: unknown).
    """
    deadline = time.monotonic() + timeout
    said = False
    while True:
        meter = LoadMeter()
        meter.start()
        time.sleep(window)
        load = meter.stop()
        if load is None or load < max_cores or time.monotonic() >= deadline:
            return load
        if not said:
            print(
                f"waiting for the machine to go idle (others use {load:.2f} cores) ...",
                file=sys.stderr,
                flush=True,
            )
            said = True


def command_line() -> str:
    """The command line of this process as typed (interpreter, ``-m module``, arguments)."""
    argv = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    exe = argv[0]
    try:
        rel = os.path.relpath(exe, Path.cwd())
        if not rel.startswith(".."):
            argv[0] = rel
    except ValueError:
        pass
    return shlex.join(argv)


def source_digest(*packages: str) -> str:
    """Short digest of the ``*.py`` files of ``packages`` (folders under the repository root).

    Compare it before and after a long benchmark: the tree may change under it.
    """
    digest = hashlib.sha256()
    for package in packages:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(REPO_ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    except (ValueError, OSError, AttributeError):
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{rev}{' (modified)' if dirty else ''}"


def machine_info() -> dict[str, str]:
    """Cores, RAM, CPU, and the versions that matter for the numbers, as display strings."""
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    mem = _memory_gib()
    info = {
        "cores": f"{usable}" + (f" (of {cores})" if usable != cores else ""),
        "ram": f"{mem:.1f} GiB" if mem is not None else "unknown",
        "cpu": _cpu_model(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }
    for label, dist in _PACKAGES:
        try:
            info[label] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[label] = "not installed"
    info["git"] = _git_revision()
    if NICED_IS_IDLE:
        info["background"] = "niced work beside it, not counted as others' CPU"
    return info


def _markers(title: str) -> tuple[str, str]:
    return f"<!-- begin: {title} -->", f"<!-- end: {title} -->"


def write_section(
    title: str, markdown_body: str, command: str | None = None, path: Path = RESULTS
) -> Path:
    """Write ``## title`` with the command, date and machine, then ``markdown_body``.

    The section is delimited by HTML comments carrying the title, so a later call with the
    same title replaces exactly this section (and nothing else); a new title is appended.
    """
    command = command or command_line()
    info = machine_info()
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = ", ".join(f"{k} {v}" for k, v in info.items())
    begin, end = _markers(title)
    section = (
        f"{begin}\n## {title}\n\n"
        f"- Command: `{command}`\n"
        f"- Date: {date}\n"
        f"- Machine: {machine}\n\n"
        f"{markdown_body.strip()}\n{end}\n"
    )
    text = path.read_text(encoding="utf-8") if path.exists() else _HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def publish(
    section: str,
    markdown: str,
    *,
    quick: bool,
    write: bool,
    name: str | None = None,
    results: dict | None = None,
) -> None:
    """Print a benchmark's markdown and, unless told not to, record it.

    The markdown becomes a section of ``RESULTS.md``; ``results`` (the headline numbers),
    when given, go to ``results/<name>.json`` with the command and commit that produced them.
    A ``quick`` run writes neither file's canonical entry: its section is titled
    "(quick)" and its JSON is ``<name>.quick.json``.
    """
    print("\n" + markdown + "\n")
    if not write:
        return
    title = section + (" (quick)" if quick else "")
    path = write_section(title, markdown, command_line())
    print(f"wrote section {title!r} of {path}", file=sys.stderr)
    if results is not None and name is not None:
        out = write_results(name + (".quick" if quick else ""), results)
        print(f"wrote {out}", file=sys.stderr)


def write_results(name: str, results: dict, directory: Path = RESULTS_DIR) -> Path:
    """``results/<name>.json``: ``{"command", "commit", "date", "machine", **results}``."""
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": command_line(),
        "commit": _git_revision(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        **results,
    }
    path = directory / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
