"""Membership: our lease in the registry, the view of the other members, and the group key.

Two sides, one hand-over:
- the lease keeper (`_LeaseKeeper`, a daemon thread) renews our entry every `Liveness.refresh` and re-reads
  the member list; it puts what it learns on a `queue.SimpleQueue` and wakes the driver. It touches no
  socket and shares no mutable state with the owner thread.
- the owner thread (the one that uses the proxy) drains that queue in `absorb()` and keeps the member view:
  who is listed, at which address and incarnation, whose channel is up, who is gone since when. It opens
  and closes driver channels to match, and tells the proxy (`MembershipListener`) when a peer is gone or
  back, so that sessions and held messages follow.

The group key lives here too: the registry is where members get it from, so when the registry holds another
key than ours (it lost its data and a newcomer created one) everyone moves to the one it holds, and frames
signed with the old key stay accepted for `KEY_GRACE` seconds.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from rallypoint.errors import PeerUnreachable, RegistryError

from ._config import Liveness
from ._driver import Driver
from ._observe import STATS_LINGER, SUMMARY_EVERY, make_summary
from ._registry import PeerRecord, Registry
from ._stats import ProxyStats
from ._trust import handshake_token, split_trusted
from ._wire import WireCodec

logger = logging.getLogger(__name__)

KEY_GRACE = 60.0
"""Seconds frames signed with a replaced group key stay accepted: long enough for every member to re-register
and switch once the registry is back, while one cut off for longer is refused until it reads the new key."""

_FULL_READ_EVERY_LEASES = 10  # the lease keeper reads the whole member list at least this many leases apart
_KEY_RENEW_EVERY = 5  # refreshes between two renewals of the group key's life (it lives GROUP_KEY_TTL)

PROMPTED_READ_INTERVAL = 1.0
"""At most one registry read a second for each thing a received frame can prompt one for (see `worth_reading`)."""


class MembershipListener(Protocol):
    """What the owner of a `Membership` hears about peers (called on the owner thread).

    `peer_gone`: crashed, cut off, restarted, or unlisted; `loud` is False for a peer we never had a channel to
    (nothing of ours depended on it). `peer_left`: it said goodbye after its last message.
    """

    def peer_gone(self, peer: str, why: str, loud: bool) -> None: ...
    def peer_left(self, peer: str) -> None: ...
    def peer_back(self, peer: str) -> None: ...


@dataclass(frozen=True)
class _Members:
    """The lease keeper read a member list that differs from the last one it read; `read` numbers the read
    (see `Membership._read_members`)."""

    read: int
    records: dict[str, PeerRecord]


@dataclass(frozen=True)
class _NewKey:
    """The lease keeper found the registry holding another group key than ours."""

    key: bytes


class Membership:
    """Who is in the group, as this member sees it. Owner-thread methods unless a docstring says otherwise."""

    def __init__(
        self,
        *,
        name: str,
        group: str,
        registry: Registry,
        driver: Driver,
        codec: WireCodec,
        key: bytes,
        liveness: Liveness,
        stats: ProxyStats,
        wanted: Callable[[PeerRecord], bool],
        listener: MembershipListener,
        record_key: bytes | None = None,
        unreachable_after: float = 5.0,
    ) -> None:
        self.name = name
        self.group = group
        self.registry = registry
        self.key = key
        self._driver = driver
        self._codec = codec
        self._liveness = liveness
        self._wanted = wanted  # whether a newly listed peer gets a channel at once (else at first send)
        self._listener = listener
        self._stats = stats
        self._forget_after: float | None = None
        self._keep_gone: Callable[[str], bool] = lambda peer: True
        self._members: dict[str, PeerRecord] = {}
        self._view: dict[str, list[str]] | None = None  # view() between changes (see there)
        self._gone: dict[str, float] = {}  # peers declared gone, by when (monotonic)
        self._left: dict[str, tuple[str, float]] = {}  # peers that said goodbye: (incarnation, when)
        self._types: dict[str, str] = {}  # the component type of every peer seen, listed or not (see orphans())
        self._connected: set[str] = set()
        self._dialing: dict[str, float] = {}  # channels opened and not up yet: since when (see _unreachable)
        # Peers whose channel we saw come up and not go down since: a send that finds one of them not up knows
        # the channel broke (its "down" is still queued in the driver) rather than never opened.
        self._up_seen: set[str] = set()
        self._prompted_reads: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._news: queue.SimpleQueue[_Members | _NewKey] = queue.SimpleQueue()
        # Registry reads are numbered when they start, on either thread; a list is applied only if no later
        # read was applied already, so a list the keeper queued cannot undo a newer read of the owner's.
        self._reads = itertools.count(1)
        self._applied_read = 0
        # With a group secret, member records must be signed with the key derived from it, and the registry's
        # own key is never read (the registry is only a directory); None: the registry holds the key.
        self._record_key = record_key
        self._unreachable_after = unreachable_after
        self._refused: dict[str, tuple[PeerRecord, str, float]] = {}  # name -> (record, why, first seen)
        self._trusted: dict[str, PeerRecord] = {}  # the records the last read took (replaced whole)
        # Who may complete a handshake with us (read by the driver's ZAP thread; each replaced whole, never edited):
        # the token of the current key, the previous one until its grace ends, and members' CURVE public keys.
        self._token = handshake_token(key)
        self._old_token: tuple[bytes, float] = (b"", 0.0)
        self._curve_keys: frozenset[bytes] = frozenset()
        self._last_token_read = 0.0  # when the ZAP thread last read the registry's key (see _token_of_a_new_key)
        self._owner_version = -1  # the member-list version the owner thread last read the list at
        self._full_read_at = float("inf")  # when the lease keeper reads the whole list whatever the version
        self._keeper: _LeaseKeeper | None = None

    # ------------------------------------------------------------------------ the handshake gate

    def guard(self) -> None:
        """Make the driver refuse, at the handshake, every connection that does not prove it belongs to the group:
        a PLAIN token derived from the group key, or (with CURVE) the public key of a listed member."""
        self._driver.require_token(self._token, self.accepts)

    def accepts(self, credential: bytes) -> bool:
        """Whether a connecting peer's credential (a PLAIN password or a CURVE public key) is a member's. Called
        on the driver's ZAP thread: it only reads attributes that are replaced whole."""
        if hmac.compare_digest(credential, self._token) or credential in self._curve_keys:
            return True
        old, until = self._old_token
        if old and time.monotonic() < until and hmac.compare_digest(credential, old):
            return True
        return self._token_of_a_new_key(credential)

    def _token_of_a_new_key(self, credential: bytes) -> bool:
        """An unknown token may be that of a key the registry holds now (it lost ours and a newcomer made one):
        at most one registry read a second tells, and a match hands the key to the owner thread to adopt. Never
        with a group secret (the key comes from it), nor while the registry is down."""
        if self._record_key is not None or self.registry_down:
            return False
        now = time.monotonic()
        if now - self._last_token_read < PROMPTED_READ_INTERVAL:
            return False
        self._last_token_read = now
        try:
            key = self.registry.group_key(self.group, create=False)
        except RegistryError:
            return False
        if key == self.key or not hmac.compare_digest(credential, handshake_token(key)):
            return False
        self._news.put(_NewKey(key))
        self._driver.wakeup()
        return True

    # ------------------------------------------------------------------------ lease

    def register(self, record: PeerRecord) -> None:
        """Enter the group and start renewing the lease at once (also while we wait for others to join)."""
        self.registry.register(self.group, record, self._liveness.lease)
        self._keeper = _LeaseKeeper(self, record)
        self._keeper.start()

    @property
    def registry_down(self) -> bool:
        """True while the lease keeper's last registry call failed."""
        return self._keeper is not None and self._keeper.registry_down

    def leave(self, timeout: float) -> None:
        """Stop renewing and remove our entry (skipped when the registry is down or hangs: the lease expires
        by itself, and waiting on it would make close() as slow as the registry's timeouts)."""
        keeper = self._keeper
        if keeper is None:
            return
        keeper.stop(timeout)
        if keeper.is_alive() or keeper.registry_down:
            logger.warning("%s: registry unavailable; not unregistering (the lease will expire)", self.name)
            return
        try:
            self.registry.unregister(self.group, self.name)
        except RegistryError as exc:
            logger.warning("%s: could not unregister (the lease will expire): %s", self.name, exc)

    # ------------------------------------------------------------------------ the view

    def absorb(self) -> None:
        """Apply what the lease keeper found since the last call: the newest key first (a new member may know
        only the new key), then the newest member list. Everything queued is drained, so nothing is lost and
        the last list read always wins."""
        latest: _Members | None = None
        key: bytes | None = None
        news = self._news
        if news.empty():  # the common case: nothing new (no queue.Empty raised and caught)
            return
        while True:
            try:
                item = news.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _NewKey):
                key = item.key
            else:
                latest = item
        if key is not None:
            self.adopt_key(key)
        if latest is not None:
            self._apply_read(latest.read, latest.records)

    def _read_members(self) -> tuple[int, dict[str, PeerRecord]]:
        """One registry read of the member list, numbered (any thread). Records this member's trust does not take
        are left out (and remembered, to name them if a join waits in vain): with a group secret, those not
        signed with its key; without one, signed ones."""
        read = next(self._reads)
        listed = self.registry.members(self.group)
        # Without a secret, signed records are refused too: their members hold a key this one cannot have.
        taken, why = split_trusted(listed, self._record_key)
        # A name we trusted whose record now fails (a registry writer rewrote it, say to its own address) keeps
        # the record we trusted: tampering can deny a newcomer entry, never redirect a member we know.
        trusted_before = self._trusted
        for name in why.keys() & trusted_before.keys():
            taken[name] = trusted_before[name]
        self._trusted = taken
        now, before = time.monotonic(), self._refused
        # Replaced whole, never edited in place: either thread may read it.
        self._refused = {name: (listed[name], reason, before[name][2] if name in before
                                and before[name][0] == listed[name] else now) for name, reason in why.items()}
        for name in why.keys() - before.keys():
            logger.warning("%s: ignoring %r in the registry: %s", self.name, name, why[name])
        self._note_curve_keys(taken)
        return read, taken

    def _note_curve_keys(self, records: Mapping[str, PeerRecord]) -> None:
        """The CURVE public keys the handshake gate lets in: those of the members just read (whichever thread
        read them, so a joining member is let in at the lease keeper's next read, not the owner's next call)."""
        self._curve_keys = frozenset(key for key in (_curve_key(r.address) for r in records.values()) if key)

    def refused(self, expected: Mapping[str, int], older_than: float) -> dict[str, str]:
        """Records of expected types the registry has listed for `older_than` seconds that our secret refuses,
        with why: a member with another secret (or none) is in the group."""
        now = time.monotonic()
        return {name: why for name, (record, why, since) in self._refused.items()
                if record.component_type in expected and now - since >= older_than}

    def refresh_if_changed(self, *, quiet: bool = False) -> None:
        """Read the whole member list only if its version moved since the owner thread last read it (one cheap
        read otherwise): joining polls this often, and a group of N joining at once must not cost N^2 reads."""
        version = self.registry.members_version(self.group)
        if version != self._owner_version:
            self._owner_version = version
            self.refresh_now(quiet=quiet)

    def request_full_read(self, after: float) -> None:
        """Have the lease keeper read the whole list `after` seconds from now, whatever its version: a peer whose
        channel broke stays listed until its lease lapses, and the read that finds it lapsed tells everyone."""
        self._full_read_at = min(self._full_read_at, time.monotonic() + after)

    def _apply_read(self, read: int, members: dict[str, PeerRecord]) -> None:
        if read > self._applied_read:
            self._applied_read = read
            self.apply(members)

    def apply(self, members: dict[str, PeerRecord]) -> None:
        """Bring our view and channels in line with the registry's member list."""
        members = {n: r for n, r in members.items() if n != self.name}
        old = self._members
        for peer in old.keys() - members.keys():
            if peer in self._up_seen and peer not in self._gone and self._driver.is_up(peer):
                # Unlisted, but our channel to it is alive: its lease lapsed (the registry restarted, or the
                # peer cannot reach it), the peer did not die. Keep it; heartbeats say if it does.
                members[peer] = old[peer]
        for peer in [p for p, r in members.items() if p in self._left]:
            if self._left[peer][0] == members[peer].incarnation:
                del members[peer]  # still listed a moment after its goodbye: it is not coming back as itself
            else:
                del self._left[peer]  # a new process under the name of one that left: a new member
        self._members = members
        self._view = None
        for peer, record in members.items():
            self._types[peer] = record.component_type
            previous = old.get(peer)
            if previous is not None and previous.incarnation != record.incarnation:
                # Restarted under the same name: what was pending with the old process failed, and the channel is
                # rebuilt even at the same address, so nothing queued for the old process reaches the new one.
                self._declare_gone(peer, "restarted as a new process", loud=peer in self._connected)
                if peer in self._connected:
                    self._reconnect(peer, record.address)
                elif not self._keep_gone(peer):
                    del self._gone[peer]  # nothing of ours waits on it: the new process is simply a member
            elif peer in self._connected:
                if previous is None or previous.address != record.address:
                    self._up_seen.discard(peer)
                    self._driver.connect(peer, record.address)
            elif self._wanted(record) or (peer in self._gone and self._keep_gone(peer)):
                # A gone peer we hold messages for gets a channel: its handshake ("up") is what brings it back.
                self.connect(peer)
            elif peer in self._gone and previous is None:
                # Listed again, and we never talk to it: no channel is opened just to watch it (a group that
                # churns would otherwise end with every member connected to every other).
                del self._gone[peer]
        for peer in old.keys() - members.keys():
            if peer not in self._left:
                self._declare_gone(peer, "left the registry (lease expired or unregistered)",
                                   loud=peer in self._connected)
            if peer in self._connected:
                self._up_seen.discard(peer)
                self._driver.disconnect(peer)
                self._connected.discard(peer)
                self._dialing.pop(peer, None)
        self._forget_long_gone()

    def _reconnect(self, peer: str, address: str) -> None:
        self._up_seen.discard(peer)
        self._driver.disconnect(peer)
        self._driver.connect(peer, address)
        self._dialing[peer] = time.monotonic()

    def connect(self, peer: str) -> None:
        """Open the channel to listed member `peer`; PeerUnreachable if the registry does not list it."""
        record = self._members.get(peer)
        if record is None:
            raise PeerUnreachable(peer, f"{peer!r} is not a registered member of group {self.group!r}")
        self._driver.connect(peer, record.address)
        if peer not in self._connected:
            self._dialing[peer] = time.monotonic()
        self._connected.add(peer)

    def _unreachable(self, peer: str) -> bool:
        """A channel we opened that has never completed its handshake for longer than `unreachable_after`: a
        member listed but out of reach, which must not count as live (toward percentages, or broadcasts)."""
        since = self._dialing.get(peer)
        if since is None:
            return False
        if peer in self._up_seen or self._driver.is_up(peer):
            del self._dialing[peer]
            return False
        return time.monotonic() - since > self._unreachable_after

    def ensure_channel(self, peer: str) -> PeerRecord:
        """The record of `peer`, with a channel open to it (looked up in the registry if we do not list it)."""
        if peer not in self._connected:
            if peer not in self._members:
                self.refresh_now()
            self.connect(peer)
        return self._members[peer]

    def refresh_now(self, *, quiet: bool = False) -> None:
        """Read the registry on this thread (one round trip), e.g. for a peer that joined since the last look.
        RegistryError is logged (`quiet`: raised, for a caller that retries)."""
        try:
            read, members = self._read_members()
        except RegistryError as exc:
            if quiet:
                raise
            logger.warning("%s: registry unreachable while looking up a peer: %s", self.name, exc)
            return
        if self._record_key is None:
            try:
                # A member we learn of here may hold a key created after the registry lost ours: switch first,
                # so that what we send it is signed with the key it knows.
                self.adopt_key(self.registry.group_key(self.group, create=False))
            except RegistryError as exc:  # no key there (not restored yet) or unreachable: keep ours
                logger.debug("%s: could not re-read the group key: %s", self.name, exc)
        self._apply_read(read, members)

    def worth_reading(self, prompt: tuple[str, str]) -> bool:
        """Whether a registry read that a received frame prompts is worth doing now.

        `prompt` says what the frame needs: a (source, incarnation) pair the member list lacks, or ("", "group
        key") after a MAC mismatch. Not while the registry is down, and once a second per prompt: otherwise a
        stream of such frames would stall the receive loop for up to the registry timeout per frame.
        """
        if self.registry_down:
            return False
        now = time.monotonic()
        last = self._prompted_reads.get(prompt)
        if last is not None and now - last < PROMPTED_READ_INTERVAL:
            return False
        self._prompted_reads[prompt] = now
        self._prompted_reads.move_to_end(prompt)
        while len(self._prompted_reads) > 256:
            self._prompted_reads.popitem(last=False)
        return True

    # ------------------------------------------------------------------------ liveness

    def channel_down(self, peer: str) -> None:
        """Our channel to `peer` broke (driver "down")."""
        self._up_seen.discard(peer)
        if peer in self._members and peer not in self._gone and peer not in self._left:
            self._declare_gone(peer, "connection lost", loud=True)
            self.request_full_read(after=self._liveness.lease)

    def channel_up(self, peer: str) -> None:
        """Our channel to `peer` completed a handshake (driver "up"): it is live."""
        self._up_seen.add(peer)
        if peer in self._gone:
            del self._gone[peer]
            self._view = None
            logger.info("%s: peer %r is back", self.name, peer)
        self._listener.peer_back(peer)

    def broke_unnoticed(self, peer: str) -> bool:
        """Whether the channel to `peer` was up and has broken, its "down" not yet handled."""
        return peer in self._up_seen and not self._driver.is_up(peer)

    def _declare_gone(self, peer: str, why: str, loud: bool) -> None:
        if peer in self._gone:
            return
        self._gone[peer] = time.monotonic()
        self._view = None
        self._listener.peer_gone(peer, why, loud)

    def peer_left(self, peer: str, incarnation: str, component_type: str) -> None:
        """`peer` said goodbye after its last message: it is not gone, it left, and its channel is closed."""
        if self._left.get(peer, ("", 0.0))[0] == incarnation:
            return
        self._left[peer] = (incarnation, time.monotonic())
        self._types.setdefault(peer, component_type)
        self._gone.pop(peer, None)
        self._members.pop(peer, None)
        self._view = None
        self._up_seen.discard(peer)
        if peer in self._connected:
            self._connected.discard(peer)
            self._dialing.pop(peer, None)
            self._driver.disconnect(peer)
        self._listener.peer_left(peer)

    def forget_after(self, seconds: float, keep: Callable[[str], bool]) -> None:
        """Forget peers gone more than `seconds` ago that are unlisted and not kept by `keep` (something is
        held for them): a job whose workers come and go under new names must not grow the view without bound.
        Sending to a forgotten peer fails with PeerUnreachable, as for any name the registry does not list."""
        self._forget_after = seconds
        self._keep_gone = keep

    def _forget_long_gone(self) -> None:
        if (not self._gone and not self._left) or self._forget_after is None:
            return
        cutoff = time.monotonic() - self._forget_after
        for peer in [p for p, since in self._gone.items() if since < cutoff and p not in self._members]:
            if not self._keep_gone(peer):
                del self._gone[peer]
                self._types.pop(peer, None)
        for peer in [p for p, (_, since) in self._left.items() if since < cutoff and not self._keep_gone(p)]:
            del self._left[peer]
            self._types.pop(peer, None)

    # ------------------------------------------------------------------------ reading the view

    def record(self, peer: str) -> PeerRecord | None:
        return self._members.get(peer)

    def is_gone(self, peer: str) -> bool:
        return peer in self._gone

    def has_left(self, peer: str) -> bool:
        return peer in self._left

    def state(self, peer: str) -> str | None:
        """"up", "gone", "left", or None for a peer not known here."""
        if peer in self._left:
            return "left"
        if peer in self._gone:
            return "gone"
        return "up" if peer in self._members else None

    def joined(self, expected: Mapping[str, int]) -> dict[str, int]:
        """How many more peers of each expected type we still wait for: a listed member counts, and so does one
        that already left (it registered, talked to us and closed while we were still joining)."""
        have: dict[str, int] = {}
        for record in self._members.values():
            have[record.component_type] = have.get(record.component_type, 0) + 1
        for peer in self._left:
            kind = self._types.get(peer, "")
            have[kind] = have.get(kind, 0) + 1
        return {t: n - have.get(t, 0) for t, n in expected.items() if have.get(t, 0) < n}

    def channels(self) -> list[str]:
        """Peers we opened a channel to (up or still dialing), sorted."""
        return sorted(self._connected)

    def up_peers(self) -> list[str]:
        """Peers whose channel from us is up (listed, not gone, handshake done)."""
        return sorted(p for p in self._connected if p in self._members and p not in self._gone
                      and self._driver.is_up(p))

    def not_up(self, expected: Mapping[str, int]) -> list[str]:
        """Listed members of the expected types whose channel has not completed its handshake."""
        return sorted(p for p, r in self._members.items()
                      if r.component_type in expected and p not in self._gone and not self._driver.is_up(p))

    def departed(self, expected: Mapping[str, int]) -> tuple[dict[str, tuple[list[str], float]], list[str]]:
        """The expected types none of whose peers is live any more: `({type: (gone peers, seconds since the last
        went)}, [types whose peers all left])`. A type we know no peer of is in neither."""
        live: set[str] = set()
        for peer, record in self._members.items():
            if peer not in self._gone:
                live.add(record.component_type)
        gone: dict[str, tuple[list[str], float]] = {}
        left: set[str] = set()
        now = time.monotonic()
        for peer, since in self._gone.items():
            kind = self._types.get(peer, "")
            if kind in expected and kind not in live:
                names, last = gone.get(kind, ([], float("inf")))
                names.append(peer)
                gone[kind] = (names, min(last, now - since))
        for peer in self._left:
            kind = self._types.get(peer, "")
            if kind in expected and kind not in live and kind not in gone:
                left.add(kind)
        return gone, sorted(left)

    def live(self, component_type: str) -> list[str]:
        """Live members of `component_type`, sorted (as `view()` lists them)."""
        return self.view().get(component_type, [])

    def view(self) -> dict[str, list[str]]:
        """Live members by type: `{type: [names]}` (a copy: the caller may change it).

        Kept between changes of the member list or of a peer's state, since a rule with a percentage asks for it
        at every message; rebuilt each time while a channel is still dialing (its peer turns unreachable with
        time alone)."""
        view = self._view
        if view is None or self._dialing:
            view = {}
            for peer, record in self._members.items():
                if peer not in self._gone and not self._unreachable(peer):
                    view.setdefault(record.component_type, []).append(peer)
            for names in view.values():
                names.sort()
            self._view = view
        return {kind: list(names) for kind, names in view.items()}

    def records(self) -> dict[str, PeerRecord]:
        return dict(self._members)

    # ------------------------------------------------------------------------ the group key

    def adopt_key(self, key: bytes) -> bool:
        """Sign with `key`, the key the registry holds, if it is not ours; say whether it was new."""
        if key == self.key:
            return False
        self._codec.rekey(key, grace=KEY_GRACE)
        self.key = key
        self._old_token = (self._token, time.monotonic() + KEY_GRACE)
        self._token = handshake_token(key)
        self._driver.set_token(self._token)
        self._stats.rekeyed += 1
        logger.warning("%s: now signing with the group key the registry holds for %r (it had lost the one this "
                       "proxy started with); frames signed with the old key are accepted for %.0fs more",
                       self.name, self.group, KEY_GRACE)
        return True

    def key_replaced(self) -> bool:
        """After a frame failed its MAC: whether the registry now holds another group key (then adopted). Never
        with a group secret: the key comes from the secret, and one planted in the registry is not taken."""
        if self._record_key is not None or not self.worth_reading(("", "group key")):
            return False
        try:
            return self.adopt_key(self.registry.group_key(self.group, create=False))
        except RegistryError as exc:
            logger.debug("%s: could not re-read the group key: %s", self.name, exc)
            return False


