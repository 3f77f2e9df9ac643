"""``ResilientStream``: a streaming ``Stream`` that rides out object-store outages and never
hands out a shard that does not match its index.

streaming retries a failed download ``download_retry`` times (default 2) about a second
apart, so an S3 restart of a few seconds, or a burst of ``SlowDown``, kills a training run.
Object stores have minutes-long brown-outs; here a download that fails with a transient
error (connection refused/reset, timeouts, 5xx, ``SlowDown`` and other throttling) is retried
with exponential backoff and full jitter until ``download_retry_seconds`` have passed,
waiting at least as long as a ``Retry-After`` asks. Each shard that has to be retried is
logged once at WARNING; a shard still failing when the budget is spent raises one
:class:`ShardDownloadError` naming the file and the endpoint. Messages hold URLs of objects
and the endpoint only: never keys, signatures or credentials in URLs.

Every file is checked against its index entry (size, and the index's hash when
``validate_hash`` is set -- ``xxh64`` by default in :class:`~mixstream.DynamicStreamingDataset`
-- and the index has one: plain streaming writes none unless asked)
as it is downloaded and as it is decompressed; a mismatch is fetched once more (a flipped
bit in transit or a torn cache) and then fails with a :class:`ShardCorruptError` naming the
shard. :meth:`ResilientStream.check_cached` re-checks a decompressed shard already in the
cache on its first use in a process, and fetches it again if it was damaged since.

The cached ``index.json`` follows the stream when its corpus is re-converted in place: a
local source's is compared with the source's on every build, a remote one's with the digest
its manifest records (no request when they agree); see :meth:`ResilientStream.get_shards`.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import json
import logging
import math
import os
import random
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import xxhash
from streaming import Stream
from streaming.base.compression import decompress
from streaming.base.format.base.reader import FileInfo
from streaming.base.hashing import get_hash, is_hash
from streaming.base.storage.download import CloudDownloader, S3Downloader

from mixstream.shardindex import IndexDigest, check_digest, index_location, unsafe_path_reason
from mixstream.storage import StorageError

__all__ = [
    "DEFAULT_RETRY_SECONDS",
    "Backoff",
    "ResilientStream",
    "ShardCorruptError",
    "ShardDownloadError",
    "file_hash",
    "limit_decompression",
    "retry_delay",
    "shared_downloader",
    "transient_reason",
]

log = logging.getLogger(__name__)
_INDEX = "index.json"
_INDEX_POLL_SECONDS = 0.05  # how often a rank waiting for its leader's index looks again

DEFAULT_RETRY_SECONDS = 300.0  # object-store brown-outs last minutes, not seconds
_BACKOFF_BASE = 0.25  # seconds; the first retry waits up to this, each next one up to twice
_BACKOFF_CAP = 20.0  # no single wait longer than this (unless Retry-After asks for more)
_RETRY_AFTER_CAP = 120.0  # a server's Retry-After is untrusted: never wait longer than this
# S3 (and S3-compatible) error codes that mean "try again later", not "this is wrong".
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "SlowDownRead",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "TooManyRequests",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "OperationAborted",
    }
)


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# How many shards a process decompresses at once (see limit_decompression).
_decompressions = threading.BoundedSemaphore(_cpus())
_decompression_slots = _cpus()


def limit_decompression(processes_per_node: int) -> int:
    """Let each of ``processes_per_node`` loader processes decompress at most its share of
    the node's cores at a time; returns that share (at least 1).

    Downloads overlap freely (they wait on the network), but decompression is CPU- and
    memory-bound: six 32 MiB zstd shards decompressing at once on 2 cores cost ~240 ms of
    CPU each against ~60 ms one at a time (caches thrash), so a first batch that needs them
    all waited for the slowest of six slowed-down decompressions.
    """
    global _decompressions, _decompression_slots
    slots = max(1, _cpus() // max(1, processes_per_node))
    if slots != _decompression_slots:
        # Threads still holding a slot of the old semaphore release it there.
        _decompressions, _decompression_slots = threading.BoundedSemaphore(slots), slots
    return slots


class ShardDownloadError(StorageError):
    """A shard (or index) could not be downloaded within the retry budget, or the store
    refused it for good (missing object, access denied)."""


class ShardCorruptError(ValueError):
    """A shard file does not match its index entry (size, hash, or undecodable), even after
    fetching it again."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 16:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _retry_after(response: dict[str, Any]) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta or HTTP date), clamped; else ``None``."""
    headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}) or {}
    value = headers.get("retry-after")
    if not isinstance(value, str) or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), _RETRY_AFTER_CAP)


