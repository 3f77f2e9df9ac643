"""Many groups and long runs: compacted states resume exactly, costs grow at most linearly.

Growth is checked by counting (state sizes, schedule entries, shared-memory bytes, the
allocation's inner-loop work), never by timing.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import xxhash
from torch.utils.data import DataLoader

import mixstream.apportion as apportion
import mixstream.dataset as dataset_module
from mixstream import DynamicStreamingDataset, MixtureStateError
from mixstream.algorithms.aioli import SCALABLE, AioliConfig
from mixstream.channel import BUDGET_BYTES, default_capacity
from mixstream.permutation import BlockShuffle, map_many
from mixstream.plan import MixturePlan, PlanState
from mixstream.weights import WeightSchedule

BATCH = 4
SAVE_AT = 20
FAR = 12  # a pending update announced at SAVE_AT for batch SAVE_AT + FAR
STEPS = SAVE_AT + FAR + 6


def _loop(
    manifest: str,
    *,
    workers: int,
    resume: dict[str, Any] | None = None,
    start: int = 0,
) -> tuple[list[int], dict[str, Any] | None, dict[str, Any]]:
    """Weights change every step until SAVE_AT; there, one more change for the lag's end and
    one announced for SAVE_AT + FAR; then only ``advance``. Returns (batch fingerprints,
    state at SAVE_AT, state at the end)."""
    ds = DynamicStreamingDataset(manifest=manifest, batch_size=BATCH, num_workers=2, seed=11)
    assert ds.update_lag == 5
    if resume is not None:
        ds.load_state_dict(resume)
    loader = DataLoader(
        ds, batch_size=BATCH, num_workers=workers, prefetch_factor=2 if workers else None
    )
    weights = np.random.default_rng(0).dirichlet(np.ones(3), size=STEPS + 1)
    prints: list[int] = []
    saved = None
    step = start
    for batch in loader:
        step += 1
        prints.append(xxhash.xxh64_intdigest(batch["input_ids"].numpy().tobytes()))
        if step < SAVE_AT:
            ds.set_weights(weights[step], step=step)
        elif step == SAVE_AT:
            ds.set_weights(weights[step], step=step)
            ds.set_weights(weights[0], step=step, effective_step=step + FAR)
            saved = ds.state_dict(step * BATCH, True)
        else:
            ds.advance(step)
        if step >= STEPS:
            break
    final = ds.state_dict(step * BATCH, True)
    del loader
    ds.close()
    return prints, saved, final


def test_compacted_state_resumes_exactly_with_pending_updates(
    mixture: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a history of 3, the state at SAVE_AT keeps 3 past entries, the one in force and
    the pending ones (the lag window's and one announced 12 batches ahead); the rest is a
    digest and a weight sum. Resumed on another layout it continues exactly, and ends in the
    very state (plan, schedule, digests) of the uninterrupted run."""
    monkeypatch.setattr(dataset_module, "_HISTORY_ENTRIES", 3)
    full, state, full_end = _loop(mixture, workers=0)
    assert state is not None
    batches = [b for b, _ in state["schedule"]]
    assert state["plan"]["batch"] == SAVE_AT
    # In force at 20: the change made at step 15 (lag 5); pending: 21..25 and 32.
    assert batches == [17, 18, 19, 20, 21, 22, 23, 24, 25, SAVE_AT + FAR]
    assert state["schedule_past"]["entries"] == 12  # batch 0 and 6..16
    assert sum(state["schedule_past"]["weight_batches"]) == pytest.approx(17)
    resumed, _, resumed_end = _loop(mixture, workers=2, resume=copy.deepcopy(state), start=SAVE_AT)
    assert resumed == full[SAVE_AT:]
    assert resumed_end == full_end
    # No change since the save: the digest of the whole schedule is the saved one, although
    # the schedule the resumed run held never had the compacted entries.
    assert resumed_end["schedule_digest"] == state["schedule_digest"]
    assert resumed_end["schedule_past"]["entries"] == 18  # 6 more compacted: history is 3


def _compacted_state(mixture: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, dict]:
    monkeypatch.setattr(dataset_module, "_HISTORY_ENTRIES", 2)
    ds = DynamicStreamingDataset(manifest=mixture, batch_size=BATCH, update_lag=2, seed=1)
    rng = np.random.default_rng(3)
    for step in range(1, 12):
        ds.set_weights(rng.dirichlet(np.ones(3)), step=step)
    ds.set_weights([0.2, 0.3, 0.5], step=11, effective_step=30)
    state = ds.state_dict(11 * BATCH, True)
    assert state["schedule_past"]["entries"] > 0 and state["schedule"][-1][0] == 30
    return ds, state


