"""Engine micro-benchmarks, each against a baseline measured in the same run.

    python benchmarks/engine.py

1. building a SessionMessage (ids: our new_id) vs the anchor's way (two uuid.uuid1() calls) and uuid4;
2. parsing rules;
3. RegisterTable push+get throughput with 1..1000 registered rules vs a naive table that checks every rule
   for every message (as the anchor does);
4. session transitions and memory per live session with 100,000 live sessions vs one transitions.Machine
   per session (measured on fewer sessions, see the output);
5. spec compilation from 1,250 to 10,000 states: cost per transition against the smallest spec's (linear
   compilation keeps the ratio near 1), with the cyclic GC on (as in use) and off, the share that is
   transitions' own Machine construction, and parsing the 5,000-state spec's text for comparison.

Targets are printed as PASS/MISS for information; nothing here asserts on time. Runs in well under a minute.
"""

from __future__ import annotations

import gc
import statistics
import time
import timeit
import tracemalloc
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

from transitions import Machine

from rallypoint.engine import (
    Message,
    RegisterTable,
    SessionCatalog,
    SessionMessage,
    SessionTracker,
    SessionType,
    compile_session,
)
from rallypoint.engine._sessions import _build_machine
from rallypoint.grammar import SessionDef, TransitionDef, as_rule, parse_rule, parse_spec

ROWS: list[tuple[str, str, str, str, str]] = []


def row(what: str, value: str, baseline: str = "", ratio: str = "", verdict: str = "") -> None:
    ROWS.append((what, value, baseline, ratio, verdict))
    print(f"  {what:<52} {value:>14} {baseline:>26} {ratio:>9} {verdict}")


def header(title: str) -> None:
    print(f"\n{title}")
    print(f"  {'':<52} {'ours':>14} {'baseline':>26} {'ratio':>9}")


def per_call(stmt: Callable[[], Any], number: int, repeat: int = 5) -> float:
    """Best-of-`repeat` seconds per call."""
    return min(timeit.repeat(stmt, number=number, repeat=repeat)) / number


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.2f} us"


def verdict(ok: bool, target: str) -> str:
    return f"{'PASS' if ok else 'MISS'} (target {target})"


# -- 1. message construction ---------------------------------------------------------------------------------


class Uuid1Message:
    """The anchor's message: two uuid.uuid1() ids per message."""

    __slots__ = ("tag", "source", "destination", "payload", "session_id", "message_id", "session_type",
                 "session_stage")

    def __init__(self, tag: Any, source: str, destination: str, payload: Any = None,
                 session_type: Any = SessionType.TASK) -> None:
        self.tag, self.source, self.destination, self.payload = tag, source, destination, payload
        self.session_id = str(uuid.uuid1())
        self.message_id = str(uuid.uuid1())
        self.session_type = session_type
        self.session_stage = "request"


class Uuid4Message(Uuid1Message):
    def __init__(self, tag: Any, source: str, destination: str, payload: Any = None,
                 session_type: Any = SessionType.TASK) -> None:
        self.tag, self.source, self.destination, self.payload = tag, source, destination, payload
        self.session_id = str(uuid.uuid4())
        self.message_id = str(uuid.uuid4())
        self.session_type = session_type
        self.session_stage = "request"


def bench_messages() -> None:
    header("1. building a SessionMessage (two ids each)")
    payload = [0, 1, 2]

    def ours() -> None:
        SessionMessage(tag="sum", source="master", destination="worker_001", payload=payload,
                       session_type=SessionType.TASK)

    def anchor() -> None:
        Uuid1Message(tag="sum", source="master", destination="worker_001", payload=payload)

    def v4() -> None:
        Uuid4Message(tag="sum", source="master", destination="worker_001", payload=payload)

    t_ours = per_call(ours, 50_000)
    t_uuid1 = per_call(anchor, 20_000)
    t_uuid4 = per_call(v4, 20_000)
    row("SessionMessage(...)  vs  2 x uuid.uuid1()", us(t_ours), us(t_uuid1), f"{t_uuid1 / t_ours:.1f}x",
        verdict(t_ours <= 2e-6, "<= 2 us"))
    row("SessionMessage(...)  vs  2 x uuid.uuid4()", us(t_ours), us(t_uuid4), f"{t_uuid4 / t_ours:.1f}x")
    positional = per_call(
        lambda: SessionMessage("sum", "master", "worker_001", payload, SessionType.TASK), 50_000
    )
    row("SessionMessage(...) with positional arguments", us(positional), "", "",
        "(the same call, positional)")
    row("Message(...) with keyword arguments",
        us(per_call(lambda: Message(tag="sum", source="master", destination="worker_001", payload=payload),
                    50_000)))
    ids = set()
    for _ in range(100_000):
        m = Message("t", "a", "b")
        ids.add(m.session_id)
        ids.add(m.message_id)
    valid = all(str(uuid.UUID(i)) == i and uuid.UUID(i).version == 4 for i in list(ids)[:1000])
    row("ids: unique over 200,000, RFC 4122 v4 text", f"{len(ids):,}", "", "",
        verdict(len(ids) == 200_000 and valid, "all unique, valid"))


