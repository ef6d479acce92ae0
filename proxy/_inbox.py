"""The inbox: received messages nobody has taken yet, in arrival order, with an index by session so that
`receive_by_id` finds its own while the rest wait for `receive()`."""

from __future__ import annotations

from collections import deque

from rallypoint.engine import Message


class Inbox:
    """Buffered messages in arrival order and by session; at most `limit` of them, and at most `byte_limit`
    bytes as they arrived on the wire (the oldest make room, and are returned to be counted and logged).

    Arrival order is a deque of the messages themselves. A message taken by session from the middle of it
    (not from either end) stays there as a tombstone (its `id()` in `_taken`; the deque keeps the object
    alive, so the id cannot be reused meanwhile) until `take` passes it, or until tombstones outnumber the
    buffered messages and the deque is rebuilt without them: memory stays bounded by about 2 x `limit`.
    """

    __slots__ = ("limit", "byte_limit", "_order", "_by_session", "_taken", "_count", "_sizes", "_bytes")

    def __init__(self, limit: int, byte_limit: int | None = None) -> None:
        self.limit = limit
        self.byte_limit = byte_limit
        self._sizes: dict[int, int] = {}  # id(message) -> its size on the wire, for the byte bound
        self._bytes = 0
        self._order: deque[Message] = deque()
        # session id -> its one buffered message (the common case), or a deque of them, oldest first
        self._by_session: dict[str, Message | deque[Message]] = {}
        self._taken: set[int] = set()
        self._count = 0

    def put(self, message: Message, nbytes: int = 0) -> list[Message]:
        """Buffer `message` (`nbytes` on the wire); when full, in messages or bytes, the oldest buffered
        messages make room and are returned."""
        evicted: list[Message] = []
        if self._count >= self.limit:
            evicted.append(self.take())  # type: ignore[arg-type]
        if nbytes:
            limit = self.byte_limit
            if limit is not None:
                while self._count and self._bytes + nbytes > limit:
                    evicted.append(self.take())  # type: ignore[arg-type]
            self._sizes[id(message)] = nbytes
            self._bytes += nbytes
        self._order.append(message)
        self._count += 1
        sid = message.session_id
        by_session = self._by_session
        same = by_session.get(sid)
        if same is None:
            by_session[sid] = message
        elif type(same) is deque:
            same.append(message)
        else:
            by_session[sid] = deque((same, message))  # type: ignore[arg-type]
        return evicted

    def take(self) -> Message | None:
        """The oldest buffered message, or None."""
        order = self._order
        taken = self._taken
        while order:
            message = order.popleft()
            if taken and id(message) in taken:
                taken.discard(id(message))
                continue
            self._count -= 1
            if self._sizes:
                self._bytes -= self._sizes.pop(id(message), 0)
            by_session = self._by_session
            sid = message.session_id
            same = by_session[sid]
            if same is message:
                del by_session[sid]
            else:  # a deque of this session's messages, oldest first: this one leads it
                same.popleft()  # type: ignore[union-attr]
                if len(same) == 1:  # type: ignore[arg-type]
                    by_session[sid] = same[0]  # type: ignore[index]
            return message
        return None

    def take_session(self, session_id: str) -> Message | None:
        """The oldest buffered message of `session_id`, or None."""
        by_session = self._by_session
        same = by_session.get(session_id)
        if same is None:
            return None
        if type(same) is deque:
            message = same.popleft()
            if len(same) == 1:
                by_session[session_id] = same[0]
        else:
            message = same  # type: ignore[assignment]
            del by_session[session_id]
        self._count -= 1
        if self._sizes:
            self._bytes -= self._sizes.pop(id(message), 0)
        order = self._order
        if order[-1] is message:  # the newest (a reply that just came): no tombstone needed
            order.pop()
        elif order[0] is message:
            order.popleft()
        else:
            self._taken.add(id(message))
            if len(self._taken) > 64 and len(self._taken) > self._count:
                self._compact()
        return message

    def _compact(self) -> None:
        taken = self._taken
        self._order = deque(m for m in self._order if id(m) not in taken)
        taken.clear()

    def has_session(self, session_id: str) -> bool:
        return session_id in self._by_session

    @property
    def nbytes(self) -> int:
        """The buffered messages' size on the wire."""
        return self._bytes

    def __len__(self) -> int:
        return self._count
