"""RegisterTable: counts, percentages, prefixes, tags, AND/OR consumption, bounds, rule names."""

from __future__ import annotations

import logging
from enum import Enum, IntEnum
from typing import Any

import pytest

from rallypoint.engine import Message, RegisterTable, SessionCatalog, load_spec
from rallypoint.errors import ConfigError, RuleSyntaxError, UnknownRuleName
from rallypoint.grammar import And, Unit


def on_a(that: Any, proxy: Any, messages: list[Message]) -> None: ...
def on_b(that: Any, proxy: Any, messages: list[Message]) -> None: ...
def on_c(that: Any, proxy: Any, messages: list[Message]) -> None: ...


def msg(source: str, tag: Any = "update", n: int = 0) -> Message:
    return Message(tag=tag, source=source, destination="master", payload=n)


def fired(table: RegisterTable) -> list[tuple[str, list[tuple[str, Any]]]]:
    """get(), with handlers by name and messages as (source, payload) for readable asserts."""
    return [(h.__name__, [(m.source, m.payload) for m in ms]) for h, ms in table.get()]


WORKERS = {"master": ["master"], "worker": ["worker_1", "worker_2", "worker_3"]}


# -- counts ---------------------------------------------------------------------------------------------


def test_count_unit_waits_for_n_messages_then_hands_them_over_once() -> None:
    table = RegisterTable()
    table.register_event_handler("worker:update:2", on_a)
    table.push(msg("worker_1", n=1))
    assert table.get() == []
    table.push(msg("worker_2", n=2))
    assert fired(table) == [("on_a", [("worker_1", 1), ("worker_2", 2)])]
    assert table.get() == []
    assert table.buffered == 0


def test_a_rule_met_several_times_over_fires_several_times_in_one_get() -> None:
    table = RegisterTable()
    table.register_event_handler("worker:update:2", on_a)
    for n in range(5):
        table.push(msg("worker_1", n=n))
    assert fired(table) == [
        ("on_a", [("worker_1", 0), ("worker_1", 1)]),
        ("on_a", [("worker_1", 2), ("worker_1", 3)]),
    ]
    assert table.buffered == 1


def test_every_rule_sees_every_message_with_its_own_buffer() -> None:
    table = RegisterTable()
    table.register_event_handler("worker:update:1", on_a)
    table.register_event_handler("*:*:2", on_b)
    table.register_event_handler("master:update:1", on_c)
    assert table.push(msg("worker_1", n=1)) == 2
    assert table.push(msg("worker_2", n=2)) == 2
    # registration order, each with exactly its own messages
    assert fired(table) == [
        ("on_a", [("worker_1", 1)]),
        ("on_a", [("worker_2", 2)]),
        ("on_b", [("worker_1", 1), ("worker_2", 2)]),
    ]


def test_unmatched_messages_are_ignored() -> None:
    table = RegisterTable()
    table.register_event_handler("worker:update:1", on_a)
    assert table.push(msg("master", n=1)) == 0
    assert table.push(msg("worker_1", tag="other")) == 0
    assert table.get() == []
    assert table.buffered == 0


# -- prefixes and tags ------------------------------------------------------------------------------------


def test_source_is_a_true_prefix_never_a_substring() -> None:
    table = RegisterTable()
    table.register_event_handler("actor:update:1", on_a)
    assert table.push(msg("reactor_1")) == 0
    assert table.push(msg("actor_1")) == 1
    assert [name for name, _ in fired(table)] == ["on_a"]


def test_within_one_rule_the_longest_prefix_takes_the_message() -> None:
    table = RegisterTable()
    table.register_event_handler("worker:update:2 AND worker_01:update:1", on_a)
    table.push(msg("worker_01", n=1))  # -> worker_01 unit, not the shorter `worker`
    table.push(msg("worker_02", n=2))  # -> worker unit
    assert table.get() == []  # `worker` has 1 of 2
    table.push(msg("worker_01", n=3))  # -> worker_01 unit again: still 1 of 2 in `worker`
    assert table.get() == []
    table.push(msg("worker_03", n=4))
    assert fired(table) == [("on_a", [("worker_01", 1), ("worker_02", 2), ("worker_03", 4)])]
    assert table.buffered == 1  # worker_01's second message waits in its unit


def test_on_equal_prefixes_the_exact_tag_beats_the_wildcard_tag() -> None:
    table = RegisterTable()
    table.register_event_handler("worker:*:1 OR worker:update:2", on_a)
    table.push(msg("worker_1", tag="update", n=1))  # -> worker:update (exact tag)
    assert table.get() == []
    table.push(msg("worker_1", tag="ping", n=2))  # -> worker:* unit
    assert fired(table) == [("on_a", [("worker_1", 2)])]
    table.push(msg("worker_2", tag="update", n=3))
    assert fired(table) == [("on_a", [("worker_1", 1), ("worker_2", 3)])]


