"""LLM Foundry trains on mixstream's loader with mixstream's algorithms (``mixstream.foundry``).

The end-to-end test runs an unmodified ``llmfoundry train`` on a Foundry YAML (a tiny MPT on
CPU) that names ``train_loader: {name: mixstream}`` and ``algorithms: {aioli: ...}``: the
registries find both through mixstream's entry points; half a run plus Foundry's autoresume
gives the uninterrupted run's mixture exactly. The per-token losses that split the
loss by group are checked against the models' own losses, for Foundry's MPT and for a plain
Composer ``HuggingFaceModel``. Tests that need llm-foundry skip without it; ``make test``
installs it (the Makefile's ``foundry`` step).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from mixstream.foundry import build_mixstream_dataloader, collate
from mixstream.mixing.signals import (
    GroupSamples,
    evaluate_group_losses,
    group_loss_sums,
    token_losses,
)
from mixstream.train.recipe import RecipeError

GROUPS = ["alpha", "beta", "gamma"]
STEPS = 12
SEQ_LEN, VOCAB = 32, 257  # the `mixture` fixture's byte-level corpus


def needs_foundry() -> None:
    pytest.importorskip("llmfoundry", reason="llm-foundry is not installed (make test installs it)")
    names = {ep.name for ep in entry_points(group="llmfoundry_dataloaders")}
    assert "mixstream" in names, (
        "mixstream's entry points are not installed; reinstall it (pip install -e .)"
    )


def first_batch(mixture: str, **options: Any) -> dict[str, Any]:
    spec = build_mixstream_dataloader(None, 8, manifest=mixture, seed=5, **options)
    try:
        return next(iter(spec.dataloader))
    finally:
        spec.dataloader.dataset.close()


def test_loader_batches_are_causal_lm_batches(mixture: str) -> None:
    batch = first_batch(mixture, weights={"alpha": 1.0, "beta": 0.0, "gamma": 0.0})
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (8, SEQ_LEN)
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert batch["group"].tolist() == [0] * 8  # the initial weights are in force
    assert int(batch["input_ids"].max()) < VOCAB


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_worker": 1}, "unknown key train_loader.num_worker (did you mean num_workers?)"),
        ({"groups": ["alpha", "delta"]}, "train_loader.groups: delta not in"),
        ({"weights": {"alpha": 1.0, "delta": 1.0}}, "delta"),
        ({"lockstep": "yes"}, "train_loader.lockstep must be true or false"),
        ({"seed": -1}, "train_loader.seed must be an integer >= 0"),
    ],
)
def test_loader_options_are_checked(mixture: str, options: dict, message: str) -> None:
    with pytest.raises(RecipeError) as info:
        build_mixstream_dataloader(None, 8, manifest=mixture, **options)
    assert message in str(info.value) and "train_loader" in str(info.value)


def test_loader_needs_a_manifest() -> None:
    with pytest.raises(RecipeError, match=r"train_loader\.manifest is required"):
        build_mixstream_dataloader(None, 8)


def check_token_losses(model: torch.nn.Module, batch: dict[str, Any], loss: torch.Tensor) -> None:
    """The per-token losses average to the model's own loss, one per predicted token."""
    per_token = token_losses(model, model(batch), batch)
    assert per_token.shape == (8, SEQ_LEN - 1)
    assert float(per_token.mean()) == pytest.approx(float(loss), rel=1e-5)
    sums, counts = group_loss_sums(per_token, batch["group"], len(GROUPS))
    assert float(counts.sum()) == 8 * (SEQ_LEN - 1)
    assert float(sums.sum() / counts.sum()) == pytest.approx(float(loss), rel=1e-5)


def test_token_losses_of_a_composer_hf_model(mixture: str) -> None:
    from composer.models import HuggingFaceModel
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ_LEN, n_layer=1, n_head=2, n_embd=16,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # the same loss on every forward
    )  # fmt: skip
    model = HuggingFaceModel(GPT2LMHeadModel(config), use_logits=True, shift_labels=True)
    batch = first_batch(mixture)
    check_token_losses(model, batch, model(batch).loss)  # transformers' own shifted loss

    masked = dict(batch, labels=batch["labels"].clone())
    masked["labels"][:, 5] = -100
    with pytest.raises(ValueError, match="labels mask tokens"):
        token_losses(model, model(masked), masked)


def tiny_mpt() -> dict[str, Any]:
    return {
        "d_model": 32, "n_heads": 2, "n_layers": 1, "expansion_ratio": 2,
        "max_seq_len": SEQ_LEN, "vocab_size": VOCAB, "attn_config": {"attn_impl": "torch"},
        "loss_fn": "torch_crossentropy",
    }  # fmt: skip


