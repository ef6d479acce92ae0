"""Value objects for the proxy's timeouts, liveness and hold policy.

Seconds as float everywhere; `None` means "no limit" and must be said explicitly. Defaults are finite
except waiting for the next incoming message, which is what a receive loop is for.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from rallypoint.errors import ConfigError


class _Unset:
    """Tells "not given" (use the proxy's default) apart from `None` (no limit)."""

    _instance: _Unset | None = None

    def __new__(cls) -> _Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


UNSET = _Unset()


def _check_timeout(name: str, value: float | None) -> None:
    if value is not None and (not isinstance(value, (int, float)) or value < 0):
        raise ConfigError(f"{name} must be a number of seconds >= 0 or None, not {value!r}")


@dataclass(frozen=True)
class Timeouts:
    """How long each kind of blocking call may wait, in seconds (`None`: no limit).

        >>> Timeouts(reply=5.0).join
        30.0
    """

    join: float | None = 30.0  # waiting for expected_peers to register and connect at start
    connect: float | None = 5.0  # waiting for a peer's connection handshake before a send gives up
    reply: float | None = 60.0  # send/scatter/broadcast/receive_by_id waiting for replies
    receive: float | None = None  # receive()/receive_once() waiting for the next message
    registry: float = 2.0  # one registry (Redis) round trip
    close: float = 1.0  # how long close() lets unsent messages drain before dropping them

    def __post_init__(self) -> None:
        for name in ("join", "connect", "reply", "receive", "registry", "close"):
            _check_timeout(name, getattr(self, name))


@dataclass(frozen=True)
class Liveness:
    """How peers are known to be alive.

    `lease` is how long a registry entry lives without a refresh: a peer killed with SIGKILL drops out
    of everyone's view after at most that long even if no connection to it notices. Connections notice
    much sooner: ZMTP heartbeats every `heartbeat` seconds, a peer silent for `heartbeat_timeout` is
    declared gone (a crashed process is usually noticed at once, by its closed TCP connection).
    A frozen process or a cut link is declared gone within `detection` seconds (2.5 by default).

    `orphan_after`: when every peer of a type in `expected_peers` has been gone (crashed, cut off) for that
    long without coming back, `receive()`, `receive_once()` and `launch()` raise `PeerGone` naming them, so no
    worker waits forever for a master that died (`None`: wait forever).

        >>> Liveness().detection
        2.5
    """

    lease: float = 3.0
    refresh: float = 0.5  # how often the lease is renewed and the member list re-read
    heartbeat: float = 0.5
    heartbeat_timeout: float = 2.0
    orphan_after: float | None = 30.0

    def __post_init__(self) -> None:
        for name in ("lease", "refresh", "heartbeat", "heartbeat_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"Liveness.{name} must be a positive number of seconds, not {value!r}")
        _check_timeout("Liveness.orphan_after", self.orphan_after)
        if self.refresh >= self.lease:
            raise ConfigError("Liveness.refresh must be shorter than Liveness.lease")

    @property
    def detection(self) -> float:
        """The longest a frozen peer or a cut link goes unnoticed: the next ping, then its timeout."""
        return self.heartbeat + self.heartbeat_timeout


@dataclass(frozen=True)
class HoldPolicy:
    """What is kept for a peer that is gone, to deliver when it comes back under the same name.

    Past `max_messages` or `max_bytes` (per peer; bytes of encoded payload) a new message is refused with
    `DeliveryRefused`; a held message
    older than `max_age` seconds is dropped, logged and counted, and whoever waits for its reply gets
    `DeliveryRefused` (checked while a caller waits in `receive_by_id`, on the next send to that peer,
    and when it comes back). `max_messages=0` turns holding off: sends to a gone peer fail at once.
    A peer that left the registry more than `max_age` seconds ago, with nothing held for it, is
    forgotten: sending to it then raises `PeerUnreachable`, as for any name the registry does not list.

    Each message is delivered at most once per receiving process: a receiver drops a message whose id
    it has seen among the last `dedup_window` it took (0 turns that check off).
    """

    max_messages: int = 10_000
    max_age: float = 300.0
    dedup_window: int = 100_000
    max_bytes: int | None = 256 << 20

    def __post_init__(self) -> None:
        if self.max_messages < 0 or self.max_age <= 0 or self.dedup_window < 0:
            raise ConfigError("HoldPolicy needs max_messages >= 0, max_age > 0 and dedup_window >= 0")
        if self.max_bytes is not None and self.max_bytes < 0:
            raise ConfigError("HoldPolicy.max_bytes must be >= 0 or None")


def deadline_after(timeout: float | None) -> float | None:
    """The monotonic deadline `timeout` seconds from now (`None`: no deadline)."""
    if timeout is None:
        return None
    if timeout < 0 or math.isnan(timeout):
        raise ConfigError(f"timeout must be >= 0 or None, got {timeout!r}")
    return time.monotonic() + timeout


def time_left(deadline: float | None) -> float | None:
    """Seconds until `deadline` (never negative), or `None` for no deadline."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())
