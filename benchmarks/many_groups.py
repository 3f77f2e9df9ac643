"""Many groups: how the loader's costs grow with the number of groups m.

Per-domain or per-language mixtures have hundreds to thousands of groups. For each m (3,
100, 1,000 and 10,000 by default) one corpus of tiny samples (16 ``uint16`` tokens, so the
loader's own work dominates, not I/O), one uncompressed MDS stream of equal size per group,
is read by

- **ours**: ``DynamicStreamingDataset`` from the corpus's ``mixture.json``, with
  ``set_weights(random Dirichlet weights, step=step)`` after *every* batch and
  ``state_dict`` every ``STATE_EVERY`` batches (both timed and included in its rate);
- **plain**: ``streaming.StreamingDataset(streams=[Stream(local=..., proportion=1/m), ...],
  shuffle=True)`` with static proportions.

Both read through a ``DataLoader`` with 0 workers and per-device batch 512. Every run is a
fresh process; ours and plain alternate, round after round, and medians are reported. The
ratios that matter are taken side by side: ours at m against ours at m=3, and ours against
plain at the same m. Targets (issue 11): at m=1,000 ours keeps >= 80% of its m=3 rate and
stays >= plain's; state size and per-call costs grow at most linearly in m. An ablation
reads the m=3 corpus written in as many files as m=1,000 has: the plan of m=3, the files of
m=1,000. A second table times a cold start from S3 (SeaweedFS on loopback) at a few m:
building the dataset and its first batch from a fresh cache, where every stream's index is a
request. ::

    .venv/bin/python -m benchmarks.many_groups                      # full run
    .venv/bin/python -m benchmarks.many_groups --quick --no-write   # smoke test
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import REPO_ROOT, OthersMeter, median, publish, stopwatch

SECTION = "Many groups"
SEQ_LEN = 16
DTYPE = "uint16"
BATCH = 512
STATE_EVERY = 25
SAMPLES_PER_GROUP_MIN = 64
RESULT_PREFIX = "BENCH-RESULT "
RUN_TIMEOUT_S = 900.0
KINDS = ("ours", "plain")
S3_PREFIX = "s3://mixstream/many-groups"
COLD_READ = 2 * BATCH  # samples a cold-start run reads: its build and first batch are timed
# The ablation: m=3 groups stored in as many files as m=1,000 has (one per group), so the
# plan is m=3's and only the number of files read from is m=1,000's.
ABLATION_SHARDS = 333


# ------------------------------------------------------------------------------- corpus
def prepare_corpus(workdir: Path, groups: int, total: int, shards_per_group: int = 1) -> Path:
    """Write (once) ``groups`` equal MDS streams of ``total`` samples in all, and the manifest,
    each stream in ``shards_per_group`` shards (about).

    The first two tokens of every sample hold its group, so a reader could check the mix.
    """
    import numpy as np
    from streaming import MDSWriter

    from mixstream.manifest import GroupInfo, Manifest, SplitInfo

    per = max(SAMPLES_PER_GROUP_MIN, total // groups)
    split = "" if shards_per_group == 1 else f"-s{shards_per_group}"
    root = workdir / f"corpus-m{groups}-{per}{split}"
    # A shard holds a 4-byte offset and SEQ_LEN tokens per sample, plus a small header.
    size_limit = 1 << 26 if shards_per_group == 1 else (
        (4 + 2 * SEQ_LEN) * -(-per // shards_per_group) + 64)  # fmt: skip
    if (root / "mixture.json").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    print(f"writing {groups} groups x {per} samples to {root} ...", file=sys.stderr, flush=True)
    rng = np.random.default_rng(groups)
    infos = {}
    for g in range(groups):
        name, rel = f"g{g:05d}", f"g{g:05d}/train"
        rows = rng.integers(0, 50257, size=(per, SEQ_LEN), dtype=np.uint16)
        rows[:, 0], rows[:, 1] = g % 65536, g // 65536
        with MDSWriter(out=str(root / rel), columns={"input_ids": f"ndarray:{DTYPE}:{SEQ_LEN}"},
                       size_limit=size_limit) as writer:  # fmt: skip
            for row in rows:
                writer.write({"input_ids": row})
        raw = sum(
            s["raw_data"]["bytes"]
            for s in json.loads((root / rel / "index.json").read_text())["shards"]
        )
        infos[name] = GroupInfo(
            name, {"train": SplitInfo(rel, per, per, per * SEQ_LEN, 0, raw, raw, 1)}
        )
    sample = {"format": "tokens", "column": "input_ids", "seq_len": SEQ_LEN, "dtype": DTYPE}
    Manifest(infos, sample, None, {}, root=str(root)).save(str(root))
    return root


# ------------------------------------------------------------------------------- a run
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_reader(job: dict[str, Any]) -> dict[str, Any]:
    """Build ``job['kind']``'s dataset over the corpus, read ``job['read']`` samples."""
    import numpy as np
    from streaming import Stream, StreamingDataset
    from torch.utils.data import DataLoader

    from mixstream import DynamicStreamingDataset

    root, m = Path(job["root"]), job["groups"]
    allocation_s: list[float] = []
    if job["kind"] == "ours":  # time the apportionment inside the plan (a cost that grows with m)
        import mixstream.plan as plan_module

        allocate = plan_module.allocate

        def timed_allocate(*args: Any) -> Any:
            t0 = time.perf_counter()
            out = allocate(*args)
            allocation_s.append(time.perf_counter() - t0)
            return out

        plan_module.allocate = timed_allocate
    remote = job.get("remote")  # an S3 prefix holding the same corpus: a cold start from it
    with stopwatch() as build:  # imports above: the build time is the dataset's alone
        if job["kind"] == "ours":
            ds: Any = DynamicStreamingDataset(
                manifest=f"{remote}/mixture.json" if remote else str(root),
                batch_size=BATCH, local=job["cache"])  # fmt: skip
        elif remote:
            streams = [Stream(remote=f"{remote}/g{g:05d}/train", proportion=1 / m,
                              local=f"{job['cache']}/g{g:05d}") for g in range(m)]  # fmt: skip
            ds = StreamingDataset(streams=streams, batch_size=BATCH, shuffle=True)
        else:
            streams = [Stream(local=str(root / f"g{g:05d}" / "train"), proportion=1 / m)
                       for g in range(m)]  # fmt: skip
            ds = StreamingDataset(streams=streams, batch_size=BATCH, shuffle=True)
    rss_built = _peak_rss_mb()
    rng = np.random.default_rng(0)
    set_weights_s: list[float] = []
    state_s: list[float] = []
    state_bytes = 0
    samples, first = 0, 0.0
    allocation_s.clear()  # those of construction are not per batch
    started = time.perf_counter()
    for step, batch in enumerate(DataLoader(ds, batch_size=BATCH, num_workers=0), 1):
        samples += int(batch["input_ids"].shape[0])
        if step == 1:
            first = time.perf_counter()
        if job["kind"] == "ours":
            t0 = time.perf_counter()
            ds.set_weights(rng.dirichlet(np.ones(m)), step=step)
            set_weights_s.append(time.perf_counter() - t0)
            if step % STATE_EVERY == 0:
                t0 = time.perf_counter()
                state = ds.state_dict(step * BATCH, True)
                state_s.append(time.perf_counter() - t0)
                state_bytes = len(json.dumps(state))
        if samples >= job["read"]:
            break
    done = time.perf_counter()
    if job["kind"] == "ours":
        ds.close()
    return {
        "build_s": build.seconds, "first_batch_s": first - started,
        "rate": (samples - BATCH) / max(done - first, 1e-9), "samples": samples,
        "rss_built_mb": rss_built, "rss_peak_mb": _peak_rss_mb(),
        "set_weights_ms": 1e3 * median(set_weights_s) if set_weights_s else None,
        "state_dict_ms": 1e3 * median(state_s) if state_s else None,
        "state_bytes": state_bytes or None,
        "batch_ms": 1e3 * (done - first) / max(samples // BATCH - 1, 1),
        "allocation_ms": 1e3 * median(allocation_s) if allocation_s else None,
    }  # fmt: skip


def launch(job: dict[str, Any]) -> dict[str, Any]:
    """Run ``job`` in a fresh interpreter; a failed or hung run is reported, not raised."""
    cmd = [sys.executable, "-m", "benchmarks.many_groups", "--child", json.dumps(job)]
    meter = OthersMeter()
    meter.start()
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_S, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"failed": f"no result after {RUN_TIMEOUT_S:.0f} s", "others": meter.stop()}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        errors = [ln for ln in proc.stderr.splitlines() if "Error" in ln]
        return {"failed": errors[-1].strip() if errors else f"exit {proc.returncode}",
                "others": meter.stop()}  # fmt: skip
    return {**json.loads(lines[-1][len(RESULT_PREFIX) :]), "others": meter.stop()}


