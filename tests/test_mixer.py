"""The framework-free ``Mixer`` driver: a plain loop over a DataLoader (no Composer), every
method's decisions against its pure rule, exact resume from ``state_dict``, the API's
refusals, and ``recipes/torchrun_example.py`` under torchrun (2 CPU ranks) killed and
resumed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mixture_harness import GROUPS
from torch.utils.data import DataLoader

from mixstream import DynamicStreamingDataset
from mixstream.algorithms import ODMConfig, ODMState
from mixstream.mixing import MIXERS, Mixer, ODMMixer, read_history
from mixstream.testing.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "recipes" / "torchrun_example.py"
#: short-run settings: every method decides several times in 16 batches
OPTIONS: dict[str, dict[str, Any]] = {
    "odm": {"warmup_steps": 1},
    "ado": {"warmup_steps": 4, "ignore_steps": 0, "fit_interval": 2},
    "aioli": {"update_steps": 6, "lp_rounds": 1, "lp_steps": 1, "prior_steps": 0},
    "skillit": {"update_steps": 4, "graph_steps": 1},
}


def make_dataset(mixture: str) -> DynamicStreamingDataset:
    return DynamicStreamingDataset(manifest=mixture, batch_size=8, seed=3, lockstep=True)


def fake_token_losses(batch: dict[str, Any]) -> torch.Tensor:
    """Per-token 'losses' that depend on the samples only: a resumed loop sees the same."""
    return batch["input_ids"].double() / 64.0


def fake_evaluate(dataset: DynamicStreamingDataset) -> Any:
    """Validation 'losses' falling with the samples each group has had."""

    def evaluate() -> np.ndarray:
        counts = np.array(list(dataset.realized_counts.values()), dtype=np.float64)
        return 3.0 - 0.3 * np.log1p(counts)

    return evaluate


def train(
    mixer: Mixer, dataset: DynamicStreamingDataset, until: int, save_at: int | None = None
) -> tuple[list[list[int]], dict[str, Any] | None]:
    """The plain loop of the README up to batch ``until``: each batch's token sums, and the
    checkpoint (dataset and mixer states, as plain values) taken after batch ``save_at``."""
    mixer.start()
    step, sums, saved = mixer.steps_done, [], None
    for yielded, batch in enumerate(DataLoader(dataset, batch_size=8), start=1):
        mixer.observe(fake_token_losses(batch), batch["group"])
        step += 1
        mixer.step(step)
        sums.append(batch["input_ids"].long().sum(dim=1).tolist())
        if step == save_at:
            state = {"dataset": dataset.state_dict(yielded * 8, False), "mixer": mixer.state_dict()}
            saved = json.loads(json.dumps(state))
        if step == until:
            break
    return sums, saved


def decisions(run_dir: Path) -> list[str]:
    return [json.dumps(r, sort_keys=True) for r in read_history(run_dir) if r["kind"] != "final"]


# ----------------------------------------------------------------------- no framework
def test_importing_the_mixers_imports_no_training_framework() -> None:
    code = (
        "import sys, mixstream.mixing\n"
        "bad = [m for m in ('composer', 'lightning') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_odm_mixer_in_a_plain_loop_follows_its_rule(mixture: str, tmp_path: Path) -> None:
    """The losses the loop observed, replayed through the pure rule, give every decision."""
    dataset = make_dataset(mixture)
    try:
        mixer = ODMMixer(dataset, run_dir=tmp_path, log_interval=1)
        train(mixer, dataset, until=10)
        mixer.finish()
    finally:
        dataset.close()
    rows = read_history(tmp_path)
    train_loss = {r["step"]: r["losses"] for r in rows if r["kind"] == "train_loss"}
    odm = [r for r in rows if r["kind"] == "odm"]
    weights = [r for r in rows if r["kind"] == "weights"]
    assert [r["step"] for r in odm] == [r["step"] for r in weights] == list(range(1, 11))
    state = ODMState.initial(ODMConfig(num_groups=3))
    for r, w in zip(odm, weights, strict=True):
        assert r["train_loss"] == pytest.approx(train_loss[r["step"]], rel=1e-12)
        assert sum(r["tokens"].values()) == 8 * 32
        losses = [math.nan if r["train_loss"][g] is None else r["train_loss"][g] for g in GROUPS]
        policy = state.update(ODMConfig(3), r["step"], losses, list(r["drawn"].values()))
        assert list(w["weights"].values()) == pytest.approx(list(policy), rel=1e-9)
        assert w["effective_step"] == r["step"] + dataset.update_lag
    saved = json.loads((tmp_path / "weights.json").read_text())
    assert saved["method"] == "ODM" and saved["odm"]["updates"] == 10
    assert saved["schedule"] == [[b, list(w.values())] for b, w in dataset.schedule]


def test_reduced_group_losses_are_the_same_signal(mixture: str, tmp_path: Path) -> None:
    """observe_group_losses (a loop that reduces by group itself) == observe."""
    dataset = make_dataset(mixture)
    try:
        direct, reduced = ODMMixer(dataset), ODMMixer(dataset)
        direct.start()
        reduced.start()
        batch = next(iter(DataLoader(dataset, batch_size=8)))
        losses, ids = fake_token_losses(batch), batch["group"]
        direct.observe(losses, ids)
        tokens = torch.bincount(ids, minlength=3).double() * losses.shape[1]
        sums = torch.zeros(3, dtype=torch.float64).index_add_(0, ids, losses.sum(dim=1))
        with np.errstate(invalid="ignore"):
            reduced.observe_group_losses((sums / tokens).numpy(), tokens)
        expected, got = direct.step_train_losses(), reduced.step_train_losses()
    finally:
        dataset.close()
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-12)
    np.testing.assert_array_equal(got[1], expected[1])


@pytest.mark.filterwarnings("ignore:Aioli would spend")  # 16 batches: mostly sweeps
@pytest.mark.parametrize("method", sorted(MIXERS))
def test_resume_from_state_dict_is_exact(method: str, mixture: str, tmp_path: Path) -> None:
    """16 batches straight vs 8, save both states, new dataset and mixer, 8 more."""

    def build(run_dir: Path) -> tuple[DynamicStreamingDataset, Mixer]:
        dataset = make_dataset(mixture)
        mixer = MIXERS[method](dataset, run_dir=run_dir, log_interval=2, total_steps=16,
                               evaluate=fake_evaluate(dataset), **OPTIONS[method])  # fmt: skip
        return dataset, mixer

    dataset, mixer = build(tmp_path / "ref")
    try:
        reference, _ = train(mixer, dataset, until=16)
        mixer.finish()
        ref_schedule = dataset.schedule
    finally:
        dataset.close()
    dataset, mixer = build(tmp_path / "run")
    try:  # batches 9 to 11 are trained and recorded, then lost: resume from batch 8
        killed, saved = train(mixer, dataset, until=11, save_at=8)
    finally:
        dataset.close()
    assert saved is not None
    first = killed[:8]
    dataset, mixer = build(tmp_path / "run")
    try:
        dataset.load_state_dict(saved["dataset"])
        mixer.load_state_dict(saved["mixer"])
        rest, _ = train(mixer, dataset, until=16)
        mixer.finish()
        assert dataset.schedule == ref_schedule
    finally:
        dataset.close()
    assert first + rest == reference
    assert decisions(tmp_path / "run") == decisions(tmp_path / "ref")
    kinds = {r["kind"] for r in read_history(tmp_path / "ref")}
    assert {"weights", method if method != "ado" else "ado_fit"} <= kinds
    assert len(ref_schedule) > 3  # the mixture moved several times
    ref_json = json.loads((tmp_path / "ref" / "weights.json").read_text())
    assert json.loads((tmp_path / "run" / "weights.json").read_text()) == ref_json


# ----------------------------------------------------------------------- refusals
def test_api_misuse_is_refused_with_a_fix(mixture: str, tmp_path: Path) -> None:
    dataset = make_dataset(mixture)
    try:
        mixer = ODMMixer(dataset)
        with pytest.raises(RuntimeError, match=r"before start\(\): call mixer.start\(\)"):
            mixer.step(1)
        with pytest.raises(RuntimeError, match=r"observe\(\) before start\(\)"):
            mixer.observe(torch.ones(2, 4), torch.tensor([0, 1]))
        mixer.start()
        with pytest.raises(ValueError, match="not the mean loss"):
            mixer.observe(torch.tensor(1.0), torch.tensor([0]))
        with pytest.raises(ValueError, match="2 group ids for 3 sequences"):
            mixer.observe(torch.ones(3, 4), torch.tensor([0, 1]))
        with pytest.raises(ValueError, match=r"group ids must be in \[0, 3\)"):
            mixer.observe(torch.ones(2, 4), torch.tensor([0, 3]))
        with pytest.raises(ValueError, match="one loss and one token count per group"):
            mixer.observe_group_losses([1.0, 2.0], [4, 4])
        with pytest.raises(ValueError, match="not a mixer state of ODM"):
            mixer.load_state_dict({"weights": [1, 0, 0]})
        with pytest.raises(ValueError, match="needs per-group validation losses: pass evaluate="):
            mixer.validation_losses()
        with pytest.raises(ValueError, match="mixes groups"):
            ODMMixer(dataset, groups=["gamma", "beta", "alpha"])
        with pytest.raises(TypeError, match="evaluate= must be a callable"):
            ODMMixer(dataset, evaluate="val")
        iterator = iter(DataLoader(dataset, batch_size=8))
        next(iterator)
        with pytest.raises(RuntimeError, match="before iterating the DataLoader"):
            ODMMixer(dataset).start()
        other = ODMMixer(dataset)
        other.load_state_dict({"step": 4, "method": {}})
        with pytest.raises(ValueError, match="from batch 4 but training is at batch 0"):
            other.start()
    finally:
        dataset.close()
    aioli = MIXERS["aioli"](run_dir=tmp_path, **OPTIONS["aioli"], evaluate=lambda: [1.0])
    dataset = make_dataset(mixture)
    try:
        aioli.attach(dataset)
        with pytest.raises(ValueError, match=r"evaluate\(\) returned 1 losses; Aioli needs one"):
            aioli.start()
    finally:
        dataset.close()


# ----------------------------------------------------------------------- torchrun
def torchrun(args: list[str], cwd: Path, expect_kill: bool = False) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(EXAMPLE),
           *args]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
                          start_new_session=True, check=False)  # fmt: skip
    if expect_kill:
        assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert "SIGKILL" in proc.stderr or "exitcode: -9" in proc.stderr, proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["odm", "aioli"])
def test_torchrun_example_killed_and_resumed_matches_an_uninterrupted_run(
    method: str, mixture: str, tmp_path: Path
) -> None:
    """2 CPU ranks (gloo, dropout on): SIGKILL after batch 10, --resume from the checkpoint
    at 8; the resumed run draws the same samples on every rank and makes the same decisions
    (ODM from the training losses, Aioli also from GroupEvaluator's validation losses)."""
    options = [f"--option={k}={json.dumps(v)}" for k, v in OPTIONS[method].items()]
    base = ["--manifest", str(Path(mixture) / "mixture.json"), "--method", method,
            "--steps", "14", "--batch-size", "8", "--checkpoint-every", "4", "--log-every", "2",
            "--val-samples", "8", *options]  # fmt: skip
    torchrun([*base, "--out", "ref", "--sample-log", "ref.samples"], tmp_path)
    run = [*base, "--out", "run"]
    torchrun([*run, "--sample-log", "killed.samples", "--kill-at", "10"], tmp_path,
             expect_kill=True)  # fmt: skip
    assert [p.name for p in sorted((tmp_path / "run" / "checkpoints").glob("*.pt"))] == [
        "step-00000004.pt", "step-00000008.pt",
    ]  # fmt: skip
    assert not (tmp_path / "run" / "weights.json").exists()
    torchrun([*run, "--resume", "--sample-log", "resumed.samples"], tmp_path)
    for rank in (0, 1):
        reference = read_jsonl(tmp_path / f"ref.samples.rank{rank}")
        resumed = read_jsonl(tmp_path / f"resumed.samples.rank{rank}")
        assert [r["step"] for r in resumed] == list(range(9, 15))
        assert resumed == reference[8:]
        killed = read_jsonl(tmp_path / f"killed.samples.rank{rank}")
        assert killed == reference[:10]
    assert decisions(tmp_path / "run") == decisions(tmp_path / "ref")
    rows = read_history(tmp_path / "ref")
    after_resume = [r for r in rows if r["kind"] == "weights" and r["step"] > 8]
    assert after_resume  # the resumed part of the run made decisions of its own
    if method == "odm":  # one after every batch past the warm-up (1)
        assert len([r for r in rows if r["kind"] == "weights"]) == 14 - 1
    else:  # every round of 6: before the 3 one-batch sweeps and after each
        measured = [r["step"] for r in rows if r["kind"] == "val_loss"]
        assert measured == [0, 1, 2, 3, 6, 7, 8, 9, 12, 13, 14]
    final = json.loads((tmp_path / "run" / "weights.json").read_text())
    assert final == json.loads((tmp_path / "ref" / "weights.json").read_text())
