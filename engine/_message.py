"""Message and SessionMessage: what travels between proxies."""

from __future__ import annotations

from enum import Enum
from typing import Any

from ._ids import new_id


class SessionType(str, Enum):
    """The two built-in session types; their state machines are defined in `specs/`.

    A user-defined type is named by a plain string (the `session` name in a loaded spec file).
    """

    TASK = "task"
    NOTIFICATION = "notification"

    def __str__(self) -> str:
        return self.value


def tag_text(tag: Any) -> str:
    """The text a tag is matched and sent by: an Enum by its value, anything else by `str()`."""
    if isinstance(tag, str):
        return tag.value if isinstance(tag, Enum) else tag
    if isinstance(tag, Enum):
        return str(tag.value)
    return str(tag)


class Message:
    """A unit of communication between components.

        >>> m = Message(tag="check_in", source="worker_001", destination="master", payload="")
        >>> m.tag, m.source, m.destination
        ('check_in', 'worker_001', 'master')

    `session_id` and `message_id` are generated (UUID text) unless given. `source` may be left out of a message
    you send: the proxy fills in its own name (and refuses another one, which receivers would drop).
    """

    __slots__ = ("tag", "source", "destination", "payload", "session_id", "message_id")

    def __init__(
        self,
        tag: Any,
        source: str = "",
        destination: str = "",
        payload: Any = None,
        session_id: str | None = None,
        message_id: str | None = None,
    ) -> None:
        self.tag = tag
        self.source = source
        self.destination = destination
        self.payload = payload
        self.session_id = session_id if session_id is not None else new_id()
        self.message_id = message_id if message_id is not None else new_id()

    @property
    def tag_text(self) -> str:
        """The tag as matched by rules and sent on the wire (Enum tags by value)."""
        return tag_text(self.tag)

    def reply_message(self, source: str, tag: Any = None, payload: Any = None) -> Message:
        """A new message in this session, addressed back to this message's source."""
        return Message(
            tag=self.tag if tag is None else tag,
            source=source,
            destination=self.source,
            payload=payload,
            session_id=self.session_id,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(tag={self.tag!r}, source={self.source!r}, "
            f"destination={self.destination!r}, session_id={self.session_id!r}, "
            f"message_id={self.message_id!r})"
        )


class SessionMessage(Message):
    """A message that belongs to a session whose stages the proxy tracks.

        >>> task = SessionMessage(tag="sum", source="master", destination="worker_001",
        ...                       payload=[0, 1, 2], session_type=SessionType.TASK)
        >>> task.session_stage
        'request'

    `session_type` is a `SessionType` or the name of a user-defined session type from a loaded spec.
    `session_stage` defaults to `request` for the built-in types; for a user-defined type it stays None
    until whoever tracks the session (the proxy, `SessionTracker.start`) sets the initial stage from its own
    catalog: a message consults no process-wide state. `event`, when given, is the event the receiver fires
    on this session when the message arrives (for user-defined types; the built-in ones need none: arrival
    fires `received`, a reply's arrival fires `completed`).
    """

    __slots__ = ("session_type", "session_stage", "event")

    def __init__(
        self,
        tag: Any,
        source: str = "",
        destination: str = "",
        payload: Any = None,
        session_type: SessionType | str = SessionType.TASK,
        session_stage: str | None = None,
        session_id: str | None = None,
        message_id: str | None = None,
        event: str | None = None,
    ) -> None:
        # Message.__init__'s body, inlined: building a SessionMessage is on the per-message path.
        self.tag = tag
        self.source = source
        self.destination = destination
        self.payload = payload
        self.session_id = session_id if session_id is not None else new_id()
        self.message_id = message_id if message_id is not None else new_id()
        self.session_type = session_type
        if session_stage is None:
            # Identity first: hashing a str-Enum member runs Enum.__hash__ in Python (~0.2 us).
            session_stage = "request" if session_type is _TASK or session_type is _NOTIFICATION else (
                _BUILTIN_INITIAL.get(session_type))
        self.session_stage = session_stage
        self.event = event

    @property
    def session_type_name(self) -> str:
        st = self.session_type
        # `_value_` is a plain attribute; `.value` goes through Enum's descriptor (~10x slower, per message).
        return st._value_ if isinstance(st, SessionType) else str(st)

    def reply_message(
        self, source: str, tag: Any = None, payload: Any = None, *, stage: str | None = None,
        event: str | None = None,
    ) -> SessionMessage:
        """A new message in this session, addressed back to this message's source."""
        return SessionMessage(  # positional: keyword calls cost more, and replies are on every round trip
            self.tag if tag is None else tag,
            source,
            self.source,
            payload,
            self.session_type,
            stage if stage is not None else self.session_stage,
            self.session_id,
            None,
            event,
        )

    def __repr__(self) -> str:
        return (
            f"SessionMessage(tag={self.tag!r}, source={self.source!r}, destination={self.destination!r}, "
            f"session_type={self.session_type_name!r}, session_stage={self.session_stage!r}, "
            f"session_id={self.session_id!r}, message_id={self.message_id!r})"
        )


# SessionType is a str Enum, so its members hash and compare like their values: one dict lookup serves both
# spellings. Only the built-in types are known here; a user-defined type's initial stage is its catalog's.
_BUILTIN_INITIAL: dict[object, str] = {"task": "request", "notification": "request"}
_TASK, _NOTIFICATION = SessionType.TASK, SessionType.NOTIFICATION
