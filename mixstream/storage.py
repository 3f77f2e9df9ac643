"""Small object-store helpers for the files mixstream itself reads and writes.

Shards are moved by mosaicml-streaming's own download/upload machinery; this module only
covers what streaming has no public API for: reading and writing a single small file
(``mixture.json``, ``index.json``), listing and deleting a prefix, a pre-flight check that
an S3 destination is reachable and writable, and turning botocore's errors into one-line
messages that say what to fix. Secrets never reach a message: errors are built from the
endpoint, bucket and error code only.

URLs are local paths or ``s3://bucket/key``. The S3 client is configured exactly the way
streaming configures its own (``S3_ENDPOINT_URL`` plus the standard AWS environment), so a
destination that works here works for the dataset too.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = [
    "StorageError",
    "check_writable",
    "delete_file",
    "delete_prefix",
    "exists",
    "is_remote",
    "join",
    "list_files",
    "read_bytes",
    "s3_client",
    "split_s3_url",
    "upload_tree",
    "write_bytes",
]


log = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """An object-store operation failed; the message says what to fix and holds no secrets."""


def is_remote(url: str | os.PathLike[str]) -> bool:
    """Whether ``url`` names an object in S3 rather than a local path."""
    return str(url).startswith("s3://")


def join(root: str | os.PathLike[str], *parts: str) -> str:
    """Join path components for both local paths and ``s3://`` URLs."""
    root = str(root)
    if is_remote(root):
        return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(root, *parts)


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"not an S3 URL: {url!r} (expected s3://bucket/prefix)")
    return parsed.netloc, parsed.path.lstrip("/")


def _endpoint() -> str:
    return os.environ.get("S3_ENDPOINT_URL") or "the default AWS endpoint"


@lru_cache(maxsize=8)
def _cached_client(endpoint: str | None, credentials: str, region: str | None) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10)
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name=region, config=config
    )


def s3_client() -> Any:
    """A boto3 S3 client configured from the environment, as streaming configures its own.

    Cached per (endpoint, credentials, region) so changing the environment -- as tests
    and the embedded server do -- yields a fresh client. The credentials enter the cache
    key only as a digest.
    """
    secret = "|".join(
        os.environ.get(k, "")
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    )
    return _cached_client(
        os.environ.get("S3_ENDPOINT_URL") or None,
        hashlib.sha256(secret.encode()).hexdigest(),
        os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
    )


def describe_error(exc: BaseException, url: str, action: str) -> StorageError:
    """Turn a botocore/OS error into a one-line :class:`StorageError` without secrets."""
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    where = f"{url} at {_endpoint()}" if is_remote(url) else url
    if isinstance(exc, EndpointConnectionError | ConnectionError):
        return StorageError(
            f"cannot {action} {where}: the S3 endpoint is unreachable; "
            "check S3_ENDPOINT_URL and that the server is running"
        )
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return StorageError(
            f"cannot {action} {where}: no S3 credentials found; "
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", "Unknown"))
        if code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"}:
            hint = "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket's permissions"
        elif code in {"NoSuchBucket"}:
            hint = "the bucket does not exist; create it or fix its name"
        elif code in {"NoSuchKey", "404"} and _bucket_missing(url):
            code, hint = "NoSuchBucket", "the bucket does not exist; create it or fix its name"
        elif code in {"NoSuchKey", "404"}:
            hint = "the object does not exist; check the path"
        else:
            hint = "see the S3 server's logs"
        return StorageError(f"cannot {action} {where}: S3 error {code}; {hint}")
    if isinstance(exc, FileNotFoundError):
        return StorageError(f"cannot {action} {where}: no such file or directory")
    if isinstance(exc, PermissionError):
        return StorageError(f"cannot {action} {where}: permission denied")
    return StorageError(f"cannot {action} {where}: {type(exc).__name__}")


def _bucket_missing(url: str) -> bool:
    """Whether the bucket of ``url`` is missing (S3 reports a missing bucket as a missing key
    on some requests, and HEAD requests have no error code at all)."""
    from botocore.exceptions import BotoCoreError, ClientError

    if not is_remote(url):
        return False
    try:
        s3_client().head_bucket(Bucket=split_s3_url(url)[0])
    except ClientError as exc:
        return str(exc.response.get("Error", {}).get("Code")) in {"404", "NoSuchBucket"}
    except (BotoCoreError, StorageError):
        return False
    return False


@contextmanager
def _guard(url: str, action: str) -> Iterator[None]:
    """Translate storage exceptions raised inside the block into :class:`StorageError`."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except StorageError:
        raise
    except (OSError, BotoCoreError, ClientError) as exc:
        raise describe_error(exc, url, action) from None


def read_bytes(url: str, retry_seconds: float = 0.0) -> bytes:
    """Read a whole (small) file from a local path or S3.

    Transient S3 errors (unreachable, resets, 5xx, ``SlowDown``) are retried with backoff
    for ``retry_seconds``, as shard downloads are (:mod:`mixstream.stream`): a dataset built
    while the store is restarting must not fail on its manifest.
    """
    from mixstream.stream import Backoff, transient_reason

    backoff = Backoff(retry_seconds)
    while True:
        try:
            if is_remote(url):
                bucket, key = split_s3_url(url)
                return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
            return Path(url).read_bytes()
        except Exception as exc:
            transient = transient_reason(exc) if is_remote(url) else None
            delay = backoff.delay(transient[1]) if transient else None
            if delay is None:
                with _guard(url, "read"):
                    raise
            if backoff.failures == 1:
                log.warning(
                    "reading %s at %s failed (%s); retrying with backoff for up to %g s",
                    url,
                    _endpoint(),
                    transient[0],
                    retry_seconds,
                )
            time.sleep(delay)


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole file; local writes are atomic (temp file + rename)."""
    with _guard(url, "write"):
        if is_remote(url):
            bucket, key = split_s3_url(url)
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)
            return
        path = Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)


