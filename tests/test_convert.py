"""shard_tools.convert end to end: formats, splits, packing, determinism, safety, errors, S3.

Every stream is read back with ``streaming.StreamingDataset`` (the reader training uses), and
what it returns is compared with what the documents and the documented design say it must be.
Corpora are a few hundred generated documents and ``chunk_bytes`` is small, so each input is
cut into several tasks and the merge path is always exercised.
"""

from __future__ import annotations

import json
import random
import re
import socket
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import (
    make_docs,
    read_stream,
    texts_of,
    tokens_of,
    tree_bytes,
    write_jsonl,
    write_lines,
)

from mixstream import storage
from mixstream.manifest import SPLITS, Manifest
from mixstream.storage import StorageError
from mixstream.testing.s3server import S3Server
from mixstream.tokens import load_sidecar, sidecar_entry
from shard_tools import (
    ConvertError,
    ConvertOptions,
    ConvertReport,
    InputError,
    InputSpec,
    convert,
    format_table,
    inspect_mixture,
    train_bpe,
    verify_mixture,
)
from shard_tools.packing import assign_split
from shard_tools.sources import ReadStats, plan_tasks, read_documents

SEQ = 64
EOS = 256
BASE: dict[str, Any] = {
    "seq_len": SEQ,
    "shard_size": "64kb",
    "chunk_bytes": 8192,
    "workers": 1,
    "progress": False,
    "val_fraction": 0.1,
    "test_fraction": 0.1,
}
Key = tuple[str, str]


def options(**overrides: Any) -> ConvertOptions:
    return ConvertOptions(**{**BASE, **overrides})


def byte_encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


@pytest.fixture(autouse=True)
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private temp dir: streaming's filelocks and S3 staging land here, not in /tmp."""
    path = tmp_path / "scratch"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


def staging_leftovers(*dirs: Path) -> list[Path]:
    return [p for d in dirs for p in d.glob(".shard-tools-*")]


def expected_splits(docs: Sequence[str], opts: ConvertOptions) -> dict[str, Counter[str]]:
    """The documents each split must hold, as multisets (blank documents are skipped)."""
    out: dict[str, Counter[str]] = {s: Counter() for s in SPLITS}
    for doc in docs:
        if doc.strip():
            split = assign_split(doc, opts.val_fraction, opts.test_fraction, opts.split_seed)
            out[split][doc] += 1
    return out


def expected_token_streams(
    inputs: Sequence[InputSpec],
    opts: ConvertOptions,
    encode: Callable[[str], list[int]],
    eos: int,
) -> tuple[dict[Key, np.ndarray], int]:
    """What each (group, split) stream must hold, concatenated, and the tokens dropped.

    The documented design (convert.py): each task packs its documents (ids + EOS) into full
    sequences, in plan order; the partial tails of all tasks are then concatenated in plan
    order and cut into sequences, and what is left over is dropped.
    """
    read = opts.read_options()
    fulls: dict[Key, list[int]] = defaultdict(list)
    tails: dict[Key, list[int]] = defaultdict(list)
    for task in plan_tasks(inputs, read, opts.chunk_bytes):
        streams: dict[Key, list[int]] = defaultdict(list)
        for doc in read_documents(task, read, ReadStats()):
            split = assign_split(doc.text, opts.val_fraction, opts.test_fraction, opts.split_seed)
            streams[(doc.group, split)].extend([*encode(doc.text), eos])
        for key, ids in streams.items():
            full = len(ids) // opts.seq_len * opts.seq_len
            fulls[key].extend(ids[:full])
            tails[key].extend(ids[full:])
    result = {}
    dropped = 0
    for key in fulls.keys() | tails.keys():
        tail = tails[key]
        full = len(tail) // opts.seq_len * opts.seq_len
        dropped += len(tail) - full
        result[key] = np.array(fulls[key] + tail[:full], dtype=np.int64)
    return result, dropped


def decode_bytes(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", "replace")


def decoded_pieces(
    ids: np.ndarray, eos: int, decode: Callable[[list[int]], str], texts: set[str]
) -> tuple[int, int]:
    """(corpus documents, other pieces) among the EOS-terminated pieces of a token stream.

    Pieces that are not a whole document only arise where a task's full sequences end
    mid-document (joined to what follows) and where that document's rest starts the task's
    tail: at most two per task.
    """
    pieces = np.split(ids, np.flatnonzero(ids == eos) + 1)[:-1]
    decoded = [decode(p[:-1].tolist()) for p in pieces]
    docs = sum(d in texts for d in decoded)
    return docs, len(decoded) - docs


def check_text_streams(
    root: Path, scratch: Path, want: dict[str, dict[str, Counter[str]]], report: ConvertReport
) -> None:
    """Every split of every group holds exactly its documents; the manifest agrees."""
    manifest = Manifest.load(str(root))
    assert manifest.sample == {"format": "text", "column": "text", "length_tokenizer": "byte"}
    assert manifest.tokenizer is None
    assert manifest.to_json() == report.manifest.to_json()
    assert sorted(manifest.groups) == sorted(want)
    for group, splits in want.items():
        assert list(manifest.groups[group].splits) == list(SPLITS)
        for split, docs in splits.items():
            assert docs, f"corpus too small: {group}/{split} is empty"
            info = manifest.split(group, split)
            texts = texts_of(read_stream(root / group / split, scratch))
            got = Counter(texts)
            assert got == docs, f"{group}/{split}"
            # The length sidecar: each sample's byte tokens plus EOS, in sample order.
            sidecar = (root / group / split / "lengths.npy").read_bytes()
            assert info.lengths == sidecar_entry(sidecar)
            lengths = load_sidecar(sidecar, info.lengths, info.samples, "sidecar")
            assert lengths.tolist() == [len(t.encode()) + 1 for t in texts]
            assert info.documents == info.samples == sum(docs.values())
            assert info.text_bytes == sum(len(d.encode()) * n for d, n in docs.items())
            assert info.tokens is None


# --------------------------------------------------------------------------- formats


def _write_format(fmt: str, path: Path, docs: list[str]) -> Path:
    """``docs`` in one input of format ``fmt``; returns the input path."""
    if fmt.startswith("jsonl"):
        compression = {"jsonl": None, "jsonl.gz": "gz", "jsonl.zst": "zst"}[fmt]
        return write_jsonl(
            path.with_name(f"{path.name}.{fmt}"), [{"text": d} for d in docs], compression
        )
    if fmt == "parquet":
        out = path.with_name(f"{path.name}.parquet")
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.table({"id": list(range(len(docs))), "text": docs}), out, row_group_size=20
        )
        assert pq.ParquetFile(out).metadata.num_row_groups > 1
        return out
    assert fmt == "text"
    for i, doc in enumerate(docs):
        sub = path / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:04d}{'.md' if i % 7 == 0 else '.txt'}").write_text(doc, encoding="utf-8")
    (path / ".hidden.txt").write_text("hidden files are not documents")
    (path / ".git").mkdir()
    (path / ".git" / "HEAD.txt").write_text("neither are hidden directories")
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "text"])
def test_each_format_converts_to_exact_text_splits(fmt: str, tmp_path: Path, scratch: Path) -> None:
    docs = {"a": make_docs(160, seed=1, tag="a"), "b": make_docs(120, seed=2, tag="b")}
    # Duplicates stay duplicates (in one split); a blank document is skipped and counted.
    docs = {g: [*texts, *texts[:4], "  \n\t "] for g, texts in docs.items()}
    inputs = [
        InputSpec(str(_write_format(fmt, tmp_path / "in" / g, texts)), g)
        for g, texts in docs.items()
    ]
    opts = options()
    if fmt in ("jsonl", "parquet", "text"):  # splittable: make sure the merge path runs
        assert len(plan_tasks(inputs, opts.read_options(), opts.chunk_bytes)) > 2 * len(inputs)

    report = convert(inputs, tmp_path / "out", opts)

    assert report.empty_documents == 2
    assert report.bad_records == 0
    want = {g: expected_splits(texts, opts) for g, texts in docs.items()}
    check_text_streams(tmp_path / "out", scratch, want, report)
    assert not staging_leftovers(tmp_path, scratch)


