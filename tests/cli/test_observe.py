"""Watching a group: `rallypoint peers`, `monitor --once/--json` and `metrics`, against a live group of real
processes (worker processes, a master proxy in this process) and a real redis-server; the summaries members
publish and the registry calls behind them; and the demo's progress lines.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "proxy"))  # proxy_helpers, peer.py

from proxy_helpers import PeerProcess, make_proxy, new_group  # noqa: E402

from rallypoint import SessionMessage  # noqa: E402
from rallypoint.proxy import InMemoryRegistry, PeerRecord, Proxy  # noqa: E402
from rallypoint.proxy._observe import (  # noqa: E402
    STATS_LINGER,
    Summary,
    decode_summary,
    make_summary,
    rates,
    read_group,
)
from rallypoint.proxy._stats import ProxyStats  # noqa: E402

CLI_TIMEOUT = 30.0  # seconds for one `python -m rallypoint` run
SEEN_TIMEOUT = 20.0  # seconds for a change to show in what members publish (they publish every 2 s)
WORKERS = ("worker_1", "worker_2", "worker_3")


def run_cli(*args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rallypoint", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def snapshot(registry: str, group: str) -> dict[str, Any]:
    """`rallypoint monitor GROUP --json`, parsed, with members by name."""
    result = run_cli("monitor", group, "--registry", registry, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    data["by_name"] = {member["name"]: member for member in data["members"]}
    return data


def until(what: str, check: Callable[[], Any], timeout: float = SEEN_TIMEOUT) -> Any:
    """Call `check` until it returns something truthy, under a deadline (each call is a real CLI run)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
    raise AssertionError(f"not seen within {timeout}s: {what}")


