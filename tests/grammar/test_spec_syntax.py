"""The session spec language: the built-in specs, positions for the engine, and malformed specs."""

from __future__ import annotations

from importlib.resources import files

import pytest

from rallypoint.errors import ParseError, SpecSyntaxError
from rallypoint.grammar import (
    And,
    Or,
    RuleDef,
    SessionDef,
    SpecFile,
    TransitionDef,
    Unit,
    parse_rule,
    parse_spec,
)

DESIGN_EXAMPLE = """\
# comments
session task {
    states request, receive, complete, failed, expired
    initial request
    final complete, failed, expired
    request -> receive on received        # the peer got the task and started
    receive -> complete on completed      # the result came back
    request -> complete on completed
    request, receive -> failed on peer_lost
    request, receive -> expired on timeout
}
session notification {
    states request, receive, failed, expired
    initial request
    final receive, failed, expired
    request -> receive on received
    request -> failed on peer_lost
    request -> expired on timeout
}
rule aggregate = worker:update:60% AND master:sync:1
"""

TASK = SessionDef(
    name="task",
    states=("request", "receive", "complete", "failed", "expired"),
    initial="request",
    finals=("complete", "failed", "expired"),
    transitions=(
        TransitionDef(("request",), "receive", "received"),
        TransitionDef(("receive",), "complete", "completed"),
        TransitionDef(("request",), "complete", "completed"),
        TransitionDef(("request", "receive"), "failed", "peer_lost"),
        TransitionDef(("request", "receive"), "expired", "timeout"),
    ),
)
NOTIFICATION = SessionDef(
    name="notification",
    states=("request", "receive", "failed", "expired"),
    initial="request",
    finals=("receive", "failed", "expired"),
    transitions=(
        TransitionDef(("request",), "receive", "received"),
        TransitionDef(("request",), "failed", "peer_lost"),
        TransitionDef(("request",), "expired", "timeout"),
    ),
)


def _spec_text(name: str) -> str:
    return files("rallypoint.specs").joinpath(f"{name}.spec").read_text(encoding="utf-8")


# ---- the built-in specs --------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [("task", TASK), ("notification", NOTIFICATION)])
def test_builtin_spec_files(name: str, expected: SessionDef) -> None:
    spec = parse_spec(_spec_text(name), origin=f"{name}.spec")
    assert spec == SpecFile(sessions=(expected,))
    assert spec.origin == f"{name}.spec"


def test_design_example() -> None:
    spec = parse_spec(DESIGN_EXAMPLE)
    assert spec.sessions == (TASK, NOTIFICATION)
    assert spec.rules == (RuleDef("aggregate", parse_rule("worker:update:60% AND master:sync:1")),)
    assert spec.origin == "<string>"


def test_positions_for_the_engine() -> None:
    task, notification = parse_spec(DESIGN_EXAMPLE).sessions
    assert (task.line, task.column) == (2, 1)
    assert (notification.line, notification.column) == (12, 1)
    assert task.state_positions == (
        ("request", 3, 12),
        ("receive", 3, 21),
        ("complete", 3, 30),
        ("failed", 3, 40),
        ("expired", 3, 48),
    )
    assert task.initial_position == (4, 13)
    assert task.final_positions == (("complete", 5, 11), ("failed", 5, 21), ("expired", 5, 29))
    assert [(t.line, t.column) for t in task.transitions] == [(6, 5), (7, 5), (8, 5), (9, 5), (10, 5)]
    (rule,) = parse_spec(DESIGN_EXAMPLE).rules
    assert (rule.line, rule.column) == (20, 1)


def test_positions_take_no_part_in_equality() -> None:
    moved = "\n\n" + DESIGN_EXAMPLE.replace("    ", "\t")
    assert parse_spec(moved) == parse_spec(DESIGN_EXAMPLE)
    assert parse_spec(moved).sessions[0].line == 4


# ---- layout --------------------------------------------------------------------------------------------


def test_empty_and_comment_only_specs() -> None:
    for text in ("", "\n\n", "# nothing here", "# a\n\n   # b\n"):
        assert parse_spec(text) == SpecFile()


def test_statements_in_any_order_and_final_optional() -> None:
    spec = parse_spec(
        """
        session ping {
            ping -> pong on reply
            initial ping
            states ping, pong
        }
        """
    )
    (ping,) = spec.sessions
    assert ping == SessionDef(
        "ping", ("ping", "pong"), "ping", (), (TransitionDef(("ping",), "pong", "reply"),)
    )


