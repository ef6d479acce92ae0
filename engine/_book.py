"""The session book: one record per session a proxy takes part in. Pure: no I/O, no clock, no threads.

A record holds everything the proxy knows of a session in one place: its type and stage (stepped through
the type's compiled transition table), the peer on the other side, whether a reply is owed to us, and, when
the session ended without one, why (`Ended`). The proxy asks the book, never a set of its own kept in step.

    >>> from rallypoint.engine import SessionCatalog, SessionMessage
    >>> book = SessionBook()
    >>> task = SessionMessage("sum", "master", "worker_1", payload=[1, 2])
    >>> book.open(task, SessionCatalog().require("task")).awaiting
    True
    >>> book.end_with_peer("worker_1", Ended.GONE) == [task.session_id]
    True
    >>> book.outcome(task.session_id)
    <Ended.GONE: 'gone'>

Live records stay until their session reaches a final state or ends; finished ones move to a bounded LRU
(`max_finished`), so a late question about a recent session still has an answer and memory stays bounded.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from enum import Enum
from typing import Any

from rallypoint.errors import IllegalTransition, UnknownSession

from ._message import Message, SessionMessage
from ._sessions import CompiledSessionType

__all__ = ["RAISED_ENDINGS", "Arrival", "Ended", "SessionBook", "SessionRecord", "expects_reply"]

# Events the proxy fires by itself on a one-way session: arrival, loss of the peer, expiry.
_ONE_WAY_EVENTS = frozenset({"received", "peer_lost", "timeout"})
_one_way_cache: dict[int, bool] = {}


def expects_reply(kind: CompiledSessionType | None) -> bool:
    """Whether a message of this type waits for an answer: a type whose only events are arrival, peer loss and
    expiry (a notification) is one-way; a plain Message (no type) always expects one."""
    if kind is None:
        return True
    key = id(kind)
    cached = _one_way_cache.get(key)
    if cached is None:
        cached = _one_way_cache[key] = not set(kind.events) <= _ONE_WAY_EVENTS
    return cached


class Ended(str, Enum):
    """Why a session ended without the reply it waited for."""

    GONE = "gone"  # its peer crashed, was cut off or restarted
    LEFT = "left"  # its peer closed normally before answering
    REFUSED = "refused"  # the message was held for a gone peer and expired before it came back
    FAILED = "failed"  # sending it failed (no channel, a full queue)
    CANCELLED = "cancelled"  # the caller gave up on it (an async task cancelled)


RAISED_ENDINGS = frozenset({Ended.GONE, Ended.LEFT, Ended.REFUSED})
"""Endings the caller waiting on a session must hear of (PeerGone, DeliveryRefused); the others were raised by
the call that sent it, or by the caller giving up."""


class Arrival(Enum):
    """What the book made of an incoming message."""

    TAKEN = 1  # deliver it
    LATE = 2  # its session already ended without it: drop it (outcomes are decided once)
    ILLEGAL_EVENT = 3  # deliver it, but the event it carries was not legal in its session's stage
    UNKNOWN_TYPE = 4  # deliver it untracked: its session type is not in this proxy's catalog


class SessionRecord:
    """One session as the book knows it.

    `kind` is None for a plain `Message` (no stages: `state` is None). `peer` is the other side: who owes
    the reply while `awaiting`. `ended` says why the session ended without it, and `ended_peer` who it was.
    """

    __slots__ = ("id", "kind", "state", "peer", "awaiting", "ended", "ended_peer")

    def __init__(self, session_id: str, kind: CompiledSessionType | None, state: str | None, peer: str,
                 awaiting: bool) -> None:
        self.id = session_id
        self.kind = kind
        self.state = state
        self.peer = peer
        self.awaiting = awaiting
        self.ended: Ended | None = None
        self.ended_peer = ""

    @property
    def is_final(self) -> bool:
        kind = self.kind
        return kind is not None and self.state in kind._finals

    def __repr__(self) -> str:
        kind = self.kind.name if self.kind is not None else "message"
        return (f"SessionRecord({self.id!r}, {kind}, state={self.state!r}, peer={self.peer!r}, "
                f"awaiting={self.awaiting}, ended={self.ended and self.ended.value!r})")


class SessionBook:
    """Every session a proxy takes part in: live records by id, and a bounded LRU of finished ones."""

    def __init__(self, max_finished: int = 100_000) -> None:
        self.max_finished = max_finished
        self._live: dict[str, SessionRecord] = {}
        self._finished: OrderedDict[str, SessionRecord] = OrderedDict()
        self.completed = 0  # sessions that finished (a final state, or a one-way message sent or taken)
        self.failed = 0  # sessions that ended without their reply, or in a state named "failed"

    # -------------------------------------------------------------------------- what we send

    def open(self, message: Message, kind: CompiledSessionType | None) -> SessionRecord:
        """Record a message we originate (send, scatter, broadcast): its session starts here, or, if an
        earlier attempt in the same session ended without a reply, starts afresh."""
        sid = message.session_id
        old = self._live.get(sid)
        if old is None:
            old = self._finished.get(sid)
        if old is not None and old.ended is not None:
            self.forget(sid)
            old = None
        if kind is None:
            record = old or SessionRecord(sid, None, None, message.destination, True)
            record.awaiting = True
            record.peer = message.destination
            self._live[sid] = record
            return record
        assert isinstance(message, SessionMessage)
        stage = message.session_stage
        if stage is None:
            stage = message.session_stage = kind.initial
        awaits = _one_way_cache.get(id(kind))
        if awaits is None:
            awaits = expects_reply(kind)
        if old is not None:  # a second request in a session we know: the stage goes on from where it is
            old.peer = message.destination
            old.awaiting = awaits and not old.is_final
            return old
        record = SessionRecord(sid, kind, stage, message.destination, awaits)
        if stage in kind._finals:
            self._finish(record)
        else:
            self._live[sid] = record
        return record

    def await_reply(self, session_id: str, peer: str) -> None:
        """A reply in `session_id` is owed to us by `peer` (a message we forwarded there)."""
        record = self._live.get(session_id) or self._finished.pop(session_id, None)
        if record is None:
            record = SessionRecord(session_id, None, None, peer, True)
        record.peer = peer
        record.awaiting = True
        record.ended = None
        self._live[session_id] = record

    def sent_one_way(self, session_id: str) -> None:
        """A one-way message went out: nothing comes back for it, so it leaves the live index."""
        record = self._live.pop(session_id, None)
        if record is not None:
            record.awaiting = False
            self._finish(record)

    def answer(self, session_id: str, event: str | None) -> str | None:
        """We reply in `session_id`: fire the user's `event` (IllegalTransition if the stage refuses it) or
        else `completed` where the stage takes it. Returns the stage the reply carries (None: unknown)."""
        record = self._live.get(session_id) or self._finished.get(session_id)
        if record is None or record.kind is None:
            return None
        if event is not None:
            self._fire(record, event)
        else:
            self._try_fire(record, "completed")
        return record.state

    def end(self, session_id: str, why: Ended, peer: str = "", event: str | None = "peer_lost") -> bool:
        """End one session without its reply (a send failed, a held message expired, the caller gave up) and
        fire `event` where its stage takes it (None: none); True if it was waiting for a reply."""
        record = self._live.get(session_id)
        if record is None:
            return False
        was_awaiting = record.awaiting
        if was_awaiting:
            record.awaiting = False
            record.ended = why
            record.ended_peer = peer or record.peer
        if record.kind is not None and event is not None:
            self._try_fire(record, event)
        if was_awaiting and self._live.get(session_id) is record:
            del self._live[session_id]
            self._finish(record)
        return was_awaiting

    def end_with_peer(self, peer: str, why: Ended, keep: Iterable[str] = ()) -> list[str]:
        """`peer` is gone or left: every live session with it ends (`peer_lost` fires where the stage takes
        it), except those in `keep` (messages still held for it, which wait for its successor). Returns the
        sessions that were waiting for a reply from it."""
        spared = set(keep)
        ended = []
        for record in [r for r in self._live.values() if r.peer == peer and r.id not in spared]:
            if self.end(record.id, why, peer):
                ended.append(record.id)
        return ended

    # ------------------------------------------------------------------------- what arrives

    def arrive(self, message: Message, kind_of: Callable[[Any], CompiledSessionType | None]) -> Arrival:
        """Account for an incoming message. `kind_of` finds a session type by name in the catalog (None if the
        catalog lacks it); it is asked only for the first message of a session."""
        sid = message.session_id
        live = self._live
        record = live.get(sid)
        awaited = False  # a reply to a session of ours that is not over with it: more may be owed
        if record is None:
            record = self._finished.get(sid)
            if record is not None and record.ended is not None:
                return Arrival.LATE
        elif record.awaiting:
            record.awaiting = False
            if record.is_final or record.kind is None:  # kept live only for the reply that just came
                del live[sid]
                self._finish(record)
            else:
                awaited = True
        if type(message) is Message:
            return Arrival.TAKEN
        user_event = message.event  # type: ignore[attr-defined]
        if record is None or record.kind is None:
            kind = kind_of(message.session_type)  # type: ignore[attr-defined]
            if kind is None:
                return Arrival.UNKNOWN_TYPE
            # A session that starts here (a task or notification for us): `_try_fire` inlined, on every one.
            event = user_event or "received"
            dest = kind._next.get((kind.initial, event))
            record = SessionRecord(sid, kind, kind.initial if dest is None else dest, message.source, False)
            if dest is None:
                live[sid] = record
                return Arrival.TAKEN if user_event is None else Arrival.ILLEGAL_EVENT
            if dest in kind._finals:
                live.pop(sid, None)
                self._finish(record)
            else:
                live[sid] = record
            return Arrival.TAKEN
        else:
            event = user_event or "completed"
        fired = self._try_fire(record, event)
        if awaited and not record.is_final and live.get(sid) is record:
            record.awaiting = True  # a session type of the user's: its replies are owed until it ends
        if fired or user_event is None:
            return Arrival.TAKEN
        return Arrival.ILLEGAL_EVENT

    # ------------------------------------------------------------------------------ queries

    def get(self, session_id: str) -> SessionRecord | None:
        """The record of `session_id`, live or recently finished, or None."""
        return self._live.get(session_id) or self._finished.get(session_id)

    def stage(self, session_id: str) -> str:
        """The stage of a session with stages; UnknownSession for one this book never saw (or long gone)."""
        record = self.get(session_id)
        if record is None or record.state is None:
            raise UnknownSession(f"no session {session_id!r} is tracked (or it finished long ago)")
        return record.state

    def awaiting(self) -> Iterator[SessionRecord]:
        """Live sessions waiting for a reply."""
        return (r for r in self._live.values() if r.awaiting)

    def may_still_answer(self, session_id: str) -> bool:
        """Whether `receive_by_id` should wait for this session: a reply is owed, the session ended (the
        caller must hear why), or it is unknown (a reply may still come for it)."""
        record = self._live.get(session_id) or self._finished.get(session_id)
        if record is None:
            return True
        if record.awaiting or record.ended in RAISED_ENDINGS:
            return True
        return record.ended is None and record.kind is not None and expects_reply(record.kind) and not record.is_final

    def live_records(self) -> list[SessionRecord]:
        """Every live session's record."""
        return list(self._live.values())

    def live_with(self, peer: str) -> int:
        """How many live sessions have `peer` on the other side."""
        return sum(1 for r in self._live.values() if r.peer == peer)

    @property
    def live(self) -> int:
        return len(self._live)

    def __len__(self) -> int:
        return len(self._live)

    def forget(self, session_id: str) -> None:
        self._live.pop(session_id, None)
        self._finished.pop(session_id, None)

    # ---------------------------------------------------------------------------- internals

    def _fire(self, record: SessionRecord, event: str) -> None:
        kind = record.kind
        assert kind is not None and record.state is not None
        dest = kind._next.get((record.state, event))
        if dest is None or self._live.get(record.id) is not record:
            raise IllegalTransition(record.id, kind.name, record.state, event)
        self._move(record, dest)

    def _try_fire(self, record: SessionRecord, event: str) -> bool:
        kind = record.kind
        if kind is None or self._live.get(record.id) is not record:
            return False
        dest = kind._next.get((record.state, event))  # type: ignore[arg-type]
        if dest is None:
            return False
        self._move(record, dest)
        return True

    def _move(self, record: SessionRecord, dest: str) -> None:
        record.state = dest
        if dest in record.kind._finals and not record.awaiting:  # type: ignore[union-attr]
            del self._live[record.id]
            self._finish(record)

    def _finish(self, record: SessionRecord) -> None:
        if record.ended is not None or record.state == "failed":
            self.failed += 1
        else:
            self.completed += 1
        if self.max_finished == 0:
            return
        finished = self._finished
        finished[record.id] = record
        if len(finished) > self.max_finished:
            finished.popitem(last=False)

    def __repr__(self) -> str:
        return f"SessionBook(live={len(self._live)}, finished={len(self._finished)})"
