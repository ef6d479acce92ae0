"""Admission: the one place that decides whether a received frame is taken.

In order, each check once: the frame structure, size and MAC (`WireCodec.open`, which returns one envelope
of verified header and payload frames), the destination (us, this very process; a frame that does not name
our process must come from a member the registry lists under that incarnation), replay (the sender's
sequence), and duplicates (a message id already delivered here). What fails is dropped, counted by reason in
`ProxyStats` and logged at a bounded rate; nothing raises out of `admit`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from typing import Any

from rallypoint.errors import ForgedFrame, FrameError, ReplayedFrame

from ._membership import Membership
from ._stats import DropLog, ProxyStats
from ._wire import Envelope, Header, ReplayGuard, WireCodec

logger = logging.getLogger(__name__)


class Admission:
    """Checks received frames; `admit(frames)` returns the envelope to deliver, or None when it dropped them."""

    def __init__(self, *, name: str, incarnation: str, codec: WireCodec, membership: Membership,
                 dedup_window: int, stats: ProxyStats) -> None:
        self._name = name
        self._incarnation = incarnation
        self._codec = codec
        self._membership = membership
        self._dedup_window = dedup_window
        self._stats = stats
        self._replay = ReplayGuard()
        # Ids of recently delivered messages: a set for the lookup, a deque for the order they leave in.
        self._seen_ids: set[str] = set()
        self._seen_order: deque[str] = deque()
        self._drops = DropLog(logger, name)

    def admit(self, frames: Sequence[Any], origin: bytes = b"") -> Envelope | None:
        """The verified envelope of `frames` (received on connection `origin`) if they are taken; None (counted,
        logged) if not."""
        try:
            try:
                envelope = self._codec.open(frames)
            except ForgedFrame:
                # Signed with a key the registry holds now, and we did not? (At most one registry read a second.)
                if not self._membership.key_replaced():
                    raise
                envelope = self._codec.open(frames)
            header = envelope._header
            source = header.source
            if header.destination != self._name or (header.to_incarnation
                                                    and header.to_incarnation != self._incarnation):
                self._check_destination(header)
            # A frame made for this very process (its to_incarnation is ours) is taken whether or not the
            # registry still lists its sender (its last words before it left); one naming no process needs a
            # sender listed under that incarnation.
            if not header.to_incarnation:
                record = self._membership.record(source)
                if record is None or record.incarnation != header.incarnation:
                    self._check_sender(header)
            self._replay.check(source, header.incarnation, header.seq, origin)
        except FrameError as exc:
            self.drop(exc, "")
            return None
        message_id = header.message_id
        seen = self._seen_ids
        if message_id in seen:  # exactly once: a copy of a message already delivered here goes
            self._stats.duplicates += 1
            self._drops.drop("duplicate", source, f"a second copy of message {message_id} from {source!r}")
            return None
        if self._dedup_window:
            seen.add(message_id)
            order = self._seen_order
            order.append(message_id)
            if len(order) > self._dedup_window:
                seen.discard(order.popleft())
        return envelope

    def note_drop(self, reason: str, peer: str, detail: str, level: int = logging.WARNING) -> None:
        """Log (rate-limited) a message dropped after admission: from a full inbox, or late in its session."""
        self._drops.drop(reason, peer, detail, level)

    def drop(self, exc: FrameError, peer: str) -> None:
        """Count and (rate-limited) log a frame dropped for `exc`."""
        reason = type(exc).__name__
        stats = self._stats
        stats.dropped_frames += 1
        stats.dropped_by_reason[reason] = stats.dropped_by_reason.get(reason, 0) + 1
        self._drops.drop(reason, peer, f"a frame ({reason}): {exc}")

    def _check_destination(self, header: Header) -> None:
        if header.destination != self._name:
            raise ForgedFrame(f"frame for {header.destination!r} arrived at {self._name!r}")
        if header.to_incarnation and header.to_incarnation != self._incarnation:
            # Queued for an earlier process under our name (restarted on the same port): not ours to take.
            raise ReplayedFrame(f"frame {header.message_id} from {header.source!r} was meant for an earlier "
                                f"{self._name!r} (incarnation {header.to_incarnation[:8]})")

    def _check_sender(self, header: Header) -> None:
        """A sender the member list lacks (under that incarnation): look again, at most once a second."""
        membership = self._membership
        record = membership.record(header.source)
        if record is None or record.incarnation != header.incarnation:
            if membership.worth_reading((header.source, header.incarnation)):
                membership.refresh_now()  # a peer that joined since our last look: one round trip
                record = membership.record(header.source)
            if record is None or record.incarnation != header.incarnation:
                raise ForgedFrame(
                    f"frame from {header.source!r} with incarnation {header.incarnation[:8]} "
                    "that the registry does not list"
                )
