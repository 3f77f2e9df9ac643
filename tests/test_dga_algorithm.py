"""The DGA Composer algorithm: configuration errors, the gradient probe (exact and harmless),
an end-to-end run that moves weight to the target's group, and exact resume."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from algorithm_harness import fit

from mixstream.algorithms import DGA
from mixstream.composer.dga import draw_probe, probe_alignment
from mixstream.composer.model import MixtureLM
from mixstream.mixing.history import read_history
from mixstream.mixing.signals import GroupSamples

STEPS = 12
SAVE_AT = 6
DGA_KWARGS = {"target": "beta", "update_steps": 2, "eta": 2.0, "ema": 0.5}


def dga_cfg(mixture: str, run_dir: Path, **kwargs: Any) -> dict[str, Any]:
    return {
        "manifest": mixture,
        "max_duration": f"{STEPS}ba",
        "algorithm": {"class": "DGA", "kwargs": {**DGA_KWARGS, "run_dir": str(run_dir), **kwargs}},
    }


@pytest.fixture(scope="module")
def reference(mixture: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One DGA run toward beta's val split (dropout on), checkpointed half way."""
    tmp = tmp_path_factory.mktemp("dga-reference")
    cfg = {
        **dga_cfg(mixture, tmp / "run"),
        "save_folder": str(tmp / "checkpoints"),
        "save_interval": f"{SAVE_AT}ba",
    }
    _, algorithm = fit(cfg)
    return {"tmp": tmp, "cfg": cfg, "algorithm": algorithm}


# ----------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "DGA needs target="),
        ({"target": ["beta", "gamma"]}, "must be one group name"),
        ({"target": "beta", "eta": 0.0}, "eta must be a finite number > 0"),
        ({"target": "beta", "eta": -1.0}, "eta must be a finite number > 0"),
        ({"target": "beta", "eta": math.nan}, "eta must be a finite number > 0"),
        ({"target": "beta", "ema": 1.0}, "ema must be in [0, 1)"),
        ({"target": "beta", "ema": -0.1}, "ema must be in [0, 1)"),
        ({"target": "beta", "update_steps": 0}, "update_steps must be an integer >= 1"),
        ({"target": "beta", "probe_batch_size": 0}, "probe_batch_size must be an integer >= 1"),
        ({"target": "beta", "probe_samples_per_group": 1.5}, "probe_samples_per_group"),
    ],
)
def test_bad_configuration_fails_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        DGA(**kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": "delta"}, "target='delta' is not a group of"),
        ({"target": "beta", "target_split": "dev"}, "group 'beta' has no 'dev' split"),
    ],
)
def test_bad_target_fails_at_setup(
    mixture: str, tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError) as info:
        fit(dga_cfg(mixture, tmp_path / "run", **kwargs))
    assert message in str(info.value)
    if "delta" in message:
        assert "groups: alpha, beta, gamma" in str(info.value)


# ----------------------------------------------------------------------- the probe
def tiny_model(dropout: float) -> MixtureLM:
    torch.manual_seed(0)
    pdrop = {"resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout}
    return MixtureLM("gpt2", 257, 32, n_layer=2, n_head=2, n_embd=32, **pdrop)


def token_batches(n: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 257, (3, 32), generator=g)} for _ in range(n)]


