"""Watching a group from outside it: the summary each member publishes, and what a watcher reads back.

Each member's lease keeper publishes a `Summary` of its `ProxyStats` to the registry every `SUMMARY_EVERY`
seconds (one write, off the message path), living `STATS_LINGER` seconds past its lease. On its way out a member
publishes a last one with state "left". A watcher (`rallypoint peers`, `monitor`, `metrics`) joins nothing: it
reads the member list, the leases and the summaries, and makes one `MemberRow` per name:

- "up": listed in the registry (its lease is running);
- "left": said goodbye (its last summary says so), listed or not;
- "gone": not listed any more without a goodbye (killed, crashed, cut off: its lease lapsed).

Summaries are JSON (readable with `redis-cli GET`) and are not signed: they are for display only, and whoever
can write the registry can make them lie. A summary that does not parse is skipped.

    >>> from rallypoint.proxy import InMemoryRegistry, PeerRecord
    >>> from rallypoint.proxy._stats import ProxyStats
    >>> registry, record, stats = InMemoryRegistry(), PeerRecord.new("w1", "worker", "tcp://127.0.0.1:5"), ProxyStats()
    >>> registry.register("g", record, ttl=3.0)
    >>> stats.sent = 7
    >>> registry.publish_stats("g", "w1", make_summary(record, stats), ttl=30.0)
    >>> [(row.name, row.state, row.summary.sent) for row in read_group(registry, "g").rows]
    [('w1', 'up', 7)]
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec

from ._registry import PeerRecord, Registry
from ._stats import ProxyStats

__all__ = [
    "STATS_LINGER",
    "SUMMARY_EVERY",
    "GroupView",
    "MemberRow",
    "Metric",
    "Rates",
    "Summary",
    "Watcher",
    "decode_summary",
    "make_summary",
    "metrics",
    "rates",
    "read_group",
    "snapshot_json",
    "table",
]

SUMMARY_EVERY = 2.0
"""Seconds between two summaries of one member (rounded to a whole number of lease refreshes)."""

STATS_LINGER = 30.0
"""Seconds a member's summary outlives its lease: how long watchers still show it as left or gone."""

MAX_SUMMARY_BYTES = 16 * 1024  # a summary is a few hundred bytes; anything far bigger is not one of ours

_Count = Annotated[int, msgspec.Meta(ge=0)]
_Seconds = Annotated[float, msgspec.Meta(ge=0)]
_Name = Annotated[str, msgspec.Meta(max_length=1024)]


class Summary(msgspec.Struct, frozen=True, kw_only=True):
    """One member's published counters (`ProxyStats.summary()`) and who it is. Unknown fields are ignored, so a
    newer member can add some; `v` numbers incompatible changes."""

    v: int = 1
    name: _Name
    type: _Name
    incarnation: _Name
    state: str  # "up" or "left"
    at: float  # when it was published (wall clock, time.time())
    started_at: float  # when the member started (wall clock)
    sent: _Count = 0
    received: _Count = 0
    bytes_sent: _Count = 0
    bytes_received: _Count = 0
    sessions_live: _Count = 0
    sessions_completed: _Count = 0
    sessions_failed: _Count = 0
    held_now: _Count = 0  # messages held for gone peers now
    held: _Count = 0  # messages ever held
    buffered: _Count = 0  # messages waiting for receive()/receive_by_id
    undelivered: _Count = 0
    peers_lost: _Count = 0
    peers_left: _Count = 0
    handler_calls: _Count = 0
    handler_seconds: _Seconds = 0.0
    dropped: dict[_Name, _Count] = msgspec.field(default_factory=dict)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


_COUNT_FIELDS = tuple(f for f in Summary.__struct_fields__
                      if f not in ("v", "name", "type", "incarnation", "state", "at", "started_at", "dropped"))


def make_summary(record: PeerRecord, stats: ProxyStats, state: str = "up") -> bytes:
    """The JSON summary a member publishes: `stats.summary()` with its name, type, incarnation and `state`."""
    counts = stats.summary()
    known = {name: counts[name] for name in _COUNT_FIELDS if name in counts}
    summary = Summary(name=record.name, type=record.component_type, incarnation=record.incarnation, state=state,
                      at=time.time(), started_at=record.started_at, dropped=counts.get("dropped", {}), **known)
    return msgspec.json.encode(summary)


