"""Fuzz the frame decoder (`open`, `decode`, `peek_header`): whatever arrives, only FrameError subclasses come
out (or a valid message).

Signed codecs are fuzzed with the pickle codec (the MAC must stop everything before pickle); unsigned ones
only with the msgpack codec, since an unsigned pickle codec would unpickle whatever it is given by design.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rallypoint.engine import Message, SessionMessage
from rallypoint.errors import FrameError
from rallypoint.proxy._wire import Header, WireCodec

pytestmark = pytest.mark.timeout(60)

KEY = b"fuzz key"
# Parts of 64 KiB: the big payloads below travel in parts, so mutations also hit split frames and their header.
SIGNED = WireCodec(KEY, max_message_bytes=1 << 20, max_part_bytes=64 * 1024)
SAFE_UNSIGNED = WireCodec(None, codec="msgpack", max_message_bytes=1 << 20, max_part_bytes=64 * 1024)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _valid(codec: WireCodec) -> list[list[bytes]]:
    payloads: list[object] = [None, {"a": [1, 2, "x"]}, b"\x00" * 10, {"split": b"y" * 150_000}]
    if codec.codec == "pickle":
        payloads += [np.arange(10_000, dtype=np.int64), {"blob": b"z" * 70_000}, list(range(30_000))]
    out = []
    for i, payload in enumerate(payloads):
        for msg in (Message("t", "a", "b", payload), SessionMessage("s", "a", "b", payload, event="e")):
            out.append([bytes(f) for f in codec.encode(msg, incarnation="inc", seq=i + 1)])
    batch = [Message("t", "a", "b", i) for i in range(3)]
    for frames in codec.encode_many(batch, incarnation="inc", seqs=[1, 2, 3]):
        out.append([bytes(f) for f in frames])
    return out


VALID = {id(SIGNED): _valid(SIGNED), id(SAFE_UNSIGNED): _valid(SAFE_UNSIGNED)}
assert all(any(codec.open_many(frames)[0].header.parts for frames in VALID[id(codec)])
           for codec in (SIGNED, SAFE_UNSIGNED))  # some of them came in parts


def _decode_only_frame_errors(codec: WireCodec, frames: list) -> None:
    try:
        out = codec.decode(frames)
    except FrameError:
        pass
    else:
        assert isinstance(out, Message)
    try:
        messages = [envelope.message() for envelope in codec.open_many(frames)]
    except FrameError:
        return
    assert all(isinstance(m, Message) for m in messages)


@st.composite
def mutated(draw: st.DrawFn, codec: WireCodec) -> list:
    frames = [bytearray(f) for f in draw(st.sampled_from(VALID[id(codec)]))]
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "extend", "drop", "dup", "swap", "replace", "insert"]))
        i = draw(st.integers(0, len(frames) - 1)) if frames else 0
        if op == "flip" and frames and frames[i]:
            pos = draw(st.integers(0, len(frames[i]) - 1))
            frames[i][pos] ^= draw(st.integers(1, 255))
        elif op == "truncate" and frames:
            frames[i] = frames[i][: draw(st.integers(0, len(frames[i])))]
        elif op == "extend" and frames:
            frames[i] += draw(st.binary(min_size=1, max_size=16))
        elif op == "drop" and frames:
            del frames[i]
        elif op == "dup" and frames:
            frames.insert(i, bytearray(frames[i]))
        elif op == "swap" and len(frames) > 1:
            j = draw(st.integers(0, len(frames) - 1))
            frames[i], frames[j] = frames[j], frames[i]
        elif op == "replace" and frames:
            frames[i] = bytearray(draw(st.binary(max_size=64)))
        elif op == "insert":
            frames.insert(i, bytearray(draw(st.binary(max_size=64))))
    kind = draw(st.sampled_from([bytes, bytearray, memoryview]))
    return [kind(f) for f in frames]


random_frames = st.lists(st.binary(max_size=300), max_size=8)
odd_objects = st.lists(
    st.one_of(st.none(), st.integers(), st.text(max_size=10), st.binary(max_size=20), st.floats()),
    max_size=5,
)


@FUZZ
@given(frames=random_frames)
def test_random_frames_signed(frames: list[bytes]) -> None:
    _decode_only_frame_errors(SIGNED, frames)


@FUZZ
@given(frames=random_frames)
def test_random_frames_unsigned_msgpack(frames: list[bytes]) -> None:
    _decode_only_frame_errors(SAFE_UNSIGNED, frames)


@FUZZ
@given(frames=mutated(SIGNED))
def test_mutated_valid_frames_signed(frames: list) -> None:
    _decode_only_frame_errors(SIGNED, frames)


@FUZZ
@given(frames=mutated(SAFE_UNSIGNED))
def test_mutated_valid_frames_unsigned_msgpack(frames: list) -> None:
    _decode_only_frame_errors(SAFE_UNSIGNED, frames)


@FUZZ
@given(frames=odd_objects)
def test_non_buffer_frames(frames: list) -> None:
    _decode_only_frame_errors(SIGNED, frames)
    _decode_only_frame_errors(SAFE_UNSIGNED, frames)


@FUZZ
@given(header=st.binary(max_size=200), payload=st.binary(max_size=50))
def test_random_headers_parse_safely_unverified(header: bytes, payload: bytes) -> None:
    # peek_header parses untrusted msgpack without a MAC check: it too may only raise FrameError.
    try:
        out = SIGNED.peek_header([header, payload, b"m" * 32])
    except FrameError:
        return
    assert isinstance(out, Header)


@FUZZ
@given(fields=st.lists(st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
                                 st.text(max_size=8), st.binary(max_size=8)), max_size=17))
def test_signed_headers_of_any_shape_are_refused_or_valid(fields: list) -> None:
    # What only a key holder could send: any msgpack array as the header, correctly signed. The typed
    # decoder must refuse every shape that is not a valid header, with a FrameError.
    import msgpack

    header = msgpack.packb(fields)
    body = [header, b"\x80\x04N."]  # pickle.dumps(None)
    frames = [*body, SIGNED._mac.compute(body, [len(f) for f in body])]
    _decode_only_frame_errors(SIGNED, frames)


@FUZZ
@given(frames=mutated(SIGNED))
def test_open_and_peek_raise_only_frame_errors(frames: list) -> None:
    for call in (SIGNED.open, SIGNED.open_many, SIGNED.peek_header):
        try:
            call(frames)
        except FrameError:
            pass
