"""The master half of `rallypoint demo`, for a test that puts the master and the workers on different hosts.

    python netns_demo_master.py REGISTRY GROUP WORKERS [--timeout S] [--hold]

`rallypoint demo` starts its workers itself, as children on its own host, so a test that wants them on another
host (`ip netns exec`) starts them with the demo's worker command (`python -m rallypoint._demo worker REGISTRY
GROUP NAME`) and runs the demo's master here. Every line the master says goes to stdout; with `--hold`, once the
master has joined (every worker registered and connected) it prints `HOLD` and waits for a line on stdin before
it scatters the work, so the test can look at the full group from another host. Exits with the demo's status.
"""

from __future__ import annotations

import argparse
import sys

from rallypoint._demo import run_master
from rallypoint.errors import Error


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("registry")
    parser.add_argument("group")
    parser.add_argument("workers", type=int)
    parser.add_argument("--numbers", type=int, default=10_000)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--hold", action="store_true")
    args = parser.parse_args()

    def say(line: str) -> None:
        print(line, flush=True)
        if args.hold and line.startswith("master joined"):
            print("HOLD", flush=True)
            sys.stdin.readline()

    try:
        return run_master(args.registry, args.group, args.workers, args.numbers, args.timeout, say)
    except Error as exc:
        print(f"FAILED: {type(exc).__name__}: {exc}", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
