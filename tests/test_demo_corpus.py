"""Tests for the demo corpus builder: schema, budget, determinism and group selection."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from shard_tools import demo_corpus
from shard_tools.demo_corpus import GROUPS, DemoGroup, build_demo_corpus

BUDGET = 200_000


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, DemoGroup]]:
    """One build shared by the read-only tests, since building is the slow part."""
    out = tmp_path_factory.mktemp("demo")
    return out, build_demo_corpus(out, bytes_per_group=BUDGET)


def _records(path: Path) -> list[dict]:
    data = path.read_bytes().decode("utf-8")
    assert data.endswith("\n")
    lines = data[:-1].split("\n")
    # Nothing that str.splitlines() treats as a line break may hide inside a record.
    assert data.splitlines() == lines
    records = [json.loads(line) for line in lines]
    for line, record in zip(lines, records, strict=True):
        assert json.loads(json.dumps(record, ensure_ascii=False, sort_keys=True)) == record
        assert list(record) == ["meta", "text"]  # sort_keys=True
        assert line.startswith('{"meta": {"group": ')
    return records


def test_builds_at_least_three_valid_groups(built: tuple[Path, dict[str, DemoGroup]]) -> None:
    out, groups = built
    assert len(groups) >= 3
    assert list(groups) == [g for g in GROUPS if g in groups]  # canonical order
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{g}.jsonl" for g in groups)

    for name, info in groups.items():
        assert info.name == name
        assert info.path == out / f"{name}.jsonl"
        assert info.sources
        records = _records(info.path)
        assert len(records) == info.documents > 0
        sizes = []
        for record in records:
            assert record["meta"]["group"] == name
            assert set(record["meta"]) == {"group", "source"}
            source = record["meta"]["source"]
            assert source and not source.startswith("/")
            text = record["text"]
            assert isinstance(text, str) and text.strip() == text != ""
            sizes.append(len(text.encode("utf-8")))
        assert sum(sizes) == info.bytes
        # The budget is a hard cap; a group is only kept when it is reasonably full.
        assert demo_corpus.MIN_GROUP_BYTES // 2 <= info.bytes <= BUDGET
        assert len({r["meta"]["source"] for r in records}) == len(records)


def test_groups_look_different(built: tuple[Path, dict[str, DemoGroup]]) -> None:
    _, groups = built
    texts = {name: [r["text"] for r in _records(info.path)] for name, info in groups.items()}

    def share(name: str, predicate) -> float:
        return sum(map(predicate, texts[name])) / len(texts[name])

    if "code" in texts:
        assert share("code", lambda t: "def " in t or "import " in t or "class " in t) == 1
    if "legal" in texts:
        assert share("legal", lambda t: "licen" in t.lower() or "copyright" in t.lower()) > 0.9
    if "prose" in texts:
        assert share("prose", lambda t: "\ndef " not in t and "\nimport " not in t) > 0.9
    if "docs" in texts:
        assert share("docs", lambda t: t.startswith("NAME")) > 0.5


def test_deterministic(built: tuple[Path, dict[str, DemoGroup]], tmp_path: Path) -> None:
    first_dir, first = built
    second = build_demo_corpus(tmp_path, bytes_per_group=BUDGET)
    assert list(second) == list(first)
    for name in first:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (
            first_dir / f"{name}.jsonl"
        ).read_bytes()


def test_subset_of_groups(tmp_path: Path) -> None:
    # code and prose need nothing but the standard library, so they exist everywhere.
    groups = build_demo_corpus(tmp_path, bytes_per_group=BUDGET, groups=["prose", "code"])
    assert list(groups) == ["code", "prose"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["code.jsonl", "prose.jsonl"]
    assert {r["meta"]["group"] for r in _records(tmp_path / "prose.jsonl")} == {"prose"}


def test_unknown_group_names_valid_groups(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="valid groups") as excinfo:
        build_demo_corpus(tmp_path, groups=["code", "poetry"])
    assert "poetry" in str(excinfo.value)
    assert all(g in str(excinfo.value) for g in GROUPS)
    with pytest.raises(ValueError):
        build_demo_corpus(tmp_path, bytes_per_group=0)
    assert list(tmp_path.iterdir()) == []


def test_tiny_budget_keeps_whole_lines(tmp_path: Path) -> None:
    budget = 3_000
    groups = build_demo_corpus(tmp_path, bytes_per_group=budget, groups=["code"])
    assert groups["code"].bytes <= budget
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for record in _records(tmp_path / "code.jsonl"):
        source = record["meta"]["source"]
        assert source.startswith("stdlib/")
        original = (stdlib / source.removeprefix("stdlib/")).read_text("utf-8", "replace")
        original = original.replace("\r\n", "\n").strip()
        text = record["text"]
        # Either the whole file or (a file larger than the budget) its leading lines.
        assert original.startswith(text)
        assert len(text) == len(original) or original[len(text)].isspace()


def test_too_few_groups_raises_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nowhere"
    monkeypatch.setattr(demo_corpus, "_COMMON_LICENSES", missing / "common-licenses")
    monkeypatch.setattr(demo_corpus, "_USR_SHARE_DOC", missing / "doc")
    monkeypatch.setattr(demo_corpus, "_MAN_ROOT", missing / "man")
    monkeypatch.setattr(demo_corpus, "_site_package_dirs", list)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="need 3") as excinfo:
        build_demo_corpus(out, bytes_per_group=BUDGET)
    message = str(excinfo.value)
    assert str(missing / "man") in message and str(missing / "common-licenses") in message
    assert not out.exists()
    with pytest.raises(RuntimeError, match="docs"):
        build_demo_corpus(out, bytes_per_group=BUDGET, groups=["code", "docs"])
    assert not out.exists()


def test_jsonl_escapes_unicode_line_breaks(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    text = "a\u2028b\u2029c\u0085d — é"
    demo_corpus._write_jsonl_atomic(path, "g", [("s", text)])
    data = path.read_text("utf-8")
    assert data.count("\n") == 1 and len(data.splitlines()) == 1
    assert "é" in data  # ensure_ascii=False keeps other text readable
    assert json.loads(data)["text"] == text
    assert [p.name for p in tmp_path.iterdir()] == ["x.jsonl"]
