"""Helpers for the end-of-job tests: `job_peer.py` processes whose stdout and stderr are read as they come.

Both streams are drained by reader threads into line lists (a process logging at INFO never blocks on a full
pipe), and a test waits on a line under a deadline instead of sleeping.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

JOB_PEER = Path(__file__).with_name("job_peer.py")


class JobProcess:
    """One `job_peer.py` process: `wait_line("READY")`, `lines("TASK")`, `wait()` (the exit status)."""

    def __init__(self, role: str, registry: str, group: str, name: str, *options: str) -> None:
        self.name = name
        self.args = [sys.executable, str(JOB_PEER), role, registry, group, name, *options]
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._changed = threading.Condition()
        self._eof = {"stdout": False, "stderr": False}
        self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._drain, args=(self.proc.stdout, self.stdout, "stdout"), daemon=True),
            threading.Thread(target=self._drain, args=(self.proc.stderr, self.stderr, "stderr"), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _drain(self, stream: IO[bytes], into: list[str], which: str) -> None:
        for raw in iter(stream.readline, b""):
            with self._changed:
                into.append(raw.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._eof[which] = True
            self._changed.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def lines(self, prefix: str = "") -> list[str]:
        """Stdout lines so far that start with `prefix`."""
        with self._changed:
            return [line for line in self.stdout if line.startswith(prefix)]

    def wait_line(self, prefix: str, timeout: float = 20.0) -> str:
        """The first stdout line starting with `prefix`, waiting for it under a deadline."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.stdout:
                    if line.startswith(prefix):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self._eof["stdout"]:
                    break
                self._changed.wait(min(left, 0.5))
        raise AssertionError(f"{self.name}: no {prefix!r} line within {timeout}s (exit {self.proc.poll()})\n"
                             + self.report())

    def send_line(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float = 20.0) -> int:
        """The exit status; fails (with the process's output) if it is still running after `timeout`."""
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout}s\n{self.report()}") from None
        for reader in self._readers:  # everything it wrote is in the lists once the pipes hit EOF
            reader.join(5)
        return status

    def report(self) -> str:
        with self._changed:
            out = "\n".join(self.stdout[-40:])
            err = "\n".join(self.stderr[-40:])
        return f"--- {self.name} stdout ---\n{out}\n--- {self.name} stderr ---\n{err}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def close(self) -> None:
        """Teardown: SIGTERM, then SIGKILL if it does not exit within 3 s; pipes closed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.kill()
        for reader in self._readers:  # the process is dead: its pipes reach EOF
            reader.join(5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


def severe_lines(lines: list[str]) -> list[str]:
    """Log lines at WARNING or above (format "LEVEL logger: message"), and any traceback."""
    return [line for line in lines
            if line.split(" ", 1)[0] in ("WARNING", "ERROR", "CRITICAL") or line.startswith("Traceback")]
