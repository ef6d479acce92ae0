"""ZmqDriver: the Driver over ZeroMQ. The only module of rallypoint that imports zmq.

Sockets (all used from the owner's thread; only `wakeup()` is for other threads):

- inbound: one ROUTER bound at `bind()`. Every peer's outbound socket connects to it; the routing-id frame
  the ROUTER prepends is stripped, so `poll()` returns only the frames the peer sent.
- outbound: one ROUTER with ROUTER_MANDATORY, connected to each peer with CONNECT_ROUTING_ID set, so we
  address peers by routing id and an unknown one fails at once (EHOSTUNREACH) instead of queuing silently.
  ZMTP heartbeats (HEARTBEAT_IVL/TIMEOUT/TTL) run in libzmq's I/O thread, so a dead, frozen or cut-off peer
  is noticed without any Python thread.
- a monitor (PAIR over inproc) on the outbound socket: HANDSHAKE_SUCCEEDED -> "up", DISCONNECTED (or a
  failed handshake) -> "down", mapped from the event's endpoint to the peer. Readiness is the handshake,
  never a sleep.
- a pipe whose read end sits in the same zmq.Poller, for a thread-safe `wakeup()`.

Deviations from the obvious design, forced by libzmq 4.3 (each verified by experiment here):

- Routing ids are `b"<generation>:<peer>"`, fresh for every connect(), not the bare peer name. Connecting
  with a CONNECT_ROUTING_ID that is still attached to a pipe aborts the whole process (libzmq 4.3.5:
  "Assertion failed: !has_out_pipe (routing_id) (src/router.cpp:438)", reproduced here), and disconnect()
  detaches the old pipe asynchronously. Fresh ids make that impossible whatever the timing; the routing id
  is our private detail, peers never see it.
- The outbound socket is also registered in the poller (it never receives anything). zmq_disconnect only
  stops libzmq's reconnect attempts once the socket processes its pending commands, which happens in calls
  on that socket; polling it makes that prompt instead of "at the next send".
- Monitor events name the endpoint as given to connect() at first, but libzmq reports the *resolved*
  address after a reconnect ("tcp://localhost:5555" becomes "tcp://127.0.0.1:5555"), so each channel is
  known under both spellings.
- IMMEDIATE stays 0: with IMMEDIATE=1 the pipe only exists after the handshake and CONNECT_ROUTING_ID would
  not apply to it. Instead `send()` refuses (PeerUnreachable) while the channel is not up, so nothing
  queues silently for a peer we know is gone; frames queued just before a crash is noticed are delivered
  if libzmq reconnects to a peer restarted at the same address.

Receiving: `recv(copy=False)` per part; frames shorter than `copy_threshold` are handed on as bytes,
longer ones as memoryviews of the zmq message (writable, zero copy). Sending: `send(copy=False)` per part,
which pyzmq copies below `copy_threshold` and sends zero-copy above it.

Membership at the handshake (`require_token`, before bind/connect): the inbound socket becomes a PLAIN
server (CURVE with curve=True) with its own ZAP domain, and a ZAP handler thread, one per ZeroMQ context
(`_Gatekeeper`, bound at inproc://zeromq.zap.01, which libzmq looks up per context), answers each handshake
by calling the owner's `accept(credential)`: the client's PLAIN password, or its CURVE public key (Z85, as in
its address). A refused connection is closed by libzmq before any message frame is decoded. The same thread
watches the inbound socket's handshake failures (refused credentials, wrong mechanism, garbage greetings),
counts them in `refused_handshakes` and logs them at most once per `_LOG_EVERY` seconds with a count.

Two libzmq properties callers should know (measured here):

- A receiver whose inbound queue is at RCVHWM stops reading its TCP stream, so it stops answering ZMTP
  heartbeats too: a consumer that leaves RCVHWM messages unread for longer than heartbeat_timeout is
  declared "down" by its senders, exactly like a frozen process (at the protocol level they look the same).
- ZMQ_MAXMSGSIZE (`max_part_bytes`) bounds each *part*, not a message, checked on the part's size header
  before anything is allocated: a larger part drops the connection at once. It also bounds the commands of
  the handshake, which libzmq decodes whole before the mechanism sees them: a stranger can make us buffer up
  to that limit per connection before being refused (800 MB buffered from a PLAIN HELLO announcing 1 GiB
  with a 1 GiB limit; reset at once with a 1 MiB limit). So it is set to the largest frame the wire codec
  sends (`frame_bound()`: 4 MiB parts plus room for a header), on both sockets (a server we dial could send
  a huge handshake command too), and big payloads travel in parts; a whole message is bounded by the
  codec's `max_message_bytes`. Nothing in libzmq bounds the number of parts of one message: a peer past the
  handshake can send one that never ends, buffered whole (RCVHWM counts whole messages).
- Frames in flight when a connection breaks are lost (in kernel buffers or half-written); ZeroMQ has no
  end-to-end acknowledgement. Sessions above the driver must treat "down" as "outcome unknown".
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import socket
import struct
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import zmq
from zmq.utils import z85

from rallypoint.errors import ConfigError, PeerUnreachable, ProxyClosed, Timeout, TransportError

from ._config import deadline_after, time_left
from ._driver import DriverEvent
from ._wire import MAX_FRAME_BYTES

__all__ = ["ZmqDriver"]

logger = logging.getLogger(__name__)

_MONITOR_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
_HANDSHAKE_FAILED = int(
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
_HANDSHAKE_SUCCEEDED = int(zmq.EVENT_HANDSHAKE_SUCCEEDED)
_DISCONNECTED = int(zmq.EVENT_DISCONNECTED)
_EVENT_HEADER = struct.Struct("=HI")  # libzmq monitor frame 1: uint16 event, uint32 value
_WILDCARD_HOSTS = {"", "*", "0.0.0.0", "::", "[::]"}
_RECV_BATCH = 1024  # messages taken per poll() before returning, so up/down events are never starved
_monitor_ids = itertools.count(1)
# Plain ints for the hot path: pyzmq's constants are Enums, and Enum arithmetic costs microseconds.
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
# The backend's send/recv, called directly on the hot path: pyzmq's Python-level wrappers re-check arguments
# the driver never passes and cost several times the call itself (measured here: send 1.5 us vs 0.6 us,
# recv(copy=False) plus `.bytes` 2.1 us vs recv() 0.4 us). Falls back to the wrappers if a pyzmq lacks it.
_BackendSocket: Any = getattr(zmq.backend, "Socket", zmq.Socket)
_raw_send = _BackendSocket.send
_raw_recv = _BackendSocket.recv


def _ms(seconds: float | None) -> int | None:
    """Seconds (float, None = forever) to libzmq milliseconds (int, None = forever). The only conversion:
    rounded up, so a short positive wait never becomes a busy 0."""
    if seconds is None:
        return None
    return max(0, math.ceil(seconds * 1000.0))


def _ms_option(seconds: float) -> int:
    """Seconds to a millisecond socket option (finite)."""
    return min(max(0, math.ceil(seconds * 1000.0)), 2**31 - 1)


@contextlib.contextmanager
def _zmq_errors(what: str, peer: str | None = None) -> Iterator[None]:
    """Translate zmq errors raised inside into rallypoint errors (with the zmq error as the cause)."""
    try:
        yield
    except zmq.Again as exc:
        raise Timeout(f"{what}: {exc}", missing=[peer] if peer else ()) from exc
    except zmq.ContextTerminated as exc:
        raise ProxyClosed(f"{what}: the ZeroMQ context was terminated") from exc
    except zmq.ZMQError as exc:
        if exc.errno == zmq.EHOSTUNREACH and peer is not None:
            raise PeerUnreachable(peer, f"{what}: {exc}") from exc
        if exc.errno in (zmq.EINVAL, zmq.EPROTONOSUPPORT, zmq.ENOCOMPATPROTO):
            raise ConfigError(f"{what}: {exc}") from exc
        if exc.errno == zmq.ENOTSOCK:
            raise ProxyClosed(f"{what}: the socket is closed") from exc
        raise TransportError(f"{what}: {exc}") from exc


class _Channel:
    """Our outbound connection to one peer."""

    __slots__ = ("address", "rid", "endpoints", "token", "log", "failures")

    def __init__(self, address: str, rid: bytes, endpoints: set[bytes], token: bytes | None) -> None:
        self.address = address
        self.rid = rid
        self.endpoints = endpoints
        self.token = token  # what this channel presents (PLAIN), fixed when libzmq made the connection
        self.log = _RateLimitedLog()  # failed handshakes with this peer
        self.failures = 0  # failed handshakes in a row


_CURVE_MARK = "#curve="


def _split_curve(address: str) -> tuple[str, bytes | None]:
    """`tcp://h:p#curve=KEY` -> ("tcp://h:p", KEY); a plain endpoint -> (endpoint, None)."""
    endpoint, mark, key = address.partition(_CURVE_MARK)
    if not mark:
        return address, None
    if len(key) != 40:
        raise ConfigError(f"bad CURVE public key in address {address!r}: want 40 Z85 characters")
    return endpoint, key.encode("ascii")


# ------------------------------------------------------------------------------ membership (ZAP)

_ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by the ZAP spec (rfc.zeromq.org/spec/27); one per context
_PLAIN_USER = b"rallypoint"  # PLAIN wants a non-empty user name; only the password is checked
_LOG_EVERY = 5.0  # seconds between two log lines about refused handshakes (per driver, per peer)
_INBOUND_FAILED = _HANDSHAKE_FAILED  # the inbound monitor's events: every kind of failed handshake
_GATE_IDS = itertools.count(1)


class _RateLimitedLog:
    """At most one warning per `every` seconds; the next line says how many were held back meanwhile."""

    __slots__ = ("every", "_last", "_held")

    def __init__(self, every: float = _LOG_EVERY) -> None:
        self.every = every
        self._last = -math.inf
        self._held = 0

    def warn(self, message: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now - self._last < self.every:
            self._held += 1
            return
        held, self._held, self._last = self._held, 0, now
        if held:
            logger.warning(message + " (and %d more since the last report)", *args, held, exc_info=exc_info)
        else:
            logger.warning(message, *args, exc_info=exc_info)

    def flush(self, message: str, *args: object) -> float | None:
        """Log the held-back count once its window is over; returns seconds until then (None: nothing held)."""
        if not self._held:
            return None
        left = self._last + self.every - time.monotonic()
        if left > 0:
            return left
        logger.warning(message, *args, self._held)
        self._held, self._last = 0, time.monotonic()
        return None


class _Gate:
    """One driver's door: its ZAP domain, `accept`, its refusal count and log. Shared with the ZAP thread,
    which alone writes `refused` (ints are read atomically by the owner)."""

    def __init__(self, accept: Callable[[bytes], bool], curve: bool) -> None:
        self.accept = accept
        self.curve = curve
        self.domain = f"rallypoint-{os.getpid()}-{next(_GATE_IDS)}".encode()
        self.monitor_endpoint = f"inproc://{self.domain.decode()}-inbound"
        self.address = ""
        self.refused = 0
        self.last_peer = "?"
        self.log = _RateLimitedLog()

    def check(self, mechanism: bytes, credentials: list[bytes]) -> bool:
        """The ZAP decision for one handshake: a few dict/bytes operations plus `accept`."""
        try:
            if mechanism == b"PLAIN" and not self.curve and len(credentials) == 2:
                return bool(self.accept(credentials[1]))
            if mechanism == b"CURVE" and self.curve and len(credentials) == 1 and len(credentials[0]) == 32:
                return bool(self.accept(z85.encode(credentials[0])))
        except Exception:  # the owner's callable failed: refuse, and say so (rate-limited)
            self.log.warn("rallypoint %s: accept() raised; handshake refused", self.address, exc_info=True)
        return False

    def refused_one(self) -> None:
        self.refused += 1
        self.log.warn("rallypoint %s refused a handshake (not a member of the group), latest from %s",
                      self.address, self.last_peer)

    def flush_log(self) -> float | None:
        return self.log.flush("rallypoint %s refused %d more handshakes (not members of the group)",
                              self.address)


def _bind_zap(zap: zmq.Socket[Any], patience: float = 1.0) -> None:
    """Bind the context's ZAP endpoint. A handler that just stopped (its last driver closed) releases the
    endpoint asynchronously, inside libzmq: "address in use" is retried for up to `patience` seconds."""
    deadline = time.monotonic() + patience
    while True:
        try:
            zap.bind(_ZAP_ENDPOINT)
            return
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


class _Gatekeeper(threading.Thread):
    """The ZAP handler of one ZeroMQ context, for every gated driver on it, in a thread of its own.

    Owns only its own sockets: the ZAP ROUTER and one monitor PAIR per gated inbound socket. Drivers talk to
    it through `add()`/`remove()` (a command list plus a wake-up pipe). Per handshake: one recv_multipart,
    a dict look-up, `accept`, one send_multipart.
    """

    _lock = threading.Lock()
    _by_context: dict[int, _Gatekeeper] = {}

    def __init__(self, ctx: zmq.Context[Any]) -> None:
        super().__init__(name="rallypoint-zap", daemon=True)
        self._ctx = ctx
        self._gates: dict[bytes, _Gate] = {}
        self._monitors: dict[bytes, zmq.Socket[Any]] = {}  # domain -> PAIR on that gate's inbound monitor
        self._commands: list[tuple[str, _Gate, threading.Event]] = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        zap = ctx.socket(zmq.ROUTER)
        zap.setsockopt(zmq.LINGER, 0)
        try:
            _bind_zap(zap)
        except zmq.ZMQError as exc:
            zap.close(0)
            os.close(self._wake_r)
            os.close(self._wake_w)
            raise ConfigError(f"this ZeroMQ context already has a ZAP handler ({exc}): give the driver a "
                              "context of its own to use require_token()") from exc
        self._zap = zap

    @classmethod
    def add(cls, ctx: zmq.Context[Any], gate: _Gate) -> None:
        """Start answering for `gate` (and watching its inbound monitor); starts the context's thread."""
        with cls._lock:
            keeper = cls._by_context.get(id(ctx))
            if keeper is None:
                keeper = cls._by_context[id(ctx)] = _Gatekeeper(ctx)
                keeper.start()
            keeper._command("add", gate)

    @classmethod
    def remove(cls, ctx: zmq.Context[Any], gate: _Gate) -> None:
        """Stop answering for `gate`; the last gate of a context stops its thread (closing its sockets)."""
        with cls._lock:
            keeper = cls._by_context.get(id(ctx))
            if keeper is None:
                return
            keeper._command("remove", gate)
            if not keeper._gates:
                del cls._by_context[id(ctx)]
                keeper._command("stop", gate)
                keeper.join(5.0)

    def _command(self, what: str, gate: _Gate) -> None:
        done = threading.Event()
        self._commands.append((what, gate, done))
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\x01")
        if not done.wait(5.0) and self.is_alive():
            raise TransportError(f"the ZAP handler thread did not answer {what!r} within 5s")

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._zap, _POLLIN)
        poller.register(self._wake_r, _POLLIN)
        by_socket: dict[zmq.Socket[Any], _Gate] = {}
        wait: float | None = None
        try:
            while True:
                for sock, _ in poller.poll(None if wait is None else _ms(wait)):
                    if sock is self._zap:
                        self._answer()
                    elif sock == self._wake_r:
                        with contextlib.suppress(OSError):
                            os.read(self._wake_r, 4096)
                        if not self._run_commands(poller, by_socket):
                            return
                    else:
                        self._drain(sock, by_socket[sock])
                flushes = [w for w in (g.flush_log() for g in self._gates.values()) if w is not None]
                wait = min(flushes) if flushes else None
        finally:
            for mon in self._monitors.values():
                mon.close(0)
            self._zap.close(0)
            os.close(self._wake_r)
            os.close(self._wake_w)
            for _, _, done in self._commands:
                done.set()

    def _run_commands(self, poller: zmq.Poller, by_socket: dict[zmq.Socket[Any], _Gate]) -> bool:
        while self._commands:
            what, gate, done = self._commands.pop(0)
            if what == "stop":
                self._commands.insert(0, (what, gate, done))  # set in run()'s finally, after the sockets close
                return False
            if what == "add":
                self._gates[gate.domain] = gate
                mon = self._ctx.socket(zmq.PAIR)
                mon.setsockopt(zmq.LINGER, 0)
                mon.connect(gate.monitor_endpoint)
                self._monitors[gate.domain] = mon
                by_socket[mon] = gate
                poller.register(mon, _POLLIN)
            else:
                self._gates.pop(gate.domain, None)
                mon = self._monitors.pop(gate.domain, None)
                if mon is not None:
                    poller.unregister(mon)
                    del by_socket[mon]
                    mon.close(0)
            done.set()
        return True

    def _answer(self) -> None:
        """One ZAP request: [routing id, b"", version, request id, domain, address, identity, mechanism,
        *credentials] -> [routing id, b"", version, request id, status, text, user id, metadata]."""
        try:
            request = self._zap.recv_multipart(_NOBLOCK)
        except zmq.Again:
            return
        if len(request) < 8:
            return  # not a ZAP request; libzmq never sends one
        rid, _, version, request_id, domain, address, _, mechanism, *credentials = request
        gate = self._gates.get(domain)
        if gate is None:  # a socket of this context that did not ask for a gate: what libzmq does without one
            ok = mechanism != b"PLAIN"
        else:
            ok = gate.check(mechanism, credentials)
            if not ok:
                gate.last_peer = address.decode(errors="replace")
        status = (b"200", b"OK") if ok else (b"400", b"not a member of this group")
        with contextlib.suppress(zmq.ZMQError):
            self._zap.send_multipart([rid, b"", version, request_id, *status, b"", b""], _NOBLOCK)

    def _drain(self, mon: zmq.Socket[Any], gate: _Gate) -> None:
        """Count the failed handshakes the inbound monitor reported (refused by us, or not speaking our
        mechanism at all)."""
        while True:
            try:
                parts = mon.recv_multipart(_NOBLOCK)
            except zmq.ZMQError:
                return
            if len(parts) >= 2 and len(parts[0]) >= 6 and _EVENT_HEADER.unpack_from(parts[0])[0] & _INBOUND_FAILED:
                gate.refused_one()


