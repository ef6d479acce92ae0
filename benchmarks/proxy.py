"""Proxy benchmarks: every figure against raw pyzmq measured in the same run (medians of paired rounds).

    python benchmarks/proxy.py [--rounds 5] [--quick]

Prints, for each scenario, raw pyzmq's figure, rallypoint's, their ratio, the ratio before the proxy's rebuild
(the ranges README gave for commit 0ed0baf, three full runs) and the rebuild's target:
  1. one-way throughput: isend of new SessionMessages vs raw PUSH/PULL of pickled small dicts (>= 0.3x)
  2. send() + reply round trip vs a raw pickled DEALER/ROUTER round trip (<= 1.6x)
  3. broadcast to 4 workers + all replies vs raw PUB/SUB + gathering 4 replies (<= 2.0x)
  4. a 64 MB numpy array (plus a small ack) vs raw zero-copy PUSH/PULL (>= 0.75x), and raw pickled
  5. master + 4 workers joined and ready, after the last process starts (<= 0.5 s)
  6. the cost of signing: ZmqDriver + WireCodec end to end, signed vs unsigned, small and 64 MB (<= 10%)
Nothing here asserts on time: these machines are noisy, so read the ratios.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pickle
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections import deque

import numpy as np
import zmq

SMALL = {"step": 1, "loss": 0.25, "name": "worker_001"}
CTX = mp.get_context("fork")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- registry for the rallypoint side

class Registry:
    """A redis-server on a free port if installed, else the embedded registry."""

    def __init__(self) -> None:
        self.proc = None
        self.server = None
        if shutil.which("redis-server"):
            port = free_port()
            self.proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                          "--appendonly", "no"], stdout=subprocess.DEVNULL)
            self.url = f"redis://127.0.0.1:{port}"
            import redis

            deadline = time.monotonic() + 10
            while True:
                try:
                    redis.Redis.from_url(self.url).ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
        else:
            from rallypoint.proxy import EmbeddedRegistryServer

            self.server = EmbeddedRegistryServer()
            self.url = self.server.start()

    def close(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait()
        if self.server:
            self.server.stop()


def _proxy(url: str, group: str, kind: str, name: str, expect: dict):
    from rallypoint import Proxy, Timeouts

    return Proxy(group_name=group, component_type=kind, name=name, registry=url, expected_peers=expect,
                 timeouts=Timeouts(join=30, reply=60))


# ---------------------------------------------------------------- 1. one-way throughput

def _raw_sink(port: int, n: int, out) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    s.bind(f"tcp://127.0.0.1:{port}")
    out.put("ready")
    pickle.loads(s.recv())
    t = time.perf_counter()
    for _ in range(n - 1):
        pickle.loads(s.recv())
    out.put(time.perf_counter() - t)
    s.close(0)
    ctx.term()


def raw_throughput(n: int) -> float:
    port, out = free_port(), CTX.Queue()
    p = CTX.Process(target=_raw_sink, args=(port, n, out))
    p.start()
    out.get()
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.sndhwm = 0
    s.connect(f"tcp://127.0.0.1:{port}")
    for i in range(n):
        s.send(pickle.dumps({**SMALL, "step": i}, protocol=5))
    elapsed = out.get()
    p.join()
    s.close(0)
    ctx.term()
    return (n - 1) / elapsed


def _rp_sink(url: str, group: str, n: int, out) -> None:
    with _proxy(url, group, "worker", "worker_001", {"master": 1}) as proxy:
        out.put("ready")
        proxy.receive_once(timeout=60)
        t = time.perf_counter()
        for _ in range(n - 1):
            proxy.receive_once(timeout=60)
        out.put(time.perf_counter() - t)
        proxy.receive_once(timeout=60)  # master's "done": keeps us registered until the master has finished


def rp_throughput(url: str, n: int) -> float:
    from rallypoint import SessionMessage, SessionType

    group, out = f"bench-{uuid.uuid4().hex[:6]}", CTX.Queue()
    p = CTX.Process(target=_rp_sink, args=(url, group, n, out))
    p.start()
    with _proxy(url, group, "master", "master", {"worker": 1}) as proxy:
        out.get()
        for i in range(n):
            proxy.isend(SessionMessage(tag="update", source="master", destination="worker_001",
                                       payload={**SMALL, "step": i}, session_type=SessionType.NOTIFICATION))
        elapsed = out.get()
        proxy.isend(SessionMessage(tag="done", source="master", destination="worker_001",
                                   session_type=SessionType.NOTIFICATION))
        p.join()
    return (n - 1) / elapsed


def _lean_sink(port: int, key: bytes, n: int, out) -> None:
    from _lean import LeanEnd

    end, inbox = LeanEnd("worker_001", key), deque()
    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    s.bind(f"tcp://127.0.0.1:{port}")
    out.put("ready")
    inbox.append(end.receive(*s.recv_multipart()))
    inbox.popleft()
    t = time.perf_counter()
    for _ in range(n - 1):
        inbox.append(end.receive(*s.recv_multipart()))
        inbox.popleft()
    out.put(time.perf_counter() - t)
    s.close(0)
    ctx.term()


def lean_throughput(n: int) -> float:
    """The lean floor (benchmarks/_lean.py) for scenario 1: rallypoint's per-message work, nothing more."""
    from _lean import LeanEnd

    key, port, out = os.urandom(32), free_port(), CTX.Queue()
    p = CTX.Process(target=_lean_sink, args=(port, key, n, out))
    p.start()
    out.get()
    end = LeanEnd("master", key)
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.sndhwm = 0
    s.connect(f"tcp://127.0.0.1:{port}")
    for i in range(n):
        end.send(s, [], "update", "worker_001", {**SMALL, "step": i})
    elapsed = out.get()
    p.join()
    s.close(0)
    ctx.term()
    return (n - 1) / elapsed


