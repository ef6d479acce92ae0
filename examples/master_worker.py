"""A parameter server and its workers: synchronous SGD that waits for the fastest 60% of the workers.

    python examples/master_worker.py --workers 2
    python examples/master_worker.py --workers 4 --slow 0.05      # worker_004 lags: its answers go stale
    python examples/master_worker.py --registry redis://127.0.0.1:6379

The master (the parameter server) holds the parameters of a linear model `y = w*x + b`. Each step it
broadcasts them to every worker as a task session. Each worker, a process of its own made distributed with
`@dist`, owns a shard of the data and answers with the gradient of the squared error on that shard. The
master pushes the answers into a RegisterTable: the rule `worker:gradient:60%` fires once a quorum of 60%
of the live workers (distinct ones, rounded up) has answered for the current step; the master averages
their gradients, takes a step and broadcasts the new parameters. An answer that arrives after its step was
taken (from the slowest workers) is dropped as stale: the "backup workers" variant of synchronous SGD.

With no `--registry`, an embedded registry runs in this process, so nothing needs to be installed.
Exits 0 when the fit recovers w=3, b=2 and every task session ended `complete`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import uuid
from typing import Any

from rallypoint import EmbeddedRegistryServer, Message, Proxy, RegisterTable, SessionType, Timeouts, dist

TRUE_W, TRUE_B = 3.0, 2.0
POINTS = 120  # x spread evenly over [-1, 1], y = 3x + 2; worker i of n owns every n-th point from i


def shard(index: int, workers: int) -> list[tuple[float, float]]:
    xs = [-1.0 + 2.0 * j / (POINTS - 1) for j in range(index, POINTS, workers)]
    return [(x, TRUE_W * x + TRUE_B) for x in xs]


# ------------------------------------------------------------------------------------------- worker


def on_params(that: Any, proxy: Proxy, messages: list[Message]) -> None:
    for message in messages:
        if that.delay:
            time.sleep(that.delay)  # a straggler, to show stale answers being dropped
        proxy.reply(message, tag="gradient", payload=that.gradient(message.payload))


def on_stop(that: Any, proxy: Proxy, messages: list[Message]) -> None:
    proxy.stop()


def run_worker(registry: str, group: str, index: int, workers: int, delay: float) -> int:
    with Proxy(group_name=group, component_type="worker", name=f"worker_{index + 1:03d}",
               registry=registry, expected_peers={"master": 1}) as proxy:

        @dist(proxy, {"master:params:1": on_params, "master:stop:1": on_stop})
        class Worker:
            def __init__(self, data: list[tuple[float, float]], delay: float) -> None:
                self.data = data
                self.delay = delay

            def gradient(self, params: dict[str, Any]) -> dict[str, Any]:
                """d/dw and d/db of the mean squared error on this shard, at the master's parameters."""
                w, b = params["w"], params["b"]
                errors = [(w * x + b - y, x) for x, y in self.data]
                n = len(errors) or 1
                return {
                    "step": params["step"],
                    "grad": (2 * sum(e * x for e, x in errors) / n, 2 * sum(e for e, _ in errors) / n),
                    "loss": sum(e * e for e, _ in errors) / n,
                }

        Worker(shard(index, workers), delay).launch()  # until the master broadcasts "stop"
    return 0


# ------------------------------------------------------------------------------------------- master


def run_master(registry: str, group: str, workers: int, steps: int, lr: float, timeout: float) -> int:
    with Proxy(group_name=group, component_type="master", name="master", registry=registry,
               expected_peers={"worker": workers}, timeouts=Timeouts(join=timeout, reply=timeout)) as proxy:
        names = proxy.peers["worker"]
        print(f"parameter server joined {group!r} with {len(names)} workers: {', '.join(names)}")

        quorum: list[Message] = []

        def on_quorum(that: Any, proxy_: Proxy, messages: list[Message]) -> None:
            quorum.extend(messages)  # exactly the answers that met the rule, one per worker

        table = RegisterTable(lambda: proxy.peers)
        table.register_event_handler("worker:gradient:60%", on_quorum)

        w = b = 0.0
        sessions: list[str] = []
        unanswered: set[str] = set()
        stale = 0
        for step in range(1, steps + 1):
            params = {"step": step, "w": w, "b": b}
            sent = proxy.ibroadcast("worker", "params", SessionType.TASK, payload=params)
            sessions += sent
            unanswered.update(sent)
            quorum.clear()
            while not quorum:
                message = proxy.receive_once(timeout=timeout)
                unanswered.discard(message.session_id)
                if message.payload["step"] != step:
                    stale += 1  # a straggler's answer to an earlier step
                    continue
                table.push(message)
                for handler, messages in table.get():
                    handler(None, proxy, messages)
            grads = [m.payload["grad"] for m in quorum]
            w -= lr * sum(g[0] for g in grads) / len(grads)
            b -= lr * sum(g[1] for g in grads) / len(grads)
            if step == 1 or step % 5 == 0 or step == steps:
                loss = sum(m.payload["loss"] for m in quorum) / len(quorum)
                print(f"step {step:3d}: loss {loss:.6f} from {len(quorum)} of {len(names)} workers "
                      f"({', '.join(sorted(m.source for m in quorum))})")

        # The slowest workers still owe answers to the last steps: collect them, so every session completes.
        stale += len(proxy.receive_by_id(sorted(unanswered), timeout=timeout))
        stages = sorted({proxy.session_stage(sid) for sid in sessions})
        proxy.ibroadcast("worker", "stop", SessionType.NOTIFICATION)

    print(f"fit w={w:.4f} b={b:.4f} (true w={TRUE_W:g} b={TRUE_B:g}) in {steps} steps; "
          f"{stale} stale gradients dropped; task sessions: {stages}")
    ok = abs(w - TRUE_W) < 1e-3 and abs(b - TRUE_B) < 1e-3 and stages == ["complete"]
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.5, help="learning rate")
    parser.add_argument("--slow", type=float, default=0.0, metavar="SECONDS",
                        help="make the last worker this much slower per step")
    parser.add_argument("--registry", help="a registry URL, e.g. redis://127.0.0.1:6379 (default: embedded)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds for joining and for each answer")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.steps < 1:
        parser.error("--workers and --steps must be at least 1")

    server = None
    registry = args.registry
    if registry is None:
        server = EmbeddedRegistryServer()
        registry = server.start()
        print(f"embedded registry at {registry}")
    group = f"ps-{uuid.uuid4().hex[:8]}"
    workers = [
        subprocess.Popen([sys.executable, __file__, "worker", registry, group, str(i), str(args.workers),
                          str(args.slow if i == args.workers - 1 else 0.0)])
        for i in range(args.workers)
    ]
    try:
        status = run_master(registry, group, args.workers, args.steps, args.lr, args.timeout)
        for proc in workers:
            if proc.wait(timeout=10) != 0:
                print(f"worker pid {proc.pid} exited with {proc.returncode}")
                status = 1
        return status
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        registry, group, index, workers, delay = sys.argv[2:7]
        sys.exit(run_worker(registry, group, int(index), int(workers), float(delay)))
    sys.exit(main())