_DECODER = msgspec.json.Decoder(Summary)


def decode_summary(data: bytes) -> Summary | None:
    """The summary in `data`, or None for anything that is not one (too big, not JSON, wrong fields)."""
    if len(data) > MAX_SUMMARY_BYTES:
        return None
    try:
        summary = _DECODER.decode(data)
    except msgspec.MsgspecError:
        return None
    if summary.state not in ("up", "left") or not (math.isfinite(summary.at) and math.isfinite(summary.started_at)):
        return None
    return summary


# ------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class MemberRow:
    """One member as a watcher sees it. `address`/`lease_left` are None once it is no longer listed; `summary` is
    None until it published one (or when the one found is of an earlier incarnation)."""

    name: str
    type: str
    state: str  # "up", "left" or "gone"
    incarnation: str
    started_at: float | None
    address: str | None = None
    lease_left: float | None = None
    summary: Summary | None = None


@dataclass(frozen=True)
class GroupView:
    """What the registry said about a group at `at` (wall clock)."""

    group: str
    at: float
    rows: list[MemberRow] = field(default_factory=list)


def read_group(registry: Registry, group: str) -> GroupView:
    """Read a group's members, leases and summaries (six round trips to Redis) into rows sorted by name.

    Raises `RegistryError` when the registry cannot be read; an unknown group is an empty view.
    """
    members = registry.members(group)
    leases = registry.lease_left(group)
    summaries = {name: s for name, data in registry.read_stats(group).items()
                 if (s := decode_summary(data)) is not None and s.name == name}
    rows: list[MemberRow] = []
    for name, record in members.items():
        summary = summaries.get(name)
        if summary is not None and summary.incarnation != record.incarnation:
            summary = None  # its previous life's: the new process has not published yet
        rows.append(MemberRow(name=name, type=record.component_type,
                              state="left" if summary is not None and summary.state == "left" else "up",
                              incarnation=record.incarnation, started_at=record.started_at, address=record.address,
                              lease_left=leases.get(name), summary=summary))
    for name, summary in summaries.items():
        if name not in members:
            rows.append(MemberRow(name=name, type=summary.type, state="left" if summary.state == "left" else "gone",
                                  incarnation=summary.incarnation, started_at=summary.started_at, summary=summary))
    rows.sort(key=lambda row: row.name)
    return GroupView(group=group, at=time.time(), rows=rows)


@dataclass(frozen=True)
class Rates:
    """Per-second rates between two summaries of one member's incarnation; `busy` is the share of that time spent
    in handlers (0..1, more when handlers overlap)."""

    received: float
    sent: float
    bytes_received: float
    bytes_sent: float
    busy: float


def rates(before: Summary, after: Summary) -> Rates | None:
    """The rates between two summaries, or None when they do not span time in one incarnation."""
    span = after.at - before.at
    if after.incarnation != before.incarnation or span <= 0:
        return None

    def per_second(name: str) -> float:
        change: float = getattr(after, name) - getattr(before, name)
        return max(0.0, change / span)

    return Rates(received=per_second("received"), sent=per_second("sent"), bytes_received=per_second("bytes_received"),
                 bytes_sent=per_second("bytes_sent"), busy=per_second("handler_seconds"))


