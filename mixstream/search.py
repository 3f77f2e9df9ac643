"""Mixing-law search (``mixstream search``): a swarm of short static-mixture runs, a fitted
regression of each group's validation loss on the mixture, and the mixture it predicts best.

After RegMix (Liu et al. 2024, sail-sg/regmix) and Data Mixing Laws (Ye et al. 2024):

1. **Swarm**: ``runs`` mixtures drawn from a Dirichlet (keyed by ``seed``; ``alpha`` its
   concentration, 1 = uniform on the simplex), each trained for ``steps`` batches of the
   recipe with ``StaticMixture``. Runs go ``jobs`` at a time; a finished run (its
   ``results.json``) is kept, so an interrupted search continues where it stopped.
2. **Law**: each group's final validation loss regressed on the mixture ``p``:
   ``linear`` (RegMix's linear model, ``L_i = sum_j W_ij p_j``) or ``loglinear`` (Data Mixing
   Laws' ``L_i = k_i exp(sum_j t_ij p_j)``, i.e. ``log L_i`` linear in ``p``). No intercept:
   ``sum_j p_j = 1`` already carries it. Both are closed-form least squares. The report gives
   each group's held-out (leave-one-out) error over the swarm, so a law that does not fit
   says so.
3. **Pick**: like RegMix, score many Dirichlet candidates with the law and average the
   ``top_k`` best under the objective (mean loss over groups, or one target group), which
   is steadier than the single arg-min of a noisy fit.

The result is written as a ``weights.json`` that ``StaticMixture(weights_file=...)`` and
Aioli's ``prior`` read (its ``average`` and ``final`` are the chosen mixture).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "LAWS",
    "MixingLaw",
    "best_mixture",
    "dirichlet_mixtures",
    "fit_law",
    "held_out_error",
    "search",
]

LAWS = ("linear", "loglinear")
SWARM_FILE = "swarm.json"


# ------------------------------------------------------------------------------ pure pieces
def dirichlet_mixtures(num_groups: int, count: int, seed: int, alpha: float = 1.0) -> np.ndarray:
    """``count`` mixtures of ``num_groups`` groups from ``Dirichlet(alpha)``, keyed by ``seed``."""
    if num_groups < 2:
        raise ValueError(f"a mixing-law search needs at least 2 groups, got {num_groups}")
    if count < 1:
        raise ValueError(f"need at least 1 mixture, got {count}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    key = hashlib.blake2b(f"search:{seed}:{num_groups}".encode(), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(key, "little"))
    return rng.dirichlet(np.full(num_groups, float(alpha)), size=count)


@dataclass(frozen=True)
class MixingLaw:
    """A fitted law: ``predict(P)`` gives each group's loss for every mixture (row) of ``P``."""

    law: str
    coef: np.ndarray  # (m groups mixed, k losses)

    def predict(self, mixtures: Any) -> np.ndarray:
        P = np.atleast_2d(np.asarray(mixtures, dtype=np.float64))
        if P.shape[1] != self.coef.shape[0]:
            raise ValueError(f"mixtures have {P.shape[1]} weights, the law {self.coef.shape[0]}")
        out = P @ self.coef
        return np.exp(out) if self.law == "loglinear" else out


def fit_law(mixtures: Any, losses: Any, law: str = "loglinear") -> MixingLaw:
    """Least-squares fit of ``law`` to ``losses[r, i]`` (run r, group i) on ``mixtures[r]``."""
    if law not in LAWS:
        raise ValueError(f"law must be one of {', '.join(LAWS)}, got {law!r}")
    X = np.asarray(mixtures, dtype=np.float64)
    Y = np.asarray(losses, dtype=np.float64)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"need one loss row per mixture, got {X.shape} and {Y.shape}")
    if not (np.all(np.isfinite(X)) and np.all(np.isfinite(Y))):
        raise ValueError("mixtures and losses must be finite")
    if law == "loglinear":
        if np.any(Y <= 0):
            raise ValueError("the loglinear law needs losses > 0")
        Y = np.log(Y)
    coef, *_ = np.linalg.lstsq(X, Y, rcond=None)
    return MixingLaw(law, coef)


def held_out_error(mixtures: Any, losses: Any, law: str = "loglinear") -> np.ndarray:
    """Each group's mean absolute leave-one-out error of ``law`` over the swarm."""
    X = np.asarray(mixtures, dtype=np.float64)
    Y = np.asarray(losses, dtype=np.float64)
    n = X.shape[0]
    if n < 2:
        raise ValueError("a held-out error needs at least 2 runs")
    errors = np.zeros(Y.shape[1])
    for r in range(n):
        keep = np.arange(n) != r
        fitted = fit_law(X[keep], Y[keep], law)
        errors += np.abs(fitted.predict(X[r])[0] - Y[r])
    return errors / n


def best_mixture(
    law: MixingLaw,
    objective: int | None = None,
    *,
    candidates: int = 100_000,
    top_k: int = 100,
    seed: int = 0,
    alpha: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """``(mixture, predicted losses)``: the mean of the ``top_k`` best candidates.

    ``objective``: index of the target group, or ``None`` for the mean over groups.
    """
    m = law.coef.shape[0]
    if candidates < 1 or not (1 <= top_k <= candidates):
        raise ValueError(f"need 1 <= top_k <= candidates, got {top_k} and {candidates}")
    P = dirichlet_mixtures(m, candidates, seed + 1, alpha)
    predicted = law.predict(P)
    score = predicted.mean(axis=1) if objective is None else predicted[:, int(objective)]
    best = P[np.argsort(score, kind="stable")[:top_k]].mean(axis=0)
    best = best / best.sum()
    return best, law.predict(best)[0]


# ------------------------------------------------------------------------------ the swarm
def _load_plan(workdir: Path, groups: list[str], mixtures: np.ndarray, settings: dict) -> None:
    """Write the swarm's plan, or check a resumed search asks for the same one."""
    path = workdir / SWARM_FILE
    plan = {"groups": groups, "settings": settings, "mixtures": mixtures.tolist()}
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("groups") != groups or old.get("settings") != settings:
            raise ValueError(
                f"{workdir} holds a search with other settings ({old.get('settings')}, groups "
                f"{old.get('groups')}); use another --workdir or the same arguments"
            )
        return
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan, indent=2) + "\n")


