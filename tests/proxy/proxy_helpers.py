"""Helpers for proxy tests: peer processes that say when they are ready, and fast-liveness proxies."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from rallypoint.errors import RegistryError
from rallypoint.proxy import Liveness, Proxy, RedisRegistry, Timeouts

PEER_SCRIPT = Path(__file__).with_name("peer.py")
FAST = Liveness(lease=2.0, refresh=0.2, heartbeat=0.2, heartbeat_timeout=1.0)


class WatchedRegistry(RedisRegistry):
    """A RedisRegistry that counts the reads a proxy makes and can play dead (`down = True`), for tests that
    check how often a proxy asks the registry and what it does while the registry is unreachable."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.member_reads = 0  # by every thread
        self.prompted_reads = 0  # by the thread that made this registry (a proxy's owner, not its lease keeper)
        self._owner = threading.get_ident()
        self.key_reads = 0
        self.down = False
        self.failed_calls = 0  # calls refused while down

    def _check_up(self) -> None:
        if self.down:
            self.failed_calls += 1
            raise RegistryError("registry down (WatchedRegistry)")

    def members(self, group: str):  # type: ignore[no-untyped-def]
        self.member_reads += 1
        if threading.get_ident() == self._owner:
            self.prompted_reads += 1
        self._check_up()
        return super().members(group)

    def group_key(self, group: str, *, create: bool = True) -> bytes:
        self.key_reads += 1
        self._check_up()
        return super().group_key(group, create=create)

    def refresh(self, group, record, ttl):  # type: ignore[no-untyped-def]
        self._check_up()
        return super().refresh(group, record, ttl)


def new_group() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def make_proxy(registry: str, group: str, component_type: str, name: str | None = None, **kwargs) -> Proxy:
    kwargs.setdefault("liveness", FAST)
    kwargs.setdefault("timeouts", Timeouts(join=10.0, connect=3.0, reply=10.0, close=0.5))
    return Proxy(group_name=group, component_type=component_type, name=name, registry=registry, **kwargs)


class PeerProcess:
    """A `tests/proxy/peer.py` process; `wait_ready()` reads its READY line under a deadline."""

    def __init__(self, role: str, registry: str, group: str, name: str, *extra: str) -> None:
        self.name = name
        self.args = [sys.executable, str(PEER_SCRIPT), role, registry, group, name, *extra]
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, timeout: float = 20.0) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith(b"READY"):
                return
        err = b""
        if self.proc.poll() is not None and self.proc.stderr is not None:
            err = self.proc.stderr.read()
        raise AssertionError(f"peer {self.name} not ready in {timeout}s (last line {line!r}): "
                             f"{err.decode(errors='replace')[-2000:]}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signum)

    def wait(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stderr_text(self) -> str:
        if self.proc is None or self.proc.stderr is None or self.proc.poll() is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.kill()
        for stream in (self.proc.stdout, self.proc.stderr) if self.proc else ():
            if stream is not None:
                stream.close()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02):
    """Poll `predicate` until it returns something truthy, or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
