"""The ADO Composer algorithm on CPU: settings, power laws refit online from the training
forward pass (the run's own per-group losses), replay against the pure rule, two ranks
agreeing on pooled losses, and exact kill-and-resume (dropout on)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from algorithm_harness import fit, kill_and_resume, rank_fit
from mixture_harness import GROUPS

from mixstream.algorithms import ADO, ADOConfig, ADOState, ado_update
from mixstream.mixing.history import read_history
from mixstream.testing.distributed import run_ranks

STEPS = 12
SMALL = {"warmup_steps": 6, "ignore_steps": 2, "fit_interval": 3}  # fits at 6, 9, 12


def ado_spec(run_dir: Path, **extra: Any) -> dict[str, Any]:
    kwargs = {**SMALL, "run_dir": str(run_dir), "log_interval": 1}
    return {"class": "ADO", "kwargs": {**kwargs, **extra}}


@pytest.fixture(scope="module")
def reference(mixture: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("ado-reference")
    cfg = {"manifest": mixture, "max_duration": f"{STEPS}ba", "algorithm": ado_spec(tmp / "run")}
    _, algorithm = fit(cfg)
    return {"tmp": tmp, "algorithm": algorithm, "rows": read_history(tmp / "run")}


# ----------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"warmup_steps": 0}, "ADO warmup_steps must be >= 1"),
        ({"warmup_steps": 4, "ignore_steps": 2}, "ADO warmup_steps=4 must exceed ignore_steps=2"),
        ({"fit_interval": 0}, "ADO fit_interval must be >= 1"),
        ({"policy_ema": 1.0}, r"ADO policy_ema must be in \[0, 1\)"),
        ({"min_prob": 0.5, "groups": GROUPS}, "ADO min_prob=0.5 is more than 1/num_groups"),
        ({"counts": "samples"}, "ADO counts must be one of total, group"),
        ({"groups": GROUPS, "prior": {"delta": 1.0}}, "unknown group"),
    ],
)
def test_bad_configuration_fails_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ADO(**kwargs)


# ----------------------------------------------------------------------- end to end
def test_laws_are_fit_to_the_logged_training_losses(reference: dict[str, Any]) -> None:
    algorithm, rows = reference["algorithm"], reference["rows"]
    dataset, state = algorithm.mixing_dataset, algorithm.mixer.ado
    assert state.steps == STEPS and state.fits == 3
    # The points of the laws are the run's per-group training losses of each batch
    # (log_interval=1): one signal from the training forward pass, not a second one.
    train = [r["losses"] for r in rows if r["kind"] == "train_loss"]
    assert len(train) == STEPS
    for logged, recorded in zip(train, state.losses, strict=True):
        got = [math.nan if logged[g] is None else logged[g] for g in GROUPS]
        np.testing.assert_allclose(recorded, got, rtol=1e-12)
    assert all(sum(r) == 8 * 31 for r in state.tokens)  # 8 sequences x 31 predicted tokens
    assert [r["step"] for r in rows if r["kind"] == "ado_fit"] == [6, 9, 12]
    ado = [r for r in rows if r["kind"] == "ado"]
    assert [r["step"] for r in ado] == list(range(6, STEPS + 1))
    # Replaying the pure rule on the recorded points gives every decision.
    config = ADOConfig(num_groups=3, prior=tuple(state.prior), **SMALL)
    replay = ADOState.initial(config)
    weights = [r for r in rows if r["kind"] == "weights"]
    assert [r["step"] for r in weights] == [r["step"] for r in ado]
    decisions = iter(weights)
    for step, (tokens, losses) in enumerate(zip(state.tokens, state.losses, strict=True), 1):
        mixture = ado_update(config, replay, step, tokens, losses)
        assert (mixture is None) == (step < 6)
        if mixture is not None:
            w = next(decisions)
            assert list(w["weights"].values()) == pytest.approx(list(mixture), rel=1e-9)
            assert w["effective_step"] == step + dataset.update_lag
    assert replay.state_dict() == state.state_dict()
    saved = json.loads((reference["tmp"] / "run" / "weights.json").read_text())
    assert saved["method"] == "ADO" and saved["ado"]["fits"] == 3
    assert set(saved["ado"]["laws"]) == set(GROUPS)


def test_prior_is_sampled_through_the_warmup(mixture: str, tmp_path: Path) -> None:
    prior = {"alpha": 0.6, "beta": 0.3, "gamma": 0.1}
    cfg = {"manifest": mixture, "max_duration": "6ba",
           "algorithm": ado_spec(tmp_path / "run", prior=prior)}  # fmt: skip
    _, algorithm = fit(cfg)
    schedule = algorithm.mixing_dataset.schedule
    assert schedule[0] == (0, pytest.approx(prior))
    assert [b for b, _ in schedule] == [0, 6 + algorithm.mixing_dataset.update_lag]
    assert algorithm.mixer.ado.prior == pytest.approx(list(prior.values()))


def test_two_ranks_pool_their_losses_and_agree(mixture: str, tmp_path: Path) -> None:
    cfg = {
        "manifest": mixture,
        "batch_size": 4,  # per rank: global batch 8 as in the 1-rank tests
        "max_duration": "8ba",
        "algorithm": ado_spec(tmp_path / "run"),
    }
    results = run_ranks(rank_fit, 2, cfg, timeout=300)
    assert results[0]["schedule"] == results[1]["schedule"]
    assert results[0]["method"] == results[1]["method"]
    state = results[0]["method"]
    assert state["fits"] == 1 and len(results[0]["schedule"]) == 4  # start + steps 6, 7, 8
    # both ranks' sequences in every point: 2 ranks x 4 sequences x 31 predicted tokens
    assert all(sum(r) == 8 * 31 for r in state["tokens"])


def test_kill_and_resume_continues_exactly(mixture: str, tmp_path: Path) -> None:
    """SIGKILL at batch 10 (in a child process); autoresume from batch 8 here."""
    base = {"manifest": mixture, "max_duration": "14ba", "save_interval": "4ba"}
    reference, resumed = kill_and_resume(base, ado_spec, tmp_path)
    assert [r["batch"] for r in resumed] == list(range(8, 14))  # last checkpoint: batch 8
    assert resumed == reference[8:]

    def decisions(run: Path) -> list[tuple]:
        rows = read_history(run)
        return [(r["step"], r["kind"], json.dumps(r.get("weights") or r.get("alpha")))
                for r in rows if r["kind"] in ("weights", "ado_fit")]  # fmt: skip

    assert decisions(tmp_path / "run") == decisions(tmp_path / "ref-run")
    final = json.loads((tmp_path / "run" / "weights.json").read_text())
    ref_final = json.loads((tmp_path / "ref-run" / "weights.json").read_text())
    assert final["schedule"] == ref_final["schedule"] and final["ado"] == ref_final["ado"]
