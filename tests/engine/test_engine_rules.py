"""Pure rule helpers: prefix matching, quorum arithmetic, rule checks, handler-key resolution."""

from __future__ import annotations

import pytest

from rallypoint.engine import check_rule, quorum, source_matches
from rallypoint.engine._rules import count_live, looks_like_name, resolve_event
from rallypoint.errors import ConfigError, RuleSyntaxError, UnknownRuleName
from rallypoint.grammar import And, Or, Unit, parse_rule


@pytest.mark.parametrize(
    ("prefix", "source", "expected"),
    [
        ("worker", "worker_001", True),
        ("worker_001", "worker_001", True),
        ("*", "anything", True),
        ("actor", "reactor_1", False),  # a true prefix, never a substring
        ("worker_001", "worker", False),
        ("Worker", "worker_1", False),
    ],
)
def test_source_matches_is_a_true_prefix(prefix: str, source: str, expected: bool) -> None:
    assert source_matches(prefix, source) is expected


@pytest.mark.parametrize(
    ("percent", "live", "need"),
    [(60, 3, 2), (60, 5, 3), (50, 4, 2), (50, 5, 3), (100, 7, 7), (1, 1000, 10), (33, 3, 1), (34, 3, 2),
     (10, 0, 1), (100, 0, 1), (1, 1, 1)],
)
def test_quorum_rounds_up_and_is_at_least_one(percent: int, live: int, need: int) -> None:
    assert quorum(percent, live) == need


def test_count_live_counts_prefix_matches_only() -> None:
    names = ["worker_1", "worker_2", "master", "reactor_1", "actor_1"]
    assert count_live("worker", names) == 2
    assert count_live("actor", names) == 1
    assert count_live("*", names) == 5
    assert count_live("nobody", names) == 0


def test_check_rule_returns_units_in_declared_order() -> None:
    expr = parse_rule("(w_01:update:2 AND w_02:update:3) OR w_03:update:1")
    assert [str(u) for u in check_rule(expr)] == ["w_01:update:2", "w_02:update:3", "w_03:update:1"]


@pytest.mark.parametrize(
    ("expr", "match"),
    [
        (Unit("w", "u", 0), "at least 1"),
        (Unit("w", "u", 101, percent=True), "cannot exceed 100%"),
        (Unit("", "u", 1), "must not be empty"),
        (And(()), "no parts"),
        (Or((Unit("w", "u", 1), "w:u:1")), "not a rule expression"),  # type: ignore[arg-type]
        (And((Unit("w", "u", 1), Unit("w", "u", 2))), "can never receive a message"),
        (Or((Unit("w", "u", 1), And((Unit("m", "s", 1), Unit("w", "u", 3))))), "can never receive"),
    ],
)
def test_check_rule_refuses_bad_rules(expr: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_rule(expr)  # type: ignore[arg-type]


def test_check_rule_allows_same_source_with_different_tags_or_prefixes() -> None:
    check_rule(parse_rule("worker:update:1 AND worker:*:1 AND worker_01:update:1 AND *:update:1"))


def test_looks_like_name() -> None:
    assert looks_like_name("aggregate")
    assert looks_like_name(" aggregate ")
    assert not looks_like_name("worker:update:1")
    assert not looks_like_name(("a:b:1", "c:d:1", "AND"))


def test_resolve_event_tries_names_first_then_text_tuple_and_expr() -> None:
    named = parse_rule("worker:update:60% AND master:sync:1")
    names = {"aggregate": named}
    assert resolve_event("aggregate", names) == ("aggregate", named)
    assert resolve_event("  aggregate ", {}, names) == ("aggregate", named)  # later mappings are searched too
    label, expr = resolve_event("a:b:1 && c:d:2", names)
    assert expr == And((Unit("a", "b", 1), Unit("c", "d", 2)))
    assert label == "a:b:1 AND c:d:2"
    assert resolve_event(("a:b:1", "c:d:2", "AND"), names)[1] == expr
    assert resolve_event(expr, names) == (label, expr)


def test_resolve_event_unknown_bare_word_names_the_known_rules() -> None:
    with pytest.raises(UnknownRuleName, match=r"'agregate'.*aggregate, sync_all") as info:
        resolve_event("agregate", {"aggregate": Unit("w", "u", 1)}, {"sync_all": Unit("*", "sync", 1)})
    assert isinstance(info.value, KeyError)  # the tree says UnknownRuleName(KeyError)
    assert isinstance(info.value.__cause__, RuleSyntaxError)


def test_resolve_event_malformed_rule_text_is_a_syntax_error() -> None:
    with pytest.raises(RuleSyntaxError):
        resolve_event("worker:update:", {})


def test_resolve_event_refuses_other_objects() -> None:
    with pytest.raises(ConfigError, match="handler key"):
        resolve_event(42, {})
