"""Soak: concurrent training-shaped readers over one flaky S3, killed and resumed, exactly.

Several readers (separate processes, each a ``DynamicStreamingDataset`` with DataLoader
workers, a small ``cache_limit`` so shards are evicted and fetched again all run long, and a
weight change every few steps) read one SeaweedFS server through a
:class:`~mixstream.testing.faultproxy.FaultProxy` that keeps injecting connection resets,
``503 SlowDown`` bursts and black holes, plus one real outage (the server stopped for ~8 s
and restarted on the same port and data). Every ``--kill-every`` seconds the first reader is
SIGKILLed (with its workers) and restarted from its last checkpoint, as an autoresuming
trainer would be. At the end each reader's delivered sequence (for every step, the batch
delivered last: steps redone after a resume replace the killed run's) is compared with an
undisturbed reference read of the local corpus: duplicated and skipped samples must be 0.

Run from the repository root::

    .venv/bin/python -m benchmarks.soak                 # the recorded run (--minutes 3)
    .venv/bin/python -m benchmarks.soak --minutes 15    # a longer soak
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import REPO_ROOT, publish

SECTION = "soak"
BATCH = 8
CHANGE_EVERY = 7  # steps between weight changes
UPDATE_LAG = 8  # global batches until a change applies: covers up to 3 workers x prefetch 2
SAVE_EVERY = 10  # steps between checkpoints
OUTAGE_S = 8.0
CORPUS_SAMPLES = 3072  # of 2048 tokens: 12 shards of 1 MiB
CACHE_LIMIT = "8mb"  # under half the corpus (raw + zip): shards are evicted and fetched again
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "mixstream-soak"


def _weights(step: int) -> list[float]:
    """The weights a reader sets at ``step``: a pure function, so a resumed run redoes them."""
    rng = random.Random(step)
    raw = [rng.random() + 0.05 for _ in range(3)]
    return [w / sum(raw) for w in raw]


def reader_main(job: dict[str, Any]) -> None:
    """One reader: read until ``stop`` exists, recording each step; resume from ``state``."""
    import xxhash
    from torch.utils.data import DataLoader

    from mixstream import DynamicStreamingDataset

    ds = DynamicStreamingDataset(
        manifest=job["manifest"],
        batch_size=BATCH,
        num_workers=job["workers"],
        update_lag=UPDATE_LAG,  # fixed: the reference reads with another worker count
        seed=job["seed"],
        local=job["cache"],
        cache_limit=job.get("cache_limit"),
        download_retry_seconds=job.get("retry_seconds", 300),
    )
    step = in_epoch = 0
    state_path = Path(job["state"])
    if state_path.exists():
        saved = json.loads(state_path.read_text())
        ds.load_state_dict(saved["state"])
        step, in_epoch = saved["step"], saved["state"]["sample_in_epoch"]
    loader = DataLoader(ds, batch_size=BATCH, num_workers=job["workers"])
    with open(job["record"], "a") as out:
        while not os.path.exists(job["stop"]) and step < job["max_steps"]:
            for batch in loader:
                step += 1
                in_epoch += BATCH
                prints = [xxhash.xxh64_intdigest(r.numpy().tobytes()) for r in batch["input_ids"]]
                out.write(json.dumps([step, prints]) + "\n")
                out.flush()
                if step % CHANGE_EVERY == 0:
                    ds.set_weights(_weights(step), step=step)
                if step % SAVE_EVERY == 0:
                    tmp = state_path.with_suffix(".tmp")
                    tmp.write_text(
                        json.dumps({"step": step, "state": ds.state_dict(in_epoch, True)})
                    )
                    os.replace(tmp, state_path)
                time.sleep(job.get("step_s", 0.0))  # the training step
                if os.path.exists(job["stop"]) or step >= job["max_steps"]:
                    break
            else:
                in_epoch = 0
    ds.close()


class Reader:
    """A reader process (own process group, so a kill takes its DataLoader workers too)."""

    def __init__(self, job: dict[str, Any], env: dict[str, str], log: Path) -> None:
        self.job, self.env, self.log, self.kills = job, env, log, 0
        self.started_at = 0  # record lines when last (re)started
        self.proc: subprocess.Popen[bytes] | None = None

    def delivered_steps(self) -> int:
        """Lines in the record so far (a cheap progress count)."""
        try:
            with open(self.job["record"], "rb") as f:
                return sum(1 for _ in f)
        except FileNotFoundError:
            return 0

    def start(self) -> None:
        self.started_at = self.delivered_steps()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.soak", "--reader", json.dumps(self.job)],
                cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def kill_and_resume(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.kills += 1
        self.start()


def delivered(record: Path) -> list[list[int]]:
    """Each step's batch as last delivered (steps redone after a resume replace earlier)."""
    steps: dict[int, list[int]] = {}
    for line in record.read_text().splitlines():
        try:
            step, prints = json.loads(line)
        except ValueError:
            continue  # a line torn by SIGKILL
        steps[step] = prints
    last = max(steps, default=0)
    return [steps.get(s, []) for s in range(1, last + 1)]


