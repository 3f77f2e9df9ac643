"""DynamicStreamingDataset: determinism across layouts, exact resume, live reweighting, errors.

Real processes throughout: ranks are spawned with torch.distributed (gloo, loopback), data
loaders use real worker processes, and the streams live on the embedded SeaweedFS server.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import gc
import os
import random
import tempfile
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from mixture_harness import (
    GROUPS,
    LoopSpec,
    convert_corpus,
    fingerprint,
    global_sequence,
    run_loop,
    write_corpus,
)

from mixstream import DynamicStreamingDataset, MixtureStateError
from mixstream.plan import PlanState
from mixstream.testing.distributed import run_ranks

CHANGES = {
    3: {"alpha": 0.7, "beta": 0.2, "gamma": 0.1},
    9: {"alpha": 0.0, "beta": 1.0, "gamma": 0.0},
    14: {"alpha": 0.01, "beta": 0.49, "gamma": 0.5},
}


@pytest.fixture(scope="module")
def local_mixture(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("mixture")
    write_corpus(root / "corpus")
    out = root / "out"
    convert_corpus(root / "corpus", str(out))
    return str(out)


@pytest.fixture(scope="module")
def s3_mixture(tmp_path_factory: pytest.TempPathFactory, s3_server) -> tuple[str, dict[str, str]]:
    root = tmp_path_factory.mktemp("s3mixture")
    write_corpus(root / "corpus")
    with s3_server.apply_env():
        url = "s3://mixstream/dataset-tests"
        convert_corpus(root / "corpus", url)
    return url, dict(s3_server.env)


def spec_for(mixture: tuple[str, dict[str, str]], tmp: Path, **kw: object) -> LoopSpec:
    url, env = mixture
    base = LoopSpec(manifest=url, global_batch=8, steps=20, changes=CHANGES, env=env)
    return dataclasses.replace(base, local=str(tmp / "cache"), **kw)


def test_same_global_sequence_for_every_world_size_and_worker_count(
    s3_mixture: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    reference = None
    layouts = [(1, 0, 1), (1, 2, 1), (2, 0, 2), (2, 2, 2), (4, 0, 4), (4, 2, 4)]
    for world, workers, per_node in layouts:
        spec = spec_for(s3_mixture, tmp_path / f"{world}-{workers}", num_workers=workers)
        per_rank = run_ranks(run_loop, world, spec, ranks_per_node=per_node, env=spec.env)
        sequence = global_sequence(per_rank)
        assert len(sequence) == spec.steps and all(len(b) == 8 for b in sequence)
        if reference is None:
            reference = sequence
        assert sequence == reference, f"{world} ranks ({per_node}/node) x {workers} workers"


def test_weight_changes_take_effect_after_the_lag(local_mixture: str) -> None:
    spec = LoopSpec(manifest=local_mixture, global_batch=8, steps=20, changes=CHANGES)
    result = run_loop(0, spec)
    groups = result["groups"]
    # set_weights at step 9 (lag 5) makes batches 14.. (0-based) beta only until the next
    # change, which lands at batch 19.
    assert all(g == 1 for batch in groups[14:19] for g in batch)
    assert any(g != 1 for g in groups[13])
    # realized_counts reports the draws before the last step the dataset was told about (14).
    drawn = collections.Counter(g for batch in groups[:14] for g in batch)
    assert result["counts"] == {name: drawn[i] for i, name in enumerate(GROUPS)}


@pytest.mark.parametrize(("save_at", "world", "workers"), [(9, 2, 2), (12, 1, 0), (14, 4, 0)])
def test_resume_continues_the_exact_sequence(
    s3_mixture: tuple[str, dict[str, str]],
    tmp_path: Path,
    save_at: int,
    world: int,
    workers: int,
) -> None:
    """Save mid-epoch (also right after a set_weights whose effect is pending), resume on
    another layout in fresh processes, and get exactly the uninterrupted continuation."""
    full = spec_for(s3_mixture, tmp_path / "full", num_workers=2, steps=24, save_at=save_at)
    uninterrupted = run_ranks(run_loop, 2, full, env=full.env)
    state = uninterrupted[0]["state"]
    assert state["plan"]["batch"] == save_at
    pending = [b for b, _ in state["schedule"] if b > save_at]
    if save_at in CHANGES:
        assert pending, "the checkpoint should hold the update that is still in the lag window"
    resumed = spec_for(
        s3_mixture,
        tmp_path / "resumed",
        num_workers=workers,
        steps=24,
        start_step=save_at,
        resume_state=state,
    )
    continuation = global_sequence(run_ranks(run_loop, world, resumed, env=resumed.env))
    assert continuation == global_sequence(uninterrupted)[save_at:]


@pytest.mark.parametrize("workers", [0, 2])
def test_epochs_continue_one_global_sequence(local_mixture: str, workers: int) -> None:
    """Short epochs (a fresh iterator, fresh workers each) continue where the last one ended."""
    reference = run_loop(0, LoopSpec(manifest=local_mixture, global_batch=8, steps=15))
    spec = LoopSpec(
        manifest=local_mixture,
        global_batch=8,
        steps=15,
        epoch_size=5 * 8,
        epochs=3,
        num_workers=workers,
    )
    assert run_loop(0, spec)["prints"] == reference["prints"]


def test_a_local_leader_slow_after_the_epoch_barrier_repeats_nothing(local_mixture: str) -> None:
    """Only the local leader used to record that an epoch had begun, after the barrier: a
    rank that finished its short epoch while the leader lingered read the old epoch counter
    and replayed the epoch (every sample of it twice)."""
    reference = run_loop(0, LoopSpec(manifest=local_mixture, global_batch=8, steps=8))
    spec = LoopSpec(
        manifest=local_mixture,
        global_batch=8,
        steps=8,
        epoch_size=2 * 8,
        epochs=4,
        leader_delay=1.0,
    )
    assert global_sequence(run_ranks(run_loop, 2, spec)) == reference["prints"]


def test_within_a_pass_no_sample_repeats_or_is_skipped(local_mixture: str) -> None:
    ds = DynamicStreamingDataset(manifest=local_mixture, batch_size=16, seed=3)
    try:
        plan, sizes = ds.plan, ds.plan.group_sizes
        state = PlanState.initial(len(sizes))
        seen: dict[int, list[int]] = {g: [] for g in range(len(sizes))}
        while min(state.counts) < max(sizes) + 5:
            draw, state = plan.step(state, ds._schedule)
            ids, groups = plan.layout(draw, 0, 16)
            for g, n in enumerate(draw.counts):
                drawn = plan.group_positions(g, draw.cursors[g], n)
                # The batch holds exactly the group's next positions, in shuffled slots.
                assert sorted(ids[groups == g].tolist()) == sorted(drawn.tolist())
                seen[g].extend(drawn.tolist())
        for g, ids in seen.items():
            first_pass, second = ids[: sizes[g]], ids[sizes[g] :]
            offset = int(plan.offsets[g])
            assert sorted(first_pass) == list(range(offset, offset + sizes[g]))
            assert second != first_pass[: len(second)]  # the next pass is a fresh shuffle
    finally:
        ds.close()


def test_zero_weight_groups_are_never_drawn(local_mixture: str) -> None:
    ds = DynamicStreamingDataset(
        manifest=local_mixture, batch_size=8, weights={"alpha": 1.0, "gamma": 0.0}
    )
    try:
        groups = {int(s["group"]) for _, s in zip(range(200), ds, strict=False)}
        assert groups == {0}
    finally:
        ds.close()


def test_bad_set_weights_calls_raise_clear_errors(local_mixture: str) -> None:
    ds = DynamicStreamingDataset(manifest=local_mixture, batch_size=4, update_lag=3)
    try:
        cases = [
            ([1, 2], 0, None, "got 2 weights for 3 groups"),
            ([1, -1, 1], 0, None, "negative"),
            ([1, float("nan"), 1], 0, None, "finite"),
            ([0, 0, 0], 0, None, "all zero"),
            ({"delta": 1}, 0, None, "unknown group"),
            ([1, 1, 1], 10, 9, "inside the update lag window"),
        ]
        for weights, step, effective, message in cases:
            with pytest.raises(ValueError, match=message):
                ds.set_weights(weights, step=step, effective_step=effective)
        ds.set_weights([1, 1, 1], step=10)
        with pytest.raises(ValueError, match="in the past"):
            ds.set_weights([1, 1, 1], step=9)
        assert ds.set_weights([1, 0, 0], step=10, effective_step=20) == 20
        assert [b for b, _ in ds.schedule] == [0, 13, 20]
    finally:
        ds.close()


def test_lag_applies_once_iteration_has_begun(local_mixture: str) -> None:
    ds = DynamicStreamingDataset(manifest=local_mixture, batch_size=4, update_lag=3)
    try:
        # Nothing is planned yet: a schedule may be set up to start right away.
        assert ds.set_weights([1, 0, 0], step=0, effective_step=0) == 0
        first = next(iter(ds))
        assert first["group"] == 0
        with pytest.raises(ValueError, match="inside the update lag window"):
            ds.set_weights([0, 1, 0], step=0, effective_step=2)
        assert ds.set_weights([0, 1, 0], step=0) == 3
    finally:
        ds.close()


def test_state_from_another_mixture_is_rejected(local_mixture: str) -> None:
    ds = DynamicStreamingDataset(manifest=local_mixture, batch_size=4, seed=1)
    state = ds.state_dict(0, True)
    ds.close()
    for kwargs, message in [
        ({"seed": 2}, "seed 1 \\(saved\\) vs 2"),
        ({"batch_size": 8, "seed": 1}, "global_batch_size 4 \\(saved\\) vs 8"),
        ({"groups": ["alpha", "beta"], "seed": 1}, "streams"),
    ]:
        other = DynamicStreamingDataset(manifest=local_mixture, **{"batch_size": 4, **kwargs})
        try:
            with pytest.raises(MixtureStateError, match=message):
                other.load_state_dict(state)
        finally:
            other.close()
    other = DynamicStreamingDataset(manifest=local_mixture, batch_size=4, seed=1)
    try:
        with pytest.raises(MixtureStateError, match="not a DynamicStreamingDataset state"):
            other.load_state_dict({"epoch": 0, "sample_in_epoch": 0})
    finally:
        other.close()


def test_resume_planning_cost_does_not_depend_on_position(local_mixture: str) -> None:
    """A state far into training resumes without replaying anything before it."""
    ds = DynamicStreamingDataset(manifest=local_mixture, batch_size=8, seed=5)
    try:
        batch = 10**9 // 8
        state = ds.state_dict(0, True)
        third = batch * 8 // 3
        state["plan"] = {
            "batch": batch,
            "targets": [batch * 8 / 3] * 3,
            "counts": [batch * 8 - 2 * third, third, third],
        }
        state["epoch"] = batch // ds.batches_per_epoch
        state["sample_in_epoch"] = (batch % ds.batches_per_epoch) * 8
        ds.load_state_dict(state)
        first = next(iter(ds))
        assert "input_ids" in first and first["group"] in (0, 1, 2)
        in_epoch = (batch % ds.batches_per_epoch) * 8
        assert ds.state_dict(in_epoch, True)["plan"]["batch"] == batch
    finally:
        ds.close()


def test_cache_limit_holds_and_does_not_change_the_order(
    s3_mixture: tuple[str, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a cache too small for the mixture, shards are evicted and re-fetched from S3, the
    cache stays under its limit, and the sample order is unchanged."""
    url, env = s3_mixture
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    reference = run_loop(0, spec_for(s3_mixture, tmp_path / "unlimited", changes={}))
    ds = DynamicStreamingDataset(
        manifest=url,
        batch_size=8,
        seed=7,
        update_lag=5,
        local=str(tmp_path / "small"),
        cache_limit="150kb",
    )
    try:
        total = sum(int(s.get_max_size()) for s in ds.shards)
        assert total > 150_000, "the test needs a mixture larger than the cache"
        prints, peak = [], 0
        for _, batch in zip(range(20), _batches(ds, 8), strict=False):
            prints.append([fingerprint(r) for r in batch])
            peak = max(peak, ds.cache_usage)
        assert peak <= 150 * 1024
        assert prints == reference["prints"]
    finally:
        ds.close()


