"""Using the rallypoint engine on its own: no network, just plain function calls.

Run with `pytest examples/test_engine_example.py`.
"""

from rallypoint.engine import Message, RegisterTable, SessionTracker, load_spec


def test_a_task_session_moves_through_its_stages():
    # The built-in "task" session type is defined in specs/task.spec.
    task = load_spec("task").session("task")
    print(task.to_mermaid())  # paste into any Mermaid viewer to see the state machine

    tracker = SessionTracker()
    tracker.start("session-1", task, peer="worker_001")
    assert tracker.stage("session-1") == "request"

    assert tracker.fire("session-1", "received") == "receive"  # the worker got the task
    assert tracker.fire("session-1", "completed") == "complete"  # and sent the result back

    # Another task whose worker dies before answering:
    tracker.start("session-2", task, peer="worker_002")
    failed = tracker.fail_peer("worker_002")
    assert [s.id for s in failed] == ["session-2"]
    assert tracker.stage("session-2") == "failed"


def test_the_register_table_hands_messages_to_the_right_handler():
    def on_updates(that, proxy, messages):
        """Called by the proxy once 60% of the workers sent an update and the master synced."""

    def on_stop(that, proxy, messages):
        """Called for every stop message, from anyone."""

    peers = {"master": ["master"], "worker": ["worker_001", "worker_002", "worker_003"]}
    table = RegisterTable(peers)
    table.register_event_handler("worker:update:60% AND master:sync:1", on_updates)
    table.register_event_handler("*:stop:1", on_stop)

    table.push(Message(tag="update", source="worker_001", destination="master", payload=1))
    table.push(Message(tag="update", source="worker_001", destination="master", payload=2))  # same worker
    table.push(Message(tag="sync", source="master", destination="master"))
    assert table.get() == []  # 60% of 3 workers is 2 distinct workers: only one so far

    table.push(Message(tag="update", source="worker_003", destination="master", payload=3))
    table.push(Message(tag="stop", source="master", destination="worker_001"))

    (first_handler, first_messages), (second_handler, second_messages) = table.get()
    assert first_handler is on_updates
    assert [(m.source, m.payload) for m in first_messages] == [
        ("worker_001", 1),
        ("master", None),
        ("worker_003", 3),
    ]
    assert second_handler is on_stop
    assert [m.tag for m in second_messages] == ["stop"]
    # worker_001's second update stays buffered for the next round.
