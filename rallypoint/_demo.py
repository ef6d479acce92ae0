"""`rallypoint demo`: a real master/worker job on this machine, checked at the end.

The master splits the numbers 1..M into one chunk per worker and scatters them as task sessions. Each
worker (a separate process, made distributed with `@dist`) sums its chunk and replies. The master feeds
the replies into a RegisterTable: `worker:sum:60%` fires once a 60% quorum of workers has answered (a
progress line), `worker:sum:1` adds up every reply. When every chunk is back, the master checks the
total against M(M+1)/2, broadcasts `stop`, and waits for the workers to exit.

While it runs it shows the workers joining (read from the registry) and the chunks coming back: as progress bars
in a terminal, as plain lines (`worker_002 joined (1/4)`, `summed 1/4 chunks`) otherwise.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from rallypoint.engine import Message, RegisterTable, SessionType
from rallypoint.errors import Error


def run_worker(registry: str, group: str, name: str, join_timeout: float = 30.0) -> int:
    """One demo worker process: sum what the master sends until it says stop."""
    from rallypoint.proxy import Proxy, dist

    def on_sum(that: Any, proxy: Proxy, messages: list[Message]) -> None:
        for message in messages:
            that.chunks_done += 1
            proxy.reply(message, tag="sum", payload=sum(message.payload))

    def on_stop(that: Any, proxy: Proxy, messages: list[Message]) -> None:
        proxy.stop()

    with Proxy(group_name=group, component_type="worker", name=name, registry=registry,
               expected_peers={"master": 1}, join_timeout=join_timeout) as proxy:

        @dist(proxy, {"master:sum:1": on_sum, "master:stop:1": on_stop})
        class Worker:
            def __init__(self) -> None:
                self.chunks_done = 0

        worker: Any = Worker()  # @dist returns a new class; its launch() is not visible to type checkers
        worker.launch()
    return 0


class Progress(Protocol):
    """What the demo reports as it goes, besides its lines."""

    def say(self, line: str) -> None: ...
    def joined(self, name: str, count: int, total: int) -> None: ...
    def summed(self, count: int, total: int) -> None: ...
    def close(self) -> None: ...


class _Lines:
    """Progress as plain lines, for logs and pipes."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say

    def joined(self, name: str, count: int, total: int) -> None:
        self.say(f"{name} joined ({count}/{total})")

    def summed(self, count: int, total: int) -> None:
        self.say(f"summed {count}/{total} chunks")

    def close(self) -> None:
        pass


class _Bars:
    """Progress as bars in a terminal (rich), the demo's lines printed above them."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn("{task.description:<15}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn())
        self._tasks: dict[str, Any] = {}
        self._progress.start()

    def _bar(self, description: str, total: int) -> Any:
        if description not in self._tasks:
            self._tasks[description] = self._progress.add_task(description, total=total)
        return self._tasks[description]

    def say(self, line: str) -> None:
        self._progress.console.print(line, markup=False, highlight=False)

    def joined(self, name: str, count: int, total: int) -> None:
        self._progress.update(self._bar("workers joined", total), completed=count)

    def summed(self, count: int, total: int) -> None:
        self._progress.update(self._bar("chunks summed", total), completed=count)

    def close(self) -> None:
        self._progress.stop()


class _JoinWatcher(threading.Thread):
    """Reads the group's member list from the registry until every worker is in, reporting each newcomer."""

    def __init__(self, registry: str, group: str, workers: int, progress: Progress) -> None:
        super().__init__(name="rallypoint-demo-joins", daemon=True)
        self._registry, self._group, self._workers, self._progress = registry, group, workers, progress
        self._done = threading.Event()
        self._seen: list[str] = []

    def run(self) -> None:
        from rallypoint.proxy import RedisRegistry

        with RedisRegistry(self._registry, timeout=2.0) as registry:
            while len(self._seen) < self._workers:
                last = self._done.wait(0.05)
                try:
                    members = registry.members(self._group)
                except Error:
                    members = {}
                for name in sorted(n for n, r in members.items() if r.component_type == "worker"):
                    if name not in self._seen:
                        self._seen.append(name)
                        self._progress.joined(name, len(self._seen), self._workers)
                if last:
                    return

    def finish(self) -> None:
        """One last read, then stop (the master joined: every worker is registered by now)."""
        self._done.set()
        self.join(5)


