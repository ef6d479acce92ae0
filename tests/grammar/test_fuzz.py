"""Property tests: whatever goes in, a well-formed AST or exactly our syntax error comes out."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rallypoint.errors import RuleSyntaxError, SpecSyntaxError
from rallypoint.grammar import (
    And,
    Or,
    RuleDef,
    SessionDef,
    SpecFile,
    Unit,
    as_rule,
    parse_rule,
    parse_spec,
    rule_from_tuple,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_expr(expr: Any) -> None:
    """A valid AST: flattened, at least two parts per operator, sane units, and `str()` re-parses to it."""
    assert isinstance(expr, (Unit, And, Or))
    stack = [expr]
    while stack:
        node = stack.pop()
        if isinstance(node, Unit):
            assert node.source and node.tag
            assert node.amount >= 1 and (node.amount <= 100 or not node.percent)
        else:
            assert isinstance(node, (And, Or)) and len(node.parts) >= 2
            assert not any(type(part) is type(node) for part in node.parts)
            stack.extend(node.parts)
    assert parse_rule(str(expr)) == expr


def check_rule(parse: Any, value: Any) -> None:
    try:
        expr = parse(value)
    except RuleSyntaxError as exc:
        assert type(exc) is RuleSyntaxError
        assert exc.line is None or (exc.line >= 1 and exc.column is not None and exc.column >= 1)
        return
    check_expr(expr)


def check_spec(text: str) -> None:
    try:
        spec = parse_spec(text, origin="fuzz.spec")
    except SpecSyntaxError as exc:
        assert type(exc) is SpecSyntaxError
        assert "fuzz.spec" in str(exc)
        return
    assert isinstance(spec, SpecFile) and spec.origin == "fuzz.spec"
    for rule in spec.rules:
        assert isinstance(rule, RuleDef) and rule.line is not None
        check_expr(rule.expr)
    for session in spec.sessions:
        assert isinstance(session, SessionDef) and session.states and session.initial
        assert len(session.state_positions) == len(session.states)


# ---- text built from the grammar's own alphabet --------------------------------------------------------

NAMES = ["a", "w", "worker_01", "x.y/z-1", "*", "AND", "or", "ANDx", "0", "7"]
RULE_PIECES = [
    *NAMES, ":", ":", ":", "0", "1", "60", "100", "101", "%", "AND", "OR", "and", "or", "&&", "||", "(", ")",
]  # fmt: skip
SPEC_PIECES = [
    *RULE_PIECES,
    "session", "rule", "states", "initial", "final", "on", "->", ",", "=", "{", "}", "#", "\n", "\n", "s",
]  # fmt: skip
NAME_CHARS = "abAZ09_.-/"
SEPARATORS = st.sampled_from(["", " ", " ", "\n", "\t"])


def joined(pieces: list[str]) -> st.SearchStrategy[str]:
    return st.lists(st.tuples(st.sampled_from(pieces), SEPARATORS), max_size=30).map(
        lambda items: "".join(piece + sep for piece, sep in items)
    )


def unit_text() -> st.SearchStrategy[str]:
    name = st.sampled_from(NAMES[:5]) | st.text(NAME_CHARS, min_size=1, max_size=6)
    amount = st.integers(0, 120).map(str) | st.integers(0, 120).map(lambda n: f"{n}%")
    return st.builds(lambda s, t, a: f"{s}:{t}:{a}", name, name, amount)


RULE_OPERATORS = [" AND ", " OR ", " and ", " or ", "&&", " || ", "\nAND\n"]


def random_unit(rng: random.Random) -> str:
    def name() -> str:
        if rng.random() < 0.5:
            return rng.choice(NAMES[:5])
        return "".join(rng.choices(NAME_CHARS, k=rng.randint(1, 6)))

    return f"{name()}:{name()}:{rng.randint(0, 120)}{rng.choice(['', '%'])}"


def rule_text(rng: random.Random, depth: int = 0) -> str:
    """Mostly well-formed rule text (bad amounts included), with random operator spellings and parentheses.

    Drawn from a seeded Random rather than composed Hypothesis strategies: generating the shape with
    st.recursive costs several times the parsing it is meant to exercise.
    """
    if depth >= 3 or rng.random() < 0.3:
        return random_unit(rng)
    operator = rng.choice(RULE_OPERATORS)
    text = operator.join(rule_text(rng, depth + 1) for _ in range(rng.randint(2, 3)))
    return f"({text})" if rng.random() < 0.5 else text


@FUZZ
@given(st.text())
def test_parse_rule_on_any_text(text: str) -> None:
    check_rule(parse_rule, text)


@FUZZ
@given(joined(RULE_PIECES))
def test_parse_rule_on_grammar_alphabet(text: str) -> None:
    check_rule(parse_rule, text)


@FUZZ
@given(st.randoms(use_true_random=True))
def test_parse_rule_on_near_valid_text(rng: random.Random) -> None:
    check_rule(parse_rule, rule_text(rng))


# ---- tuples --------------------------------------------------------------------------------------------
# As for rule_text: Hypothesis draws the leaves, a seeded Random shapes the nesting.

LEAVES = (
    unit_text()
    | st.sampled_from(["a:x:1 AND b:x:2", "(a:x:1 OR b:x:2", "a:x:1 || *:*:5%"])
    | st.sampled_from(["AND", "OR", "and", "xor", "", "a:b", "AND:x:1"])
    | st.text(max_size=10)
    | st.integers()
    | st.none()
    | st.binary(max_size=5)
    | st.floats(allow_nan=False)
    | st.just(And((Unit("a", "x", 1), Unit("b", "x", 2))))  # a parsed rule: fine for as_rule, not in a tuple
)
OPERATORS: list[Any] = ["AND", "OR", "and", "Or", "XOR", "", "&&", 0, None]


def nest(leaves: list[Any], rng: random.Random, depth: int = 0) -> Any:
    """A random tuple/list tree over `leaves`: usually operands then an operator, sometimes not."""
    if depth and (depth >= 3 or rng.random() < 0.35):
        return rng.choice(leaves)
    items = [nest(leaves, rng, depth + 1) for _ in range(rng.choice([0, 1, 2, 2, 3, 4]))]
    if rng.random() < 0.85:
        items.append(rng.choice(OPERATORS))
    return tuple(items) if rng.random() < 0.5 else items


@FUZZ
@given(st.lists(LEAVES, min_size=1, max_size=6), st.randoms(use_true_random=True))
def test_rule_from_tuple_on_random_tuples(leaves: list[Any], rng: random.Random) -> None:
    check_rule(rule_from_tuple, nest(leaves, rng))


@FUZZ
@given(st.lists(LEAVES, min_size=1, max_size=6), st.randoms(use_true_random=True))
def test_as_rule_on_random_nesting(leaves: list[Any], rng: random.Random) -> None:
    obj = rng.choice([*leaves, nest(leaves, rng)])
    check_rule(as_rule, obj)


UNITS = st.builds(
    lambda s, t, n, p: f"{s}:{t}:{n}{'%' if p else ''}",
    st.sampled_from(["a", "worker_01", "*"]),
    st.sampled_from(["x", "*"]),
    st.integers(1, 100),
    st.booleans(),
)


def tuple_and_text(units: list[str], rng: random.Random, depth: int = 0) -> tuple[Any, str]:
    """A valid tuple form together with the text it means."""
    if depth and (depth >= 3 or rng.random() < 0.4):
        unit = rng.choice(units)
        return unit, unit
    op = rng.choice(["AND", "OR", "and", "or"])
    parts = [tuple_and_text(units, rng, depth + 1) for _ in range(rng.randint(2, 3))]
    form = [p[0] for p in parts] + [op]
    text = f" {op.upper()} ".join(f"({p[1]})" for p in parts)
    return (tuple(form) if rng.random() < 0.5 else form), text


@FUZZ
@given(st.lists(UNITS, min_size=1, max_size=6), st.randoms(use_true_random=True))
def test_tuple_form_equals_text_form(units: list[str], rng: random.Random) -> None:
    form, text = tuple_and_text(units, rng)
    expr = as_rule(form)
    assert expr == parse_rule(text)
    check_expr(expr)


# ---- specs ---------------------------------------------------------------------------------------------


@FUZZ
@given(st.text())
def test_parse_spec_on_any_text(text: str) -> None:
    check_spec(text)


@FUZZ
@given(joined(SPEC_PIECES))
def test_parse_spec_on_grammar_alphabet(text: str) -> None:
    check_spec(text)


IDENTS = ["a", "b", "request", "done", "on", "final", "x_1"]


def spec_text(rng: random.Random) -> str:
    """Mostly well-formed specs: sessions with shuffled, sometimes repeated or missing statements; rules."""

    def names() -> str:
        return ", ".join(rng.choices(IDENTS, k=rng.randint(1, 3)))

    def statement() -> str:
        kind = rng.randrange(4)
        if kind == 0:
            return f"states {names()}"
        if kind == 1:
            return f"initial {rng.choice(IDENTS)}"
        if kind == 2:
            return f"final {names()}"
        return f"{names()} -> {rng.choice(IDENTS)} on {rng.choice(IDENTS)}"

    definitions = []
    for _ in range(rng.randint(0, 4)):
        if rng.random() < 0.6:
            body = [statement() for _ in range(rng.randint(0, 5))]
            if rng.random() < 0.7:
                body[:0] = [f"states {names()}", f"initial {rng.choice(IDENTS)}"]
                rng.shuffle(body)
            newline = rng.choice(["\n", "\n  # c\n", "\n\n"])
            definitions.append(f"session {rng.choice(IDENTS)} {{{newline}{newline.join(body)}{newline}}}")
        else:
            definitions.append(f"rule {rng.choice(IDENTS)} = {rule_text(rng)}")
    return "\n".join(definitions)


@FUZZ
@given(st.randoms(use_true_random=True))
def test_parse_spec_on_near_valid_specs(rng: random.Random) -> None:
    check_spec(spec_text(rng))
