"""Aioli inside Composer on CPU: live sweeps and updates, rank agreement, exact kill-and-resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from algorithm_harness import fit, rank_fit, read_jsonl, run_script

from mixstream.algorithms import Aioli, AioliConfig, LearnParamsPlan
from mixstream.testing.distributed import run_ranks

# 3 groups: LearnParams = 1 round x 3 sweeps x 2 batches = 6 batches of each 10-batch round,
# from batch 0 (the paper's protocol: no warm-up round).
SMALL = {"update_steps": 10, "lp_rounds": 1, "lp_steps": 2, "one_hot_factor": 0.6, "eta": 1.0,
         "prior_steps": 0}  # fmt: skip


def aioli_spec(run_dir: Path, **extra: object) -> dict:
    kwargs = {**SMALL, "run_dir": str(run_dir), "val_samples_per_group": 8, "log_interval": 5}
    return {"class": "Aioli", "kwargs": {**kwargs, **extra}}


def test_sweeps_and_learned_mixtures_reach_the_dataset_mid_epoch(
    mixture: str, tmp_path: Path
) -> None:
    log = tmp_path / "batches.log"
    _, algorithm = fit(
        {
            "manifest": mixture,
            "max_duration": "25ba",
            "algorithm": aioli_spec(tmp_path / "run"),
            "log_path": str(log),
        }
    )
    dataset = algorithm.mixing_dataset
    assert dataset.batches_per_epoch > 25, "the whole run should be inside one epoch"
    config = AioliConfig.defaults_for(3, **SMALL)
    history = read_jsonl(tmp_path / "run" / "mixture_history.jsonl")
    schedule = {b: np.array(list(w.values())) for b, w in dataset.schedule}
    for round_index in range(3):
        plan = LearnParamsPlan.for_round(config, dataset.seed, round_index)
        for sweep in plan.sweeps:  # every sweep trained exactly on its mixture
            np.testing.assert_allclose(schedule[sweep.start_step], sweep.mixture)
    updates = [r for r in history if r["kind"] == "aioli"]
    assert [r["step"] for r in updates] == [6, 16]
    for row in updates:
        learned = schedule[row["step"] + dataset.update_lag]
        assert not np.allclose(learned, 1 / 3), "eta=1 should move the mixture off uniform"
        assert np.isfinite(np.array(row["A"])).all()
    evals = [r["step"] for r in history if r["kind"] == "val_loss"]
    assert evals == [0, 2, 4, 6, 10, 12, 14, 16, 20, 22, 24]
    weights = json.loads((tmp_path / "run" / "weights.json").read_text())
    np.testing.assert_allclose(list(weights["final"].values()), schedule[17])
    # The batches really follow the sweeps: group 2's sweep is 60% group-2 data.
    rows = read_jsonl(log)
    assert [r["batch"] for r in rows] == list(range(25))


def test_ranks_agree_on_every_decision(mixture: str, tmp_path: Path) -> None:
    cfg = {
        "manifest": mixture,
        "batch_size": 4,  # per rank: global batch 8 as in the 1-rank tests
        "max_duration": "18ba",
        "algorithm": aioli_spec(tmp_path / "run"),
    }
    results = run_ranks(rank_fit, 2, cfg, timeout=600)
    assert results[0]["schedule"] == results[1]["schedule"]
    assert results[0]["method"] == results[1]["method"]
    assert results[0]["method"]["round_index"] == 2


def test_kill_and_resume_restores_the_algorithm_and_the_data_order(
    mixture: str, tmp_path: Path
) -> None:
    base = {"manifest": mixture, "max_duration": "22ba", "save_interval": "4ba"}
    run_script(
        {
            **base,
            "algorithm": aioli_spec(tmp_path / "ref-run"),
            "save_folder": str(tmp_path / "ref-ckpt"),
            "log_path": str(tmp_path / "ref.log"),
        },
        tmp_path,
        "ref",
    )
    crash = {
        **base,
        "algorithm": aioli_spec(tmp_path / "run"),
        "save_folder": str(tmp_path / "ckpt"),
        "autoresume": True,
    }
    # Killed mid-round (round 1's LearnParams runs from batch 10 to 16).
    killed_log, resumed_log = tmp_path / "killed.log", tmp_path / "resumed.log"
    run_script({**crash, "kill_at": 14, "log_path": str(killed_log)}, tmp_path, "k", True)
    run_script({**crash, "log_path": str(resumed_log)}, tmp_path, "resumed")

    reference = read_jsonl(tmp_path / "ref.log")
    assert read_jsonl(killed_log) == reference[:14]
    resumed = read_jsonl(resumed_log)
    assert [r["batch"] for r in resumed] == list(range(12, 22))  # last checkpoint: batch 12
    assert resumed == reference[12:]

    def decisions(path: Path) -> list[tuple]:
        rows = read_jsonl(path / "mixture_history.jsonl")
        return [
            (r["step"], r["kind"], json.dumps(r.get("weights") or r.get("A")))
            for r in rows
            if r["kind"] in ("weights", "aioli")
        ]

    assert decisions(tmp_path / "run") == decisions(tmp_path / "ref-run")
    ref_final = json.loads((tmp_path / "ref-run" / "weights.json").read_text())
    final = json.loads((tmp_path / "run" / "weights.json").read_text())
    assert final["schedule"] == ref_final["schedule"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eta": 0.0}, "eta must be a finite number > 0"),
        ({"eta": -1.0}, "eta must be a finite number > 0"),
        ({"one_hot_factor": 1 / 3}, "W is singular"),
        ({"update_steps": 6, "lp_rounds": 1, "lp_steps": 2}, "leaves none of update_steps"),
        ({"prior": {"delta": 1.0}}, "unknown group"),
    ],
)
def test_bad_configuration_fails_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Aioli(groups=["alpha", "beta", "gamma"], **kwargs)


def test_rounds_too_short_for_the_update_lag_fail_before_training(
    mixture: str, tmp_path: Path
) -> None:
    spec = aioli_spec(tmp_path / "run", update_steps=8)  # 2 batches left; lag with 2 workers: 5
    with pytest.raises(ValueError, match="fewer than the dataset's update lag"):
        fit({"manifest": mixture, "num_workers": 2, "max_duration": "4ba", "algorithm": spec})
