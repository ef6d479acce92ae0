"""Proxies in separate processes: real ZeroMQ between processes, a real redis-server, real crashes."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from proxy_helpers import PeerProcess, make_proxy, new_group, wait_for

from rallypoint import Message, SessionMessage, SessionType
from rallypoint.errors import PeerGone, Timeout

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def workers(registry_url):
    """Start N `peer.py worker` processes in a fresh group; yields a starter, tears all down."""
    started: list[PeerProcess] = []
    group = new_group()

    def start(count: int, *extra: str) -> list[PeerProcess]:
        batch = [PeerProcess("worker", registry_url, group, f"worker_{len(started) + i:03d}", *extra)
                 for i in range(count)]
        started.extend(batch)
        return batch

    start.group = group  # type: ignore[attr-defined]
    start.registry = registry_url  # type: ignore[attr-defined]
    yield start
    for peer in started:
        peer.close()


def _master(workers_fixture, count: int, **kwargs):
    return make_proxy(workers_fixture.registry, workers_fixture.group, "master", "master",
                      expected_peers={"worker": count}, **kwargs)


def test_every_primitive_against_worker_processes(workers):
    peers = workers(3)
    with _master(workers, 3) as master:
        for peer in peers:
            peer.wait_ready()
        names = master.peers["worker"]
        assert names == ["worker_000", "worker_001", "worker_002"]

        # send: blocking, returns the reply
        [reply] = master.send(SessionMessage(tag="sum", source="master", destination="worker_000",
                                             payload=[1, 2, 3]), timeout=10)
        assert reply.payload == 6 and master.session_stage(reply.session_id) == "complete"

        # isend + receive_by_id
        ids = [master.isend(Message(tag="echo", source="master", destination=n, payload=n))[0] for n in names]
        assert [m.payload for m in master.receive_by_id(ids, timeout=10)] == names

        # scatter / iscatter
        replies = master.scatter("sum", SessionType.TASK, [(n, [i, i]) for i, n in enumerate(names)], timeout=10)
        assert sorted((m.source, m.payload) for m in replies) == [(n, 2 * i) for i, n in enumerate(names)]
        sids = master.iscatter("echo", SessionType.TASK, [(n, i) for i, n in enumerate(names)])
        assert [m.payload for m in master.receive_by_id(sids, timeout=10)] == [0, 1, 2]

        # broadcast / ibroadcast: every live worker answers exactly once
        replies = master.broadcast("worker", "echo", SessionType.TASK, payload="hi", timeout=10)
        assert sorted(m.source for m in replies) == names and {m.payload for m in replies} == {"hi"}
        bids = master.ibroadcast("worker", "sum", SessionType.TASK, payload=[5])
        assert [m.payload for m in master.receive_by_id(bids, timeout=10)] == [5, 5, 5]
        assert {master.session_stage(s) for s in sids + bids} == {"complete"}

        # a big numpy array travels as zero-copy frames and arrives intact
        array = np.random.default_rng(1).random((1024, 1024))
        [shape] = master.send(Message(tag="shape", source="master", destination="worker_001", payload=array),
                              timeout=20)
        assert shape.payload == ((1024, 1024), "float64", pytest.approx(float(array.sum())))


def test_reply_timeout_names_the_session_and_returns_promptly(workers):
    workers(1)
    with _master(workers, 1) as master:
        task = SessionMessage(tag="slow", source="master", destination="worker_000", payload=5)
        started = time.monotonic()
        with pytest.raises(Timeout) as info:
            master.send(task, timeout=0.5)
        assert 0.4 < time.monotonic() - started < 2.0
        assert info.value.missing == (task.session_id,)
        assert "worker_000" in str(info.value)


def test_a_crashed_worker_fails_the_pending_call_fast_with_its_name(workers):
    workers(2)
    with _master(workers, 2) as master:
        crash = SessionMessage(tag="crash", source="master", destination="worker_001")
        started = time.monotonic()
        with pytest.raises(PeerGone) as info:
            master.send(crash, timeout=30)
        assert time.monotonic() - started < 5.0
        assert info.value.peer == "worker_001"
        assert master.session_stage(crash.session_id) == "failed"
        assert master.peers["worker"] == ["worker_000"]  # the live set follows
        # the survivor still works
        [reply] = master.send(SessionMessage(tag="sum", source="master", destination="worker_000",
                                             payload=[2]), timeout=10)
        assert reply.payload == 2


def test_scatter_with_one_worker_crashing_fails_naming_it_and_keeps_the_others_replies(workers):
    workers(3)
    with _master(workers, 3) as master:
        with pytest.raises(PeerGone) as info:
            ids = master.iscatter("sum", SessionType.TASK, [("worker_000", [1]), ("worker_002", [3])])
            ids += master.iscatter("crash", SessionType.TASK, [("worker_001", None)])
            master.receive_by_id(ids, timeout=20)
        assert info.value.peer == "worker_001"
        assert sorted(m.payload for m in info.value.replies) in ([1, 3], [1], [3], [])


def test_close_returns_promptly_with_a_dead_peer_and_unsent_messages(workers):
    [peer] = workers(1)
    master = _master(workers, 1)
    try:
        peer.wait_ready()
        peer.signal(signal.SIGSTOP)  # frozen: its socket is open but nothing is read
        for _ in range(200):
            master.isend(Message(tag="echo", source="master", destination="worker_000", payload=b"x" * 100_000))
    finally:
        started = time.monotonic()
        master.close()
        elapsed = time.monotonic() - started
        peer.signal(signal.SIGCONT)
    assert elapsed < 2.0


def test_peer_list_follows_a_worker_that_dies_and_rejoins_under_the_same_name(workers):
    [peer] = workers(1)
    with _master(workers, 1) as master:
        peer.wait_ready()
        assert master.peers == {"worker": ["worker_000"]}
        peer.kill()

        def peers_after_pumping():
            assert list(master.receive(timeout=0.05)) == []  # lets the master handle peer events
            return master.peers

        wait_for(lambda: peers_after_pumping() == {}, 10, "the master to drop the killed worker")
        peer.start()
        peer.wait_ready()
        wait_for(lambda: peers_after_pumping() == {"worker": ["worker_000"]}, 10,
                 "the restarted worker to be listed again")
        [reply] = master.send(SessionMessage(tag="sum", source="master", destination="worker_000", payload=[4]),
                              timeout=10)
        assert reply.payload == 4


def test_dist_launch_stops_on_sigterm_and_returns_cleanly(workers):
    [peer] = workers(1)
    with _master(workers, 1) as master:
        peer.wait_ready()
        # One answered message proves launch() is running (READY is printed just before it starts).
        [reply] = master.send(Message(tag="echo", source="master", destination="worker_000", payload=1),
                              timeout=10)
        assert reply.payload == 1
        peer.signal(signal.SIGTERM)
        assert peer.wait(10) == 0


def test_dist_launch_stops_from_a_handler(workers):
    [peer] = workers(1)
    with _master(workers, 1) as master:
        peer.wait_ready()
        master.isend(SessionMessage(tag="stop", source="master", destination="worker_000",
                                    session_type=SessionType.NOTIFICATION))
        assert peer.wait(10) == 0


def test_garbage_on_a_listening_socket_is_dropped_and_the_peer_keeps_serving(workers):
    import zmq

    [peer] = workers(1)
    with _master(workers, 1) as master:
        peer.wait_ready()
        address = master.member("worker_000").address
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(address)
        for junk in ([b""], [b"\x00" * 10], [b"garbage", b"more"], [b"\x93\x01\x02"] * 3, [b"\xff" * 70000]):
            sock.send_multipart(junk)
        sock.close()
        ctx.term()
        [reply] = master.send(SessionMessage(tag="sum", source="master", destination="worker_000",
                                             payload=[7]), timeout=10)
        assert reply.payload == 7


SEED_WORKER = textwrap.dedent(
    """
    from rallypoint import dist, Proxy

    # Initialize proxy instance for remote communication.
    proxy = Proxy(group_name="master-worker",
                  component_type="worker",
                  expected_peers=[("master", 1)])

    # Declare the trigger condition of rollout event.
    rollout_event = "master:rollout:1"

    # Implement rollout event handler logic.
    def on_rollout(that, proxy, messages):
        for message in messages:
            proxy.reply(message, payload="rolled out")
        proxy.stop()

    # Assemble event-handler directory.
    handler_dict = {rollout_event: on_rollout}

    # Convert a local functional class to a distributed one.
    @dist(proxy, handler_dict)
    class Worker:
        def __init__(self):
            pass

    print("READY", flush=True)
    Worker().launch()
    proxy.close()
    """
)


def test_the_seed_snippets_run_as_written(redis_server, monkeypatch):
    # The seed's Proxy() takes no registry argument: point the default at this test's Redis.
    monkeypatch.setenv("RALLYPOINT_REGISTRY", redis_server.url)
    from rallypoint import Message as SeedMessage
    from rallypoint import Proxy
    from rallypoint import SessionMessage as SeedSessionMessage
    from rallypoint import SessionType as SeedSessionType

    message = SeedMessage(tag="check_in", source="worker_001", destination="master", payload="")
    assert message.session_id and message.message_id
    task_message = SeedSessionMessage(tag="sum", source="master", destination="worker_001",
                                      payload=[0, 1, 2, ...], session_type=SeedSessionType.TASK)
    notification_message = SeedSessionMessage(tag="check_out", source="worker_001", destination="master",
                                              payload="", session_type=SeedSessionType.NOTIFICATION)
    assert task_message.session_stage == notification_message.session_stage == "request"

    worker = subprocess.Popen([sys.executable, "-c", SEED_WORKER], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with Proxy(group_name="master-worker", component_type="master", expected_peers=[("worker", 1)]) as master:
            [name] = master.peers["worker"]
            [reply] = master.send(SeedSessionMessage(tag="rollout", source=master.name, destination=name),
                                  timeout=10)
            assert reply.payload == "rolled out"
        assert worker.wait(10) == 0, worker.stderr.read().decode()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
