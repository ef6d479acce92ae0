"""Hostile input and security options, against real ZeroMQ sockets and a real redis-server.

No bytes from the network reach pickle unless authenticated; garbage, forged, replayed, unsigned and
oversized frames are dropped, counted and logged, and the proxy keeps serving.
"""

from __future__ import annotations

import logging
import os
import time

import pytest
import redis
import zmq
from proxy_helpers import WatchedRegistry, make_proxy, new_group

from rallypoint import Message, SessionMessage
from rallypoint.errors import ConfigError, RegistryError, Timeout
from rallypoint.proxy import RedisRegistry, WireCodec, handshake_token

pytestmark = pytest.mark.timeout(30)


def _inject(address: str, frames_list: list[list[bytes]], key: bytes | None = None) -> None:
    """Send raw multipart messages to a proxy's listening socket: as a stranger on the network would, or, given
    the group key, as a key holder would (presenting the handshake token derived from it)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 1000
    if key is not None:
        sock.plain_username = b"rallypoint"
        sock.plain_password = handshake_token(key)
    try:
        sock.connect(address.partition("#")[0])
        for frames in frames_list:
            sock.send_multipart(frames)
    finally:
        sock.close()
        ctx.term()


def _pump_until_dropped(proxy, count: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while proxy.stats.dropped_frames < count and time.monotonic() < deadline:
        with pytest.raises(Timeout):
            proxy.receive_once(timeout=0.05)
    assert proxy.stats.dropped_frames >= count, proxy.stats


def _key(registry_url: str, group: str) -> bytes:
    registry = RedisRegistry(registry_url)
    try:
        return registry.group_key(group, create=False)
    finally:
        registry.close()


def _frames(codec: WireCodec, message: Message, incarnation: str, seq: int, to_incarnation: str = ""
            ) -> list[bytes]:
    return [bytes(f) for f in codec.encode(message, incarnation=incarnation, seq=seq,
                                           to_incarnation=to_incarnation)]


def test_garbage_and_truncated_frames_are_dropped_counted_and_logged(pair, registry_url, caplog):
    """From a connection that passed the handshake (a key holder): the frames themselves are checked."""
    master, worker, group = pair
    message = Message(tag="t", source="master", destination="worker_001")
    good = _frames(WireCodec(os.urandom(32), compact=False), message, master.incarnation, 1)
    [compact] = _frames(WireCodec(os.urandom(32)), message, master.incarnation, 1)
    junk = [[b""], [b"\x00" * 7], [b"garbage", b"more"], good[:1], good[:-1], [good[0], b"x", good[-1]],
            [compact[:9]], [compact[:-1]], [b"\xc1" + b"\xff" * 8]]
    with caplog.at_level(logging.WARNING, logger="rallypoint.proxy"):
        _inject(worker.address, junk, _key(registry_url, group))
        _pump_until_dropped(worker, len(junk))
    assert "dropped a frame" in caplog.text
    # ... and the receive loop goes on: a real message still arrives.
    master.isend(Message(tag="ok", source="master", destination="worker_001", payload=1))
    assert worker.receive_once(timeout=5).payload == 1


def test_forged_frames_signed_with_another_key_never_reach_pickle(pair, registry_url, monkeypatch):
    master, worker, group = pair
    import pickle

    unpickled: list[object] = []
    real_loads = pickle.loads
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: unpickled.append(a) or real_loads(*a, **k))
    forged = _frames(WireCodec(os.urandom(32)),
                     Message(tag="evil", source="master", destination="worker_001", payload={"rm": "-rf"}),
                     master.incarnation, 10**6)
    _inject(worker.address, [forged], _key(registry_url, group))
    _pump_until_dropped(worker, 1)
    assert unpickled == []


def test_replayed_and_misdirected_frames_are_dropped(pair, registry_url):
    master, worker, group = pair
    key = RedisRegistry(registry_url).group_key(group)
    codec = WireCodec(key)
    genuine = _frames(codec, Message(tag="once", source="master", destination="worker_001", payload="x"),
                      master.incarnation, 10**9)
    _inject(worker.address, [genuine, genuine], key)
    assert worker.receive_once(timeout=5).tag == "once"  # the first copy is genuine
    _pump_until_dropped(worker, 1)  # the replay is not
    elsewhere = _frames(codec, Message(tag="x", source="master", destination="someone_else"),
                        master.incarnation, 10**9 + 1)
    _inject(worker.address, [elsewhere], key)
    _pump_until_dropped(worker, 2)
    stranger = _frames(codec, Message(tag="x", source="ghost", destination="worker_001"), "f" * 32, 1)
    _inject(worker.address, [stranger], key)
    _pump_until_dropped(worker, 3)


@pytest.fixture
def watched_pair(registry_url):
    """Like `pair`, but the worker's registry is a WatchedRegistry: (master, worker, registry, group)."""
    group = new_group()
    registry = WatchedRegistry(registry_url)
    with make_proxy(registry_url, group, "master", "master") as master, \
            make_proxy(registry, group, "worker", "worker_001", expected_peers={"master": 1}) as worker:
        yield master, worker, registry, group
    registry.close()


