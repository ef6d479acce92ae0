"""Session types: compile checks with positions, the machine and its table, built-in flows, drawing."""

from __future__ import annotations

import pytest
from transitions import Machine
from transitions.core import MachineError

from rallypoint.engine import (
    MAX_STATES,
    MAX_TRANSITIONS,
    CompiledSessionType,
    Session,
    SessionType,
    compile_session,
    load_spec,
)
from rallypoint.errors import ConfigError, IllegalTransition, SpecError
from rallypoint.grammar import SessionDef, TransitionDef, parse_spec


def compile_text(text: str) -> CompiledSessionType:
    (defn,) = parse_spec(text, "<test>").sessions
    return compile_session(defn)


def spec_error(text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_spec(text)
    return info.value


# -- compile checks, each with where it is -------------------------------------------------------------------

GOOD = """\
session t {
    states a, b, c
    initial a
    final c
    a -> b on go
    a, b -> c on done
}
"""


def test_a_good_session_compiles() -> None:
    t = compile_text(GOOD)
    assert (t.name, t.states, t.initial) == ("t", ("a", "b", "c"), "a")
    assert (t.finals, t.events) == (("c",), ("go", "done"))


@pytest.mark.parametrize(
    ("text", "match", "line", "column"),
    [
        (  # unknown state in a transition: the transition's line
            "session t {\n  states a, b\n  initial a\n  a -> b on go\n  b -> zz on back\n}\n",
            "unknown state 'zz'", 5, 3,
        ),
        (  # unknown source state
            "session t {\n  states a, b\n  initial a\n  a -> b on go\n  q, b -> a on back\n}\n",
            "unknown state 'q'", 5, 3,
        ),
        (  # initial not declared: where `initial` names it
            "session t {\n  states a, b\n  initial z\n  a -> b on go\n}\n",
            "initial state 'z' is not declared", 3, 11,
        ),
        (  # final not declared: where `final` names it
            "session t {\n  states a, b\n  initial a\n  final b, q\n  a -> b on go\n}\n",
            "final state 'q' is not declared", 4, 12,
        ),
        (  # unreachable: where the state is declared
            "session t {\n  states a, b, lost\n  initial a\n  a -> b on go\n}\n",
            "'lost' is unreachable", 2, 16,
        ),
        (  # unreachable through a cycle that never connects to the initial state
            "session t {\n  states a, x, y\n  initial a\n  x -> y on go\n  y -> x on back\n}\n",
            "'x' is unreachable", 2, 13,
        ),
        (  # a state declared twice: the second declaration
            "session t {\n  states a, b, a\n  initial a\n  a -> b on go\n}\n",
            "'a' is declared twice", 2, 16,
        ),
        (  # out of a final state
            "session t {\n  states a, b\n  initial a\n  final b\n  a -> b on go\n  b -> a on again\n}\n",
            "final state 'b' cannot have a transition", 6, 3,
        ),
        (  # nondeterministic: the later transition
            "session t {\n  states a, b, c\n  initial a\n  a -> b on go\n  a -> c on go\n}\n",
            "nondeterministic", 5, 3,
        ),
        (  # nondeterministic through a multi-source transition
            "session t {\n  states a, b, c\n  initial a\n  a -> b on go\n  b -> c on next\n"
            "  a, b -> c on go\n}\n",
            "event 'go' from state 'a' leads both to 'b' and to 'c'", 6, 3,
        ),
    ],
)
def test_compile_errors_say_what_and_where(text: str, match: str, line: int, column: int) -> None:
    err = spec_error(text)
    assert match in str(err)
    assert (err.line, err.column) == (line, column)
    assert f"line {line}, column {column}" in str(err)
    assert isinstance(err, ValueError)


def test_duplicate_session_and_rule_names_in_one_spec() -> None:
    err = spec_error("session t {\n states a\n initial a\n}\n\nsession t {\n states a\n initial a\n}\n")
    assert "session 't' is defined twice" in str(err) and (err.line, err.column) == (6, 1)
    err = spec_error("rule r = a:b:1\nrule s = a:b:1\nrule r = a:b:2\n")
    assert "rule 'r' is defined twice" in str(err) and (err.line, err.column) == (3, 1)


def test_a_rule_with_a_starved_unit_is_a_spec_error_at_the_rule() -> None:
    err = spec_error("\nrule r = a:b:1 OR a:b:2\n")
    assert "can never receive" in str(err) and (err.line, err.column) == (2, 1)


def test_hand_built_definitions_without_positions_are_checked_too() -> None:
    defn = SessionDef("t", ("a", "a"), "a", (), ())
    with pytest.raises(SpecError, match="declared twice"):
        compile_session(defn)
    with pytest.raises(SpecError, match="no states"):
        compile_session(SessionDef("t", (), "a", (), ()))
    with pytest.raises(SpecError, match="unknown state 'z'"):
        compile_session(SessionDef("t", ("a",), "a", (), (TransitionDef(("a",), "z", "go"),)))


def test_allowed_dead_end_duplicate_transition_and_self_loop() -> None:
    t = compile_text(
        "session t {\n  states a, b, stuck, done\n  initial a\n  final done\n"
        "  a -> b on go\n  a -> b on go\n  b -> b on ping\n  b -> stuck on hang\n  b -> done on finish\n}\n"
    )
    assert t.next_state("b", "ping") == "b"
    assert t.transitions_from("stuck") == {}  # a non-final dead end is allowed
    assert t.next_state("a", "go") == "b"


def test_event_names_that_clash_with_transitions_internals_are_fine() -> None:
    t = compile_text("session t {\n  states a, b\n  initial a\n  a -> b on state\n  b -> a on trigger\n}\n")
    s = t.start("1")
    assert s.trigger("state") == "b" and s.trigger("trigger") == "a"


# -- the machine is the source of truth ----------------------------------------------------------------------


def test_one_machine_per_type_and_the_table_is_read_from_it() -> None:
    t = compile_text(GOOD)
    assert isinstance(t.machine, Machine)
    assert t.machine.auto_transitions is False
    assert t.machine.models == []  # no model: sessions are not attached to it
    assert list(t.machine.states) == ["a", "b", "c"]
    assert [name for name, state in t.machine.states.items() if state.final] == ["c"]
    assert t.machine.initial == "a"
    from_machine = {
        (tr.source, name, tr.dest) for name, ev in t.machine.events.items() for trs in ev.transitions.values()
        for tr in trs
    }
    assert set(t.edges()) == from_machine == {("a", "go", "b"), ("a", "done", "c"), ("b", "done", "c")}
    # Sessions share the type (and its machine); starting one builds nothing.
    s1, s2 = t.start("1"), t.start("2")
    assert s1.type is s2.type is t
    assert not hasattr(s1, "__dict__")


def test_compiled_types_compare_by_definition() -> None:
    assert compile_text(GOOD) == compile_text(GOOD.replace("    a -> b on go\n", "    a -> b on go\n\n"))
    assert compile_text(GOOD) != compile_text(GOOD.replace("on go", "on start"))


# -- built-in task and notification --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def task() -> CompiledSessionType:
    return load_spec("task").session(SessionType.TASK)


@pytest.fixture(scope="module")
def notification() -> CompiledSessionType:
    return load_spec("notification").session("notification")


def test_task_type_as_specified(task: CompiledSessionType) -> None:
    assert task.states == ("request", "receive", "complete", "failed", "expired")
    assert task.initial == "request"
    assert set(task.finals) == {"complete", "failed", "expired"}
    assert set(task.edges()) == {
        ("request", "received", "receive"),
        ("receive", "completed", "complete"),
        ("request", "completed", "complete"),
        ("request", "peer_lost", "failed"),
        ("receive", "peer_lost", "failed"),
        ("request", "timeout", "expired"),
        ("receive", "timeout", "expired"),
    }


@pytest.mark.parametrize(
    ("events", "states"),
    [
        (["received", "completed"], ["receive", "complete"]),
        (["completed"], ["complete"]),
        (["received", "peer_lost"], ["receive", "failed"]),
        (["peer_lost"], ["failed"]),
        (["received", "timeout"], ["receive", "expired"]),
        (["timeout"], ["expired"]),
    ],
)
def test_task_flows(task: CompiledSessionType, events: list[str], states: list[str]) -> None:
    session = task.start("t-1", peer="worker_001")
    assert session.state == "request" and not session.is_final
    assert [session.trigger(e) for e in events] == states
    assert session.is_final


@pytest.mark.parametrize(
    ("event", "state"), [("received", "receive"), ("peer_lost", "failed"), ("timeout", "expired")]
)
def test_notification_flows(notification: CompiledSessionType, event: str, state: str) -> None:
    session = notification.start("n-1")
    assert session.trigger(event) == state
    assert session.is_final


def test_illegal_events_raise_with_session_state_and_event(task: CompiledSessionType) -> None:
    session = task.start("t-42")
    assert not session.may_trigger("bogus")
    with pytest.raises(IllegalTransition) as info:
        session.trigger("bogus")
    err = info.value
    assert (err.session_id, err.session_type, err.state, err.event) == ("t-42", "task", "request", "bogus")
    assert "t-42" in str(err) and "'request'" in str(err) and "'bogus'" in str(err)
    session.trigger("completed")
    for event in task.events:  # a final state accepts nothing
        assert not session.may_trigger(event)
        with pytest.raises(IllegalTransition, match="'complete'"):
            session.trigger(event)
    assert session.state == "complete"


def test_notification_receive_is_final(notification: CompiledSessionType) -> None:
    session = notification.start("n-2")
    session.trigger("received")
    with pytest.raises(IllegalTransition):
        session.trigger("completed")


def test_start_in_a_given_stage(task: CompiledSessionType) -> None:
    assert task.start("x", stage="receive").trigger("completed") == "complete"
    with pytest.raises(ConfigError, match="no state 'bogus'"):
        task.start("x", stage="bogus")


# -- drawing -------------------------------------------------------------------------------------------------


def test_to_mermaid(notification: CompiledSessionType) -> None:
    assert notification.to_mermaid() == (
        "stateDiagram-v2\n"
        "    [*] --> request\n"
        "    request --> receive : received\n"
        "    request --> failed : peer_lost\n"
        "    request --> expired : timeout\n"
        "    receive --> [*]\n"
        "    failed --> [*]\n"
        "    expired --> [*]\n"
    )


def test_to_dot(task: CompiledSessionType) -> None:
    dot = task.to_dot()
    assert dot.startswith('digraph "task" {') and dot.rstrip().endswith("}")
    assert '"__start__" -> "request";' in dot
    assert '"receive" -> "complete" [label="completed"];' in dot
    assert '"complete" [peripheries=2];' in dot
    assert dot.count("->") == 1 + len(task.edges())


def test_session_repr(task: CompiledSessionType) -> None:
    assert repr(task.start("abc", peer="w")) == "Session('abc', type='task', state='request', peer='w')"
    assert isinstance(task.start("abc"), Session)


TWO_PHASE = """\
session two_phase {
    states preparing, prepared, committed, aborted, failed
    initial preparing
    final committed, aborted, failed
    preparing -> prepared on vote_yes
    preparing -> aborted on vote_no
    prepared -> committed on commit
    prepared -> aborted on abort
    preparing, prepared -> failed on peer_lost
    prepared -> prepared on vote_yes
}
"""


@pytest.mark.parametrize("source", ["task", "notification", TWO_PHASE, GOOD])
def test_the_fast_table_agrees_with_the_machine_for_every_state_and_event(source: str) -> None:
    (kind,) = load_spec(source).session_types.values()
    machine = kind.machine

    class Model:
        pass

    for state in kind.states:
        for event in kind.events:
            model = Model()
            machine.add_model(model, initial=state)
            try:
                machine.events[event].trigger(model)
                expected = getattr(model, machine.model_attribute)
            except MachineError:  # the machine refuses: so must we
                expected = None
            finally:
                machine.remove_model(model)
            assert kind.next_state(state, event) == expected, (state, event)
            session = kind.start("s", stage=state)
            assert session.may_trigger(event) is (expected is not None)


def test_compile_errors_name_the_file_and_show_the_line_with_a_caret(tmp_path) -> None:
    path = tmp_path / "bad.spec"
    path.write_text("session s {\n  states a, b, c\n  initial a\n  a -> b on go\n}\n")
    with pytest.raises(SpecError) as info:
        load_spec(str(path))
    assert (info.value.line, info.value.column) == (2, 16)
    assert str(path) in str(info.value)
    assert info.value.context == "  states a, b, c\n               ^"


# -- size -----------------------------------------------------------------------------------------------------


def big_spec_text(states: int, transitions: int) -> str:
    """A session of `states` states in a chain (all reachable) plus extra transitions up to `transitions`."""
    lines = [f"session big {{\n states {', '.join(f's{i}' for i in range(states))}\n initial s0\n"
             f" final s{states - 1}"]
    lines += [f" s{i} -> s{i + 1} on next" for i in range(states - 1)]
    extra = transitions - (states - 1)
    lines += [f" s{i % (states - 1)} -> s{(i * 7) % states} on e{i // (states - 1)}" for i in range(extra)]
    return "\n".join(lines) + "\n}\n"


def test_a_spec_of_5000_states_and_20000_transitions_compiles() -> None:
    # Its time is measured in benchmarks/engine.py ("spec compilation"); here only that it works.
    kind = load_spec(big_spec_text(5_000, 20_000)).session("big")
    assert len(kind.states) == 5_000 and len(kind.edges()) == 20_000
    assert kind.next_state("s0", "next") == "s1" and kind.next_state("s1", "e0") == "s7"


def test_the_documented_limits() -> None:
    assert (MAX_STATES, MAX_TRANSITIONS) == (10_000, 100_000)


def test_more_states_than_the_limit_is_a_spec_error() -> None:
    names = tuple(f"s{i}" for i in range(MAX_STATES + 1))
    with pytest.raises(SpecError, match=f"{MAX_STATES + 1} states, more than the limit of {MAX_STATES}"):
        compile_session(SessionDef("wide", names, "s0", (), (), line=3, column=1))
    star = tuple(TransitionDef(("s0",), name, f"to_{name}") for name in names[1:-1])
    at_limit = SessionDef("wide", names[:-1], "s0", (), star)
    assert len(compile_session(at_limit).states) == MAX_STATES


def test_more_transitions_than_the_limit_is_a_spec_error() -> None:
    # `a, b -> c on e` counts as two: the limit is on what the machine would hold.
    names = tuple(f"s{i}" for i in range(1_001))
    many = tuple(TransitionDef(names[:-1], names[-1], f"e{i}") for i in range(MAX_TRANSITIONS // 1_000 + 1))
    with pytest.raises(SpecError, match=f"{len(many) * 1_000} transitions, more than the limit of "
                                        f"{MAX_TRANSITIONS}") as info:
        compile_session(SessionDef("dense", names, "s0", (), many, line=3, column=1))
    assert (info.value.line, info.value.column) == (3, 1)
