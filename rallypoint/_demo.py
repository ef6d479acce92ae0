"""`rallypoint demo`: a real master/worker job on this machine, checked at the end.

The master splits the numbers 1..M into one chunk per worker and scatters them as task sessions. Each
worker (a separate process, made distributed with `@dist`) sums its chunk and replies. The master feeds
the replies into a RegisterTable: `worker:sum:60%` fires once a 60% quorum of workers has answered (a
progress line), `worker:sum:1` adds up every reply. When every chunk is back, the master checks the
total against M(M+1)/2, broadcasts `stop`, and waits for the workers to exit.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

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


def run_master(
    registry: str,
    group: str,
    workers: int,
    numbers: int,
    timeout: float,
    say: Callable[[str], None],
) -> int:
    """The master side: returns 0 when the job's result checks out, 1 otherwise."""
    from rallypoint.proxy import Proxy, Timeouts

    started = time.monotonic()
    with Proxy(group_name=group, component_type="master", name="master", registry=registry,
               expected_peers={"worker": workers}, timeouts=Timeouts(join=timeout, reply=timeout)) as proxy:
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
         say: Callable[[str], None] = print) -> int:
    """Start a registry (unless given), N worker processes and the master; return the exit status."""
    from rallypoint.proxy._embedded import EmbeddedRegistryServer

    if workers < 1:
        say("--workers must be at least 1")
        return 2
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
        try:
            status = run_master(registry, group, workers, numbers, timeout, say)
        except Error as exc:
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
