"""``weight_unit="tokens"`` end to end: sidecars from convert, bounds on what is yielded,
layouts, exact resume, and every bad input refused with a message naming it.

The corpus is raw text in two groups of very different lengths: "short" documents of 10-20
byte tokens (EOS included) and "long" ones of 100-300. Token counts are recomputed from the
texts the dataset yields, so the sidecar's alignment with the samples is checked too.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from mixture_harness import LoopSpec, convert_corpus, global_sequence, run_loop, write_corpus
from streaming import Stream

from mixstream import DynamicStreamingDataset, MixtureStateError
from mixstream.manifest import ManifestError
from mixstream.testing.distributed import run_ranks
from mixstream.tokens import encode_sidecar, sidecar_entry

GROUPS = ("long", "short")  # the manifest's order (convert sorts groups by name)
LONG, SHORT = 0, 1
RANGES = {"short": (9, 19), "long": (99, 299)}  # text bytes; + EOS = 10-20 and 100-300 tokens
CHANGES = {
    4: {"short": 0.8, "long": 0.2},
    9: {"short": 0.0, "long": 1.0},
    13: {"short": 0.3, "long": 0.7},
}


def write_text_corpus(folder: Path, docs: int = 240, seed: int = 0) -> None:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for g in GROUPS:
        lo, hi = RANGES[g]
        with (folder / f"{g}.jsonl").open("w") as f:
            for i in range(docs):
                body = "".join(rng.choice("abcdefghij ") for _ in range(rng.randint(lo, hi)))
                text = f"{i:04d}" + body[4:]  # distinct, and exactly len(body) bytes
                f.write(json.dumps({"text": text}) + "\n")


def convert_text(corpus: Path, out: str) -> None:
    from shard_tools import ConvertOptions, InputSpec, convert

    convert(
        [InputSpec(str(corpus / f"{g}.jsonl"), g) for g in GROUPS],
        out,
        ConvertOptions(shard_size="8kb", val_fraction=0.05, test_fraction=0.05, progress=False),
    )


@pytest.fixture(scope="module")
def text_mixture(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("text-mixture")
    write_text_corpus(root / "corpus")
    convert_text(root / "corpus", str(root / "out"))
    return str(root / "out")


@pytest.fixture(scope="module")
def s3_text_mixture(
    tmp_path_factory: pytest.TempPathFactory, s3_server
) -> tuple[str, dict[str, str]]:
    root = tmp_path_factory.mktemp("s3-text-mixture")
    write_text_corpus(root / "corpus")
    with s3_server.apply_env():
        url = "s3://mixstream/token-tests"
        convert_text(root / "corpus", url)
    return url, dict(s3_server.env)


def batches(ds: DynamicStreamingDataset) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for sample in ds:
        batch.append(sample)
        if len(batch) == ds.device_batch_size:
            yield batch
            batch = []


def tokens_per_batch(ds: DynamicStreamingDataset, steps: int, changes: dict) -> np.ndarray:
    """Tokens per group in each of ``steps`` batches, counted from the yielded texts
    (checked against the dataset's lengths), with ``set_weights`` at the given steps."""
    out = []
    for step, batch in enumerate(batches(ds), start=1):
        row = np.zeros(len(GROUPS), dtype=np.int64)
        for sample in batch:
            row[sample["group"]] += len(sample["text"].encode()) + 1
        out.append(row)
        if step in changes:
            ds.set_weights(changes[step], step=step)
        if step == steps:
            break
    return np.array(out)


def targets_of(ds: DynamicStreamingDataset, per_batch: np.ndarray) -> np.ndarray:
    """Cumulative token targets after each batch: weights are fixed within a batch, so a
    group's target grows by its weight times the tokens the batch delivered."""
    weights = np.array([ds.weights_at(k) for k in range(len(per_batch))])
    return np.cumsum(weights * per_batch.sum(axis=1, keepdims=True), axis=0)


def test_convert_writes_a_sidecar_and_tokens_mode_loads_it(text_mixture: str) -> None:
    ds = DynamicStreamingDataset(manifest=text_mixture, batch_size=8, weight_unit="tokens")
    try:
        assert ds.plan.counts_tokens
        lengths = ds.plan.lengths
        assert lengths is not None
        assert ds.group_names == list(GROUPS)
        assert lengths.shortest[SHORT] >= 10 and lengths.longest[SHORT] <= 20
        assert lengths.shortest[LONG] >= 100 and lengths.longest[LONG] <= 300
    finally:
        ds.close()


@pytest.mark.parametrize("w", [[0.5, 0.5], [0.1, 0.9]])
def test_yielded_token_shares_stay_within_the_bound_at_every_batch(
    text_mixture: str, w: list[float]
) -> None:
    ds = DynamicStreamingDataset(
        manifest=text_mixture,
        batch_size=16,
        weights=w,
        weight_unit="tokens",
        epoch_size=16 * 120,
        seed=3,
    )
    try:
        per_batch = tokens_per_batch(ds, 120, {})
        assert ds.plan.lengths is not None
        longest = np.array(ds.plan.lengths.longest, dtype=np.float64)
        weights = np.asarray(w)
        realised = np.cumsum(per_batch, axis=0)
        gap = realised - weights * realised.sum(axis=1, keepdims=True)
        assert (gap < longest).all()
        assert (gap > -(longest + weights * longest.max())).all()
        ds.advance(120)
        assert tuple(ds.realized_tokens.values()) == tuple(realised[-1].tolist())
    finally:
        ds.close()


def test_samples_mode_on_the_same_data_shows_the_skew(text_mixture: str) -> None:
    share = {}
    for unit in ("samples", "tokens"):
        ds = DynamicStreamingDataset(
            manifest=text_mixture,
            batch_size=16,
            weight_unit=unit,
            epoch_size=16 * 60,  # type: ignore[arg-type]
        )
        try:
            total = tokens_per_batch(ds, 60, {}).sum(axis=0)
            share[unit] = total[SHORT] / total.sum()
        finally:
            ds.close()
    assert share["samples"] < 0.12  # equal sample weights: ~15 vs ~200 tokens a sample
    assert abs(share["tokens"] - 0.5) < 0.01


def test_weight_changes_stay_within_the_empirical_bound(text_mixture: str) -> None:
    ds = DynamicStreamingDataset(
        manifest=text_mixture, batch_size=8, weight_unit="tokens", epoch_size=8 * 40, seed=5
    )
    try:
        per_batch = tokens_per_batch(ds, 40, {**CHANGES, 25: [0.95, 0.05]})
        targets = targets_of(ds, per_batch)
        realised = np.cumsum(per_batch, axis=0)
        assert ds.plan.lengths is not None
        longest = np.array(ds.plan.lengths.longest)
        assert (np.abs(realised - targets) < longest + longest.max()).all()
        # Weight 0 (from batch 10, lag 1, until 14) is never drawn.
        assert (per_batch[10:14, SHORT] == 0).all() and per_batch[14:, SHORT].all()
    finally:
        ds.close()


def test_resume_mid_run_continues_exactly(text_mixture: str) -> None:
    def build() -> DynamicStreamingDataset:
        return DynamicStreamingDataset(
            manifest=text_mixture, batch_size=8, weight_unit="tokens", epoch_size=8 * 30
        )

    full = build()
    try:
        texts = []
        for step, batch in enumerate(batches(full), start=1):
            texts.append([s["text"] for s in batch])
            if step in CHANGES:
                full.set_weights(CHANGES[step], step=step)
            if step == 9:
                state = full.state_dict(9 * 8, True)  # the change at 9 is still pending
    finally:
        full.close()
    assert "tokens" in state["plan"] and state["identity"]["weight_unit"] == "tokens"
    resumed = build()
    try:
        resumed.load_state_dict(json.loads(json.dumps(state)))
        again = []
        for step, batch in enumerate(batches(resumed), start=10):
            again.append([s["text"] for s in batch])
            if step in CHANGES:
                resumed.set_weights(CHANGES[step], step=step)
        assert again == texts[9:]
    finally:
        resumed.close()


def spec_for(mixture: tuple[str, dict[str, str]], tmp: Path, **kw: object) -> LoopSpec:
    url, env = mixture
    base = LoopSpec(
        manifest=url,
        global_batch=8,
        steps=18,
        changes=CHANGES,  # type: ignore[arg-type]
        env=env,
        weight_unit="tokens",
        column="text",
    )
    return dataclasses.replace(base, local=str(tmp / "cache"), **kw)


def test_same_sequence_on_other_layouts_and_resume_across_them(
    s3_text_mixture: tuple[str, dict[str, str]], s3_env: object, tmp_path: Path
) -> None:
    """1 rank without workers (here) and 2 spawned ranks with 2 workers each: one global
    sequence and one state; the state the 2 ranks saved right after a change still in the
    lag window resumes here, on 1 rank, exactly."""
    del s3_env  # the S3 variables run_loop sets here are restored after the test
    reference = run_loop(0, spec_for(s3_text_mixture, tmp_path / "one", save_at=9))
    spec = spec_for(s3_text_mixture, tmp_path / "two", num_workers=2, save_at=9)
    per_rank = run_ranks(run_loop, 2, spec, env=spec.env)
    sequence = global_sequence(per_rank)
    assert len(sequence) == spec.steps and all(len(b) == 8 for b in sequence)
    assert sequence == reference["prints"]
    state = per_rank[0]["state"]
    assert state == reference["state"] and "tokens" in state["plan"]
    resumed = spec_for(s3_text_mixture, tmp_path / "resumed", start_step=9, resume_state=state)
    assert run_loop(0, resumed)["prints"] == reference["prints"][9:]


@pytest.fixture(scope="module")
def packed_mixture(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("packed")
    write_corpus(root / "corpus")
    convert_corpus(root / "corpus", str(root / "out"))
    return str(root / "out")


def test_packed_corpora_give_the_samples_sequence_under_either_unit(packed_mixture: str) -> None:
    seqs = {}
    for unit in ("samples", "tokens"):
        ds = DynamicStreamingDataset(manifest=packed_mixture, batch_size=8, weight_unit=unit)  # type: ignore[arg-type]
        try:
            rows = []
            for step, batch in enumerate(batches(ds), start=1):
                rows.append([s["input_ids"].tobytes() for s in batch])
                if step == 3:
                    ds.set_weights([0.7, 0.2, 0.1], step=3)
                if step == 10:
                    break
            seqs[unit] = rows
            ds.advance(10)
            state = ds.state_dict(80, True)
            if unit == "tokens":
                assert not ds.plan.counts_tokens and "tokens" not in state["plan"]
                counts = ds.realized_counts
                assert ds.realized_tokens == {g: 32 * n for g, n in counts.items()}
        finally:
            ds.close()
    assert seqs["samples"] == seqs["tokens"]
    ds = DynamicStreamingDataset(manifest=packed_mixture, batch_size=8)
    try:
        with pytest.raises(ValueError, match="realized_tokens needs weight_unit='tokens'"):
            ds.realized_tokens  # noqa: B018
    finally:
        ds.close()


def test_a_resume_with_another_unit_is_refused(text_mixture: str, packed_mixture: str) -> None:
    for manifest in (text_mixture, packed_mixture):
        states = {}
        for unit in ("samples", "tokens"):
            ds = DynamicStreamingDataset(manifest=manifest, batch_size=4, weight_unit=unit)  # type: ignore[arg-type]
            states[unit] = ds.state_dict(0, True)
            ds.close()
        for saved, now in (("samples", "tokens"), ("tokens", "samples")):
            ds = DynamicStreamingDataset(manifest=manifest, batch_size=4, weight_unit=now)  # type: ignore[arg-type]
            try:
                message = rf"identity\.weight_unit is '{saved}' but this dataset has .*'{now}'"
                with pytest.raises(MixtureStateError, match=message):
                    ds.load_state_dict(states[saved])
            finally:
                ds.close()


def _token_mutations() -> list[tuple[str, Callable[[dict], None], str]]:
    def move(key: str, by: float) -> Callable[[dict], None]:
        def apply(s: dict) -> None:
            s["plan"][key][0] += by
            s["plan"][key][1] -= by

        return apply

    return [
        ("no tokens", lambda s: s["plan"].pop("tokens"), r"plan\.tokens is missing"),
        ("short tokens", lambda s: s["plan"].__setitem__("tokens", [1]), "list of 2 counts"),
        ("negative", lambda s: s["plan"]["tokens"].__setitem__(1, -5), r"plan\.tokens\[1\]"),
        ("sum", lambda s: s["plan"]["tokens"].__setitem__(0, 10**6), r"plan\.targets sums to"),
        ("range", move("tokens", 1_200), r"plan\.tokens\[0\] is .* hold"),
        ("bound", move("targets", 900.0), r"plan\.tokens\[0\] is .* bound"),
        ("unit", lambda s: s["identity"].__setitem__("weight_unit", "bytes"), "weight_unit must"),
        ("digest", lambda s: s["identity"].__setitem__("token_lengths", "00"), "token_lengths"),
    ]


@pytest.mark.parametrize(("name", "mutate", "message"), _token_mutations(), ids=lambda x: x)
def test_corrupt_token_states_are_refused_naming_the_field(
    text_mixture: str, name: str, mutate: Callable[[dict], None], message: str
) -> None:
    del name
    ds = DynamicStreamingDataset(manifest=text_mixture, batch_size=8, weight_unit="tokens")
    try:
        good = ds.state_dict(12 * 8, True)
        bad = copy.deepcopy(good)
        mutate(bad)
        with pytest.raises(MixtureStateError, match=message):
            ds.load_state_dict(bad)
        assert ds.state_dict(12 * 8, True) == good
    finally:
        ds.close()


def _edited_copy(text_mixture: str, tmp: Path, edit: Callable[[Path, dict], None]) -> str:
    """A copy of the corpus whose manifest (and files) ``edit`` changes."""
    out = tmp / "edited"
    shutil.copytree(text_mixture, out)
    path = out / "mixture.json"
    manifest = json.loads(path.read_text())
    edit(out, manifest)
    path.write_text(json.dumps(manifest))
    return str(out)


def _long_train(manifest: dict) -> dict:
    return manifest["groups"]["long"]["splits"]["train"]


def _replace_sidecar(values: np.ndarray) -> Callable[[Path, dict], None]:
    """A sidecar of ``values`` whose manifest entry matches it (a consistent forgery)."""

    def edit(root: Path, manifest: dict) -> None:
        data = encode_sidecar(values)
        (root / "long" / "train" / "lengths.npy").write_bytes(data)
        _long_train(manifest)["lengths"] = sidecar_entry(data)

    return edit


def _flip_sidecar(root: Path, manifest: dict) -> None:
    del manifest
    path = root / "long" / "train" / "lengths.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (lambda r, m: _long_train(m).pop("lengths"), ManifestError, "long/train .* no length side"),
        (_flip_sidecar, ValueError, "has xxh64 .* corrupt or was replaced"),
        (_replace_sidecar(np.full(5, 100)), ValueError, "5 token lengths .* of 2[0-9]{2} samples"),
        (
            lambda r, m: _long_train(m)["lengths"].__setitem__("basename", "../../x.npy"),
            ManifestError,
            "refusing length sidecar '../../x.npy'",
        ),
        (
            lambda r, m: _long_train(m)["lengths"].__setitem__("basename", "gone.npy"),
            ManifestError,
            "cannot read .*gone.npy",
        ),
        (
            lambda r, m: _long_train(m)["lengths"].__setitem__("bytes", 10**12),
            ManifestError,
            "bytes is 1000000000000; a sidecar of 2[0-9]{2} lengths is at most",
        ),
    ],
    ids=["missing", "corrupt", "wrong-length", "path", "absent-file", "huge"],
)
def test_bad_sidecars_are_refused_at_construction(
    text_mixture: str,
    tmp_path: Path,
    edit: Callable[[Path, dict], None],
    error: type[Exception],
    message: str,
) -> None:
    manifest = _edited_copy(text_mixture, tmp_path, edit)
    with pytest.raises(error, match=message):
        DynamicStreamingDataset(manifest=manifest, batch_size=8, weight_unit="tokens")
    # The samples unit never reads the sidecar.
    DynamicStreamingDataset(manifest=manifest, batch_size=8, local=str(tmp_path / "c")).close()


