"""The inbox: received messages nobody has taken yet, in arrival order, with an index by session so that
`receive_by_id` finds its own while the rest wait for `receive()`."""

from __future__ import annotations

from collections import OrderedDict, deque

from rallypoint.engine import Message


class Inbox:
    """Buffered messages by id (arrival order) and by session; at most `limit` of them."""

    __slots__ = ("limit", "_messages", "_by_session")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._messages: OrderedDict[str, Message] = OrderedDict()
        self._by_session: dict[str, deque[str]] = {}

    def put(self, message: Message) -> Message | None:
        """Buffer `message`; when full, the oldest buffered message makes room and is returned."""
        evicted = None
        if len(self._messages) >= self.limit:
            _, evicted = self._messages.popitem(last=False)
            self._unindex(evicted)
        self._messages[message.message_id] = message
        ids = self._by_session.get(message.session_id)
        if ids is None:
            self._by_session[message.session_id] = deque((message.message_id,))
        else:
            ids.append(message.message_id)
        return evicted

    def take(self) -> Message | None:
        """The oldest buffered message, or None."""
        if not self._messages:
            return None
        _, message = self._messages.popitem(last=False)
        self._unindex(message)
        return message

    def take_session(self, session_id: str) -> Message | None:
        """The oldest buffered message of `session_id`, or None."""
        ids = self._by_session.get(session_id)
        if not ids:
            return None
        message_id = ids.popleft()
        if not ids:
            del self._by_session[session_id]
        return self._messages.pop(message_id)

    def _unindex(self, message: Message) -> None:
        ids = self._by_session[message.session_id]
        if ids[0] == message.message_id:
            ids.popleft()
        else:
            ids.remove(message.message_id)
        if not ids:
            del self._by_session[message.session_id]

    def has_session(self, session_id: str) -> bool:
        return session_id in self._by_session

    def __len__(self) -> int:
        return len(self._messages)
