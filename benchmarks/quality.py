"""Mixing quality: every method against Stratified, paired over seeds, in a quiet regime.

The Aioli paper (Chen et al. 2024, Table 2) trains one model per method on subsets of
SlimPajama's groups and reports each method's average test perplexity over the groups minus
Stratified's. Here the same protocol at CPU scale, built so that its numbers can be trusted:

* **Quiet regime.** The CPU recipes (``recipes/cpu-*.yaml``) train a small GPT long enough
  that Stratified's test loss has flattened; the report prints each group's unigram entropy
  next to the losses and Stratified's seed spread (target: sd <= 0.5% of the mean).
* **Paired seeds.** Seed s gives every method the same model init and data seed; a cell is
  the mean over seeds of (method - Stratified) in average test loss, with its 95%
  t-interval and wins/seeds. A cell whose interval holds 0 says ``(noise)``.
* **Faithful protocol.** Aioli runs with the paper's settings for the number of groups
  (``AioliConfig.defaults_for``), scaled only where a run is shorter than two rounds: as
  ``aioli`` with mixstream's default one-round stratified warm-up before round 0, as
  ``aioli-paper`` without it (the paper's protocol; also the run-length study's). ODM
  and ADO run their recipes (the reference codes' settings, scaled to the recipe's length),
  with warm-ups and refit intervals scaled to the run's length.
  DoReMi is its 3-run pipeline (the Stratified run is the reference). DGA's target is named
  (``--dga-target``) or the group with the highest *validation* loss under the paired
  Stratified run. The restricted setting (all groups): a mixture learned by short runs
  (``--restricted-from``, a quarter of the budget) is kept static, or trained for those
  ``prior_steps`` and then adjusted by Aioli (the paper's setup, paper protocol throughout).
* **Run-length study.** Stratified and Aioli at several multiples of the base length in one
  setting (``--lengths``), with the share of batches in LearnParams sweeps per cell.

Any corpus converted by ``shard-tools``: ``--manifest PATH|s3://...`` (the demo corpus by
default, served from a SeaweedFS S3 server on loopback) and ``--settings`` (group subsets).
Results: a section of ``benchmarks/RESULTS.md`` and ``benchmarks/results/quality.json``.
Interrupted, it continues from the runs it finished (same ``--workdir``); on a new machine
``--restore-from results/quality.json`` takes the runs an earlier report holds instead of
training them again (marked ``restored_from``). ::

    .venv/bin/python -m benchmarks.quality --workdir /tmp/quality     # CPU, about 2 h on 2 cores
    .venv/bin/python -m benchmarks.quality --manifest s3://bucket/corpus/mixture.json \\
        --settings law+code,all --methods stratified,aioli --seeds 5
    .venv/bin/python -m benchmarks.quality --quick --no-write          # smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import publish
from benchmarks._training import (
    RECIPES,
    Run,
    add_report_only,
    avg_test_loss,
    avg_test_ppl,
    base_overrides,
    check_report_only,
    corpus,
    paired,
    partial_note,
    relative_sd,
    run_all,
    schedule_overrides,
    unigram_entropy,
)

#: the demo corpus's settings, as in the paper: two groups, three, and all of them
DEMO_SETTINGS = "legal+prose,code+legal+prose,all"
METHODS = ("stratified", "aioli", "aioli-paper", "doremi", "dga", "odm", "ado", "skillit", "doge")
PROXIES = ("doremi-proxy", "doge-proxy")  # runs that only feed a main run: not table rows
SHORT_RUNS = ("aioli", "dga")  # methods that can learn a restricted-setting prior alone


def reported(method: str) -> bool:
    """Whether a run of ``method`` is a row of the report (else it only feeds other runs)."""
    return not (method.endswith("-short") or method in PROXIES)


def _recipe(args: argparse.Namespace, method: str) -> Path:
    return RECIPES / f"{'gpu-125m' if args.gpu else 'cpu'}-{method}.yaml"


def parse_settings(spec: str, groups: Sequence[str]) -> dict[str, list[str]]:
    """``"2,law+code,all"`` -> {"a+b": groups}: a number k is the manifest's first k groups."""
    out: dict[str, list[str]] = {}
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item == "all":
            chosen = list(groups)
        elif item.isdigit():
            chosen = list(groups[: int(item)])
            if len(chosen) != int(item):
                raise SystemExit(f"--settings {item}: the corpus has only {len(groups)} groups")
        else:
            chosen = item.split("+")
            unknown = [g for g in chosen if g not in groups]
            if unknown:
                raise SystemExit(f"--settings {item}: no group(s) {unknown}; groups: {groups}")
        if len(chosen) < 2:
            raise SystemExit(f"--settings {item}: a setting mixes at least 2 groups")
        out["+".join(chosen)] = chosen
    return out


