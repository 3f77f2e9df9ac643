"""The quality benchmark's protocol pieces, and a tiny end-to-end run on a user's corpus."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks._training import schedule_overrides
from benchmarks.quality import aioli_overrides, parse_settings, plan_runs
from mixstream.algorithms.aioli import AioliConfig
from mixstream.mixing.signals import GroupSamples, sample_indices
from mixstream.train.stats import Paired, paired, relative_sd, t975

REPO = Path(__file__).resolve().parents[1]


def test_paired_interval_matches_hand_computation() -> None:
    d = paired({0: 1.10, 1: 1.00, 2: 1.30}, {0: 1.00, 1: 1.05, 2: 1.10, 3: 9.0})
    assert d is not None and d.n == 3  # seed 3 has no partner: left out
    deltas = [0.10, -0.05, 0.20]
    assert d.deltas == pytest.approx(deltas)
    half = 4.303 * statistics.stdev(deltas) / math.sqrt(3)
    assert d.half_width == pytest.approx(half)
    assert d.wins == 1
    assert not d.significant  # mean 0.083 < half width 0.31
    assert d.cell(2).endswith("1/3 (noise)")
    clear = Paired((-0.10, -0.11, -0.09, -0.10, -0.12))
    assert clear.significant and clear.wins == 5 and "(noise)" not in clear.cell()


def test_t_quantiles_and_relative_sd() -> None:
    assert t975(1) == pytest.approx(12.706)
    assert t975(4) == pytest.approx(2.776)
    assert t975(1000) == pytest.approx(1.96)
    assert relative_sd([2.0, 2.0, 2.0]) == 0.0
    assert relative_sd([1.0, 3.0]) == pytest.approx(statistics.stdev([1, 3]) / 2)


def test_settings_name_groups_numbers_or_all() -> None:
    groups = ["code", "docs", "legal", "prose"]
    settings = parse_settings("legal+prose,3,all", groups)
    assert settings == {
        "legal+prose": ["legal", "prose"],
        "code+docs+legal": ["code", "docs", "legal"],
        "code+docs+legal+prose": groups,
    }
    for bad, message in (("law+code", "no group"), ("5", "only 4"), ("code", "at least 2")):
        with pytest.raises(SystemExit, match=message):
            parse_settings(bad, groups)


def test_aioli_keeps_the_paper_settings_unless_a_run_cannot_hold_two_rounds() -> None:
    extra, note = aioli_overrides(3, 1000, 128)
    assert note == "paper settings" and extra == ["data.val_samples_per_group=128"]
    extra, note = aioli_overrides(2, 100, 64)
    assert "algorithm.update_steps=50" in extra and "algorithm.lp_steps=1" in extra
    assert "algorithm.lp_rounds=4" in extra and "scaled x0.20" in note
    AioliConfig.defaults_for(2, update_steps=50, lp_steps=1)  # valid
    extra, _ = aioli_overrides(2, 15, 64)  # 7-batch rounds: one repetition of 1-batch sweeps
    assert "algorithm.lp_rounds=1" in extra and "algorithm.update_steps=7" in extra
    with pytest.raises(SystemExit, match="too short"):
        aioli_overrides(4, 6, 64)


def test_odm_and_ado_schedules_scale_with_the_run_length() -> None:
    recipes = REPO / "recipes"
    # cpu-odm: warmup 50 of 1000 batches; cpu-ado: warmup 100, ignore 50, refit every 50
    assert schedule_overrides(recipes / "cpu-odm.yaml", 1000) == []
    assert schedule_overrides(recipes / "cpu-odm.yaml", 60) == ["algorithm.warmup_steps=3"]
    assert schedule_overrides(recipes / "cpu-ado.yaml", 60) == [
        "algorithm.warmup_steps=6", "algorithm.ignore_steps=3", "algorithm.fit_interval=3"
    ]  # fmt: skip
    # ADO's first fit keeps 3 batches after the ignored ones; a refit interval stays >= 1
    assert schedule_overrides(recipes / "cpu-ado.yaml", 10) == [
        "algorithm.warmup_steps=3", "algorithm.ignore_steps=0", "algorithm.fit_interval=1"
    ]  # fmt: skip
    assert schedule_overrides(recipes / "cpu-stratified.yaml", 60) == []


def test_odm_and_ado_rows_are_planned_next_to_stratified(tmp_path: Path) -> None:
    args = argparse.Namespace(
        settings={"a+b": ["a", "b"]}, seeds=2, steps=60, methods=["stratified", "odm", "ado"],
        override=[], restricted=False, restricted_from=[], lengths=[], length_seeds=1,
        gpu=False, val_samples=8, dga_target=None,
    )  # fmt: skip
    runs = {r.name: r for r in plan_runs(args, "MANIFEST", tmp_path)}
    assert sorted(runs) == sorted(f"a+b/{m}/s{s}" for m in args.methods for s in (0, 1))
    odm, ado = runs["a+b/odm/s1"], runs["a+b/ado/s1"]
    assert odm.recipe.name == "cpu-odm.yaml" and "algorithm.warmup_steps=3" in odm.overrides
    assert ado.recipe.name == "cpu-ado.yaml" and "algorithm.fit_interval=3" in ado.overrides
    assert "seed=1" in ado.overrides and not ado.after  # no reference run, no target


def test_skillit_and_doge_schedules_scale_with_the_run_length() -> None:
    recipes = REPO / "recipes"
    # cpu-skillit: updates every 100 of 1000 batches after a 4 x 10-batch graph phase
    assert schedule_overrides(recipes / "cpu-skillit.yaml", 60) == [
        "algorithm.update_steps=6", "algorithm.graph_steps=1"
    ]  # fmt: skip
    assert schedule_overrides(recipes / "cpu-skillit.yaml", 5) == [
        "algorithm.update_steps=1", "algorithm.graph_steps=1"  # never below one batch
    ]  # fmt: skip
    assert schedule_overrides(recipes / "cpu-doge-proxy.yaml", 200) == ["algorithm.update_steps=2"]


def test_skillit_runs_alone_and_doge_is_a_proxy_then_a_main_run(tmp_path: Path) -> None:
    args = argparse.Namespace(
        settings={"a+b": ["a", "b"]}, seeds=2, steps=60, methods=["stratified", "skillit", "doge"],
        override=[], restricted=False, restricted_from=[], lengths=[], length_seeds=1,
        gpu=False, val_samples=8, dga_target=None,
    )  # fmt: skip
    runs = {r.name: r for r in plan_runs(args, "MANIFEST", tmp_path)}
    methods = ["stratified", "skillit", "doge-proxy", "doge"]
    assert sorted(runs) == sorted(f"a+b/{m}/s{s}" for m in methods for s in (0, 1))
    skillit = runs["a+b/skillit/s1"]
    assert skillit.recipe.name == "cpu-skillit.yaml" and not skillit.after
    assert "algorithm.update_steps=6" in skillit.overrides and "seed=1" in skillit.overrides
    assert "data.val_samples_per_group=8" in skillit.overrides
    proxy, main = runs["a+b/doge-proxy/s1"], runs["a+b/doge/s1"]
    assert proxy.recipe.name == "cpu-doge-proxy.yaml" and not proxy.after
    assert "algorithm.update_steps=1" in proxy.overrides  # 10 of 1000 -> 0.6 of 60, at least 1
    assert main.recipe.name == "cpu-doge-main.yaml" and main.after == [proxy.name]
    assert f"algorithm.weights_file={proxy.run_dir / 'weights.json'}" in main.overrides
    assert "seed=1" in main.overrides and "seed=1" in proxy.overrides


def test_sweep_share_counts_learnparams_batches() -> None:
    config = AioliConfig.defaults_for(4, prior_steps=0)  # 4 x 4 groups x 6 steps = 96 of 250
    assert config.lp_duration == 96
    assert config.sweep_share(1000) == pytest.approx(4 * 96 / 1000)
    assert config.sweep_share(50) == 1.0
    assert config.sweep_share(300) == pytest.approx((96 + 50) / 300)
    warm = AioliConfig.defaults_for(4)  # the default: one round of warm-up
    assert warm.prior_steps == warm.update_steps == 250
    assert warm.sweep_share(250) == 0.0
    assert warm.sweep_share(1000) == pytest.approx(3 * 96 / 1000)


def test_held_out_sample_is_seeded_and_spread_over_the_split() -> None:
    picks = sample_indices(10_000, 128, 0, "val", "code")
    assert len(set(picks.tolist())) == 128 and list(picks) == sorted(picks)
    assert picks.max() > 5_000  # not the split's head
    assert np.array_equal(picks, sample_indices(10_000, 128, 0, "val", "code"))
    assert not np.array_equal(picks, sample_indices(10_000, 128, 0, "val", "docs"))
    assert not np.array_equal(picks, sample_indices(10_000, 128, 1, "val", "code"))
    assert np.array_equal(sample_indices(50, 128, 0, "val", "code"), np.arange(50))
    assert np.array_equal(sample_indices(50, None, 0, "val", "code"), np.arange(50))


def test_group_samples_read_the_seeded_sample(mixture: str) -> None:
    head = GroupSamples(mixture, "train", ["alpha"], samples_per_group=None)
    some = GroupSamples(mixture, "train", ["alpha"], samples_per_group=8)
    n = len(head.samples[0])
    picks = sample_indices(n, 8, 0, "train", "alpha")
    assert picks.max() >= 8  # differs from the first 8 sequences
    for got, index in zip(some.samples[0], picks, strict=True):
        assert np.array_equal(got["input_ids"], head.samples[0][int(index)]["input_ids"])


@pytest.mark.slow
def test_runs_of_an_earlier_report_are_restored_and_their_inputs_not_retrained(
    tmp_path: Path,
) -> None:
    """On a new machine, ``--restore-from quality.json``: the runs it holds are reported as
    they were, and a DoReMi proxy whose main run is restored is not trained for nothing."""
    args = argparse.Namespace(
        settings={"a+b": ["a", "b"]}, seeds=1, steps=60,
        methods=["stratified", "aioli", "aioli-paper", "doremi"], override=[],
        restricted=False, restricted_from=[], lengths=[], length_seeds=1, gpu=False,
        val_samples=8, dga_target=None,
    )  # fmt: skip
    runs = plan_runs(args, "MANIFEST", tmp_path)
    by_name = {r.name: r for r in runs}
    assert "algorithm.prior_steps=0" in by_name["a+b/aioli-paper/s0"].overrides
    assert not any("prior_steps" in o for o in by_name["a+b/aioli/s0"].overrides)
    record = {"setting": "a+b", "seed": 0, "steps": 60, "sweep_share": 0.0,
              "group_test_loss": {"a": 4.0, "b": 5.0},
              "weights_average": {"a": 0.5, "b": 0.5}}  # fmt: skip
    earlier = tmp_path / "quality.json"
    earlier.write_text(json.dumps({
        "date": "then", "machine": {"git": "abc"},
        "runs": [{**record, "method": m} for m in ("stratified", "doremi", "aioli-paper")]
        + [{**record, "method": "aioli", "seed": 7}],  # not planned: ignored
    }))  # fmt: skip
    from benchmarks._training import _only_feeds_finished
    from benchmarks.quality import restore_runs

    assert restore_runs(runs, earlier) == 3
    assert restore_runs(runs, earlier) == 0  # never over a run that has results
    assert by_name["a+b/doremi/s0"].results()["restored_from"] == f"{earlier} (commit abc, then)"
    assert by_name["a+b/aioli-paper/s0"].sweep_share == 0.0
    assert _only_feeds_finished(by_name["a+b/doremi-proxy/s0"], runs)
    assert not _only_feeds_finished(by_name["a+b/aioli/s0"], runs)  # still to train
    by_name["a+b/stratified/s0"].results_file.unlink()  # read by finished runs, but reported
    assert not _only_feeds_finished(by_name["a+b/stratified/s0"], runs)


def test_quick_quality_run_on_a_corpus_converted_from_jsonl(tmp_path: Path) -> None:
    """``shard-tools convert`` any JSONL, then ``benchmarks.quality --quick --manifest``."""
    rng = np.random.default_rng(0)
    words = {
        "law": ["court", "shall", "party", "agreement", "hereby", "pursuant", "clause"],
        "code": ["def", "return", "self", "import", "lambda", "yield", "class"],
    }
    args = []
    for group, vocab in words.items():
        path = tmp_path / f"{group}.jsonl"
        with path.open("w") as f:
            for _ in range(240):
                text = " ".join(rng.choice(vocab, size=int(rng.integers(40, 120))))
                f.write(json.dumps({"text": text}) + "\n")
        args += ["--group", f"{group}={path}"]
    corpus = tmp_path / "corpus"
    subprocess.run(
        [sys.executable, "-m", "shard_tools.cli", "convert", str(corpus), *args,
         "--tokenizer", "byte", "--seq-len", "32"],
        check=True, capture_output=True,
    )  # fmt: skip
    work = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.quality", "--quick", "--no-write",
         "--manifest", str(corpus), "--methods", "stratified,aioli", "--no-restricted",
         "--workdir", str(work), "--jobs", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "| code+law |" in out and "| aioli | " in out
    assert "Run-length study" in out and "| 2x | 120 |" in out
    runs = sorted(p.relative_to(work / "runs").parts for p in (work / "runs").rglob("results.json"))
    assert ("code+law", "aioli", "s0", "results.json") in runs
    assert ("code+law", "aioli-paper@2x", "s0", "results.json") in runs
    weights = json.loads((work / "runs/code+law/aioli/s1/weights.json").read_text())
    assert 0 < weights["aioli"]["sweep_share"] < 1


def _demo_run(losses: dict[str, float], steps: int = 1000) -> dict:
    return {"steps": steps, "test": {"groups": {g: {"loss": v} for g, v in losses.items()}}}


def test_demo_prints_its_difference_with_the_recorded_seed_noise(tmp_path: Path) -> None:
    from mixstream.train.demo import noise_band

    results = {
        "stratified": _demo_run({"a": 4.00, "b": 5.00}),
        "aioli": _demo_run({"a": 4.01, "b": 5.01}),  # +0.01 nats
    }
    recorded = tmp_path / "quality.json"
    assert "no seed spread recorded" in noise_band(results, recorded)
    rows = []
    for seed, delta in enumerate([0.02, -0.01, 0.03, 0.00, 0.01]):
        rows.append({"setting": "a+b", "method": "stratified", "seed": seed, "steps": 1000,
                     "avg_test_loss": 4.5 + seed / 1000})  # fmt: skip
        rows.append({"setting": "a+b", "method": "aioli", "seed": seed, "steps": 1000,
                     "avg_test_loss": 4.5 + seed / 1000 + delta})  # fmt: skip
    rows.append({"setting": "a+b", "method": "aioli", "seed": 9, "steps": 500,
                 "avg_test_loss": 99.0})  # another length: not this recipe  # fmt: skip
    recorded.write_text(json.dumps({"runs": rows}))
    text = noise_band(results, recorded)
    sd = statistics.stdev([0.02, -0.01, 0.03, 0.00, 0.01])
    assert f"sd {sd:.4f}" in text and "5 paired seeds" in text
    assert "=> within noise" in text
    results["aioli"] = _demo_run({"a": 4.20, "b": 5.20})
    assert "=> outside the seed noise" in noise_band(results, recorded)
