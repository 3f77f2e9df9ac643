"""How close each mixing method gets to the optimal mixture of a known law, and how fast.

Every method runs on planted laws (:class:`mixstream.algorithms.simulate.PlantedLaw`: one
shared parameter trained by SGD, per-group losses with planted transfer and conflict): ODM,
ADO, Aioli and Skill-It as their real ``Mixer`` (``mixstream.mixing``) steering the run, the
others through an adapter that makes their Composer algorithm's calls on the pure rules. The
optimal *static* mixture ``p*`` of each law is computed from the law's closed-form expected
loss, so each method is measured against it:

* **gap**: final mean loss over groups minus that of the static run on ``p*`` with the same
  seed (same noise), 95% t-interval over seeds, and how many seeds beat ``p*``; ``(noise)``
  where the interval holds 0. **closed**: the share of Stratified's gap the method closes.
* **|p_avg - p*|_1**: the time-averaged weights (a proxy method's output mixture) against
  ``p*``, mean over seeds.
* **reach**: batches until the mixture trained on, averaged over a window of a tenth of the
  run, is first within a quarter of Stratified's distance to ``p*`` (median over the seeds
  that get there; how many do).

Settings are the CPU recipes' (``recipes/cpu-*.yaml``, set for 1000-batch runs, the length
simulated here), except that DGA's target is the mean of all groups' validation sets (the
objective; the recipe names one group) and DoReMi's reference is the Stratified run of the
same seed. No model: about two minutes of one core. ::

    .venv/bin/python -m benchmarks.simulated_mixing
    .venv/bin/python -m benchmarks.simulated_mixing --seeds 2 --no-write   # a quick look
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from benchmarks._common import publish
from mixstream.algorithms.aioli import AioliConfig
from mixstream.algorithms.simulate import (
    Adapter,
    ADOAdapter,
    AioliAdapter,
    DGAAdapter,
    DoGEAdapter,
    DoReMiAdapter,
    ODMAdapter,
    PlantedLaw,
    SimResult,
    SkillItAdapter,
    StaticAdapter,
    simulate,
)
from mixstream.train.stats import paired

SECTION = "Planted-law simulator: distance to the optimal mixture"


# ------------------------------------------------------------------------------ the laws
def _corner(m: int, broad: float, noise: float) -> PlantedLaw:
    """Group 0 covers every block (at ``broad``), group j > 0 block j - 1 alone (at 1)."""
    blocks = max(m - 1, 1)
    G = np.zeros((m, blocks))
    G[0] = broad
    G[np.arange(1, m), np.arange(m - 1)] = 1.0
    return PlantedLaw.from_blocks(G, noise=noise, lr=0.1, init=2.0, name=f"corner{m}")


def _interior(m: int, noise: float, conflict: bool, seed: int) -> PlantedLaw:
    """Specialists of unequal curvature and initial error, plus one block all of them pull
    toward targets of their own (``conflict``) or the same one."""
    rng = np.random.default_rng(seed)
    strength = np.array([0.3, 1.0, 1.0]) if m == 3 else rng.uniform(0.2, 1.0, m)
    init = np.array([3.0, 1.5, 0.5]) if m == 3 else rng.uniform(0.5, 3.0, m)
    G = np.hstack([np.diag(strength), np.full((m, 1), 0.5)])
    offsets = np.zeros((m, m + 1))
    if conflict:
        offsets[:, m] = [1.0, -1.0, 0.0] if m == 3 else rng.uniform(-1.0, 1.0, m)
    return PlantedLaw.from_blocks(
        G, offsets=offsets, noise=noise, lr=0.1, init=[*init, 1.0], name=f"interior{m}"
    )


LAWS: dict[str, Callable[[], PlantedLaw]] = {
    "3 groups, corner (low noise)": lambda: _corner(3, 1.0, 0.3),
    "3 groups, interior, conflict (noise)": lambda: _interior(3, 1.0, True, 0),
    "3 groups, interior, no conflict (noise)": lambda: _interior(3, 1.0, False, 0),
    "10 groups, corner (low noise)": lambda: _corner(10, 0.8, 0.3),
    "10 groups, interior, conflict (noise)": lambda: _interior(10, 1.0, True, 10),
}


# --------------------------------------------------------------------------- the methods
@dataclass(frozen=True)
class Method:
    make: Callable[[PlantedLaw, np.ndarray], Adapter]  #: given the law and DoReMi's reference
    ablation: bool = False  #: a changed setting, reported under the method's row


def _paper_eta(law: PlantedLaw) -> float:
    return AioliConfig.defaults_for(law.num_groups).eta


METHODS: dict[str, Method] = {
    "Stratified": Method(lambda law, ref: StaticAdapter()),
    "Aioli": Method(lambda law, ref: AioliAdapter()),
    "Aioli, eta x10": Method(
        lambda law, ref: AioliAdapter(eta=10 * _paper_eta(law)), ablation=True
    ),
    "Aioli, eta x100": Method(
        lambda law, ref: AioliAdapter(eta=100 * _paper_eta(law)), ablation=True
    ),
    "DoReMi": Method(lambda law, ref: DoReMiAdapter(ref, eta=1.0, smoothing=1e-3, update_steps=1)),
    "DGA": Method(
        lambda law, ref: DGAAdapter(eta=1.0, ema=0.9, update_steps=20, probe_batch_size=4)
    ),
    "ODM": Method(lambda law, ref: ODMAdapter(reward_scale=0.1, warmup_steps=50)),
    "ADO": Method(lambda law, ref: ADOAdapter(warmup_steps=100, ignore_steps=50, fit_interval=50)),
    "Skill-It": Method(
        lambda law, ref: SkillItAdapter(eta=0.2, window=3, update_steps=100, graph_steps=10)
    ),
    "DoGE": Method(lambda law, ref: DoGEAdapter(mu=0.05, update_steps=10, probe_batch_size=4)),
    "DoGE, probe batch 64": Method(
        lambda law, ref: DoGEAdapter(mu=0.05, update_steps=10, probe_batch_size=64), ablation=True
    ),
}


# ------------------------------------------------------------------------------- running
def run_law(law: PlantedLaw, seeds: int) -> dict[str, list[SimResult]]:
    """Every method on ``law`` for each seed, and the static run on ``p*`` (key "optimal")."""
    p_star, _ = law.optimum
    out: dict[str, list[SimResult]] = {"optimal": []}
    for seed in range(seeds):
        out["optimal"].append(simulate(law, StaticAdapter(p_star), seed))
        reference = None
        for name, method in METHODS.items():
            result = simulate(law, method.make(law, reference), seed)
            if name == "Stratified":
                reference = result.params
            out.setdefault(name, []).append(result)
    return out


def aioli_columns(law: PlantedLaw, seeds: int) -> tuple[np.ndarray, float, np.ndarray]:
    """Aioli's column sums of A (what its EG step ranks groups by): raw, the most negative
    raw entry (what the normalisation shifts every entry by), and as used (normalised, EMA;
    they sum to 1); means over rounds and seeds."""
    raw, low, used = [], [], []
    for seed in range(seeds):
        adapter = AioliAdapter()
        simulate(law, adapter, seed)
        for r in adapter.rounds:
            raw.append(r.A_raw.sum(axis=0))
            low.append(min(float(r.A_raw.min()), 0.0))
            used.append(r.A_used.sum(axis=0))
    return np.mean(raw, axis=0), statistics.fmean(low), np.mean(used, axis=0)


# ------------------------------------------------------------------------------ the report
def _fmt(p: np.ndarray, digits: int = 2) -> str:
    return "(" + ", ".join(f"{x:.{digits}f}" for x in p) + ")"


def law_table(label: str, law: PlantedLaw, runs: dict[str, list[SimResult]]) -> tuple[list, dict]:
    m = law.num_groups
    p_star, f_star = law.optimum
    uniform = np.full(m, 1.0 / m)
    f_uniform = float(law.objective(uniform)[0])
    radius = 0.25 * float(np.abs(uniform - p_star).sum())
    window = law.steps // 10
    optimal = {s: r.mean_loss for s, r in enumerate(runs["optimal"])}
    strat_gap = paired({s: r.mean_loss for s, r in enumerate(runs["Stratified"])}, optimal)
    assert strat_gap is not None
    lines = [
        f"**{label}**: p* = {_fmt(p_star) if m <= 3 else _describe(p_star)}; expected final "
        f"loss {f_star:.4f} on p*, {f_uniform:.4f} on uniform (noise sigma {law.noise}, "
        f"{law.steps} batches of {law.batch_size}, lr {law.lr}). Reach radius {radius:.3f}.",
        "",
        "| method | gap to p* (nats) | closed | \\|p_avg - p*\\|_1 | reach (batches) |",
        "|---|---|---:|---:|---:|",
    ]
    rows = {}
    for name, method in METHODS.items():
        results = runs[name]
        gap = paired({s: r.mean_loss for s, r in enumerate(results)}, optimal)
        assert gap is not None
        distances = [r.distance(p_star) for r in results]
        reached = [r.steps_to_reach(p_star, radius, window) for r in results]
        hits = [x for x in reached if x is not None]
        reach = f"{statistics.median(hits):.0f} ({len(hits)}/{len(reached)})" if hits else "never"
        closed = 1.0 - gap.mean / strat_gap.mean if strat_gap.mean > 0 else math.nan
        label_cell = f"  ablation: {name}" if method.ablation else name
        lines.append(f"| {label_cell} | {gap.cell(4)} | {100 * closed:.0f}% | "
                     f"{statistics.fmean(distances):.3f} | {reach} |")  # fmt: skip
        rows[name] = {"gaps": list(gap.deltas), "gap_mean": gap.mean,
                      "gap_half_width": gap.half_width, "closed": closed,
                      "distances": distances, "reach": reached}  # fmt: skip
    info = {"p_star": p_star.tolist(), "expected_loss_p_star": f_star,
            "expected_loss_uniform": f_uniform, "radius": radius, "methods": rows}  # fmt: skip
    return lines, info


def _describe(p: np.ndarray) -> str:
    """A long mixture in short: its support and largest weights."""
    top = np.argsort(-p)[:3]
    support = int((p > 1e-3).sum())
    return f"{support} groups above 0.001, largest " + ", ".join(f"g{i} {p[i]:.2f}" for i in top)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--no-write", dest="write", action="store_false")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error("--seeds must be >= 2 (the interval is over seeds)")
    started = time.process_time()
    sections, results = [], {}
    aioli_lines = [
        "| law | raw column sums of A | most negative entry | used (normalised, EMA) | top "
        "weight bound e^eta/(e^eta+m-1) |",
        "|---|---|---:|---|---:|",
    ]
    for label, make in LAWS.items():
        law = make()
        print(f"[simulated] {label}", file=sys.stderr, flush=True)
        lines, info = law_table(label, law, run_law(law, args.seeds))
        sections += [*lines, ""]
        results[label] = info
        if law.num_groups <= 3:
            raw, low, used = aioli_columns(law, args.seeds)
            eta = AioliConfig.defaults_for(law.num_groups).eta
            bound = math.exp(eta) / (math.exp(eta) + law.num_groups - 1)
            aioli_lines.append(
                f"| {label} | {_fmt(raw, 3)} | {low:.3f} | {_fmt(used)} | {bound:.3f} |"
            )
    cpu = time.process_time() - started
    markdown = "\n".join([
        f"Each law: {args.seeds} seeds; every method with its CPU recipe's settings (module "
        "docstring of `benchmarks/simulated_mixing.py`). **gap**: final mean loss over groups "
        "minus the static run on p* with the same seed, 95% t-interval, seeds that beat p*; "
        "`(noise)`: the interval holds 0. **closed**: share of Stratified's gap closed. "
        "**p_avg**: time-averaged weights (DoReMi, DoGE: their output mixture, which their "
        "main run trains on). **reach**: batches until the trained-on mixture, averaged over "
        "a tenth of the run, is within a quarter of Stratified's L1 distance to p* (median "
        "over seeds that get there).",
        "",
        *sections,
        "Ablation rows change one setting of the method above them: Aioli's step size "
        "(its normalised A has column sums adding up to 1, so with EMA one step from "
        "uniform gives no group more than e^eta/(e^eta+m-1)), and DoGE's probe batch "
        "(its log-weights add up every update's score, noise included). The 'no conflict' "
        "law is the 'conflict' law with the shared block's offsets set to 0.",
        "",
        "**Aioli's estimate against its step** (3-group laws; mean over rounds and seeds):",
        "",
        *aioli_lines,
        "",
        f"CPU time: {cpu:.0f} s.",
    ])  # fmt: skip
    publish(SECTION, markdown, quick=False, write=args.write, name="simulated_mixing",
            results={"seeds": args.seeds, "laws": results})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
