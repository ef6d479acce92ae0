"""Chaos: rounds of scatter/iscatter/broadcast/ibroadcast from a master to 4 workers, while a thread kills
(SIGKILL) and restarts workers at random under the same names.

Every task session must end `complete` (with the right answer) or `failed`; none may hang (each wait is
bounded), none may be lost (no PeerGone/Timeout for it means its reply came), and no message may be taken
twice by a name over all its incarnations (the workers log every message id they take). Messages held while
a worker was down must be taken exactly once by a later incarnation.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest
from fault_helpers import pump_until, report
from proxy_helpers import FAST, make_proxy

from rallypoint import SessionType
from rallypoint.errors import DeliveryRefused, PeerGone, PeerUnreachable, Timeout
from rallypoint.proxy import HoldPolicy, Timeouts

pytestmark = pytest.mark.timeout(150)

WORKERS = 4
ROUNDS = 150
TIME_CAP = 30.0  # seconds for the rounds; the test as a whole stays under a minute
ROUND_MIN = 0.1  # a round lasts at least this long, so the rounds span many kills and restarts
REPLY_TIMEOUT = 2.5  # per round: a restart (~1 s) usually fits, so held messages are often answered in-round
SEED = 20261125


class Ledger:
    """What happened to every session the master started: its destination, expected answer and outcome."""

    def __init__(self) -> None:
        self.expected: dict[str, tuple[str, int]] = {}  # sid -> (destination, expected payload)
        self.outcome: dict[str, str] = {}  # sid -> "reply" | "failed" | "refused" | "timeout"
        self.held: set[str] = set()  # sids whose message was held for a gone worker at some point
        self.mismatches: list[str] = []

    def sent(self, sids: list[str], destinations: list[str], payloads: list[int]) -> None:
        for sid, dest, payload in zip(sids, destinations, payloads, strict=True):
            self.expected[sid] = (dest, payload)

    def replied(self, replies) -> None:
        for reply in replies:
            dest, payload = self.expected[reply.session_id]
            if (reply.source, reply.payload) != (dest, payload):
                self.mismatches.append(f"{reply.session_id}: {(reply.source, reply.payload)} != {(dest, payload)}")
            self.outcome[reply.session_id] = "reply"


def collect(master, ledger: Ledger, sids: list[str], timeout: float, *, retry_timeouts: bool = False) -> None:
    """Wait (bounded) for those of `sids` with no outcome yet (or a timeout, to retry); record outcomes."""
    pending = [s for s in sids if ledger.outcome.get(s) in ((None, "timeout") if retry_timeouts else (None,))]
    deadline = time.monotonic() + timeout
    while pending:
        try:
            ledger.replied(master.receive_by_id(pending, timeout=max(0.0, deadline - time.monotonic())))
            return
        except (PeerGone, DeliveryRefused) as exc:
            ledger.replied(exc.replies)
            kind = "failed" if isinstance(exc, PeerGone) else "refused"
            for sid in exc.session_ids:
                ledger.outcome[sid] = kind
        except Timeout as exc:
            ledger.replied(exc.replies)
            for sid in exc.missing:
                ledger.outcome[sid] = "timeout"
            return
        pending = [s for s in pending if s not in ledger.outcome]


def note_held(master, ledger: Ledger) -> None:
    ledger.held.update(master.held_sessions())


def record_error(ledger: Ledger, exc: Exception) -> None:
    ledger.replied(getattr(exc, "replies", []))
    if isinstance(exc, (PeerGone, DeliveryRefused)):
        for sid in exc.session_ids:  # type: ignore[union-attr]
            ledger.outcome[sid] = "failed" if isinstance(exc, PeerGone) else "refused"
    elif isinstance(exc, Timeout):  # the round's wait is over: these are retried once everyone is back
        for sid in exc.missing:
            if sid in ledger.expected:
                ledger.outcome[sid] = "timeout"


def batch_of(master, exc: Exception, before: set[str]) -> list[str]:
    """The sessions a primitive that raised had started: answered, failed, or still awaited."""
    sids = [r.session_id for r in getattr(exc, "replies", [])]
    sids += list(getattr(exc, "session_ids", ()) or ()) + list(getattr(exc, "missing", ()) or ())
    sids += sorted(set(master.awaiting_replies()) - before - set(sids))
    return [s for s in dict.fromkeys(sids) if master.session(s) is not None]  # Timeout.missing may name peers


def test_chaos_kills_and_restarts_lose_and_duplicate_nothing(workers):
    rng = random.Random(SEED)
    started = workers(WORKERS)
    by_name = {w.name: w for w in started}
    names = sorted(by_name)
    ledger = Ledger()
    kills: list[str] = []
    stop = threading.Event()
    killer_errors: list[BaseException] = []

    def killer() -> None:
        krng = random.Random(SEED + 1)
        try:
            while not stop.wait(krng.uniform(0.2, 0.7)):
                victims = krng.sample(started, 2 if krng.random() < 0.25 else 1)
                for victim in victims:
                    victim.sigkill()
                    kills.append(victim.name)
                stop.wait(krng.uniform(0.0, 0.8))  # down for a while, then back under the same name
                for victim in victims:
                    victim.start()
                for victim in victims:
                    victim.wait_ready(20)
        except BaseException as exc:  # reported by the test, not lost in a thread
            killer_errors.append(exc)

    with make_proxy(workers.registry, workers.group, "master", "master", expected_peers={"worker": WORKERS},
                    liveness=FAST, hold=HoldPolicy(max_messages=1000, max_age=60.0),
                    timeouts=Timeouts(join=20.0, connect=2.0, reply=REPLY_TIMEOUT, close=1.0)) as master:
        for worker in started:
            worker.wait_ready()
        thread = threading.Thread(target=killer, name="chaos-killer", daemon=True)
        thread.start()
        began = time.monotonic()
        rounds = 0
        counter = 0
        durations: list[float] = []
        round_started = None
        try:
            while rounds < ROUNDS and time.monotonic() - began < TIME_CAP:
                if round_started is not None:
                    durations.append(time.monotonic() - round_started)
                rounds += 1
                time.sleep(max(0.0, began + rounds * ROUND_MIN - time.monotonic()))
                round_started = time.monotonic()
                kind = rng.choice(["scatter", "iscatter", "broadcast", "ibroadcast"])
                slow = rng.random() < 0.3  # some tasks take a while, so kills land mid-task
                tag = "slow" if slow else "sum"
                if kind in ("scatter", "iscatter"):
                    dests = rng.sample(names, rng.randint(1, WORKERS))
                    payloads = []
                    for _ in dests:
                        counter += 1
                        payloads.append(counter)
                    plan = [(d, 0.2 if slow else [p, 0]) for d, p in zip(dests, payloads, strict=True)]
                    answers = ["done" if slow else p for p in payloads]
                    answer_of = dict(zip(dests, answers, strict=True))
                    before = set(master.awaiting_replies())
                    try:
                        if kind == "scatter":
                            replies = master.scatter(tag, SessionType.TASK, plan, timeout=REPLY_TIMEOUT)
                            sids = [r.session_id for r in replies]
                        else:
                            replies, sids = [], master.iscatter(tag, SessionType.TASK, plan)
                    except (PeerGone, DeliveryRefused, Timeout, PeerUnreachable) as exc:
                        sids = batch_of(master, exc, before)
                        dest_of = {s: master.session(s).peer for s in sids}
                        ledger.sent(sids, [dest_of[s] for s in sids], [answer_of[dest_of[s]] for s in sids])
                        note_held(master, ledger)
                        record_error(ledger, exc)
                        collect(master, ledger, sids, REPLY_TIMEOUT)
                        continue
                    dest_of = {s: master.session(s).peer for s in sids}
                    ledger.sent(sids, [dest_of[s] for s in sids], [answer_of[dest_of[s]] for s in sids])
                    ledger.replied(replies)
                    note_held(master, ledger)
                    collect(master, ledger, sids, REPLY_TIMEOUT)
                else:
                    counter += 1
                    payload = 0.2 if slow else [counter, 0]
                    answer = "done" if slow else counter
                    live = master.peers.get("worker", [])
                    if not live:
                        continue
                    before = set(master.awaiting_replies())
                    try:
                        if kind == "broadcast":
                            replies = master.broadcast("worker", tag, SessionType.TASK, payload=payload,
                                                       timeout=REPLY_TIMEOUT)
                            sids = [r.session_id for r in replies]
                        else:
                            replies, sids = [], master.ibroadcast("worker", tag, SessionType.TASK, payload=payload)
                    except (PeerGone, DeliveryRefused, Timeout, PeerUnreachable) as exc:
                        sids = batch_of(master, exc, before)
                        ledger.sent(sids, [master.session(s).peer for s in sids], [answer] * len(sids))
                        note_held(master, ledger)
                        record_error(ledger, exc)
                        collect(master, ledger, sids, REPLY_TIMEOUT)
                        continue
                    ledger.sent(sids, [master.session(s).peer for s in sids], [answer] * len(sids))
                    ledger.replied(replies)
                    note_held(master, ledger)
                    collect(master, ledger, sids, REPLY_TIMEOUT)
        finally:
            if round_started is not None:
                durations.append(time.monotonic() - round_started)
            stop.set()
            thread.join(30)
        elapsed = time.monotonic() - began
        assert not thread.is_alive() and not killer_errors, killer_errors

        # Everyone is back: what was still held or unanswered at a round's end must now complete or fail.
        for worker in started:
            assert worker.alive(), worker.stderr_text()
        pump_until(master, lambda: master.peers == {"worker": names}, 20, "every worker listed again")
        late = [s for s, o in ledger.outcome.items() if o == "timeout"]
        collect(master, ledger, late, 20.0, retry_timeouts=True)
        stages = {sid: master.session_stage(sid) for sid in ledger.expected}
        assert master.held() == 0

    assert not ledger.mismatches, ledger.mismatches[:5]
    unresolved = {sid: ledger.outcome.get(sid) for sid in ledger.expected
                  if ledger.outcome.get(sid) not in ("reply", "failed")}
    assert not unresolved, unresolved
    wrong_stage = {sid: (ledger.outcome[sid], stages[sid]) for sid in ledger.expected
                   if stages[sid] != {"reply": "complete", "failed": "failed"}[ledger.outcome[sid]]}
    assert not wrong_stage, wrong_stage

    # Exactly once: across every incarnation of a name, no message was taken twice; every answered session
    # was taken exactly once by its destination, every held-then-answered one too.
    taken: dict[str, Counter[str]] = {}
    duplicates = {}
    for worker in started:
        lines = worker.log_lines()
        duplicates.update({mid: n for mid, n in Counter(f[0] for f in lines).items() if n > 1})
        taken[worker.name] = Counter(f[1] for f in lines)  # by session id
    lost = [sid for sid, (dest, _) in ledger.expected.items()
            if ledger.outcome[sid] == "reply" and taken[dest][sid] != 1]
    held_answered = [sid for sid in ledger.held if ledger.outcome.get(sid) == "reply"]
    assert not duplicates, duplicates
    assert not lost, lost
    assert all(taken[ledger.expected[sid][0]][sid] == 1 for sid in held_answered)
    assert all(taken[ledger.expected[sid][0]][sid] <= 1 for sid in ledger.expected)

    # No round hangs: a send never waits on a channel known broken, so a round is its reply timeout at most.
    assert max(durations) < REPLY_TIMEOUT + 0.5, sorted(durations)[-5:]

    outcomes = Counter(ledger.outcome.values())
    report(f"chaos: {rounds} rounds in {elapsed:.1f}s (longest {max(durations):.2f}s), "
           f"{len(kills)} kills ({WORKERS} workers), "
           f"{len(ledger.expected)} task sessions: {outcomes.get('reply', 0)} complete, "
           f"{outcomes.get('failed', 0)} failed (PeerGone), {len(held_answered)} held then answered after a "
           f"restart; lost 0, duplicated {len(duplicates)}; master stats {master.stats.as_dict()}")
    assert len(kills) >= 10