def until_seen(what: str, registry: str, group: str, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The first `monitor --json` snapshot for which `check` holds, under a deadline."""
    found: list[dict[str, Any]] = []

    def attempt() -> bool:
        data = snapshot(registry, group)
        if check(data):
            found.append(data)
            return True
        return False

    until(what, attempt)
    return found[0]


class Group:
    """A master proxy in this process and worker processes (`tests/proxy/peer.py`) in a fresh group."""

    def __init__(self, registry: str) -> None:
        self.registry = registry
        self.name = new_group()
        self.workers = {name: PeerProcess("worker", registry, self.name, name) for name in WORKERS}
        self.master: Proxy = make_proxy(registry, self.name, "master", "master",
                                        expected_peers={"worker": len(WORKERS)})
        for worker in self.workers.values():
            worker.wait_ready()

    def echo(self, worker: str, count: int) -> None:
        for i in range(count):
            [reply] = self.master.send(SessionMessage(tag="echo", destination=worker, payload=b"x" * 100 + bytes([i])),
                                       timeout=10)
            assert reply.payload[-1] == i

    def close(self) -> None:
        self.master.close()
        for worker in self.workers.values():
            worker.close()


@pytest.fixture
def group(registry_url: str) -> Iterator[Group]:
    job = Group(registry_url)
    try:
        yield job
    finally:
        job.close()


# -------------------------------------------------------------------------------------------- peers


@pytest.mark.timeout(90)
def test_peers_lists_every_member_with_its_record_and_lease(group: Group) -> None:
    result = run_cli("peers", group.name, "--registry", group.registry)
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    assert header.split() == ["NAME", "TYPE", "ADDRESS", "INCARNATION", "UP", "SINCE", "LEASE", "LEFT", "STATE"]
    rows = {line.split()[0]: line.split() for line in lines}
    assert set(rows) == {"master", *WORKERS}
    for name, cells in rows.items():
        record = group.master.member(name) if name != "master" else None
        address = record.address if record is not None else group.master.address
        incarnation = record.incarnation if record is not None else group.master.incarnation
        kind = "master" if name == "master" else "worker"
        # NAME TYPE ADDRESS INCARNATION DATE TIME LEASE STATE
        assert cells[1:4] == [kind, address, incarnation], cells
        assert re.fullmatch(r"\d{4}-\d\d-\d\d", cells[4]) and re.fullmatch(r"\d\d:\d\d:\d\d", cells[5]), cells
        lease = re.fullmatch(r"(\d+\.\d)s", cells[6])
        assert lease and 0 < float(lease[1]) <= 2.0, cells  # the test members' lease is 2 s
        assert cells[7] == "up", cells


def test_peers_of_a_group_that_does_not_exist_is_one_error_line(registry_url: str) -> None:
    result = run_cli("peers", "no-such-group", "--registry", registry_url)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: no group 'no-such-group' in registry {registry_url}: no member is listed and none left or went "
        f"in the last {STATS_LINGER:.0f}s"]


def test_peers_and_monitor_with_the_registry_down_say_so_in_one_line() -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for command in (["peers"], ["monitor", "--once"], ["monitor", "--json"]):
        result = run_cli(command[0], "g", *command[1:], "--registry", f"redis://:pw@127.0.0.1:{port}/0")
        assert result.returncode == 1, result
        [line] = result.stderr.splitlines()
        assert line.startswith(f"error: registry redis://:***@127.0.0.1:{port}/0: "), line
        assert "ConnectionError" in line and "pw" not in line.replace(":***@", ""), line


def test_a_member_name_cannot_drive_the_terminal(registry_url: str) -> None:
    from rallypoint.proxy import RedisRegistry

    group = new_group()
    with RedisRegistry(registry_url) as registry:
        registry.register(group, PeerRecord.new("evil\x1b[2J\u202e", "worker", "tcp://127.0.0.1:1"), ttl=30)
        for command in (["peers"], ["monitor", "--once"]):
            result = run_cli(command[0], group, *command[1:], "--registry", registry_url)
            assert result.returncode == 0, result.stderr
            assert "\x1b" not in result.stdout and "\u202e" not in result.stdout
            assert "evil\\x1b[2J\\u202e" in result.stdout


# -------------------------------------------------------------------------------------------- monitor


@pytest.mark.timeout(120)
def test_monitor_shows_every_member_counts_that_grow_and_a_killed_member_as_gone(group: Group) -> None:
    first = until_seen("a summary from every member", group.registry, group.name,
                       lambda s: len(s["members"]) == 4 and all(m["stats"] for m in s["members"]))
    assert set(first["by_name"]) == {"master", *WORKERS}
    assert {m["state"] for m in first["members"]} == {"up"}
    assert first["group"] == group.name and first["registry"] == group.registry
    for name, member in first["by_name"].items():
        assert member["type"] == ("master" if name == "master" else "worker")
        assert 0 < member["lease_left"] <= 2.0
        assert member["address"].startswith("tcp://127.0.0.1:")

    group.echo("worker_1", 20)
    def count(data: dict[str, Any], name: str, counter: str) -> int:
        return int(data["by_name"][name]["stats"][counter])

    after = until_seen("worker_1's 20 messages in its summary and the master's", group.registry, group.name,
                       lambda s: count(s, "worker_1", "received") >= count(first, "worker_1", "received") + 20
                       and count(s, "master", "sent") >= count(first, "master", "sent") + 20)
    assert count(after, "worker_1", "sent") >= count(first, "worker_1", "sent") + 20  # its replies
    assert count(after, "master", "received") >= count(first, "master", "received") + 20
    assert count(after, "worker_2", "received") == count(first, "worker_2", "received")

    group.echo("worker_1", 10)
    until_seen("10 more", group.registry, group.name,
               lambda s: count(s, "worker_1", "received") >= count(after, "worker_1", "received") + 10)

    group.workers["worker_2"].kill()  # SIGKILL: no goodbye; its lease lapses within 2 s
    gone = until_seen("worker_2 gone", group.registry, group.name,
                      lambda s: s["by_name"]["worker_2"]["state"] == "gone")
    assert gone["by_name"]["worker_2"]["lease_left"] is None and gone["by_name"]["worker_2"]["address"] is None
    assert {gone["by_name"][n]["state"] for n in ("master", "worker_1", "worker_3")} == {"up"}

    result = run_cli("monitor", group.name, "--registry", group.registry, "--once")
    assert result.returncode == 0, result.stderr
    title, header, *lines = result.stdout.splitlines()
    assert title.startswith(f"group {group.name} at {group.registry}, ") and title.endswith(": 3 up, 1 gone")
    assert header.split()[:5] == ["NAME", "TYPE", "STATE", "UP", "LEASE"]
    rows = {line.split()[0]: line.split() for line in lines}
    assert set(rows) == {"master", *WORKERS}
    assert rows["worker_2"][1:3] == ["worker", "gone"]
    assert [rows[n][2] for n in ("master", "worker_1", "worker_3")] == ["up", "up", "up"]
    assert "IN/s" not in header  # one snapshot has no rates
    assert int(rows["worker_1"][header.split().index("RECEIVED")]) >= 30


@pytest.mark.timeout(90)
def test_a_member_that_closes_is_shown_as_left(group: Group) -> None:
    group.master.isend(SessionMessage(tag="stop", destination="worker_3", payload=None))
    assert group.workers["worker_3"].wait(10) == 0
    seen = until_seen("worker_3 left", group.registry, group.name,
                      lambda s: s["by_name"].get("worker_3", {}).get("state") == "left")
    assert seen["by_name"]["worker_3"]["stats"] is not None
    assert seen["by_name"]["worker_1"]["state"] == "up"


# -------------------------------------------------------------------------------------------- metrics


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.timeout(120)
def test_metrics_exporter_serves_the_group_over_http(group: Group) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rallypoint", "metrics", group.name, "--port", str(port),
                             "--registry", group.registry], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # it prints this line once it listens
        assert line.startswith(f"serving http://127.0.0.1:{port}/metrics for group {group.name}"), line
        group.echo("worker_1", 5)

        def scrape() -> dict[str, Any] | None:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                assert response.status == 200
                families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
            sent = {s.labels["member"]: s.value for s in families["rallypoint_messages_sent"].samples
                    if s.name == "rallypoint_messages_sent_total"}
            return families if len(sent) == 4 and sent["worker_1"] >= 5 else None

        families = until("worker_1's replies in the exporter", scrape)
        assert families["rallypoint_registry_up"].samples[0].value == 1
        up = {s.labels["member"]: (s.labels, s.value) for s in families["rallypoint_member_up"].samples}
        assert set(up) == {"master", *WORKERS}
        for name, (labels, value) in up.items():
            assert labels == {"group": group.name, "member": name, "type": "master" if name == "master" else "worker"}
            assert value == 1
        for family, kind in [("rallypoint_messages_sent", "counter"), ("rallypoint_messages_received", "counter"),
                             ("rallypoint_sent_bytes", "counter"), ("rallypoint_received_bytes", "counter"),
                             ("rallypoint_sessions_completed", "counter"), ("rallypoint_sessions_failed", "counter"),
                             ("rallypoint_handler_seconds", "counter"), ("rallypoint_dropped_messages", "counter"),
                             ("rallypoint_held_messages", "gauge"), ("rallypoint_buffered_messages", "gauge"),
                             ("rallypoint_sessions_live", "gauge"),
                             ("rallypoint_member_lease_remaining_seconds", "gauge")]:
            assert families[family].type == kind, family
        for family in families.values():
            for sample in family.samples:
                assert sample.name.startswith("rallypoint_")
                if family.type == "counter":
                    assert sample.name in (f"{family.name}_total", f"{family.name}_created"), sample.name
        received = {s.labels["member"]: s.value for s in families["rallypoint_messages_received"].samples
                    if s.name.endswith("_total")}
        assert received["worker_1"] >= 5 and received["master"] >= 5
        leases = [s.value for s in families["rallypoint_member_lease_remaining_seconds"].samples]
        assert len(leases) == 4 and all(0 < v <= 2.0 for v in leases)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# -------------------------------------------------------------------------------------------- the pieces


def test_summaries_round_trip_and_anything_else_is_skipped() -> None:
    record = PeerRecord.new("w1", "worker", "tcp://127.0.0.1:5")
    stats = ProxyStats()
    stats.sent, stats.received, stats.dropped_late, stats.handler_ns = 5, 7, 2, 1_500_000_000
    stats.dropped_by_reason["ForgedFrame"] = 3
    stats.gauges = lambda: {"sessions_live": 4, "held_now": 1, "buffered": 9}
    summary = decode_summary(make_summary(record, stats, state="left"))
    assert summary is not None
    assert (summary.name, summary.type, summary.incarnation, summary.state) == ("w1", "worker",
                                                                               record.incarnation, "left")
    assert (summary.sent, summary.received, summary.handler_seconds) == (5, 7, 1.5)
    assert (summary.sessions_live, summary.held_now, summary.buffered) == (4, 1, 9)
    assert summary.dropped == {"ForgedFrame": 3, "late": 2} and summary.dropped_total == 5
    for junk in (b"", b"not json", b"[]", b'{"name": "w1"}', b"{" + b" " * 20_000 + b"}",
                 make_summary(record, stats).replace(b'"sent":5', b'"sent":-5'),
                 make_summary(record, stats).replace(b'"state":"up"', b'"state":"sideways"')):
        assert decode_summary(junk) is None, junk


def test_rates_between_two_summaries_of_one_incarnation() -> None:
    base = dict(name="w", type="worker", incarnation="a", state="up", started_at=0.0)
    before = Summary(**base, at=10.0, sent=10, received=100, bytes_received=1000, handler_seconds=1.0)
    after = Summary(**base, at=12.0, sent=30, received=100, bytes_received=5000, handler_seconds=2.0)
    found = rates(before, after)
    assert found is not None
    assert (found.sent, found.received, found.bytes_received, found.busy) == (10.0, 0.0, 2000.0, 0.5)
    assert rates(after, after) is None
    assert rates(before, Summary(**{**base, "incarnation": "b"}, at=12.0)) is None


def test_in_memory_registry_keeps_summaries_past_the_lease_and_reads_leases() -> None:
    now = [0.0]
    registry = InMemoryRegistry(clock=lambda: now[0])
    a, b = PeerRecord.new("a", "worker", "tcp://127.0.0.1:1"), PeerRecord.new("b", "worker", "tcp://127.0.0.1:2")
    for record in (a, b):
        registry.register("g", record, ttl=3.0)
        registry.publish_stats("g", record.name, make_summary(record, ProxyStats()), ttl=3.0 + STATS_LINGER)
    now[0] = 1.0
    assert registry.lease_left("g") == {"a": 2.0, "b": 2.0}
    registry.refresh("g", a, ttl=3.0)
    now[0] = 3.5  # b's lease lapsed; its summary did not
    assert registry.lease_left("g") == {"a": 0.5}
    assert {row.name: row.state for row in read_group(registry, "g").rows} == {"a": "up", "b": "gone"}
    now[0] = 3.5 + STATS_LINGER
    assert set(registry.read_stats("g")) == set() and read_group(registry, "g").rows == []


def test_redis_registry_stats_and_leases(registry_url: str) -> None:
    from rallypoint.proxy import RedisRegistry

    group = new_group()
    with RedisRegistry(registry_url) as registry:
        assert registry.read_stats(group) == {} and registry.lease_left(group) == {}
        registry.register(group, PeerRecord.new("a", "worker", "tcp://127.0.0.1:1"), ttl=5.0)
        registry.publish_stats(group, "a", b"one", ttl=5.0)
        registry.publish_stats(group, "b", b"two", ttl=0.05)
        [lease] = registry.lease_left(group).values()
        assert 4.0 < lease <= 5.0
        until("b's summary expired", lambda: registry.read_stats(group) == {"a": b"one"}, timeout=5)
        import redis

        assert redis.Redis.from_url(registry_url).smembers(f"rallypoint:{group}:stats") == {b"a"}  # index cleaned


# -------------------------------------------------------------------------------------------- demo


@pytest.mark.timeout(60)
def test_demo_shows_workers_joining_as_plain_lines_when_not_a_terminal() -> None:
    result = run_cli("demo", "--workers", "3", "--numbers", "300", "--timeout", "20", timeout=45)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    joined = [re.fullmatch(r"(worker_00[123]) joined \((\d)/3\)", line) for line in lines if " joined (" in line]
    assert all(joined), lines
    assert sorted(m[1] for m in joined if m) == ["worker_001", "worker_002", "worker_003"]
    assert [m[2] for m in joined if m] == ["1", "2", "3"]
    last_join = max(i for i, line in enumerate(lines) if " joined (" in line)
    assert last_join < next(i for i, line in enumerate(lines) if line.startswith("master joined"))
    done = [line for line in lines if line.startswith("summed ")]
    assert done == [f"summed {i}/3 chunks" for i in (1, 2, 3)]
    assert "\x1b" not in result.stdout  # no terminal codes when stdout is not a terminal


@pytest.mark.timeout(60)
def test_demo_draws_progress_bars_in_a_terminal() -> None:
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "rallypoint", "demo", "--workers", "2", "--numbers", "100",
                             "--timeout", "20"], stdin=follower, stdout=follower, stderr=follower,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "xterm", "COLUMNS": "100"})
    os.close(follower)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(leader, 4096)
            except OSError:  # EIO once the process closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert proc.wait(45) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    os.close(leader)
    text = b"".join(chunks).decode(errors="replace")
    assert "workers joined" in text and "chunks summed" in text, text
    assert "2/2" in text and "OK in" in text, text
    assert "\x1b[" in text  # drawn (cursor and colour codes), not printed line by line
