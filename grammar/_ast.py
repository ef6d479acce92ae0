"""Frozen AST nodes for rule expressions and session specs.

Positions (`line`, `column`) are kept for error messages but take no part in equality, so the text
`a:b:1 AND c:d:2` and the tuple `("a:b:1", "c:d:2", "AND")` compile to equal trees.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Union

WILDCARD = "*"

# Deeper nesting is surely a mistake, and bounding it keeps the AST (and everything that recurses over it,
# `str()` and `==` included) far from Python's recursion limit.
MAX_NESTING = 100

# Input-size limits, checked before any parsing: rules and specs may come from untrusted places (a peer, a
# file), and parsing costs time and memory in proportion to the text (a 10 MB rule once took 44 s and 1 GB).
MAX_RULE_CHARS = 64 * 1024
"""The longest rule text accepted (also the total text of the strings in one tuple-form rule)."""

MAX_RULE_ITEMS = 10_000
"""The most items (operands, operators and nested tuples, counted together) in one tuple-form rule."""

MAX_SPEC_CHARS = 1024 * 1024
"""The longest spec text accepted (1 MiB); the engine bounds states and transitions per session type too."""


@dataclass(frozen=True, slots=True)
class Unit:
    """One unit event `source:tag:amount`: `amount` messages (or `amount` percent of live peers)."""

    source: str  # a name prefix, or "*" for any source
    tag: str  # a tag value, or "*" for any tag
    amount: int  # a count, or a percentage when `percent` is true
    percent: bool = False

    def __str__(self) -> str:
        return f"{self.source}:{self.tag}:{self.amount}{'%' if self.percent else ''}"


@dataclass(frozen=True, slots=True)
class And:
    """Met when every part is met. Parts are never themselves `And` (nested ANDs are flattened)."""

    parts: tuple[Expr, ...]

    def __str__(self) -> str:
        return " AND ".join(_wrap(p) for p in self.parts)


@dataclass(frozen=True, slots=True)
class Or:
    """Met when any part is met. Parts are never themselves `Or` (nested ORs are flattened)."""

    parts: tuple[Expr, ...]

    def __str__(self) -> str:
        return " OR ".join(str(p) for p in self.parts)


Expr = Union[Unit, And, Or]


def _wrap(expr: Expr) -> str:
    return f"({expr})" if isinstance(expr, Or) else str(expr)


def combine(kind: type[And | Or], parts: Iterable[Expr]) -> Expr:
    """Join parts under one operator, lifting the parts of nested nodes of the same operator."""
    flat: list[Expr] = []
    for part in parts:
        flat.extend(part.parts if isinstance(part, kind) else (part,))
    return kind(tuple(flat))


@dataclass(frozen=True, slots=True)
class TransitionDef:
    """`sources -> dest on event`, one line of a session definition."""

    sources: tuple[str, ...]
    dest: str
    event: str
    line: int | None = field(default=None, compare=False)
    column: int | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class SessionDef:
    """`session NAME { states ...; initial S; final ...; transitions }`."""

    name: str
    states: tuple[str, ...]
    initial: str
    finals: tuple[str, ...]
    transitions: tuple[TransitionDef, ...]
    line: int | None = field(default=None, compare=False)
    column: int | None = field(default=None, compare=False)
    # Where each state name was declared, for compile errors: {state: (line, column)}.
    state_positions: tuple[tuple[str, int, int], ...] = field(default=(), compare=False)
    # Where the `initial` state and each `final` state were named, in the same shapes.
    initial_position: tuple[int, int] | None = field(default=None, compare=False)
    final_positions: tuple[tuple[str, int, int], ...] = field(default=(), compare=False)


@dataclass(frozen=True, slots=True)
class RuleDef:
    """`rule NAME = EXPR`."""

    name: str
    expr: Expr
    line: int | None = field(default=None, compare=False)
    column: int | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class SpecFile:
    """Everything one spec text declares, in order."""

    sessions: tuple[SessionDef, ...] = ()
    rules: tuple[RuleDef, ...] = ()
    origin: str = field(default="<string>", compare=False)
