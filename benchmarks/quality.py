"""Mixing quality: Aioli, DoReMi and DGA vs Stratified, the Aioli paper protocol at CPU scale.

The Aioli paper (Chen et al. 2024, Table 2) trains 160M models on subsets of SlimPajama's
groups (2, 3 and all 7) and reports each method's average test perplexity over the groups
minus Stratified's, at the same token budget. Here: the demo corpus (4 groups of real text,
BPE 4096, 256-token sequences) streamed from a SeaweedFS S3 server on loopback; settings of
2, 3 and all 4 groups; every method trained with ``mixstream train`` from the CPU recipes
(``recipes/cpu-*.yaml``) for the same number of batches, with several seeds:

* ``stratified`` -- uniform (the anchor);
* ``aioli``      -- Aioli, rounds sized so a run has several (``--aioli-update-steps``);
* ``doremi``     -- DoReMi's 3-step pipeline: the Stratified run *is* the reference model
  (a run on the baseline mixture), a proxy run learns the weights (official objective:
  uniform sampling, loss reweighting), and the main run trains on their time average;
* ``dga``        -- DGA with the target set chosen as the held-out data of the group with
  the highest Stratified test loss (``--dga-target`` overrides);
* ``restricted`` (all-group setting) -- weights learned by Aioli on a short run (a quarter
  of the budget) are reused on the full run, as they are (``static-from-short``) and as the
  prior that Aioli then adjusts (``aioli-from-short``).

Each run is its own process (``python -m mixstream train``) with one torch thread; ``--jobs``
run side by side (the anchor and the methods of a seed run in the same window, so machine
noise hits them alike). The per-group test perplexity is computed on each group's whole
``test`` split. ``--gpu`` runs the GPU recipes (``recipes/gpu-125m-*.yaml``) instead.

Run from the repository root::

    .venv/bin/python -m benchmarks.quality                       # full run (CPU, ~1 h on 2 cores)
    .venv/bin/python -m benchmarks.quality --quick --no-write    # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks._common import REPO_ROOT, publish

SETTINGS = {
    "2 groups (legal/prose)": ["legal", "prose"],
    "3 groups (code/legal/prose)": ["code", "legal", "prose"],
    "all 4 groups": ["code", "docs", "legal", "prose"],
}
METHODS = ("stratified", "aioli", "doremi", "dga")
RECIPES = REPO_ROOT / "recipes"
BUCKET = "quality"


@dataclass
class Job:
    """One ``mixstream train`` run; ``after`` names the jobs whose outputs it reads."""

    name: str
    recipe: str
    overrides: list[str]
    run_dir: Path
    after: list[str] = field(default_factory=list)
    log: Path | None = None

    @property
    def results(self) -> Path:
        return self.run_dir / "results.json"


def _list(values: Sequence[str]) -> str:
    return "[" + ",".join(values) + "]"


def plan_jobs(args: argparse.Namespace, manifest: str, out: Path) -> list[Job]:
    """Every run of the benchmark, with its dependencies."""
    prefix = "gpu-125m" if args.gpu else "cpu"
    jobs: list[Job] = []

    def add(name: str, method: str, groups: Sequence[str], seed: int, steps: int,
            *extra: str, after: Sequence[str] = ()) -> Job:  # fmt: skip
        run_dir = out / "runs" / name
        overrides = [
            f"run_name={name.replace('/', '-')}",
            f"run_dir={run_dir}",
            f"seed={seed}",
            f"data.manifest={manifest}",
            f"data.groups={_list(groups)}",
            f"data.local={run_dir / 'cache'}",
            f"max_duration={steps}ba",
            f"save_interval={steps}ba",
            "save_num_checkpoints_to_keep=1",
            "autoresume=false",
            *args.override,
            *extra,
        ]
        job = Job(name, str(RECIPES / f"{prefix}-{method}.yaml"), overrides, run_dir, list(after))
        jobs.append(job)
        return job

    aioli = [f"algorithm.update_steps={args.aioli_update_steps}"]
    if args.aioli_lp_steps:
        aioli.append(f"algorithm.lp_steps={args.aioli_lp_steps}")
    if args.aioli_lp_rounds:
        aioli.append(f"algorithm.lp_rounds={args.aioli_lp_rounds}")
    for seed in range(args.seeds):
        for label, groups in args.settings.items():
            key = _slug(label)
            base = add(f"{key}/stratified/s{seed}", "stratified", groups, seed, args.steps)
            if "aioli" in args.methods:
                add(f"{key}/aioli/s{seed}", "aioli", groups, seed, args.steps, *aioli)
            if "doremi" in args.methods:
                ckpt = base.run_dir / "checkpoints" / "latest-rank0.pt"
                proxy = add(
                    f"{key}/doremi-proxy/s{seed}", "doremi-proxy", groups, seed, args.steps,
                    f"algorithm.reference_checkpoint={ckpt}", after=[base.name],
                )  # fmt: skip
                add(
                    f"{key}/doremi/s{seed}", "doremi-main", groups, seed, args.steps,
                    f"algorithm.weights_file={proxy.run_dir / 'weights.json'}",
                    after=[proxy.name],
                )  # fmt: skip
            if "dga" in args.methods:
                target = args.dga_target or "@worst"
                add(f"{key}/dga/s{seed}", "dga", groups, seed, args.steps,
                    f"algorithm.target={target}", f"algorithm.update_steps={args.dga_update_steps}",
                    f"algorithm.ema={args.dga_ema}", after=[base.name])  # fmt: skip
            if args.restricted and len(groups) == max(len(g) for g in args.settings.values()):
                short_steps = max(args.aioli_update_steps * 2, args.steps // 4)
                short = add(f"{key}/aioli-short/s{seed}", "aioli", groups, seed, short_steps,
                            *aioli)  # fmt: skip
                weights = short.run_dir / "weights.json"
                add(f"{key}/static-from-short/s{seed}", "doremi-main", groups, seed,
                    args.steps, f"algorithm.weights_file={weights}", "algorithm.use=final",
                    after=[short.name])  # fmt: skip
                add(f"{key}/aioli-from-short/s{seed}", "aioli", groups, seed, args.steps,
                    *aioli, f"algorithm.prior={weights}", after=[short.name])  # fmt: skip
    return jobs


def _slug(label: str) -> str:
    return label.split(" (")[0].replace(" ", "-")


def _resolve_target(job: Job, jobs: dict[str, Job]) -> list[str]:
    """``@worst``: the group with the highest test loss in the Stratified run it follows."""
    out = []
    for item in job.overrides:
        if item == "algorithm.target=@worst":
            base = json.loads(jobs[job.after[0]].results.read_text())
            losses = {g: r["loss"] for g, r in base["test"]["groups"].items()}
            item = f"algorithm.target={max(losses, key=losses.get)}"
        out.append(item)
    return out


def run_job(job: Job, jobs: dict[str, Job], env: dict[str, str]) -> float:
    """Run one job to completion; returns its wall-clock seconds (0: done by an earlier call).

    Runs that finished before (their ``results.json`` exists in ``--workdir``) are kept, so an
    interrupted benchmark continues where it stopped.
    """
    if job.results.exists():
        return 0.0
    shutil.rmtree(job.run_dir, ignore_errors=True)  # a run cut short starts over
    job.run_dir.mkdir(parents=True, exist_ok=True)
    job.log = job.run_dir / "train.log"
    cmd = [sys.executable, "-m", "mixstream", "train", job.recipe, *_resolve_target(job, jobs)]
    started = time.perf_counter()
    with open(job.log, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0:
        tail = job.log.read_text()[-3000:]
        raise RuntimeError(f"{job.name} failed ({proc.returncode}):\n{tail}")
    return time.perf_counter() - started


def run_all(jobs: list[Job], parallel: int, env: dict[str, str]) -> dict[str, float]:
    """Run jobs respecting ``after``, ``parallel`` at a time, in the listed order."""
    by_name = {j.name: j for j in jobs}
    pending = list(jobs)
    done: dict[str, float] = {}
    running: dict[Future, Job] = {}
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        while pending or running:
            for job in list(pending):
                if len(running) >= parallel:
                    break
                if all(d in done for d in job.after):
                    pending.remove(job)
                    running[pool.submit(run_job, job, by_name, env)] = job
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                done[job.name] = future.result()
                print(f"[quality] {len(done)}/{len(jobs)} {job.name}: "
                      f"{done[job.name]:.0f} s", flush=True)  # fmt: skip
    return done


# --------------------------------------------------------------------------- report
def _avg_ppl(results: dict[str, Any]) -> float:
    """Average over groups of the test perplexity (the paper's metric)."""
    groups = results["test"]["groups"]
    return statistics.fmean(math.exp(r["loss"]) for r in groups.values())


def _mean_sd(values: Sequence[float]) -> str:
    if not values:
        return "--"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):+.2f} ± {sd:.2f}"


