"""The driver interface: how a Proxy moves frames to and from peers, plus an in-process implementation.

A driver is small and byte-level: it knows peer names and addresses, multipart frames, and whether the
channel to each peer is up. It knows nothing of messages, sessions or the registry. `ZmqDriver` (in `_zmq`,
the only module that imports zmq) is the real one; `InMemoryDriver` lets the proxy be tested without sockets.

Timeouts are float seconds; `None` waits forever and `0` does not wait.

Events (from `poll`): "frames" (a multipart message a peer sent us), "up" (our channel to a peer completed
its handshake) and "down" (that channel broke: the peer closed, crashed, froze or the link was cut). "up" and
"down" are about the channels we opened with `connect()`, and are not reported for `disconnect()` or a move
to a new address, which the caller asked for.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

from rallypoint.errors import ConfigError, PeerUnreachable, ProxyClosed, Timeout, TransportError

from ._config import deadline_after, time_left

__all__ = ["Driver", "DriverEvent", "InMemoryDriver", "InMemoryNetwork"]

_RETRY = 0.05  # seconds between two handshakes of a refused channel while wait_up() waits
_origins = itertools.count(1)
_new_tuple = tuple.__new__  # builds a DriverEvent without NamedTuple's __new__ (a Python function)


class DriverEvent(NamedTuple):
    """Something `Driver.poll` saw: incoming frames, or a peer channel going up or down."""

    kind: str  # "frames" | "up" | "down"
    peer: str | None = None  # for "up"/"down"
    frames: list[Any] | None = None  # for "frames": bytes, or memoryviews for big frames
    # For "frames": which inbound connection they came on (opaque; the same for every message of one connection),
    # so that a sender's sequence can be tied to its own connection.
    origin: bytes = b""


@runtime_checkable
class Driver(Protocol):
    """Moves multipart frames between named peers. Used from one thread, except `wakeup()`.

        >>> net = InMemoryNetwork()
        >>> a, b = net.driver(), net.driver()
        >>> b_address = b.bind("127.0.0.1")
        >>> a.connect("b", b_address); a.wait_up(["b"], timeout=1.0)
        set()
        >>> a.send("b", [b"hello"], timeout=1.0)
        >>> b.poll(1.0)
        [DriverEvent(kind='frames', peer=None, frames=[b'hello'])]
    """

    address: str
    """Where peers reach us (e.g. "tcp://127.0.0.1:40123"); set by `bind()`."""

    @property
    def refused_handshakes(self) -> int:
        """Inbound connections refused because `accept` rejected their credential (see `require_token`)."""
        ...

    def require_token(self, token: bytes, accept: Callable[[bytes], bool]) -> None:
        """Admit only members (call before `bind()`/`connect()`): an inbound connection is refused at its
        handshake unless `accept(credential)` is true, before it can deliver anything; our connections
        present `token`. `accept` may run in another thread: thread-safe, quick, no driver calls."""
        ...

    def set_token(self, token: bytes) -> None:
        """What new outbound connections present from now on; a channel not up yet retries with it."""
        ...

    def bind(self, host: str, port: int = 0) -> str:
        """Start accepting frames on `host:port` (0: any free port); returns and sets `address`."""
        ...

    def connect(self, peer: str, address: str) -> None:
        """Open the outbound channel to `peer` at `address`; returns at once, "up" follows the handshake.

        Idempotent for the same address; a new address for a known peer moves the channel there.
        """
        ...

    def disconnect(self, peer: str) -> None:
        """Close the outbound channel to `peer` (no "down" event; unknown peers are ignored)."""
        ...

    def is_up(self, peer: str) -> bool:
        """True once the channel to `peer` completed its handshake and has not broken or been closed since."""
        ...

    def wait_up(self, peers: Iterable[str], timeout: float | None) -> set[str]:
        """Wait until every peer in `peers` is up; returns those still not up at the deadline."""
        ...

    def send(self, peer: str, frames: Sequence[Any], *, timeout: float | None) -> None:
        """Queue one multipart message for `peer`, waiting up to `timeout` for the channel and for room.

        Raises PeerUnreachable if the channel is not up by the deadline (never connected, or no
        handshake), Timeout if the peer's queue stays full. Big frames may be sent without a copy: do not
        modify their buffers until the driver is done with them.
        """
        ...

    def poll(self, timeout: float | None) -> list[DriverEvent]:
        """Wait up to `timeout` for anything (frames, up, down) and return all of it; [] on timeout.

        Also returns (possibly []) soon after `wakeup()`.
        """
        ...

    def wakeup(self) -> None:
        """Make a blocked (or the next) `poll()` return soon. Safe from any thread and signal handlers."""
        ...

    def close(self, linger: float = 0.2) -> None:
        """Release everything, giving unsent frames at most `linger` seconds; idempotent and prompt."""
        ...


# --------------------------------------------------------------------------------- in-memory driver


class InMemoryNetwork:
    """A switchboard for `InMemoryDriver`s in one process: addresses are "inmem://N".

        >>> net = InMemoryNetwork()
        >>> d = net.driver(); d.bind("any")
        'inmem://1'

    `kill(address)` makes that driver vanish as in a crash: peers with a channel to it get "down".
    Binding an explicit port again (`bind(host, port)`) revives the address, and channels to it come "up"
    again, like ZeroMQ reconnecting to a restarted peer.
    """

    def __init__(self, *, hwm: int = 100_000) -> None:
        self.hwm = hwm
        self._cond = threading.Condition(threading.RLock())  # reentrant: wakeup() may run in a signal handler
        self._bound: dict[str, InMemoryDriver] = {}
        self._drivers: list[InMemoryDriver] = []
        self._ports = itertools.count(1)
        # Threads waiting on `_cond` (in poll, send, wait_up): with none, a send skips notify_all(), which costs
        # more in Python than the rest of an in-memory send.
        self._sleepers = 0

    def driver(self) -> InMemoryDriver:
        """A new driver on this network (unbound until `bind()`)."""
        d = InMemoryDriver(self)
        with self._cond:
            self._drivers.append(d)
        return d

    def kill(self, address: str) -> None:
        """Crash the driver bound at `address`: it stops, and its peers see "down"."""
        with self._cond:
            d = self._bound.get(address)
        if d is not None:
            d.close(0)

    def _set_link(self, address: str, up: bool) -> None:
        """Every channel to `address` goes up or down (caller holds the lock)."""
        for d in self._drivers:
            for peer, addr in d._peers.items():
                if addr == address and (peer in d._up) != up and (not up or self._admits(d, address)):
                    (d._up.add if up else d._up.discard)(peer)
                    d._events.append(DriverEvent("up" if up else "down", peer))
                    d._signal()
        self._cond.notify_all()

    def _admits(self, client: InMemoryDriver, address: str) -> bool:
        """The handshake of `client` with the driver bound at `address` (caller holds the lock)."""
        server = self._bound[address]
        if server._accept is None:
            return True
        try:
            ok = bool(server._accept(client._token or b""))
        except Exception:
            ok = False
        if not ok:
            server.refused_handshakes += 1
            client._refused.add(address)
        return ok

    def _wait(self, predicate: Callable[[], object] | None, timeout: float | None) -> None:
        """`_cond.wait_for(predicate, timeout)` (or `wait(timeout)`), counted in `_sleepers` (caller holds the lock)."""
        self._sleepers += 1
        try:
            if predicate is None:
                self._cond.wait(timeout)
            else:
                self._cond.wait_for(predicate, timeout)
        finally:
            self._sleepers -= 1


class InMemoryDriver:
    """A `Driver` whose peers live in the same process; frames are copied, so no buffer is shared."""

    def __init__(self, network: InMemoryNetwork) -> None:
        self.address = ""
        self._net = network
        self._cond = network._cond
        self._peers: dict[str, str] = {}  # peer -> address of our channel to it
        self._up: set[str] = set()
        self._events: list[DriverEvent] = []  # swapped for a new list by poll()
        self._woken = False
        self._closed = False
        self._token: bytes | None = None
        self._accept: Callable[[bytes], bool] | None = None
        self.refused_handshakes = 0
        self._refused: set[str] = set()  # addresses that refused us: retried while waiting, like ZeroMQ
        self._origin = next(_origins).to_bytes(8, "big")  # our "connection", as receivers see it
        self._pipe: tuple[int, int] | None = None  # made by fds(), for an event loop: written on every event

    def _retry_refused(self) -> None:
        """Try the handshake again with every peer whose address refused us (caller holds the lock)."""
        addresses, self._refused = self._refused, set()
        for peer, address in self._peers.items():
            if address in addresses and peer not in self._up and address in self._net._bound \
                    and self._net._admits(self, address):
                self._up.add(peer)
                self._events.append(DriverEvent("up", peer))
                self._signal()

    def _signal(self) -> None:
        """An event is waiting: make `fds()` readable, if anyone asked for it (caller holds the lock)."""
        if self._pipe is not None:
            with contextlib.suppress(BlockingIOError):  # full: readable already
                os.write(self._pipe[1], b"\x01")

    def fds(self) -> list[int]:
        """A descriptor that turns readable whenever `poll(0)` has something, for an event loop's add_reader (made
        on the first call: a driver nobody watches this way pays nothing per event)."""
        with self._cond:
            self._check_open()
            if self._pipe is None:
                read_end, write_end = os.pipe()
                os.set_blocking(read_end, False)
                os.set_blocking(write_end, False)
                self._pipe = (read_end, write_end)
                if self._events or self._woken:
                    self._signal()
            return [self._pipe[0]]

    def _check_open(self) -> None:
        if self._closed:
            raise ProxyClosed("the driver is closed")

    def require_token(self, token: bytes, accept: Callable[[bytes], bool]) -> None:
        with self._cond:
            self._check_open()
            if self.address or self._peers:
                raise ConfigError("require_token() must come before bind() and connect()")
            if self._accept is not None:
                raise ConfigError("require_token() was already called: use set_token() to change the token")
            self.set_token(token)
            self._accept = accept

    def set_token(self, token: bytes) -> None:
        with self._cond:
            self._check_open()
            if not isinstance(token, bytes) or not 1 <= len(token) <= 255:
                raise ConfigError("a token is 1 to 255 bytes")
            self._token = token
            self._retry_refused()
            self._cond.notify_all()

    def bind(self, host: str, port: int = 0) -> str:
        with self._cond:
            self._check_open()
            if self.address:
                raise ConfigError(f"already bound at {self.address}")
            address = f"inmem://{port or next(self._net._ports)}"
            if address in self._net._bound:
                raise TransportError(f"cannot bind {address}: address in use")
            self._net._bound[address] = self
            self.address = address
            self._net._set_link(address, True)
            return address

    def connect(self, peer: str, address: str) -> None:
        with self._cond:
            self._check_open()
            if self._peers.get(peer) == address:
                return
            self._up.discard(peer)
            self._peers[peer] = address
            if address in self._net._bound and self._net._admits(self, address):
                self._up.add(peer)
                self._events.append(DriverEvent("up", peer))
                self._signal()
                self._cond.notify_all()

    def disconnect(self, peer: str) -> None:
        with self._cond:
            self._peers.pop(peer, None)
            self._up.discard(peer)

    def is_up(self, peer: str) -> bool:
        with self._cond:
            return peer in self._up

    def wait_up(self, peers: Iterable[str], timeout: float | None) -> set[str]:
        wanted = set(peers)
        with self._cond:
            deadline = deadline_after(timeout)
            while True:
                self._retry_refused()
                left = time_left(deadline)
                if self._closed or wanted <= self._up or (left is not None and left <= 0):
                    return wanted - self._up
                wait = left if not self._refused else _RETRY if left is None else min(left, _RETRY)
                self._net._wait(lambda: self._closed or wanted <= self._up, wait)

    def send(self, peer: str, frames: Sequence[Any], *, timeout: float | None) -> None:
        # bytes are immutable: only other buffers (views of the caller's memory) need a copy
        copied = [f if type(f) is bytes else bytes(f) for f in frames]
        net = self._net
        with self._cond:
            if not self._closed and peer in self._up:  # the common case: an up channel with room, no waiting
                target = net._bound.get(self._peers[peer])
                if target is not None and len(target._events) < net.hwm:
                    target._events.append(_new_tuple(DriverEvent, ("frames", None, copied, self._origin)))
                    if target._pipe is not None:
                        target._signal()
                    if net._sleepers:
                        self._cond.notify_all()
                    return
            deadline = deadline_after(timeout)
            while True:
                self._check_open()
                if peer not in self._peers:
                    raise PeerUnreachable(peer, f"no channel to {peer!r}: connect() it first")
                target = net._bound.get(self._peers[peer]) if peer in self._up else None
                if target is not None and len(target._events) < net.hwm:
                    target._events.append(DriverEvent("frames", None, copied, self._origin))
                    target._signal()
                    self._cond.notify_all()
                    return
                left = time_left(deadline)
                if left is not None and left <= 0:
                    if target is None:
                        raise PeerUnreachable(peer, f"peer {peer!r} is not up (waited {timeout}s)")
                    raise Timeout(f"peer {peer!r}'s queue stayed full for {timeout}s", missing=[peer])
                net._wait(None, left)

    def poll(self, timeout: float | None) -> list[DriverEvent]:
        with self._cond:
            self._check_open()
            if self._refused:
                self._retry_refused()
            if not self._events and not self._woken:
                self._net._wait(lambda: self._events or self._woken or self._closed, timeout)
            events = self._events
            self._events = []
            self._woken = False
            if self._pipe is not None:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._pipe[0], 4096):
                        pass
            return events

    def wakeup(self) -> None:
        with self._cond:
            self._woken = True
            self._signal()
            self._cond.notify_all()

    def close(self, linger: float = 0.2) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            if self._net._bound.get(self.address) is self:
                del self._net._bound[self.address]
                self._net._set_link(self.address, False)
            if self in self._net._drivers:
                self._net._drivers.remove(self)
            self._events.clear()
            self._peers.clear()
            self._up.clear()
            if self._pipe is not None:
                for fd in self._pipe:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                self._pipe = None
            self._cond.notify_all()

    def __enter__(self) -> InMemoryDriver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<InMemoryDriver {self.address or 'unbound'} peers={sorted(self._peers)}>"
