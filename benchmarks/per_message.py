"""Per-message CPU of the proxy, send + receive, in one process with the in-memory driver, beside a baseline.

    python benchmarks/per_message.py [--rounds N] [--messages N] [--baseline REV]

Two proxies (a master and a worker) are joined through `InMemoryRegistry()` and `InMemoryNetwork()`, so the
numbers are the library's own CPU: no sockets, no Redis. Three scenarios, each timed with
`time.process_time()` (every thread of the process) and divided by the number of messages:

  stream      master.isend(task) N times, then worker.receive_once() N times      (per message)
  send+reply  master.send(task) blocking, a worker thread receive_once() + reply()  (per round trip)
  one thread  isend, receive_once, reply, receive_by_id on one thread                (per round trip)

The same scenarios run against REV (default: the commit before the proxy rebuild), extracted with
`git archive` into a temporary tree laid out as the installed package (as scripts/check does) and imported
through PYTHONPATH. Each round runs both sides in fresh processes, alternately, so a busy machine slows
both alike; the table shows medians over the rounds and the median of the rounds' ratios new/baseline
(below 1: cheaper now).
Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BASELINE = "0ed0bafb1471b08c6de2d6b5cb6f54a5ee5b8b58"
SUBPACKAGES = ("grammar", "engine", "proxy", "specs")
SCENARIOS = ("stream", "send+reply", "one thread")
WARMUP = 200


# ------------------------------------------------------------------------------ one side, in a child process


Scenario = Callable[[Any, Any, int], None]


def _cpu_per_message(scenario: Scenario, master: Any, worker: Any, n: int) -> float:
    """CPU seconds per message of `scenario` over `n` messages, after a warm-up."""
    scenario(master, worker, WARMUP)
    gc.collect()
    start = time.process_time()
    scenario(master, worker, n)
    return (time.process_time() - start) / n


def _joined_pair() -> tuple[Any, Any]:
    """A master and a worker proxy joined through an in-memory registry and network (public API only)."""
    from rallypoint.proxy import InMemoryNetwork, InMemoryRegistry, Proxy

    registry, network = InMemoryRegistry(), InMemoryNetwork()
    group = f"bench-{os.getpid()}"
    master = Proxy(group_name=group, component_type="master", name="master", registry=registry,
                   driver=network.driver())
    worker = Proxy(group_name=group, component_type="worker", name="worker_1", registry=registry,
                   driver=network.driver(), expected_peers={"master": 1})
    return master, worker


def _stream(master: Any, worker: Any, n: int) -> None:
    from rallypoint import SessionMessage

    for i in range(n):
        master.isend(SessionMessage(tag="task", source="master", destination="worker_1", payload=i))
    for _ in range(n):
        worker.receive_once(timeout=10)


def _send_and_reply(master: Any, worker: Any, n: int) -> None:
    from rallypoint import SessionMessage

    def answer() -> None:
        for _ in range(n):
            message = worker.receive_once(timeout=10)
            worker.reply(message, payload=message.payload)

    replier = threading.Thread(target=answer, daemon=True)
    replier.start()
    for i in range(n):
        master.send(SessionMessage(tag="task", source="master", destination="worker_1", payload=i), timeout=10)
    replier.join(timeout=10)


def _one_thread(master: Any, worker: Any, n: int) -> None:
    from rallypoint import SessionMessage

    for i in range(n):
        [session_id] = master.isend(SessionMessage(tag="task", source="master", destination="worker_1", payload=i))
        worker.reply(worker.receive_once(timeout=10), payload=i)
        master.receive_by_id([session_id], timeout=10)


def run_side(n: int) -> dict[str, Any]:
    """Every scenario once on the rallypoint this process imports: {scenario: CPU seconds per message}."""
    import rallypoint

    scenarios: dict[str, Scenario] = {"stream": _stream, "send+reply": _send_and_reply, "one thread": _one_thread}
    master, worker = _joined_pair()
    try:
        out: dict[str, Any] = {"imported_from": str(Path(rallypoint.__file__).parent)}
        for name, scenario in scenarios.items():
            out[name] = _cpu_per_message(scenario, master, worker, n)
        return out
    finally:
        worker.close()
        master.close()


# ------------------------------------------------------------------------------ both sides, from the parent


def baseline_tree(rev: str, into: Path) -> Path:
    """`rev` extracted into `into`/src, with `into`/tree/rallypoint laid out as the installed package."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev], check=True,
                             capture_output=True).stdout
    src = into / "src"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(src, filter="data")
        else:  # Python without extraction filters; the archive is our own repository's
            tar.extractall(src)  # noqa: S202
    package = into / "tree" / "rallypoint"
    package.mkdir(parents=True)
    for module in (src / "rallypoint").glob("*.py"):
        (package / module.name).symlink_to(module)
    for name in SUBPACKAGES:
        (package / name).symlink_to(src / name, target_is_directory=True)
    return into / "tree"


def run_child(n: int, pythonpath: Path | None) -> dict[str, Any]:
    env = dict(os.environ)
    if pythonpath is None:
        env.pop("PYTHONPATH", None)
    else:
        env["PYTHONPATH"] = str(pythonpath)
    done = subprocess.run([sys.executable, __file__, "--child", "--messages", str(n)], env=env, check=True,
                          capture_output=True, text=True, cwd=tempfile.gettempdir(), timeout=300)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _check_origin(result: dict[str, Any], expected: Path, side: str) -> None:
    origin = Path(result["imported_from"]).resolve()
    if origin != expected.resolve():
        raise SystemExit(f"the {side} run imported rallypoint from {origin}, not {expected.resolve()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--baseline", default=BASELINE, help="git revision to compare with")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_side(args.messages)))
        return

    new: dict[str, list[float]] = {name: [] for name in SCENARIOS}
    old: dict[str, list[float]] = {name: [] for name in SCENARIOS}
    with tempfile.TemporaryDirectory(prefix="rallypoint-baseline-") as scratch:
        tree = baseline_tree(args.baseline, Path(scratch))
        print(f"per-message CPU (process_time), {args.messages} messages x {args.rounds} rounds; "
              f"baseline {args.baseline[:10]}")
        for i in range(args.rounds):
            ours = run_child(args.messages, None)
            theirs = run_child(args.messages, tree)
            _check_origin(ours, REPO / "rallypoint", "new")
            _check_origin(theirs, tree / "rallypoint", "baseline")
            for name in SCENARIOS:
                new[name].append(ours[name])
                old[name].append(theirs[name])
            print(f"  round {i + 1}: " + "  ".join(f"{name} {ours[name] * 1e6:.1f}/{theirs[name] * 1e6:.1f} us"
                                                    for name in SCENARIOS))
    # The ratio is the median of each round's ratio: the two sides of a round ran back to back, under the same load.
    print(f"\n  {'scenario':<12} {'new':>12} {'baseline':>12} {'new/baseline':>13}")
    for name in SCENARIOS:
        ours_us, theirs_us = statistics.median(new[name]) * 1e6, statistics.median(old[name]) * 1e6
        ratio = statistics.median(a / b for a, b in zip(new[name], old[name], strict=True))
        print(f"  {name:<12} {ours_us:>9.1f} us {theirs_us:>9.1f} us {ratio:>13.2f}")


if __name__ == "__main__":
    main()
