"""Every deadline holds when listed members are out of reach, and such members do not count as live.

A member the registry lists but whose address answers nobody (a crashed host, a firewall) cannot complete a
handshake. `broadcast`/`scatter` with `timeout=` open every channel at once and wait for the handshakes in
parallel, under the call's deadline: five such members cost one wait, not five `Timeouts.connect` in a row.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
from proxy_helpers import make_proxy, new_group

from rallypoint import SessionType
from rallypoint.errors import PeerUnreachable
from rallypoint.proxy import PeerRecord, RedisRegistry, Timeouts

pytestmark = pytest.mark.timeout(60)

UNREACHABLE = 5


def free_port() -> int:
    """A loopback port nobody listened on a moment ago (so connecting to it is refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _list_unreachable_workers(registry_url: str, group: str) -> list[str]:
    """Register members whose addresses nobody listens on (their ports were free a moment ago)."""
    registry = RedisRegistry(registry_url)
    try:
        names = [f"worker_ghost{i}" for i in range(UNREACHABLE)]
        for name in names:
            registry.register(group, PeerRecord.new(name, "worker", f"tcp://127.0.0.1:{free_port()}"), ttl=60)
        return names
    finally:
        registry.close()


def _answering(worker, stop: threading.Event) -> threading.Thread:
    def serve() -> None:
        while not stop.is_set():
            for message in worker.receive(timeout=0.2):
                worker.reply(message, payload=f"{worker.name}:{message.payload}")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_broadcast_with_unreachable_members_returns_within_its_timeout_with_the_replies_it_got(registry_url):
    group = new_group()
    timeouts = Timeouts(join=10.0, connect=5.0, reply=10.0, close=0.5)
    with make_proxy(registry_url, group, "master", "master", timeouts=timeouts) as master, \
            make_proxy(registry_url, group, "worker", "worker_real", expected_peers={"master": 1}) as worker:
        ghosts = _list_unreachable_workers(registry_url, group)
        master.refresh_peers()
        assert set(master.peers["worker"]) == {"worker_real", *ghosts}
        stop = threading.Event()
        server = _answering(worker, stop)
        try:
            started = time.monotonic()
            with pytest.raises(PeerUnreachable) as caught:
                master.broadcast("worker", "ping", SessionType.TASK, payload=1, timeout=2.0)
            elapsed = time.monotonic() - started
        finally:
            stop.set()
            server.join(5)
        # One parallel wait bounded by the call's 2 s, not 5 x connect=5 s one after another (25 s before).
        assert elapsed < 4.0, elapsed
        assert [reply.payload for reply in caught.value.replies] == ["worker_real:1"]
        assert caught.value.peer in ghosts


def test_scatter_to_unreachable_members_is_bounded_by_its_timeout_too(registry_url):
    group = new_group()
    with make_proxy(registry_url, group, "master", "master",
                    timeouts=Timeouts(join=10.0, connect=5.0, reply=10.0, close=0.5)) as master:
        ghosts = _list_unreachable_workers(registry_url, group)
        master.refresh_peers()
        started = time.monotonic()
        with pytest.raises(PeerUnreachable):
            master.scatter("ping", SessionType.TASK, [(ghost, 1) for ghost in ghosts], timeout=1.0)
        assert time.monotonic() - started < 3.0


def test_a_member_that_never_completes_its_handshake_does_not_count_as_live(registry_url):
    group = new_group()
    with make_proxy(registry_url, group, "master", "master",
                    timeouts=Timeouts(join=10.0, connect=0.5, reply=10.0, close=0.5)) as master, \
            make_proxy(registry_url, group, "worker", "worker_real", expected_peers={"master": 1}):
        ghosts = _list_unreachable_workers(registry_url, group)
        master.refresh_peers()
        with pytest.raises(PeerUnreachable):  # dials every listed worker: the ghosts never answer
            master.ibroadcast("worker", "ping", SessionType.NOTIFICATION, payload=1)
        deadline = time.monotonic() + 5.0
        while master.peers["worker"] != ["worker_real"]:  # out of reach for longer than Timeouts.connect
            assert time.monotonic() < deadline, master.peers
            master.poll(0.05)
        # So a percentage rule counts the one live worker, and a broadcast goes to it alone.
        assert len(master.ibroadcast("worker", "ping", SessionType.NOTIFICATION, payload=2)) == 1
        assert set(ghosts).isdisjoint(master.peers["worker"])