def exists(url: str) -> bool:
    """Whether a file exists at ``url``."""
    with _guard(url, "check"):
        if is_remote(url):
            from botocore.exceptions import ClientError

            bucket, key = split_s3_url(url)
            try:
                s3_client().head_object(Bucket=bucket, Key=key)
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) in {"404", "NoSuchKey"}:
                    return False
                raise
            return True
        return Path(url).is_file()


def list_files(url: str) -> list[str]:
    """Relative paths of all files under the prefix/directory ``url``, sorted."""
    with _guard(url, "list"):
        if is_remote(url):
            bucket, prefix = split_s3_url(url)
            prefix = prefix.rstrip("/") + "/" if prefix else ""
            keys: list[str] = []
            paginator = s3_client().get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                keys.extend(obj["Key"][len(prefix) :] for obj in page.get("Contents", []))
            return sorted(keys)
        root = Path(url)
        if not root.exists():
            return []
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def delete_file(url: str) -> None:
    """Delete one file if it exists."""
    with _guard(url, "delete"):
        if is_remote(url):
            bucket, key = split_s3_url(url)
            s3_client().delete_object(Bucket=bucket, Key=key)
            return
        Path(url).unlink(missing_ok=True)


def delete_prefix(url: str) -> None:
    """Delete everything under a prefix/directory."""
    with _guard(url, "delete"):
        if is_remote(url):
            bucket, prefix = split_s3_url(url)
            names = list_files(url)
            base = prefix.rstrip("/") + "/" if prefix else ""
            client = s3_client()
            for start in range(0, len(names), 1000):
                chunk = names[start : start + 1000]
                client.delete_objects(
                    Bucket=bucket,
                    Delete={"Objects": [{"Key": base + n} for n in chunk], "Quiet": True},
                )
            return
        shutil.rmtree(url, ignore_errors=True)


def check_writable(url: str) -> None:
    """Fail fast, before any work, if an S3 destination is unreachable or unauthorized.

    Writes and deletes a tiny probe object, which is the only reliable test of write
    permission across S3 implementations.
    """
    if not is_remote(url):
        return
    bucket, prefix = split_s3_url(url)
    probe = "/".join(p for p in (prefix.rstrip("/"), f".mixstream-probe-{os.getpid()}") if p)
    with _guard(url, "write to"):
        client = s3_client()
        client.head_bucket(Bucket=bucket)
        client.put_object(Bucket=bucket, Key=probe, Body=b"")
        client.delete_object(Bucket=bucket, Key=probe)


def upload_tree(local_dir: str | os.PathLike[str], url: str, max_workers: int = 8) -> list[str]:
    """Upload every file under ``local_dir`` to ``url``; ``index.json`` files go last.

    Returns the uploaded relative names so a failed publish can be rolled back. Index
    files are uploaded only after every shard of the tree is in place, so a reader never
    sees an index that points at missing shards.
    """
    root = Path(local_dir)
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    shards = [n for n in names if os.path.basename(n) != "index.json"]
    indexes = [n for n in names if os.path.basename(n) == "index.json"]
    bucket, prefix = split_s3_url(url)
    base = prefix.rstrip("/") + "/" if prefix else ""
    client = s3_client()

    def put(name: str) -> str:
        client.upload_file(str(root / name), bucket, base + name)
        return name

    with _guard(url, "upload to"), ThreadPoolExecutor(max_workers) as pool:
        for batch in (shards, indexes):
            list(pool.map(put, batch))
    return shards + indexes
