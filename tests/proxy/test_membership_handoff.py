"""The lease keeper hands membership news to the owner thread without losing any.

The keeper reads the member list on its own thread and hands each list that differs from the last one it read
to the thread that uses the proxy. It never hands the same list twice, so a hand-off that loses the newest list
(as a shared list read with `updates[-1]` and then cleared could, when the keeper appended between the two)
leaves the proxy with a stale view for good. Here the keeper sees a new list on every read while the owner
absorbs as fast as it can, and the owner thread yields to the keeper between every two lines of rallypoint's
proxy code it runs (a trace function), so that every possible interleaving of the two threads gets its chance;
after each burst the proxy must show the last list read.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from types import FrameType
from typing import Any

import pytest
from proxy_helpers import new_group

from rallypoint.proxy import InMemoryNetwork, InMemoryRegistry, Liveness, PeerRecord, Proxy

pytestmark = pytest.mark.timeout(60)


class ChurningRegistry(InMemoryRegistry):
    """Lists one extra observer, renamed on each of the next `burst` reads (the keeper's), then steady."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.burst = 0
        self.version = 0
        self.reads_since_burst = 0
        self.version_reads = 0

    def start_burst(self, reads: int) -> None:
        with self._lock:
            self.burst = reads
            self.reads_since_burst = 0

    def members_version(self, group: str) -> int:
        """A new version on every call: the keeper reads the whole (churning) list at each of its refreshes."""
        with self._lock:
            self.version_reads += 1
            return self.version_reads

    def members(self, group: str) -> dict[str, PeerRecord]:
        records = super().members(group)
        with self._lock:
            self.reads_since_burst += 1
            if self.burst > 0:
                self.burst -= 1
                self.version += 1
            name = f"observer_{self.version}"
        records[name] = PeerRecord(name=name, component_type="observer", address="inmem://0",
                                   incarnation=f"{self.version:032x}", pid=1, host="h", started_at=0.0)
        return records


_PROXY_DIR = os.path.dirname(sys.modules[Proxy.__module__].__file__ or "")


def _yield_between_lines(frame: FrameType, event: str, arg: Any) -> Any:
    """A trace function: in rallypoint's proxy code, give the other threads the GIL before every line."""
    if not frame.f_code.co_filename.startswith(_PROXY_DIR):
        return None
    if event == "line":
        time.sleep(0)
    return _yield_between_lines


def test_no_membership_update_is_lost_and_the_last_one_wins():
    registry = ChurningRegistry()
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as CPython allows: races show up quickly
    try:
        with Proxy(group_name=new_group(), component_type="master", name="master", registry=registry,
                   driver=InMemoryNetwork().driver(),
                   liveness=Liveness(lease=2.0, refresh=0.001)) as proxy:
            for burst in range(250):
                registry.start_burst(1 + burst % 3)
                deadline = time.monotonic() + 5.0
                while True:
                    sys.settrace(_yield_between_lines)
                    try:
                        proxy.poll(0)  # absorb whatever the keeper handed over, yielding at every line
                    finally:
                        sys.settrace(None)
                    burst_over = registry.burst == 0 and registry.reads_since_burst > 4
                    if burst_over and proxy.peers == {"observer": [f"observer_{registry.version}"]}:
                        break
                    assert time.monotonic() < deadline, (
                        f"burst {burst}: the proxy shows {proxy.peers}, the registry last listed "
                        f"observer_{registry.version}: the newest member list was lost in the hand-off")
    finally:
        sys.setswitchinterval(previous)