def transient_reason(exc: BaseException) -> tuple[str, float | None] | None:
    """``(short reason, Retry-After seconds or None)`` if ``exc`` is worth retrying.

    ``None`` for errors that another attempt cannot fix (missing object, access denied, a bad
    local path). The reason names the error class or S3 code only: exception messages may
    quote request details, so they never reach a log line.
    """
    from botocore.exceptions import (
        ClientError,
        HTTPClientError,
        IncompleteReadError,
        ResponseStreamingError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError

    transfer_errors: tuple[type[BaseException], ...] = ()
    try:
        from boto3.exceptions import RetriesExceededError as Boto3Retries
        from s3transfer.exceptions import RetriesExceededError as TransferRetries

        transfer_errors = (Boto3Retries, TransferRetries)
    except ImportError:  # pragma: no cover - boto3 ships both
        pass
    for e in _chain(exc):
        if isinstance(e, ClientError):
            error = e.response.get("Error", {}) or {}
            code = str(error.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            status = status if isinstance(status, int) else (int(code) if code.isdigit() else 0)
            if code in _TRANSIENT_CODES or status >= 500 or status == 429:
                return f"S3 error {code or status}", _retry_after(e.response)
            return None
        if isinstance(
            e,
            BotoConnectionError
            | HTTPClientError
            | IncompleteReadError
            | ResponseStreamingError
            | ConnectionError
            | TimeoutError,
        ):
            return type(e).__name__, None
        if transfer_errors and isinstance(e, transfer_errors):
            return "repeated read errors", None
        if type(e).__module__.startswith("urllib3") and "ProtocolError" in type(e).__name__:
            return type(e).__name__, None
    return None


def retry_delay(attempt: int, rng: random.Random, retry_after: float | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based): full jitter over an
    exponentially growing window (so many readers hitting one outage do not come back in
    lockstep), but never less than a server's ``Retry-After``."""
    window = min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** min(attempt - 1, 30))
    delay = rng.uniform(0.0, window)
    return max(delay, retry_after) if retry_after is not None else delay


class Backoff:
    """The retries of one operation within ``budget`` seconds (shard downloads and small
    reads alike): call :meth:`delay` after each failed attempt."""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.failures = 0
        self._began = time.monotonic()
        self._rng = random.Random()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._began

    def delay(self, retry_after: float | None = None) -> float | None:
        """Counts a failed attempt; the seconds to wait before the next one, or None when
        waiting them would overrun the budget (give up)."""
        self.failures += 1
        wait = retry_delay(self.failures, self._rng, retry_after)
        return None if self.elapsed + wait > self.budget else wait


def safe_endpoint(url: str | None) -> str:
    """An endpoint URL fit for a message: scheme, host and port only (no userinfo, query)."""
    if not url:
        return "the default AWS endpoint"
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}" if parts.scheme else host or "?"


def _source_of(remote: str) -> str:
    if "://" in remote and not remote.startswith("file://"):
        return f"endpoint {safe_endpoint(os.environ.get('S3_ENDPOINT_URL'))}"
    return "the local file system"