def _swap_pending(s: dict) -> None:
    w = s["schedule"][-1][1]
    w[0], w[2] = w[2], w[0]  # still sums to 1, and the plan never used it: only the digest


def _mutations() -> list[tuple[str, Callable[[dict], None], str]]:
    past = "schedule_past"
    return [
        ("pending weights", _swap_pending, "schedule_digest .* does not match"),
        ("dropped pending", lambda s: s["schedule"].pop(), "schedule_digest .* does not match"),
        ("past digest", lambda s: s[past].__setitem__("digest", "ab" * 16), "does not match"),
        ("digest", lambda s: s.__setitem__("schedule_digest", "00" * 16), "does not match"),
        ("no digest", lambda s: s.pop("schedule_digest"), "schedule_digest is missing"),
        ("bad past digest", lambda s: s[past].__setitem__("digest", "xyz"), "32 hex digits"),
        ("no past", lambda s: s.pop(past), "schedule_past is missing"),
        ("past count", lambda s: s[past].__setitem__("entries", -1), r"entries must be a non-neg"),
        ("past sum", lambda s: s[past]["weight_batches"].__setitem__(0, 99.0), "sums to"),
        ("first kept", lambda s: s["schedule"][0].__setitem__(0, 0), r"schedule\[0\] starts"),
    ]


@pytest.mark.parametrize(("name", "mutate", "message"), _mutations(), ids=lambda x: x)
def test_schedule_digest_and_summary_are_checked(
    mixture: str,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    mutate: Callable[[dict], None],
    message: str,
) -> None:
    """An edited, truncated or mixed-up schedule is refused naming the field (the digest
    catches what the other checks cannot: a pending entry nobody has planned with yet), and
    the dataset is left as it was."""
    del name
    ds, good = _compacted_state(mixture, monkeypatch)
    try:
        bad = copy.deepcopy(good)
        mutate(bad)
        with pytest.raises(MixtureStateError, match=message):
            ds.load_state_dict(bad)
        assert ds.state_dict(11 * BATCH, True) == good
        ds.load_state_dict(copy.deepcopy(good))
        assert ds.state_dict(11 * BATCH, True) == good
    finally:
        ds.close()


def test_version_1_states_still_load(mixture: str) -> None:
    """A state saved before compaction (the whole schedule, no summary or digest) resumes."""
    ds = DynamicStreamingDataset(manifest=mixture, batch_size=BATCH, update_lag=2, seed=1)
    try:
        ds.set_weights([0.6, 0.3, 0.1], step=0, effective_step=0)
        ds.set_weights([0.1, 0.2, 0.7], step=9)
        state = ds.state_dict(10 * BATCH, True)
        assert state["schedule_past"]["entries"] == 0
        old = {k: v for k, v in state.items() if k not in ("schedule_past", "schedule_digest")}
        old["version"] = 1
        other = DynamicStreamingDataset(manifest=mixture, batch_size=BATCH, update_lag=2, seed=1)
        try:
            other.load_state_dict(old)
            assert other.state_dict(10 * BATCH, True) == state
        finally:
            other.close()
    finally:
        ds.close()


# ----------------------------------------------------------------------------------- growth
def _groups(root: Path, m: int) -> list[str]:
    """``m`` group folders of one 4-sample shard each (one file, hard-linked)."""
    from streaming import MDSWriter

    template = root / "template"
    if not template.exists():
        with MDSWriter(out=str(template), columns={"x": "int"}) as writer:
            for i in range(4):
                writer.write({"x": i})
    folders = []
    for g in range(m):
        folder = root / f"g{g}"
        if not folder.exists():
            folder.mkdir()
            os.link(template / "shard.00000.mds", folder / "shard.00000.mds")
            (folder / "index.json").write_bytes((template / "index.json").read_bytes())
        folders.append(str(folder))
    return folders


def _dataset(folders: list[str], **kwargs: Any) -> DynamicStreamingDataset:
    from streaming import Stream

    return DynamicStreamingDataset(
        streams=[Stream(local=f) for f in folders],
        groups=[Path(f).name for f in folders],
        batch_size=8,
        **kwargs,
    )


