"""Proxy primitives between proxies in one process: real ZeroMQ sockets, a real redis-server.

Several proxies on one thread are fine as long as no call blocks waiting on another of them, so these tests
use the non-blocking primitives on one side and receive on the other.
"""

from __future__ import annotations

import threading
import time
from enum import Enum

import numpy as np
import pytest
from proxy_helpers import make_proxy, new_group

from rallypoint import Message, SessionMessage, SessionType
from rallypoint.errors import (
    ConfigError,
    JoinTimeout,
    PeerUnreachable,
    ProxyClosed,
    RegistryError,
    Timeout,
    UnknownSession,
)
from rallypoint.proxy import Proxy, Timeouts

pytestmark = pytest.mark.timeout(30)


def test_isend_then_receive_and_reply_round_trip(pair):
    master, worker, _ = pair
    task = SessionMessage(tag="sum", source="master", destination="worker_001", payload=[1, 2, 3])
    [session_id] = master.isend(task)
    assert session_id == task.session_id
    assert master.session_stage(session_id) == "request"

    received = worker.receive_once(timeout=5)
    assert (received.tag, received.source, received.payload) == ("sum", "master", [1, 2, 3])
    assert received.session_id == session_id and received.message_id == task.message_id
    assert worker.session_stage(session_id) == "receive"

    worker.reply(received, payload=6)
    assert worker.session_stage(session_id) == "complete"
    [answer] = master.receive_by_id([session_id], timeout=5)
    assert answer.payload == 6 and answer.source == "worker_001" and answer.session_id == session_id
    assert answer.message_id != task.message_id  # a reply is a new message in the same session
    assert master.session_stage(session_id) == "complete"


def test_notification_stages_and_send_returns_without_reply(pair):
    master, worker, _ = pair
    note = SessionMessage(tag="check_out", source="master", destination="worker_001",
                          session_type=SessionType.NOTIFICATION)
    assert master.send(note, timeout=5) == []  # nothing to wait for
    got = worker.receive_once(timeout=5)
    assert worker.session_stage(got.session_id) == "receive"
    assert master.session_stage(note.session_id) == "request"


def test_sent_notifications_do_not_grow_the_live_session_index(pair):
    master, worker, _ = pair
    live_before = master.live_sessions
    ids = [master.isend(SessionMessage(tag="tick", source="master", destination="worker_001", payload=i,
                                       session_type=SessionType.NOTIFICATION))[0] for i in range(200)]
    assert master.live_sessions == live_before  # nothing comes back for them: they are settled, not live
    assert master.session_stage(ids[-1]) == "request"  # still readable
    assert [worker.receive_once(timeout=5).payload for _ in range(200)] == list(range(200))
    assert worker.live_sessions == 0  # the receiving side ends them in "receive"


def test_receive_by_id_keeps_other_sessions_for_receive(pair):
    master, worker, _ = pair
    ids = [master.isend(SessionMessage(tag="n", source="master", destination="worker_001", payload=i))[0]
           for i in range(5)]
    for _ in range(5):
        message = worker.receive_once(timeout=5)
        worker.reply(message, payload=message.payload * 10)
    # Ask for the last two first: the other three stay buffered, in arrival order, for receive().
    assert [m.payload for m in master.receive_by_id(ids[3:], timeout=5)] == [30, 40]
    assert [master.receive_once(timeout=5).payload for _ in range(3)] == [0, 10, 20]


def test_receive_by_id_times_out_naming_the_missing_session(pair):
    master, worker, _ = pair
    [sid] = master.isend(Message(tag="q", source="master", destination="worker_001"))
    started = time.monotonic()
    with pytest.raises(Timeout) as info:
        master.receive_by_id([sid], timeout=0.3)
    assert time.monotonic() - started < 2.0
    assert info.value.missing == (sid,) and sid in str(info.value)
    assert info.value.replies == []