# ---------------------------------------------------------------- 2. round trip

def _raw_echo(port: int, n: int, out) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.bind(f"tcp://127.0.0.1:{port}")
    out.put("ready")
    for _ in range(n):
        ident, body = s.recv_multipart()
        s.send_multipart([ident, pickle.dumps(pickle.loads(body), protocol=5)])
    s.close(0)
    ctx.term()


def raw_round_trip(n: int) -> float:
    port, out = free_port(), CTX.Queue()
    p = CTX.Process(target=_raw_echo, args=(port, n, out))
    p.start()
    out.get()
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(f"tcp://127.0.0.1:{port}")
    s.send(pickle.dumps(SMALL))
    pickle.loads(s.recv())
    t = time.perf_counter()
    for _ in range(n - 1):
        s.send(pickle.dumps(SMALL, protocol=5))
        pickle.loads(s.recv())
    elapsed = time.perf_counter() - t
    p.join()
    s.close(0)
    ctx.term()
    return elapsed / (n - 1)


def _lean_echo(port: int, key: bytes, n: int, out) -> None:
    from _lean import LeanEnd

    end = LeanEnd("worker_001", key)
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.bind(f"tcp://127.0.0.1:{port}")
    out.put("ready")
    for _ in range(n):
        ident, *frames = s.recv_multipart()
        message = end.receive(*frames)
        end.send(s, [ident], "q", message.source, message.payload, message.session_id, "complete")
    s.close(0)
    ctx.term()


def lean_round_trip(n: int) -> float:
    """The lean floor (benchmarks/_lean.py) for scenario 2."""
    from _lean import LeanEnd

    key, port, out = os.urandom(32), free_port(), CTX.Queue()
    p = CTX.Process(target=_lean_echo, args=(port, key, n, out))
    p.start()
    out.get()
    end = LeanEnd("master", key)
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(f"tcp://127.0.0.1:{port}")
    end.send(s, [], "q", "worker_001", SMALL)
    end.receive(*s.recv_multipart())
    t = time.perf_counter()
    for _ in range(n - 1):
        sid = end.send(s, [], "q", "worker_001", SMALL)
        reply = end.receive(*s.recv_multipart())
        end.sessions[sid] = "complete" if reply is not None and reply.session_id == sid else "failed"
    elapsed = time.perf_counter() - t
    p.join()
    s.close(0)
    ctx.term()
    return elapsed / (n - 1)