class Watcher:
    """Reads a group again and again (`poll()`), remembering what it saw: the rates of each member between its last
    two summaries, and members that vanished from the registry altogether, kept as "gone" (or "left")."""

    def __init__(self, registry: Registry, group: str, *, remember: int = 10_000) -> None:
        self.registry = registry
        self.group = group
        self._remember = remember
        self._seen: dict[str, MemberRow] = {}
        self._previous: dict[str, Summary] = {}
        self._rates: dict[str, Rates] = {}

    def poll(self) -> GroupView:
        """One read of the group (`RegistryError` if the registry cannot be read): its rows, plus the rows of
        members seen before that the registry no longer holds anything of."""
        view = read_group(self.registry, self.group)
        present = {row.name for row in view.rows}
        for row in view.rows:
            summary = row.summary
            if summary is not None:
                previous = self._previous.get(row.name)
                if previous is not None and summary.at != previous.at:
                    found = rates(previous, summary)
                    if found is not None:
                        self._rates[row.name] = found
                    else:
                        self._rates.pop(row.name, None)
                if previous is None or summary.at != previous.at:
                    self._previous[row.name] = summary
            if row.state != "up":
                self._rates.pop(row.name, None)
            self._seen[row.name] = row
        vanished = [MemberRow(name=row.name, type=row.type, state="left" if row.state == "left" else "gone",
                              incarnation=row.incarnation, started_at=row.started_at, summary=row.summary)
                    for name, row in self._seen.items() if name not in present]
        for row in vanished:
            self._rates.pop(row.name, None)
        while len(self._seen) > self._remember:
            del self._seen[next(iter(self._seen))]
        return GroupView(group=view.group, at=view.at, rows=sorted(view.rows + vanished, key=lambda r: r.name))

    def rates(self, name: str) -> Rates | None:
        """The rates of `name` between its last two summaries (None: not two yet, or not up)."""
        return self._rates.get(name)


# ------------------------------------------------------------------------------------------- showing


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f}{unit}" if unit == "B" else f"{count:.1f}{unit}"
        count /= 1000
    return f"{count:.1f}TB"


def _rate(value: float) -> str:
    return f"{value:.0f}" if value >= 10 or value == 0 else f"{value:.1f}"


TABLE_COLUMNS = ("NAME", "TYPE", "STATE", "UP", "LEASE", "IN/s", "OUT/s", "RECEIVED", "SENT", "BYTES IN",
                 "BYTES OUT", "SESSIONS", "DONE", "FAILED", "HELD", "BUFFERED", "DROPPED", "HANDLER")
_RATE_COLUMNS = ("IN/s", "OUT/s")


def table(view: GroupView, rate_of: Mapping[str, Rates] | None = None) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """Column names and one tuple of display strings per row ("-": not known). Without `rate_of` (one snapshot
    has no rates) the IN/s and OUT/s columns are left out. Names and types are as the registry holds them:
    escape them before they reach a terminal."""
    columns = TABLE_COLUMNS if rate_of is not None else tuple(c for c in TABLE_COLUMNS if c not in _RATE_COLUMNS)
    out: list[tuple[str, ...]] = []
    for row in view.rows:
        s = row.summary
        up = _age(view.at - row.started_at) if row.started_at is not None and row.state == "up" else "-"
        lease = f"{row.lease_left:.1f}s" if row.lease_left is not None else "-"
        if s is None:
            counts: tuple[str, ...] = ("-",) * 11
        else:
            counts = (str(s.received), str(s.sent), _bytes(s.bytes_received), _bytes(s.bytes_sent),
                      str(s.sessions_live), str(s.sessions_completed), str(s.sessions_failed), str(s.held_now),
                      str(s.buffered), str(s.dropped_total), f"{s.handler_seconds:.2f}s")
        flows: tuple[str, ...] = ()
        if rate_of is not None:
            r = rate_of.get(row.name)
            flows = (_rate(r.received), _rate(r.sent)) if r is not None else ("-", "-")
        out.append((row.name, row.type, row.state, up, lease, *flows, *counts))
    return columns, out


def snapshot_json(view: GroupView, registry: str, rate_of: Mapping[str, Rates] | None = None) -> dict[str, Any]:
    """The view as plain JSON-able data: `{"group", "registry", "at", "members": [...]}`, each member with its
    `stats` (the summary's counters, or null) and `rates` (per second, or null)."""
    members: list[dict[str, Any]] = []
    for row in view.rows:
        s = row.summary
        r = (rate_of or {}).get(row.name)
        stats = None if s is None else {
            **{name: getattr(s, name) for name in _COUNT_FIELDS}, "dropped": dict(s.dropped), "published_at": s.at}
        members.append({
            "name": row.name, "type": row.type, "state": row.state, "address": row.address,
            "incarnation": row.incarnation, "started_at": row.started_at, "lease_left": row.lease_left,
            "stats": stats,
            "rates": None if r is None else {"received": r.received, "sent": r.sent,
                                             "bytes_received": r.bytes_received, "bytes_sent": r.bytes_sent,
                                             "busy": r.busy},
        })
    return {"group": view.group, "registry": registry, "at": view.at, "members": members}


