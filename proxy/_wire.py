"""The frame codec: Message/SessionMessage <-> a list of frames. Pure: no sockets, no clock.

A message travels as one multipart message::

    [header, payload_0, ..., payload_{n-1}, mac]

- `header` is a msgpack array (see `Header`, a msgspec Struct encoded array-like and decoded by one typed
  decoder): everything a receiver needs to route a message and match rules
  (tag, source, destination, ids, session type/stage/event, codec), plus the sender's `incarnation` and `seq`
  for replay protection and the number `n` of payload frames. It never holds payload data.
- the payload frames: with the "pickle" codec, a pickle (protocol 5) stream followed by its out-of-band
  buffers: contiguous buffers of at least `zero_copy_threshold` bytes (numpy arrays, bytes, bytearray) travel
  as frames of their own, handed to the driver as views of the caller's memory (no copy on send; numpy
  arrays are rebuilt on the receiver's frame memory without a copy). With the "msgpack" codec, one frame of
  msgpack data: no pickle anywhere, for peers that must not unpickle.
- parts: a payload frame larger than `max_part_bytes` (4 MiB by default) travels as several frames, each a
  view of the caller's memory (no copy on send), and the header's `parts` says which payload frame came in
  how many; the receiver joins them back into one buffer (its only copy, and only for a frame that was
  split) when the payload is decoded. So no single frame is ever larger than `max_frame_bytes` (the part
  bound plus room for a header), which lets a receiver's transport refuse any bigger frame before buffering
  it (ZmqDriver's `max_part_bytes`, libzmq's ZMQ_MAXMSGSIZE), while a message still holds up to
  `max_message_bytes`.
- `mac` is a keyed MAC over the header and every payload frame (see `_MacScheme` for the construction and
  why). `key=None` drops the mac frame: unsigned frames, for tests and overhead benchmarks only.

Receiving is `WireCodec.open(frames)`, which checks, in this order and before anything is parsed: the frame
count, the total size against `max_message_bytes` (from the frame lengths, before hashing), the header size,
then the MAC. Only then is the header parsed, and it comes back in an `Envelope` together with the very
frames it was verified with; `Envelope.message()` decodes the payload last, so no network bytes reach
`pickle.loads` unless they are authenticated. Every problem comes out as a `FrameError` subclass, whatever
the input.

    >>> codec = WireCodec(b"group key")
    >>> frames = codec.encode(Message("ping", "a", "b", payload=[1, 2]), incarnation="i1", seq=1)
    >>> envelope = codec.open(frames)
    >>> envelope.header.source, envelope.message().payload
    ('a', [1, 2])
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import io
import pickle
import re
import struct
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from enum import Enum
from typing import Annotated, Any

import msgpack
import msgspec

from rallypoint.engine._message import Message, SessionMessage, SessionType
from rallypoint.errors import (
    ConfigError,
    ForgedFrame,
    MalformedFrame,
    OversizedFrame,
    ReplayedFrame,
)

__all__ = ["MAX_FRAME_BYTES", "PART_BYTES", "VERSION", "Envelope", "Header", "ReplayGuard", "WireCodec", "frame_bound"]

VERSION = 3
"""Wire format version, the first field of every header; a receiver refuses any other. (3: `Header.parts`.)"""

CODECS = {"pickle": 0, "msgpack": 1}
_CODEC_NAMES = {v: k for k, v in CODECS.items()}

FLAG_SESSION = 0x01  # a SessionMessage (session_type/stage/event are meaningful)
FLAG_OOB_BYTES = 0x02  # pickle stream uses persistent ids for out-of-band bytes/bytearray frames
_KNOWN_FLAGS = FLAG_SESSION | FLAG_OOB_BYTES  # the low bits, contiguous: "known" is "0 <= flags <= this"

MAX_HEADER_BYTES = 64 * 1024  # a header is ~200 bytes; anything near this is garbage
MAX_FRAMES = 1 << 16  # header + payload frames + mac; more is garbage (or an attempt to burn our CPU)
PART_BYTES = 4 << 20
"""The default `max_part_bytes`: payload frames above it are split into parts of this size (see `WireCodec`)."""
_FRAME_SLACK = MAX_HEADER_BYTES + 64  # room for a compact frame's header, prefix and mac around its payload


def frame_bound(max_part_bytes: int = PART_BYTES) -> int:
    """The largest single frame a `WireCodec(max_part_bytes=...)` sends: what a transport's per-frame limit must
    allow (ZmqDriver's `max_part_bytes` defaults to `frame_bound()`).

        >>> frame_bound(4 << 20)
        4260032
    """
    return max_part_bytes + _FRAME_SLACK


MAX_FRAME_BYTES = frame_bound(PART_BYTES)
"""`frame_bound()` of the default part size: the largest frame a default codec sends."""
_BUILTIN_TYPES: dict[str | None, SessionType] = {t.value: t for t in SessionType}
_TASK, _NOTIFICATION = SessionType.TASK, SessionType.NOTIFICATION
_MAC_BYTES = 32
_COMPACT_MARK = 0xC1  # the one byte msgpack never uses: a header frame cannot start with it
_COMPACT_PREFIX = struct.Struct("<BI")
# A batch of small messages (`encode_many`) is one frame: 0xC1 | u32 0 | u32 count | count entries | mac, an
# entry being u32 header length | u32 payload length | header | payload. The 0 stands where a compact frame
# has its header length, which is never 0, so neither layout can be taken for the other.
_BATCH_PREFIX = struct.Struct("<BII")
_BATCH_ENTRY = struct.Struct("<II")


def _split_compact(frame: Any, signed: bool) -> tuple[Any, Any, Any] | None:
    """A compact single frame's (header, payload, mac-or-None); None if it is not compact.

    Raises MalformedFrame for a compact frame whose announced header length does not fit in it.
    """
    # bytes (what small frames arrive as) are sliced into bytes: for a frame this small, copying is cheaper
    # than making views, and msgspec reads bytes faster than a view.
    view = frame if type(frame) is bytes else memoryview(frame).cast("B")
    if len(view) < _COMPACT_PREFIX.size or view[0] != _COMPACT_MARK:
        return None
    _, header_length = _COMPACT_PREFIX.unpack_from(view)
    start = _COMPACT_PREFIX.size
    end = start + header_length
    tail = len(view) - (_MAC_BYTES if signed else 0)
    if header_length == 0:
        raise MalformedFrame("a batch of messages: open it with open_many")
    if end > tail:
        raise MalformedFrame(f"compact frame of {len(view)} bytes announces a {header_length}-byte header")
    return view[start:end], view[end:tail], (view[tail:] if signed else None)


def _batch_view(frame: Any) -> Any:
    """`frame` as bytes or a byte view if it is a batch frame (see `_BATCH_PREFIX`), else None."""
    view = frame if type(frame) is bytes else memoryview(frame).cast("B")
    if len(view) < _BATCH_PREFIX.size or view[0] != _COMPACT_MARK:
        return None
    _, zero, _ = _BATCH_PREFIX.unpack_from(view)
    return view if zero == 0 else None


_Count = Annotated[int, msgspec.Meta(ge=0)]


class Header(msgspec.Struct, array_like=True, forbid_unknown_fields=True, frozen=True, gc=False):
    """The header frame: everything but the payload, as a compact msgpack array (the fields in this order).

    The typed decoder enforces every field's type exactly (text is never bytes, an int is never a bool or a
    float) and the bounds below; `WireCodec` checks what spans fields (version, payload frame count, a
    session type on session messages). Frozen: a verified header cannot be edited after its MAC was checked.
    """

    version: int
    flags: Annotated[int, msgspec.Meta(ge=0, le=_KNOWN_FLAGS)]
    codec: Annotated[int, msgspec.Meta(ge=0, le=max(_CODEC_NAMES))]
    tag: str
    source: str
    destination: str
    session_id: str
    message_id: str
    session_type: str | None  # None for a plain Message
    session_stage: str | None
    event: str | None
    incarnation: str  # the sender's per-process id
    seq: _Count  # the sender's per-process message counter (strictly increasing)
    nframes: _Count  # number of payload frames on the wire (a payload frame sent in parts counts each part)
    # The incarnation of the destination process the sender meant ("" when it did not know one), so a
    # process restarted under the same name never takes frames meant for its predecessor.
    to_incarnation: str
    # The payload frames that travelled in parts, as (index among the payload frames before splitting, number
    # of wire frames it came in >= 2), by increasing index; () when none was split (every message but those
    # with a frame over the sender's `max_part_bytes`).
    parts: tuple[tuple[_Count, _Count], ...]

    @property
    def is_session(self) -> bool:
        """True for a SessionMessage, False for a plain Message."""
        return bool(self.flags & FLAG_SESSION)

    @property
    def kind(self) -> str:
        """Either "session" or "message"."""
        return "session" if self.flags & FLAG_SESSION else "message"

    @property
    def codec_name(self) -> str:
        return _CODEC_NAMES.get(self.codec, f"unknown({self.codec})")


class _VersionOnly(msgspec.Struct, array_like=True):
    """The first header field alone, to name a version mismatch when the rest does not fit `Header`."""

    version: Any


_HEADER_DECODER = msgspec.msgpack.Decoder(Header)
_VERSION_DECODER = msgspec.msgpack.Decoder(_VersionOnly)
_FIELD_NAMES = Header.__struct_fields__
_FIELD_PATH = re.compile(r"`\$\[(\d+)\]`")


def _parse_header(data: Any, payload_frames: int) -> Header:
    """The Header in `data`, checked against the number of payload frames that came with it."""
    try:
        header = _HEADER_DECODER.decode(data)
    except msgspec.ValidationError as exc:
        raise MalformedFrame(_header_problem(data, exc)) from exc
    if header.version != VERSION:
        raise MalformedFrame(f"unsupported wire version {header.version!r} (this side speaks {VERSION})")
    if header.nframes != payload_frames:
        raise MalformedFrame(f"header announces {header.nframes} payload frames, got {payload_frames}")
    if header.session_type is None and header.flags & FLAG_SESSION:
        raise MalformedFrame("session message without a session type")
    if header.parts:
        _check_parts(header.parts, payload_frames)
    return header


def _check_parts(parts: tuple[tuple[int, int], ...], payload_frames: int) -> None:
    """MalformedFrame unless `parts` groups `payload_frames` wire frames: increasing indexes, counts >= 2,
    every index within the payload frames that remain once the parts are joined."""
    joined = payload_frames
    previous = -1
    for index, count in parts:
        if index <= previous or count < 2:
            raise MalformedFrame(f"bad parts {list(parts)[:8]!r}: indexes must increase and counts be >= 2")
        previous = index
        joined -= count - 1
    if joined < 1 or previous >= joined:
        raise MalformedFrame(f"parts {list(parts)[:8]!r} do not fit {payload_frames} payload frames")


class _Split(tuple):  # type: ignore[type-arg]
    """The wire frames one payload frame came in (see `Header.parts`), joined when its consumer needs it."""

    __slots__ = ()


def _grouped(payload: Sequence[Any], parts: tuple[tuple[int, int], ...]) -> list[Any]:
    """The payload frames as the sender had them: each split one as a `_Split` of its parts (no copy yet).
    `parts` was checked against `payload` by `_parse_header`."""
    out: list[Any] = []
    position = joined = 0
    for index, count in parts:
        out.extend(payload[position:position + index - joined])
        position += index - joined
        out.append(_Split(payload[position:position + count]))
        position += count
        joined = index + 1
    out.extend(payload[position:])
    return out


def _joined(frame: Any, kind: type = bytearray) -> Any:
    """`frame` itself, or one buffer holding a `_Split`'s parts (the one copy): `bytes` for `kind=bytes`, else a
    writable buffer, as a received frame is."""
    if type(frame) is not _Split:
        return frame
    if kind is bytes:
        return b"".join(frame)
    numpy = sys.modules.get("numpy")
    if numpy is None:
        return bytearray().join(frame)
    # Where numpy is loaded (it is, whenever an array is being unpickled), its allocator asks the kernel for
    # huge pages: measured here, joining 64 MiB takes ~11 ms into np.empty and ~42 ms into a bytearray, most
    # of it page faults on the fresh memory.
    sizes = [_nbytes(part) for part in frame]
    target = memoryview(numpy.empty(sum(sizes), numpy.uint8))
    position = 0
    for part, size in zip(frame, sizes, strict=True):
        target[position:position + size] = memoryview(part).cast("B")
        position += size
    return target


def _split(frames: Sequence[Any], part: int) -> tuple[list[Any], tuple[tuple[int, int], ...]]:
    """`frames` with each frame over `part` bytes cut into views of at most `part` bytes (no copy), and the
    `Header.parts` that says how to join them back."""
    wire: list[Any] = []
    parts: list[tuple[int, int]] = []
    for i, frame in enumerate(frames):
        size = _nbytes(frame)
        if size <= part:
            wire.append(frame)
            continue
        view = memoryview(frame).cast("B")
        wire.extend(view[start:start + part] for start in range(0, size, part))
        parts.append((i, -(-size // part)))
    return wire, tuple(parts)


def _header_problem(data: Any, exc: msgspec.ValidationError) -> str:
    """Words for a header that does not fit `Header`: a version mismatch first, else the field at fault."""
    try:
        version = _VERSION_DECODER.decode(data).version
    except msgspec.MsgspecError:
        version = VERSION
    if version != VERSION or type(version) is not int:
        return f"unsupported wire version {version!r:.20} (this side speaks {VERSION})"
    found = _FIELD_PATH.search(str(exc))
    field = f" (field {_FIELD_NAMES[int(found[1])]!r})" if found and int(found[1]) < len(_FIELD_NAMES) else ""
    return f"bad header{field}: {exc}"


class Envelope:
    """A received message that passed every check: its verified header and its payload frames, together.

        >>> codec = WireCodec(b"k")
        >>> envelope = codec.open(codec.encode(Message("t", "a", "b", [1]), incarnation="i", seq=1))
        >>> envelope.header.tag, envelope.message().payload
        ('t', [1])

    Only `WireCodec.open` builds one (calling `Envelope()` raises TypeError), so a header whose MAC was
    checked can never be paired with frames it was not checked with: route, match and replay-check on
    `header`, then decode the payload with `message()`. `nbytes` is the size of the received frames, for
    buffers bounded in bytes.
    """

    __slots__ = ("_header", "_payload", "_nbytes", "_codec")
    _header: Header
    _payload: Sequence[Any]
    _nbytes: int
    _codec: WireCodec

    def __init__(self) -> None:
        raise TypeError("an Envelope is built by WireCodec.open(frames) only")

    @property
    def header(self) -> Header:
        return self._header

    @property
    def payload_frames(self) -> Sequence[Any]:
        """The payload frames the header was verified with, as the sender had them: big ones are views of the
        received memory, and one that travelled in parts comes back joined (a copy, made on each call)."""
        if self._header.parts:
            return [_joined(frame) for frame in _grouped(self._payload, self._header.parts)]
        return self._payload

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def message(self) -> Message:
        """The Message or SessionMessage inside; MalformedFrame if its payload does not decode here.

        Decodes each time it is called (a pickle payload gives new objects each time).
        """
        return self._codec._message(self._header, self._payload)

    def __repr__(self) -> str:
        h = self._header
        return f"Envelope({h.kind} {h.tag!r} {h.source!r} -> {h.destination!r}, {self._nbytes} bytes)"


def _envelope(header: Header, payload: Sequence[Any], nbytes: int, codec: WireCodec) -> Envelope:
    envelope: Envelope = object.__new__(Envelope)
    envelope._header = header
    envelope._payload = payload
    envelope._nbytes = nbytes
    envelope._codec = codec
    return envelope


# --------------------------------------------------------------------------------------------- the MAC


class _MacScheme:
    """Keyed BLAKE2b over an unambiguous encoding of the frames; big frames enter as one-time Poly1305 tags.

    MAC = BLAKE2b-256(key=K, person="rallypoint.v2")(
              u32 frame count || u64 length of each frame || for each frame i, in order:
                  the frame itself                          if it is shorter than 4 KiB (or i == 0),
                  Poly1305(k_i, frame)                      otherwise
          )
    k_i = BLAKE2b-256(key=K, person="rallypoint.otk")(header frame || u32 i)
    batch MAC = BLAKE2b-256(key=K, person="rallypoint.bat")(batch frame without its mac)   (`encode_many`)

    Why this construction (measured on this machine, Python 3.11, OpenSSL):
    - small messages: keyed BLAKE2b from a pre-keyed state (`.copy()`) costs ~1-2 us for header + payload;
      HMAC-SHA256 costs ~5 us (two SHA-256 passes plus the HMAC object), so BLAKE2b is the fast choice.
    - big buffers: Poly1305 runs at ~5.7 GB/s on one core, SHA-256 at ~1.4 GB/s and BLAKE2b at ~0.6 GB/s.
      A 64 MiB array costs ~12 ms per side instead of ~23 ms for SHA-256 spread over two threads. Below
      4 KiB a Poly1305 call (~6 us of call overhead) costs more than feeding the bytes to BLAKE2b.
    Soundness: the lengths come first, so frames cannot be re-split or re-ordered, and how a frame entered
    (raw or as a tag) follows from its authenticated length, so the encoding is injective. A big frame enters
    as a Poly1305 tag under a one-time key derived from the group key and the header, which holds the
    sender's random incarnation and its strictly increasing seq: no two messages share a key (a replayed
    header is refused by the replay guard), and the tags never leave this process (only the BLAKE2b output
    travels). Poly1305 with a secret one-time key is an almost-universal hash, so swapping a big frame for
    another without changing the MAC input succeeds with probability about 2^-100 per attempt; everything
    else needs a forgery against keyed BLAKE2b (a PRF; its keyed mode is the designed MAC mode). The key is
    never used outside this construction (`person` separates the two BLAKE2b uses).
    """

    DIGEST_THRESHOLD = 4096

    __slots__ = ("_base", "_otk_base", "_batch_base", "_structs")

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, (bytes, bytearray)) or not key:
            raise ConfigError("the wire key must be non-empty bytes (or None for unsigned frames)")
        key = bytes(key)
        if len(key) > 64:  # BLAKE2b keys are at most 64 bytes: compress longer ones, keeping their entropy
            key = hashlib.blake2b(key, person=b"rallypoint.kdf").digest()
        self._base = hashlib.blake2b(key=key, digest_size=_MAC_BYTES, person=b"rallypoint.v2")
        self._otk_base = hashlib.blake2b(key=key, digest_size=32, person=b"rallypoint.otk")
        self._batch_base = hashlib.blake2b(key=key, digest_size=_MAC_BYTES, person=b"rallypoint.bat")
        self._structs: dict[int, struct.Struct] = {}

    def _lengths_struct(self, n: int) -> struct.Struct:
        s = self._structs.get(n)
        if s is None:
            s = struct.Struct(f"<I{n}Q")
            if len(self._structs) < 64:
                self._structs[n] = s
        return s

    def compute(self, frames: Sequence[Any], lengths: Sequence[int]) -> bytes:
        """The MAC of `frames` (the first is the header), given their lengths in bytes."""
        n = len(lengths)
        h = self._base.copy()  # a pre-keyed state: copying it is ~10x cheaper than keying a new one
        h.update(self._lengths_struct(n).pack(n, *lengths))
        threshold = self.DIGEST_THRESHOLD
        for i, (frame, size) in enumerate(zip(frames, lengths, strict=False)):
            if size < threshold or i == 0:
                h.update(frame)
            else:
                h.update(self._one_time_tag(frames[0], i, frame))
        return h.digest()

    def compute_pair(self, header: Any, payload: Any, header_length: int, payload_length: int) -> bytes:
        """`compute([header, payload], [header_length, payload_length])`, without the lists and the loop:
        a small message's MAC is on every message's path."""
        if payload_length >= self.DIGEST_THRESHOLD:
            return self.compute((header, payload), (header_length, payload_length))
        h = self._base.copy()
        h.update(_LENGTHS_OF_TWO.pack(2, header_length, payload_length))
        h.update(header)
        h.update(payload)
        return h.digest()

    def compute_batch(self, body: Any) -> bytes:
        """The MAC of a batch frame's body: its own personalisation, so it is never a message's MAC."""
        h = self._batch_base.copy()
        h.update(body)
        return h.digest()

    def _one_time_tag(self, header: Any, index: int, frame: Any) -> bytes:
        otk = self._otk_base.copy()
        otk.update(header)
        otk.update(_U32.pack(index))
        tag: bytes = _poly1305().generate_tag(otk.digest(), frame)
        return tag


_U32 = struct.Struct("<I")
_LENGTHS_OF_TWO = struct.Struct("<I2Q")
_DIGEST_THRESHOLD = _MacScheme.DIGEST_THRESHOLD
_SMALL_MIN = _COMPACT_PREFIX.size + 1 + _MAC_BYTES  # the smallest compact frame: a 1-byte header, no payload
_new_object = object.__new__


@functools.lru_cache(maxsize=1)
def _poly1305() -> Any:
    """cryptography's Poly1305, imported on the first big frame (its bindings cost ~20 ms to import)."""
    from cryptography.hazmat.primitives.poly1305 import Poly1305

    return Poly1305


