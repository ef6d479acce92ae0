"""Processes that die or freeze: detection time, PeerGone, holding for a restart, close() and leases.

The master runs with the default `Liveness` (so the default detection bound is what is measured); the
workers are `tests/proxy/peer.py` processes.
"""

from __future__ import annotations

import signal
import time

import pytest
from fault_helpers import pump_until, report, summary, time_to_peer_gone, wait_logged
from proxy_helpers import make_proxy

from rallypoint import SessionMessage, SessionType
from rallypoint.proxy import Liveness, Timeouts

pytestmark = pytest.mark.timeout(90)

DEFAULT = Liveness()
BOUND = 3.0  # the bound for the default settings
TIMEOUTS = Timeouts(join=20.0, connect=3.0, reply=20.0, close=1.0)


def _master(workers, count: int, **kwargs):
    kwargs.setdefault("liveness", DEFAULT)
    kwargs.setdefault("timeouts", TIMEOUTS)
    return make_proxy(workers.registry, workers.group, "master", "master", expected_peers={"worker": count},
                      **kwargs)


def _task(tag: str, to: str, payload) -> SessionMessage:
    return SessionMessage(tag=tag, source="master", destination=to, payload=payload)


def test_sigkill_mid_task_fails_fast_and_held_messages_reach_the_restarted_worker_once(workers):
    survivor, victim = workers(2)
    with _master(workers, 2) as master:
        for worker in (survivor, victim):
            worker.wait_ready()
        slow = _task("slow", victim.name, 30)
        [sid] = master.isend(slow)
        wait_logged(victim, slow.message_id)  # it is working on it now

        victim.sigkill()
        killed = time.monotonic()
        elapsed, exc = time_to_peer_gone(master, sid, killed)
        report(f"SIGKILL mid-task -> PeerGone: {elapsed:.3f}s")
        assert elapsed < BOUND
        assert exc.peer == victim.name and victim.name in str(exc) and sid in exc.session_ids
        assert master.session_stage(sid) == "failed"
        assert master.peers == {"worker": [survivor.name]}

        # While it is gone: messages for it are held, the survivor is served as usual.
        held = [_task("sum", victim.name, [i, 100]) for i in range(5)]
        held_ids = [master.isend(m)[0] for m in held]
        mixed = master.iscatter("sum", SessionType.TASK, [(survivor.name, [1]), (victim.name, [2])])
        assert master.held(victim.name) == 6
        [early] = master.receive_by_id(mixed[:1], timeout=10)
        assert early.payload == 1

        victim.start()  # same name, new process, new port
        victim.wait_ready()
        replies = master.receive_by_id(held_ids + mixed[1:], timeout=20)
        assert [r.payload for r in replies] == [i + 100 for i in range(5)] + [2]
        assert all(master.session_stage(s) == "complete" for s in held_ids + mixed)
        assert master.held() == 0 and master.peers == {"worker": sorted([survivor.name, victim.name])}

        # The job completes: both answer a last round.
        final = master.scatter("sum", SessionType.TASK, [(survivor.name, [7]), (victim.name, [8])], timeout=10)
        assert sorted(m.payload for m in final) == [7, 8]

    ids = victim.log_ids()
    assert victim.duplicates() == {}
    assert ids.count(slow.message_id) == 1  # taken by the first incarnation only
    for message in held:
        assert ids.count(message.message_id) == 1
    # The held ones went to the second incarnation, in the order they were sent.
    pids = {fields[0]: fields[3] for fields in victim.log_lines()}
    assert pids[slow.message_id] != pids[held[0].message_id]
    assert [i for i in ids if i in {m.message_id for m in held}] == [m.message_id for m in held]


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_detection_time_with_default_liveness(workers, how):
    """A pending call raises PeerGone naming the worker within the default bound, each time."""
    [worker] = workers(1)
    samples = []
    with _master(workers, 1) as master:
        worker.wait_ready()
        for _ in range(3):
            task = _task("slow", worker.name, 1.0 if how == "SIGSTOP" else 30)
            [sid] = master.isend(task)
            wait_logged(worker, task.message_id)
            if how == "SIGKILL":
                worker.sigkill()
            else:
                worker.signal(signal.SIGSTOP)
            started = time.monotonic()
            elapsed, exc = time_to_peer_gone(master, sid, started)
            samples.append(elapsed)
            assert exc.peer == worker.name and master.session_stage(sid) == "failed"
            assert master.peers == {}
            if how == "SIGKILL":
                worker.start()
                worker.wait_ready()
            else:
                worker.signal(signal.SIGCONT)  # the same process comes back: heartbeats resume
            pump_until(master, lambda: master.peers == {"worker": [worker.name]}, 15, f"{worker.name} back")
            [echo] = master.send(_task("sum", worker.name, [3]), timeout=10)
            assert echo.payload == 3
    summary(f"detection {how} (default Liveness, bound {DEFAULT.detection}s)", samples)
    assert max(samples) < BOUND


def test_close_is_bounded_with_a_dead_and_a_frozen_peer_and_unsent_messages(workers):
    dead, frozen = workers(2)
    master = _master(workers, 2)
    try:
        dead.wait_ready()
        frozen.wait_ready()
        dead.sigkill()
        frozen.signal(signal.SIGSTOP)
        pump_until(master, lambda: dead.name not in master.peers.get("worker", []), 10, "the dead one gone")
        for i in range(20):
            master.isend(_task("sum", dead.name, [i]))  # held
        for _ in range(200):  # queued for a process that reads nothing
            master.isend(SessionMessage(tag="echo", source="master", destination=frozen.name, payload=b"x" * 100_000))
    finally:
        started = time.monotonic()
        master.close()
        elapsed = time.monotonic() - started
        frozen.signal(signal.SIGCONT)
    report(f"close() with a dead peer (20 held) and a frozen one (200 x 100 kB queued): {elapsed:.3f}s")
    assert elapsed < TIMEOUTS.close + 1.0


def test_a_process_killed_without_close_does_not_make_a_joiner_wait_past_its_lease(workers):
    """A stale registration (SIGKILL, no unregister) costs a joiner at most the lease, never a JoinTimeout."""
    live, dead = workers(2)
    lease = Liveness(lease=2.0, refresh=0.2, heartbeat=0.2, heartbeat_timeout=1.0)
    # A first master lets both workers finish joining (they expect one). It stays: a master that left would end
    # the workers' job (they return from launch() once every master they expect has left).
    with _master(workers, 2, liveness=lease):
        live.wait_ready()
        dead.wait_ready()
        dead.sigkill()  # its entry stays in the registry until its lease (2 s in peer.py) lapses
        started = time.monotonic()
        with make_proxy(workers.registry, workers.group, "master", "master_2", expected_peers={"worker": 1},
                        liveness=lease, timeouts=TIMEOUTS) as master:
            joined = time.monotonic() - started
            assert master.peers["worker"] == [live.name]
    report(f"join with a SIGKILLed member still listed: {joined:.3f}s (its lease: 2.0s)")
    assert joined < 2.0 + 2.0