def test_a_longer_prefix_with_wildcard_tag_beats_a_shorter_prefix_with_exact_tag() -> None:
    table = RegisterTable()
    table.register_event_handler("worker:update:1 AND worker_1:*:2", on_a)
    table.push(msg("worker_1", n=1))
    table.push(msg("worker_1", n=2))
    assert table.get() == []  # both went to worker_1:*, worker:update is still empty
    table.push(msg("worker_2", n=3))
    assert fired(table) == [("on_a", [("worker_1", 1), ("worker_1", 2), ("worker_2", 3)])]


def test_wildcard_source_and_tag() -> None:
    table = RegisterTable()
    table.register_event_handler("*:sync:1", on_a)
    table.register_event_handler("master:*:1", on_b)
    table.register_event_handler("*:*:3", on_c)
    table.push(msg("worker_9", tag="sync", n=1))
    table.push(msg("master", tag="stop", n=2))
    table.push(msg("anyone", tag="anything", n=3))
    assert fired(table) == [
        ("on_a", [("worker_9", 1)]),
        ("on_b", [("master", 2)]),
        ("on_c", [("worker_9", 1), ("master", 2), ("anyone", 3)]),
    ]


class Tag(Enum):
    UPDATE = "update"
    SYNC = "sync"


class StrTag(str, Enum):
    UPDATE = "update"


class Code(IntEnum):
    READY = 3


def test_enum_tags_match_by_value() -> None:
    table = RegisterTable()
    table.register_event_handler("worker:update:3", on_a)
    table.register_event_handler(Unit("worker", "3", 1), on_b)  # IntEnum by its value's text
    table.push(msg("worker_1", tag=Tag.UPDATE, n=1))
    table.push(msg("worker_1", tag=StrTag.UPDATE, n=2))
    table.push(msg("worker_1", tag="update", n=3))
    table.push(msg("worker_1", tag=Code.READY, n=4))
    table.push(msg("worker_1", tag=Tag.SYNC, n=5))
    assert fired(table) == [
        ("on_a", [("worker_1", 1), ("worker_1", 2), ("worker_1", 3)]),
        ("on_b", [("worker_1", 4)]),
    ]


# -- percentages ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("peers", "need"), [(3, 2), (5, 3), (1, 1), (10, 6)])
def test_percentage_rounds_up_over_live_peers_with_the_prefix(peers: int, need: int) -> None:
    view = {"worker": [f"worker_{i}" for i in range(peers)], "master": ["master"]}
    table = RegisterTable(view)
    table.register_event_handler("worker:update:60%", on_a)
    for i in range(need - 1):
        table.push(msg(f"worker_{i}", n=i))
    assert table.get() == []
    table.push(msg(f"worker_{need - 1}", n=need - 1))
    assert fired(table) == [("on_a", [(f"worker_{i}", i) for i in range(need)])]


def test_percentage_needs_distinct_sources_and_a_repeat_waits_for_the_next_round() -> None:
    table = RegisterTable(WORKERS)
    table.register_event_handler("worker:update:60%", on_a)  # 60% of 3 -> 2 distinct workers
    table.push(msg("worker_1", n=1))
    table.push(msg("worker_1", n=2))
    table.push(msg("worker_1", n=3))
    assert table.get() == []  # three messages, one peer
    table.push(msg("worker_2", n=4))
    assert fired(table) == [("on_a", [("worker_1", 1), ("worker_2", 4)])]
    table.push(msg("worker_3", n=5))
    assert fired(table) == [("on_a", [("worker_1", 2), ("worker_3", 5)])]
    assert table.buffered == 1  # worker_1's third message waits for another peer


def test_percentage_of_wildcard_counts_all_peers() -> None:
    table = RegisterTable(WORKERS)  # 4 peers in all
    table.register_event_handler("*:ready:50%", on_a)
    table.push(msg("master", tag="ready"))
    assert table.get() == []
    table.push(msg("worker_3", tag="ready"))
    assert [name for name, _ in fired(table)] == ["on_a"]


def test_percentage_with_no_live_peer_needs_one_message() -> None:
    table = RegisterTable({"master": ["master"]})
    table.register_event_handler("worker:update:100%", on_a)
    table.push(msg("worker_7", n=1))
    assert fired(table) == [("on_a", [("worker_7", 1)])]


