"""Holding for a gone peer is bounded and says so; delivery is at most once per receiver; a retry works."""

from __future__ import annotations

import logging
import time

import pytest
from fault_helpers import pump_until, wait_logged
from proxy_helpers import make_proxy, new_group

from rallypoint import Message, SessionMessage
from rallypoint.errors import DeliveryRefused, PeerGone, Timeout
from rallypoint.proxy import HoldPolicy

pytestmark = pytest.mark.timeout(60)


def _master(workers, count: int, **kwargs):
    return make_proxy(workers.registry, workers.group, "master", "master", expected_peers={"worker": count},
                      **kwargs)


def test_hold_bounds_refuse_loudly_by_count_and_by_age(workers, caplog):
    [worker] = workers(1)
    with _master(workers, 1, hold=HoldPolicy(max_messages=3, max_age=1.0)) as master:
        worker.wait_ready()
        worker.sigkill()
        pump_until(master, lambda: master.peers == {}, 10, "the worker gone")

        held = [master.isend(SessionMessage(tag="sum", source="master", destination=worker.name,
                                            payload=[i]))[0] for i in range(3)]
        with caplog.at_level(logging.WARNING, "rallypoint"), pytest.raises(DeliveryRefused) as refused:
            master.isend(SessionMessage(tag="sum", source="master", destination=worker.name, payload=[9]))
        assert refused.value.peer == worker.name and "HoldPolicy.max_messages" in caplog.text
        assert master.held(worker.name) == 3 and master.stats.refused == 1

        # Past max_age the waiting caller hears of it then, not at its own (longer) timeout.
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, "rallypoint"), pytest.raises(DeliveryRefused) as expired:
            master.receive_by_id(held, timeout=10)
        assert 0.5 < time.monotonic() - started < 2.0
        assert expired.value.peer == worker.name and set(expired.value.session_ids) == set(held)
        assert "HoldPolicy.max_age" in caplog.text
        assert master.held() == 0 and master.stats.held_expired == 3
        assert {master.session_stage(s) for s in held} == {"failed"}

        # Back again: nothing stale reaches it, new messages do.
        worker.start()
        worker.wait_ready()
        [reply] = master.send(SessionMessage(tag="sum", source="master", destination=worker.name, payload=[4]),
                              timeout=10)
        assert reply.payload == 4
    assert len(worker.log_ids()) == 1


def test_a_message_delivered_twice_is_taken_once(registry_url):
    group = new_group()
    with make_proxy(registry_url, group, "master", "master") as master, \
            make_proxy(registry_url, group, "worker", "worker_001", expected_peers={"master": 1}) as worker:
        message = Message(tag="n", source="master", destination="worker_001", payload=1)
        master.isend(message)
        master.isend(message)  # the same message id again (say, a caller retrying after an error)
        master.isend(Message(tag="n", source="master", destination="worker_001", payload=2))
        assert [worker.receive_once(timeout=5).payload for _ in range(2)] == [1, 2]
        with pytest.raises(Timeout):
            worker.receive_once(timeout=0.3)
        assert worker.stats.duplicates == 1


def test_resending_a_failed_task_reaches_the_restarted_worker_and_its_answer_counts(workers):
    [worker] = workers(1)
    with _master(workers, 1) as master:
        worker.wait_ready()
        task = SessionMessage(tag="slow", source="master", destination=worker.name, payload=30)
        [sid] = master.isend(task)
        wait_logged(worker, task.message_id)
        worker.sigkill()
        with pytest.raises(PeerGone):
            master.receive_by_id([sid], timeout=10)
        assert master.session_stage(sid) == "failed"

        worker.start()
        worker.wait_ready()
        retry = SessionMessage(tag="sum", source="master", destination=worker.name, payload=[20, 22],
                               session_id=sid)  # the same session, a new attempt
        [answer] = master.send(retry, timeout=10)
        assert answer.payload == 42 and master.session_stage(sid) == "complete"
    lines = worker.log_lines()
    assert [f[0] for f in lines] == [task.message_id, retry.message_id] and lines[0][3] != lines[1][3]
