"""Parse rule expressions and session specs into the frozen AST of `_ast`.

    >>> parse_rule("(worker_01:update:2 AND worker_02:update:3) OR worker_03:update:1") == rule_from_tuple(
    ...     (("worker_01:update:2", "worker_02:update:3", "AND"), "worker_03:update:1", "OR"))
    True
    >>> spec = parse_spec("session ping {\\n states sent, done\\n initial sent\\n sent -> done on pong\\n}")
    >>> spec.sessions[0].transitions
    (TransitionDef(sources=('sent',), dest='done', event='pong', line=4, column=2),)

The parsing itself is Lark's, in `_lalr`, imported on the first text parsed: importing rallypoint (or
building rules from tuples or ASTs) does not load Lark. Every failure leaves as `RuleSyntaxError` (rules)
or `SpecSyntaxError` (specs) carrying line, column, the offending line with a caret under the column, the
unexpected text and the expected things in words; no Lark exception escapes.

Input is bounded before Lark sees it: a rule text longer than MAX_RULE_CHARS, a tuple-form rule with more
than MAX_RULE_ITEMS items or MAX_RULE_CHARS characters of text, and a spec text longer than MAX_SPEC_CHARS
are refused with the same errors, naming the limit.
"""

from __future__ import annotations

import functools
import reprlib
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from rallypoint.errors import RuleSyntaxError, SpecSyntaxError

from ._ast import (
    MAX_NESTING,
    MAX_RULE_CHARS,
    MAX_RULE_ITEMS,
    MAX_SPEC_CHARS,
    And,
    Expr,
    Or,
    SpecFile,
    Unit,
    combine,
)

__all__ = ["as_rule", "parse_rule", "parse_spec", "rule_from_tuple"]

_OPERATORS: dict[str, type[And | Or]] = {"AND": And, "OR": Or}


@functools.cache
def _lark_side() -> ModuleType:
    """`_lalr`, imported on the first parse rather than with rallypoint: importing Lark costs ~50 ms."""
    from . import _lalr

    return _lalr


def _show(obj: object) -> str:
    """`repr` for messages: shortened, and safe even if the object's own `__repr__` fails."""
    return f"{type(obj).__name__} {reprlib.repr(obj)}"


def parse_rule(text: str) -> Expr:
    """Parse a rule expression into its AST.

        >>> parse_rule("worker:update:60%")
        Unit(source='worker', tag='update', amount=60, percent=True)
        >>> str(parse_rule("a:x:1 || (b:x:1 && c:*:2)"))
        'a:x:1 OR b:x:1 AND c:*:2'

    Raises `RuleSyntaxError` for anything that is not a well-formed rule (empty text included) and for a
    text longer than MAX_RULE_CHARS (64 KiB).
    """
    if not isinstance(text, str):
        raise RuleSyntaxError(f"a rule expression must be a string, got {_show(text)}")
    if len(text) > MAX_RULE_CHARS:
        raise RuleSyntaxError(
            f"a rule expression of {len(text)} characters is longer than the limit of {MAX_RULE_CHARS}"
        )
    return _lark_side().parse_rule_text(text)  # type: ignore[no-any-return]


def rule_from_tuple(obj: Sequence[Any]) -> Expr:
    """Compile the seed's tuple form: operands (rule strings or nested tuples/lists), then "AND" or "OR".

        >>> str(rule_from_tuple((("w_01:update:2", "w_02:update:3", "AND"), "w_03:update:1", "OR")))
        'w_01:update:2 AND w_02:update:3 OR w_03:update:1'

    A string operand may be any rule expression. Raises `RuleSyntaxError` naming the offending item by its
    path, e.g. `item [0][2]`; line and column then refer to that item's own text. A tuple with more than
    MAX_RULE_ITEMS items or MAX_RULE_CHARS characters of text in all is refused before anything is parsed.
    """
    _check_tuple_size(obj)
    return _from_tuple(obj, ())


