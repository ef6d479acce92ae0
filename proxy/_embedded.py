"""A Redis-protocol registry server inside this process, for a machine with no Redis.

`rallypoint registry` runs one in the foreground (`serve_registry`); tests start one in the background
(`EmbeddedRegistryServer`). It is fakeredis' TCP server: in memory only (a restart starts empty, like
a Redis without persistence) and without authentication, so anyone who can reach the port can read the
group keys. Keep it on loopback, or on a network you trust.

    >>> from rallypoint.proxy._registry import RedisRegistry
    >>> with EmbeddedRegistryServer() as server:
    ...     reg = RedisRegistry(server.url)
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from fakeredis import TcpFakeServer

from rallypoint.errors import ConfigError, RegistryError

__all__ = ["EmbeddedRegistryServer", "serve_registry"]

logger = logging.getLogger(__name__)

# How often the accept loop looks at its stop flag: stop() returns within about this long.
_POLL_INTERVAL = 0.05
# How long stop() waits for connection handlers to finish before leaving them (daemon threads) behind.
_HANDLER_GRACE = 0.5


class _Server(TcpFakeServer):
    """TcpFakeServer that tracks its connections so stop() can close them all, promptly and boundedly."""

    # We join handler threads ourselves, with a deadline; socketserver's own join has none.
    block_on_close = False

    def __init__(self, address: tuple[str, int]) -> None:
        if ":" in address[0]:  # an IPv6 literal such as "::1"; socketserver defaults to IPv4
            self.address_family = socket.AF_INET6
        super().__init__(address)
        # TcpFakeServer makes handlers non-daemon; a client stuck in a blocking command must not keep
        # the interpreter alive after stop().
        self.daemon_threads = True
        self._conn_lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        # Replies are written one command at a time; with Nagle's algorithm a pipeline's later replies
        # wait for the client's delayed ACK, costing ~40 ms per MULTI/EXEC round trip.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._conn_lock:
            self._conns[request] = threading.current_thread()
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._conn_lock:
                self._conns.pop(request, None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints tracebacks to stderr; a library logs instead.
        logger.debug("embedded registry: error serving %s", client_address, exc_info=True)

    def close_connections(self, timeout: float) -> int:
        """Wait up to `timeout` for handlers to exit, forcing their sockets shut; returns how many linger."""
        # Handlers poll the shutdown flag every 10 ms; one still running after half the grace period is
        # blocked inside a command, so shut its socket to wake it.
        if self._join_handlers(time.monotonic() + timeout / 2) == 0:
            return 0
        with self._conn_lock:
            socks = list(self._conns)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return self._join_handlers(time.monotonic() + timeout / 2)

    def _join_handlers(self, deadline: float) -> int:
        while True:
            with self._conn_lock:
                threads = list(self._conns.values())
            if not threads or time.monotonic() >= deadline:
                return len(threads)
            threads[0].join(timeout=max(0.0, min(0.05, deadline - time.monotonic())))


class EmbeddedRegistryServer:
    """A Redis-protocol server on `host`:`port` (0 picks a free port), served from a daemon thread.

    `start()` returns the URL to give to `RedisRegistry`; `stop()` closes the listening socket and every
    client connection. A stopped server can be started again, on the same port, with empty data.

        >>> server = EmbeddedRegistryServer()
        >>> url = server.start()          # "redis://127.0.0.1:PORT"
        >>> server.stop()
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigError(f"port must be an integer in 0..65535, not {port!r}")
        self.host = host
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        """The port served on (the one picked when started with port 0; kept for a restart)."""
        return self._port

    @property
    def url(self) -> str:
        """``redis://host:port`` of this server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{host}:{self._port}"

    @property
    def running(self) -> bool:
        """True between start() and stop()."""
        return self._server is not None

    def start(self) -> str:
        """Bind and serve in a background thread; returns the URL. A no-op if already running."""
        with self._lock:
            if self._server is not None:
                return self.url
            try:
                server = _Server((self.host, self._port))
            except OSError as exc:
                raise RegistryError(
                    f"embedded registry cannot listen on {self.host}:{self._port}: {exc}"
                ) from exc
            self._port = server.server_address[1]
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": _POLL_INTERVAL},
                name=f"rallypoint-registry-{self._port}",
                daemon=True,
            )
            thread.start()
            self._server, self._thread = server, thread
        logger.info("embedded registry listening at %s", self.url)
        return self.url

    def stop(self) -> None:
        """Stop serving, close the listening socket and all connections. Idempotent; returns within ~0.5 s."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
            if server is None:
                return
            # TcpFakeServer.shutdown() sets the handlers' stop flag, then waits for serve_forever() to
            # return; it is running (start() started it), so that wait is at most one poll interval.
            server.shutdown()
            server.server_close()  # closes the listening socket: the port is free from here on
            if thread is not None:
                thread.join(timeout=_HANDLER_GRACE)
            lingering = server.close_connections(_HANDLER_GRACE)
        if lingering:
            logger.warning("embedded registry %s: %d connection handler(s) did not stop", self.url, lingering)
        logger.info("embedded registry at %s stopped", self.url)

    def __enter__(self) -> EmbeddedRegistryServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"EmbeddedRegistryServer({self.url!r}, {state})"


def serve_registry(
    host: str = "127.0.0.1",
    port: int = 6379,
    *,
    ready_callback: Callable[[str], object] | None = None,
    stop_event: threading.Event | None = None,
) -> None:
    """Serve an embedded registry in the foreground until `stop_event` is set or KeyboardInterrupt.

    `ready_callback(url)` is called once the port is listening. Signal handling belongs to the caller
    (the CLI turns SIGTERM into setting `stop_event` or into KeyboardInterrupt); the server is always
    stopped on the way out.

        >>> stop = threading.Event()
        >>> threading.Timer(5.0, stop.set).start()
        >>> serve_registry("127.0.0.1", 0, ready_callback=print, stop_event=stop)
    """
    server = EmbeddedRegistryServer(host, port)
    url = server.start()
    try:
        if ready_callback is not None:
            ready_callback(url)
        event = stop_event if stop_event is not None else threading.Event()
        # A timed wait keeps the main thread responsive to KeyboardInterrupt on every platform.
        while not event.wait(0.5):
            pass
    finally:
        server.stop()
