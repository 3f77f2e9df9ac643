"""Throughput of ``shard_tools.convert`` with 1 and 2 processes against a plain MDSWriter loop.

The *anchor* is the script a user would write without shard-tools: read each group's JSONL,
``json.loads`` every line, pick the split with ``assign_split``, tokenize each document with
the same tokenizer, pack ``seq_len`` sequences with EOS between documents
(``SequencePacker``) and write them with one ``streaming.MDSWriter`` per group and split
(zstd, xxh64, the same shard size limit), all in one process.

Every measurement runs in a fresh Python process, so start-up and import costs count the
way they do for a user; the three variants are interleaved (anchor, 1 process, 2 processes,
repeated) and medians are reported. ``wall`` is the whole child process; ``in-call`` is
the anchor loop after its imports, or the ``convert()`` call.

Run from the repository root::

    .venv/bin/python -m benchmarks.convert_throughput            # full run, writes RESULTS.md
    .venv/bin/python -m benchmarks.convert_throughput --quick --no-write   # smoke test
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks._common import (
    REPO_ROOT,
    LoadMeter,
    median,
    publish,
    source_digest,
    stopwatch,
    wait_for_idle,
)

SEQ_LEN = 2048
BPE_VOCAB = 8192
DEFAULT_SIZE_MB = 64.0
QUICK_SIZE_MB = 4.0
PROFILE_MAX_MB = 40.0
HOLDOUT = 0.01
# A 1 MB group has too few documents for 1% of them to fill one 2048-token sequence.
QUICK_HOLDOUT = 0.05
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "shard-tools-bench"
SECTION = "convert throughput"
VARIANTS: tuple[tuple[str, int], ...] = (("anchor", 0), ("convert", 1), ("convert", 2))
RESULT_PREFIX = "BENCH-RESULT "
# Sources whose changes during a run invalidate it.
MEASURED_PACKAGES = ("shard_tools",)
# Other processes using more CPU than this during a run make the numbers suspect.
NOISY_CORES = 0.1
# Target: convert with 2 processes at least this many times the anchor's speed (wall).
TARGET = 1.7


def _label(kind: str, workers: int) -> str:
    if kind == "anchor":
        return "anchor: MDSWriter loop"
    return f"convert, {workers} process{'es' if workers > 1 else ''}"


# --------------------------------------------------------------------------------------------
# Corpus and tokenizer (cached in the work directory)


@dataclass(frozen=True)
class Corpus:
    """JSONL files, one per group, and their total size in bytes."""

    files: tuple[tuple[str, str], ...]  # (path, group)
    nbytes: int
    documents: int


def _base_corpus(workdir: Path) -> dict[str, Path]:
    """The demo corpus (real local text, about 2 MB per group), built once."""
    from shard_tools.demo_corpus import build_demo_corpus

    base = workdir / "base"
    stamp = base / "groups.json"
    if stamp.exists():
        return {g: base / f"{g}.jsonl" for g in json.loads(stamp.read_text())}
    print(f"building the demo corpus in {base} ...", file=sys.stderr, flush=True)
    groups = build_demo_corpus(base)
    stamp.write_text(json.dumps(list(groups)))
    return {name: g.path for name, g in groups.items()}


def prepare_corpus(workdir: Path, size_mb: float) -> Corpus:
    """``size_mb`` MB of JSONL split evenly over the demo groups.

    Each group's demo documents are repeated until the group has its share; copy ``k > 0``
    of a document gets a ``[copy k]`` prefix so that every document hashes differently
    (held-out assignment is by content hash, and duplicates would all land in one split).
    """
    base = _base_corpus(workdir)
    folder = workdir / f"corpus-{size_mb:g}mb"
    stamp = folder / "corpus.json"
    if not stamp.exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        target = int(size_mb * 1e6 / len(base))
        counts = {}
        for group, src in base.items():
            records = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines()]
            written, docs, copy = 0, 0, 0
            with open(folder / f"{group}.jsonl", "w", encoding="utf-8") as out:
                while written < target:
                    for record in records:
                        if copy:
                            record = {**record, "text": f"[copy {copy}] {record['text']}"}
                        line = json.dumps(record, ensure_ascii=False) + "\n"
                        out.write(line)
                        written += len(line.encode("utf-8"))
                        docs += 1
                        if written >= target:
                            break
                    copy += 1
            counts[group] = docs
        stamp.write_text(json.dumps(counts))
    counts = json.loads(stamp.read_text())
    files = tuple((str(folder / f"{g}.jsonl"), g) for g in counts)
    nbytes = sum(os.path.getsize(p) for p, _ in files)
    return Corpus(files, nbytes, sum(counts.values()))


def prepare_bpe(workdir: Path) -> Path:
    """A byte-level BPE (vocab 8192) trained on the demo corpus, built once."""
    from shard_tools.tokenizer import train_bpe

    path = workdir / f"bpe-{BPE_VOCAB}.json"
    if not path.exists():
        print(f"training a {BPE_VOCAB}-token BPE -> {path} ...", file=sys.stderr, flush=True)
        texts = (
            json.loads(line)["text"]
            for src in _base_corpus(workdir).values()
            for line in src.read_text(encoding="utf-8").splitlines()
        )
        train_bpe(texts, BPE_VOCAB, path)
    return path


# --------------------------------------------------------------------------------------------
# What runs in the child processes


def run_anchor(job: dict[str, Any]) -> dict[str, Any]:
    """The naive single-process conversion; returns counts (imports are already done)."""
    import numpy as np
    from streaming import MDSWriter

    from shard_tools.packing import SequencePacker, assign_split

    if job["tokenizer"] == "byte":
        eos_id = 256

        def encode(text: str) -> Any:
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    else:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(job["tokenizer"])
        eos_id = tok.token_to_id("<|endoftext|>")

        def encode(text: str) -> Any:
            return np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    seq_len, dtype = job["seq_len"], "uint16"
    columns = {"input_ids": f"ndarray:{dtype}:{seq_len}"}
    documents = tokens = samples = 0
    for path, group in job["inputs"]:
        writers: dict[str, Any] = {}
        packers: dict[str, SequencePacker] = {}
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                text = json.loads(line)["text"]
                if not text.strip():
                    continue
                split = assign_split(text, job["holdout"], job["holdout"])
                if split not in writers:
                    writers[split] = MDSWriter(
                        out=os.path.join(job["out"], group, split),
                        columns=columns,
                        compression="zstd",
                        hashes=["xxh64"],
                        size_limit=job["shard_size"],
                    )
                    packers[split] = SequencePacker(seq_len, eos_id, dtype)
                ids = encode(text)
                documents += 1
                tokens += len(ids) + 1
                for seq in packers[split].add(ids):
                    writers[split].write({"input_ids": seq})
                    samples += 1
        for writer in writers.values():
            writer.finish()
    return {"documents": documents, "tokens": tokens, "samples": samples}


def run_convert(job: dict[str, Any]) -> dict[str, Any]:
    """``shard_tools.convert`` through the Python API; returns counts from the manifest."""
    from shard_tools import ConvertOptions, InputSpec, convert

    options = ConvertOptions(
        tokenizer=job["tokenizer"],
        seq_len=job["seq_len"],
        val_fraction=job["holdout"],
        test_fraction=job["holdout"],
        workers=job["workers"],
        progress=False,
        overwrite=True,
    )
    inputs = [InputSpec(path, group=group) for path, group in job["inputs"]]
    report = convert(inputs, job["out"], options)
    splits = [s for g in report.manifest.groups.values() for s in g.splits.values()]
    samples = sum(s.samples for s in splits)
    return {
        "documents": sum(s.documents for s in splits),
        "tokens": samples * job["seq_len"] + report.dropped_tokens,
        "samples": samples,
        "report_seconds": report.seconds,
    }


def child_main(job: dict[str, Any]) -> None:
    """Run one job in this (fresh) process and print its result as one JSON line."""
    if job["kind"] == "startup":
        for module in ("streaming", "shard_tools"):
            importlib.import_module(module)
        print(RESULT_PREFIX + json.dumps({"call_s": 0.0}), flush=True)
        return
    if job["kind"] == "anchor":
        # A user's script imports these at the top, before any work.
        for module in ("streaming", "tokenizers"):
            importlib.import_module(module)
        func = run_anchor
    else:
        importlib.import_module("shard_tools")  # as the shard-tools CLI or a user's script does
        func = run_convert
    profiler = cProfile.Profile() if job.get("profile") else None
    with stopwatch() as sw:
        if profiler is not None:
            profiler.enable()
        result = func(job)
        if profiler is not None:
            profiler.disable()
    if profiler is not None:
        profiler.dump_stats(job["profile"])
    print(RESULT_PREFIX + json.dumps({**result, "call_s": sw.seconds}), flush=True)


# --------------------------------------------------------------------------------------------
# The parent: launching children and collecting numbers


@dataclass
class Measure:
    wall: list[float] = field(default_factory=list)
    call: list[float] = field(default_factory=list)
    others: list[float] = field(default_factory=list)  # CPU cores used by other processes
    counts: dict[str, int] = field(default_factory=dict)


def launch(job: dict[str, Any], idle_timeout: float = 0.0) -> tuple[float, dict[str, Any]]:
    """Run ``job`` in a fresh interpreter; returns (wall seconds, the child's result).

    Waits up to ``idle_timeout`` seconds for other processes to go quiet first; the CPU
    they used during the run is returned in the result as ``others`` (cores).
    """
    if "out" in job:
        shutil.rmtree(job["out"], ignore_errors=True)
    if idle_timeout > 0:
        wait_for_idle(timeout=idle_timeout)
    cmd = [sys.executable, "-m", "benchmarks.convert_throughput", "--child", json.dumps(job)]
    meter = LoadMeter()
    meter.start()
    with stopwatch() as sw:
        # A session of its own, so the load meter can tell its processes from others'.
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        stdout, _ = proc.communicate()
    others = meter.stop(session=proc.pid)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed ({proc.returncode}): {job}\n{stdout}")
    lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if not lines:
        raise SystemExit(f"benchmark child printed no result: {job}\n{stdout}")
    if "out" in job:
        shutil.rmtree(job["out"], ignore_errors=True)
    result = json.loads(lines[-1][len(RESULT_PREFIX) :])
    result["others"] = -1.0 if others is None else others
    return sw.seconds, result


def _job(
    kind: str, workers: int, tokenizer: str, corpus: Corpus, workdir: Path, holdout: float
) -> dict[str, Any]:
    from shard_tools.convert import DEFAULT_SHARD_SIZE

    return {
        "kind": kind,
        "workers": workers,
        "tokenizer": tokenizer,
        "inputs": [list(f) for f in corpus.files],
        "out": str(workdir / f"out-{kind}-{workers}"),
        "seq_len": SEQ_LEN,
        "holdout": holdout,
        "shard_size": DEFAULT_SHARD_SIZE,
    }


# --------------------------------------------------------------------------------------------
# Profiles


# (label, file suffix, function name substring); each entry's cumulative time is counted,
# so the entries are chosen not to contain each other.
_BREAKDOWN = (
    ("tokenizer encode (Rust)", "~", "of 'tokenizers.Tokenizer' objects"),
    ("json.loads", "json/__init__.py", "loads"),
    ("assign_split (xxh64 of text)", "shard_tools/packing.py", "assign_split"),
    ("SequencePacker.add", "shard_tools/packing.py", "add"),
    ("MDSWriter.write + finish", "streaming/base/format/base/writer.py", "write"),
    ("MDSWriter.write + finish", "streaming/base/format/base/writer.py", "finish"),
    ("imports (streaming: torch, transformers)", "<frozen importlib._bootstrap>", "_find_and_load"),
)


def _short(key: tuple[str, int, str]) -> str:
    file, line, func = key
    if file == "~":
        return func
    for marker in ("site-packages/", str(REPO_ROOT) + "/", "/lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{func} ({file}:{line})"


def profile_tables(path: str, top: int = 10) -> str:
    """Markdown: time per activity, then the top functions by own time."""
    stats = pstats.Stats(path)
    entries: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = stats.total_tt  # type: ignore[attr-defined]
    spent: dict[str, float] = {}
    for label, suffix, name in _BREAKDOWN:
        for (file, _, func), (_, _, _, ct, _) in entries.items():
            if file.endswith(suffix) and name in func and (suffix == "~" or func == name):
                spent[label] = spent.get(label, 0.0) + ct
    rest = total - sum(spent.values())
    lines = ["| activity | seconds | share |", "|---|---:|---:|"]
    for label, secs in [*sorted(spent.items(), key=lambda kv: -kv[1]), ("everything else", rest)]:
        lines.append(f"| {label} | {secs:.2f} | {secs / total:.0%} |")
    lines.append(f"| **total (profiled)** | **{total:.2f}** | |")
    lines += ["", "| function (top by own time) | calls | own s | cum s |", "|---|---:|---:|---:|"]
    ranked = sorted(entries.items(), key=lambda kv: -kv[1][2])[:top]
    for key, (_, nc, tt, ct, _) in ranked:
        name = _short(key).replace("|", "\\|")
        lines.append(f"| `{name}` | {nc} | {tt:.2f} | {ct:.2f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Report


def _fmt_reps(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def cell_numbers(
    measures: dict[tuple[str, str, int], Measure], tokenizers: Sequence[str], corpus: Corpus
) -> list[dict[str, Any]]:
    """The results table's numbers, one dict per (tokenizer, variant); medians over rounds."""
    mb = corpus.nbytes / 1e6
    cells = []
    for name in tokenizers:
        anchor = measures[(name, "anchor", 0)]
        a_wall, a_call = median(anchor.wall), median(anchor.call)
        tokens = anchor.counts["tokens"]
        for kind, workers in VARIANTS:
            m = measures[(name, kind, workers)]
            wall, call = median(m.wall), median(m.call)
            cells.append(
                {
                    "tokenizer": name,
                    "variant": _label(kind, workers),
                    "wall_s": wall,
                    "wall_s_each": list(m.wall),
                    "mb_per_s": mb / wall,
                    "mtokens_per_s": tokens / wall / 1e6,
                    "vs_anchor": a_wall / wall,
                    "in_call_s": call,
                    "in_call_mb_per_s": mb / call,
                    "vs_anchor_in_call": a_call / call,
                    "others_cores": max(m.others),
                }
            )
    return cells


def results_table(cells: Sequence[dict[str, Any]]) -> tuple[str, list[str]]:
    """The markdown table and one summary line per tokenizer (2 processes vs the anchor)."""
    rows = [
        "| tokenizer | variant | wall s (median) | wall s (each run) | MB/s | Mtokens/s "
        "| vs anchor | in-call s | in-call MB/s | vs anchor (in-call) | others' CPU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    summary = []
    for c in cells:
        rows.append(
            f"| {c['tokenizer']} | {c['variant']} | {c['wall_s']:.2f} "
            f"| {_fmt_reps(c['wall_s_each'])} | {c['mb_per_s']:.2f} | {c['mtokens_per_s']:.2f} "
            f"| {c['vs_anchor']:.2f}x | {c['in_call_s']:.2f} | {c['in_call_mb_per_s']:.2f} "
            f"| {c['vs_anchor_in_call']:.2f}x | {c['others_cores']:.2f} |"
        )
        if c["variant"] == _label("convert", 2):
            verdict = "meets" if c["vs_anchor"] >= TARGET else "misses"
            summary.append(
                f"- {c['tokenizer']}: 2 processes = **{c['vs_anchor']:.2f}x** the anchor end to "
                f"end ({c['vs_anchor_in_call']:.2f}x in-call); {verdict} the {TARGET:g}x target."
            )
    return "\n".join(rows), summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.convert_throughput",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--size-mb", type=float, default=None, help="corpus size (default 64)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 3)")
    parser.add_argument("--tokenizer", choices=["byte", "bpe", "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="tiny corpus, one round")
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    parser.add_argument("--no-profile", action="store_true", help="skip the cProfile runs")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="cached inputs")
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=60.0,
        help="before each run, wait up to this many seconds for other processes to go idle",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=3,
        help="run a measurement again (at most this often) when other processes disturbed it",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return 0

    size_mb = args.size_mb or (QUICK_SIZE_MB if args.quick else DEFAULT_SIZE_MB)
    repeats = args.repeats or (1 if args.quick else 3)
    holdout = QUICK_HOLDOUT if args.quick else HOLDOUT
    names = ["byte", "bpe"] if args.tokenizer == "both" else [args.tokenizer]
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    code = source_digest(*MEASURED_PACKAGES)

    corpus = prepare_corpus(workdir, size_mb)
    tokenizer_paths = {"byte": "byte"}
    if "bpe" in names:
        tokenizer_paths["bpe"] = str(prepare_bpe(workdir))
    print(
        f"corpus: {corpus.nbytes / 1e6:.1f} MB, {corpus.documents:,} documents in "
        f"{len(corpus.files)} groups; {repeats} rounds of {', '.join(names)}",
        file=sys.stderr,
        flush=True,
    )

    idle = args.idle_timeout
    launch({"kind": "startup"})  # warm the page cache for torch & co.; not counted
    startup: list[float] = []
    measures: dict[tuple[str, str, int], Measure] = {}
    for rnd in range(repeats):
        startup.append(launch({"kind": "startup"}, idle)[0])
        for name in names:
            for kind, workers in VARIANTS:
                job = _job(kind, workers, tokenizer_paths[name], corpus, workdir, holdout)
                for attempt in range(args.retries + 1):
                    wall, result = launch(job, idle)
                    if result["others"] <= NOISY_CORES or attempt == args.retries:
                        break
                    print(
                        f"  other processes used {result['others']:.2f} cores; running again",
                        file=sys.stderr,
                        flush=True,
                    )
                m = measures.setdefault((name, kind, workers), Measure())
                m.wall.append(wall)
                m.call.append(result["call_s"])
                m.others.append(result["others"])
                counts = {k: result[k] for k in ("documents", "tokens")}
                if m.counts and m.counts != counts:
                    raise SystemExit(f"{name} {kind} {workers}: counts changed {counts}")
                m.counts = counts
                print(
                    f"round {rnd + 1}/{repeats} {name:>4} {_label(kind, workers):<24} "
                    f"wall {wall:6.2f} s  in-call {result['call_s']:6.2f} s  "
                    f"({corpus.nbytes / 1e6 / wall:5.2f} MB/s), "
                    f"others used {result['others']:.2f} cores",
                    file=sys.stderr,
                    flush=True,
                )

    problems = []
    for name in names:
        want = measures[(name, "anchor", 0)].counts
        for workers in (1, 2):
            got = measures[(name, "convert", workers)].counts
            if got != want:
                problems.append(f"{name}: convert {workers}p counted {got}, anchor {want}")

    if source_digest(*MEASURED_PACKAGES) != code:
        problems.append(
            f"{' or '.join(MEASURED_PACKAGES)} changed during the run; the rounds measured "
            "different code"
        )

    profiles: dict[str, str] = {}
    if not args.no_profile:
        prof_corpus = prepare_corpus(workdir, min(size_mb, PROFILE_MAX_MB))
        name = "bpe" if "bpe" in names else names[0]
        for kind, workers in VARIANTS[:2]:
            job = _job(kind, workers, tokenizer_paths[name], prof_corpus, workdir, holdout)
            job["profile"] = str(workdir / f"profile-{kind}-{workers}.pstats")
            wall, _ = launch(job, idle)
            print(f"profiled {kind} {workers}: {wall:.1f} s", file=sys.stderr, flush=True)
            profiles[f"{_label(kind, workers)} ({name})"] = profile_tables(job["profile"])
        prof_mb = prof_corpus.nbytes / 1e6

    from shard_tools.convert import DEFAULT_SHARD_SIZE as shard_size

    cells = cell_numbers(measures, names, corpus)
    table, summary = results_table(cells)
    tokens = {n: measures[(n, "anchor", 0)].counts["tokens"] for n in names}
    body = [
        f"Corpus: {corpus.nbytes / 1e6:.1f} MB of JSONL ({corpus.documents:,} documents, "
        f"{len(corpus.files)} groups: {', '.join(g for _, g in corpus.files)}), the demo "
        "corpus (`shard_tools.demo_corpus`, real local text) repeated with a per-copy prefix. "
        + "; ".join(
            f"{n}: {tokens[n] / 1e6:.1f} M tokens ({corpus.nbytes / tokens[n]:.2f} B/token)"
            for n in names
        )
        + f". seq_len {SEQ_LEN}, uint16, zstd + xxh64, shard limit {shard_size}, val = test = "
        f"{holdout:g}, default chunk size. BPE: byte-level, vocab {BPE_VOCAB}, trained on the "
        "demo corpus with `shard_tools.train_bpe`.",
        "",
        "Each run is a fresh Python process; runs are interleaved (anchor, 1 process, "
        f"2 processes) for {repeats} rounds. **wall** = the whole process (interpreter, "
        "imports, work), as a user running a script or the CLI sees it; **in-call** = the "
        "anchor loop after its imports, or the `convert()` call (which imports `streaming` "
        "itself); **others' CPU** = cores used by other processes during the run (max over "
        "runs; ~0 on an idle machine). MB = 10^6 bytes of JSONL input. Python start-up "
        f"plus `import streaming, shard_tools` alone takes {median(startup):.2f} s (median).",
        "",
        table,
        "",
        *summary,
    ]
    if problems:
        body += ["", "**Invalid run:** " + "; ".join(problems)]
    busiest = max(max(m.others) for m in measures.values())
    if busiest > NOISY_CORES:
        body += [
            "",
            f"**Noisy:** other processes used up to {busiest:.2f} cores during a run "
            '(column "others\' CPU", max over runs); re-run on an idle machine.',
        ]
    for title, text in profiles.items():
        body += ["", f"### cProfile: {title}, {prof_mb:.0f} MB corpus, in-call", "", text]
    markdown = "\n".join(body)
    results = {
        "corpus": {"mb": corpus.nbytes / 1e6, "documents": corpus.documents, "tokens": tokens},
        "rounds": repeats,
        "startup_s": median(startup),
        "cells": cells,
        "targets": {"convert_2_processes_vs_anchor_min": TARGET},
        "problems": problems,
    }
    publish(SECTION, markdown, quick=args.quick, write=not args.no_write,
            name="convert_throughput", results=results)  # fmt: skip
    print(f"benchmark took {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
