"""AsyncProxy against the blocking Proxy, measured in the same run (medians of paired rounds).

    python benchmarks/async_proxy.py [--rounds 5] [--requests 1000] [--uvloop]

Four worker processes (blocking Proxy, echo) and, in this process, a blocking master and an async master in the
same group. Each round measures, back to back:
  1. throughput: 1,000 `await proxy.send()` in flight at once (asyncio.gather) against the blocking proxy doing
     the same 1,000 `send()` one after another, round-robin over the 4 workers (target: >= 3x the rate)
  2. latency: one `await proxy.send()` round trip at a time against one blocking `send()` (target: <= 1.3x)
Nothing here asserts on time: these machines are noisy, so read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import shutil
import socket
import statistics
import subprocess
import time
import uuid
from typing import Any

from rallypoint import AsyncProxy, Proxy, SessionMessage, SessionType, Timeouts, dist

CTX = mp.get_context("fork")
TIMEOUTS = Timeouts(join=30.0, reply=30.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_registry() -> tuple[str, Any]:
    """A redis-server on a free loopback port, or the embedded registry without one."""
    port = free_port()
    if shutil.which("redis-server"):
        proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no"], stdout=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}"
        import redis

        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(url).ping()
                return url, proc.kill
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
    from rallypoint.proxy._embedded import EmbeddedRegistryServer

    server = EmbeddedRegistryServer(port=port)
    server.start()
    return server.url, server.stop


def worker(registry: str, group: str, name: str) -> None:
    proxy = Proxy(group_name=group, component_type="worker", name=name, registry=registry,
                  expected_peers={"master": 2}, timeouts=TIMEOUTS)

    def on_echo(that: Any, proxy: Proxy, messages: list[Any]) -> None:
        for message in messages:
            proxy.reply(message, payload=message.payload)

    def on_stop(that: Any, proxy: Proxy, messages: list[Any]) -> None:
        proxy.stop()

    @dist(proxy, {"master:echo:1": on_echo, "master:stop:1": on_stop})
    class Worker:
        pass

    Worker().launch()
    proxy.close()


def blocking_many(proxy: Proxy, names: list[str], n: int) -> float:
    started = time.perf_counter()
    for i in range(n):
        proxy.send(SessionMessage("echo", destination=names[i % len(names)], payload=i))
    return n / (time.perf_counter() - started)


async def async_many(proxy: AsyncProxy, names: list[str], n: int) -> float:
    started = time.perf_counter()
    results = await asyncio.gather(*(proxy.send(SessionMessage("echo", destination=names[i % len(names)],
                                                               payload=i)) for i in range(n)))
    rate = n / (time.perf_counter() - started)
    assert [r[0].payload for r in results] == list(range(n))
    return rate


def blocking_rtt(proxy: Proxy, peer: str, n: int) -> float:
    started = time.perf_counter()
    for i in range(n):
        proxy.send(SessionMessage("echo", destination=peer, payload=i))
    return (time.perf_counter() - started) / n * 1e6


async def async_rtt(proxy: AsyncProxy, peer: str, n: int) -> float:
    started = time.perf_counter()
    for i in range(n):
        await proxy.send(SessionMessage("echo", destination=peer, payload=i))
    return (time.perf_counter() - started) / n * 1e6


async def main(args: argparse.Namespace, registry: str) -> None:
    group = f"bench-async-{uuid.uuid4().hex[:6]}"
    procs = [CTX.Process(target=worker, args=(registry, group, f"worker_{i}")) for i in range(4)]
    for p in procs:
        p.start()
    blocking_task = asyncio.ensure_future(asyncio.to_thread(
        Proxy, group_name=group, component_type="master", name="master_b", registry=registry,
        expected_peers={"worker": 4}, timeouts=TIMEOUTS))
    aproxy = AsyncProxy(group_name=group, component_type="master", name="master_a", registry=registry,
                        expected_peers={"worker": 4}, timeouts=TIMEOUTS)
    await aproxy.join()
    bproxy = await blocking_task
    names = aproxy.peers["worker"]
    try:
        blocking_many(bproxy, names, 200)  # warm-up: channels up, code paths hot
        await async_many(aproxy, names, 200)
        rates_b, rates_a, rtt_b, rtt_a = [], [], [], []
        for _ in range(args.rounds):
            rates_b.append(blocking_many(bproxy, names, args.requests))
            rates_a.append(await async_many(aproxy, names, args.requests))
            rtt_b.append(blocking_rtt(bproxy, names[0], 500))
            rtt_a.append(await async_rtt(aproxy, names[0], 500))
        loop = "uvloop" if args.uvloop else "asyncio"
        rb, ra = statistics.median(rates_b), statistics.median(rates_a)
        lb, la = statistics.median(rtt_b), statistics.median(rtt_a)
        ratios = sorted(a / b for a, b in zip(rates_a, rates_b, strict=True))
        lat = sorted(a / b for a, b in zip(rtt_a, rtt_b, strict=True))
        print(f"loop: {loop}, {args.rounds} paired rounds, medians (per-round ratios min..max)")
        print(f"1. {args.requests} sends: blocking one by one {rb:,.0f}/s, async all in flight {ra:,.0f}/s: "
              f"{ra / rb:.2f}x ({ratios[0]:.2f}..{ratios[-1]:.2f}; target >= 3x)")
        print(f"2. round trip: blocking {lb:.0f} us, async {la:.0f} us: {la / lb:.2f}x "
              f"({lat[0]:.2f}..{lat[-1]:.2f}; target <= 1.3x)")
        await aproxy.broadcast("worker", "stop", SessionType.NOTIFICATION)
    finally:
        await aproxy.close()
        bproxy.close()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--uvloop", action="store_true")
    options = parser.parse_args()
    url, stop = start_registry()
    try:
        if options.uvloop:
            import uvloop

            uvloop.run(main(options, url))
        else:
            asyncio.run(main(options, url))
    finally:
        stop()
