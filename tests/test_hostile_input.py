"""Indexes and manifests are data from the network: hostile or inconsistent ones are refused.

Each test tampers with a copy of a real converted corpus (on disk or on the embedded
SeaweedFS server) and checks that the dataset and ``shard-tools`` refuse it before touching
any file, with a message naming the file at fault.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mixture_harness import write_index

from mixstream import DynamicStreamingDataset, storage
from mixstream.manifest import Manifest, ManifestError
from mixstream.shardindex import ShardIndexError
from shard_tools.cli import main as shard_tools

Tamper = Callable[[list[dict[str, Any]]], None]


def _copy(mixture: str, tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus"
    shutil.copytree(mixture, corpus)
    return corpus


def _tamper_index(corpus: Path, tamper: Tamper, stream: str = "beta/train") -> Path:
    """Tamper with an index as whoever can write the bucket could: the manifest's record of
    the index is rewritten too, so what is refused is the index's content."""
    obj = json.loads((corpus / stream / "index.json").read_text())
    tamper(obj["shards"])
    return write_index(corpus, stream, obj)


def _set_basename(value: str, key: str = "zip_data") -> Tamper:
    def tamper(shards: list[dict[str, Any]]) -> None:
        shards[1][key]["basename"] = value

    return tamper


def _outside(tmp_path: Path) -> Path:
    return tmp_path / "outside" / "x.mds"


def _traversals(tmp_path: Path) -> list[tuple[str, str]]:
    return [
        ("../../../../" + str(_outside(tmp_path)).lstrip("/"), "contains '..'"),
        ("sub/../../x.mds", "contains '..'"),
        (str(_outside(tmp_path)), "absolute path"),
    ]


def test_shard_paths_outside_the_stream_are_refused_before_any_io_from_s3(
    mixture: str, tmp_path: Path, s3_env: Any, s3_prefix: str
) -> None:
    """A remote index naming ``../..`` or absolute shard files would make the loader download
    and decompress outside its cache: refused at construction, naming the remote index."""
    for i, (name, reason) in enumerate(_traversals(tmp_path)):
        corpus = _copy(mixture, tmp_path / f"c{i}")
        _tamper_index(corpus, _set_basename(name))
        url = f"{s3_prefix}/{i}"
        storage.upload_tree(corpus, url)
        cache = tmp_path / f"cache{i}"
        with pytest.raises(ShardIndexError) as info:
            DynamicStreamingDataset(manifest=url, batch_size=4, local=str(cache))
        message = str(info.value)
        assert f"{url}/beta/train/index.json" in message
        assert f"refusing shard 1 zip_data basename {name!r}" in message and reason in message
        assert not _outside(tmp_path).parent.exists()
        # The refused index is not kept in the cache: a fixed remote is fetched next time.
        assert not (cache / "beta" / "train" / "index.json").exists()
        shutil.rmtree(corpus / "beta")
        shutil.copytree(Path(mixture) / "beta", corpus / "beta")
        storage.upload_tree(corpus / "beta", f"{url}/beta")
        storage.write_bytes(f"{url}/mixture.json", (Path(mixture) / "mixture.json").read_bytes())
        DynamicStreamingDataset(manifest=url, batch_size=4, local=str(cache)).close()