def _check_tuple_size(obj: Any) -> None:
    """Refuse an oversized tuple rule, looking at no more than MAX_RULE_ITEMS items (a list that contains
    itself included)."""
    items = chars = 0
    pending = [obj]
    while pending:
        item = pending.pop()
        if isinstance(item, (tuple, list)):
            items += len(item)
            if items > MAX_RULE_ITEMS:
                raise RuleSyntaxError(f"rule tuple: more than the limit of {MAX_RULE_ITEMS} items in all")
            pending.extend(item)
        elif isinstance(item, str):
            chars += len(item)
            if chars > MAX_RULE_CHARS:
                raise RuleSyntaxError(
                    f"rule tuple: more than the limit of {MAX_RULE_CHARS} characters of rule text in all"
                )


def _path(path: tuple[int, ...]) -> str:
    return "".join(f"[{i}]" for i in path) or "the top level"


def _from_tuple(obj: Any, path: tuple[int, ...]) -> Expr:
    where = f"rule tuple, {'item ' if path else ''}{_path(path)}"
    if not isinstance(obj, (tuple, list)):
        raise RuleSyntaxError(f"{where}: expected a tuple or list, got {_show(obj)}")
    if len(path) >= MAX_NESTING:
        raise RuleSyntaxError(f"{where}: tuples nested deeper than {MAX_NESTING}")
    if not obj:
        raise RuleSyntaxError(f"{where}: empty; expected operands followed by 'AND' or 'OR'")
    operator = obj[-1]
    kind = _OPERATORS.get(operator.upper()) if isinstance(operator, str) else None
    if kind is None:
        raise RuleSyntaxError(
            f"{where}: the last item must be 'AND' or 'OR', got {reprlib.repr(operator)}",
            expected=("AND", "OR"),
        )
    if len(obj) < 3:
        raise RuleSyntaxError(f"{where}: {operator!r} needs at least 2 operands, got {len(obj) - 1}")
    parts = [_operand(item, (*path, i)) for i, item in enumerate(obj[:-1])]
    return combine(kind, parts)


def _operand(item: Any, path: tuple[int, ...]) -> Expr:
    where = f"rule tuple, item {_path(path)}"
    if isinstance(item, (tuple, list)):
        return _from_tuple(item, path)
    if not isinstance(item, str):
        raise RuleSyntaxError(f"{where}: expected a rule string or a nested tuple, got {_show(item)}")
    if item.strip().upper() in _OPERATORS:
        raise RuleSyntaxError(f"{where}: {item!r} is an operator; it goes last in its tuple", text=item)
    try:
        return parse_rule(item)
    except RuleSyntaxError as exc:
        raise RuleSyntaxError(
            f"{where}: {exc.reason}",
            line=exc.line,
            column=exc.column,
            context=exc.context,
            expected=exc.expected,
            text=exc.text,
        ) from exc


def as_rule(obj: Expr | str | Sequence[Any]) -> Expr:
    """Any accepted rule form as an AST: an `Expr` as is, text via `parse_rule`, a tuple/list via
    `rule_from_tuple`. Anything else raises `RuleSyntaxError`."""
    if isinstance(obj, (Unit, And, Or)):
        return obj
    if isinstance(obj, str):
        return parse_rule(obj)
    if isinstance(obj, (tuple, list)):
        return rule_from_tuple(obj)
    raise RuleSyntaxError(f"a rule must be text, a tuple or a parsed rule, got {_show(obj)}")


def parse_spec(text: str, origin: str = "<string>") -> SpecFile:
    """Parse a session spec (session types and named rules); `origin` names the source in error messages.

        >>> spec = parse_spec("rule aggregate = worker:update:60% AND master:sync:1", origin="inline")
        >>> spec.rules[0].name, str(spec.rules[0].expr)
        ('aggregate', 'worker:update:60% AND master:sync:1')

    Checks syntax only (plus: `states` and `initial` present, no statement twice in a session); whether the
    names make a sound state machine is for the engine to judge. Raises `SpecSyntaxError`, also for a text
    longer than MAX_SPEC_CHARS (1 MiB).
    """
    if not isinstance(text, str):
        raise SpecSyntaxError(f"{origin}: a spec must be a string, got {type(text).__name__}")
    if len(text) > MAX_SPEC_CHARS:
        raise SpecSyntaxError(
            f"{origin}: a spec of {len(text)} characters is longer than the limit of {MAX_SPEC_CHARS}"
        )
    return _lark_side().parse_spec_text(text, origin)  # type: ignore[no-any-return]
