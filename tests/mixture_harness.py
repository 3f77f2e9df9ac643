"""Helpers shared by the dataset tests: a small multi-group corpus and a training-loop stand-in.

Rank functions live here (a plain module) so spawned rank processes can import them.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

GROUPS = ("alpha", "beta", "gamma")


def write_corpus(folder: Path, docs_per_group: int = 300, seed: int = 0) -> list[Path]:
    """One JSONL file per group of distinct, group-flavoured documents."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for g in GROUPS:
        path = folder / f"{g}.jsonl"
        with path.open("w") as f:
            for i in range(docs_per_group):
                words = " ".join(f"{g}{rng.randint(0, 9999)}" for _ in range(rng.randint(8, 50)))
                f.write(json.dumps({"text": f"{g} document {i}: {words}"}) + "\n")
        paths.append(path)
    return paths


def convert_corpus(corpus: Path, out: str, seq_len: int = 32, overwrite: bool = False) -> None:
    from shard_tools import ConvertOptions, InputSpec, convert

    convert(
        [InputSpec(str(corpus / f"{g}.jsonl"), g) for g in GROUPS],
        out,
        ConvertOptions(
            tokenizer="byte",
            seq_len=seq_len,
            shard_size="16kb",
            val_fraction=0.05,
            test_fraction=0.05,
            chunk_bytes=40_000,
            progress=False,
            overwrite=overwrite,
        ),
    )


def write_index(corpus: Path, stream: str, obj: dict[str, Any]) -> Path:
    """Write ``obj`` as the ``index.json`` of ``corpus/stream`` and record its digest in the
    corpus's ``mixture.json``, as a writer of both files would (the loader then reads the
    index instead of refusing it as not the manifest's)."""
    from mixstream.shardindex import IndexDigest

    path = corpus / stream / "index.json"
    data = json.dumps(obj).encode()
    path.write_bytes(data)
    manifest = corpus / "mixture.json"
    if manifest.exists():
        group, split = stream.split("/")
        mix = json.loads(manifest.read_bytes())
        digest = IndexDigest.of(data)
        entry = mix["groups"][group]["splits"][split]
        entry["index_bytes"], entry["index_xxh64"] = digest.size, digest.xxh64
        manifest.write_text(json.dumps(mix))
    return path


def fingerprint(row: Any) -> int:
    """A sample's digest: a token row (tensor) or a raw-text sample (str)."""
    if isinstance(row, str):
        return xxhash.xxh64_intdigest(row.encode())
    return xxhash.xxh64_intdigest(row.numpy().tobytes())


@dataclass
class LoopSpec:
    """A training loop stand-in: consume batches, change weights at given steps.

    Checkpoints follow the trainers' conventions: ``from_beginning=True`` passes the samples
    since the start of the epoch, reset to 0 when an epoch ends (Composer's
    ``sample_in_epoch``); ``False`` the samples this dataloader iterator yielded
    (streaming's ``StreamingDataLoader``). ``record`` (a path prefix) writes each step's
    rows and each state as they happen, for a run that ``kill_at`` SIGKILLs -- the rank and
    its dataloader workers -- after that step.
    """

    manifest: str
    global_batch: int
    steps: int
    num_workers: int = 0
    update_lag: int = 5
    seed: int = 7
    changes: dict[int, dict[str, float] | list[float]] = field(default_factory=dict)
    effective: dict[int, int] = field(default_factory=dict)  # step -> effective_step
    save_at: int | None = None
    checkpoints: tuple[int, ...] = ()  # steps after which a state is taken
    epoch_end_checkpoints: bool = False  # also take one whenever an epoch ends
    from_beginning: bool = True
    resume_state: dict | None = None
    start_step: int = 0
    local: str | None = None
    lockstep: bool = False
    epoch_size: int | None = None
    epochs: int = 1
    kill_at: int | None = None
    record: str | None = None
    track_counts: bool = False  # read realized_counts after loading and after every step
    # Dataloader workers' start method; None: the rank's default, which is the method the
    # rank itself was started with (spawned ranks spawn their workers).
    worker_start: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    # Seconds the node's local leader lingers after each epoch barrier: the other processes
    # of the node then begin (and may finish) the epoch before the leader has done anything.
    leader_delay: float = 0.0
    weight_unit: str = "samples"
    column: str = "input_ids"  # what is fingerprinted: "text" for raw-text corpora


class _LingeringLeaderBarrier:
    """streaming's epoch barrier, after which the local leader sleeps ``delay`` s."""

    def __init__(self, barrier: Any, dataset: Any, delay: float) -> None:
        self.__dict__.update(_barrier=barrier, _dataset=dataset, _delay=delay)

    def __call__(self, num_workers: int) -> None:
        import time

        self._barrier(num_workers)
        if self._dataset._unique_worker_world.is_local_leader:
            time.sleep(self._delay)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_barrier"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._barrier, name, value)


