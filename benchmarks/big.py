"""A 64 MB numpy array in parts: raw zero-copy pyzmq vs ZmqDriver + WireCodec (signed, split into parts of
`max_part_bytes`) vs the Proxy, all in the same run (medians of paired rounds).

    python benchmarks/big.py [--rounds 5] [--transfers 5] [--parts 1,2,4,8,16] [--no-proxy]

Each round runs every configuration once, in turn, so a busy machine slows them alike; each configuration
moves the array `transfers` times, sender to receiver, and waits for a small ack each time (time per
transfer, median). The receiver rebuilds the array (raw: np.frombuffer on the frame; codec: open + MAC +
join the parts + unpickle) before acking. Configurations:

  raw            pyzmq PUSH/PULL, one zero-copy frame, no signature (the reference of every ratio)
  parts=N MiB    ZmqDriver pair (MAXMSGSIZE = frame_bound(N MiB)) + WireCodec(max_part_bytes=N MiB)
  one frame      ZmqDriver(max_part_bytes=128 MiB) + WireCodec(max_part_bytes=128 MiB): how it was before
  proxy          Proxy.send of the array to a worker that replies (benchmarks/proxy.py, scenario 4), with
                 its defaults: 4 MiB parts

Ratios are raw time / configuration time per round (above 1: faster than raw), then the median.
Target: >= 0.75x raw zero-copy for the default (4 MiB parts). Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

CTX = mp.get_context("fork")
MIB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------- raw pyzmq

def _raw_sink(port: int, ack_port: int, transfers: int, ready: Any) -> None:
    ctx = zmq.Context()
    pull, ack = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.bind(f"tcp://127.0.0.1:{port}")
    ack.connect(f"tcp://127.0.0.1:{ack_port}")
    ready.put("ready")
    for _ in range(transfers):
        frame = pull.recv(copy=False)
        array = np.frombuffer(frame.buffer, dtype=np.float64)
        ack.send(str(array.shape[0]).encode())
    pull.close(0)
    ack.close(0)
    ctx.term()


def raw(array: np.ndarray, transfers: int) -> float:
    """Median seconds per transfer of one zero-copy frame plus an ack."""
    port, ack_port, ready = free_port(), free_port(), CTX.Queue()
    ctx = zmq.Context()
    ack = ctx.socket(zmq.PULL)
    ack.bind(f"tcp://127.0.0.1:{ack_port}")
    p = CTX.Process(target=_raw_sink, args=(port, ack_port, transfers, ready))
    p.start()
    ready.get()
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    times = []
    for _ in range(transfers):
        t = time.perf_counter()
        push.send(array, copy=False)
        ack.recv()
        times.append(time.perf_counter() - t)
    p.join()
    push.close(0)
    ack.close(0)
    ctx.term()
    return statistics.median(times)


# ------------------------------------------------------------------------------ driver + codec

KEY = os.urandom(32)


def _codec_sink(addresses: Any, part: int, transfers: int) -> None:
    from rallypoint.proxy._wire import WireCodec, frame_bound
    from rallypoint.proxy._zmq import ZmqDriver

    codec = WireCodec(KEY, max_message_bytes=1 << 31, max_part_bytes=part)
    with ZmqDriver(linger=0, max_part_bytes=frame_bound(part)) as driver:
        addresses.put(driver.bind("127.0.0.1"))
        driver.connect("sender", addresses.get())
        done = 0
        while done < transfers:
            for event in driver.poll(10.0):
                if event.kind == "frames":
                    array = codec.decode(event.frames).payload  # size, MAC, header, join, unpickle
                    driver.send("sender", [str(array.shape[0]).encode()], timeout=10.0)
                    done += 1


def codec(array: np.ndarray, transfers: int, part: int) -> tuple[float, int]:
    """Median seconds per transfer through ZmqDriver + WireCodec with parts of `part` bytes, and the number
    of frames a message took."""
    from rallypoint import Message
    from rallypoint.proxy._wire import WireCodec, frame_bound
    from rallypoint.proxy._zmq import ZmqDriver

    sender_codec = WireCodec(KEY, max_message_bytes=1 << 31, max_part_bytes=part)
    addresses = CTX.Queue()
    p = CTX.Process(target=_codec_sink, args=(addresses, part, transfers))
    p.start()
    times, nframes = [], 0
    with ZmqDriver(linger=0, max_part_bytes=frame_bound(part)) as driver:
        sink = addresses.get()
        addresses.put(driver.bind("127.0.0.1"))
        driver.connect("sink", sink)
        if driver.wait_up(["sink"], 10.0):
            raise RuntimeError("no handshake with the sink")
        for seq in range(1, transfers + 1):
            t = time.perf_counter()
            frames = sender_codec.encode(Message("big", "sender", "sink", array), incarnation="i", seq=seq)
            nframes = len(frames)
            driver.send("sink", frames, timeout=10.0)
            deadline = time.monotonic() + 60.0
            while not any(e.kind == "frames" for e in driver.poll(1.0)):
                if time.monotonic() > deadline:
                    raise RuntimeError("no ack within 60 s")
            times.append(time.perf_counter() - t)
    p.join()
    return statistics.median(times), nframes


# ------------------------------------------------------------------------------------ the Proxy

def _proxy_benchmarks() -> Any:
    """benchmarks/proxy.py as a module (its name clashes with the proxy/ package at the repo root)."""
    spec = importlib.util.spec_from_file_location("rp_bench_proxy", Path(__file__).with_name("proxy.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------- report

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--transfers", type=int, default=5)
    parser.add_argument("--parts", default="1,2,4,8,16", help="part sizes in MiB, comma-separated")
    parser.add_argument("--no-proxy", action="store_true", help="leave out the Proxy configuration")
    args = parser.parse_args()
    array = np.random.default_rng(0).random(8 * MIB)  # 64 MiB of float64
    parts = [int(x) * MIB for x in args.parts.split(",")]
    configs: list[tuple[str, Any]] = [(f"parts={p // MIB} MiB", p) for p in parts]
    configs.append(("one frame", 128 * MIB))
    bench = registry = None
    if not args.no_proxy:
        bench = _proxy_benchmarks()
        registry = bench.Registry()
    seconds: dict[str, list[float]] = {name: [] for name, _ in [("raw", 0), *configs, ("proxy", 0)]}
    frames: dict[str, int] = {}
    try:
        for r in range(args.rounds):
            seconds["raw"].append(raw(array, args.transfers))
            for name, part in configs:
                elapsed, frames[name] = codec(array, args.transfers, part)
                seconds[name].append(elapsed)
            if bench is not None:
                mb_s = bench.rp_big(registry.url, array, args.transfers)
                seconds["proxy"].append(array.nbytes / 1e6 / mb_s)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        if registry is not None:
            registry.close()
    print(f"\n64 MiB float64 array, {args.rounds} rounds x {args.transfers} transfers; ratio = median over rounds "
          "of raw time / this time (>= 0.75x is the target for 4 MiB parts)")
    print(f"{'config':<16}{'frames':>8}{'ms/transfer':>14}{'MB/s':>10}{'vs raw':>9}")
    for name, values in seconds.items():
        if not values:
            continue
        ratio = statistics.median(a / b for a, b in zip(seconds["raw"], values, strict=True))
        median = statistics.median(values)
        shown = str(frames.get(name, "1" if name == "raw" else "-"))
        print(f"{name:<16}{shown:>8}{median * 1e3:>14.1f}{array.nbytes / 1e6 / median:>10,.0f}{ratio:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
