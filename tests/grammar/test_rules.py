"""The rule language: text and tuple forms, precedence, flattening, and errors that say where."""

from __future__ import annotations

from typing import Any

import pytest

from rallypoint import grammar
from rallypoint.errors import ParseError, RuleSyntaxError
from rallypoint.grammar import And, Or, Unit, as_rule, parse_rule, rule_from_tuple
from rallypoint.grammar._parse import MAX_NESTING, MAX_RULE_CHARS, MAX_RULE_ITEMS

A = Unit("a", "x", 1)
B = Unit("b", "x", 2)
C = Unit("c", "x", 3)
D = Unit("d", "x", 4)


def test_public_api_is_exactly_all() -> None:
    public = sorted(name for name in vars(grammar) if not name.startswith("_"))
    assert sorted(grammar.__all__) == public


# ---- units ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "unit"),
    [
        ("worker:update:10", Unit("worker", "update", 10)),
        ("worker:update:60%", Unit("worker", "update", 60, percent=True)),
        ("worker:update:100%", Unit("worker", "update", 100, percent=True)),
        ("worker:update:1%", Unit("worker", "update", 1, percent=True)),
        ("*:update:1", Unit("*", "update", 1)),
        ("worker:*:3", Unit("worker", "*", 3)),
        ("*:*:5%", Unit("*", "*", 5, percent=True)),
        ("worker_01:update:2", Unit("worker_01", "update", 2)),
        ("pod-3.rack/1:check_in:1", Unit("pod-3.rack/1", "check_in", 1)),
        ("01:02:03", Unit("01", "02", 3)),
        ("w:t:12345678901234567890", Unit("w", "t", 12345678901234567890)),
        ("  \n worker : update : 7 \t", Unit("worker", "update", 7)),
        ("((worker:update:1))", Unit("worker", "update", 1)),
        # Operator words are only operators where an operator can stand.
        ("AND:or:1", Unit("AND", "or", 1)),
        ("ANDROID:ORDER:1", Unit("ANDROID", "ORDER", 1)),
    ],
)
def test_unit(text: str, unit: Unit) -> None:
    assert parse_rule(text) == unit


def test_unit_str_round_trips() -> None:
    for text in ("a:b:1", "*:*:100%", "w-1.x/y:t:9"):
        assert str(parse_rule(text)) == text


# ---- combining -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expr"),
    [
        ("a:x:1 AND b:x:2", And((A, B))),
        ("a:x:1 OR b:x:2", Or((A, B))),
        ("a:x:1 and b:x:2", And((A, B))),
        ("a:x:1 or b:x:2", Or((A, B))),
        ("a:x:1 && b:x:2", And((A, B))),
        ("a:x:1 || b:x:2", Or((A, B))),
        ("a:x:1&&b:x:2||c:x:3", Or((And((A, B)), C))),
        ("a:x:1 AND(b:x:2)", And((A, B))),
        # AND binds tighter than OR, on either side.
        ("a:x:1 OR b:x:2 AND c:x:3", Or((A, And((B, C))))),
        ("a:x:1 AND b:x:2 OR c:x:3", Or((And((A, B)), C))),
        ("a:x:1 OR b:x:2 AND c:x:3 OR d:x:4", Or((A, And((B, C)), D))),
        ("(a:x:1 OR b:x:2) AND c:x:3", And((Or((A, B)), C))),
        # Nested same operators flatten, however they are parenthesised.
        ("a:x:1 AND b:x:2 AND c:x:3", And((A, B, C))),
        ("(a:x:1 AND b:x:2) AND c:x:3", And((A, B, C))),
        ("a:x:1 AND (b:x:2 AND (c:x:3 AND d:x:4))", And((A, B, C, D))),
        ("((a:x:1 OR b:x:2)) OR (c:x:3 OR d:x:4)", Or((A, B, C, D))),
        ("(a:x:1 OR b:x:2 AND c:x:3) OR d:x:4", Or((A, And((B, C)), D))),
        ("(a:x:1 AND (b:x:2 OR c:x:3)) AND d:x:4", And((A, Or((B, C)), D))),
        ("a:x:1\nAND\n  b:x:2", And((A, B))),
    ],
)
def test_combinations(text: str, expr: Any) -> None:
    assert parse_rule(text) == expr