def run_loop(rank: int, spec: LoopSpec) -> dict[str, Any]:
    """Returns this rank's per-step fingerprints and groups, the states taken (``states``:
    ``[step, state]`` in order; ``state``: the one at ``save_at``) and realized counts
    (``counts``: at the end; ``step_counts``: see ``track_counts``)."""
    import os
    import signal
    import time

    import torch.distributed as dist
    from torch.utils.data import DataLoader

    from mixstream import DynamicStreamingDataset

    os.environ.update(spec.env)
    world = dist.get_world_size() if dist.is_initialized() else 1
    groups_to_kill = [os.getpid()]
    if spec.kill_at is not None:
        os.setpgid(0, 0)  # a process group of its own: the kill takes its workers too
        if world > 1:
            groups_to_kill = [0] * world
            dist.all_gather_object(groups_to_kill, os.getpid())
    # One cache per (simulated) node, as separate machines would have.
    local = spec.local and os.path.join(spec.local, f"node{os.environ.get('NODE_RANK', '0')}")
    ds = DynamicStreamingDataset(
        manifest=spec.manifest,
        batch_size=spec.global_batch // world,
        num_workers=spec.num_workers,
        update_lag=spec.update_lag,
        seed=spec.seed,
        local=local,
        lockstep=spec.lockstep,
        epoch_size=spec.epoch_size,
        weight_unit=spec.weight_unit,  # type: ignore[arg-type]
    )
    if spec.resume_state is not None:
        ds.load_state_dict(spec.resume_state)
    if spec.leader_delay:
        ds._shared_barrier = _LingeringLeaderBarrier(ds._shared_barrier, ds, spec.leader_delay)
    loader = DataLoader(
        ds,
        batch_size=spec.global_batch // world,
        num_workers=spec.num_workers,
        prefetch_factor=2 if spec.num_workers else None,
        multiprocessing_context=spec.worker_start if spec.num_workers else None,
    )
    rows = open(f"{spec.record}.rank{rank}.jsonl", "w") if spec.record else None  # noqa: SIM115

    def record(row: dict[str, Any]) -> None:
        if rows is not None:
            rows.write(json.dumps(row) + "\n")
            rows.flush()

    # What a killed run leaves behind for the caller to clean up.
    locks = [ds._shared_barrier.filelock_path, ds._cache_filelock_path]
    step_counts = [ds.realized_counts] if spec.track_counts else []
    record({"shm_prefix": ds._shm_prefix_int, "locks": locks, "counts": step_counts[:1]})
    prints: list[list[int]] = []
    groups: list[list[int]] = []
    states: list[list[Any]] = []
    state = None
    step = spec.start_step
    in_epoch = spec.resume_state["sample_in_epoch"] if spec.resume_state else 0

    def checkpoint() -> dict:
        samples = in_epoch if spec.from_beginning else in_iterator
        saved = ds.state_dict(samples, spec.from_beginning)
        states.append([step, saved])
        record({"step": step, "state": saved})
        return saved

    for _ in range(spec.epochs):
        if step >= spec.steps:
            break
        in_iterator = 0
        for batch in loader:
            step += 1
            in_epoch += spec.global_batch
            in_iterator += spec.global_batch
            prints.append([fingerprint(r) for r in batch[spec.column]])
            groups.append(batch["group"].tolist())
            row = {"step": step, "prints": prints[-1], "groups": groups[-1]}
            if spec.lockstep:
                ds.advance(step)
            if step in spec.changes:
                effective = spec.effective.get(step)
                ds.set_weights(spec.changes[step], step=step, effective_step=effective)
            if step == spec.save_at or step in spec.checkpoints:
                saved = checkpoint()
                if step == spec.save_at:
                    state = saved
            if spec.track_counts:
                step_counts.append(ds.realized_counts)
                row["counts"] = step_counts[-1]
            record(row)
            if step == spec.kill_at:
                if world > 1:
                    dist.barrier()  # every rank has recorded this step
                if rank == 0:  # all at once: a rank left alone would fail on its peer's exit
                    for group in reversed(groups_to_kill):
                        os.killpg(group, signal.SIGKILL)
                time.sleep(600)
            if step >= spec.steps:
                break
        else:
            in_epoch = 0
            if spec.epoch_end_checkpoints:
                checkpoint()
    result = {
        "prints": prints,
        "groups": groups,
        "state": state,
        "states": states,
        "counts": ds.realized_counts,
        "step_counts": step_counts,  # after loading, then after each step (track_counts)
    }
    ds.close()
    if rows is not None:
        rows.close()
    return result


def global_sequence(per_rank: list[dict[str, Any]], key: str = "prints") -> list[list[int]]:
    """Concatenate ranks' slices of each step into the global batch."""
    steps = len(per_rank[0][key])
    return [[x for r in per_rank for x in r[key][s]] for s in range(steps)]


def construct_repeatedly(rank: int, manifest: str, count: int, churning: Any = None) -> int:
    """A job that builds and closes its dataset ``count`` times (a rank function).

    With ``churning`` (the cycle counter of :func:`churn_datasets`) it starts once the other
    job is under way and returns how many datasets that job built meanwhile.
    """
    import time

    from mixstream import DynamicStreamingDataset

    deadline = time.monotonic() + 120
    while churning is not None and churning.value < 3:
        if time.monotonic() > deadline:
            raise TimeoutError("the churning job never got going")
        time.sleep(0.02)
    before = churning.value if churning is not None else 0
    for _ in range(count):
        DynamicStreamingDataset(manifest=manifest, batch_size=2).close()
    return churning.value - before if churning is not None else 0


def churn_datasets(manifest: str, stop: Any, cycles: Any, errors: Any) -> None:
    """Another job on the node: build and close datasets until ``stop`` is set."""
    from mixstream import DynamicStreamingDataset

    while not stop.is_set():
        try:
            DynamicStreamingDataset(manifest=manifest, batch_size=2).close()
        except Exception as exc:
            errors.put(repr(exc))
        with cycles.get_lock():
            cycles.value += 1