class ResilientStream(Stream):
    """A ``Stream`` whose downloads retry transient errors for ``download_retry_seconds`` and
    whose files are checked against their index (see the module docstring).

    Args:
        download_retry_seconds: total time to keep retrying one file, from its first attempt;
            ``None`` takes the dataset's default (:data:`DEFAULT_RETRY_SECONDS`).
        index_digest: the stream's ``index.json`` as its manifest records it; a cached index
            that differs is replaced by the remote one, which must match (see
            :meth:`get_shards`). ``None``: a cached index of a remote stream is used as is.
        index_named_by: what recorded ``index_digest``, for messages (the manifest's URL).
        **kwargs: as for ``streaming.Stream`` (``download_retry`` is not used: the time
            budget replaces the attempt count).
    """

    def __init__(
        self,
        *,
        download_retry_seconds: float | None = None,
        index_digest: IndexDigest | None = None,
        index_named_by: str = "its manifest",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._downloader = shared_downloader(self._downloader)
        self.download_retry_seconds = (
            None if download_retry_seconds is None else check_retry_seconds(download_retry_seconds)
        )
        self.index_digest = index_digest
        self.index_named_by = index_named_by
        self.link_local = False  # see set_up_local
        self._verified: set[str] = set()

    # ------------------------------------------------------------------ index
    def get_shards(self, world: Any, allow_unsafe_types: bool) -> list[Any]:
        """streaming's, with the cached index brought up to date first.

        streaming copies ``index.json`` into the cache only when it is not there yet; a
        corpus re-converted in place would then be read through its old index and shards.
        A local source's index is read and compared each time (no request); a remote one
        only where the manifest gives its digest: a cached index with that digest is used
        without asking the store, any other is replaced (:meth:`_refresh_remote_index`).
        """
        if self.remote is not None and "://" not in self.remote:
            self._refresh_local_index()
        elif self.remote is not None and self.index_digest is not None:
            self._refresh_remote_index(world)
        return super().get_shards(world, allow_unsafe_types)

    def _check_index_digest(self, data: bytes) -> None:
        if self.index_digest is not None:
            check_digest(data, self.index_digest, index_location(self), self.index_named_by)

    def _refresh_local_index(self) -> None:
        """Copy a local source's index over the cached one if they differ (atomically, so
        concurrent ranks each see one whole file), dropping cached shards the new index
        describes differently."""
        source = os.path.join(self.remote or "", self.split, _INDEX)
        cached = os.path.join(self.local, self.split, _INDEX)
        try:
            with open(source, "rb") as f:
                new = f.read()
        except OSError:
            return  # streaming's own copy reports the missing source
        self._check_index_digest(new)
        old = _read(cached)
        if old == new:
            return
        if old is not None:
            self._drop_changed(old, new)
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        tmp = f"{cached}.tmp-{os.getpid()}-{threading.get_ident()}"
        with open(tmp, "wb") as f:
            f.write(new)
        os.replace(tmp, cached)

    def _refresh_remote_index(self, world: Any) -> None:
        """Make the cached index the one ``index_digest`` names.

        The node's local leader downloads the remote index under a name of its own, checks
        it against the digest, drops cached shards it describes differently and renames it
        into place; the other ranks wait until the cached file has the digest (a stale copy
        must never be read). A cached index that already has it costs no request.
        """
        assert self.index_digest is not None
        cached = os.path.join(self.local, self.split, _INDEX)
        old = _read(cached)
        if old is not None and self.index_digest.matches(old):
            return
        if not world.is_local_leader:
            self._wait_for_index(cached)
            return
        tmp = self._download_file(_INDEX, f"{_INDEX}.refresh-{os.getpid()}-{threading.get_ident()}")
        try:
            with open(tmp, "rb") as f:
                new = f.read()
            self._check_index_digest(new)
        except BaseException:
            _remove(tmp)
            raise
        if old is not None:
            log.info("%s changed since it was cached; refreshing the cache", index_location(self))
            self._drop_changed(old, new)
        os.replace(tmp, cached)

    def _wait_for_index(self, cached: str) -> None:
        """Wait (bounded by the leader's download budget) until ``cached`` has the digest."""
        digest = self.index_digest
        assert digest is not None
        budget = self.download_retry_seconds
        limit = (DEFAULT_RETRY_SECONDS if budget is None else budget) + float(
            self.download_timeout or 60
        )
        deadline = time.monotonic() + limit
        while True:
            with contextlib.suppress(FileNotFoundError):
                if os.path.getsize(cached) == digest.size and digest.matches(_read(cached) or b""):
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"waited {limit:g} s for this node's local rank 0 to cache "
                    f"{index_location(self)} ({digest}) at {cached}; it failed or is still "
                    "downloading: check local rank 0's traceback, or raise "
                    "download_retry_seconds if the store is slow to answer"
                )
            time.sleep(_INDEX_POLL_SECONDS)

    def _drop_changed(self, old: bytes, new: bytes) -> None:
        for name in _changed_files(old, new):
            _remove(os.path.join(self.local, self.split, name))

    # ------------------------------------------------------------------ local corpora
    def set_up_local(self, shards: list[Any], cache_usage_per_shard: Any) -> None:
        """streaming's, after hard-linking a local corpus's uncompressed shards into the cache.

        streaming copies each such shard into the cache on first use, one at a time, under
        a node-wide file lock: ~1 ms a shard, so a first batch over 1,000 groups waited
        1.5 s for copies of files already on disk. A hard link costs no data copy and no
        disk space, and is safe because nothing here writes a cached file in place
        (downloads and decompressions are written under a name of their own and renamed;
        eviction unlinks). Only with ``link_local`` set, which the dataset does when every
        cached file is checked on first use in each process (``verify_cache``) and there is
        no cache limit; where a link cannot be made (another filesystem, no permission) the
        shards are copied on first use as before.
        """
        if self.link_local and self.remote is not None and "://" not in self.remote:
            self._link_uncompressed(shards)
        super().set_up_local(shards, cache_usage_per_shard)

    def _link_uncompressed(self, shards: list[Any]) -> None:
        source_dir = os.path.join(self.remote or "", self.split)
        cache_dir = os.path.join(self.local, self.split)
        os.makedirs(cache_dir, exist_ok=True)
        for shard in shards:
            if any(zip_info is not None for _, zip_info in shard.file_pairs):
                continue
            for raw_info, _ in shard.file_pairs:
                target = os.path.join(cache_dir, raw_info.basename)
                if os.path.lexists(target):
                    continue
                try:
                    if os.path.dirname(target) != cache_dir:  # a basename with folders
                        os.makedirs(os.path.dirname(target), exist_ok=True)
                    os.link(os.path.join(source_dir, raw_info.basename), target)
                except FileExistsError:
                    continue  # another process linked it first
                except OSError:
                    return  # cross-device, read-only cache, no permission: copy on use

    # ------------------------------------------------------------------ download
    def _download_file(self, from_basename: str, to_basename: str | None = None) -> str:
        if self.remote is None:
            return super()._download_file(from_basename, to_basename)
        remote = os.path.join(self.remote, self.split, from_basename)
        local = os.path.join(self.local, self.split, to_basename or from_basename)
        budget = self.download_retry_seconds
        backoff = Backoff(DEFAULT_RETRY_SECONDS if budget is None else budget)
        while True:
            try:
                self._downloader.download(remote, local, self.download_timeout)
            except Exception as exc:
                self._downloader.clean_up()  # a fresh client: the old one's sockets are dead
                transient = transient_reason(exc)
                elapsed = backoff.elapsed
                if transient is None:
                    if not _from_botocore(exc):
                        raise  # a local problem (disk, path): streaming's own error says it
                    raise ShardDownloadError(
                        f"cannot download {remote} from {_source_of(remote)}: "
                        f"{_permanent_reason(exc)}"
                    ) from exc
                reason, retry_after = transient
                delay = backoff.delay(retry_after)
                attempt = backoff.failures
                if delay is None:
                    raise ShardDownloadError(
                        f"cannot download {remote} from {_source_of(remote)}: still failing "
                        f"({reason}) after {attempt} attempt{'s' if attempt > 1 else ''} over "
                        f"{elapsed:.1f} s; the store "
                        "is unreachable or overloaded. Check that it is up (and "
                        "S3_ENDPOINT_URL), or raise download_retry_seconds (now "
                        f"{backoff.budget:g}) to wait out longer outages"
                    ) from None
                if attempt == 1:
                    log.warning(
                        "download of %s from %s failed (%s); retrying with backoff for up to %g s",
                        remote,
                        _source_of(remote),
                        reason,
                        backoff.budget,
                    )
                time.sleep(delay)
                continue
            if backoff.failures:
                log.warning(
                    "downloaded %s after %d attempts (%.1f s)",
                    remote,
                    backoff.failures + 1,
                    backoff.elapsed,
                )
            return local

    # ------------------------------------------------------------------ verification
    def _check(self, info: FileInfo, data: bytes) -> str | None:
        """Why ``data`` does not match its index entry ``info``, or ``None``."""
        return self._mismatch(info, len(data), lambda algo: get_hash(algo, data))

    def _check_file(self, info: FileInfo, filename: str) -> str | None:
        """:meth:`_check` of a file: its size first (one ``stat``, which alone catches
        truncation), then its hash, read in chunks."""
        size = os.path.getsize(filename)
        return self._mismatch(info, size, lambda algo: file_hash(algo, filename))

    def _mismatch(self, info: FileInfo, size: int, digest: Callable[[str], str]) -> str | None:
        """Why ``size`` bytes whose ``digest(algo)`` is given do not match ``info``."""
        if info.bytes is not None and size != info.bytes:
            return f"it is {size} bytes but its index says {info.bytes} (truncated?)"
        expected = self._expected_hash(info)
        if expected is not None and digest(str(self.validate_hash)) != expected:
            return f"its {self.validate_hash} hash does not match its index"
        return None

    def _expected_hash(self, info: FileInfo) -> str | None:
        """The ``validate_hash`` digest the index gives for ``info`` (None: none to check)."""
        if not self.validate_hash:
            return None
        return (info.hashes or {}).get(self.validate_hash)

    def missing_hash(self, shard: Any) -> str | None:
        """The basename of a file of ``shard`` whose index entry lacks ``validate_hash`` (such
        files are checked by size only)."""
        if not self.validate_hash:
            return None
        for info in (i for pair in shard.file_pairs for i in pair if i is not None):
            if self.validate_hash not in (info.hashes or {}):
                return info.basename
        return None

    def _fetch_checked(self, info: FileInfo, filename: str, *, fetch: bool) -> bytes:
        """The bytes of ``filename`` once they match ``info``: downloaded if ``fetch`` (or
        missing), and downloaded once more if the first copy does not match."""
        for attempt in (1, 2):
            if (fetch or attempt == 2) and self.remote is not None:
                _remove(filename)
                self._download_file(info.basename)
            with open(filename, "rb") as f:
                data = f.read()
            problem = self._check(info, data)
            if problem is None:
                return data
            if self.remote is None:
                break
            log.warning("%s does not match its index (%s); downloading it again", filename, problem)
        if self.remote is not None:
            _remove(filename)  # never keep a bad copy in the cache
        source = os.path.join(self.remote, self.split, info.basename) if self.remote else filename
        raise ShardCorruptError(
            f"shard {source} is corrupt: {problem}. "
            + (
                "A fresh download did not match either: the object in the store differs "
                "from its index; re-convert or re-upload the stream (shard-tools verify "
                "finds the bad shards)"
                if self.remote is not None
                else "Re-convert the stream (shard-tools verify finds the bad shards)"
            )
        )

    def _decompressed(self, zip_info: FileInfo, data: bytes, where: str, compression: str) -> bytes:
        try:
            return decompress(compression, data)
        except Exception as exc:  # zstd.Error, zlib.error, ...: the library says only "corrupt"
            raise ShardCorruptError(
                f"shard {where} cannot be decompressed ({compression}: {type(exc).__name__}: "
                f"{exc}); it does not match its index: re-convert or re-upload the stream"
            ) from None

    def _prepare_shard_part(
        self,
        raw_info: FileInfo,
        zip_info: FileInfo | None = None,
        compression: str | None = None,
    ) -> int:
        """streaming's, with every file checked against its index before it is used, and
        the decompressed file written under a name of its own and renamed into place."""
        delta = 0
        raw_filename = os.path.join(self.local, self.split, raw_info.basename)
        if os.path.isfile(raw_filename):
            if zip_info and not self.safe_keep_zip:
                zip_filename = os.path.join(self.local, self.split, zip_info.basename)
                if os.path.isfile(zip_filename):
                    os.remove(zip_filename)
                    delta -= zip_info.bytes
            return delta
        if zip_info is None:
            self._fetch_checked(raw_info, raw_filename, fetch=True)
            self._verified.add(raw_filename)
            return delta + raw_info.bytes
        zip_filename = os.path.join(self.local, self.split, zip_info.basename)
        if not os.path.isfile(zip_filename) and self._reads_in_place:
            data = self._read_in_place(zip_info)
            self._write_raw(raw_info, zip_info, data, self._source(zip_info), compression)
            return delta + raw_info.bytes
        if not os.path.isfile(zip_filename):
            delta += zip_info.bytes
            data = self._fetch_checked(zip_info, zip_filename, fetch=True)
        else:
            data = self._fetch_checked(zip_info, zip_filename, fetch=False)
        self._write_raw(raw_info, zip_info, data, zip_filename, compression)
        delta += raw_info.bytes
        if not self.safe_keep_zip:
            _remove(zip_filename)
            delta -= zip_info.bytes
        return delta

    @property
    def _reads_in_place(self) -> bool:
        """Whether compressed shards are read from a local corpus where they lie.

        streaming copies each one into the cache, reads the copy and deletes it: a third
        more disk writes per shard (and an unlink) for bytes already on disk, which showed
        in the first batch. Only when the cache is not asked to keep compressed files.
        """
        return self.remote is not None and "://" not in self.remote and not self.safe_keep_zip

    def _source(self, info: FileInfo) -> str:
        return os.path.join(self.remote or "", self.split, info.basename)

    def _read_in_place(self, info: FileInfo) -> bytes:
        """The bytes of a local corpus's file once they match ``info``."""
        source = self._source(info)
        try:
            with open(source, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"shard {source} is missing: its index lists it but the corpus does not have "
                "it; re-convert the stream (shard-tools verify finds the missing shards)"
            ) from None
        problem = self._check(info, data)
        if problem is not None:
            raise ShardCorruptError(
                f"shard {source} is corrupt: {problem}. "
                "Re-convert the stream (shard-tools verify finds the bad shards)"
            )
        return data

    def _write_raw(
        self,
        raw_info: FileInfo,
        zip_info: FileInfo,
        data: bytes,
        zip_filename: str,
        compression: str | None,
    ) -> None:
        raw_filename = os.path.join(self.local, self.split, raw_info.basename)
        where = (
            os.path.join(self.remote, self.split, zip_info.basename)
            if self.remote
            else zip_filename
        )
        with _decompressions:
            raw = self._decompressed(zip_info, data, where, compression or "")
            problem = self._check(raw_info, raw)
            if problem is not None:
                raise ShardCorruptError(
                    f"shard {where} decompresses to data that does not match its index: "
                    f"{problem}; re-convert or re-upload the stream"
                )
            tmp = f"{raw_filename}.tmp-{os.getpid()}-{threading.get_ident()}"
            with open(tmp, "wb") as out:
                out.write(raw)
            del raw  # the slot bounds memory too: 2 x shard size per decompression
        os.replace(tmp, raw_filename)
        self._verified.add(raw_filename)

    def check_cached(self, shard: Any) -> None:
        """Check a shard's decompressed files on their first use in this process.

        A file in the cache may have been damaged since it was written (a bad disk, another
        process, a torn write before a crash) and would otherwise yield wrong samples
        silently. One that no longer matches is fetched and decompressed again (written
        under its own name and renamed into place, so concurrent readers see either file
        whole); a stream with nothing to fetch it from raises :class:`ShardCorruptError`.
        """
        for raw_info, zip_info in shard.file_pairs:
            raw_filename = os.path.join(self.local, self.split, raw_info.basename)
            if raw_filename in self._verified:
                continue
            problem = self._check_file(raw_info, raw_filename)
            if problem is not None:
                if zip_info is None and self.remote is None:
                    raise ShardCorruptError(
                        f"shard {raw_filename} is corrupt: {problem}. Re-convert the stream "
                        "(shard-tools verify finds the bad shards)"
                    )
                log.warning(
                    "cached shard %s does not match its index (%s); fetching it again",
                    raw_filename,
                    problem,
                )
                self._refetch(raw_info, zip_info, shard.compression)
            self._verified.add(raw_filename)

    def _refetch(self, raw_info: FileInfo, zip_info: FileInfo | None, compression: Any) -> None:
        raw_filename = os.path.join(self.local, self.split, raw_info.basename)
        if zip_info is None:
            tmp_name = f"{raw_info.basename}.refetch-{os.getpid()}-{threading.get_ident()}"
            tmp = self._download_file(raw_info.basename, tmp_name)
            data = open(tmp, "rb").read()  # noqa: SIM115 - read whole, then renamed
            problem = self._check(raw_info, data)
            if problem is not None:
                _remove(tmp)
                raise ShardCorruptError(f"shard {raw_filename} is corrupt: {problem}")
            os.replace(tmp, raw_filename)
            return
        zip_filename = os.path.join(self.local, self.split, zip_info.basename)
        kept = os.path.isfile(zip_filename)
        if not kept and self._reads_in_place:
            data = self._read_in_place(zip_info)
            self._write_raw(raw_info, zip_info, data, self._source(zip_info), compression)
            return
        data = self._fetch_checked(zip_info, zip_filename, fetch=not kept)
        self._write_raw(raw_info, zip_info, data, zip_filename, compression)
        if not self.safe_keep_zip:
            _remove(zip_filename)


