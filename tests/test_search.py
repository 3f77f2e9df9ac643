"""Mixing-law search: the fitted laws recover a planted law, the pick follows the objective,
and ``mixstream search`` trains a tiny swarm, resumes it, and writes a weights.json that
StaticMixture reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from mixstream.composer.static import load_weights_file
from mixstream.search import best_mixture, dirichlet_mixtures, fit_law, held_out_error

REPO = Path(__file__).resolve().parents[1]


def test_dirichlet_mixtures_are_keyed_points_of_the_simplex() -> None:
    P = dirichlet_mixtures(3, 50, seed=4)
    assert P.shape == (50, 3) and np.all(P > 0)
    np.testing.assert_allclose(P.sum(axis=1), 1.0)
    np.testing.assert_array_equal(P, dirichlet_mixtures(3, 50, seed=4))
    assert not np.allclose(P, dirichlet_mixtures(3, 50, seed=5))
    with pytest.raises(ValueError, match="at least 2 groups"):
        dirichlet_mixtures(1, 5, 0)


@pytest.mark.parametrize("law", ["linear", "loglinear"])
def test_a_planted_law_is_recovered_with_no_held_out_error(law: str) -> None:
    P = dirichlet_mixtures(3, 12, seed=1)
    coef = np.array([[1.0, 0.2, 0.5], [0.4, 1.5, 0.3], [0.9, 0.8, 0.1]])  # (groups, losses)
    Y = P @ coef if law == "linear" else np.exp(P @ coef)
    fitted = fit_law(P, Y, law)
    np.testing.assert_allclose(fitted.coef, coef, atol=1e-9)
    np.testing.assert_allclose(held_out_error(P, Y, law), 0.0, atol=1e-9)
    # a wrong law leaves a visible held-out error
    other = "loglinear" if law == "linear" else "linear"
    assert held_out_error(P, Y, other).max() > 1e-3


def test_the_pick_minimises_the_objective() -> None:
    # Linear law L(p) = p0 [1, 3] + p1 [3, 2]: the mean loss (2 p0 + 2.5 p1) wants group 0,
    # group 1's own loss (3 p0 + 2 p1) wants group 1.
    law = fit_law(np.eye(2), [[1.0, 3.0], [3.0, 2.0]], "linear")
    mean_best, predicted = best_mixture(law, None, candidates=20_000, top_k=50)
    assert mean_best[0] > 0.95
    np.testing.assert_allclose(predicted, law.predict(mean_best)[0])
    target_best, _ = best_mixture(law, 1, candidates=20_000, top_k=50)
    assert target_best[1] > 0.95


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="law must be one of linear, loglinear"):
        fit_law(np.eye(2), np.eye(2), "cubic")
    with pytest.raises(ValueError, match="needs losses > 0"):
        fit_law(np.eye(2), [[1.0, 0.0], [1.0, 1.0]], "loglinear")
    with pytest.raises(ValueError, match="one loss row per mixture"):
        fit_law(np.eye(2), np.ones((3, 2)))


def tiny_recipe(mixture: str, path: Path) -> Path:
    config = {
        "seed": 3,
        "data": {"manifest": mixture, "global_batch_size": 8, "val_samples_per_group": 8,
                 "test_samples_per_group": 8},
        "model": {"family": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32},
        "optimizer": {"lr": 3.0e-3},
        "scheduler": {"t_warmup": "1ba"},
        "algorithm": {"name": "stratified"},
        "max_duration": "100ba",
        "log_interval": "2ba",
        "console_log_interval": "2ba",
    }  # fmt: skip
    path.write_text(yaml.safe_dump(config))
    return path


def mixstream(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mixstream", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=1800, check=False)  # fmt: skip


def test_search_cli_trains_resumes_and_writes_weights(mixture: str, tmp_path: Path) -> None:
    recipe = tiny_recipe(mixture, tmp_path / "tiny.yaml")
    args = ["search", str(recipe), "--runs", "3", "--steps", "2", "--jobs", "2",
            "--workdir", str(tmp_path / "swarm"), "--law", "linear"]  # fmt: skip
    first = mixstream(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "3 runs of 2 batches (0 done)" in first.stdout
    saved = json.loads((tmp_path / "swarm" / "weights.json").read_text())
    assert saved["groups"] == ["alpha", "beta", "gamma"] and saved["search"]["runs"] == 3
    assert sum(saved["average"].values()) == pytest.approx(1.0)
    swarm = saved["search"]["swarm"]
    P = dirichlet_mixtures(3, 3, seed=0)
    for row, p in zip(swarm, P, strict=True):
        assert list(row["weights"].values()) == pytest.approx(list(p))
        assert all(v > 0 for v in row["val_loss"].values())
    for r in range(3):  # every run trained its own static mixture
        history = (tmp_path / "swarm" / f"run-{r:03d}" / "mixture_history.jsonl").read_text()
        rows = [json.loads(x) for x in history.splitlines()]
        first_weights = next(row for row in rows if row["kind"] == "weights")
        assert list(first_weights["weights"].values()) == pytest.approx(list(P[r]))
    # StaticMixture (and Aioli's prior) read it
    assert load_weights_file(str(tmp_path / "swarm" / "weights.json"))[0][1] == saved["average"]

    logs = [tmp_path / "swarm" / f"run-{r:03d}" / "train.log" for r in range(3)]
    stamps = [p.stat().st_mtime_ns for p in logs]
    again = mixstream(*args, cwd=tmp_path)  # resumes: nothing left to train
    assert again.returncode == 0 and "(3 done)" in again.stdout
    assert [p.stat().st_mtime_ns for p in logs] == stamps
    steps = args.index("--steps") + 1
    other = mixstream(*args[:steps], "3", *args[steps + 1 :], cwd=tmp_path)
    assert other.returncode == 2 and "holds a search with other settings" in other.stderr
