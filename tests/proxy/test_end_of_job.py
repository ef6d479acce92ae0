"""The end of a job: close() delivers what it was handed and says goodbye after it; receivers take everything a
peer sent before leaving; a group whose expected peers all left (or are gone for good) ends; and the small
things met on the way (sources, rules that match nothing, illegal events, registry not up yet, notification
replies).

Most tests run real `job_peer.py` processes against a real redis-server; the rest use the in-process `pair`.
"""

from __future__ import annotations

import logging
import time

import pytest
from job_helpers import JobProcess, severe_lines
from proxy_helpers import make_proxy, new_group, wait_for

from rallypoint import Message, SessionMessage, SessionType, dist
from rallypoint.errors import ConfigError, PeerGone, PeerUnreachable
from rallypoint.proxy import RedisRegistry

pytestmark = pytest.mark.timeout(60)

FAST = ("--fast",)  # heartbeat 0.2 s, heartbeat_timeout 1.0 s, lease 2.0 s, refresh 0.2 s
EXIT_PEER_GONE = 3  # job_peer.py's status when launch() raised PeerGone


@pytest.fixture
def job(redis_server):
    """Start `job_peer.py` processes in a fresh group: `job(role, name, *options)`; all killed at teardown."""
    started: list[JobProcess] = []
    group = new_group()

    def spawn(role: str, name: str, *options: str) -> JobProcess:
        process = JobProcess(role, redis_server.url, group, name, *options)
        started.append(process)
        return process

    spawn.group = group  # type: ignore[attr-defined]
    spawn.registry = redis_server.url  # type: ignore[attr-defined]
    spawn.server = redis_server  # type: ignore[attr-defined]
    yield spawn
    for process in started:
        process.close()


def worker_names(count: int) -> list[str]:
    return [f"worker_{i:03d}" for i in range(count)]


def tasks_of(process: JobProcess) -> list[str]:
    return [line.split()[1] for line in process.lines("TASK ")]


# ---------------------------------------------------------------------------------------------------- 1

@pytest.mark.parametrize("run", range(5))
def test_close_right_after_a_burst_delivers_every_task_and_stop_to_busy_workers(job, run):
    """The issue's repro: handlers busy 1.5 s on their first task while the master sends the rest and a stop
    broadcast and closes at once; every worker still gets all 5 tasks, in order, and the stop."""
    workers = [job("worker", name, *FAST, "--slow-first", "1.5") for name in worker_names(3)]
    master = job("master", "master", *FAST, "--expect", "worker:3", "--plan", "burst", "--tasks", "5")
    assert master.wait(20) == 0, master.report()
    assert master.lines("SENT") == ["SENT 18"]  # 15 tasks + 3 stops handed to isend/ibroadcast before close()
    for worker in workers:
        assert worker.wait(20) == 0, worker.report()
        assert tasks_of(worker) == ["0", "1", "2", "3", "4"], worker.report()
        assert worker.lines("STOP") == ["STOP master"], worker.report()
        assert worker.lines("EXC") == [], worker.report()


# ---------------------------------------------------------------------------------------------------- 2

@pytest.mark.parametrize("master_expects", ["", "worker:1"], ids=["master-expects-nobody", "master-expects-worker"])
def test_a_master_whose_whole_life_fits_in_a_workers_join_is_still_heard(job, master_expects):
    """The worker registers and waits (join timeout 20 s) for a master that does not exist yet; the master
    joins, isends 3 tasks and a stop, and closes. The worker counts it as joined (it left, it did not fail
    the join) and its first launch() delivers everything."""
    worker = job("worker", "worker_000", "--join-timeout", "20")
    registry = RedisRegistry(job.registry)
    try:
        wait_for(lambda: "worker_000" in registry.members(job.group), 20, "the worker's registration")
    finally:
        registry.close()
    assert worker.lines("READY") == []  # still inside Proxy(...): no master has registered yet
    master = job("master", "master", "--expect", master_expects, "--to", "worker_000", "--plan", "burst",
                 "--tasks", "3")
    assert master.wait(20) == 0, master.report()
    assert master.lines("SENT") == ["SENT 4"]
    assert worker.wait(25) == 0, worker.report()
    assert tasks_of(worker) == ["0", "1", "2"], worker.report()
    assert worker.lines("STOP") == ["STOP master"], worker.report()