def report(jobs: list[Job], args: argparse.Namespace, seconds: dict[str, float]) -> str:
    table: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for job in jobs:
        key, method, seed = job.name.split("/")
        if method in ("doremi-proxy", "aioli-short"):
            continue
        table.setdefault((key, method), {})[int(seed[1:])] = json.loads(job.results.read_text())
    settings = [_slug(label) for label in args.settings]
    methods = [m for m in (*METHODS, "static-from-short", "aioli-from-short")
               if any((s, m) in table for s in settings)]  # fmt: skip
    lines = [
        f"{args.seeds} seeds x {args.steps} batches of {args.batch} x 256 tokens per run "
        f"({args.steps * args.batch * 256 / 1e6:.2f}M tokens); model: {args.model_desc}. "
        "Cells: average over groups of the test perplexity minus Stratified's, mean ± sd "
        "over seeds (negative = better than Stratified); `wins` = seeds where the method beat "
        "Stratified. Anchor row: Stratified's average test perplexity.",
        "",
        "| method | " + " | ".join(settings) + " |",
        "|---" * (len(settings) + 1) + "|",
    ]
    anchor = []
    for s in settings:
        vals = [_avg_ppl(r) for r in table.get((s, "stratified"), {}).values()]
        anchor.append(f"{statistics.fmean(vals):.2f}" if vals else "--")
    lines.append("| stratified (avg ppl) | " + " | ".join(anchor) + " |")
    for m in methods:
        if m == "stratified":
            continue
        cells = []
        for s in settings:
            runs, base = table.get((s, m), {}), table.get((s, "stratified"), {})
            deltas = [_avg_ppl(runs[k]) - _avg_ppl(base[k]) for k in runs if k in base]
            wins = sum(d < 0 for d in deltas)
            cells.append(f"{_mean_sd(deltas)} (wins {wins}/{len(deltas)})" if deltas else "--")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Per-group test perplexity (mean over seeds) and learned weights:", ""]
    for s in settings:
        groups = args.settings[next(lab for lab in args.settings if _slug(lab) == s)]
        lines.append(f"| {s} | " + " | ".join(groups) + " | weights (average) |")
        lines.append("|---" * (len(groups) + 2) + "|")
        for m in methods:
            runs = table.get((s, m), {})
            if not runs:
                continue
            ppl = [statistics.fmean(math.exp(r["test"]["groups"][g]["loss"]) for r in runs.values())
                   for g in groups]  # fmt: skip
            w = [statistics.fmean(r["weights"].get("average", {}).get(g, float("nan"))
                                  for r in runs.values()) for g in groups]  # fmt: skip
            lines.append(f"| {m} | " + " | ".join(f"{p:.2f}" for p in ppl) + " | "
                         + " / ".join(f"{x:.2f}" for x in w) + " |")  # fmt: skip
        lines.append("")
    total = sum(seconds.values())
    lines.append(
        f"{len(seconds)} runs ({total / 60:.0f} job-minutes in this invocation, {args.jobs} at a "
        "time, one torch thread each)."
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300, help="batches per run")
    parser.add_argument("--batch", type=int, default=16, help="global batch size")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--settings", default="all", help="comma list of 2,3,4 or 'all'")
    parser.add_argument("--aioli-update-steps", type=int, default=60)
    parser.add_argument("--aioli-lp-steps", type=int, default=None)
    parser.add_argument("--aioli-lp-rounds", type=int, default=1)
    parser.add_argument("--dga-target", default=None)
    parser.add_argument("--dga-update-steps", type=int, default=10)
    parser.add_argument("--dga-ema", type=float, default=0.5)
    parser.add_argument("--no-restricted", dest="restricted", action="store_false")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side")
    parser.add_argument("--gpu", action="store_true", help="use the GPU (125M) recipes")
    parser.add_argument("--override", action="append", default=[], help="recipe key=value")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 settings, 40 steps")
    parser.add_argument("--no-write", dest="write", action="store_false")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.aioli_update_steps = 1, 40, 20
        args.settings = "2,4"
    wanted = {"2", "3", "4"} if args.settings == "all" else set(args.settings.split(","))
    args.settings = {k: v for k, v in SETTINGS.items() if str(len(v)) in wanted}
    args.methods = [m for m in args.methods.split(",") if m]
    args.override = [f"data.global_batch_size={args.batch}", *args.override]
    args.model_desc = "recipe default" if not args.override[1:] else " ".join(args.override[1:])

    from mixstream.demo import build_demo_mixture
    from mixstream.testing.s3server import S3Server

    out = args.workdir or Path(tempfile.mkdtemp(prefix="mixstream-quality-"))
    with S3Server(buckets=(BUCKET,)) as server, server.apply_env():
        manifest = f"s3://{BUCKET}/corpus/mixture.json"
        build_demo_mixture(out / "data", f"s3://{BUCKET}/corpus", say=lambda m: None)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        jobs = plan_jobs(args, manifest, out)
        print(f"[quality] {len(jobs)} runs into {out}", flush=True)
        seconds = run_all(jobs, args.jobs, env)
    markdown = report(jobs, args, seconds)
    publish("Mixing quality (Aioli paper protocol, CPU scale)", markdown,
            quick=args.quick, write=args.write)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
