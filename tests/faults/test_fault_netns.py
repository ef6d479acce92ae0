"""Two "hosts": a worker in a Linux network namespace, joined to this one by a veth pair; the link is cut.

Addresses: a private /30 in 10.213.0.0/16 chosen at random and checked unused, host side .1, namespace side
.2. The registry (our own redis-server) listens on the host side; nothing else is involved. A low-priority
`unreachable` route for the /30 keeps traffic for the namespace from following the default route while the
link is down. Everything (namespace, veth, route, processes) is removed at teardown.

Needs root and iproute2; skipped otherwise, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fault_helpers import Worker, pump_until, summary, time_to_peer_gone, wait_logged
from proxy_helpers import make_proxy, new_group

from rallypoint import SessionMessage
from rallypoint.proxy import Liveness, Timeouts

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

DEFAULT = Liveness()
BOUND = 3.0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=check)


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"network namespace tests must run under CI: {reason}")
    pytest.skip(reason)


@dataclass
class Link:
    ns: str
    host_if: str
    host_ip: str
    ns_ip: str
    subnet: str

    def down(self) -> None:
        _ip("link", "set", self.host_if, "down")

    def up(self) -> None:
        _ip("link", "set", self.host_if, "up")


def _free_subnet() -> tuple[str, str, str]:
    used = _ip("-4", "addr", "show").stdout + _ip("-4", "route", "show", "table", "all").stdout
    for _ in range(50):
        third, fourth = random.randrange(256), random.randrange(0, 256, 4)
        base = f"10.213.{third}."
        if base not in used:
            return f"{base}{fourth}/30", f"{base}{fourth + 1}", f"{base}{fourth + 2}"
    pytest.fail("no free /30 in 10.213.0.0/16")


@pytest.fixture
def link() -> Iterator[Link]:
    if os.geteuid() != 0:
        _unavailable("network namespaces need root")
    if shutil.which("ip") is None:
        _unavailable("iproute2 ('ip') is not installed")
    tag = uuid.uuid4().hex[:6]
    ns, host_if, ns_if = f"rp-{tag}", f"rp{tag}h", f"rp{tag}n"
    subnet, host_ip, ns_ip = _free_subnet()
    if _ip("netns", "add", ns, check=False).returncode != 0:
        _unavailable(f"cannot create a network namespace: {_ip('netns', 'add', ns, check=False).stderr}")
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", ns)
        _ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", ns, "addr", "add", f"{ns_ip}/30", "dev", ns_if)
        _ip("-n", ns, "link", "set", ns_if, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        # While host_if is down its route is gone: without this, traffic for ns_ip would take the default
        # route off the machine. With it, it fails at once (EHOSTUNREACH), and the link route wins when up.
        _ip("route", "add", "unreachable", subnet, "metric", "4000")
        yield Link(ns, host_if, host_ip, ns_ip, subnet)
    finally:
        _ip("route", "del", "unreachable", subnet, "metric", "4000", check=False)
        _ip("link", "del", host_if, check=False)  # takes its peer with it
        _ip("netns", "del", ns, check=False)


def test_link_cut_is_detected_and_healing_delivers_what_was_held(link, redis_server_factory, tmp_path):
    registry = redis_server_factory(bind=link.host_ip)
    group = new_group()
    worker = Worker(registry.url, group, "worker_ns", tmp_path, prefix=("ip", "netns", "exec", link.ns))
    try:
        with make_proxy(registry.url, group, "master", "master", expected_peers={"worker": 1},
                        liveness=DEFAULT, timeouts=Timeouts(join=20.0, connect=3.0, reply=20.0, close=1.0)
                        ) as master:
            worker.wait_ready()
            assert master.address.startswith(f"tcp://{link.host_ip}:")
            assert master.member(worker.name).address.startswith(f"tcp://{link.ns_ip}:")
            [reply] = master.send(SessionMessage(tag="sum", source="master", destination=worker.name,
                                                 payload=[1, 2]), timeout=10)
            assert reply.payload == 3

            detection, healing = [], []
            for attempt, away in enumerate((1.0, 3.0, 0.2)):  # 3.0: longer than the worker's lease (2 s)
                pending = SessionMessage(tag="slow", source="master", destination=worker.name, payload=0.2)
                [sid] = master.isend(pending)
                wait_logged(worker, pending.message_id)
                link.down()
                cut = time.monotonic()
                elapsed, exc = time_to_peer_gone(master, sid, cut)
                detection.append(elapsed)
                assert exc.peer == worker.name and master.session_stage(sid) == "failed"
                assert master.peers == {}

                held = [SessionMessage(tag="sum", source="master", destination=worker.name, payload=[attempt, i])
                        for i in range(3)]
                held_ids = [master.isend(m)[0] for m in held]
                assert master.held(worker.name) == 3
                time.sleep(away)

                link.up()
                healed = time.monotonic()
                pump_until(master, lambda: master.peers == {"worker": [worker.name]}, 30, "the worker back")
                replies = master.receive_by_id(held_ids, timeout=30)
                healing.append(time.monotonic() - healed)
                assert [r.payload for r in replies] == [attempt + i for i in range(3)]
                [again] = master.send(SessionMessage(tag="sum", source="master", destination=worker.name,
                                                     payload=[5, 5]), timeout=10)
                assert again.payload == 10
                ids = worker.log_ids()
                assert all(ids.count(m.message_id) == 1 for m in held)
            assert worker.duplicates() == {}
    finally:
        worker.close()
    summary(f"detection link down (default Liveness, bound {DEFAULT.detection}s)", detection)
    summary("link up -> held messages answered", healing)
    assert max(detection) < BOUND