class ZmqDriver:
    """A Driver over ZeroMQ (tcp): one inbound ROUTER, one outbound ROUTER, ZMTP heartbeats, a monitor.

        >>> with ZmqDriver() as a, ZmqDriver() as b:
        ...     address = b.bind("127.0.0.1")
        ...     a.connect("b", address)
        ...     a.send("b", [b"hello"], timeout=5.0)
        ...     [e.frames for e in b.poll(5.0)]
        [[b'hello']]

    heartbeat_ivl / heartbeat_timeout (seconds): how often each connection is pinged, and how long without
    any traffic back before it is declared broken; a frozen peer is "down" within about their sum, a peer
    whose process died within milliseconds (its kernel resets the connection). linger: how long close()
    gives unsent frames. sndhwm / rcvhwm: per-peer queue bounds in messages (a full send queue waits, then
    raises Timeout; nothing is dropped while the connection lives). max_part_bytes: the largest single frame
    (ZeroMQ message part) accepted, and the largest handshake command: libzmq drops the connection of a peer
    that announces more, before buffering it, so a stranger costs at most this much per connection. The
    default, `frame_bound()` (~4.06 MiB), is the largest frame a default WireCodec sends, since it splits
    bigger payload frames into parts; a whole message is bounded by the codec's `max_message_bytes`.
    max_message_bytes (optional) only lowers the part bound further, when smaller. reconnect_ivl: how often libzmq
    retries a broken channel (a peer restarted at the same address comes back "up" by itself).
    advertise_host: the host put in `address` when binding a wildcard host (default: this host's name).
    curve: encrypt every connection with CurveZMQ (for untrusted networks). This driver then makes a key
    pair, and its `address` carries the public key (`tcp://host:port#curve=<z85 key>`), so the registry
    hands it to peers with the address; a connection is only set up to a peer that proves it holds the
    secret key of the address it advertised. Incoming connections are not filtered by client key: every
    frame is authenticated by the wire MAC anyway, unless `require_token()` gates them (see there). All
    members of a group must agree on `curve`.

    Membership at the handshake: `require_token(token, accept)` (before bind/connect) refuses every
    connection whose credential `accept` rejects before it can send a single message frame, and presents
    `token` on our own connections; `refused_handshakes` counts refusals.

    All methods are for the owner's thread, except `wakeup()` (any thread, or a signal handler).
    """

    def __init__(
        self,
        *,
        context: zmq.Context[Any] | None = None,
        heartbeat_ivl: float = 0.5,
        heartbeat_timeout: float = 1.5,
        linger: float = 0.2,
        sndhwm: int = 100_000,
        rcvhwm: int = 100_000,
        max_part_bytes: int = MAX_FRAME_BYTES,
        max_message_bytes: int | None = None,
        reconnect_ivl: float = 0.1,
        copy_threshold: int = zmq.COPY_THRESHOLD,
        advertise_host: str | None = None,
        curve: bool = False,
    ) -> None:
        if curve and not zmq.has("curve"):
            raise ConfigError("this libzmq was built without CURVE support")
        for name, value in (("heartbeat_ivl", heartbeat_ivl), ("heartbeat_timeout", heartbeat_timeout),
                            ("reconnect_ivl", reconnect_ivl)):
            if not value > 0:
                raise ConfigError(f"{name} must be > 0 seconds, got {value!r}")
        if linger < 0:
            raise ConfigError(f"linger must be >= 0 seconds, got {linger!r}")
        if sndhwm < 0 or rcvhwm < 0 or copy_threshold < 0:
            raise ConfigError("sndhwm/rcvhwm/copy_threshold must be >= 0")
        if max_part_bytes < 1 or (max_message_bytes is not None and max_message_bytes < 1):
            raise ConfigError("max_part_bytes and max_message_bytes must be >= 1")
        self.address = ""
        self._closed = True  # until fully built, so __del__/close on a failed __init__ are quiet
        self._linger = linger
        self._hb = (_ms_option(heartbeat_ivl), _ms_option(heartbeat_timeout), _ms_option(heartbeat_timeout))
        self._rcvhwm = rcvhwm
        # ZMQ_MAXMSGSIZE, on both sockets: no part, and no handshake command, may be larger.
        self._max_part_bytes = max_part_bytes if max_message_bytes is None else min(max_part_bytes,
                                                                                     max_message_bytes)
        self._copy_threshold = copy_threshold
        self._advertise_host = advertise_host
        self._curve: tuple[bytes, bytes] | None = zmq.curve_keypair() if curve else None
        self._gate: _Gate | None = None
        self._gate_open = False  # registered with the context's ZAP handler (bind() did it)
        self._token: bytes | None = None
        self._reconnect_ivl = reconnect_ivl
        self._retries: dict[str, float] = {}  # peer -> when to reopen its channel after a failed handshake
        self._own_context = context is None
        self._ctx = zmq.Context() if context is None else context
        self._in: zmq.Socket[Any] | None = None
        self._peers: dict[str, _Channel] = {}
        self._by_endpoint: dict[bytes, str] = {}
        self._up: set[str] = set()
        self._pending: list[DriverEvent] = []
        self._generation = itertools.count(1)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_lock = threading.RLock()  # reentrant: wakeup() may run in a signal handler during close()
        try:
            out = self._ctx.socket(zmq.ROUTER)
            self._out = out
            out.setsockopt(zmq.ROUTER_MANDATORY, 1)
            out.setsockopt(zmq.LINGER, _ms_option(linger))
            out.setsockopt(zmq.SNDHWM, sndhwm)
            out.setsockopt(zmq.MAXMSGSIZE, self._max_part_bytes)  # what the servers we dial may send us
            out.setsockopt(zmq.RECONNECT_IVL, _ms_option(reconnect_ivl))
            # Give up on a TCP connect after the heartbeat timeout and retry every reconnect_ivl, instead of
            # riding the kernel's SYN retries (1, 3, 7 s...) where a cut link silently drops them.
            out.setsockopt(zmq.CONNECT_TIMEOUT, _ms_option(heartbeat_timeout))
            self._heartbeats(out)
            out.copy_threshold = copy_threshold
            if self._curve is not None:
                out.setsockopt(zmq.CURVE_PUBLICKEY, self._curve[0])
                out.setsockopt(zmq.CURVE_SECRETKEY, self._curve[1])
            # Our own monitor PAIR rather than get_monitor_socket(): RCVHWM=0 so no up/down event is ever
            # dropped however long the owner goes without polling (libzmq drops events on a full pipe).
            endpoint = f"inproc://rallypoint-monitor-{os.getpid()}-{next(_monitor_ids)}"
            out.monitor(endpoint, _MONITOR_EVENTS)
            mon = self._ctx.socket(zmq.PAIR)
            self._mon = mon
            mon.setsockopt(zmq.RCVHWM, 0)
            mon.setsockopt(zmq.LINGER, 0)
            mon.connect(endpoint)
        except zmq.ZMQError as exc:
            self._destroy()
            raise TransportError(f"cannot create ZeroMQ sockets: {exc}") from exc
        self._poller = zmq.Poller()
        self._poller.register(self._mon, _POLLIN)
        self._poller.register(self._out, _POLLIN)
        self._poller.register(self._wake_r, _POLLIN)
        self._closed = False

    def _heartbeats(self, sock: zmq.Socket[Any]) -> None:
        ivl, timeout, ttl = self._hb
        sock.setsockopt(zmq.HEARTBEAT_IVL, ivl)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, timeout)
        # TTL tells the other side to drop us if it hears nothing for that long (libzmq: 100 ms units).
        sock.setsockopt(zmq.HEARTBEAT_TTL, min(max(ttl, 100), 6_553_500))

    def _check_open(self) -> None:
        if self._closed:
            raise ProxyClosed("the driver is closed")

    # ------------------------------------------------------------------------------- membership

    def require_token(self, token: bytes, accept: Callable[[bytes], bool]) -> None:
        """Admit only members: call before `bind()` and `connect()`.

            >>> with ZmqDriver() as a, ZmqDriver() as b:
            ...     b.require_token(b"t1", lambda credential: credential == b"t1")
            ...     a.require_token(b"t1", lambda credential: credential == b"t1")
            ...     a.connect("b", b.bind("127.0.0.1"))
            ...     a.wait_up(["b"], 5.0)
            set()

        Inbound: a connection completes its handshake only if `accept(credential)` is true, where the
        credential is the client's PLAIN password (its `token`) or, with curve=True, its CURVE public key
        (the 40 Z85 characters after "#curve=" in that member's address: CURVE clients prove their key pair,
        so an allow-list of member keys is the gate and `token` is not sent). Anything else (no credential,
        another mechanism, a garbage greeting) is refused; every refusal counts in `refused_handshakes` and
        is logged at most once per 5 s with a count. `accept` runs in the ZAP handler's thread, once per
        handshake: it must be thread-safe and quick, and must not call the driver. An exception refuses.
        Outbound: every connection presents `token` (see `set_token`). PLAIN sends the token in the clear:
        derive it from the group key (never the key itself) and use curve=True where the network can be
        read by strangers.
        """
        self._check_open()
        if self._in is not None or self._peers:
            raise ConfigError("require_token() must come before bind() and connect()")
        if self._gate is not None:
            raise ConfigError("require_token() was already called: use set_token() to change the token")
        if not callable(accept):
            raise ConfigError(f"accept must be callable, got {accept!r}")
        self.set_token(token)
        self._gate = _Gate(accept, curve=self._curve is not None)

    def set_token(self, token: bytes) -> None:
        """What new outbound connections present from now on (1..255 bytes). Channels already up keep theirs
        until they break; one that is not up, or breaks later, is reopened with the new token."""
        self._check_open()
        if not isinstance(token, bytes) or not 1 <= len(token) <= 255:
            raise ConfigError("a token is 1 to 255 bytes")
        self._token = token
        if self._curve is None:
            with _zmq_errors("cannot set the token"):
                self._out.setsockopt(zmq.PLAIN_USERNAME, _PLAIN_USER)
                self._out.setsockopt(zmq.PLAIN_PASSWORD, token)
            for peer, channel in list(self._peers.items()):
                if peer not in self._up and channel.token != token:
                    self._reopen(peer, channel)

    @property
    def refused_handshakes(self) -> int:
        """How many inbound handshakes were refused since `bind()` (0 without `require_token`)."""
        return self._gate.refused if self._gate is not None else 0

    # --------------------------------------------------------------------------------- bind/connect

    def bind(self, host: str, port: int = 0) -> str:
        """Bind the inbound socket on tcp://host:port (port 0: a free port); returns `address`."""
        self._check_open()
        if self._in is not None:
            raise ConfigError(f"already bound at {self.address}")
        if not 0 <= port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {port!r}")
        ipv6 = ":" in host.strip("[]")
        host_part = f"[{host.strip('[]')}]" if ipv6 else (host or "*")
        url = f"tcp://{host_part}:{port if port else '*'}"
        with _zmq_errors("cannot create the inbound socket"):
            sock = self._ctx.socket(zmq.ROUTER)
        try:
            self._configure_inbound(sock, url, ipv6)
            endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except BaseException:
            self._close_gate()
            sock.close(0)
            raise
        if host.strip("[]") in _WILDCARD_HOSTS:
            reach = self._advertise_host or socket.gethostname()
            endpoint = f"tcp://{reach}:{endpoint.rsplit(':', 1)[1]}"
        if self._curve is not None:
            endpoint += _CURVE_MARK + self._curve[0].decode("ascii")
        self._in = sock
        self._poller.register(sock, _POLLIN)
        self.address = endpoint
        return endpoint

    def _configure_inbound(self, sock: zmq.Socket[Any], url: str, ipv6: bool) -> None:
        with _zmq_errors(f"cannot bind {url}"):
            sock.setsockopt(zmq.LINGER, 0)  # nothing is ever sent on it
            sock.setsockopt(zmq.RCVHWM, self._rcvhwm)
            sock.setsockopt(zmq.MAXMSGSIZE, self._max_part_bytes)
            # A peer that reconnects under a routing id still attached takes it over instead of being
            # ignored. (Peers do not set ROUTING_ID, so ids are unique anyway; this is belt and braces.)
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
            if ipv6:
                sock.setsockopt(zmq.IPV6, 1)
            if self._curve is not None:
                sock.setsockopt(zmq.CURVE_SERVER, 1)
                sock.setsockopt(zmq.CURVE_SECRETKEY, self._curve[1])
            gate = self._gate
            if gate is not None:
                if self._curve is None:
                    sock.setsockopt(zmq.PLAIN_SERVER, 1)
                sock.setsockopt(zmq.ZAP_DOMAIN, gate.domain)
                gate.address = url
                sock.monitor(gate.monitor_endpoint, _INBOUND_FAILED)
                _Gatekeeper.add(self._ctx, gate)
                self._gate_open = True
            self._heartbeats(sock)
            sock.bind(url)
            if gate is not None:
                gate.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def connect(self, peer: str, address: str) -> None:
        """Open (or move) the outbound channel to `peer`; "up" follows once the ZMTP handshake completes."""
        self._check_open()
        channel = self._peers.get(peer)
        if channel is not None:
            if channel.address == address:
                return
            self._drop(peer, channel)
        # One channel per address: a peer that took over the address of another (restarted under a new
        # name on a reused port) displaces the old one, which can no longer be reached there.
        for other, ch in list(self._peers.items()):
            if ch.address == address:
                self._drop(other, ch)
                logger.info("channel to %r displaced: %r now connects to %s", other, peer, address)
                self._pending.append(DriverEvent("down", other))
        self._open(peer, address)

    def _open(self, peer: str, address: str) -> None:
        rid = f"{next(self._generation)}:{peer}".encode()
        if len(rid) > 255:
            raise ConfigError(f"peer name too long for a ZeroMQ routing id: {peer[:40]!r}...")
        endpoint, server_key = _split_curve(address)
        if (server_key is None) != (self._curve is None):
            raise ConfigError(
                f"{peer!r} at {endpoint} {'does not use' if server_key is None else 'uses'} CURVE and this "
                f"driver {'does' if server_key is None else 'does not'}: all members of a group must agree"
            )
        with _zmq_errors(f"cannot connect to {peer!r} at {endpoint}", peer):
            self._out.setsockopt(zmq.CONNECT_ROUTING_ID, rid)
            if server_key is not None:
                # Read by libzmq at connect time, so one socket can talk to many servers, each its own key.
                self._out.setsockopt(zmq.CURVE_SERVERKEY, server_key)
            self._out.connect(endpoint)
            endpoints = {endpoint.encode(), bytes(self._out.getsockopt(zmq.LAST_ENDPOINT))}
        resolved = _resolved(endpoint)
        if resolved is not None:
            endpoints.add(resolved.encode())
        self._peers[peer] = _Channel(address, rid, endpoints, self._token)
        for ep in endpoints:
            self._by_endpoint[ep] = peer

    def disconnect(self, peer: str) -> None:
        """Close the outbound channel to `peer` (unknown peers are ignored; no "down" event)."""
        if self._closed:
            return
        channel = self._peers.get(peer)
        if channel is not None:
            self._drop(peer, channel)

    def _drop(self, peer: str, channel: _Channel) -> None:
        del self._peers[peer]
        self._up.discard(peer)
        self._retries.pop(peer, None)
        for ep in channel.endpoints:
            if self._by_endpoint.get(ep) == peer:
                del self._by_endpoint[ep]
        with contextlib.suppress(zmq.ZMQError):  # ENOENT: libzmq already forgot the endpoint
            self._out.disconnect(_split_curve(channel.address)[0])

    def _reopen(self, peer: str, channel: _Channel) -> None:
        """A fresh connection for a channel that presents an old token (libzmq's own reconnects would keep
        presenting the one of the original connect())."""
        self._drop(peer, channel)
        self._open(peer, channel.address)
        self._peers[peer].log = channel.log
        self._peers[peer].failures = channel.failures

    def _retry_due(self) -> float | None:
        """Reopen the channels whose retry time has come; returns seconds until the next one (None: none).

        libzmq does not reconnect after a refused handshake (ZAP status 400, or another mechanism), so a
        channel refused while the peer did not know our token (or key) yet would stay down for good."""
        now = time.monotonic()
        nearest: float | None = None
        for peer, when in list(self._retries.items()):
            if when <= now:
                del self._retries[peer]
                channel = self._peers.get(peer)
                if channel is not None and peer not in self._up:
                    self._reopen(peer, channel)
            elif nearest is None or when - now < nearest:
                nearest = when - now
        return nearest

    # ---------------------------------------------------------------------------------- liveness

    def is_up(self, peer: str) -> bool:
        """True once the channel to `peer` completed its handshake and has not broken since."""
        if self._closed:
            return False
        self._drain_monitor()
        return peer in self._up

    def wait_up(self, peers: Iterable[str], timeout: float | None) -> set[str]:
        """Wait until every peer in `peers` is up; returns those still not up at the deadline."""
        self._check_open()
        wanted = set(peers)
        deadline = deadline_after(timeout)
        self._drain_monitor()
        while True:
            missing = wanted - self._up
            if not missing:
                return set()
            left = time_left(deadline)
            if left is not None and left <= 0:
                return missing
            self._wait_monitor(left)

    def _wait_monitor(self, seconds: float | None) -> None:
        """Block until a monitor event (or `seconds`), then fold the events into the state."""
        if self._retries:
            retry = self._retry_due()
            if retry is not None and (seconds is None or retry < seconds):
                seconds = retry
        with _zmq_errors("waiting for peer handshakes"):
            self._mon.poll(_ms(seconds))
            self._out.getsockopt(_EVENTS)  # let the outbound socket process its commands
        self._drain_monitor()

    def _drain_monitor(self) -> None:
        mon = self._mon
        try:
            while int(mon.getsockopt(_EVENTS)) & _POLLIN:
                parts = mon.recv_multipart(_NOBLOCK)
                self._on_monitor(parts)
        except zmq.Again:
            pass
        except zmq.ZMQError as exc:
            raise TransportError(f"monitor socket failed: {exc}") from exc

    def _on_monitor(self, parts: list[bytes]) -> None:
        if len(parts) < 2 or len(parts[0]) < 6:
            return
        event, value = _EVENT_HEADER.unpack_from(parts[0])
        peer = self._by_endpoint.get(parts[1])
        if peer is None:
            return  # a channel we dropped, or libzmq's own housekeeping
        if event == _HANDSHAKE_SUCCEEDED:
            self._peers[peer].failures = 0
            self._retries.pop(peer, None)
            if peer not in self._up:
                self._up.add(peer)
                self._pending.append(DriverEvent("up", peer))
        elif event == _DISCONNECTED or event & _HANDSHAKE_FAILED:
            channel = self._peers[peer]
            if event & _HANDSHAKE_FAILED:  # retried with backoff (see _retry_due): one line per 5 s at most
                channel.log.warn("handshake with %r at %s failed (zmq event %#x, value %d)",
                                 peer, parts[1].decode(errors="replace"), event, value)
                channel.failures += 1
                backoff = min(self._reconnect_ivl * 2 ** min(channel.failures - 1, 16), 2.0)
                self._retries[peer] = time.monotonic() + backoff
            if peer in self._up:
                self._up.discard(peer)
                self._pending.append(DriverEvent("down", peer))
            if channel.token != self._token:
                self._reopen(peer, channel)

    # ------------------------------------------------------------------------------------- send

    def send(self, peer: str, frames: Sequence[Any], *, timeout: float | None) -> None:
        """Queue `frames` for `peer`: PeerUnreachable if its channel is not up by the deadline, Timeout if
        its queue stays full. Frames of `copy_threshold` bytes or more are sent without a copy."""
        channel = self._peers.get(peer)
        if channel is not None and len(frames) == 1 and peer in self._up:
            # The common case, a small compact frame to a peer that is up: two backend calls, no checks
            # beyond these (a closed driver has no channels). Anything else takes the general path below.
            frame = frames[0]
            if type(frame) is bytes and len(frame) < self._copy_threshold:
                try:
                    _raw_send(self._out, channel.rid, _SNDMORE_NOBLOCK)
                except zmq.ZMQError:
                    pass  # a full queue or a broken channel: the general path waits or says which
                else:
                    try:
                        _raw_send(self._out, frame, _NOBLOCK)
                    except zmq.ZMQError:
                        with _zmq_errors(f"send to {peer!r}", peer):
                            raise
                    return
        self._check_open()
        if channel is None:
            raise PeerUnreachable(peer, f"no channel to {peer!r}: connect() it first")
        deadline = deadline_after(timeout)
        if peer not in self._up:
            self._drain_monitor()
            while peer not in self._up:
                left = time_left(deadline)
                if left is not None and left <= 0:
                    raise PeerUnreachable(
                        peer, f"peer {peer!r} at {channel.address} is not up (no handshake within {timeout}s)"
                    )
                self._wait_monitor(left)
                if self._peers.get(peer) is not channel:
                    raise PeerUnreachable(peer, f"the channel to {peer!r} was closed")
        out = self._out
        delay = 0.0001
        while True:
            try:
                # The routing-id frame is the only one that can fail with EAGAIN (ROUTER checks the
                # peer's HWM there); once it is accepted the rest of the message always is. A plain loop
                # over send() is ~2x cheaper than send_multipart(), which re-validates every part.
                out.send(channel.rid, _SNDMORE_NOBLOCK, copy=True)
            except zmq.Again as exc:  # the peer's queue is at SNDHWM: back off until the deadline
                left = time_left(deadline)
                if left is not None and left <= 0:
                    raise Timeout(
                        f"peer {peer!r}'s queue stayed full for {timeout}s", missing=[peer]
                    ) from exc
            except zmq.ZMQError:
                with _zmq_errors(f"send to {peer!r}", peer):
                    raise
            else:
                self._send_rest(frames, peer)
                return
            self._drain_monitor()
            if peer not in self._up:
                raise PeerUnreachable(peer, f"peer {peer!r} went down while its queue was full")
            time.sleep(delay if left is None else min(delay, left))
            delay = min(delay * 2, 0.005)

    def _send_rest(self, frames: Sequence[Any], peer: str) -> None:
        """The frames after the routing id. If one fails (say, it is not a buffer), end the message with an
        empty frame anyway, so that the next send does not get glued onto this half (the receiver drops
        the stub as malformed)."""
        send = self._out.send
        last = len(frames) - 1
        try:
            for i, frame in enumerate(frames):
                # copy=False: pyzmq still copies frames below copy_threshold, sends the rest zero-copy.
                send(frame, _NOBLOCK if i == last else _SNDMORE_NOBLOCK, copy=False)
            if last < 0:
                send(b"", _NOBLOCK)
        except BaseException as exc:
            with contextlib.suppress(zmq.ZMQError):
                send(b"", _NOBLOCK)
            if isinstance(exc, zmq.ZMQError):
                with _zmq_errors(f"send to {peer!r}", peer):
                    raise
            if isinstance(exc, (TypeError, ValueError, BufferError)):
                raise ConfigError(f"frames for {peer!r} must be bytes-like: {exc}") from exc
            raise

    # ------------------------------------------------------------------------------------- poll

    def poll(self, timeout: float | None) -> list[DriverEvent]:
        """Wait up to `timeout` for frames or peer events; returns them all ([] on timeout or wakeup)."""
        self._check_open()
        deadline = deadline_after(timeout)
        inbound = self._in
        while True:
            left = time_left(deadline)
            if self._retries:
                retry = self._retry_due()
                if retry is not None and (left is None or retry < left):
                    left = retry
            wait = 0 if self._pending else _ms(left)
            try:
                ready = self._poller.poll(wait)
            except zmq.ZMQError:
                with _zmq_errors("poll"):
                    raise
            woken = False
            for sock, _ in ready:
                if sock is inbound:
                    self._recv_into(self._pending)
                elif sock is self._mon:
                    self._drain_monitor()
                elif sock == self._wake_r:
                    woken = True
                    with contextlib.suppress(OSError):
                        while os.read(self._wake_r, 4096):
                            pass
                # self._out: nothing to read; polling it only let libzmq process its commands
            if self._pending or woken:
                events, self._pending = self._pending, []
                return events
            left = time_left(deadline)
            if left is not None and left <= 0:
                return []

    def _recv_into(self, events: list[DriverEvent]) -> None:
        assert self._in is not None
        sock = self._in
        recv = _raw_recv
        threshold = self._copy_threshold
        try:
            # Receive until zmq.Again: one Again per batch (~4.6 us here) is cheaper than asking EVENTS
            # before every message (~3.4 us each). Parts of a multipart message arrive together, so only
            # the routing id (the part ROUTER prepends, naming the connection) can find nothing, and it is
            # always followed by at least one part the peer sent.
            for _ in range(_RECV_BATCH):
                origin = recv(sock, _NOBLOCK)  # the routing id ROUTER gives the connection the message came on
                frames = []
                more = True
                while more:
                    part = recv(sock, _NOBLOCK, False)
                    frames.append(part.bytes if len(part) < threshold else part.buffer)
                    more = part.more
                events.append(DriverEvent("frames", None, frames, origin))
        except zmq.Again:
            return
        except zmq.ZMQError as exc:
            raise TransportError(f"receive failed: {exc}") from exc

    # -------------------------------------------------------------------------------- lifecycle

    def fds(self) -> list[int]:
        """Descriptors that turn readable when `poll(0)` may return something, for an event loop's add_reader:
        the sockets' ZMQ_FD (edge-triggered: after one fires, call `poll(0)` until it returns nothing) and the
        wake-up pipe."""
        self._check_open()
        sockets = [sock for sock in (self._in, self._mon, self._out) if sock is not None]
        return [int(sock.fileno()) for sock in sockets] + [self._wake_r]

    def wakeup(self) -> None:
        """Make a blocked `poll()` return soon. Safe from any thread and from a signal handler."""
        with self._wake_lock:
            if self._closed:
                return
            with contextlib.suppress(OSError):  # BlockingIOError: the pipe is full, poll() will wake anyway
                os.write(self._wake_w, b"\x01")

    def close(self, linger: float | None = None) -> None:
        """Close every socket, giving unsent frames at most `linger` seconds (default: the constructor's).

        Idempotent. Returns within about `linger` even with frames queued for a dead peer.
        """
        with self._wake_lock:
            if self._closed:
                return
            self._closed = True
        self._destroy(self._linger if linger is None else linger)

    def _destroy(self, linger: float = 0.0) -> None:
        ms = _ms_option(linger)
        out = getattr(self, "_out", None)
        if out is not None and not out.closed:
            with contextlib.suppress(zmq.ZMQError):
                out.disable_monitor()
        self._close_gate()
        if self._in is not None and not self._in.closed and self._gate is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._in.disable_monitor()
        for sock in (getattr(self, "_mon", None), self._in, out):
            if sock is not None and not sock.closed:
                sock.close(linger=0 if sock is not out else ms)
        if self._own_context:
            self._ctx.term()  # returns once the outbound socket's linger is over
        with self._wake_lock:
            for fd in (getattr(self, "_wake_r", -1), getattr(self, "_wake_w", -1)):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._wake_r = self._wake_w = -1
        self._peers.clear()
        self._by_endpoint.clear()
        self._up.clear()

    def _close_gate(self) -> None:
        """Unregister from the context's ZAP handler (stopping its thread if we were its last driver)."""
        if self._gate is not None and self._gate_open:
            self._gate_open = False
            _Gatekeeper.remove(self._ctx, self._gate)

    def __enter__(self) -> ZmqDriver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.address or "unbound"
        return f"<ZmqDriver {state} peers={len(self._peers)} up={len(self._up)}>"


def _resolved(address: str) -> str | None:
    """`address` with its host resolved to an IPv4 address, as libzmq reports it after a reconnect."""
    if not address.startswith("tcp://"):
        return None
    hostport = address[6:]
    host, _, port = hostport.rpartition(":")
    if not host or host.startswith("[") or host.replace(".", "").isdigit():
        return None
    try:
        return f"tcp://{socket.gethostbyname(host)}:{port}"
    except OSError:
        return None
