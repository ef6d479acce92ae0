"""Fixtures for the fault tests: real processes, real signals, a real redis-server, network namespaces.

Every process a test starts is killed at teardown, whatever the outcome; the figures the tests measure
(detection times, close() time, losses and duplicates) are printed under `-s` and kept in a session
report shown in the terminal summary.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "proxy"))  # proxy_helpers, peer.py

from fault_helpers import FIGURES, Worker  # noqa: E402
from proxy_helpers import new_group  # noqa: E402


@pytest.fixture
def workers(registry_url: str, tmp_path: Path) -> Iterator:
    """Start `peer.py worker` processes that log what they take; yields a starter, kills all at teardown.

        started = workers(2)            # worker_000, worker_001 in a fresh group
        started[0].log_ids()            # message ids it took, over every incarnation
    """
    started: list[Worker] = []
    group = new_group()

    def start(count: int, *extra: str) -> list[Worker]:
        batch = [Worker(registry_url, group, f"worker_{len(started) + i:03d}", tmp_path, *extra)
                 for i in range(count)]
        started.extend(batch)
        return batch

    start.group = group  # type: ignore[attr-defined]
    start.registry = registry_url  # type: ignore[attr-defined]
    try:
        yield start
    finally:
        for worker in started:
            worker.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.write_sep("-", "fault figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
