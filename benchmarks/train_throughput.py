"""Training throughput: the same model on the same S3 data through three input pipelines.

- **stratified**: ``DynamicStreamingDataset(manifest=s3://.../mixture.json, lockstep=True)``
  trained with ``mixstream.algorithms.Stratified()`` (uniform weights, every step announced
  to the dataset);
- **aioli**: the same dataset with ``mixstream.algorithms.Aioli`` set up to change the
  weights inside the measured window (short rounds: LearnParams sweeps, then the learned
  mixture); its step time is reported with and without the algorithm's own evaluations;
- **plain**: ``streaming.StreamingDataset(streams=[Stream(remote=..., local=...,
  proportion=1/4) per group], batch_size=..., shuffle=True)``, static weights, as a user would
  write it without mixstream.

Every pipeline trains ``MixtureLM("gpt2", ...)`` with AdamW under Composer's ``Trainer``.
A callback timestamps the events of every step: *step time* is ``BATCH_END`` to
``BATCH_END`` (``EPOCH_START`` before the first step) and *data wait* is the part of it
before ``AFTER_DATALOADER``; the time spent inside the DataLoader's ``next()`` is measured as
well (the rest of the wait is Composer's per-batch all-reduce, i.e. waiting for other ranks).

Layouts: ranks are real processes (gloo on loopback on CPU; NCCL on GPUs), started by a
small per-node launcher with the launcher environment (``RANK``, ``LOCAL_RANK``,
``NODE_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``, ...). A layout ``NxR``
simulates N nodes of R ranks on this machine: every node gets its own cache directory, its
own ``TMPDIR`` and -- because streaming's shared-memory registry would otherwise make the
"nodes" attach to each other's state -- its own ``/dev/shm`` (the node launcher runs in a
private mount namespace via ``unshare``; the layout is skipped with a note where that is
not permitted).

Data: once per invocation the demo corpus is built from text on this machine, a BPE is
trained and the corpus converted into a SeaweedFS S3 server on loopback, exactly as
``mixstream.train.demo`` does (or ``--manifest`` points at an existing corpus). Every cell is a
fresh set of processes with a fresh cache directory, so it downloads what it reads.

Run from the repository root::

    .venv/bin/python -m benchmarks.train_throughput                     # full run (CPU)
    .venv/bin/python -m benchmarks.train_throughput --quick --no-write  # smoke test

On GPUs the same script runs with ``--device gpu --model 125m`` (layouts default to 1 rank
and all visible GPUs), or one cell at a time under Composer's launcher::

    composer -n 8 -m benchmarks.train_throughput --worker --pipeline stratified \\
        --manifest s3://bucket/corpus --device gpu --model 125m --out results/
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks._common import REPO_ROOT, median, publish, stopwatch, wait_for_idle

SECTION = "training throughput"
MODULE = "benchmarks.train_throughput"
PIPELINES = ("plain", "stratified", "aioli")
BUCKET = "mixstream"
VOCAB = 4096
SEQ_LEN = 256
BATCH = 8  # per device
PREFETCH = 2
LR = 6e-4
SEED = 17
MODELS: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 4, "n_head": 4, "n_embd": 128},  # the CPU recipe size
    "125m": {"n_layer": 12, "n_head": 12, "n_embd": 768},
}
DEFAULT_STEPS, DEFAULT_WARMUP = 30, 5
QUICK_STEPS, QUICK_WARMUP = 12, 2
# Aioli: rounds short enough that the weights change inside the window. LearnParams sweeps
# every group for lp_steps batches (a new mixture each time), then the learned mixture takes
# over until the next round; validation before the first sweep and after every sweep.
AIOLI = {"update_steps": 40, "lp_rounds": 1, "lp_steps": 4}
QUICK_AIOLI = {"update_steps": 10, "lp_rounds": 1, "lp_steps": 1}
VAL_SAMPLES = 8  # per group, per Aioli evaluation
DEFAULT_BYTES_PER_GROUP = 2_000_000  # the demo's default
QUICK_BYTES_PER_GROUP = 1_000_000
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "mixstream-train-bench"
RESULT_PREFIX = "BENCH-RESULT "
RUN_TIMEOUT_S = 300.0
NOISY_CORES = 0.15
WAIT_TARGET = 0.02
SHM_MOUNT = 'mount -t tmpfs -o size=2g tmpfs /dev/shm && exec "$@"'


# --------------------------------------------------------------------------------------------
# One rank (``--worker``): train one pipeline and time every step


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def _children_cpu_s() -> float:
    """CPU seconds of this process's children: reaped ones and those still running."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = usage.ru_utime + usage.ru_stime
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return total
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                kids = f.read().split()
        except OSError:
            continue
        for kid in kids:
            try:
                with open(f"/proc/{kid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += sum(int(x) for x in fields[11:15]) / tick  # own and reaped children
            except (OSError, IndexError, ValueError):
                pass
    return total


def build_dataset(args: argparse.Namespace, manifest: Any) -> Any:
    """The pipeline's dataset; the cache directory is per node, shared by its ranks."""
    cache = args.cache or os.path.join(
        tempfile.gettempdir(), "mixstream-train-bench-cache", os.environ.get("MASTER_PORT", "0")
    )
    if args.pipeline == "plain":
        from streaming import Stream, StreamingDataset

        streams = [
            Stream(
                remote=manifest.stream_url(g, "train"),
                local=os.path.join(cache, "plain", g),
                proportion=1 / len(manifest.group_names),
            )
            for g in manifest.group_names
        ]
        return StreamingDataset(
            streams=streams, batch_size=args.batch, shuffle=True, shuffle_seed=SEED
        )
    from mixstream import DynamicStreamingDataset

    return DynamicStreamingDataset(
        manifest=manifest,
        batch_size=args.batch,
        seed=SEED,
        num_workers=args.workers,
        prefetch_factor=PREFETCH,
        local=os.path.join(cache, "ours"),
        lockstep=True,
    )


def worker_main(args: argparse.Namespace) -> dict[str, Any]:
    """Train ``args.steps`` batches of ``args.pipeline`` on this rank; return the timings."""
    import torch

    # Not given (e.g. under Composer's launcher): the same rule as the parent's, per node.
    local_ranks = _env_int("LOCAL_WORLD_SIZE", 1)
    torch.set_num_threads(args.threads or max(1, ((os.cpu_count() or 1) - 1) // local_ranks))
    from composer import Callback, Event, State, Trainer
    from composer.loggers import Logger
    from torch.utils.data import DataLoader

    from mixstream.composer.model import MixtureLM
    from mixstream.manifest import Manifest

    class TimedLoader(DataLoader):
        """A DataLoader that records how long every ``next()`` took (the loader's own wait)."""

        def __iter__(self) -> Any:
            iterator = super().__iter__()
            while True:
                t0 = time.perf_counter()
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
                self.fetch_s.append(time.perf_counter() - t0)
                yield batch

    def timed(cls: type) -> type:
        """``cls`` that adds up the time spent in its Composer hooks and in its evaluations."""

        class Timed(cls):  # type: ignore[misc, valid-type]
            def __init__(self, **kwargs: Any) -> None:
                super().__init__(**kwargs)
                self.hook_s = 0.0  # everything it did on Composer events, evaluations included

            @property
            def eval_s(self) -> float:
                return self.mixer.eval_seconds  # timed around every evaluate() by the mixer

            @property
            def evals(self) -> int:
                return self.mixer.evaluations

            def apply(self, event: Event, state: State, logger: Logger) -> Any:
                t0 = time.perf_counter()
                try:
                    return super().apply(event, state, logger)
                finally:
                    self.hook_s += time.perf_counter() - t0

        Timed.__name__ = Timed.__qualname__ = f"Timed{cls.__name__}"
        return Timed

    class StepClock(Callback):
        """Step time (BATCH_END to BATCH_END) and data wait (to AFTER_DATALOADER) per step.

        Algorithms run before callbacks on every event, so a step's time includes what the
        mixing algorithm did at its BATCH_END (weight updates, Aioli's evaluations); the
        algorithm's own hook and evaluation seconds inside each step are recorded too.
        """

        def __init__(self, algorithm: Any = None) -> None:
            self.algorithm = algorithm
            self.worker_cpu: list[float] = []  # after the warm-up and at the last step
            self.last = 0.0
            self.seen = (0.0, 0.0)
            self.wait_s: list[float] = []
            self.step_s: list[float] = []
            self.eval_s: list[float] = []
            self.hook_s: list[float] = []

        def _counters(self) -> tuple[float, float]:
            algo = self.algorithm
            return (algo.hook_s, algo.eval_s) if algo is not None else (0.0, 0.0)

        def run_event(self, event: Event, state: State, logger: Logger) -> None:
            now = time.perf_counter()
            if event == Event.EPOCH_START:
                self.last = now
                self.seen = self._counters()
            elif event == Event.AFTER_DATALOADER:
                self.wait_s.append(now - self.last)
            elif event == Event.BATCH_END:
                self.step_s.append(now - self.last)
                hook, evals = self._counters()
                self.eval_s.append(evals - self.seen[1])
                self.hook_s.append((hook - self.seen[0]) - (evals - self.seen[1]))
                self.seen = (hook, evals)
                self.last = now
                if len(self.step_s) in (args.warmup, args.steps):
                    self.worker_cpu.append(_children_cpu_s())
                    self.last = time.perf_counter()  # the reading is in no step

    began = time.perf_counter()
    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    manifest = Manifest.load(args.manifest)
    vocab = (manifest.tokenizer or {}).get("vocab_size")
    seq_len = int(manifest.sample["seq_len"])
    if not isinstance(vocab, int):
        raise SystemExit(f"{args.manifest} records no tokenizer vocab_size")
    torch.manual_seed(SEED)
    with stopwatch() as build:
        dataset = build_dataset(args, manifest)
        loader = TimedLoader(
            dataset,
            batch_size=args.batch,
            num_workers=args.workers,
            prefetch_factor=PREFETCH if args.workers else None,
        )
        loader.fetch_s = []
        model = MixtureLM("gpt2", vocab, seq_len, **MODELS[args.model])
    algorithm: Any = None
    run_dir = Path(args.out or tempfile.mkdtemp(prefix="train-bench-")) / "run"
    if args.pipeline == "stratified":
        from mixstream.algorithms import Stratified

        algorithm = timed(Stratified)(run_dir=run_dir)
    elif args.pipeline == "aioli":
        from mixstream.algorithms import Aioli

        algorithm = timed(Aioli)(
            update_steps=args.aioli_update_steps,
            lp_rounds=args.aioli_lp_rounds,
            lp_steps=args.aioli_lp_steps,
            val_samples_per_group=args.val_samples,
            run_dir=run_dir,
        )
    clock = StepClock(algorithm)
    gpu = args.device == "gpu"
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        max_duration=f"{args.steps}ba",
        optimizers=torch.optim.AdamW(model.parameters(), lr=LR),
        algorithms=[algorithm] if algorithm is not None else [],
        callbacks=[clock],
        device=args.device,
        precision=args.precision or ("amp_bf16" if gpu else "fp32"),
        run_name=f"train-bench-{args.pipeline}",
        progress_bar=False,
        log_to_console=False,
        loggers=[],
        seed=SEED,
    )
    with stopwatch() as fit:
        trainer.fit()
    schedule: list[Any] = []
    if args.pipeline != "plain":
        schedule = [
            [int(b), [float(w[g]) for g in dataset.group_names]] for b, w in dataset.schedule
        ]
    trainer.close()
    del trainer
    gc.collect()  # the DataLoader iterator: its workers shut down and are reaped
    worker_cpu = _children_cpu_s()
    if args.pipeline != "plain":
        dataset.close()
    return {
        "rank": rank,
        "world": world,
        "node": _env_int("NODE_RANK", 0),
        "pipeline": args.pipeline,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "workers": args.workers,
        "tokens_per_step": args.batch * seq_len,
        "params": model.num_parameters,
        "build_s": build.seconds,
        "fit_s": fit.seconds,
        "process_s": time.perf_counter() - began,
        "worker_cpu_s": worker_cpu,
        "worker_cpu_window_s": (
            clock.worker_cpu[-1] - clock.worker_cpu[0] if len(clock.worker_cpu) == 2 else None
        ),
        "step_s": clock.step_s,
        "wait_s": clock.wait_s,
        "fetch_s": loader.fetch_s,
        "eval_s": clock.eval_s,
        "hook_s": clock.hook_s,
        "evals_total": getattr(algorithm, "evals", 0),
        "schedule": schedule,
    }


def run_worker(args: argparse.Namespace) -> None:
    result = worker_main(args)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        path = Path(args.out) / f"rank{result['rank']}.json"
        path.write_text(json.dumps(result))
    summary = summarize_rank(result, args.warmup)
    print(RESULT_PREFIX + json.dumps(summary), flush=True)


# --------------------------------------------------------------------------------------------
# One node (``--node``): start its ranks as a launcher would


def node_main(job: dict[str, Any]) -> int:
    """Start ``job['ranks']`` rank processes of node ``job['node']``; wait for all of them.

    A rank that fails takes the others down (they would wait for it in a collective).
    """
    node, ranks = job["node"], job["ranks"]
    procs = []
    for local in range(ranks):
        env = dict(os.environ)
        env.update(
            RANK=str(node * ranks + local),
            WORLD_SIZE=str(job["world"]),
            LOCAL_RANK=str(local),
            LOCAL_WORLD_SIZE=str(ranks),
            NODE_RANK=str(node),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(job["port"]),
            OMP_NUM_THREADS=str(job["threads"]),
        )
        cmd = [sys.executable, "-m", MODULE, "--worker", *job["argv"]]
        procs.append(subprocess.Popen(cmd, cwd=REPO_ROOT, env=env))
    code = 0
    pending = list(procs)
    while pending:
        for proc in list(pending):
            rc = proc.poll()
            if rc is None:
                continue
            pending.remove(proc)
            if rc != 0 and code == 0:
                code = rc
                for other in pending:
                    other.kill()
        time.sleep(0.05)
    return code


# --------------------------------------------------------------------------------------------
# Statistics


def summarize_rank(r: dict[str, Any], warmup: int) -> dict[str, Any]:
    """Per-rank numbers over the measured steps (after ``warmup``)."""
    steps = r["step_s"][warmup:]
    waits = r["wait_s"][warmup : warmup + len(steps)]
    fetches = r["fetch_s"][warmup : warmup + len(steps)]
    evals = r["eval_s"][warmup : warmup + len(steps)]
    hooks = r["hook_s"][warmup : warmup + len(steps)]
    if not steps:
        raise ValueError(f"no steps after the {warmup} warm-up steps")
    total = sum(steps)
    no_eval = [s for s, e in zip(steps, evals, strict=True) if e == 0.0]
    eval_total = sum(evals)
    # A change at global batch b first applies to step b (0-based): the window's steps are
    # batches warmup .. warmup + len(steps) - 1.
    changes = [b for b, _ in r["schedule"] if warmup <= b < warmup + len(steps)]
    return {
        "rank": r["rank"],
        "steps": len(steps),
        "tok_s": r["tokens_per_step"] * len(steps) / total,
        "tok_s_excl": r["tokens_per_step"] * len(steps) / (total - eval_total),
        "median_step_s": median(steps),
        "median_step_excl_s": median(no_eval) if no_eval else float("nan"),
        "wait_frac": sum(waits) / total,
        "wait_frac_excl": sum(waits) / (total - eval_total),
        "fetch_frac": sum(fetches) / total,
        "window_s": total,
        "eval_s": eval_total,
        "hook_ms": sum(hooks) / len(steps) * 1e3,
        "eval_steps": len(steps) - len(no_eval),
        "evals_total": r["evals_total"],
        "weight_changes": len(changes),
        "first_wait_s": r["wait_s"][0] if r["wait_s"] else float("nan"),
        "build_s": r["build_s"],
        "worker_cpu_s": r["worker_cpu_s"],
        "worker_cpu_ms": (r["worker_cpu_window_s"] or float("nan")) / len(steps) * 1e3,
        "threads": r["threads"],
    }


# --------------------------------------------------------------------------------------------
# The parent


@dataclass(frozen=True)
class Layout:
    nodes: int
    ranks: int  # per node

    @classmethod
    def parse(cls, text: str) -> Layout:
        try:
            nodes, _, ranks = text.partition("x")
            layout = cls(int(nodes), int(ranks)) if ranks else cls(1, int(nodes))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"layout {text!r}: use R (one node of R ranks) or NxR (N nodes of R ranks)"
            ) from None
        if layout.nodes < 1 or layout.ranks < 1:
            raise argparse.ArgumentTypeError(f"layout {text!r}: counts must be >= 1")
        return layout

    @property
    def world(self) -> int:
        return self.nodes * self.ranks

    @property
    def label(self) -> str:
        if self.nodes == 1:
            return f"{self.ranks} rank{'s' if self.ranks > 1 else ''}"
        return f"{self.nodes} nodes x {self.ranks}"


AUTO_THREADS = (
    "max(1, (cores - 1) // ranks on the machine): one core is left to the DataLoader "
    "workers and the S3 server, which share the machine (with every core given to torch, "
    "its threads wait on each other whenever another process runs)"
)


def auto_threads(layout: Layout) -> int:
    """Torch threads per rank when not given: see ``AUTO_THREADS``."""
    return max(1, ((os.cpu_count() or 1) - 1) // layout.world)


def private_shm_works() -> str | None:
    """None if a node launcher can get its own /dev/shm here, else why not."""
    if shutil.which("unshare") is None:
        return "`unshare` is not installed"
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", SHM_MOUNT, "sh", "true"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`unshare` failed: {exc}"
    if done.returncode != 0:
        return f"`unshare --mount` + `mount -t tmpfs` not permitted: {done.stderr.strip()}"
    return None


@dataclass
class Cell:
    """Repeated measurements of one (layout, pipeline)."""

    runs: list[list[dict[str, Any]]] = field(default_factory=list)  # per run: per-rank summary
    others: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    incidents: list[str] = field(default_factory=list)


def worker_argv(
    args: argparse.Namespace, pipeline: str, workers: int, cache: str, out: str
) -> list:
    aioli = QUICK_AIOLI if args.quick else AIOLI
    argv = [
        "--pipeline", pipeline, "--manifest", args.manifest, "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--batch", str(args.batch), "--workers", str(workers),
        "--model", args.model, "--device", args.device, "--cache", cache, "--out", out,
        "--threads", str(args.rank_threads), "--val-samples", str(args.val_samples),
        "--aioli-update-steps", str(aioli["update_steps"]),
        "--aioli-lp-rounds", str(aioli["lp_rounds"]),
        "--aioli-lp-steps", str(aioli["lp_steps"]),
    ]  # fmt: skip
    if args.precision:
        argv += ["--precision", args.precision]
    return argv


def launch_cell(
    layout: Layout, pipeline: str, args: argparse.Namespace, env: dict[str, str]
) -> dict[str, Any]:
    """One run of a cell: its nodes in fresh processes; per-rank summaries or a failure."""
    from benchmarks._common import OthersMeter
    from mixstream.testing.distributed import free_port

    if args.idle_timeout > 0:
        wait_for_idle(timeout=args.idle_timeout)
    cell_dir = args.workdir / f"cell-{uuid.uuid4().hex[:10]}"
    out = cell_dir / "out"
    workers = args.workers_single if layout.world == 1 else args.workers_multi
    port = free_port()
    procs = []
    meter = OthersMeter()
    meter.start()
    started = time.perf_counter()
    try:
        for node in range(layout.nodes):
            node_dir = cell_dir / f"node{node}"
            (node_dir / "tmp").mkdir(parents=True)
            job = {
                "node": node,
                "ranks": layout.ranks,
                "world": layout.world,
                "port": port,
                "threads": args.rank_threads,
                "argv": worker_argv(args, pipeline, workers, str(node_dir / "cache"), str(out)),
            }
            node_env = {**env, "TMPDIR": str(node_dir / "tmp"), "PYTHONUNBUFFERED": "1"}
            if args.device == "gpu" and layout.nodes > 1:
                first = node * layout.ranks
                gpus = range(first, first + layout.ranks)
                node_env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
            cmd = [sys.executable, "-m", MODULE, "--node", json.dumps(job)]
            if layout.nodes > 1:
                cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", SHM_MOUNT,
                       "sh", *cmd]  # fmt: skip
            log = open(node_dir / "log.txt", "w")  # noqa: SIM115 - closed below
            procs.append((subprocess.Popen(
                cmd, cwd=REPO_ROOT, env=node_env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killed with its ranks
            ), log, node_dir))  # fmt: skip
        # A failed node leaves the others waiting in a collective: stop at the first failure.
        deadline = started + args.run_timeout
        failed = ""
        while not failed and any(proc.poll() is None for proc, _, _ in procs):
            if time.perf_counter() > deadline:
                failed = f"no result after {args.run_timeout:.0f} s"
            time.sleep(0.1)
            for proc, _, node_dir in procs:
                if proc.poll() not in (None, 0) and not failed:
                    failed = f"node exited {proc.returncode}: {_error_line(node_dir / 'log.txt')}"
        for proc, _, node_dir in procs:
            if not failed and proc.returncode != 0:
                failed = f"node exited {proc.returncode}: {_error_line(node_dir / 'log.txt')}"
        wall = time.perf_counter() - started
    finally:
        for proc, log, _ in procs:
            # The whole process group: ranks and DataLoader workers a failed node left behind.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log.close()
    others = meter.stop()
    result: dict[str, Any] = {"others": -1.0 if others is None else others, "wall": wall}
    try:
        if failed:
            for _, _, node_dir in procs:
                tail = (node_dir / "log.txt").read_text(errors="replace")[-3000:]
                print(f"  --- {node_dir.name} log tail ---\n{tail}", file=sys.stderr)
            result["failed"] = failed
            return result
        ranks = []
        for rank in range(layout.world):
            raw = json.loads((out / f"rank{rank}.json").read_text())
            ranks.append({**summarize_rank(raw, args.warmup), "schedule": raw["schedule"]})
        result["ranks"] = ranks
        return result
    finally:
        shutil.rmtree(cell_dir, ignore_errors=True)


def _error_line(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors[-1] if errors else (lines[-1] if lines else "empty log")).strip()[:300]


def prepare_corpus(args: argparse.Namespace) -> dict[str, Any]:
    """The demo's data, built the demo's way, into ``s3://BUCKET/bench`` (server running)."""
    from shard_tools.demo_mixture import build_demo_mixture

    work = args.workdir / f"corpus-{uuid.uuid4().hex[:8]}"
    with contextlib.ExitStack() as cleanup, stopwatch() as sw:
        cleanup.callback(shutil.rmtree, work, ignore_errors=True)
        report = build_demo_mixture(
            work,
            f"s3://{BUCKET}/bench",
            bytes_per_group=args.bytes_per_group,
            vocab_size=VOCAB,
            seq_len=SEQ_LEN,
            say=lambda message: None,
        )
    return {"seconds": sw.seconds, "text_mb": report.input_bytes / 1e6}


def corpus_stats(url: str) -> dict[str, Any]:
    from mixstream.manifest import Manifest

    manifest = Manifest.load(url)
    train = {g: manifest.split(g, "train") for g in manifest.group_names}
    return {
        "groups": manifest.group_names,
        "samples": {g: s.samples for g, s in train.items()},
        "shards": sum(s.shards for s in train.values()),
        "stored_mb": sum(s.stored_bytes for s in train.values()) / 1e6,
        "seq_len": int(manifest.sample["seq_len"]),
        "vocab": (manifest.tokenizer or {}).get("vocab_size"),
    }


def _agg(ranks: Sequence[dict[str, Any]], key: str, how: str = "mean") -> float:
    values = [r[key] for r in ranks]
    if how == "max":
        return max(values)
    return sum(values) / len(values)


def cell_value(cell: Cell, key: str, how: str = "mean") -> float:
    """Median over runs of the across-ranks mean (or max) of ``key``."""
    return median([_agg(run, key, how) for run in cell.runs])


def report(
    cells: dict[tuple[Layout, str], Cell],
    layouts: Sequence[Layout],
    args: argparse.Namespace,
    stats: dict[str, Any],
    setup: dict[str, Any] | None,
    skipped: list[str],
) -> tuple[str, list[str], dict[str, Any]]:
    """The markdown body, a list of target misses, and the tables' numbers for the JSON."""
    misses: list[str] = []
    results: dict[str, Any] = {"corpus": stats, "cells": [], "aioli_eval": [], "startup": []}
    rows = [
        "| layout | ranks x threads | workers / rank | pipeline | tokens/s per device "
        "| median step ms | data wait % (mean / worst rank) | in `next()` % "
        "| mixing hooks ms/step | vs plain | others' CPU |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    evals = [
        "| layout | evaluations in window | eval s in window | ms per eval "
        "| share of window time | weight changes in window | median step ms without eval |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    startup = [
        "| layout | pipeline | build s (dataset + model) | first batch s "
        "| DataLoader workers' CPU s per rank, whole run | in the window, ms per step "
        "| cell wall s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    incidents: list[str] = []
    for layout in layouts:
        plain = cells.get((layout, "plain"))
        plain_rate = cell_value(plain, "tok_s") if plain and plain.runs else None
        for pipeline in args.pipelines:
            cell = cells.get((layout, pipeline))
            if cell is None:
                continue
            incidents += [f"{layout.label}, {pipeline}: {i}" for i in cell.incidents]
            if not cell.runs:
                rows.append(f"| {layout.label} | | | {pipeline} | no result | | | | | | |")
                misses.append(f"{layout.label}, {pipeline}: no result")
                continue
            workers = args.workers_single if layout.world == 1 else args.workers_multi
            threads = cell.runs[0][0]["threads"]
            others = max(cell.others)
            variants = [("", "tok_s", "median_step_s", "wait_frac")]
            if pipeline == "aioli":
                variants = [
                    (" (incl. eval)", "tok_s", "median_step_s", "wait_frac"),
                    (" (excl. eval)", "tok_s_excl", "median_step_excl_s", "wait_frac_excl"),
                ]
            where = {"layout": layout.label, "nodes": layout.nodes, "ranks": layout.world}
            for suffix, rate_key, step_key, wait_key in variants:
                rate = cell_value(cell, rate_key)
                wait = cell_value(cell, wait_key)
                worst = cell_value(cell, wait_key, "max")
                ratio = f"**{rate / plain_rate:.2f}x**" if plain_rate else "-"
                hooks = f"{cell_value(cell, 'hook_ms'):.1f}"
                if pipeline == "plain":
                    ratio, hooks = "1.00x", "-"
                results["cells"].append(
                    {
                        **where,
                        "threads_per_rank": threads,
                        "workers_per_rank": workers,
                        "pipeline": pipeline + suffix,
                        "tokens_per_s_per_device": rate,
                        "median_step_ms": cell_value(cell, step_key) * 1e3,
                        "data_wait_frac": wait,
                        "data_wait_frac_worst_rank": worst,
                        "in_next_frac": cell_value(cell, "fetch_frac"),
                        "mixing_hooks_ms_per_step": (
                            None if pipeline == "plain" else cell_value(cell, "hook_ms")
                        ),
                        "ratio_vs_plain": rate / plain_rate if plain_rate else None,
                        "others_cores": others,
                    }
                )
                rows.append(
                    f"| {layout.label} | {layout.world} x {threads} | {workers} "
                    f"| {pipeline}{suffix} | {rate:,.0f} | {cell_value(cell, step_key) * 1e3:,.0f} "
                    f"| {wait * 100:.2f} / {worst * 100:.2f} "
                    f"| {cell_value(cell, 'fetch_frac') * 100:.2f} | {hooks} | {ratio} "
                    f"| {others:.2f} |"
                )
                if pipeline != "plain" and suffix != " (incl. eval)":
                    if wait >= WAIT_TARGET:
                        misses.append(f"{layout.label}, {pipeline}: data wait {wait * 100:.1f}%")
                    if plain_rate and rate < plain_rate:
                        misses.append(f"{layout.label}, {pipeline}: {rate / plain_rate:.2f}x plain")
            startup.append(
                f"| {layout.label} | {pipeline} | {cell_value(cell, 'build_s'):.2f} "
                f"| {cell_value(cell, 'first_wait_s'):.2f} "
                f"| {cell_value(cell, 'worker_cpu_s'):.1f} "
                f"| {cell_value(cell, 'worker_cpu_ms'):.1f} "
                f"| {median(cell.wall):.0f} |"
            )
            results["startup"].append(
                {
                    **where,
                    "pipeline": pipeline,
                    "build_s": cell_value(cell, "build_s"),
                    "first_batch_s": cell_value(cell, "first_wait_s"),
                    "worker_cpu_s_per_rank": cell_value(cell, "worker_cpu_s"),
                    "worker_cpu_ms_per_step": cell_value(cell, "worker_cpu_ms"),
                    "cell_wall_s": median(cell.wall),
                }
            )
            if pipeline == "aioli":
                run0 = cell.runs[0]
                n_eval = run0[0]["eval_steps"]
                eval_s = cell_value(cell, "eval_s")
                share = eval_s / cell_value(cell, "window_s")
                evals.append(
                    f"| {layout.label} | {n_eval} | {eval_s:.2f} "
                    f"| {eval_s / max(n_eval, 1) * 1e3:,.0f} | {share * 100:.1f}% "
                    f"| {run0[0]['weight_changes']} "
                    f"| {cell_value(cell, 'median_step_excl_s') * 1e3:,.0f} |"
                )
                results["aioli_eval"].append(
                    {
                        **where,
                        "evaluations": n_eval,
                        "eval_s": eval_s,
                        "ms_per_eval": eval_s / max(n_eval, 1) * 1e3,
                        "share_of_window": share,
                        "weight_changes": run0[0]["weight_changes"],
                        "median_step_excl_eval_ms": cell_value(cell, "median_step_excl_s") * 1e3,
                    }
                )
                if run0[0]["weight_changes"] == 0:
                    misses.append(f"{layout.label}, aioli: no weight change in the window")
    busiest = max((max(c.others) for c in cells.values() if c.others), default=0.0)
    aioli = QUICK_AIOLI if args.quick else AIOLI
    per_group = ", ".join(f"{g} {n:,}" for g, n in stats["samples"].items())
    model = MODELS[args.model]
    source = (
        f"the demo corpus ({args.bytes_per_group / 1e6:g} MB of text per group, built, "
        f"BPE-tokenized (vocab {VOCAB}) and converted into a SeaweedFS S3 server on loopback "
        f"in {setup['seconds']:.0f} s, as `mixstream.train.demo` does)"
        if setup
        else f"`{args.manifest}`"
    )
    body = [
        f"Data: {source}: {len(stats['groups'])} groups ({per_group} training sequences of "
        f"{stats['seq_len']} tokens), {stats['shards']} training shards, "
        f'{stats["stored_mb"]:.1f} MB stored. Model: `MixtureLM("gpt2", {stats["vocab"]}, '
        f"{stats['seq_len']}, n_layer={model['n_layer']}, n_head={model['n_head']}, "
        f"n_embd={model['n_embd']})`, AdamW, "
        f"{args.precision or ('amp_bf16' if args.device == 'gpu' else 'fp32')}, device "
        f"{args.device}, Composer `Trainer`. Per-device batch {args.batch} x "
        f"{stats['seq_len']} tokens (the global batch grows with the ranks); "
        f"{args.steps} steps per run, the first {args.warmup} (warm-up, first download) left "
        "out of every statistic.",
        "",
        "Pipelines: **stratified** = `DynamicStreamingDataset(manifest=s3://.../mixture.json, "
        "lockstep=True)` + `Stratified()`; **aioli** = the same dataset + `Aioli("
        f"update_steps={aioli['update_steps']}, lp_rounds={aioli['lp_rounds']}, "
        f"lp_steps={aioli['lp_steps']}, val_samples_per_group={args.val_samples})`, which "
        "changes the weights every few steps inside the window (LearnParams sweeps, then the "
        "learned mixture) and evaluates per-group validation loss before and after every "
        "sweep; **plain** = `StreamingDataset(streams=[Stream(remote, local, proportion=1/"
        f"{len(stats['groups'])}) per group], batch_size={args.batch}, shuffle=True)`, static. "
        "Every run is a fresh set of processes with a fresh cache directory (it downloads "
        "from S3 what it reads); the pipelines of a layout run side by side, in alternating "
        f"order, {args.repeats} round(s); numbers are medians over rounds of the mean over "
        "ranks.",
        "",
        "**tokens/s per device** = per-device tokens per step / mean step time over the "
        "measured window; **data wait** = time from the previous step's `BATCH_END` to "
        "`AFTER_DATALOADER`, as a share of step time (`BATCH_END` to `BATCH_END`): it "
        "includes Composer's per-batch all-reduce that follows `next()`, so with several "
        "ranks it also holds waiting for the slowest rank; **in `next()`** is the loader's own "
        "share; **mixing hooks** is the time per step the mixing algorithm spent in its "
        "Composer events (per-group loss bookkeeping, `advance`, weight changes; evaluations "
        "excluded). For aioli, *excl. eval* subtracts the time spent in Aioli's validation "
        "(timed inside `validation_losses`) from the steps it ran in; its median is over "
        "the steps without one. **vs plain** compares tokens/s with plain's in the same "
        "layout (side-by-side runs). "
        f"Workers: {args.workers_single} DataLoader workers with 1 rank, "
        f"{args.workers_multi} per rank with several (this machine has {os.cpu_count()} "
        f"cores); torch threads per rank (column ranks x threads) = "
        f"{args.threads or AUTO_THREADS}. Simulated nodes: each node launcher runs in its "
        "own mount namespace with a private `/dev/shm` and its own `TMPDIR` and cache "
        f"directory; ranks meet over {'NCCL' if args.device == 'gpu' else 'gloo'} on "
        "127.0.0.1.",
        "",
        "\n".join(rows),
        "",
    ]
    if os.cpu_count() and os.cpu_count() < max(lay.world for lay in layouts) * 2:
        body += [
            f"On {os.cpu_count()} cores, layouts with more ranks than cores oversubscribe the "
            "machine: step time grows with the ranks and absolute scaling means nothing "
            "here. What these rows show is whether the data pipeline keeps up (data wait) "
            "and how ours compares with plain in the same conditions.",
            "",
        ]
    if "aioli" in args.pipelines:
        body += [
            "Aioli's own cost (validation over "
            f"{args.val_samples} sequences per group, all-reduced; the first measurement, at "
            "`FIT_START`, is outside the window), rank 0:",
            "",
            "\n".join(evals),
            "",
        ]
    body += [
        "Start-up (not in the statistics above) and the loader's CPU: *first batch* is "
        "`EPOCH_START` to the first `AFTER_DATALOADER` (worker start, index, first shard "
        "downloads); *DataLoader workers' CPU* is what the worker processes of a rank used, "
        "over the whole run (start and first downloads included) and per step in the "
        "measured window (CPU the workers use is taken from training on a small machine):",
        "",
        "\n".join(startup),
    ]
    if skipped:
        body += ["", *[f"- Skipped: {s}" for s in skipped]]
    if incidents:
        body += ["", "**Incidents** (failed or hung runs; repeated):", ""]
        body += [f"- {i}" for i in incidents]
    if busiest > NOISY_CORES:
        body += [
            "",
            f"**Shared machine:** other processes used up to {busiest:.2f} cores during some "
            "runs (column others' CPU); absolute numbers are depressed and noisy, "
            "side-by-side ratios less so.",
        ]
    quiet = quiet_ratios(cells, layouts)
    if len(quiet) >= 2:
        body += [
            "",
            f"Noise: with {args.repeats} run(s) per cell, stratified / plain ranges from "
            f"{min(quiet):.2f}x to {max(quiet):.2f}x over the layouts where nothing else used "
            f"more than {NOISY_CORES} cores; ratios that close to 1 are within run-to-run "
            "noise (`--repeats N` runs N interleaved rounds and reports medians).",
        ]
    return "\n".join(body), misses, results


def quiet_ratios(cells: dict[tuple[Layout, str], Cell], layouts: Sequence[Layout]) -> list[float]:
    """stratified / plain tokens/s in the layouts whose runs of both had a quiet machine."""
    out = []
    for layout in layouts:
        plain, ours = cells.get((layout, "plain")), cells.get((layout, "stratified"))
        if not (plain and ours and plain.runs and ours.runs):
            continue
        if max(plain.others + ours.others) <= NOISY_CORES:
            out.append(cell_value(ours, "tok_s") / cell_value(plain, "tok_s"))
    return out


def run_parent(args: argparse.Namespace) -> int:
    began = time.perf_counter()
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    skipped: list[str] = []
    layouts: list[Layout] = []
    shm_problem = None
    if any(lay.nodes > 1 for lay in args.layouts):
        shm_problem = private_shm_works()
    for lay in args.layouts:
        if lay.nodes > 1 and shm_problem:
            skipped.append(f"{lay.label}: {shm_problem}")
            print(f"skipping {lay.label}: {shm_problem}", file=sys.stderr)
            continue
        layouts.append(lay)
    env = dict(os.environ)
    server = None
    setup = None
    try:
        if args.manifest is None:
            from mixstream.testing.s3server import S3Server

            server_dir = args.workdir / f"s3-{uuid.uuid4().hex[:8]}"
            server = S3Server(data_dir=server_dir, buckets=(BUCKET,))
            server.start()
            env = server.subprocess_env()
            with server.apply_env():
                print("building the demo corpus and converting it into S3 ...", file=sys.stderr)
                setup = prepare_corpus(args)
            args.manifest = f"s3://{BUCKET}/bench/mixture.json"
            print(f"corpus ready in {setup['seconds']:.0f} s", file=sys.stderr, flush=True)
        if server is not None:
            with server.apply_env():
                stats = corpus_stats(args.manifest)
        else:
            stats = corpus_stats(args.manifest)
        cells: dict[tuple[Layout, str], Cell] = {}
        for rnd in range(args.repeats):
            for layout in layouts:
                threads = args.threads or auto_threads(layout)
                args.rank_threads = threads
                order = list(args.pipelines) if rnd % 2 == 0 else list(args.pipelines)[::-1]
                for pipeline in order:
                    cell = cells.setdefault((layout, pipeline), Cell())
                    for _attempt in range(args.retries + 1):
                        result = launch_cell(layout, pipeline, args, env)
                        if "failed" in result:
                            cell.incidents.append(f"round {rnd + 1}: {result['failed']}")
                            print(f"  {layout.label} {pipeline}: {result['failed']}",
                                  file=sys.stderr, flush=True)  # fmt: skip
                            continue
                        cell.runs.append(result["ranks"])
                        cell.others.append(result["others"])
                        cell.wall.append(result["wall"])
                        r0 = result["ranks"]
                        print(
                            f"round {rnd + 1}/{args.repeats} {layout.label:>12} {pipeline:>10}: "
                            f"{_agg(r0, 'tok_s'):8,.0f} tok/s/device, median step "
                            f"{_agg(r0, 'median_step_s') * 1e3:6.0f} ms, wait "
                            f"{_agg(r0, 'wait_frac') * 100:5.2f}% (next() "
                            f"{_agg(r0, 'fetch_frac') * 100:5.2f}%), changes "
                            f"{r0[0]['weight_changes']}, others {result['others']:.2f} cores, "
                            f"{result['wall']:.0f} s",
                            file=sys.stderr,
                            flush=True,
                        )
                        break
    finally:
        if server is not None:
            server.stop()
            shutil.rmtree(server_dir, ignore_errors=True)
    markdown, misses, results = report(cells, layouts, args, stats, setup, skipped)
    verdict = (
        f"- Targets: data wait < {WAIT_TARGET * 100:.0f}% of step time and tokens/s >= "
        "plain's, for stratified and aioli (excl. eval) in every layout: "
        + ("**met**." if not misses else f"**missed**: {'; '.join(misses)}.")
    )
    markdown += "\n\n" + verdict
    results["targets"] = {
        "data_wait_frac_max": WAIT_TARGET,
        "ratio_vs_plain_min": 1.0,
        "met": not misses,
        "misses": misses,
    }
    publish(SECTION, markdown, quick=args.quick, write=not args.no_write,
            name="train_throughput", results=results)  # fmt: skip
    print(f"benchmark took {time.perf_counter() - began:.0f} s", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------
# Command line


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="tiny corpus, short runs")
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    parser.add_argument("--repeats", type=int, default=1, help="rounds (default 1)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of statistics")
    parser.add_argument(
        "--layouts",
        type=Layout.parse,
        nargs="+",
        default=None,
        help="R (one node of R ranks) or NxR (N simulated nodes of R ranks); "
        "default 1 2 4 2x2 on CPU, 1 and all GPUs on GPU",
    )
    parser.add_argument("--pipelines", nargs="+", choices=PIPELINES, default=list(PIPELINES))
    parser.add_argument("--batch", type=int, default=BATCH, help="per-device batch")
    parser.add_argument("--workers-single", type=int, default=2, help="workers with 1 rank")
    parser.add_argument("--workers-multi", type=int, default=1, help="workers per rank, >1 rank")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: auto)")
    parser.add_argument("--model", choices=sorted(MODELS), default=None)
    parser.add_argument("--device", choices=("cpu", "gpu"), default=None)
    parser.add_argument("--precision", default=None, help="default fp32 on CPU, amp_bf16 on GPU")
    parser.add_argument("--val-samples", type=int, default=VAL_SAMPLES)
    parser.add_argument("--bytes-per-group", type=int, default=None)
    parser.add_argument("--manifest", default=None, help="use this corpus instead of the demo")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--idle-timeout", type=float, default=0.0)
    parser.add_argument("--run-timeout", type=float, default=RUN_TIMEOUT_S)
    parser.add_argument("--retries", type=int, default=1)
    # one rank (what Composer's launcher or --node starts)
    parser.add_argument("--worker", action="store_true", help="train one pipeline on this rank")
    parser.add_argument("--pipeline", choices=PIPELINES, default="stratified")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (--worker)")
    parser.add_argument("--cache", default=None, help="node-local cache dir (--worker)")
    parser.add_argument("--out", default=None, help="write rank<N>.json here (--worker)")
    parser.add_argument("--aioli-update-steps", type=int, default=AIOLI["update_steps"])
    parser.add_argument("--aioli-lp-rounds", type=int, default=AIOLI["lp_rounds"])
    parser.add_argument("--aioli-lp-steps", type=int, default=AIOLI["lp_steps"])
    parser.add_argument("--node", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.node:
        return node_main(json.loads(args.node))
    args.steps = args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    args.warmup = args.warmup if args.warmup is not None else (
        QUICK_WARMUP if args.quick else DEFAULT_WARMUP
    )  # fmt: skip
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} leaves nothing after --warmup {args.warmup}")
    if args.device is None:
        args.device = "gpu" if _gpu_count() and not args.worker else "cpu"
    args.model = args.model or ("125m" if args.device == "gpu" else "tiny")
    if args.worker:
        if not args.manifest:
            parser.error("--worker needs --manifest")
        run_worker(args)
        return 0
    if args.layouts is None:
        if args.device == "gpu":
            gpus = _gpu_count()
            args.layouts = [Layout(1, 1)] + ([Layout(1, gpus)] if gpus > 1 else [])
        else:
            args.layouts = [Layout.parse(x) for x in (["1", "2x1"] if args.quick else
                                                      ["1", "2", "4", "2x2"])]  # fmt: skip
    args.bytes_per_group = args.bytes_per_group or (
        QUICK_BYTES_PER_GROUP if args.quick else DEFAULT_BYTES_PER_GROUP
    )
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