def test_flexible_layout() -> None:
    compact = "session s { states a, b\ninitial a\na -> b on go }"
    spread = """
    # leading comment

    session s
    {

        states a,b      # trailing comment
        # a comment line

        initial a
        a->b on go
    }

    """
    assert parse_spec(compact) == parse_spec(spread)
    assert parse_spec("session s { states a\r\n initial a }\r\n").sessions[0].states == ("a",)


def test_keywords_are_whole_words_and_only_where_they_fit() -> None:
    spec = parse_spec(
        """
        session on {
            states on, session, rule, initial_state, finally, states_x
            initial initial_state
            final finally
            initial_state -> on on on
            on, states_x -> session on rule
        }
        """
    )
    (s,) = spec.sessions
    assert s.name == "on"
    assert s.states == ("on", "session", "rule", "initial_state", "finally", "states_x")
    assert s.transitions == (
        TransitionDef(("initial_state",), "on", "on"),
        TransitionDef(("on", "states_x"), "session", "rule"),
    )


def test_rules_in_specs() -> None:
    spec = parse_spec(
        """
        rule one = a:x:1
        rule both = a:x:1 && b:x:50%   # a comment after a rule
        rule long = (a:x:1 AND   # parentheses let a rule span lines
                     (b:x:2 OR
                      # even with comment lines inside
                      c:x:3)
                     OR d:*:4)
        """
    )
    a, b = Unit("a", "x", 1), Unit("b", "x", 50, percent=True)
    assert [r.name for r in spec.rules] == ["one", "both", "long"]
    assert spec.rules[0].expr == a
    assert spec.rules[1].expr == And((a, b))
    assert spec.rules[2].expr == parse_rule("a:x:1 AND (b:x:2 OR c:x:3) OR d:*:4")
    assert isinstance(spec.rules[2].expr, Or)


def test_sessions_and_rules_keep_their_order() -> None:
    spec = parse_spec(
        "rule r1 = a:x:1\nsession s1 { states a\ninitial a }\n"
        "rule r2 = b:x:1\nsession s2 { states b\ninitial b }"
    )
    assert [s.name for s in spec.sessions] == ["s1", "s2"]
    assert [r.name for r in spec.rules] == ["r1", "r2"]


# ---- malformed specs -----------------------------------------------------------------------------------


BAD_SPECS = [
    # (text, line, column, found, expected-or-None, words in the reason)
    ("session {\n}", 1, 9, "{", ["a name"], "unexpected '{'"),
    ("session 1task {\n}", 1, 9, "1task", ["a name"], "unexpected '1task'"),
    ("session task-x {\n}", 1, 13, "-x", ["'{'", "end of line"], "unexpected '-x'"),
    ("session s {\n  states a\n  initial a\n", 3, 12, "", ["'}'", "end of line"], "end of input"),
    ("session s {\n  states a b\n}", 2, 12, "b", ["','", "'}'", "end of line"], "unexpected 'b'"),
    ("session s {\n  states\n}", 2, 9, "\n", ["a name"], "end of line"),
    ("session s {\n  states a,\n}", 2, 12, "\n", ["a name"], "end of line"),
    ("session s {\n  initial a, b\n}", 2, 12, ",", ["'}'", "end of line"], "unexpected ','"),
    ("session s {\n  a -> b\n}", 2, 9, "\n", ["'on'"], "end of line"),
    ("session s {\n  a -> b on\n}", 2, 12, "\n", ["a name"], "end of line"),
    ("session s {\n  a -> b onward\n}", 2, 10, "onward", ["'on'"], "unexpected 'onward'"),
    ("session s {\n  a => b on c\n}", 2, 5, "=", ["','", "'->'"], "unexpected '='"),
    ("session s {\n  a -> b on c d\n}", 2, 15, "d", ["'}'", "end of line"], "unexpected 'd'"),
    ("session s {\n  a, -> b on c\n}", 2, 6, "->", ["a name"], "unexpected '->'"),
    ("session s {\n  final -> b on c\n}", 2, 9, "->", ["a name"], "unexpected '->'"),
    ("session s { states a } session t {}", 1, 24, "session", ["end of input", "end of line"], "unexpected"),
    ("session s { states a\n initial a }}", 2, 13, "}", ["end of input", "end of line"], "unexpected '}'"),
    ("sessions s {}", 1, 1, "sessions", ["'rule'", "'session'", "end of input", "end of line"], "unexpected"),
    ("rule = a:x:1", 1, 6, "=", ["a name"], "unexpected '='"),
    ("rule r a:x:1", 1, 8, "a", ["'='"], "unexpected 'a'"),
    ("rule r =", 1, 9, "", ["'('", "'*'", "a name"], "end of input"),
    ("rule r = a:x:1 AND\n  b:x:1", 1, 19, "\n", ["'('", "'*'", "a name"], "end of line"),
    ("rule r = (a:x:1 AND\n  b:x:1", 2, 8, "", ["')'", "AND", "OR"], "end of input"),
    ("rule r = a:x:1 rule", 1, 16, "rule", ["AND", "OR", "end of input", "end of line"], "unexpected 'rule'"),
    ("rule r = a:x:", 1, 14, "", ["an amount (10 or 60%)"], "end of input"),
    ("rule r = (a:x:1; b:x:2)", 1, 16, ";", ["')'", "AND", "OR"], "unexpected character ';'"),
    ("\n\n  rule r = a:x:0%", 3, 16, "0%", [], "at least 1"),
    ("rule r = a:x:1 OR\n    b:x:250%", 1, 18, "\n", ["'('", "'*'", "a name"], "end of line"),
    ("rule r = (a:x:1 OR\n    b:x:250%)", 2, 9, "250%", [], "more than 100%"),
    ("session s {\n  states a\n  initial a\n  states b\n}", 4, 3, "states", [], "second 'states' statement"),
    ("session s {\n  states a\n  initial a\n  initial a\n}", 4, 3, "initial", [], "second 'initial'"),
    ("session s {\n  states a\n  initial a\n  final a\n  final a\n}", 5, 3, "final", [], "second 'final'"),
    ("\nsession s {\n  initial a\n}", 2, 1, "session", [], "session 's' has no 'states' statement"),
    ("session s {\n  states a\n}", 1, 1, "session", [], "session 's' has no 'initial' statement"),
    ("session s {}", 1, 1, "session", [], "has no 'states'"),
]


