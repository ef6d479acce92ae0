"""What a proxy counts, and the rate limit on logging what it drops."""

from __future__ import annotations

import logging
import time

__all__ = ["DropLog", "ProxyStats"]


class ProxyStats:
    """Counters a user (or a test) can read: what was sent, received, dropped, held.

    `dropped_by_reason` splits `dropped_frames` by the reason's name (`ForgedFrame`, `MalformedFrame`, ...).
    """

    __slots__ = ("sent", "received", "dropped_frames", "dropped_unclaimed", "dropped_late", "duplicates", "held",
                 "held_expired", "refused", "undelivered", "peers_lost", "peers_left", "rekeyed", "illegal_events",
                 "dropped_by_reason")

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.dropped_frames = 0
        self.dropped_unclaimed = 0  # buffered messages nobody took before max_buffered was reached
        self.dropped_late = 0  # answers in sessions that had already ended (their peer was declared gone)
        self.duplicates = 0  # messages dropped because their id was already delivered here
        self.held = 0
        self.held_expired = 0
        self.refused = 0
        self.undelivered = 0  # messages close() could not deliver (held for gone peers), replies to peers that left
        self.peers_lost = 0
        self.peers_left = 0  # peers that said goodbye (closed normally)
        self.rekeyed = 0  # times this proxy adopted a group key the registry held instead of its own
        self.illegal_events = 0  # received messages whose event their session's stage could not take
        self.dropped_by_reason: dict[str, int] = {}

    def as_dict(self) -> dict[str, int]:
        """The plain counters (not `dropped_by_reason`) by name."""
        return {name: getattr(self, name) for name in self.__slots__ if name != "dropped_by_reason"}

    def __repr__(self) -> str:
        return f"ProxyStats({self.as_dict()}, dropped_by_reason={self.dropped_by_reason})"


class DropLog:
    """Logs drops at most once per (reason, peer) every `interval` seconds, with the count since the last line,
    so a flood of garbage costs a counter increment per frame, not a log line."""

    def __init__(self, logger: logging.Logger, name: str, interval: float = 5.0, max_keys: int = 1024) -> None:
        self._logger = logger
        self._name = name
        self._interval = interval
        self._max_keys = max_keys
        self._last: dict[tuple[str, str], tuple[float, int]] = {}  # key -> (when logged, drops since)

    def drop(self, reason: str, peer: str, detail: str, level: int = logging.WARNING) -> None:
        key = (reason, peer)
        now = time.monotonic()
        entry = self._last.get(key)
        if entry is not None and now - entry[0] < self._interval:
            self._last[key] = (entry[0], entry[1] + 1)
            return
        suppressed = entry[1] if entry is not None else 0
        if entry is None and len(self._last) >= self._max_keys:
            self._last.clear()  # many distinct senders: start over rather than grow
        self._last[key] = (now, 0)
        more = f" (and {suppressed} more like it since the last report)" if suppressed else ""
        self._logger.log(level, "%s: dropped %s%s", self._name, detail, more)
