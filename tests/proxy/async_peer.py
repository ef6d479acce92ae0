"""An async worker process for the AsyncProxy tests: `python tests/proxy/async_peer.py REGISTRY GROUP NAME`.

Joins as component type `worker` (expects one `master`) with an AsyncProxy and runs an `@dist` class whose
handlers are `async def`, one rule per tag, each answering in its own lane:
  echo   -> replies with the payload          slow   -> awaits payload seconds, then replies "done"
  report -> sends the master an `update` notification with the payload (for quorum rules)
  crash  -> dies at once with SIGKILL         stop   -> stops launch() (exit 0)
Prints "READY <name>" once joined. `--uvloop` runs it on uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from rallypoint import AsyncProxy, SessionMessage, SessionType, Timeouts, dist
from rallypoint.proxy import Liveness


async def on_echo(that, proxy, messages):
    for message in messages:
        await proxy.reply(message, payload=message.payload)


async def on_slow(that, proxy, messages):
    for message in messages:
        await asyncio.sleep(float(message.payload))
        await proxy.reply(message, payload="done")


async def on_report(that, proxy, messages):
    for message in messages:
        await proxy.isend(SessionMessage("update", destination=message.source, payload=message.payload,
                                         session_type=SessionType.NOTIFICATION))


async def on_crash(that, proxy, messages):
    os.kill(os.getpid(), signal.SIGKILL)


async def on_stop(that, proxy, messages):
    proxy.stop()


async def main(args: argparse.Namespace) -> int:
    proxy = AsyncProxy(group_name=args.group, component_type="worker", name=args.name, registry=args.registry,
                       expected_peers={"master": 1}, timeouts=Timeouts(join=20.0),
                       liveness=Liveness(lease=2.0, refresh=0.2, heartbeat=0.2, heartbeat_timeout=1.0))

    @dist(proxy, {"master:echo:1": on_echo, "master:slow:1": on_slow, "master:report:1": on_report,
                  "master:crash:1": on_crash, "master:stop:1": on_stop})
    class Worker:
        pass

    async with proxy:
        print(f"READY {proxy.name}", flush=True)
        await Worker().launch()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("registry")
    parser.add_argument("group")
    parser.add_argument("name")
    parser.add_argument("--uvloop", action="store_true")
    options = parser.parse_args()
    if options.uvloop:
        import uvloop

        sys.exit(uvloop.run(main(options)))
    sys.exit(asyncio.run(main(options)))