# -- 2. rule parsing -----------------------------------------------------------------------------------------


def bench_parse() -> None:
    header("2. parsing rules")
    simple = "worker:update:60%"
    mixed = "(worker_01:update:2 AND worker_02:update:3) OR worker_03:update:1"
    seed_tuple = (("worker_01:update:2", "worker_02:update:3", "AND"), "worker_03:update:1", "OR")
    row(f"parse_rule({simple!r})", us(per_call(lambda: parse_rule(simple), 2_000)))
    row("parse_rule(seed mix, text)", us(per_call(lambda: parse_rule(mixed), 1_000)))
    row("as_rule(seed mix, tuple form)", us(per_call(lambda: as_rule(seed_tuple), 1_000)))


# -- 3. register table throughput ----------------------------------------------------------------------------


class NaiveTable:
    """The anchor's approach: every message is checked against every unit of every rule (by substring), and
    every rule is evaluated at every get()."""

    def __init__(self) -> None:
        self.rules: list[tuple[list[tuple[str, str, int]], Callable[..., Any], list[list[Message]]]] = []

    def register_event_handler(self, text: str, handler: Callable[..., Any]) -> None:
        units = [(u.source, u.tag, u.amount) for u in [parse_rule(text)]]  # single-unit rules here
        self.rules.append((units, handler, [[] for _ in units]))

    def push(self, message: Message) -> None:
        for units, _, buffers in self.rules:
            for (source, tag, _), buf in zip(units, buffers, strict=True):
                if source in message.source and tag == message.tag:
                    buf.append(message)

    def get(self) -> list[tuple[Callable[..., Any], list[Message]]]:
        out = []
        for units, handler, buffers in self.rules:
            while all(len(buf) >= amount for (_, _, amount), buf in zip(units, buffers, strict=True)):
                taken = []
                for (_, _, amount), buf in zip(units, buffers, strict=True):
                    taken += buf[:amount]
                    del buf[:amount]
                out.append((handler, taken))
        return out


def throughput(table: Any, messages: list[Message]) -> float:
    """Messages per second for push-then-get of each message (the proxy's receive loop)."""
    push, get = table.push, table.get
    gc.collect()
    start = time.perf_counter()
    fired = 0
    for m in messages:
        push(m)
        fired += len(get())
    elapsed = time.perf_counter() - start
    assert fired == len(messages), (fired, len(messages))  # each message meets exactly one rule once
    return len(messages) / elapsed