def test_token_losses_of_foundry_mpt(mixture: str) -> None:
    needs_foundry()
    from llmfoundry.models.mpt import ComposerMPTCausalLM

    torch.manual_seed(0)
    model = ComposerMPTCausalLM(**tiny_mpt())
    batch = first_batch(mixture)
    check_token_losses(model, batch, model.loss(model(batch), batch))
    # the held-out sequences the algorithms measure are kept as stored (uint16, no labels)
    samples = GroupSamples(mixture, "val", GROUPS, samples_per_group=4)
    assert samples.samples[0][0]["input_ids"].dtype == torch.uint16
    losses = evaluate_group_losses(model, samples, batch_size=4)
    assert losses.shape == (3,) and np.isfinite(losses).all()
    rows = [dict(row, group=0) for row in samples.samples[0]]
    assert float(losses[0]) == pytest.approx(
        float(model.loss(model(collate(rows)), collate(rows))), rel=1e-5
    )


def foundry_yaml(mixture: str, run_dir: Path, **overrides: Any) -> dict[str, Any]:
    return {
        "run_name": "foundry-aioli",
        "seed": 3,
        "max_seq_len": SEQ_LEN,
        "global_train_batch_size": 8,
        "device_train_microbatch_size": 4,  # two microbatches per batch
        "device_eval_batch_size": 8,
        "max_duration": f"{STEPS}ba",
        "eval_interval": "1000ba",
        "precision": "fp32",
        "console_log_interval": "4ba",
        "python_log_level": "info",
        "tokenizer": {},  # the shards are token ids already
        "model": {"name": "mpt_causal_lm", "init_device": "cpu", **tiny_mpt()},
        "optimizer": {"name": "decoupled_adamw", "lr": 3.0e-3, "betas": [0.9, 0.95]},
        # constant: a shorter run's learning rates are the first of a longer one's
        "scheduler": {"name": "constant_with_warmup", "t_warmup": "2ba"},
        "train_loader": {"name": "mixstream", "manifest": mixture, "num_workers": 1},
        "algorithms": {
            "aioli": {
                "run_dir": str(run_dir),
                "update_steps": 6,  # 3 sweep batches, 3 left: the lag of one worker
                "prior_steps": 0,  # the paper's protocol: two rounds in 12 batches
                "lp_rounds": 1,
                "lp_steps": 1,
                "val_samples_per_group": 8,
                "log_interval": 4,
            }
        },
        **overrides,
    }


def foundry_train(folder: Path, name: str, config: dict[str, Any]) -> str:
    """``llmfoundry train`` (Foundry's own command, unmodified) on ``config``; its output."""
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [str(Path(sys.executable).parent / "llmfoundry"), "train", str(path)]
    proc = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    return output


@pytest.fixture(scope="module")
def foundry_run(mixture: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One uninterrupted Foundry run with Aioli: its run folder and output."""
    needs_foundry()
    tmp = tmp_path_factory.mktemp("foundry")
    output = foundry_train(tmp, "aioli", foundry_yaml(mixture, tmp / "aioli"))
    return tmp / "aioli", output


def test_foundry_train_yaml_end_to_end(foundry_run: tuple[Path, str]) -> None:
    run_dir, output = foundry_run
    assert f"[batch={STEPS}/{STEPS}]" in output and "mixture/val_loss/gamma" in output

    weights = json.loads((run_dir / "weights.json").read_text())
    assert weights["method"] == "Aioli" and weights["groups"] == GROUPS
    assert weights["steps"] == STEPS
    schedule = [dict(zip(GROUPS, w, strict=True)) for _, w in weights["schedule"]]
    assert any(max(w.values()) > 0.4 for w in schedule)  # the LearnParams sweeps
    assert sum(weights["final"].values()) == pytest.approx(1.0)
    assert weights["final"] != pytest.approx(dict.fromkeys(GROUPS, 1 / 3))  # it learned

    rows = [
        json.loads(line) for line in (run_dir / "mixture_history.jsonl").read_text().splitlines()
    ]
    kinds = {row["kind"] for row in rows}
    assert {"weights", "val_loss", "aioli", "final"} <= kinds
    for row in rows:
        if row["kind"] == "val_loss":
            assert all(math.isfinite(v) and 0 < v < 10 for v in row["losses"].values())


def test_foundry_autoresume_is_exact(
    foundry_run: tuple[Path, str], mixture: str, tmp_path: Path
) -> None:
    """Half the run, then Foundry's autoresume to the end: the uninterrupted run's mixture.

    The checkpoint carries the dataset's position and schedule and Aioli's state (round,
    estimates, pending sweeps); anything lost would change the weights it learns.
    """
    run_dir = tmp_path / "aioli"
    saving = {"save_folder": str(tmp_path / "checkpoints"), "save_interval": "6ba"}
    half = foundry_yaml(mixture, run_dir, max_duration="6ba", autoresume=True, **saving)
    foundry_train(tmp_path, "half", half)
    output = foundry_train(tmp_path, "rest", dict(half, max_duration=f"{STEPS}ba"))
    assert "Autoresuming training from checkpoint" in output
    resumed = json.loads((run_dir / "weights.json").read_text())
    full = json.loads((foundry_run[0] / "weights.json").read_text())
    assert resumed["steps"] == STEPS
    assert resumed["schedule"] == full["schedule"] and resumed["final"] == full["final"]