def _rp_echo(url: str, group: str, name: str, n: int, out) -> None:
    with _proxy(url, group, "worker", name, {"master": 1}) as proxy:
        out.put("ready")
        for _ in range(n):
            message = proxy.receive_once(timeout=60)
            proxy.reply(message, payload=message.payload)
        proxy.receive_once(timeout=60)  # master's "done"


def rp_round_trip(url: str, n: int) -> float:
    from rallypoint import SessionMessage, SessionType

    group, out = f"bench-{uuid.uuid4().hex[:6]}", CTX.Queue()
    p = CTX.Process(target=_rp_echo, args=(url, group, "worker_001", n, out))
    p.start()
    with _proxy(url, group, "master", "master", {"worker": 1}) as proxy:
        out.get()
        proxy.send(SessionMessage(tag="q", source="master", destination="worker_001", payload=SMALL))
        t = time.perf_counter()
        for _ in range(n - 1):
            proxy.send(SessionMessage(tag="q", source="master", destination="worker_001", payload=SMALL))
        elapsed = time.perf_counter() - t
        proxy.isend(SessionMessage(tag="done", source="master", destination="worker_001",
                                   session_type=SessionType.NOTIFICATION))
        p.join()
    return elapsed / (n - 1)


# ---------------------------------------------------------------- 3. broadcast to 4 + gather

def _raw_sub(pub_port: int, pull_port: int, n: int, out) -> None:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.subscribe(b"")
    sub.connect(f"tcp://127.0.0.1:{pub_port}")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{pull_port}")
    while True:  # warm-up: answer pings until the publisher says go (slow-joiner handshake, no sleep)
        body = pickle.loads(sub.recv())
        push.send(pickle.dumps(body))
        if body == "go":
            break
    for _ in range(n):
        push.send(pickle.dumps(pickle.loads(sub.recv()), protocol=5))
    sub.close(0)
    push.close(0)
    ctx.term()


def raw_broadcast(n: int, workers: int = 4) -> float:
    pub_port, pull_port = free_port(), free_port()
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind(f"tcp://127.0.0.1:{pub_port}")
    pull = ctx.socket(zmq.PULL)
    pull.bind(f"tcp://127.0.0.1:{pull_port}")
    procs = [CTX.Process(target=_raw_sub, args=(pub_port, pull_port, n, None)) for _ in range(workers)]
    for p in procs:
        p.start()
    # Ping until every subscriber answered one ping, then "go": after that nothing is dropped.
    seen = 0
    while seen < workers:
        pub.send(pickle.dumps("ping"))
        while pull.poll(20):
            if pickle.loads(pull.recv()) == "ping":
                seen += 1
        if seen >= workers:
            break
    pub.send(pickle.dumps("go"))
    gos = 0
    while gos < workers:
        if pickle.loads(pull.recv()) == "go":
            gos += 1
    t = time.perf_counter()
    for _ in range(n):
        pub.send(pickle.dumps(SMALL, protocol=5))
        for _ in range(workers):
            pickle.loads(pull.recv())
    elapsed = time.perf_counter() - t
    for p in procs:
        p.join()
    pub.close(0)
    pull.close(0)
    ctx.term()
    return elapsed / n


def _lean_worker(port: int, key: bytes, name: str, n: int) -> None:
    from _lean import LeanEnd

    end = LeanEnd(name, key)
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.IDENTITY, name.encode())
    s.connect(f"tcp://127.0.0.1:{port}")
    s.send(b"hello")
    for _ in range(n):
        message = end.receive(*s.recv_multipart())
        end.send(s, [], "q", message.source, message.payload, message.session_id, "complete")
    s.close(0)
    ctx.term()