def test_quorum_follows_the_peer_view_without_new_messages() -> None:
    view = {"worker": ["worker_1", "worker_2", "worker_3", "worker_4", "worker_5"]}
    calls = []

    def peers() -> dict[str, list[str]]:
        calls.append(1)
        return view

    table = RegisterTable(peers)
    table.register_event_handler("worker:update:60%", on_a)  # 3 of 5
    assert table.get() == [] and calls == []  # nothing buffered: the view is not even read
    table.push(msg("worker_1", n=1))
    table.push(msg("worker_2", n=2))
    assert table.get() == []
    assert len(calls) == 1  # at most once per get(), not per message
    view = {"worker": ["worker_1", "worker_2", "worker_3"]}  # two peers left: 60% of 3 -> 2
    assert fired(table) == [("on_a", [("worker_1", 1), ("worker_2", 2)])]
    assert len(calls) == 2


def test_quorum_follows_an_in_place_peer_dict_and_grows_too() -> None:
    view = {"worker": ["worker_1", "worker_2"]}
    table = RegisterTable(view)
    table.register_event_handler("worker:update:100%", on_a)
    table.push(msg("worker_1", n=1))
    assert table.get() == []
    view["worker"].extend(["worker_3"])  # a peer joined: now 3 needed
    table.push(msg("worker_2", n=2))
    assert table.get() == []
    table.push(msg("worker_3", n=3))
    assert [name for name, _ in fired(table)] == ["on_a"]


def test_percentage_rule_needs_a_peer_view() -> None:
    table = RegisterTable()
    with pytest.raises(ConfigError, match="peer view"):
        table.register_event_handler("worker:update:50%", on_a)


# -- AND / OR ---------------------------------------------------------------------------------------------


def test_and_consumes_exactly_the_messages_of_every_part_in_arrival_order() -> None:
    table = RegisterTable()
    table.register_event_handler(("worker_01:update:2", "worker_02:update:1", "AND"), on_a)
    table.push(msg("worker_01", n=1))
    table.push(msg("worker_02", n=2))
    table.push(msg("worker_02", n=3))
    assert table.get() == []
    table.push(msg("worker_01", n=4))
    table.push(msg("worker_01", n=5))
    assert fired(table) == [("on_a", [("worker_01", 1), ("worker_02", 2), ("worker_01", 4)])]
    assert table.buffered == 2  # worker_02's 3 and worker_01's 5 wait for the next round


def test_or_consumes_only_the_first_part_that_is_met() -> None:
    table = RegisterTable()
    table.register_event_handler("a:x:2 OR b:y:1 OR c:z:1", on_a)
    table.push(msg("a_1", tag="x", n=1))
    table.push(msg("c_1", tag="z", n=2))
    table.push(msg("b_1", tag="y", n=3))
    # b (declared before c) is met, then c: two firings; a's single message stays
    assert fired(table) == [("on_a", [("b_1", 3)]), ("on_a", [("c_1", 2)])]
    table.push(msg("a_1", tag="x", n=4))
    assert fired(table) == [("on_a", [("a_1", 1), ("a_1", 4)])]


def test_seed_mix_and_inside_or() -> None:
    table = RegisterTable()
    table.register_event_handler(
        (("worker_01:update:2", "worker_02:update:3", "AND"), "worker_03:update:1", "OR"), on_a
    )
    for n in range(2):
        table.push(msg("worker_01", n=n))
    for n in range(2):
        table.push(msg("worker_02", n=10 + n))
    assert table.get() == []
    table.push(msg("worker_03", n=20))
    assert fired(table) == [("on_a", [("worker_03", 20)])]  # the OR's second part; the AND's messages stay
    table.push(msg("worker_02", n=12))
    assert fired(table) == [
        ("on_a", [("worker_01", 0), ("worker_01", 1), ("worker_02", 10), ("worker_02", 11),
                  ("worker_02", 12)])
    ]
    assert table.buffered == 0


def test_and_mixing_counts_and_percentages() -> None:
    table = RegisterTable(WORKERS)
    table.register_event_handler("worker:update:60% AND master:sync:1", on_a)
    table.push(msg("worker_1", n=1))
    table.push(msg("master", tag="sync", n=2))
    table.push(msg("worker_1", n=3))
    assert table.get() == []
    table.push(msg("worker_3", n=4))
    assert fired(table) == [("on_a", [("worker_1", 1), ("master", 2), ("worker_3", 4)])]
    assert table.buffered == 1


# -- registration -------------------------------------------------------------------------------------------


def test_tuple_text_and_expr_keys_are_the_same_rule_so_a_second_registration_is_refused() -> None:
    table = RegisterTable()
    table.register_event_handler(("worker_01:update:2", "worker_02:update:3", "AND"), on_a)
    with pytest.raises(ConfigError, match="already registered"):
        table.register_event_handler("worker_01:update:2 && worker_02:update:3", on_b)
    with pytest.raises(ConfigError, match="already registered"):
        table.register_event_handler(
            And((Unit("worker_01", "update", 2), Unit("worker_02", "update", 3))), on_b
        )
    assert len(table) == 1


