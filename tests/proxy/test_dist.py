"""@dist: handlers fire on rules, attributes fall through, launch() stops every documented way."""

from __future__ import annotations

import threading
import time

import pytest

from rallypoint import Message, SessionMessage, SessionType, dist
from rallypoint.engine import SessionCatalog
from rallypoint.errors import ConfigError, UnknownRuleName

pytestmark = pytest.mark.timeout(30)


def _send_all(master, messages):
    for message in messages:
        master.isend(message)


def test_handlers_get_exactly_the_messages_of_their_rule_and_the_local_instance(pair):
    master, worker, _ = pair
    calls = []

    def on_pair(that, proxy, messages):
        calls.append(("pair", [m.payload for m in messages]))
        that.total += sum(m.payload for m in messages)

    def on_stop(that, proxy, messages):
        calls.append(("stop", [m.tag for m in messages]))
        proxy.stop()

    @dist(worker, {"master:add:2": on_pair, ("master:stop:1", "master:halt:1", "OR"): on_stop})
    class Adder:
        """Adds numbers."""

        def __init__(self, start):
            self.total = start

        def double(self):
            return self.total * 2

    adder = Adder(100)
    assert Adder.__name__ == "Adder" and Adder.__doc__ == "Adds numbers."
    _send_all(master, [Message(tag="add", source="master", destination="worker_001", payload=i) for i in (1, 2, 3)]
              + [Message(tag="halt", source="master", destination="worker_001")])
    adder.launch(handle_sigterm=False)
    assert calls == [("pair", [1, 2]), ("stop", ["halt"])]
    assert adder.total == 103 and adder.double() == 206  # attribute access falls through
    assert adder.register_table.buffered == 1  # the third "add" waits for a partner


def test_launch_stops_from_another_thread(pair):
    _, worker, _ = pair

    @dist(worker, {"*:*:1": lambda that, proxy, messages: None})
    class Idle:
        pass

    idle = Idle()
    threading.Timer(0.2, idle.stop).start()
    started = time.monotonic()
    idle.launch(handle_sigterm=False)
    assert time.monotonic() - started < 3.0


def test_a_failing_handler_is_not_swallowed(pair):
    master, worker, _ = pair

    def boom(that, proxy, messages):
        raise RuntimeError("handler failed")

    @dist(worker, {"master:x:1": boom})
    class Fragile:
        pass

    master.isend(Message(tag="x", source="master", destination="worker_001"))
    with pytest.raises(RuntimeError, match="handler failed"):
        Fragile().launch(handle_sigterm=False)


def test_on_error_sees_the_failure_and_the_loop_goes_on(pair):
    master, worker, _ = pair
    seen = []

    def boom(that, proxy, messages):
        raise ValueError(messages[0].payload)

    def on_stop(that, proxy, messages):
        proxy.stop()

    @dist(worker, {"master:x:1": boom, "master:stop:1": on_stop},
          on_error=lambda exc, handler, messages: seen.append((type(exc).__name__, str(exc), handler)))
    class Tolerant:
        pass

    _send_all(master, [Message(tag="x", source="master", destination="worker_001", payload="first"),
                       Message(tag="x", source="master", destination="worker_001", payload="second"),
                       Message(tag="stop", source="master", destination="worker_001")])
    Tolerant().launch(handle_sigterm=False)
    assert seen == [("ValueError", "first", boom), ("ValueError", "second", boom)]


def test_percentage_rules_follow_the_live_peers(master_and_workers):
    master, workers = master_and_workers
    quorum = []

    def on_quorum(that, proxy, messages):
        quorum.append(sorted(m.source for m in messages))
        proxy.stop()

    @dist(master, {"worker:update:60%": on_quorum})
    class Server:
        pass

    for worker in workers[:2]:
        worker.isend(SessionMessage(tag="update", source=worker.name, destination="master",
                                    session_type=SessionType.NOTIFICATION))
    Server().launch(handle_sigterm=False)
    assert quorum == [["worker_0", "worker_1"]]  # 60% of 3 live workers = 2


def test_named_rules_from_a_spec_and_bad_keys(pair, tmp_path):
    master, worker, _ = pair
    spec = tmp_path / "rules.spec"
    spec.write_text("rule go_now = master:go:1 OR master:now:1\n")
    fired = []

    @dist(worker, {"go_now": lambda that, proxy, messages: (fired.append(messages[0].tag), proxy.stop())},
          catalog=SessionCatalog([spec]))
    class Named:
        pass

    master.isend(Message(tag="now", source="master", destination="worker_001"))
    Named().launch(handle_sigterm=False)
    assert fired == ["now"]

    with pytest.raises(UnknownRuleName):
        dist(worker, {"no_such_rule": lambda *a: None})(type("X", (), {}))()
    with pytest.raises(UnknownRuleName):  # the catalog given above was that table's only
        dist(worker, {"go_now": lambda *a: None})(type("Y", (), {}))()
    with pytest.raises(ConfigError):
        dist(worker, {})
    with pytest.raises(ConfigError):
        dist(worker, {"a:b:1": "not callable"})


def test_a_stop_before_launch_is_not_lost_and_a_later_launch_runs_again(pair):
    master, worker, _ = pair
    seen = []

    @dist(worker, {"master:go:1": lambda that, proxy, messages: (seen.append(1), proxy.stop())})
    class Once:
        pass

    once = Once()
    once.stop()
    started = time.monotonic()
    once.launch(handle_sigterm=False)  # returns at once: the stop came first
    assert time.monotonic() - started < 1.0 and seen == []
    master.isend(Message(tag="go", source="master", destination="worker_001"))
    once.launch(handle_sigterm=False)  # the earlier stop was consumed: this one runs until the handler
    assert seen == [1]
    # after a stop, receive_once still returns what arrives (stop() is for loops only)
    master.isend(Message(tag="later", source="master", destination="worker_001"))
    assert worker.receive_once(timeout=5).tag == "later"


def test_rule_names_come_from_the_proxys_own_catalog_by_default(pair):
    master, worker, _ = pair
    worker.catalog.load("rule go_later = master:later:1\n")
    fired = []

    @dist(worker, {"go_later": lambda that, proxy, messages: (fired.append(messages[0].tag), proxy.stop())})
    class Named:
        pass

    master.isend(Message(tag="later", source="master", destination="worker_001"))
    Named().launch(handle_sigterm=False)
    assert fired == ["later"]