def test_state_and_channel_grow_at_most_linearly_with_groups(tmp_path: Path) -> None:
    """After the same 40 updates, the state's size per group, and the channel's shared
    memory, do not grow with the number of groups."""
    sizes, channel = {}, {}
    rng = np.random.default_rng(0)
    for m in (8, 64, 512):
        ds = _dataset(_groups(tmp_path, m))
        try:
            for step in range(1, 41):
                ds.set_weights(rng.dirichlet(np.ones(m)), step=step)
            state = ds.state_dict(40 * 8, True)
            assert len(state["schedule"]) == 41  # the initial weights and 40 updates
            sizes[m] = len(json.dumps(state))
            channel[m] = ds._channel.capacity * (1 + m) * 8
        finally:
            ds.close()
    assert sizes[512] / sizes[64] < 512 / 64 * 1.1
    assert sizes[64] / sizes[8] < 64 / 8 * 1.1
    assert max(channel.values()) <= BUDGET_BYTES
    assert default_capacity(3) == 4096 and default_capacity(10_000) == 256  # 20 MB of /dev/shm


def test_a_cold_start_over_many_s3_streams_makes_one_client(
    tmp_path: Path, s3_env: Any, s3_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """streaming makes a boto3 client per stream (~0.3 s each: 65 of the 70 s a cold start
    over 200 groups took); one client per process serves every stream and shard."""
    from streaming import Stream

    from mixstream import storage
    from mixstream.stream import _SessionS3Downloader

    made = []
    create = _SessionS3Downloader._create_s3_client
    monkeypatch.setattr(
        _SessionS3Downloader,
        "_create_s3_client",
        lambda self, *a, **k: (made.append(self), create(self, *a, **k))[1],
    )
    (tmp_path / "groups").mkdir()
    names = [Path(f).name for f in _groups(tmp_path / "groups", 24)]
    shutil.rmtree(tmp_path / "groups" / "template")
    storage.upload_tree(tmp_path / "groups", s3_prefix)
    cache = tmp_path / "cache"
    streams = [Stream(remote=f"{s3_prefix}/{g}", local=str(cache / g)) for g in names]
    ds = DynamicStreamingDataset(streams=streams, groups=names, batch_size=8)
    try:
        assert sum(1 for _ in ds) == len(ds) > 24  # every index and every shard downloaded
    finally:
        ds.close()
    assert len(made) == 1


def test_s3_clients_come_from_one_session_per_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client from a session that has loaded botocore's model takes ~10 ms instead of
    0.1-0.2 s (what each DataLoader worker paid for its own client); other credentials in
    the environment get another session, so a change of keys is never ignored."""
    from mixstream.stream import _session

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "first")
    first = _session()
    assert _session() is first
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "second")
    assert _session() is not first
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "first")
    assert _session() is first


def test_schedule_in_a_state_is_bounded_whatever_the_updates(tmp_path: Path) -> None:
    """A long run keeps the last history_entries(m) changes (65,536 weights' worth at most),
    in memory and in its state; the rest is summarized, and the averages stay exact."""
    m = 64
    keep = dataset_module.history_entries(m)
    assert keep == 1024
    ds = _dataset(_groups(tmp_path, m), update_lag=1)
    full = WeightSchedule()
    full.set(0, np.full(m, 1 / m))
    rng = np.random.default_rng(0)
    try:
        for step in range(1, 2 * keep + 300):
            w = rng.dirichlet(np.ones(m))
            ds.set_weights(w, step=step)
            full.set(step + 1, w / w.sum())
        step = 2 * keep + 299
        state = ds.state_dict(step * 8, True)
        assert len(state["schedule"]) == keep + 2  # history, the one in force, one pending
        assert len(ds.weight_schedule) <= 2 * keep + 2  # compacted in batches of `keep`
        assert state["schedule_past"]["entries"] == len(full) - keep - 2
        assert state["schedule_digest"] == full.digest.hex()
        np.testing.assert_allclose(ds.weight_schedule.average(step), full.average(step))
        np.testing.assert_allclose(
            np.asarray(state["plan"]["targets"]), full.weight_batches(step) * 8, rtol=1e-9
        )
    finally:
        ds.close()


def test_allocation_work_per_sample_does_not_grow_with_groups(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Python inner loop (group x slot evaluations) per batch of 512 grows a few times
    from 100 to 10,000 groups (the run of slots per shortlist doubles); the literal rule's
    grows 100x. What remains O(groups) is numpy work once per run of slots. (The numpy
    fallback's; the C rule's equality with it is tested in test_apportion.py.)"""
    monkeypatch.setattr(apportion, "_quota", None)
    work = {"evals": 0}
    slots = apportion._slots

    def counting(t0: list[float], w: list[float], have: list[int], first: int, last: int,
                 exact: bool) -> bool:  # fmt: skip
        work["evals"] += len(w) * (last - first + 1)
        return slots(t0, w, have, first, last, exact)

    monkeypatch.setattr(apportion, "_slots", counting)
    per_batch = {}
    for m in (100, 1000, 10_000):
        rng = np.random.default_rng(1)
        targets, counts = np.zeros(m), np.zeros(m, dtype=np.int64)
        for _ in range(3):  # past the first batch, whose early slots see every group
            w = rng.dirichlet(np.ones(m))
            n = apportion.allocate(targets, counts, w, 512)
            targets, counts = apportion.advance_targets(targets, w, 512), counts + n
        work["evals"] = 0
        w = rng.dirichlet(np.ones(m))
        apportion.allocate(targets, counts, w, 512)
        per_batch[m] = work["evals"]
    assert per_batch[10_000] < 5 * per_batch[100]
    assert per_batch[1000] < 0.1 * 512 * 1000


def test_plan_cache_is_bounded_whatever_the_groups() -> None:
    """Sample ids are cached a chunk per group; chunks shrink with many groups, so the
    cache holds about as many ids for 10,000 groups as for 3 (4,096 per group)."""
    cached = {}
    for m in (3, 10_000):
        plan = MixturePlan([10**6] * m, 512, seed=0)
        assert max(plan._chunk_sizes) == (4096 if m == 3 else 64)
        schedule = WeightSchedule()
        schedule.set(0, np.full(m, 1 / m))
        state = PlanState.initial(m)
        for _ in range(20):
            draw, state = plan.step(state, schedule)
            plan.layout(draw, 0, 512)
        cached[m] = sum(c.size for c in plan._chunks.values())
    assert cached[10_000] <= 64 * 10_240  # at most one chunk per sample drawn


# ----------------------------------------------------------------------------------- Aioli
def test_aioli_refuses_runs_it_cannot_serve_and_warns_about_many_groups() -> None:
    config = AioliConfig.defaults_for(1000, prior_steps=0)  # the paper's protocol
    assert config.lp_duration == 8000 and config.evaluations_per_round == 2001
    with pytest.raises(ValueError) as info:
        config.check_scale(total_steps=5000)
    message = str(info.value)
    assert "cannot finish one round of LearnParams in this run of 5,000 steps" in message
    assert "2 * 1000 * 4 = 8,000 batches" in message and "2,001 times" in message
    assert "grows linearly with the number of groups" in message and SCALABLE in message
    warning = config.check_scale(total_steps=12_000)
    assert warning is not None and warning.startswith("Aioli would spend 67% of this run")
    assert "DoReMi" in warning
    many = config.check_scale(total_steps=10**6)
    assert many is not None and many.startswith("Aioli's cost grows with the number of groups")
    assert AioliConfig.defaults_for(3).check_scale(total_steps=5000) is None
    with pytest.raises(ValueError, match="its cost grows with the 100 groups; for many groups"):
        AioliConfig(100, eta=0.1, update_steps=500, lp_rounds=2, lp_steps=4, one_hot_factor=0.5)


def test_methods_that_pay_per_group_in_steps_or_passes_warn_about_many_groups(
    tmp_path: Path,
) -> None:
    """Skill-It's graph sweeps (and DGA's and DoGE's per-group probes, same helper) warn
    past MANY_GROUPS groups, pointing to the methods that scale; a given graph does not."""
    from mixstream.algorithms.scale import MANY_GROUPS, many_groups_warning
    from mixstream.mixing.skillit import SkillItMixer

    assert many_groups_warning("DGA", MANY_GROUPS, "x") is None
    message = many_groups_warning("DGA", MANY_GROUPS + 1, "one probe per group")
    assert message is not None and message.startswith("DGA's cost grows with the number")
    assert "one probe per group" in message and SCALABLE in message and "ODM" in message
    m = MANY_GROUPS + 1
    dataset = _dataset(_groups(tmp_path, m))
    evaluate = lambda: np.full(m, 3.0)  # noqa: E731
    with pytest.warns(UserWarning, match=r"Skill-It's cost grows .* = 650 batches of one-hot"):
        SkillItMixer(dataset, evaluate=evaluate, update_steps=1000, run_dir=tmp_path).start()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        given = SkillItMixer(_dataset(_groups(tmp_path, m)), evaluate=evaluate,
                             graph=np.eye(m), run_dir=tmp_path / "given")  # fmt: skip
        given.start()


def test_aioli_reads_the_run_length_from_composer() -> None:
    from composer.core import Time, TimeUnit

    from mixstream.composer.mixing import total_steps

    def state(duration: Any, batches: Any = None) -> Any:
        return SimpleNamespace(max_duration=duration, dataloader_len=batches)

    assert total_steps(state(Time(700, TimeUnit.BATCH))) == 700
    assert total_steps(state(Time(3, TimeUnit.EPOCH), Time(50, TimeUnit.BATCH))) == 150
    assert total_steps(state(Time(3, TimeUnit.EPOCH))) is None
    assert total_steps(state(None)) is None


def test_a_schedule_built_at_once_is_the_one_built_entry_by_entry() -> None:
    """Loading a state builds its schedule in bulk: same sums and digests, bit for bit."""
    rng = np.random.default_rng(0)
    starts = np.cumsum(rng.integers(1, 5, size=300)) + 40
    weights = rng.dirichlet(np.ones(5), size=300)
    one = WeightSchedule(past=dataset_module.SchedulePast(7, b"x" * 16, np.full(5, 8.0)))
    for b, w in zip(starts.tolist(), weights, strict=True):
        one.set(b, w)
    bulk = WeightSchedule.from_arrays(starts, weights, one.past)
    assert bulk.digest == one.digest
    for end in (int(starts[0]), int(starts[0]) + 1, int(starts[150]), int(starts[-1]) + 9):
        assert (bulk.weight_batches(end) == one.weight_batches(end)).all()
    bulk.set(int(starts[-1]) + 1, weights[0])
    one.set(int(starts[-1]) + 1, weights[0])
    assert bulk.digest == one.digest and bulk.to_list() == one.to_list()


def test_permutations_evaluated_together_are_each_one() -> None:
    """map_many (a plan's missing chunks of many groups in one evaluation) gives every
    permutation's own values: small, tiny and blocked groups, tails, unshuffled ones."""
    rng = np.random.default_rng(0)
    perms, positions = [], []
    for i in range(300):
        n = int(rng.choice([1, 2, 5, 16, 17, 100, 1048, 5000, 300_000]))
        perm = BlockShuffle(
            n,
            int(rng.choice([1, 3, 16, 64, 1 << 18])),
            seed=int(rng.integers(0, 2**40)),
            stream=i,
            epoch=int(rng.integers(0, 5)),
            shuffle=bool(rng.random() < 0.9),
        )
        perms.append(perm)
        positions.append(rng.integers(0, n, size=int(rng.integers(0, 50))))
    for perm, q, got in zip(perms, positions, map_many(perms, positions), strict=True):
        assert got.dtype == np.int64 and (got == perm(q)).all()
    with pytest.raises(IndexError, match="out of range"):
        map_many([perms[0]], [np.array([perms[0].num_samples])])


def test_weights_json_keeps_the_whole_schedule_from_the_history(
    mixture: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The dataset keeps its last changes only; weights.json gets them all back from the
    run's mixture_history.jsonl, checked against the dataset's digest. A history that
    lacks some is not trusted: the kept part is written, marked, and refused as a replay."""
    from mixstream.mixing import Mixer, load_weights_file
    from mixstream.mixing.history import HISTORY_FILE

    monkeypatch.setattr(dataset_module, "_HISTORY_ENTRIES", 2)
    ds = DynamicStreamingDataset(manifest=mixture, batch_size=BATCH, update_lag=1)
    mixer = Mixer(ds, run_dir=tmp_path)
    try:
        mixer.start()
        mixer.set_weights([1.0, 1.0, 1.0], 0, effective_step=0)
        rng = np.random.default_rng(0)
        for step in range(1, 12):
            mixer.set_weights(rng.dirichlet(np.ones(3)), step)
        assert ds.weight_schedule.past.entries > 0
        mixer.finish(12)
        saved = json.loads((tmp_path / "weights.json").read_text())
        assert "schedule_past" not in saved and [b for b, _ in saved["schedule"]][:2] == [0, 2]
        assert len(load_weights_file(str(tmp_path / "weights.json"), "schedule")) == 12
        history = tmp_path / HISTORY_FILE
        rows = history.read_text().splitlines()
        history.write_text("\n".join(rows[1:]) + "\n")  # the first change is gone
        mixer.finish(12)
        saved = json.loads((tmp_path / "weights.json").read_text())
        assert saved["schedule_past"]["entries"] == ds.weight_schedule.past.entries
        with pytest.raises(ValueError, match="holds only the last"):
            load_weights_file(str(tmp_path / "weights.json"), "schedule")
        assert load_weights_file(str(tmp_path / "weights.json"), "average")
    finally:
        ds.close()
