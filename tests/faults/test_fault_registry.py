"""The registry (a real redis-server) stops and restarts while a job runs: traffic goes on, peers
re-register (with the group key), and a peer joining afterwards gets the same key and is heard."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fault_helpers import pump_until, report
from proxy_helpers import make_proxy

from rallypoint import SessionMessage, SessionType
from rallypoint.proxy import RedisRegistry, Timeouts

pytestmark = pytest.mark.timeout(90)


def _round(master, names: list[str], counter: list[int]) -> list[str]:
    """One scatter of unique sums to every worker; returns the request message ids."""
    messages = []
    for name in names:
        counter[0] += 1
        messages.append((name, [counter[0], 1000]))
    replies = master.scatter("sum", SessionType.TASK, messages, timeout=10)
    assert sorted(r.payload for r in replies) == sorted(a + b for _, (a, b) in messages)
    time.sleep(0.01)  # a steady stream, not a flood: every session's stage stays on record to be checked
    return [r.session_id for r in replies]


@contextlib.contextmanager
def _master_and_two_workers(redis_server, workers) -> Iterator[tuple[Any, list, list[str]]]:
    """(master proxy, the two worker processes, their names), every one joined and ready."""
    started = workers(2)
    with make_proxy(redis_server.url, workers.group, "master", "master",
                    expected_peers={"worker": 2}) as master:
        for worker in started:
            worker.wait_ready()
        yield master, started, [w.name for w in started]


def _check_none_lost(master, sessions: list[str]) -> None:
    """Every task ended complete, and no frame was dropped on the way."""
    assert all(master.session_stage(s) == "complete" for s in sessions)
    assert master.stats.dropped_frames == 0


def _registry_key(url: str, group: str) -> bytes:
    """The group key the registry holds now."""
    registry = RedisRegistry(url)
    try:
        return registry.group_key(group, create=False)
    finally:
        registry.close()


def _check_none_twice(workers) -> None:
    """No worker took a message id twice, over all its incarnations."""
    taken = [mid for w in workers for mid in w.log_ids()]
    assert len(taken) == len(set(taken))


def test_registry_restarts_and_flaps_during_a_run(redis_server, workers):
    with _master_and_two_workers(redis_server, workers) as (master, started, names):
        key = _registry_key(redis_server.url, workers.group)
        counter = [0]
        sessions: list[str] = []
        sessions += _round(master, names, counter)

        # Down for longer than every lease (2 s): nothing can expire while Redis is down, and it comes
        # back empty, so every member must register again (and restore the key).
        redis_server.stop()
        until = time.monotonic() + 2.5
        while time.monotonic() < until:
            sessions += _round(master, names, counter)
        redis_server.start()
        until = time.monotonic() + 1.5
        while time.monotonic() < until:
            sessions += _round(master, names, counter)

        # Flapping: down and up twice in quick succession.
        for _ in range(2):
            redis_server.stop()
            sessions += _round(master, names, counter)
            redis_server.start()
            sessions += _round(master, names, counter)

        registry = RedisRegistry(redis_server.url)
        try:
            pump_until(master, lambda: set(registry.members(workers.group)) == {"master", *names}, 10,
                       "every member registered again")
            assert registry.group_key(workers.group, create=False) == key
        finally:
            registry.close()
        assert master.peers == {"worker": names} and master.stats.peers_lost == 0

        # A newcomer joins the running group with the same key: the master hears it and it answers.
        [newcomer] = workers(1)
        newcomer.wait_ready()
        pump_until(master, lambda: newcomer.name in master.peers.get("worker", []), 10, "the newcomer listed")
        [reply] = master.send(SessionMessage(tag="sum", source="master", destination=newcomer.name,
                                             payload=[40, 2]), timeout=10)
        assert reply.payload == 42
        sessions += _round(master, names + [newcomer.name], counter)
        _check_none_lost(master, sessions)
    _check_none_twice(started)
    report(f"registry restart + 2 flaps: {len(sessions)} tasks, 0 lost, 0 duplicated; peers re-registered, "
           "newcomer joined with the same key")


def test_a_member_joining_an_emptied_registry_brings_a_key_everyone_adopts(redis_server, workers):
    """Redis loses its data (a restart without persistence) and a member joins before any running one has
    re-registered: it creates a new group key and knows no other. The running members switch to that key
    when they re-register, accept frames still signed with the old one meanwhile, and nothing is lost."""
    with _master_and_two_workers(redis_server, workers) as (master, started, names):
        old_key = _registry_key(redis_server.url, workers.group)
        counter = [0]
        sessions = _round(master, names, counter)

        # Everything gone, and at once a new member's key in its place: one transaction, so that no running
        # member's refresh can put the old key back in between (the race this test is about).
        raw = redis.Redis.from_url(redis_server.url)
        registry = RedisRegistry(redis_server.url)
        try:
            pipe = raw.pipeline(transaction=True)
            pipe.flushall()
            pipe.set(registry._group_key_key(workers.group), os.urandom(32))
            pipe.execute()
            new_key = registry.group_key(workers.group, create=False)
            [newcomer] = workers(1)  # takes the new key: it is the only one the registry has
            newcomer.wait_ready()
            # Traffic on, while the running members re-register and switch one after the other.
            until = time.monotonic() + 2.0
            while time.monotonic() < until:
                sessions += _round(master, names, counter)
            pump_until(master, lambda: newcomer.name in master.peers.get("worker", []), 10, "the newcomer listed")
            assert registry.group_key(workers.group, create=False) == new_key  # nobody put the old one back
        finally:
            registry.close()
            raw.close()
        assert new_key != old_key and master.stats.rekeyed == 1
        # The newcomer knows only the new key: the master's tasks reach it, so the master signs with it.
        sessions += _round(master, names + [newcomer.name], counter)
        _check_none_lost(master, sessions)
    _check_none_twice(started)
    report(f"registry emptied, newcomer with a new key: {len(sessions)} tasks, 0 lost, 0 duplicated; the running "
           "members switched to the new key")


def test_close_does_not_wait_on_a_hanging_registry(redis_server):
    """A frozen registry (SIGSTOP: connections open, no answers) must not hold close() for its timeouts."""
    if redis_server.embedded:
        pytest.skip("needs a redis-server process to freeze")
    proxy = make_proxy(redis_server.url, f"g-{time.monotonic_ns()}", "solo",
                       timeouts=Timeouts(registry=2.0, close=0.5))
    try:
        os.kill(redis_server.pid, signal.SIGSTOP)
        time.sleep(0.5)  # the membership thread is now inside a call that will not be answered
        started = time.monotonic()
        proxy.close()
        elapsed = time.monotonic() - started
    finally:
        os.kill(redis_server.pid, signal.SIGCONT)
    report(f"close() with the registry frozen: {elapsed:.3f}s (registry timeout 2.0s, close timeout 0.5s)")
    assert elapsed < 0.5 + 0.5
