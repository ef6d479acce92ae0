"""Pure helpers behind the register table: matching, quorum arithmetic, rule checks and name resolution.

Nothing here keeps state or touches the network; `RegisterTable` (in `_table.py`) holds the buffers and calls
these. Every function can be unit-tested with plain values.

    >>> source_matches("worker", "worker_001"), source_matches("actor", "reactor_1")
    (True, False)
    >>> quorum(60, 3), quorum(60, 5), quorum(10, 0)
    (2, 3, 1)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

from rallypoint.errors import ConfigError, RuleSyntaxError, UnknownRuleName
from rallypoint.grammar import WILDCARD, And, Expr, Or, Unit, as_rule

from ._message import tag_text

logger = logging.getLogger(__name__)

__all__ = [
    "check_rule",
    "count_live",
    "looks_like_name",
    "quorum",
    "resolve_event",
    "source_matches",
    "units_of",
    "unmatched_sources",
]

# A handler key that looks like a name (no colon, no operator): if it is not a known rule name, the user most
# likely mistyped a name, so we say so instead of showing a rule syntax error.
_BARE_WORD = re.compile(r"[A-Za-z_][\w.\-]*")


def source_matches(prefix: str, source: str) -> bool:
    """Whether a unit's source (a name prefix, or `*`) takes messages from `source`: a true prefix, never a
    substring."""
    return prefix == WILDCARD or source.startswith(prefix)


def quorum(percent: int, live: int) -> int:
    """Distinct peers a `percent`% unit needs when `live` peers match its source: rounded up, at least 1."""
    return max(1, -(-percent * live // 100))  # integer ceil: no float rounding surprises (60% of 5 is 3)


def count_live(prefix: str, names: Iterable[str]) -> int:
    """How many of the live peer `names` a unit source covers (all of them for `*`)."""
    if prefix == WILDCARD:
        return sum(1 for _ in names)
    return sum(1 for name in names if name.startswith(prefix))


def looks_like_name(event: object) -> bool:
    """Whether a handler key could be a rule name (a bare word) rather than a rule expression."""
    return isinstance(event, str) and _BARE_WORD.fullmatch(event.strip()) is not None


def units_of(expr: Expr) -> list[Unit]:
    """The units of a rule in declared order (left to right)."""
    if isinstance(expr, Unit):
        return [expr]
    out: list[Unit] = []
    for part in expr.parts:
        out.extend(units_of(part))
    return out


def check_rule(expr: Expr) -> list[Unit]:
    """Check a rule that may have been built by hand and return its units in declared order.

    Raises ConfigError for an amount below 1, a percentage above 100, an empty AND/OR, a non-AST object, or
    a unit that could never receive a message because an earlier unit of the same rule has the same source
    and tag (within one rule a message goes to exactly one unit, so the later one would starve).
    """
    _check_shape(expr)
    units = units_of(expr)
    seen: dict[tuple[str, str], Unit] = {}
    for unit in units:
        if unit.amount < 1:
            raise ConfigError(f"unit {unit}: the amount must be at least 1")
        if unit.percent and unit.amount > 100:
            raise ConfigError(f"unit {unit}: a percentage cannot exceed 100%")
        key = (unit.source, tag_text(unit.tag))
        if key in seen:
            raise ConfigError(
                f"unit {unit} can never receive a message: unit {seen[key]} earlier in the same rule has the "
                "same source and tag and takes every message both would match"
            )
        seen[key] = unit
    return units


def _check_shape(expr: Any) -> None:
    if isinstance(expr, Unit):
        if not expr.source or not expr.tag:
            raise ConfigError(f"unit {expr!r}: source and tag must not be empty")
        return
    if isinstance(expr, (And, Or)):
        if not expr.parts:
            raise ConfigError(f"{type(expr).__name__} with no parts")
        for part in expr.parts:
            _check_shape(part)
        return
    raise ConfigError(f"not a rule expression: {expr!r}")


def resolve_event(event: Any, *names: Mapping[str, Expr]) -> tuple[str, Expr]:
    """Turn a handler key into `(label, expr)`.

    `event` is a rule name (looked up in each mapping of `names`, in order, before anything else), a text
    rule, the seed's tuple form, or an `Expr`. The label is the name for a named rule and the rule's text
    otherwise; it names the rule in logs and drop counters.

    A bare word that is neither a known name nor a rule raises UnknownRuleName listing the known names;
    other malformed text raises RuleSyntaxError (from the grammar).
    """
    if isinstance(event, str):
        key = event.strip()
        for mapping in names:
            expr = mapping.get(key)
            if expr is not None:
                return key, expr
        try:
            expr = as_rule(event)
        except RuleSyntaxError as exc:
            if _BARE_WORD.fullmatch(key):
                known = sorted({name for mapping in names for name in mapping})
                listing = ", ".join(known) if known else "none (load a spec that defines rules)"
                raise UnknownRuleName(
                    f"{key!r} is neither a known rule name nor a rule expression; known rule names: {listing}"
                ) from exc
            raise
        return str(expr), expr
    if isinstance(event, (Unit, And, Or)):
        return str(event), event
    if isinstance(event, tuple):
        expr = as_rule(event)
        return str(expr), expr
    raise ConfigError(
        f"a handler key must be a rule name, a text rule, a tuple rule or a rule expression, not {event!r}"
    )


def unmatched_sources(expr: Expr, types: Iterable[str], names: Iterable[str]) -> list[str]:
    """The unit sources of `expr` that can match none of the peer `names` and no peer of the component `types`
    (a source matches a type's peers when one is a prefix of the other: `worker` and `worker_0` both fit
    `worker_0a1b`). `*` matches everything. For a warning: such a unit waits for messages that never come.

        >>> unmatched_sources(as_rule("mastr:*:1 OR master:stop:1"), ["master"], [])
        ['mastr']
    """
    types, names = list(types), list(names)
    unmatched = set()
    for unit in units_of(expr):
        source = unit.source
        if source == WILDCARD or any(name.startswith(source) for name in names):
            continue
        if not any(kind.startswith(source) or source.startswith(kind) for kind in types):
            unmatched.add(source)
    return sorted(unmatched)
