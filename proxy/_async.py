"""AsyncProxy: the asyncio twin of `Proxy`, on the same parts and the same wire.

    async with AsyncProxy(group_name="g", component_type="master", expected_peers={"worker": 4}) as proxy:
        replies = await asyncio.gather(*(proxy.send(SessionMessage("sum", destination=w, payload=[1, 2]))
                                         for w in proxy.peers["worker"]))

How it is built: an AsyncProxy owns a `Proxy` (its core) and adds no part of its own. Joining, which blocks
on the registry and on peer handshakes, runs once in a worker thread (`asyncio.to_thread`); from then on the
core is used from the event loop's thread only. The message path runs on the loop: the driver's pollable file
descriptors (for ZeroMQ: the inbound socket, the monitor socket, the outbound socket and the wake-up pipe) are
registered with `loop.add_reader`, and each time one fires the proxy drains the driver with `poll(0)` until it
returns nothing (ZMQ_FD is edge-triggered, so a readable descriptor is never assumed to be readable again).
Received frames go through the core's admission, session book and inbox exactly as in the blocking proxy;
then every waiting request whose reply came is resolved. The lease keeper stays the core's thread: it hands
its news over through the driver's wake-up pipe, which is one of the registered descriptors.

Many requests in flight: each `send()` (or `scatter`, `broadcast`, `receive_by_id`) registers a waiter for its
session ids; any number of tasks may wait at once, each gets its own replies. Nothing waits in a thread.

Cancellation: a task cancelled while it awaits replies (`task.cancel()`, `asyncio.wait_for`, a `TaskGroup`
failing) ends those sessions on the spot: their stage moves to `failed` where the session type allows it, and
`session(sid).ended` is "cancelled". A reply that comes later is dropped and counted (`stats.dropped_late`),
as for a session whose peer was declared gone. A `timeout=` that runs out raises `Timeout` and leaves the
session waiting, as the blocking proxy does (a later call may still collect the reply).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
import warnings
from collections.abc import AsyncGenerator, Iterable, Mapping
from typing import Any

from rallypoint.engine import Message, SessionCatalog, SessionType, Spec, load_spec
from rallypoint.engine._book import Ended
from rallypoint.errors import (
    ConfigError,
    Error,
    PeerUnreachable,
    ProxyClosed,
    RegistryError,
    Timeout,
    TransportError,
)

from ._config import UNSET, HoldPolicy, Liveness, Timeouts, deadline_after, time_left
from ._driver import Driver, DriverEvent
from ._proxy import DOWN_GRACE, Proxy, SessionInfo, _expected_counts, _sooner, _validate_name
from ._registry import PeerRecord, Registry
from ._stats import ProxyStats

logger = logging.getLogger(__name__)

__all__ = ["AsyncProxy"]

_TICK = 0.1
"""Seconds between two housekeeping drains while open: reconnect retries, held messages expiring, orphans."""


class _Wait:
    """One caller waiting for one message of each of `ids` (a send, a scatter, a receive_by_id)."""

    __slots__ = ("ids", "got", "future", "timer", "limit")

    def __init__(self, ids: list[str], future: asyncio.Future[list[Message]], limit: float | None) -> None:
        self.ids = ids
        self.got: dict[str, Message] = {}
        self.future = future
        self.timer: asyncio.TimerHandle | None = None
        self.limit = limit

    def replies(self) -> list[Message]:
        return [self.got[sid] for sid in self.ids if sid in self.got]

    def missing(self) -> list[str]:
        return [sid for sid in self.ids if sid not in self.got]


class AsyncProxy:
    """The asyncio twin of `Proxy`: the same arguments, primitives, errors, `timeout=` rules and wire.

        async with AsyncProxy(group_name="master-worker", component_type="master",
                              expected_peers={"worker": 1}) as proxy:
            [worker] = proxy.peers["worker"]
            [reply] = await proxy.send(SessionMessage("rollout", destination=worker, payload=[1, 2]))

    The constructor only stores its arguments; `await proxy.join()` (or `async with`) joins the group, in a
    worker thread, under `timeouts.join`. Every call that moves messages is a coroutine: `send`, `isend`,
    `scatter`, `iscatter`, `broadcast`, `ibroadcast`, `reply`, `forward`, `receive_by_id`, `receive_once`,
    `join`, `close`, and `receive()` is an async iterator. What only reads the proxy's state is plain:
    `peers`, `peer_state`, `member`, `session`, `session_stage`, `live_sessions`, `awaiting_replies`, `held`,
    `held_sessions`, `stats`, `name`, ..., and `stop()`, which is safe from any thread or a signal handler.

    An AsyncProxy belongs to the event loop it joined on; any number of tasks on that loop may use it at once.
    """

    def __init__(
        self,
        group_name: str,
        component_type: str,
        expected_peers: Iterable[tuple[str, int]] | Mapping[str, int] | None = None,
        *,
        name: str | None = None,
        registry: str | Registry | tuple[str, int] | None = None,
        redis_address: tuple[str, int] | None = None,
        driver: Driver | None = None,
        host: str | None = None,
        port: int = 0,
        timeouts: Timeouts | None = None,
        join_timeout: float | None | Any = UNSET,
        liveness: Liveness | None = None,
        hold: HoldPolicy | None = None,
        codec: str = "pickle",
        curve: bool = False,
        catalog: SessionCatalog | None = None,
        specs: Iterable[Any] = (),
        max_buffered: int = 100_000,
        max_buffered_bytes: int | None = 1 << 30,
        max_message_bytes: int = 1 << 31,
        secret: str | bytes | None = None,
    ) -> None:
        # Checked and named now (as the core would), so mistakes fail here and `name` is known before the join.
        self.group_name = _validate_name("group_name", group_name)
        self.component_type = _validate_name("component_type", component_type)
        self.name = _validate_name("name", name or f"{component_type}_{uuid.uuid4().hex[:8]}")
        self._expected = _expected_counts(expected_peers)
        # The catalog is made here (as the core would make it) and handed to the core: `@dist` reads its named
        # rules when it decorates, before the join.
        self._catalog = catalog if catalog is not None else SessionCatalog()
        for spec in specs:
            self._catalog.add_spec(spec if isinstance(spec, Spec) else load_spec(spec))
        self._kwargs: dict[str, Any] = dict(
            group_name=group_name, component_type=component_type, expected_peers=expected_peers, name=self.name,
            registry=registry, redis_address=redis_address, driver=driver, host=host, port=port,
            timeouts=timeouts, join_timeout=join_timeout, liveness=liveness, hold=hold, codec=codec, curve=curve,
            catalog=self._catalog, max_buffered=max_buffered, max_buffered_bytes=max_buffered_bytes,
            max_message_bytes=max_message_bytes,
        )
        if secret is not None:  # passed only when given: the core takes it (or RALLYPOINT_SECRET) as Proxy does
            self._kwargs["secret"] = secret
        self._core: Proxy | None = None
        self._joining = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fds: list[int] = []
        self._tick: asyncio.TimerHandle | None = None
        self._drain_soon = False
        self._waits: dict[str, _Wait] = {}  # session id -> who waits for its message
        self._idle: list[asyncio.Future[None]] = []  # receivers and channel waits: woken after a drain
        self._peer_events: list[DriverEvent] = []  # ups and downs not applied yet (a down waits DOWN_GRACE)
        self._grace: asyncio.TimerHandle | None = None
        self._stop = threading.Event()
        self._seen = (0, 0, 0, 0)  # stats.received, peers_lost, peers_left, held_expired at the last settle

    # ------------------------------------------------------------------ lifecycle

    async def join(self) -> AsyncProxy:
        """Join the group (register, wait for `expected_peers`; `JoinTimeout` names who is missing).

        Runs the blocking join in a worker thread once; the message path then runs on this loop."""
        if self._closed:
            raise ProxyClosed(f"proxy {self.name!r} is closed")
        if self._core is not None or self._joining:
            raise ConfigError(f"proxy {self.name!r} joined already")
        self._joining = True
        loop = asyncio.get_running_loop()
        build = asyncio.ensure_future(asyncio.to_thread(lambda: Proxy(**self._kwargs)))
        try:
            core = await asyncio.shield(build)
        except asyncio.CancelledError:
            # The thread cannot be interrupted: the proxy it makes is closed (in a thread) once it exists.
            build.add_done_callback(_close_built)
            self._closed = True
            raise
        finally:
            self._joining = False
        self._core = core
        self._loop = loop
        if self._closed:  # close() ran meanwhile
            await asyncio.to_thread(core.close)
            raise ProxyClosed(f"proxy {self.name!r} was closed while it joined")
        try:
            self._fds = _pollable_fds(core._driver)
            for fd in self._fds:
                loop.add_reader(fd, self._drain)
        except BaseException:
            self._remove_readers()
            await asyncio.to_thread(core.close)
            self._closed = True
            raise
        self._tick = loop.call_later(_TICK, self._on_tick)
        self._drain()  # what arrived while the join thread handed over
        return self

    async def __aenter__(self) -> AsyncProxy:
        if self._core is None:
            await self.join()
        self._check_open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Leave the group and release sockets; idempotent, bounded by `timeouts.close`.

        Calls still waiting for replies raise `ProxyClosed`; `receive()` loops end. The blocking part of
        leaving (the driver's linger, unregistering) runs in a worker thread."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._remove_readers()
        for handle in (self._tick, self._grace):
            if handle is not None:
                handle.cancel()
        error = ProxyClosed(f"proxy {self.name!r} was closed while this call waited")
        for wait in {id(w): w for w in self._waits.values()}.values():
            self._finish(wait, error)
        self._waits.clear()
        self._wake_idle()
        core = self._core
        if core is not None:
            if self._peer_events:
                self._apply_peer_events(force=True)
            await asyncio.to_thread(core.close)

    def _remove_readers(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            for fd in self._fds:
                loop.remove_reader(fd)
        self._fds = []

    def __del__(self) -> None:
        if getattr(self, "_core", None) is not None and not getattr(self, "_closed", True):
            warnings.warn(f"unclosed AsyncProxy {self.name!r}; use `async with AsyncProxy(...)` or close()",
                          ResourceWarning, stacklevel=2)

    def stop(self) -> None:
        """Make the running (or next) `receive()` loop or `launch()` end; safe from any thread or a signal
        handler. `receive_once()` and the calls that wait for replies are bounded by their timeouts instead."""
        self._stop.set()
        core = self._core
        if core is not None:
            core.stop()  # wakes the driver: its pipe is one of our descriptors

    @property
    def closed(self) -> bool:
        return self._closed or self._core is None

    def _check_open(self) -> Proxy:
        core = self._core
        if core is None:
            raise ProxyClosed(f"proxy {self.name!r} has not joined: `await proxy.join()` or `async with`")
        if self._closed:
            raise ProxyClosed(f"proxy {self.name!r} is closed")
        return core

    def _joined(self) -> Proxy:
        if self._core is None:
            raise ProxyClosed(f"proxy {self.name!r} has not joined")
        return self._core

    # ------------------------------------------------------------------ what a proxy can tell (plain)

    @property
    def core(self) -> Proxy:
        """The blocking `Proxy` underneath (for reading its state; using it from another thread is a mistake)."""
        return self._joined()

    @property
    def expected_peers(self) -> dict[str, int]:
        return dict(self._expected)

    @property
    def timeouts(self) -> Timeouts:
        return self._joined().timeouts

    @property
    def liveness(self) -> Liveness:
        return self._joined().liveness

    @property
    def stats(self) -> ProxyStats:
        return self._joined().stats

    @property
    def address(self) -> str:
        return self._joined().address

    @property
    def incarnation(self) -> str:
        return self._joined().incarnation

    @property
    def catalog(self) -> SessionCatalog:
        """The session types (and named rules) this proxy's messages may use (known before the join)."""
        return self._catalog

    @property
    def peers(self) -> dict[str, list[str]]:
        """Live peers by component type: `{type: [names]}` (without this proxy; {} before the join)."""
        return self._core.peers if self._core is not None else {}

    def peer_state(self, name: str) -> str | None:
        return self._joined().peer_state(name)

    def member(self, name: str) -> PeerRecord | None:
        return self._joined().member(name)

    def session_stage(self, session_id: str) -> str:
        return self._joined().session_stage(session_id)

    def session(self, session_id: str) -> SessionInfo | None:
        return self._joined().session(session_id)

    @property
    def live_sessions(self) -> int:
        return self._joined().live_sessions

    def awaiting_replies(self) -> dict[str, str]:
        return self._joined().awaiting_replies()

    def held(self, peer: str | None = None) -> int:
        return self._joined().held(peer)

    def held_sessions(self) -> list[str]:
        return self._joined().held_sessions()

    @property
    def in_flight(self) -> int:
        """How many session ids calls on this proxy are awaiting right now."""
        return len(self._waits)

    async def refresh_peers(self) -> None:
        """Re-read the member list from the registry now (in a worker thread), instead of at the next refresh."""
        self._check_open()
        await self._refresh_members(quiet=False)

    # ------------------------------------------------------------------ the message path, on the loop

    def _drain(self) -> None:
        """Take everything the driver has (until `poll(0)` returns nothing), then resolve whoever waits."""
        self._drain_soon = False
        core = self._core
        if core is None or self._closed:
            return
        membership = core._members()
        driver = core._driver
        busy = False
        try:
            membership.absorb()
            while True:
                events = driver.poll(0)
                if not events:
                    break
                busy = True
                for event in events:
                    if event.kind == "frames":
                        core._take_frames(event.frames or (), event.origin)
                    elif event.peer is not None:
                        self._peer_events.append(event)
            if self._peer_events:
                self._apply_peer_events(force=False)
            membership.absorb()
        except ProxyClosed:
            return
        except Error:
            logger.exception("%s: receiving failed", self.name)
        self._settle()
        if busy and self._idle:
            self._wake_idle()  # a channel came up, say: whoever waits looks again

    def _drain_later(self) -> None:
        """A call on the driver may have read monitor events (consuming the descriptor's edge): drain soon."""
        if not self._drain_soon and self._loop is not None and not self._closed:
            self._drain_soon = True
            self._loop.call_soon(self._drain)

    def _apply_peer_events(self, *, force: bool) -> None:
        """Apply channel ups and downs in order. A down waits up to DOWN_GRACE for its peer's goodbye (its last
        frames may trail its closed connection), as the blocking proxy does, but on a timer, never blocking."""
        core = self._core
        assert core is not None
        membership = core._members()
        events = self._peer_events
        downs = {event.peer for event in events if event.kind == "down"}
        if downs and not force and any(not membership.has_left(peer) for peer in downs if peer is not None):
            if self._grace is None and self._loop is not None:
                self._grace = self._loop.call_later(DOWN_GRACE, self._grace_over)
            return
        self._peer_events = []
        for event in events:
            if event.kind == "down":
                membership.channel_down(event.peer)  # type: ignore[arg-type]
            elif event.kind == "up":
                membership.channel_up(event.peer)  # type: ignore[arg-type]

    def _grace_over(self) -> None:
        self._grace = None
        if self._closed or self._core is None:
            return
        self._drain()  # frames that came meanwhile count first (a reply that came with its sender's down)
        if self._peer_events:
            self._apply_peer_events(force=True)
            self._settle()

    def _on_tick(self) -> None:
        if self._closed or self._loop is None:
            return
        core = self._core
        assert core is not None
        self._drain()
        if core.held():
            core._outbox.expire()  # held messages past HoldPolicy.max_age: their waiters get DeliveryRefused
            self._settle()
        self._tick = self._loop.call_later(_TICK, self._on_tick)

    def _settle(self) -> None:
        """Give each waiter the messages that came for it; fail those whose sessions ended; wake receivers."""
        core = self._core
        assert core is not None
        stats = core.stats
        seen = (stats.received, stats.peers_lost, stats.peers_left, stats.held_expired)
        if seen == self._seen:
            if self._stop.is_set():
                self._wake_idle()
            return
        arrived = seen[0] != self._seen[0]
        ended = seen[1:] != self._seen[1:]
        self._seen = seen
        waits = self._waits
        if waits:
            inbox = core._inbox
            if arrived and len(inbox):
                for sid in [sid for sid in waits if inbox.has_session(sid)]:
                    wait = waits.pop(sid)
                    message = inbox.take_session(sid)
                    assert message is not None
                    wait.got[sid] = message
                    if not wait.future.done() and not wait.missing():
                        self._finish(wait, None)
            if ended:
                for wait in {id(w): w for w in waits.values()}.values():
                    self._check_ended(wait)
        self._wake_idle()

    def _check_ended(self, wait: _Wait) -> None:
        """Fail `wait` (as `receive_by_id` raises) if one of its sessions ended without its message."""
        core = self._core
        assert core is not None
        try:
            core._raise_if_ended(wait.missing(), wait.replies())
        except TransportError as exc:
            self._finish(wait, exc)

    def _finish(self, wait: _Wait, error: BaseException | None) -> None:
        for sid in wait.ids:
            if self._waits.get(sid) is wait:
                del self._waits[sid]
        if wait.timer is not None:
            wait.timer.cancel()
            wait.timer = None
        if wait.future.done():
            return
        if error is None:
            wait.future.set_result(wait.replies())
        else:
            wait.future.set_exception(error)

    def _wake_idle(self) -> None:
        idle, self._idle = self._idle, []
        for future in idle:
            if not future.done():
                future.set_result(None)

    async def _activity(self, timeout: float | None) -> None:
        """Until the next drain that brought anything (or `timeout` seconds, or close/stop)."""
        assert self._loop is not None
        future: asyncio.Future[None] = self._loop.create_future()
        self._idle.append(future)
        timer = self._loop.call_later(timeout, _set_none, future) if timeout is not None else None
        try:
            await future
        finally:
            if timer is not None:
                timer.cancel()

    # ------------------------------------------------------------------ channels and the registry, off the loop

    async def _refresh_members(self, *, quiet: bool) -> None:
        """One registry read in a worker thread, applied on the loop (the core's `refresh_now`, split)."""
        core = self._check_open()
        membership = core._members()
        try:
            read, members = await asyncio.to_thread(membership._read_members)
            try:
                key = await asyncio.to_thread(membership.registry.group_key, membership.group, create=False)
            except RegistryError as exc:
                logger.debug("%s: could not re-read the group key: %s", self.name, exc)
                key = None
        except RegistryError as exc:
            if not quiet:
                raise
            logger.warning("%s: registry unreachable while looking up a peer: %s", self.name, exc)
            return
        if self._closed:
            return
        if key is not None:
            membership.adopt_key(key)
        membership._apply_read(read, members)
        self._drain_later()

    async def _ready(self, peers: Iterable[str]) -> None:
        """Make sending to `peers` never block the loop: a peer the view lacks is looked up (in a thread), a
        listed one's channel is opened and its handshake awaited (at most `timeouts.connect`). Peers gone or
        left need nothing (a message is held for them, or refused at once)."""
        core = self._check_open()
        driver = core._driver
        todo = [peer for peer in peers if not driver.is_up(peer)]
        self._drain_later()  # is_up may have read monitor events
        if not todo:
            return
        if any(core.peer_state(peer) is None for peer in todo):
            await self._refresh_members(quiet=True)
        membership = core._members()
        waiting = []
        for peer in todo:
            if core.peer_state(peer) != "up" or peer == self.name:
                continue  # gone or left (held, or refused at the send), unknown (PeerUnreachable at the send)
            try:
                membership.ensure_channel(peer)
            except PeerUnreachable:
                continue
            waiting.append(peer)
        limit = core.timeouts.connect
        deadline = deadline_after(limit)
        while True:
            not_up = [peer for peer in waiting if not driver.is_up(peer) and core.peer_state(peer) == "up"]
            self._drain_later()
            if not not_up:
                return
            left = time_left(deadline)
            if left is not None and left <= 0:
                raise PeerUnreachable(not_up[0], f"{self.name}: peer(s) {not_up} not up (no handshake within "
                                                 f"{limit}s)")
            await self._activity(left)
            self._check_open()

    # ------------------------------------------------------------------ sending

    async def isend(self, message: Message) -> list[str]:
        """Send without waiting for replies; returns the session id(s) for `receive_by_id`. Awaits only the
        channel's handshake when it is new (at most `timeouts.connect`)."""
        await self._ready([message.destination])
        return self._check_open().isend(message)

    async def send(self, message: Message, timeout: float | None | Any = UNSET) -> list[Message]:
        """Send and wait until the session is over: returns its replies (a task: its one reply; a notification:
        none, at once; a session type of your own: every message received in it until a final state).

        Cancelled while it waits (or timed out by `asyncio.wait_for`), the session ends "cancelled" and a late
        reply is dropped (`stats.dropped_late`); `timeout=` raises `Timeout` as the blocking proxy does."""
        await self._ready([message.destination])
        core = self._check_open()
        [sid] = core.isend(message)
        record = core._book.get(sid)
        if record is None or not record.awaiting:
            return []
        if record.kind is None or record.kind.name == SessionType.TASK.value:
            return await self.receive_by_id([sid], timeout=timeout)
        return await self._collect(sid, timeout)

    async def _collect(self, session_id: str, timeout: float | None | Any) -> list[Message]:
        core = self._check_open()
        limit = core.timeouts.reply if timeout is UNSET else timeout
        deadline = deadline_after(limit)
        got: list[Message] = []
        while True:
            try:
                got += await self.receive_by_id([session_id], timeout=time_left(deadline))
            except TransportError as exc:
                exc.replies = got + exc.replies
                raise
            record = core._book.get(session_id)
            if record is None or not record.awaiting:
                return got

    async def iscatter(self, tag: Any, session_type: SessionType | str,
                       destination_payload_list: Iterable[tuple[str, Any]]) -> list[str]:
        """One message per (destination, payload) without waiting for replies; returns their session ids."""
        pairs = list(destination_payload_list)
        await self._ready({destination for destination, _ in pairs})
        return self._check_open().iscatter(tag, session_type, pairs)

    async def scatter(self, tag: Any, session_type: SessionType | str,
                      destination_payload_list: Iterable[tuple[str, Any]], timeout: float | None | Any = UNSET
                      ) -> list[Message]:
        """One message per (destination, payload), then every reply (none for a notification)."""
        return await self._replies_to(await self.iscatter(tag, session_type, destination_payload_list), timeout)

    async def ibroadcast(self, component_type: str, tag: Any, session_type: SessionType | str,
                         payload: Any = None) -> list[str]:
        """`payload` to every live peer of `component_type` without waiting for replies; returns session ids."""
        core = self._check_open()
        core._members().absorb()
        await self._ready(core.peers.get(component_type, []))
        return self._check_open().ibroadcast(component_type, tag, session_type, payload)

    async def broadcast(self, component_type: str, tag: Any, session_type: SessionType | str, payload: Any = None,
                        timeout: float | None | Any = UNSET) -> list[Message]:
        """`payload` to every live peer of `component_type`, then all their replies (none for a notification)."""
        return await self._replies_to(await self.ibroadcast(component_type, tag, session_type, payload), timeout)

    async def _replies_to(self, session_ids: list[str], timeout: float | None | Any) -> list[Message]:
        book = self._check_open()._book
        waiting = [sid for sid in session_ids if (record := book.get(sid)) is None or record.awaiting
                   or record.ended is not None]
        return await self.receive_by_id(waiting, timeout=timeout) if waiting else []

    async def reply(self, message: Message, tag: Any = None, payload: Any = None, *, event: str | None = None
                    ) -> list[str]:
        """Answer `message`: a new message in the same session, back to its source."""
        await self._ready([message.source])
        return self._check_open().reply(message, tag=tag, payload=payload, event=event)

    async def forward(self, message: Message, destination: str, tag: Any = None, payload: Any = None
                      ) -> list[str]:
        """Pass `message` on to `destination` in the same session; its reply comes back to this proxy."""
        await self._ready([destination])
        return self._check_open().forward(message, destination, tag=tag, payload=payload)

    # ------------------------------------------------------------------ receiving

    async def receive_by_id(self, session_ids: Iterable[str] | str, timeout: float | None | Any = UNSET
                            ) -> list[Message]:
        """One message of each session id, in the order of `session_ids` (others stay for `receive()`).

        Raises as the blocking proxy does: `PeerGone`, `DeliveryRefused`, `Timeout`, each with `.replies` and
        `.session_ids`. Cancelled while it waits, its sessions still waiting end "cancelled"."""
        core = self._check_open()
        ids = [session_ids] if isinstance(session_ids, str) else list(session_ids)
        limit = core.timeouts.reply if timeout is UNSET else timeout
        deadline_after(limit)  # checks the value
        book, inbox = core._book, core._inbox
        wanted = [sid for sid in ids if inbox.has_session(sid) or book.may_still_answer(sid)]
        for sid in wanted:
            if sid in self._waits:
                raise ConfigError(f"session {sid} is awaited by another call already")
        assert self._loop is not None
        wait = _Wait(ids, self._loop.create_future(), limit)
        for sid in wanted:
            message = inbox.take_session(sid)
            if message is not None:
                wait.got[sid] = message
        missing = [sid for sid in wanted if sid not in wait.got]
        if not missing:
            return wait.replies()
        core._raise_if_ended(missing, wait.replies())
        for sid in missing:
            self._waits[sid] = wait
        if limit is not None:
            wait.timer = self._loop.call_later(limit, self._time_out, wait)
        try:
            return await wait.future
        except asyncio.CancelledError:
            self._cancelled(wait)
            raise

    def _time_out(self, wait: _Wait) -> None:
        wait.timer = None
        if wait.future.done():
            return
        self._drain()  # what is already here counts
        if wait.future.done():
            return
        missing = wait.missing()
        core = self._core
        assert core is not None
        owners = sorted({record.peer for sid in missing if (record := core._book.get(sid)) is not None})
        self._finish(wait, Timeout(f"{self.name}: no reply within {wait.limit}s for sessions {missing} "
                                   f"(from {owners})", missing, replies=wait.replies(), session_ids=missing))

    def _cancelled(self, wait: _Wait) -> None:
        """The caller gave up: its sessions still waiting end "cancelled" (stage `failed` where the type has
        it), so a late reply is dropped and counted instead of piling up for nobody."""
        core = self._core
        missing = [sid for sid in wait.missing() if self._waits.get(sid) is wait]
        self._finish(wait, None)
        if core is None or self._closed:
            return
        for sid in missing:
            if core._book.end(sid, Ended.CANCELLED):
                logger.info("%s: session %s cancelled while it waited for its reply", self.name, sid)

    async def receive_once(self, timeout: float | None | Any = UNSET) -> Message:
        """The next incoming message; `Timeout` if none arrives in time (default: `timeouts.receive`)."""
        core = self._check_open()
        limit = core.timeouts.receive if timeout is UNSET else timeout
        deadline = deadline_after(limit)
        polled = False
        inbox = core._inbox
        while True:
            message = inbox.take()
            if message is not None:
                return message
            over, wake = core._check_departed()
            if over:
                raise core._left_error()
            left = time_left(deadline)
            if left == 0:
                if polled:
                    raise Timeout(f"{self.name}: no message within {limit}s")
                self._drain()
            else:
                await self._activity(_sooner(left, wake))
            polled = True
            self._check_open()

    async def receive(self, timeout: float | None | Any = UNSET) -> AsyncGenerator[Message, None]:
        """Yield incoming messages until `stop()`, `close()`, `timeout` seconds with none, or the job is over
        (every peer of an expected type left and everything they sent was yielded); `PeerGone` when every peer
        of an expected type has been gone for `Liveness.orphan_after`. As `Proxy.receive`."""
        core = self._check_open()
        idle = core.timeouts.receive if timeout is UNSET else timeout
        inbox, stopped = core._inbox, self._stop
        try:
            while not stopped.is_set() and not self._closed:
                deadline = deadline_after(idle)
                message = inbox.take()
                polled = False
                while message is None:
                    over, wake = core._check_departed()
                    if over:
                        logger.info("%s: every %s left; the job is over", self.name, core._left_types())
                        return
                    left = time_left(deadline)
                    if (left == 0 and polled) or stopped.is_set() or self._closed:
                        return
                    if left == 0:
                        self._drain()
                    else:
                        await self._activity(_sooner(left, wake))
                    polled = True
                    message = inbox.take()
                yield message
        finally:
            stopped.clear()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._core is not None else "not joined"
        return f"<AsyncProxy {self.name!r} ({self.component_type}) {state}, {len(self._waits)} awaited>"


def _set_none(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _close_built(build: asyncio.Future[Proxy]) -> None:
    if build.cancelled() or build.exception() is not None:
        return
    threading.Thread(target=build.result().close, name="rallypoint-close", daemon=True).start()


def _pollable_fds(driver: Driver) -> list[int]:
    """The descriptors that become readable when `driver.poll(0)` may have something (`driver.fds()`)."""
    fds = getattr(driver, "fds", None)
    if callable(fds):
        return [int(fd) for fd in fds()]
    raise ConfigError(f"AsyncProxy needs a driver whose poll() has file descriptors to watch (fds()); "
                      f"{type(driver).__name__} has none")