# ------------------------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Metric:
    """One metric family for an exporter: Prometheus name (counters without their `_total`, which the exposition
    adds), kind ("counter" or "gauge"), help text, label names and samples `(label values, value)`."""

    name: str
    kind: str
    help: str
    labels: tuple[str, ...]
    samples: list[tuple[tuple[str, ...], float]] = field(default_factory=list)


_COUNTERS = (  # (metric name without _total, summary field, help)
    ("rallypoint_messages_received", "received", "Messages taken by the member."),
    ("rallypoint_messages_sent", "sent", "Messages the member sent."),
    ("rallypoint_received_bytes", "bytes_received", "Bytes of the messages the member took."),
    ("rallypoint_sent_bytes", "bytes_sent", "Bytes of the messages the member sent."),
    ("rallypoint_sessions_completed", "sessions_completed", "Sessions that completed at the member."),
    ("rallypoint_sessions_failed", "sessions_failed", "Sessions that failed at the member."),
    ("rallypoint_messages_held", "held", "Messages ever held for gone peers."),
    ("rallypoint_undelivered_messages", "undelivered", "Messages the member could not deliver before it closed."),
    ("rallypoint_peers_lost", "peers_lost", "Peers the member declared gone."),
    ("rallypoint_peers_left", "peers_left", "Peers that said goodbye to the member."),
    ("rallypoint_handler_calls", "handler_calls", "Calls of the member's @dist handlers."),
    ("rallypoint_handler_seconds", "handler_seconds", "Seconds spent in the member's @dist handlers."),
)
_GAUGES = (
    ("rallypoint_sessions_live", "sessions_live", "Sessions live at the member (waiting for or owing a reply)."),
    ("rallypoint_held_messages", "held_now", "Messages held for gone peers now."),
    ("rallypoint_buffered_messages", "buffered", "Messages waiting for the member's receive()."),
)


def metrics(view: GroupView) -> list[Metric]:
    """The group's metrics, labelled by group, member and type (and reason, for drops): whether each member is
    up, its lease, and the counters and gauges of its last summary. Left and gone members are reported as down
    with their last counters while the registry still holds their summary."""
    labels = ("group", "member", "type")
    up = Metric("rallypoint_member_up", "gauge", "1 while the member is listed in the registry and has not left.",
                labels)
    lease = Metric("rallypoint_member_lease_remaining_seconds", "gauge", "Seconds left on the member's lease.",
                   labels)
    published = Metric("rallypoint_member_stats_published_timestamp_seconds", "gauge",
                       "When the member last published its counters (Unix time).", labels)
    counters = [Metric(name, "counter", text, labels) for name, _, text in _COUNTERS]
    gauges = [Metric(name, "gauge", text, labels) for name, _, text in _GAUGES]
    dropped = Metric("rallypoint_dropped_messages", "counter", "Messages or frames the member dropped, by reason.",
                     (*labels, "reason"))
    for row in view.rows:
        key = (view.group, row.name, row.type)
        up.samples.append((key, 1.0 if row.state == "up" else 0.0))
        if row.lease_left is not None:
            lease.samples.append((key, row.lease_left))
        s = row.summary
        if s is None:
            continue
        published.samples.append((key, s.at))
        for metric, (_, attr, _) in zip(counters, _COUNTERS, strict=True):
            metric.samples.append((key, float(getattr(s, attr))))
        for metric, (_, attr, _) in zip(gauges, _GAUGES, strict=True):
            metric.samples.append((key, float(getattr(s, attr))))
        for reason, count in sorted(s.dropped.items()):
            dropped.samples.append(((*key, reason), float(count)))
    return [up, lease, published, *counters, *gauges, dropped]
