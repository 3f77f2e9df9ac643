"""The SkillIt Composer algorithm on CPU: settings, the graph phase (one-hot sweeps scheduled
ahead, the graph from their measured drops), updates replayed against the pure rule, a
given graph (matrix or file), two ranks agreeing, and exact kill-and-resume (dropout on)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from algorithm_harness import fit, kill_and_resume, rank_fit
from mixture_harness import GROUPS

from mixstream.algorithms import SkillIt
from mixstream.algorithms.aioli import LearnParamsPlan, sweep_mixtures
from mixstream.algorithms.skillit import learn_graph, skillit_update
from mixstream.mixing.history import read_history
from mixstream.testing.distributed import run_ranks

STEPS = 12
KWARGS = {"graph_steps": 1, "update_steps": 3, "window": 2, "eta": 0.5,
          "val_samples_per_group": 8, "log_interval": 1}  # fmt: skip


def spec(run_dir: Path, **extra: Any) -> dict[str, Any]:
    return {"class": "SkillIt", "kwargs": {**KWARGS, "run_dir": str(run_dir), **extra}}


@pytest.fixture(scope="module")
def reference(mixture: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("skillit-reference")
    cfg = {"manifest": mixture, "max_duration": f"{STEPS}ba", "algorithm": spec(tmp / "run")}
    _, algorithm = fit(cfg)
    return {"tmp": tmp, "algorithm": algorithm, "rows": read_history(tmp / "run")}


# ----------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eta": 0.0}, "SkillIt eta must be a finite number > 0"),
        ({"eta": math.inf}, "SkillIt eta must be a finite number > 0"),
        ({"update_steps": 0}, "SkillIt update_steps must be an integer >= 1"),
        ({"window": 1.5}, "SkillIt window must be an integer >= 1"),
        ({"graph_steps": 0}, "SkillIt graph_steps must be an integer >= 1"),
        ({"one_hot_factor": 1.5}, "SkillIt one_hot_factor must be in [0, 1]"),
        ({"groups": GROUPS, "one_hot_factor": 0.3}, "one_hot_factor must be > 1/groups"),
        ({"graph": [[1.0, -1.0], [0.0, 1.0]]}, "entries must be >= 0"),
        ({"groups": GROUPS, "graph": np.eye(2).tolist()}, "it needs one row and one column"),
        ({"graph": "/nonexistent/graph.npy"}, "does not exist"),
        ({"groups": GROUPS, "prior": {"delta": 1.0}}, "unknown group"),
    ],
)
def test_bad_configuration_fails_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        SkillIt(**kwargs)
    assert message in str(info.value)


def test_a_graph_phase_longer_than_the_run_is_refused(mixture: str, tmp_path: Path) -> None:
    cfg = {"manifest": mixture, "max_duration": "6ba",
           "algorithm": spec(tmp_path / "run", graph_steps=2)}  # fmt: skip
    with pytest.raises(ValueError, match=r"graph phase takes .* 6 batches, not less"):
        fit(cfg)


# ----------------------------------------------------------------------- end to end
def test_graph_phase_then_updates_follow_the_rule(reference: dict[str, Any]) -> None:
    algorithm, rows = reference["algorithm"], reference["rows"]
    dataset = algorithm.mixing_dataset
    # The phase: each group alone for one batch, in the keyed order, scheduled ahead; the
    # prior (uniform) from its end until the first learned mixture takes effect.
    plan = LearnParamsPlan.build(sweep_mixtures(3, 1.0), 1, 1, dataset.seed, 0, 0)
    schedule = dataset.weight_schedule
    for sweep in plan.sweeps:
        one_hot = np.eye(3)[sweep.group]
        np.testing.assert_allclose(schedule.at(sweep.start_step), one_hot)
    np.testing.assert_allclose(schedule.at(3), 1 / 3)
    realized = dataset.realized_counts
    assert all(realized[g] > 0 for g in GROUPS)

    val = [r for r in rows if r["kind"] == "val_loss"]
    assert [r["step"] for r in val] == [0, 1, 2, 3, 6, 9, 12]
    losses = [[r["losses"][g] for g in GROUPS] for r in val]
    (graph_row,) = [r for r in rows if r["kind"] == "skillit_graph"]
    G = learn_graph(plan.order, losses[:4], 1)
    np.testing.assert_allclose(graph_row["graph"], G, rtol=1e-12)
    assert np.all(G >= 0) and G.max() > 0

    # Every update is the rule on the last `window` measurements, from uniform.
    updates = [r for r in rows if r["kind"] == "skillit"]
    weights = [r for r in rows if r["kind"] == "weights" and r["step"] >= 3]
    assert [r["step"] for r in updates] == [3, 6, 9, 12] == [r["step"] for r in weights]
    for k, (u, w) in enumerate(zip(updates, weights, strict=True)):
        window = losses[3 + max(0, k - 1) : 4 + k]
        p = skillit_update(G, window, eta=0.5)
        np.testing.assert_allclose(list(u["window_losses"].values()), np.sum(window, axis=0))
        np.testing.assert_allclose(list(w["weights"].values()), p, rtol=1e-9)
        assert w["effective_step"] == u["step"] + dataset.update_lag
    saved = json.loads((reference["tmp"] / "run" / "weights.json").read_text())
    assert saved["method"] == "SkillIt" and saved["skillit"]["updates"] == 4
    np.testing.assert_allclose(saved["skillit"]["graph"], G, rtol=1e-12)


def test_a_given_graph_skips_the_phase(
    mixture: str, tmp_path: Path, reference: dict[str, Any]
) -> None:
    # The graph of the reference run, read back from its weights.json.
    source = reference["tmp"] / "run" / "weights.json"
    G = np.asarray(json.loads(source.read_text())["skillit"]["graph"])
    np.save(tmp_path / "graph.npy", G)
    for graph in (str(source), str(tmp_path / "graph.npy"), G.tolist()):
        run = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
        cfg = {"manifest": mixture, "max_duration": "4ba", "algorithm": spec(run, graph=graph)}
        _, algorithm = fit(cfg)
        rows = read_history(run)
        assert not [r for r in rows if r["kind"] == "skillit_graph"]
        assert [r["step"] for r in rows if r["kind"] == "skillit"] == [0, 3]
        losses = [[r["losses"][g] for g in GROUPS] for r in rows if r["kind"] == "val_loss"]
        first = [r for r in rows if r["kind"] == "weights" and r["step"] == 0][-1]
        p = skillit_update(G, losses[:1], eta=0.5)
        np.testing.assert_allclose(list(first["weights"].values()), p, rtol=1e-9)
        assert algorithm.mixer.state.graph == G.tolist()


def test_two_ranks_pool_their_losses_and_agree(mixture: str, tmp_path: Path) -> None:
    cfg = {
        "manifest": mixture,
        "batch_size": 4,  # per rank: global batch 8 as in the 1-rank tests
        "max_duration": "6ba",
        "algorithm": spec(tmp_path / "run"),
    }
    results = run_ranks(rank_fit, 2, cfg, timeout=900)  # a bound on a hang, not a timing check
    assert results[0]["schedule"] == results[1]["schedule"]
    assert results[0]["method"] == results[1]["method"]
    assert results[0]["method"]["updates"] == 2  # at the phase's end (3) and at 6
    assert results[0]["method"]["graph"] is not None


def test_kill_and_resume_continues_exactly(mixture: str, tmp_path: Path) -> None:
    """SIGKILL at batch 10 (in a child process); autoresume from batch 8 here."""
    base = {"manifest": mixture, "max_duration": "14ba", "save_interval": "4ba"}
    reference, resumed = kill_and_resume(base, spec, tmp_path)
    assert [r["batch"] for r in resumed] == list(range(8, 14))  # last checkpoint: batch 8
    assert resumed == reference[8:]

    def decisions(run: Path) -> list[tuple]:
        rows = read_history(run)
        return [(r["step"], r["kind"], json.dumps(r.get("weights") or r.get("losses")))
                for r in rows if r["kind"] in ("weights", "val_loss", "skillit")]  # fmt: skip

    assert decisions(tmp_path / "run") == decisions(tmp_path / "ref-run")
    final = json.loads((tmp_path / "run" / "weights.json").read_text())
    ref_final = json.loads((tmp_path / "ref-run" / "weights.json").read_text())
    assert final["schedule"] == ref_final["schedule"]
    assert final["skillit"] == ref_final["skillit"]