def _nbytes(frame: Any) -> int:
    """The length in bytes of one frame (bytes, bytearray, memoryview or any contiguous buffer)."""
    if type(frame) is bytes:
        return len(frame)
    return memoryview(frame).nbytes


# ----------------------------------------------------------------------------------- pickle helpers


def _has_big_bytes(obj: Any, threshold: int, depth: int = 2) -> bool:
    """Cheap, bounded look for bytes/bytearray of at least `threshold` bytes near the top of `obj`.

    bytes and bytearray never go through pickle's `buffer_callback` (only PickleBuffer-aware types like numpy
    arrays do), so to send them out of band we need the slower persistent-id pickler; this decides whether
    to use it. It looks at the payload itself and two levels into dicts, lists and tuples (at most 256 items
    per container). A big bytes object deeper than that still arrives intact, just pickled in band (one
    more copy).
    """
    t = type(obj)
    if t is bytes or t is bytearray:
        return len(obj) >= threshold
    if t is dict:
        items: Any = obj.values()
    elif t is list or t is tuple:
        items = obj
    else:
        return False
    if depth <= 0:
        return False
    for i, item in enumerate(items):
        if i >= 256:
            break
        ti = type(item)
        if ti is bytes or ti is bytearray:
            if len(item) >= threshold:
                return True
        elif (ti is dict or ti is list or ti is tuple) and depth > 1:
            if _has_big_bytes(item, threshold, depth - 1):
                return True
    return False


