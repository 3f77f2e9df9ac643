"""DoReMi in Composer: reference -> proxy -> main pipeline, the weighted loss, exact resume."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from algorithm_harness import fit, read_jsonl, run_script
from composer import Callback, Event, State, Trainer
from composer.loggers import Logger
from mixture_harness import GROUPS
from torch.utils.data import DataLoader

from mixstream import DynamicStreamingDataset, storage
from mixstream.algorithms import DoReMi
from mixstream.composer.doremi import load_reference_model, weighted_token_loss
from mixstream.composer.model import MixtureLM
from mixstream.mixing.history import read_history
from mixstream.testing.distributed import run_ranks

REFERENCE_STEPS = 30


@pytest.fixture(scope="module")
def reference(mixture: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A reference model that has only ever seen ``gamma``: its excess is largest there."""
    root = tmp_path_factory.mktemp("doremi-reference")
    fit(
        {
            "manifest": mixture,
            "max_duration": f"{REFERENCE_STEPS}ba",
            "save_folder": str(root / "checkpoints"),
            "save_interval": f"{REFERENCE_STEPS}ba",
            "run_name": "reference",
            "algorithm": {
                "class": "StaticMixture",
                "kwargs": {"weights": {"gamma": 1.0}, "run_dir": str(root / "run")},
            },
        }
    )
    path = root / "checkpoints" / f"ep0-ba{REFERENCE_STEPS}-rank0.pt"
    assert path.is_file()
    return str(path)


def doremi_cfg(mixture: str, reference: str, run_dir: Path, **kwargs: Any) -> dict[str, Any]:
    return {
        "manifest": mixture,
        "run_name": run_dir.name,
        "algorithm": {
            "class": "DoReMi",
            "kwargs": {"reference_checkpoint": reference, "run_dir": str(run_dir), **kwargs},
        },
    }


