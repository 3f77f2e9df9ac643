"""Algorithm overhead: wall-clock per training step of each mixing method vs ``Stratified``.

Same recipe family (``recipes/cpu-*.yaml``: the small GPT on the demo corpus, streamed from a
SeaweedFS S3 server on loopback), same seed, same number of batches; only the algorithm
differs. Every cell is a fresh process (``mixstream.train.train`` with a step-timing
callback); the cells are interleaved round after round and medians are reported, with each
method's ratio to ``Stratified`` from the same round. A method's own evaluation time (the
validation passes Aioli's LearnParams needs) is measured inside the algorithm
(``MixingAlgorithm.eval_seconds``) and reported separately; DoReMi's reference forward and
DGA's gradient probes are part of its steps.

The number of batches covers Aioli's warm-up and one full round at the recipe's settings,
so the ratio includes LearnParams' evaluations at their real frequency. ODM and ADO learn
from the training forward pass alone: their ratio should be 1 within the round-to-round
spread, which the table shows next to each median.

Run from the repository root::

    .venv/bin/python -m benchmarks.algorithm_overhead                    # full run
    .venv/bin/python -m benchmarks.algorithm_overhead --quick --no-write # smoke test
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import REPO_ROOT, LoadMeter, median, publish

METHODS = ("stratified", "aioli", "doremi", "dga", "odm", "ado", "skillit", "doge")
RECIPES = {m: REPO_ROOT / "recipes" / f"cpu-{m}.yaml" for m in METHODS}
RECIPES["doremi"] = REPO_ROOT / "recipes" / "cpu-doremi-proxy.yaml"
RECIPES["doge"] = REPO_ROOT / "recipes" / "cpu-doge-proxy.yaml"  # the run that does the work
BUCKET = "overhead"
WARMUP = 5


def _cell(args: argparse.Namespace) -> dict[str, Any]:
    """One training run in this process; returns its timings."""
    import torch
    from composer import Callback, Event, State
    from composer.loggers import Logger

    from mixstream.train.recipe import resolve_recipe
    from mixstream.train.run import train

    torch.set_num_threads(args.threads)

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.eval_seconds = 0.0

        def run_event(self, event: Event, state: State, logger: Logger) -> None:
            if event in (Event.FIT_START, Event.BATCH_END):
                self.ends.append(time.perf_counter())
            elif event == Event.FIT_END:
                self.eval_seconds = sum(getattr(a, "eval_seconds", 0.0) for a in state.algorithms)

    timer = StepTimer()
    recipe = resolve_recipe(RECIPES[args.cell], args.set)
    started = time.perf_counter()
    train(recipe, callbacks=[timer], stream=open(os.devnull, "w"))  # noqa: SIM115
    total = time.perf_counter() - started
    steps = [b - a for a, b in zip(timer.ends, timer.ends[1:], strict=False)][WARMUP:]
    return {
        "method": args.cell,
        "step_median": median(steps),
        "step_mean": statistics.fmean(steps),
        "steps": len(steps),
        "fit_seconds": sum(steps),
        "eval_seconds": timer.eval_seconds,
        "total": total,
    }


def _child(method: str, overrides: list[str], threads: int, env: dict[str, str]) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.algorithm_overhead", "--cell", method,
           "--threads", str(threads)] + [f"--set={o}" for o in overrides]  # fmt: skip
    meter = LoadMeter()
    meter.start()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False,
                          cwd=REPO_ROOT, start_new_session=True)  # fmt: skip
    load = meter.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load"] = load
    return result


def summarize(methods: list[str], results: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """One row of the table per method: medians over rounds, ratios to Stratified's round."""
    base = results.get("stratified") or results[methods[0]]
    cells = []
    for m in methods:
        rows = results[m]
        ratios = [row["step_mean"] / b["step_mean"] for row, b in zip(rows, base, strict=True)]
        spread = [b["step_mean"] / a["step_mean"] for a, b in itertools.pairwise(base)]
        loads = [row["load"] for row in rows if row["load"] is not None]
        cells.append(
            {
                "method": m,
                "median_step_ms": median([row["step_median"] for row in rows]) * 1e3,
                "mean_step_ms": median([row["step_mean"] for row in rows]) * 1e3,
                "ratio_vs_stratified": median(ratios),
                "ratios_by_round": ratios,
                "stratified_round_to_round": spread,
                "eval_s_per_run": median([row["eval_seconds"] for row in rows]),
                "eval_share": median([row["eval_seconds"] / row["fit_seconds"] for row in rows]),
                "others_cores": max(loads) if loads else None,
            }
        )
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None,
                        help="batches per run (default: Aioli's warm-up, a round, 20)")  # fmt: skip
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", dest="write", action="store_false")
    parser.add_argument("--cell", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cell:
        print(json.dumps(_cell(args)))
        return 0

    from mixstream.algorithms import AioliConfig
    from mixstream.testing.s3server import S3Server
    from mixstream.train.recipe import load_recipe
    from shard_tools.demo_mixture import build_demo_mixture

    methods = [m for m in args.methods.split(",") if m]
    aioli = load_recipe(RECIPES["aioli"])["algorithm"]
    groups = 4
    config = AioliConfig.defaults_for(groups, **{k: v for k, v in aioli.items() if k != "name"})
    steps = args.steps or config.round_start(1) + 20
    if args.quick:
        steps, args.rounds = 30, 1
    out = Path(tempfile.mkdtemp(prefix="mixstream-overhead-"))
    results: dict[str, list[dict]] = {m: [] for m in methods}
    with S3Server(buckets=(BUCKET,)) as server, server.apply_env():
        manifest = f"s3://{BUCKET}/corpus/mixture.json"
        build_demo_mixture(out / "data", f"s3://{BUCKET}/corpus", say=lambda m: None)
        env = dict(os.environ)
        common = [f"data.manifest={manifest}", f"max_duration={steps}ba", "autoresume=false",
                  f"save_interval={steps}ba", "save_num_checkpoints_to_keep=1"]  # fmt: skip
        reference = out / "reference"
        if "doremi" in methods:  # DoReMi needs a reference model: a short Stratified run
            _child("stratified", [*common, f"run_dir={reference}", "max_duration=20ba",
                                  "save_interval=20ba", f"data.local={reference}/cache"],
                   args.threads, env)  # fmt: skip
        for r in range(args.rounds):
            for m in methods:
                run_dir = out / f"{m}-{r}"
                extra = [f"run_dir={run_dir}", f"data.local={run_dir}/cache"]
                if m == "doremi":
                    extra.append(
                        f"algorithm.reference_checkpoint={reference}/checkpoints/latest-rank0.pt"
                    )
                res = _child(m, [*common, *extra], args.threads, env)
                results[m].append(res)
                print(f"[overhead] round {r} {m}: {res['step_median'] * 1e3:.0f} ms/step, "
                      f"eval {res['eval_seconds']:.1f} s", flush=True)  # fmt: skip
    lines = [
        f"CPU recipes (`recipes/cpu-*.yaml`), {steps} batches per run (Aioli's warm-up is "
        f"{config.prior_steps} batches, then a round of {config.update_steps}: LearnParams "
        f"{config.lp_duration} of them, with "
        f"{config.lp_rounds * groups + 1} validation passes), {args.threads} torch threads, "
        f"{args.rounds} interleaved rounds, medians. Ratio: mean step time over the run "
        "(evaluations included) / Stratified's in the same round (each round's in brackets). "
        "Targets: Aioli <= 1.15x; ODM and ADO within the round-to-round spread of Stratified "
        "itself (the last line); Skill-It and DoGE at most Aioli's ratio. "
        "A measurement made before the first batch (Aioli's first, which also reads the "
        "held-out sequences) is outside the step times; the evaluation columns include it.",
        "",
        "| method | median step (ms) | mean step incl. evaluations (ms) | ratio vs Stratified "
        "(by round) | evaluation s per run | evaluation share | other load (cores) |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    cells = summarize(methods, results)
    for c in cells:
        others = c["others_cores"]
        lines.append(
            f"| {c['method']} | {c['median_step_ms']:.0f} | {c['mean_step_ms']:.0f} "
            f"| {c['ratio_vs_stratified']:.2f}x "
            f"({', '.join(f'{r:.2f}' for r in c['ratios_by_round'])}) | {c['eval_s_per_run']:.1f} "
            f"| {c['eval_share']:.1%} | {float('nan') if others is None else others:.2f} |"
        )
    spread = cells[0]["stratified_round_to_round"]
    if spread:
        lines += ["", "Stratified against itself, round r+1 / round r: "
                  + ", ".join(f"{r:.2f}" for r in spread) + "."]  # fmt: skip
    summary = {
        "settings": {
            "batches_per_run": steps,
            "aioli_round_batches": config.update_steps,
            "torch_threads": args.threads,
            "rounds": args.rounds,
        },
        "cells": cells,
        "targets": {"aioli_ratio_vs_stratified_max": 1.15},
    }
    publish("Algorithm overhead (CPU recipe)", "\n".join(lines), quick=args.quick,
            write=args.write, name="algorithm_overhead", results=summary)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