class _OutOfBand:
    """The pickle `buffer_callback`: contiguous buffers of at least `threshold` bytes go to `buffers` (out of
    band, as frames of their own); smaller or non-contiguous ones stay in the pickle stream."""

    __slots__ = ("threshold", "buffers")

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.buffers: list[Any] | None = None

    def __call__(self, pb: pickle.PickleBuffer) -> bool:
        try:
            raw = pb.raw()
        except BufferError:  # not contiguous: serialize in band
            return True
        if raw.nbytes >= self.threshold and self.buffers is not None:
            self.buffers.append(raw)
            return False
        return True


class _OOBPickler(pickle.Pickler):
    """A protocol-5 pickler that also sends big bytes/bytearray out of band, as persistent ids.

    Out-of-band frames (PickleBuffers via `buffer_callback` and big bytes via `persistent_id`) are appended
    to one list in stream order; the unpickler consumes them with one cursor in the same order.
    """

    def __init__(self, file: io.BytesIO, oob: list[Any], threshold: int, callback: Callable[[Any], bool]):
        super().__init__(file, protocol=5, buffer_callback=callback)
        self._oob = oob
        self._threshold = threshold

    def persistent_id(self, obj: Any) -> Any:
        t = type(obj)
        if (t is bytes or t is bytearray) and len(obj) >= self._threshold:
            self._oob.append(memoryview(obj))
            return 0 if t is bytes else 1
        return None