# ------------------------------------------------------------------------------- report
def _med(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return median(values) if values else None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(args: argparse.Namespace, cells: dict[tuple[str, int], list[dict[str, Any]]]
           ) -> tuple[str, dict[str, Any]]:  # fmt: skip
    lines = [
        f"Corpus per m: one uncompressed MDS stream per group of {SEQ_LEN}-token `{DTYPE}` "
        f"samples (at least {SAMPLES_PER_GROUP_MIN} per group, {args.samples:,} in all where "
        f"that is more), local disk. Each run reads {args.read:,} samples through a DataLoader "
        f"(0 workers, per-device batch {BATCH}) in a fresh process; ours calls `set_weights` "
        f"(random Dirichlet weights) after every batch and `state_dict` every {STATE_EVERY} "
        f"batches, both included in its rate. {args.rounds} rounds, ours and plain alternating; "
        "medians; **ours vs m=3**: the median over rounds of ours at m over an m=3 run "
        "of ours just before it (the machine's speed drifts within a round). "
        "**first batch**: from `iter(loader)` to the first batch; **RSS**: the "
        "process's peak after building the dataset / at the end; **state**: JSON bytes of "
        "`state_dict`.",
        "",
        "| groups | ours samples/s | ours vs m=3 | plain samples/s | ours / plain | first batch s "
        "(ours / plain) | build s (ours / plain) | RSS MB built, peak (ours / plain) | "
        "`set_weights` ms | `state_dict` ms | ours ms/batch | allocation ms/batch | state KB "
        "| others' CPU |",
        "|---:|---:|---:|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    summary: dict[str, Any] = {"cells": {}}
    for m in args.groups:
        ours, plain = cells.get(("ours", m), []), cells.get(("plain", m), [])
        failed = [r["failed"] for r in ours + plain if "failed" in r]
        ours_ok = [r for r in ours if "failed" not in r]
        plain_ok = [r for r in plain if "failed" not in r]
        ratios = [o["rate"] / p["rate"] for o, p in zip(ours_ok, plain_ok, strict=False)]
        rate, prate = _med(ours_ok, "rate"), _med(plain_ok, "rate")
        each = _vs_anchor(cells, m, args.groups[0])
        vs3 = median(each) if each else None
        ratio = median(ratios) if ratios else None

        def pair(key: str, spec: str, o: list = ours_ok, p: list = plain_ok) -> str:
            return f"{_fmt(_med(o, key), spec)} / {_fmt(_med(p, key), spec)}"

        state = _med(ours_ok, "state_bytes")
        others = max((r.get("others") or 0.0) for r in ours + plain) if ours + plain else 0.0
        lines.append(
            f"| {m:,} | {_fmt(rate, ',.0f')} | {_fmt(vs3, '.2f')} | {_fmt(prate, ',.0f')} | "
            f"{_fmt(ratio, '.2f')} | {pair('first_batch_s', '.2f')} | {pair('build_s', '.2f')} "
            f"| {pair('rss_built_mb', '.0f')}, {pair('rss_peak_mb', '.0f')} | "
            f"{_fmt(_med(ours_ok, 'set_weights_ms'), '.3f')} | "
            f"{_fmt(_med(ours_ok, 'state_dict_ms'), '.2f')} | "
            f"{_fmt(_med(ours_ok, 'batch_ms'), '.2f')} | "
            f"{_fmt(_med(ours_ok, 'allocation_ms'), '.2f')} | "
            f"{_fmt(None if state is None else state / 1024, ',.1f')} | {others:.2f} |"
        )
        if failed:
            lines.append(f"| | failed: {failed[0]} ({len(failed)} runs) |" + " |" * 12)
        summary["cells"][str(m)] = {
            "ours_rate": rate, "plain_rate": prate, "ours_vs_m3": vs3,
            "ours_vs_m3_each_round": each, "ours_over_plain": ratio,
            "first_batch_s": {"ours": _med(ours_ok, "first_batch_s"),
                              "plain": _med(plain_ok, "first_batch_s")},
            "state_bytes": state, "state_dict_ms": _med(ours_ok, "state_dict_ms"),
            "set_weights_ms": _med(ours_ok, "set_weights_ms"), "failed": failed,
            "batch_ms": _med(ours_ok, "batch_ms"), "allocation_ms": _med(ours_ok, "allocation_ms"),
        }  # fmt: skip
    lines += _where_the_time_goes(summary["cells"], args.groups[0])
    lines += _ablation(cells, summary)
    lines += _cold_starts(args, cells, summary)
    thousand = summary["cells"].get("1000", {})
    if thousand.get("ours_vs_m3") is not None and thousand.get("ours_over_plain") is not None:
        rounds = thousand["ours_vs_m3_each_round"]
        each = ", ".join(f"{x:.2f}" for x in rounds)
        verdict = _rate_verdict(rounds, thousand["ours_over_plain"])
        lines += ["", f"- Targets at m=1,000 (>= 0.80 of ours at m=3, >= 1.0x plain): "
                  f"{thousand['ours_vs_m3']:.2f} (each round: {each}) and "
                  f"{thousand['ours_over_plain']:.2f}x: **{verdict}**"
                  + ("." if verdict == "met" else _files_verdict(rounds, summary))
                  ]  # fmt: skip
        summary["verdict_m1000"] = verdict
    return "\n".join(lines), summary


def _rate_verdict(rounds: list[float], over_plain: float, target: float = 0.8) -> str:
    """Met when even the lower quartile of the per-round ratios reaches the target; within
    noise when the target lies inside their interquartile range (a second run could land on
    either side of it); not met below it."""
    if over_plain < 1.0:
        return "not met"
    if len(rounds) < 2:
        return "met" if rounds and rounds[0] >= target else "not met"
    q1, _, q3 = statistics.quantiles(rounds, n=4, method="inclusive")
    if q1 >= target:
        return "met"
    return f"within noise (interquartile range {q1:.2f}-{q3:.2f})" if q3 >= target else "not met"


def _files_verdict(rounds: list[float], summary: dict[str, Any]) -> str:
    """How much of m=1,000's gap to m=3 the files-only ablation accounts for, against the
    rounds' noise (the larger interquartile range of the two sets of per-round ratios)."""
    files = summary.get("ablation", {}).get("ours", {}).get("vs_m3_each_round")
    if not files or len(files) < 2 or len(rounds) < 2:
        return "."
    f, g = median(files), median(rounds)
    noise = max(
        q[2] - q[0]
        for q in (statistics.quantiles(x, n=4, method="inclusive") for x in (files, rounds))
    )
    head = (f"; the files-only ablation keeps {f:.2f} (median) against m=1,000's {g:.2f}, "
            f"rounds' noise (interquartile range) {noise:.2f}: ")  # fmt: skip
    if abs(f - g) <= noise:
        return head + "reading from ~1,000 files accounts for the gap (within noise)."
    if f > g:
        return head + (f"reading from ~1,000 files costs {1 - f:.2f} of the m=3 rate, the plan "
                       f"over 1,000 groups the other {f - g:.2f}.")  # fmt: skip
    return head + "the files alone cost more than the whole gap (noise between the two runs)."


def _vs_anchor(cells: dict[tuple[str, int], list[dict[str, Any]]], m: int, base_m: int,
               kind: str = "ours") -> list[float]:  # fmt: skip
    """Each round's rate of ``kind`` at m over the m=3 anchor run just before it."""
    if m == base_m:
        return [1.0 for r in cells.get((kind, m), []) if "failed" not in r]
    pairs = zip(cells.get((kind, m), []), cells.get(("anchor", m), []), strict=False)
    return [o["rate"] / a["rate"] for o, a in pairs if "failed" not in o and "failed" not in a]


def _where_the_time_goes(cells: dict[str, dict[str, Any]], base_m: int) -> list[str]:
    """How much of ours' extra time per batch at each m the apportionment explains."""
    base = cells.get(str(base_m), {})
    if base.get("batch_ms") is None or base.get("allocation_ms") is None:
        return []
    parts = []
    for m, cell in cells.items():
        if int(m) == base_m or cell.get("batch_ms") is None or cell.get("allocation_ms") is None:
            continue
        extra = cell["batch_ms"] - base["batch_ms"]
        alloc = cell["allocation_ms"] - base["allocation_ms"]
        parts.append(f"m={int(m):,}: {extra:+.2f} ms, of which allocation {alloc:+.2f} ms")
    if not parts:
        return []
    return ["", f"Ours' time per batch against m={base_m:,} (medians): " + "; ".join(parts)
            + ". The rest lies outside the apportionment."]  # fmt: skip


def _ablation(cells: dict[tuple[str, int], list[dict[str, Any]]],
              summary: dict[str, Any]) -> list[str]:  # fmt: skip
    """m=3 stored in as many files as m=1,000 has, against m=3 in one file per group."""
    if not cells.get(("ours", -3)):
        return []
    parts, summary["ablation"] = [], {"shards_per_group": ABLATION_SHARDS}
    for kind in KINDS:
        small = [r for r in cells.get((kind, -3), []) if "failed" not in r]
        if kind == "ours":  # against the anchor run just before it
            each, against = _vs_anchor(cells, -3, 3), "the m=3 run just before it"
        else:
            base = [r for r in cells.get((kind, 3), []) if "failed" not in r]
            each = [a["rate"] / b["rate"] for a, b in zip(small, base, strict=False)]
            against = "its m=3 run of the same round"
        if not each:
            continue
        summary["ablation"][kind] = {"rate": _med(small, "rate"), "vs_m3_each_round": each}
        parts.append(f"{kind} {_med(small, 'rate'):,.0f} samples/s, "
                     + ", ".join(f"{x:.2f}" for x in each) + f" of {against}")  # fmt: skip
    return ["", f"Ablation: the m=3 corpus written in {ABLATION_SHARDS} shards per group "
            f"(about {3 * ABLATION_SHARDS:,} files, as many as m=1,000 has), so the plan is "
            "m=3's and only the number of files read from is m=1,000's: " + "; ".join(parts)
            + " (each round)."]  # fmt: skip


def _cold_starts(args: argparse.Namespace, cells: dict[tuple[str, int], list[dict[str, Any]]],
                 summary: dict[str, Any]) -> list[str]:  # fmt: skip
    """The S3 cold-start table: build and first batch from a fresh cache, ours and plain."""
    if not args.s3_groups:
        return []
    lines = [
        "",
        f"Cold start from S3 (SeaweedFS on loopback; the same corpus uploaded, a fresh cache "
        f"per run, 0 workers, {COLD_READ // BATCH} batches read): building the dataset "
        "(every stream's `index.json` downloaded) and its first batch; each round's ours / "
        "plain ratio of the two together, side by side.",
        "",
        "| groups | build s (ours / plain) | first batch s (ours / plain) | "
        "build + first batch, ours / plain (each round) | others' CPU |",
        "|---:|---|---|---|---:|",
    ]
    summary["s3_cold_start"] = {}
    for m in args.s3_groups:
        ours = [r for r in cells.get(("ours-s3", m), []) if "failed" not in r]
        plain = [r for r in cells.get(("plain-s3", m), []) if "failed" not in r]
        failed = [r["failed"] for r in cells.get(("ours-s3", m), []) + cells.get(
            ("plain-s3", m), []) if "failed" in r]  # fmt: skip
        ratios = [(o["build_s"] + o["first_batch_s"]) / (p["build_s"] + p["first_batch_s"])
                  for o, p in zip(ours, plain, strict=False)]  # fmt: skip
        others = max((r.get("others") or 0.0) for r in ours + plain) if ours + plain else 0.0

        def pair(key: str, spec: str, o: list = ours, p: list = plain) -> str:
            return f"{_fmt(_med(o, key), spec)} / {_fmt(_med(p, key), spec)}"

        lines.append(
            f"| {m:,} | {pair('build_s', '.2f')} | {pair('first_batch_s', '.2f')} | "
            + (", ".join(f"{x:.3f}" for x in ratios) or "-")
            + f" | {others:.2f} |"
        )
        if failed:
            lines.append(f"| | failed: {failed[0]} ({len(failed)} runs) | | | |")
        summary["s3_cold_start"][str(m)] = {
            "build_s": {"ours": _med(ours, "build_s"), "plain": _med(plain, "build_s")},
            "first_batch_s": {"ours": _med(ours, "first_batch_s"),
                              "plain": _med(plain, "first_batch_s")},
            "ours_over_plain_each_round": ratios, "failed": failed,
        }  # fmt: skip
    return lines


def _run_s3_cold_starts(args: argparse.Namespace,
                        cells: dict[tuple[str, int], list[dict[str, Any]]]) -> None:  # fmt: skip
    from mixstream import storage
    from mixstream.testing.s3server import S3Server

    roots = {m: prepare_corpus(args.workdir, m, args.samples) for m in args.s3_groups}
    with S3Server() as server, server.apply_env():  # children inherit the endpoint
        for m, root in roots.items():
            storage.upload_tree(root, f"{S3_PREFIX}/m{m}")
        for rnd in range(args.rounds):
            for m in args.s3_groups:
                for kind in KINDS if rnd % 2 == 0 else KINDS[::-1]:
                    cache = args.workdir / f"cache-s3-{kind}-{m}-{rnd}"
                    job = {"kind": kind, "groups": m, "root": str(roots[m]), "read": COLD_READ,
                           "cache": str(cache), "remote": f"{S3_PREFIX}/m{m}"}  # fmt: skip
                    result = launch(job)
                    shutil.rmtree(cache, ignore_errors=True)
                    cells.setdefault((f"{kind}-s3", m), []).append(result)
                    what = result.get("failed") or (
                        f"build {result['build_s']:.2f} s, first batch "
                        f"{result['first_batch_s']:.2f} s"
                    )
                    print(f"[many-groups] round {rnd} S3 cold start m={m} {kind}: {what}",
                          file=sys.stderr, flush=True)  # fmt: skip


# ------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", default="3,100,1000,10000", help="comma list of m")
    parser.add_argument("--samples", type=int, default=262_144, help="corpus size per m")
    parser.add_argument("--read", type=int, default=51_200, help="samples read per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "mixstream-many-groups")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="m = 3, 100; small reads; 1 round")
    parser.add_argument(
        "--s3-groups", default="3,200", help="m for the S3 cold-start table ('' skips it)"
    )
    parser.add_argument("--no-write", dest="write", action="store_false")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(RESULT_PREFIX + json.dumps(run_reader(json.loads(args.child))), flush=True)
        return 0
    if args.quick:
        args.groups, args.samples, args.read, args.rounds = "3,100", 8_192, 5_120, 1
        args.s3_groups = "3,20"
    args.groups = [int(x) for x in args.groups.split(",") if x.strip()]
    args.s3_groups = [int(x) for x in args.s3_groups.split(",") if x.strip()]
    roots = {m: prepare_corpus(args.workdir, m, args.samples) for m in args.groups}
    ablation = args.groups[0] == 3
    if ablation:
        roots[-3] = prepare_corpus(args.workdir, 3, args.samples, ABLATION_SHARDS)
    cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for rnd in range(args.rounds):
        for m in [*args.groups, -3] if ablation else args.groups:  # -3: m=3 in small shards
            # The machine's speed drifts within a round: each m's "vs m=3" ratio is taken
            # against an m=3 run (the anchor) just before it.
            kinds = KINDS if rnd % 2 == 0 else KINDS[::-1]
            for kind in kinds if m == args.groups[0] else ("anchor", *kinds):
                cache = args.workdir / f"cache-{kind}-{m}-{rnd}"
                at = args.groups[0] if kind == "anchor" else m
                job = {"kind": "ours" if kind == "anchor" else kind, "groups": abs(at),
                       "root": str(roots[at]), "read": args.read, "cache": str(cache)}  # fmt: skip
                result = launch(job)
                shutil.rmtree(cache, ignore_errors=True)
                cells.setdefault((kind, m), []).append(result)
                what = result.get("failed") or f"{result['rate']:,.0f} samples/s"
                print(
                    f"[many-groups] round {rnd} m={m} {kind}: {what}", file=sys.stderr, flush=True
                )
    if args.s3_groups:
        _run_s3_cold_starts(args, cells)
    markdown, summary = report(args, cells)
    publish(SECTION, markdown, quick=args.quick, write=args.write, name="many_groups",
            results=summary)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