def _check(readers: list[Reader]) -> None:
    for r in readers:
        if r.proc is not None and r.proc.poll() not in (None, 0):
            raise SystemExit(f"a reader failed; see {r.log}:\n{r.log.read_text()[-3000:]}")


def faults(
    proxy: Any, server: Any, stop: threading.Event, outage_at: float, tally: Counter
) -> None:
    """Inject a random fault every few seconds; stop the server once at ``outage_at``."""
    rng = random.Random(0)
    while not stop.wait(rng.uniform(3, 6)):
        if outage_at and time.monotonic() >= outage_at:
            outage_at = 0
            server.halt()
            time.sleep(OUTAGE_S)
            server.resume()
            tally["outages"] += 1
            continue
        kind, rate, seconds = rng.choice(
            [("reset", 0.5, 3.0), ("slowdown", 0.6, 4.0), ("dark", 1.0, 2.0)]
        )
        proxy.inject(kind, seconds=seconds, rate=rate, retry_after=0.5)
        tally[f"{kind} bursts"] += 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=3.0, help="soak length")
    parser.add_argument("--readers", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per reader")
    parser.add_argument("--kill-every", type=float, default=30.0, help="seconds between kills")
    parser.add_argument("--step-ms", type=float, default=20.0, help="simulated training step")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    parser.add_argument("--reader", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reader:
        reader_main(json.loads(args.reader))
        return 0
    from benchmarks.loader_throughput import prepare_corpus
    from mixstream import storage
    from mixstream.testing.faultproxy import FaultProxy
    from mixstream.testing.s3server import S3Server

    run = args.workdir.resolve() / f"run-{uuid.uuid4().hex[:8]}"
    run.mkdir(parents=True)
    corpus = prepare_corpus(args.workdir.resolve(), CORPUS_SAMPLES, 1)  # 12 shards of 1 MiB
    tally: Counter[str] = Counter()
    with S3Server(data_dir=run / "s3") as server, FaultProxy(server.endpoint_url, seed=0) as proxy:
        with server.apply_env():
            storage.upload_tree(corpus, "s3://mixstream/soak")
        env = {**server.subprocess_env(), "S3_ENDPOINT_URL": proxy.url}
        readers = []
        for i in range(args.readers):
            job = {
                "manifest": "s3://mixstream/soak",
                "workers": args.workers,
                "seed": 100 + i,
                "cache": str(run / f"cache{i}"),
                "cache_limit": CACHE_LIMIT,
                "state": str(run / f"state{i}.json"),
                "record": str(run / f"record{i}.jsonl"),
                "stop": str(run / "stop"),
                "step_s": args.step_ms / 1e3,
                "max_steps": 10**9,
            }
            readers.append(Reader(job, env, run / f"reader{i}.log"))
            readers[-1].start()
        # The clock starts once every reader delivers (interpreter start-up and the first
        # shards can take minutes on a loaded machine).
        while not all(r.delivered_steps() for r in readers):
            _check(readers)
            time.sleep(1)
        began = time.monotonic()
        deadline = began + args.minutes * 60
        stop = threading.Event()
        injector = threading.Thread(
            target=faults, args=(proxy, server, stop, began + args.minutes * 24, tally)
        )
        injector.start()
        # Reader 0 is killed once it has delivered for --kill-every seconds since it resumed.
        delivering_since: float | None = time.monotonic()
        try:
            while time.monotonic() < deadline:
                time.sleep(1)
                _check(readers)
                first = readers[0]
                if delivering_since is None and first.delivered_steps() > first.started_at:
                    delivering_since = time.monotonic()
                if delivering_since and time.monotonic() - delivering_since >= args.kill_every:
                    first.kill_and_resume()
                    delivering_since = None
        finally:
            stop.set()
            injector.join()
            (run / "stop").touch()
            for r in readers:
                assert r.proc is not None
                if r.proc.wait(timeout=600) != 0:
                    raise SystemExit(f"a reader failed; see {r.log}:\n{r.log.read_text()[-3000:]}")
        injected = dict(proxy.counts)
    soak_s = time.monotonic() - began
    rows, totals = [], Counter[str]()
    for i, r in enumerate(readers):
        got = delivered(Path(r.job["record"]))
        ref = {
            "manifest": str(corpus),
            "workers": 0,
            "cache": str(run / f"ref{i}"),
            "cache_limit": None,
            "state": str(run / f"ref{i}.json"),
            "record": str(run / f"ref{i}.jsonl"),
            "stop": str(run / "never"),
            "step_s": 0.0,
            "max_steps": len(got),
        }
        ref_job = {**r.job, **ref}
        reader_main(ref_job)
        want = delivered(Path(ref_job["record"]))
        flat_got = Counter(p for step in got for p in step)
        flat_want = Counter(p for step in want for p in step)
        dup, skip = sum((flat_got - flat_want).values()), sum((flat_want - flat_got).values())
        text = r.log.read_text()
        retried = text.count("retrying with backoff")
        samples = sum(len(s) for s in got)
        differing = sum(a != b for a, b in zip(got, want, strict=True))
        rows.append(
            {
                "reader": i,
                "steps": len(got),
                "samples": samples,
                "kills": r.kills,
                "files_retried": retried,
                "steps_differing": differing,
                "duplicated": dup,
                "skipped": skip,
            }
        )
        totals.update({k: v for k, v in rows[-1].items() if k != "reader"})
    shutil.rmtree(run, ignore_errors=True)
    table = [
        "| reader | steps | samples | SIGKILL + resume | files retried | steps differing "
        "| duplicated | skipped |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in [*rows, {"reader": "all", **totals}]:
        table.append("| " + " | ".join(str(row[k]) for k in rows[0]) + " |")
    faults_line = ", ".join(f"{v} {k}" for k, v in sorted(tally.items()))
    markdown = "\n".join([
        f"{args.readers} readers (batch {BATCH}, {args.workers} DataLoader worker(s) each, "
        f"`cache_limit='{CACHE_LIMIT}'` over 12 shards of 1 MiB so shards are evicted and fetched "
        f"again all run long, a weight change every {CHANGE_EVERY} steps, a checkpoint every "
        f"{SAVE_EVERY}, a {args.step_ms:g} ms training step) for {soak_s / 60:.1f} minutes "
        f"over one SeaweedFS through the fault proxy: {faults_line} (server stopped "
        f"{OUTAGE_S:g} s, restarted on the same port and data); reader 0 SIGKILLed with "
        f"its workers every {args.kill_every:g} s and resumed from its last checkpoint. "
        f"Connections injected: {injected}. Sequences compared with an undisturbed read of "
        "the local corpus (per step, the batch delivered last).",
        "", *table, "",
        "- Target: 0 duplicated, 0 skipped, every outage ridden out: **"
        + ("met" if totals["duplicated"] == totals["skipped"] == 0 else "missed") + "**.",
    ])  # fmt: skip
    results = {"minutes": soak_s / 60, "readers": rows, "totals": dict(totals),
               "faults": dict(tally), "connections": injected}  # fmt: skip
    publish(SECTION, markdown, quick=False, write=not args.no_write, name="soak", results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