def lean_broadcast(n: int, workers: int = 4) -> float:
    """The lean floor (benchmarks/_lean.py) for scenario 3: one signed message per worker, replies gathered."""
    from _lean import LeanEnd

    key, port = os.urandom(32), free_port()
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.bind(f"tcp://127.0.0.1:{port}")
    names = [f"worker_{i:03d}" for i in range(workers)]
    procs = [CTX.Process(target=_lean_worker, args=(port, key, name, n)) for name in names]
    for p in procs:
        p.start()
    for _ in names:  # every worker connected: its hello came in
        s.recv_multipart()
    end = LeanEnd("master", key)
    t = time.perf_counter()
    for _ in range(n):
        sessions = [end.send(s, [name.encode()], "q", name, SMALL) for name in names]
        for _ in names:
            reply = end.receive(*s.recv_multipart()[1:])
            end.sessions[reply.session_id] = "complete"
        assert all(end.sessions[sid] == "complete" for sid in sessions)
    elapsed = time.perf_counter() - t
    for p in procs:
        p.join()
    s.close(0)
    ctx.term()
    return elapsed / n


def rp_broadcast(url: str, n: int, workers: int = 4) -> float:
    from rallypoint import SessionMessage, SessionType

    group, out = f"bench-{uuid.uuid4().hex[:6]}", CTX.Queue()
    procs = [CTX.Process(target=_rp_echo, args=(url, group, f"worker_{i:03d}", n + 1, out)) for i in range(workers)]
    for p in procs:
        p.start()
    with _proxy(url, group, "master", "master", {"worker": workers}) as proxy:
        for _ in procs:
            out.get()
        proxy.broadcast("worker", "q", SessionType.TASK, payload=SMALL)
        t = time.perf_counter()
        for _ in range(n):
            proxy.broadcast("worker", "q", SessionType.TASK, payload=SMALL)
        elapsed = time.perf_counter() - t
        for i in range(workers):
            proxy.isend(SessionMessage(tag="done", source="master", destination=f"worker_{i:03d}",
                                       session_type=SessionType.NOTIFICATION))
        for p in procs:
            p.join()
    return elapsed / n


# ---------------------------------------------------------------- 4. 64 MB array

def _poly1305_tag(buffer) -> bytes:
    """The fastest MAC this machine has for big buffers (the one WireCodec uses for them), one-time key."""
    from cryptography.hazmat.primitives.poly1305 import Poly1305

    return Poly1305.generate_tag(os.urandom(32), memoryview(buffer).cast("B"))


def _raw_big_sink(port: int, ack_port: int, rounds: int, zero_copy: bool, out, mac: bool = False) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    s.bind(f"tcp://127.0.0.1:{port}")
    ack = ctx.socket(zmq.PUSH)
    ack.connect(f"tcp://127.0.0.1:{ack_port}")
    out.put("ready")
    for _ in range(rounds):
        if zero_copy:
            frame = s.recv(copy=False)
            if mac:
                _poly1305_tag(frame.buffer)
                s.recv()  # the tag frame
            array = np.frombuffer(frame.buffer, dtype=np.float64)
        else:
            array = pickle.loads(s.recv())
        ack.send(pickle.dumps(array.shape))
    s.close(0)
    ack.close(0)
    ctx.term()


def raw_big(array: np.ndarray, rounds: int, zero_copy: bool, mac: bool = False) -> float:
    """MB/s of raw PUSH/PULL with an ack; `mac`: plus a Poly1305 tag made before sending and checked after
    receiving, the floor under any per-message signature of a big buffer on this machine."""
    port, ack_port, out = free_port(), free_port(), CTX.Queue()
    ctx = zmq.Context()
    ack = ctx.socket(zmq.PULL)
    ack.bind(f"tcp://127.0.0.1:{ack_port}")
    p = CTX.Process(target=_raw_big_sink, args=(port, ack_port, rounds, zero_copy, out, mac))
    p.start()
    out.get()
    s = ctx.socket(zmq.PUSH)
    s.connect(f"tcp://127.0.0.1:{port}")
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        if zero_copy and mac:
            s.send_multipart([array, _poly1305_tag(array)], copy=False)
        elif zero_copy:
            s.send(array, copy=False)
        else:
            s.send(pickle.dumps(array, protocol=4))
        ack.recv()
        times.append(time.perf_counter() - t)
    p.join()
    s.close(0)
    ack.close(0)
    ctx.term()
    return array.nbytes / 1e6 / statistics.median(times)