def test_receive_once_times_out_and_receive_iterator_stops_when_idle(pair):
    master, _, _ = pair
    with pytest.raises(Timeout):
        master.receive_once(timeout=0.1)
    assert list(master.receive(timeout=0.1)) == []


def test_scatter_and_broadcast_reach_every_worker(master_and_workers):
    master, workers = master_and_workers
    assert master.peers == {"worker": ["worker_0", "worker_1", "worker_2"]}
    ids = master.iscatter("part", SessionType.TASK, [(w.name, i) for i, w in enumerate(workers)])
    bids = master.ibroadcast("worker", "all", SessionType.TASK, payload="hello")
    assert len(ids) == 3 and len(bids) == 3
    for worker in workers:
        got = sorted((m.tag, m.payload) for m in (worker.receive_once(timeout=5) for _ in range(2)))
        assert got == sorted([("part", int(worker.name[-1])), ("all", "hello")])


class _CountsPickling:
    pickled = 0

    def __init__(self, data: list[int]) -> None:
        self.data = data

    def __reduce__(self):
        type(self).pickled += 1
        return (_CountsPickling, (self.data,))


def test_broadcast_serializes_its_payload_once_for_all_targets(master_and_workers):
    master, workers = master_and_workers
    payload = _CountsPickling(list(range(1000)))
    before = _CountsPickling.pickled
    master.ibroadcast("worker", "weights", SessionType.NOTIFICATION, payload=payload)
    assert _CountsPickling.pickled - before == 1
    assert [w.receive_once(timeout=5).payload.data for w in workers] == [payload.data] * 3


def test_forward_keeps_the_session_and_the_reply_comes_back_to_the_forwarder(registry_url):
    group = new_group()
    with make_proxy(registry_url, group, "master", "master") as master, \
            make_proxy(registry_url, group, "worker", "w_a", expected_peers={"master": 1}) as a, \
            make_proxy(registry_url, group, "worker", "w_b", expected_peers={"master": 1}) as b:
        [sid] = master.isend(SessionMessage(tag="job", source="master", destination="w_a", payload=7))
        first = a.receive_once(timeout=5)
        a.forward(first, "w_b", tag="job2")
        second = b.receive_once(timeout=5)
        assert (second.session_id, second.tag, second.payload, second.source) == (sid, "job2", 7, "w_a")
        b.reply(second, payload=8)
        [back] = a.receive_by_id([sid], timeout=5)
        assert back.payload == 8 and back.source == "w_b"


def test_numpy_and_bytes_payloads_arrive_intact(pair):
    master, worker, _ = pair
    array = np.arange(1_000_000, dtype=np.float64).reshape(1000, 1000)
    blob = bytes(range(256)) * 1000
    master.isend(Message(tag="data", source="master", destination="worker_001",
                         payload={"array": array, "blob": blob}))
    got = worker.receive_once(timeout=10).payload
    assert np.array_equal(got["array"], array) and got["array"].dtype == np.float64
    assert got["blob"] == blob


class Tag(Enum):
    UPDATE = "update"


def test_enum_tags_travel_by_value(pair):
    master, worker, _ = pair
    master.isend(Message(tag=Tag.UPDATE, source="master", destination="worker_001"))
    assert worker.receive_once(timeout=5).tag == "update"


def test_join_timeout_names_what_is_missing(registry_url):
    started = time.monotonic()
    with pytest.raises(JoinTimeout) as info:
        make_proxy(registry_url, new_group(), "worker", expected_peers={"master": 1, "ps": 2},
                   timeouts=Timeouts(join=0.5))
    assert time.monotonic() - started < 3.0
    assert info.value.missing == {"master": 1, "ps": 2}
    assert "master" in str(info.value) and "ps" in str(info.value)