# ------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({}, ValueError, "reference_checkpoint"),
        ({"reference_checkpoint": "/nonexistent/ref.pt"}, FileNotFoundError, "/nonexistent"),
        ({"eta": 0.0}, ValueError, "eta"),
        ({"eta": -1.0}, ValueError, "eta"),
        ({"smoothing": 1.0}, ValueError, "smoothing"),
        ({"objective": "minimax"}, ValueError, "objective"),
        ({"update_steps": 0}, ValueError, "update_steps"),
    ],
)
def test_bad_configuration_fails_eagerly(
    reference: str, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    if kwargs and "reference_checkpoint" not in kwargs:
        kwargs = {"reference_checkpoint": reference, **kwargs}
    with pytest.raises(error, match=message):
        DoReMi(**kwargs)


def test_reference_checkpoint_errors(reference: str, tmp_path: Path) -> None:
    other = MixtureLM("gpt2", 257, 32, n_layer=1, n_head=2, n_embd=32)
    with pytest.raises(ValueError, match=r"does not fit the training model.*") as info:
        load_reference_model(other, reference)
    assert reference in str(info.value)
    junk = tmp_path / "junk.pt"
    torch.save({"weights": {}}, junk)
    with pytest.raises(ValueError, match="not a Composer checkpoint"):
        load_reference_model(other, str(junk))
    with pytest.raises(ValueError, match="is a folder"):
        load_reference_model(other, str(tmp_path))


def test_reference_loads_from_s3_frozen(reference: str, s3_env: Any, s3_prefix: str) -> None:
    url = f"{s3_prefix}/reference.pt"
    storage.write_bytes(url, Path(reference).read_bytes())
    model = MixtureLM("gpt2", 257, 32, n_layer=2, n_head=2, n_embd=32)
    loaded = load_reference_model(model, url)
    expected = torch.load(reference, map_location="cpu", weights_only=False)["state"]["model"]
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the training model is untouched
    with pytest.raises(FileNotFoundError, match="reference_checkpoint"):
        load_reference_model(model, f"{s3_prefix}/missing.pt")


# ------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("objective", ["reweight_loss", "resample"])
def test_doremi_upweights_the_group_the_reference_knows_best(
    mixture: str, reference: str, tmp_path: Path, objective: str
) -> None:
    run_dir = tmp_path / f"proxy-{objective}"
    cfg = doremi_cfg(mixture, reference, run_dir, objective=objective, eta=0.5)
    _, algorithm = fit({**cfg, "max_duration": "15ba"})
    state = algorithm.doremi
    assert state.num_updates == 15
    assert int(np.argmax(state.weights)) == 2 and int(np.argmax(state.average)) == 2  # gamma

    rows = read_history(run_dir)
    doremi_rows = [r for r in rows if r["kind"] == "doremi"]
    assert [r["step"] for r in doremi_rows] == list(range(1, 16))
    first = doremi_rows[0]
    assert max(first["excess"], key=first["excess"].get) == "gamma"
    assert first["weights"]["gamma"] > 1 / 3 > first["weights"]["alpha"]

    schedule = algorithm.mixing_dataset.schedule
    if objective == "resample":  # alpha steers sampling, from the update lag on
        assert len(schedule) > 5 and schedule[-1][0] > 10
        assert schedule[-1][1]["gamma"] > 0.9
        assert schedule[-1][1] == pytest.approx(dict(zip(GROUPS, state.weights, strict=True)))
    else:  # uniform sampling throughout; alpha only weights the loss
        assert schedule == [(0, {g: pytest.approx(1 / 3) for g in GROUPS})]

    saved = json.loads((run_dir / "weights.json").read_text())
    assert saved["method"] == "DoReMi"
    np.testing.assert_allclose(list(saved["average"].values()), state.average)
    np.testing.assert_allclose(list(saved["final"].values()), state.weights)
    # The time average is the mean of the logged alphas.
    logged = np.array([[r["weights"][g] for g in GROUPS] for r in doremi_rows])
    np.testing.assert_allclose(state.average, logged.mean(axis=0), rtol=1e-9)

    # The main run trains on the proxy's time-averaged weights.
    _, main = fit(
        {
            "manifest": mixture,
            "max_duration": "2ba",
            "run_name": "main",
            "algorithm": {
                "class": "StaticMixture",
                "kwargs": {"weights_file": str(run_dir / "weights.json"), "run_dir": str(tmp_path)},
            },
        }
    )
    [(start, weights)] = main.mixing_dataset.schedule
    assert start == 0 and weights == pytest.approx(saved["average"])


def doremi_rank(rank: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """One rank of a distributed run: its DoReMi state, as plain values (no tensors)."""
    _, algorithm = fit(cfg)
    return algorithm.method_state()


def test_two_ranks_pool_their_tokens_and_agree(
    mixture: str, reference: str, tmp_path: Path
) -> None:
    """Under DDP the excess is over both ranks' tokens: step 1 matches a 1-rank run's."""
    cfg = {**doremi_cfg(mixture, reference, tmp_path / "ddp"), "max_duration": "3ba"}
    results = run_ranks(doremi_rank, 2, {**cfg, "batch_size": 4}, timeout=300)
    assert results[0] == results[1]
    assert results[0]["doremi"]["num_updates"] == 3
    first = next(r for r in read_history(tmp_path / "ddp") if r["kind"] == "doremi")
    assert sum(first["tokens"].values()) == 8 * 31  # 2 ranks x 4 sequences x 31 targets

    # The same global batch of 8 on one rank, from the same initial model.
    single = {**doremi_cfg(mixture, reference, tmp_path / "single"), "max_duration": "1ba"}
    fit(single)
    [one] = [r for r in read_history(tmp_path / "single") if r["kind"] == "doremi"]
    assert one["tokens"] == first["tokens"]
    # Up to dropout (drawn per rank): a rank's tokens alone would give other means, and
    # unreduced sums over pooled counts would halve them.
    for g in GROUPS:
        assert one["excess"][g] == pytest.approx(first["excess"][g], rel=2e-2)


# ------------------------------------------------------------------------- the loss
def test_weighted_token_loss_by_hand() -> None:
    losses = torch.tensor([[1.0, 3.0], [2.0, 6.0], [10.0, 10.0]], requires_grad=True)
    groups = torch.tensor([0, 1, 1])
    # Group weights [0.75, 0.25, 0]: the tokens weigh .75, .75, then .25 four times;
    # sum w l = .75 * 4 + .25 * 8 + .25 * 20 = 10, sum w = 1.5 + 1 = 2.5 -> 4; dloss/dl = w / 2.5
    loss = weighted_token_loss(losses, groups, torch.tensor([0.75, 0.25, 0.0]))
    assert loss.item() == pytest.approx(4.0)
    loss.backward()
    np.testing.assert_allclose(losses.grad, [[0.3, 0.3], [0.1, 0.1], [0.1, 0.1]], rtol=1e-6)
    # Uniform weights give the plain token mean.
    assert weighted_token_loss(losses, groups, torch.ones(3)).item() == pytest.approx(32 / 6)
    with pytest.raises(ValueError, match="group ids"):
        weighted_token_loss(losses, torch.tensor([0, 1]), torch.ones(3))


class GradientProbe(Callback):
    """Checks that the gradient Composer computes is the one of the alpha-weighted loss."""

    def __init__(self, algorithm: DoReMi) -> None:
        self.algorithm = algorithm
        self.expected: list[torch.Tensor] = []
        self.checked = 0

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        params = [p for p in state.model.parameters() if p.requires_grad]
        if event == Event.BEFORE_BACKWARD:
            token = state.model.token_losses
            alpha = torch.as_tensor(self.algorithm.doremi.weights, dtype=torch.float32)
            weighted = weighted_token_loss(token, state.batch["group"], alpha)
            torch.testing.assert_close(state.loss, weighted)
            self.expected = torch.autograd.grad(weighted, params, retain_graph=True)
            plain = torch.autograd.grad(token.mean(), params, retain_graph=True)
            assert any(not torch.allclose(a, b) for a, b in zip(plain, self.expected, strict=True))
        elif event == Event.AFTER_BACKWARD:
            for p, g in zip(params, self.expected, strict=True):
                torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
            self.checked += 1


def train(
    mixture: str,
    algorithm: DoReMi,
    steps: int,
    microbatch: int | None = None,
    callbacks: Sequence[Callback] = (),
) -> None:
    """A few batches of 8 in a Trainer built here (for callbacks and microbatching)."""
    torch.manual_seed(3)
    dataset = DynamicStreamingDataset(manifest=mixture, batch_size=8, seed=3)
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    model = MixtureLM("gpt2", 257, 32, n_layer=2, n_head=2, n_embd=32, **no_dropout)
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(dataset, batch_size=8),
        max_duration=f"{steps}ba",
        device_train_microbatch_size=microbatch,
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
        algorithms=[algorithm],
        callbacks=list(callbacks),
        device="cpu",
        progress_bar=False,
        log_to_console=False,
        loggers=[],
        seed=3,
    )
    try:
        trainer.fit()
    finally:
        trainer.close()
        dataset.close()


def test_reweight_loss_backpropagates_the_weighted_loss(
    mixture: str, reference: str, tmp_path: Path
) -> None:
    # An extreme alpha, so weighted and plain losses are far apart.
    algorithm = DoReMi(reference, initial_weights=[0.98, 0.01, 0.01], run_dir=tmp_path)
    probe = GradientProbe(algorithm)
    train(mixture, algorithm, 3, callbacks=[probe])
    assert probe.checked == 3


def test_microbatches_pool_into_one_update(mixture: str, reference: str, tmp_path: Path) -> None:
    rows = {}
    for microbatch in (8, 2):
        run_dir = tmp_path / str(microbatch)
        train(mixture, DoReMi(reference, run_dir=run_dir), 1, microbatch=microbatch)
        [rows[microbatch]] = [r for r in read_history(run_dir) if r["kind"] == "doremi"]
    assert sum(rows[2]["tokens"].values()) == 8 * 31
    assert rows[2]["tokens"] == rows[8]["tokens"]
    for g in GROUPS:
        assert rows[2]["excess"][g] == pytest.approx(rows[8]["excess"][g], rel=1e-6)


# ------------------------------------------------------------------------- resume
def algorithm_state(checkpoint: Path) -> dict[str, Any]:
    """The DoReMi entry of a Composer checkpoint's algorithms."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)["state"]
    [(name, value)] = saved["algorithms"]
    assert name == "DoReMi"
    return value


def test_kill_and_autoresume_is_exact(mixture: str, reference: str, tmp_path: Path) -> None:
    # update_steps=3 with checkpoints every 4 batches: the kill at 10 resumes from batch 8,
    # in the middle of an update window (7..9), so the window's sums must be checkpointed too.
    base = {
        "max_duration": "12ba",
        "save_interval": "4ba",
        "batch_size": 4,
    }
    kwargs = {"objective": "resample", "update_steps": 3, "eta": 0.5}

    def cfg(name: str, **extra: Any) -> dict[str, Any]:
        return {
            **doremi_cfg(mixture, reference, tmp_path / name, **kwargs),
            **base,
            "run_name": "resume",
            "save_folder": str(tmp_path / name / "checkpoints"),
            "log_path": str(tmp_path / f"{name}.log"),
            **extra,
        }

    run_script(cfg("straight"), tmp_path, "straight", timeout=300)
    crash = cfg("crash", autoresume=True)
    run_script({**crash, "kill_at": 10}, tmp_path, "killed", expect_kill=True, timeout=300)
    killed_rows = read_history(tmp_path / "crash")
    assert max(r["step"] for r in killed_rows) == 9  # the last update before the kill
    run_script(
        {**crash, "log_path": str(tmp_path / "resumed.log")}, tmp_path, "resumed", timeout=300
    )

    # Same batches, same DoReMi decisions, same outputs.
    straight_batches = read_jsonl(tmp_path / "straight.log")
    assert read_jsonl(tmp_path / "resumed.log") == straight_batches[8:]
    assert read_history(tmp_path / "crash") == read_history(tmp_path / "straight")
    updates = [r["step"] for r in read_history(tmp_path / "straight") if r["kind"] == "doremi"]
    assert updates == [3, 6, 9, 12]
    assert json.loads((tmp_path / "crash" / "weights.json").read_text()) == json.loads(
        (tmp_path / "straight" / "weights.json").read_text()
    )
    mid = algorithm_state(tmp_path / "crash" / "checkpoints" / "ep0-ba8-rank0.pt")
    assert mid["method"]["doremi"]["num_updates"] == 2
    assert sum(mid["method"]["window_counts"]) > 0  # batches 7 and 8
    final = [
        algorithm_state(tmp_path / name / "checkpoints" / "ep0-ba12-rank0.pt")
        for name in ("straight", "crash")
    ]
    assert final[0]["step"] == final[1]["step"] == 12
    assert final[0]["method"] == final[1]["method"]
    assert final[0]["method"]["doremi"]["num_updates"] == 4
