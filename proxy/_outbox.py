"""The outbox: what leaves this proxy. Sequence numbers, encoding, the hand-off to the driver, and the messages
held for peers that are gone, delivered in order once they are back.

A message is handed to the driver at once when its peer's channel is up (or comes up within
`Timeouts.connect`), or held when the peer is gone; nothing waits in a Python buffer after the call that sent
it returns, except what is held for a gone peer (bounded by `HoldPolicy`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from typing import Any, Protocol

from rallypoint.engine import Message
from rallypoint.errors import DeliveryRefused, PeerUnreachable, Timeout

from ._config import HoldPolicy, Timeouts
from ._driver import Driver
from ._membership import Membership
from ._registry import PeerRecord
from ._stats import ProxyStats
from ._wire import WireCodec

logger = logging.getLogger(__name__)

# (when it was held, monotonic; the message; its payload encoded once, reused when it goes out; that size)
_Held = tuple[float, Message, tuple[list[Any], int], int]


class OutboxListener(Protocol):
    """What the owner of an `Outbox` hears (on the owner thread)."""

    def held_expired(self, message: Message, peer: str) -> None: ...
    def held_delivered(self, message: Message) -> None: ...


class Outbox:
    """Sends messages to peers, or holds them for peers that are gone."""

    def __init__(self, *, name: str, incarnation: str, codec: WireCodec, driver: Driver, membership: Membership,
                 hold: HoldPolicy, timeouts: Timeouts, stats: ProxyStats, listener: OutboxListener) -> None:
        self._name = name
        self._incarnation = incarnation
        self._codec = codec
        self._driver = driver
        self._membership = membership
        self._hold_policy = hold
        self._connect_timeout = timeouts.connect
        self._stats = stats
        self._listener = listener
        self._seq = 0
        self._held: dict[str, deque[_Held]] = {}
        self._held_bytes: dict[str, int] = {}  # per peer: the size of its held messages' encoded payloads

    def send(self, message: Message, encoded_payload: tuple[list[Any], int] | None = None,
             wait: float | None = None) -> bool:
        """Send `message` now (True) or hold it for its gone peer (False). `encoded_payload`: the payload already
        encoded once for many messages (a broadcast). `wait`: how long a channel still in its handshake, or a full
        queue, is waited for (default `Timeouts.connect`). Raises DeliveryRefused when the hold is full,
        PeerUnreachable for a peer the registry does not list or that does not complete its handshake in time."""
        peer = message.destination
        membership = self._membership
        if membership.is_gone(peer) or peer in self._held:  # behind what is held already, to keep the order
            self._hold(peer, message)
            if not membership.is_gone(peer):
                self.flush(peer)  # an earlier flush stalled (full queue): try again
            return False
        if not self._send_now(peer, message, encoded_payload, wait):
            self._hold(peer, message)
            return False
        return True

    def _send_now(self, peer: str, message: Message, encoded_payload: tuple[list[Any], int] | None = None,
                  wait: float | None = None) -> bool:
        """Send to a peer not known to be gone; False (sending nothing) if its channel turned out broken."""
        frames = self._frames(message, self._membership.ensure_channel(peer), encoded_payload)
        try:
            self._driver.send(peer, frames, timeout=0)  # a channel that is up with room takes it at once
        except (PeerUnreachable, Timeout):
            if self._membership.broke_unnoticed(peer):
                # It was up and broke, and its "down" still waits in the driver: act on it now instead of
                # waiting `timeouts.connect` for a channel that may not come back.
                self._membership.channel_down(peer)
                return False
            # A new channel still in its handshake, or a full queue: wait for it, boundedly.
            self._driver.send(peer, frames, timeout=self._connect_timeout if wait is None else wait)
        stats = self._stats
        stats.sent += 1
        stats.bytes_sent += len(frames[0]) if len(frames) == 1 else sum(memoryview(f).nbytes for f in frames)
        return True

    def say(self, message: Message) -> bool:
        """Send `message` now if its peer's channel takes it at once; never held, never waited for (goodbyes)."""
        peer = message.destination
        record = self._membership.record(peer)
        if record is None:
            return False
        try:
            self._driver.send(peer, self._frames(message, record), timeout=0)
        except (PeerUnreachable, Timeout):
            return False
        return True

    def _frames(self, message: Message, record: PeerRecord,
                encoded_payload: tuple[list[Any], int] | None = None) -> list[Any]:
        """`message` as frames for the process `record` names, under our next sequence number."""
        self._seq += 1
        return self._codec.encode(message, incarnation=self._incarnation, seq=self._seq,
                                  to_incarnation=record.incarnation, encoded_payload=encoded_payload)

    # ------------------------------------------------------------------------ holding

    def _hold(self, peer: str, message: Message) -> None:
        queue = self._held.get(peer)
        if queue is not None:
            self._expire(peer, queue)
            queue = self._held.get(peer)  # gone if everything in it expired
        held = len(queue or ())
        policy = self._hold_policy
        encoded = self._codec.encode_payload(message.payload)
        nbytes = sum(memoryview(frame).nbytes for frame in encoded[0])
        held_bytes = self._held_bytes.get(peer, 0)
        over = ("HoldPolicy.max_messages" if held >= policy.max_messages else
                "HoldPolicy.max_bytes" if policy.max_bytes is not None and held_bytes + nbytes > policy.max_bytes
                else None)
        if over is not None:
            self._stats.refused += 1
            logger.warning("%s: refusing message %s for gone peer %r: %d messages (%d bytes) already held (%s)",
                           self._name, message.message_id, peer, held, held_bytes, over)
            raise DeliveryRefused(peer, f"message {message.message_id} for gone peer {peer!r} refused: "
                                        f"{held} messages ({held_bytes} bytes) held for it already ({over})")
        if queue is None:
            queue = self._held[peer] = deque()
        queue.append((time.monotonic(), message, encoded, nbytes))
        self._held_bytes[peer] = held_bytes + nbytes
        self._stats.held += 1
        logger.info("%s: peer %r is gone; holding message %s (%d held)", self._name, peer, message.message_id,
                    len(queue))

    def _expire(self, peer: str, queue: deque[_Held]) -> None:
        cutoff = time.monotonic() - self._hold_policy.max_age
        while queue and queue[0][0] < cutoff:
            _, message, _, nbytes = queue.popleft()
            self._held_bytes[peer] -= nbytes
            self._stats.held_expired += 1
            logger.warning("%s: held message %s for %r dropped: older than HoldPolicy.max_age=%ss", self._name,
                           message.message_id, peer, self._hold_policy.max_age)
            self._listener.held_expired(message, peer)
        if not queue and self._held.get(peer) is queue:
            del self._held[peer]
            self._held_bytes.pop(peer, None)

    def expire(self) -> float | None:
        """Drop held messages past their age; returns seconds until the next one would expire (None: none)."""
        for peer, queue in list(self._held.items()):
            self._expire(peer, queue)
        if not self._held:
            return None
        oldest = min(queue[0][0] for queue in self._held.values())
        return max(0.0, oldest + self._hold_policy.max_age - time.monotonic())

    def flush(self, peer: str) -> None:
        """Send what was held for `peer`, oldest first, each once; stop (keeping the rest) if that fails."""
        queue = self._held.get(peer)
        if queue is None:
            return
        self._expire(peer, queue)
        delivered = 0
        while queue:
            _, message, encoded, nbytes = queue[0]
            try:
                sent = self._send_now(peer, message, encoded)
            except (PeerUnreachable, Timeout) as exc:
                logger.warning("%s: %r came back but delivery stalled (%s); %d still held", self._name, peer, exc,
                               len(queue))
                return
            if not sent:
                logger.warning("%s: %r went down again while its held messages were sent; %d still held",
                               self._name, peer, len(queue))
                return
            queue.popleft()  # only once the driver took it: a message is never sent twice
            self._held_bytes[peer] -= nbytes
            delivered += 1
            self._listener.held_delivered(message)
        self._held.pop(peer, None)
        self._held_bytes.pop(peer, None)
        logger.info("%s: delivered %d held messages to %r", self._name, delivered, peer)

    def held_sessions(self, peer: str) -> set[str]:
        """Session ids of the messages held for `peer`."""
        return {held[1].session_id for held in self._held.get(peer, ())}

    def held_messages(self) -> Iterator[Message]:
        """Every held message, by peer then age."""
        for queue in self._held.values():
            for _, message, _, _ in queue:
                yield message

    def held_count(self, peer: str | None = None) -> int:
        if peer is not None:
            return len(self._held.get(peer, ()))
        return sum(len(queue) for queue in self._held.values())

    def holds_for(self, peer: str) -> bool:
        return peer in self._held
