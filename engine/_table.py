"""The conditional event register table: buffer messages per rule, report the rules that are met.

    >>> table = RegisterTable(peers={"worker": ["worker_1", "worker_2", "worker_3"]})
    >>> table.register_event_handler("worker:update:60%", on_update)
    >>> for m in incoming: table.push(m)
    >>> for handler, messages in table.get(): handler(that, proxy, messages)

The table never calls handlers (the caller does, on its own thread) and never reads a clock.

Semantics (DESIGN.md, "The rule language"):
- Every registered rule sees every message; each rule has its own buffers (one per unit).
- Within one rule a message goes to at most one unit: the one with the longest matching source prefix; on a
  tie the unit with the exact tag beats `*`. (Two units with the same source and tag in one rule are refused
  at registration, so no further tie-break is needed.)
- A count unit `src:tag:N` is met by N buffered messages. A percentage unit `src:tag:P%` is met by messages
  from ceil(P% of the live peers whose name starts with `src`), at least 1, DISTINCT sources; a second
  message from the same peer stays buffered for the next round. The live count is re-read at every get().
- get() returns, in registration order, one `(handler, messages)` per time a rule is met, with exactly the
  messages that met it (AND: all parts; OR: the first part that is met) in arrival order, and removes them.

Cost: push() looks the message's (source, tag) up in a route cache (filled, on a miss, with one dict lookup
per distinct unit prefix length), so it costs O(rules the message matches), not O(registered rules). get()
evaluates only the rules whose buffers changed since the last get(), plus percentage rules holding messages
when the peer view changed.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Union

from rallypoint.errors import ConfigError
from rallypoint.grammar import WILDCARD, And, Expr, Unit

from ._message import Message, tag_text
from ._rules import check_rule, count_live, looks_like_name, quorum, resolve_event, unmatched_sources
from ._sessions import SessionCatalog

logger = logging.getLogger(__name__)

__all__ = ["Handler", "PeerView", "RegisterTable"]

Handler = Callable[..., Any]
"""A handler is called by the proxy as `handler(that, proxy, messages)`; the table only stores it."""

PeerView = Union[Mapping[str, Iterable[str]], Callable[[], Mapping[str, Iterable[str]]]]
"""`{component_type: [peer names]}`, or a zero-argument callable returning one."""

_DROP_LOG_EVERY = 1000
_ROUTE_CACHE_MAX = 65_536  # distinct (source, tag) pairs remembered; cleared wholesale beyond that

_Item = tuple[int, Message]  # (arrival sequence number, message)


class _UnitState:
    """One unit of one registered rule, with its buffer."""

    __slots__ = ("unit", "rule", "source", "tag", "amount", "percent", "buf", "sources")

    def __init__(self, unit: Unit, rule: _Rule) -> None:
        self.unit = unit
        self.rule = rule
        self.source = unit.source
        self.tag = tag_text(unit.tag)
        self.amount = unit.amount
        self.percent = unit.percent
        self.buf: deque[_Item] = deque()
        # Percentage units count buffered messages per source, so "how many distinct peers" is len().
        self.sources: dict[str, int] | None = {} if unit.percent else None

    def met(self, table: RegisterTable) -> bool:
        if self.sources is None:
            return len(self.buf) >= self.amount
        return len(self.sources) >= table._need(self.source, self.amount)

    def take(self, table: RegisterTable, out: list[_Item]) -> None:
        buf = self.buf
        sources = self.sources
        if sources is None:
            popleft = buf.popleft
            out.extend([popleft() for _ in range(self.amount)])
            return
        # The first message of each of the first `need` distinct sources, in arrival order; later messages
        # from the same sources wait for the next round.
        need = table._need(self.source, self.amount)
        chosen: set[str] = set()
        rest: deque[_Item] = deque()
        for item in buf:
            src = item[1].source
            if len(chosen) < need and src not in chosen:
                chosen.add(src)
                out.append(item)
            else:
                rest.append(item)
        self.buf = rest
        for src in chosen:
            left = sources[src] - 1
            if left:
                sources[src] = left
            else:
                del sources[src]

    def drop_oldest(self) -> None:
        _, message = self.buf.popleft()
        if self.sources is not None:
            left = self.sources[message.source] - 1
            if left:
                self.sources[message.source] = left
            else:
                del self.sources[message.source]

    def clear(self) -> None:
        self.buf.clear()
        if self.sources is not None:
            self.sources.clear()


class _Node:
    """An AND or OR over units and nodes; units are leaves, each appearing once in a rule."""

    __slots__ = ("is_and", "parts")

    def __init__(self, is_and: bool, parts: tuple[_UnitState | _Node, ...]) -> None:
        self.is_and = is_and
        self.parts = parts

    def met(self, table: RegisterTable) -> bool:
        if self.is_and:
            return all(part.met(table) for part in self.parts)
        return any(part.met(table) for part in self.parts)

    def take(self, table: RegisterTable, out: list[_Item]) -> None:
        if self.is_and:
            for part in self.parts:
                part.take(table, out)
            return
        for part in self.parts:
            if part.met(table):
                part.take(table, out)
                return


class _Rule:
    """One registered rule: its handler, units (in declared order) and evaluation tree."""

    __slots__ = (
        "index", "label", "expr", "handler", "units", "root", "dirty", "percent", "dropped", "single",
    )

    def __init__(self, index: int, label: str, expr: Expr, handler: Handler) -> None:
        self.index = index
        self.label = label
        self.expr = expr
        self.handler = handler
        self.units: list[_UnitState] = []
        self.root = self._build(expr)
        self.dirty = False
        self.percent = any(u.percent for u in self.units)
        self.dropped = 0
        # The common case, one count unit (`master:rollout:1`), gets a short path in get().
        self.single = self.units[0] if len(self.units) == 1 and not self.percent else None

    def _build(self, expr: Expr) -> _UnitState | _Node:
        if isinstance(expr, Unit):
            state = _UnitState(expr, self)
            self.units.append(state)
            return state
        parts = tuple(self._build(part) for part in expr.parts)
        if len(parts) == 1:
            return parts[0]
        return _Node(isinstance(expr, And), parts)

    def holds_messages(self) -> bool:
        return any(unit.buf for unit in self.units)


class RegisterTable:
    """Conditional event register table: rules with handlers, fed messages, asked which rules are met.

        >>> table = RegisterTable(peers={"worker": ["worker_1", "worker_2"]})
        >>> table.register_event_handler("worker:update:2", on_update)
        >>> table.push(Message("update", "worker_1", "master"))
        >>> table.push(Message("update", "worker_2", "master"))
        >>> [(h.__name__, len(ms)) for h, ms in table.get()]
        [('on_update', 2)]

    `peers` is the live peer view used by percentage units: a dict `{component_type: [names]}` or a
    zero-argument callable returning one, called at most once per get() (and only when a percentage rule
    holds messages). `rules` maps rule names to rules (or is a loaded `Spec`); names not found there are
    looked up among the named rules of `catalog` (default: a catalog with the built-in types, which name no
    rules). `max_buffered` bounds each unit's buffer: when full, the oldest message is dropped, counted in
    `dropped` and logged. `expected_types`: the component types the group is expected to hold; given, a rule
    whose source can match none of them and no peer of the view is logged (one warning per rule), since it
    would wait for messages that never come (`mastr:*:1` in a group of `master` and `worker`).

    Not thread-safe: use it from one thread (the proxy's message path).
    """

    def __init__(
        self,
        peers: PeerView | None = None,
        *,
        max_buffered: int = 10_000,
        rules: Mapping[str, Expr] | Any | None = None,
        catalog: SessionCatalog | None = None,
        expected_types: Iterable[str] | None = None,
    ) -> None:
        if max_buffered < 1:
            raise ConfigError(f"max_buffered must be at least 1, not {max_buffered}")
        self.peers = peers
        self.max_buffered = max_buffered
        self._expected_types = tuple(expected_types) if expected_types is not None else None
        if rules is not None and not isinstance(rules, Mapping):
            rules = getattr(rules, "rules", None)  # a Spec
            if not isinstance(rules, Mapping):
                raise ConfigError("rules must be a mapping of rule names to rules, or a loaded Spec")
        self._rule_names: Mapping[str, Expr] = dict(rules or {})
        self._catalog = catalog if catalog is not None else SessionCatalog()
        self._rules: list[_Rule] = []
        self._by_expr: dict[Expr, _Rule] = {}
        # Routing index: source prefix -> tag -> units (registration order, then declared order).
        self._index: dict[str, dict[str, list[_UnitState]]] = {}
        self._wild: dict[str, list[_UnitState]] = {}  # units whose source is `*`: tag -> units
        self._lengths: list[int] = []  # distinct prefix lengths, longest first
        self._routes: dict[tuple[str, str], tuple[_UnitState, ...]] = {}
        self._dirty: list[_Rule] = []
        self._percent_rules: list[_Rule] = []
        self._seq = 0
        self._peer_names: frozenset[str] | None = None
        self._needs: dict[tuple[str, int], int] = {}
        self.dropped = 0
        """Messages dropped from full buffers since the table was made (all rules)."""

    # -- registration -------------------------------------------------------------------------------

    def register_event_handler(self, event: str | tuple[Any, ...] | Expr, handler: Handler) -> None:
        """Call `handler` (via get()) with the messages that meet `event`.

        `event` is a rule name (from `rules=`, then the catalog's; names are tried first), a text rule such
        as `"worker:update:60%"`, the seed's tuple form, or an `Expr`. Registering a rule equal to one
        already registered (however it is spelled) raises ConfigError: one rule, one handler, so no message
        is silently handed to two of them.
        """
        names: tuple[Mapping[str, Expr], ...] = (self._rule_names,)
        if looks_like_name(event) and event not in self._rule_names:
            names += (self._catalog.rules,)  # only for names: it may load the built-in specs
        label, expr = resolve_event(event, *names)
        check_rule(expr)
        if self._expected_types is not None:
            self._warn_if_unmatched(label, expr)
        if expr in self._by_expr:
            other = self._by_expr[expr]
            raise ConfigError(
                f"rule {label!r} is already registered (as {other.label!r}) with handler {other.handler!r}"
            )
        rule = _Rule(len(self._rules), label, expr, handler)
        if rule.percent:
            if self.peers is None:
                raise ConfigError(
                    f"rule {label!r} has a percentage unit: give the table a peer view (peers=)"
                )
            self._percent_rules.append(rule)
        self._rules.append(rule)
        self._by_expr[expr] = rule
        for unit in rule.units:
            if unit.source == WILDCARD:
                self._wild.setdefault(unit.tag, []).append(unit)
            else:
                self._index.setdefault(unit.source, {}).setdefault(unit.tag, []).append(unit)
        self._lengths = sorted({len(prefix) for prefix in self._index}, reverse=True)
        self._routes.clear()

    def _warn_if_unmatched(self, label: str, expr: Expr) -> None:
        peers = self.peers
        view = (peers() if callable(peers) else peers) or {}
        types = {*(self._expected_types or ()), *view}
        names = [name for group in view.values() for name in group]
        unmatched = unmatched_sources(expr, types, names)
        if unmatched:
            logger.warning("rule %r: source %s can match no peer (known types: %s): its handler would never run",
                           label, ", ".join(repr(u) for u in unmatched), ", ".join(sorted(types)) or "none")

    @property
    def rules(self) -> list[tuple[str, Expr, Handler]]:
        """The registered rules as `(label, expr, handler)`, in registration order."""
        return [(rule.label, rule.expr, rule.handler) for rule in self._rules]

    def __len__(self) -> int:
        return len(self._rules)

    # -- the message path ---------------------------------------------------------------------------

    def push(self, message: Message) -> int:
        """Buffer `message` in every rule that has a unit for it; return how many rules took it."""
        tag = message.tag
        if type(tag) is not str:  # an Enum (even a str Enum) matches by value
            tag = tag_text(tag)
        key = (message.source, tag)
        targets = self._routes.get(key)
        if targets is None:
            targets = self._route(message.source, tag)
            if len(self._routes) >= _ROUTE_CACHE_MAX:
                self._routes.clear()
            self._routes[key] = targets
        if not targets:
            return 0
        self._seq = seq = self._seq + 1
        item = (seq, message)
        limit = self.max_buffered
        for unit in targets:
            buf = unit.buf
            if len(buf) >= limit:
                self._drop(unit)
            buf.append(item)
            sources = unit.sources
            if sources is not None:
                sources[message.source] = sources.get(message.source, 0) + 1
            rule = unit.rule
            if not rule.dirty:
                rule.dirty = True
                self._dirty.append(rule)
        return len(targets)

    def _route(self, source: str, tag: str) -> tuple[_UnitState, ...]:
        """The unit of each rule that takes a message from `source` with `tag` (longest prefix, exact tag)."""
        taken: set[int] = set()
        targets: list[_UnitState] = []

        def visit(by_tag: dict[str, list[_UnitState]]) -> None:
            for key in (tag, WILDCARD) if tag != WILDCARD else (tag,):
                for unit in by_tag.get(key, ()):
                    if unit.rule.index not in taken:
                        taken.add(unit.rule.index)
                        targets.append(unit)

        index = self._index
        n = len(source)
        for length in self._lengths:
            if length <= n:
                by_tag = index.get(source[:length])
                if by_tag is not None:
                    visit(by_tag)
        visit(self._wild)
        return tuple(targets)

    def _drop(self, unit: _UnitState) -> None:
        unit.drop_oldest()
        rule = unit.rule
        rule.dropped += 1
        self.dropped += 1
        if rule.dropped == 1 or rule.dropped % _DROP_LOG_EVERY == 0:
            logger.warning(
                "rule %r: unit %s buffer is full (max_buffered=%d), dropped its oldest message "
                "(%d dropped for this rule so far)",
                rule.label, unit.unit, self.max_buffered, rule.dropped,
            )

    def get(self) -> list[tuple[Handler, list[Message]]]:
        """The rules met now, in registration order, each with exactly the messages that met it.

        A rule met several times over appears several times. The returned messages leave that rule's
        buffers; other rules keep their own copies.
        """
        if self._percent_rules:
            self._refresh_peer_view()
        if not self._dirty:
            return []
        dirty = self._dirty
        self._dirty = []
        if len(dirty) > 1:
            dirty.sort(key=_rule_index)
        fired: list[tuple[Handler, list[Message]]] = []
        for rule in dirty:
            rule.dirty = False
            single = rule.single
            if single is not None:
                buf, amount, handler = single.buf, single.amount, rule.handler
                while len(buf) >= amount:
                    fired.append((handler, [buf.popleft()[1] for _ in range(amount)]))
                continue
            root = rule.root
            while root.met(self):
                items: list[_Item] = []
                root.take(self, items)
                if len(rule.units) > 1:
                    items.sort(key=_item_seq)
                fired.append((rule.handler, [message for _, message in items]))
        return fired

    def clear(self) -> None:
        """Empty every buffer (registrations and drop counters stay)."""
        for rule in self._rules:
            rule.dirty = False
            for unit in rule.units:
                unit.clear()
        self._dirty = []

    @property
    def buffered(self) -> int:
        """Messages held across all rules' buffers (a message held by two rules counts twice)."""
        return sum(len(unit.buf) for rule in self._rules for unit in rule.units)

    def dropped_per_rule(self) -> dict[str, int]:
        """Messages dropped from full buffers, per rule label (only rules that dropped any)."""
        return {rule.label: rule.dropped for rule in self._rules if rule.dropped}

    # -- percentages --------------------------------------------------------------------------------

    def _refresh_peer_view(self) -> None:
        """Re-read the peer view (once) if a percentage rule holds messages; re-check those rules if it
        changed, since a quorum shrinks or grows with the live peers even when no message arrived."""
        holding = [rule for rule in self._percent_rules if rule.holds_messages()]
        if not holding:
            return
        peers = self.peers
        view = peers() if callable(peers) else peers
        names = frozenset().union(*(view or {}).values())
        if names == self._peer_names:
            return
        self._peer_names = names
        self._needs.clear()
        for rule in holding:
            if not rule.dirty:
                rule.dirty = True
                self._dirty.append(rule)

    def _need(self, prefix: str, percent: int) -> int:
        key = (prefix, percent)
        need = self._needs.get(key)
        if need is None:
            need = self._needs[key] = quorum(percent, count_live(prefix, self._peer_names or ()))
        return need


def _rule_index(rule: _Rule) -> int:
    return rule.index


def _item_seq(item: _Item) -> int:
    return item[0]

