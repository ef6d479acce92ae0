"""Fixtures shared by the whole suite: a real Redis server per test, on a free loopback port.

    redis_server           a running registry server: .url .port .start() .stop() .kill() .embedded
    redis_server_factory   callable(password=None, args=(), embedded=False, bind="127.0.0.1") -> another
                           server, all torn down (bind: the address it listens on, e.g. a veth's)
    registry_url           redis_server.url

Tests run against a real ``redis-server`` when it is on PATH. Without it they fall back to the embedded
registry (fakeredis over TCP) with the same interface, and say so in the summary; under ``CI=true`` a
missing ``redis-server`` is a failure instead, so CI never silently tests less.
``RALLYPOINT_TEST_REDIS=embedded`` forces the fallback. Every server is killed at teardown, and (on Linux)
dies with pytest if pytest dies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from rallypoint.proxy._embedded import EmbeddedRegistryServer

logger = logging.getLogger("rallypoint.tests")

READY_TIMEOUT = 10.0  # seconds for redis-server to answer PING after spawning
STOP_TIMEOUT = 5.0  # seconds for redis-server to exit after SIGTERM before we SIGKILL it

_fallback_users: dict[str, str] = {}  # node id -> why it got the embedded fallback


class RegistryServer(Protocol):
    """What the `redis_server` fixture yields, whichever server backs it."""

    embedded: bool

    @property
    def url(self) -> str: ...
    @property
    def port(self) -> int: ...

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def kill(self) -> None: ...
    def close(self) -> None: ...


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` (loopback by default) that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """preexec_fn: ask Linux to SIGKILL the child when pytest dies, so no redis-server outlives the run."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _server_pid(port: int, password: str | None, host: str = "127.0.0.1") -> int | None:
    """The pid of the redis-server answering on `host:port`, or None if none answers (yet)."""
    client = redis.Redis(
        host=host,
        port=port,
        password=password,
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        return int(client.info("server")["process_id"])
    except (redis.RedisError, KeyError, ValueError):
        return None
    finally:
        client.close()


class RedisServerProcess:
    """A real redis-server child process on a fixed port (of loopback, or `bind`); restartable on it."""

    embedded = False

    def __init__(
        self,
        executable: str,
        port: int,
        workdir: Path,
        *,
        password: str | None = None,
        args: Sequence[str] = (),
        bind: str = "127.0.0.1",
    ) -> None:
        self.executable = executable
        self.bind = bind
        self.port = port
        self.password = password
        self.args = list(args)
        self.workdir = workdir
        self.log_path = workdir / f"redis-{port}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.bind}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Spawn redis-server (again) on this port and wait, under a deadline, until it answers PING."""
        if self._proc is not None and self._proc.poll() is None:
            return
        cmd = [self.executable, "--port", str(self.port), "--bind", self.bind, "--daemonize", "no"]
        cmd += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]  # no persistence
        cmd += ["--requirepass", self.password] if self.password else []
        if self.bind not in ("127.0.0.1", "::1", "localhost") and not self.password:
            cmd += ["--protected-mode", "no"]  # else it refuses clients from a non-loopback address
        cmd += self.args
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        deadline = time.monotonic() + READY_TIMEOUT
        # Ask for the pid: a PONG alone could come from someone else who took the port first.
        while _server_pid(self.port, self.password, self.bind) != self._proc.pid:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited at start:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server on port {self.port} not ready in {READY_TIMEOUT}s")
            time.sleep(0.005)

    def stop(self) -> None:
        """SIGTERM and wait (SIGKILL if it does not exit in time); the port is free afterwards."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL and reap: the server vanishes as in a crash."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait()

    close = kill  # teardown: nothing to persist, so no graceful shutdown needed

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-20:])
        return ""

    def __repr__(self) -> str:
        return f"<redis-server :{self.port} pid={self.pid}>"


class EmbeddedServerHandle:
    """The fallback: an EmbeddedRegistryServer behind the same interface as RedisServerProcess.

    `kill()` is `stop()`: the server lives in this process, so there is nothing to SIGKILL, but clients see
    the same thing (connections drop, port closed, data gone).
    """

    embedded = True
    password = None

    def __init__(self, port: int = 0, bind: str = "127.0.0.1") -> None:
        self._server = EmbeddedRegistryServer(bind, port)

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def url(self) -> str:
        return f"{self._server.url}/0"

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop()

    kill = stop
    close = stop

    def __repr__(self) -> str:
        return f"<embedded registry :{self.port}>"


@pytest.fixture
def redis_server_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., RegistryServer]]:
    """Start registry servers on demand: ``factory(password=None, args=(), embedded=False, bind="127.0.0.1")``.

    A password or extra args need a real redis-server: without one the test is skipped (failed under CI).
    `bind` is the address the server listens on (and its URL names), for example a veth address of a test
    that builds its own network.
    """
    servers: list[RegistryServer] = []
    executable = shutil.which("redis-server")
    forced = os.environ.get("RALLYPOINT_TEST_REDIS", "").lower() == "embedded"
    in_ci = os.environ.get("CI", "").lower() in ("true", "1", "yes")

    def make(
        *, password: str | None = None, args: Sequence[str] = (), embedded: bool = False, bind: str = "127.0.0.1"
    ) -> RegistryServer:
        server: RegistryServer
        use_embedded = embedded or forced or executable is None
        if executable is None and not embedded and in_ci:
            pytest.fail(
                "redis-server is not on PATH; CI must test against a real Redis (apt install redis-server)"
            )
        if use_embedded:
            if password is not None or args:
                pytest.skip(
                    "needs a real redis-server (password/args are not supported by the embedded fallback)"
                )
            if not embedded:
                why = "RALLYPOINT_TEST_REDIS=embedded" if forced else "redis-server is not on PATH"
                _fallback_users[request.node.nodeid] = why
                logger.warning("%s: %s runs against the embedded registry", why, request.node.nodeid)
            server = EmbeddedServerHandle(bind=bind)
            server.start()
        else:
            assert executable is not None
            workdir = tmp_path_factory.mktemp("redis")
            for attempt in range(3):  # the free port may be taken by someone else before redis binds it
                server = RedisServerProcess(
                    executable, free_port(bind), workdir, password=password, args=args, bind=bind
                )
                try:
                    server.start()
                    break
                except RuntimeError:
                    server.kill()
                    if attempt == 2:
                        raise
        servers.append(server)
        return server

    yield make
    for server in reversed(servers):
        server.close()


@pytest.fixture
def redis_server(redis_server_factory: Callable[..., RegistryServer]) -> RegistryServer:
    """A fresh registry server for this test (real redis-server, or the embedded fallback)."""
    return redis_server_factory()


@pytest.fixture
def registry_url(redis_server: RegistryServer) -> str:
    """URL of a fresh registry server for this test."""
    return redis_server.url


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _fallback_users:
        terminalreporter.write_sep("-", "registry fallback")
        reasons = ", ".join(sorted(set(_fallback_users.values())))
        terminalreporter.write_line(
            f"{len(_fallback_users)} test(s) ran against the embedded registry instead of redis-server "
            f"({reasons}); under CI=true a missing redis-server fails instead"
        )
