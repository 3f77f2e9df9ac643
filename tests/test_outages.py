"""Object-store outages: ridden out with the exact sequence, or failed clearly within budget.

Everything runs against the real SeaweedFS: the server itself is stopped and restarted on
the same port and data, or a :class:`~mixstream.testing.faultproxy.FaultProxy` between the
loader and the server throttles or black-holes it. Sequences are compared with the same
dataset read from the local copy of the corpus, which never saw a fault.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mixture_harness import fingerprint
from torch.utils.data import DataLoader

from mixstream import DynamicStreamingDataset, storage
from mixstream.stream import ShardDownloadError
from mixstream.testing.faultproxy import FaultProxy
from mixstream.testing.s3server import S3Server

BATCH = 4


def _read(
    manifest: str,
    cache: Path,
    num_workers: int = 0,
    on_batch: Callable[[int], None] | None = None,
    **options: Any,
) -> list[tuple[int, int]]:
    """Every sample of one epoch as (fingerprint, group), in delivery order."""
    ds = DynamicStreamingDataset(
        manifest=manifest,
        batch_size=BATCH,
        local=str(cache),
        predownload=4,  # shards are fetched as the epoch reaches them, not all up front
        num_workers=num_workers,
        seed=5,
        **options,
    )
    try:
        loader = DataLoader(ds, batch_size=BATCH, num_workers=num_workers)
        out: list[tuple[int, int]] = []
        for i, batch in enumerate(loader):
            if on_batch is not None:
                on_batch(i)
            out.extend(
                (fingerprint(row), int(g))
                for row, g in zip(batch["input_ids"], batch["group"], strict=True)
            )
        return out
    finally:
        ds.close()


@pytest.fixture
def own_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """A server of this test's own (it is stopped mid-test), in the environment."""
    with S3Server(data_dir=tmp_path / "s3") as server:
        for name, value in server.env.items():
            monkeypatch.setenv(name, value)
        yield server


@pytest.fixture
def shared_log(tmp_path: Path) -> Iterator[Path]:
    """A file that the ``mixstream.stream`` log of this process and of its forked DataLoader
    workers goes to (pytest's own log capture stays in each process)."""
    path = tmp_path / "stream.log"
    handler = logging.FileHandler(path)
    logger = logging.getLogger("mixstream.stream")
    logger.addHandler(handler)
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        handler.close()


def test_an_s3_restart_mid_epoch_is_ridden_out_with_the_exact_sequence(
    mixture: str, tmp_path: Path, own_server: S3Server, shared_log: Path
) -> None:
    """The server is down for ~8 s (then restarted on the same port and data) while two
    DataLoader workers still have most shards to fetch: the epoch completes with exactly the
    sequence of an undisturbed read, and the retrying workers said so once per shard."""
    url = "s3://mixstream/restart"
    storage.upload_tree(mixture, url)
    expected = _read(mixture, tmp_path / "reference")
    outage = threading.Thread(
        target=lambda: (own_server.halt(), time.sleep(8), own_server.resume())
    )

    def on_batch(i: int) -> None:
        if i == 20:
            outage.start()
            time.sleep(1)  # the workers run on into the outage

    got = _read(url, tmp_path / "cache", num_workers=2, on_batch=on_batch)
    outage.join()
    assert got == expected
    err = shared_log.read_text()
    retried = [line for line in err.splitlines() if "retrying with backoff" in line]
    assert retried, err[-3000:]
    assert all(f"from endpoint {own_server.endpoint_url}" in line for line in retried)
    assert len(retried) == len(set(retried))  # once per file (and process)
    assert own_server.secret_key not in err and own_server.access_key not in err