def bench_table() -> None:
    header("3. RegisterTable push+get, rule i = worker_{i}:update:1, each message meets one rule")

    def handler(that: Any, proxy: Any, messages: list[Message]) -> None: ...

    results: dict[int, float] = {}
    for n in (1, 10, 100, 1000):
        sources = [f"worker_{i:04d}" for i in range(n)]
        messages = [Message("update", sources[j % n], "master", j) for j in range(60_000)]
        best = []
        for _ in range(3):
            table = RegisterTable()
            for i in range(n):
                table.register_event_handler(f"worker_{i:04d}:update:1", handler)
            best.append(throughput(table, messages))
        results[n] = max(best)
        naive = NaiveTable()
        for i in range(n):
            naive.register_event_handler(f"worker_{i:04d}:update:1", handler)
        naive_count = min(60_000, 3_000_000 // n)
        naive_rate = throughput(naive, messages[:naive_count])
        row(f"{n:>5} rules: messages/s (naive on {naive_count:,} msgs)", f"{results[n]:,.0f}",
            f"{naive_rate:,.0f}", f"{results[n] / naive_rate:.1f}x")
    ratio = results[1000] / results[1]
    row("throughput(1000 rules) / throughput(1 rule)", f"{ratio:.2f}", "", "",
        verdict(ratio >= 0.5, ">= 0.5"))

    # Percentages and AND rules, for a feel of the slower paths (not a target).
    peers = {"worker": [f"worker_{i}" for i in range(10)], "master": ["master"]}
    table = RegisterTable(peers)
    table.register_event_handler("worker:update:60% AND master:sync:1", handler)
    stream = []
    for r in range(5_000):
        stream += [Message("update", f"worker_{i}", "master", r) for i in range(6)]
        stream.append(Message("sync", "master", "master", r))
    gc.collect()
    start = time.perf_counter()
    fired = 0
    for m in stream:
        table.push(m)
        fired += len(table.get())
    elapsed = time.perf_counter() - start
    assert fired == 5_000
    row("worker:update:60% AND master:sync:1, messages/s", f"{len(stream) / elapsed:,.0f}")


# -- 4. sessions ---------------------------------------------------------------------------------------------

LIVE = 100_000
NAIVE = 2_000


class Model:
    """A model object for the transitions baselines."""


def bench_sessions() -> None:
    header(f"4. sessions: {LIVE:,} live via SessionTracker; baseline: a Machine per session on {NAIVE:,}")
    task = SessionCatalog().require(SessionType.TASK)
    ids = [f"{uuid.uuid4()}" for _ in range(LIVE)]

    # Time: start, then two transitions each (received, completed).
    tracker = SessionTracker(max_finished=LIVE)
    gc.collect()
    t0 = time.perf_counter()
    for sid in ids:
        tracker.start(sid, task, "worker_001")
    t1 = time.perf_counter()
    fire = tracker.fire
    for sid in ids:
        fire(sid, "received")
    t2 = time.perf_counter()
    for sid in ids:
        fire(sid, "completed")
    t3 = time.perf_counter()
    assert tracker.live == 0 and tracker.finished == LIVE
    per_start = (t1 - t0) / LIVE
    per_fire = ((t2 - t1) + (t3 - t2)) / (2 * LIVE)

    # Memory: tracemalloc over starting LIVE sessions (ids made beforehand, as the messages carry them).
    del tracker
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    tracker = SessionTracker()
    for sid in ids:
        tracker.start(sid, task, "worker_001")
    per_session = (tracemalloc.get_traced_memory()[0] - before) / LIVE
    tracemalloc.stop()
    del tracker

    # Baseline A: one Machine per session (the naive way).
    states = [{"name": s, "final": s in task.finals} for s in task.states]
    transitions = [{"trigger": e, "source": src, "dest": dst} for src, e, dst in task.edges()]
    models = [Model() for _ in range(NAIVE)]
    gc.collect()
    t0 = time.perf_counter()
    machines = [Machine(model=m, states=states, transitions=transitions, initial=task.initial,
                        auto_transitions=False) for m in models]
    t1 = time.perf_counter()
    for m in models:
        m.trigger("received")  # type: ignore[attr-defined]
    for m in models:
        m.trigger("completed")  # type: ignore[attr-defined]
    t2 = time.perf_counter()
    naive_start = (t1 - t0) / NAIVE
    naive_fire = (t2 - t1) / (2 * NAIVE)
    del machines, models
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    models = [Model() for _ in range(NAIVE)]
    machines = [Machine(model=m, states=states, transitions=transitions, initial=task.initial,
                        auto_transitions=False) for m in models]
    naive_mem = (tracemalloc.get_traced_memory()[0] - before) / NAIVE
    tracemalloc.stop()
    del machines, models

    # Baseline B: one shared Machine, add_model per session, firing through the machine's events.
    shared = Machine(model=None, states=states, transitions=transitions, initial=task.initial,
                     auto_transitions=False)
    models = [Model() for _ in range(NAIVE)]
    gc.collect()
    t0 = time.perf_counter()
    for m in models[:100]:
        shared.add_model(m)
    first_100 = (time.perf_counter() - t0) / 100
    for m in models[100:]:
        shared.add_model(m)
    t1 = time.perf_counter()
    received, completed = shared.events["received"], shared.events["completed"]
    for m in models:
        received.trigger(m)
    for m in models:
        completed.trigger(m)
    t2 = time.perf_counter()
    shared_start = (t1 - t0) / NAIVE
    shared_fire = (t2 - t1) / (2 * NAIVE)

    row("start a session  vs  Machine(model=...) per session", us(per_start), us(naive_start),
        f"{naive_start / per_start:.0f}x")
    row("start a session  vs  shared Machine.add_model", us(per_start), us(shared_start),
        f"{shared_start / per_start:.0f}x", f"(first 100: {us(first_100)}; add_model scans a list)")
    row("transition (tracker.fire)  vs  model.trigger()", us(per_fire), us(naive_fire),
        f"{naive_fire / per_fire:.0f}x", verdict(per_fire <= 10e-6, "<= 10 us"))
    row("transition (tracker.fire)  vs  shared event.trigger()", us(per_fire), us(shared_fire),
        f"{shared_fire / per_fire:.0f}x")
    row("memory per live session  vs  Machine per session", f"{per_session:.0f} B", f"{naive_mem:,.0f} B",
        f"{naive_mem / per_session:.0f}x", verdict(per_session <= 1024, "<= 1 KiB"))

    session = task.start("x")
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(20_000):
            session.state = "request"
            session.trigger("received")
        samples.append((time.perf_counter() - t0) / 20_000)
    row("Session.trigger() alone", us(min(samples)), "", "", f"(median {us(statistics.median(samples))})")


# -- 5. spec compilation ------------------------------------------------------------------------------------

COMPILE_SIZES = [(1_250, 5_000), (2_500, 10_000), (5_000, 20_000), (5_000, 50_000), (10_000, 100_000)]


def big_session(states: int, transitions: int) -> SessionDef:
    """One session: a chain through every state (all reachable), then extra edges up to `transitions`."""
    names = tuple(f"s{i}" for i in range(states))
    chain = [TransitionDef((names[i],), names[i + 1], "next") for i in range(states - 1)]
    extra = [
        TransitionDef((names[i % (states - 1)],), names[(i * 7) % states], f"e{i // (states - 1)}")
        for i in range(transitions - (states - 1))
    ]
    return SessionDef("big", names, "s0", (names[-1],), tuple(chain + extra))


def spec_text(defn: SessionDef) -> str:
    lines = [f"session {defn.name} {{", f" states {', '.join(defn.states)}", f" initial {defn.initial}",
             f" final {', '.join(defn.finals)}"]
    lines += [f" {', '.join(t.sources)} -> {t.dest} on {t.event}" for t in defn.transitions]
    return "\n".join(lines) + "\n}\n"


def best_of(repeat: int, stmt: Callable[[], object], collect: bool) -> float:
    """Best of `repeat` runs, each after a full collection; with `collect`, the cyclic GC runs as in use."""
    samples = []
    for _ in range(repeat):
        gc.collect()
        if collect:
            gc.enable()
        t0 = time.perf_counter()
        stmt()
        samples.append(time.perf_counter() - t0)
        gc.disable()
    return min(samples)


def bench_compile() -> None:
    header("5. spec compilation: per transition, against the smallest spec (GC on, as in use; and off)")
    base: tuple[float, float] | None = None
    for states, transitions in COMPILE_SIZES:
        defn = big_session(states, transitions)
        on = best_of(3, partial(compile_session, defn), collect=True)
        off = best_of(3, partial(compile_session, defn), collect=False)
        machine = best_of(3, partial(_build_machine, defn, defn.finals), collect=False)
        per_on, per_off = on / transitions, off / transitions
        base = base or (per_on, per_off)
        row(f"{states:,} states, {transitions:,} transitions", f"{on * 1e3:.0f} ms",
            f"{per_on * 1e6:.1f} us/transition", f"{per_on / base[0]:.2f}x",
            f"GC off: {per_off * 1e6:.1f} us, {per_off / base[1]:.2f}x; Machine {machine / off:.0%} of it")
        if (states, transitions) == (5_000, 20_000):
            row("  target: 5,000 states compile well under 1 s", f"{on:.2f} s", "", "",
                verdict(on < 0.5, "< 0.5 s"))
            text = spec_text(defn)
            parsed = best_of(1, partial(parse_spec, text), collect=True)
            row(f"  parse_spec of that spec's text ({len(text) / 1e6:.2f} MB)", f"{parsed * 1e3:.0f} ms", "",
                "", "(Lark's LALR parser; not part of compiling)")


def main() -> None:
    start = time.perf_counter()
    print("rallypoint engine benchmarks (best of several runs; ratios are baseline/ours unless noted)")
    # As timeit does: no automatic cyclic GC while measuring, so a collection caused by one benchmark's
    # garbage does not land in another's timing. Each section collects explicitly before it measures.
    gc.collect()
    gc.disable()
    try:
        bench_messages()
        bench_parse()
        bench_table()
        bench_sessions()
        bench_compile()
    finally:
        gc.enable()
    print(f"\ntotal {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
