"""Every exception rallypoint raises, in one tree.

    Error                              root of everything rallypoint raises
    ├── ConfigError(ValueError)        a bad argument or option
    ├── ParseError(ValueError)         text that does not parse; .line .column .context .expected
    │   ├── RuleSyntaxError            a malformed rule expression
    │   └── SpecSyntaxError            a malformed session spec
    ├── SpecError(ValueError)          a spec that parses but does not compile; .line .column
    ├── UnknownRuleName(KeyError)      a handler key names no rule
    ├── SessionError                   something wrong with a session
    │   ├── UnknownSessionType(KeyError)
    │   ├── UnknownSession(KeyError)
    │   └── IllegalTransition          an event the session's current state does not accept
    ├── ProxyClosed                    the proxy was closed by us
    ├── RegistryError                  the registry (Redis) could not be reached or is inconsistent
    │   └── JoinTimeout(TimeoutError)  expected peers did not show up in time; .missing
    └── TransportError                 the network or a peer failed us; .replies .session_ids
        ├── Timeout(TimeoutError)      a blocking call ran out of time; .missing
        ├── PeerUnreachable            no live connection to that peer; .peer
        ├── PeerGone                   the peer died or left while we waited on it; .peer .peers .left
        ├── DeliveryRefused            a message could not be held for a gone peer (bound hit); .peer
        └── FrameError                 received frames that were dropped (counted and logged, never fatal)
            ├── MalformedFrame         garbage: frame count, header, version, codec or payload won't decode
            ├── ForgedFrame            the MAC does not match (wrong key, or altered in transit)
            ├── OversizedFrame         more than max_message_bytes, refused before hashing
            └── ReplayedFrame          a (source, incarnation, seq) already seen

This module is a leaf: at run time it imports nothing from rallypoint, so every layer can use it (the
engine's `Message` is imported for the type checker only).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rallypoint.engine import Message

__all__ = [
    "ConfigError",
    "DeliveryRefused",
    "Error",
    "ForgedFrame",
    "FrameError",
    "IllegalTransition",
    "JoinTimeout",
    "MalformedFrame",
    "OversizedFrame",
    "ParseError",
    "PeerGone",
    "PeerUnreachable",
    "ProxyClosed",
    "RegistryError",
    "ReplayedFrame",
    "RuleSyntaxError",
    "SessionError",
    "SpecError",
    "SpecSyntaxError",
    "Timeout",
    "TransportError",
    "UnknownRuleName",
    "UnknownSession",
    "UnknownSessionType",
]


class Error(Exception):
    """Root of everything rallypoint raises."""


class ConfigError(Error, ValueError):
    """A bad argument, option or configuration value."""


class ParseError(Error, ValueError):
    """Text that does not parse; says where, shows the line with a caret and what was expected."""

    def __init__(
        self,
        message: str,
        *,
        line: int | None = None,
        column: int | None = None,
        context: str = "",
        expected: Iterable[str] = (),
        text: str = "",
    ) -> None:
        self.line = line
        self.column = column
        self.context = context
        self.expected = tuple(sorted(set(expected)))
        self.text = text
        self.reason = message
        super().__init__(self._render())

    def _render(self) -> str:
        where = f" at line {self.line}, column {self.column}" if self.line is not None else ""
        parts = [f"{self.reason}{where}"]
        if self.context:
            parts.append(self.context.rstrip("\n"))
        if self.expected:
            parts.append("expected one of: " + ", ".join(self.expected))
        return "\n".join(parts)


class RuleSyntaxError(ParseError):
    """A malformed rule expression (for example `worker:update:` or `a:b:1 AND`)."""


class SpecSyntaxError(ParseError):
    """A session spec file or string that does not parse."""


class SpecError(Error, ValueError):
    """A spec that parses but does not compile: unknown or unreachable state, duplicate name, ...

    With the spec's `text`, the message also names its `origin` and shows the line with a caret.
    """

    def __init__(
        self,
        message: str,
        *,
        line: int | None = None,
        column: int | None = None,
        origin: str | None = None,
        text: str = "",
    ) -> None:
        self.line = line
        self.column = column
        self.reason = message
        self.origin = origin
        self.context = _caret(text, line, column) if text else ""
        where = f" (line {line}, column {column})" if line is not None else ""
        prefix = f"{origin}: " if origin and not message.startswith(f"{origin}:") else ""
        super().__init__(f"{prefix}{message}{where}" + (f"\n{self.context}" if self.context else ""))


def _caret(text: str, line: int | None, column: int | None) -> str:
    lines = text.split("\n")  # as Lark counts lines: not at \f, \v or the other splitlines() breaks
    if line is None or column is None or not 1 <= line <= len(lines):
        return ""
    source = lines[line - 1].removesuffix("\r")
    # Tabs before the column widen it on a terminal, as ParseError's caret allows for too.
    return f"{source}\n{' ' * len(source[: column - 1].expandtabs())}^"


class UnknownRuleName(Error, KeyError):
    """A handler key names a rule that no loaded spec defines."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class SessionError(Error):
    """Something is wrong with a session."""