def test_named_rules_from_a_spec_and_unknown_names() -> None:
    spec = load_spec("rule aggregate = worker:update:60% AND master:sync:1\nrule sync_all = *:sync:1\n")
    table = RegisterTable(WORKERS, rules=spec)
    table.register_event_handler("aggregate", on_a)
    assert table.rules[0][:2] == ("aggregate", spec.rules["aggregate"])
    with pytest.raises(UnknownRuleName, match=r"known rule names: .*aggregate, .*sync_all"):
        table.register_event_handler("agregate", on_b)
    with pytest.raises(RuleSyntaxError):
        table.register_event_handler("worker:update:", on_b)
    table.push(msg("worker_1", n=1))
    table.push(msg("worker_2", n=2))
    table.push(msg("master", tag="sync", n=3))
    assert fired(table) == [("on_a", [("worker_1", 1), ("worker_2", 2), ("master", 3)])]


def test_rules_may_be_a_plain_mapping() -> None:
    table = RegisterTable(rules={"ready": Unit("*", "ready", 1)})
    table.register_event_handler("ready", on_a)
    table.push(msg("x", tag="ready"))
    assert [name for name, _ in fired(table)] == ["on_a"]


def test_names_fall_back_to_the_rules_of_the_tables_own_catalog() -> None:
    catalog = SessionCatalog(["rule from_catalog = boss:go:1\nrule shadowed = boss:go:2\n"])
    table = RegisterTable(catalog=catalog, rules={"shadowed": Unit("boss", "stop", 1)})
    table.register_event_handler("from_catalog", on_a)
    table.register_event_handler("shadowed", on_b)  # `rules=` first, then the catalog
    table.push(msg("boss", tag="go"))
    table.push(msg("boss", tag="stop"))
    assert [name for name, _ in fired(table)] == ["on_a", "on_b"]


def test_a_table_sees_no_other_catalogs_rules() -> None:
    SessionCatalog(["rule only_over_there = boss:go:1"])
    with pytest.raises(UnknownRuleName, match="only_over_there"):
        RegisterTable().register_event_handler("only_over_there", on_a)


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        RegisterTable(max_buffered=0)
    with pytest.raises(ConfigError):
        RegisterTable(rules=42)
    with pytest.raises(ConfigError, match="can never receive"):
        RegisterTable().register_event_handler("a:b:1 OR a:b:2", on_a)


# -- bounds ------------------------------------------------------------------------------------------------


def test_full_buffers_drop_the_oldest_and_count_and_log_it(caplog: pytest.LogCaptureFixture) -> None:
    table = RegisterTable(max_buffered=3)
    table.register_event_handler("worker:update:5", on_a)  # 5 needed but only 3 fit: it can never fire
    table.register_event_handler("worker:update:1", on_b)  # drained by every get(): never drops
    caplog.set_level(logging.WARNING, logger="rallypoint.engine._table")
    for n in range(6):
        table.push(msg("worker_1", n=n))
        assert fired(table) == [("on_b", [("worker_1", n)])]
    assert table.dropped == 3
    assert table.dropped_per_rule() == {"worker:update:5": 3}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "worker:update:5" in warnings[0].getMessage()  # rate limited: first drop
    assert table.buffered == 3  # the newest three: 3, 4, 5
    table.clear()
    assert table.dropped == 3  # counters survive clear()


def test_drop_warnings_are_rate_limited_per_rule(caplog: pytest.LogCaptureFixture) -> None:
    table = RegisterTable(max_buffered=1)
    table.register_event_handler("w:u:2", on_a)
    caplog.set_level(logging.WARNING, logger="rallypoint.engine._table")
    for _ in range(2001):
        table.push(msg("w_1", tag="u"))
    assert table.dropped == 2000
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 3  # 1st, 1000th, 2000th


def test_percentage_buffers_stay_consistent_when_dropping() -> None:
    table = RegisterTable(WORKERS, max_buffered=2)
    table.register_event_handler("worker:update:100%", on_a)
    table.push(msg("worker_1", n=1))
    table.push(msg("worker_2", n=2))
    table.push(msg("worker_2", n=3))  # drops worker_1's message
    table.push(msg("worker_3", n=4))  # drops worker_2's first
    assert table.get() == []  # only worker_2 and worker_3 are held
    table.push(msg("worker_1", n=5))  # drops worker_2's second
    assert table.get() == []
    assert table.dropped == 3


def test_clear_empties_buffers_but_keeps_rules() -> None:
    table = RegisterTable()
    table.register_event_handler("worker:update:2", on_a)
    table.push(msg("worker_1"))
    table.clear()
    table.push(msg("worker_1"))
    assert table.get() == []
    table.push(msg("worker_1"))
    assert len(table.get()) == 1