def aioli_overrides(
    num_groups: int, steps: int, val_samples: int, paper_protocol: bool = False
) -> tuple[list[str], str]:
    """The paper's settings for ``num_groups``, scaled down only to fit two rounds in a run.

    Scaling shrinks the round and the sweeps by the same factor (sweeps at least one batch),
    then drops LearnParams repetitions until half of each round is left for the learned
    mixture. ``paper_protocol``: without mixstream's warm-up before round 0.
    """
    from mixstream.algorithms.aioli import AioliConfig

    paper = AioliConfig.defaults_for(num_groups)
    extra = [f"data.val_samples_per_group={val_samples}"]
    extra += ["algorithm.prior_steps=0"] if paper_protocol else []
    if steps >= 2 * paper.update_steps:
        return extra, "paper settings"
    factor = steps / (2 * paper.update_steps)
    update = steps // 2
    lp_steps = max(1, round(paper.lp_steps * factor))
    lp_rounds = paper.lp_rounds
    while lp_rounds > 1 and lp_rounds * num_groups * lp_steps > update // 2:
        lp_rounds -= 1
    if lp_rounds * num_groups * lp_steps >= update - 1:
        raise SystemExit(
            f"a {steps}-batch run is too short for Aioli on {num_groups} groups (one sweep of "
            f"each group takes {num_groups * lp_steps} batches of a {update}-batch round); "
            "raise --steps"
        )
    extra += [f"algorithm.update_steps={update}", f"algorithm.lp_steps={lp_steps}",
              f"algorithm.lp_rounds={lp_rounds}"]  # fmt: skip
    return extra, (f"rounds scaled x{factor:.2f} (update_steps {update}, lp_steps {lp_steps}, "
                   f"lp_rounds {lp_rounds})")  # fmt: skip


def worst_on_val(stratified: Run) -> str:
    """The group with the highest validation loss at the end of a Stratified run."""
    rows = stratified.history("val_loss")
    if not rows:
        raise RuntimeError(f"{stratified.name} logged no validation loss (eval_interval?)")
    losses = rows[-1]["losses"]
    return max(losses, key=losses.get)


def _dga_target(args: argparse.Namespace, stratified: Run) -> dict[str, Any]:
    """DGA's target: ``--dga-target``, else the paired Stratified run's worst group on val."""
    if args.dga_target:
        return {"more": [f"algorithm.target={args.dga_target}"]}

    def chosen(done: dict[str, Run]) -> list[str]:
        return [f"algorithm.target={worst_on_val(done[stratified.name])}"]

    return {"after": [stratified.name], "late": chosen}