@pytest.mark.parametrize(("text", "line", "column", "found", "expected", "words"), BAD_SPECS)
def test_malformed_specs_say_where(
    text: str, line: int, column: int, found: str, expected: list[str] | None, words: str
) -> None:
    with pytest.raises(SpecSyntaxError) as info:
        parse_spec(text, origin="bad.spec")
    err = info.value
    assert (err.line, err.column) == (line, column)
    assert err.text == found
    assert words in err.reason
    assert err.reason.startswith("bad.spec: ")
    if expected is not None:
        assert list(err.expected) == sorted(expected)
    shown, caret = err.context.rstrip("\n").split("\n")
    assert shown == text.split("\n")[line - 1].rstrip("\r")
    assert caret == " " * (column - 1) + "^"


def test_error_message_names_the_origin() -> None:
    with pytest.raises(SpecSyntaxError) as info:
        parse_spec("session s {\n  states a\n  a -> b\n}", origin="specs/two_phase.spec")
    assert str(info.value) == (
        "specs/two_phase.spec: unexpected end of line at line 3, column 9\n"
        "  a -> b\n"
        "        ^\n"
        "expected one of: 'on'"
    )
    assert isinstance(info.value, ParseError)


def test_parse_spec_refuses_non_text() -> None:
    with pytest.raises(SpecSyntaxError, match="must be a string"):
        parse_spec(b"session s {}")  # type: ignore[arg-type]


def test_deep_parentheses_in_a_spec_rule() -> None:
    with pytest.raises(SpecSyntaxError, match="nested deeper"):
        parse_spec("rule r = " + "(" * 500 + "a:x:1" + ")" * 500)


# ---- input size ----------------------------------------------------------------------------------------


def test_a_spec_longer_than_the_limit_is_refused_before_parsing() -> None:
    from rallypoint.grammar._parse import MAX_SPEC_CHARS

    assert MAX_SPEC_CHARS == 1024 * 1024
    comment = "# " + "x" * 100 + "\n"
    text = "rule r = a:b:1\n" + comment * (MAX_SPEC_CHARS // len(comment))
    assert parse_spec(text).rules[0].name == "r"
    oversized = text + comment
    with pytest.raises(SpecSyntaxError, match=rf"big.spec: a spec of {len(oversized)} characters .* {MAX_SPEC_CHARS}"):
        parse_spec(oversized, origin="big.spec")