def test_zero_lengths_in_a_consistent_sidecar_are_refused(
    text_mixture: str, tmp_path: Path
) -> None:
    samples = json.loads((Path(text_mixture) / "mixture.json").read_text())
    n = _long_train(samples)["samples"]
    values = np.full(n, 150)
    values[7] = 0
    manifest = _edited_copy(text_mixture, tmp_path, _replace_sidecar(values))
    with pytest.raises(ValueError, match="sample 7 has token length 0"):
        DynamicStreamingDataset(manifest=manifest, batch_size=8, weight_unit="tokens")


def test_streams_take_token_lengths_and_bad_ones_are_refused(
    text_mixture: str, tmp_path: Path
) -> None:
    def streams() -> list[Stream]:
        return [
            Stream(remote=str(Path(text_mixture) / g / "train"), local=str(tmp_path / g))
            for g in GROUPS
        ]

    probe = DynamicStreamingDataset(streams=streams(), groups=GROUPS, batch_size=4)
    sizes = [int(n) for n in probe.samples_per_stream]
    probe.close()
    good = {"short": np.full(sizes[SHORT], 12), "long": 200}
    ds = DynamicStreamingDataset(
        streams=streams(), groups=GROUPS, batch_size=4, weight_unit="tokens", token_lengths=good
    )
    try:
        assert ds.plan.counts_tokens and ds.plan.lengths is not None
        assert ds.plan.lengths.longest == [200, 12]
    finally:
        ds.close()
    bad_cases = [
        ({"weight_unit": "bytes"}, "weight_unit must be 'samples' or 'tokens', got 'bytes'"),
        ({"token_lengths": good}, "only used with weight_unit='tokens'"),
        ({"weight_unit": "tokens"}, "with streams= needs token_lengths="),
        (
            {"weight_unit": "tokens", "token_lengths": {"short": np.ones(3), "long": 5}},
            r"token_lengths\['short'\]: token lengths must be integers",
        ),
        (
            {"weight_unit": "tokens", "token_lengths": {"short": np.ones(3, int), "long": 5}},
            rf"token_lengths\['short'\]: 3 token lengths .* of {sizes[SHORT]} samples",
        ),
        (
            {"weight_unit": "tokens", "token_lengths": {"short": 12, "long": -4}},
            r"token_lengths\['long'\]: sample 0 has token length -4",
        ),
        (
            {"weight_unit": "tokens", "token_lengths": {"short": 12}},
            r"token_lengths has no lengths for groups \['long'\]",
        ),
    ]
    for kwargs, message in bad_cases:
        with pytest.raises(ValueError, match=message):
            DynamicStreamingDataset(streams=streams(), groups=GROUPS, batch_size=4, **kwargs)  # type: ignore[arg-type]


def test_verify_checks_the_sidecars(text_mixture: str, tmp_path: Path) -> None:
    from shard_tools import verify_mixture

    assert verify_mixture(text_mixture).ok
    report = verify_mixture(_edited_copy(text_mixture, tmp_path, _flip_sidecar))
    assert len(report.problems) == 1 and "long/train/lengths.npy has xxh64" in report.problems[0]
