"""The DoGE Composer algorithm (the proxy run) on CPU: settings, updates replayed against the
pure rule from the logged probe measurements, the probe against a backward pass, the
time-averaged weights in weights.json, two ranks agreeing, and exact kill-and-resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from algorithm_harness import fit, kill_and_resume, rank_fit
from mixture_harness import GROUPS

from mixstream.algorithms import DoGE, DoGEState, doge_scores
from mixstream.composer.model import MixtureLM
from mixstream.composer.probes import probe_gradients
from mixstream.mixing.history import read_history
from mixstream.testing.distributed import run_ranks

STEPS = 8
KWARGS = {"update_steps": 2, "probe_batch_size": 2, "probe_samples_per_group": 8, "mu": 0.01,
          "log_interval": 1}  # fmt: skip


def spec(run_dir: Path, **extra: Any) -> dict[str, Any]:
    return {"class": "DoGE", "kwargs": {**KWARGS, "run_dir": str(run_dir), **extra}}


@pytest.fixture(scope="module")
def reference(mixture: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("doge-reference")
    cfg = {"manifest": mixture, "max_duration": f"{STEPS}ba", "algorithm": spec(tmp / "run")}
    _, algorithm = fit(cfg)
    return {"tmp": tmp, "algorithm": algorithm, "rows": read_history(tmp / "run")}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mu": 0.0}, "DoGE mu must be a finite number > 0"),
        ({"dw_min": 1.0, "dw_max": 0.5}, "DoGE needs finite dw_min <= dw_max"),
        ({"max_grad_norm": -1.0}, "DoGE max_grad_norm must be a finite number > 0"),
        ({"smoothing": 1.0}, "DoGE smoothing must be in [0, 1)"),
        ({"objective": "mix"}, "DoGE objective must be one of reweight_loss, resample"),
        ({"update_steps": 0}, "DoGE update_steps must be an integer >= 1"),
        ({"probe_batch_size": 1.5}, "DoGE probe_batch_size must be an integer >= 1"),
        ({"target": ["alpha"]}, "DoGE target= must be one group name"),
        ({"groups": GROUPS, "initial_weights": {"delta": 1.0}}, "unknown group"),
    ],
)
def test_bad_configuration_fails_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        DoGE(**kwargs)
    assert message in str(info.value)


def test_probe_gradients_match_backward() -> None:
    torch.manual_seed(0)
    model = MixtureLM("gpt2", 257, 32, n_layer=1, n_head=2, n_embd=32)
    g = torch.Generator().manual_seed(3)
    *groups, target = [{"input_ids": torch.randint(0, 257, (2, 32), generator=g)} for _ in range(3)]

    def grad(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        model.zero_grad()
        model.loss(model(batch), batch).backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()

    result = probe_gradients(model, groups, target)
    t = grad(target)
    assert result.target_norm == pytest.approx(float(t.norm()), rel=1e-4)
    for i, batch in enumerate(groups):
        gi = grad(batch)
        assert result.inner[i] == pytest.approx(float(gi @ t), rel=1e-4)
        assert result.group_norms[i] == pytest.approx(float(gi.norm()), rel=1e-4)


def test_updates_follow_the_rule_and_average_into_weights_json(
    reference: dict[str, Any],
) -> None:
    algorithm, rows = reference["algorithm"], reference["rows"]
    updates = [r for r in rows if r["kind"] == "doge"]
    assert [r["step"] for r in updates] == list(range(2, STEPS + 1, 2))
    state = DoGEState.initial([1 / 3] * 3)
    for r in updates:
        inner = [r["inner"][g] for g in GROUPS]
        norms = [r["grad_norms"][g] for g in GROUPS]
        scores = doge_scores(inner, norms, r["target_norm"], r["lr"])
        np.testing.assert_allclose([r["scores"][g] for g in GROUPS], scores, rtol=1e-12)
        w = state.update(scores, mu=0.01)
        np.testing.assert_allclose([r["weights"][g] for g in GROUPS], w, rtol=1e-12)
    assert not np.allclose(state.weights, 1 / 3)  # the weights moved
    # reweight_loss: the data stays uniform; the output is the average of the weights.
    schedule = algorithm.mixing_dataset.schedule
    assert len(schedule) == 1 and schedule[0][1] == pytest.approx({g: 1 / 3 for g in GROUPS})
    saved = json.loads((reference["tmp"] / "run" / "weights.json").read_text())
    assert saved["method"] == "DoGE" and saved["doge"]["updates"] == len(updates)
    assert list(saved["average"].values()) == pytest.approx(list(state.average), rel=1e-9)
    assert list(saved["final"].values()) == pytest.approx(state.weights, rel=1e-9)


def test_resample_hands_the_weights_to_the_dataset(mixture: str, tmp_path: Path) -> None:
    cfg = {"manifest": mixture, "max_duration": "4ba",
           "algorithm": spec(tmp_path / "run", objective="resample", target="beta")}  # fmt: skip
    _, algorithm = fit(cfg)
    schedule = algorithm.mixing_dataset.schedule
    assert [b for b, _ in schedule][1:] == [s + algorithm.mixing_dataset.update_lag for s in (2, 4)]
    assert list(schedule[-1][1].values()) == pytest.approx(algorithm.doge.weights)


def test_two_ranks_agree(mixture: str, tmp_path: Path) -> None:
    cfg = {"manifest": mixture, "batch_size": 4, "max_duration": "4ba",
           "algorithm": spec(tmp_path / "run", objective="resample")}  # fmt: skip
    results = run_ranks(rank_fit, 2, cfg, timeout=900)  # a bound on a hang, not a timing check
    assert results[0]["schedule"] == results[1]["schedule"]
    assert results[0]["method"] == results[1]["method"]
    assert results[0]["method"]["doge"]["updates"] == 2


def test_kill_and_resume_continues_exactly(mixture: str, tmp_path: Path) -> None:
    """SIGKILL at batch 10 (in a child process); autoresume from batch 8 here."""
    base = {"manifest": mixture, "max_duration": "12ba", "save_interval": "4ba"}
    reference, resumed = kill_and_resume(base, spec, tmp_path)
    assert resumed == reference[8:]

    def decisions(run: Path) -> list[str]:
        return [json.dumps(r) for r in read_history(run) if r["kind"] in ("doge", "weights")]

    assert decisions(tmp_path / "run") == decisions(tmp_path / "ref-run")
    final = json.loads((tmp_path / "run" / "weights.json").read_text())
    ref_final = json.loads((tmp_path / "ref-run" / "weights.json").read_text())
    assert final["average"] == ref_final["average"]
    assert final["doge"] == ref_final["doge"]
