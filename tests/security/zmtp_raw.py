"""A raw ZMTP 3.0 client over a plain TCP socket, for attack tests: it can send what libzmq will not
(a multipart message that never ends, millions of empty parts, a part header announcing more bytes than the
receiver allows, garbage). NULL and PLAIN mechanisms, client side only; written from the ZMTP 3.0 spec
(rfc.zeromq.org/spec/23) and PLAIN (spec 24).

    >>> with RawZmtp("127.0.0.1", port, mechanism="PLAIN", password=token) as raw:
    ...     raw.handshake()             # True once the server said READY, False if it refused
    ...     raw.send_part(b"x", more=True)
"""

from __future__ import annotations

import socket
import struct

MORE, LONG, COMMAND = 0x01, 0x02, 0x04


def greeting(mechanism: str) -> bytes:
    """The 64-byte ZMTP 3.0 greeting of a client using `mechanism`."""
    return b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + mechanism.encode().ljust(20, b"\0") + b"\0" + bytes(31)


def frame_header(size: int, flags: int = 0) -> bytes:
    """The flags and size of one frame (short form below 256 bytes)."""
    if size < 256:
        return bytes((flags, size))
    return bytes((flags | LONG,)) + struct.pack(">Q", size)


def command(name: bytes, body: bytes) -> bytes:
    data = bytes((len(name),)) + name + body
    return frame_header(len(data), COMMAND) + data


def metadata(**props: bytes) -> bytes:
    out = b""
    for key, value in props.items():
        name = key.replace("_", "-").encode()
        out += bytes((len(name),)) + name + struct.pack(">I", len(value)) + value
    return out


class RawZmtp:
    """One TCP connection speaking ZMTP 3.0 as a DEALER client (NULL or PLAIN)."""

    def __init__(self, host: str, port: int, *, mechanism: str = "NULL", username: bytes = b"rallypoint",
                 password: bytes = b"", timeout: float = 5.0) -> None:
        self.mechanism = mechanism
        self.username = username
        self.password = password
        self.sock = socket.create_connection((host, port), timeout=timeout)

    def _read_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed by the server")
            data += chunk
        return data

    def _read_command(self) -> bytes:
        flags, size = self._read_exact(2)
        if flags & LONG:
            size = struct.unpack(">Q", bytes((size,)) + self._read_exact(7))[0]
        body = self._read_exact(size)
        return body[1:1 + body[0]]  # the command name

    def handshake(self) -> bool:
        """Greeting plus the mechanism's commands; True if the server answered READY. False on ERROR or
        when the server closes the connection (a refused handshake)."""
        try:
            self.sock.sendall(greeting(self.mechanism))
            self._read_exact(64)
            ready = command(b"READY", metadata(Socket_Type=b"DEALER"))
            if self.mechanism == "PLAIN":
                hello = bytes((len(self.username),)) + self.username + bytes((len(self.password),)) + self.password
                self.sock.sendall(command(b"HELLO", hello))
                if self._read_command() != b"WELCOME":
                    return False
                self.sock.sendall(command(b"INITIATE", metadata(Socket_Type=b"DEALER")))
            else:
                self.sock.sendall(ready)
            return self._read_command() == b"READY"
        except OSError:
            return False

    def send_greeting_only(self) -> None:
        """Only the greeting: what a stranger who skips the handshake sends before its flood."""
        self.sock.sendall(greeting(self.mechanism))

    def send_part(self, data: bytes, *, more: bool = False) -> None:
        self.sock.sendall(frame_header(len(data), MORE if more else 0) + data)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawZmtp:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
