"""SessionTracker, load_spec sources, catalogs, and a user-defined session type used by SessionMessage."""

from __future__ import annotations

import pathlib

import pytest

from rallypoint.engine import (
    CompiledSessionType,
    SessionCatalog,
    SessionMessage,
    SessionTracker,
    SessionType,
    builtin_spec_names,
    load_spec,
)
from rallypoint.errors import (
    ConfigError,
    IllegalTransition,
    SpecSyntaxError,
    UnknownSession,
    UnknownSessionType,
)

# -- tracker -------------------------------------------------------------------------------------------------


def test_start_fire_and_stage() -> None:
    tracker = SessionTracker()
    session = tracker.start("s1", SessionType.TASK, peer="worker_1")
    assert tracker.stage("s1") == "request" and tracker.get("s1") is session
    assert tracker.fire("s1", "received") == "receive"
    assert (tracker.live, tracker.finished) == (1, 0)
    assert tracker.fire("s1", "completed") == "complete"
    assert (tracker.live, tracker.finished) == (0, 1)
    assert tracker.stage("s1") == "complete"  # still answerable after it finished
    assert "s1" in tracker and len(tracker) == 0


def test_session_types_by_enum_name_or_compiled() -> None:
    tracker = SessionTracker()
    task = tracker.catalog.require("task")
    assert tracker.start("a", SessionType.NOTIFICATION).type.name == "notification"
    assert tracker.start("b", "notification").type is tracker.catalog.require(SessionType.NOTIFICATION)
    assert tracker.start("c", task).type is task
    with pytest.raises(UnknownSessionType, match=r"'nope'.*notification, task"):
        tracker.start("d", "nope")


def test_a_duplicate_start_returns_the_existing_session() -> None:
    tracker = SessionTracker()
    first = tracker.start("s", SessionType.TASK, peer="w1")
    tracker.fire("s", "received")
    again = tracker.start("s", SessionType.TASK, peer="w2")
    assert again is first and again.state == "receive" and again.peer == "w1"
    tracker.fire("s", "completed")
    assert tracker.start("s", SessionType.TASK) is first  # finished and remembered: not restarted
    assert tracker.live == 0


def test_illegal_and_unknown() -> None:
    tracker = SessionTracker()
    tracker.start("s", SessionType.NOTIFICATION)
    with pytest.raises(IllegalTransition) as info:
        tracker.fire("s", "completed")
    assert (info.value.session_id, info.value.state, info.value.event) == ("s", "request", "completed")
    assert tracker.stage("s") == "request"
    tracker.fire("s", "received")
    with pytest.raises(IllegalTransition, match="'receive'"):  # finished: accepts nothing
        tracker.fire("s", "timeout")
    with pytest.raises(UnknownSession):
        tracker.fire("nobody", "received")
    with pytest.raises(UnknownSession):
        tracker.stage("nobody")
    assert isinstance(UnknownSession("x"), KeyError)


def test_try_fire_never_raises() -> None:
    tracker = SessionTracker()
    tracker.start("s", SessionType.TASK)
    assert tracker.try_fire("nobody", "received") is False
    assert tracker.try_fire("s", "bogus") is False
    assert tracker.try_fire("s", "received") is True
    assert tracker.try_fire("s", "completed") is True
    assert tracker.try_fire("s", "completed") is False  # finished
    assert tracker.stage("s") == "complete"


def test_finished_sessions_live_in_a_bounded_lru() -> None:
    tracker = SessionTracker(max_finished=2)
    for sid in ("a", "b", "c"):
        tracker.start(sid, SessionType.NOTIFICATION)
    tracker.fire("a", "received")
    tracker.fire("b", "timeout")
    assert tracker.stage("a") == "receive"  # touching "a" makes "b" the least recently used
    tracker.fire("c", "peer_lost")
    assert tracker.finished == 2
    assert tracker.stage("a") == "receive" and tracker.stage("c") == "failed"
    with pytest.raises(UnknownSession):
        tracker.stage("b")  # forgotten


