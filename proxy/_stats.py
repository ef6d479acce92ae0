"""What a proxy counts, and the rate limit on logging what it drops."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

__all__ = ["DropLog", "ProxyStats"]

# Counters of messages dropped or refused for a reason of their own: the summary's `dropped` map names them so.
_DROP_COUNTERS = {"dropped_unclaimed": "unclaimed", "dropped_late": "late", "duplicates": "duplicate",
                  "refused": "refused", "held_expired": "held_expired"}


class ProxyStats:
    """Counters a user (or a test) can read: what was sent, received, dropped, held.

    `dropped_by_reason` splits `dropped_frames` by the reason's name (`ForgedFrame`, `MalformedFrame`, ...).
    `gauges`, when set by the owner, returns what is true *now* rather than counted (sessions live, messages
    held and buffered); `summary()` adds it. It is called from the lease keeper's thread, so it must only read.
    """

    __slots__ = ("sent", "received", "dropped_frames", "dropped_unclaimed", "dropped_late", "duplicates", "held",
                 "held_expired", "refused", "undelivered", "peers_lost", "peers_left", "rekeyed", "illegal_events",
                 "bytes_sent", "bytes_received", "sessions_completed", "sessions_failed", "handler_calls",
                 "handler_ns", "dropped_by_reason", "gauges")

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
        self.bytes_sent = 0  # payload bytes handed to the driver (header and payload frames)
        self.bytes_received = 0  # bytes of the frames admitted (taken), dropped ones not included
        self.sessions_completed = 0  # sessions that reached a final state other than failed
        self.sessions_failed = 0  # sessions that ended failed (peer lost, expired, cancelled)
        self.handler_calls = 0  # @dist handler calls
        self.handler_ns = 0  # time spent in @dist handlers, in nanoseconds (time.perf_counter_ns deltas)
        self.dropped_by_reason: dict[str, int] = {}
        self.gauges: Callable[[], dict[str, int]] | None = None

    def as_dict(self) -> dict[str, int]:
        """The plain counters (not `dropped_by_reason`, not `gauges`) by name."""
        return {name: getattr(self, name) for name in self.__slots__ if name not in ("dropped_by_reason", "gauges")}

    def summary(self) -> dict[str, Any]:
        """What a watcher of the group wants to know, as plain data: the counters, `dropped` by reason (frames
        by their reason's name, and `unclaimed`, `late`, `duplicate`, `refused`, `held_expired`), handler time
        in seconds, and the `gauges` (`sessions_live`, `held_now`, `buffered`) when the owner set them.

        Safe to call from another thread than the owner's: it only reads, and copies the one dict it reads.

            >>> stats = ProxyStats()
            >>> stats.sent, stats.dropped_by_reason["ForgedFrame"] = 3, 1
            >>> summary = stats.summary()
            >>> summary["sent"], summary["dropped"]
            (3, {'ForgedFrame': 1})
        """
        counters = self.as_dict()
        handler_ns = counters.pop("handler_ns")
        for _ in range(3):  # the owner may add a reason while we copy: copy again
            try:
                dropped = {reason: n for reason, n in dict(self.dropped_by_reason).items() if n}
                break
            except RuntimeError:
                continue
        else:
            dropped = {}
        for counter, reason in _DROP_COUNTERS.items():
            if counters[counter]:
                dropped[reason] = counters[counter]
        summary: dict[str, Any] = {**counters, "handler_seconds": handler_ns / 1e9, "dropped": dropped}
        gauges = self.gauges
        if gauges is not None:
            summary.update(gauges())
        return summary

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
