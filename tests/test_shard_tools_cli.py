"""The ``shard-tools`` command line: convert, inspect, verify, demo-corpus, train-tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import make_docs, write_jsonl

from mixstream.manifest import SPLITS, Manifest
from shard_tools.cli import main

CONVERT_FLAGS = [
    "--seq-len",
    "64",
    "--shard-size",
    "64kb",
    "--chunk-size",
    "8kb",
    "--workers",
    "1",
    "--val-fraction",
    "0.1",
    "--test-fraction",
    "0.1",
    "--no-progress",
]


@pytest.fixture(autouse=True)
def _private_tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))


@pytest.fixture
def corpus(tmp_path: Path) -> dict[str, Path]:
    return {
        "a": write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in make_docs(200, 1, "a")]),
        "b": write_jsonl(tmp_path / "b.jsonl", [{"text": d} for d in make_docs(150, 2, "b")]),
    }


def _error_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    """The one stderr line of a failed command."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"shard-tools {command}: error: "), err
    return lines[0]


def _table_rows(out: str) -> dict[tuple[str, str], list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["group", "split"])
    assert set(lines[start + 1].replace(" ", "")) == {"-"}
    rows: dict[tuple[str, str], list[str]] = {}
    for line in lines[start + 2 :]:
        cells = line.split()
        if len(cells) < 2 or cells[1] not in SPLITS:
            break
        assert cells[-1].endswith("x")  # compression ratio, the last column
        rows[(cells[0], cells[1])] = cells
    return rows


