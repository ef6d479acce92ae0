"""A peer process for the proxy tests: `python tests/proxy/peer.py ROLE REGISTRY GROUP NAME [options]`.

Roles:
  worker   joins as component type `worker` (expects one `master`), then answers by tag:
             sum     -> replies with sum(payload)
             echo    -> replies with the payload unchanged
             slow    -> sleeps payload seconds, then replies "done"
             crash   -> dies at once with SIGKILL (no close, no unregister)
             forward -> forwards the message to the peer named in payload["to"]
             shape   -> replies with (shape, dtype, sum) of a numpy array
             stop    -> stops (closes cleanly, exit 0)
  idle     joins as `worker` and only receives (for join and peer-list tests)

It prints "READY <name>" on stdout once joined, so tests wait for readiness instead of sleeping.
With `--log FILE` a worker appends one line per message it takes, "<message_id> <session_id> <tag> <pid>",
before acting on it (O_APPEND, unbuffered: every incarnation of a name can share one file, and a SIGKILL
loses no line), so tests can check that no message was delivered twice.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from rallypoint import Proxy, Timeouts, dist
from rallypoint.proxy import Liveness


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["worker", "idle"])
    parser.add_argument("registry")
    parser.add_argument("group")
    parser.add_argument("name")
    parser.add_argument("--type", default="worker")
    parser.add_argument("--expect", default="master:1", help="TYPE:COUNT[,TYPE:COUNT]")
    parser.add_argument("--spec", action="append", default=[], help="spec files to load")
    parser.add_argument("--log", help="append '<message_id> <session_id> <tag> <pid>' per message taken")
    args = parser.parse_args()
    log_fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if args.log else None

    expected = {}
    for item in filter(None, args.expect.split(",")):
        kind, count = item.split(":")
        expected[kind] = int(count)
    with Proxy(group_name=args.group, component_type=args.type, name=args.name, registry=args.registry,
               expected_peers=expected, specs=args.spec, timeouts=Timeouts(join=20.0),
               liveness=Liveness(lease=2.0, refresh=0.2, heartbeat=0.2, heartbeat_timeout=1.0)) as proxy:
        print(f"READY {proxy.name}", flush=True)
        if args.role == "idle":
            for _ in proxy.receive():
                pass
            return 0

        def on_any(that, proxy, messages):
            for message in messages:
                tag = message.tag
                if log_fd is not None:
                    os.write(log_fd, f"{message.message_id} {message.session_id} {tag} {os.getpid()}\n".encode())
                if tag == "sum":
                    proxy.reply(message, payload=sum(message.payload))
                elif tag == "echo":
                    proxy.reply(message, payload=message.payload)
                elif tag == "slow":
                    time.sleep(float(message.payload))
                    proxy.reply(message, payload="done")
                elif tag == "crash":
                    os.kill(os.getpid(), signal.SIGKILL)
                elif tag == "forward":
                    proxy.forward(message, message.payload["to"], tag="echo", payload=message.payload)
                elif tag == "shape":
                    array = message.payload
                    proxy.reply(message, payload=(array.shape, str(array.dtype), float(array.sum())))
                elif tag == "stop":
                    proxy.stop()

        @dist(proxy, {"*:*:1": on_any})
        class Worker:
            pass

        Worker().launch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
