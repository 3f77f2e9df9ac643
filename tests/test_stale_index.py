"""A corpus re-converted in place on S3 is read anew, never through a stale cached index.

streaming downloads ``index.json`` into the cache only when no copy is there. The manifest
records each stream's index digest, so a warm cache is checked against it without a request,
and a stale copy is replaced (with the cached shards it describes differently) before use.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from mixture_harness import (
    GROUPS,
    LoopSpec,
    convert_corpus,
    global_sequence,
    run_loop,
    write_corpus,
)

from mixstream import DynamicStreamingDataset, storage
from mixstream.manifest import Manifest, ManifestError
from mixstream.shardindex import IndexDigest, ShardIndexError
from mixstream.stream import ResilientStream, ShardDownloadError
from mixstream.testing.distributed import free_port, run_ranks
from shard_tools.cli import main as shard_tools

STREAM = "beta/train"


def _epoch(manifest: str, cache: Path, **options: Any) -> list[tuple[int, int]]:
    """Every sample of one epoch as (fingerprint, group), in order."""
    import torch
    from mixture_harness import fingerprint

    ds = DynamicStreamingDataset(
        manifest=manifest, batch_size=4, local=str(cache), seed=3, **options
    )
    try:
        return [(fingerprint(torch.as_tensor(s["input_ids"])), int(s["group"])) for s in ds]
    finally:
        ds.close()


@pytest.fixture(scope="module")
def v2_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The input documents of a second version of the ``mixture`` corpus (other documents)."""
    corpus = tmp_path_factory.mktemp("v2") / "corpus"
    write_corpus(corpus, docs_per_group=150, seed=2)
    return corpus


@pytest.fixture(scope="module")
def v2(v2_corpus: Path) -> Path:
    """``v2_corpus`` converted (on local disk, read-only for the tests)."""
    out = v2_corpus.parent / "out"
    convert_corpus(v2_corpus, str(out))
    return out


def _upload(corpus: str | Path, url: str) -> None:
    """A converted corpus to ``url``, in place of what was there."""
    storage.delete_prefix(url)
    storage.upload_tree(Path(corpus), url)


def _strip_digests(manifest: bytes) -> bytes:
    """The manifest as mixstream wrote it before it recorded index digests."""
    obj = json.loads(manifest)
    for group in obj["groups"].values():
        for split in group["splits"].values():
            del split["index_bytes"], split["index_xxh64"]
    return json.dumps(obj).encode()


def test_a_corpus_reconverted_on_s3_is_read_anew_through_a_warm_cache(
    mixture: str, v2_corpus: Path, tmp_path: Path, s3_env: Any, s3_prefix: str
) -> None:
    _upload(mixture, s3_prefix)
    cache = tmp_path / "cache"
    v1 = _epoch(s3_prefix, cache)
    cached_v1 = (cache / STREAM / "index.json").read_bytes()
    convert_corpus(v2_corpus, s3_prefix, overwrite=True)  # same stream and shard names
    v2 = _epoch(s3_prefix, tmp_path / "fresh")
    assert v2 != v1
    # Hashing off, cache checks off: only the refreshed index (and the cached v1 shards it
    # dropped, same names as v2's) keeps v1's samples out.
    assert _epoch(s3_prefix, cache, validate_hash=None, verify_cache=False) == v2
    remote = storage.read_bytes(f"{s3_prefix}/{STREAM}/index.json")
    assert (cache / STREAM / "index.json").read_bytes() == remote != cached_v1
    assert not [p for p in (cache / STREAM).iterdir() if ".refresh-" in p.name]


