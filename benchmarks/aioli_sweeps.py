"""What Aioli's LearnParams sweeps cost, and which settings make them cheap (paired ablations).

Aioli estimates its mixing law from *sweeps*: short stretches that train on one group's
skewed mixture. Sweeps leave the learned mixture, so on a budget they can cost more than the
mixture gains. Each row here changes one thing against the paper's settings, trains Aioli
and its Stratified twin (same seed = same init and data seed, same change where it applies
to both, e.g. the learning rate) and reports Aioli - Stratified in average test loss with a
95% interval over seeds, next to the share of batches spent in sweeps.

A second table measures whether the estimate is above its noise, from the paper-setting
runs: per round, the spread of each sweep's loss drops across the ``lp_rounds`` repetitions
against the differences between groups that the EG step acts on, and how often the most
upweighted group agrees between consecutive rounds. A third compares the sweep drops
``beta`` measured on ``--val-samples`` validation sequences per group with those on the
whole val split (round 0 only, where every run trains on the same batches).

Shares its runs with ``benchmarks.quality`` when given the same ``--workdir`` (the
all-group Stratified and Aioli runs). ::

    .venv/bin/python -m benchmarks.aioli_sweeps --workdir /tmp/quality
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks._common import publish
from benchmarks._training import (
    RECIPES,
    Run,
    add_report_only,
    avg_test_loss,
    base_overrides,
    check_report_only,
    corpus,
    paired,
    partial_note,
    run_all,
)


@dataclass(frozen=True)
class Variant:
    """One ablation row: what changes for Aioli, what changes for both, and the twin."""

    tag: str  #: suffix of the Aioli run's name
    aioli: tuple[str, ...] = ()  #: overrides of the Aioli run only
    both: tuple[str, ...] = ()  #: overrides of Aioli and its Stratified twin
    factor: float = 1.0  #: run length, times ``--steps``
    seeds: int | None = None  #: at least this many seeds (a row whose spread is large)
    twin: str | None = None  #: the Stratified twin's suffix (default: ``tag`` if ``both``)

    @property
    def twin_tag(self) -> str:
        return self.twin if self.twin is not None else (self.tag if self.both else "")


_LR3 = ("optimizer.lr=3.0e-3",)
#: every row changes one thing against the paper's protocol: no warm-up unless it says so
_PAPER = ("algorithm.prior_steps=0",)
VARIANTS: dict[str, Variant] = {
    "paper settings": Variant(""),
    "lr 3e-3 (both)": Variant("~lr3e-3", both=_LR3, seeds=4),
    "lr 3e-3 (both) + stratified warm-up (prior_steps 250)": Variant(
        "~lr3e-3~warm250", aioli=("algorithm.prior_steps=250",), both=_LR3, seeds=4, twin="~lr3e-3"
    ),
    "batch 32, same tokens (both)": Variant(
        "~b32", both=("data.global_batch_size=32",), factor=0.5
    ),
    "lp_steps 1": Variant("~lp1", aioli=("algorithm.lp_steps=1",)),
    "lp_steps 2 (sweeps 3x shorter)": Variant("~lp2", aioli=("algorithm.lp_steps=2",)),
    "one_hot_factor 0.35 (toward 1/m)": Variant("~f035", aioli=("algorithm.one_hot_factor=0.35",)),
    "stratified warm-up (prior_steps 250)": Variant(
        "~warm250", aioli=("algorithm.prior_steps=250",)
    ),
}


def plan(args: argparse.Namespace, manifest: str, out: Path, groups: Sequence[str]) -> list[Run]:
    runs: list[Run] = []
    key = "+".join(groups)

    def add(method: str, recipe: str, seed: int, steps: int, extra: Sequence[str]) -> Run:
        name = f"{key}/{method}/s{seed}"
        run_dir = out / "runs" / name
        overrides = base_overrides(name, run_dir, seed, manifest, groups, steps)
        overrides += [f"eval_interval={max(1, steps // 4)}ba",
                      f"data.val_samples_per_group={args.val_samples}", *extra]  # fmt: skip
        run = Run(name, RECIPES / f"cpu-{recipe}.yaml", overrides, run_dir)
        if name not in {r.name for r in runs}:
            runs.append(run)
        return run

    for v in VARIANTS.values():  # variant by variant: the likely causes first, so a
        for seed in range(max(args.seeds, v.seeds or 0)):  # cut-short run has whole rows
            steps = round(args.steps * v.factor)
            add("stratified" + v.twin_tag, "stratified", seed, steps, v.both)
            add("aioli" + v.tag, "aioli", seed, steps, [*_PAPER, *v.aioli, *v.both])
    for n in args.val_sizes:  # round 0 only: LearnParams ends at batch 96 with 4 groups
        add(f"aioli-val{n}", "aioli", 0, args.val_steps,
            [*_PAPER, f"data.val_samples_per_group={n}"])  # fmt: skip
    return runs


def _runs_by(runs: Sequence[Run], method: str) -> dict[int, Run]:
    return {int(r.name.rsplit("/s", 1)[1]): r for r in runs
            if r.name.split("/")[1] == method and r.results_file.exists()}  # fmt: skip


def sweep_estimates(run: Run) -> list[np.ndarray]:
    """Per finished round: ``s[rep, j]``, the column sums of ``A = W^-1 beta`` (what the EG
    step ranks groups by) estimated from each of the ``lp_rounds`` repetitions alone."""
    from mixstream.algorithms.aioli import AioliConfig, LearnParamsPlan, estimate_A

    weights = run.weights()
    info = weights["aioli"]["config"]
    config = AioliConfig(
        **{**info, "prior": None if info["prior"] is None else tuple(info["prior"])}
    )
    m, k = config.num_groups, config.lp_rounds
    seed = int(run.name.rsplit("/s", 1)[1])
    groups = weights["groups"]
    evals = {r["step"]: [r["losses"][g] for g in groups] for r in run.history("val_loss")}
    out = []
    for round_index in range(10_000):
        lp = LearnParamsPlan.for_round(config, seed, round_index)
        if any(step not in evals for step in lp.eval_steps):
            break
        losses = np.array([evals[step] for step in lp.eval_steps])
        drops = losses[:-1] - losses[1:]
        per_rep = np.zeros((k, m))
        for rep in range(k):
            beta = np.zeros((m, m))
            for idx in range(rep * m, (rep + 1) * m):
                beta[:, lp.order[idx]] = drops[idx]
            per_rep[rep] = estimate_A(config.W, beta).sum(axis=0)
        out.append(per_rep)
    return out


def noise_table(runs: Sequence[Run]) -> list[str]:
    """Signal (spread of the groups' mean scores) vs noise (their standard errors)."""
    lines = ["| seed | rounds | signal: sd over groups of mean score | noise: mean SE of a "
             "group's score | signal / noise | top group same as previous round |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    ratios = []
    for seed, run in sorted(_runs_by(runs, "aioli").items()):
        rounds = sweep_estimates(run)
        if not rounds:
            continue
        sig, noise, tops = [], [], []
        for per_rep in rounds:
            mean = per_rep.mean(axis=0)
            se = per_rep.std(axis=0, ddof=1) / np.sqrt(per_rep.shape[0])
            sig.append(float(mean.std(ddof=1)))
            noise.append(float(se.mean()))
            tops.append(int(np.argmax(mean)))
        same = sum(a == b for a, b in itertools.pairwise(tops))
        ratio = statistics.fmean(sig) / statistics.fmean(noise)
        ratios.append(ratio)
        sig_mean, noise_mean = statistics.fmean(sig), statistics.fmean(noise)
        cells = [seed, len(rounds), f"{sig_mean:.4f}", f"{noise_mean:.4f}", f"{ratio:.2f}",
                 f"{same}/{len(tops) - 1}"]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    if ratios:
        lines.append(f"| mean | | | | {statistics.fmean(ratios):.2f} | |")
    return lines


def planted_line(runs: Sequence[Run], steps: int) -> str:
    """The planted-law simulator at the signal and noise measured in the paper-setting runs."""
    scores, ses, info = [], [], None
    for run in _runs_by(runs, "aioli").values():
        info = run.weights()["aioli"]["config"]
        for per_rep in sweep_estimates(run):
            scores.append(per_rep.mean(axis=0))
            ses.append(float((per_rep.std(axis=0, ddof=1) / np.sqrt(per_rep.shape[0])).mean()))
    if info is None or not scores:
        return ""
    mean_scores = np.mean(scores, axis=0)
    sim = planted_law(info, mean_scores, statistics.fmean(ses), steps)
    return (
        f"**Planted-law simulator** at these numbers (group scores "
        f"{' '.join(f'{x:+.3f}' for x in mean_scores)} averaged over rounds and seeds, "
        f"standard error {statistics.fmean(ses):.4f}; `A` diagonal, optimum all weight on the "
        f"top group): after {steps} batches Aioli's rule gives the top group "
        f"{sim['best_weight']:.3f} of the mixture; with a normalised `A` and EMA the EG step "
        f"from uniform can give it at most {sim['bound']:.3f} (eta {info['eta']}, "
        f"{info['num_groups']} groups), whatever the estimate."
    )


def planted_law(config_info: dict, scores: np.ndarray, se: float, steps: int, seeds: int = 20
                ) -> dict[str, float]:  # fmt: skip
    """Where Aioli's rule takes the weights on a planted law with the measured signal/noise.

    The law is ``L_{s+1} = L_s - A p_s + noise`` with ``A = diag(scores) / lp_steps`` (a
    group's score is about ``lp_steps`` times its column sum of ``A``), its optimum all
    weight on the top-scoring group, and the evaluation noise set so that a repetition's
    score has the measured standard error ``se``. Returns the best group's final weight
    (mean over simulator seeds) and ``bound``, the most the EG step can give it in one step
    from uniform with a normalised ``A`` (``e^eta / (e^eta + m - 1)``).
    """
    from mixstream.algorithms.aioli import AioliConfig
    from mixstream.algorithms.simulate import LinearDynamicSimulator, run_aioli

    prior = config_info.get("prior")
    config = AioliConfig(**{**config_info, "prior": None if prior is None else tuple(prior)})
    m = config.num_groups
    d = np.clip(np.asarray(scores, dtype=np.float64), 0.0, None) / config.lp_steps
    rounds = max(1, (steps - config.prior_steps) // config.update_steps)

    def score_se(noise: float) -> float:
        spread = []
        for seed in range(seeds):
            sim = LinearDynamicSimulator(np.zeros((m, m)), np.full(m, 5.0), noise, seed)
            history, _ = run_aioli(config, sim, 1, seed=seed)
            spread.append(history[0].A_raw.sum(axis=0))
        return float(np.std(spread, axis=0, ddof=1).mean()) / np.sqrt(config.lp_rounds)

    noise = se / max(score_se(1.0), 1e-12)
    final = []
    for seed in range(seeds):
        sim = LinearDynamicSimulator(np.diag(d), np.full(m, 5.0), noise, seed)
        history, _ = run_aioli(config, sim, rounds, seed=seed)
        final.append(float(history[-1].weights[int(np.argmax(d))]))
    bound = math.exp(config.eta) / (math.exp(config.eta) + m - 1)
    return {"noise": noise, "best_weight": float(np.mean(final)), "bound": bound}


def val_size_table(runs: Sequence[Run], sizes: Sequence[int]) -> list[str]:
    """Round-0 scores from ``n`` validation sequences per group vs from the largest set."""
    scores = {}
    for n in sizes:
        run = _runs_by(runs, f"aioli-val{n}").get(0)
        if run is not None and sweep_estimates(run):
            scores[n] = sweep_estimates(run)[0].mean(axis=0)
    if len(scores) < 2:
        return []
    ref_n = max(scores)
    ref = scores[ref_n]
    lines = [f"| val sequences per group | round-0 group scores | error vs {ref_n} | "
             "error / signal |", "|---:|---|---:|---:|"]  # fmt: skip
    signal = float(ref.std(ddof=1))
    for n, sc in sorted(scores.items()):
        err = float(np.sqrt(np.mean((sc - ref) ** 2)))
        lines.append(f"| {n} | {' '.join(f'{x:+.3f}' for x in sc)} | {err:.4f} | "
                     f"{err / signal:.2f} |")  # fmt: skip
    return lines


def report(args: argparse.Namespace, runs: Sequence[Run]) -> tuple[str, dict]:
    lines = [
        *partial_note(runs),
        f"Setting: all groups of the corpus; {args.seeds} paired seeds (more where a row says so: "
        f"the count is in each cell); base {args.steps} "
        "batches (recipes `recipes/cpu-*.yaml`). Cell: Aioli - Stratified twin in average "
        "test loss (nats/token), 95% t-interval over seeds, wins/seeds; `(noise)`: the "
        "interval holds 0. Sweep share: batches in LearnParams / all batches.",
        "",
        "| change vs the paper's settings | Aioli - Stratified | sweep share |",
        "|---|---|---:|",
    ]
    rows = []
    for label, v in VARIANTS.items():
        aioli, strat = _runs_by(runs, "aioli" + v.tag), _runs_by(runs, "stratified" + v.twin_tag)
        d = paired({k: avg_test_loss(r.results()) for k, r in aioli.items()},
                   {k: avg_test_loss(r.results()) for k, r in strat.items()})  # fmt: skip
        if d is None:
            continue
        share = statistics.fmean(r.sweep_share for r in aioli.values())
        lines.append(f"| {label} | {d.cell(4)} | {100 * share:.0f}% |")
        rows.append({"variant": label, "deltas": list(d.deltas), "mean": d.mean,
                     "half_width": d.half_width, "sweep_share": share})  # fmt: skip
    lines += ["", "**Is the estimate above its noise?** Paper settings, per seed, mean over "
              "rounds. A group's score is its column sum of `A = W^-1 beta` (the EG step "
              "moves weight toward high scores), from each LearnParams repetition alone; "
              "noise is the standard error of a group's mean score over the repetitions.", "",
              *noise_table(runs), "", planted_line(runs, args.steps), ""]  # fmt: skip
    val = val_size_table(runs, args.val_sizes)
    if val:
        lines += ["**Validation sample size** (seed 0, round 0: identical training up to the "
                  "first update):", "", *val, ""]  # fmt: skip
    return "\n".join(lines), {"variants": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", default=None, help="a converted corpus (default: demo)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1000, help="base batches per run")
    parser.add_argument("--val-samples", type=int, default=128)
    parser.add_argument("--val-sizes", default="16,128,100000",
                        help="validation set sizes compared in round 0 ('' off)")  # fmt: skip
    parser.add_argument("--val-steps", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--no-write", dest="write", action="store_false")
    add_report_only(parser)
    args = parser.parse_args(argv)
    check_report_only(args)
    args.val_sizes = [int(x) for x in args.val_sizes.split(",") if x.strip()]
    out = args.workdir or Path(tempfile.mkdtemp(prefix="mixstream-sweeps-"))
    with corpus(args.manifest, out, vocab_size=args.vocab_size, seq_len=args.seq_len,
                bucket="quality") as manifest:  # fmt: skip
        from mixstream.manifest import Manifest

        groups = Manifest.load(manifest).group_names
        runs = plan(args, manifest, out, groups)
        if not args.report_only:
            print(f"[sweeps] {len(runs)} runs into {out}", flush=True)
            run_all(runs, args.jobs, say=lambda m: print(f"[sweeps] {m}", flush=True))
    markdown, results = report(args, runs)
    publish("Aioli's sweeps: paired ablations", markdown, quick=False, write=args.write,
            name="aioli_sweeps", results=results)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