def test_max_finished_zero_forgets_at_once_and_negative_is_refused() -> None:
    tracker = SessionTracker(max_finished=0)
    tracker.start("a", SessionType.NOTIFICATION)
    tracker.fire("a", "received")
    assert "a" not in tracker
    with pytest.raises(ConfigError):
        SessionTracker(max_finished=-1)


def test_settle_moves_a_live_session_to_the_finished_lru_in_its_stage() -> None:
    tracker = SessionTracker(max_finished=1)
    tracker.start("n1", SessionType.NOTIFICATION, peer="worker_1")
    tracker.settle("n1")
    tracker.settle("unknown")  # ignored
    assert tracker.live == 0 and tracker.stage("n1") == "request"
    assert tracker.fail_peer("worker_1") == []  # settled: no later event moves it
    assert not tracker.try_fire("n1", "received") and tracker.stage("n1") == "request"
    tracker.start("n2", SessionType.NOTIFICATION)
    tracker.settle("n2")
    assert "n1" not in tracker and tracker.stage("n2") == "request"  # bounded by max_finished


def test_peer_failure_moves_pending_sessions_with_that_peer() -> None:
    tracker = SessionTracker()
    tracker.start("t1", SessionType.TASK, peer="worker_1")
    tracker.start("t2", SessionType.TASK, peer="worker_1")
    tracker.start("t3", SessionType.TASK, peer="worker_2")
    tracker.start("n1", SessionType.NOTIFICATION, peer="worker_1")
    tracker.start("t4", SessionType.TASK, peer="worker_1")
    tracker.fire("t2", "received")
    tracker.fire("t4", "completed")  # finished: not pending
    assert {s.id for s in tracker.pending_with("worker_1")} == {"t1", "t2", "n1"}
    moved = tracker.fail_peer("worker_1")
    assert {s.id for s in moved} == {"t1", "t2", "n1"}
    assert {tracker.stage(sid) for sid in ("t1", "t2", "n1")} == {"failed"}
    assert tracker.stage("t3") == "request" and tracker.stage("t4") == "complete"
    assert tracker.pending_with("worker_1") == [] and tracker.fail_peer("worker_1") == []


def test_fail_peer_skips_sessions_that_do_not_accept_the_event() -> None:
    spec = load_spec(
        "session sticky {\n  states waiting, done\n  initial waiting\n  final done\n"
        "  waiting -> done on ok\n}\n",
    )
    tracker = SessionTracker()
    tracker.start("s", spec.session("sticky"), peer="p")
    assert tracker.fail_peer("p") == []
    assert tracker.stage("s") == "waiting"


def test_expire_fires_timeout_on_the_given_live_sessions() -> None:
    tracker = SessionTracker()
    for sid in ("a", "b", "c"):
        tracker.start(sid, SessionType.TASK)
    tracker.fire("c", "completed")
    moved = tracker.expire(["a", "c", "unknown"])
    assert [s.id for s in moved] == ["a"]
    assert [tracker.stage(s) for s in "abc"] == ["expired", "request", "complete"]
    assert tracker.expire((sid for sid in ["b"]), event="peer_lost")[0].state == "failed"


def test_discard() -> None:
    tracker = SessionTracker()
    tracker.start("a", SessionType.TASK)
    tracker.discard("a")
    tracker.discard("never")
    assert "a" not in tracker and tracker.live == 0


def test_start_in_a_final_stage_goes_straight_to_finished() -> None:
    tracker = SessionTracker()
    tracker.start("a", SessionType.TASK, stage="complete")
    assert (tracker.live, tracker.finished, tracker.stage("a")) == (0, 1, "complete")


# -- a user-defined type: two-phase commit, from a file ------------------------------------------------------

TWO_PHASE = """\
# Two-phase commit as seen by the coordinator.
session two_phase {
    states preparing, prepared, committed, aborted, failed
    initial preparing
    final committed, aborted, failed
    preparing -> prepared on vote_yes
    preparing -> aborted on vote_no
    prepared -> committed on commit
    prepared -> aborted on abort
    preparing, prepared -> failed on peer_lost
}
rule all_voted = participant:vote:100%
"""


