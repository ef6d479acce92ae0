"""The registry contract, run against every implementation, plus what only a real Redis can show.

The contract tests are parametrized over four backends sharing the same test functions:
``memory`` (InMemoryRegistry), ``fakeredis`` (RedisRegistry on an injected fakeredis client),
``embedded`` (RedisRegistry over TCP to the embedded server) and ``redis`` (a real redis-server).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis

from rallypoint.errors import ConfigError, RegistryError
from rallypoint.proxy._embedded import EmbeddedRegistryServer
from rallypoint.proxy._registry import (
    DEFAULT_URL,
    GROUP_KEY_BYTES,
    GROUP_KEY_TTL,
    InMemoryRegistry,
    PeerRecord,
    RedisRegistry,
    Registry,
    redact_url,
    registry_from,
)

pytestmark = pytest.mark.timeout(20)

NS = "rallypoint"


def rec(name: str = "worker_1", component_type: str = "worker", port: int = 5555) -> PeerRecord:
    return PeerRecord.new(name, component_type, f"tcp://127.0.0.1:{port}")


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> float:
    """Poll `predicate` until true; returns the seconds it took, fails the test past `timeout`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(interval)
    return time.monotonic() - start


# ------------------------------------------------------------------------------------ backends


@dataclass
class Backend:
    """One registry implementation: `make()` opens another client on the same store (another process)."""

    kind: str
    make: Callable[[], Registry]
    plant: Callable[[str, str, str | bytes], None]  # write a raw entry under a member name
    raw: redis.Redis | None = None  # direct access to the store, for the Redis-backed kinds


def _redis_plant(client: redis.Redis) -> Callable[[str, str, str | bytes], None]:
    def plant(group: str, name: str, value: str | bytes) -> None:
        client.set(f"{NS}:{group}:peer:{name}", value, px=60_000)
        client.sadd(f"{NS}:{group}:members", name)

    return plant


