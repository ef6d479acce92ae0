"""The lean floor: the least a pure-Python layer with rallypoint's per-message features must do, on raw pyzmq.

Per message, as rallypoint does it: two fresh ids, a msgpack header naming tag, source, destination, session,
message, session type and sequence number; the payload pickled; a keyed BLAKE2b MAC over header and payload;
on arrival the MAC checked, the header unpacked, the sequence number checked against replay, the message id
against duplicates (bounded window), a message object built, and the session's stage recorded.

Left out, so this is a floor and not a rival: rallypoint's checks on every field, its error handling, state
machines with more than a dict entry, buffered receive_by_id, peers that come and go, held messages.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import os
import pickle
from collections import deque

import msgpack
import zmq

_NOBLOCK_MORE = zmq.SNDMORE


class LeanMessage:
    __slots__ = ("tag", "source", "destination", "payload", "session_id", "message_id")

    def __init__(self, tag, source, destination, payload, session_id, message_id) -> None:
        self.tag = tag
        self.source = source
        self.destination = destination
        self.payload = payload
        self.session_id = session_id
        self.message_id = message_id


class LeanEnd:
    """One side: `send(sock, ...)` frames a message onto a socket, `receive(frames)` takes one apart."""

    def __init__(self, name: str, key: bytes) -> None:
        self.name = name
        self._mac = hashlib.blake2b(key=key, digest_size=16)
        self._packer = msgpack.Packer()
        self._ids = itertools.count()
        self._prefix = os.urandom(6).hex()
        self._seq = 0
        self._last_seq: dict[str, int] = {}
        self._seen: set[str] = set()
        self._order: deque[str] = deque()
        self.sessions: dict[str, str] = {}

    def send(self, sock, peer_frames: list, tag: str, destination: str, payload, session_id: str | None = None,
             stage: str = "request") -> str:
        message_id = f"{self._prefix}{next(self._ids)}"
        session_id = session_id or f"{self._prefix}{next(self._ids)}"
        self._seq += 1
        header = self._packer.pack((tag, self.name, destination, session_id, message_id, "task", self._seq))
        body = pickle.dumps(payload, protocol=5)
        mac = self._mac.copy()
        mac.update(header)
        mac.update(body)
        self.sessions[session_id] = stage
        for frame in peer_frames:  # a routing id, for a ROUTER socket
            sock.send(frame, _NOBLOCK_MORE)
        sock.send(header, _NOBLOCK_MORE)
        sock.send(body, _NOBLOCK_MORE)
        sock.send(mac.digest())
        return session_id

    def receive(self, header: bytes, body: bytes, tag: bytes) -> LeanMessage | None:
        mac = self._mac.copy()
        mac.update(header)
        mac.update(body)
        if not hmac.compare_digest(mac.digest(), tag):
            return None
        tag_, source, destination, session_id, message_id, _kind, seq = msgpack.unpackb(header)
        if seq <= self._last_seq.get(source, 0):
            return None
        self._last_seq[source] = seq
        if message_id in self._seen:
            return None
        self._seen.add(message_id)
        self._order.append(message_id)
        if len(self._order) > 10_000:
            self._seen.discard(self._order.popleft())
        message = LeanMessage(tag_, source, destination, pickle.loads(body), session_id, message_id)
        self.sessions[session_id] = "receive"
        return message