def test_groups_from_dotted_field_in_jsonl_and_parquet_struct(
    tmp_path: Path, scratch: Path
) -> None:
    rng = random.Random(5)
    docs = make_docs(300, seed=3)
    sets = [rng.choice(["web", "code.py", "law_2"]) for _ in docs]
    half = len(docs) // 2
    jsonl = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"meta": {"set": s, "n": i}, "body": {"text": d}}
            for i, (s, d) in enumerate(zip(sets[:half], docs[:half], strict=True))
        ],
    )
    parquet = tmp_path / "mixed.parquet"
    table = pa.table(
        {
            "meta": [{"set": s, "source": f"src{i}"} for i, s in enumerate(sets[half:])],
            "body": [{"text": d} for d in docs[half:]],
        }
    )
    pq.write_table(table, parquet, row_group_size=16)
    # A third input whose group is given explicitly, next to field-grouped ones.
    extra = make_docs(100, seed=4, tag="extra")
    named = write_jsonl(tmp_path / "named.jsonl", [{"body": {"text": d}} for d in extra])
    inputs = [InputSpec(str(jsonl)), InputSpec(str(parquet)), InputSpec(str(named), "named")]
    opts = options(group_field="meta.set", text_field="body.text")

    report = convert(inputs, tmp_path / "out", opts)

    by_group: dict[str, list[str]] = defaultdict(list)
    for s, d in zip(sets, docs, strict=True):
        by_group[s].append(d)
    by_group["named"] = extra
    want = {g: expected_splits(texts, opts) for g, texts in by_group.items()}
    check_text_streams(tmp_path / "out", scratch, want, report)
    sources = {g: info.sources for g, info in report.manifest.groups.items()}
    assert str(named) in sources["named"]
    assert str(jsonl) in sources["web"] and str(named) not in sources["web"]


def test_forced_format_reads_an_unusual_suffix(tmp_path: Path, scratch: Path) -> None:
    docs = make_docs(150, seed=6)
    path = tmp_path / "corpus.data"
    write_jsonl(path, [{"text": d} for d in docs])
    report = convert([InputSpec(str(path), "g")], tmp_path / "out", options(format="jsonl"))
    check_text_streams(tmp_path / "out", scratch, {"g": expected_splits(docs, options())}, report)


def test_uncompressed_shards_round_trip(tmp_path: Path, scratch: Path) -> None:
    docs = make_docs(150, seed=7)
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    report = convert([InputSpec(str(path), "a")], tmp_path / "out", options(compression=""))
    assert not list((tmp_path / "out").rglob("*.zstd"))
    check_text_streams(tmp_path / "out", scratch, {"a": expected_splits(docs, options())}, report)
    assert verify_mixture(str(tmp_path / "out")).ok


# --------------------------------------------------------------------------- token mode


@pytest.fixture
def two_group_inputs(tmp_path: Path) -> list[InputSpec]:
    """Group ``a`` as multi-chunk JSONL, group ``b`` as multi-row-group Parquet."""
    a = write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": d} for d in make_docs(200, 11, "a")])
    b = tmp_path / "in" / "b.parquet"
    pq.write_table(pa.table({"text": make_docs(150, 12, "b")}), b, row_group_size=15)
    return [InputSpec(str(a), "a"), InputSpec(str(b), "b")]


