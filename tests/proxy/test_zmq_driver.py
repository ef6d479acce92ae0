"""Drivers: one behavioural suite run against ZmqDriver and InMemoryDriver, then ZeroMQ-only fault tests
with real peer processes (SIGKILL, SIGSTOP, restart). Sockets on 127.0.0.1 only; readiness is always an
event under a deadline, never a sleep."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import zmq

from rallypoint.engine import Message
from rallypoint.errors import ConfigError, PeerUnreachable, ProxyClosed, Timeout
from rallypoint.proxy._driver import Driver, DriverEvent, InMemoryNetwork
from rallypoint.proxy._wire import MAX_FRAME_BYTES, WireCodec
from rallypoint.proxy._zmq import ZmqDriver

pytestmark = pytest.mark.timeout(20)

HB = dict(heartbeat_ivl=0.1, heartbeat_timeout=0.4)  # fast failure detection for tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Drivers:
    """Makes drivers of one kind and closes them all at teardown."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.network = InMemoryNetwork()
        self.made: list[Driver] = []

    def __call__(self, **kwargs: object) -> Driver:
        d: Driver = ZmqDriver(linger=0, **{**HB, **kwargs}) if self.kind == "zmq" else self.network.driver()
        self.made.append(d)
        return d

    def dead_address(self) -> str:
        """An address where nothing listens (a connect there never comes up)."""
        return f"tcp://127.0.0.1:{free_port()}" if self.kind == "zmq" else "inmem://999999"

    def crash(self, driver: Driver) -> None:
        """The peer vanishes: close (zmq: its sockets close, the kernel resets the connection) or kill."""
        if self.kind == "zmq":
            driver.close(0)
        else:
            self.network.kill(driver.address)


@pytest.fixture(params=["zmq", "inmem"])
def drivers(request: pytest.FixtureRequest) -> Iterator[Drivers]:
    made = Drivers(request.param)
    yield made
    for d in made.made:
        d.close(0)