def test_a_burst_of_slowdown_is_ridden_out(
    mixture: str,
    tmp_path: Path,
    s3_env: S3Server,
    s3_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every request answered 503 SlowDown (Retry-After: 1) for 8 s, longer than botocore's
    and streaming's own retries last: the epoch completes with the exact sequence."""
    storage.upload_tree(mixture, s3_prefix)
    expected = _read(mixture, tmp_path / "reference")
    with FaultProxy(s3_env.endpoint_url, seed=1) as proxy:
        monkeypatch.setenv("S3_ENDPOINT_URL", proxy.url)

        def on_batch(i: int) -> None:
            if i == 10:
                proxy.inject("slowdown", seconds=8, retry_after=1)

        with caplog.at_level(logging.WARNING, logger="mixstream.stream"):
            got = _read(s3_prefix, tmp_path / "cache", on_batch=on_batch)
        assert proxy.counts["slowdown"] > 0, proxy.counts
    assert got == expected
    warnings = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    # GETs are answered SlowDown; HEADs carry no body, so only their status: 503.
    assert warnings and all(("S3 error SlowDown" in w or "S3 error 503" in w) for w in warnings)
    assert all(s3_env.secret_key not in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("fault", ["dark", "reset"])
def test_a_permanent_outage_fails_within_budget_naming_shard_and_endpoint(
    mixture: str,
    tmp_path: Path,
    s3_env: S3Server,
    s3_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fault: str,
) -> None:
    """A store that never comes back: one ShardDownloadError naming the shard, the endpoint
    and the budget to raise, with no credential in it or in the log, once the budget (3 s)
    is spent -- not after streaming's attempt count, and not never. (How long that takes
    on a loaded machine is not asserted: timings live in the soak benchmark.)"""
    storage.upload_tree(mixture, s3_prefix)
    with FaultProxy(s3_env.endpoint_url) as proxy:
        monkeypatch.setenv("S3_ENDPOINT_URL", proxy.url)
        ds = DynamicStreamingDataset(
            manifest=s3_prefix,
            batch_size=BATCH,
            local=str(tmp_path / "cache"),
            download_retry_seconds=3,
            download_timeout=2,
        )
        try:
            proxy.inject(fault, seconds=600)
            with caplog.at_level(logging.WARNING), pytest.raises(ShardDownloadError) as info:
                next(iter(ds))
        finally:
            proxy.clear()
            ds.close()
        assert proxy.counts[fault] >= 2, proxy.counts
    message = str(info.value)
    assert message.startswith(f"cannot download {s3_prefix}/") and ".mds.zstd from" in message
    assert f"from endpoint {proxy.url}: still failing" in message
    assert "raise download_retry_seconds (now 3)" in message
    logged = caplog.text
    for secret in (s3_env.secret_key, s3_env.access_key, "Signature=", "X-Amz-"):
        assert secret not in message and secret not in logged
    # Given up on the budget, not on an attempt count: the message says how long it tried.
    assert re.search(r"still failing \(\w+\) after \d+ attempts? over \d+\.\d s", message)


def test_the_manifest_read_rides_out_throttling_at_construction(
    mixture: str,
    tmp_path: Path,
    s3_env: S3Server,
    s3_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found by the soak: a reader resumed while the store throttled died on ``mixture.json``,
    which is read through :mod:`mixstream.storage`, not the stream's downloads. 8 s of
    SlowDown (longer than botocore's own retries wait) at construction are ridden out."""
    storage.upload_tree(mixture, s3_prefix)
    with FaultProxy(s3_env.endpoint_url) as proxy:
        monkeypatch.setenv("S3_ENDPOINT_URL", proxy.url)
        proxy.inject("slowdown", seconds=8, retry_after=1)
        with caplog.at_level(logging.WARNING):
            ds = DynamicStreamingDataset(
                manifest=s3_prefix, batch_size=BATCH, local=str(tmp_path / "cache")
            )
        ds.close()
        assert proxy.counts["slowdown"] > 0, proxy.counts
    assert f"reading {s3_prefix}/mixture.json at {proxy.url} failed (S3 error SlowDown)" in (
        caplog.text
    )
    assert s3_env.secret_key not in caplog.text