def test_byte_tokens_pack_documents_and_eos_exactly(
    two_group_inputs: list[InputSpec], tmp_path: Path, scratch: Path
) -> None:
    opts = options(tokenizer="byte")
    report = convert(two_group_inputs, tmp_path / "out", opts)

    manifest = Manifest.load(str(tmp_path / "out"))
    assert manifest.sample == {
        "format": "tokens",
        "column": "input_ids",
        "seq_len": SEQ,
        "dtype": "uint16",
    }
    assert manifest.tokenizer == {"name": "byte", "vocab_size": 257, "eos_id": EOS}
    want, dropped = expected_token_streams(two_group_inputs, opts, byte_encode, EOS)
    assert report.dropped_tokens == dropped
    assert sorted(want) == sorted((g, s) for g in ("a", "b") for s in SPLITS)

    read = opts.read_options()
    tasks = plan_tasks(two_group_inputs, read, opts.chunk_bytes)
    all_docs = [doc.text for task in tasks for doc in read_documents(task, read, ReadStats())]
    total_written = 0
    for (group, split), expected in want.items():
        samples = read_stream(tmp_path / "out" / group / split, scratch)
        got = tokens_of(samples, SEQ, "uint16")
        assert np.array_equal(got, expected), f"{group}/{split}"
        info = manifest.split(group, split)
        assert info.samples == len(samples) == len(got) // SEQ > 0
        assert info.tokens == len(got)
        total_written += len(got)
        docs, foreign = decoded_pieces(got, EOS, decode_bytes, set(all_docs))
        assert docs > 0 and foreign <= 2 * len(tasks), (docs, foreign)
    # Every document token and EOS is either written or counted as dropped.
    assert sum(len(d.encode()) + 1 for d in all_docs) == total_written + report.dropped_tokens


def test_iteration_matches_random_access(
    two_group_inputs: list[InputSpec], tmp_path: Path, scratch: Path
) -> None:
    convert(two_group_inputs, tmp_path / "out", options(tokenizer="byte"))
    stream = tmp_path / "out" / "a" / "train"
    by_index = read_stream(stream, scratch)
    by_iter = read_stream(stream, scratch, iterate=True)
    assert len(by_index) == len(by_iter) > 0
    for i, (x, y) in enumerate(zip(by_index, by_iter, strict=True)):
        assert np.array_equal(x["input_ids"], y["input_ids"]), i


def test_held_out_split_depends_only_on_document_content(tmp_path: Path, scratch: Path) -> None:
    docs = make_docs(400, seed=21)
    shuffled = docs[:]
    random.Random(99).shuffle(shuffled)
    first = write_jsonl(tmp_path / "first.jsonl", [{"text": d} for d in docs])
    second = write_jsonl(tmp_path / "second.jsonl", [{"text": d} for d in shuffled])

    def held_out(path: Path, name: str, **kw: Any) -> dict[str, Counter[str]]:
        convert([InputSpec(str(path), "g")], tmp_path / name, options(**kw))
        return {
            s: Counter(texts_of(read_stream(tmp_path / name / "g" / s, scratch)))
            for s in ("val", "test")
        }

    base = held_out(first, "out1")
    assert sum(base["val"].values()) >= 20 and sum(base["test"].values()) >= 20
    # Other input order and other chunking: the same held-out documents.
    assert held_out(second, "out2", chunk_bytes=3000) == base
    # A different seed draws a different held-out set (the test above is not vacuous).
    assert held_out(first, "out3", split_seed=1)["val"] != base["val"]


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("tokenizer", [None, "byte"])
def test_output_is_byte_identical_across_runs_and_worker_counts(
    tokenizer: str | None, two_group_inputs: list[InputSpec], tmp_path: Path
) -> None:
    opts = options(tokenizer=tokenizer)
    convert(two_group_inputs, tmp_path / "run1", opts)
    convert(two_group_inputs, tmp_path / "run2", opts)
    convert(two_group_inputs, tmp_path / "workers2", options(tokenizer=tokenizer, workers=2))

    reference = tree_bytes(tmp_path / "run1")
    assert sum(name.endswith(".mds.zstd") for name in reference) >= 6 + 2  # several train shards
    assert tree_bytes(tmp_path / "run2") == reference
    assert tree_bytes(tmp_path / "workers2") == reference


# --------------------------------------------------------------------------- safety


def test_non_empty_output_needs_overwrite(tmp_path: Path, scratch: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in make_docs(150, 31, "a")])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": d} for d in make_docs(150, 32, "b")])
    out = tmp_path / "out"
    out.mkdir()  # an existing empty directory is fine
    convert([InputSpec(str(a), "a"), InputSpec(str(b), "b")], out, options())
    before = tree_bytes(out)

    with pytest.raises(ConvertError, match=r"is not empty; pass --overwrite") as info:
        convert([InputSpec(str(a), "a")], out, options())
    assert str(out) in str(info.value)
    assert tree_bytes(out) == before

    report = convert([InputSpec(str(a), "a")], out, options(overwrite=True))
    assert sorted(report.manifest.groups) == ["a"]
    assert not (out / "b").exists()  # replaced, not merged
    assert sorted(Manifest.load(str(out)).groups) == ["a"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.old-")]
    assert not staging_leftovers(tmp_path, scratch)


def test_inputs_inside_the_output_are_refused(tmp_path: Path, scratch: Path) -> None:
    """``--overwrite`` used to delete input files that live under the output, silently."""
    out = tmp_path / "out"
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in make_docs(100, 51, "a")])
    convert([InputSpec(str(a), "a")], out, options())
    inside = write_jsonl(out / "raw" / "b.jsonl", [{"text": d} for d in make_docs(80, 52, "b")])
    before = tree_bytes(out)
    for spec in (InputSpec(str(inside), "b"), InputSpec(str(out / "raw"), "b")):
        for overwrite in (True, False):
            with pytest.raises(ConvertError) as info:
                convert([InputSpec(str(a), "a"), spec], out, options(overwrite=overwrite))
            assert str(info.value).startswith(f"input {inside} is inside the output {out}; ")
            assert tree_bytes(out) == before
    # Through a symlink too.
    (tmp_path / "link").symlink_to(out / "raw", target_is_directory=True)
    with pytest.raises(ConvertError, match="is inside the output"):
        convert([InputSpec(str(tmp_path / "link"), "b")], out, options(overwrite=True))
    assert tree_bytes(out) == before
    assert not staging_leftovers(tmp_path, scratch)