def _final_val_losses(run_dir: Path, groups: Sequence[str], steps: int) -> np.ndarray:
    rows = [json.loads(x) for x in (run_dir / "mixture_history.jsonl").read_text().splitlines()]
    val = [r for r in rows if r.get("kind") == "val_loss" and r.get("step") == steps]
    if not val:
        raise RuntimeError(f"{run_dir} has no validation loss at batch {steps}")
    losses = val[-1]["losses"]
    return np.array([losses[g] for g in groups], dtype=np.float64)


def _train_one(
    recipe: str, run_dir: Path, weights: dict[str, float], steps: int, overrides: Sequence[str],
    threads: int,
) -> None:  # fmt: skip
    if (run_dir / "results.json").exists():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "mixstream", "train", recipe, *overrides,
        f"run_name={run_dir.name}", f"run_dir={run_dir}", f"max_duration={steps}ba",
        f"eval_interval={steps}ba", f"save_interval={steps}ba", "autoresume=true",
        f"data.local={run_dir / 'cache'}",  # parallel runs must not share a streaming cache
        "algorithm={name: static, weights: " + json.dumps(weights) + "}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log = run_dir / "train.log"
    with open(log, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{run_dir.name} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    shutil.rmtree(run_dir / "cache", ignore_errors=True)


def search(
    recipe: str,
    *,
    runs: int,
    steps: int,
    workdir: str | os.PathLike,
    overrides: Sequence[str] = (),
    jobs: int | None = None,
    law: str = "loglinear",
    target: str | None = None,
    seed: int = 0,
    alpha: float = 1.0,
    top_k: int = 100,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or continue) the swarm, fit the law, write ``WORKDIR/weights.json``; its summary."""
    from mixstream.train.recipe import resolve_recipe

    if runs < 3:
        raise ValueError(f"--runs must be >= 3 (a law over m groups needs several), got {runs}")
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if law not in LAWS:
        raise ValueError(f"--law must be one of {', '.join(LAWS)}, got {law!r}")
    groups = list(resolve_recipe(recipe, list(overrides)).groups)
    if target is not None and target not in groups:
        raise ValueError(f"--target {target!r} is not a group of the recipe: {', '.join(groups)}")
    out = Path(workdir)
    mixtures = dirichlet_mixtures(len(groups), runs, seed, alpha)
    settings = {"recipe": str(recipe), "runs": runs, "steps": steps, "seed": seed, "alpha": alpha,
                "overrides": list(overrides)}  # fmt: skip
    _load_plan(out, groups, mixtures, settings)
    cores = os.cpu_count() or 1
    jobs = max(1, min(runs, jobs or max(1, cores // 2)))
    threads = max(1, cores // jobs)
    dirs = [out / f"run-{r:03d}" for r in range(runs)]
    todo = [r for r in range(runs) if not (dirs[r] / "results.json").exists()]
    say(f"search: {runs} runs of {steps} batches ({runs - len(todo)} done), {jobs} at a time")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [
            pool.submit(_train_one, str(recipe), dirs[r],
                        dict(zip(groups, map(float, mixtures[r]), strict=True)), steps,
                        overrides, threads)
            for r in todo
        ]  # fmt: skip
        for future in futures:
            future.result()
    losses = np.stack([_final_val_losses(d, groups, steps) for d in dirs])
    fitted = fit_law(mixtures, losses, law)
    error = held_out_error(mixtures, losses, law)
    objective = None if target is None else groups.index(target)
    best, predicted = best_mixture(fitted, objective, top_k=min(top_k, 100_000), seed=seed,
                                   alpha=alpha)  # fmt: skip

    def named_vector(values: Any) -> dict[str, float]:
        return dict(zip(groups, map(float, values), strict=True))

    named = named_vector(best)
    swarm_scores = losses.mean(axis=1) if objective is None else losses[:, objective]
    summary = {
        "method": "search",
        "groups": groups,
        "steps": steps,
        "final": named,
        "average": named,
        "schedule": [[0, [float(x) for x in best]]],
        "search": {
            "law": law,
            "objective": "mean" if target is None else target,
            "runs": runs,
            "predicted_val_loss": named_vector(predicted),
            "held_out_abs_error": named_vector(error),
            "best_swarm_run": int(np.argmin(swarm_scores)),
            "swarm": [
                {"weights": named_vector(p), "val_loss": named_vector(v)}
                for p, v in zip(mixtures, losses, strict=True)
            ],
        },
    }
    tmp = out / "weights.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out / "weights.json")
    say(f"law: {law}; held-out |error| per group: "
        + ", ".join(f"{g} {e:.4f}" for g, e in zip(groups, error, strict=True)))  # fmt: skip
    say("predicted best mixture: " + ", ".join(f"{g} {w:.3f}" for g, w in named.items()))
    say(f"wrote {out / 'weights.json'} (StaticMixture(weights_file=...) or Aioli's prior)")
    return summary