def test_two_phase_commit_from_a_file_used_by_session_message(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "two_phase.spec"
    path.write_text(TWO_PHASE)
    catalog = SessionCatalog([path])
    spec = load_spec(path)
    assert spec.origin == str(path)
    assert catalog.get("two_phase") == spec.session("two_phase")
    assert catalog.rules["all_voted"] == spec.rules["all_voted"]

    message = SessionMessage(tag="prepare", source="coordinator", destination="participant_1",
                             payload={"tx": 7}, session_type="two_phase")
    assert message.session_stage is None  # a message knows no catalog: its tracker fills the stage in

    tracker = SessionTracker(catalog=catalog)
    session = tracker.start(message.session_id, message.session_type, peer=message.destination,
                            stage=message.session_stage)
    assert session.state == "preparing"  # the initial stage, from the tracker's catalog
    assert tracker.fire(message.session_id, "vote_yes") == "prepared"
    assert tracker.fire(message.session_id, "commit") == "committed"
    with pytest.raises(IllegalTransition):
        tracker.fire(message.session_id, "abort")

    catalog.load(str(path))  # an equal definition again: fine
    assert SessionTracker().catalog.get("two_phase") is None  # other catalogs never see it


def test_unknown_user_type_gives_no_stage_but_the_tracker_refuses_it() -> None:
    message = SessionMessage(tag="x", source="a", destination="b", session_type="never_loaded_type")
    assert message.session_stage is None
    with pytest.raises(UnknownSessionType):
        SessionTracker().start(message.session_id, message.session_type)


# -- load_spec sources ---------------------------------------------------------------------------------------


def test_load_spec_by_builtin_name_path_string_pathlike_and_text(tmp_path: pathlib.Path) -> None:
    assert {"notification", "task"} <= set(builtin_spec_names())
    by_name = load_spec("task")
    assert by_name.origin == "<builtin task>" and list(by_name.session_types) == ["task"]
    path = tmp_path / "copy.spec"
    path.write_text(TWO_PHASE.replace("two_phase", "two_phase_copy").replace("all_voted", "all_voted_copy"))
    assert list(load_spec(str(path)).session_types) == ["two_phase_copy"]
    assert list(load_spec(path).session_types) == ["two_phase_copy"]
    assert load_spec("rule one_liner = a:b:1").rules == {
        "one_liner": load_spec("rule x = a:b:1").rules["x"]
    }
    text = load_spec("session s { states a\n initial a\n}")
    assert text.origin == "<string>" and text.session("s").initial == "a"


def test_load_spec_says_what_it_tried() -> None:
    with pytest.raises(ConfigError) as info:
        load_spec("no_such_spec")
    message = str(info.value)
    assert "not spec text" in message and "not an existing file" in message and "task" in message
    with pytest.raises(ConfigError, match="cannot read"):
        load_spec(pathlib.Path("/nonexistent/x.spec"))
    with pytest.raises(ConfigError):
        load_spec(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        load_spec("../../etc/passwd-ish")  # not a file, not a valid built-in name


def test_syntax_errors_come_from_the_grammar() -> None:
    with pytest.raises(SpecSyntaxError):
        load_spec("session broken {\n  states a\n")


def test_spec_session_unknown_name() -> None:
    with pytest.raises(UnknownSessionType, match="defines: task"):
        load_spec("task").session("tsak")


# -- the catalog ---------------------------------------------------------------------------------------------


def test_catalog_loads_builtins_lazily_and_maps_session_type_enum() -> None:
    fresh = SessionCatalog()
    assert fresh._builtins_loaded is False
    task = fresh.require(SessionType.TASK)
    assert fresh._builtins_loaded is True
    assert task.initial == "request" and fresh.get("notification") is not None
    assert fresh.names() == ["notification", "task"]
    assert "task" in fresh and "nope" not in fresh and fresh.get("nope") is None


def test_catalog_registration_policy() -> None:
    fresh = SessionCatalog()
    other_task = load_spec(
        "session task {\n states a, b\n initial a\n final b\n a -> b on go\n}\n"
    ).session("task")
    fresh.register(load_spec("task").session("task"))  # equal to the built-in: fine
    with pytest.raises(ConfigError, match="different session type named 'task'"):
        fresh.register(other_task)
    fresh.register(other_task, replace=True)
    assert fresh.require("task") is other_task

    fresh.register_rule("r", load_spec("rule r = a:b:1").rules["r"])
    with pytest.raises(ConfigError, match="different rule named 'r'"):
        fresh.register_rule("r", load_spec("rule r = a:b:2").rules["r"])


def test_add_spec_is_all_or_nothing() -> None:
    fresh = SessionCatalog(builtins=())
    fresh.add_spec(load_spec("rule r = a:b:1"))
    clash = load_spec("session new_one {\n states a\n initial a\n}\nrule r = a:b:9\n")
    with pytest.raises(ConfigError):
        fresh.add_spec(clash)
    assert fresh.get("new_one") is None


def test_require_lists_known_names() -> None:
    with pytest.raises(UnknownSessionType, match="known: .*notification.*task"):
        SessionCatalog().require("tsak")


def test_compiled_type_is_hashable_and_reprs() -> None:
    task = SessionCatalog().require("task")
    assert isinstance(task, CompiledSessionType)
    assert {task: 1}[task] == 1
    assert "CompiledSessionType('task'" in repr(task)


def test_load_spec_accepts_a_hand_built_ast() -> None:
    from rallypoint.grammar import RuleDef, SessionDef, SpecFile, TransitionDef, Unit

    ast = SpecFile(
        sessions=(
            SessionDef("ping", ("sent", "done"), "sent", ("done",),
                       (TransitionDef(("sent",), "done", "pong"),)),
        ),
        rules=(RuleDef("pongs", Unit("*", "pong", 1)),),
        origin="<hand-built>",
    )
    spec = load_spec(ast)
    assert spec.origin == "<hand-built>" and spec.rules == {"pongs": Unit("*", "pong", 1)}
    assert spec.session("ping").start("x").trigger("pong") == "done"


def test_load_spec_registers_nowhere_and_says_where_to_add_it() -> None:
    with pytest.raises(ConfigError, match=r"SessionCatalog\(\[source\]\) or catalog.load\(source\)"):
        load_spec("rule r = a:b:1", register=True)


def test_a_catalog_is_built_from_specs_of_every_kind(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "two_phase.spec"
    path.write_text(TWO_PHASE)
    one_liner = load_spec("rule ready = *:ready:1")
    catalog = SessionCatalog([path, "notification", one_liner, "session ping { states a\n initial a\n}"])
    assert catalog.names() == ["notification", "ping", "task", "two_phase"]
    assert sorted(catalog.rules) == ["all_voted", "ready"]
    assert SessionCatalog(str(path)).names() == ["notification", "task", "two_phase"]  # one source alone


def test_catalogs_are_independent_and_share_only_the_compiled_builtins() -> None:
    first, second = SessionCatalog(), SessionCatalog()
    assert first.require("task") is second.require("task")  # compiled once per process
    first.load("session only_first {\n states a\n initial a\n}\nrule first_rule = a:b:1\n")
    assert "only_first" in first and "only_first" not in second
    assert "first_rule" in first.rules and "first_rule" not in second.rules


def test_load_adds_all_or_nothing_and_returns_the_spec() -> None:
    catalog = SessionCatalog(builtins=())
    spec = catalog.load("rule r = a:b:1")
    assert spec.rules == dict(catalog.rules)
    with pytest.raises(ConfigError, match="different rule named 'r'"):
        catalog.load("session extra {\n states a\n initial a\n}\nrule r = a:b:2\n")
    assert catalog.names() == []
    catalog.load("rule r = a:b:2", replace=True)
    assert str(catalog.rules["r"]) == "a:b:2"