def plan_runs(args: argparse.Namespace, manifest: str, out: Path) -> list[Run]:
    """Every run of the benchmark, with its dependencies, in the order they should run."""
    runs: list[Run] = []

    def add(setting: str, method: str, seed: int, groups: Sequence[str], steps: int,
            recipe: str, *extra: str, after: Sequence[str] = (),
            late: Callable[[dict[str, Run]], list[str]] | None = None,
            more: Sequence[str] = ()) -> Run:  # fmt: skip
        name = f"{setting}/{method}/s{seed}"
        run_dir = out / "runs" / name
        overrides = base_overrides(name, run_dir, seed, manifest, groups, steps)
        overrides += [f"eval_interval={max(1, steps // 4)}ba", *args.override, *extra, *more]
        run = Run(name, _recipe(args, recipe), overrides, run_dir, list(after), late,
                  feeds_only=not reported(method))  # fmt: skip
        runs.append(run)
        return run

    def aioli(groups: Sequence[str], steps: int, paper_protocol: bool = False) -> list[str]:
        return aioli_overrides(len(groups), steps, args.val_samples, paper_protocol)[0]

    # Three passes (main table, restricted setting, run lengths), each seed by seed, so an
    # interrupted benchmark has whole seeds of the most important table first.
    study_key, study_groups = max(args.settings.items(), key=lambda item: len(item[1]))
    strat: dict[tuple[str, int], Run] = {}
    for seed in range(args.seeds):
        for key, groups in args.settings.items():
            base = strat[key, seed] = add(key, "stratified", seed, groups, args.steps,
                                          "stratified")  # fmt: skip
            if "aioli" in args.methods:
                add(key, "aioli", seed, groups, args.steps, "aioli", *aioli(groups, args.steps))
            if "aioli-paper" in args.methods:
                add(key, "aioli-paper", seed, groups, args.steps, "aioli",
                    *aioli(groups, args.steps, paper_protocol=True))  # fmt: skip
            if "doremi" in args.methods:
                ckpt = base.run_dir / "checkpoints" / "latest-rank0.pt"
                proxy = add(key, "doremi-proxy", seed, groups, args.steps, "doremi-proxy",
                            f"algorithm.reference_checkpoint={ckpt}",
                            after=[base.name])  # fmt: skip
                add(key, "doremi", seed, groups, args.steps, "doremi-main",
                    f"algorithm.weights_file={proxy.run_dir / 'weights.json'}",
                    after=[proxy.name])  # fmt: skip
            if "dga" in args.methods:
                add(key, "dga", seed, groups, args.steps, "dga", **_dga_target(args, base))
            for m in ("odm", "ado"):  # training loss only: no target, no reference model
                if m in args.methods:
                    add(key, m, seed, groups, args.steps, m,
                        *schedule_overrides(_recipe(args, m), args.steps))  # fmt: skip
            if "skillit" in args.methods:  # graph phase and updates scaled to the run
                add(key, "skillit", seed, groups, args.steps, "skillit",
                    f"data.val_samples_per_group={args.val_samples}",
                    *schedule_overrides(_recipe(args, "skillit"), args.steps))  # fmt: skip
            if "doge" in args.methods:  # 2 runs, like DoReMi's last two: proxy, then main
                scaled = schedule_overrides(_recipe(args, "doge-proxy"), args.steps)
                proxy = add(key, "doge-proxy", seed, groups, args.steps, "doge-proxy", *scaled)
                add(key, "doge", seed, groups, args.steps, "doge-main",
                    f"algorithm.weights_file={proxy.run_dir / 'weights.json'}",
                    after=[proxy.name])  # fmt: skip
    for seed in range(args.seeds if args.restricted else 0):
        key, groups, short = study_key, study_groups, max(1, args.steps // 4)
        for src in args.restricted_from:
            if src == "aioli":
                prior = add(key, "aioli-short", seed, groups, short, "aioli",
                            *aioli(groups, short, paper_protocol=True))  # fmt: skip
            else:
                prior = add(key, "dga-short", seed, groups, short, "dga",
                            **_dga_target(args, strat[key, seed]))  # fmt: skip
            weights = prior.run_dir / "weights.json"
            add(key, f"static-from-{src}", seed, groups, args.steps, "doremi-main",
                f"algorithm.weights_file={weights}", after=[prior.name])  # fmt: skip
            add(key, f"aioli-from-{src}", seed, groups, args.steps, "aioli",
                *aioli(groups, args.steps - short), f"algorithm.prior={weights}",
                f"algorithm.prior_steps={short}", after=[prior.name])  # fmt: skip
    for seed in range(min(args.length_seeds, args.seeds) if args.lengths else 0):
        for factor in args.lengths:
            if factor == 1:
                continue  # the main table's runs
            steps = max(1, round(args.steps * factor))
            for method in ("stratified", "aioli-paper"):
                extra = aioli(study_groups, steps, True) if method == "aioli-paper" else []
                add(study_key, f"{method}@{factor:g}x", seed, study_groups, steps,
                    method.removesuffix("-paper"), *extra)  # fmt: skip
    return runs


def restore_runs(runs: Sequence[Run], path: Path) -> int:
    """Write the results an earlier report (its ``quality.json``) holds into the planned runs
    that have none, so they are reported and not trained again; returns how many.

    Runs are bit-deterministic on one machine and software stack: a restored run and its
    rerun agree to the last digit, so restored and new runs pair exactly. Only what the
    report reads comes back (test losses, time-averaged weights, sweep share).
    """
    data = json.loads(path.read_text())
    source = f"{path} (commit {data['machine'].get('git', '?')}, {data['date']})"
    by_name = {r.name: r for r in runs}
    restored = 0
    for rec in data["runs"]:
        run = by_name.get(f"{rec['setting']}/{rec['method']}/s{rec['seed']}")
        if run is None or run.results_file.exists():
            continue
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "weights.json").write_text(
            json.dumps({"aioli": {"sweep_share": rec["sweep_share"]}})
        )
        results = {
            "steps": rec["steps"],
            "test": {"groups": {g: {"loss": v} for g, v in rec["group_test_loss"].items()}},
            "weights": {"average": rec["weights_average"]},
            "restored_from": rec.get("restored_from", source),
        }
        run.results_file.write_text(json.dumps(results))
        restored += 1
    return restored


