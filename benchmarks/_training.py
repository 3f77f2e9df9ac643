"""Harness shared by the benchmarks that train models (quality, Aioli's sweep ablations).

* :class:`Run`: one ``mixstream train`` process with its recipe overrides and the runs whose
  outputs it reads; :func:`run_all` runs them ``jobs`` at a time in dependency order, keeps
  the ones that finished in an earlier invocation (so a benchmark resumes where it stopped)
  and starts a run cut short over.
* :func:`corpus`: the manifest to train on: the user's (``--manifest``), or the demo corpus
  built locally and served from a SeaweedFS S3 server on loopback.
* Paired statistics (from :mod:`mixstream.train.stats`, shared with the demo): per-seed
  differences (method minus anchor, same seed = same init and data seed) as a mean, a 95%
  t-interval and wins.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks._common import REPO_ROOT
from mixstream.train.stats import (  # noqa: F401  (the benchmarks import them from here)
    Paired,
    avg_test_loss,
    avg_test_ppl,
    paired,
    relative_sd,
    t975,
)

RECIPES = REPO_ROOT / "recipes"
#: algorithm options counted in batches, scaled with a run's length (schedule_overrides)
BATCH_OPTIONS = {
    "odm": ("warmup_steps",),
    "ado": ("warmup_steps", "ignore_steps", "fit_interval"),
    "skillit": ("update_steps", "graph_steps"),
    "doge": ("update_steps",),
}
#: of those, the ones that must stay >= 1 however short the run
_AT_LEAST_ONE = ("fit_interval", "update_steps", "graph_steps")


# --------------------------------------------------------------------------- runs
@dataclass
class Run:
    """One ``mixstream train`` run; ``after`` names the runs whose outputs it reads."""

    name: str
    recipe: Path
    overrides: list[str]
    run_dir: Path
    after: list[str] = field(default_factory=list)
    #: called with the finished runs by name just before this one starts: more overrides
    late_overrides: Callable[[dict[str, Run]], list[str]] | None = None
    #: a run that only feeds others (a DoReMi proxy, a restricted-setting prior), not reported
    feeds_only: bool = False

    @property
    def results_file(self) -> Path:
        return self.run_dir / "results.json"

    def results(self) -> dict[str, Any]:
        return json.loads(self.results_file.read_text())

    def weights(self) -> dict[str, Any]:
        """The run's ``weights.json`` (its method's mixture, settings and summary)."""
        return json.loads((self.run_dir / "weights.json").read_text())

    @property
    def sweep_share(self) -> float:
        """Share of the run's batches in Aioli's LearnParams sweeps (0 for other methods)."""
        return float(self.weights().get("aioli", {}).get("sweep_share", 0.0))

    def history(self, kind: str) -> list[dict[str, Any]]:
        """Rows of ``kind`` in the run's ``mixture_history.jsonl``."""
        path = self.run_dir / "mixture_history.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r for r in rows if r.get("kind") == kind]


def base_overrides(name: str, run_dir: Path, seed: int, manifest: str, groups: Sequence[str],
                   steps: int) -> list[str]:  # fmt: skip
    """What every benchmark run sets: its folder, seed, data, length; no autoresume."""
    return [
        f"run_name={name.replace('/', '-')}",
        f"run_dir={run_dir}",
        f"seed={seed}",
        f"data.manifest={manifest}",
        f"data.groups=[{','.join(groups)}]",
        f"data.local={run_dir / 'cache'}",
        f"max_duration={steps}ba",
        f"save_interval={steps}ba",
        "save_num_checkpoints_to_keep=1",
        "autoresume=false",
        "console_log_interval=100000ba",
    ]


def schedule_overrides(recipe: Path, steps: int) -> list[str]:
    """A method's batch-counted options in ``recipe`` (:data:`BATCH_OPTIONS`), scaled to a
    ``steps``-batch run.

    The recipes set them for their own length (1000 batches); a shorter benchmark run keeps
    the same proportions (a warm-up of 5% stays 5%), so the method still acts. ADO keeps at
    least 3 batches between ``ignore_steps`` and ``warmup_steps`` (its first fit needs them).
    """
    from mixstream.train.recipe import load_recipe, parse_duration

    config = load_recipe(recipe)
    algorithm = config["algorithm"]
    keys = [k for k in BATCH_OPTIONS.get(algorithm["name"], ()) if k in algorithm]
    duration = parse_duration(config["max_duration"], "max_duration")
    if not keys or duration.unit != "ba" or int(duration.value) == steps:
        return []
    factor = steps / duration.value
    values = {k: max(0, round(int(algorithm[k]) * factor)) for k in keys}
    for key in _AT_LEAST_ONE:
        if key in values:
            values[key] = max(1, values[key])
    if "ignore_steps" in values and "warmup_steps" in values:
        values["warmup_steps"] = max(values["warmup_steps"], values["ignore_steps"] + 3)
    return [f"algorithm.{k}={v}" for k, v in values.items()]


