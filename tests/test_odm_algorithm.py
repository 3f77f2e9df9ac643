"""The ODM Composer algorithm on CPU: settings, the bandit fed by the training forward pass
(the same per-group losses the run logs), replay against the pure rule, two ranks agreeing
on pooled losses, and exact kill-and-resume (dropout on)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from algorithm_harness import fit, kill_and_resume, rank_fit
from mixture_harness import GROUPS

from mixstream.algorithms import ODM, ODMConfig, ODMState
from mixstream.mixing.history import read_history
from mixstream.testing.distributed import run_ranks

STEPS = 12
WARMUP = 2


def odm_spec(run_dir: Path, **extra: Any) -> dict[str, Any]:
    kwargs = {"warmup_steps": WARMUP, "run_dir": str(run_dir), "log_interval": 1}
    return {"class": "ODM", "kwargs": {**kwargs, **extra}}


@pytest.fixture(scope="module")
def reference(mixture: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("odm-reference")
    cfg = {"manifest": mixture, "max_duration": f"{STEPS}ba", "algorithm": odm_spec(tmp / "run")}
    _, algorithm = fit(cfg)
    return {"tmp": tmp, "algorithm": algorithm, "rows": read_history(tmp / "run")}


# ----------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reward_scale": 0.0}, "ODM reward_scale must be a finite number > 0"),
        ({"reward_scale": math.nan}, "ODM reward_scale must be a finite number > 0"),
        ({"warmup_steps": -1}, "ODM warmup_steps must be >= 0"),
        ({"warmup_steps": 2.5}, "ODM warmup_steps must be an integer"),
        ({"groups": GROUPS, "initial_weights": {"delta": 1.0}}, "unknown group"),
    ],
)
def test_bad_configuration_fails_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ODM(**kwargs)


# ----------------------------------------------------------------------- end to end
def test_bandit_learns_from_the_logged_training_losses(reference: dict[str, Any]) -> None:
    algorithm, rows = reference["algorithm"], reference["rows"]
    dataset = algorithm.mixing_dataset
    odm = [r for r in rows if r["kind"] == "odm"]
    assert [r["step"] for r in odm] == list(range(WARMUP + 1, STEPS + 1))
    # The losses ODM learnt from are the run's per-group training losses of that batch
    # (log_interval=1): one signal from the training forward pass, not a second one.
    train = {r["step"]: r["losses"] for r in rows if r["kind"] == "train_loss"}
    for r in odm:
        assert r["train_loss"] == pytest.approx(train[r["step"]], rel=1e-12)
        assert sum(r["tokens"].values()) == 8 * 31  # 8 sequences x 31 predicted tokens
    # Replaying the pure rule on the logged losses and drawn weights gives every decision.
    schedule = dataset.weight_schedule
    state = ODMState.initial(ODMConfig(num_groups=3, warmup_steps=WARMUP))
    weights = [r for r in rows if r["kind"] == "weights"]
    assert [r["step"] for r in weights] == [r["step"] for r in odm]
    for r, w in zip(odm, weights, strict=True):
        drawn = schedule.at(r["step"] - 1)
        assert list(r["drawn"].values()) == pytest.approx(list(drawn), rel=1e-12)
        losses = [math.nan if r["train_loss"][g] is None else r["train_loss"][g] for g in GROUPS]
        policy = state.update(ODMConfig(3, warmup_steps=WARMUP), r["step"], losses, drawn)
        assert list(w["weights"].values()) == pytest.approx(list(policy), rel=1e-9)
        assert w["effective_step"] == r["step"] + dataset.update_lag
        np.testing.assert_allclose(schedule.at(w["effective_step"]), policy, rtol=1e-9)
    assert state.rewards == pytest.approx(algorithm.mixer.bandit.rewards, rel=1e-12)
    assert not np.allclose(schedule.at(STEPS), 1 / 3)  # the mixture moved off uniform
    saved = json.loads((reference["tmp"] / "run" / "weights.json").read_text())
    assert saved["method"] == "ODM" and saved["odm"]["updates"] == STEPS - WARMUP


def test_initial_weights_are_sampled_through_the_warmup(mixture: str, tmp_path: Path) -> None:
    start = {"alpha": 0.6, "beta": 0.3, "gamma": 0.1}
    cfg = {
        "manifest": mixture,
        "max_duration": "4ba",
        "algorithm": odm_spec(tmp_path / "run", warmup_steps=3, initial_weights=start),
    }
    _, algorithm = fit(cfg)
    schedule = algorithm.mixing_dataset.schedule
    assert schedule[0] == (0, pytest.approx(start))
    assert [b for b, _ in schedule] == [0, 4 + algorithm.mixing_dataset.update_lag]


def test_two_ranks_pool_their_losses_and_agree(mixture: str, tmp_path: Path) -> None:
    cfg = {
        "manifest": mixture,
        "batch_size": 4,  # per rank: global batch 8 as in the 1-rank tests
        "max_duration": "6ba",
        "algorithm": odm_spec(tmp_path / "run"),
    }
    results = run_ranks(rank_fit, 2, cfg, timeout=300)
    assert results[0]["schedule"] == results[1]["schedule"]
    assert results[0]["method"] == results[1]["method"]
    assert results[0]["method"]["updates"] == 6 - WARMUP
    odm = [r for r in read_history(tmp_path / "run") if r["kind"] == "odm"]
    for r in odm:  # both ranks' sequences: 2 ranks x 4 sequences x 31 predicted tokens
        assert sum(r["tokens"].values()) == 8 * 31


def test_kill_and_resume_continues_exactly(mixture: str, tmp_path: Path) -> None:
    """SIGKILL at batch 10 (in a child process); autoresume from batch 8 here."""
    base = {"manifest": mixture, "max_duration": "14ba", "save_interval": "4ba"}
    reference, resumed = kill_and_resume(base, odm_spec, tmp_path)
    assert [r["batch"] for r in resumed] == list(range(8, 14))  # last checkpoint: batch 8
    assert resumed == reference[8:]

    def decisions(run: Path) -> list[tuple]:
        rows = read_history(run)
        return [(r["step"], r["kind"], json.dumps(r.get("weights") or r.get("rewards")))
                for r in rows if r["kind"] in ("weights", "odm")]  # fmt: skip

    assert decisions(tmp_path / "run") == decisions(tmp_path / "ref-run")
    final = json.loads((tmp_path / "run" / "weights.json").read_text())
    ref_final = json.loads((tmp_path / "ref-run" / "weights.json").read_text())
    assert final["schedule"] == ref_final["schedule"]
