"""Randomized kill-and-resume property test (issue 12, item 9).

Each trial draws, from its seed: the data seed, global batch, epoch length, update lag, a
weight schedule (``set_weights`` at random steps, some with an ``effective_step`` further
ahead, some still pending when the state is taken), checkpoint steps (some at epoch
boundaries, at batch end or once the epoch has ended), the trainer's ``num_samples``
convention, lockstep or not, and two layouts of 1-2 ranks x 0-2 dataloader workers: one to
save under, one to resume under (the README promises resumption "on another world size or
worker count (same global batch size)"). The saving job -- its ranks and their dataloader
workers, real processes -- is SIGKILLed a few steps after its last checkpoint; a new job
resumes from that last state, read back from disk.

Property: the batches delivered before the checkpoint followed by those after the resume
are exactly the undisturbed run's (0 duplicated, 0 skipped, same groups), both jobs'
prefixes agree with it, nothing crashes, every state equals the undisturbed run's state at
that step, and realized group counts match the plan.

The CI seeds are fixed (:data:`CI_SEEDS`, checked to cover every layout and checkpoint
kind). ``MIXSTREAM_RESUME_TRIALS=N`` adds N random seeds; ``MIXSTREAM_RESUME_SEEDS=1,2``
runs just those (a failure prints its trial and the command that replays it).

Jobs fork from a server that imported torch and mixstream once (``start_method=
"forkserver"``): a fresh interpreter spends seconds importing them, which a fixed CI
budget cannot pay three times per trial.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from mixture_harness import GROUPS, LoopSpec, global_sequence, run_loop

from mixstream.testing.distributed import RankExited, run_ranks
from mixstream.weights import WeightSchedule

LAYOUTS = [(ranks, workers) for ranks in (1, 2) for workers in (0, 1, 2)]
CI_SEEDS = (0, 1, 2, 3, 4, 5, 6, 27, 65, 76, 78, 95)
PRELOAD = ["torch", "torch.distributed", "torch.utils.data", "mixstream.dataset", "mixture_harness"]
REPLAY = "MIXSTREAM_RESUME_SEEDS={seed} {python} -m pytest {path} -k kill_and_resume"


@dataclasses.dataclass(frozen=True)
class Layout:
    ranks: int
    workers: int
    lockstep: bool
    from_beginning: bool  # True: Composer's sample_in_epoch; False: StreamingDataLoader's


@dataclasses.dataclass(frozen=True)
class Trial:
    seed: int
    data_seed: int
    global_batch: int
    batches_per_epoch: int
    epoch_size: int
    update_lag: int
    steps: int
    kill_at: int
    checkpoints: tuple[int, ...]
    epoch_end_checkpoints: bool
    changes: dict[int, list[float]]
    effective: dict[int, int]
    save: Layout
    resume: Layout

    @classmethod
    def draw(cls, seed: int) -> Trial:
        rng = random.Random(seed)

        def layout() -> Layout:
            ranks, workers = rng.choice(LAYOUTS)
            return Layout(ranks, workers, rng.random() < 0.5, rng.random() < 0.7)

        global_batch = rng.choice([4, 8])
        per_epoch = rng.randint(2, 5)
        # Sometimes a remainder the epoch drops (not a whole number of global batches).
        epoch_size = per_epoch * global_batch + rng.choice([0, 0, rng.randrange(1, global_batch)])
        lag = 5 + rng.randint(0, 2)  # 2 workers x prefetch 2 + 1 needs at least 5
        if rng.random() < 0.4:
            resume_at = per_epoch * rng.randint(1, 3)  # an epoch boundary
        else:
            resume_at = rng.randint(1, 3 * per_epoch + 1)
        kill_at = resume_at + rng.choice([0, 0, 1, 2, 3, 5])
        steps = kill_at + rng.randint(2, 2 * per_epoch + 1)
        checkpoints = {resume_at} | {rng.randint(1, steps) for _ in range(rng.randint(0, 3))}
        # No batch-end checkpoint between the chosen one and the kill (an epoch end may be).
        checkpoints = {c for c in checkpoints if not resume_at < c <= kill_at}
        changes: dict[int, list[float]] = {}
        effective: dict[int, int] = {}

        def change(step: int) -> None:
            weights = [rng.choice([0.0, 0.05, 0.3, 1.0]) for _ in GROUPS]
            weights[rng.randrange(len(GROUPS))] += 0.5
            changes[step] = weights
            if rng.random() < 0.4:
                effective[step] = step + lag + rng.randint(1, 6)
            else:
                effective.pop(step, None)

        for step in range(1, steps):
            if rng.random() < 0.25:
                change(step)
        if rng.random() < 0.7:  # an update still pending (in the lag window) at the checkpoint
            change(rng.randint(max(1, resume_at - lag + 1), resume_at))
        return cls(
            seed=seed,
            data_seed=rng.randrange(2**31),
            global_batch=global_batch,
            batches_per_epoch=per_epoch,
            epoch_size=epoch_size,
            update_lag=lag,
            steps=steps,
            kill_at=kill_at,
            checkpoints=tuple(sorted(checkpoints)),
            epoch_end_checkpoints=rng.random() < 0.5,
            changes=dict(sorted(changes.items())),
            effective=effective,
            save=layout(),
            resume=layout(),
        )

    @property
    def resume_step(self) -> int:
        """The step of the last state the killed job takes."""
        taken = [c for c in self.checkpoints if c <= self.kill_at]
        if self.epoch_end_checkpoints:  # epoch ends come after the kill check of their step
            per = self.batches_per_epoch
            taken += [e for e in range(per, self.kill_at, per)]
        return max(taken)

    def schedule_at(self, step: int) -> WeightSchedule:
        """The schedule after the set_weights calls of steps <= ``step``."""
        schedule = WeightSchedule()
        schedule.set(0, [1 / len(GROUPS)] * len(GROUPS))
        for s, weights in self.changes.items():
            if s <= step:
                schedule.set(self.effective.get(s, s + self.update_lag), weights)
        return schedule

    @property
    def pending_at_resume(self) -> bool:
        return any(b > self.resume_step for b, _ in self.schedule_at(self.resume_step).entries)

    def told(self, layout: Layout, start: int, step: int) -> int:
        """The last step the dataset was told about (by set_weights or advance) at ``step``."""
        if layout.lockstep:
            return step
        return max([start, *(s for s in self.changes if start < s <= step)])

    def spec(self, manifest: str, layout: Layout, **kw: Any) -> LoopSpec:
        return LoopSpec(
            manifest=manifest,
            global_batch=self.global_batch,
            steps=self.steps,
            num_workers=layout.workers,
            update_lag=self.update_lag,
            seed=self.data_seed,
            changes=self.changes,
            effective=self.effective,
            checkpoints=self.checkpoints,
            epoch_end_checkpoints=self.epoch_end_checkpoints,
            from_beginning=layout.from_beginning,
            lockstep=layout.lockstep,
            epoch_size=self.epoch_size,
            epochs=self.steps + 1,
            worker_start="fork",  # as under torchrun or composer's launcher on Linux
            track_counts=True,
            **kw,
        )


def _seeds() -> list[int]:
    replay = os.environ.get("MIXSTREAM_RESUME_SEEDS")
    if replay:
        return [int(s) for s in replay.split(",")]
    extra = int(os.environ.get("MIXSTREAM_RESUME_TRIALS", "0"))
    return list(CI_SEEDS) + [random.SystemRandom().randrange(2**32) for _ in range(extra)]


def _normal(obj: Any) -> Any:
    """As read back from a checkpoint file."""
    return json.loads(json.dumps(obj))


def _read_rows(record: str, ranks: int) -> tuple[list[dict], list[list], dict]:
    """What a killed job wrote: per rank what run_loop would have returned (prints, groups,
    step_counts), rank 0's states, and rank 0's header (what to clean up)."""
    per_rank, states, header = [], [], {}
    for rank in range(ranks):
        rows = [
            json.loads(line)
            for line in Path(f"{record}.rank{rank}.jsonl").read_text().split("\n")
            if line
        ]
        steps = [r for r in rows if "prints" in r]
        per_rank.append(
            {
                "prints": [r["prints"] for r in steps],
                "groups": [r["groups"] for r in steps],
                "step_counts": rows[0]["counts"] + [r["counts"] for r in steps],
            }
        )
        if rank == 0:
            header = rows[0]
            states = [[r["step"], r["state"]] for r in rows if "state" in r]
    return per_rank, states, header


def _clean_up_after_kill(header: dict) -> None:
    """Remove what the killed job's streaming left: its shared memory, then its lock files
    (in that order: a prefix whose locks are gone may be taken by the next job)."""
    prefix = f"{header['shm_prefix']:06d}_"
    for path in Path("/dev/shm").glob(f"{prefix}*"):
        path.unlink(missing_ok=True)
    for lock in header["locks"]:
        Path(lock).unlink(missing_ok=True)


def _difference(expected: list[list[int]], got: list[list[int]]) -> str:
    want = collections.Counter(x for batch in expected for x in batch)
    have = collections.Counter(x for batch in got for x in batch)
    first = next(
        (i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b),
        min(len(expected), len(got)),
    )
    return (
        f"{sum((have - want).values())} duplicated, {sum((want - have).values())} skipped, "
        f"{len(got)} batches for {len(expected)}, first difference at batch {first}"
    )


def _counts(groups: list[list[int]]) -> dict[str, int]:
    drawn = collections.Counter(g for batch in groups for g in batch)
    return {name: drawn[i] for i, name in enumerate(GROUPS)}


def _check_states(states: list[list], reference: dict[int, dict], groups: list[list[int]]) -> None:
    for step, state in states:
        assert _normal(state) == reference[step], f"state at step {step} differs from the reference"
        assert state["plan"]["batch"] == step
        assert dict(zip(GROUPS, state["plan"]["counts"], strict=True)) == _counts(groups[:step])


def _check_counts(
    trial: Trial, layout: Layout, start: int, results: list[dict], groups: list[list[int]]
) -> None:
    """realized_counts, read after loading and after every step, on every rank: the draws
    of the undisturbed run before the last step the dataset was told about."""
    for rank, result in enumerate(results):
        for step, counts in enumerate(result["step_counts"], start=start):
            told = trial.told(layout, start, step)
            assert counts == _counts(groups[:told]), f"realized_counts, rank {rank} step {step}"


def _run_trial(trial: Trial, manifest: str, tmp: Path) -> None:
    # The undisturbed run: 1 rank, no workers, in this process. (Every layout gives the same
    # sequence, tested elsewhere; here both jobs' prefixes are compared with it as well.)
    ref = run_loop(0, trial.spec(manifest, Layout(1, 0, False, True)))
    sequence, groups = ref["prints"], ref["groups"]
    assert len(sequence) == trial.steps
    reference: dict[int, dict] = {}
    for step, state in ref["states"]:
        assert reference.setdefault(step, _normal(state)) == _normal(state)

    # The job that is killed.
    record = str(tmp / "killed")
    killed = trial.spec(manifest, trial.save, kill_at=trial.kill_at, record=record)
    with pytest.raises(RankExited) as exited:
        run_ranks(run_loop, trial.save.ranks, killed, start_method="forkserver", preload=PRELOAD)
    assert exited.value.exitcodes == {r: -signal.SIGKILL for r in range(trial.save.ranks)}
    per_rank, states, header = _read_rows(record, trial.save.ranks)
    _clean_up_after_kill(header)
    before = global_sequence(per_rank)
    assert before == sequence[: trial.kill_at], "killed job: " + _difference(
        sequence[: trial.kill_at], before
    )
    assert global_sequence(per_rank, "groups") == groups[: trial.kill_at]
    _check_states(states, reference, groups)
    _check_counts(trial, trial.save, 0, per_rank, groups)
    at, state = states[-1]
    assert at == trial.resume_step
    pending = [b for b, _ in state["schedule"] if b > at]
    assert bool(pending) == trial.pending_at_resume

    # A new job resumes from the last state, on its own layout.
    resumed = trial.spec(manifest, trial.resume, resume_state=state, start_step=at)
    results = run_ranks(run_loop, trial.resume.ranks, resumed, start_method="forkserver")
    after = global_sequence(results)
    combined = before[:at] + after
    assert combined == sequence, "kill and resume: " + _difference(sequence, combined)
    combined_groups = global_sequence(per_rank, "groups")[:at] + global_sequence(results, "groups")
    assert combined_groups == groups
    _check_states(results[0]["states"], reference, groups)
    _check_counts(trial, trial.resume, at, results, groups)
    for result in results:
        assert result["counts"] == _counts(groups[: trial.told(trial.resume, at, trial.steps)])


@pytest.mark.parametrize("seed", _seeds())
def test_kill_and_resume_continues_exactly(mixture: str, tmp_path: Path, seed: int) -> None:
    trial = Trial.draw(seed)
    try:
        _run_trial(trial, mixture, tmp_path)
    except (Exception, pytest.fail.Exception) as exc:
        replay = REPLAY.format(seed=seed, python=sys.executable, path=__file__)
        raise AssertionError(f"{trial}\nreplay: {replay}\n{type(exc).__name__}: {exc}") from exc


def features(trial: Trial) -> set[str]:
    """What a trial exercises, for the coverage check of the CI seeds."""
    save, resume, at, per = trial.save, trial.resume, trial.resume_step, trial.batches_per_epoch
    found = {f"save {save.ranks}x{save.workers}", f"resume {resume.ranks}x{resume.workers}"}
    found.add(f"global batch {trial.global_batch}")
    if save.ranks != resume.ranks:
        found.add("ranks grow" if save.ranks < resume.ranks else "ranks shrink")
    elif save.workers != resume.workers:
        found.add("workers change")
    if (save.ranks, save.workers, resume.ranks, resume.workers) == (2, 1, 1, 2):
        found.add("2x1 -> 1x2")
    found.add("update pending at the checkpoint" if trial.pending_at_resume else "none pending")
    explicit = [s for s in trial.changes if s <= at < trial.effective.get(s, -1)]
    if trial.pending_at_resume and explicit:
        found.add("effective_step pending")
    found.add("checkpoint mid-epoch" if at % per else "checkpoint at an epoch boundary")
    if trial.epoch_end_checkpoints and not at % per and at < trial.kill_at:
        found.add("checkpoint taken once the epoch ended")
    found.add("killed right at the checkpoint" if trial.kill_at == at else "killed batches later")
    if trial.steps // per > at // per + (0 if at % per else 1):
        found.add("resume crosses an epoch end")
    for name, layout in (("save", save), ("resume", resume)):
        found.add(f"{name} {'lockstep' if layout.lockstep else 'free-running'}")
        found.add(f"{name} from_beginning={layout.from_beginning}")
    if trial.epoch_size % trial.global_batch:
        found.add("partial last batch dropped")
    return found


REQUIRED = {f"{phase} {r}x{w}" for phase in ("save", "resume") for r, w in LAYOUTS} | {
    "global batch 4",
    "global batch 8",
    "ranks grow",
    "ranks shrink",
    "workers change",
    "2x1 -> 1x2",
    "update pending at the checkpoint",
    "none pending",
    "effective_step pending",
    "checkpoint mid-epoch",
    "checkpoint at an epoch boundary",
    "checkpoint taken once the epoch ended",
    "killed right at the checkpoint",
    "killed batches later",
    "resume crosses an epoch end",
    *(f"{p} {m}" for p in ("save", "resume") for m in ("lockstep", "free-running")),
    *(f"{p} from_beginning={b}" for p in ("save", "resume") for b in (True, False)),
    "partial last batch dropped",
}


def test_ci_trials_cover_layouts_and_checkpoint_kinds() -> None:
    """The fixed CI seeds exercise every layout, to save and to resume under, and every kind
    of checkpoint in :data:`REQUIRED`; a change to how trials are drawn must keep it so."""
    covered = set().union(*(features(Trial.draw(seed)) for seed in CI_SEEDS))
    assert covered >= REQUIRED, f"not covered by CI_SEEDS: {sorted(REQUIRED - covered)}"