def test_a_registry_down_at_start_is_retried_until_the_join_timeout(redis_server):
    redis_server.stop()
    started = time.monotonic()
    with pytest.raises(RegistryError) as info:  # a JoinTimeout, which is a RegistryError
        make_proxy(redis_server.url, new_group(), "worker", timeouts=Timeouts(registry=0.5, join=1.5))
    elapsed = time.monotonic() - started
    assert isinstance(info.value, JoinTimeout) and 1.4 < elapsed < 5.0
    assert f"127.0.0.1:{redis_server.port}" in str(info.value) and "unreachable for" in str(info.value)


def test_sending_to_a_stranger_is_peer_unreachable(pair):
    master, _, _ = pair
    with pytest.raises(PeerUnreachable) as info:
        master.isend(Message(tag="x", source="master", destination="nobody"))
    assert info.value.peer == "nobody"


def test_closed_proxy_refuses_use_and_close_is_idempotent(registry_url):
    proxy = make_proxy(registry_url, new_group(), "solo")
    proxy.close()
    proxy.close()
    with pytest.raises(ProxyClosed):
        proxy.isend(Message(tag="x", source=proxy.name, destination="other"))
    with pytest.raises(ProxyClosed):
        proxy.receive_once(timeout=0)


def test_closing_unregisters_so_peers_drop_it(registry_url):
    group = new_group()
    with make_proxy(registry_url, group, "master", "master") as master:
        worker = make_proxy(registry_url, group, "worker", "worker_x", expected_peers={"master": 1})
        master.refresh_peers()
        assert master.peers == {"worker": ["worker_x"]}
        worker.close()
        master.refresh_peers()
        assert master.peers == {}


def test_a_peer_gone_longer_than_the_hold_age_is_forgotten(registry_url):
    from rallypoint.proxy import HoldPolicy

    group = new_group()
    with make_proxy(registry_url, group, "master", "master", hold=HoldPolicy(max_age=0.3)) as master:
        worker = make_proxy(registry_url, group, "worker", "worker_x", expected_peers={"master": 1})
        master.refresh_peers()
        worker.close()
        master.refresh_peers()
        assert master.peer_state("worker_x") == "gone"  # just left: a send now would be held for it
        time.sleep(0.4)
        late = make_proxy(registry_url, group, "worker", "worker_y", expected_peers={"master": 1})
        master.refresh_peers()  # a membership change: names gone for longer than max_age go
        assert master.peer_state("worker_x") is None and master.peers == {"worker": ["worker_y"]}
        with pytest.raises(PeerUnreachable):
            master.isend(Message(tag="t", source="master", destination="worker_x"))
        late.close()


def test_bad_arguments_are_config_errors(registry_url):
    with pytest.raises(ConfigError):
        Proxy(group_name="g", component_type="has space", registry=registry_url)
    with pytest.raises(ConfigError):
        Proxy(group_name="g", component_type="w", expected_peers=[("master",)], registry=registry_url)
    with pytest.raises(ConfigError):
        Proxy(group_name="g", component_type="w", registry=registry_url, redis_address=("127.0.0.1", 1))


def test_unknown_session_stage_is_a_typed_error(pair):
    master, _, _ = pair
    with pytest.raises(UnknownSession):
        master.session_stage("no-such-session")


def test_stop_from_another_thread_ends_receive(pair):
    _, worker, _ = pair
    timer = threading.Timer(0.2, worker.stop)
    timer.start()
    started = time.monotonic()
    assert list(worker.receive(timeout=None)) == []
    assert time.monotonic() - started < 3.0
    timer.join()


