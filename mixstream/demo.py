"""``make demo``: the main job end to end on embedded defaults (local SeaweedFS, CPU).

Starts a real S3 server on loopback, builds a multi-group corpus from text already on the
machine, trains a small BPE tokenizer on it, converts it into per-group MDS streams in S3
(inspect table, verify pass), then trains the small GPT of ``recipes/cpu-aioli.yaml`` with
Aioli streaming from S3 with live reweighting, and the same budget with ``Stratified``
(``recipes/cpu-stratified.yaml``), and prints their per-group test perplexities side by side.
Each run also draws its weights and per-group losses (``RUN_DIR/mixture.png``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mixstream.testing.s3server import S3Server

DEFAULT_WORKDIR = Path("demo-out")
BUCKET = "mixstream"
RECIPES = Path(__file__).resolve().parent.parent / "recipes"
#: (label, recipe) of the demo's training runs, the anchor first
RUNS = (("stratified", "cpu-stratified.yaml"), ("aioli", "cpu-aioli.yaml"))


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def build_demo_mixture(
    workdir: Path,
    root: str,
    *,
    bytes_per_group: int | None = None,
    vocab_size: int = 4096,
    seq_len: int = 256,
    say: Callable[[str], None] = _say,
) -> Any:
    """Demo corpus -> local BPE tokenizer -> per-group MDS streams under ``root``.

    ``root`` may be ``s3://``: the S3 environment must then be set (e.g. by
    ``S3Server.apply_env``). Returns the ``ConvertReport``. Shared by the demo and the
    benchmarks, so they all train on the same kind of data.
    """
    from shard_tools import ConvertOptions, InputSpec, convert
    from shard_tools.demo_corpus import DEFAULT_GROUP_BYTES, build_demo_corpus
    from shard_tools.tokenizer import train_bpe

    corpus_dir = Path(workdir) / "corpus"
    say(f"building the demo corpus from local text into {corpus_dir}/")
    groups = build_demo_corpus(corpus_dir, bytes_per_group or DEFAULT_GROUP_BYTES)
    for g in groups.values():
        say(f"  {g.name:>6}: {g.documents:5,} documents, {g.bytes / 1e6:4.1f} MB")

    tokenizer = Path(workdir) / "tokenizer.json"
    say(f"training a {vocab_size}-token byte-level BPE tokenizer -> {tokenizer}")
    texts = (
        json.loads(line)["text"]
        for g in groups.values()
        for line in Path(g.path).read_text(encoding="utf-8").splitlines()
    )
    train_bpe(texts, vocab_size, tokenizer)

    inputs = [InputSpec(str(g.path), group=g.name) for g in groups.values()]
    options = ConvertOptions(
        tokenizer=str(tokenizer),
        seq_len=seq_len,
        val_fraction=0.05,
        test_fraction=0.05,
        shard_size="1mb",
    )
    say(f"converting into {root} (one MDS stream per group and split)")
    report = convert(inputs, root, options)
    mb = report.input_bytes / 1e6
    say(f"converted {mb:.1f} MB in {report.seconds:.1f} s ({mb / report.seconds:.1f} MB/s)")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixstream.demo", description=__doc__)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--bytes-per-group", type=int, default=None)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256)
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


if __name__ == "__main__":
    sys.exit(main())
