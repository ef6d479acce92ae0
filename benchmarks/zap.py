"""What membership at the handshake costs: ZmqDriver with and without `require_token`, and with curve=True.

    python benchmarks/zap.py [--rounds N] [--small N] [--big-mb N] [--member-flood-mb N]

Two ZmqDrivers in one process over loopback, the receiver polling in a thread of its own. Per round, every
configuration runs once, in turn (so a busy machine slows them alike):

  plain        ZmqDriver()                                   the baseline of the ratios
  token        both require_token(token, accept)             PLAIN + ZAP (the proposed default)
  curve        ZmqDriver(curve=True)                         encryption, no gate
  curve+keys   curve=True, require_token with a key allow-list

Workloads: `small` messages of 100 bytes sent back to back (time from the first send to the last receive),
and one array of `big-mb` MB (time per transfer, 3 per round). The table shows the medians over rounds and
the median of the per-round ratios against plain (above 1: slower). The handshake happens before timing.

Then one measurement, not a comparison: a member (right token) speaking raw ZMTP sends one multipart message
that never ends; the receiver's VmRSS growth shows whether anything in libzmq bounds it. Nothing asserts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "security"))

from rallypoint.proxy._zmq import ZmqDriver  # noqa: E402

TOKEN = b"benchmark-token-0123456789abcdef"
CONFIGS = ("plain", "token", "curve", "curve+keys")


def make_pair(config: str) -> tuple[ZmqDriver, ZmqDriver]:
    curve = config.startswith("curve")
    sender, receiver = ZmqDriver(curve=curve, linger=0), ZmqDriver(curve=curve, linger=0)
    if config == "token":
        for d in (sender, receiver):
            d.require_token(TOKEN, lambda credential: credential == TOKEN)
    elif config == "curve+keys":
        keys: set[bytes] = set()
        for d in (sender, receiver):
            d.require_token(TOKEN, lambda credential: credential in keys)
    address = receiver.bind("127.0.0.1")
    own = sender.bind("127.0.0.1")
    if config == "curve+keys":
        keys.add(own.split("#curve=")[1].encode())
    sender.connect("r", address)
    if sender.wait_up(["r"], 10.0):
        raise RuntimeError(f"{config}: no handshake")
    return sender, receiver


def transfer(sender: ZmqDriver, receiver: ZmqDriver, frames: list[Any], count: int) -> float:
    """Seconds from the first send to the count-th message received."""
    got = 0
    done = threading.Event()

    def receive() -> None:
        nonlocal got
        while got < count:
            got += sum(1 for e in receiver.poll(5.0) if e.kind == "frames")
        done.set()

    thread = threading.Thread(target=receive)
    thread.start()
    start = time.perf_counter()
    for _ in range(count):
        sender.send("r", frames, timeout=30.0)
    done.wait(120.0)
    elapsed = time.perf_counter() - start
    thread.join()
    return elapsed


def member_flood(megabytes: int) -> None:
    from zmtp_raw import RawZmtp, frame_header

    def rss_kb() -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))

    with ZmqDriver(linger=0, max_message_bytes=4 << 20) as victim:
        victim.require_token(TOKEN, lambda credential: credential == TOKEN)
        port = int(victim.bind("127.0.0.1").rsplit(":", 1)[1])
        before = rss_kb()
        part = frame_header(64 * 1024, 0x01) + bytes(64 * 1024)
        with RawZmtp("127.0.0.1", port, mechanism="PLAIN", password=TOKEN) as raw:
            assert raw.handshake(), "the member's handshake was refused"
            start = time.perf_counter()
            for _ in range(megabytes * 16):
                raw.send_raw(part)
            elapsed = time.perf_counter() - start
            victim.poll(0.5)  # nothing arrives: the message never ends
            grown = (rss_kb() - before) / 1024
        print(f"\nmember flood: {megabytes} MB of one endless multipart message (64 KiB parts, "
              f"max_message_bytes 4 MiB) in {elapsed:.2f}s; receiver VmRSS grew by {grown:.0f} MB "
              f"({grown / megabytes:.2f} x what was sent)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--small", type=int, default=20_000)
    parser.add_argument("--big-mb", type=int, default=64)
    parser.add_argument("--member-flood-mb", type=int, default=256)
    args = parser.parse_args()
    small = [b"x" * 100]
    big = [bytearray(args.big_mb << 20)]
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for config in CONFIGS:
            sender, receiver = make_pair(config)
            try:
                results.setdefault((config, "small"), []).append(
                    args.small / transfer(sender, receiver, small, args.small))
                results.setdefault((config, "big"), []).append(transfer(sender, receiver, big, 3) / 3)
            finally:
                sender.close(0)
                receiver.close(0)
    print(f"{args.rounds} rounds; small: {args.small} x 100 B messages/s; big: seconds per {args.big_mb} MB "
          "array; ratio: median of per-round ratios to plain (time-based: above 1 is slower)")
    print(f"{'config':<12}{'small msg/s':>14}{'ratio':>8}{'big s':>10}{'ratio':>8}")
    for config in CONFIGS:
        s, b = results[(config, "small")], results[(config, "big")]
        s_ratio = statistics.median(p / c for p, c in zip(results[("plain", "small")], s, strict=True))
        b_ratio = statistics.median(c / p for p, c in zip(results[("plain", "big")], b, strict=True))
        print(f"{config:<12}{statistics.median(s):>14,.0f}{s_ratio:>8.2f}{statistics.median(b):>10.3f}"
              f"{b_ratio:>8.2f}")
    if args.member_flood_mb:
        member_flood(args.member_flood_mb)


if __name__ == "__main__":
    main()