def test_custom_session_type_from_a_spec_file(pair, tmp_path):
    spec = tmp_path / "vote_commit.spec"
    spec.write_text(
        """
        session vote_commit {
            states prepare, prepared, committed, aborted, failed
            initial prepare
            final committed, aborted, failed
            prepare -> prepared on received
            prepare, prepared -> committed on commit
            prepare, prepared -> aborted on abort
            prepare, prepared -> failed on peer_lost
        }
        """
    )
    from rallypoint.engine import load_spec

    master, worker, _ = pair
    loaded = load_spec(str(spec))  # each proxy knows the session types of its own catalog
    master.catalog.add_spec(loaded)
    worker.catalog.add_spec(loaded)
    [sid] = master.isend(SessionMessage(tag="tx", source="master", destination="worker_001",
                                        session_type="vote_commit", payload={"k": 1}))
    assert master.session_stage(sid) == "prepare"
    got = worker.receive_once(timeout=5)
    assert worker.session_stage(sid) == "prepared"
    worker.reply(got, tag="vote", payload="yes", event="commit")
    assert worker.session_stage(sid) == "committed"
    [vote] = master.receive_by_id([sid], timeout=5)
    assert vote.payload == "yes"
    assert master.session_stage(sid) == "committed"


def test_unclaimed_messages_are_bounded_and_what_goes_is_counted(registry_url, caplog):
    group = new_group()
    with make_proxy(registry_url, group, "master", "master") as master, \
            make_proxy(registry_url, group, "worker", "worker_001", expected_peers={"master": 1},
                       max_buffered=3) as worker:
        ids = [master.isend(Message(tag="n", source="master", destination="worker_001", payload=i))[0]
               for i in range(5)]
        with caplog.at_level("ERROR"):
            [last] = worker.receive_by_id([ids[4]], timeout=5)
        assert last.payload == 4
        assert worker.stats.dropped_unclaimed == 2 and "unclaimed" in caplog.text
        assert [worker.receive_once(timeout=5).payload for _ in range(2)] == [2, 3]


def test_zero_timeouts_still_look_at_the_socket_once(pair):
    master, worker, _ = pair
    [sid] = master.isend(Message(tag="n", source="master", destination="worker_001", payload=1))
    deadline = time.monotonic() + 5
    while True:  # the message is in flight: timeout=0 calls must pick it up once it has arrived
        try:
            message = worker.receive_once(timeout=0)
            break
        except Timeout:
            assert time.monotonic() < deadline
    worker.reply(message, payload=2)
    while True:
        try:
            assert master.receive_by_id([sid], timeout=0)[0].payload == 2
            break
        except Timeout:
            assert time.monotonic() < deadline


def test_a_registry_object_handed_in_is_shared_not_closed():
    from rallypoint.proxy import InMemoryNetwork, InMemoryRegistry

    registry, network = InMemoryRegistry(), InMemoryNetwork()
    group = new_group()
    master = Proxy(group_name=group, component_type="master", name="master", registry=registry,
                   driver=network.driver())
    worker = Proxy(group_name=group, component_type="worker", name="w1", registry=registry,
                   driver=network.driver(), expected_peers={"master": 1})
    master.close()
    assert registry.members(group).keys() == {"w1"}  # still usable after the first close
    worker.close()
    assert registry.members(group) == {}


def test_the_membership_thread_survives_an_unexpected_error(caplog):
    from rallypoint.proxy import InMemoryNetwork, InMemoryRegistry

    class FlakyRegistry(InMemoryRegistry):
        """Fails its first member-list read after the join with an error nobody expects."""

        armed = False

        def members(self, group):
            if self.armed:
                self.armed = False
                raise RuntimeError("surprise")
            return super().members(group)

    registry, network, group = FlakyRegistry(), InMemoryNetwork(), new_group()
    with caplog.at_level("ERROR"), \
            make_proxy(registry, group, "master", "master", driver=network.driver()) as master:
        registry.armed = True
        deadline = time.monotonic() + 5
        while "membership refresh failed unexpectedly" not in caplog.text:
            assert time.monotonic() < deadline, "the lease keeper never hit the error"
            master.poll(0.05)
        # Still at work after the error: a member that joins now is noticed without any call prompting it.
        with make_proxy(registry, group, "worker", "w1", driver=network.driver(), expected_peers={"master": 1}):
            while master.peers != {"worker": ["w1"]}:
                assert time.monotonic() < deadline, "the lease keeper stopped noticing members"
                master.poll(0.05)