def shared_downloader(downloader: CloudDownloader) -> CloudDownloader:
    """The process's one S3 downloader in place of a stream's own.

    streaming gives every stream its own downloader, and each creates its own boto3 client
    on first use: ~0.3 s of parsing botocore's service JSON each, so a cold start over 200
    groups spent 65 of its 70 s creating clients. boto3 clients are thread-safe and carry
    no per-stream state; one per process (and per endpoint and requester-pays setting, read
    from the environment when the client is made) serves every stream. A forked worker
    drops the inherited client before its first download (``DynamicStreamingDataset``)
    and makes its own from the inherited boto3 session (see :class:`_SessionS3Downloader`).
    """
    if type(downloader) is not S3Downloader:
        return downloader
    downloader.__class__ = _SessionS3Downloader
    key = (
        os.getpid(),
        os.environ.get("S3_ENDPOINT_URL"),
        os.environ.get("MOSAICML_STREAMING_AWS_REQUESTER_PAYS"),
    )
    with _SHARED_LOCK:
        return _SHARED_DOWNLOADERS.setdefault(key, downloader)


_SHARED_DOWNLOADERS: dict[tuple[int, str | None, str | None], CloudDownloader] = {}
_SHARED_LOCK = threading.Lock()


class _SessionS3Downloader(S3Downloader):
    """streaming's S3 downloader, making its clients from one boto3 session per credentials.

    streaming makes each client from a fresh ``Session()``, which loads botocore's service
    model anew: 0.1-0.2 s a client, paid again by every DataLoader worker (which must not
    use the client it inherits: its sockets are shared with the parent). A session has no
    sockets and keeps the loaded model, so the worker's client from the inherited session
    takes ~10 ms; the first batch with 2 S3 workers waited on that. Sessions are keyed by a
    digest of the environment that configures them (credentials, profile, region, endpoint),
    so a change of credentials gets a new one; nothing secret is kept beyond what boto3 keeps.
    """

    def _create_s3_client(self, unsigned: bool = False, timeout: float = 60.0) -> Any:
        from botocore import UNSIGNED
        from botocore.config import Config

        retries = {"mode": "adaptive"}
        config = (
            Config(read_timeout=timeout, signature_version=UNSIGNED, retries=retries)
            if unsigned
            else Config(read_timeout=timeout, retries=retries)
        )
        with _SESSION_LOCK:  # a session makes clients one thread at a time
            self._s3_client = _session().client(
                "s3", config=config, endpoint_url=os.environ.get("S3_ENDPOINT_URL")
            )