def _rp_big_sink(url: str, group: str, rounds: int, out) -> None:
    with _proxy(url, group, "worker", "worker_001", {"master": 1}) as proxy:
        out.put("ready")
        for _ in range(rounds):
            message = proxy.receive_once(timeout=60)
            proxy.reply(message, payload=message.payload.shape)
        proxy.receive_once(timeout=60)


def rp_big(url: str, array: np.ndarray, rounds: int) -> float:
    from rallypoint import Message, SessionMessage, SessionType

    group, out = f"bench-{uuid.uuid4().hex[:6]}", CTX.Queue()
    p = CTX.Process(target=_rp_big_sink, args=(url, group, rounds, out))
    p.start()
    times = []
    with _proxy(url, group, "master", "master", {"worker": 1}) as proxy:
        out.get()
        for _ in range(rounds):
            t = time.perf_counter()
            proxy.send(Message(tag="big", source="master", destination="worker_001", payload=array))
            times.append(time.perf_counter() - t)
        proxy.isend(SessionMessage(tag="done", source="master", destination="worker_001",
                                   session_type=SessionType.NOTIFICATION))
        p.join()
    return array.nbytes / 1e6 / statistics.median(times)


# ---------------------------------------------------------------- 5. join time

JOINER = """
import sys, time
t0 = time.time()
from rallypoint import Proxy, Timeouts
kind, name, expect, url, group = sys.argv[1:6]
kind_e, count = expect.split(":")
with Proxy(group_name=group, component_type=kind, name=name, registry=url,
           expected_peers={kind_e: int(count)}, timeouts=Timeouts(join=30)) as p:
    print(f"{t0} {time.time()}", flush=True)
    sys.stdin.read()   # hold on until the benchmark has every line
"""


def compile_bytecode() -> None:
    """Byte-compile rallypoint's own modules, as `pip install` does for an installed package.

    An editable install under PYTHONDONTWRITEBYTECODE=1 (set on these machines) would otherwise compile
    every module from source in every process it starts: 30-60 ms of CPU each, which no deployed install pays.
    """
    import compileall
    import importlib

    for package in ("rallypoint", "rallypoint.grammar", "rallypoint.engine", "rallypoint.proxy", "rallypoint.specs"):
        for directory in importlib.import_module(package).__path__:
            compileall.compile_dir(directory, maxlevels=0, quiet=1)


FLOOR_JOINER = """
import sys, time
t0 = time.time()
import redis, zmq
redis.Redis.from_url(sys.argv[1]).ping()
zmq.Context().socket(zmq.ROUTER).bind("tcp://127.0.0.1:*")
print(f"{t0} {time.time()}", flush=True)
sys.stdin.read()
"""


