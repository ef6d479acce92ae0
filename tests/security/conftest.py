"""Fixtures for the attack tests: a gated victim driver in a subprocess (its RSS is its own), loopback only.

    victim = victims(max_part_bytes=4 << 20)      # ZmqDriver keywords; started, bound; killed at teardown
    victim.port, victim.address, victim.stats()  # stats: rss_kb hwm_kb refused delivered parts warnings
    victim.stats(reset_peak=True)                 # hwm_kb from now on
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

TOKEN = b"member-token-0123456789abcdef"
VICTIM = Path(__file__).with_name("zap_victim.py")


class Victim:
    def __init__(self, **driver_kwargs: Any) -> None:
        self.proc = subprocess.Popen([sys.executable, str(VICTIM), TOKEN.decode(), json.dumps(driver_kwargs)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.address = self.proc.stdout.readline().strip()
        assert self.address.startswith("tcp://127.0.0.1:"), f"victim did not start: {self.address!r}"
        self.port = int(self.address.rsplit(":", 1)[1])

    def stats(self, *, reset_peak: bool = False) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("reset\n" if reset_peak else "stats\n")
        self.proc.stdin.flush()
        return dict(json.loads(self.proc.stdout.readline()))

    def wait_for(self, what: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        """Ask for stats until `what(stats)` holds; fail at the deadline with the last stats."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if what(stats):
                return stats
            if time.monotonic() > deadline:
                pytest.fail(f"victim never reached the expected state; last stats {stats}")
            time.sleep(0.02)  # a polling interval between two questions, not a wait for an outcome

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


@pytest.fixture
def victims() -> Iterator[Callable[..., Victim]]:
    started: list[Victim] = []

    def start(**driver_kwargs: Any) -> Victim:
        victim = Victim(**driver_kwargs)
        started.append(victim)
        return victim

    yield start
    for victim in started:
        victim.close()
