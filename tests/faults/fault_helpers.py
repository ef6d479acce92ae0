"""Helpers for the fault tests: logging worker processes, detection timing, figures."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import time
from collections import Counter
from pathlib import Path

from proxy_helpers import PeerProcess

from rallypoint.errors import PeerGone

FIGURES: list[str] = []  # measured figures, shown in the terminal summary


def report(line: str) -> None:
    FIGURES.append(line)
    print(line)


def summary(label: str, seconds: list[float]) -> str:
    text = (f"{label}: n={len(seconds)} median={statistics.median(seconds):.3f}s max={max(seconds):.3f}s"
            if seconds else f"{label}: no samples")
    report(text)
    return text


class Worker(PeerProcess):
    """A `peer.py worker` that appends every message id it takes to `<log_dir>/<name>.log`.

    Every incarnation of the name appends to the same file, so `log_ids()` is what the name received
    over its whole life. `prefix` runs it under another command (e.g. `ip netns exec NS`).
    """

    def __init__(self, registry: str, group: str, name: str, log_dir: Path, *extra: str,
                 prefix: tuple[str, ...] = ()) -> None:
        self.log = log_dir / f"{name}.log"
        self.prefix = list(prefix)
        self.incarnations = 0
        super().__init__("worker", registry, group, name, "--log", str(self.log), *extra)

    def start(self) -> None:
        self._close_streams()
        self.proc = subprocess.Popen(self.prefix + self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.incarnations += 1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def sigkill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    def restart(self, timeout: float = 20.0) -> None:
        self.sigkill()
        self.start()
        self.wait_ready(timeout)

    def log_lines(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [line.split() for line in self.log.read_text().splitlines() if line.strip()]

    def log_ids(self) -> list[str]:
        return [fields[0] for fields in self.log_lines()]

    def duplicates(self) -> dict[str, int]:
        return {mid: n for mid, n in Counter(self.log_ids()).items() if n > 1}

    def _close_streams(self) -> None:
        for stream in (self.proc.stdout, self.proc.stderr) if self.proc else ():
            if stream is not None:
                stream.close()

    def close(self) -> None:
        """SIGTERM (after SIGCONT: a frozen worker cannot act on it), SIGKILL if it lingers; always reaped."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._close_streams()


def wait_logged(worker: Worker, message_id: str, timeout: float = 10.0) -> None:
    """Wait until `worker` logged that it took `message_id` (it is then working on it)."""
    deadline = time.monotonic() + timeout
    while message_id not in worker.log_ids():
        if time.monotonic() > deadline:
            raise AssertionError(f"{worker.name} did not take {message_id} within {timeout}s")
        time.sleep(0.005)


def time_to_peer_gone(master, session_id: str, started: float, timeout: float = 15.0) -> tuple[float, PeerGone]:
    """Block in receive_by_id on `session_id` until PeerGone; seconds from `started` (monotonic) to then."""
    try:
        replies = master.receive_by_id([session_id], timeout=timeout)
    except PeerGone as exc:
        return time.monotonic() - started, exc
    raise AssertionError(f"expected PeerGone, got replies {replies}")


def pump_until(master, predicate, timeout: float, what: str):
    """Let `master` handle its events (receive with a short timeout) until `predicate()` is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        master.poll(0.02)  # handle peer events without taking any message a later receive_by_id wants