def test_flattened_trees_keep_the_invariant() -> None:
    expr = parse_rule("(a:x:1 AND (b:x:2 AND (c:x:3 OR (d:x:4 OR a:x:1)))) OR (b:x:2 OR c:x:3)")
    stack = [expr]
    while stack:
        node = stack.pop()
        if isinstance(node, (And, Or)):
            assert len(node.parts) >= 2
            assert not any(type(part) is type(node) for part in node.parts)
            stack.extend(node.parts)


def test_str_reparses_to_the_same_tree() -> None:
    for text in (
        "(a:x:1 OR b:x:2) AND c:x:3",
        "a:x:1 OR b:x:2 AND c:x:3",
        "(a:x:1 || b:x:2) && (c:x:3 || *:*:50%)",
    ):
        expr = parse_rule(text)
        assert parse_rule(str(expr)) == expr
    assert str(parse_rule("(a:x:1 || b:x:2) && c:x:3")) == "(a:x:1 OR b:x:2) AND c:x:3"


def test_nesting_up_to_the_limit_is_fine() -> None:
    depth = MAX_NESTING
    assert parse_rule("(" * depth + "a:x:1" + ")" * depth) == A
    alternating = "a:x:1"
    for i in range(depth):
        alternating = f"({alternating} {'AND' if i % 2 else 'OR'} b:x:2)"
    expr = parse_rule(alternating)
    assert parse_rule(str(expr)) == expr


# ---- tuple form ----------------------------------------------------------------------------------------

SEED_TUPLES = [
    (("worker_01:update:2", "worker_02:update:3", "AND"), "worker_01:update:2 AND worker_02:update:3"),
    (("worker_03:update:1", "worker_04:update:5", "OR"), "worker_03:update:1 OR worker_04:update:5"),
    (
        (("worker_01:update:2", "worker_02:update:3", "AND"), "worker_03:update:1", "OR"),
        "(worker_01:update:2 AND worker_02:update:3) OR worker_03:update:1",
    ),
]


@pytest.mark.parametrize(("form", "text"), SEED_TUPLES)
def test_seed_tuples_equal_their_text(form: tuple[Any, ...], text: str) -> None:
    assert rule_from_tuple(form) == parse_rule(text)
    assert as_rule(form) == as_rule(text)


@pytest.mark.parametrize(
    ("form", "expr"),
    [
        (["a:x:1", "b:x:2", "and"], And((A, B))),
        (("a:x:1", "b:x:2", "Or"), Or((A, B))),
        (("a:x:1", ["b:x:2", "c:x:3", "AND"], "AND"), And((A, B, C))),  # flattened like the text
        ((("a:x:1", "b:x:2", "OR"), ("c:x:3", "d:x:4", "OR"), "OR"), Or((A, B, C, D))),
        (("a:x:1 AND b:x:2", "c:x:3", "AND"), And((A, B, C))),  # an item may be a whole expression
        (("a:x:1 OR b:x:2", "c:x:3", "AND"), And((Or((A, B)), C))),
        (("a:x:1 AND b:x:2", "c:x:3", "OR"), Or((And((A, B)), C))),
        (("a:x:1", "b:x:2", "c:x:3", "d:x:4", "AND"), And((A, B, C, D))),
        (("*:*:1", "a:*:50%", "OR"), Or((Unit("*", "*", 1), Unit("a", "*", 50, percent=True)))),
    ],
)
def test_tuple_forms(form: Any, expr: Any) -> None:
    assert rule_from_tuple(form) == expr