def test_probe_leaves_training_untouched() -> None:
    model = tiny_model(dropout=0.1)  # dropout on: the probe must not move the RNG
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train, *probes = token_batches(5)
    model.train()
    model.loss(model(train), train).backward()
    optimizer.step()  # param.grad and the Adam moments are now populated
    grads = [p.grad.clone() for p in model.parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    opt_state = copy.deepcopy(optimizer.state_dict())
    rng = torch.get_rng_state()
    np_rng = np.random.get_state()[1].copy()
    cached = model.token_losses

    a = probe_alignment(model, probes[:3], probes[3])

    assert a.shape == (3,) and np.all(np.abs(a) <= 1 + 1e-9)
    assert model.training
    assert model.token_losses is cached  # the training forward's cache is not replaced
    for p, g, w in zip(model.parameters(), grads, params, strict=True):
        assert torch.equal(p.grad, g) and torch.equal(p.detach(), w)
    after = optimizer.state_dict()
    assert after["param_groups"] == opt_state["param_groups"]
    for k, v in opt_state["state"].items():
        for name, t in v.items():
            assert torch.equal(torch.as_tensor(after["state"][k][name]), torch.as_tensor(t))
    assert torch.equal(torch.get_rng_state(), rng)
    assert np.array_equal(np.random.get_state()[1], np_rng)


def flat_backward_grad(model: MixtureLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.zero_grad()
    model.loss(model(batch), batch).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()


def test_probe_alignment_matches_backward() -> None:
    model = tiny_model(dropout=0.0)
    *groups, target = token_batches(4, seed=2)
    cosine = probe_alignment(model, groups, target)
    raw = probe_alignment(model, groups, target, normalize=False)
    t = flat_backward_grad(model, target)
    for i, batch in enumerate(groups):
        g = flat_backward_grad(model, batch)
        assert raw[i] == pytest.approx(float(g @ t), rel=1e-4)
        assert cosine[i] == pytest.approx(float(g @ t / (g.norm() * t.norm())), rel=1e-4)


def test_probe_draws_are_keyed_and_stateless(mixture: str) -> None:
    pool = GroupSamples(mixture, "train", ["alpha", "beta"], samples_per_group=16)
    rng = torch.get_rng_state()
    np_rng = np.random.get_state()[1].copy()
    first = draw_probe(pool, 1, 4, seed=5, step=10)
    assert first["input_ids"].shape == (4, 32)
    assert torch.equal(first["input_ids"], draw_probe(pool, 1, 4, seed=5, step=10)["input_ids"])
    assert not torch.equal(first["input_ids"], draw_probe(pool, 1, 4, 5, 12)["input_ids"])
    assert not torch.equal(first["input_ids"], draw_probe(pool, 1, 4, 6, 10)["input_ids"])
    assert draw_probe(pool, 0, 100, 5, 10)["input_ids"].shape[0] == 16  # capped at the pool
    assert torch.equal(torch.get_rng_state(), rng)
    assert np.array_equal(np.random.get_state()[1], np_rng)


# ----------------------------------------------------------------------- end to end
def test_dga_upweights_the_group_aligned_with_the_target(reference: dict[str, Any]) -> None:
    algorithm = reference["algorithm"]
    dataset = algorithm.mixing_dataset
    schedule = dataset.schedule
    assert schedule[0][0] == 0 and schedule[0][1] == pytest.approx(
        {g: 1 / 3 for g in ("alpha", "beta", "gamma")}
    )
    changes = [b for b, _ in schedule[1:]]
    assert changes and 0 < changes[0] < STEPS  # the mixture changed mid-run
    final = schedule[-1][1]
    assert max(final, key=final.get) == "beta" and final["beta"] > 0.6
    counts = dataset.realized_counts
    assert counts["beta"] > counts["alpha"] and counts["beta"] > counts["gamma"]

    rows = read_history(reference["tmp"] / "run")
    dga = [r for r in rows if r["kind"] == "dga"]
    assert [r["step"] for r in dga] == list(range(2, STEPS + 1, 2))
    for r in dga:
        a = r["alignment"]
        assert set(a) == {"alpha", "beta", "gamma"}
        assert max(a, key=a.get) == "beta"  # beta's train gradient is most like beta val's
    weights = [r for r in rows if r["kind"] == "weights"]
    assert len(weights) == len(dga)
    assert np.allclose(algorithm.alpha, list(weights[-1]["weights"].values()))
    assert algorithm.updates == len(dga)


def test_target_from_another_manifest_and_initial_weights(mixture: str, tmp_path: Path) -> None:
    # The target may come from any mixture.json and split; the run starts from initial_weights.
    start = {"alpha": 0.5, "beta": 0.25, "gamma": 0.25}
    cfg = dga_cfg(
        mixture,
        tmp_path / "run",
        target="gamma",
        target_manifest=str(Path(mixture) / "mixture.json"),
        target_split="test",
        initial_weights=start,
        update_steps=3,
    )
    _, algorithm = fit({**cfg, "max_duration": "6ba"})
    schedule = algorithm.mixing_dataset.schedule
    assert schedule[0] == (0, pytest.approx(start))
    assert len(schedule) == 3 and schedule[-1][1]["gamma"] > start["gamma"]
    assert [r["step"] for r in read_history(tmp_path / "run") if r["kind"] == "dga"] == [3, 6]


def test_method_state_round_trip_and_exact_resume(mixture: str, reference: dict[str, Any]) -> None:
    algorithm = reference["algorithm"]
    state = algorithm.method_state()
    clone = DGA(**DGA_KWARGS)
    clone.load_method_state(state)
    assert clone.method_state() == state
    # The same alignment gives the same next decision.
    from mixstream.algorithms.dga import dga_update

    a = np.array([0.1, 0.7, 0.2])
    np.testing.assert_array_equal(
        dga_update(clone.alpha, a, clone.eta, clone.ema),
        dga_update(algorithm.alpha, a, algorithm.eta, algorithm.ema),
    )

    # Resume from the half-way checkpoint: the rest of the run decides exactly the same.
    tmp = reference["tmp"]
    checkpoint = tmp / "checkpoints" / f"ep0-ba{SAVE_AT}-rank0.pt"
    assert checkpoint.exists()
    cfg = {**dga_cfg(mixture, tmp / "resumed"), "load_path": str(checkpoint)}
    _, resumed = fit(cfg)
    assert resumed.updates == algorithm.updates
    ref_schedule = algorithm.mixing_dataset.schedule
    new_schedule = resumed.mixing_dataset.schedule
    assert [b for b, _ in new_schedule] == [b for b, _ in ref_schedule]
    for (_, w_ref), (_, w_new) in zip(ref_schedule, new_schedule, strict=True):
        assert w_new == pytest.approx(w_ref, rel=1e-9, abs=1e-12)
    ref_rows = [r for r in read_history(tmp / "run") if r["kind"] == "dga"]
    new_rows = [r for r in read_history(tmp / "resumed") if r["kind"] == "dga"]
    assert [r["step"] for r in new_rows] == [r["step"] for r in ref_rows if r["step"] > SAVE_AT]
    for new in new_rows:
        old = next(r for r in ref_rows if r["step"] == new["step"])
        assert new["alignment"] == pytest.approx(old["alignment"], rel=1e-9, abs=1e-12)