_SESSION_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)
_SESSIONS: dict[str, Any] = {}
_SESSION_LOCK = threading.Lock()


def _session() -> Any:
    from boto3.session import Session

    key = xxhash.xxh64_hexdigest("\0".join(os.environ.get(k, "") for k in _SESSION_ENV))
    if key not in _SESSIONS:
        _SESSIONS[key] = Session()
    return _SESSIONS[key]


_HASH_CHUNK = 1 << 20  # bytes read per step by file_hash: fits in L2/L3, so hashing reads cache


def file_hash(algo: str, filename: str) -> str:
    """``get_hash(algo, <the file's bytes>)`` without holding the file in memory.

    A whole-file ``read()`` of a 32 MB shard costs more than hashing it: the fresh buffer
    page-faults in (measured here: 1.2 GB/s whole, 8.5 GB/s in 1 MB chunks, xxh64 of a
    64 MB file in the page cache). This is what makes re-checking cached shards cheap
    enough to be on by default.
    """
    if not is_hash(algo):
        raise ValueError(f"{algo} is not a supported hash algorithm")
    h = _new_hasher(algo)
    buf = memoryview(bytearray(_HASH_CHUNK))
    with open(filename, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(buf[:n])
    return h.hexdigest()


def _new_hasher(algo: str) -> Any:
    """An incremental hasher for ``algo`` as streaming names it (xxhash's or hashlib's)."""
    if algo in xxhash.algorithms_available:
        return getattr(xxhash, algo)()
    return hashlib.new(algo)


def check_retry_seconds(value: Any) -> float:
    """``value`` as a retry budget in seconds, or a ``ValueError`` saying what is allowed."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(
            f"download_retry_seconds must be a non-negative number of seconds, got {value!r} "
            "(0 tries each file once; the default waits out outages of up to "
            f"{DEFAULT_RETRY_SECONDS:g} s)"
        )
    if not math.isfinite(value):
        raise ValueError("download_retry_seconds must be finite (a run must fail eventually)")
    return float(value)


def _permanent_reason(exc: BaseException) -> str:
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    for e in _chain(exc):
        if isinstance(e, ClientError):
            code = str((e.response.get("Error", {}) or {}).get("Code", "Unknown"))
            if code in {"NoSuchKey", "404"}:
                return f"S3 error {code}: the object does not exist; check the stream's path"
            if code in {"NoSuchBucket"}:
                return "S3 error NoSuchBucket: the bucket does not exist; fix its name"
            if code in {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
                return (
                    f"S3 error {code}: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and "
                    "the bucket's permissions"
                )
            return f"S3 error {code}"
        if isinstance(e, NoCredentialsError | PartialCredentialsError):
            return "no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    return f"{type(exc).__name__} (not retried)"


def _changed_files(old: bytes, new: bytes) -> list[str]:
    """Basenames the old index names that the new one does not describe identically (safe
    relative names only: the old index is the cache's own, but a name is still checked)."""

    def files(data: bytes) -> dict[str, Any]:
        try:
            shards = json.loads(data).get("shards", [])
            return {
                info["basename"]: info
                for entry in shards
                for info in (entry.get("raw_data"), entry.get("zip_data"))
                if isinstance(info, dict) and isinstance(info.get("basename"), str)
            }
        except (ValueError, AttributeError, TypeError):
            return {}

    before, after = files(old), files(new)
    return [
        name
        for name, info in before.items()
        if after.get(name) != info and unsafe_path_reason(name) is None
    ]


def _from_botocore(exc: BaseException) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    return any(isinstance(e, BotoCoreError | ClientError) for e in _chain(exc))


def _read(path: str) -> bytes | None:
    """The bytes of ``path``, or ``None`` if there is no such file."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