def _run_one(run: Run, done: dict[str, Run], env: dict[str, str]) -> bool:
    """Train ``run`` unless an earlier invocation finished it; True if it trained now."""
    if run.results_file.exists():
        return False
    shutil.rmtree(run.run_dir, ignore_errors=True)  # a run cut short starts over
    run.run_dir.mkdir(parents=True, exist_ok=True)
    extra = run.late_overrides(done) if run.late_overrides else []
    cmd = [sys.executable, "-m", "mixstream", "train", str(run.recipe), *run.overrides, *extra]
    log = run.run_dir / "train.log"
    with open(log, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{run.name} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    shutil.rmtree(run.run_dir / "cache", ignore_errors=True)
    return True


def _only_feeds_finished(run: Run, runs: Sequence[Run]) -> bool:
    """Whether ``run`` is unfinished, ``feeds_only``, and read only by runs that have
    finished (a DoReMi proxy, say, of a main run restored from an earlier report): no need
    to train it. A reported run is always trained, whoever reads it."""
    readers = [r for r in runs if run.name in r.after]
    return (
        run.feeds_only
        and bool(readers)
        and not run.results_file.exists()
        and all(r.results_file.exists() or _only_feeds_finished(r, runs) for r in readers)
    )


def run_all(runs: Sequence[Run], jobs: int, say: Callable[[str], None] = print) -> None:
    """Run ``runs`` respecting ``after``, ``jobs`` at a time, in the listed order.

    Each run is one process with one torch thread, so ``jobs`` = cores keeps them from
    contending; runs planned next to each other (a method and its anchor of the same seed)
    share the machine's state alike. A ``feeds_only`` run whose readers have all
    finished is skipped.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    by_name = {r.name: r for r in runs}
    unknown = {a for r in runs for a in r.after if a not in by_name}
    if unknown:
        raise ValueError(f"runs depend on runs that are not planned: {sorted(unknown)}")
    pending = [r for r in runs if not _only_feeds_finished(r, runs)]
    done: dict[str, Run] = {r.name: r for r in runs if r not in pending}
    running: dict[Future, Run] = {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        while pending or running:
            for run in list(pending):
                if len(running) >= jobs:
                    break
                if all(a in done for a in run.after):
                    pending.remove(run)
                    running[pool.submit(_run_one, run, dict(done), env)] = run
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                run = running.pop(future)
                trained = future.result()
                done[run.name] = run
                say(f"{len(done)}/{len(runs)} {run.name}" + ("" if trained else " (kept)"))


def add_report_only(parser: argparse.ArgumentParser) -> None:
    """``--report-only``: train nothing, report what ``--workdir`` holds (checked by
    :func:`check_report_only`)."""
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: report the runs --workdir already holds")  # fmt: skip


def check_report_only(args: argparse.Namespace) -> None:
    if args.report_only and args.workdir is None:
        raise SystemExit("--report-only needs the --workdir of an earlier invocation")


def partial_note(runs: Sequence[Run]) -> list[str]:
    """Report lines saying how many planned runs are missing (none when all finished); a
    ``feeds_only`` run that no unfinished run needs is not missing."""
    runs = [r for r in runs if not _only_feeds_finished(r, runs)]
    done = sum(r.results_file.exists() for r in runs)
    if done == len(runs):
        return []
    return [
        f"**Partial: {done} of the {len(runs)} planned runs have finished** (the same command "
        "continues the rest); cells count the seeds they hold.",
        "",
    ]


# --------------------------------------------------------------------------- corpus
@contextlib.contextmanager
def corpus(
    manifest: str | None,
    workdir: Path,
    *,
    vocab_size: int,
    seq_len: int,
    bucket: str = "bench",
    say: Callable[[str], None] = print,
) -> Iterator[str]:
    """The manifest to train on, with the S3 environment set while the block runs.

    A user's ``manifest`` (local path or ``s3://``, with their own S3 environment) is used as
    it is. Without one, the demo corpus is built under ``workdir`` (kept between
    invocations) with a BPE of ``vocab_size`` and ``seq_len``-token samples, and served
    from a SeaweedFS S3 server on loopback, so every run streams from S3.
    """
    if manifest is not None:
        yield manifest
        return
    from mixstream.testing.s3server import S3Server
    from shard_tools.demo_mixture import build_demo_mixture

    local = workdir / "corpus"
    if not (local / "mixture.json").exists():
        shutil.rmtree(local, ignore_errors=True)
        build_demo_mixture(workdir / "data", str(local), vocab_size=vocab_size,
                           seq_len=seq_len, say=say)  # fmt: skip
    with S3Server(buckets=(bucket,)) as server, server.apply_env():
        import boto3

        s3 = boto3.client("s3", endpoint_url=server.endpoint_url)
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            s3.upload_file(str(path), bucket, f"corpus/{path.relative_to(local)}")
        yield f"s3://{bucket}/corpus/mixture.json"


def unigram_entropy(manifest: str, split: str, groups: Sequence[str]) -> dict[str, float]:
    """Entropy (nats/token) of each group's unigram distribution on ``split``.

    The loss of a model that knows token frequencies and nothing else: a trained model's
    loss below it says how much context it has learned.
    """
    import numpy as np

    from mixstream.mixing.signals import GroupSamples

    samples = GroupSamples(manifest, split, groups, samples_per_group=None)
    out = {}
    for g, name in enumerate(groups):
        ids = np.concatenate([s["input_ids"].numpy().reshape(-1) for s in samples.samples[g]])
        p = np.bincount(ids.astype(np.int64)).astype(np.float64)
        p = p[p > 0] / p.sum()
        out[name] = float(-(p * np.log(p)).sum())
    return out
