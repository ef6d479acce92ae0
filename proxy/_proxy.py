"""The Proxy: one communication interface over a pluggable driver, with peer discovery through a registry.

The message path stays on the caller's thread: `send`, `receive` and `launch()` drive the driver directly.
The only background thread (`_Membership`) renews our registry lease and re-reads the member list; it hands
changes over through a deque and `driver.wakeup()`, and never touches the driver's sockets.

This module imports neither zmq nor redis: the driver and the registry are objects behind small interfaces.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
import uuid
import warnings
from collections import OrderedDict, deque
from collections.abc import Generator, Iterable, Mapping, Sequence
from enum import Enum
from typing import Any

from rallypoint.engine import Message, SessionMessage, SessionTracker, SessionType, Spec, catalog, load_spec
from rallypoint.errors import (
    ConfigError,
    DeliveryRefused,
    Error,
    ForgedFrame,
    FrameError,
    JoinTimeout,
    PeerGone,
    PeerUnreachable,
    ProxyClosed,
    RegistryError,
    ReplayedFrame,
    Timeout,
)

from ._config import UNSET, HoldPolicy, Liveness, Timeouts, deadline_after, time_left
from ._driver import Driver
from ._registry import PeerRecord, Registry, registry_from
from ._wire import Header, ReplayGuard, WireCodec

logger = logging.getLogger(__name__)

# After adopting a new group key, how long frames signed with the old one stay accepted: long enough for
# every member to re-register and switch (one Liveness.refresh once the registry is back), while a member
# cut off from the registry for longer is refused until it can read the new key.
KEY_GRACE = 60.0

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./")


class ProxyState(Enum):
    OPEN = "open"
    CLOSED = "closed"


class ProxyStats:
    """Counters a user (or a test) can read: what was sent, received, dropped, held."""

    __slots__ = ("sent", "received", "dropped_frames", "dropped_unclaimed", "dropped_late", "duplicates", "held",
                 "held_expired", "refused", "peers_lost", "rekeyed")

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.dropped_frames = 0
        self.dropped_unclaimed = 0  # buffered messages nobody took before max_buffered was reached
        self.dropped_late = 0  # answers in sessions that had already failed (their peer was declared gone)
        self.duplicates = 0  # messages dropped because their id was already delivered here
        self.held = 0
        self.held_expired = 0
        self.refused = 0
        self.peers_lost = 0
        self.rekeyed = 0  # times this proxy adopted a group key the registry held instead of its own

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __repr__(self) -> str:
        return f"ProxyStats({self.as_dict()})"


def _validate_name(what: str, name: str) -> str:
    if not isinstance(name, str) or not name or not set(name) <= _NAME_CHARS:
        raise ConfigError(
            f"{what} {name!r} must be non-empty and use only letters, digits and _ - . / "
            "(it is matched by rules such as 'worker:update:1')"
        )
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
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(
            f"expected_peers must be like [('master', 1)] or {{'master': 1}}, not {expected_peers!r}"
        ) from exc
    return counts


def _reachable_host(record_hint: str | None) -> str:
    """The local interface address the registry host is reached from (loopback for a loopback registry)."""
    if not record_hint or record_hint in ("localhost", "127.0.0.1", "::1"):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((record_hint, 9))  # UDP connect sends nothing; it only picks the route
            return str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"


class _Membership(threading.Thread):
    """Renews our lease and notices membership changes, off the message path."""

    def __init__(self, proxy: Proxy) -> None:
        super().__init__(name=f"rallypoint-membership-{proxy.name}", daemon=True)
        self._proxy = proxy
        self._stop_event = threading.Event()
        self._registry_down = False

    @property
    def registry_down(self) -> bool:
        """True while the last registry call failed."""
        return self._registry_down

    def stop(self, timeout: float) -> None:
        self._stop_event.set()
        if self.is_alive() and self is not threading.current_thread():
            self.join(timeout)

    def run(self) -> None:
        # This thread keeps our lease alive: if it died, every peer would drop us. An unexpected error is
        # logged and the loop goes on (after a pause, so a persistent fault cannot spin).
        while not self._stop_event.is_set():
            try:
                self._loop()
            except Exception:
                if self._stop_event.is_set():
                    return  # close() released the registry under a call that outlived the join timeout
                logger.exception("%s: membership refresh failed unexpectedly; retrying", self._proxy.name)
                self._stop_event.wait(self._proxy.liveness.refresh)

    def _loop(self) -> None:
        proxy = self._proxy
        last: dict[str, PeerRecord] | None = None
        while not self._stop_event.wait(proxy.liveness.refresh):
            try:
                if not proxy._registry.refresh(proxy.group_name, proxy._record, proxy.liveness.lease):
                    # Our entry had vanished (the registry restarted or our lease lapsed): we are back in,
                    # and the group key goes back too, so members joining now share the running one.
                    held = proxy._registry.ensure_group_key(proxy.group_name, proxy._key)
                    logger.warning("%s: re-registered in group %r", proxy.name, proxy.group_name)
                    if held != proxy._key:
                        # A member joined while the registry was empty and created a new key: everyone moves
                        # to the one the registry holds (the owner thread switches; see Proxy._adopt_key).
                        logger.warning("%s: the registry holds a new key for group %r (a member joined while "
                                       "it was empty); switching to it", proxy.name, proxy.group_name)
                        proxy._pending_key = held
                        proxy._driver.wakeup()
                members = proxy._registry.members(proxy.group_name)
            except RegistryError as exc:
                if not self._registry_down:
                    logger.warning("%s: registry unreachable, keeping the last member list: %s", proxy.name, exc)
                self._registry_down = True
                continue
            if self._registry_down:
                logger.warning("%s: registry reachable again", proxy.name)
                self._registry_down = False
            if members != last:
                last = members
                proxy._membership_updates.append(members)
                proxy._driver.wakeup()


class Proxy:
    """One endpoint of a distributed job: discovers its peers through a registry and talks to them.

        proxy = Proxy(group_name="master-worker", component_type="worker",
                      expected_peers=[("master", 1)])
        for message in proxy.receive():
            proxy.reply(message, payload=sum(message.payload))

    The constructor joins the group: it registers under `group_name` and waits (at most
    `timeouts.join` seconds) until the `expected_peers` have registered and are connected, raising
    `JoinTimeout` naming who is missing. Use it as a context manager or call `close()`.

    Faults: a peer is declared gone when our channel to it breaks (a crash at once; a frozen process or a
    cut link within `liveness.detection`), or when it leaves the registry while no live channel says
    otherwise. Its pending sessions then fail (`PeerGone` for whoever waits), and messages to it are held
    (`HoldPolicy`) until a fresh handshake brings it, or its successor under the same name, back; each
    goes out once. A receiver drops a message id it already took; an answer in a session that already
    failed is dropped too (`stats.dropped_late`), so a session's outcome is decided once.

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
        specs: Iterable[Any] = (),
        max_buffered: int = 100_000,
        max_message_bytes: int = 1 << 31,
    ) -> None:
        self._state = ProxyState.CLOSED  # until the join succeeds; close() is safe on a half-built proxy
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
        for spec in specs:  # session types (and named rules) this proxy's messages may use
            if isinstance(spec, Spec):
                catalog.add_spec(spec, replace=False)
            else:
                load_spec(spec)

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
        self._seq = 0
        self._shared_payload: tuple[Any, tuple[list[Any], int]] | None = None  # see ibroadcast
        self._tracker = SessionTracker()
        self._replay = ReplayGuard()
        # Incoming messages nobody has taken yet, by message id, plus an index by session for receive_by_id.
        self._inbox: OrderedDict[str, Message] = OrderedDict()
        self._inbox_by_session: dict[str, list[str]] = {}
        # Sessions we started and whose reply we still expect, with the peer that owes it.
        self._awaiting: dict[str, str] = {}
        # Sessions that failed because their peer was lost: session id -> peer (bounded).
        self._failed: OrderedDict[str, str] = OrderedDict()
        # Sessions whose held message expired before its peer came back: session id -> peer (bounded).
        self._refused: OrderedDict[str, str] = OrderedDict()
        self._members: dict[str, PeerRecord] = {}
        self._gone: dict[str, float] = {}  # peers declared gone, by when (monotonic; see _forget_long_gone)
        self._connected: set[str] = set()
        # Peers whose channel we saw come up and not go down since: a send that finds one of them not up
        # knows the channel broke (its "down" is still queued in the driver) rather than never opened.
        self._up_seen: set[str] = set()
        self._held: dict[str, deque[tuple[float, str, Message]]] = {}
        # Ids of recently delivered messages, to drop a second copy: a set for O(1) lookup, a deque for
        # the order they leave in (bounded by hold_policy.dedup_window).
        self._seen_ids: set[str] = set()
        self._seen_order: deque[str] = deque()
        self._membership_updates: deque[dict[str, PeerRecord]] = deque()
        self._stop_requested = threading.Event()
        self._close_lock = threading.Lock()
        self._membership: _Membership | None = None
        # Registry reads that frames prompted, by what prompted them and when: see _worth_reading_registry
        self._prompted_reads: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._pending_key: bytes | None = None  # a new group key the membership thread found, to adopt
        try:
            self._join(host, port, codec, max_message_bytes)
        except BaseException:
            self._teardown()
            raise
        self._state = ProxyState.OPEN

    # ------------------------------------------------------------------ lifecycle

    def _default_driver(self, max_message_bytes: int, curve: bool) -> Driver:
        from ._zmq import ZmqDriver  # the only zmq-touching module; imported where the default is used

        return ZmqDriver(
            heartbeat_ivl=self.liveness.heartbeat,
            heartbeat_timeout=self.liveness.heartbeat_timeout,
            linger=self.timeouts.close,
            max_message_bytes=max_message_bytes,
            curve=curve,
        )

    def _join(self, host: str | None, port: int, codec: str, max_message_bytes: int) -> None:
        deadline = deadline_after(self.timeouts.join)
        self._key = self._registry.group_key(self.group_name)
        self._codec = WireCodec(self._key, codec=codec, max_message_bytes=max_message_bytes)
        bind_host = host if host is not None else _reachable_host(getattr(self._registry, "host", None))
        address = self._driver.bind(bind_host, port)
        self._record = PeerRecord(
            name=self.name,
            component_type=self.component_type,
            address=address,
            incarnation=self._incarnation,
            pid=os.getpid(),
            host=socket.gethostname(),
            started_at=time.time(),
        )
        self._registry.register(self.group_name, self._record, self.liveness.lease)
        self._wait_for_expected(deadline)
        self._membership = _Membership(self)
        self._membership.start()

    def _wait_for_expected(self, deadline: float | None) -> None:
        delay = 0.005
        while True:
            members = self._registry.members(self.group_name)
            self._apply_members(members)
            missing = self._missing_expected()
            left = time_left(deadline)
            if not missing:
                # Registered is not reachable: wait for the connection handshakes too, so a first broadcast
                # counts every expected peer (no slow-joiner loss, no sleep). The list is re-read every
                # `refresh`: a peer killed without close() stays listed until its lease lapses, and must
                # not make the join fail.
                targets = [n for n, r in self._members.items() if r.component_type in self.expected_peers]
                wait = self.liveness.refresh if left is None else min(left, self.liveness.refresh)
                not_up = self._driver.wait_up(targets, wait)
                if not not_up:
                    self._up_seen.update(targets)
                    return
                if time_left(deadline) == 0:
                    by_type: dict[str, int] = {}
                    for peer in not_up:
                        t = self._members[peer].component_type
                        by_type[t] = by_type.get(t, 0) + 1
                    raise JoinTimeout(
                        f"{self.name}: registered but not reachable within the join timeout: {sorted(not_up)}",
                        by_type,
                    )
                continue
            if left is not None and left <= 0:
                raise JoinTimeout(self._missing_text(missing, "registered"), missing)
            time.sleep(delay if left is None else min(delay, left))
            # Capped low: the last peer to register is noticed within 25 ms (a read costs Redis ~0.1 ms),
            # which is most of what a group start waits once every process is up.
            delay = min(delay * 2, 0.025)

    def _missing_expected(self) -> dict[str, int]:
        have: dict[str, int] = {}
        for record in self._members.values():
            have[record.component_type] = have.get(record.component_type, 0) + 1
        return {t: n - have.get(t, 0) for t, n in self.expected_peers.items() if have.get(t, 0) < n}

    def _missing_text(self, missing: Mapping[str, int], what: str) -> str:
        parts = ", ".join(f"{n} more {t!r}" for t, n in sorted(missing.items()))
        return (
            f"{self.name} ({self.component_type}) in group {self.group_name!r}: expected peers not {what} "
            f"within {self.timeouts.join}s: missing {parts}"
        )

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
            if self._state is ProxyState.CLOSED and getattr(self, "_closed_once", False):
                return
            self._state = ProxyState.CLOSED
            self._closed_once = True
        self._stop_requested.set()
        self._teardown()

    def _teardown(self) -> None:
        membership = self._membership
        if membership is not None:
            membership.stop(self.timeouts.close)
        record = getattr(self, "_record", None)
        if record is not None and membership is not None and (membership.is_alive() or membership.registry_down):
            # The registry is down, or hangs in a call that outlived the join: waiting on it again would
            # make close() as slow as its timeouts, and our lease expires by itself anyway.
            logger.warning("%s: registry unavailable; not unregistering (the lease will expire)", self.name)
        elif record is not None:
            try:
                self._registry.unregister(self.group_name, self.name)
            except RegistryError as exc:
                logger.warning("%s: could not unregister (the lease will expire): %s", self.name, exc)
        driver = getattr(self, "_driver", None)
        if driver is not None:
            driver.close(linger=self.timeouts.close)
        registry = getattr(self, "_registry", None)
        if registry is not None and getattr(self, "_owns_registry", False):
            registry.close()
        held = sum(len(q) for q in getattr(self, "_held", {}).values())
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

    # ------------------------------------------------------------------ membership

    @property
    def peers(self) -> dict[str, list[str]]:
        """Live peers by component type: `{type: [names]}` (without this proxy)."""
        view: dict[str, list[str]] = {}
        for peer, record in self._members.items():
            if peer not in self._gone:
                view.setdefault(record.component_type, []).append(peer)
        for names in view.values():
            names.sort()
        return view

    @property
    def incarnation(self) -> str:
        return self._incarnation

    def session_stage(self, session_id: str) -> str:
        """The stage (state) of a session this proxy took part in; `UnknownSession` if it never did."""
        return self._tracker.stage(session_id)

    def held(self, peer: str | None = None) -> int:
        """How many messages are held for gone peers (for `peer`, or in all)."""
        if peer is not None:
            return len(self._held.get(peer, ()))
        return sum(len(q) for q in self._held.values())

    def _apply_members(self, members: dict[str, PeerRecord]) -> None:
        """Bring our view and connections in line with the registry's member list (message-path thread)."""
        members = {n: r for n, r in members.items() if n != self.name}
        old = self._members
        for peer in old.keys() - members.keys():
            if peer in self._up_seen and peer not in self._gone and self._driver.is_up(peer):
                # Unlisted, but our channel to it is alive: its lease lapsed (the registry restarted, or the
                # peer cannot reach it), the peer did not die. Keep it; heartbeats say if it does.
                members[peer] = old[peer]
        self._members = members
        for peer, record in members.items():
            previous = old.get(peer)
            if previous is not None and previous.incarnation != record.incarnation:
                # Restarted under the same name: what was pending with the old process failed, and the
                # channel is rebuilt even at the same address, so nothing queued for the old process (or
                # held since) reaches the new one except through the "up" of a fresh handshake.
                self._declare_gone(peer, "restarted as a new process")
                if peer in self._connected:
                    self._up_seen.discard(peer)
                    self._driver.disconnect(peer)
                    self._driver.connect(peer, record.address)
            elif peer in self._connected:
                if previous is None or previous.address != record.address:
                    self._up_seen.discard(peer)
                    self._driver.connect(peer, record.address)
            elif record.component_type in self.expected_peers or peer in self._held or peer in self._gone:
                # A gone peer listed again gets a channel: its handshake ("up") is what brings it back.
                self._connect(peer)
        for peer in old.keys() - members.keys():
            self._declare_gone(peer, "left the registry (lease expired or unregistered)")
            if peer in self._connected:
                self._up_seen.discard(peer)
                self._driver.disconnect(peer)
                self._connected.discard(peer)
        self._forget_long_gone()

    def _forget_long_gone(self) -> None:
        """Forget peers that left more than `HoldPolicy.max_age` ago, are not listed and have nothing held.

        Nothing would be held for them any more (it would expire at once), and keeping every name that ever
        left would grow without bound in a job whose workers come and go under new names. Sending to one
        of them afterwards fails at once with PeerUnreachable, as for any name the registry does not list.
        """
        if not self._gone:
            return
        cutoff = time.monotonic() - self.hold_policy.max_age
        for peer in [p for p, since in self._gone.items()
                     if since < cutoff and p not in self._members and p not in self._held]:
            del self._gone[peer]

    def _connect(self, peer: str) -> None:
        record = self._members.get(peer)
        if record is None:
            raise PeerUnreachable(peer, f"{peer!r} is not a registered member of group {self.group_name!r}")
        self._driver.connect(peer, record.address)
        self._connected.add(peer)

    def _refresh_members_now(self) -> None:
        try:
            members = self._registry.members(self.group_name)
        except RegistryError as exc:
            logger.warning("%s: registry unreachable while looking up a peer: %s", self.name, exc)
            return
        try:
            # A member we learn of here may hold a key created after the registry lost ours: switch
            # first, so that what we send it is signed with the key it knows.
            self._adopt_key(self._registry.group_key(self.group_name, create=False))
        except RegistryError as exc:  # no key there (not restored yet) or unreachable: keep ours
            logger.debug("%s: could not re-read the group key: %s", self.name, exc)
        self._apply_members(members)

    def _adopt_key(self, key: bytes) -> bool:
        """Sign with `key`, the group key the registry holds, if it is not ours; say whether it was new.

        The registry holds a key other than ours only after it lost its data (a restart without
        persistence) and a member joined before we re-registered: that member created a fresh key and
        knows no other. The registry is where members get the key from, so everyone moves to the one it
        holds; frames signed with ours stay accepted for KEY_GRACE seconds, so none in flight are lost.
        """
        if key == self._key:
            return False
        self._codec.rekey(key, grace=KEY_GRACE)
        self._key = key
        self.stats.rekeyed += 1
        logger.warning("%s: now signing with the group key the registry holds for %r (it had lost the one this "
                       "proxy started with); frames signed with the old key are accepted for %.0fs more",
                       self.name, self.group_name, KEY_GRACE)
        return True

    def _key_replaced(self) -> bool:
        """After a frame failed its MAC: whether the registry now holds another group key (then adopted).
        A stream of forged frames costs one registry read a second (see _worth_reading_registry)."""
        if not self._worth_reading_registry(("", "group key")):
            return False
        try:
            return self._adopt_key(self._registry.group_key(self.group_name, create=False))
        except RegistryError as exc:
            logger.debug("%s: could not re-read the group key: %s", self.name, exc)
            return False

    def _declare_gone(self, peer: str, why: str) -> None:
        """Fail every session pending with `peer`; messages to it are held from now until it is back."""
        if peer in self._gone:
            return
        self._gone[peer] = time.monotonic()
        self.stats.peers_lost += 1
        # Messages still held for it never reached the dead process: they stay pending, for its successor.
        held = {m.session_id for _, _, m in self._held.get(peer, ())}
        failed = [sid for sid, owner in self._awaiting.items() if owner == peer and sid not in held]
        for sid in failed:
            del self._awaiting[sid]
            self._failed[sid] = peer
        while len(self._failed) > self.max_buffered:
            self._failed.popitem(last=False)
        for session in self._tracker.pending_with(peer):
            if session.id not in held:
                self._tracker.try_fire(session.id, "peer_lost")
        logger.warning("%s: peer %r is gone (%s); %d pending sessions failed", self.name, peer, why, len(failed))

    def _peer_down(self, peer: str | None, why: str = "connection lost") -> None:
        """Our channel to `peer` broke (driver "down")."""
        self._up_seen.discard(peer)
        if peer in self._members and peer not in self._gone:
            self._declare_gone(peer, why)

    def _peer_back(self, peer: str | None) -> None:
        """Our channel to `peer` completed a handshake (driver "up"): it is live, and gets what was held."""
        if peer is None:
            return
        self._up_seen.add(peer)
        if peer in self._gone:
            del self._gone[peer]
            logger.info("%s: peer %r is back", self.name, peer)
        if peer in self._held:
            self._flush_held(peer)

    # ------------------------------------------------------------------ sending

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _start_session(self, message: Message) -> bool:
        """Track a message we originate; returns whether a reply is expected."""
        if isinstance(message, SessionMessage):
            compiled = catalog.get(message.session_type) or catalog.require(message.session_type)
            if message.session_stage is None:
                message.session_stage = compiled.initial
            self._tracker.start(message.session_id, compiled, message.destination, message.session_stage)
            return _type_expects_reply(compiled)
        return True

    def _transmit(self, message: Message) -> bool:
        """Hand one message to the driver (True), or hold it for a gone peer (False)."""
        peer = message.destination
        if peer == self.name:
            raise ConfigError(f"{self.name!r} cannot send to itself")
        if peer in self._gone or peer in self._held:  # behind what is held already, to keep the order
            self._hold(peer, message)
            if peer not in self._gone:
                self._flush_held(peer)  # an earlier flush stalled (full queue): try again
            return False
        if not self._send_now(peer, message):
            self._hold(peer, message)
            return False
        return True

    def _send_now(self, peer: str, message: Message) -> bool:
        """Send to a peer not known to be gone; False (sending nothing) if its channel turned out broken."""
        if peer not in self._connected:
            if peer not in self._members:
                self._refresh_members_now()
            self._connect(peer)
        record = self._members.get(peer)
        shared = self._shared_payload
        frames = self._codec.encode(message, incarnation=self._incarnation, seq=self._next_seq(),
                                    to_incarnation=record.incarnation if record is not None else "",
                                    encoded_payload=shared[1] if shared and shared[0] is message.payload else None)
        try:
            self._driver.send(peer, frames, timeout=0)  # a channel that is up with room takes it at once
        except (PeerUnreachable, Timeout):
            if peer in self._up_seen and not self._driver.is_up(peer):
                # It was up and broke, and its "down" still waits in the driver: act on it now instead of
                # waiting `timeouts.connect` for a channel that may not come back.
                self._peer_down(peer)
                return False
            # A new channel still in its handshake, or a full queue: wait for it, boundedly.
            self._driver.send(peer, frames, timeout=self.timeouts.connect)
        self.stats.sent += 1
        return True

    def _hold(self, peer: str, message: Message) -> None:
        queue = self._held.get(peer)
        if queue is not None:
            self._expire_held(peer, queue)
            queue = self._held.get(peer)  # gone if everything in it expired
        if len(queue or ()) >= self.hold_policy.max_messages:
            self.stats.refused += 1
            logger.warning("%s: refusing message %s for gone peer %r: %d already held (HoldPolicy.max_messages)",
                           self.name, message.message_id, peer, len(queue or ()))
            raise DeliveryRefused(peer, f"message {message.message_id} for gone peer {peer!r} refused: "
                                        f"{len(queue or ())} messages held for it already")
        if queue is None:
            queue = self._held[peer] = deque()
        queue.append((time.monotonic(), message.message_id, message))
        self.stats.held += 1
        logger.info("%s: peer %r is gone; holding message %s (%d held)", self.name, peer, message.message_id,
                    len(queue))

    def _expire_held(self, peer: str, queue: deque[tuple[float, str, Message]]) -> None:
        cutoff = time.monotonic() - self.hold_policy.max_age
        while queue and queue[0][0] < cutoff:
            _, message_id, message = queue.popleft()
            sid = message.session_id
            self.stats.held_expired += 1
            # Whoever waits for its reply gets DeliveryRefused (receive_by_id), and the session ends failed.
            if self._awaiting.pop(sid, None) is not None:
                self._refused[sid] = peer
                while len(self._refused) > self.max_buffered:
                    self._refused.popitem(last=False)
            self._tracker.try_fire(sid, "peer_lost")
            logger.warning("%s: held message %s for %r dropped: older than HoldPolicy.max_age=%ss", self.name,
                           message_id, peer, self.hold_policy.max_age)
        if not queue and self._held.get(peer) is queue:
            del self._held[peer]

    def _expire_all_held(self) -> float | None:
        """Drop held messages past their age; returns seconds until the next one would expire (None: none)."""
        for peer, queue in list(self._held.items()):
            self._expire_held(peer, queue)
        if not self._held:
            return None
        oldest = min(queue[0][0] for queue in self._held.values())
        return max(0.0, oldest + self.hold_policy.max_age - time.monotonic())

    def _flush_held(self, peer: str) -> None:
        """Send what was held for `peer`, oldest first, each once; stop (keeping the rest) if that fails."""
        queue = self._held.get(peer)
        if queue is None:
            return
        self._expire_held(peer, queue)
        delivered = 0
        while queue:
            message = queue[0][2]
            try:
                sent = self._send_now(peer, message)
            except (PeerUnreachable, Timeout) as exc:
                logger.warning("%s: %r came back but delivery stalled (%s); %d still held", self.name, peer, exc,
                               len(queue))
                return
            if not sent:
                logger.warning("%s: %r went down again while its held messages were sent; %d still held",
                               self.name, peer, len(queue))
                return
            queue.popleft()  # only once the driver took it: a message is never sent twice
            delivered += 1
            if isinstance(message, SessionMessage) and message.session_id not in self._awaiting:
                session = self._tracker.find(message.session_id)
                if session is not None and not _type_expects_reply(session.type):
                    self._tracker.settle(message.session_id)  # a one-way message that finally went out
        self._held.pop(peer, None)
        logger.info("%s: delivered %d held messages to %r", self.name, delivered, peer)

    def _dispatch(self, message: Message) -> str:
        self._check_open()
        self._absorb()
        sid = message.session_id
        if sid in self._failed or sid in self._refused:  # a new attempt in a session that failed: start afresh
            self._failed.pop(sid, None)
            self._refused.pop(sid, None)
            self._tracker.discard(sid)
        expects_reply = self._start_session(message)
        if expects_reply:
            self._awaiting[sid] = message.destination
        try:
            sent = self._transmit(message)
        except BaseException as exc:
            self._awaiting.pop(message.session_id, None)
            if isinstance(exc, Error):  # never sent, so the session cannot go on: end it, the error says why
                self._tracker.try_fire(message.session_id, "timeout" if isinstance(exc, Timeout) else "peer_lost")
            raise
        if sent and not expects_reply:
            # A one-way message that went out: nothing will come back for it, so the session leaves the live
            # index (its stage, "request", stays readable) instead of growing it with every message.
            self._tracker.settle(sid)
        return sid

    def isend(self, message: Message) -> list[str]:
        """Send without waiting; returns the session id(s) to collect replies with `receive_by_id`."""
        return [self._dispatch(message)]

    def send(self, message: Message, timeout: float | None | Any = UNSET) -> list[Message]:
        """Send and wait for the reply; returns the replies (none for a notification)."""
        session_ids = self.isend(message)
        return self.receive_by_id(session_ids, timeout=timeout)

    def iscatter(
        self, tag: Any, session_type: SessionType | str, destination_payload_list: Iterable[tuple[str, Any]]
    ) -> list[str]:
        """Send one message per (destination, payload) without waiting; returns their session ids."""
        messages = [
            SessionMessage(tag=tag, source=self.name, destination=destination, payload=payload,
                           session_type=session_type)
            for destination, payload in destination_payload_list
        ]
        return self._dispatch_all(messages)

    def scatter(
        self,
        tag: Any,
        session_type: SessionType | str,
        destination_payload_list: Iterable[tuple[str, Any]],
        timeout: float | None | Any = UNSET,
    ) -> list[Message]:
        """Send one message per (destination, payload) and wait for every reply."""
        return self.receive_by_id(self.iscatter(tag, session_type, destination_payload_list), timeout=timeout)

    def ibroadcast(
        self, component_type: str, tag: Any, session_type: SessionType | str, payload: Any = None
    ) -> list[str]:
        """Send `payload` to every live peer of `component_type` without waiting; returns session ids.

        The targets are `peers[component_type]`: a peer declared gone is not live and is skipped.
        """
        self._check_open()
        self._absorb()
        targets = [p for p, r in self._members.items() if r.component_type == component_type and p not in self._gone]
        if not targets:
            raise PeerUnreachable(component_type, f"no live peer of type {component_type!r} in the group")
        messages = [SessionMessage(tag=tag, source=self.name, destination=peer, payload=payload,
                                   session_type=session_type) for peer in sorted(targets)]
        if len(targets) > 1 and payload is not None:
            # Serialize the payload once for every target, not once per target (a parameter server
            # broadcasting its weights). A message held for a gone peer is encoded again when it goes out.
            self._shared_payload = (payload, self._codec.encode_payload(payload))
        try:
            return self._dispatch_all(messages)
        finally:
            self._shared_payload = None

    def broadcast(
        self,
        component_type: str,
        tag: Any,
        session_type: SessionType | str,
        payload: Any = None,
        timeout: float | None | Any = UNSET,
    ) -> list[Message]:
        """Send `payload` to every live peer of `component_type` and wait for all their replies."""
        return self.receive_by_id(self.ibroadcast(component_type, tag, session_type, payload), timeout=timeout)

    def _dispatch_all(self, messages: Sequence[Message]) -> list[str]:
        # Every message goes out (or is held) before any error is raised, so one bad peer does not
        # keep the others from getting their share; the first error is raised afterwards.
        session_ids: list[str] = []
        first_error: Error | None = None
        for message in messages:
            try:
                session_ids.append(self._dispatch(message))
            except (PeerUnreachable, Timeout, DeliveryRefused) as exc:
                first_error = first_error or exc
        if first_error is not None:
            first_error.session_ids = tuple(session_ids)  # type: ignore[attr-defined]
            raise first_error
        return session_ids

    def reply(self, message: Message, tag: Any = None, payload: Any = None, *, event: str | None = None
              ) -> list[str]:
        """Answer `message`: a new message in the same session, back to its source."""
        self._check_open()
        if isinstance(message, SessionMessage):
            session = self._tracker.find(message.session_id)
            if session is not None:
                if event is not None:
                    self._tracker.fire(session.id, event)  # the user's own event: illegal is an error
                else:
                    self._tracker.try_fire(session.id, "completed")
            stage = session.state if session is not None else message.session_stage
            answer: Message = message.reply_message(self.name, tag=tag, payload=payload, stage=stage, event=event)
        else:
            answer = message.reply_message(self.name, tag=tag, payload=payload)
        self._transmit(answer)
        return [answer.session_id]

    def forward(self, message: Message, destination: str, tag: Any = None, payload: Any = None) -> list[str]:
        """Pass `message` on to `destination` in the same session; its reply comes back to this proxy."""
        self._check_open()
        if isinstance(message, SessionMessage):
            onward: Message = SessionMessage(
                tag=message.tag if tag is None else tag, source=self.name, destination=destination,
                payload=message.payload if payload is None else payload, session_type=message.session_type,
                session_stage=message.session_stage, session_id=message.session_id, event=message.event,
            )
        else:
            onward = Message(tag=message.tag if tag is None else tag, source=self.name, destination=destination,
                             payload=message.payload if payload is None else payload,
                             session_id=message.session_id)
        self._awaiting[onward.session_id] = destination
        try:
            self._transmit(onward)
        except BaseException:
            self._awaiting.pop(onward.session_id, None)
            raise
        return [onward.session_id]

    # ------------------------------------------------------------------ receiving

    def _absorb(self) -> None:
        """Apply what the membership thread noticed (cheap when nothing changed)."""
        if self._pending_key is not None:  # before the members: a new one may only know the new key
            key, self._pending_key = self._pending_key, None
            self._adopt_key(key)
        updates = self._membership_updates
        if updates:
            latest = updates[-1]
            updates.clear()
            self._apply_members(latest)

    def _pump(self, timeout: float | None) -> None:
        """Wait up to `timeout` for driver events and handle them (frames, peers up/down)."""
        self._absorb()
        peer_events = None
        for event in self._driver.poll(timeout):
            if event.kind == "frames":
                self._on_frames(event.frames or [])
            elif event.peer is not None:
                peer_events = peer_events or []
                peer_events.append(event)
        if peer_events:
            # After the batch's frames: a reply that reached us together with its sender's "down" counts.
            for event in peer_events:
                if event.kind == "down":
                    self._peer_down(event.peer)
                elif event.kind == "up":
                    self._peer_back(event.peer)
        self._absorb()

    def _on_frames(self, frames: Sequence[Any]) -> None:
        try:
            frames = self._codec.split(frames)  # once, for both decode calls below
            try:
                header = self._codec.decode_header(frames)  # checks the MAC before anything is trusted
            except ForgedFrame:
                if not self._key_replaced():  # signed with a key the registry holds now, and we did not?
                    raise
                header = self._codec.decode_header(frames)
            self._check_sender(header)
            self._replay.check(header.source, header.incarnation, header.seq)
            message = self._codec.decode(frames, header)
        except FrameError as exc:
            self.stats.dropped_frames += 1
            logger.warning("%s: dropped a frame (%s): %s", self.name, type(exc).__name__, exc)
            return
        message_id = message.message_id
        seen = self._seen_ids
        if message_id in seen:  # exactly once: a copy of a message already delivered here goes
            self.stats.duplicates += 1
            logger.warning("%s: dropped a second copy of message %s from %r", self.name, message_id, message.source)
            return
        seen.add(message_id)
        order = self._seen_order
        order.append(message_id)
        if len(order) > self.hold_policy.dedup_window:
            seen.discard(order.popleft())
        self.stats.received += 1
        if message.session_id in self._failed:
            # Its session already ended failed (its peer was declared gone first; the caller gets or got
            # PeerGone): an outcome is decided once, so the late answer goes, logged and counted.
            self.stats.dropped_late += 1
            logger.warning("%s: dropped message %s from %r: its session %s already failed", self.name, message_id,
                           message.source, message.session_id)
            return
        self._track_incoming(message)
        if len(self._inbox) >= self.max_buffered:
            # Never drop data silently: the oldest unclaimed message goes, loudly. Reaching this means
            # nothing consumes receive() while receive_by_id waits for other sessions.
            _, oldest = self._inbox.popitem(last=False)
            ids = self._inbox_by_session.get(oldest.session_id)
            if ids:
                ids.remove(oldest.message_id)
                if not ids:
                    del self._inbox_by_session[oldest.session_id]
            self.stats.dropped_unclaimed += 1
            logger.error("%s: %d unclaimed messages buffered; dropped the oldest (%s)", self.name,
                         self.max_buffered, oldest.message_id)
        self._inbox[message.message_id] = message
        self._inbox_by_session.setdefault(message.session_id, []).append(message.message_id)

    def _check_sender(self, header: Header) -> None:
        if header.destination != self.name:
            raise ForgedFrame(f"frame for {header.destination!r} arrived at {self.name!r}")
        if header.to_incarnation and header.to_incarnation != self._incarnation:
            # Queued for an earlier process under our name (restarted on the same port): not ours to take.
            raise ReplayedFrame(f"frame {header.message_id} from {header.source!r} was meant for an earlier "
                                f"{self.name!r} (incarnation {header.to_incarnation[:8]})")
        record = self._members.get(header.source)
        if record is None or record.incarnation != header.incarnation:
            if self._worth_reading_registry((header.source, header.incarnation)):
                self._refresh_members_now()  # a peer that joined since our last look: one round trip
                record = self._members.get(header.source)
            if record is None or record.incarnation != header.incarnation:
                raise ForgedFrame(
                    f"frame from {header.source!r} with incarnation {header.incarnation[:8]} "
                    "that the registry does not list"
                )

    def _worth_reading_registry(self, prompt: tuple[str, str]) -> bool:
        """Whether a registry read that a received frame prompts is worth doing now.

        `prompt` says what the frame needs: a (source, incarnation) pair the member list lacks, or
        ("", "group key") after a MAC mismatch. Not while the membership thread finds the registry down,
        and once a second per prompt: otherwise a stream of such frames (a peer the registry lost, forged
        frames, a frozen Redis) would stall the receive loop for up to `timeouts.registry` per frame. A peer
        that just joined is listed by the time its first frame arrives (it registers before it can look us
        up), so the first read finds it.
        """
        membership = self._membership
        if membership is not None and membership.registry_down:
            return False
        now = time.monotonic()
        last = self._prompted_reads.get(prompt)
        if last is not None and now - last < 1.0:
            return False
        self._prompted_reads[prompt] = now
        self._prompted_reads.move_to_end(prompt)
        while len(self._prompted_reads) > 256:
            self._prompted_reads.popitem(last=False)
        return True

    def _track_incoming(self, message: Message) -> None:
        self._awaiting.pop(message.session_id, None)
        if not isinstance(message, SessionMessage):
            return
        tracker = self._tracker
        session = tracker.find(message.session_id)
        if session is None:
            compiled = catalog.get(message.session_type)
            if compiled is None:
                logger.warning("%s: message %s of unknown session type %r; delivered untracked", self.name,
                               message.message_id, message.session_type_name)
                return
            session = tracker.start(message.session_id, compiled, message.source, compiled.initial)
            event = message.event or "received"
        else:
            event = message.event or "completed"
        if not tracker.try_fire(session.id, event):
            logger.debug("%s: session %s in %r ignores %r", self.name, session.id, session.state, event)

    def _take(self) -> Message | None:
        if not self._inbox:
            return None
        _, message = self._inbox.popitem(last=False)
        ids = self._inbox_by_session[message.session_id]
        ids.remove(message.message_id)
        if not ids:
            del self._inbox_by_session[message.session_id]
        return message

    def _take_session(self, session_id: str) -> Message | None:
        ids = self._inbox_by_session.get(session_id)
        if not ids:
            return None
        message_id = ids.pop(0)
        if not ids:
            del self._inbox_by_session[session_id]
        return self._inbox.pop(message_id)

    def receive_once(self, timeout: float | None | Any = UNSET) -> Message:
        """The next incoming message; `Timeout` if none arrives in time (default: `timeouts.receive`)."""
        self._check_open()
        limit = self.timeouts.receive if timeout is UNSET else timeout
        deadline = deadline_after(limit)
        polled = False  # timeout=0 still looks at the socket once
        while True:
            message = self._take()
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
        try:
            while not self._stop_requested.is_set() and self._state is ProxyState.OPEN:
                deadline = deadline_after(idle)
                message = self._take()
                polled = False
                while message is None:
                    left = time_left(deadline)
                    if (left == 0 and polled) or self._stop_requested.is_set() or self._state is not ProxyState.OPEN:
                        return
                    self._pump(left)
                    polled = True
                    message = self._take()
                yield message
        finally:
            self._stop_requested.clear()

    def receive_by_id(self, session_ids: Iterable[str] | str, timeout: float | None | Any = UNSET
                      ) -> list[Message]:
        """Wait for one message of each session id; returns them in the order of `session_ids`.

        Messages of other sessions that arrive meanwhile stay buffered for `receive()` (up to
        `max_buffered`). Raises `PeerGone` if a peer that owes a reply is lost, `DeliveryRefused` if a
        message held for a gone peer expired (`HoldPolicy.max_age`) before it came back, `Timeout` naming
        the sessions still missing at the deadline. All carry `.replies`, what did arrive; `PeerGone`
        and `DeliveryRefused` also `.session_ids`, the sessions that ended. A message still held at the
        deadline stays held (a later call may still get its reply).
        """
        self._check_open()
        ids = [session_ids] if isinstance(session_ids, str) else list(session_ids)
        limit = self.timeouts.reply if timeout is UNSET else timeout
        deadline = deadline_after(limit)
        polled = False
        got: dict[str, Message] = {}
        no_reply = {sid for sid in ids if sid not in self._awaiting and not self._expects_reply(sid)}
        while True:
            for sid in ids:
                if sid not in got and sid not in no_reply:
                    message = self._take_session(sid)
                    if message is not None:
                        got[sid] = message
            missing = [sid for sid in ids if sid not in got and sid not in no_reply]
            if not missing:
                return [got[sid] for sid in ids if sid in got]
            lost = [(sid, self._failed[sid]) for sid in missing if sid in self._failed] if self._failed else None
            if lost:
                peers = sorted({peer for _, peer in lost})
                exc = PeerGone(peers[0], f"{self.name}: peer(s) {peers} lost with sessions "
                                         f"{[sid for sid, _ in lost]} pending", session_ids=[s for s, _ in lost])
                exc.replies = [got[sid] for sid in ids if sid in got]  # type: ignore[attr-defined]
                raise exc
            refused = ([(sid, self._refused[sid]) for sid in missing if sid in self._refused] if self._refused
                       else None)
            if refused:
                peers = sorted({peer for _, peer in refused})
                exc1 = DeliveryRefused(peers[0], f"{self.name}: messages held for gone peer(s) {peers} expired "
                                                 f"(sessions {[sid for sid, _ in refused]})")
                exc1.session_ids = tuple(sid for sid, _ in refused)  # type: ignore[attr-defined]
                exc1.replies = [got[sid] for sid in ids if sid in got]  # type: ignore[attr-defined]
                raise exc1
            next_expiry = None
            if self._held:  # held messages may expire while we wait: their callers hear of it then
                next_expiry = self._expire_all_held()
                if any(sid in self._refused for sid in missing):
                    continue
            left = time_left(deadline)
            if left == 0 and polled:
                owners = sorted({self._awaiting.get(sid, "?") for sid in missing})
                exc2 = Timeout(f"{self.name}: no reply within {limit}s for sessions {missing} (from {owners})",
                               missing)
                exc2.replies = [got[sid] for sid in ids if sid in got]  # type: ignore[attr-defined]
                raise exc2
            if next_expiry is not None and (left is None or next_expiry < left):
                left = next_expiry
            self._pump(left)
            polled = True

    def _expects_reply(self, session_id: str) -> bool:
        if session_id in self._inbox_by_session or session_id in self._failed or session_id in self._refused:
            return True
        session = self._tracker.find(session_id)
        # A session we know with no reply left to come (a notification) returns at once.
        return session is None or (_type_expects_reply(session.type) and not session.is_final)


# Events the proxy fires by itself on a one-way message: arrival, loss of the peer, expiry.
_ONE_WAY_EVENTS = frozenset({"received", "peer_lost", "timeout"})


@functools.lru_cache(maxsize=256)  # once per session type, not once per message sent
def _type_expects_reply(compiled: Any) -> bool:
    """A session type whose only events are arrival, peer loss and expiry (a notification) is one-way."""
    return not set(compiled.events) <= _ONE_WAY_EVENTS
