"""The Proxy: one communication interface over a pluggable driver, with peer discovery through a registry.

The class reads as the table of contents of the library; each job lives in a part of its own:

    _membership.Membership   our lease, the member view, peers going and coming back, the group key
    _outbox.Outbox           sequence numbers, encoding, sending, messages held for gone peers
    _admission.Admission     the one place that decides whether a received frame is taken
    _inbox.Inbox             received messages not taken yet, by arrival and by session
    engine.SessionBook       one record per session: stage, peer, awaited reply, outcome

The message path stays on the caller's thread: `send`, `receive` and `launch()` drive the driver directly.
The only background thread (the lease keeper) hands news over through a queue and `driver.wakeup()`.
This module imports neither zmq nor redis: the driver and the registry are objects behind small interfaces.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import socket
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from enum import Enum
from typing import Any, NamedTuple, TypeVar

from rallypoint.engine import Message, SessionCatalog, SessionMessage, SessionType, Spec, load_spec
from rallypoint.engine._book import RAISED_ENDINGS, Arrival, Ended, SessionBook, expects_reply
from rallypoint.errors import (
    ConfigError,
    DeliveryRefused,
    Error,
    FrameError,
    JoinTimeout,
    PeerGone,
    PeerUnreachable,
    ProxyClosed,
    RegistryError,
    Timeout,
    TransportError,
)

from ._admission import Admission
from ._config import UNSET, HoldPolicy, Liveness, Timeouts, deadline_after, time_left
from ._driver import Driver, DriverEvent
from ._inbox import Inbox
from ._membership import Membership
from ._outbox import Outbox
from ._registry import PeerRecord, Registry, registry_from
from ._stats import ProxyStats
from ._trust import derive_group_key, secret_from, sign_record
from ._wire import WireCodec

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

CONTROL = "rallypoint.control"
"""The session type of the proxies' own messages (a goodbye); no spec can declare it: spec names take no dots."""
_LEAVE = "leave"
_HELLO = "hello"  # "I keep a channel to you": whom to say goodbye to, though we never wrote to them
_LEAVE_FLOOR = 0.25  # seconds close() always gives the lease keeper to stop, so a normal close unregisters
DOWN_GRACE = 0.1
"""Seconds a broken channel waits for its peer's goodbye before the peer counts as gone: a peer that closes
drops its connection to us while its last frames (the goodbye among them) may still be on the way."""
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./")


class ProxyState(Enum):
    OPEN = "open"
    CLOSED = "closed"


class SessionInfo(NamedTuple):
    """What a proxy knows of one session (`Proxy.session`).

    `stage` is None for a plain Message; `awaiting` says a reply from `peer` is still owed to this proxy;
    `ended` says why the session ended without its reply ("gone", "left", "refused", "failed", "cancelled"),
    None otherwise.
    """

    session_id: str
    stage: str | None
    peer: str
    awaiting: bool
    ended: str | None


