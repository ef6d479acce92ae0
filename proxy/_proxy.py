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

import logging
import os
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Generator, Iterable, Mapping, Sequence
from enum import Enum
from typing import Any, NamedTuple

from rallypoint.engine import Message, SessionCatalog, SessionMessage, SessionType, Spec, load_spec
from rallypoint.engine._book import Arrival, Ended, SessionBook, expects_reply
from rallypoint.errors import (
    ConfigError,
    DeliveryRefused,
    Error,
    FrameError,
    PeerGone,
    PeerUnreachable,
    ProxyClosed,
    Timeout,
    TransportError,
)

from ._admission import Admission
from ._config import UNSET, HoldPolicy, Liveness, Timeouts, deadline_after, time_left
from ._driver import Driver
from ._inbox import Inbox
from ._membership import Membership
from ._outbox import Outbox
from ._registry import PeerRecord, Registry, registry_from
from ._stats import ProxyStats
from ._wire import WireCodec

logger = logging.getLogger(__name__)

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
        max_message_bytes: int = 1 << 31,
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
        self._driver: Driver = driver if driver is not None else self._default_driver(max_message_bytes, curve)
        self._incarnation = uuid.uuid4().hex
        self._book = SessionBook(max_finished=max_buffered)
        self._inbox = Inbox(max_buffered)
        self._stop_requested = threading.Event()
        self._close_lock = threading.Lock()
        self._membership: Membership | None = None
        try:
            self._join(host, port, codec, max_message_bytes)
        except BaseException:
            self._teardown()
            raise
        self._state = ProxyState.OPEN

    # ------------------------------------------------------------------ lifecycle

    def _default_driver(self, max_message_bytes: int, curve: bool) -> Driver:
        from ._zmq import ZmqDriver  # the only zmq-touching module; imported where the default is used

        return ZmqDriver(heartbeat_ivl=self.liveness.heartbeat, heartbeat_timeout=self.liveness.heartbeat_timeout,
                         linger=self.timeouts.close, max_message_bytes=max_message_bytes, curve=curve)

    def _join(self, host: str | None, port: int, codec_name: str, max_message_bytes: int) -> None:
        deadline = deadline_after(self.timeouts.join)
        key = self._registry.group_key(self.group_name)
        self._codec = codec = WireCodec(key, codec=codec_name, max_message_bytes=max_message_bytes)
        bind_host = host if host is not None else _reachable_host(getattr(self._registry, "host", None))
        address = self._driver.bind(bind_host, port)
        self._record = PeerRecord(name=self.name, component_type=self.component_type, address=address,
                                  incarnation=self._incarnation, pid=os.getpid(), host=socket.gethostname(),
                                  started_at=time.time())
        self._membership = membership = Membership(
            name=self.name, group=self.group_name, registry=self._registry, driver=self._driver, codec=codec,
            key=key, liveness=self.liveness, stats=self.stats, listener=self,
            wanted=lambda record: record.component_type in self.expected_peers,
        )
        self._outbox = Outbox(name=self.name, incarnation=self._incarnation, codec=codec, driver=self._driver,
                              membership=membership, hold=self.hold_policy, timeouts=self.timeouts,
                              stats=self.stats, listener=self)
        membership.forget_after(self.hold_policy.max_age, self._outbox.holds_for)
        self._admission = Admission(name=self.name, incarnation=self._incarnation, codec=codec,
                                    membership=membership, dedup_window=self.hold_policy.dedup_window,
                                    stats=self.stats)
        membership.register(self._record)
        membership.wait_for(self.expected_peers, deadline, self.timeouts.join)

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
            self._state = ProxyState.CLOSED
            self._closed_once = True
        self._stop_requested.set()
        self._teardown()

    def _teardown(self) -> None:
        if self._membership is not None:
            self._membership.leave(self.timeouts.close)
        driver = getattr(self, "_driver", None)
        if driver is not None:
            driver.close(linger=self.timeouts.close)
        registry = getattr(self, "_registry", None)
        if registry is not None and self._owns_registry:
            registry.close()
        outbox: Outbox | None = getattr(self, "_outbox", None)
        held = outbox.held_count() if outbox is not None else 0
        if held:
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
        """"up" for a listed member that is live, "gone" for one declared gone (crashed, cut off, restarted or
        unlisted) and not forgotten yet, None for a name this proxy does not know."""
        membership = self._members()
        if membership.is_gone(name):
            return "gone"
        return "up" if membership.record(name) is not None else None

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

    def _members(self) -> Membership:
        if self._membership is None:
            raise ProxyClosed(f"proxy {self.name!r} never joined")
        return self._membership

    # ------------------------------------------------------------------ sending

    def isend(self, message: Message) -> list[str]:
        """Send without waiting; returns the session id(s) to collect replies with `receive_by_id`."""
        return [self._dispatch(message)]

    def send(self, message: Message, timeout: float | None | Any = UNSET) -> list[Message]:
        """Send and wait for the reply; returns the replies (none for a notification)."""
        return self.receive_by_id(self.isend(message), timeout=timeout)

    def iscatter(self, tag: Any, session_type: SessionType | str,
                 destination_payload_list: Iterable[tuple[str, Any]]) -> list[str]:
        """Send one message per (destination, payload) without waiting; returns their session ids."""
        return self._dispatch_all([
            SessionMessage(tag, self.name, destination, payload, session_type)
            for destination, payload in destination_payload_list
        ])

    def scatter(self, tag: Any, session_type: SessionType | str,
                destination_payload_list: Iterable[tuple[str, Any]], timeout: float | None | Any = UNSET
                ) -> list[Message]:
        """Send one message per (destination, payload) and wait for every reply."""
        return self.receive_by_id(self.iscatter(tag, session_type, destination_payload_list), timeout=timeout)

    def ibroadcast(self, component_type: str, tag: Any, session_type: SessionType | str, payload: Any = None
                   ) -> list[str]:
        """Send `payload` to every live peer of `component_type` without waiting; returns session ids.

        The targets are `peers[component_type]`: a peer declared gone is not live and is skipped.
        """
        self._check_open()
        self._members().absorb()
        targets = self._members().live(component_type)
        if not targets:
            raise PeerUnreachable(component_type, f"no live peer of type {component_type!r} in the group")
        messages = [SessionMessage(tag, self.name, peer, payload, session_type) for peer in targets]
        # Serialize the payload once for every target, not once per target (a parameter server broadcasting its
        # weights). A message held for a gone peer is encoded again when it goes out.
        encoded = self._codec.encode_payload(payload) if len(targets) > 1 and payload is not None else None
        return self._dispatch_all(messages, encoded)

    def broadcast(self, component_type: str, tag: Any, session_type: SessionType | str, payload: Any = None,
                  timeout: float | None | Any = UNSET) -> list[Message]:
        """Send `payload` to every live peer of `component_type` and wait for all their replies."""
        return self.receive_by_id(self.ibroadcast(component_type, tag, session_type, payload), timeout=timeout)

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

    def _dispatch(self, message: Message, encoded_payload: tuple[list[Any], int] | None = None) -> str:
        """Start (or continue) the session of a message we originate, and send it."""
        self._check_open()
        self._members().absorb()
        kind = self._catalog.require(message.session_type) if isinstance(message, SessionMessage) else None
        record = self._book.open(message, kind)
        sid = message.session_id
        try:
            sent = self._send_to_peer(message, encoded_payload)
        except BaseException as exc:
            if isinstance(exc, Error):  # never sent, so the session cannot go on: end it, the error says why
                self._book.end(sid, Ended.FAILED, event="timeout" if isinstance(exc, Timeout) else "peer_lost")
            else:
                self._book.end(sid, Ended.FAILED, event=None)
            raise
        if sent and not record.awaiting:
            self._book.sent_one_way(sid)  # nothing comes back for it: it leaves the live index
        return sid

    def _dispatch_all(self, messages: Sequence[Message], encoded_payload: tuple[list[Any], int] | None = None
                      ) -> list[str]:
        # Every message goes out (or is held) before any error is raised, so one bad peer does not keep the
        # others from getting their share; the first error is raised afterwards, naming the sessions sent.
        session_ids: list[str] = []
        first_error: TransportError | None = None
        for message in messages:
            try:
                session_ids.append(self._dispatch(message, encoded_payload))
            except (PeerUnreachable, Timeout, DeliveryRefused) as exc:
                first_error = first_error or exc
        if first_error is not None:
            first_error.session_ids = tuple(session_ids)
            raise first_error
        return session_ids

    def _send_to_peer(self, message: Message, encoded_payload: tuple[list[Any], int] | None = None) -> bool:
        if message.destination == self.name:
            raise ConfigError(f"{self.name!r} cannot send to itself")
        return self._outbox.send(message, encoded_payload)

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
            left = time_left(deadline)
            if left == 0 and polled:
                raise Timeout(f"{self.name}: no message within {limit}s")
            self._pump(left)
            polled = True

    def receive(self, timeout: float | None | Any = UNSET) -> Generator[Message, None, None]:
        """Yield incoming messages until `stop()`, or until none came for `timeout` seconds.

        A `stop()` made before the loop starts ends it at once (it is not lost); the loop consumes it.
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
                    left = time_left(deadline)
                    if (left == 0 and polled) or stopped.is_set() or self._state is not ProxyState.OPEN:
                        return
                    self._pump(left)
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
            if next_expiry is not None and any(self._ended(sid) for sid in missing):
                continue
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
            raise PeerGone(peers[0], f"{self.name}: peer(s) {peers} lost with sessions {[s for s, _ in gone]} "
                                     "pending", session_ids=[s for s, _ in gone], replies=replies)
        if refused:
            peers = sorted({peer for _, peer in refused})
            raise DeliveryRefused(peers[0], f"{self.name}: messages held for gone peer(s) {peers} expired "
                                            f"(sessions {[s for s, _ in refused]})",
                                  session_ids=[s for s, _ in refused], replies=replies)

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
                self._take_frames(event.frames or ())
            elif event.peer is not None:
                peer_events = peer_events or []
                peer_events.append(event)
        if peer_events:
            # After the batch's frames: a reply that reached us together with its sender's "down" counts.
            for event in peer_events:
                if event.kind == "down":
                    membership.channel_down(event.peer)  # type: ignore[arg-type]
                elif event.kind == "up":
                    membership.channel_up(event.peer)  # type: ignore[arg-type]
        membership.absorb()

    def _take_frames(self, frames: Sequence[Any]) -> None:
        envelope = self._admission.admit(frames)
        if envelope is None:
            return
        try:
            message = envelope.message()
        except FrameError as exc:
            self._admission.drop(exc, envelope.header.source)
            return
        self.stats.received += 1
        arrival = self._book.arrive(message, self._catalog.get)
        if arrival is not Arrival.TAKEN:
            if arrival is Arrival.LATE:
                # Its session already ended without it (its peer was declared gone first; the caller got
                # PeerGone): an outcome is decided once, so the late answer goes, logged and counted.
                self.stats.dropped_late += 1
                logger.warning("%s: dropped message %s from %r: its session %s already failed", self.name,
                               message.message_id, message.source, message.session_id)
                return
            self._note_arrival(message, arrival)
        evicted = self._inbox.put(message)
        if evicted is not None:
            # Never drop data silently: the oldest unclaimed message goes, loudly. Reaching this means nothing
            # consumes receive() while receive_by_id waits for other sessions.
            self.stats.dropped_unclaimed += 1
            logger.error("%s: %d unclaimed messages buffered; dropped the oldest (%s)", self.name,
                         self.max_buffered, evicted.message_id)

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

    def peer_gone(self, peer: str, why: str) -> None:
        """Membership: `peer` is gone. Its pending sessions fail, except those whose message is still held
        (they never reached the dead process and wait for its successor)."""
        self.stats.peers_lost += 1
        failed = self._book.end_with_peer(peer, Ended.GONE, keep=self._outbox.held_sessions(peer))
        logger.warning("%s: peer %r is gone (%s); %d pending sessions failed", self.name, peer, why, len(failed))

    def peer_back(self, peer: str) -> None:
        """Membership: `peer`'s channel is up again; it gets what was held for it."""
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