@pytest.mark.parametrize(
    ("form", "words"),
    [
        ((), ["top level", "empty"]),
        ([], ["top level", "empty"]),
        (("a:x:1", "AND"), ["top level", "at least 2 operands"]),
        (("AND",), ["top level", "at least 2 operands"]),
        (("a:x:1", "b:x:2"), ["top level", "last item must be 'AND' or 'OR'", "'b:x:2'"]),
        (("a:x:1", "b:x:2", "XOR"), ["last item must be 'AND' or 'OR'", "'XOR'"]),
        (("a:x:1", "b:x:2", 1), ["last item must be 'AND' or 'OR'", "1"]),
        (("a:x:1", 5, "AND"), ["item [1]", "int"]),
        (("a:x:1", None, "AND"), ["item [1]", "NoneType"]),
        (("a:x:1", {"b:x:2"}, "AND"), ["item [1]", "set"]),
        (("a:x:1", b"b:x:2", "AND"), ["item [1]", "bytes"]),
        (("a:x:1", "AND", "b:x:2", "OR"), ["item [1]", "operator", "goes last"]),
        ((("a:x:1", "b:x:2", "AND"), ("c:x:3", "OR"), "OR"), ["item [1]", "at least 2 operands"]),
        ((("a:x:1", ("b:x:2", "c:x:3", 7), "AND"), "d:x:4", "OR"), ["item [0][1]", "last item", "7"]),
        ((("a:x:1", ("b:x:2", [], "AND"), "AND"), "d:x:4", "OR"), ["item [0][1][1]", "empty"]),
        (("a:x:1", "", "AND"), ["item [1]", "empty rule"]),
    ],
)
def test_bad_tuple_shapes(form: Any, words: list[str]) -> None:
    with pytest.raises(RuleSyntaxError) as info:
        rule_from_tuple(form)
    for word in words:
        assert word in str(info.value)


def test_bad_string_in_tuple_keeps_its_position() -> None:
    with pytest.raises(RuleSyntaxError) as info:
        rule_from_tuple((("a:x:1", "b:x:0%", "AND"), "c:x:3", "OR"))
    err = info.value
    assert "item [0][1]" in err.reason and "at least 1" in err.reason
    assert (err.line, err.column, err.text) == (1, 5, "0%")
    assert err.context == "b:x:0%\n    ^\n"


def test_rule_from_tuple_wants_a_tuple() -> None:
    for bad in ("a:x:1", 5, None, {"a:x:1": 1}):
        with pytest.raises(RuleSyntaxError, match="expected a tuple or list"):
            rule_from_tuple(bad)  # type: ignore[arg-type]


def test_deeply_nested_and_cyclic_tuples_are_refused() -> None:
    deep: Any = ("a:x:1", "b:x:2", "AND")
    for _ in range(MAX_NESTING + 5):
        deep = (deep, "c:x:3", "OR")
    with pytest.raises(RuleSyntaxError, match="nested deeper"):
        rule_from_tuple(deep)
    cyclic: list[Any] = ["a:x:1"]
    cyclic.extend([cyclic, "AND"])
    with pytest.raises(RuleSyntaxError, match=f"limit of {MAX_RULE_ITEMS} items"):  # counted before descending
        rule_from_tuple(cyclic)


# ---- as_rule -------------------------------------------------------------------------------------------


def test_as_rule_accepts_every_form() -> None:
    expr = parse_rule("a:x:1 AND b:x:2")
    assert as_rule(expr) is expr
    assert as_rule(A) is A
    assert as_rule("a:x:1 AND b:x:2") == expr
    assert as_rule(("a:x:1", "b:x:2", "AND")) == expr
    assert as_rule(["a:x:1", "b:x:2", "AND"]) == expr


@pytest.mark.parametrize("bad", [None, 1, 1.5, b"a:x:1", {"a:x:1"}, {"a:x:1": 1}, object()])
def test_as_rule_refuses_other_types(bad: Any) -> None:
    with pytest.raises(RuleSyntaxError, match="a rule must be"):
        as_rule(bad)