def test_convert_inspect_verify(
    corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["convert", str(out), "--group", f"a={corpus['a']}", "-g", f"b={corpus['b']}"]
    assert main([*argv, "--tokenizer", "byte", *CONVERT_FLAGS]) == 0
    printed = capsys.readouterr()
    assert f"into 2 groups at {out}" in printed.out
    assert "dropped" in printed.out and "trailing tokens" in printed.out
    manifest = Manifest.load(str(out))
    assert sorted(manifest.groups) == ["a", "b"]
    assert manifest.sample["dtype"] == "uint16" and manifest.sample["seq_len"] == 64

    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    rows = _table_rows(table)
    expected = [(g, s) for g in ("a", "b") for s in SPLITS] + [("TOTAL", s) for s in SPLITS]
    assert list(rows) == expected
    for (group, split), cells in rows.items():
        if group == "TOTAL":
            want = sum(manifest.split(g, split).samples for g in ("a", "b"))
        else:
            want = manifest.split(group, split).samples
            assert int(cells[2].replace(",", "")) == manifest.split(group, split).documents
        assert int(cells[3].replace(",", "")) == want
        assert int(cells[4].replace(",", "")) == want * 64
    assert "tokenizer: byte (vocab 257, eos 256); samples: 64 x uint16" in table
    # Pointing at mixture.json itself works the same as pointing at the root.
    assert main(["inspect", str(out / "mixture.json")]) == 0
    assert capsys.readouterr().out == table

    assert main(["verify", str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.out.strip().endswith(": OK")
    assert printed.out.startswith("verified 6 streams, ")
    assert printed.err == ""


def test_verify_fails_on_a_corrupted_shard(
    corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["convert", str(out), "-g", f"a={corpus['a']}", *CONVERT_FLAGS]) == 0
    shard = sorted((out / "a" / "train").glob("*.mds.zstd"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    capsys.readouterr()

    assert main(["verify", str(out)]) == 1
    printed = capsys.readouterr()
    assert printed.err == f"FAIL {shard}: xxh64 mismatch (corrupted or replaced)\n"
    assert printed.out.strip().endswith(": 1 problems")


def test_group_field_inputs_and_skipped_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = make_docs(300, seed=3)
    records: list[object] = [{"meta": {"set": f"s{i % 2}"}, "text": d} for i, d in enumerate(docs)]
    records[100] = {"meta": {"set": "s0"}, "text": "   "}
    path = tmp_path / "mixed.jsonl"
    write_jsonl(path, records)
    with path.open("a") as f:
        f.write("{oops\n")
    out = tmp_path / "out"
    argv = ["convert", str(out), str(path), "--group-field", "meta.set", "--skip-bad"]
    assert main([*argv, *CONVERT_FLAGS]) == 0
    printed = capsys.readouterr()
    assert "skipped 1 empty documents" in printed.out
    assert printed.err.splitlines()[0] == "skipped 1 bad records, e.g.:"
    assert printed.err.splitlines()[1].startswith(f"  {path}:301: malformed JSON")
    assert sorted(Manifest.load(str(out)).groups) == ["s0", "s1"]


def test_bad_input_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [json.dumps({"text": d}) for d in make_docs(200, seed=4)]
    lines[149] = '{"text": '
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"

    assert main(["convert", str(out), "-g", f"a={path}", *CONVERT_FLAGS]) == 2
    line = _error_line(capsys, "convert")
    assert line.startswith(f"shard-tools convert: error: {path}:150: malformed JSON")
    assert not out.exists()
    assert not list(tmp_path.glob(".shard-tools-*"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-g", "a=IN/missing.jsonl", "FLAGS"], "IN/missing.jsonl: no such file or directory"),
        (["-g", "a=IN/data.csv", "FLAGS"], "IN/data.csv: unknown input format"),
        (["-g", "a b=IN/a.jsonl", "FLAGS"], "invalid group name 'a b'"),
        (["IN/a.jsonl", "FLAGS"], "IN/a.jsonl: no group for this input"),
        (
            ["FLAGS", "-g", "a=IN/a.jsonl", "--val-fraction", "2"],
            "--val-fraction must be in [0, 1)",
        ),
        (
            ["FLAGS", "-g", "a=IN/a.jsonl", "--tokenizer", "IN/a.jsonl"],
            "cannot load tokenizer file",
        ),
        (["FLAGS", "-g", "a=IN/a.jsonl", "--text-field", "body"], "IN/a.jsonl:1: no text field"),
    ],
)
def test_convert_errors_are_one_line(
    args: list[str],
    message: str,
    corpus: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "data.csv").write_text("text\nx\n")
    argv = ["convert", str(tmp_path / "out")]
    for arg in args:
        argv.extend(CONVERT_FLAGS if arg == "FLAGS" else [arg.replace("IN", str(tmp_path))])
    assert main(argv) == 2
    assert message.replace("IN", str(tmp_path)) in _error_line(capsys, "convert")
    assert not (tmp_path / "out").exists()


def test_inputs_may_follow_options(
    corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_jsonl(tmp_path / "g.jsonl", [{"g": "x", "text": d} for d in make_docs(100, 5)])
    argv = ["convert", str(tmp_path / "out"), "--group-field", "g", str(path), *CONVERT_FLAGS]
    assert main(argv) == 0


def test_non_empty_output_and_overwrite(
    corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    argv = ["convert", str(out), "-g", f"a={corpus['a']}", *CONVERT_FLAGS]
    assert main(argv) == 2
    assert "is not empty; pass --overwrite" in _error_line(capsys, "convert")
    assert (out / "notes.txt").read_text() == "keep me"
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "keep me"  # not written by a conversion
    assert (out / "mixture.json").is_file()


def test_inspect_and_verify_without_a_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in ("inspect", "verify"):
        assert main([command, str(tmp_path)]) == 2
        line = _error_line(capsys, command)
        assert f"no mixture manifest at {tmp_path / 'mixture.json'}" in line


def test_argument_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["convert", str(tmp_path / "out"), "--group", "no-equals-sign"])
    assert info.value.code == 2
    assert "expected NAME=PATH, got 'no-equals-sign'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["convert", str(tmp_path / "out"), "--shard-size", "lots"])
    assert info.value.code == 2
    assert "not a size: 'lots'" in capsys.readouterr().err


def test_demo_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo-corpus", str(out), "--bytes-per-group", "200kb"]) == 0
    files = sorted(out.glob("*.jsonl"))
    assert len(files) >= 3
    printed = capsys.readouterr().out
    for path in files:
        assert str(path) in printed
        first = json.loads(path.read_text().splitlines()[0])
        assert first["meta"]["group"] == path.stem and first["text"].strip()


def test_train_tokenizer_then_convert_with_it(
    corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tok = tmp_path / "tok" / "tokenizer.json"
    assert main(["train-tokenizer", str(tok), str(corpus["a"]), "--vocab-size", "320"]) == 0
    assert f"wrote {tok} (vocab 320)" in capsys.readouterr().out
    out = tmp_path / "out"
    argv = ["convert", str(out), "-g", f"a={corpus['a']}", "--tokenizer", str(tok)]
    assert main([*argv, *CONVERT_FLAGS]) == 0
    manifest = Manifest.load(str(out))
    assert manifest.tokenizer is not None
    assert manifest.tokenizer["name"] == str(tok) and manifest.tokenizer["vocab_size"] <= 320
    assert main(["verify", str(out)]) == 0


def test_train_tokenizer_rejects_a_tiny_vocabulary_cleanly(
    corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train-tokenizer", str(tmp_path / "t.json"), str(corpus["a"]), "--vocab-size", "100"]
    assert main(argv) == 2
    assert "vocab" in _error_line(capsys, "train-tokenizer")


def test_console_script_help() -> None:
    script = Path(sys.executable).parent / "shard-tools"
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: shard-tools")
    for command in ("convert", "inspect", "verify", "demo-corpus", "train-tokenizer"):
        assert command in result.stdout