# ---------------------------------------------------------------------------------------------------- 3

def _workers_under_a_waiting_master(job, *worker_options: str) -> tuple[JobProcess, list[JobProcess]]:
    workers = [job("worker", name, *FAST, "--orphan-after", "1", *worker_options) for name in worker_names(3)]
    master = job("master", "master", *FAST, "--expect", "worker:3", "--plan", "wait")
    master.wait_line("READY")
    for worker in workers:
        worker.wait_line("READY")
    return master, workers


def test_workers_under_a_killed_master_leave_launch_with_peer_gone(job):
    master, workers = _workers_under_a_waiting_master(job)
    killed = time.monotonic()
    master.kill()
    for worker in workers:
        status = worker.wait(20)  # a hang fails here
        elapsed = time.monotonic() - killed
        assert status == EXIT_PEER_GONE, worker.report()
        [line] = worker.lines("EXC")
        assert line.startswith("EXC PeerGone master "), worker.report()
        assert worker.lines("RETURNED") == []
        assert "STATE master gone" in worker.lines("STATE"), worker.report()
        # detection (0.2 + 1.0 s) + orphan_after (1 s) + generous slack for a loaded 2-core machine
        assert elapsed < 10.0, f"{worker.name} took {elapsed:.1f}s to give up on the killed master"


def test_on_peer_gone_hook_is_called_instead_of_raising(job):
    master, workers = _workers_under_a_waiting_master(job, "--hook")
    master.kill()
    for worker in workers:
        assert worker.wait(20) == 0, worker.report()
        assert worker.lines("HOOK") == ["HOOK master"], worker.report()
        assert worker.lines("EXC") == [], worker.report()
        assert worker.lines("RETURNED") == ["RETURNED"]


def test_workers_under_a_master_that_closes_normally_return_from_launch(job):
    master, workers = _workers_under_a_waiting_master(job)
    master.send_line("close")
    assert master.wait(20) == 0, master.report()
    for worker in workers:
        assert worker.wait(20) == 0, worker.report()
        assert worker.lines("RETURNED") == ["RETURNED"], worker.report()
        assert worker.lines("EXC") == [], worker.report()
        assert "STATE master left" in worker.lines("STATE"), worker.report()


# ---------------------------------------------------------------------------------------------------- in-process

def test_a_peer_that_closed_is_left_its_last_message_delivered_and_logged_at_info(pair, caplog):
    master, worker, _ = pair
    caplog.set_level(logging.INFO, logger="rallypoint")
    assert worker.peer_state("master") == "up"
    master.isend(Message(tag="last", source="master", destination="worker_001", payload=1))
    master.close()
    # receive() ends once the only expected master has left (or, before the fix, after 10 s idle)
    assert [(m.tag, m.payload) for m in worker.receive(timeout=10)] == [("last", 1)]
    assert worker.peer_state("master") == "left"
    assert any(r.levelno == logging.INFO and "master" in r.getMessage() and "left" in r.getMessage()
               for r in caplog.records), caplog.text
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize("master_wrote_first", [True, False], ids=["master-had-written", "master-only-received"])
def test_a_session_waiting_on_a_peer_that_left_fails_with_peer_gone_saying_it_left(pair, master_wrote_first):
    """The master takes a task and closes without answering. Whether or not it ever sent the worker anything
    (a master that only receives has no channel of its own to the worker), the worker hears it left."""
    master, worker, _ = pair
    if master_wrote_first:
        master.isend(Message(tag="hello", source="master", destination="worker_001"))
        assert worker.receive_once(timeout=10).tag == "hello"
    [sid] = worker.isend(SessionMessage(tag="work", source="worker_001", destination="master", payload=2))
    task = master.receive_once(timeout=10)
    assert task.session_id == sid
    master.close()  # leaves without answering
    with pytest.raises(PeerGone) as info:
        worker.receive_by_id(sid, timeout=10)
    assert info.value.peer == "master"
    assert "left" in str(info.value)
    assert worker.peer_state("master") == "left"


# ---------------------------------------------------------------------------------------------------- 4