class _OOBUnpickler(pickle.Unpickler):
    """Reads what `_OOBPickler` wrote: out-of-band buffers and persistent bytes share one cursor."""

    def __init__(self, data: Any, oob: Sequence[Any]) -> None:
        self._oob = oob
        self._next = 0
        super().__init__(io.BytesIO(data), buffers=self._buffers())

    def _take(self) -> Any:
        i = self._next
        if i >= len(self._oob):
            raise pickle.UnpicklingError("not enough out-of-band frames")
        self._next = i + 1
        return self._oob[i]

    def _buffers(self) -> Iterator[Any]:
        while self._next < len(self._oob):
            yield _joined(self._take())

    def persistent_load(self, pid: Any) -> Any:
        # bytes and bytearray must own their memory: one copy, on the receiver only (a frame that came in
        # parts is joined straight into it, not joined and then copied).
        if pid == 0:
            frame = self._take()
            return b"".join(frame) if type(frame) is _Split else bytes(frame)
        if pid == 1:
            frame = self._take()
            return bytearray().join(frame) if type(frame) is _Split else bytearray(frame)
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")


# -------------------------------------------------------------------------------------- the codec


class WireCodec:
    """Encode messages to frames and back; sign and verify them with the group key.

        >>> codec = WireCodec(b"k", codec="pickle")
        >>> frames = codec.encode(SessionMessage("sum", "master", "worker_1", payload=[1, 2]),
        ...                       incarnation="0f3c", seq=7)
        >>> envelope = codec.open(frames)
        >>> envelope.header.tag, envelope.message().payload
        ('sum', [1, 2])

    `codec` picks how this side encodes payloads: "pickle" (any picklable object; big buffers zero-copy) or
    "msgpack" (plain data only: None, bool, int, float, str, bytes, list, dict; tuples arrive as lists; no
    pickle anywhere). A "msgpack" codec also refuses to decode pickle payloads; a "pickle" codec decodes
    both. Encoding is for one thread at a time (the codec reuses a msgpack Packer), and so is `open` (it may
forget the key `rekey` replaced).

    Small messages (one payload frame below `zero_copy_threshold`) travel as ONE frame,
    `0xC1 | u32 header length | header | payload | mac`: measured here, libzmq and pyzmq move 3-part
    messages at a quarter of the rate of 1-part ones, so this is the largest single cost on the small-message
    path. The MAC is the same as over the frames [header, payload], and decoding splits the frame back into
    those (0xC1 is the one byte msgpack never uses, so a compact frame cannot be mistaken for a header);
`open` splits it without copying the payload.
    `compact=False` always sends separate frames.

    Zero copy cuts both ways: the payload frames of `encode()` are views of the caller's buffers (numpy
    arrays, big bytes). Do not modify such a buffer until the driver has sent it; if one is modified in
    flight the receiver sees a MAC mismatch and drops the message (it never sees altered data).

    Parts: a payload frame over `max_part_bytes` (a 64 MB array, a long pickle stream) is sent as views of at
    most that many bytes each (no copy), and joined back into one buffer on the receiver, once, when the
    payload is decoded; `max_message_bytes` bounds the whole message, parts counted. No frame this codec
    sends exceeds `max_frame_bytes`, so a receiver can set its transport's per-frame limit there
    (ZmqDriver(max_part_bytes=...)) and refuse anything larger before buffering it. 4 MiB by default: the
    transport limit stays "a few MB", and a 64 MB array in 16 parts moves at the speed of one frame
    (benchmarks/big.py); smaller parts cost more per-frame overhead, larger ones raise the bound a stranger's
    handshake can make a receiver buffer.
    """

    __slots__ = ("_mac", "_previous_mac", "_previous_until", "_codec_id", "_max", "_zc", "_header_encoder",
                 "_payload_packer", "_safe_only", "_compact", "_mac_bytes", "_out_of_band", "_part")

    def __init__(
        self,
        key: bytes | None,
        *,
        codec: str = "pickle",
        max_message_bytes: int = 1 << 30,
        zero_copy_threshold: int = 64 * 1024,
        compact: bool = True,
        max_part_bytes: int = PART_BYTES,
    ) -> None:
        if codec not in CODECS:
            raise ConfigError(f"unknown codec {codec!r}; expected one of {sorted(CODECS)}")
        if max_message_bytes < 1024:
            raise ConfigError("max_message_bytes must be at least 1024")
        if zero_copy_threshold < 1:
            raise ConfigError("zero_copy_threshold must be >= 1")
        if not zero_copy_threshold <= max_part_bytes:  # a compact frame's payload stays within one part
            raise ConfigError(f"max_part_bytes ({max_part_bytes}) must be >= zero_copy_threshold "
                              f"({zero_copy_threshold})")
        if max_message_bytes // max_part_bytes > MAX_FRAMES // 2:  # so that a largest message fits MAX_FRAMES
            raise ConfigError(f"max_part_bytes={max_part_bytes} is too small for max_message_bytes="
                              f"{max_message_bytes}: at most {MAX_FRAMES // 2} parts a message")
        self._part = max_part_bytes
        self._mac = _MacScheme(key) if key is not None else None
        self._mac_bytes = _MAC_BYTES if key is not None else 0
        self._previous_mac: _MacScheme | None = None  # the key before rekey(), accepted until _previous_until
        self._previous_until = 0.0
        self._codec_id = CODECS[codec]
        self._safe_only = codec == "msgpack"
        self._max = max_message_bytes
        self._zc = zero_copy_threshold
        self._header_encoder = msgspec.msgpack.Encoder()
        self._payload_packer = msgpack.Packer(use_bin_type=True, autoreset=True)
        self._compact = compact
        self._out_of_band = _OutOfBand(zero_copy_threshold)

    def rekey(self, key: bytes, *, grace: float) -> None:
        """Sign with `key` from now on, and still accept frames signed with the current key for `grace`
        seconds: those its peers sent before they switched too. Only for a signed codec."""
        if self._mac is None:
            raise ConfigError("an unsigned codec has no key to replace")
        if grace < 0:
            raise ConfigError(f"grace must be >= 0, not {grace}")
        self._previous_mac, self._mac = self._mac, _MacScheme(key)
        self._previous_until = time.monotonic() + grace

    @property
    def signed(self) -> bool:
        """True when frames carry a MAC (the codec has a key)."""
        return self._mac is not None

    @property
    def codec(self) -> str:
        return _CODEC_NAMES[self._codec_id]

    @property
    def max_message_bytes(self) -> int:
        return self._max

    @property
    def max_part_bytes(self) -> int:
        """Payload frames above this many bytes travel in parts of at most this size."""
        return self._part

    @property
    def max_frame_bytes(self) -> int:
        """The largest single frame this codec sends (`frame_bound(max_part_bytes)`), capped by
        `max_message_bytes`: what the receiving transport's per-frame limit must allow."""
        return min(frame_bound(self._part), self._max)

    # ------------------------------------------------------------------------------ encode

    def encode(self, message: Message, *, incarnation: str, seq: int, to_incarnation: str = "",
               encoded_payload: tuple[list[Any], int] | None = None) -> list[Any]:
        """The frames for `message`: [header, *payload frames, mac] (no mac frame when unsigned).

        `encoded_payload` is what `encode_payload(message.payload)` returned, for a payload sent to several
        peers (it is then serialized once). Raises ConfigError for a message that cannot be encoded: a
        payload the codec can't represent, a non-text field, or more than `max_message_bytes` in total.
        """
        header, payload_frames = self._header_and_payload(message, incarnation, seq, to_incarnation,
                                                          encoded_payload)
        return self._frames(message, header, payload_frames)

    def _frames(self, message: Message, header: bytes, payload_frames: list[Any]) -> list[Any]:
        """The multipart message of an encoded header and its payload frames: compact when small, signed."""
        if self._compact and len(payload_frames) == 1:
            payload = payload_frames[0]
            header_length = len(header)
            payload_length = _nbytes(payload)
            if payload_length < self._zc:  # the common small message: one compact frame
                if header_length + payload_length + self._mac_bytes > self._max:
                    self._check_size(message, header_length + payload_length + self._mac_bytes)
                mac_scheme = self._mac
                if mac_scheme is None:
                    mac = b""
                elif payload_length < _MacScheme.DIGEST_THRESHOLD:  # compute_pair's small case, inlined
                    h = mac_scheme._base.copy()
                    h.update(_LENGTHS_OF_TWO.pack(2, header_length, payload_length))
                    h.update(header)
                    h.update(payload)
                    mac = h.digest()
                else:
                    mac = mac_scheme.compute_pair(header, payload, header_length, payload_length)
                return [b"".join((_COMPACT_PREFIX.pack(_COMPACT_MARK, header_length), header, payload, mac))]
        frames: list[Any] = [header]
        frames.extend(payload_frames)
        lengths = [len(header)]
        lengths.extend(_nbytes(f) for f in payload_frames)
        self._check_size(message, sum(lengths) + self._mac_bytes)
        if self._mac is not None:
            frames.append(self._mac.compute(frames, lengths))
        return frames

    def encode_many(self, messages: Sequence[Message], *, incarnation: str, seqs: Sequence[int],
                    to_incarnation: str = "") -> list[list[Any]]:
        """The multipart messages that carry `messages` (all for one peer), in order: small ones batched.

        Consecutive small messages (one payload frame below `zero_copy_threshold`) travel together in ONE
        frame under ONE MAC, up to `max_message_bytes` and `max_part_bytes` a batch; a big message travels
        alone, as `encode` makes it, and so does a lone small one. Each message keeps its own header (and its
        `seqs[i]`), so the receiver's per-message checks are unchanged: `open_many` gives one Envelope per
        message. Raises ConfigError as `encode` does; nothing is returned for a batch with one bad message.
        """
        if len(seqs) != len(messages):
            raise ConfigError(f"{len(messages)} messages but {len(seqs)} seqs")
        out: list[list[Any]] = []
        batch: list[tuple[Message, bytes, Any]] = []
        batch_bytes = _BATCH_PREFIX.size + self._mac_bytes
        limit = min(self._max, self._part)  # a batch is one frame: within the transport's per-frame bound
        for message, seq in zip(messages, seqs, strict=True):
            header, payload_frames = self._header_and_payload(message, incarnation, seq, to_incarnation, None)
            size = _nbytes(payload_frames[0]) if len(payload_frames) == 1 else self._zc
            entry_bytes = _BATCH_ENTRY.size + len(header) + size
            if size >= self._zc or batch_bytes + entry_bytes > limit:
                out.extend(self._flush_batch(batch))
                batch, batch_bytes = [], _BATCH_PREFIX.size + self._mac_bytes
            if size >= self._zc:
                out.append(self._frames(message, header, payload_frames))
            else:
                batch.append((message, header, payload_frames[0]))
                batch_bytes += entry_bytes
        out.extend(self._flush_batch(batch))
        return out

    def _flush_batch(self, batch: list[tuple[Message, bytes, Any]]) -> list[list[Any]]:
        """`batch` as multipart messages: none, one compact frame for one message, else one batch frame."""
        if not batch:
            return []
        if len(batch) == 1:
            message, header, payload = batch[0]
            return [self._frames(message, header, [payload])]
        parts: list[Any] = [_BATCH_PREFIX.pack(_COMPACT_MARK, 0, len(batch))]
        for _, header, payload in batch:
            parts += (_BATCH_ENTRY.pack(len(header), _nbytes(payload)), header, payload)
        body = b"".join(parts)
        if self._mac is None:
            return [[body]]
        return [[body + self._mac.compute_batch(body)]]

    def _header_and_payload(self, message: Message, incarnation: str, seq: int, to_incarnation: str,
                            encoded_payload: tuple[list[Any], int] | None) -> tuple[bytes, list[Any]]:
        """The header bytes and payload frames of `message` (ConfigError if they cannot be encoded)."""
        payload_frames, flags = (encoded_payload if encoded_payload is not None
                                 else self.encode_payload(message.payload))
        parts: tuple[tuple[int, int], ...] = ()
        part = self._part
        if len(payload_frames) == 1:
            frame = payload_frames[0]
            if (len(frame) if type(frame) is bytes else _nbytes(frame)) > part:
                payload_frames, parts = self._split(payload_frames)
        elif any(_nbytes(frame) > part for frame in payload_frames):
            payload_frames, parts = self._split(payload_frames)
        tag = message.tag
        if type(tag) is not str:
            tag = tag.value if isinstance(tag, Enum) else str(tag)
            if type(tag) is not str:
                tag = str(tag)
        if isinstance(message, SessionMessage):
            flags |= FLAG_SESSION
            st = message.session_type
            # Identity first: an Enum's `.value` is a descriptor call, costly on every message.
            session_type: str | None = ("task" if st is _TASK else "notification" if st is _NOTIFICATION
                                        else message.session_type_name)
            stage = message.session_stage
            event = message.event
        else:
            session_type = stage = event = None
        source, destination = message.source, message.destination
        session_id, message_id = message.session_id, message.message_id
        fields = Header(  # positional: cheaper than keywords, on every message
            VERSION, flags, self._codec_id, tag, source, destination, session_id, message_id, session_type, stage,
            event, incarnation, seq, len(payload_frames), to_incarnation, parts,
        )
        # What the receiver's typed decoder would refuse, checked here by type (exact `str`, the optional ones
        # None or `str`, a seq >= 0): ~0.1 us instead of decoding the header again (~0.7 us). Anything else
        # (a str subclass, a non-text field, a negative seq) takes the decoder's check, for its exact words.
        if (type(source) is str and type(destination) is str and type(session_id) is str
                and type(message_id) is str and type(incarnation) is str and type(to_incarnation) is str
                and (session_type is None or type(session_type) is str) and (stage is None or type(stage) is str)
                and (event is None or type(event) is str) and type(seq) is int and seq >= 0):
            try:
                return self._header_encoder.encode(fields), payload_frames
            except (TypeError, ValueError, OverflowError, msgspec.MsgspecError) as exc:  # a seq beyond 64 bits
                raise ConfigError(f"cannot encode the message header: {exc}") from exc
        return self._encode_header(fields), payload_frames

    def _split(self, payload_frames: list[Any]) -> tuple[list[Any], tuple[tuple[int, int], ...]]:
        try:
            return _split(payload_frames, self._part)
        except (TypeError, ValueError, BufferError) as exc:  # a frame that is not one contiguous buffer
            raise ConfigError(f"cannot split a payload frame into parts: {exc}") from exc

    def _check_size(self, message: Message, total: int) -> None:
        if total > self._max:  # the same bound, and words, for every layout
            raise ConfigError(f"message {message.message_id} is {total} bytes, over max_message_bytes={self._max}")

    def _encode_header(self, header: Header) -> bytes:
        """The header's bytes; ConfigError for one the receiver would refuse (a Struct does not check types
        when built, so the receiver's own decoder checks it here: one set of rules for both sides)."""
        try:
            data = self._header_encoder.encode(header)
            _HEADER_DECODER.decode(data)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"cannot encode the message header: {_header_problem(data, exc)}") from exc
        except (TypeError, ValueError, OverflowError, msgspec.MsgspecError) as exc:  # e.g. a seq beyond 64 bits
            raise ConfigError(f"cannot encode the message header: {exc}") from exc
        return data

    def encode_payload(self, payload: Any) -> tuple[list[Any], int]:
        """The payload frames and flags of a message carrying `payload`; ConfigError if it can't be encoded.
        Big buffers in the frames are views of the caller's memory (see the class docstring)."""
        if self._codec_id == 0:
            return self._encode_pickle(payload)
        return self._encode_msgpack(payload)

    def _encode_pickle(self, payload: Any) -> tuple[list[Any], int]:
        threshold = self._zc
        callback = self._out_of_band  # one per codec (encoding is for one thread): no closure per message
        oob: list[Any] = []
        outer, callback.buffers = callback.buffers, oob  # `outer`: a payload whose pickling encodes another
        try:
            # Plain pickle first: small payloads (the common case) never pay for the bytes scan. Only a big
            # pickle can hide big bytes/bytearray, and only then is it worth re-pickling them out of band.
            t = type(payload)
            big_bytes = (t is bytes or t is bytearray) and len(payload) >= threshold
            if not big_bytes:
                data: Any = pickle.dumps(payload, 5, buffer_callback=callback)
                big_bytes = len(data) >= threshold and _has_big_bytes(payload, threshold)
                if big_bytes:
                    oob.clear()
            if big_bytes:
                out = io.BytesIO()
                _OOBPickler(out, oob, threshold, callback).dump(payload)
                data = out.getbuffer()
                flags = FLAG_OOB_BYTES
            else:
                flags = 0
        except Exception as exc:  # anything pickle can raise for an unpicklable payload
            raise ConfigError(f"codec 'pickle' cannot encode this payload: {exc!r}") from exc
        finally:
            callback.buffers = outer
        if oob:
            return [data, *oob], flags
        return [data], flags

    def _encode_msgpack(self, payload: Any) -> tuple[list[Any], int]:
        try:
            return [self._payload_packer.pack(payload)], 0
        except (TypeError, ValueError, OverflowError) as exc:
            self._payload_packer.reset()
            raise ConfigError(
                f"codec 'msgpack' cannot encode this payload ({type(payload).__name__}): {exc}; "
                "use plain data (None, bool, int, float, str, bytes, list, tuple, dict) or codec='pickle'"
            ) from exc

    # ------------------------------------------------------------------------------ decode

    def open(self, frames: Sequence[Any]) -> Envelope:
        """Check received `frames` once and return their verified header and payload frames together.

        Checks the frame count, the total size (before hashing), the header size, the MAC (with the key
        `rekey` replaced, during its grace), then parses the header. The payload is not decoded until
        `Envelope.message()`. Raises MalformedFrame, OversizedFrame or ForgedFrame, never anything else.
        """
        if len(frames) == 1 and type(frames[0]) is bytes:
            envelope = self._open_small(frames[0])
            if envelope is not None:
                return envelope
        try:
            header, payload, mac, lengths, nbytes = self._parts(frames)
            self._verify(header, payload, mac, lengths)
            return _envelope(_parse_header(header, len(payload)), payload, nbytes, self)
        except _PARSE_ERRORS as exc:
            raise MalformedFrame(f"undecodable frames: {type(exc).__name__}: {exc}") from exc

    def _open_small(self, frame: bytes) -> Envelope | None:
        """`open` of the common message, in one pass: a compact frame (bytes) with a payload below the MAC's
        digest threshold, signed with the current key, whose header parses and fits. The same checks as the
        general path, in the same order (size, header size, MAC, header); None for anything else, which then
        takes the general path and comes out with the reason named."""
        scheme = self._mac
        size = len(frame)
        if scheme is None or size < _SMALL_MIN or size > self._max or frame[0] != _COMPACT_MARK:
            return None
        header_length = _U32.unpack_from(frame, 1)[0]
        end = 5 + header_length
        tail = size - _MAC_BYTES
        payload_length = tail - end
        if header_length == 0 or header_length > MAX_HEADER_BYTES or not 0 <= payload_length < _DIGEST_THRESHOLD:
            return None
        h = scheme._base.copy()
        h.update(_LENGTHS_OF_TWO.pack(2, header_length, payload_length))
        h.update(frame[5:tail])  # header and payload, contiguous in the frame: what the MAC covers after the lengths
        if not hmac.compare_digest(h.digest(), frame[tail:]):
            return None
        try:
            header = _HEADER_DECODER.decode(frame[5:end])
        except msgspec.MsgspecError:
            return None
        if header.version != VERSION or header.nframes != 1 or header.parts or (
                header.session_type is None and header.flags & FLAG_SESSION):
            return None
        envelope: Envelope = _new_object(Envelope)
        envelope._header = header
        envelope._payload = (frame[end:tail],)
        envelope._nbytes = size
        envelope._codec = self
        return envelope

    def open_many(self, frames: Sequence[Any]) -> list[Envelope]:
        """One Envelope per message in `frames`: a batch from `encode_many` or any single message.

        A batch is checked as `open` checks a message (size before hashing, one MAC over the whole batch,
        then each header, with its own size bound), and is refused whole if any part is wrong. Raises
        MalformedFrame, OversizedFrame or ForgedFrame, never anything else.
        """
        try:
            view = _batch_view(frames[0]) if len(frames) == 1 else None
            if view is not None:
                return self._open_batch(view)
        except _PARSE_ERRORS as exc:
            raise MalformedFrame(f"undecodable frames: {type(exc).__name__}: {exc}") from exc
        return [self.open(frames)]

    def _open_batch(self, view: Any) -> list[Envelope]:
        nbytes = len(view)
        if nbytes > self._max:
            raise OversizedFrame(f"{nbytes} bytes in 1 frame, over max_message_bytes={self._max}")
        end = nbytes - self._mac_bytes
        if end < _BATCH_PREFIX.size:
            raise MalformedFrame(f"batch frame of {nbytes} bytes")
        body = view[:end]
        self._verify_batch(body, view[end:])
        _, _, count = _BATCH_PREFIX.unpack_from(view)
        if not 2 <= count <= MAX_FRAMES:
            raise MalformedFrame(f"batch of {count} messages")
        envelopes = []
        position = _BATCH_PREFIX.size
        for _ in range(count):
            if position + _BATCH_ENTRY.size > end:
                raise MalformedFrame("batch frame ends inside an entry")
            header_length, payload_length = _BATCH_ENTRY.unpack_from(view, position)
            start = position + _BATCH_ENTRY.size
            position = start + header_length + payload_length
            if position > end or header_length > MAX_HEADER_BYTES:
                raise MalformedFrame(f"batch entry of {header_length} + {payload_length} bytes does not fit")
            header = _parse_header(view[start:start + header_length], 1)
            payload = view[start + header_length:position]
            envelopes.append(_envelope(header, (payload,), position - start, self))
        if position != end:
            raise MalformedFrame(f"{end - position} bytes after the last message of a batch")
        return envelopes

    def decode(self, frames: Sequence[Any]) -> Message:
        """`open(frames).message()`: the Message or SessionMessage in `frames`, after every check.

        The tag arrives as text (Enum tags travel by value). Raises only FrameError subclasses.
        """
        return self.open(frames).message()

    def peek_header(self, frames: Sequence[Any]) -> Header:
        """The header of `frames` WITHOUT checking the MAC: unauthenticated, for tools and tests only.

        Nothing in it can be trusted (anyone can write any header), and it cannot be used to decode the
        payload: for that, `open(frames)`. The frame structure is checked as `open` does; raises only
        FrameError subclasses.
        """
        try:
            header, payload, _, _, _ = self._parts(frames)
            return _parse_header(header, len(payload))
        except _PARSE_ERRORS as exc:
            raise MalformedFrame(f"undecodable frames: {type(exc).__name__}: {exc}") from exc

    def _parts(self, frames: Sequence[Any]) -> _Parts:
        """`frames` taken apart, after the checks that need no hashing (see `_Parts`)."""
        signed = self._mac is not None
        if len(frames) == 1:
            compact = _split_compact(frames[0], signed)
            if compact is not None:
                header, payload, mac = compact
                nbytes = _nbytes(frames[0])
                if nbytes > self._max:
                    raise OversizedFrame(f"{nbytes} bytes in 1 frame, over max_message_bytes={self._max}")
                lengths = (len(header), len(payload))
                if lengths[0] > MAX_HEADER_BYTES:
                    raise MalformedFrame(f"header frame of {lengths[0]} bytes")
                return header, (payload,), mac, lengths, nbytes
        n = len(frames)
        if n < (2 if signed else 1):
            raise MalformedFrame(f"{n} frame(s): too few for a message")
        if n > MAX_FRAMES:
            raise MalformedFrame(f"{n} frames: more than {MAX_FRAMES}")
        lengths_all = [len(f) if type(f) is bytes else memoryview(f).nbytes for f in frames]
        nbytes = sum(lengths_all)
        if nbytes > self._max:
            raise OversizedFrame(f"{nbytes} bytes in {n} frames, over max_message_bytes={self._max}")
        if lengths_all[0] > MAX_HEADER_BYTES:
            raise MalformedFrame(f"header frame of {lengths_all[0]} bytes")
        if signed:
            if lengths_all[-1] != _MAC_BYTES:
                raise ForgedFrame(f"mac frame of {lengths_all[-1]} bytes, expected {_MAC_BYTES}")
            return frames[0], frames[1:-1], frames[-1], lengths_all[:-1], nbytes
        return frames[0], frames[1:], None, lengths_all, nbytes

    def _verify(self, header: Any, payload: Sequence[Any], mac: Any, lengths: Sequence[int]) -> None:
        """ForgedFrame unless `mac` is that of the current key (or of the replaced one, in its grace)."""
        if self._mac is None:
            return  # nothing to verify: an unsigned codec trusts everything (tests and benchmarks only)
        if hmac.compare_digest(_expected_mac(self._mac, header, payload, lengths), mac):
            return
        previous = self._previous_in_grace()
        if previous is None or not hmac.compare_digest(_expected_mac(previous, header, payload, lengths), mac):
            raise ForgedFrame("MAC mismatch: not signed with the group key, or altered")

    def _verify_batch(self, body: Any, mac: Any) -> None:
        """`_verify` for the body of a batch frame."""
        if self._mac is None or hmac.compare_digest(self._mac.compute_batch(body), mac):
            return
        previous = self._previous_in_grace()
        if previous is None or not hmac.compare_digest(previous.compute_batch(body), mac):
            raise ForgedFrame("MAC mismatch on a batch: not signed with the group key, or altered")

    def _previous_in_grace(self) -> _MacScheme | None:
        """The key `rekey` replaced, while its grace lasts (then it is forgotten)."""
        if self._previous_mac is not None and time.monotonic() >= self._previous_until:
            self._previous_mac = None
        return self._previous_mac

    def _message(self, header: Header, payload: Sequence[Any]) -> Message:
        """The message `header` and its verified `payload` frames stand for (for `Envelope.message`)."""
        data = self._decode_payload(header, payload)
        try:
            if header.flags & FLAG_SESSION:
                st = header.session_type
                builtin = _BUILTIN_TYPES.get(st)
                stage = header.session_stage
                if builtin is not None and stage is not None:
                    # What SessionMessage(...) makes of these (every field given, nothing to default), its
                    # slots filled directly: half the cost of the constructor call, on every message.
                    message: SessionMessage = _new_object(SessionMessage)
                    message.tag = header.tag
                    message.source = header.source
                    message.destination = header.destination
                    message.payload = data
                    message.session_id = header.session_id
                    message.message_id = header.message_id
                    message.session_type = builtin
                    message.session_stage = stage
                    message.event = header.event
                    return message
                return SessionMessage(  # positional: cheaper than keywords
                    header.tag, header.source, header.destination, data, builtin or str(st),
                    stage, header.session_id, header.message_id, header.event,
                )
            return Message(
                header.tag, header.source, header.destination, data, header.session_id, header.message_id
            )
        except Exception as exc:  # e.g. an unknown user session type with no stage
            raise MalformedFrame(f"cannot build the message: {exc!r}") from exc

    def _decode_payload(self, header: Header, payload: Sequence[Any]) -> Any:
        if header.parts:  # checked against the frames by _parse_header: regroup, join when consumed
            payload = _grouped(payload, header.parts)
        if header.codec == 1:  # msgpack
            if len(payload) != 1:
                raise MalformedFrame(f"msgpack payload in {len(payload)} frames, expected 1")
            try:
                return msgpack.unpackb(_joined(payload[0], bytes), raw=False, use_list=True,
                                       strict_map_key=False)
            except Exception as exc:
                raise MalformedFrame(f"msgpack payload does not decode: {exc!r}") from exc
        if self._safe_only:
            raise MalformedFrame(f"pickle payload from {header.source!r} refused: this codec is msgpack-only")
        # Only `open` reaches here, after the MAC check: pickle only ever sees authenticated bytes.
        try:
            stream = _joined(payload[0], bytes)
            if header.flags & FLAG_OOB_BYTES:
                return _OOBUnpickler(stream, payload[1:]).load()
            if len(payload) == 1:
                return pickle.loads(stream)
            return pickle.loads(stream, buffers=[_joined(frame) for frame in payload[1:]])
        except Exception as exc:  # authenticated but undecodable here: a class this side can't import, ...
            raise MalformedFrame(f"pickle payload does not decode: {exc!r}") from exc