def run_master(
    registry: str,
    group: str,
    workers: int,
    numbers: int,
    timeout: float,
    say: Callable[[str], None],
    progress: Progress | None = None,
    on_joined: Callable[[], None] | None = None,
) -> int:
    """The master side: returns 0 when the job's result checks out, 1 otherwise. `on_joined` is called once the
    master joined, before its first line; `progress` hears how many chunks came back."""
    from rallypoint.proxy import Proxy, Timeouts

    started = time.monotonic()
    with Proxy(group_name=group, component_type="master", name="master", registry=registry,
               expected_peers={"worker": workers}, timeouts=Timeouts(join=timeout, reply=timeout)) as proxy:
        if on_joined is not None:
            on_joined()
        names = proxy.peers["worker"]
        say(f"master joined {group!r} with {len(names)} workers in {time.monotonic() - started:.2f}s: "
            f"{', '.join(names)}")

        values = list(range(1, numbers + 1))
        chunks = [values[i::len(names)] for i in range(len(names))]
        session_ids = proxy.iscatter("sum", SessionType.TASK, list(zip(names, chunks, strict=True)))
        say(f"scattered {numbers} numbers in {len(chunks)} chunks")

        state = {"total": 0, "replies": 0}

        def on_quorum(that: Any, proxy_: Any, messages: list[Message]) -> None:
            partial = sum(m.payload for m in messages)
            say(f"60% quorum: {len(messages)} of {len(names)} workers reported (partial sum {partial})")

        def on_reply(that: Any, proxy_: Any, messages: list[Message]) -> None:
            for message in messages:
                state["total"] += message.payload
                state["replies"] += 1
                say(f"  {message.source} -> {message.payload}")
                if progress is not None:
                    progress.summed(state["replies"], len(names))

        table = RegisterTable(lambda: proxy.peers)
        table.register_event_handler("worker:sum:60%", on_quorum)
        table.register_event_handler("worker:sum:1", on_reply)
        deadline = time.monotonic() + timeout
        while state["replies"] < len(names):
            left = deadline - time.monotonic()
            if left <= 0:
                say(f"FAILED: only {state['replies']} of {len(names)} replies within {timeout}s")
                return 1
            table.push(proxy.receive_once(timeout=left))
            for handler, messages in table.get():
                handler(None, proxy, messages)

        stages = {proxy.session_stage(sid) for sid in session_ids}
        expected = numbers * (numbers + 1) // 2
        ok = state["total"] == expected and stages == {"complete"}
        say(f"total {state['total']} (expected {expected}); task sessions: {sorted(stages)}")
        proxy.ibroadcast("worker", "stop", SessionType.NOTIFICATION)
        say(f"{'OK' if ok else 'FAILED'} in {time.monotonic() - started:.2f}s")
        return 0 if ok else 1


def demo(workers: int, numbers: int, registry: str | None, timeout: float,
         say: Callable[[str], None] = print, bars: bool | None = None) -> int:
    """Start a registry (unless given), N worker processes and the master; return the exit status.

    `bars`: progress bars (in a terminal) rather than plain lines; None: bars when stdout is a terminal.
    """
    if workers < 1:
        say("--workers must be at least 1")
        return 2
    shown: Progress = _Bars() if (sys.stdout.isatty() if bars is None else bars) else _Lines(say)
    try:
        return _demo(workers, numbers, registry, timeout, shown)
    finally:
        shown.close()


def _demo(workers: int, numbers: int, registry: str | None, timeout: float, progress: Progress) -> int:
    from rallypoint.proxy._embedded import EmbeddedRegistryServer

    say = progress.say
    server = None
    if registry is None:
        server = EmbeddedRegistryServer()
        registry = server.start()
        say(f"embedded registry at {registry}")
    group = f"demo-{uuid.uuid4().hex[:8]}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(workers):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "rallypoint._demo", "worker", registry, group, f"worker_{i + 1:03d}",
                 "--join-timeout", str(timeout)],
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            ))
        say(f"started {workers} worker processes")
        joins = _JoinWatcher(registry, group, workers, progress)
        joins.start()
        try:
            status = run_master(registry, group, workers, numbers, timeout, say, progress, on_joined=joins.finish)
        except Error as exc:
            joins.finish()
            say(f"FAILED: {type(exc).__name__}: {exc}")
            status = 1
        for proc in procs:
            try:
                code = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                say(f"worker pid {proc.pid} did not exit; killing it")
                status = 1
                continue
            if code != 0:
                say(f"worker pid {proc.pid} exited with {code}")
                status = 1
        return status
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if server is not None:
            server.stop()


def _worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m rallypoint._demo worker")
    parser.add_argument("registry")
    parser.add_argument("group")
    parser.add_argument("name")
    parser.add_argument("--join-timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    try:
        return run_worker(args.registry, args.group, args.name, args.join_timeout)
    except Error as exc:  # one line, as the master reports its own errors: not a traceback per worker
        print(f"{args.name}: error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        sys.exit(_worker_main(sys.argv[2:]))
    sys.exit("usage: python -m rallypoint._demo worker REGISTRY GROUP NAME")