class UnknownSessionType(SessionError, KeyError):
    """No session type of that name is loaded."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnknownSession(SessionError, KeyError):
    """No session with that id is tracked."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class IllegalTransition(SessionError):
    """An event the session's current state does not accept."""

    def __init__(self, session_id: str, session_type: str, state: str, event: str) -> None:
        self.session_id = session_id
        self.session_type = session_type
        self.state = state
        self.event = event
        super().__init__(
            f"session {session_id} ({session_type}) in state {state!r} does not accept event {event!r}"
        )


class ProxyClosed(Error):
    """The proxy was closed (by us) and can no longer be used."""


class RegistryError(Error):
    """The registry (Redis or embedded) could not be reached, or holds something unusable."""


class JoinTimeout(RegistryError, TimeoutError):
    """The expected peers did not all register before the join deadline."""

    def __init__(self, message: str, missing: dict[str, int] | None = None) -> None:
        self.missing = dict(missing or {})
        super().__init__(message)


class TransportError(Error):
    """The network or a peer failed us.

    A call that waited on several sessions says how far it got: `.replies` holds the replies that did
    arrive (in the order the sessions were sent) and `.session_ids` the sessions the failure hit; both are
    empty when the failure is not about sessions.
    """

    def __init__(
        self, *args: object, replies: Iterable[Message] = (), session_ids: Iterable[str] = ()
    ) -> None:
        super().__init__(*args)
        self.replies: list[Message] = list(replies)
        self.session_ids: tuple[str, ...] = tuple(session_ids)


class Timeout(TransportError, TimeoutError):
    """A blocking call ran out of time; `.missing` names what did not arrive (session ids or peers)."""

    def __init__(
        self,
        message: str,
        missing: Iterable[str] = (),
        *,
        replies: Iterable[Message] = (),
        session_ids: Iterable[str] = (),
    ) -> None:
        self.missing = tuple(missing)
        super().__init__(message, replies=replies, session_ids=session_ids)


class _PeerError(TransportError):
    """A transport error about one peer, named in `.peer` (the message defaults to `_about` with it filled in)."""

    _about = "peer {peer!r}"

    def __init__(
        self,
        peer: str,
        message: str | None = None,
        *,
        replies: Iterable[Message] = (),
        session_ids: Iterable[str] = (),
    ) -> None:
        self.peer = peer
        super().__init__(message or self._about.format(peer=peer), replies=replies, session_ids=session_ids)


class PeerUnreachable(_PeerError):
    """There is no live connection to that peer (never joined, or not reconnected yet)."""

    _about = "peer {peer!r} is unreachable"


class PeerGone(TransportError):
    """The peer died or left while we were waiting on it.

    `.peers` names every peer the error is about (`.peer` is the first); `.left` is True when they all closed
    normally (said goodbye) rather than crashed, froze or were cut off.
    """

    def __init__(
        self,
        peer: str,
        message: str | None = None,
        session_ids: Iterable[str] = (),  # also positional, as before `replies` existed
        *,
        replies: Iterable[Message] = (),
        peers: Iterable[str] = (),
        left: bool = False,
    ) -> None:
        self.peer = peer
        self.peers: tuple[str, ...] = tuple(peers) or (peer,)
        self.left = left
        default = f"peer {peer!r} {'left' if left else 'is gone'}"
        super().__init__(message or default, replies=replies, session_ids=session_ids)


class DeliveryRefused(_PeerError):
    """A message for a gone peer could not be held (the hold bound was hit) and was not sent."""

    _about = "message for gone peer {peer!r} was refused: hold bound reached"


class FrameError(TransportError):
    """Received frames that cannot be accepted; the receiver drops, counts and logs them and goes on."""


class MalformedFrame(FrameError):
    """Garbage: bad frame count, undecodable header, unknown version or codec, or an undecodable payload."""


class ForgedFrame(FrameError):
    """The MAC does not match: not signed with the group key, or altered in transit."""


class OversizedFrame(FrameError):
    """The frames add up to more than `max_message_bytes`; refused from their lengths, before hashing."""


class ReplayedFrame(FrameError):
    """A frame seen before: a sequence number already seen for its sender, or meant for an earlier process."""