# Received frames taken apart: (header, payload frames, mac or None, lengths of the header and payload frames
# (what the MAC covers), size of all the frames). A plain tuple: this is on every message's path.
_Parts = tuple[Any, Sequence[Any], Any, Sequence[int], int]


# What parsing hostile input can raise besides our own errors: non-buffer "frames" give TypeError, msgspec's
# errors are MsgspecError, a header's bad UTF-8 is a ValueError.
_PARSE_ERRORS = (TypeError, ValueError, BufferError, OverflowError, RecursionError, MemoryError,
                 msgspec.MsgspecError)


def _expected_mac(scheme: _MacScheme, header: Any, payload: Sequence[Any], lengths: Sequence[int]) -> bytes:
    """The MAC `scheme` gives `header` and its `payload` frames."""
    if len(payload) == 1:  # the small-message case
        return scheme.compute_pair(header, payload[0], lengths[0], lengths[1])
    return scheme.compute((header, *payload), lengths)


# ---------------------------------------------------------------------------------- replay guard

class ReplayGuard:
    """Refuse frames whose sequence number was already seen on their stream: (source, incarnation, connection).

        >>> guard = ReplayGuard()
        >>> guard.check("worker_1", "inc-a", 1); guard.check("worker_1", "inc-a", 2)
        >>> guard.check("worker_1", "inc-a", 2)
        Traceback (most recent call last):
        ...
        rallypoint.errors.ReplayedFrame: replayed frame from 'worker_1' (incarnation inc-a): seq 2 <= 2

    Call it only on authenticated headers (after the MAC check). Each sender numbers its messages with one
    strictly increasing counter per process (incarnation); gaps are fine (the counter is shared by all
    destinations), going back is not. The counter is tracked per inbound connection (`origin`, which the
    driver names): a sender's frames all come on its own connection to us, so a key holder who forges one frame
    with a huge sequence number on ITS connection advances only its own stream and cannot shut the real sender
    out. A frame replayed on another connection is caught by the receiver's message-id window instead.

    Memory is bounded: at most `window` streams are remembered per source (the oldest is forgotten first; a
    forgotten stream starts afresh) and at most `max_sources` sources (least recently seen forgotten first).
    """

    __slots__ = ("_window", "_max_sources", "_seen")

    def __init__(self, window: int = 8, *, max_sources: int = 100_000) -> None:
        if window < 1 or max_sources < 1:
            raise ConfigError("window and max_sources must be >= 1")
        self._window = window
        self._max_sources = max_sources
        self._seen: OrderedDict[str, dict[tuple[str, bytes], int]] = OrderedDict()

    def check(self, source: str, incarnation: str, seq: int, origin: bytes = b"") -> None:
        """Record `seq` for the stream (source, incarnation, origin), or raise ReplayedFrame if it is not new."""
        seen = self._seen
        stream = (incarnation, origin)
        streams = seen.get(source)
        if streams is not None:  # the common case first: the next message of a sender we know
            last = streams.get(stream)
            if last is not None and seq > last:
                streams[stream] = seq
                if len(seen) > 1:
                    seen.move_to_end(source)
                return
        if streams is None:
            if len(seen) >= self._max_sources:
                seen.popitem(last=False)
            seen[source] = {stream: seq}
            return
        last = streams.get(stream)
        if last is None:
            if len(streams) >= self._window:
                del streams[next(iter(streams))]  # dicts keep insertion order: the oldest stream goes
            streams[stream] = seq
        elif seq <= last:
            raise ReplayedFrame(
                f"replayed frame from {source!r} (incarnation {incarnation}): seq {seq} <= {last}"
            )
        else:
            streams[stream] = seq
        if len(seen) > 1:
            seen.move_to_end(source)

    def forget(self, source: str) -> None:
        """Drop everything remembered about `source` (e.g. when it leaves the group)."""
        self._seen.pop(source, None)

    def __len__(self) -> int:
        return len(self._seen)