def _curve_key(address: str) -> bytes:
    """The CURVE public key an address advertises (`tcp://host:port#curve=KEY`), or b""."""
    _, mark, key = address.partition("#curve=")
    return key.encode("ascii", "replace") if mark else b""


class _LeaseKeeper(threading.Thread):
    """Renews our lease and notices membership changes, off the message path; hands news over by queue.

    Every `SUMMARY_EVERY` seconds it also publishes a summary of the proxy's counters (`ProxyStats.summary()`, with
    the gauges the proxy set) for watchers of the group (`_observe.py`), and a last one saying "left" when it
    stops: one registry write each, which may fail without touching the lease (a registry user without the
    rights to write them, say).
    """

    def __init__(self, membership: Membership, record: PeerRecord) -> None:
        super().__init__(name=f"rallypoint-lease-{membership.name}", daemon=True)
        self._membership = membership
        self._record = record
        self._stop_event = threading.Event()
        self.registry_down = False
        self._publish_failed = False

    def stop(self, timeout: float) -> None:
        self._stop_event.set()
        if self.is_alive() and self is not threading.current_thread():
            self.join(timeout)

    def run(self) -> None:
        # This thread keeps our lease alive: if it died, every peer would drop us. An unexpected error is logged
        # and the loop goes on (after a pause, so a persistent fault cannot spin).
        refresh = self._membership._liveness.refresh
        while not self._stop_event.is_set():
            try:
                self._loop(refresh)
            except Exception:
                if self._stop_event.is_set():
                    return  # close() released the registry under a call that outlived the join timeout
                logger.exception("%s: membership refresh failed unexpectedly; retrying", self._membership.name)
                self._stop_event.wait(refresh)
        if not self.registry_down:
            self._publish("left", STATS_LINGER)  # before leave() unregisters us: watchers see a goodbye

    def _publish(self, state: str, ttl: float) -> None:
        """Publish our summary for watchers; a failure is logged (once at WARNING) and otherwise ignored."""
        m = self._membership
        try:
            m.registry.publish_stats(m.group, m.name, make_summary(self._record, m._stats, state), ttl)
        except Exception as exc:  # noqa: BLE001  # watchers' data: never worth the lease or the thread
            level = logging.DEBUG if self._publish_failed else logging.WARNING
            self._publish_failed = True
            logger.log(level, "%s: could not publish stats for watchers of %r: %s", m.name, m.group, exc)
        else:
            self._publish_failed = False

    def _loop(self, refresh: float) -> None:
        m = self._membership
        lease = m._liveness.lease
        last: dict[str, PeerRecord] | None = None
        handed = 0  # the number of the last read handed over
        version = -1  # the member-list version of our last whole read
        next_full = 0.0  # when a whole read is due whatever the version (a safety net, see below)
        beats = 0
        publish_every = max(1, round(SUMMARY_EVERY / refresh))
        while not self._stop_event.wait(refresh):
            beats += 1
            try:
                self._renew(m, lease, beats)
                if beats % publish_every == 1 % publish_every:  # the first beat, then every few seconds
                    self._publish("up", lease + STATS_LINGER)
                now = time.monotonic()
                current = m.registry.members_version(m.group)
                if current == version and now < next_full and now < m._full_read_at:
                    continue  # nothing changed: one cheap read instead of the whole list
                if now >= m._full_read_at:
                    m._full_read_at = float("inf")
                read, members = m._read_members()
                version = current
                # The safety net's period grows with the group (one lease per member), so that the bytes it costs the
                # registry stay linear in the group's size, not quadratic.
                next_full = now + max(_FULL_READ_EVERY_LEASES * lease, len(members) * lease)
            except RegistryError as exc:
                if not self.registry_down:
                    logger.warning("%s: registry unreachable, keeping the last member list: %s", m.name, exc)
                self.registry_down = True
                continue
            if self.registry_down:
                logger.warning("%s: registry reachable again", m.name)
                self.registry_down = False
            # Hand over a list that changed, or any list once the owner applied a read of its own since our last
            # hand-over (its view may be another than what we last saw, and we must not leave it stale).
            if members != last or m._applied_read > handed:
                last, handed = members, read
                m._news.put(_Members(read, members))
                m._driver.wakeup()

    def _renew(self, m: Membership, lease: float, beats: int) -> None:
        """Renew our lease, and now and then (without a group secret) the group key's life in the registry."""
        if not m.registry.refresh(m.group, self._record, lease):
            # Our entry had vanished (the registry restarted or our lease lapsed): we are back in, and the group
            # key goes back too, so members joining now share the running one.
            logger.warning("%s: re-registered in group %r", m.name, m.group)
            if m._record_key is None:
                self._key_back(m, m.registry.ensure_group_key(m.group, m.key))
        elif m._record_key is None and beats % _KEY_RENEW_EVERY == 0:
            if not m.registry.renew_group_key(m.group):
                self._key_back(m, m.registry.ensure_group_key(m.group, m.key))

    @staticmethod
    def _key_back(m: Membership, held: bytes) -> None:
        if held != m.key:
            logger.warning("%s: the registry holds a new key for group %r (a member joined while it was empty); "
                           "switching to it", m.name, m.group)
            m._news.put(_NewKey(held))
            m._driver.wakeup()
