"""RegisterTable against random message streams (hypothesis).

A deliberately naive reference model (scan every unit of every rule per message, evaluate every rule at
every get(), no caches, no dirty tracking) must produce exactly the same firings as the indexed table, and
the table must keep its invariants: no message handed to a rule twice, no unit over `max_buffered`, and
every message a rule took is either delivered, still buffered or counted as dropped.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from rallypoint.engine import Message, RegisterTable
from rallypoint.grammar import WILDCARD, And, Expr, Or, Unit, parse_rule

SOURCES = ["worker_1", "worker_2", "worker_10", "worker_22", "master", "reactor_1", "actor_1"]
TAGS = ["update", "sync", "ping"]
RULES = [
    "worker:update:2",
    "worker_1:update:1 OR worker:*:3",
    "worker:update:60% AND master:sync:1",
    "*:ping:2",
    "actor:*:1",
    "(worker_2:update:1 AND worker_1:update:2) OR *:sync:2",
    "worker:update:50%",
    "*:*:40% OR master:*:2",
    "worker_1:*:1 AND worker_10:update:1 AND worker_2:sync:1",
    "worker:*:2 OR worker:update:1",
    "*:sync:1 AND *:*:2",
]

PEER_VIEWS = [
    {"worker": ["worker_1", "worker_2", "worker_10"], "master": ["master"]},
    {"worker": ["worker_1", "worker_2", "worker_10", "worker_22"], "master": ["master"],
     "actor": ["actor_1"]},
    {"worker": ["worker_1"]},
    {},
]


class Reference:
    """The rule semantics written as plainly as possible."""

    def __init__(self, rules: list[Expr], max_buffered: int) -> None:
        self.rules = rules
        self.max_buffered = max_buffered
        self.units = [self._units(r) for r in rules]
        self.buffers: list[list[list[tuple[int, Message]]]] = [[[] for _ in us] for us in self.units]
        self.dropped = [0] * len(rules)
        self.peers: list[str] = []

    def _units(self, expr: Expr) -> list[Unit]:
        return [expr] if isinstance(expr, Unit) else [u for p in expr.parts for u in self._units(p)]

    def push(self, seq: int, message: Message) -> None:
        for r, units in enumerate(self.units):
            best = None
            for i, unit in enumerate(units):
                if unit.source != WILDCARD and not message.source.startswith(unit.source):
                    continue
                if unit.tag != WILDCARD and unit.tag != message.tag:
                    continue
                rank = (-1 if unit.source == WILDCARD else len(unit.source), unit.tag != WILDCARD, -i)
                if best is None or rank > best[0]:
                    best = (rank, i)
            if best is not None:
                buf = self.buffers[r][best[1]]
                if len(buf) >= self.max_buffered:
                    buf.pop(0)
                    self.dropped[r] += 1
                buf.append((seq, message))

    def need(self, unit: Unit) -> int:
        if not unit.percent:
            return unit.amount
        live = sum(1 for p in self.peers if unit.source == WILDCARD or p.startswith(unit.source))
        return max(1, math.ceil(unit.amount * live / 100 - 1e-9))

    def met(self, r: int, expr: Expr) -> bool:
        if isinstance(expr, Unit):
            buf = self.buffers[r][self.units[r].index(expr)]
            have = len({m.source for _, m in buf}) if expr.percent else len(buf)
            return have >= self.need(expr)
        if isinstance(expr, And):
            return all(self.met(r, p) for p in expr.parts)
        return any(self.met(r, p) for p in expr.parts)

    def take(self, r: int, expr: Expr, out: list[tuple[int, Message]]) -> None:
        if isinstance(expr, Unit):
            i = self.units[r].index(expr)
            buf = self.buffers[r][i]
            need = self.need(expr)
            if not expr.percent:
                out += buf[:need]
                del buf[:need]
                return
            seen: set[str] = set()
            keep = []
            for seq, m in buf:
                if len(seen) < need and m.source not in seen:
                    seen.add(m.source)
                    out.append((seq, m))
                else:
                    keep.append((seq, m))
            buf[:] = keep
        elif isinstance(expr, And):
            for p in expr.parts:
                self.take(r, p, out)
        else:
            assert isinstance(expr, Or)
            for p in expr.parts:
                if self.met(r, p):
                    self.take(r, p, out)
                    return

    def get(self) -> list[tuple[int, list[Message]]]:
        fired = []
        for r, expr in enumerate(self.rules):
            while self.met(r, expr):
                out: list[tuple[int, Message]] = []
                self.take(r, expr, out)
                fired.append((r, [m for _, m in sorted(out, key=lambda x: x[0])]))
        return fired


push_op = st.tuples(st.just("push"), st.sampled_from(SOURCES), st.sampled_from(TAGS))
get_op = st.tuples(st.just("get"), st.none(), st.none())
view_op = st.tuples(st.just("view"), st.integers(0, len(PEER_VIEWS) - 1), st.none())
ops = st.lists(st.one_of(push_op, push_op, push_op, get_op, view_op), max_size=120)


@settings(max_examples=300, deadline=None)
@given(
    rule_ids=st.lists(st.integers(0, len(RULES) - 1), min_size=1, max_size=6, unique=True),
    max_buffered=st.integers(1, 6),
    stream=ops,
)
def test_table_matches_the_reference_and_keeps_its_invariants(
    rule_ids: list[int], max_buffered: int, stream: list[tuple[str, Any, Any]]
) -> None:
    exprs = [parse_rule(RULES[i]) for i in rule_ids]
    view = {"current": PEER_VIEWS[0]}
    table = RegisterTable(lambda: view["current"], max_buffered=max_buffered)
    handlers = []
    for r, expr in enumerate(exprs):
        def handler(that: Any, proxy: Any, messages: list[Message], r: int = r) -> None: ...
        handlers.append(handler)
        table.register_event_handler(expr, handler)
    index_of = {h: r for r, h in enumerate(handlers)}
    ref = Reference(exprs, max_buffered)
    ref.peers = [n for ns in view["current"].values() for n in ns]

    delivered: list[Counter[str]] = [Counter() for _ in exprs]
    seq = 0

    def check_get() -> None:
        got = [(index_of[h], ms) for h, ms in table.get()]
        want = ref.get()
        assert [(r, [m.message_id for m in ms]) for r, ms in got] == [
            (r, [m.message_id for m in ms]) for r, ms in want
        ]
        for r, ms in got:
            delivered[r].update(m.message_id for m in ms)
            payloads = [m.payload for m in ms]
            assert payloads == sorted(payloads)  # arrival order
        assert table.get() == []  # a get() leaves no rule met

    for op, a, b in stream:
        if op == "push":
            seq += 1
            message = Message(tag=b, source=a, destination="me", payload=seq)
            table.push(message)
            ref.push(seq, message)
        elif op == "view":
            view["current"] = PEER_VIEWS[a]
            ref.peers = [n for ns in view["current"].values() for n in ns]
        else:
            check_get()
        for rule in table._rules:
            assert all(len(unit.buf) <= max_buffered for unit in rule.units)
    check_get()

    per_rule_dropped = {rule.label: rule.dropped for rule in table._rules}
    for r, rule in enumerate(table._rules):
        assert max(delivered[r].values(), default=1) == 1  # never handed to the same rule twice
        buffered = sum(len(unit.buf) for unit in rule.units)
        assert buffered == sum(len(b) for b in ref.buffers[r])
        assert per_rule_dropped[rule.label] == ref.dropped[r]
    assert table.dropped == sum(ref.dropped)