def join_floor(url: str, processes: int = 5) -> float:
    """Seconds from the last start until every one of `processes` interpreters has imported redis-py and
    pyzmq, pinged Redis and bound a socket: the floor under any join on this machine (no rallypoint)."""
    procs = [subprocess.Popen([sys.executable, "-c", FLOOR_JOINER, url], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    last_start = time.time()
    readies = [float(p.stdout.readline().split()[1]) for p in procs]
    for p in procs:
        p.stdin.close()
        p.wait(30)
    return max(readies) - last_start


def join_time(url: str, workers: int = 4) -> tuple[float, float]:
    """(seconds from the last process start to all ready, slowest join inside its constructor)."""
    group = f"bench-{uuid.uuid4().hex[:6]}"
    specs = [("master", "master", f"worker:{workers}")] + [
        ("worker", f"worker_{i:03d}", "master:1") for i in range(workers)]
    procs = []
    for kind, name, expect in specs:
        procs.append(subprocess.Popen([sys.executable, "-c", JOINER, kind, name, expect, url, group],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    last_start = time.time()
    lines = [p.stdout.readline().split() for p in procs]
    for p in procs:
        p.stdin.close()
        p.wait(30)
    starts = [float(a) for a, _ in lines]
    readies = [float(b) for _, b in lines]
    return max(readies) - last_start, max(b - a for a, b in zip(starts, readies, strict=False))


# ---------------------------------------------------------------- 6. signing

def _codec_sink(address_q, key, n: int, big: bool, out) -> None:
    from rallypoint.proxy import WireCodec, ZmqDriver

    codec = WireCodec(key)
    with ZmqDriver() as driver:
        address_q.put(driver.bind("127.0.0.1"))
        sender_address = address_q.get()
        driver.connect("sender", sender_address)
        got, t, cpu = 0, None, 0.0
        deadline = time.monotonic() + 120  # bounded: a lost frame is reported, not waited for forever
        while got < n and time.monotonic() < deadline:
            for event in driver.poll(1):
                if event.kind != "frames":
                    continue
                codec.decode(event.frames)  # checks the MAC (when signed), then unpickles
                if t is None:
                    t, cpu = time.perf_counter(), time.process_time()
                got += 1
                if big:
                    driver.send("sender", [b"ack"], timeout=10)
        out.put((time.perf_counter() - t, got, time.process_time() - cpu))


def signing_end_to_end(key: bytes | None, n: int, payload, big: bool) -> tuple[float, float]:
    """Messages/s (small) or MB/s (big) through ZmqDriver + WireCodec, signed (key) or unsigned (None),
    and the CPU seconds both processes spent per message (every thread, libzmq's I/O threads included):
    CPU time is what signing adds, and it is steadier than wall time on a VM that others share."""
    from rallypoint import Message
    from rallypoint.proxy import WireCodec, ZmqDriver

    codec = WireCodec(key)
    address_q, out = CTX.Queue(), CTX.Queue()
    p = CTX.Process(target=_codec_sink, args=(address_q, key, n, big, out))
    p.start()
    with ZmqDriver() as driver:
        address = address_q.get()
        address_q.put(driver.bind("127.0.0.1"))
        driver.connect("sink", address)
        t, cpu = time.perf_counter(), time.process_time()
        for seq in range(1, n + 1):
            message = Message(tag="x", source="sender", destination="sink", payload=payload)
            driver.send("sink", codec.encode(message, incarnation="i", seq=seq), timeout=10)
            if big:
                wait_until = time.monotonic() + 60
                while not any(e.kind == "frames" for e in driver.poll(1)):  # also sees "up": wait for the ack
                    if time.monotonic() > wait_until:
                        raise RuntimeError("signing benchmark: no ack within 60 s")
        elapsed, cpu = time.perf_counter() - t, time.process_time() - cpu
        sink_elapsed, got, sink_cpu = out.get(timeout=180)
        p.join()
    if got < n:
        # The driver alone has no end-to-end acknowledgement (the Proxy above it has): say so, loudly.
        print(f"signing benchmark: the sink got {got} of {n} frames", file=sys.stderr)
    cpu_per_message = cpu / n + sink_cpu / max(1, got - 1)
    if big:
        return payload.nbytes * n / 1e6 / elapsed, cpu_per_message
    return (n - 1) / sink_elapsed, cpu_per_message


def signing_cost(array: np.ndarray, n_small: int, big_rounds: int) -> dict[str, float]:
    """Signed against unsigned: throughput of each (medians) and the median over pairs of the CPU ratio."""
    key = os.urandom(32)
    # Five pairs, not three: the MAC is ~10% of a small message's cost, about the size of this VM's noise.
    small = [(signing_end_to_end(key, n_small, SMALL, False), signing_end_to_end(None, n_small, SMALL, False))
             for _ in range(5)]
    big = [(signing_end_to_end(key, big_rounds, array, True), signing_end_to_end(None, big_rounds, array, True))
           for _ in range(3)]
    # The floor: raw pyzmq, only adding the MAC's hashing on each side (no header, no pickle, no codec).
    floor = [(raw_big(array, big_rounds, True, mac=True), raw_big(array, big_rounds, True)) for _ in range(3)]
    return {
        "small_signed": statistics.median(a[0] for a, _ in small),
        "small_plain": statistics.median(b[0] for _, b in small),
        "small_cpu": statistics.median(a[1] / b[1] for a, b in small),
        "big_signed": statistics.median(a[0] for a, _ in big),
        "big_plain": statistics.median(b[0] for _, b in big),
        "big_cpu": statistics.median(a[1] / b[1] for a, b in big),
        "big_floor": statistics.median(a / b for a, b in floor),
        "raw_mb_s": statistics.median(b for _, b in floor),
        "hash_s": statistics.median(_timed(_poly1305_tag, array) for _ in range(5)),
    }


def _timed(function, *args) -> float:
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


# ---------------------------------------------------------------- report

BEFORE = {"tp": "0.09-0.12x", "rt": "1.17-2.6x", "bc": "2.25-4.1x", "big": "0.63-1.09x"}
"""The ratios before the proxy's rebuild (commit 0ed0baf), from README's performance table and the issue."""


def row(name: str, raw: float, ours: float, unit: str, ratio: float, target: str, ok: bool) -> None:
    print(f"{name:<44} raw {raw:>12,.1f} {unit:<6} rallypoint {ours:>12,.1f} {unit:<6} "
          f"ratio {ratio:5.2f}x  target {target:<8} {'PASS' if ok else 'MISS'}")


def floor_note(name: str, pairs: list[tuple[float, float]], unit: str, scale: float) -> None:
    """A floor row: the median of the floor's own figures and of its per-round ratios to raw."""
    figure = statistics.median(b for _, b in pairs) * scale
    ratio = statistics.median(b / a for a, b in pairs)
    print(f"{'   ' + name:<44} {'':<17} floor {figure:>12,.1f} {unit:<6}      ratio {ratio:5.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smaller counts, for a smoke run")
    args = parser.parse_args()
    n_tp = 20_000 if args.quick else 100_000
    n_rt = 500 if args.quick else 3000
    n_bc = 200 if args.quick else 1000
    big_rounds = 2 if args.quick else 5
    array = np.random.default_rng(0).random(8 * 1024 * 1024)  # 64 MB of float64

    registry = Registry()
    try:
        pairs: dict[str, list[tuple[float, float]]] = {
            k: [] for k in ("tp", "rt", "bc", "big", "pickled", "lean_tp", "lean_rt", "lean_bc")}
        for r in range(args.rounds):
            raw_tp, raw_rt = raw_throughput(n_tp), raw_round_trip(n_rt)
            pairs["tp"].append((raw_tp, rp_throughput(registry.url, n_tp)))
            pairs["lean_tp"].append((raw_tp, lean_throughput(n_tp)))
            pairs["rt"].append((raw_rt, rp_round_trip(registry.url, n_rt)))
            pairs["lean_rt"].append((raw_rt, lean_round_trip(n_rt)))
            raw_bc = raw_broadcast(n_bc)
            pairs["bc"].append((raw_bc, rp_broadcast(registry.url, n_bc)))
            pairs["lean_bc"].append((raw_bc, lean_broadcast(n_bc)))
            pairs["big"].append((raw_big(array, big_rounds, True), rp_big(registry.url, array, big_rounds)))
            pairs["pickled"].append((raw_big(array, big_rounds, False), 0.0))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        med = {k: (statistics.median(a for a, _ in v), statistics.median(b for _, b in v)) for k, v in pairs.items()}
        compile_bytecode()
        joins, floors = [], []
        for _ in range(3 if args.quick else 5):  # interleaved, so both see the same VM weather
            joins.append(join_time(registry.url))
            floors.append(join_floor(registry.url))
    finally:
        registry.close()

    print(f"\nproxy benchmarks, medians of {args.rounds} paired rounds (loopback, 2 processes unless noted)")
    raw, ours = med["tp"]
    row("1. one-way msgs/s (isend new SessionMessage)", raw, ours, "msg/s", ours / raw,
        f">= 0.3x (before {BEFORE['tp']})", ours / raw >= 0.3)
    floor_note("lean Python floor (benchmarks/_lean.py)", pairs["lean_tp"], "msg/s", 1)
    raw, ours = med["rt"]
    row("2. send()+reply round trip", raw * 1e6, ours * 1e6, "us", ours / raw, f"<= 1.6x (before {BEFORE['rt']})",
        ours / raw <= 1.6)
    floor_note("lean Python floor (benchmarks/_lean.py)", pairs["lean_rt"], "us", 1e6)
    raw, ours = med["bc"]
    row("3. broadcast to 4 + gather 4 replies", raw * 1e6, ours * 1e6, "us", ours / raw,
        f"<= 2.0x (before {BEFORE['bc']})", ours / raw <= 2.0)
    floor_note("lean Python floor (benchmarks/_lean.py)", pairs["lean_bc"], "us", 1e6)
    raw, ours = med["big"]
    row("4. 64 MB numpy array (vs raw zero-copy)", raw, ours, "MB/s", ours / raw,
        f">= 0.75x (before {BEFORE['big']})", ours / raw >= 0.75)
    pickled = med["pickled"][0]
    print(f"{'   (raw pickled, for reference)':<44} raw {pickled:>12,.1f} MB/s   rallypoint/pickled "
          f"{ours / pickled:5.2f}x")
    after_last = statistics.median(a for a, _ in joins)
    in_ctor = statistics.median(b for _, b in joins)
    print(f"{'5. master + 4 workers ready after last start':<44} {after_last:.3f} s (median of {len(joins)}; "
          f"max {max(a for a, _ in joins):.3f})  target <= 0.5 s {'PASS' if after_last <= 0.5 else 'MISS'}")
    print(f"{'   slowest process, script start to ready':<44} {in_ctor:.3f} s  (interpreter start + imports + join; "
          "bytecode compiled beforehand, as an installed package has it)")
    print(f"{'   floor: 5 bare interpreters, same start':<44} {statistics.median(floors):.3f} s  (import redis-py "
          "and pyzmq, ping Redis, bind a socket; no rallypoint, no peers to wait for)")
    signing = signing_cost(array, n_tp // 2, big_rounds)
    s_small, p_small, s_big, p_big = (signing[k] for k in ("small_signed", "small_plain", "big_signed", "big_plain"))
    print(f"{'6. signing, small messages (driver+codec)':<44} signed {s_small:>10,.0f} msg/s  unsigned "
          f"{p_small:>10,.0f} msg/s  cost {1 - s_small / p_small:+.0%}  target <= 10% "
          f"{'PASS' if 1 - s_small / p_small <= 0.10 else 'MISS'}")
    print(f"{'   in CPU time per message (both processes)':<44} cost {signing['small_cpu'] - 1:+.0%}  target <= 10% "
          f"{'PASS' if signing['small_cpu'] - 1 <= 0.10 else 'MISS'}")
    print(f"{'   signing, 64 MB array (driver+codec)':<44} signed {s_big:>10,.0f} MB/s   unsigned "
          f"{p_big:>10,.0f} MB/s   cost {1 - s_big / p_big:+.0%}  target <= 10% "
          f"{'PASS' if 1 - s_big / p_big <= 0.10 else 'MISS'}")
    print(f"{'   in CPU time per message (both processes)':<44} cost {signing['big_cpu'] - 1:+.0%}  target <= 10% "
          f"{'PASS' if signing['big_cpu'] - 1 <= 0.10 else 'MISS'}")
    raw_s = array.nbytes / 1e6 / signing["raw_mb_s"]
    print(f"{'   floor: one Poly1305 pass on each side':<44} {signing['hash_s'] * 1e3:.1f} ms per side against "
          f"{raw_s * 1e3:.1f} ms for the raw zero-copy transfer: cost {2 * signing['hash_s'] / raw_s:+.0%} unless it "
          "overlaps the transfer")
    print(f"{'   raw pyzmq + Poly1305 on each side':<44} cost {1 - signing['big_floor']:+.0%} against raw "
          "zero-copy, end to end (wall clock, the noisiest figure here)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
