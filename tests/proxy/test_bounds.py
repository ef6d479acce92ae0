"""Memory is bounded in bytes, not only in messages: the inbox and the messages held for a gone peer.

In one process, with the in-memory registry and driver: big messages that nobody takes push the oldest out of
the inbox once `max_buffered_bytes` is reached (counted, logged), and a gone peer's hold refuses a message that
would take it past `HoldPolicy.max_bytes`.
"""

from __future__ import annotations

import logging
import time

import pytest
from proxy_helpers import new_group

from rallypoint import Message
from rallypoint.errors import DeliveryRefused
from rallypoint.proxy import HoldPolicy, InMemoryNetwork, InMemoryRegistry, Proxy

pytestmark = pytest.mark.timeout(30)


def _pair(**worker_options):
    registry, network, group = InMemoryRegistry(), InMemoryNetwork(), new_group()
    master = Proxy(group_name=group, component_type="master", name="master", registry=registry,
                   driver=network.driver(), **worker_options.pop("master_options", {}))
    worker = Proxy(group_name=group, component_type="worker", name="worker", registry=registry,
                   driver=network.driver(), expected_peers={"master": 1}, **worker_options)
    return master, worker, network


def test_the_inbox_is_bounded_in_bytes_and_what_goes_is_counted(caplog):
    master, worker, _ = _pair(max_buffered_bytes=350_000)
    with master, worker:
        blob = b"x" * 100_000  # ~100 kB each on the wire: three fit under 350 kB, a fourth pushes one out
        for n in range(5):
            master.isend(Message(tag="blob", destination="worker", payload=(n, blob)))
        with caplog.at_level(logging.ERROR, logger="rallypoint"):
            worker.poll(0.5)  # take everything into the inbox, none of it claimed
        assert worker.stats.dropped_unclaimed == 2
        assert "unclaimed" in caplog.text
        assert [worker.receive_once(timeout=1).payload[0] for _ in range(3)] == [2, 3, 4]


def test_holding_for_a_gone_peer_is_bounded_in_bytes(caplog):
    master, worker, network = _pair(master_options={"hold": HoldPolicy(max_bytes=250_000)})
    with master, worker:
        master.isend(Message(tag="hello", destination="worker", payload=0))
        network.kill(worker.address)  # the worker crashes
        deadline = time.monotonic() + 5
        while master.peer_state("worker") != "gone":
            assert time.monotonic() < deadline
            master.poll(0.05)
        blob = b"y" * 100_000
        master.isend(Message(tag="blob", destination="worker", payload=blob))
        master.isend(Message(tag="blob", destination="worker", payload=blob))
        with caplog.at_level(logging.WARNING, logger="rallypoint"), pytest.raises(DeliveryRefused) as refused:
            master.isend(Message(tag="blob", destination="worker", payload=blob))
        assert "HoldPolicy.max_bytes" in str(refused.value) and master.held("worker") == 2
        assert master.stats.refused == 1


def test_churn_leaves_no_channels_to_peers_a_member_never_talks_to():
    """A worker restarting again and again (a new process under its name) is listed again each time, but the
    other workers, which never talk to it, open no channel to it: a churning group does not end fully meshed."""
    registry, network, group = InMemoryRegistry(), InMemoryNetwork(), new_group()

    def member(kind: str, name: str, expected: dict[str, int]) -> Proxy:
        return Proxy(group_name=group, component_type=kind, name=name, registry=registry,
                     driver=network.driver(), expected_peers=expected)

    with member("master", "master", {}) as master, member("worker", "steady", {"master": 1}) as steady:
        for _ in range(3):
            churner = member("worker", "churner", {"master": 1})
            steady.refresh_peers()
            assert "churner" in steady.peers["worker"]
            network.kill(churner.address)  # crashes: a new process under its name comes next
            churner.close()
            steady.refresh_peers()
        churner = member("worker", "churner", {"master": 1})
        steady.refresh_peers()
        assert steady.peers["worker"] == ["churner"]  # listed again, and live in its view
        assert steady.channels() == ["master"]  # but no channel to a peer it never talks to
        churner.close()
        master.refresh_peers()