def test_shard_paths_outside_a_local_stream_are_refused(mixture: str, tmp_path: Path) -> None:
    corpus = _copy(mixture, tmp_path)
    index = corpus / "beta" / "train" / "index.json"
    for name, reason in [*_traversals(tmp_path), ("C:evil.mds", "absolute path")]:
        for key in ("raw_data", "zip_data"):
            shutil.copy(Path(mixture) / "beta" / "train" / "index.json", index)
            _tamper_index(corpus, _set_basename(name, key))
            with pytest.raises(ShardIndexError, match=f"{index}: refusing shard 1 {key}") as info:
                DynamicStreamingDataset(manifest=str(corpus), batch_size=4)
            assert reason in str(info.value)
    # A symlink that leaves the stream directory is refused too.
    shutil.copy(Path(mixture) / "beta" / "train" / "index.json", index)
    shutil.copy(Path(mixture) / "mixture.json", corpus / "mixture.json")
    target = tmp_path / "elsewhere.mds.zstd"
    shard = json.loads(index.read_text())["shards"][0]["zip_data"]["basename"]
    shutil.move(index.parent / shard, target)
    os.symlink(target, index.parent / shard)
    with pytest.raises(ShardIndexError, match="resolves outside its root"):
        DynamicStreamingDataset(manifest=str(corpus), batch_size=4)


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("../other/train", "contains '..'"),
        ("/etc", "absolute path"),
        ("alpha/../../train", "contains '..'"),
        ("s3://elsewhere/train", "is a URL"),
        ("./", "names the root itself"),  # --overwrite would replace the whole corpus
    ],
)
def test_manifest_stream_paths_outside_the_corpus_are_refused(
    mixture: str, tmp_path: Path, path: str, reason: str
) -> None:
    corpus = _copy(mixture, tmp_path)
    manifest = json.loads((corpus / "mixture.json").read_text())
    manifest["groups"]["gamma"]["splits"]["val"]["path"] = path
    (corpus / "mixture.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError) as info:
        Manifest.load(str(corpus))
    message = str(info.value)
    assert f"{corpus / 'mixture.json'}: refusing gamma/val stream path {path!r}" in message
    assert reason in message
    assert shard_tools(["inspect", str(corpus)]) == 2


def test_manifest_stream_symlinked_outside_the_corpus_is_refused(
    mixture: str, tmp_path: Path
) -> None:
    corpus = _copy(mixture, tmp_path)
    shutil.move(corpus / "alpha" / "test", tmp_path / "moved")
    os.symlink(tmp_path / "moved", corpus / "alpha" / "test")
    with pytest.raises(ManifestError, match=r"alpha/test stream path 'alpha/test'.*symlink"):
        Manifest.load(str(corpus))


def test_shard_tools_inspect_and_verify_refuse_paths_outside_the_stream(
    mixture: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = _copy(mixture, tmp_path)
    outside = _outside(tmp_path)
    outside.parent.mkdir()
    outside.write_bytes(b"\0" * 64)
    index = _tamper_index(corpus, _set_basename(str(outside)))
    capsys.readouterr()
    assert shard_tools(["inspect", str(corpus)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"shard-tools inspect: error: {index}: refusing shard 1 zip_data")
    assert shard_tools(["verify", str(corpus)]) == 1
    err = capsys.readouterr().err
    assert f"FAIL {index}: refusing shard 1 zip_data basename {str(outside)!r}" in err
    assert "x.mds:" not in err  # the outside file was never read


def _set(key: str, value: Any, shard: int = 1) -> Tamper:
    def tamper(shards: list[dict[str, Any]]) -> None:
        if value is _DELETE:
            del shards[shard][key]
        else:
            shards[shard][key] = value(shards[shard][key]) if callable(value) else value

    return tamper


_DELETE = object()


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (_set("samples", lambda n: n - 5), "holds {n} samples, but the index says {m}"),
        (_set("samples", lambda n: n + 5), "holds {n} samples, but the index says {m}"),
        (_set("samples", lambda n: 10 * n), "holds {n} samples, but the index says {m}"),
        (_set("samples", -1), "samples is -1; expected an integer from 0"),
        (_set("samples", 2.5), "samples is 2.5; expected an integer"),
        (_set("samples", True), "samples is True; expected an integer"),
        (_set("samples", 1 << 40), "expected an integer from 0 to 4294967295"),
        (_set("samples", _DELETE), "samples is None"),
        (_set("raw_data", lambda d: {**d, "bytes": -3}), "raw_data bytes is -3"),
        (_set("column_sizes", [64, 2]), "one entry per column"),
        (_set("zip_data", lambda d: {**d, "basename": "shard.00000.mds.zstd"}), "both name"),
    ],
)
def test_inconsistent_index_entries_are_refused_at_construction(
    mixture: str, tmp_path: Path, tamper: Tamper, message: str
) -> None:
    corpus = _copy(mixture, tmp_path)
    original = json.loads((corpus / "beta" / "train" / "index.json").read_text())["shards"][1]
    index = _tamper_index(corpus, tamper)
    entry = json.loads(index.read_text())["shards"][1]
    message = message.format(n=original["samples"], m=entry.get("samples"))
    with pytest.raises(ShardIndexError) as info:
        DynamicStreamingDataset(manifest=str(corpus), batch_size=4)
    assert str(info.value).startswith(f"{index}: ")
    assert message in str(info.value)
    assert shard_tools(["inspect", str(corpus)]) == 2


@pytest.mark.parametrize("delta", [-7, 7])
def test_a_text_shard_with_another_count_than_its_index_fails_on_first_read(
    tmp_path: Path, delta: int
) -> None:
    """Variable-size samples: the index cannot tell the count, the shard header can. Too few in
    the index used to skip samples silently, too many failed with a bare IndexError."""
    from streaming import MDSWriter, Stream

    stream = tmp_path / "text"
    with MDSWriter(out=str(stream), columns={"text": "str"}, size_limit=1 << 10) as writer:
        for i in range(120):
            writer.write({"text": f"document {i} " + "word " * (i % 13)})
    _tamper_index(tmp_path, _set("samples", lambda n: n + delta, shard=1), stream="text")
    first_shard = json.loads((stream / "index.json").read_text())["shards"][0]["samples"]
    ds = DynamicStreamingDataset(streams=[Stream(local=str(stream))], batch_size=4, shuffle=False)
    try:
        assert ds[0]["text"] == "document 0 "  # shard 0 is fine
        with pytest.raises(ShardIndexError) as info:
            ds[first_shard]
        shard = stream / "shard.00001.mds"
        assert str(info.value).startswith(f"{shard} holds ")
        assert f"but {stream / 'index.json'} says" in str(info.value)
    finally:
        ds.close()
    # Far more than the shard's bytes could hold is refused from the index alone.
    _tamper_index(tmp_path, _set("samples", lambda n: 100 * n, shard=1), stream="text")
    with pytest.raises(ShardIndexError, match="samples of at least 4 bytes, which need at least"):
        DynamicStreamingDataset(streams=[Stream(local=str(stream))], batch_size=4)