def _batches(ds: DynamicStreamingDataset, size: int) -> Iterator[list[torch.Tensor]]:
    batch = []
    for sample in ds:
        batch.append(torch.as_tensor(sample["input_ids"]))
        if len(batch) == size:
            yield batch
            batch = []


def test_epoch_ends_with_downloads_in_flight_do_not_hang(
    s3_mixture: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    """Short epochs from S3 with 2 workers: a worker that finishes its share of an epoch while
    its look-ahead downloads are running must not strand those shards half-prepared."""
    spec = spec_for(
        s3_mixture, tmp_path, num_workers=2, steps=24, epoch_size=4 * 8, epochs=6, changes={}
    )
    reference = spec_for(s3_mixture, tmp_path / "ref", num_workers=0, steps=24, changes={})
    assert (
        run_ranks(run_loop, 1, spec, env=spec.env, timeout=240)[0]["prints"]
        == run_ranks(run_loop, 1, reference, env=reference.env, timeout=240)[0]["prints"]
    )


def test_a_shared_memory_prefix_taken_meanwhile_is_retried(
    local_mixture: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import streaming.base.shared.prefix as prefix

    real = prefix.SharedMemory
    raced = []

    def racing(name: str, create: bool = False, size: int = 0, *args: object) -> object:
        if create and name.endswith("_locals") and not raced:
            raced.append(name)  # another job created it between streaming's scan and create
            raise FileExistsError(17, "File exists", name)
        return real(name, create, size, *args)

    monkeypatch.setattr(prefix, "SharedMemory", racing)
    ds = DynamicStreamingDataset(manifest=local_mixture, batch_size=4)
    try:
        assert raced and ds.batches_per_epoch > 0
    finally:
        ds.close()


def _planned(ds: DynamicStreamingDataset, batch: int) -> PlanState:
    """The plan state before ``batch`` under the dataset's schedule now, stepped from zero."""
    return ds.plan.advance(PlanState.initial(ds.plan.num_groups), ds._schedule, batch)


def _random_weights(rng: random.Random) -> list[float]:
    weights = [rng.choice([0.0, 0.05, 0.3, 1.0]) for _ in GROUPS]
    weights[rng.randrange(len(GROUPS))] += 0.5
    return weights


@pytest.mark.parametrize("seed", range(4))
def test_plan_queries_in_any_legal_order_agree_and_never_raise(
    local_mixture: str, seed: int
) -> None:
    """Randomized trainer call orders: checkpoints at, behind and ahead of the announced step,
    with updates pending in the lag window, across epoch boundaries, and resumes from them.
    ``realized_counts`` and every saved plan must equal the plan stepped from zero under the
    schedule in force, and never raise (it used to: "cannot step back from batch 42 to 31")."""
    rng = random.Random(seed)
    per = 4
    kwargs = {"manifest": local_mixture, "batch_size": per, "update_lag": 2, "epoch_size": 5 * per}
    trainer = DynamicStreamingDataset(**kwargs, seed=seed)
    resumed = DynamicStreamingDataset(**kwargs, seed=seed)
    saved: list[dict] = []
    try:
        for _ in range(120):
            ds = resumed if saved and rng.random() < 0.4 else trainer
            op = rng.choice(
                ["advance", "set_weights", "state_dict", "state_dict", "counts", "load"]
            )
            if op == "advance":
                ds.advance(ds._step + rng.randint(0, 3))
            elif op == "set_weights":
                step = ds._step + rng.randint(0, 3)
                effective = None if rng.random() < 0.5 else step + ds.update_lag + rng.randint(0, 4)
                ds.set_weights(_random_weights(rng), step=step, effective_step=effective)
            elif op == "state_dict":
                batches = rng.randint(0, ds._step + 12)  # behind, at, or ahead of the step
                from_beginning = ds is trainer and rng.random() < 0.5
                state = ds.state_dict(batches * per, from_beginning)
                batch = batches
                if ds._resume is not None:
                    batch = ds._resume.state.batch + (0 if from_beginning else batches)
                assert state["plan"] == _planned(ds, batch).to_dict()
                assert state["epoch"] == batch // 5
                assert state["sample_in_epoch"] == (batch % 5) * per
                if ds is trainer:
                    saved.append(state)
            elif op == "counts":
                expected = _planned(ds, ds._step).counts
                assert ds.realized_counts == dict(zip(GROUPS, expected, strict=True))
            elif saved:
                state = rng.choice(saved)
                resumed.load_state_dict(copy.deepcopy(state))
                counts = dict(zip(GROUPS, state["plan"]["counts"], strict=True))
                assert resumed.realized_counts == counts
                assert resumed.state_dict(0, False)["plan"] == state["plan"]
        assert saved, "the walk should have saved states"
        # The last resume continues with exactly the batch the plan says comes next.
        state = saved[-1]
        resumed.load_state_dict(copy.deepcopy(state))
        draw, _ = resumed.plan.step(PlanState.from_dict(state["plan"]), resumed._schedule)
        ids, _ = resumed.plan.layout(draw, 0, per)
        expected = [resumed[i]["input_ids"].tobytes() for i in ids.tolist()]
        got = [s["input_ids"].tobytes() for _, s in zip(range(per), resumed, strict=False)]
        assert got == expected
    finally:
        trainer.close()
        resumed.close()


def _mutations() -> list[tuple[str, Callable[[dict], None], str]]:
    def plan(key: str, value: object) -> Callable[[dict], None]:
        return lambda s: s["plan"].__setitem__(key, value)

    def shift(s: dict, by: int) -> None:
        s["plan"]["counts"][0] += by
        s["plan"]["counts"][1] -= by

    return [
        ("negative count", lambda s: s["plan"]["counts"].__setitem__(1, -1), r"plan\.counts\[1\]"),
        ("count off the batch", lambda s: s["plan"]["counts"].__setitem__(0, 999), "sums to"),
        ("counts off the targets", lambda s: shift(s, 7), r"plan\.counts\[0\] is .* target"),
        ("negative batch", plan("batch", -3), r"plan\.batch -3 is outside the run"),
        ("float batch", plan("batch", 2.5), r"plan\.batch must be an integer"),
        ("huge batch", plan("batch", 10**30), r"plan\.batch 10+ is outside the run"),
        ("targets", lambda s: s["plan"]["targets"].__setitem__(2, 1.0), r"plan\.targets\[2\]"),
        ("nan target", lambda s: s["plan"]["targets"].__setitem__(0, float("nan")), "finite"),
        ("short counts", plan("counts", [1, 2]), r"plan\.counts must be a list of 3"),
        ("no counts", lambda s: s["plan"].pop("counts"), r"plan\.counts is missing"),
        ("no plan", lambda s: s.pop("plan"), "state field plan is missing"),
        ("no schedule", lambda s: s.pop("schedule"), "schedule is missing"),
        ("empty schedule", lambda s: s.__setitem__("schedule", []), "schedule is empty"),
        ("late start", lambda s: s["schedule"][0].__setitem__(0, 1), r"schedule\[0\] starts"),
        ("unsorted", lambda s: s["schedule"].reverse(), r"schedule\[0\] starts at batch 1[0-9]"),
        ("repeat", lambda s: s["schedule"].append(s["schedule"][-1]), "strictly increasing"),
        ("negative weight", lambda s: s["schedule"][1][1].__setitem__(0, -0.5), r"\[1\]\[0\]"),
        ("unnormalized", lambda s: s["schedule"][1].__setitem__(1, [1, 1, 1]), "sums to 3"),
        ("bad entry", lambda s: s["schedule"].__setitem__(1, 7), r"schedule\[1\] must be"),
        ("epoch", lambda s: s.__setitem__("epoch", 5), "epoch 5 and sample_in_epoch"),
        ("no epoch", lambda s: s.pop("sample_in_epoch"), "sample_in_epoch is missing"),
        ("lag", lambda s: s.__setitem__("update_lag", -1), "update_lag must be a non-negative"),
        ("no seed", lambda s: s["identity"].pop("seed"), r"identity\.seed is missing"),
        ("str seed", lambda s: s["identity"].__setitem__("seed", "7"), r"identity\.seed must be"),
        ("streams", lambda s: s["identity"].__setitem__("streams", {}), r"identity\.streams"),
    ]


@pytest.mark.parametrize(("name", "mutate", "message"), _mutations(), ids=lambda x: x)
def test_corrupt_states_are_refused_naming_the_field(
    local_mixture: str, name: str, mutate: Callable[[dict], None], message: str
) -> None:
    """Every field of a saved state is checked; a bad one is a MixtureStateError saying which,
    and leaves the dataset as it was (it used to load silently or raise a bare KeyError)."""
    del name
    ds = DynamicStreamingDataset(manifest=local_mixture, batch_size=4, update_lag=2, seed=1)
    try:
        ds.set_weights([0.6, 0.3, 0.1], step=0, effective_step=0)
        ds.set_weights([0.1, 0.2, 0.7], step=9)
        good = ds.state_dict(10 * 4, True)  # the second update (batch 11) is still pending
        assert [b for b, _ in good["schedule"]] == [0, 11]
        bad = copy.deepcopy(good)
        mutate(bad)
        with pytest.raises(MixtureStateError, match=message):
            ds.load_state_dict(bad)
        assert ds.state_dict(10 * 4, True) == good
        ds.load_state_dict(copy.deepcopy(good))
        assert ds.realized_counts == dict(zip(GROUPS, good["plan"]["counts"], strict=True))
    finally:
        ds.close()


def test_steps_must_be_whole_batches_within_the_run(local_mixture: str) -> None:
    ds = DynamicStreamingDataset(manifest=local_mixture, batch_size=4, update_lag=2)
    try:
        for step, message in [(1.7, "must be an integer"), (10**30, "outside the run")]:
            with pytest.raises(ValueError, match=f"step {message}|step {step} is {message}"):
                ds.set_weights([1, 1, 1], step=step)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match=message):
                ds.advance(step)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="effective_step must be an integer"):
            ds.set_weights([1, 1, 1], step=0, effective_step=4.0)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="step must be an integer"):
            ds.advance(True)
        assert ds.set_weights([1, 1, 1], step=np.int64(3)) == 5
        assert [b for b, _ in ds.schedule] == [0, 5]
    finally:
        ds.close()