def test_unprintable_and_huge_objects_still_give_our_error() -> None:
    class BadRepr:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    for bad in (BadRepr(), ("a:x:1", BadRepr(), "AND"), ("a:x:1", "b:x:2", BadRepr())):
        with pytest.raises(RuleSyntaxError):
            as_rule(bad)  # type: ignore[arg-type]
    with pytest.raises(RuleSyntaxError) as info:
        as_rule(("a:x:1", list(range(100_000)), "AND"))
    assert len(str(info.value)) < 300


def test_parse_rule_refuses_non_text() -> None:
    with pytest.raises(RuleSyntaxError, match="must be a string"):
        parse_rule(b"a:x:1")  # type: ignore[arg-type]


# ---- errors --------------------------------------------------------------------------------------------

NAME_START = ["'('", "'*'", "a name"]


@pytest.mark.parametrize(
    ("text", "line", "column", "found", "expected"),
    [
        ("", 1, 1, "", NAME_START),
        ("   ", 1, 1, "", NAME_START),
        ("worker", 1, 7, "", ["':'"]),
        ("worker:update", 1, 14, "", ["':'"]),
        ("worker:update:", 1, 15, "", ["an amount (10 or 60%)"]),
        ("worker::1", 1, 8, ":", ["'*'", "a name"]),
        ("worker:update:x", 1, 15, "x", ["an amount (10 or 60%)"]),
        ("worker:update:-1", 1, 15, "-1", ["an amount (10 or 60%)"]),
        ("worker:update:1.5", 1, 16, ".5", ["AND", "OR", "end of input"]),
        ("worker:update:5 %", 1, 17, "%", ["AND", "OR", "end of input"]),
        ("worker:update:5%%", 1, 17, "%", ["AND", "OR", "end of input"]),
        ("a:x:1 AND", 1, 10, "", NAME_START),
        ("a:x:1 OR   ", 1, 9, "", NAME_START),
        ("AND a:x:1", 1, 5, "a", ["':'"]),
        ("a:x:1 b:x:2", 1, 7, "b", ["AND", "OR", "end of input"]),
        ("a:x:1 ANDb:x:2", 1, 7, "ANDb", ["AND", "OR", "end of input"]),
        ("a:x:1 AND AND b:x:2", 1, 15, "b", ["':'"]),
        ("a:x:1 & b:x:2", 1, 7, "&", ["AND", "OR", "end of input"]),
        ("a:x:1 XOR b:x:2", 1, 7, "XOR", ["AND", "OR", "end of input"]),
        ("(a:x:1", 1, 7, "", ["')'", "AND", "OR"]),
        ("a:x:1)", 1, 6, ")", ["AND", "OR", "end of input"]),
        ("()", 1, 2, ")", NAME_START),
        ("a:x:1 AND (b:x:2 OR c:x:3", 1, 26, "", ["')'", "AND", "OR"]),
        ("a:x:1 @ b:x:2", 1, 7, "@", ["AND", "OR", "end of input"]),
        ("a:x:1\nAND\n  b:x:", 3, 7, "", ["an amount (10 or 60%)"]),
        ("a:x:1 AND\n  (b:x:2 OR\n   c:x:3 d:x:4)", 3, 10, "d", ["')'", "AND", "OR"]),
        ("wörker:x:1", 1, 2, "ö", ["':'"]),
    ],
)
def test_syntax_errors_say_where(text: str, line: int, column: int, found: str, expected: list[str]) -> None:
    with pytest.raises(RuleSyntaxError) as info:
        parse_rule(text)
    err = info.value
    assert (err.line, err.column) == (line, column)
    assert err.text == found
    assert list(err.expected) == sorted(expected)
    # The context is the offending line with a caret under the column.
    shown, caret = err.context.rstrip("\n").split("\n")
    assert shown == text.split("\n")[line - 1]
    assert caret == " " * (column - 1) + "^"


