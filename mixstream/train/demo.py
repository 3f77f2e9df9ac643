"""``make demo``: the main job end to end on embedded defaults (local SeaweedFS, CPU).

Starts a real S3 server on loopback, builds a multi-group corpus from text already on the
machine, trains a small BPE tokenizer on it, converts it into per-group MDS streams in S3
(inspect table, verify pass), then trains the small GPT of ```recipes/cpu-aioli.yaml`` with
Aioli streaming from S3 with live reweighting, and the same budget with ``Stratified``
(``recipes/cpu-stratified.yaml``), and prints their per-group test perplexities side by side.
Each run also draws its weights and per-group losses (``RUN_DIR/mixture.png``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mixstream.testing.s3server import S3Server
from mixstream.train.stats import avg_test_loss, paired, relative_sd
from shard_tools.demo_mixture import build_demo_mixture

DEFAULT_WORKDIR = Path("demo-out")
BUCKET = "mixstream"
RECIPES = Path(__file__).resolve().parents[2] / "recipes"
#: (label, recipe) of the demo's training runs, the anchor first
RUNS = (("stratified", "cpu-stratified.yaml"), ("aioli", "cpu-aioli.yaml"))
#: where ``benchmarks/quality.py`` records every run it made (the seed spread of a recipe)
QUALITY_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "quality.json"


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixstream.train.demo", description=__doc__)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--bytes-per-group", type=int, default=None)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument(
        "--no-train", dest="train", action="store_false", help="stop after the data is in S3"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override for both runs (e.g. max_duration=100ba)",
    )
    args = parser.parse_args(argv)

    from shard_tools import format_table, inspect_mixture, verify_mixture

    started = time.perf_counter()
    with S3Server(buckets=(BUCKET,)) as server, server.apply_env():
        _say(f"SeaweedFS S3 is up at {server.endpoint_url} ({server.startup_seconds:.1f} s)")
        root = f"s3://{BUCKET}/demo"
        build_demo_mixture(
            args.workdir,
            root,
            bytes_per_group=args.bytes_per_group,
            vocab_size=args.vocab_size,
            seq_len=args.seq_len,
        )
        _, rows = inspect_mixture(root)
        print(format_table(rows), flush=True)
        check = verify_mixture(root)
        _say(
            f"verify: {check.shards} shards, {check.samples:,} samples: "
            + ("OK" if check.ok else "; ".join(check.problems))
        )
        if not check.ok:
            return 1
        if args.train:
            results = {
                label: _train(label, recipe, args.workdir / "runs" / label, args.set)
                for label, recipe in RUNS
            }
            print(compare(results), flush=True)
            print(noise_band(results, QUALITY_RESULTS), flush=True)
            for label, _ in RUNS:
                _say(f"{label}: weights and losses in {args.workdir / 'runs' / label}/mixture.png")
    _say(f"done in {time.perf_counter() - started:.0f} s")
    return 0


def _train(label: str, recipe: str, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """One ``mixstream train`` run from scratch, its output streamed to the console."""
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo always trains from scratch
    _say(f"training with {label} ({RECIPES / recipe}) -> {run_dir}")
    cmd = [sys.executable, "-m", "mixstream", "train", str(RECIPES / recipe),
           f"run_dir={run_dir}", f"data.local={run_dir / 'cache'}", *overrides]  # fmt: skip
    subprocess.run(cmd, check=True)
    return json.loads((run_dir / "results.json").read_text())


def _perplexity(run: dict[str, Any], group: str) -> float:
    test = run["test"]
    entry = test["average"] if group == "average" else test["groups"][group]
    return float(entry["perplexity"])


def compare(results: dict[str, dict[str, Any]]) -> str:
    """Per-group test perplexity of each run, side by side, with the difference to the first."""
    labels = list(results)
    anchor = results[labels[0]]
    groups = list(anchor["test"]["groups"])
    header = f"{'group':<10}" + "".join(f"{label:>12}" for label in labels)
    header += "".join(f"{'d ' + label:>12}" for label in labels[1:])
    header += "".join(f"{'w ' + label:>10}" for label in labels[1:])
    lines = ["", "test perplexity (same data, model, seed and number of batches)", header]
    for g in [*groups, "average"]:
        ppl = {label: _perplexity(run, g) for label, run in results.items()}
        row = f"{g:<10}" + "".join(f"{ppl[label]:>12.2f}" for label in labels)
        row += "".join(f"{ppl[label] - ppl[labels[0]]:>+12.2f}" for label in labels[1:])
        for label in labels[1:]:
            w = results[label]["weights"].get("average", {}).get(g)
            row += f"{w:>10.3f}" if w is not None else f"{'':>10}"
        lines.append(row)
    lines.append(
        "(d: difference to " + labels[0] + ", negative is better; w: time-averaged weight)"
    )
    return "\n".join(lines)


def noise_band(results: dict[str, dict[str, Any]], recorded: Path) -> str:
    """The demo's difference next to the seed spread the quality benchmark measured for it.

    One seed of each method cannot separate them unless the difference is well outside how
    much the same comparison moves from seed to seed; the benchmark ran it over paired
    seeds (``benchmarks/results/quality.json``) for the same groups and number of batches.
    """
    labels = list(results)
    anchor, other = labels[0], labels[1]
    diff = avg_test_loss(results[other]) - avg_test_loss(results[anchor])
    groups = "+".join(results[anchor]["test"]["groups"])
    steps = results[anchor]["steps"]
    lines = [
        "",
        f"{other} - {anchor}, average test loss over groups: {diff:+.4f} nats/token "
        f"(this run: one seed each, the same seed for both)",
    ]
    try:
        runs = json.loads(recorded.read_text())["runs"]
    except (OSError, ValueError, KeyError, TypeError):
        runs = []
    by_seed: dict[str, dict[int, float]] = {anchor: {}, other: {}}
    for r in runs:
        if r.get("setting") == groups and r.get("steps") == steps and r.get("method") in by_seed:
            by_seed[r["method"]][int(r["seed"])] = float(r["avg_test_loss"])
    seeds = sorted(set(by_seed[anchor]) & set(by_seed[other]))
    if len(seeds) < 3:
        lines.append(
            f"no seed spread recorded for {groups} at {steps} batches in {recorded}: run "
            "`python -m benchmarks.quality` to measure it; until then this difference "
            "shows that the pipeline works, not which method is better"
        )
        return "\n".join(lines)
    d = paired(by_seed[other], by_seed[anchor])
    assert d is not None  # at least 3 shared seeds
    n, mean, sd, (lo, hi) = d.n, d.mean, d.sd, d.interval
    base = [by_seed[anchor][s] for s in seeds]
    base_sd = statistics.stdev(base)
    within = abs(diff) <= 2 * sd
    lines += [
        f"seed noise of this comparison ({n} paired seeds, {recorded.name}): the same "
        f"difference has sd {sd:.4f} from seed to seed (mean {mean:+.4f}, 95% interval "
        f"[{lo:+.4f}, {hi:+.4f}]); {anchor} alone moves by sd "
        f"{base_sd:.4f} ({100 * relative_sd(base):.2f}%)",
        (
            f"=> within noise: |{diff:+.4f}| <= 2 x {sd:.4f}; one seed cannot tell the methods "
            "apart. The benchmark's interval is the result to quote."
            if within
            else f"=> outside the seed noise (|{diff:+.4f}| > 2 x {sd:.4f}); the benchmark's "
            "interval above says how large the effect is across seeds."
        ),
        "What this shows: S3 streaming, live reweighting (see each run's mixture.png) and "
        "per-group evaluation, end to end. What it does not show: a method ranking at other "
        "scales; see benchmarks/RESULTS.md.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
