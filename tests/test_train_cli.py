"""``mixstream train | eval | plot`` end to end on a tiny byte-level mixture and a tiny GPT.

Each run is a real ``python -m mixstream`` subprocess. Methods whose algorithm class is not
in this installation are skipped. ``python test_train_cli.py KILL_AT ARGS...`` runs the
``mixstream`` command with the process SIGKILLed at batch KILL_AT, for the autoresume test.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

STEPS = 12


def recipe(mixture: str, run_dir: Path, algorithm: dict[str, Any]) -> dict[str, Any]:
    return {
        "seed": 3,
        "run_dir": str(run_dir),
        "data": {
            "manifest": mixture,
            "global_batch_size": 8,
            "val_samples_per_group": 8,
            "test_samples_per_group": 8,
        },
        "model": {"family": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32},
        "optimizer": {"lr": 3.0e-3},
        "scheduler": {"t_warmup": "2ba"},
        "algorithm": algorithm,
        "max_duration": f"{STEPS}ba",
        "eval_interval": "4ba",
        "log_interval": "4ba",
        "console_log_interval": "4ba",
        "save_interval": "4ba",
        "save_num_checkpoints_to_keep": -1,
    }


def write_recipe(folder: Path, name: str, config: dict[str, Any]) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def mixstream(
    *args: str, cwd: Path, kill_at: int | None = None, expect: int = 0
) -> subprocess.CompletedProcess:
    if kill_at is None:
        command = [sys.executable, "-m", "mixstream", *args]
    else:
        command = [sys.executable, str(Path(__file__).resolve()), str(kill_at), *args]
    proc = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses_of(results: dict[str, Any]) -> dict[str, float]:
    return {g: v["loss"] for g, v in results["test"]["groups"].items()}


def check_run(run_dir: Path, proc: subprocess.CompletedProcess) -> dict[str, Any]:
    """The files and the printed table every finished run has."""
    results = json.loads((run_dir / "results.json").read_text())
    assert results["groups"] == ["alpha", "beta", "gamma"] and results["steps"] == STEPS
    losses = losses_of(results)
    assert all(math.isfinite(v) and 0 < v < 10 for v in losses.values())
    for kind in ("final", "average"):
        assert sum(results["weights"][kind].values()) == pytest.approx(1.0)
    assert "average" in proc.stdout and "perplexity" in proc.stdout
    for g in ("alpha", "beta", "gamma"):
        assert f"{losses[g]:.4f}" in proc.stdout
    assert f"[{STEPS}/{STEPS}] loss" in proc.stdout
    assert (run_dir / "mixture.png").stat().st_size > 10_000
    assert (run_dir / "recipe.yaml").exists() and (run_dir / "weights.json").exists()
    assert (run_dir / "checkpoints" / "latest-rank0.pt").exists()
    return results


@pytest.fixture(scope="module")
def stratified(mixture: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted stratified run, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("stratified")
    config = recipe(mixture, tmp / "run", {"name": "stratified"})
    path = write_recipe(tmp, "stratified", config)
    proc = mixstream("train", str(path), cwd=tmp)
    return {"dir": tmp / "run", "config": config, "proc": proc, "tmp": tmp}


def test_stratified_train_eval_plot(stratified: dict[str, Any], tmp_path: Path) -> None:
    run_dir = stratified["dir"]
    results = check_run(run_dir, stratified["proc"])
    assert results["method"] == "Stratified"
    assert list(results["weights"]["final"].values()) == pytest.approx([1 / 3] * 3)

    checkpoint = run_dir / "checkpoints" / "latest-rank0.pt"
    out = tmp_path / "eval.json"
    proc = mixstream(
        "eval", str(checkpoint), "--samples-per-group", "8", "--out", str(out), cwd=tmp_path
    )
    assert "average" in proc.stdout and f"(batch {STEPS}," in proc.stdout
    evaluated = json.loads(out.read_text())
    assert evaluated["batch"] == STEPS
    for g, loss in losses_of(results).items():
        assert evaluated["groups"][g]["loss"] == pytest.approx(loss, rel=1e-5)
    # --recipe and overrides: the val split of two groups
    proc = mixstream(
        "eval", str(checkpoint), "--recipe", str(run_dir / "recipe.yaml"), "--split", "val",
        "--samples-per-group", "4", "data.groups=[alpha, beta]", cwd=tmp_path,
    )  # fmt: skip
    assert "val loss" in proc.stdout and "gamma" not in proc.stdout

    png = tmp_path / "plot.png"
    proc = mixstream("plot", str(run_dir), "--out", str(png), cwd=tmp_path)
    assert png.stat().st_size > 10_000
    proc = mixstream("plot", str(tmp_path), cwd=tmp_path, expect=2)
    assert "no mixture history" in proc.stderr


def test_plot_draws_the_schedule_in_force(tmp_path: Path) -> None:
    from mixstream.plot import plot_run, weight_steps

    rows = [
        {"step": 0, "kind": "weights", "effective_step": 0, "weights": {"a": 0.5, "b": 0.5}},
        {"step": 2, "kind": "weights", "effective_step": 6, "weights": {"a": 0.9, "b": 0.1}},
        {"step": 3, "kind": "weights", "effective_step": 5, "weights": {"a": 0.2, "b": 0.8}},
        {"step": 4, "kind": "train_loss", "losses": {"a": 3.0, "b": None}},
        {"step": 4, "kind": "val_loss", "losses": {"a": 3.1, "b": 3.3}},
        {"step": 8, "kind": "weights", "effective_step": 9, "weights": {"a": 1.0, "b": 0.0}},
        {"step": 8, "kind": "final", "final": {"a": 0.2, "b": 0.8}},
    ]
    # a later decision replaces every entry at or after its effective step
    assert weight_steps(rows) == [
        (0, {"a": 0.5, "b": 0.5}),
        (5, {"a": 0.2, "b": 0.8}),
        (9, {"a": 1.0, "b": 0.0}),
    ]
    (tmp_path / "mixture_history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot_run(tmp_path) == tmp_path / "mixture.png"
    assert (tmp_path / "mixture.png").stat().st_size > 10_000


def available(cls: str) -> bool:
    try:
        getattr(importlib.import_module("mixstream.algorithms"), cls)
    except (ImportError, AttributeError):
        return False
    return True


METHODS = {
    "static": ("StaticMixture", {"weights": {"alpha": 0.6, "beta": 0.3, "gamma": 0.1}}),
    # a 4-batch warm-up, then rounds of 4 batches, 3 of them LearnParams (one 1-batch sweep
    # per group): 2 rounds
    "aioli": ("Aioli", {"update_steps": 4, "lp_rounds": 1, "lp_steps": 1}),
    "doremi": ("DoReMi", {"update_steps": 2}),
    "dga": ("DGA", {"target": "alpha", "update_steps": 4, "probe_batch_size": 2,
                    "probe_samples_per_group": 4}),
    "odm": ("ODM", {"warmup_steps": 2}),
    "ado": ("ADO", {"warmup_steps": 5, "ignore_steps": 1, "fit_interval": 3}),
    # a 3-batch graph phase (each group alone for a batch), then updates at 3, 6, 9, 12
    "skillit": ("SkillIt", {"graph_steps": 1, "update_steps": 3}),
    "doge": ("DoGE", {"update_steps": 2, "probe_batch_size": 2, "probe_samples_per_group": 4}),
}  # fmt: skip


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains(method: str, stratified: dict[str, Any], tmp_path: Path) -> None:
    cls, options = METHODS[method]
    if not available(cls):
        pytest.skip(f"mixstream.algorithms.{cls} is not in this installation yet")
    algorithm = {"name": method, **options}
    if method == "doremi":  # the stratified run is the reference model
        reference = stratified["dir"] / "checkpoints" / "latest-rank0.pt"
        algorithm["reference_checkpoint"] = str(reference)
    path = write_recipe(tmp_path, method, recipe(stratified["config"]["data"]["manifest"],
                                                 tmp_path / "run", algorithm))  # fmt: skip
    proc = mixstream("train", str(path), cwd=tmp_path)
    results = check_run(tmp_path / "run", proc)
    assert results["method"] == cls
    if method == "static":
        assert results["weights"]["final"]["alpha"] == pytest.approx(0.6)
    history = [json.loads(x) for x in (tmp_path / "run" / "mixture_history.jsonl").open()]
    assert any(r["kind"] == "val_loss" and r["step"] == 4 for r in history)


def test_autoresume_after_kill(stratified: dict[str, Any], tmp_path: Path) -> None:
    """SIGKILL at batch 10 (last checkpoint: 8); the same command again resumes at 8 and ends
    with the per-group test results of the uninterrupted run."""
    config = {**stratified["config"], "run_dir": str(tmp_path / "run")}
    path = write_recipe(tmp_path, "stratified", config)
    killed = mixstream("train", str(path), cwd=tmp_path, kill_at=10, expect=-signal.SIGKILL)
    assert "[ 8/12]" in killed.stdout and "[12/12]" not in killed.stdout
    assert not (tmp_path / "run" / "results.json").exists()
    resumed = mixstream("train", str(path), cwd=tmp_path)
    assert "resuming at batch 8" in resumed.stdout and "[ 4/12]" not in resumed.stdout
    results = check_run(tmp_path / "run", resumed)
    reference = json.loads((stratified["dir"] / "results.json").read_text())
    for g, loss in losses_of(reference).items():
        assert losses_of(results)[g] == pytest.approx(loss, rel=1e-6)
    # once more: the run is complete, so only the test loss is measured (again)
    again = mixstream("train", str(path), cwd=tmp_path)
    assert "the run is complete (batch 12)" in again.stdout and "] loss " not in again.stdout
    assert json.loads((tmp_path / "run" / "results.json").read_text())["test"] == results["test"]


if __name__ == "__main__":
    from composer import Callback, Event, State
    from composer.loggers import Logger

    import mixstream.train.run as run
    from mixstream.cli import main

    kill_at = int(sys.argv[1])

    class KillAt(Callback):
        def run_event(self, event: Event, state: State, logger: Logger) -> None:
            if event == Event.BATCH_END and int(state.timestamp.batch) == kill_at:
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)

    build = run.build_training
    run.build_training = lambda recipe, callbacks=(): build(recipe, [*callbacks, KillAt()])
    sys.exit(main(sys.argv[2:]))