def test_overwrite_replaces_only_what_the_previous_conversion_wrote(
    tmp_path: Path, scratch: Path
) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in make_docs(150, 53, "a")])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": d} for d in make_docs(150, 54, "b")])
    out = tmp_path / "out"
    convert([InputSpec(str(a), "a"), InputSpec(str(b), "b")], out, options())
    foreign = {"notes.txt": b"keep me", "a/README": b"mine", "data/x.bin": b"\0\1"}
    for rel, data in foreign.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)

    convert([InputSpec(str(b), "a")], out, options(overwrite=True))
    assert sorted(Manifest.load(str(out)).groups) == ["a"]
    assert not (out / "b").exists()  # the previous conversion's stream folders are gone
    for rel, data in foreign.items():
        assert (out / rel).read_bytes() == data
    assert verify_mixture(str(out)).ok
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.old-")]

    # Without a previous manifest, nothing in the output is known to be ours: a new stream
    # where something else already is is refused, and nothing is touched.
    (out / "mixture.json").unlink()
    before = tree_bytes(out)
    with pytest.raises(ConvertError) as info:
        convert([InputSpec(str(a), "a")], out, options(overwrite=True))
    assert str(info.value).startswith(f"{out / 'a' / 'train'} already exists and was not")
    assert tree_bytes(out) == before
    convert([InputSpec(str(a), "c")], out, options(overwrite=True))  # free paths are fine
    assert sorted(Manifest.load(str(out)).groups) == ["c"]
    assert (out / "a" / "train").is_dir() and (out / "notes.txt").read_bytes() == b"keep me"
    assert not staging_leftovers(tmp_path, scratch)


def test_output_that_is_a_file_is_refused(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    (tmp_path / "out").write_text("not a directory")
    with pytest.raises(ConvertError, match="exists and is not a directory"):
        convert([InputSpec(str(a), "a")], tmp_path / "out", options(overwrite=True))


def _file_with_bad_line(path: Path, n: int, bad_at: int, bad: str) -> int:
    """A JSONL file of ``n`` documents with blank lines, and ``bad`` as line ``bad_at``."""
    lines = [json.dumps({"text": d}) for d in make_docs(n, seed=41)]
    for i in range(10, n, 25):
        lines[i] = ""  # blank lines count for line numbers but are no records
    lines[bad_at - 1] = bad
    path.write_text("\n".join(lines) + "\n")
    return bad_at


@pytest.mark.parametrize("workers", [1, 2])
def test_failure_mid_conversion_leaves_nothing_behind(
    workers: int, tmp_path: Path, scratch: Path
) -> None:
    path = tmp_path / "in" / "a.jsonl"
    path.parent.mkdir()
    line = _file_with_bad_line(path, 300, bad_at=187, bad='{"text": "unterminated')
    other = write_jsonl(tmp_path / "in" / "b.jsonl", [{"text": d} for d in make_docs(100, 42, "b")])
    inputs = [InputSpec(str(other), "b"), InputSpec(str(path), "a")]
    opts = options(workers=workers, chunk_bytes=6000)
    tasks = plan_tasks(inputs, opts.read_options(), opts.chunk_bytes)
    bad_task = max(t.index for t in tasks if t.files[0] == str(path) and t.first_line <= line)
    assert bad_task >= 2 and bad_task < len(tasks) - 1  # deep in the plan, not the last task

    with pytest.raises(InputError) as info:
        convert(inputs, tmp_path / "out", opts)

    message = str(info.value)
    assert message.startswith(f"{path}:{line}: malformed JSON")
    assert "--skip-bad" in message and "\n" not in message
    assert not (tmp_path / "out").exists()
    assert not staging_leftovers(tmp_path, scratch)


def test_failed_overwrite_keeps_the_previous_output(tmp_path: Path, scratch: Path) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": d} for d in make_docs(150, 43)])
    convert([InputSpec(str(good), "a")], tmp_path / "out", options())
    before = tree_bytes(tmp_path / "out")
    bad = tmp_path / "bad.jsonl"
    _file_with_bad_line(bad, 200, bad_at=150, bad="not json")
    with pytest.raises(InputError, match=rf"{re.escape(str(bad))}:150: "):
        convert(
            [InputSpec(str(bad), "a")], tmp_path / "out", options(overwrite=True, chunk_bytes=4000)
        )
    assert tree_bytes(tmp_path / "out") == before
    assert not staging_leftovers(tmp_path, scratch)


def test_skip_bad_counts_and_reports_bad_records(tmp_path: Path, scratch: Path) -> None:
    docs = make_docs(250, seed=44)
    lines = [json.dumps({"text": d}) for d in docs]
    bad = {
        30: "{broken",  # malformed JSON
        95: json.dumps({"body": "no text field"}),
        160: json.dumps([1, 2, 3]),  # not an object
        230: json.dumps({"text": 17}),  # text is not a string
    }
    for number, line in bad.items():
        lines[number - 1] = line
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(lines) + "\n")
    kept = [d for i, d in enumerate(docs, start=1) if i not in bad]

    report = convert(
        [InputSpec(str(path), "a")], tmp_path / "out", options(skip_bad=True, chunk_bytes=4000)
    )

    assert report.bad_records == len(bad)
    assert [e.split(": ")[0] for e in report.first_errors] == [f"{path}:{n}" for n in bad]
    check_text_streams(tmp_path / "out", scratch, {"a": expected_splits(kept, options())}, report)


# --------------------------------------------------------------------------- bad input


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message and "\n" not in message, message
    return message


def test_malformed_line_number_in_a_multi_chunk_file(tmp_path: Path) -> None:
    path = tmp_path / "deep.jsonl"
    _file_with_bad_line(path, 400, bad_at=333, bad='{"text": "a", }')
    opts = options(chunk_bytes=2048)
    assert len(plan_tasks([InputSpec(str(path), "g")], opts.read_options(), opts.chunk_bytes)) > 10
    with pytest.raises(InputError) as info:
        convert([InputSpec(str(path), "g")], tmp_path / "out", opts)
    assert _one_line(info.value).startswith(f"{path}:333: malformed JSON")