class Proxy:
    """One endpoint of a distributed job: discovers its peers through a registry and talks to them.

        proxy = Proxy(group_name="master-worker", component_type="worker",
                      expected_peers=[("master", 1)])
        for message in proxy.receive():
            proxy.reply(message, payload=sum(message.payload))

    The constructor joins the group: it registers under `group_name` and waits (at most `timeouts.join`
    seconds) until the `expected_peers` have registered and are connected, raising `JoinTimeout` naming who
    is missing. Use it as a context manager or call `close()`.

    Faults: a peer is declared gone when our channel to it breaks (a crash at once; a frozen process or a cut
    link within `liveness.detection`), or when it leaves the registry while no live channel says otherwise.
    Its pending sessions then fail (`PeerGone` for whoever waits), and messages to it are held (`HoldPolicy`)
    until a fresh handshake brings it, or its successor under the same name, back; each goes out once. A
    receiver drops a message id it already took; an answer in a session that already failed is dropped too
    (`stats.dropped_late`), so a session's outcome is decided once.

    One thread at a time may use a proxy; `stop()` is also safe from any other thread or a signal handler.
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
        self._state = ProxyState.CLOSED  # until the join succeeds; close() is safe on a half-built proxy
        self._closed_once = False
        self.group_name = _validate_name("group_name", group_name)
        self.component_type = _validate_name("component_type", component_type)
        self.name = _validate_name("name", name or f"{component_type}_{uuid.uuid4().hex[:8]}")
        self.expected_peers = _expected_counts(expected_peers)
        timeouts = timeouts or Timeouts()
        if join_timeout is not UNSET:
            timeouts = Timeouts(**{**timeouts.__dict__, "join": join_timeout})
        self.timeouts = timeouts
        self.liveness = liveness or Liveness()
        self.hold_policy = hold or HoldPolicy()
        if max_buffered < 1:
            raise ConfigError("max_buffered must be >= 1")
        self.max_buffered = max_buffered
        self.stats = ProxyStats()
        self._catalog = catalog if catalog is not None else SessionCatalog()
        for spec in specs:  # session types (and named rules) this proxy's messages may use
            self._catalog.add_spec(spec if isinstance(spec, Spec) else load_spec(spec))
        if registry is not None and redis_address is not None:
            raise ConfigError("give registry= or redis_address=, not both")
        registry_spec = redis_address if redis_address is not None else registry
        # A registry object handed in may be shared with other proxies: only one we made is ours to close.
        self._owns_registry = registry_spec is None or isinstance(registry_spec, (str, tuple))
        self._registry: Registry = registry_from(registry_spec, timeout=timeouts.registry)
        if driver is not None and curve:
            raise ConfigError("curve=True configures the default driver; pass ZmqDriver(curve=True) instead")
        self._driver: Driver = driver if driver is not None else self._default_driver(curve)
        self._secret = secret_from(secret, os.environ)  # the trust root, when given: the registry never sees it
        self._incarnation = uuid.uuid4().hex
        self._book = SessionBook(max_finished=max_buffered)
        if max_buffered_bytes is not None and max_buffered_bytes < 1:
            raise ConfigError("max_buffered_bytes must be >= 1 or None")
        self._inbox = Inbox(max_buffered, max_buffered_bytes)
        self._stop_requested = threading.Event()
        self._close_lock = threading.Lock()
        self._membership: Membership | None = None
        self._orphans_reported: set[str] = set()  # gone peers receive() raised PeerGone for already
        self._heard_from: set[str] = set()  # peers that said hello: they keep a channel to us
        try:
            self._join(host, port, codec, max_message_bytes)
        except BaseException:
            self._teardown()
            raise
        self._state = ProxyState.OPEN
        _open_proxies.add(self)

    # ------------------------------------------------------------------ lifecycle

    def _default_driver(self, curve: bool) -> Driver:
        from ._zmq import ZmqDriver  # the only zmq-touching module; imported where the default is used

        return ZmqDriver(heartbeat_ivl=self.liveness.heartbeat, heartbeat_timeout=self.liveness.heartbeat_timeout,
                         linger=self.timeouts.close, curve=curve)  # libzmq's per-part bound: the codec sends parts

    def _join(self, host: str | None, port: int, codec_name: str, max_message_bytes: int) -> None:
        deadline = deadline_after(self.timeouts.join)
        if self._secret is not None:
            key = derive_group_key(self._secret, self.group_name)
        else:
            key = self._until_registry(lambda: self._registry.group_key(self.group_name), deadline)
        self._codec = codec = WireCodec(key, codec=codec_name, max_message_bytes=max_message_bytes)
        self._membership = membership = Membership(
            name=self.name, group=self.group_name, registry=self._registry, driver=self._driver, codec=codec,
            key=key, liveness=self.liveness, stats=self.stats, listener=self,
            wanted=lambda record: record.component_type in self.expected_peers,
            record_key=key if self._secret is not None else None,
            unreachable_after=self.timeouts.connect if self.timeouts.connect is not None else 5.0,
        )
        membership.guard()  # before bind: no connection is taken before it proved it belongs to the group
        bind_host = host if host is not None else _reachable_host(getattr(self._registry, "host", None))
        address = self._driver.bind(bind_host, port)
        record = PeerRecord(name=self.name, component_type=self.component_type, address=address,
                            incarnation=self._incarnation, pid=os.getpid(), host=socket.gethostname(),
                            started_at=time.time())
        self._record = sign_record(record, key) if self._secret is not None else record
        self._outbox = Outbox(name=self.name, incarnation=self._incarnation, codec=codec, driver=self._driver,
                              membership=membership, hold=self.hold_policy, timeouts=self.timeouts,
                              stats=self.stats, listener=self)
        membership.forget_after(self.hold_policy.max_age, self._outbox.holds_for)
        self.stats.gauges = self._gauges  # read by the lease keeper when it publishes a summary for watchers
        self._admission = Admission(name=self.name, incarnation=self._incarnation, codec=codec,
                                    membership=membership, dedup_window=self.hold_policy.dedup_window,
                                    stats=self.stats)
        self._until_registry(lambda: membership.register(self._record), deadline)
        self._wait_for_expected(deadline)

    def _until_registry(self, call: Callable[[], _T], deadline: float | None) -> _T:
        """`call()`, retried with backoff while the registry cannot be reached, until the join deadline: a
        registry started a moment after its members is waited for, as an outage is ridden out later."""
        started = time.monotonic()
        delay = 0.05
        while True:
            try:
                return call()
            except RegistryError as exc:
                left = time_left(deadline)
                if left is not None and left <= 0:
                    raise JoinTimeout(f"{self.name}: registry {self._registry!r} unreachable for "
                                      f"{time.monotonic() - started:.1f}s (join timeout {self.timeouts.join}s): "
                                      f"{exc}", self.expected_peers) from exc
                logger.info("%s: registry not reachable yet (%s); retrying", self.name, exc)
                time.sleep(delay if left is None else min(delay, left))
                delay = min(delay * 2, 1.0)

    def _wait_for_expected(self, deadline: float | None) -> None:
        """Wait until `expected_peers` have registered and completed their handshake (or came, talked to us and
        left meanwhile), taking what they send meanwhile into the inbox; JoinTimeout names who is missing."""
        membership = self._members()
        delay, next_read = 0.005, 0.0
        while True:
            if time.monotonic() >= next_read:
                # Polled fast (a cheap version read, the whole list only when it moved) until every expected peer
                # registered: the last one is noticed within 25 ms. Then, while handshakes complete, the whole
                # list at the lease keeper's pace: a member killed without close() stays listed until its lease
                # lapses, and only a read of the whole list finds that (and tells everyone).
                waiting_for_handshakes = not membership.joined(self.expected_peers)
                read = membership.refresh_now if waiting_for_handshakes else membership.refresh_if_changed
                self._until_registry(functools.partial(read, quiet=True), deadline)
                missing = membership.joined(self.expected_peers)
                next_read = time.monotonic() + (delay if missing else self.liveness.refresh)
                delay = min(delay * 2, 0.025)
            missing = membership.joined(self.expected_peers)
            not_up = [] if missing else membership.not_up(self.expected_peers)
            if not missing and not not_up:
                return
            refused = membership.refused(self.expected_peers, older_than=self.liveness.lease)
            if missing and refused:  # listed a whole lease, and not ours: another secret, not a slow joiner
                raise ConfigError(f"{self.name} in group {self.group_name!r}: the registry lists members this "
                                  f"proxy's group secret does not accept: " +
                                  "; ".join(f"{peer}: {why}" for peer, why in sorted(refused.items())))
            left = time_left(deadline)
            if left is not None and left <= 0:
                if missing:
                    parts = ", ".join(f"{n} more {t!r}" for t, n in sorted(missing.items()))
                    raise JoinTimeout(f"{self.name} ({self.component_type}) in group {self.group_name!r}: expected "
                                      f"peers not registered within {self.timeouts.join}s: missing {parts}", missing)
                by_type: dict[str, int] = {}
                for peer in not_up:
                    record = membership.record(peer)
                    kind = record.component_type if record is not None else "?"
                    by_type[kind] = by_type.get(kind, 0) + 1
                raise JoinTimeout(f"{self.name}: registered but not reachable within the join timeout: {not_up}",
                                  by_type)
            wait = max(0.0, next_read - time.monotonic())
            self._pump(wait if left is None else min(wait, left))

    def __enter__(self) -> Proxy:
        self._check_open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Leave the group and release sockets; idempotent and bounded by `timeouts.close`.

        Call it from the thread that uses the proxy (after `stop()` when that thread is in a loop).
        """
        with self._close_lock:
            if self._closed_once:
                return
            was_open = self._state is ProxyState.OPEN
            self._state = ProxyState.CLOSED
            self._closed_once = True
        self._stop_requested.set()
        deadline = time.monotonic() + self.timeouts.close
        if was_open:
            self._say_goodbye()
        self._teardown(deadline)

    def _say_goodbye(self) -> None:
        """Tell every peer we have a channel to, a session with, or that keeps a channel to us (it said hello),
        that we are leaving: after our last message to it, on the same channel, so it takes everything we sent
        before it hears we left. Those with no channel of ours yet get one, for at most half of
        `Timeouts.close`."""
        membership = self._members()
        try:
            self._pump(0)  # hellos (and anything else) that arrived since we last looked
        except Error as exc:
            logger.debug("%s: could not look at the socket before leaving: %s", self.name, exc)
        owed = ({record.peer for record in self._book.live_records()} | self._heard_from) - set(membership.up_peers())
        if any(membership.state(peer) is None for peer in owed) and not membership.registry_down:
            try:  # a peer that wrote to us before our view listed it: look it up once
                membership.refresh_now(quiet=True)
            except RegistryError:
                pass
        fresh = [peer for peer in owed if membership.state(peer) == "up"]
        for peer in fresh:
            try:
                membership.ensure_channel(peer)
            except PeerUnreachable:
                continue
        if fresh:
            self._driver.wait_up(fresh, self.timeouts.close / 2)
        farewell = {"type": self.component_type}
        for peer in membership.up_peers():
            self._outbox.say(SessionMessage(_LEAVE, self.name, peer, farewell, CONTROL))

    def _teardown(self, deadline: float | None = None) -> None:
        """Close the driver, then leave the registry, within `deadline` (default: `Timeouts.close` from now):
        what is left of it is first the driver's linger, the time queued frames get to leave."""
        if deadline is None:
            deadline = time.monotonic() + self.timeouts.close
        driver = getattr(self, "_driver", None)
        if driver is not None:  # first: our last frames and goodbyes leave (the driver returns once they did)
            driver.close(linger=max(0.0, deadline - time.monotonic()))
        if self._membership is not None:
            # The lease keeper stops at once unless it is inside a registry call; a registry that hangs is not
            # waited for (the lease expires by itself).
            self._membership.leave(max(_LEAVE_FLOOR, deadline - time.monotonic()))
        registry = getattr(self, "_registry", None)
        if registry is not None and self._owns_registry:
            registry.close()
        outbox: Outbox | None = getattr(self, "_outbox", None)
        held = outbox.held_count() if outbox is not None else 0
        if held:
            self.stats.undelivered += held
            logger.warning("%s: closed with %d held messages for gone peers undelivered", self.name, held)

    def __del__(self) -> None:
        if getattr(self, "_state", ProxyState.CLOSED) is ProxyState.OPEN:
            warnings.warn(f"unclosed Proxy {self.name!r}; use `with Proxy(...)` or close()", ResourceWarning,
                          stacklevel=2)

    def stop(self) -> None:
        """Make the running (or next) `receive()` loop or `launch()` return; safe from any thread or a signal
        handler. `receive_once()` and `receive_by_id()` are bounded by their timeouts instead."""
        self._stop_requested.set()
        driver = getattr(self, "_driver", None)
        if driver is not None:
            driver.wakeup()

    @property
    def closed(self) -> bool:
        return self._state is ProxyState.CLOSED

    def _check_open(self) -> None:
        if self._state is not ProxyState.OPEN:
            raise ProxyClosed(f"proxy {self.name!r} is closed")

    # ------------------------------------------------------------------ what a proxy can tell

    @property
    def address(self) -> str:
        """Where peers reach this proxy (the address it registered)."""
        return self._record.address

    @property
    def incarnation(self) -> str:
        """This process's run of `name`: random per proxy, so a restarted peer is told from its predecessor."""
        return self._incarnation

    @property
    def catalog(self) -> SessionCatalog:
        """The session types (and named rules) this proxy's messages may use."""
        return self._catalog

    @property
    def peers(self) -> dict[str, list[str]]:
        """Live peers by component type: `{type: [names]}` (without this proxy)."""
        return self._members().view()

    def peer_state(self, name: str) -> str | None:
        """"up" for a listed member that is live, "left" for one that said goodbye (closed normally), "gone" for
        one declared gone (crashed, cut off, restarted or unlisted), None for a name this proxy does not know
        (or forgot: `HoldPolicy.max_age` after it went)."""
        return self._members().state(name)

    def channels(self) -> list[str]:
        """The peers this proxy keeps a channel to: those of its `expected_peers` types, those it sent to, and
        gone ones it holds messages for; never one it has no business with."""
        return self._members().channels()

    def member(self, name: str) -> PeerRecord | None:
        """The registry record of member `name` as this proxy last saw it (None: not listed)."""
        return self._members().record(name)

    def refresh_peers(self) -> None:
        """Re-read the member list from the registry now, instead of at the next `Liveness.refresh`."""
        self._check_open()
        self._members().refresh_now()

    def session_stage(self, session_id: str) -> str:
        """The stage (state) of a session this proxy took part in; `UnknownSession` if it never did."""
        return self._book.stage(session_id)

    def session(self, session_id: str) -> SessionInfo | None:
        """What this proxy knows of `session_id` (None: nothing, or it finished long ago)."""
        record = self._book.get(session_id)
        if record is None:
            return None
        return SessionInfo(record.id, record.state, record.peer, record.awaiting,
                           record.ended.value if record.ended is not None else None)

    @property
    def refused_handshakes(self) -> int:
        """Connections refused at the handshake: they did not prove they belong to the group (a stranger, a
        member with another key or secret). Nothing they sent was buffered or decoded."""
        return self._driver.refused_handshakes

    @property
    def live_sessions(self) -> int:
        """How many sessions are live here: waiting for a reply, or received and not answered yet."""
        return self._book.live

    def awaiting_replies(self) -> dict[str, str]:
        """Sessions whose reply this proxy still waits for, with the peer that owes it."""
        return {record.id: record.peer for record in self._book.awaiting()}

    def held(self, peer: str | None = None) -> int:
        """How many messages are held for gone peers (for `peer`, or in all)."""
        return self._outbox.held_count(peer)

    def held_sessions(self) -> list[str]:
        """Session ids of the messages held for gone peers, oldest first per peer."""
        return [message.session_id for message in self._outbox.held_messages()]

    def _gauges(self) -> dict[str, int]:
        """What is true now, for the summary watchers read (called on the lease keeper's thread: reads only)."""
        book = self._book
        return {"sessions_live": book.live, "held_now": self._outbox.held_count(), "buffered": len(self._inbox),
                "sessions_completed": book.completed, "sessions_failed": book.failed}

    def _members(self) -> Membership:
        if self._membership is None:
            raise ProxyClosed(f"proxy {self.name!r} never joined")
        return self._membership

    # ------------------------------------------------------------------ sending

    def isend(self, message: Message) -> list[str]:
        """Send without waiting; returns the session id(s) to collect replies with `receive_by_id`."""
        return [self._dispatch(message)]

    def send(self, message: Message, timeout: float | None | Any = UNSET) -> list[Message]:
        """Send and wait until the session is over: returns its replies (a task: its one reply; a notification:
        none, at once; a session type of your own: every message received in it until it reached a final
        state)."""
        [sid] = self.isend(message)
        record = self._book.get(sid)
        if record is None or not record.awaiting:
            return []  # one-way: whatever the receiver answers comes through receive()
        if record.kind is None or record.kind.name == SessionType.TASK.value:
            return self.receive_by_id([sid], timeout=timeout)
        return self._collect(sid, timeout)

    def _collect(self, session_id: str, timeout: float | None | Any) -> list[Message]:
        """Every message of `session_id` until its record is no longer waiting for one (final or ended)."""
        limit = self.timeouts.reply if timeout is UNSET else timeout
        deadline = deadline_after(limit)
        got: list[Message] = []
        while True:
            left = time_left(deadline)
            try:
                got += self.receive_by_id([session_id], timeout=left)
            except TransportError as exc:
                exc.replies = got + exc.replies
                raise
            record = self._book.get(session_id)
            if record is None or not record.awaiting:
                return got

    def iscatter(self, tag: Any, session_type: SessionType | str,
                 destination_payload_list: Iterable[tuple[str, Any]]) -> list[str]:
        """Send one message per (destination, payload) without waiting; returns their session ids."""
        return self._scatter_messages(tag, session_type, destination_payload_list, None)

    def _scatter_messages(self, tag: Any, session_type: SessionType | str,
                          destination_payload_list: Iterable[tuple[str, Any]], deadline: float | None) -> list[str]:
        return self._dispatch_all([
            SessionMessage(tag, self.name, destination, payload, session_type)
            for destination, payload in destination_payload_list
        ], deadline=deadline)

    def scatter(self, tag: Any, session_type: SessionType | str,
                destination_payload_list: Iterable[tuple[str, Any]], timeout: float | None | Any = UNSET
                ) -> list[Message]:
        """Send one message per (destination, payload) and wait for every reply (none for a notification:
        answers to one-way messages come through `receive()`). `timeout` bounds the whole call, the handshakes
        of new channels included: unreachable peers raise PeerUnreachable (with `.replies` from the others)."""
        return self._gather(lambda deadline: self._scatter_messages(tag, session_type, destination_payload_list,
                                                                    deadline), timeout)

    def _gather(self, dispatch: Callable[[float | None], list[str]], timeout: float | None | Any) -> list[Message]:
        """Send (`dispatch`), then wait for the replies, all within one deadline. If some could not be sent, the
        replies of the others are still waited for, and the error raised then carries them."""
        limit = self.timeouts.reply if timeout is UNSET else timeout
        deadline = deadline_after(limit)
        try:
            session_ids = dispatch(deadline)
        except (PeerUnreachable, Timeout, DeliveryRefused) as exc:
            try:
                exc.replies = self._replies_to(list(exc.session_ids), time_left(deadline))
            except TransportError as later:
                exc.replies = list(later.replies)
            raise
        return self._replies_to(session_ids, time_left(deadline))

    def _replies_to(self, session_ids: list[str], timeout: float | None | Any) -> list[Message]:
        waiting = [sid for sid in session_ids if (record := self._book.get(sid)) is None or record.awaiting
                   or record.ended is not None]
        return self.receive_by_id(waiting, timeout=timeout) if waiting else []

    def ibroadcast(self, component_type: str, tag: Any, session_type: SessionType | str, payload: Any = None
                   ) -> list[str]:
        """Send `payload` to every live peer of `component_type` without waiting; returns session ids.

        The targets are `peers[component_type]`: a peer declared gone is not live and is skipped.
        """
        return self._broadcast_messages(component_type, tag, session_type, payload, None)

    def _broadcast_messages(self, component_type: str, tag: Any, session_type: SessionType | str, payload: Any,
                            deadline: float | None) -> list[str]:
        self._check_open()
        self._members().absorb()
        targets = self._members().live(component_type)
        if not targets:
            raise PeerUnreachable(component_type, f"no live peer of type {component_type!r} in the group")
        messages = [SessionMessage(tag, self.name, peer, payload, session_type) for peer in targets]
        # Serialize the payload once for every target, not once per target (a parameter server broadcasting its
        # weights). A message held for a gone peer is encoded again when it goes out.
        encoded = self._codec.encode_payload(payload) if len(targets) > 1 and payload is not None else None
        return self._dispatch_all(messages, encoded, deadline)

    def broadcast(self, component_type: str, tag: Any, session_type: SessionType | str, payload: Any = None,
                  timeout: float | None | Any = UNSET) -> list[Message]:
        """Send `payload` to every live peer of `component_type` and wait for all their replies (none for a
        notification: answers to one-way messages come through `receive()`). `timeout` bounds the whole call, as
        for `scatter`."""
        return self._gather(lambda deadline: self._broadcast_messages(component_type, tag, session_type, payload,
                                                                      deadline), timeout)

    def reply(self, message: Message, tag: Any = None, payload: Any = None, *, event: str | None = None
              ) -> list[str]:
        """Answer `message`: a new message in the same session, back to its source.

        `event` fires the user's own event on this side (IllegalTransition if the stage cannot take it) and
        travels with the answer, for the receiver to fire on its side."""
        self._check_open()
        if isinstance(message, SessionMessage):
            stage = self._book.answer(message.session_id, event)
            answer: Message = message.reply_message(self.name, tag=tag, payload=payload,
                                                    stage=stage if stage is not None else message.session_stage,
                                                    event=event)
        else:
            answer = message.reply_message(self.name, tag=tag, payload=payload)
        if self._members().has_left(answer.destination):
            self.stats.undelivered += 1
            logger.info("%s: %r left the group before this answer in session %s; not sent", self.name,
                        answer.destination, answer.session_id)
        else:
            self._send_to_peer(answer)
        return [answer.session_id]

    def forward(self, message: Message, destination: str, tag: Any = None, payload: Any = None) -> list[str]:
        """Pass `message` on to `destination` in the same session; its reply comes back to this proxy."""
        self._check_open()
        onward: Message
        if isinstance(message, SessionMessage):
            onward = SessionMessage(message.tag if tag is None else tag, self.name, destination,
                                    message.payload if payload is None else payload, message.session_type,
                                    message.session_stage, message.session_id, None, message.event)
        else:
            onward = Message(message.tag if tag is None else tag, self.name, destination,
                             message.payload if payload is None else payload, message.session_id)
        self._book.await_reply(onward.session_id, destination)
        try:
            self._send_to_peer(onward)
        except BaseException:
            self._book.end(onward.session_id, Ended.FAILED, event=None)
            raise
        return [onward.session_id]

    def _dispatch(self, message: Message, encoded_payload: tuple[list[Any], int] | None = None,
                  wait: float | None = None) -> str:
        """Start (or continue) the session of a message we originate, and send it (`wait`: see Outbox.send)."""
        self._check_open()
        self._check_source(message)
        members = self._members()
        members.absorb()
        kind = self._catalog.require(message.session_type) if isinstance(message, SessionMessage) else None
        if members.has_left(message.destination):
            if expects_reply(kind):  # whoever sends it waits for an answer that cannot come: say so now
                raise PeerUnreachable(message.destination, f"{message.destination!r} left the group (it closed)")
            # One-way, to a peer that closed (a job ending while its last notifications fly): nothing can take it
            # any more, and nothing waits on it; dropped, counted and said, as an answer to it would be.
            self._book.open(message, kind)
            self._book.sent_one_way(message.session_id)
            self.stats.undelivered += 1
            logger.info("%s: %r left the group before notification %s; not sent", self.name, message.destination,
                        message.message_id)
            return message.session_id
        record = self._book.open(message, kind)
        sid = message.session_id
        try:
            sent = self._send_to_peer(message, encoded_payload, wait)
        except BaseException as exc:
            if isinstance(exc, Error):  # never sent, so the session cannot go on: end it, the error says why
                self._book.end(sid, Ended.FAILED, event="timeout" if isinstance(exc, Timeout) else "peer_lost")
            else:
                self._book.end(sid, Ended.FAILED, event=None)
            raise
        if sent and not record.awaiting:
            self._book.sent_one_way(sid)  # nothing comes back for it: it leaves the live index
        return sid

    def _dispatch_all(self, messages: Sequence[Message], encoded_payload: tuple[list[Any], int] | None = None,
                      deadline: float | None = None) -> list[str]:
        # Every message goes out (or is held) before any error is raised, so one bad peer does not keep the
        # others from getting their share; the first error is raised afterwards, naming the sessions sent. Peers
        # whose channel is up get theirs at once; the channels still missing are opened together and each message
        # goes as soon as its handshake completes, all within `Timeouts.connect` and the call's `deadline`: N
        # unreachable peers cost one wait, not N.
        membership = self._members()
        sent: dict[str, str] = {}  # message id -> session id, to return them in the order given
        first_error: TransportError | None = None

        def dispatch(message: Message, wait: float | None) -> None:
            nonlocal first_error
            try:
                sent[message.message_id] = self._dispatch(message, encoded_payload, wait)
            except (PeerUnreachable, Timeout, DeliveryRefused) as exc:
                first_error = first_error or exc

        dialing: list[Message] = []
        for message in messages:
            peer = message.destination
            if self._driver.is_up(peer) or membership.state(peer) != "up":
                dispatch(message, None)  # up (a full queue may be waited for), or held, or unknown: it says so
            else:
                dialing.append(message)
        if dialing:
            budget = _sooner(self.timeouts.connect, time_left(deadline))
            ready_by = None if budget is None else time.monotonic() + budget
            for peer in {m.destination for m in dialing}:
                try:
                    membership.ensure_channel(peer)
                except PeerUnreachable:
                    pass  # not listed any more: its send says so
            while dialing:
                up = [m for m in dialing if self._driver.is_up(m.destination)]
                left = time_left(ready_by)
                for message in up if left is None or left > 0 else dialing:
                    dispatch(message, left if left is None else max(0.0, left))
                went = {id(m) for m in up}
                dialing = [m for m in dialing if id(m) not in went] if left is None or left > 0 else []
                if dialing:
                    self._driver.wait_up({m.destination for m in dialing}, _sooner(0.05, left))
        session_ids = [sent[m.message_id] for m in messages if m.message_id in sent]
        if first_error is not None:
            first_error.session_ids = tuple(session_ids)
            raise first_error
        return session_ids

    def _send_to_peer(self, message: Message, encoded_payload: tuple[list[Any], int] | None = None,
                      wait: float | None = None) -> bool:
        if not message.destination:
            raise ConfigError(f"message {message.message_id} names no destination")
        if message.destination == self.name:
            raise ConfigError(f"{self.name!r} cannot send to itself")
        return self._outbox.send(message, encoded_payload, wait)

    def _check_source(self, message: Message) -> None:
        """A message says who sent it: this proxy. Left out, it is filled in; another name is a mistake that
        would make the receiver drop the message as a forgery, so it fails here, at the call."""
        if not message.source:
            message.source = self.name
        elif message.source != self.name:
            raise ConfigError(f"message {message.message_id} has source {message.source!r}, but this proxy is "
                              f"{self.name!r}: leave source out (the proxy fills it in) or use proxy.name")

    # ------------------------------------------------------------------ receiving

    def receive_once(self, timeout: float | None | Any = UNSET) -> Message:
        """The next incoming message; `Timeout` if none arrives in time (default: `timeouts.receive`)."""
        self._check_open()
        limit = self.timeouts.receive if timeout is UNSET else timeout
        deadline = deadline_after(limit)
        polled = False  # timeout=0 still looks at the socket once
        while True:
            message = self._inbox.take()
            if message is not None:
                return message
            over, wake = self._check_departed()
            if over:
                raise self._left_error()
            left = time_left(deadline)
            if left == 0 and polled:
                raise Timeout(f"{self.name}: no message within {limit}s")
            self._pump(_sooner(left, wake))
            polled = True

    def receive(self, timeout: float | None | Any = UNSET) -> Generator[Message, None, None]:
        """Yield incoming messages until `stop()`, or until none came for `timeout` seconds, or until the job is
        over: every peer of an expected type left (closed normally) and everything they sent was yielded.

        Raises PeerGone when every peer of an expected type has been gone (crashed, cut off) for
        `Liveness.orphan_after` seconds. A `stop()` made before the loop starts ends it at once (it is not lost);
        the loop consumes it.
        """
        self._check_open()
        idle = self.timeouts.receive if timeout is UNSET else timeout
        inbox, stopped = self._inbox, self._stop_requested
        try:
            while not stopped.is_set() and self._state is ProxyState.OPEN:
                deadline = deadline_after(idle)
                message = inbox.take()
                polled = False
                while message is None:
                    over, wake = self._check_departed()
                    if over:
                        logger.info("%s: every %s left; the job is over", self.name, self._left_types())
                        return
                    left = time_left(deadline)
                    if (left == 0 and polled) or stopped.is_set() or self._state is not ProxyState.OPEN:
                        return
                    self._pump(_sooner(left, wake))
                    polled = True
                    message = inbox.take()
                yield message
        finally:
            stopped.clear()

    def receive_by_id(self, session_ids: Iterable[str] | str, timeout: float | None | Any = UNSET
                      ) -> list[Message]:
        """Wait for one message of each session id; returns them in the order of `session_ids`.

        Messages of other sessions that arrive meanwhile stay buffered for `receive()` (up to `max_buffered`).
        Raises `PeerGone` if a peer that owes a reply is lost, `DeliveryRefused` if a message held for a gone
        peer expired (`HoldPolicy.max_age`) before it came back, `Timeout` naming the sessions still missing at
        the deadline. All carry `.replies`, what did arrive, and `.session_ids`, the sessions the failure hit. A
        message still held at the deadline stays held (a later call may still get its reply).
        """
        self._check_open()
        ids = [session_ids] if isinstance(session_ids, str) else list(session_ids)
        limit = self.timeouts.reply if timeout is UNSET else timeout
        deadline = deadline_after(limit)
        book, inbox = self._book, self._inbox
        wanted = [sid for sid in ids if inbox.has_session(sid) or book.may_still_answer(sid)]
        got: dict[str, Message] = {}
        polled = False
        while True:
            for sid in wanted:
                if sid not in got:
                    message = inbox.take_session(sid)
                    if message is not None:
                        got[sid] = message
            missing = [sid for sid in wanted if sid not in got]
            if not missing:
                return [got[sid] for sid in ids if sid in got]
            self._raise_if_ended(missing, [got[sid] for sid in ids if sid in got])
            next_expiry = self._outbox.expire()  # held messages may expire while we wait: say so then
            if any(self._ended(sid) in RAISED_ENDINGS for sid in missing):
                continue  # one expired just now: raise for it at the top of the loop
            left = time_left(deadline)
            if left == 0 and polled:
                owners = sorted({record.peer for sid in missing if (record := book.get(sid)) is not None})
                raise Timeout(f"{self.name}: no reply within {limit}s for sessions {missing} (from {owners})",
                              missing, replies=[got[sid] for sid in ids if sid in got], session_ids=missing)
            if next_expiry is not None and (left is None or next_expiry < left):
                left = next_expiry
            self._pump(left)
            polled = True

    def _ended(self, session_id: str) -> Ended | None:
        record = self._book.get(session_id)
        return record.ended if record is not None else None

    def _raise_if_ended(self, missing: list[str], replies: list[Message]) -> None:
        """Raise for sessions that ended without their reply: PeerGone (its peer is gone or left) first, then
        DeliveryRefused (held for a gone peer too long)."""
        gone: list[tuple[str, str]] = []
        refused: list[tuple[str, str]] = []
        for sid in missing:
            record = self._book.get(sid)
            if record is None or record.ended is None:
                continue
            if record.ended in (Ended.GONE, Ended.LEFT):
                gone.append((sid, record.ended_peer))
            elif record.ended is Ended.REFUSED:
                refused.append((sid, record.ended_peer))
        if gone:
            peers = sorted({peer for _, peer in gone})
            all_left = all(self._ended(sid) is Ended.LEFT for sid, _ in gone)
            raise PeerGone(peers[0], f"{self.name}: peer(s) {peers} {'left' if all_left else 'lost'} with "
                                     f"sessions {[s for s, _ in gone]} pending", session_ids=[s for s, _ in gone],
                           replies=replies, peers=peers, left=all_left)
        if refused:
            peers = sorted({peer for _, peer in refused})
            raise DeliveryRefused(peers[0], f"{self.name}: messages held for gone peer(s) {peers} expired "
                                            f"(sessions {[s for s, _ in refused]})",
                                  session_ids=[s for s, _ in refused], replies=replies)

    def _check_departed(self) -> tuple[bool, float | None]:
        """Whether every peer of an expected type left (the job is over); raises PeerGone when every peer of one
        has been gone for `Liveness.orphan_after` (once for those peers). Also: seconds until that could be."""
        if not self.expected_peers:
            return False, None
        gone, left = self._members().departed(self.expected_peers)
        orphan_after = self.liveness.orphan_after
        wake: float | None = None
        if gone and orphan_after is not None:
            for kind, (names, since) in sorted(gone.items()):
                fresh = [peer for peer in names if peer not in self._orphans_reported]
                if not fresh:
                    continue
                if since >= orphan_after:
                    self._orphans_reported.update(names)
                    raise PeerGone(names[0], f"{self.name}: every {kind!r} is gone ({sorted(names)}) for "
                                             f"{since:.1f}s, more than Liveness.orphan_after={orphan_after}s",
                                   peers=sorted(names))
                wake = _sooner(wake, orphan_after - since)
        return bool(left), wake

    def _left_types(self) -> list[str]:
        return self._members().departed(self.expected_peers)[1]

    def _left_error(self) -> PeerGone:
        kinds = self._left_types()
        return PeerGone(kinds[0], f"{self.name}: every {kinds} left the group: no more messages will come",
                        left=True)

    def poll(self, timeout: float | None = 0.0) -> None:
        """Handle what arrives within `timeout` seconds without taking any message: received messages are
        buffered for `receive()`/`receive_by_id()`, and peers going and coming back are applied."""
        self._check_open()
        self._pump(timeout)

    def _pump(self, timeout: float | None) -> None:
        """Wait up to `timeout` for driver events and handle them (frames, peers up/down)."""
        membership = self._members()
        membership.absorb()
        peer_events = None
        for event in self._driver.poll(timeout):
            if event.kind == "frames":
                self._take_frames(event.frames or (), event.origin)
            elif event.peer is not None:
                peer_events = peer_events or []
                peer_events.append(event)
        if peer_events:
            if any(event.kind == "down" for event in peer_events):
                self._await_goodbyes(peer_events)
            # After the batch's frames: a reply that reached us together with its sender's "down" counts.
            for event in peer_events:
                if event.kind == "down":
                    membership.channel_down(event.peer)  # type: ignore[arg-type]
                elif event.kind == "up":
                    membership.channel_up(event.peer)  # type: ignore[arg-type]
        membership.absorb()

    def _await_goodbyes(self, peer_events: list[DriverEvent]) -> None:
        """A channel broke: take what arrives for up to DOWN_GRACE seconds, so that the goodbye of a peer that
        closed (its last frames may trail its closed connection) makes it "left", not "gone"."""
        membership = self._members()
        downs = {event.peer for event in peer_events if event.kind == "down"}
        deadline = time.monotonic() + DOWN_GRACE
        while any(not membership.has_left(peer) for peer in downs if peer is not None):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            for event in self._driver.poll(left):
                if event.kind == "frames":
                    self._take_frames(event.frames or (), event.origin)
                else:
                    peer_events.append(event)

    def _take_frames(self, frames: Sequence[Any], origin: bytes = b"") -> None:
        envelope = self._admission.admit(frames, origin)
        if envelope is None:
            return
        try:
            message = envelope.message()
        except FrameError as exc:
            self._admission.drop(exc, envelope.header.source)
            return
        if envelope.header.session_type == CONTROL:
            self._on_control(message, envelope.header.incarnation)
            return
        stats = self.stats
        stats.received += 1
        stats.bytes_received += envelope.nbytes
        arrival = self._book.arrive(message, self._catalog.get)
        if arrival is not Arrival.TAKEN:
            if arrival is Arrival.LATE:
                # Its session already ended without it (its peer was declared gone first; the caller got
                # PeerGone): an outcome is decided once, so the late answer goes, logged and counted.
                self.stats.dropped_late += 1
                self._admission.note_drop("late", message.source, f"message {message.message_id} from "
                                          f"{message.source!r}: its session {message.session_id} already failed")
                return
            self._note_arrival(message, arrival)
        for evicted in self._inbox.put(message, envelope.nbytes):
            # Never drop data silently: the oldest unclaimed message goes, loudly. Reaching this means nothing
            # consumes receive() while receive_by_id waits for other sessions.
            self.stats.dropped_unclaimed += 1
            self._admission.note_drop("unclaimed", evicted.source, f"the oldest unclaimed message "
                                      f"({evicted.message_id}): {len(self._inbox)} messages, {self._inbox.nbytes} "
                                      f"bytes buffered (max_buffered={self.max_buffered}, "
                                      f"max_buffered_bytes={self._inbox.byte_limit})", logging.ERROR)

    def _on_control(self, message: Message, incarnation: str) -> None:
        """A message of the proxies' own: a peer's goodbye, or its hello."""
        payload = message.payload
        if message.tag == _LEAVE and isinstance(payload, dict) and isinstance(payload.get("type"), str):
            self._members().peer_left(message.source, incarnation, payload["type"])
            self._heard_from.discard(message.source)
        elif message.tag == _HELLO:
            self._heard_from.add(message.source)
        else:
            logger.debug("%s: ignored a control message %r from %r", self.name, message.tag, message.source)

    def _note_arrival(self, message: Message, arrival: Arrival) -> None:
        if arrival is Arrival.UNKNOWN_TYPE:
            logger.warning("%s: message %s of unknown session type %r; delivered untracked", self.name,
                           message.message_id, getattr(message, "session_type_name", "?"))
        elif arrival is Arrival.ILLEGAL_EVENT:
            self.stats.illegal_events += 1
            logger.warning("%s: message %s from %r carries event %r, which session %s cannot take in stage %r; "
                           "delivered without moving the session", self.name, message.message_id, message.source,
                           getattr(message, "event", None), message.session_id,
                           self._book.get(message.session_id) and self._book.stage(message.session_id))

    # ------------------------------------------------------------------ what the parts report

    def peer_gone(self, peer: str, why: str, loud: bool) -> None:
        """Membership: `peer` is gone. Its pending sessions fail, except those whose message is still held
        (they never reached the dead process and wait for its successor)."""
        self.stats.peers_lost += 1
        self._heard_from.discard(peer)
        failed = self._book.end_with_peer(peer, Ended.GONE, keep=self._outbox.held_sessions(peer))
        warn = (loud or failed) and self._state is ProxyState.OPEN  # news while we close ourselves is no alarm
        logger.log(logging.WARNING if warn else logging.INFO, "%s: peer %r is gone (%s); %d pending sessions "
                   "failed", self.name, peer, why, len(failed))

    def peer_left(self, peer: str) -> None:
        """Membership: `peer` said goodbye after its last message. Sessions still waiting on it fail (PeerGone,
        saying it left); messages held for it stay held, for a process that comes back under its name."""
        self.stats.peers_left += 1
        failed = self._book.end_with_peer(peer, Ended.LEFT, keep=self._outbox.held_sessions(peer))
        logger.info("%s: peer %r left the group%s", self.name, peer,
                    f"; {len(failed)} sessions waiting on it failed" if failed else "")

    def peer_back(self, peer: str) -> None:
        """Membership: `peer`'s channel is up (again): we say hello (so that it says goodbye to us when it
        leaves, though it may never write to us), and it gets what was held for it."""
        self._outbox.say(SessionMessage(_HELLO, self.name, peer, None, CONTROL))
        if self._outbox.holds_for(peer):
            self._outbox.flush(peer)

    def held_expired(self, message: Message, peer: str) -> None:
        """Outbox: a message held for `peer` outlived `HoldPolicy.max_age`; whoever waits gets DeliveryRefused."""
        self._book.end(message.session_id, Ended.REFUSED, peer)

    def held_delivered(self, message: Message) -> None:
        """Outbox: a held message finally went out; a one-way one leaves the live index."""
        record = self._book.get(message.session_id)
        if record is not None and not record.awaiting and not expects_reply(record.kind):
            self._book.sent_one_way(message.session_id)


