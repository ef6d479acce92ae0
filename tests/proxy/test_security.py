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
from proxy_helpers import make_proxy, new_group

from rallypoint import Message, SessionMessage
from rallypoint.errors import ConfigError, RegistryError, Timeout
from rallypoint.proxy import RedisRegistry, WireCodec

pytestmark = pytest.mark.timeout(30)


def _inject(address: str, frames_list: list[list[bytes]]) -> None:
    """Send raw multipart messages to a proxy's listening socket, as a stranger on the network would."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 1000
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


def _frames(codec: WireCodec, message: Message, incarnation: str, seq: int, to_incarnation: str = ""
            ) -> list[bytes]:
    return [bytes(f) for f in codec.encode(message, incarnation=incarnation, seq=seq,
                                           to_incarnation=to_incarnation)]


def test_garbage_and_truncated_frames_are_dropped_counted_and_logged(pair, caplog):
    master, worker, _ = pair
    message = Message(tag="t", source="master", destination="worker_001")
    good = _frames(WireCodec(os.urandom(32), compact=False), message, master.incarnation, 1)
    [compact] = _frames(WireCodec(os.urandom(32)), message, master.incarnation, 1)
    junk = [[b""], [b"\x00" * 7], [b"garbage", b"more"], good[:1], good[:-1], [good[0], b"x", good[-1]],
            [compact[:9]], [compact[:-1]], [b"\xc1" + b"\xff" * 8]]
    with caplog.at_level(logging.WARNING, logger="rallypoint.proxy._proxy"):
        _inject(worker._record.address, junk)
        _pump_until_dropped(worker, len(junk))
    assert "dropped a frame" in caplog.text
    # ... and the receive loop goes on: a real message still arrives.
    master.isend(Message(tag="ok", source="master", destination="worker_001", payload=1))
    assert worker.receive_once(timeout=5).payload == 1


def test_forged_frames_signed_with_another_key_never_reach_pickle(pair, monkeypatch):
    master, worker, _ = pair
    import pickle

    unpickled: list[object] = []
    real_loads = pickle.loads
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: unpickled.append(a) or real_loads(*a, **k))
    forged = _frames(WireCodec(os.urandom(32)),
                     Message(tag="evil", source="master", destination="worker_001", payload={"rm": "-rf"}),
                     master.incarnation, 10**6)
    _inject(worker._record.address, [forged])
    _pump_until_dropped(worker, 1)
    assert unpickled == []


def test_replayed_and_misdirected_frames_are_dropped(pair, registry_url):
    master, worker, group = pair
    key = RedisRegistry(registry_url).group_key(group)
    codec = WireCodec(key)
    genuine = _frames(codec, Message(tag="once", source="master", destination="worker_001", payload="x"),
                      master.incarnation, 10**9)
    _inject(worker._record.address, [genuine, genuine])
    assert worker.receive_once(timeout=5).tag == "once"  # the first copy is genuine
    _pump_until_dropped(worker, 1)  # the replay is not
    elsewhere = _frames(codec, Message(tag="x", source="master", destination="someone_else"),
                        master.incarnation, 10**9 + 1)
    _inject(worker._record.address, [elsewhere])
    _pump_until_dropped(worker, 2)
    stranger = _frames(codec, Message(tag="x", source="ghost", destination="worker_001"), "f" * 32, 1)
    _inject(worker._record.address, [stranger])
    _pump_until_dropped(worker, 3)


def test_frames_from_an_unlisted_sender_cost_one_registry_read_not_one_each(pair, registry_url, monkeypatch):
    master, worker, group = pair
    codec = WireCodec(RedisRegistry(registry_url).group_key(group))
    reads: list[str] = []
    real_members = worker._registry.members
    monkeypatch.setattr(worker._registry, "members", lambda g: reads.append(g) or real_members(g))
    ghosts = [_frames(codec, Message(tag="x", source="ghost", destination="worker_001"), "e" * 32, seq)
              for seq in range(1, 21)]
    _inject(worker._record.address, ghosts)
    _pump_until_dropped(worker, 20)
    # The first frame looks the sender up; the rest are dropped without a read (2 allows for a stall of over
    # a second between frames on a slow machine; one read per frame would be 20).
    assert 1 <= len(reads) <= 2
    # While the registry is known to be down, no read is tried at all: the frame is dropped at once.
    monkeypatch.setattr(worker._membership, "_registry_down", True)
    _inject(worker._record.address, [_frames(codec, Message(tag="x", source="ghost2", destination="worker_001"),
                                             "d" * 32, 1)])
    reads_before = len(reads)
    _pump_until_dropped(worker, 21)
    assert len(reads) == reads_before
    # A frame from a listed member still gets through.
    master.isend(Message(tag="ok", source="master", destination="worker_001", payload=2))
    assert worker.receive_once(timeout=5).payload == 2


def test_a_new_group_key_in_the_registry_is_adopted_on_the_first_frame_signed_with_it(pair, registry_url,
                                                                                        monkeypatch):
    """A frame failing its MAC makes the proxy re-read the group key (at most once a second): a key the
    registry holds now (it lost the old one and a new member created this) is adopted and the frame taken;
    forgeries cost one read a second, not one each."""
    master, worker, group = pair
    reads: list[str] = []
    real_group_key = worker._registry.group_key
    monkeypatch.setattr(worker._registry, "group_key",
                        lambda g, create=True: reads.append(g) or real_group_key(g, create=create))
    forger = WireCodec(os.urandom(32))
    forged = [_frames(forger, Message(tag="x", source="master", destination="worker_001"), master.incarnation,
                      10**6 + seq) for seq in range(20)]
    _inject(worker._record.address, forged)
    _pump_until_dropped(worker, 20)
    assert 1 <= len(reads) <= 2 and worker.stats.rekeyed == 0  # 2: a stall of over a second between frames

    new_key = os.urandom(32)
    registry = RedisRegistry(registry_url)
    raw = redis.Redis.from_url(registry_url)
    try:
        raw.set(registry._group_key_key(group), new_key)
    finally:
        raw.close()
        registry.close()
    master._adopt_key(new_key)  # as a member that re-registered (or joined) after the registry lost the key
    time.sleep(1.1)  # past the once-a-second bound the forgeries used up
    master.isend(Message(tag="ok", source="master", destination="worker_001", payload=3))
    assert worker.receive_once(timeout=5).payload == 3
    assert worker._key == new_key and worker.stats.rekeyed == 1 and worker.stats.dropped_frames == 20
    # And the other way: the worker signs with the new key now, which the master holds.
    worker.isend(Message(tag="back", source="worker_001", destination="master", payload=4))
    assert master.receive_once(timeout=5).payload == 4


def test_unsigned_frames_are_dropped(pair):
    master, worker, _ = pair
    unsigned = _frames(WireCodec(None), Message(tag="x", source="master", destination="worker_001"),
                       master.incarnation, 10**9)
    _inject(worker._record.address, [unsigned])
    _pump_until_dropped(worker, 1)


def test_oversized_messages_are_refused_and_the_proxy_keeps_serving(registry_url):
    group = new_group()
    with make_proxy(registry_url, group, "master", "master") as master, \
            make_proxy(registry_url, group, "worker", "worker_001", expected_peers={"master": 1},
                       max_message_bytes=64 * 1024) as worker:
        _inject(worker._record.address, [[b"\x00" * 200_000]])
        master.isend(Message(tag="small", source="master", destination="worker_001", payload=1))
        assert worker.receive_once(timeout=5).tag == "small"


def test_curve_encrypted_group_works_and_plain_members_are_refused(registry_url):
    group = new_group()
    with make_proxy(registry_url, group, "master", "master", curve=True) as master, \
            make_proxy(registry_url, group, "worker", "worker_001", expected_peers={"master": 1},
                       curve=True) as worker:
        assert "#curve=" in worker._record.address
        [sid] = master.isend(SessionMessage(tag="sum", source="master", destination="worker_001", payload=[1]))
        got = worker.receive_once(timeout=5)
        worker.reply(got, payload=1)
        assert master.receive_by_id([sid], timeout=5)[0].payload == 1
        # A plain ZeroMQ client cannot complete the handshake: nothing it sends is even seen.
        _inject(worker._record.address, [[b"plain"]])
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
    assert master._record.address.startswith("tcp://127.0.0.1:")
    assert worker._record.address.startswith("tcp://127.0.0.1:")


def test_malformed_registry_entries_do_not_stop_a_join(registry_url):
    group = new_group()
    client = redis.Redis.from_url(registry_url)
    client.sadd(f"rallypoint:{group}:members", "bogus", "worse")
    client.set(f"rallypoint:{group}:peer:bogus", b"\xff not json", px=10_000)
    client.set(f"rallypoint:{group}:peer:worse", '{"name": "worse", "address": 5}', px=10_000)
    with make_proxy(registry_url, group, "master", "master") as master, \
            make_proxy(registry_url, group, "worker", "worker_001", expected_peers={"master": 1}):
        master._refresh_members_now()
        assert master.peers == {"worker": ["worker_001"]}


def test_frames_meant_for_an_earlier_process_under_the_same_name_are_dropped(pair, registry_url):
    master, worker, group = pair
    codec = WireCodec(RedisRegistry(registry_url).group_key(group))
    stale = _frames(codec, Message(tag="old", source="master", destination="worker_001"),
                       master.incarnation, 10**9, to_incarnation="0" * 32)
    fresh = _frames(codec, Message(tag="new", source="master", destination="worker_001"),
                       master.incarnation, 10**9 + 1, to_incarnation=worker.incarnation)
    _inject(worker._record.address, [stale, fresh])
    assert worker.receive_once(timeout=5).tag == "new"
    assert worker.stats.dropped_frames == 1