@pytest.mark.parametrize("compression", ["gz", "zst"])
def test_malformed_line_number_in_a_compressed_file(compression: str, tmp_path: Path) -> None:
    lines = [json.dumps({"text": d}) for d in make_docs(120, seed=45)]
    path = tmp_path / f"a.jsonl.{compression}"
    lines[96] = "{]"
    write_lines(path, lines, compression)
    with pytest.raises(InputError) as info:
        convert([InputSpec(str(path), "a")], tmp_path / "out", options())
    assert _one_line(info.value).startswith(f"{path}:97: malformed JSON")


@pytest.mark.parametrize(
    "compression",
    [
        "gz",
        "zst",
    ],
)
def test_truncated_compressed_file_is_a_read_error(compression: str, tmp_path: Path) -> None:
    lines = [json.dumps({"text": d}) for d in make_docs(120, seed=45)]
    other = write_jsonl(tmp_path / "b.jsonl", [{"text": d} for d in make_docs(100, 47)])
    path = write_lines(tmp_path / f"a.jsonl.{compression}", lines, compression)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    inputs = [InputSpec(str(other), "a"), InputSpec(str(path), "a")]
    with pytest.raises(InputError) as info:
        convert(inputs, tmp_path / "out", options())
    assert _one_line(info.value).startswith(f"{path}: cannot read")


def test_parquet_errors_name_row_group_and_row(tmp_path: Path, scratch: Path) -> None:
    docs: list[str | None] = list(make_docs(100, seed=46))
    docs[47] = None  # row group 4 (of 10 rows each), row 7
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": docs}), path, row_group_size=10)
    with pytest.raises(InputError) as info:
        convert([InputSpec(str(path), "a")], tmp_path / "out", options(chunk_bytes=1024))
    message = _one_line(info.value)
    assert message.startswith(f"{path}:row group 4:row 7: field 'text' is NoneType, not text")
    report = convert([InputSpec(str(path), "a")], tmp_path / "out", options(skip_bad=True))
    assert report.bad_records == 1
    kept = [d for d in docs if d is not None]
    check_text_streams(tmp_path / "out", scratch, {"a": expected_splits(kept, options())}, report)


def test_missing_text_field_names_record_and_option(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "a.jsonl", [{"text": "ok"}, {"text": "ok too"}, {"content": "x", "id": 3}]
    )
    with pytest.raises(InputError) as info:
        convert([InputSpec(str(path), "a")], tmp_path / "out", options())
    message = _one_line(info.value)
    assert message.startswith(f"{path}:3: no text field 'text' (record keys: content, id)")
    assert "--text-field" in message


def test_missing_text_column_in_parquet(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"content": ["x", "y"]}), path)
    with pytest.raises(InputError) as info:
        convert([InputSpec(str(path), "a")], tmp_path / "out", options())
    assert "no column 'text' (columns: content)" in _one_line(info.value)


def test_group_with_only_blank_documents(tmp_path: Path) -> None:
    full = write_jsonl(tmp_path / "full.jsonl", [{"text": d} for d in make_docs(100, 51)])
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": t} for t in ("", "   ", "\n\n")])
    with pytest.raises(ConvertError) as info:
        convert(
            [InputSpec(str(full), "full"), InputSpec(str(blank), "blank")],
            tmp_path / "out",
            options(),
        )
    assert _one_line(info.value) == f"group 'blank' has no documents (inputs: {blank})"
    assert not (tmp_path / "out").exists()