# --------------------------------------------------------------------------- report
def _table(runs: Sequence[Run]) -> dict[tuple[str, str], dict[int, dict[str, Any]]]:
    table: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for run in runs:
        setting, method, seed = run.name.split("/")
        if run.results_file.exists():
            table.setdefault((setting, method), {})[int(seed[1:])] = run.results()
    return table


def report(args: argparse.Namespace, runs: Sequence[Run], entropy: dict[str, float]
           ) -> tuple[str, dict[str, Any]]:  # fmt: skip
    table = _table(runs)
    records = []
    for run in runs:
        setting, method, seed = run.name.split("/")
        if not run.results_file.exists() or not reported(method):
            continue
        res = run.results()
        records.append({
            "setting": setting, "method": method, "seed": int(seed[1:]),
            "avg_test_loss": avg_test_loss(res), "avg_test_ppl": avg_test_ppl(res),
            "group_test_loss": {g: v["loss"] for g, v in res["test"]["groups"].items()},
            "steps": res["steps"], "sweep_share": run.sweep_share,
            "weights_average": res["weights"].get("average"),
            **({"restored_from": res["restored_from"]} if "restored_from" in res else {}),
        })  # fmt: skip
    settings = list(args.settings)
    methods = list(dict.fromkeys(r["method"] for r in records if "@" not in r["method"]))
    restored = sorted({r["restored_from"] for r in records if "restored_from" in r})
    lines = [
        *partial_note(runs),
        *(
            f"{sum(r.get('restored_from') == src for r in records)} runs were trained by an "
            f"earlier invocation and restored from {src} into this workdir (marked "
            "`restored_from` in the JSON)."
            for src in restored
        ),
        *([""] if restored else []),
        f"{args.seeds} paired seeds (seed = model init and data seed, shared by every method) x "
        f"{args.steps} batches per run; recipes `recipes/{'gpu-125m' if args.gpu else 'cpu'}-"
        f"*.yaml`{' with ' + ' '.join(args.override) if args.override else ''}. "
        "Cells: mean over seeds of (method - Stratified) in average test loss over groups "
        "(nats/token), its 95% t-interval, and wins/seeds; `(noise)`: the interval holds 0. "
        "Negative is better.",
        "",
        "**Anchor.** Stratified's average test loss (mean ± sd over seeds, relative sd) and "
        "each group's unigram entropy on its test split (a model that only knows token "
        "frequencies):",
        "",
        "| setting | Stratified avg test loss | relative sd | avg test ppl | unigram entropy |",
        "|---|---:|---:|---:|---|",
    ]
    for s in settings:
        base = table.get((s, "stratified"), {})
        if len(base) < 2:
            continue
        losses = [avg_test_loss(r) for r in base.values()]
        ppl = statistics.fmean(avg_test_ppl(r) for r in base.values())
        ent = " ".join(f"{g} {entropy[g]:.2f}" for g in args.settings[s] if g in entropy)
        lines.append(f"| {s} | {statistics.fmean(losses):.4f} ± {statistics.stdev(losses):.4f} "
                     f"| {100 * relative_sd(losses):.2f}% | {ppl:.2f} | {ent} |")  # fmt: skip
    lines += ["", "**Methods vs Stratified** (avg test loss difference; the perplexity "
              "difference below it):", "", "| method | " + " | ".join(settings) + " |",
              "|---" * (len(settings) + 1) + "|"]  # fmt: skip
    for m in methods:
        if m == "stratified":
            continue
        cells, ppl_cells = [], []
        for s in settings:
            runs_m, base = table.get((s, m), {}), table.get((s, "stratified"), {})
            d = paired({k: avg_test_loss(v) for k, v in runs_m.items()},
                       {k: avg_test_loss(v) for k, v in base.items()})  # fmt: skip
            dp = paired({k: avg_test_ppl(v) for k, v in runs_m.items()},
                        {k: avg_test_ppl(v) for k, v in base.items()})  # fmt: skip
            cells.append(d.cell(4) if d else "--")
            ppl_cells.append(dp.cell(2) if dp else "--")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append(f"| {m} (ppl) | " + " | ".join(ppl_cells) + " |")
    lines += ["", "Per-group test loss (mean over seeds) and time-averaged weights:", ""]
    for s in settings:
        groups = args.settings[s]
        lines += [
            f"| {s} | " + " | ".join(groups) + " | weights |",
            "|---" * (len(groups) + 2) + "|",
        ]
        for m in methods:
            rs = table.get((s, m), {})
            if not rs:
                continue
            loss = [statistics.fmean(r["test"]["groups"][g]["loss"] for r in rs.values())
                    for g in groups]  # fmt: skip
            w = [statistics.fmean((r["weights"].get("average") or {}).get(g, float("nan"))
                                  for r in rs.values()) for g in groups]  # fmt: skip
            lines.append(f"| {m} | " + " | ".join(f"{x:.4f}" for x in loss) + " | "
                         + " / ".join(f"{x:.3f}" for x in w) + " |")  # fmt: skip
        lines.append("")
    if args.lengths:
        s = max(settings, key=lambda k: len(args.settings[k]))
        lines += [f"**Run-length study** ({s}, seeds 0-{args.length_seeds - 1}): Aioli "
                  "(paper protocol) - Stratified in average test loss at each length, and the "
                  "share of batches in LearnParams sweeps.", "",
                  "| length | batches | Stratified avg test loss | Aioli - Stratified "
                  "| sweep share |",
                  "|---|---:|---:|---|---:|"]  # fmt: skip
        for factor in args.lengths:
            tag = "" if factor == 1 else f"@{factor:g}x"
            base = {k: v for k, v in table.get((s, f"stratified{tag}"), {}).items()
                    if k < args.length_seeds}  # fmt: skip
            aio = {k: v for k, v in table.get((s, f"aioli-paper{tag}"), {}).items()
                   if k < args.length_seeds}  # fmt: skip
            d = paired({k: avg_test_loss(v) for k, v in aio.items()},
                       {k: avg_test_loss(v) for k, v in base.items()})  # fmt: skip
            if not base or d is None:
                continue
            steps = next(iter(base.values()))["steps"]
            share = [r["sweep_share"] for r in records
                     if r["setting"] == s and r["method"] == f"aioli-paper{tag}"]  # fmt: skip
            mean_base = statistics.fmean(avg_test_loss(v) for v in base.values())
            lines.append(f"| {factor:g}x | {steps} | {mean_base:.4f} | {d.cell(4)} | "
                         f"{100 * statistics.fmean(share):.0f}% |")  # fmt: skip
        lines.append("")
    results = {"settings": args.settings, "unigram_entropy": entropy, "runs": records}
    return "\n".join(lines), results


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", default=None, help="a converted corpus (default: demo)")
    parser.add_argument("--settings", default=None,
                        help=f"comma list of group subsets: k (first k groups), a+b+c, all "
                             f"(demo default: {DEMO_SETTINGS}; own corpus: all)")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="batches per run (recipe's)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--val-samples", type=int, default=128,
                        help="Aioli's validation sequences per group")  # fmt: skip
    parser.add_argument("--dga-target", default=None, help="default: worst on val")
    parser.add_argument("--restricted-from", default=",".join(SHORT_RUNS))
    parser.add_argument("--no-restricted", dest="restricted", action="store_false")
    parser.add_argument("--lengths", default="0.5,1,2", help="run-length multiples ('' off)")
    parser.add_argument("--length-seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side")
    parser.add_argument("--gpu", action="store_true", help="the GPU (125M) recipes")
    parser.add_argument("--override", action="append", default=[], help="recipe key=value")
    parser.add_argument("--vocab-size", type=int, default=1024, help="demo corpus BPE")
    parser.add_argument("--seq-len", type=int, default=128, help="demo corpus sample length")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--restore-from", type=Path, default=None,
                        help="an earlier quality.json: report, not retrain, its runs")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="2 seeds, 60 batches, 2 settings")
    parser.add_argument("--no-write", dest="write", action="store_false")
    add_report_only(parser)
    args = parser.parse_args(argv)
    check_report_only(args)
    if args.quick:
        args.seeds, args.steps, args.length_seeds = 2, args.steps or 60, 1
        args.lengths = "1,2"
        args.settings = args.settings or ("2,all" if args.manifest else "legal+prose,all")
        args.override = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", *args.override]
    if args.steps is None:
        from mixstream.train.recipe import load_recipe, parse_duration

        recipe = load_recipe(_recipe(args, "stratified"))
        duration = parse_duration(recipe["max_duration"], "max_duration")
        if duration.unit != "ba":
            raise SystemExit(f"the recipe's max_duration is {duration}; pass --steps")
        args.steps = int(duration.value)
    args.methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    args.restricted_from = [m for m in args.restricted_from.split(",") if m]
    args.lengths = [float(x) for x in args.lengths.split(",") if x.strip()]

    out = args.workdir or Path(tempfile.mkdtemp(prefix="mixstream-quality-"))
    with corpus(args.manifest, out, vocab_size=args.vocab_size, seq_len=args.seq_len,
                bucket="quality") as manifest:  # fmt: skip
        from mixstream.manifest import Manifest

        groups = Manifest.load(manifest).group_names
        spec = args.settings or (DEMO_SETTINGS if args.manifest is None else "all")
        args.settings = parse_settings(spec, groups)
        runs = plan_runs(args, manifest, out)
        if args.restore_from is not None:
            restored = restore_runs(runs, args.restore_from)
            print(f"[quality] restored {restored} runs from {args.restore_from}", flush=True)
        if args.report_only:
            done = sum(r.results_file.exists() for r in runs)
            print(f"[quality] reporting {done} of {len(runs)} planned runs in {out}", flush=True)
        else:
            print(f"[quality] {len(runs)} runs into {out}", flush=True)
            run_all(runs, args.jobs, say=lambda m: print(f"[quality] {m}", flush=True))
        entropy = unigram_entropy(manifest, "test", groups)
    markdown, results = report(args, runs, entropy)
    publish("Mixing quality (paired seeds)", markdown, quick=args.quick, write=args.write,
            name="quality", results=results)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