def test_a_warm_cache_with_the_current_index_asks_the_store_nothing(
    mixture: str, tmp_path: Path, s3_env: Any, s3_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Instant start: a cached index with the manifest's digest is used without a request,
    so the dataset is built even with the store unreachable (the manifest object given)."""
    _upload(mixture, s3_prefix)
    cache = tmp_path / "cache"
    manifest = Manifest.load(s3_prefix)
    # Read every split once: each stream's index is then cached.
    ds = DynamicStreamingDataset(manifest=manifest, batch_size=4, local=str(cache))
    ds.close()
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing there
    ds = DynamicStreamingDataset(
        manifest=manifest, batch_size=4, local=str(cache), download_retry_seconds=0
    )
    ds.close()
    with pytest.raises(ShardDownloadError, match="cannot download"):  # a cold one asks
        DynamicStreamingDataset(
            manifest=manifest, batch_size=4, local=str(tmp_path / "cold"), download_retry_seconds=0
        )


def test_two_ranks_of_a_node_both_read_the_reconverted_corpus(
    mixture: str, v2: Path, tmp_path: Path, s3_env: Any, s3_prefix: str
) -> None:
    """Rank 1 finds the stale index in the node's cache too: it waits for rank 0's refresh."""
    _upload(mixture, s3_prefix)
    spec = LoopSpec(manifest=s3_prefix, global_batch=8, steps=12, local=str(tmp_path / "cache"))
    v1 = global_sequence([run_loop(0, spec)])  # warms the node's cache (one rank suffices)
    _upload(v2, s3_prefix)
    on_two_ranks = global_sequence(run_ranks(run_loop, 2, spec, env=s3_env.env))
    fresh = dataclasses.replace(spec, manifest=str(v2), local=str(tmp_path / "fresh"))
    assert on_two_ranks == global_sequence([run_loop(0, fresh)]) != v1


def test_an_index_that_is_not_the_one_the_manifest_records_is_refused(
    mixture: str, tmp_path: Path, s3_env: Any, s3_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _upload(mixture, s3_prefix)
    url = f"{s3_prefix}/{STREAM}/index.json"
    # A valid index of the same shards, but not the bytes the manifest names (a conversion
    # under way, or an index written after the manifest).
    storage.write_bytes(url, json.dumps(json.loads(storage.read_bytes(url)), indent=1).encode())
    cache = tmp_path / "cache"
    with pytest.raises(ShardIndexError) as info:
        DynamicStreamingDataset(manifest=s3_prefix, batch_size=4, local=str(cache))
    message = str(info.value)
    assert message.startswith(f"{url} (")
    assert f"is not the index {s3_prefix}/mixture.json records for it" in message
    assert "re-convert the corpus" in message and "shard-tools verify" in message
    assert not (cache / STREAM / "index.json").exists()  # nothing unchecked is cached
    assert not [p for p in (cache / STREAM).iterdir()]
    capsys.readouterr()
    assert shard_tools(["verify", s3_prefix]) == 1
    assert f"FAIL {url} (" in capsys.readouterr().err
    assert shard_tools(["inspect", s3_prefix]) == 2
    assert f"is not the index {s3_prefix}/mixture.json records" in capsys.readouterr().err


def test_a_local_index_that_is_not_the_one_the_manifest_records_is_refused(
    mixture: str, tmp_path: Path
) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(mixture, corpus, ignore=shutil.ignore_patterns("*.mds", "*.tmp"))
    index = corpus / STREAM / "index.json"
    index.write_bytes(index.read_bytes() + b"\n")
    with pytest.raises(ShardIndexError, match=rf"^{re.escape(str(index))} \(.*is not the index"):
        DynamicStreamingDataset(manifest=str(corpus), batch_size=4, local=str(tmp_path / "c"))


def test_an_old_manifest_without_digests_still_loads_and_reads(
    mixture: str, tmp_path: Path, s3_env: Any, s3_prefix: str
) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(mixture, corpus, ignore=shutil.ignore_patterns("*.mds", "*.tmp"))
    manifest = corpus / "mixture.json"
    recorded = Manifest.load(str(corpus))
    digest = recorded.split("beta", "train").index_digest
    assert digest == IndexDigest.of((corpus / STREAM / "index.json").read_bytes())
    manifest.write_bytes(_strip_digests(manifest.read_bytes()))
    old = Manifest.load(str(corpus))
    assert all(old.split(g, "train").index_digest is None for g in GROUPS)
    assert b"index_xxh64" not in old.to_json()  # written back as it was
    storage.upload_tree(corpus, s3_prefix)
    reference = _epoch(str(corpus), tmp_path / "local-cache")
    assert _epoch(s3_prefix, tmp_path / "cache") == reference
    assert _epoch(s3_prefix, tmp_path / "cache") == reference  # warm cache, today's behaviour
    assert shard_tools(["verify", s3_prefix]) == 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"index_xxh64": "ABC"}, "index_xxh64 is 'ABC'; expected 16 lowercase hex digits"),
        ({"index_bytes": -1}, "index_bytes is -1; expected a non-negative integer"),
        ({"index_bytes": True}, "index_bytes is True; expected a non-negative integer"),
        ({"index_bytes": None}, "has only one of index_bytes and index_xxh64"),
    ],
)
def test_malformed_digests_in_a_manifest_are_refused(
    mixture: str, tmp_path: Path, fields: dict[str, Any], message: str
) -> None:
    obj = json.loads((Path(mixture) / "mixture.json").read_bytes())
    obj["groups"]["gamma"]["splits"]["val"].update(fields)
    with pytest.raises(ManifestError, match="gamma/val") as info:
        Manifest.from_json(json.dumps(obj), root=str(tmp_path))
    assert message in str(info.value)


def test_the_rank_waiting_for_its_leader_gives_up_with_a_clear_error(
    mixture: str, tmp_path: Path
) -> None:
    """A non-leader never reads a stale cached index: it waits for the leader's, bounded."""
    manifest = Manifest.load(mixture)
    local = tmp_path / "cache"
    os.makedirs(local)
    (local / "index.json").write_bytes(b'{"version": 2, "shards": []}')  # stale
    stream = ResilientStream(
        remote="s3://mixstream/never-asked/beta/train",  # the follower waits, never fetches
        local=str(local),
        index_digest=manifest.split("beta", "train").index_digest,
        download_retry_seconds=0.3,
        download_timeout=0.2,
    )

    class Follower:
        is_local_leader = False

    with pytest.raises(TimeoutError, match=r"waited 0\.5 s for this node's local rank 0"):
        stream.get_shards(Follower(), False)