def test_unknown_format_is_named(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "ok.jsonl", [{"text": "fine"}])
    (tmp_path / "in" / "table.csv").write_text("text\nhello\n")
    with pytest.raises(InputError) as info:
        convert([InputSpec(str(tmp_path / "in"), "a")], tmp_path / "out", options())
    message = _one_line(info.value)
    assert message.startswith(f"{tmp_path / 'in' / 'table.csv'}: unknown input format")
    assert "--format" in message


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        (InputSpec("PATH", "bad/name"), r"invalid group name 'bad/name'"),
        (InputSpec("PATH", "-dash"), r"invalid group name '-dash'"),
        (InputSpec("PATH"), r"PATH: no group for this input; give it one with --group NAME=PATH"),
        (InputSpec("MISSING", "a"), r"MISSING: no such file or directory"),
    ],
)
def test_bad_input_specs(spec: InputSpec, pattern: str, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    spec = InputSpec(
        spec.path.replace("PATH", str(path)).replace("MISSING", str(tmp_path / "nope")), spec.group
    )
    pattern = pattern.replace("PATH", re.escape(str(path))).replace(
        "MISSING", re.escape(str(tmp_path / "nope"))
    )
    with pytest.raises(InputError, match=pattern) as info:
        convert([spec], tmp_path / "out", options())
    _one_line(info.value)


def test_bad_group_name_in_a_record_field(tmp_path: Path) -> None:
    records = [{"g": "fine", "text": "one"}, {"g": "not fine!", "text": "two"}]
    path = write_jsonl(tmp_path / "a.jsonl", records)
    with pytest.raises(InputError) as info:
        convert([InputSpec(str(path))], tmp_path / "out", options(group_field="g"))
    assert _one_line(info.value).startswith(f"{path}:2: invalid group name 'not fine!'")


def test_empty_validation_split_asks_for_a_larger_fraction(tmp_path: Path) -> None:
    docs = [d for d in make_docs(40, seed=61) if assign_split(d, 0.01, 0.01) == "train"][:5]
    assert len(docs) == 5
    path = write_jsonl(tmp_path / "tiny.jsonl", [{"text": d} for d in docs])
    with pytest.raises(ConvertError) as info:
        convert(
            [InputSpec(str(path), "tiny")],
            tmp_path / "out",
            options(val_fraction=0.01, test_fraction=0.01),
        )
    message = _one_line(info.value)
    assert message.startswith("group 'tiny' has no val samples (0 documents")
    assert "--val-fraction" in message
    assert not (tmp_path / "out").exists()
    # Without held-out splits the same group converts.
    report = convert(
        [InputSpec(str(path), "tiny")], tmp_path / "out", options(val_fraction=0, test_fraction=0)
    )
    assert list(report.manifest.groups["tiny"].splits) == ["train"]


def test_held_out_shorter_than_one_sequence_is_an_error(tmp_path: Path) -> None:
    docs = make_docs(300, seed=62)
    val = [d for d in docs if assign_split(d, 0.1, 0.1) == "val"][:1]
    train = [d for d in docs if assign_split(d, 0.1, 0.1) == "train"]
    test = [d for d in docs if assign_split(d, 0.1, 0.1) == "test"]
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in train + test + val])
    long_seq = 4 * max(len(d.encode()) for d in val)
    with pytest.raises(
        ConvertError,
        match=r"group 'a' has no val samples \(1 documents, need at least one sequence of "
        r"tokens\); raise --val-fraction",
    ):
        convert(
            [InputSpec(str(path), "a")],
            tmp_path / "out",
            options(tokenizer="byte", seq_len=long_seq),
        )


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"dtype": "uint16"}, r"--dtype applies to tokenized output; add --tokenizer"),
        ({"val_fraction": 1.5}, r"--val-fraction must be in \[0, 1\), got 1.5"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, r"must leave some data for train"),
        ({"tokenizer": "byte", "seq_len": 1}, r"--seq-len must be at least 2, got 1"),
        ({"tokenizer": "byte", "eos_token": "</s>"}, r"byte tokenizer has a fixed EOS id"),
        ({"tokenizer": "byte", "dtype": "int8"}, r"token dtype must be uint16 or uint32"),
        ({"chunk_bytes": 0}, r"--chunk-size must be positive"),
    ],
)
def test_bad_options_fail_before_any_work(
    overrides: dict[str, Any], pattern: str, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    with pytest.raises(ConvertError, match=pattern) as info:
        convert([InputSpec(str(path), "a")], tmp_path / "out", options(**overrides))
    _one_line(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "scratch"]


# --------------------------------------------------------------------------- tokenizers


def _word_level_tokenizer(path: Path, vocab: dict[str, int]) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path.write_text(tok.to_str())
    return path


@pytest.fixture(scope="module")
def big_vocab_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real tokenizer.json whose 70,001 ids do not fit in uint16."""
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, 70_001)}}
    return _word_level_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", vocab)


def test_vocabulary_overflowing_uint16_is_refused(
    big_vocab_tokenizer: Path, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "w2 w70000"}])
    opts = options(tokenizer=str(big_vocab_tokenizer), dtype="uint16")
    with pytest.raises(ConvertError) as info:
        convert([InputSpec(str(path), "a")], tmp_path / "out", opts)
    assert _one_line(info.value) == (
        "vocabulary of 70001 tokens does not fit in uint16 (max 65536); "
        "use --dtype uint32 or omit --dtype"
    )
    assert not (tmp_path / "out").exists()


def test_large_vocabulary_gets_uint32_and_exact_ids(
    big_vocab_tokenizer: Path, tmp_path: Path, scratch: Path
) -> None:
    rng = random.Random(71)
    ids = [
        [rng.choice([2, 3, 65535, 65536, 65537, 69999, 70000]) for _ in range(rng.randint(1, 30))]
        for _ in range(60)
    ]
    docs = [" ".join(f"w{i}" for i in doc) for doc in ids]
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    opts = options(
        tokenizer=str(big_vocab_tokenizer),
        seq_len=16,
        val_fraction=0,
        test_fraction=0,
        chunk_bytes=1 << 20,
    )
    convert([InputSpec(str(path), "a")], tmp_path / "out", opts)

    manifest = Manifest.load(str(tmp_path / "out"))
    assert manifest.sample["dtype"] == "uint32"
    assert manifest.tokenizer == {
        "name": str(big_vocab_tokenizer),
        "vocab_size": 70001,
        "eos_id": 0,
    }
    got = tokens_of(read_stream(tmp_path / "out" / "a" / "train", scratch), 16, "uint32")
    flat = [t for doc in ids for t in [*doc, 0]]
    assert np.array_equal(got, flat[: len(flat) // 16 * 16])


def test_token_ids_beyond_vocab_size_are_never_truncated(tmp_path: Path, scratch: Path) -> None:
    tok = _word_level_tokenizer(
        tmp_path / "sparse.json", {"<|endoftext|>": 0, "[UNK]": 1, "hello": 2, "big": 70_000}
    )
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "hello big " * 8}])
    opts = options(tokenizer=str(tok), seq_len=8, val_fraction=0, test_fraction=0)
    try:
        convert([InputSpec(str(path), "a")], tmp_path / "out", opts)
    except ConvertError:
        return  # refusing is a correct outcome too
    got = tokens_of(
        read_stream(tmp_path / "out" / "a" / "train", scratch),
        8,
        Manifest.load(str(tmp_path / "out")).sample["dtype"],
    )
    assert 70_000 in got.tolist()


def test_trained_bpe_tokenizer_converts_exactly(tmp_path: Path, scratch: Path) -> None:
    from tokenizers import Tokenizer

    docs = make_docs(250, seed=81)
    tok_path = train_bpe(docs, 400, tmp_path / "tok" / "tokenizer.json")
    tok = Tokenizer.from_file(str(tok_path))
    eos = tok.token_to_id("<|endoftext|>")
    assert eos is not None and tok.get_vocab_size() <= 400
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    inputs = [InputSpec(str(path), "a")]
    opts = options(tokenizer=str(tok_path))

    report = convert(inputs, tmp_path / "out", opts)

    assert report.manifest.tokenizer == {
        "name": str(tok_path),
        "vocab_size": tok.get_vocab_size(),
        "eos_id": eos,
    }
    assert report.manifest.sample["dtype"] == "uint16"

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    want, dropped = expected_token_streams(inputs, opts, encode, eos)
    assert report.dropped_tokens == dropped
    n_tasks = len(plan_tasks(inputs, opts.read_options(), opts.chunk_bytes))
    for split in SPLITS:
        got = tokens_of(read_stream(tmp_path / "out" / "a" / split, scratch), SEQ, "uint16")
        assert np.array_equal(got, want[("a", split)]), split
        found, foreign = decoded_pieces(got, eos, tok.decode, set(docs))
        assert found > 0 and foreign <= 2 * n_tasks, (split, found, foreign)
    # Every id (+ EOS) is written or dropped, and BPE really merged: clearly fewer ids than bytes.
    n_ids = sum(len(encode(d)) + 1 for d in docs)
    written = sum(info.tokens or 0 for info in report.manifest.groups["a"].splits.values())
    assert written + report.dropped_tokens == n_ids
    assert n_ids < 0.8 * sum(len(d.encode()) + 1 for d in docs)
    # A folder holding tokenizer.json works the same (only the recorded name differs).
    convert(inputs, tmp_path / "out2", options(tokenizer=str(tok_path.parent)))
    first, second = tree_bytes(tmp_path / "out"), tree_bytes(tmp_path / "out2")
    assert first.keys() == second.keys()
    assert {k: v for k, v in first.items() if k != "mixture.json"} == {
        k: v for k, v in second.items() if k != "mixture.json"
    }


def test_length_sidecars_count_the_length_tokenizer(tmp_path: Path, scratch: Path) -> None:
    """Raw text with --length-tokenizer: each sample's length is its BPE ids + EOS, for any
    worker count; the option is refused for packed output, where lengths are seq_len."""
    from tokenizers import Tokenizer

    docs = make_docs(200, seed=83)
    tok_path = train_bpe(docs, 400, tmp_path / "tok" / "tokenizer.json")
    tok = Tokenizer.from_file(str(tok_path))
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        opts = options(length_tokenizer=str(tok_path), workers=workers)
        report = convert([InputSpec(str(path), "a")], out, opts)
        assert report.manifest.sample["length_tokenizer"] == str(tok_path)
        for split in SPLITS:
            info = report.manifest.split("a", split)
            assert info.lengths is not None
            data = (out / "a" / split / "lengths.npy").read_bytes()
            lengths = load_sidecar(data, info.lengths, info.samples, split).tolist()
            texts = texts_of(read_stream(out / "a" / split, scratch))
            want = [len(tok.encode(t, add_special_tokens=False).ids) + 1 for t in texts]
            assert lengths == want and sum(want) < sum(len(t.encode()) + 1 for t in texts)
    assert tree_bytes(tmp_path / "out1") == tree_bytes(tmp_path / "out2")
    packed = options(tokenizer="byte", length_tokenizer=str(tok_path))
    with pytest.raises(ConvertError, match="--length-tokenizer applies to raw-text output"):
        convert([InputSpec(str(path), "a")], tmp_path / "x", packed)


# --------------------------------------------------------------------------- inspect / verify


@pytest.fixture
def converted(two_group_inputs: list[InputSpec], tmp_path: Path) -> tuple[Path, ConvertReport]:
    report = convert(two_group_inputs, tmp_path / "out", options(tokenizer="byte"))
    return tmp_path / "out", report


def test_inspect_reads_counts_from_each_index(converted: tuple[Path, ConvertReport]) -> None:
    root, report = converted
    manifest, rows = inspect_mixture(str(root))
    assert manifest.group_names == ["a", "b"]
    assert [(r.group, r.split) for r in rows] == [(g, s) for g in ("a", "b") for s in SPLITS]
    for row in rows:
        info = report.manifest.split(row.group, row.split)
        index = json.loads((root / row.group / row.split / "index.json").read_text())["shards"]
        assert row.samples == info.samples == sum(s["samples"] for s in index)
        assert row.shards == info.shards == len(index)
        assert row.stored_bytes == sum(
            p.stat().st_size for p in (root / row.group / row.split).glob("*.mds.zstd")
        )
        assert row.tokens == row.samples * SEQ
    table = format_table(rows).splitlines()
    assert table[0].split() == [
        "group",
        "split",
        "docs",
        "samples",
        "tokens",
        "bytes",
        "stored",
        "shards",
        "ratio",
    ]
    totals = [line.split() for line in table if line.startswith("TOTAL")]
    assert [t[1] for t in totals] == list(SPLITS)
    for t in totals:
        assert int(t[3].replace(",", "")) == sum(r.samples for r in rows if r.split == t[1])


def test_verify_passes_on_a_fresh_conversion(converted: tuple[Path, ConvertReport]) -> None:
    root, report = converted
    result = verify_mixture(str(root))
    assert result.ok, result.problems
    assert result.streams == 6
    assert result.shards == sum(
        s.shards for g in report.manifest.groups.values() for s in g.splits.values()
    )
    assert result.samples == sum(
        s.samples for g in report.manifest.groups.values() for s in g.splits.values()
    )


def _train_shard(root: Path, group: str = "a", index: int = 1) -> Path:
    shards = sorted((root / group / "train").glob("*.mds.zstd"))
    assert len(shards) > index
    return shards[index]


def test_verify_detects_a_flipped_byte(converted: tuple[Path, ConvertReport]) -> None:
    root, _ = converted
    shard = _train_shard(root)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    result = verify_mixture(str(root))
    assert not result.ok
    assert result.problems == [f"{shard}: xxh64 mismatch (corrupted or replaced)"]


def test_verify_detects_a_missing_shard(converted: tuple[Path, ConvertReport]) -> None:
    root, _ = converted
    shard = _train_shard(root, "b", 0)
    shard.unlink()
    result = verify_mixture(str(root))
    assert len(result.problems) == 1
    assert str(shard) in result.problems[0] and "no such file" in result.problems[0]


def test_verify_detects_index_and_manifest_disagreeing(
    converted: tuple[Path, ConvertReport],
) -> None:
    root, _ = converted
    manifest = root / "mixture.json"
    original = manifest.read_text()
    data = json.loads(original)
    data["groups"]["a"]["splits"]["val"]["samples"] += 1
    manifest.write_text(json.dumps(data))
    try:
        problems = verify_mixture(str(root)).problems
        assert any("mixture.json says" in p for p in problems), problems
    finally:
        manifest.write_text(original)
    # An index whose count no longer matches its shard is refused before any comparison.
    path = root / "a" / "val" / "index.json"
    index = json.loads(path.read_text())
    index["shards"][0]["samples"] += 1
    path.write_text(json.dumps(index))
    problems = verify_mixture(str(root)).problems
    assert any("holds" in p and "index says" in p for p in problems), problems


def test_verify_understands_every_compression_convert_writes(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in make_docs(100, 91)])
    convert([InputSpec(str(path), "a")], tmp_path / "out", options(compression="gz"))
    result = verify_mixture(str(tmp_path / "out"))
    assert result.ok, result.problems


# --------------------------------------------------------------------------- S3


@pytest.fixture
def fresh_s3_clients() -> Iterator[None]:
    """Drop cached boto3 clients before and after a test that changes credentials.

    storage caches clients by (endpoint, access key id, region) only -- not the secret -- so a
    test that swaps in a wrong secret would otherwise get (and then leave behind for other
    tests) a client with the other secret. See test_changed_secret_key_is_used.
    """
    storage._cached_client.cache_clear()
    yield
    storage._cached_client.cache_clear()


def test_convert_straight_to_s3_matches_local(
    s3_env: S3Server,
    s3_prefix: str,
    two_group_inputs: list[InputSpec],
    tmp_path: Path,
    scratch: Path,
) -> None:
    opts = options(tokenizer="byte")
    convert(two_group_inputs, tmp_path / "local", opts)
    report = convert(two_group_inputs, s3_prefix, opts)
    assert report.manifest.root == s3_prefix

    # Byte for byte the same tree as a local conversion, mixture.json included.
    local = tree_bytes(tmp_path / "local")
    assert storage.list_files(s3_prefix) == sorted(local)
    for name, data in local.items():
        assert storage.read_bytes(storage.join(s3_prefix, name)) == data, name

    manifest, rows = inspect_mixture(s3_prefix)
    assert manifest.root == s3_prefix
    assert rows == inspect_mixture(str(tmp_path / "local"))[1]
    result = verify_mixture(s3_prefix)
    assert result.ok, result.problems
    assert result.streams == 6

    remote = read_stream(manifest.stream_url("b", "train"), scratch, iterate=True)
    expected = read_stream(tmp_path / "local" / "b" / "train", scratch)
    assert len(remote) == len(expected) > 0
    for i, (x, y) in enumerate(zip(remote, expected, strict=True)):
        assert x["input_ids"].dtype == np.uint16
        assert x["input_ids"].tobytes() == y["input_ids"].tobytes(), i
    assert not staging_leftovers(scratch)


def test_non_empty_s3_prefix_needs_overwrite(
    s3_env: S3Server, s3_prefix: str, two_group_inputs: list[InputSpec]
) -> None:
    convert(two_group_inputs, s3_prefix, options())
    before = storage.list_files(s3_prefix)
    assert any(name.startswith("b/") for name in before)

    with pytest.raises(ConvertError) as info:
        convert(two_group_inputs[:1], s3_prefix, options())
    assert (
        _one_line(info.value)
        == f"{s3_prefix} is not empty; pass --overwrite to replace its contents"
    )
    assert storage.list_files(s3_prefix) == before

    convert(two_group_inputs[:1], s3_prefix + "/", options(overwrite=True))
    after = storage.list_files(s3_prefix)
    assert after and not any(name.startswith("b/") for name in after)
    assert sorted(Manifest.load(s3_prefix).groups) == ["a"]
    assert verify_mixture(s3_prefix).ok


def test_overwrite_on_s3_keeps_objects_it_did_not_write(
    s3_env: S3Server, s3_prefix: str, two_group_inputs: list[InputSpec]
) -> None:
    convert(two_group_inputs, s3_prefix, options())
    storage.write_bytes(f"{s3_prefix}/notes.txt", b"keep me")
    storage.write_bytes(f"{s3_prefix}/b/README", b"mine")
    convert(two_group_inputs[:1], s3_prefix, options(overwrite=True))
    names = storage.list_files(s3_prefix)
    assert "notes.txt" in names and "b/README" in names
    assert not [n for n in names if n.startswith("b/") and n != "b/README"]
    assert storage.read_bytes(f"{s3_prefix}/notes.txt") == b"keep me"
    assert verify_mixture(s3_prefix).ok


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_endpoint_is_named_without_secrets(
    s3_env: S3Server,
    s3_prefix: str,
    two_group_inputs: list[InputSpec],
    monkeypatch: pytest.MonkeyPatch,
    scratch: Path,
) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("S3_ENDPOINT_URL", endpoint)
    with pytest.raises((StorageError, ConvertError)) as info:
        convert(two_group_inputs, s3_prefix, options())
    message = _one_line(info.value)
    assert endpoint in message and "unreachable" in message and "S3_ENDPOINT_URL" in message
    assert s3_env.secret_key not in message
    assert not list(scratch.iterdir())


def test_wrong_secret_key_is_a_credentials_error_without_secrets(
    s3_env: S3Server,
    s3_prefix: str,
    two_group_inputs: list[InputSpec],
    monkeypatch: pytest.MonkeyPatch,
    fresh_s3_clients: None,
) -> None:
    wrong = "wrong-" + s3_env.secret_key[::-1]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    with pytest.raises((StorageError, ConvertError)) as info:
        convert(two_group_inputs, s3_prefix, options())
    message = _one_line(info.value)
    assert s3_prefix in message and s3_env.endpoint_url in message
    assert "AWS_SECRET_ACCESS_KEY" in message
    assert wrong not in message and s3_env.secret_key not in message
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.secret_key)
    storage._cached_client.cache_clear()
    assert storage.list_files(s3_prefix) == []  # nothing was written


def test_changed_secret_key_is_used(
    s3_env: S3Server,
    s3_prefix: str,
    two_group_inputs: list[InputSpec],
    monkeypatch: pytest.MonkeyPatch,
    fresh_s3_clients: None,
) -> None:
    assert storage.list_files(s3_prefix) == []  # a client with the right secret is now cached
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + s3_env.secret_key)
    with pytest.raises(StorageError):
        convert(two_group_inputs, s3_prefix, options())