def test_a_message_with_another_source_is_refused_at_the_send_call(pair):
    master, worker, _ = pair
    calls = {"isend": lambda m: master.isend(m), "send": lambda m: master.send(m, timeout=5)}
    for what, call in calls.items():
        with pytest.raises(ConfigError) as info:
            call(SessionMessage(tag="t", source="impostor", destination="worker_001", payload=1))
        assert "impostor" in str(info.value) and "master" in str(info.value), (what, str(info.value))
    # nothing of the refused messages went out: the next message is the first the worker gets
    master.isend(Message(tag="after", source="master", destination="worker_001", payload=2))
    assert worker.receive_once(timeout=10).tag == "after"


@pytest.mark.parametrize("kind", [SessionMessage, Message], ids=["SessionMessage", "Message"])
def test_a_message_without_source_gets_the_senders_name(pair, kind):
    master, worker, _ = pair
    message = kind(tag="t", destination="worker_001", payload=1)
    master.isend(message)
    got = worker.receive_once(timeout=10)
    assert (got.tag, got.source, got.destination, got.payload) == ("t", "master", "worker_001", 1)
    assert got.message_id == message.message_id


# ---------------------------------------------------------------------------------------------------- 5

def test_a_rule_whose_source_can_match_no_peer_logs_one_warning(pair, caplog):
    master, worker, _ = pair
    caplog.set_level(logging.WARNING, logger="rallypoint")

    def handler(that, proxy, messages):
        pass

    @dist(worker, {"mastr:*:1": handler, "master:*:1": handler, "*:*:1": handler})
    class Worker:
        pass

    instance = Worker()
    worker.stop()  # the next launch() returns at once
    instance.launch(handle_sigterm=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    about_typo = [text for text in warnings if "mastr:*:1" in text]
    assert len(about_typo) == 1, warnings
    assert "master" in about_typo[0].replace("mastr:*:1", ""), about_typo  # names the known types
    assert len(warnings) == 1, warnings  # nothing about the rules that can match


# ---------------------------------------------------------------------------------------------------- 6

BALLOT = """
session ballot {
    states asked, voting, voted, failed
    initial asked
    final voted, failed
    asked -> voting on received
    voting -> voted on vote
    asked, voting -> failed on peer_lost
}
"""


def _illegal_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "vote" in r.getMessage()]


def test_a_first_message_whose_event_the_receivers_stage_cannot_take_is_warned_counted_delivered(pair, caplog):
    master, worker, _ = pair
    for proxy in (master, worker):
        proxy.catalog.load(BALLOT)
    caplog.set_level(logging.WARNING, logger="rallypoint")
    message = SessionMessage(tag="ballot", source="master", destination="worker_001", payload="x",
                             session_type="ballot", event="vote")  # "asked" takes no "vote"
    master.isend(message)
    got = worker.receive_once(timeout=10)
    assert (got.session_id, got.payload) == (message.session_id, "x")
    assert worker.stats.illegal_events == 1
    [warning] = _illegal_warnings(caplog)
    assert message.session_id in warning and "asked" in warning


def test_a_reply_whose_event_the_senders_stage_cannot_take_is_warned_counted_delivered(pair, caplog):
    master, worker, _ = pair
    for proxy in (master, worker):
        proxy.catalog.load(BALLOT)
    caplog.set_level(logging.WARNING, logger="rallypoint")
    [sid] = master.isend(SessionMessage(tag="ballot", source="master", destination="worker_001",
                                        session_type="ballot"))
    asked = worker.receive_once(timeout=10)
    assert worker.session_stage(sid) == "voting"
    worker.reply(asked, payload="yes", event="vote")  # voting -> voted here; the master is still at "asked"
    assert worker.session_stage(sid) == "voted"
    [answer] = master.receive_by_id(sid, timeout=10)
    assert answer.payload == "yes"
    assert master.stats.illegal_events == 1 and worker.stats.illegal_events == 0
    [warning] = _illegal_warnings(caplog)
    assert sid in warning


# ---------------------------------------------------------------------------------------------------- 7

