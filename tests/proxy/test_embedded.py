"""The embedded registry server: lifecycle, port handling, and redis-py compatibility for what we use."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from rallypoint.errors import ConfigError, RegistryError
from rallypoint.proxy._embedded import EmbeddedRegistryServer, serve_registry
from rallypoint.proxy._registry import PeerRecord, RedisRegistry

pytestmark = pytest.mark.timeout(20)

NO_RETRY = Retry(NoBackoff(), 0)  # redis-py would otherwise retry a dead server for seconds


@pytest.fixture
def server() -> Iterator[EmbeddedRegistryServer]:
    srv = EmbeddedRegistryServer()
    srv.start()
    yield srv
    srv.stop()


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as any server (and redis) would
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def nothing_listens(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_start_returns_url_and_port() -> None:
    srv = EmbeddedRegistryServer()
    assert not srv.running
    url = srv.start()
    try:
        assert srv.running and srv.port > 0
        assert url == srv.url == f"redis://127.0.0.1:{srv.port}"
        assert srv.start() == url  # already running: same server
        assert redis.Redis.from_url(url).ping() is True
    finally:
        srv.stop()


def test_context_manager() -> None:
    with EmbeddedRegistryServer() as srv:
        port = srv.port
        assert redis.Redis(port=port).ping()
    assert not srv.running
    assert nothing_listens(port)


@pytest.mark.parametrize("protocol", [2, 3])
def test_redis_py_commands_we_use(server: EmbeddedRegistryServer, protocol: int) -> None:
    c = redis.Redis.from_url(server.url, protocol=protocol, socket_timeout=2)
    assert c.set("k", "v1", px=300, nx=True) is True
    assert c.set("k", "v2", px=300, nx=True) is None  # NX: the first writer wins
    assert c.set("k", "v3", px=300, xx=True) is True
    assert c.set("absent", "v", px=300, xx=True) is None
    assert 0 < c.pttl("k") <= 300
    assert c.sadd("s", "a", "b", "c") == 3
    assert c.smembers("s") == {b"a", b"b", b"c"}
    assert c.srem("s", "b", "zz") == 1
    assert c.mget(["k", "absent"]) == [b"v3", None]
    pipe = c.pipeline(transaction=True)
    pipe.set("key", b"\x00" * 32, nx=True)
    pipe.get("key")
    assert pipe.execute() == [True, b"\x00" * 32]
    pipe = c.pipeline(transaction=False)
    pipe.smembers("s")
    pipe.delete("s")
    assert pipe.execute() == [{b"a", b"c"}, 1]
    deadline = time.monotonic() + 3
    while c.get("k") is not None:  # PX expiry on the server's clock
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_watch_aborts_on_concurrent_write(server: EmbeddedRegistryServer) -> None:
    c = redis.Redis.from_url(server.url, protocol=2)
    other = redis.Redis.from_url(server.url, protocol=2)
    with c.pipeline(transaction=True) as pipe:
        pipe.watch("w")
        assert pipe.mget(["w"]) == [None]
        other.set("w", "changed")
        pipe.multi()
        pipe.srem("s", "x")
        with pytest.raises(redis.WatchError):
            pipe.execute()


def test_registry_round_trips_are_fast(server: EmbeddedRegistryServer) -> None:
    """No Nagle stall: a MULTI/EXEC pipeline is one quick round trip, not ~40 ms."""
    reg = RedisRegistry(server.url)
    record = PeerRecord.new("w", "worker", "tcp://127.0.0.1:1")
    reg.register("g", record, ttl=10)  # warm the connection
    start = time.perf_counter()
    for _ in range(20):
        reg.refresh("g", record, ttl=10)
    assert (time.perf_counter() - start) / 20 < 0.02


def test_stop_is_idempotent_prompt_and_frees_the_port(server: EmbeddedRegistryServer) -> None:
    port = server.port
    idle = redis.Redis(port=port, socket_timeout=2, retry=NO_RETRY)
    idle.ping()  # an open client connection must not hold stop() up
    start = time.monotonic()
    server.stop()
    assert time.monotonic() - start < 0.5
    server.stop()
    assert not server.running
    assert nothing_listens(port)
    assert port_is_free(port)
    with pytest.raises(redis.ConnectionError):
        idle.ping()


def test_stop_does_not_wait_for_a_blocked_client(
    server: EmbeddedRegistryServer, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = redis.Redis(port=server.port, socket_timeout=10, retry=NO_RETRY)
    outcome: list[object] = []

    def block() -> None:
        try:
            outcome.append(blocked.blpop(["never"], timeout=10))
        except redis.RedisError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=block, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while len(server._server._conns) < 1:  # type: ignore[union-attr]  # the BLPOP connection is in
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.05)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="rallypoint.proxy._embedded"):
        server.stop()
    assert time.monotonic() - start < 1.0
    thread.join(timeout=5)
    assert outcome and isinstance(outcome[0], redis.ConnectionError)  # the client is told, not left hanging


def test_restart_on_same_port_starts_empty(server: EmbeddedRegistryServer) -> None:
    reg = RedisRegistry(server.url, timeout=1.0)
    record = PeerRecord.new("w", "worker", "tcp://127.0.0.1:1")
    reg.register("g", record, ttl=10)
    port = server.port
    server.stop()
    with pytest.raises(RegistryError):
        reg.members("g")
    assert server.start() == f"redis://127.0.0.1:{port}"
    assert reg.members("g") == {}  # in memory only, like a Redis without persistence
    assert reg.refresh("g", record, ttl=10) is False
    assert reg.members("g") == {"w": record}


def test_port_in_use_is_a_registry_error(server: EmbeddedRegistryServer) -> None:
    with pytest.raises(RegistryError, match=str(server.port)):
        EmbeddedRegistryServer(port=server.port).start()


def test_bad_port_is_a_config_error() -> None:
    for port in (-1, 70000, "6379", True):
        with pytest.raises(ConfigError):
            EmbeddedRegistryServer(port=port)  # type: ignore[arg-type]


def test_serve_registry_foreground_until_stopped() -> None:
    stop = threading.Event()
    ready: list[str] = []
    done = threading.Event()

    def run() -> None:
        try:
            serve_registry("127.0.0.1", 0, ready_callback=ready.append, stop_event=stop)
        finally:
            done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not ready:
        assert time.monotonic() < deadline and not done.is_set()
        time.sleep(0.01)
    url = ready[0]
    reg = RedisRegistry(url, timeout=1.0)
    reg.register("g", PeerRecord.new("w", "worker", "tcp://127.0.0.1:1"), ttl=10)
    assert set(reg.members("g")) == {"w"}
    stop.set()
    assert done.wait(timeout=2.0)
    assert nothing_listens(int(url.rsplit(":", 1)[1]))


def test_serve_registry_stops_server_when_callback_fails() -> None:
    ports: list[int] = []

    def boom(url: str) -> None:
        ports.append(int(url.rsplit(":", 1)[1]))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        serve_registry("127.0.0.1", 0, ready_callback=boom, stop_event=threading.Event())
    assert nothing_listens(ports[0])


# ------------------------------------------------------------------ the conftest fixtures themselves


def test_fixture_server_restarts_on_same_port(redis_server_factory: Callable[..., Any]) -> None:
    for embedded in (False, True):
        srv = redis_server_factory(embedded=embedded)
        port = srv.port
        client = redis.Redis.from_url(srv.url, socket_timeout=1)
        client.set("x", "1")
        srv.stop()
        assert nothing_listens(port)
        srv.start()
        assert srv.port == port
        assert client.get("x") is None
        srv.kill()
        assert nothing_listens(port)
        srv.start()
        assert client.ping()


def test_ipv6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with EmbeddedRegistryServer("::1") as srv:
        assert srv.url == f"redis://[::1]:{srv.port}"
        reg = RedisRegistry(srv.url, timeout=1.0)
        reg.register("g", PeerRecord.new("w", "worker", "tcp://[::1]:1"), ttl=10)
        assert set(reg.members("g")) == {"w"}
        assert reg.host == "::1"