@pytest.mark.parametrize(
    ("text", "column", "found", "words"),
    [
        ("a:x:0", 5, "0", "at least 1"),
        ("a:x:000", 5, "000", "at least 1"),
        ("a:x:0%", 5, "0%", "at least 1"),
        ("a:x:101%", 5, "101%", "more than 100%"),
        ("a:x:1000%", 5, "1000%", "more than 100%"),
        ("b:x:1 OR (c:x:2 AND a:x:0%)", 25, "0%", "at least 1"),
    ],
)
def test_bad_amounts(text: str, column: int, found: str, words: str) -> None:
    with pytest.raises(RuleSyntaxError) as info:
        parse_rule(text)
    err = info.value
    assert (err.line, err.column, err.text) == (1, column, found)
    assert words in err.reason
    assert err.context == text + "\n" + " " * (column - 1) + "^\n"


def test_empty_rule_is_named_as_such() -> None:
    with pytest.raises(RuleSyntaxError, match="empty rule expression"):
        parse_rule("")


def test_error_message_reads_well() -> None:
    with pytest.raises(RuleSyntaxError) as info:
        parse_rule("(worker_01:update:2 AND worker_02:update:) OR worker_03:update:1")
    assert str(info.value) == (
        "unexpected ')' at line 1, column 42\n"
        "(worker_01:update:2 AND worker_02:update:) OR worker_03:update:1\n"
        "                                         ^\n"
        "expected one of: an amount (10 or 60%)"
    )


def test_error_types() -> None:
    with pytest.raises(RuleSyntaxError) as info:
        parse_rule("a:x:")
    assert isinstance(info.value, ParseError)
    assert isinstance(info.value, ValueError)
    assert info.value.__cause__ is not None  # the Lark error stays reachable for debugging


def test_too_deep_nesting_is_a_syntax_error() -> None:
    text = "(" * (MAX_NESTING + 1) + "a:x:1" + ")" * (MAX_NESTING + 1)
    with pytest.raises(RuleSyntaxError, match="nested deeper") as info:
        parse_rule(text)
    assert (info.value.line, info.value.column) == (1, MAX_NESTING + 1)
    with pytest.raises(RuleSyntaxError):
        parse_rule("(" * 100_000)


# ---- input size ----------------------------------------------------------------------------------------


def test_the_documented_limits() -> None:
    assert (MAX_RULE_CHARS, MAX_RULE_ITEMS) == (64 * 1024, 10_000)


def test_a_rule_text_at_the_limit_parses_and_one_past_it_is_refused_before_parsing() -> None:
    units = " OR ".join(f"w{i}:u:1" for i in range(MAX_RULE_CHARS // 8))
    text = units[: units.rindex(" OR ", 0, MAX_RULE_CHARS)]
    text += " " * (MAX_RULE_CHARS - len(text))
    assert isinstance(parse_rule(text), Or)
    with pytest.raises(RuleSyntaxError, match=f"{MAX_RULE_CHARS + 1} characters .* limit of {MAX_RULE_CHARS}"):
        parse_rule(text + " ")
    with pytest.raises(RuleSyntaxError, match="limit"):
        as_rule("a:b:1 OR " * 10_000_000)  # 90 MB: refused at once, never handed to the parser


def test_a_tuple_rule_with_too_many_items_is_refused() -> None:
    wide = tuple(f"w{i}:u:1" for i in range(MAX_RULE_ITEMS)) + ("OR",)
    with pytest.raises(RuleSyntaxError, match=f"limit of {MAX_RULE_ITEMS} items"):
        rule_from_tuple(wide)
    assert len(rule_from_tuple(wide[-100:]).parts) == 99  # type: ignore[union-attr]


def test_a_tuple_rule_with_too_much_text_is_refused() -> None:
    chunk = " OR ".join(f"w{i}:u:1" for i in range(1000))
    many = (chunk,) * (MAX_RULE_CHARS // len(chunk) + 1) + ("AND",)
    with pytest.raises(RuleSyntaxError, match=f"limit of {MAX_RULE_CHARS} characters"):
        as_rule(many)