def wait_for(driver: Driver, kind: str, peer: str | None = None, timeout: float = 5.0) -> DriverEvent:
    """Poll until an event of `kind` (for `peer`) arrives; fail at the deadline. Other events are dropped."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"no {kind!r} event for {peer!r} within {timeout}s")
        for event in driver.poll(left):
            if event.kind == kind and (peer is None or event.peer == peer):
                return event


def pair(drivers: Drivers) -> tuple[Driver, Driver]:
    """Two bound drivers, each connected to the other as "a"/"b", both channels up."""
    a, b = drivers(), drivers()
    a_addr, b_addr = a.bind("127.0.0.1"), b.bind("127.0.0.1")
    a.connect("b", b_addr)
    b.connect("a", a_addr)
    assert a.wait_up(["b"], 5.0) == set() and b.wait_up(["a"], 5.0) == set()
    return a, b


# ---------------------------------------------------------------------------- behaviour (both drivers)


def test_bind_sets_the_address(drivers: Drivers) -> None:
    d = drivers()
    address = d.bind("127.0.0.1")
    assert address == d.address
    assert address.startswith("tcp://127.0.0.1:" if drivers.kind == "zmq" else "inmem://")


def test_connect_reports_up_once(drivers: Drivers) -> None:
    a, b = drivers(), drivers()
    b_addr = b.bind("127.0.0.1")
    a.bind("127.0.0.1")
    a.connect("b", b_addr)
    a.connect("b", b_addr)  # idempotent
    assert wait_for(a, "up", "b").peer == "b"
    assert a.is_up("b") and not a.is_up("nobody")
    assert a.poll(0.05) == []  # no second "up"


def test_send_and_poll_both_ways(drivers: Drivers) -> None:
    a, b = pair(drivers)
    a.send("b", [b"header", b"payload"], timeout=1.0)
    b.send("a", [b"reply"], timeout=0)  # timeout 0 is "don't wait", and the channel is up
    assert [bytes(f) for f in wait_for(b, "frames").frames or []] == [b"header", b"payload"]
    assert [bytes(f) for f in wait_for(a, "frames").frames or []] == [b"reply"]


def test_many_messages_arrive_in_order(drivers: Drivers) -> None:
    a, b = pair(drivers)
    for i in range(500):
        a.send("b", [b"%d" % i], timeout=1.0)
    got: list[int] = []
    deadline = time.monotonic() + 5
    while len(got) < 500 and time.monotonic() < deadline:
        got += [int(bytes(e.frames[0])) for e in b.poll(1.0) if e.kind == "frames" and e.frames]
    assert got == list(range(500))


def test_send_to_unknown_peer_is_unreachable_at_once(drivers: Drivers) -> None:
    a = drivers()
    a.bind("127.0.0.1")
    t = time.monotonic()
    with pytest.raises(PeerUnreachable) as info:
        a.send("ghost", [b"x"], timeout=5.0)
    assert info.value.peer == "ghost" and time.monotonic() - t < 0.5


def test_send_to_a_peer_that_never_comes_up_is_unreachable_at_the_deadline(drivers: Drivers) -> None:
    a = drivers()
    a.bind("127.0.0.1")
    a.connect("ghost", drivers.dead_address())
    t = time.monotonic()
    with pytest.raises(PeerUnreachable):
        a.send("ghost", [b"x"], timeout=0.3)
    assert 0.25 < time.monotonic() - t < 1.5
    assert a.wait_up(["ghost"], 0.1) == {"ghost"}
    assert a.wait_up([], None) == set()


def test_wait_up_waits_for_a_late_binder(drivers: Drivers) -> None:
    a, b = drivers(), drivers()
    a.bind("127.0.0.1")
    if drivers.kind == "zmq":
        port = free_port()
        a.connect("b", f"tcp://127.0.0.1:{port}")
        assert a.wait_up(["b"], 0.1) == {"b"}
        b.bind("127.0.0.1", port)  # libzmq keeps retrying; the handshake follows the bind
    else:
        a.connect("b", "inmem://4242")
        assert a.wait_up(["b"], 0.1) == {"b"}
        b.bind("any", 4242)
    assert a.wait_up(["b"], 5.0) == set()
    a.send("b", [b"late"], timeout=1.0)
    assert wait_for(b, "frames").frames == [b"late"]


def test_peer_that_closes_goes_down(drivers: Drivers) -> None:
    a, b = pair(drivers)
    a.poll(0)  # consume the "up"
    t = time.monotonic()
    drivers.crash(b)
    wait_for(a, "down", "b", timeout=3.0)
    assert time.monotonic() - t < 1.0  # a closed socket is noticed at once (no heartbeat needed)
    assert not a.is_up("b")
    with pytest.raises(PeerUnreachable):
        a.send("b", [b"x"], timeout=0.1)


def test_moving_a_peer_to_a_new_address(drivers: Drivers) -> None:
    a = drivers()
    a.bind("127.0.0.1")
    old, new = drivers(), drivers()
    old_addr, new_addr = old.bind("127.0.0.1"), new.bind("127.0.0.1")
    a.connect("p", old_addr)
    assert a.wait_up(["p"], 5.0) == set()
    a.connect("p", new_addr)  # moves the channel: disconnect old, connect new
    assert a.wait_up(["p"], 5.0) == set()
    a.send("p", [b"to new"], timeout=1.0)
    assert wait_for(new, "frames").frames == [b"to new"]
    assert old.poll(0.1) == []


def test_disconnect_closes_the_channel_quietly(drivers: Drivers) -> None:
    a, b = pair(drivers)
    a.poll(0)
    a.disconnect("b")
    a.disconnect("b")  # idempotent
    assert not a.is_up("b")
    with pytest.raises(PeerUnreachable):
        a.send("b", [b"x"], timeout=0.1)
    assert [e for e in a.poll(0.05) if e.kind == "down"] == []


def test_wakeup_interrupts_poll_forever(drivers: Drivers) -> None:
    a = drivers()
    a.bind("127.0.0.1")
    timer = threading.Timer(0.2, a.wakeup)
    timer.start()
    t = time.monotonic()
    assert a.poll(None) == []
    assert 0.15 < time.monotonic() - t < 2.0
    timer.join()


def test_wakeup_before_poll_makes_it_return(drivers: Drivers) -> None:
    a = drivers()
    a.bind("127.0.0.1")
    a.wakeup()
    a.wakeup()
    t = time.monotonic()
    assert a.poll(5.0) == []
    assert time.monotonic() - t < 1.0
    t = time.monotonic()
    assert a.poll(0.1) == []  # the wakeups were consumed
    assert time.monotonic() - t >= 0.09


def test_poll_timeout_zero_does_not_wait(drivers: Drivers) -> None:
    a = drivers()
    a.bind("127.0.0.1")
    t = time.monotonic()
    assert a.poll(0) == []
    assert time.monotonic() - t < 0.2


def test_close_is_idempotent_and_final(drivers: Drivers) -> None:
    a, b = pair(drivers)
    a.close()
    a.close()
    a.wakeup()  # harmless after close
    assert not a.is_up("b")
    with pytest.raises(ProxyClosed):
        a.send("b", [b"x"], timeout=0)
    with pytest.raises(ProxyClosed):
        a.poll(0)


def test_binding_twice_is_an_error(drivers: Drivers) -> None:
    a = drivers()
    a.bind("127.0.0.1")
    with pytest.raises(ConfigError):
        a.bind("127.0.0.1")


def test_codec_frames_round_trip_through_the_driver(drivers: Drivers) -> None:
    a, b = pair(drivers)
    codec = WireCodec(b"key")
    arr = np.arange(200_000, dtype=np.float32)
    a.send("b", codec.encode(Message("grad", "a", "b", {"w": arr}), incarnation="i", seq=1), timeout=2.0)
    frames = wait_for(b, "frames").frames
    assert frames is not None
    out = codec.decode(frames).payload
    assert np.array_equal(out["w"], arr)


def test_in_memory_driver_satisfies_the_protocol() -> None:
    assert isinstance(InMemoryNetwork().driver(), Driver)
    with ZmqDriver() as z:
        assert isinstance(z, Driver)


# ------------------------------------------------------------------------------------ ZeroMQ only


@pytest.fixture
def zmq_drivers() -> Iterator[Drivers]:
    made = Drivers("zmq")
    yield made
    for d in made.made:
        d.close(0)


def test_big_frames_arrive_as_memoryviews_small_as_bytes(zmq_drivers: Drivers) -> None:
    a, b = pair(zmq_drivers)
    big = os.urandom(1 << 20)
    a.send("b", [b"small", big], timeout=2.0)
    frames = wait_for(b, "frames").frames
    assert frames is not None
    assert type(frames[0]) is bytes and isinstance(frames[1], memoryview)
    assert frames[1] == big


def test_a_64_mb_array_travels_between_members_in_parts(zmq_drivers: Drivers) -> None:
    # Default part bound on both sides (ZMQ_MAXMSGSIZE ~4 MiB), gated as in a group, the Proxy's 2 GiB
    # message bound: the codec sends the array as 16 parts, none over the bound, and it arrives intact.
    token = b"member-token-0123456789"
    a, b = zmq_drivers(), zmq_drivers()
    for d in (a, b):
        d.require_token(token, lambda credential: credential == token)
    a.bind("127.0.0.1")
    a.connect("b", b.bind("127.0.0.1"))
    assert a.wait_up(["b"], 10.0) == set()
    codec = WireCodec(b"group key", max_message_bytes=1 << 31)
    array = np.random.default_rng(7).random(8 << 20)  # 64 MiB of float64
    frames = codec.encode(Message("big", "a", "b", {"w": array}), incarnation="i", seq=1)
    assert len(frames) == 2 + 16 + 1 and max(memoryview(f).nbytes for f in frames) <= MAX_FRAME_BYTES
    a.send("b", frames, timeout=10.0)
    received = wait_for(b, "frames", timeout=15.0).frames
    assert received is not None and len(received) == len(frames)
    out = codec.decode(received).payload["w"]
    assert out.dtype == array.dtype and np.array_equal(out, array)


def test_a_frame_over_max_part_bytes_drops_the_connection_before_delivery(zmq_drivers: Drivers) -> None:
    a, b = zmq_drivers(), zmq_drivers(max_part_bytes=64 * 1024)
    a.bind("127.0.0.1")
    a.connect("b", b.bind("127.0.0.1"))
    assert a.wait_up(["b"], 5.0) == set()
    a.send("b", [b"ok", bytes(64 * 1024)], timeout=5.0)  # exactly the bound: delivered
    assert wait_for(b, "frames").frames == [b"ok", bytes(64 * 1024)]
    a.send("b", [b"too big", bytes(64 * 1024 + 1)], timeout=5.0)
    wait_for(a, "down", "b")  # b's libzmq reset the connection at the part's size header
    assert a.wait_up(["b"], 5.0) == set()  # and libzmq reconnected by itself
    a.send("b", [b"after"], timeout=5.0)
    assert wait_for(b, "frames").frames == [b"after"]  # the oversized message never came out


def test_max_message_bytes_only_lowers_the_part_bound(zmq_drivers: Drivers) -> None:
    with pytest.raises(ConfigError):
        ZmqDriver(max_part_bytes=0)
    a, b = zmq_drivers(), zmq_drivers(max_part_bytes=1 << 20, max_message_bytes=1024)
    a.bind("127.0.0.1")
    a.connect("b", b.bind("127.0.0.1"))
    assert a.wait_up(["b"], 5.0) == set()
    a.send("b", [bytes(1025)], timeout=5.0)
    wait_for(a, "down", "b")
    assert a.wait_up(["b"], 5.0) == set()
    a.send("b", [bytes(1024)], timeout=5.0)
    assert wait_for(b, "frames").frames == [bytes(1024)]


def test_a_server_we_dial_cannot_make_us_buffer_a_huge_handshake_command(zmq_drivers: Drivers) -> None:
    # The outbound socket has the same bound: a "peer" at a registered address that answers our greeting
    # with a command announcing 1 GiB is cut off at its header.
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = zmq_drivers()
        a.connect("evil", f"tcp://127.0.0.1:{server.getsockname()[1]}")
        server.settimeout(5.0)
        conn, _ = server.accept()
        with conn:
            conn.settimeout(5.0)
            greeting = b"\xff" + bytes(8) + b"\x7f\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" + bytes(31)
            conn.sendall(greeting + b"\x06" + (1 << 30).to_bytes(8, "big") + b"\x05READY")
            sent, chunk = 0, bytes(1 << 20)
            try:
                while sent < 256 << 20:
                    conn.sendall(chunk)
                    sent += len(chunk)
            except OSError:  # reset by the driver
                pass
        assert sent < 256 << 20, "the driver kept reading an oversized handshake command"
        assert not a.is_up("evil")


def test_full_queue_times_out(zmq_drivers: Drivers) -> None:
    a = zmq_drivers(sndhwm=1)
    b = zmq_drivers(rcvhwm=1)
    a.bind("127.0.0.1")
    a.connect("b", b.bind("127.0.0.1"))  # b never polls: its queue and the TCP buffers fill up
    assert a.wait_up(["b"], 5.0) == set()
    chunk = b"x" * (1 << 20)
    with pytest.raises(Timeout) as info:
        for _ in range(500):
            a.send("b", [chunk], timeout=0.2)
    assert info.value.missing == ("b",)


def test_close_with_unsent_messages_to_a_frozen_peer_is_prompt(zmq_drivers: Drivers) -> None:
    a = ZmqDriver(linger=0.2, heartbeat_ivl=5.0, heartbeat_timeout=10.0)  # no heartbeat rescue
    b = zmq_drivers(rcvhwm=1)  # never polls: stands in for a frozen peer
    a.bind("127.0.0.1")
    a.connect("b", b.bind("127.0.0.1"))
    assert a.wait_up(["b"], 5.0) == set()
    for _ in range(40):
        a.send("b", [b"y" * (1 << 20)], timeout=1.0)  # 40 MB: far more than b will take in
    t = time.monotonic()
    a.close()
    assert time.monotonic() - t < 1.0


def test_a_bad_frame_does_not_corrupt_the_next_message(zmq_drivers: Drivers) -> None:
    a, b = pair(zmq_drivers)
    with pytest.raises(ConfigError):
        a.send("b", [b"ok", 12345, b"never"], timeout=1.0)  # type: ignore[list-item]
    a.send("b", [b"next"], timeout=1.0)
    messages: list[list] = []
    while not any(b"next" in m for m in messages):
        messages += [e.frames for e in b.poll(2.0) if e.kind == "frames" and e.frames is not None]
    assert messages[-1] == [b"next"]  # the stub [b"ok", b""] may come first; it is never glued on


def test_address_in_use_is_a_transport_error(zmq_drivers: Drivers) -> None:
    a, b = zmq_drivers(), zmq_drivers()
    port = int(a.bind("127.0.0.1").rsplit(":", 1)[1])
    with pytest.raises(Exception) as info:
        b.bind("127.0.0.1", port)
    assert "zmq" not in type(info.value).__module__
    with pytest.raises(ConfigError):
        b.connect("x", "not-an-endpoint")


def test_zmq_errors_never_escape_the_driver(zmq_drivers: Drivers) -> None:
    import zmq

    a = zmq_drivers()
    a.bind("127.0.0.1")
    for call in (lambda: a.send("nobody", [b"x"], timeout=0), lambda: a.connect("p", "bogus://x")):
        with pytest.raises(Exception) as info:
            call()
        assert not isinstance(info.value, zmq.ZMQError)


def test_wildcard_bind_advertises_a_reachable_host(zmq_drivers: Drivers) -> None:
    a = zmq_drivers(advertise_host="127.0.0.1")
    address = a.bind("0.0.0.0")
    assert address.startswith("tcp://127.0.0.1:")
    b = zmq_drivers()
    b.bind("127.0.0.1")
    b.connect("a", address)
    b.send("a", [b"hi"], timeout=2.0)
    assert wait_for(a, "frames").frames == [b"hi"]


# ------------------------------------------------------------------- real peer processes (ZeroMQ)

PEER_SCRIPT = textwrap.dedent(
    """
    import ctypes, sys
    try:
        ctypes.CDLL("libc.so.6").prctl(1, 9)  # PR_SET_PDEATHSIG: die with the test process
    except OSError:
        pass
    from rallypoint.proxy._zmq import ZmqDriver
    parent, port = sys.argv[1], int(sys.argv[2])
    d = ZmqDriver(heartbeat_ivl=0.1, heartbeat_timeout=0.4, linger=0)
    address = d.bind("127.0.0.1", port)
    d.connect("parent", parent)
    d.wait_up(["parent"], 10.0)
    print(address, flush=True)
    while True:
        for event in d.poll(None):
            if event.kind == "frames":
                d.send("parent", [b"echo"] + [bytes(f) for f in event.frames], timeout=5.0)
    """
)


class Peer:
    """An echo peer in a child process: prints its address once its channel to us is up."""

    def __init__(self, parent_address: str, port: int = 0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PEER_SCRIPT, parent_address, str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 15.0)
        line = self.proc.stdout.readline().decode().strip() if ready else ""
        if not line.startswith("tcp://"):
            self.proc.kill()
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            pytest.fail(f"peer process did not start: {line!r}\n{err}")
        self.address = line

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)


@pytest.fixture
def spawn() -> Iterator[Callable[..., Peer]]:
    peers: list[Peer] = []

    def make(parent_address: str, port: int = 0) -> Peer:
        peer = Peer(parent_address, port)
        peers.append(peer)
        return peer

    yield make
    for p in peers:
        with_cont = p.proc.poll() is None
        if with_cont:
            p.signal(signal.SIGCONT)
        p.kill()


def echo(driver: Driver, peer: str, payload: bytes) -> None:
    driver.send(peer, [payload], timeout=5.0)
    frames = wait_for(driver, "frames").frames
    assert frames == [b"echo", payload]


def test_killed_peer_goes_down_promptly_and_a_restart_comes_back_up(
    zmq_drivers: Drivers, spawn: Callable[..., Peer]
) -> None:
    me = zmq_drivers()
    address = me.bind("127.0.0.1")
    first = spawn(address)
    me.connect("p", first.address)
    assert me.wait_up(["p"], 5.0) == set()
    echo(me, "p", b"one")

    t = time.monotonic()
    first.signal(signal.SIGKILL)
    wait_for(me, "down", "p", timeout=5.0)
    down_after = time.monotonic() - t
    assert down_after < 1.0, down_after  # the kernel resets the connection: no heartbeat wait

    second = spawn(address)  # restarted on a new port; it reconnects to us on its own
    assert second.address != first.address
    me.connect("p", second.address)
    t = time.monotonic()
    wait_for(me, "up", "p", timeout=5.0)
    assert time.monotonic() - t < 1.0
    echo(me, "p", b"two")  # both directions flow again


def test_peer_restarted_on_the_same_port_reconnects_by_itself(
    zmq_drivers: Drivers, spawn: Callable[..., Peer]
) -> None:
    me = zmq_drivers()
    address = me.bind("127.0.0.1")
    first = spawn(address)
    port = int(first.address.rsplit(":", 1)[1])
    me.connect("p", first.address)
    assert me.wait_up(["p"], 5.0) == set()
    first.signal(signal.SIGKILL)
    wait_for(me, "down", "p", timeout=5.0)
    first.kill()
    spawn(address, port)  # same address: libzmq's reconnect finds it, no connect() needed
    wait_for(me, "up", "p", timeout=5.0)
    echo(me, "p", b"again")


def test_frozen_peer_goes_down_within_the_heartbeat_timeout(
    zmq_drivers: Drivers, spawn: Callable[..., Peer]
) -> None:
    me = zmq_drivers(heartbeat_ivl=0.1, heartbeat_timeout=0.3)
    address = me.bind("127.0.0.1")
    peer = spawn(address)
    me.connect("p", peer.address)
    assert me.wait_up(["p"], 5.0) == set()
    echo(me, "p", b"alive")
    t = time.monotonic()
    peer.signal(signal.SIGSTOP)  # the process and its libzmq I/O thread freeze; TCP stays open
    wait_for(me, "down", "p", timeout=5.0)
    frozen_after = time.monotonic() - t
    assert 0.2 < frozen_after < 1.5, frozen_after  # ~ heartbeat_ivl + heartbeat_timeout
    peer.signal(signal.SIGCONT)
    wait_for(me, "up", "p", timeout=5.0)  # thawed: libzmq reconnects, the channel is back
    echo(me, "p", b"thawed")


# ------------------------------------------------------------------------- membership (require_token)


def gated(drivers: Drivers, token: bytes, accepted: set[bytes], **kwargs: object) -> Driver:
    d = drivers(**kwargs)
    d.require_token(token, lambda credential: credential in accepted)
    return d


def test_the_right_token_passes_a_wrong_one_is_refused(drivers: Drivers) -> None:
    accepted = {b"group-token"}
    server = gated(drivers, b"group-token", accepted)
    address = server.bind("127.0.0.1")
    member, stranger = gated(drivers, b"group-token", accepted), gated(drivers, b"wrong", accepted)
    member.connect("server", address)
    stranger.connect("server", address)
    assert member.wait_up(["server"], 5.0) == set()
    member.send("server", [b"from a member"], timeout=5.0)
    assert wait_for(server, "frames").frames == [b"from a member"]
    deadline = time.monotonic() + 5.0
    while server.refused_handshakes < 1 and time.monotonic() < deadline:
        server.poll(0.05)
    assert server.refused_handshakes >= 1
    assert not stranger.is_up("server")
    with pytest.raises(PeerUnreachable):
        stranger.send("server", [b"from a stranger"], timeout=0.2)


def test_set_token_switches_what_is_presented(drivers: Drivers) -> None:
    accepted = {b"old"}
    server = gated(drivers, b"old", accepted)
    address = server.bind("127.0.0.1")
    client = gated(drivers, b"old", accepted)
    client.set_token(b"new")  # the server does not know it yet: refused
    client.connect("server", address)
    deadline = time.monotonic() + 5.0
    while server.refused_handshakes < 1 and time.monotonic() < deadline:
        server.poll(0.05)
    assert server.refused_handshakes >= 1 and not client.is_up("server")
    accepted.add(b"new")  # the server learns the new token: the client's channel comes up by itself
    assert client.wait_up(["server"], 5.0) == set()
    accepted.discard(b"old")  # grace over: only the new token opens the door
    late = gated(drivers, b"old", accepted)
    late.connect("server", address)
    assert late.wait_up(["server"], 0.5) == {"server"}
    late.set_token(b"new")
    assert late.wait_up(["server"], 5.0) == set()


def test_require_token_comes_before_bind_and_connect(drivers: Drivers) -> None:
    d = drivers()
    d.bind("127.0.0.1")
    with pytest.raises(ConfigError):
        d.require_token(b"t", lambda credential: True)
    e = drivers()
    e.require_token(b"t", lambda credential: True)
    with pytest.raises(ConfigError):
        e.require_token(b"t", lambda credential: True)
    with pytest.raises(ConfigError):
        e.set_token(b"")


def test_curve_gate_checks_the_client_public_key(zmq_drivers: Drivers) -> None:
    members: set[bytes] = set()
    server = gated(zmq_drivers, b"unused", members, curve=True)
    address = server.bind("127.0.0.1")
    member = gated(zmq_drivers, b"unused", members, curve=True)
    stranger = gated(zmq_drivers, b"unused", members, curve=True)
    # a CURVE client proves the key pair of its own address: the allow-list holds those keys
    members.add(member.bind("127.0.0.1").split("#curve=")[1].encode())
    member.connect("server", address)
    stranger.connect("server", address)
    assert member.wait_up(["server"], 5.0) == set()
    member.send("server", [b"encrypted"], timeout=5.0)
    assert wait_for(server, "frames").frames == [b"encrypted"]
    assert stranger.wait_up(["server"], 0.5) == {"server"}
    assert server.refused_handshakes >= 1


def test_drivers_sharing_a_context_share_one_zap_handler() -> None:
    ctx = zmq.Context()
    try:
        with ZmqDriver(context=ctx, linger=0, **HB) as a, ZmqDriver(context=ctx, linger=0, **HB) as b:
            a.require_token(b"ta", lambda credential: credential == b"tb")
            b.require_token(b"tb", lambda credential: credential == b"ta")
            a.connect("b", b.bind("127.0.0.1"))
            b.connect("a", a.bind("127.0.0.1"))
            assert a.wait_up(["b"], 5.0) == set() and b.wait_up(["a"], 5.0) == set()
        with ZmqDriver(context=ctx, linger=0) as c:  # the handler stopped with its last driver
            c.require_token(b"t", lambda credential: True)
            c.bind("127.0.0.1")
    finally:
        ctx.term()
