"""Resume cost: time to first batch and peak RSS when resuming deep into a large mixture.

Only the *planning* is measured, the part of resuming before any shard is touched, so the
mixture needs index files only: ``index.json`` files describing many 64 MiB shards
(16,384 samples of 2048 ``uint16`` tokens each) of 3 streams, and a ``mixture.json``.

- **ours**: ``DynamicStreamingDataset(manifest=...)``; timed: ``load_state_dict`` of a state at
  sample S, then ``next(iter(ds))`` with shard access stubbed out (``_prefetch`` and
  ``_sample`` return at once): the epoch start, the plan up to the first batch and its layout.
- **plain**: ``StreamingDataset(streams=[Stream(local=..., proportion=p)], shuffle=True)``;
  timed: ``load_state_dict({'epoch': 0, 'sample_in_epoch': S, ...})``, then what its
  ``__iter__`` does before starting its download threads: ``_resume_incr_epoch()`` and
  ``_get_work(epoch, sample_in_epoch)`` (``generate_work``: resampling, partitioning and
  shuffling the whole epoch, then sharing it through shared memory).

Every measurement runs in a fresh Python process, which reports its own peak RSS
(``ru_maxrss``). StreamingDataset's planning materializes the whole epoch, so its cost grows
with the epoch size rather than the position; its cells are run in increasing size and a cell
whose estimate (extrapolated from the smaller ones) exceeds the memory or time limit is
skipped and reported as an estimate.

Run from the repository root::

    .venv/bin/python -m benchmarks.resume_cost                     # full run
    .venv/bin/python -m benchmarks.resume_cost --quick --no-write  # smoke test
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks._common import REPO_ROOT, median, publish

SECTION = "resume cost"
SEQ_LEN = 2048
GROUPS = ("web", "code", "books")
PROPORTIONS = (0.5, 0.3, 0.2)
BATCH = 32
SEED = 9176
SAMPLES_PER_SHARD = 16_384  # 64 MiB of 2048-token uint16 samples
BIG_TOTAL = 1_200_000_000
POSITIONS = (10**6, 10**7, 10**8, 10**9)
QUICK_TOTAL = 1_200_000
QUICK_POSITIONS = (10**3, 10**4, 10**5, 10**6)
# Plain StreamingDataset's cost is set by the epoch: epochs of 1.2 x these positions.
SCALE_POSITIONS = (10**6, 10**7, 10**8)
QUICK_SCALE_POSITIONS = (10**4, 10**5)
UPDATES = (10**3, 10**4, 10**5, 10**6)
QUICK_UPDATES = (10**2, 10**3)
MAX_RSS_GB = 16.0
MAX_SECONDS = 180.0
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "mixstream-resume-bench"
RESULT_PREFIX = "BENCH-RESULT "


# --------------------------------------------------------------------------------------------
# Synthetic index files


def _shard_template(workdir: Path) -> dict[str, Any]:
    """One shard entry of an ``index.json`` exactly as ``MDSWriter`` writes it."""
    import numpy as np
    from streaming import MDSWriter

    out = workdir / "template"
    shutil.rmtree(out, ignore_errors=True)
    with MDSWriter(
        out=str(out),
        columns={"input_ids": f"ndarray:uint16:{SEQ_LEN}"},
        compression="zstd",
        hashes=["xxh64"],
        size_limit=64 << 20,
    ) as writer:
        writer.write({"input_ids": np.zeros(SEQ_LEN, np.uint16)})
    entry = json.loads((out / "index.json").read_text())["shards"][0]
    shutil.rmtree(out)
    return entry


def write_mixture(workdir: Path, total: int, per_shard: int) -> Path:
    """Write (once) index files for 3 streams of ``total`` samples and a ``mixture.json``."""
    from mixstream.manifest import GroupInfo, Manifest, SplitInfo

    root = workdir / f"index-{total}-{per_shard}"
    if (root / "mixture.json").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    template = _shard_template(workdir)
    sample_bytes = 4 + 2 * SEQ_LEN  # MDS offset + fixed-size ndarray
    groups = {}
    for name, p in zip(GROUPS, PROPORTIONS, strict=True):
        n = round(total * p)
        shards = []
        for i, start in enumerate(range(0, n, per_shard)):
            count = min(per_shard, n - start)
            raw = 4 + 4 * (count + 1) + count * sample_bytes
            entry = json.loads(json.dumps(template))
            entry["samples"] = count
            entry["raw_data"] = {"basename": f"shard.{i:05d}.mds", "bytes": raw, "hashes": {}}
            entry["zip_data"] = {
                "basename": f"shard.{i:05d}.mds.zstd",
                "bytes": raw * 2 // 3,
                "hashes": {"xxh64": "0"},
            }
            shards.append(entry)
        folder = root / name / "train"
        folder.mkdir(parents=True)
        (folder / "index.json").write_text(json.dumps({"version": 2, "shards": shards}))
        split = SplitInfo(
            path=f"{name}/train",
            documents=n,
            samples=n,
            tokens=n * SEQ_LEN,
            text_bytes=0,
            stored_bytes=sum(s["zip_data"]["bytes"] for s in shards),
            raw_bytes=sum(s["raw_data"]["bytes"] for s in shards),
            shards=len(shards),
        )
        groups[name] = GroupInfo(name, {"train": split}, [f"synthetic:{name}"])
    sample = {"format": "tokens", "column": "input_ids", "seq_len": SEQ_LEN, "dtype": "uint16"}
    Manifest(groups, sample, None, {}, root=str(root)).save(str(root))
    return root


# --------------------------------------------------------------------------------------------
# What runs in the child processes


def _status_bytes(field: str) -> int:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_bytes() -> int:
    return _status_bytes("VmRSS")


def _reset_peak() -> int:
    """Reset the RSS high-water mark (VmHWM); returns the peak so far."""
    peak = _status_bytes("VmHWM")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return peak


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _plan_state(position: int, updates: int, seed: int) -> tuple[dict[str, Any], list[list]]:
    """A plausible plan state at ``position`` and a schedule of ``updates`` weight changes."""
    import numpy as np

    batch = position // BATCH
    drawn = batch * BATCH
    targets = [drawn * p for p in PROPORTIONS]
    counts = [int(t) for t in targets]
    counts[0] += drawn - sum(counts)
    rng = np.random.default_rng(seed)
    schedule: list[list] = [[0, list(PROPORTIONS)]]
    if updates > 1:
        every = max(1, batch // updates)
        count = min(updates - 1, batch // every)
        draws = rng.dirichlet(np.ones(len(GROUPS)), size=count).tolist()
        schedule += [[k * every, w] for k, w in enumerate(draws, 1)]
    plan = {"batch": batch, "targets": targets, "counts": counts}
    return plan, schedule


def _fill_state(state: dict[str, Any], plan: dict[str, Any], schedule: list[list]) -> None:
    """Put ``plan`` and ``schedule`` into ``state`` as ``state_dict`` writes them: targets and
    counts that follow the schedule, and the schedule compacted (the entry in force at the
    plan's batch, later ones, a bounded history, a summary and digest of the rest)."""
    import numpy as np

    from mixstream.dataset import history_entries
    from mixstream.weights import WeightSchedule

    full = WeightSchedule.from_list(schedule)
    batch = plan["batch"]
    targets = full.weight_batches(batch) * BATCH
    counts = np.floor(targets).astype(np.int64)
    short = batch * BATCH - int(counts.sum())
    counts[np.argsort(counts - targets, kind="stable")[:short]] += 1
    plan = {**plan, "targets": targets.tolist(), "counts": counts.tolist()}
    kept = full.tail(batch, history_entries(len(GROUPS)))
    past = kept.past.weight_batches
    state["plan"] = plan
    state["schedule"] = kept.to_list()
    state["schedule_past"] = {
        "entries": kept.past.entries,
        "digest": kept.past.digest.hex(),
        "weight_batches": [0.0] * len(GROUPS) if past is None else past.tolist(),
    }
    state["schedule_digest"] = kept.digest.hex()


def run_ours(job: dict[str, Any]) -> dict[str, Any]:
    from mixstream import DynamicStreamingDataset

    base_rss = _rss_bytes()
    t0 = time.perf_counter()
    ds = DynamicStreamingDataset(manifest=job["manifest"], batch_size=BATCH, seed=SEED)
    construct = time.perf_counter() - t0
    built_rss = _rss_bytes()
    state = ds.state_dict(0, True)
    plan, schedule = _plan_state(job["position"], job["updates"], SEED)
    _fill_state(state, plan, schedule)
    state["epoch"] = plan["batch"] // ds.batches_per_epoch
    state["sample_in_epoch"] = (plan["batch"] % ds.batches_per_epoch) * BATCH
    state_bytes = len(json.dumps(state))
    # Stop before any shard is touched: no look-ahead downloads, no sample reads.
    ds._prefetch = lambda pool, ids, after: None  # type: ignore[method-assign]
    ds._sample = lambda sample_id, group: {"id": sample_id, "group": group}  # type: ignore[method-assign]
    construct_peak = _reset_peak()
    t0 = time.perf_counter()
    ds.load_state_dict(state)
    loaded = time.perf_counter() - t0
    it = iter(ds)
    first = next(it)
    plan_s = time.perf_counter() - t0
    plan_peak = _status_bytes("VmHWM")
    it.close()
    ds.close()
    return {
        "construct_s": construct,
        "load_s": loaded,
        "plan_s": plan_s,
        "first_id": int(first["id"]),
        "base_rss": base_rss,
        "built_rss": built_rss,
        "construct_peak": construct_peak,
        "peak_rss": plan_peak,
        "max_rss": _peak_rss_bytes(),
        "state_bytes": state_bytes,
    }


def run_plain(job: dict[str, Any]) -> dict[str, Any]:
    from streaming import Stream, StreamingDataset

    base_rss = _rss_bytes()
    t0 = time.perf_counter()
    root = Path(job["root"])
    streams = [
        Stream(local=str(root / name / "train"), proportion=p)
        for name, p in zip(GROUPS, PROPORTIONS, strict=True)
    ]
    ds = StreamingDataset(streams=streams, batch_size=BATCH, shuffle=True, shuffle_seed=SEED)
    construct = time.perf_counter() - t0
    built_rss = _rss_bytes()
    state = {
        "epoch": 0,
        "sample_in_epoch": job["position"],
        "num_canonical_nodes": 1,
        "shuffle_seed": SEED,
        "initial_physical_nodes": 1,
    }
    construct_peak = _reset_peak()
    t0 = time.perf_counter()
    ds.load_state_dict(state)
    loaded = time.perf_counter() - t0
    # StreamingDataset.__iter__ up to the point where its download threads start.
    ds._unique_worker_world = ds._unique_rank_world.detect_workers()
    ds._parallel_worker_world = ds._parallel_rank_world.detect_workers()
    epoch, sample_in_epoch = ds._resume_incr_epoch()
    sample_ids = ds._get_work(epoch, sample_in_epoch)
    first = int(sample_ids[0])
    plan_s = time.perf_counter() - t0
    return {
        "construct_s": construct,
        "load_s": loaded,
        "plan_s": plan_s,
        "first_id": first,
        "base_rss": base_rss,
        "built_rss": built_rss,
        "construct_peak": construct_peak,
        "peak_rss": _status_bytes("VmHWM"),
        "max_rss": _peak_rss_bytes(),
    }


def child_main(job: dict[str, Any]) -> None:
    result = (run_ours if job["kind"] == "ours" else run_plain)(job)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------
# The parent


def _mem_available() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return float("inf")


def launch(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run ``job`` in a fresh interpreter; returns its result (or ``{'error': ...}``)."""
    cmd = [sys.executable, "-m", "benchmarks.resume_cost", "--child", json.dumps(job)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = proc.stdout[-2000:]
        return {"error": f"exit {proc.returncode}: {tail}"}
    result = json.loads(lines[-1][len(RESULT_PREFIX) :])
    result["wall_s"] = time.perf_counter() - t0
    return result


@dataclass
class Measured:
    """Repeated runs of one cell (or why it was skipped)."""

    runs: list[dict[str, Any]] = field(default_factory=list)
    skipped: str | None = None
    estimate: tuple[float, float] | None = None  # (seconds, peak bytes)

    def med(self, key: str) -> float:
        return median([r[key] for r in self.runs])


def measure(job: dict[str, Any], repeats: int, budget_s: float = 30.0) -> Measured:
    """Up to ``repeats`` runs, stopping early once a cell has used ``budget_s`` seconds."""
    m = Measured()
    spent = 0.0
    for _ in range(repeats):
        r = launch(job, timeout=MAX_SECONDS * 2 + 60)
        if "error" in r:
            m.skipped = f"failed: {r['error']}"
            print(f"  {job['kind']} {job.get('position')}: {m.skipped}", file=sys.stderr)
            return m
        m.runs.append(r)
        spent += r["wall_s"]
        print(
            f"  {job['kind']:>5} at {job['position']:>13,} of {job['total']:>13,}"
            f" (updates {job.get('updates', 0):,}): plan {r['plan_s']:8.3f} s, "
            f"peak RSS {r['peak_rss'] / 2**30:6.2f} GiB, construct {r['construct_s']:.2f} s",
            file=sys.stderr,
            flush=True,
        )
        if spent > budget_s:
            break
    return m


class Extrapolator:
    """Linear estimate of plain StreamingDataset's cost from the epochs measured so far."""

    def __init__(self) -> None:
        self.points: dict[int, tuple[float, float]] = {}  # epoch -> (seconds, peak bytes)

    def add(self, epoch: int, seconds: float, peak: float) -> None:
        old = self.points.get(epoch, (0.0, 0.0))
        self.points[epoch] = (max(old[0], seconds), max(old[1], peak))

    def estimate(self, epoch: int) -> tuple[float, float] | None:
        if epoch in self.points:
            return self.points[epoch]
        known = sorted(self.points.items())
        if not known:
            return None
        if len(known) == 1:
            n, (s, b) = known[0]
            return s * epoch / n, b * epoch / n
        (n0, (s0, b0)), (n1, (s1, b1)) = known[-2], known[-1]
        slope_s, slope_b = (s1 - s0) / (n1 - n0), (b1 - b0) / (n1 - n0)
        return s1 + slope_s * (epoch - n1), b1 + slope_b * (epoch - n1)


def run_plain_cell(
    root: Path, total: int, position: int, repeats: int, extra: Extrapolator, max_rss: float
) -> Measured:
    est = extra.estimate(total)
    if est is not None:
        secs, peak = est
        reasons = []
        if peak > max_rss:
            reasons.append(f"needs ~{peak / 2**30:.0f} GiB (> {max_rss / 2**30:.0f})")
        if peak > 0.8 * _mem_available():
            reasons.append(f"more than 80% of the {_mem_available() / 2**30:.0f} GiB available")
        if secs > MAX_SECONDS:
            reasons.append(f"needs ~{secs:.0f} s (> {MAX_SECONDS:.0f})")
        if reasons:
            m = Measured(skipped="skipped: " + ", ".join(reasons), estimate=est)
            print(f"  plain at {position:,} of {total:,}: {m.skipped}", file=sys.stderr)
            return m
    job = {"kind": "plain", "root": str(root), "total": total, "position": position}
    m = measure(job, repeats if (est is None or est[0] < 10) else 1)
    if m.runs:
        extra.add(total, m.med("plan_s"), m.med("peak_rss"))
    return m


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f}"


def _cell(m: Measured, key: str = "plan_s") -> tuple[str, str]:
    """(planning seconds, peak GiB) for a table, or the estimate for a skipped cell."""
    if m.runs:
        return f"{m.med(key):.3f}", _gib(m.med("peak_rss"))
    if m.estimate is not None:
        secs, peak = m.estimate
        return f"skipped (est. ~{secs:,.0f})", f"skipped (est. ~{peak / 2**30:,.0f})"
    return m.skipped or "-", "-"


def _numbers(m: Measured) -> dict[str, Any]:
    """A cell's medians for the results file (seconds, GiB), or why it was skipped."""
    if m.runs:
        return {
            "plan_s": m.med("plan_s"),
            "peak_rss_gib": m.med("peak_rss") / 2**30,
            "construct_s": m.med("construct_s"),
            "construct_peak_gib": m.med("construct_peak") / 2**30,
        }
    out: dict[str, Any] = {"skipped": m.skipped}
    if m.estimate is not None:
        out["estimate_plan_s"], out["estimate_peak_rss_gib"] = m.estimate[0], m.estimate[1] / 2**30
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.resume_cost", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="tiny index, one run per cell")
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    parser.add_argument("--repeats", type=int, default=None, help="runs per small cell (3)")
    parser.add_argument(
        "--big-repeats", type=int, default=1, help="runs per cell on the big index (1)"
    )
    parser.add_argument("--samples-per-shard", type=int, default=SAMPLES_PER_SHARD)
    parser.add_argument("--max-rss-gb", type=float, default=MAX_RSS_GB)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return 0

    began = time.perf_counter()
    repeats = args.repeats or (1 if args.quick else 3)
    total = QUICK_TOTAL if args.quick else BIG_TOTAL
    positions = QUICK_POSITIONS if args.quick else POSITIONS
    scale_positions = QUICK_SCALE_POSITIONS if args.quick else SCALE_POSITIONS
    updates = QUICK_UPDATES if args.quick else UPDATES
    per_shard = args.samples_per_shard
    max_rss = args.max_rss_gb * 2**30
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    print(f"writing index files for {total:,} samples ...", file=sys.stderr, flush=True)
    big = write_mixture(workdir, total, per_shard)
    epochs = {s: s * 6 // 5 for s in scale_positions}
    scaled = {s: write_mixture(workdir, epochs[s], per_shard) for s in scale_positions}
    largest = max(scale_positions)

    def ours_job(root: Path, epoch: int, position: int, n_updates: int = 1) -> dict[str, Any]:
        return {
            "kind": "ours",
            "manifest": str(root / "mixture.json"),
            "total": epoch,
            "position": position,
            "updates": n_updates,
        }

    # 1. Epochs of 1.2 x the position, in increasing size: plain StreamingDataset is measured
    #    where it fits, and these runs are what its big-index cells are estimated from.
    extra = Extrapolator()
    print("epochs of 1.2 x the position:", file=sys.stderr)
    plain_scaled = {
        s: run_plain_cell(scaled[s], epochs[s], s, repeats, extra, max_rss) for s in scale_positions
    }
    early = min(positions)
    plain_early = run_plain_cell(scaled[largest], epochs[largest], early, repeats, extra, max_rss)
    ours_scaled = {s: measure(ours_job(scaled[s], epochs[s], s), repeats) for s in scale_positions}
    ours_early = measure(ours_job(scaled[largest], epochs[largest], early), repeats)
    ours_updates = {
        u: measure(ours_job(scaled[largest], epochs[largest], largest, u), min(repeats, 2))
        for u in updates
    }

    # 2. The big index: every position, one fresh process each.
    print(f"the {total:,}-sample mixture:", file=sys.stderr)
    ours_big: dict[int, Measured] = {}
    plain_big: dict[int, Measured] = {}
    for s in positions:
        ours_big[s] = measure(ours_job(big, total, s), args.big_repeats)
        plain_big[s] = run_plain_cell(big, total, s, args.big_repeats, extra, max_rss)

    # ---------------------------------------------------------------- report
    misses: list[str] = []
    shards = -(-total // per_shard)
    rows = [
        "| resume at sample | ours: plan s | ours: peak RSS GiB (planning) | plain: plan s "
        "| plain: peak RSS GiB (planning) | construct s (ours / plain) "
        "| peak RSS GiB in construction (ours / plain) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in positions:
        o, p = ours_big[s], plain_big[s]
        o_plan, o_rss = _cell(o)
        p_plan, p_rss = _cell(p)
        if o.runs and o.med("plan_s") >= 1.0:
            misses.append(f"ours plans {o.med('plan_s'):.2f} s at {s:,}")
        if not o.runs:
            misses.append(f"ours at {s:,}: {o.skipped}")
        cons = " / ".join(f"{m.med('construct_s'):.1f}" if m.runs else "-" for m in (o, p))
        peak = " / ".join(_gib(m.med("construct_peak")) if m.runs else "-" for m in (o, p))
        rows.append(f"| {s:,} | {o_plan} | {o_rss} | {p_plan} | {p_rss} | {cons} | {peak} |")
    plans = [ours_big[s].med("plan_s") for s in positions if ours_big[s].runs]
    peaks = [ours_big[s].med("peak_rss") for s in positions if ours_big[s].runs]

    scale_rows = [
        "| epoch (samples) | resume at | plain: plan s | plain: peak RSS GiB (planning) "
        "| ours: plan s | ours: peak RSS GiB (planning) | construct s (ours / plain) "
        "| peak RSS GiB in construction (ours / plain) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cases = [(s, s, plain_scaled[s], ours_scaled[s]) for s in scale_positions]
    cases.append((largest, early, plain_early, ours_early))
    for s, at, p, o in cases:
        p_plan, p_rss = _cell(p)
        o_plan, o_rss = _cell(o)
        cons = " / ".join(f"{m.med('construct_s'):.2f}" if m.runs else "-" for m in (o, p))
        peak = " / ".join(_gib(m.med("construct_peak")) if m.runs else "-" for m in (o, p))
        scale_rows.append(
            f"| {epochs[s]:,} | {at:,} | {p_plan} | {p_rss} | {o_plan} | {o_rss} | {cons} "
            f"| {peak} |"
        )

    update_rows = [
        "| weight changes in the run | state JSON MB | load_state_dict s "
        "| plan s (load + first batch) | peak RSS GiB (planning) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for u, m in ours_updates.items():
        if m.runs:
            update_rows.append(
                f"| {u:,} | {m.med('state_bytes') / 1e6:.2f} | {m.med('load_s'):.3f} "
                f"| {m.med('plan_s'):.3f} | {_gib(m.med('peak_rss'))} |"
            )
        else:
            update_rows.append(f"| {u:,} | {m.skipped} | | | |")

    base = ours_big[positions[0]]
    base_gib = _gib(base.med("base_rss")) if base.runs else "?"
    body = [
        f"Index: {total:,} samples in 3 streams ({'/'.join(map(str, PROPORTIONS))}), "
        f"{shards:,} shards of {per_shard:,} samples (64 MiB of 2048-token `uint16` "
        "samples each), index files only. Per-device batch 32, 1 rank, 0 workers. Every "
        "run is a fresh process. **plan s**: for ours, `load_state_dict` + `next(iter(ds))` "
        "up to the first sample (epoch start, plan state, the first batch's layout; shard "
        "access stubbed out); for plain StreamingDataset, `load_state_dict` + "
        "`_resume_incr_epoch` + `_get_work` (what its `__iter__` does before its download "
        "threads start). **peak RSS (planning)**: the process's RSS high-water mark during "
        "planning (VmHWM reset after construction), so it includes what the process "
        f"already held: ~{base_gib} GiB of Python + torch + streaming imports plus the "
        "constructed dataset. **Construction** (reading the index files: "
        "`StreamingDataset.__init__`, which ours extends) is reported separately. Plain cells "
        f"whose estimate exceeds {args.max_rss_gb:g} GiB or {MAX_SECONDS:g} s are "
        "skipped; estimates extrapolate linearly in the epoch size from the two largest "
        f"measured epochs of the second table. {args.big_repeats} run(s) per cell on "
        f"this index, median of up to {repeats} elsewhere.",
        "",
        "\n".join(rows),
        "",
    ]
    if plans:
        built = [ours_big[s] for s in positions if ours_big[s].runs]
        body += [
            f"Ours is flat in the position: planning takes {min(plans) * 1e3:.1f} to "
            f"{max(plans) * 1e3:.1f} ms and peaks at {_gib(min(peaks))} to "
            f"{_gib(max(peaks))} GiB from sample {min(positions):,} to {max(positions):,}.",
            "",
            "Construction (reading the index files, before any planning) takes "
            f"{min(m.med('construct_s') for m in built):.1f} to "
            f"{max(m.med('construct_s') for m in built):.1f} s on this index, with a "
            f"transient peak of {_gib(max(m.med('construct_peak') for m in built))} GiB; "
            f"the constructed dataset then holds "
            f"{_gib(max(m.med('built_rss') for m in built))} GiB (process RSS).",
            "",
        ]
    body += [
        "Plain StreamingDataset's planning resamples, partitions, shuffles and shares the "
        "*whole epoch* whatever the position, so its cost is set by the epoch size. "
        "Measured on epochs of 1.2x the position (and once early in the largest one):",
        "",
        "\n".join(scale_rows),
        "",
        f"Ours resumed at sample {largest:,} of the {epochs[largest]:,}-sample epoch after "
        "a run of many weight changes, its state written as `state_dict` writes it: the "
        "entry in force and later ones, the last `history_entries` changes, and a summary "
        "(count, digest, weight sum) of the rest, so the saved schedule stays bounded (one "
        f"change per step up to sample {largest:,} would be {largest // BATCH:,} changes):",
        "",
        "\n".join(update_rows),
        "",
        "- Target (ours flat in the position, planning < 1 s): "
        + ("**met**." if not misses else f"**missed**: {'; '.join(misses)}."),
    ]
    markdown = "\n".join(body)
    schedules = []
    for u, m in ours_updates.items():
        row = {"weight_changes": u, **_numbers(m)}
        if m.runs:
            row |= {"state_json_mb": m.med("state_bytes") / 1e6, "load_s": m.med("load_s")}
        schedules.append(row)
    results = {
        "index": {"samples": total, "shards": shards, "samples_per_shard": per_shard},
        "resume": [
            {"position": s, "ours": _numbers(ours_big[s]), "plain": _numbers(plain_big[s])}
            for s in positions
        ],
        "epochs": [
            {"epoch_samples": epochs[s], "position": at, "ours": _numbers(o), "plain": _numbers(p)}
            for s, at, p, o in cases
        ],
        "schedules": schedules,
        "targets": {"ours_plan_s_max": 1.0, "met": not misses, "misses": misses},
    }
    publish(SECTION, markdown, quick=args.quick, write=not args.no_write, name="resume_cost",
            results=results)  # fmt: skip
    print(f"benchmark took {time.perf_counter() - began:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
