"""The trust root the registry does not hold: the group secret, the key derived from it, signed member records.

The first part tests `rallypoint.proxy._trust` with plain function calls. The second runs proxies against a
real redis-server with `secret=`; the tests marked xfail need the proxy wiring (Proxy(secret=...), records
signed and checked by the membership) and say what they expect of it.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from proxy_helpers import WatchedRegistry, make_proxy, new_group

from rallypoint import SessionMessage
from rallypoint.errors import ConfigError, JoinTimeout
from rallypoint.proxy._registry import GROUP_KEY_BYTES, InMemoryRegistry, PeerRecord
from rallypoint.proxy._trust import (
    MIN_SECRET_BYTES,
    SECRET_ENV,
    derive_group_key,
    key_id,
    record_problem,
    secret_from,
    sign_record,
    signer_id,
    split_trusted,
    verify_record,
)

pytestmark = pytest.mark.timeout(30)

SECRET = b"s" * 32
OTHER_SECRET = b"o" * 32
NS = "rallypoint"


def record(name: str = "worker_1", port: int = 5555) -> PeerRecord:
    return PeerRecord.new(name, "worker", f"tcp://127.0.0.1:{port}")


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(interval)


# ------------------------------------------------------------------------------------------ secret_from


def test_secret_from_argument_environment_or_none() -> None:
    env = {SECRET_ENV: "from-the-environment-0123"}
    assert secret_from("from-the-argument-012345", env) == b"from-the-argument-012345"  # the argument wins
    assert secret_from(b"\x00\xff" * 8, env) == b"\x00\xff" * 8  # bytes taken as they are
    assert secret_from(None, env) == b"from-the-environment-0123"
    assert secret_from(None, {}) is None  # no secret: the registry is the trust root
    assert secret_from(None, {"OTHER": "x" * 40}) is None


def test_secret_is_taken_verbatim() -> None:
    assert secret_from(" padded secret 0123 \n", {}) == b" padded secret 0123 \n"


@pytest.mark.parametrize("value", ["", b""])
def test_an_empty_secret_is_a_config_error(value: str | bytes) -> None:
    with pytest.raises(ConfigError, match="empty"):
        secret_from(value, {})


def test_an_empty_environment_secret_is_a_config_error_not_no_secret() -> None:
    with pytest.raises(ConfigError, match="empty") as caught:
        secret_from(None, {SECRET_ENV: ""})
    assert SECRET_ENV in str(caught.value)


def test_a_short_secret_is_a_config_error_that_says_how_long() -> None:
    short = "x" * (MIN_SECRET_BYTES - 1)
    for value, env in ((short, {}), (None, {SECRET_ENV: short}), (short.encode(), {})):
        with pytest.raises(ConfigError, match=f"at least {MIN_SECRET_BYTES}") as caught:
            secret_from(value, env)
        assert short not in str(caught.value)  # the secret itself is never echoed
    assert secret_from("x" * MIN_SECRET_BYTES, {}) == b"x" * MIN_SECRET_BYTES


def test_the_minimum_counts_utf8_bytes() -> None:
    assert secret_from("é" * (MIN_SECRET_BYTES // 2), {}) == ("é" * (MIN_SECRET_BYTES // 2)).encode()
    with pytest.raises(ConfigError):
        secret_from("é" * (MIN_SECRET_BYTES // 2 - 1), {})


def test_a_secret_of_another_type_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="str or bytes"):
        secret_from(12345678901234567890, {})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not valid text"):
        secret_from("\ud800" * 20, {})


# ----------------------------------------------------------------------------------- keys, key ids


def test_derive_group_key_is_deterministic_and_per_group_and_secret() -> None:
    key = derive_group_key(SECRET, "g")
    assert isinstance(key, bytes) and len(key) == GROUP_KEY_BYTES
    assert derive_group_key(SECRET, "g") == key
    assert derive_group_key(bytearray(SECRET), "g") == key
    assert derive_group_key(SECRET, "h") != key
    assert derive_group_key(OTHER_SECRET, "g") != key
    assert key != SECRET and SECRET not in key


def test_derive_group_key_takes_long_secrets() -> None:
    long_a, long_b = b"a" * 64 + b"1", b"a" * 64 + b"2"  # past BLAKE2b's 64-byte key limit, differing at the end
    assert derive_group_key(long_a, "g") != derive_group_key(long_b, "g")


def test_derive_group_key_rejects_bad_input() -> None:
    with pytest.raises(ConfigError, match=f"at least {MIN_SECRET_BYTES}"):
        derive_group_key(b"short", "g")
    with pytest.raises(ConfigError):
        derive_group_key(SECRET, "")
    with pytest.raises(ConfigError):
        derive_group_key("a str secret of length", "g")  # type: ignore[arg-type]


def test_key_id_is_a_short_stable_fingerprint() -> None:
    key = derive_group_key(SECRET, "g")
    kid = key_id(key)
    assert len(kid) == 8 and int(kid, 16) >= 0
    assert key_id(key) == kid
    assert key_id(derive_group_key(OTHER_SECRET, "g")) != kid
    assert kid not in key.hex()  # not a piece of the key


# ------------------------------------------------------------------------------- signed records


def test_sign_then_verify() -> None:
    key = derive_group_key(SECRET, "g")
    plain = record()
    signed = sign_record(plain, key)
    assert plain.signature == ""  # records are immutable: signing returns a new one
    assert dataclasses.replace(signed, signature="") == plain
    assert verify_record(signed, key)
    assert signer_id(signed) == key_id(key)
    assert not verify_record(plain, key)
    assert signer_id(plain) is None


def test_a_signed_record_verifies_after_the_registry_round_trip() -> None:
    key = derive_group_key(SECRET, "g")
    signed = sign_record(dataclasses.replace(record(), started_at=1700000000.123456789), key)
    assert verify_record(PeerRecord.from_json(signed.to_json()), key)
    reg = InMemoryRegistry()
    reg.register("g", signed, ttl=10)
    assert verify_record(reg.members("g")["worker_1"], key)


def test_an_integral_started_at_signs_the_same_as_int_or_float() -> None:
    key = derive_group_key(SECRET, "g")
    as_int = sign_record(dataclasses.replace(record(), started_at=5), key)
    as_float = dataclasses.replace(as_int, started_at=5.0)
    assert verify_record(as_float, key)
    assert verify_record(PeerRecord.from_json(as_int.to_json()), key)


@pytest.mark.parametrize(
    "change",
    [
        {"name": "worker_2"},
        {"component_type": "master"},
        {"address": "tcp://10.6.6.6:5555"},  # redirected to someone else's socket
        {"address": "tcp://127.0.0.1:5555#curve=x"},  # same place, another CURVE key
        {"incarnation": "0" * 16},
        {"pid": 4242},
        {"host": "elsewhere"},
        {"started_at": 1.0},
    ],
    ids=lambda change: next(iter(change)),
)
def test_changing_any_field_breaks_the_signature(change: dict[str, Any]) -> None:
    key = derive_group_key(SECRET, "g")
    signed = sign_record(record(), key)
    tampered = dataclasses.replace(signed, **change)
    assert not verify_record(tampered, key)
    assert "altered or forged" in (record_problem(tampered, key) or "")
    via_json = json.loads(signed.to_json()) | change  # the same change made to the JSON in the registry
    assert not verify_record(PeerRecord.from_json(json.dumps(via_json)), key)


def test_changing_the_signature_breaks_it() -> None:
    key = derive_group_key(SECRET, "g")
    signed = sign_record(record(), key)
    sig = signed.signature
    flipped = sig[:-1] + ("0" if sig[-1] != "0" else "1")
    for bad in (flipped, sig[:-2], sig + "00", "", "0" * 72, key_id(key) + "00" * 32, sig[8:] + sig[:8]):
        assert not verify_record(dataclasses.replace(signed, signature=bad), key), bad
    with pytest.raises(ConfigError, match="hex"):  # not even hex: not a record
        dataclasses.replace(signed, signature="zz" * 36)


def test_a_record_signed_under_another_groups_key_does_not_verify() -> None:
    signed = sign_record(record(), derive_group_key(SECRET, "group-a"))
    key_b = derive_group_key(SECRET, "group-b")  # same secret, another group
    assert not verify_record(signed, key_b)
    assert record_problem(signed, key_b) is not None


def test_a_record_signed_under_another_secret_is_named_as_such() -> None:
    ours, theirs = derive_group_key(SECRET, "g"), derive_group_key(OTHER_SECRET, "g")
    signed = sign_record(record(), theirs)
    problem = record_problem(signed, ours)
    assert problem is not None
    assert "different group secret" in problem
    assert key_id(ours) in problem and key_id(theirs) in problem


def test_record_problem_without_a_secret() -> None:
    assert record_problem(record(), None) is None  # no secret: unsigned records are taken, as before
    signed = sign_record(record(), derive_group_key(SECRET, "g"))
    problem = record_problem(signed, None)
    assert problem is not None and SECRET_ENV in problem and "secret" in problem


def test_record_problem_with_a_secret() -> None:
    key = derive_group_key(SECRET, "g")
    assert record_problem(sign_record(record(), key), key) is None
    problem = record_problem(record(), key)
    assert problem is not None and "unsigned" in problem and key_id(key) in problem


def test_sign_and_verify_need_a_full_key() -> None:
    with pytest.raises(ConfigError):
        sign_record(record(), b"short")
    with pytest.raises(ConfigError):
        verify_record(dataclasses.replace(record(), signature="00" * 36), b"short")


def test_split_trusted() -> None:
    key = derive_group_key(SECRET, "g")
    good = sign_record(record("good"), key)
    forged = dataclasses.replace(good, name="forged")
    foreign = sign_record(record("foreign"), derive_group_key(OTHER_SECRET, "g"))
    unsigned = record("unsigned")
    records = {r.name: r for r in (good, forged, foreign, unsigned)}
    taken, refused = split_trusted(records, key)
    assert taken == {"good": good}
    assert sorted(refused) == ["foreign", "forged", "unsigned"]
    assert "different group secret" in refused["foreign"]
    assert "unsigned" in refused["unsigned"]
    taken, refused = split_trusted(records, None)
    assert taken == {"unsigned": unsigned} and sorted(refused) == ["foreign", "forged", "good"]


# ---------------------------------------------------------------------------- proxies with a secret

@pytest.fixture
def secret_pair(registry_url: str) -> Iterator[tuple[Any, Any, str, WatchedRegistry]]:
    """A master and a worker sharing SECRET in a fresh group: (master, worker, group, the master's registry)."""
    group = new_group()
    watched = WatchedRegistry(registry_url)  # counts the master's registry reads
    master = make_proxy(watched, group, "master", "master", secret=SECRET)  # type: ignore[arg-type]
    try:
        worker = make_proxy(registry_url, group, "worker", "worker_001", expected_peers={"master": 1},
                            secret=SECRET)
    except BaseException:
        master.close()
        watched.close()
        raise
    yield master, worker, group, watched
    worker.close()
    master.close()
    watched.close()


def _raw_record(raw: redis.Redis, group: str, name: str) -> PeerRecord:
    value = raw.get(f"{NS}:{group}:peer:{name}")
    assert value is not None
    return PeerRecord.from_json(value)


def _round_trip(master: Any, worker: Any, payload: int) -> int:
    [session] = master.isend(SessionMessage(tag="echo", destination=worker.name, payload=payload))
    incoming = worker.receive_once(timeout=5)
    worker.reply(incoming, payload=incoming.payload + 1)
    [reply] = master.receive_by_id([session], timeout=5)
    return int(reply.payload)


def test_with_a_secret_the_registry_holds_no_key_and_records_are_signed(secret_pair, registry_url) -> None:
    master, worker, group, _ = secret_pair
    raw = redis.Redis.from_url(registry_url)
    assert raw.get(f"{NS}:{group}:key") is None  # nothing secret is written to the registry
    key = derive_group_key(SECRET, group)
    for name in (master.name, worker.name):
        assert verify_record(_raw_record(raw, group, name), key)
    assert _round_trip(master, worker, 1) == 2


def test_the_secret_comes_from_the_environment_and_the_argument_wins(registry_url, monkeypatch) -> None:
    monkeypatch.setenv(SECRET_ENV, OTHER_SECRET.decode())
    group = new_group()
    raw = redis.Redis.from_url(registry_url)
    with make_proxy(registry_url, group, "master", "master") as master, \
            make_proxy(registry_url, group, "worker", "w1", expected_peers={"master": 1}) as worker:
        assert verify_record(_raw_record(raw, group, "master"), derive_group_key(OTHER_SECRET, group))
        assert _round_trip(master, worker, 10) == 11
    group = new_group()
    with make_proxy(registry_url, group, "master", "master", secret=SECRET):
        assert verify_record(_raw_record(raw, group, "master"), derive_group_key(SECRET, group))
        assert raw.get(f"{NS}:{group}:key") is None


def test_a_registry_writer_can_neither_add_nor_redirect_a_member(secret_pair, registry_url) -> None:
    """Fake members (unsigned, or signed with a made-up key) are not listed; a real member's record rewritten
    to point at the writer's socket is ignored: traffic keeps going to the real one, none to the writer."""
    master, worker, group, registry = secret_pair
    raw = redis.Redis.from_url(registry_url)
    trap = socket.create_server(("127.0.0.1", 0))  # the writer's socket
    trap.setblocking(False)
    trap_address = f"tcp://127.0.0.1:{trap.getsockname()[1]}"
    real = _raw_record(raw, group, worker.name)
    redirected = dataclasses.replace(real, address=trap_address)  # keeps the real signature: now wrong
    fakes = [
        PeerRecord.new("worker_fake", "worker", trap_address),
        sign_record(PeerRecord.new("worker_forged", "worker", trap_address), b"k" * GROUP_KEY_BYTES),
    ]
    stop = threading.Event()

    def write() -> None:  # keeps overwriting, so the worker's own lease refresh cannot undo it for long
        while not stop.is_set():
            pipe = raw.pipeline()
            pipe.set(f"{NS}:{group}:peer:{worker.name}", redirected.to_json(), px=5000)
            for fake in fakes:
                pipe.set(f"{NS}:{group}:peer:{fake.name}", fake.to_json(), px=5000)
                pipe.sadd(f"{NS}:{group}:members", fake.name)
            pipe.incr(f"{NS}:{group}:version")  # so that every member reads the list it wrote
            pipe.execute()
            stop.wait(0.01)

    master.refresh_peers()  # the master has read (and trusts) the worker's genuine record before the tampering
    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        reads = registry.member_reads
        master.refresh_peers()
        wait_until(lambda: registry.member_reads >= reads + 3)  # the master's keeper has read the tampering
        for n in range(5):
            assert _round_trip(master, worker, n) == n + 1
        master.refresh_peers()
        assert master.peers.get("worker") == [worker.name]
    finally:
        stop.set()
        writer.join(5)
    with pytest.raises(BlockingIOError):
        trap.accept()  # nobody connected to the writer's socket
    trap.close()


def test_two_secrets_in_one_group_the_wrong_one_gets_a_clear_error_at_join(registry_url) -> None:
    group = new_group()
    with make_proxy(registry_url, group, "master", "master", secret=SECRET):
        started = time.monotonic()
        with pytest.raises(ConfigError, match="secret") as caught:
            make_proxy(registry_url, group, "worker", "w1", expected_peers={"master": 1}, secret=OTHER_SECRET,
                       join_timeout=20)
        assert not isinstance(caught.value, JoinTimeout)
        message = str(caught.value)
        assert "master" in message
        assert key_id(derive_group_key(SECRET, group)) in message
        assert key_id(derive_group_key(OTHER_SECRET, group)) in message
        assert time.monotonic() - started < 20  # an error, not the join deadline running out


def test_a_member_without_the_secret_is_told_to_set_it(registry_url, monkeypatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    group = new_group()
    with make_proxy(registry_url, group, "master", "master", secret=SECRET):
        with pytest.raises(ConfigError, match=SECRET_ENV):
            make_proxy(registry_url, group, "worker", "w1", expected_peers={"master": 1}, join_timeout=20)


def test_a_member_with_a_secret_refuses_an_unsigned_group(registry_url, monkeypatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    group = new_group()
    with make_proxy(registry_url, group, "master", "master"):
        with pytest.raises(ConfigError, match="unsigned"):
            make_proxy(registry_url, group, "worker", "w1", expected_peers={"master": 1}, secret=SECRET,
                       join_timeout=20)


def test_without_a_secret_live_members_renew_the_group_key(pair, registry_url) -> None:
    """No secret: the key in the registry has a TTL, and the lease keeper keeps pushing it forward."""
    _, _, group = pair
    raw = redis.Redis.from_url(registry_url)
    name = f"{NS}:{group}:key"
    first = raw.pttl(name)
    assert first > 0  # it expires
    wait_until(lambda: raw.pttl(name) > first, timeout=5.0)  # and is renewed while members live