def _wait_for(condition, what: str, proxy, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        proxy.poll(0.05)


def test_frames_from_an_unlisted_sender_cost_one_registry_read_not_one_each(watched_pair, registry_url):
    master, worker, registry, group = watched_pair
    key = _key(registry_url, group)
    codec = WireCodec(key)
    ghosts = [_frames(codec, Message(tag="x", source="ghost", destination="worker_001"), "e" * 32, seq)
              for seq in range(1, 21)]
    reads_before = registry.prompted_reads
    _inject(worker.address, ghosts, key)
    _pump_until_dropped(worker, 20)
    # The first frame looks the sender up; the rest are dropped without a read (2 allows for a stall of over
    # a second between frames on a slow machine; one read per frame would be 20).
    assert 1 <= registry.prompted_reads - reads_before <= 2
    # While the registry is known to be down, no read is tried at all: the frame is dropped at once.
    registry.down = True
    # Two failed calls of the lease keeper: after the first it knows the registry is down.
    _wait_for(lambda: registry.failed_calls >= 2, "the lease keeper never tried the registry", worker)
    reads_before = registry.member_reads
    _inject(worker.address, [_frames(codec, Message(tag="x", source="ghost2", destination="worker_001"),
                                             "d" * 32, 1)], key)
    _pump_until_dropped(worker, 21)
    assert registry.member_reads == reads_before
    registry.down = False
    # A frame from a listed member still gets through.
    master.isend(Message(tag="ok", source="master", destination="worker_001", payload=2))
    assert worker.receive_once(timeout=5).payload == 2


def test_a_new_group_key_in_the_registry_is_adopted_on_the_first_frame_signed_with_it(watched_pair, registry_url):
    """A frame failing its MAC makes the proxy re-read the group key (at most once a second): a key the
    registry holds now (it lost the old one and a new member created this) is adopted and the frame taken;
    forgeries cost one read a second, not one each."""
    master, worker, registry, group = watched_pair
    forger = WireCodec(os.urandom(32))
    forged = [_frames(forger, Message(tag="x", source="master", destination="worker_001"), master.incarnation,
                      10**6 + seq) for seq in range(20)]
    reads_before = registry.key_reads
    _inject(worker.address, forged, _key(registry_url, group))  # a key holder's connection, forged frames
    _pump_until_dropped(worker, 20)
    # 2: a stall of over a second between frames
    assert 1 <= registry.key_reads - reads_before <= 2 and worker.stats.rekeyed == 0

    new_key = os.urandom(32)
    raw = redis.Redis.from_url(registry_url)
    try:
        raw.set(f"rallypoint:{group}:key", new_key)
    finally:
        raw.close()
    master.refresh_peers()  # as a member that re-read the registry after it lost the key: it adopts the new one
    assert master.stats.rekeyed == 1
    time.sleep(1.1)  # past the once-a-second bound the forgeries used up
    master.isend(Message(tag="ok", source="master", destination="worker_001", payload=3))
    assert worker.receive_once(timeout=5).payload == 3
    assert worker.stats.rekeyed == 1 and worker.stats.dropped_frames == 20
    # And the other way: the worker signs with the new key now, which the master holds.
    worker.isend(Message(tag="back", source="worker_001", destination="master", payload=4))
    assert master.receive_once(timeout=5).payload == 4


def test_unsigned_frames_are_dropped(pair, registry_url):
    master, worker, group = pair
    unsigned = _frames(WireCodec(None), Message(tag="x", source="master", destination="worker_001"),
                       master.incarnation, 10**9)
    _inject(worker.address, [unsigned], _key(registry_url, group))
    _pump_until_dropped(worker, 1)


def test_a_stranger_is_refused_at_the_handshake_before_it_costs_anything(pair, registry_url):
    """Without the handshake token derived from the group key, a connection never gets to send a frame: nothing
    is buffered, decoded or counted as a dropped frame; the refusals are counted by the driver."""
    master, worker, group = pair
    message = Message(tag="x", source="master", destination="worker_001", payload="sneaky")
    genuine = _frames(WireCodec(_key(registry_url, group)), message, master.incarnation, 10**9)
    _inject(worker.address, [genuine, [b"garbage"]])  # no token: even a genuine frame does not get through
    _inject(worker.address, [genuine], key=os.urandom(32))  # a token from another key
    with pytest.raises(Timeout):
        worker.receive_once(timeout=0.5)
    assert worker.stats.dropped_frames == 0 and worker.stats.received == 0
    assert worker.refused_handshakes >= 2


def test_oversized_messages_are_refused_and_the_proxy_keeps_serving(registry_url):
    group = new_group()
    with make_proxy(registry_url, group, "master", "master") as master, \
            make_proxy(registry_url, group, "worker", "worker_001", expected_peers={"master": 1},
                       max_message_bytes=64 * 1024) as worker:
        _inject(worker.address, [[b"\x00" * 200_000]], _key(registry_url, group))
        master.isend(Message(tag="small", source="master", destination="worker_001", payload=1))
        assert worker.receive_once(timeout=5).tag == "small"


def test_curve_encrypted_group_works_and_plain_members_are_refused(registry_url):
    group = new_group()
    with make_proxy(registry_url, group, "master", "master", curve=True) as master, \
            make_proxy(registry_url, group, "worker", "worker_001", expected_peers={"master": 1},
                       curve=True) as worker:
        assert "#curve=" in worker.address
        [sid] = master.isend(SessionMessage(tag="sum", source="master", destination="worker_001", payload=[1]))
        got = worker.receive_once(timeout=5)
        worker.reply(got, payload=1)
        assert master.receive_by_id([sid], timeout=5)[0].payload == 1
        # A plain ZeroMQ client cannot complete the handshake: nothing it sends is even seen.
        _inject(worker.address, [[b"plain"]])
        with pytest.raises(Timeout):
            worker.receive_once(timeout=0.3)
        assert worker.stats.dropped_frames == 0
        with pytest.raises(ConfigError, match="CURVE"):
            make_proxy(registry_url, group, "worker", "worker_plain", expected_peers={"master": 1})


def test_msgpack_codec_carries_plain_data_and_refuses_pickle_only_payloads(registry_url):
    group = new_group()
    with make_proxy(registry_url, group, "master", "master", codec="msgpack") as master, \
            make_proxy(registry_url, group, "worker", "worker_001", expected_peers={"master": 1},
                       codec="msgpack") as worker:
        master.isend(Message(tag="d", source="master", destination="worker_001",
                             payload={"a": [1, 2.5, "x", b"\x00", None, True]}))
        assert worker.receive_once(timeout=5).payload == {"a": [1, 2.5, "x", b"\x00", None, True]}
        with pytest.raises(ConfigError):
            master.isend(Message(tag="d", source="master", destination="worker_001", payload={1, 2}))


def test_registry_password_is_honoured_and_never_shown(redis_server_factory, caplog):
    server = redis_server_factory(password="s3cret-pw")
    if getattr(server, "embedded", False):
        pytest.skip("the embedded registry has no passwords")
    port = server.port
    with make_proxy(f"redis://:s3cret-pw@127.0.0.1:{port}/0", new_group(), "solo") as proxy:
        assert proxy.peers == {}
    with caplog.at_level(logging.DEBUG), pytest.raises(RegistryError) as info:
        make_proxy(f"redis://:wrong-pw@127.0.0.1:{port}/0", new_group(), "solo")
    assert "wrong-pw" not in str(info.value) and "wrong-pw" not in caplog.text
    assert "s3cret-pw" not in caplog.text


def test_a_loopback_registry_means_a_loopback_bind(pair):
    master, worker, _ = pair
    assert master.address.startswith("tcp://127.0.0.1:")
    assert worker.address.startswith("tcp://127.0.0.1:")


def test_malformed_registry_entries_do_not_stop_a_join(registry_url):
    group = new_group()
    client = redis.Redis.from_url(registry_url)
    client.sadd(f"rallypoint:{group}:members", "bogus", "worse")
    client.set(f"rallypoint:{group}:peer:bogus", b"\xff not json", px=10_000)
    client.set(f"rallypoint:{group}:peer:worse", '{"name": "worse", "address": 5}', px=10_000)
    with make_proxy(registry_url, group, "master", "master") as master, \
            make_proxy(registry_url, group, "worker", "worker_001", expected_peers={"master": 1}):
        master.refresh_peers()
        assert master.peers == {"worker": ["worker_001"]}


def test_frames_meant_for_an_earlier_process_under_the_same_name_are_dropped(pair, registry_url):
    master, worker, group = pair
    key = _key(registry_url, group)
    codec = WireCodec(key)
    stale = _frames(codec, Message(tag="old", source="master", destination="worker_001"),
                       master.incarnation, 10**9, to_incarnation="0" * 32)
    fresh = _frames(codec, Message(tag="new", source="master", destination="worker_001"),
                       master.incarnation, 10**9 + 1, to_incarnation=worker.incarnation)
    _inject(worker.address, [stale, fresh], key)
    assert worker.receive_once(timeout=5).tag == "new"
    assert worker.stats.dropped_frames == 1



def test_one_forged_frame_with_a_huge_sequence_cannot_shut_the_real_sender_out(pair, registry_url):
    """A key holder signs a frame as the master, with the master's incarnation and a sequence far ahead, and
    sends it on its own connection. It advances only that connection's stream: the master's own frames, on its
    connection, keep being taken (before, every later frame of the master's was dropped as a replay)."""
    master, worker, group = pair
    key = _key(registry_url, group)
    forged = _frames(WireCodec(key), Message(tag="forged", source="master", destination="worker_001"),
                     master.incarnation, 10**15, to_incarnation=worker.incarnation)
    _inject(worker.address, [forged], key)
    assert worker.receive_once(timeout=5).tag == "forged"  # validly signed: a key holder can say anything
    for n in range(3):
        master.isend(Message(tag="real", source="master", destination="worker_001", payload=n))
        got = worker.receive_once(timeout=5)
        assert (got.tag, got.payload) == ("real", n)
    assert worker.stats.dropped_frames == 0


def test_a_garbage_flood_from_a_key_holder_costs_a_counter_not_a_log_line_each(pair, registry_url, caplog):
    """Past the handshake, every dropped frame is counted by reason, and logged at most once per reason and
    sender every few seconds, with the count since the last line."""
    master, worker, group = pair
    flood = 2_000
    with caplog.at_level(logging.DEBUG, logger="rallypoint"):
        _inject(worker.address, [[b"garbage %d" % n] for n in range(flood)], _key(registry_url, group))
        _pump_until_dropped(worker, flood, timeout=20.0)
    lines = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert 1 <= len(lines) <= 3, [r.getMessage() for r in lines]
    assert worker.stats.dropped_by_reason == {"MalformedFrame": flood}
    master.isend(Message(tag="ok", source="master", destination="worker_001", payload=5))
    assert worker.receive_once(timeout=5).payload == 5