_open_proxies: weakref.WeakSet[Proxy] = weakref.WeakSet()


@atexit.register
def _close_open_proxies() -> None:
    """At interpreter exit, a proxy nobody closed still leaves properly: its peers hear it left (and take what it
    sent) instead of finding it gone. Each close is bounded by its `Timeouts.close`."""
    for proxy in list(_open_proxies):
        try:
            proxy.close()
        except Exception:  # noqa: BLE001 - exiting anyway: one proxy's failure must not skip the others
            logger.debug("closing %r at exit failed", proxy.name, exc_info=True)


def _sooner(a: float | None, b: float | None) -> float | None:
    """The shorter of two waits, where None is forever."""
    if a is None:
        return b
    return a if b is None else min(a, b)


def _validate_name(what: str, name: str) -> str:
    if not isinstance(name, str) or not name or not set(name) <= _NAME_CHARS:
        raise ConfigError(f"{what} {name!r} must be non-empty and use only letters, digits and _ - . / "
                          "(it is matched by rules such as 'worker:update:1')")
    return name


def _expected_counts(expected_peers: Any) -> dict[str, int]:
    if expected_peers is None:
        return {}
    items = expected_peers.items() if isinstance(expected_peers, Mapping) else expected_peers
    counts: dict[str, int] = {}
    try:
        for component_type, count in items:
            _validate_name("component type", component_type)
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise ConfigError(f"expected peer count for {component_type!r} must be an int >= 0")
            counts[component_type] = counts.get(component_type, 0) + count
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"expected_peers must be like [('master', 1)] or {{'master': 1}}, not {expected_peers!r}"
        ) from exc
    return counts


def _reachable_host(registry_host: str | None) -> str:
    """The local interface address the registry host is reached from (loopback for a loopback registry)."""
    if not registry_host or registry_host in ("localhost", "127.0.0.1", "::1"):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((registry_host, 9))  # UDP connect sends nothing; it only picks the route
            return str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"