@pytest.fixture(params=["memory", "fakeredis", "embedded", "redis"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    opened: list[Registry] = []

    def track(make: Callable[[], Registry]) -> Callable[[], Registry]:
        def wrapped() -> Registry:
            reg = make()
            opened.append(reg)
            return reg

        return wrapped

    if request.param == "memory":
        shared = InMemoryRegistry()
        yield Backend(
            "memory", lambda: shared, lambda g, n, v: shared.put_raw(g, n, v, ttl=60)
        )  # one process: clients share the instance
        shared.close()
        return
    if request.param == "fakeredis":
        server = fakeredis.FakeServer()
        raw = fakeredis.FakeRedis(server=server)
        yield Backend(
            "fakeredis",
            track(lambda: RedisRegistry(client=fakeredis.FakeRedis(server=server))),
            _redis_plant(raw),
            raw,
        )
    elif request.param == "embedded":
        embedded = EmbeddedRegistryServer()
        url = embedded.start()
        raw = redis.Redis.from_url(url)
        yield Backend("embedded", track(lambda: RedisRegistry(url, timeout=2.0)), _redis_plant(raw), raw)
        raw.close()
        embedded.stop()
    else:
        url = request.getfixturevalue("registry_url")
        raw = redis.Redis.from_url(url)
        yield Backend("redis", track(lambda: RedisRegistry(url, timeout=2.0)), _redis_plant(raw), raw)
        raw.close()
    for reg in opened:
        reg.close()


@pytest.fixture
def reg(backend: Backend) -> Registry:
    return backend.make()


# ------------------------------------------------------------------------------------ contract


def test_register_members_unregister(backend: Backend, reg: Registry) -> None:
    a, b = rec("worker_1"), rec("master", "master", 6000)
    assert reg.members("g") == {}
    reg.register("g", a, ttl=10)
    reg.register("g", b, ttl=10)
    other = backend.make()  # another member sees the same thing
    assert other.members("g") == {"worker_1": a, "master": b}
    reg.unregister("g", "worker_1")
    assert other.members("g") == {"master": b}
    reg.unregister("g", "worker_1")  # already gone: no error
    reg.unregister("g", "never_was")


def test_groups_are_separate(reg: Registry) -> None:
    reg.register("g1", rec("a"), ttl=10)
    reg.register("g2", rec("b"), ttl=10)
    assert set(reg.members("g1")) == {"a"}
    assert set(reg.members("g2")) == {"b"}


def test_register_replaces_same_name(reg: Registry) -> None:
    first, second = rec("w"), rec("w", port=7000)
    reg.register("g", first, ttl=10)
    reg.register("g", second, ttl=10)  # a restart under the same name takes over
    assert reg.members("g") == {"w": second}
    assert second.incarnation != first.incarnation


def test_entry_expires_without_unregister(reg: Registry) -> None:
    reg.register("g", rec("short"), ttl=0.3)
    reg.register("g", rec("long"), ttl=30)
    start = time.monotonic()
    assert "short" in reg.members("g")
    wait_until(lambda: "short" not in reg.members("g"), timeout=3.0)
    assert time.monotonic() - start >= 0.25
    assert set(reg.members("g")) == {"long"}


def test_refresh_keeps_alive_then_reports_lapse(reg: Registry) -> None:
    record = rec("w")
    reg.register("g", record, ttl=0.3)
    deadline = time.monotonic() + 0.45  # past the lease: only refreshing keeps it
    while time.monotonic() < deadline:
        assert reg.refresh("g", record, ttl=0.3) is True
        assert "w" in reg.members("g")
        time.sleep(0.05)
    wait_until(lambda: "w" not in reg.members("g"), timeout=3.0)
    assert reg.refresh("g", record, ttl=10) is False  # lapsed: re-registered
    assert reg.members("g") == {"w": record}
    assert reg.refresh("g", record, ttl=10) is True


def test_refresh_after_unregister_recreates(reg: Registry) -> None:
    record = rec("w")
    reg.register("g", record, ttl=10)
    reg.unregister("g", "w")
    assert reg.refresh("g", record, ttl=10) is False
    assert set(reg.members("g")) == {"w"}


def test_group_key_created_once_and_shared(backend: Backend, reg: Registry) -> None:
    with pytest.raises(RegistryError, match="no key"):
        reg.group_key("g", create=False)
    key = reg.group_key("g")
    assert isinstance(key, bytes) and len(key) == GROUP_KEY_BYTES
    assert reg.group_key("g") == key
    assert backend.make().group_key("g", create=False) == key
    assert reg.group_key("other") != key


def test_group_key_concurrent_first_members_agree(backend: Backend) -> None:
    clients = [backend.make() for _ in range(8)]
    barrier = threading.Barrier(len(clients))
    keys: list[bytes] = []
    lock = threading.Lock()

    def join(client: Registry) -> None:
        barrier.wait(timeout=5)
        key = client.group_key("race")
        with lock:
            keys.append(key)

    threads = [threading.Thread(target=join, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(keys) == len(clients)
    assert len(set(keys)) == 1


def test_ensure_group_key_puts_back_and_never_overwrites(reg: Registry) -> None:
    known = b"k" * GROUP_KEY_BYTES
    assert reg.ensure_group_key("g", known) == known  # registry had lost it: restored
    assert reg.group_key("g") == known
    assert reg.ensure_group_key("g", b"x" * GROUP_KEY_BYTES) == known  # someone's key is there: kept
    with pytest.raises(RegistryError):
        reg.ensure_group_key("g", b"short")


def has_key(reg: Registry, group: str) -> bool:
    """Whether `group` has a key, asked without renewing it."""
    try:
        reg.group_key(group, create=False)
    except RegistryError:
        return False
    return True


def test_group_key_expires_unless_renewed(reg: Registry) -> None:
    key = reg.group_key("g", ttl=0.3)
    renewed_until = time.monotonic() + 0.6  # past the first TTL: only renewing keeps it
    while time.monotonic() < renewed_until:
        assert reg.renew_group_key("g", 0.3) is True
        assert reg.group_key("g", create=False) == key
        time.sleep(0.05)
    wait_until(lambda: not has_key(reg, "g"), timeout=3.0)  # nobody renews: gone
    assert reg.renew_group_key("g", 0.3) is False
    assert reg.group_key("g") != key  # the next first member makes a new one
    assert reg.renew_group_key("never-made", 1) is False


def test_a_new_member_renews_the_key_it_finds(reg: Registry) -> None:
    key = reg.group_key("g", ttl=0.3)
    assert reg.group_key("g", ttl=30) == key  # another member joining: same key, now 30 s to live
    started = time.monotonic()
    while time.monotonic() - started < 0.6:  # the first TTL passes; the key stays
        assert reg.group_key("g", create=False) == key
        time.sleep(0.05)


def test_ensure_group_key_restores_with_a_ttl(reg: Registry) -> None:
    known = b"k" * GROUP_KEY_BYTES
    assert reg.ensure_group_key("g", known, ttl=0.3) == known
    wait_until(lambda: not has_key(reg, "g"), timeout=3.0)
    assert reg.ensure_group_key("g", known, ttl=30) == known  # put back after it expired
    assert reg.renew_group_key("g", 30) is True


def test_group_key_ttl_must_be_positive(reg: Registry) -> None:
    for ttl in (0, -1, float("nan"), float("inf"), "1", True):
        with pytest.raises(ConfigError):
            reg.group_key("g", ttl=ttl)  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            reg.renew_group_key("g", ttl)  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            reg.ensure_group_key("g", b"k" * GROUP_KEY_BYTES, ttl=ttl)  # type: ignore[arg-type]


def test_signed_records_round_trip_through_the_registry(backend: Backend, reg: Registry) -> None:
    signed = dataclasses.replace(rec("w"), signature="ab" * 36)
    reg.register("g", signed, ttl=10)
    assert backend.make().members("g") == {"w": signed}


@pytest.mark.parametrize(
    "garbage",
    [
        b"not json at all",
        b"\xff\xfe\x00 binary",
        b"[1, 2, 3]",
        b'"a string"',
        b"{}",
        json.dumps({"name": "bad", "component_type": "w", "address": "tcp://x"}).encode(),  # missing fields
        b"",
    ],
    ids=["text", "binary", "list", "string", "empty-object", "missing-fields", "empty"],
)
def test_malformed_entries_are_skipped_and_counted(
    backend: Backend, reg: Registry, garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    good = rec("good")
    reg.register("g", good, ttl=10)
    backend.plant("g", "bad", garbage)
    with caplog.at_level(logging.WARNING, logger="rallypoint.proxy._registry"):
        assert reg.members("g") == {"good": good}
        assert reg.members("g") == {"good": good}
    assert reg.malformed == 2
    assert any("'bad'" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "change",
    [
        {"pid": "123"},
        {"pid": True},
        {"pid": 1.5},
        {"started_at": "yesterday"},
        {"started_at": float("inf")},
        {"name": 7},
        {"address": ""},
        {"signature": 7},
        {"signature": None},
        {"signature": "not hex"},
        {"signature": "ABCD"},  # hex, but not as written: lowercase only
        {"name": "somebody_else"},  # the entry under "bad" claims another name
    ],
)
def test_entries_with_wrong_field_types_are_skipped(backend: Backend, reg: Registry, change: dict) -> None:
    obj = json.loads(rec("bad").to_json())
    obj.update(change)
    backend.plant("g", "bad", json.dumps(obj))
    assert reg.members("g") == {}
    assert reg.malformed == 1


def test_extra_fields_are_ignored(backend: Backend, reg: Registry) -> None:
    record = rec("newer")
    obj = json.loads(record.to_json()) | {"added_in_v2": [1, 2]}
    backend.plant("g", "newer", json.dumps(obj))
    assert reg.members("g") == {"newer": record}


def test_bad_arguments_are_config_errors(reg: Registry) -> None:
    for group in ("", "a:b", None):
        with pytest.raises(ConfigError):
            reg.register(group, rec(), ttl=1)  # type: ignore[arg-type]
    for ttl in (0, -1, float("nan"), float("inf"), "1", True):
        with pytest.raises(ConfigError):
            reg.register("g", rec(), ttl=ttl)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        reg.unregister("g", "")


def test_close_is_idempotent_and_final(backend: Backend) -> None:
    reg = backend.make()
    reg.register("g", rec(), ttl=10)
    reg.close()
    reg.close()
    with pytest.raises(RegistryError, match="closed"):
        reg.members("g")


def test_registry_protocol_is_satisfied(reg: Registry) -> None:
    assert isinstance(reg, Registry)


# --------------------------------------------------------------------------- in-memory specifics


def test_in_memory_expiry_with_injected_clock() -> None:
    now = [100.0]
    reg = InMemoryRegistry(clock=lambda: now[0])
    record = rec("w")
    reg.register("g", record, ttl=1.0)
    now[0] = 100.999
    assert reg.refresh("g", record, ttl=1.0) is True  # renewed until 101.999
    now[0] = 101.5
    assert "w" in reg.members("g")
    now[0] = 102.0
    assert reg.members("g") == {}
    assert reg.refresh("g", record, ttl=1.0) is False


# ------------------------------------------------------------------------------ Redis specifics


def test_layout_and_lease_live_in_redis(backend: Backend, reg: Registry) -> None:
    if backend.raw is None:
        pytest.skip("in-memory has no Redis layout")
    record = rec("w")
    reg.register("g", record, ttl=5)
    raw = backend.raw
    assert raw.smembers(f"{NS}:g:members") == {b"w"}
    assert PeerRecord.from_json(raw.get(f"{NS}:g:peer:w")) == record
    assert 4000 < raw.pttl(f"{NS}:g:peer:w") <= 5000  # the lease runs on Redis's clock
    key = reg.group_key("g")
    assert raw.get(f"{NS}:g:key") == key
    assert GROUP_KEY_TTL * 1000 - 5000 < raw.pttl(f"{NS}:g:key") <= GROUP_KEY_TTL * 1000  # it expires


def test_expired_names_are_dropped_from_the_index(backend: Backend, reg: Registry) -> None:
    if backend.raw is None:
        pytest.skip("in-memory has no index")
    reg.register("g", rec("gone"), ttl=0.05)
    reg.register("g", rec("stays"), ttl=10)
    wait_until(lambda: backend.raw.get(f"{NS}:g:peer:gone") is None, timeout=3)  # type: ignore[union-attr]
    assert set(reg.members("g")) == {"stays"}
    assert backend.raw.smembers(f"{NS}:g:members") == {b"stays"}


def test_cleanup_spares_a_member_that_came_back(backend: Backend, reg: Registry) -> None:
    """The lazy SREM re-checks under WATCH: a name re-registered since MGET saw it expired stays."""
    if backend.raw is None:
        pytest.skip("in-memory has no index")
    assert isinstance(reg, RedisRegistry)
    record = rec("phoenix")
    reg.register("g", record, ttl=10)  # stands for: expired, seen as such, then re-registered
    reg._drop_expired("g", ["phoenix"])
    assert backend.raw.smembers(f"{NS}:g:members") == {b"phoenix"}
    assert reg.members("g") == {"phoenix": record}


def test_namespace_prefixes_every_key() -> None:
    server = fakeredis.FakeServer()
    raw = fakeredis.FakeRedis(server=server)
    a = RedisRegistry(client=fakeredis.FakeRedis(server=server), namespace="prod")
    b = RedisRegistry(client=fakeredis.FakeRedis(server=server), namespace="test")
    a.register("g", rec("w"), ttl=10)
    a.group_key("g")
    assert b.members("g") == {}
    assert sorted(raw.keys("*")) == [b"prod:g:key", b"prod:g:members", b"prod:g:peer:w", b"prod:g:version"]


# ------------------------------------------------------------------------------------ records, URLs


def test_peer_record_roundtrip_and_new() -> None:
    record = PeerRecord.new("master", "master", "tcp://127.0.0.1:40123")
    assert PeerRecord.from_json(record.to_json()) == record
    assert PeerRecord.from_json(record.to_json().encode()) == record
    assert record.pid > 0 and record.host and len(record.incarnation) == 16
    assert PeerRecord.new("master", "master", "tcp://x").incarnation != record.incarnation


def test_peer_record_constructor_validates() -> None:
    with pytest.raises(ConfigError):
        PeerRecord("", "w", "tcp://x", "inc", 1, "h", 0.0)
    with pytest.raises(ConfigError):
        PeerRecord("n", "w", "tcp://x", "inc", "1", "h", 0.0)  # type: ignore[arg-type]


def test_peer_record_signature_field() -> None:
    record = PeerRecord.new("w", "worker", "tcp://127.0.0.1:1")
    assert record.signature == ""  # unsigned unless the group runs with a secret
    assert [f.name for f in dataclasses.fields(PeerRecord)][-1] == "signature"
    signed = dataclasses.replace(record, signature="0f" * 36)
    assert json.loads(signed.to_json())["signature"] == "0f" * 36
    assert PeerRecord.from_json(signed.to_json()) == signed
    older = json.loads(record.to_json())
    del older["signature"]  # written by a version that had no signatures
    assert PeerRecord.from_json(json.dumps(older)) == record
    with pytest.raises(ConfigError, match="signature"):
        dataclasses.replace(record, signature=b"00")  # type: ignore[arg-type]


def test_from_json_raises_registry_error() -> None:
    for bad in ("nope", "null", '{"name": 1}', b"\x80"):
        with pytest.raises(RegistryError, match="malformed peer record"):
            PeerRecord.from_json(bad)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://alice:s3cret@host/2", "redis://alice:***@host/2"),
        ("rediss://alice@host:6380", "rediss://alice@host:6380"),
        ("redis://host?password=s3cret&db=1", "redis://host?password=***&db=1"),
        ("unix:///tmp/r.sock?db=0&password=s3cret", "unix:///tmp/r.sock?db=0&password=***"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected
    assert "s3cret" not in RedisRegistry(url).redacted_url


def test_registry_from() -> None:
    default = registry_from(None)
    assert isinstance(default, RedisRegistry) and default.redacted_url == DEFAULT_URL
    from_url = registry_from("redis://10.0.0.5:7000/3", timeout=0.5, namespace="x")
    assert isinstance(from_url, RedisRegistry)
    assert (from_url.host, from_url.port, from_url.timeout, from_url.namespace) == (
        "10.0.0.5",
        7000,
        0.5,
        "x",
    )
    pair = registry_from(("127.0.0.1", 6380))
    assert isinstance(pair, RedisRegistry) and pair.redacted_url == "redis://127.0.0.1:6380/0"
    assert registry_from(("::1", 6380)).redacted_url == "redis://[::1]:6380/0"
    mem = InMemoryRegistry()
    assert registry_from(mem) is mem
    for bad in (42, ("host",), ("host", "6379"), "http://host:6379", object()):
        with pytest.raises(ConfigError):
            registry_from(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        RedisRegistry(timeout=0)


# ------------------------------------------------------------------------------ real redis-server


def _assert_fast_registry_error(call: Callable[[], object], limit: float, secret: str | None = None) -> str:
    start = time.monotonic()
    with pytest.raises(RegistryError) as info:
        call()
    elapsed = time.monotonic() - start
    assert elapsed < limit, f"took {elapsed:.2f}s"
    message = str(info.value)
    assert isinstance(info.value.__cause__, redis.RedisError)
    if secret:
        assert secret not in message
        assert secret not in repr(info.value.__cause__)
    return message


def test_registry_down_fails_fast_then_recovers(redis_server_factory: Callable[..., Any]) -> None:
    server = redis_server_factory(password="pw-do-not-leak")
    timeout = 1.0
    reg = RedisRegistry(server.url, timeout=timeout)
    reg.register("g", rec("w"), ttl=10)
    key = reg.group_key("g")

    server.stop()
    message = _assert_fast_registry_error(lambda: reg.members("g"), timeout + 1.0, "pw-do-not-leak")
    assert f"127.0.0.1:{server.port}" in message and ":***@" in message
    _assert_fast_registry_error(lambda: reg.refresh("g", rec("w"), 10), timeout + 1.0, "pw-do-not-leak")

    server.start()
    # The pooled connection died with the old server: the very next call must still work.
    assert reg.members("g") == {}  # no persistence: the restarted registry is empty
    record = rec("w")
    assert reg.refresh("g", record, ttl=10) is False  # we notice we had vanished, and re-register
    assert reg.ensure_group_key("g", key) == key
    assert reg.members("g") == {"w": record}


def test_registry_killed_fails_fast(redis_server: Any) -> None:
    reg = RedisRegistry(redis_server.url, timeout=1.0)
    reg.register("g", rec("w"), ttl=10)
    redis_server.kill()
    _assert_fast_registry_error(lambda: reg.members("g"), 2.0)
    redis_server.start()
    reg.register("g", rec("w"), ttl=10)
    assert set(reg.members("g")) == {"w"}


def test_silent_registry_times_out() -> None:
    """A server that accepts but never answers (hung, or a black hole) costs at most `timeout`."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        reg = RedisRegistry(f"redis://127.0.0.1:{listener.getsockname()[1]}/0", timeout=0.5)
        message = _assert_fast_registry_error(lambda: reg.members("g"), 0.5 + 1.0)
        assert "Timeout" in message
    finally:
        stop.set()
        thread.join(timeout=2)
        for conn in accepted:
            conn.close()
        listener.close()


def test_password(redis_server_factory: Callable[..., Any]) -> None:
    server = redis_server_factory(password="right-pw")
    port = server.port
    good = RedisRegistry(f"redis://:right-pw@127.0.0.1:{port}/0", timeout=1.0)
    good.register("g", rec("w"), ttl=10)
    assert set(good.members("g")) == {"w"}
    wrong = RedisRegistry(f"redis://:wrong-pw@127.0.0.1:{port}/0", timeout=1.0)
    message = _assert_fast_registry_error(lambda: wrong.members("g"), 2.0, "wrong-pw")
    assert "AuthenticationError" in message or "WRONGPASS" in message
    none = RedisRegistry(f"redis://127.0.0.1:{port}/0", timeout=1.0)
    _assert_fast_registry_error(lambda: none.members("g"), 2.0)


def test_acl_user_with_least_privilege(redis_server: Any) -> None:
    if getattr(redis_server, "embedded", False):
        pytest.skip("ACLs need a real redis-server")
    port = redis_server.port
    admin = redis.Redis(host="127.0.0.1", port=port)
    # Exactly what RedisRegistry needs, on its namespace only.
    admin.execute_command(
        "ACL",
        "SETUSER",
        "rp",
        "on",
        ">rp-pw",
        "~rallypoint:*",
        "resetchannels",
        "+set",
        "+get",
        "+incr",
        "+incrby",
        "+mget",
        "+del",
        "+sadd",
        "+srem",
        "+pexpire",
        "+smembers",
        "+pttl",
        "+multi",
        "+exec",
        "+discard",
        "+watch",
        "+unwatch",
        "+ping",
    )
    reg = RedisRegistry(f"redis://rp:rp-pw@127.0.0.1:{port}/0", timeout=1.0)
    record = rec("w")
    reg.register("g", record, ttl=0.2)
    assert reg.refresh("g", record, ttl=0.2) is True
    key = reg.group_key("g")
    assert reg.ensure_group_key("g", key) == key
    assert reg.renew_group_key("g", 30) is True
    wait_until(lambda: reg.members("g") == {}, timeout=3)  # includes the WATCH/MULTI cleanup path
    reg.register("g", record, ttl=10)
    reg.unregister("g", "w")
    assert reg.members("g") == {}
    assert admin.smembers("rallypoint:g:members") == set()
    # What members publish for watchers, and what watchers read (`rallypoint peers`/`monitor`/`metrics`).
    reg.register("g", record, ttl=10)
    assert 0 < reg.lease_left("g")["w"] <= 10
    reg.publish_stats("g", "w", b"{}", ttl=10)
    reg.publish_stats("g", "gone", b"{}", ttl=0.05)
    wait_until(lambda: reg.read_stats("g") == {"w": b"{}"}, timeout=3)  # includes the index cleanup
    assert admin.smembers("rallypoint:g:stats") == {b"w"}

    other_ns = RedisRegistry(f"redis://rp:rp-pw@127.0.0.1:{port}/0", timeout=1.0, namespace="elsewhere")
    message = _assert_fast_registry_error(lambda: other_ns.members("g"), 2.0, "rp-pw")
    assert "NoPermission" in message or "NOPERM" in message
    wrong = RedisRegistry(f"redis://rp:bad-pw@127.0.0.1:{port}/0", timeout=1.0)
    _assert_fast_registry_error(lambda: wrong.members("g"), 2.0, "bad-pw")


def test_db_number_is_honoured(redis_server: Any) -> None:
    port = redis_server.port
    reg = RedisRegistry(f"redis://127.0.0.1:{port}/3", timeout=1.0)
    reg.register("g", rec("w"), ttl=10)
    assert redis.Redis(port=port, db=3).exists("rallypoint:g:peer:w") == 1
    assert redis.Redis(port=port, db=0).exists("rallypoint:g:peer:w") == 0


_SIGKILLED_PEER = textwrap.dedent(
    """
    import os, signal, sys
    from rallypoint.proxy._registry import PeerRecord, RedisRegistry
    reg = RedisRegistry(sys.argv[1], timeout=2.0)
    reg.register("g", PeerRecord.new("doomed", "worker", "tcp://127.0.0.1:1"), ttl=0.3)
    print("registered", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_sigkilled_peer_vanishes_by_itself(registry_url: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _SIGKILLED_PEER, registry_url],
        capture_output=True,
        text=True,
        timeout=15,
        cwd=tmp_path,
    )
    assert proc.returncode == -9, proc.stderr
    assert "registered" in proc.stdout
    reg = RedisRegistry(registry_url, timeout=1.0)
    wait_until(lambda: "doomed" not in reg.members("g"), timeout=3.0)


def test_the_member_list_version_changes_with_the_list_and_only_then(reg: Registry) -> None:
    before = reg.members_version("g")
    reg.register("g", rec("w"), ttl=10)
    joined = reg.members_version("g")
    assert joined != before
    assert reg.refresh("g", rec("w"), ttl=10) is True
    reg.members("g")
    assert reg.members_version("g") == joined  # a renewed lease and a read change nothing
    reg.unregister("g", "w")
    assert reg.members_version("g") not in (before, joined)


def test_a_lapsed_lease_found_by_a_reader_changes_the_version(reg: Registry) -> None:
    reg.register("g", rec("short"), ttl=0.3)
    listed = reg.members_version("g")
    wait_until(lambda: "short" not in reg.members("g"), timeout=3.0)  # the read that finds it expired
    assert reg.members_version("g") != listed  # so every member re-reads the list
