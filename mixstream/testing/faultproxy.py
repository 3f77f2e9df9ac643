"""A TCP fault-injection proxy on loopback, for testing what an object-store outage does.

It forwards 127.0.0.1:<port> to an upstream (the embedded SeaweedFS), and on request, for a
bounded time, misbehaves the way object stores and their networks do:

- ``reset``: new connections are reset (RST) right after they are accepted;
- ``slowdown``: requests are answered ``503 SlowDown`` with a ``Retry-After`` header,
  exactly as S3 throttles;
- ``dark``: new connections are accepted and then get nothing -- no bytes, no close -- until
  the fault ends, when they are reset (a black-holed network or a hung load balancer).

A fault applies to new connections with probability ``rate``; connections open when it
starts are reset with the same probability (clients keep connections alive, and an outage
does not spare them). SigV4 signs the ``Host`` header the client sent (the proxy's), and
bytes pass unchanged, so signed requests verify upstream. Counters say what was injected, so
a test can check that its faults actually happened.

Typical use::

    with FaultProxy(server.endpoint_url) as proxy:
        env = {**server.env, "S3_ENDPOINT_URL": proxy.url}
        proxy.inject("slowdown", seconds=5, retry_after=1)
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass

__all__ = ["FAULTS", "FaultProxy"]

FAULTS = ("reset", "slowdown", "dark")
_HOST = "127.0.0.1"
_MAX_FAULT_SECONDS = 3600.0  # every fault ends: a test that forgets it must not hang forever
_HEAD_LIMIT = 64 * 1024
_SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message>"
    b"<RequestId>faultproxy</RequestId></Error>"
)


@dataclass(frozen=True)
class _Fault:
    kind: str
    until: float
    rate: float
    retry_after: float | None


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), the way a crashed server or middlebox drops a client."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    """Forward ``127.0.0.1:port`` to ``upstream`` (``http://host:port``), injecting faults.

    ``port`` 0 picks a free one; :meth:`stop` then :meth:`start` reuse it.
    """

    def __init__(self, upstream: str, port: int = 0, seed: int | None = None) -> None:
        parts = urllib.parse.urlsplit(upstream)
        if not parts.hostname or not parts.port:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream = (parts.hostname, parts.port)
        self._port = port
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._fault: _Fault | None = None
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._live: dict[socket.socket, _Pair] = {}  # forwarded connections, by client
        self._held: list[tuple[float, socket.socket]] = []  # dark connections, until when
        self.counts: Counter[str] = Counter()
        """Connections accepted, forwarded, and faults injected (by kind)."""

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FaultProxy:
        if self._thread is not None:
            raise RuntimeError("FaultProxy is already running")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((_HOST, self._port))
        listener.listen(128)
        listener.settimeout(0.1)
        self._port = listener.getsockname()[1]
        self._listener = listener
        self._stopping.clear()
        self._thread = threading.Thread(target=self._serve, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting and reset every open connection (idempotent)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._reset_live(1.0)
        with self._lock:
            held, self._held = self._held, []
        for _, sock in held:
            _reset(sock)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{_HOST}:{self._port}"

    # ------------------------------------------------------------------ faults
    def inject(
        self,
        kind: str,
        *,
        seconds: float,
        rate: float = 1.0,
        retry_after: float | None = 1.0,
    ) -> None:
        """Misbehave as ``kind`` (see :data:`FAULTS`) for ``seconds``, replacing any fault."""
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; expected one of {FAULTS}")
        if not 0 < seconds <= _MAX_FAULT_SECONDS:
            raise ValueError(f"seconds must be in (0, {_MAX_FAULT_SECONDS:g}], got {seconds}")
        if not 0 <= rate <= 1:
            raise ValueError(f"rate must be in [0, 1], got {rate}")
        with self._lock:
            self._fault = _Fault(kind, time.monotonic() + seconds, rate, retry_after)
        self._reset_live(rate)

    def clear(self) -> None:
        """End the current fault now (dark connections are reset)."""
        with self._lock:
            self._fault = None
            held, self._held = self._held, []
        for _, sock in held:
            _reset(sock)

    def reset_connections(self, rate: float = 1.0) -> int:
        """Reset each open forwarded connection with probability ``rate``; how many were."""
        return self._reset_live(rate)

    @property
    def active(self) -> str | None:
        """The fault in force now, if any."""
        fault = self._current()
        return fault.kind if fault else None

    # ------------------------------------------------------------------ internals
    def _current(self) -> _Fault | None:
        with self._lock:
            if self._fault is not None and time.monotonic() >= self._fault.until:
                self._fault = None
            return self._fault

    def _reset_live(self, rate: float) -> int:
        with self._lock:
            victims = [p for p in self._live.values() if self._rng.random() < rate]
            for pair in victims:
                del self._live[pair.client]
        for pair in victims:
            pair.reset()
        return len(victims)

    def _serve(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            self._release_held()
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            self.counts["connections"] += 1
            fault = self._current()
            with self._lock:
                hit = fault is not None and self._rng.random() < fault.rate
            if not hit:
                self._forward(client)
                continue
            assert fault is not None
            self.counts[fault.kind] += 1
            if fault.kind == "reset":
                _reset(client)
            elif fault.kind == "dark":
                with self._lock:
                    self._held.append((fault.until, client))
            else:
                threading.Thread(
                    target=self._slowdown, args=(client, fault.retry_after), daemon=True
                ).start()

    def _release_held(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [s for until, s in self._held if until <= now]
            self._held = [(u, s) for u, s in self._held if u > now]
        for sock in due:
            _reset(sock)

    def _slowdown(self, client: socket.socket, retry_after: float | None) -> None:
        """Read the request head, answer 503 SlowDown (no body for HEAD), close."""
        try:
            client.settimeout(5.0)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < _HEAD_LIMIT:
                chunk = client.recv(4096)
                if not chunk:
                    break
                head += chunk
            method = head.split(b" ", 1)[0].upper()
            headers = [
                b"HTTP/1.1 503 Slow Down",
                b"Content-Type: application/xml",
                f"Content-Length: {len(_SLOWDOWN_BODY)}".encode(),
                b"x-amz-request-id: faultproxy",
                b"Connection: close",
            ]
            if retry_after is not None:
                headers.append(f"Retry-After: {retry_after:g}".encode())
            body = b"" if method == b"HEAD" else _SLOWDOWN_BODY
            client.sendall(b"\r\n".join(headers) + b"\r\n\r\n" + body)
            client.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                client.close()

    def _forward(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=5.0)
        except OSError:
            _reset(client)  # upstream down: the client sees what it would see directly
            self.counts["upstream_down"] += 1
            return
        upstream.settimeout(None)
        self.counts["forwarded"] += 1
        pair = _Pair(client, upstream)
        with self._lock:
            self._live[client] = pair
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(pair, src, dst), daemon=True).start()

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        if pair.finish():
            with self._lock:
                self._live.pop(pair.client, None)
            pair.close()


class _Pair:
    """A forwarded connection: closed when both directions are done, or reset at once."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client, self.upstream = client, upstream
        self._done = 0
        self._lock = threading.Lock()

    def finish(self) -> bool:
        with self._lock:
            self._done += 1
            return self._done == 2

    def close(self) -> None:
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.close()

    def reset(self) -> None:
        # Shutting down wakes the pump threads blocked in recv (closing alone does not).
        with contextlib.suppress(OSError):
            self.client.shutdown(socket.SHUT_RD)
        with contextlib.suppress(OSError):
            self.upstream.shutdown(socket.SHUT_RDWR)
        _reset(self.client)