@pytest.mark.parametrize("ending", ["master-leaves", "stop-then-leave"])
def test_a_normal_shutdown_of_the_whole_group_logs_no_warning_anywhere(job, ending):
    """Master + 3 workers, every process logging at INFO to stderr: a round of tasks, then the master closes
    (after a stop broadcast, or with none: the workers end because their only master left)."""
    workers = [job("worker", name, "--reply", "--log-level", "INFO") for name in worker_names(3)]
    stop = ("--stop",) if ending == "stop-then-leave" else ()
    master = job("master", "master", "--expect", "worker:3", "--plan", "round", "--log-level", "INFO", *stop)
    assert master.wait(20) == 0, master.report()
    assert "ROUND OK" in master.lines(), master.report()
    for worker in workers:
        assert worker.wait(20) == 0, worker.report()
        assert worker.lines("EXC") == [], worker.report()
    for process in [master, *workers]:
        assert severe_lines(process.stderr) == [], process.report()
    if ending == "master-leaves":
        for worker in workers:
            assert worker.lines("RETURNED") == ["RETURNED"], worker.report()
            assert any(line.startswith("INFO ") and "master" in line and "left" in line
                       for line in worker.stderr), worker.report()
            assert "STATE master left" in worker.lines("STATE"), worker.report()


# ---------------------------------------------------------------------------------------------------- 8

def test_members_started_before_the_registry_listens_join_once_it_does(job):
    job.server.stop()  # its port is free: nothing listens there yet
    workers = [job("worker", name, *FAST, "--reply") for name in worker_names(2)]
    master = job("master", "master", *FAST, "--expect", "worker:2", "--plan", "round", "--stop")
    members = [master, *workers]
    for process in members:
        process.wait_line("STARTING")
    time.sleep(1.0)  # the scenario itself: the registry comes up a second after the members first try it
    for process in members:
        assert process.proc.poll() is None and process.lines("READY") == [], process.report()  # still trying
    job.server.start()
    assert master.wait(30) == 0, master.report()
    assert "ROUND OK" in master.lines(), master.report()
    for worker in workers:
        assert worker.wait(20) == 0, worker.report()
        assert len(tasks_of(worker)) == 1 and worker.lines("STOP") == ["STOP master"], worker.report()


# ---------------------------------------------------------------------------------------------------- 9

def test_notification_replies_come_through_receive_never_through_the_call(job):
    names = worker_names(3)
    workers = [job("worker", name, *FAST, "--reply-notes") for name in names]
    with make_proxy(job.registry, job.group, "master", "master", expected_peers={"worker": 3}) as master:
        for worker in workers:
            worker.wait_line("READY")
        for run in range(20):
            assert master.scatter("note", SessionType.NOTIFICATION, [(n, run) for n in names], timeout=10) == []
            direct = SessionMessage(tag="note", source="master", destination=names[0], payload=("direct", run),
                                    session_type=SessionType.NOTIFICATION)
            assert master.send(direct, timeout=10) == []
            replies = [master.receive_once(timeout=10) for _ in range(4)]
            got = sorted((m.source, repr(m.payload)) for m in replies)
            want = sorted([(n, repr(("ack", n, run))) for n in names]
                          + [(names[0], repr(("ack", names[0], ("direct", run))))])
            assert got == want, f"run {run}"
            [direct_reply] = [m for m in replies if m.payload == ("ack", names[0], ("direct", run))]
            assert direct_reply.session_id == direct.session_id


def test_after_a_peer_left_a_notification_to_it_is_dropped_and_a_task_refused(registry_url):
    """A job's last messages race its end: a worker's notification (or reply) to a master that has just left is
    dropped and counted, not an error that would crash the worker; a request that waits for an answer still
    fails at once, since no answer can come."""
    group = new_group()
    master = make_proxy(registry_url, group, "master", "master")  # expects nobody: it never writes to the worker
    with make_proxy(registry_url, group, "worker", "worker_001", expected_peers={"master": 1}) as worker:
        master.poll(1.0)  # the master goes on with its work a moment, taking in the worker's hello
        master.close()  # so the worker hears it left, though the master never wrote to it
        deadline = time.monotonic() + 5
        while worker.peer_state("master") != "left":
            assert time.monotonic() < deadline, worker.peer_state("master")
            worker.poll(0.05)
        note = SessionMessage(tag="update", destination="master", payload=1, session_type=SessionType.NOTIFICATION)
        assert worker.isend(note) == [note.session_id]
        assert worker.stats.undelivered == 1
        with pytest.raises(PeerUnreachable, match="left"):
            worker.isend(SessionMessage(tag="task", destination="master", payload=2))