def test_lockstep_without_advance_times_out_saying_what_to_do(local_mixture: str) -> None:
    """A loop that never calls advance() used to hang forever at batch step + lag."""
    ds = DynamicStreamingDataset(
        manifest=local_mixture, batch_size=4, update_lag=2, lockstep=True, lockstep_timeout=0.3
    )
    try:
        it = iter(ds)
        got = [next(it) for _ in range(2 * 4)]  # batches 0 and 1 are below the horizon
        assert len(got) == 8
        with pytest.raises(TimeoutError) as info:
            next(it)
        message = str(info.value)
        assert "waited 0.3 s for the training loop to announce step 1" in message
        assert "call dataset.advance(step)" in message and "lockstep=False" in message
    finally:
        ds.close()
    with pytest.raises(ValueError, match="lockstep_timeout must be positive"):
        DynamicStreamingDataset(manifest=local_mixture, batch_size=4, lockstep_timeout=0)


def _shm_fds() -> int:
    """File descriptors of this process open on shared memory."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("/dev/shm/")
    return count


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _created_segments(ds: DynamicStreamingDataset) -> list[str]:
    """Names of the streaming segments this dataset created (not those it attached to)."""
    holdings = ds._release.peek()[1].__self__  # (object, function, args, kwargs)
    return [segment.name for shm in holdings.segments for segment in shm.created_shms]


@pytest.mark.parametrize("workers", [0, 2])
def test_close_releases_file_descriptors_shared_memory_and_locks(
    local_mixture: str, workers: int
) -> None:
    """Building and dropping datasets in one process (``mixstream search``, notebooks) used to
    leak 24-88 fds and 6-8 shared-memory segments each, and their lock files, until exit."""
    from torch.utils.data import DataLoader

    def cycle(close: bool) -> dict[str, int]:
        ds = DynamicStreamingDataset(manifest=local_mixture, batch_size=4, num_workers=workers)
        made = [*_created_segments(ds), ds._channel.name]
        assert any(name.endswith("_locals") for name in made)
        locks = [ds._shared_barrier.filelock_path, ds._cache_filelock_path]
        loader = DataLoader(ds, batch_size=4, num_workers=workers)
        assert len(list(zip(range(3), loader, strict=False))) == 3
        assert any(os.path.exists(p) for p in locks)
        # Other jobs on this machine may reuse the names right after we free them: what must
        # be gone is our files, told apart by inode.
        paths = [p if "/" in p else f"/dev/shm/{p}" for p in made + locks]
        inodes = {p: os.stat(p).st_ino for p in paths if os.path.exists(p)}
        del loader
        if close:
            ds.close()
        alive = weakref.ref(ds)
        del ds
        gc.collect()
        assert alive() is None, [type(r).__name__ for r in gc.get_referrers(alive())]
        return inodes

    cycle(close=True)  # imports, thread pools and the like are made once per process
    before = _shm_fds()
    for i in range(4):
        inodes = cycle(close=i % 2 == 0)  # closed, or only dropped and collected
        leftovers = [p for p, ino in inodes.items() if _inode(p) == ino]
        assert not leftovers, (i, leftovers)
        assert _shm_fds() <= before, f"cycle {i}: {_shm_fds()} shared-memory fds, was {before}"


def test_stale_streaming_lock_files_are_reclaimed(
    local_mixture: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed runs leave streaming's ``<prefix>_*_filelock`` files, and streaming skips every
    prefix that has one; those of prefixes no job holds are removed at construction."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale = [tmp_path / f"9999{i:02}_barrier_filelock" for i in range(3)]
    stale.append(tmp_path / "999950_cache_filelock")
    other = tmp_path / "999960_something_else"
    for path in [*stale, other]:
        path.write_text("")
    ds = DynamicStreamingDataset(manifest=local_mixture, batch_size=4)
    try:
        next(iter(ds))
        assert not any(p.exists() for p in stale)
        assert other.exists()
        live = Path(ds._shared_barrier.filelock_path)
        assert live.parent == tmp_path and live.exists()
        # A second dataset while the first is alive leaves the first one's locks alone.
        DynamicStreamingDataset(manifest=local_mixture, batch_size=4).close()
        assert live.exists()
    finally:
        ds.close()
