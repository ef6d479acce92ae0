"""The frame codec (proxy/_wire.py): round trips, envelopes, zero copy, MAC, malformed input, replay guard."""

from __future__ import annotations

import enum
import os
import pickle

import msgpack
import numpy as np
import pytest

from rallypoint.engine import Message, SessionMessage, SessionType
from rallypoint.errors import (
    ConfigError,
    ForgedFrame,
    FrameError,
    MalformedFrame,
    OversizedFrame,
    ReplayedFrame,
    TransportError,
)
from rallypoint.proxy._wire import (
    FLAG_OOB_BYTES,
    MAX_FRAME_BYTES,
    MAX_FRAMES,
    PART_BYTES,
    VERSION,
    Envelope,
    Header,
    ReplayGuard,
    WireCodec,
    frame_bound,
)


def Codec(*args, **kwargs):  # noqa: N802 - stands in for the class
    """The multi-frame layout these tests take apart (compact single frames are tested separately)."""
    kwargs.setdefault("compact", False)
    return WireCodec(*args, **kwargs)

pytestmark = pytest.mark.timeout(20)

KEY = b"k" * 32
ZC = 64 * 1024


class Color(str, enum.Enum):
    RED = "red"


class Num(enum.Enum):
    ONE = 1


def roundtrip(codec: WireCodec, message: Message, seq: int = 1) -> tuple[list, Message]:
    frames = codec.encode(message, incarnation="inc-1", seq=seq)
    # What a driver hands over: bytes for small frames, memoryviews for big ones.
    received = [bytes(f) if len(memoryview(f).cast("B")) < ZC else memoryview(bytearray(f)) for f in frames]
    return frames, codec.decode(received)


def assert_same_envelope(a: Message, b: Message) -> None:
    assert type(a) is type(b)
    for attr in ("source", "destination", "session_id", "message_id"):
        assert getattr(a, attr) == getattr(b, attr)
    assert b.tag == a.tag_text
    if isinstance(a, SessionMessage):
        assert isinstance(b, SessionMessage)
        assert b.session_type_name == a.session_type_name
        assert (b.session_stage, b.event) == (a.session_stage, a.event)


# --------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("codec_name", ["pickle", "msgpack"])
@pytest.mark.parametrize("key", [KEY, None], ids=["signed", "unsigned"])
@pytest.mark.parametrize(
    "payload",
    [None, "", {"a": 1, "b": [1, 2.5, "x"], "c": {"d": None}}, b"\x00raw bytes", 12345678901234, "text"],
    ids=["none", "empty", "dict", "bytes", "int", "str"],
)
def test_round_trip_plain_payloads(codec_name: str, key: bytes | None, payload: object) -> None:
    codec = Codec(key, codec=codec_name)
    for message in (
        Message("check_in", "worker_001", "master", payload),
        SessionMessage("sum", "master", "worker_001", payload, session_type=SessionType.TASK),
        SessionMessage("note", "master", "worker_002", payload, session_type=SessionType.NOTIFICATION,
                       session_stage="receive", event="received"),
    ):
        frames, out = roundtrip(codec, message)
        assert_same_envelope(message, out)
        assert out.payload == payload
        assert len(frames) == (3 if key else 2)


def test_session_type_builtin_comes_back_as_enum_and_custom_as_text() -> None:
    codec = Codec(KEY)
    _, out = roundtrip(codec, SessionMessage("t", "a", "b", 1, session_type=SessionType.TASK))
    assert out.session_type is SessionType.TASK
    custom = SessionMessage("vote", "a", "b", 1, session_type="two_phase", session_stage="prepare",
                            event="voted")
    _, out = roundtrip(codec, custom)
    assert (out.session_type, out.session_stage, out.event) == ("two_phase", "prepare", "voted")


@pytest.mark.parametrize("tag,text", [(Color.RED, "red"), (Num.ONE, "1"), ("plain", "plain"), (7, "7")])
def test_enum_tags_travel_by_value(tag: object, text: str) -> None:
    codec = Codec(KEY)
    frames, out = roundtrip(codec, Message(tag, "a", "b"))
    assert out.tag == text
    assert codec.open(frames).header.tag == text


def test_header_routes_without_the_payload(monkeypatch: pytest.MonkeyPatch) -> None:
    codec = Codec(KEY)
    msg = SessionMessage("sum", "master", "worker_001", [1, 2], session_type=SessionType.TASK)
    frames = codec.encode(msg, incarnation="inc-9", seq=42)
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("payload decoded"))
    h = codec.open(frames).header
    assert isinstance(h, Header)
    assert (h.version, h.tag, h.source, h.destination) == (VERSION, "sum", "master", "worker_001")
    assert (h.session_id, h.message_id) == (msg.session_id, msg.message_id)
    assert (h.session_type, h.session_stage, h.event) == ("task", "request", None)
    assert (h.incarnation, h.seq, h.nframes, h.codec_name) == ("inc-9", 42, 1, "pickle")
    assert h.is_session and h.kind == "session"
    plain = codec.open(codec.encode(Message("t", "a", "b"), incarnation="i", seq=1)).header
    assert not plain.is_session and plain.kind == "message" and plain.session_type is None


@pytest.mark.parametrize("compact", [True, False])
def test_an_envelope_checks_the_mac_once_and_decodes_on_demand(
    compact: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    codec = WireCodec(KEY, compact=compact)
    message = SessionMessage("t", "a", "b", [1])
    frames = codec.encode(message, incarnation="i", seq=1)
    envelope = codec.open(frames)
    for name in ("compute", "compute_pair"):
        monkeypatch.setattr(type(codec._mac), name, lambda *a: pytest.fail("MAC computed twice"))
    out = envelope.message()
    assert out.payload == [1] and out.message_id == message.message_id
    assert envelope.message().payload == [1]  # decodes again: each call gives its own objects
    assert envelope.nbytes == sum(memoryview(f).nbytes for f in frames)
    assert pickle.loads(envelope.payload_frames[0]) == [1]
    assert "'t'" in repr(envelope)


def test_only_open_builds_an_envelope() -> None:
    with pytest.raises(TypeError, match="WireCodec.open"):
        Envelope()


def test_a_verified_header_cannot_be_edited() -> None:
    codec = Codec(KEY)
    header = codec.open(codec.encode(Message("t", "a", "b", [1]), incarnation="i", seq=1)).header
    with pytest.raises(AttributeError):
        header.source = "someone else"  # type: ignore[misc]


def test_peek_header_reads_an_unauthenticated_header_that_open_refuses() -> None:
    codec = Codec(KEY)
    frames = codec.encode(Message("t", "a", "b", [1]), incarnation="i", seq=1)
    frames[-1] = bytes(32)  # a wrong MAC
    assert codec.peek_header(frames).tag == "t"
    with pytest.raises(ForgedFrame):
        codec.open(frames)
    with pytest.raises(ForgedFrame):
        codec.decode(frames)
    with pytest.raises(MalformedFrame):
        codec.peek_header([b"\x93\x01\x02\x03", b"p", bytes(32)])  # a header, but not ours


@pytest.mark.parametrize("compact", [True, False])
def test_the_header_is_the_documented_msgpack_array(compact: bool) -> None:
    # The wire layout, field for field: what lets VERSION stay unchanged across codec implementations.
    codec = WireCodec(KEY, compact=compact)
    message = SessionMessage("sum", "master", "w1", [1], session_type="two_phase", session_stage="prepare",
                             event="voted")
    frames = codec.encode(message, incarnation="inc", seq=2**40, to_incarnation="dest")
    header = codec.open(frames).header
    fields = [VERSION, header.flags, 0, "sum", "master", "w1", message.session_id, message.message_id,
              "two_phase", "prepare", "voted", "inc", 2**40, 1, "dest", []]
    expected = msgpack.packb(fields, use_bin_type=True)
    first = bytes(frames[0])
    assert (first[5:5 + len(expected)] if compact else first) == expected
    assert header.__struct_fields__ == (
        "version", "flags", "codec", "tag", "source", "destination", "session_id", "message_id", "session_type",
        "session_stage", "event", "incarnation", "seq", "nframes", "to_incarnation", "parts",
    )


# --------------------------------------------------------------------------------------- zero copy


@pytest.mark.parametrize("order", ["C", "F"])
def test_numpy_arrays_travel_as_separate_zero_copy_frames(order: str) -> None:
    codec = Codec(KEY)
    big = np.asarray(np.arange(40_000, dtype=np.float64).reshape(200, 200), order=order)
    small = np.arange(10, dtype=np.int32)
    msg = SessionMessage("grad", "w", "m", {"big": big, "small": small, "n": 3})
    frames = codec.encode(msg, incarnation="i", seq=1)
    assert len(frames) == 4  # header, pickle stream, the big array's buffer, mac
    buf = frames[2]
    assert isinstance(buf, memoryview) and buf.nbytes == big.nbytes
    assert np.shares_memory(np.frombuffer(buf, dtype=np.uint8), big)  # no copy on send
    received = [bytes(frames[0]), bytes(frames[1]), bytearray(frames[2]), bytes(frames[3])]
    out = codec.decode(received).payload
    assert np.array_equal(out["big"], big) and out["big"].dtype == big.dtype
    assert np.array_equal(out["small"], small) and out["n"] == 3
    # Rebuilt on the received frame's memory (no copy on receive), and writable since the frame is.
    assert np.shares_memory(out["big"], np.frombuffer(received[2], dtype=np.uint8))
    out["big"][0, 0] = -1.0


def test_readonly_array_stays_readonly() -> None:
    codec = Codec(KEY)
    arr = np.ones(20_000)
    arr.setflags(write=False)
    frames = codec.encode(Message("x", "a", "b", arr), incarnation="i", seq=1)
    out = codec.decode([bytes(f) for f in frames]).payload
    assert np.array_equal(out, arr) and not out.flags.writeable


@pytest.mark.parametrize("kind", [bytes, bytearray])
@pytest.mark.parametrize("where", ["top", "in_dict", "in_list_in_dict"])
def test_big_bytes_travel_out_of_band(kind: type, where: str) -> None:
    codec = Codec(KEY)
    blob = kind(os.urandom(ZC + 1))
    payload = {"top": blob, "in_dict": {"blob": blob, "x": 1},
               "in_list_in_dict": {"parts": [b"small", blob]}}[where]
    frames = codec.encode(Message("x", "a", "b", payload), incarnation="i", seq=1)
    assert codec.open(frames).header.flags & FLAG_OOB_BYTES
    assert len(frames) == 4 and memoryview(frames[2]).nbytes == len(blob)
    assert max(len(memoryview(f)) for f in (frames[0], frames[1])) < 1024  # not pickled in band
    out = codec.decode([bytes(f) for f in frames]).payload
    assert out == payload
    got = out if where == "top" else out["blob"] if where == "in_dict" else out["parts"][1]
    assert type(got) is kind


def test_small_buffers_stay_in_band() -> None:
    codec = Codec(KEY, zero_copy_threshold=1 << 20)
    arr = np.arange(1000.0)
    frames = codec.encode(Message("x", "a", "b", {"a": arr, "b": b"x" * 5000}), incarnation="i", seq=1)
    assert len(frames) == 3
    out = codec.decode(frames).payload
    assert np.array_equal(out["a"], arr) and out["b"] == b"x" * 5000


def test_big_frames_enter_the_mac_as_digests_and_are_still_covered() -> None:
    codec = Codec(KEY)
    arr = np.arange(100_000, dtype=np.int64)
    frames = [bytearray(f) for f in codec.encode(Message("x", "a", "b", arr), incarnation="i", seq=1)]
    frames[2][len(frames[2]) // 2] ^= 0x01
    with pytest.raises(ForgedFrame):
        codec.decode(frames)


def test_every_byte_of_a_big_frame_is_covered() -> None:
    codec = Codec(KEY, max_part_bytes=16 << 20)  # one frame: parts are tested below
    arr = np.arange((9 << 20) // 8, dtype=np.int64)  # 9 MiB: one Poly1305 tag over the whole frame
    frames = codec.encode(Message("x", "a", "b", arr), incarnation="i", seq=1)
    assert np.array_equal(codec.decode(frames).payload, arr)
    for pos in (0, 15, 16, (5 << 20) + 7, (9 << 20) - 1):  # first, last, and across 16-byte blocks
        forged = [bytearray(f) for f in frames]
        forged[2][pos] ^= 0x10
        with pytest.raises(ForgedFrame):
            codec.decode(forged)


def test_a_big_frame_cannot_be_swapped_in_from_another_signed_message() -> None:
    # Each message's big frames are tagged under a one-time key derived from its own header, so a frame of
    # the same length taken from another signed message does not verify.
    codec = Codec(KEY)
    first = codec.encode(Message("x", "a", "b", np.zeros(16384)), incarnation="i", seq=1)
    second = codec.encode(Message("x", "a", "b", np.ones(16384)), incarnation="i", seq=2)
    assert len(first) == len(second) == 4
    spliced = [first[0], first[1], second[2], first[3]]
    with pytest.raises(ForgedFrame):
        codec.decode(spliced)
    assert np.array_equal(codec.decode(first).payload, np.zeros(16384))


# ---------------------------------------------------------------------------------------- the MAC


def _valid_frames(codec: WireCodec) -> list[bytes]:
    msg = SessionMessage("sum", "master", "w1", {"a": np.arange(20_000), "s": "x" * 5000})
    return [bytes(f) for f in codec.encode(msg, incarnation="i", seq=1)]


def test_a_flipped_bit_in_any_frame_is_rejected() -> None:
    codec = Codec(KEY)
    frames = _valid_frames(codec)
    assert len(frames) == 4
    for i, frame in enumerate(frames):
        for pos in {0, len(frame) // 2, len(frame) - 1}:
            for bit in (0x01, 0x80):
                forged = list(frames)
                mutated = bytearray(frame)
                mutated[pos] ^= bit
                forged[i] = bytes(mutated)
                with pytest.raises(ForgedFrame):
                    codec.decode(forged)


def test_frames_cannot_be_resplit() -> None:
    codec = Codec(KEY)
    frames = [bytes(f) for f in codec.encode(Message("t", "a", "b", "payload"), incarnation="i", seq=1)]
    # Move a byte from the header to the payload frame: same concatenation, different split.
    resplit = [frames[0][:-1], frames[0][-1:] + frames[1], frames[2]]
    with pytest.raises(FrameError):
        codec.decode(resplit)


def test_wrong_key_is_forged() -> None:
    frames = _valid_frames(Codec(b"other key"))
    with pytest.raises(ForgedFrame):
        Codec(KEY).decode(frames)


def test_nothing_unauthenticated_reaches_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: calls.append(a))
    codec = Codec(KEY)
    evil = pickle.dumps(Exception("pwned"))  # stands in for a malicious pickle
    frames = [bytes(f) for f in codec.encode(Message("t", "a", "b", 1), incarnation="i", seq=1)]
    frames[1] = evil
    with pytest.raises(ForgedFrame):
        codec.decode(frames)
    with pytest.raises(ForgedFrame):
        codec.open(frames)
    assert codec.peek_header(frames).tag == "t"  # readable, but there is no way to decode the payload with it
    assert calls == []


def test_signed_and_unsigned_do_not_mix() -> None:
    signed, unsigned = Codec(KEY), Codec(None)
    msg = Message("t", "a", "b", [1])
    with pytest.raises(FrameError):
        signed.decode(unsigned.encode(msg, incarnation="i", seq=1))
    with pytest.raises(FrameError):
        unsigned.decode(signed.encode(msg, incarnation="i", seq=1))


def test_long_keys_are_accepted_and_empty_keys_are_not() -> None:
    codec = Codec(b"x" * 200)
    assert codec.decode(codec.encode(Message("t", "a", "b", 1), incarnation="i", seq=1)).payload == 1
    with pytest.raises(ConfigError):
        Codec(b"")


# ------------------------------------------------------------------------------- malformed frames


@pytest.mark.parametrize(
    "mangle,error",
    [
        (lambda f: [], MalformedFrame),
        (lambda f: f[:1], MalformedFrame),
        (lambda f: f[:-1], FrameError),  # mac dropped: the last payload frame is taken for the mac
        (lambda f: [f[0], f[-1]], FrameError),  # payload frames dropped
        (lambda f: f + [b"extra"], FrameError),
        (lambda f: f[:-1] + [b"extra", f[-1]], FrameError),
        (lambda f: [f[0][:10]] + f[1:], FrameError),  # truncated header
        (lambda f: [f[0], f[1][:-1]] + f[2:], ForgedFrame),  # truncated payload
        (lambda f: f[:-1] + [f[-1][:16]], ForgedFrame),  # truncated mac
        (lambda f: [f[1], f[0]] + f[2:], FrameError),  # reordered
        (lambda f: [b"\xc1" * 40] + f[1:], FrameError),  # garbage header
        (lambda f: [1, 2, 3], MalformedFrame),  # not buffers at all
        (lambda f: ["text", "more"], MalformedFrame),
    ],
)
def test_malformed_frame_lists_raise_typed_errors(mangle, error) -> None:  # type: ignore[no-untyped-def]
    codec = Codec(KEY)
    frames = _valid_frames(codec)
    with pytest.raises(error):
        codec.decode(mangle(frames))


def _signed_with_header(codec: WireCodec, header: bytes, payload: list[bytes]) -> list[bytes]:
    """Frames with an arbitrary header, correctly signed: what only a key holder could send."""
    body = [header, *payload]
    assert codec._mac is not None
    return [*body, codec._mac.compute(body, [len(f) for f in body])]


def _fields(**changes: object) -> list[object]:
    base: dict[str, object] = dict(
        version=VERSION, flags=0, codec=0, tag="t", source="a", destination="b", session_id="s",
        message_id="m", session_type=None, session_stage=None, event=None, incarnation="i", seq=1, nframes=1,
        to_incarnation="", parts=[],
    )
    base.update(changes)
    return list(base.values())


@pytest.mark.parametrize(
    "header",
    [
        msgpack.packb(_fields(version=VERSION + 1)),
        msgpack.packb(_fields(version="1")),
        msgpack.packb(_fields()[:-1]),  # too short
        msgpack.packb([*_fields(), ""]),  # too long
        msgpack.packb(_fields(flags=True)),  # a bool is not an int
        msgpack.packb(_fields(seq=1.0)),
        msgpack.packb(_fields(nframes=-1)),
        msgpack.packb(_fields(session_type=1)),
        msgpack.packb(_fields(to_incarnation=None)),
        msgpack.packb({"version": 1}),
        msgpack.packb(_fields(seq=-1)),
        msgpack.packb(_fields(seq="1")),
        msgpack.packb(_fields(source=None)),
        msgpack.packb(_fields(tag=b"bytes")),
        msgpack.packb(_fields(flags=0x80)),
        msgpack.packb(_fields(codec=9)),
        msgpack.packb(_fields(nframes=3)),
        msgpack.packb(_fields(flags=1)),  # a session message without a session type
        msgpack.packb(_fields()) + b"trailing",
        b"",
        os.urandom(64),
    ],
)
def test_bad_headers_are_malformed_even_when_signed(header: bytes) -> None:
    codec = Codec(KEY)
    with pytest.raises(MalformedFrame):
        codec.decode(_signed_with_header(codec, header, [pickle.dumps(1)]))


def test_wrong_version_is_named() -> None:
    codec = Codec(KEY)
    frames = _signed_with_header(codec, msgpack.packb(_fields(version=99)), [pickle.dumps(1)])
    with pytest.raises(MalformedFrame, match="version 99"):
        codec.decode(frames)
    # Even when the rest of the header has another layout: the version is what to report.
    frames = _signed_with_header(codec, msgpack.packb([99, "another", "layout"]), [pickle.dumps(1)])
    with pytest.raises(MalformedFrame, match="version 99"):
        codec.open(frames)


def test_the_field_at_fault_is_named() -> None:
    codec = Codec(KEY)
    frames = _signed_with_header(codec, msgpack.packb(_fields(seq=-5)), [pickle.dumps(1)])
    with pytest.raises(MalformedFrame, match="'seq'"):
        codec.open(frames)


def test_authenticated_but_undecodable_payload_is_malformed() -> None:
    codec = Codec(KEY)
    header = msgpack.packb(_fields())
    with pytest.raises(MalformedFrame):
        codec.decode(_signed_with_header(codec, header, [b"not a pickle"]))
    # A class the receiver cannot import.
    stream = pickle.dumps(1).replace(b"K\x01", b"\x8c\x0bno_such_mod\x94\x8c\x01X\x94\x93\x94)R\x94")
    with pytest.raises(MalformedFrame):
        codec.decode(_signed_with_header(codec, header, [stream]))


def test_oversized_is_refused_from_lengths_before_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    codec = Codec(KEY, max_message_bytes=100_000)
    frames = [b"h" * 10, b"p" * 200_000, b"m" * 32]
    monkeypatch.setattr(type(codec._mac), "compute", lambda *a: pytest.fail("hashed an oversized message"))
    with pytest.raises(OversizedFrame):
        codec.decode(frames)


def test_encode_refuses_what_the_receiver_would_refuse() -> None:
    codec = Codec(KEY, max_message_bytes=100_000)
    with pytest.raises(ConfigError, match="max_message_bytes"):
        codec.encode(Message("t", "a", "b", b"x" * 200_000), incarnation="i", seq=1)
    with pytest.raises(ConfigError):
        codec.encode(Message("t", None, "b"), incarnation="i", seq=1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        codec.encode(Message("t", "a", "b"), incarnation="i", seq=-1)
    with pytest.raises(ConfigError):
        codec.encode(Message("t", "a", "b", lambda: 1), incarnation="i", seq=1)


def test_frame_errors_are_transport_errors() -> None:
    for cls in (MalformedFrame, ForgedFrame, OversizedFrame, ReplayedFrame):
        assert issubclass(cls, FrameError) and issubclass(cls, TransportError)


# ---------------------------------------------------------------------------------------- msgpack


def test_msgpack_codec_rejects_unsupported_payloads_at_encode() -> None:
    codec = Codec(KEY, codec="msgpack")
    for payload in (np.arange(3), {1, 2}, object()):
        with pytest.raises(ConfigError, match="msgpack"):
            codec.encode(Message("t", "a", "b", payload), incarnation="i", seq=1)
    # The packer is still usable afterwards.
    assert roundtrip(codec, Message("t", "a", "b", {"ok": [1, (2, 3)]}))[1].payload == {"ok": [1, [2, 3]]}


def test_msgpack_codec_never_unpickles() -> None:
    pickler, safe = Codec(KEY, codec="pickle"), Codec(KEY, codec="msgpack")
    frames = pickler.encode(Message("t", "a", "b", [1]), incarnation="i", seq=1)
    with pytest.raises(MalformedFrame, match="msgpack-only"):
        safe.decode(frames)
    # The other way round is fine: msgpack is safe for everyone.
    assert pickler.decode(safe.encode(Message("t", "a", "b", [1]), incarnation="i", seq=1)).payload == [1]


def test_msgpack_keeps_non_string_keys_and_binary() -> None:
    codec = Codec(KEY, codec="msgpack")
    payload = {1: b"\x00\x01", "x": [None, True, 1.5]}
    assert roundtrip(codec, Message("t", "a", "b", payload))[1].payload == payload


def test_unknown_codec_and_bad_options() -> None:
    with pytest.raises(ConfigError):
        Codec(KEY, codec="json")
    with pytest.raises(ConfigError):
        Codec(KEY, max_message_bytes=10)
    with pytest.raises(ConfigError):
        Codec(KEY, zero_copy_threshold=0)


# ----------------------------------------------------------------------------------- replay guard


def test_replay_guard_refuses_old_and_repeated_seqs() -> None:
    guard = ReplayGuard()
    guard.check("w1", "inc-a", 1)
    guard.check("w1", "inc-a", 5)  # gaps are fine: one counter serves all destinations
    for seq in (5, 4, 1):
        with pytest.raises(ReplayedFrame):
            guard.check("w1", "inc-a", seq)
    guard.check("w1", "inc-a", 6)
    guard.check("w2", "inc-z", 1)  # other sources are independent


def test_replay_guard_accepts_a_new_incarnation_and_remembers_the_old() -> None:
    guard = ReplayGuard(window=2)
    guard.check("w1", "old", 10)
    guard.check("w1", "new", 1)  # a restarted process starts counting again
    with pytest.raises(ReplayedFrame):
        guard.check("w1", "old", 10)
    guard.check("w1", "newer", 1)  # evicts "old": at most 2 incarnations per source
    guard.check("w1", "old", 10)  # forgotten, so accepted: the proxy checks registered incarnations
    with pytest.raises(ReplayedFrame):
        guard.check("w1", "newer", 1)


def test_replay_guard_memory_is_bounded() -> None:
    guard = ReplayGuard(window=1, max_sources=3)
    for i in range(10):
        guard.check(f"w{i}", "i", 1)
    assert len(guard) == 3
    guard.forget("w9")
    assert len(guard) == 2
    with pytest.raises(ConfigError):
        ReplayGuard(window=0)


def test_replay_guard_with_the_codec() -> None:
    codec, guard = Codec(KEY), ReplayGuard()
    frames = codec.encode(Message("t", "a", "b"), incarnation="inc", seq=1)
    h = codec.open(frames).header
    guard.check(h.source, h.incarnation, h.seq)
    h2 = codec.open(frames).header
    with pytest.raises(ReplayedFrame):  # the same frames again
        guard.check(h2.source, h2.incarnation, h2.seq)


# ------------------------------------------------------------------------- compact single frames


@pytest.mark.parametrize("key", [KEY, None], ids=["signed", "unsigned"])
@pytest.mark.parametrize("codec_name", ["pickle", "msgpack"])
def test_small_messages_travel_as_one_frame_and_round_trip(key, codec_name):
    codec = WireCodec(key, codec=codec_name)
    message = SessionMessage(tag="sum", source="master", destination="worker_1", payload=[1, "two", 3.0])
    frames = codec.encode(message, incarnation="inc", seq=5, to_incarnation="dest")
    assert len(frames) == 1 and bytes(frames[0])[0] == 0xC1
    envelope = codec.open(frames)
    assert (envelope.header.tag, envelope.header.seq, envelope.header.to_incarnation) == ("sum", 5, "dest")
    out = envelope.message()
    assert out.payload == [1, "two", 3.0] and out.message_id == message.message_id
    assert codec.decode([memoryview(frames[0])]).payload == [1, "two", 3.0]  # any buffer will do


def test_big_payloads_still_travel_as_separate_frames():
    frames = WireCodec(KEY).encode(Message("x", "a", "b", payload=b"\x00" * 200_000), incarnation="i", seq=1)
    assert len(frames) > 1


def test_a_compact_frame_with_any_flipped_byte_is_rejected():
    codec = WireCodec(KEY)
    [frame] = codec.encode(Message("x", "a", "b", payload={"k": 1}), incarnation="i", seq=1)
    for i in range(len(frame)):
        mutated = bytearray(frame)
        mutated[i] ^= 0x01
        with pytest.raises(FrameError):
            codec.decode([bytes(mutated)])


@pytest.mark.parametrize("cut", [1, 4, 5, 20, -33, -1])
def test_truncated_or_lying_compact_frames_are_malformed(cut):
    codec = WireCodec(KEY)
    [frame] = codec.encode(Message("x", "a", "b", payload=1), incarnation="i", seq=1)
    with pytest.raises(FrameError):
        codec.decode([frame[:cut]])
    liar = frame[:1] + (10**6).to_bytes(4, "little") + frame[5:]
    with pytest.raises(MalformedFrame):
        codec.decode([liar])


def test_compact_and_split_frames_carry_the_same_mac():
    compact, split = WireCodec(KEY), WireCodec(KEY, compact=False)
    message = Message("x", "a", "b", payload=[1, 2])
    [frame] = compact.encode(message, incarnation="i", seq=1)
    header, payload, mac = split.encode(message, incarnation="i", seq=1)
    assert frame[-32:] == mac and split.decode([frame]).payload == [1, 2]
    assert compact.decode([header, payload, mac]).payload == [1, 2]


@pytest.mark.parametrize("big", [False, True], ids=["small", "big"])
def test_rekey_signs_with_the_new_key_and_accepts_the_old_during_its_grace(big: bool) -> None:
    new_key = b"n" * 32
    payload = np.arange(ZC, dtype=np.uint8) if big else [1, 2]
    message = SessionMessage("sum", "master", "worker_1", payload=payload)
    old_sender, new_sender = WireCodec(KEY), WireCodec(new_key)
    receiver = WireCodec(KEY)
    receiver.rekey(new_key, grace=60)
    for sender in (old_sender, new_sender):  # peers that switched already, and those that have not yet
        got = receiver.decode(sender.encode(message, incarnation="i", seq=1))
        assert got.message_id == message.message_id
    # What it sends now is signed with the new key only.
    with pytest.raises(ForgedFrame):
        WireCodec(KEY).decode(receiver.encode(message, incarnation="i", seq=2))
    assert new_sender.decode(receiver.encode(message, incarnation="i", seq=3)).message_id == message.message_id


def test_rekey_forgets_the_old_key_after_its_grace() -> None:
    message = SessionMessage("sum", "master", "worker_1", payload=[1, 2])
    receiver = WireCodec(KEY)
    receiver.rekey(b"n" * 32, grace=0)
    with pytest.raises(ForgedFrame):
        receiver.decode(WireCodec(KEY).encode(message, incarnation="i", seq=1))
    receiver.rekey(b"m" * 32, grace=60)  # only the key it replaced is kept, not every earlier one
    with pytest.raises(ForgedFrame):
        receiver.decode(WireCodec(KEY).encode(message, incarnation="i", seq=2))


def test_rekey_needs_a_signed_codec_and_a_grace() -> None:
    with pytest.raises(ConfigError):
        WireCodec(None).rekey(KEY, grace=1)
    with pytest.raises(ConfigError):
        WireCodec(KEY).rekey(b"n" * 32, grace=-1)


# -------------------------------------------------------------------- several messages in one frame


def _open_all(codec: WireCodec, multiparts: list[list]) -> list[Envelope]:
    return [envelope for frames in multiparts for envelope in codec.open_many([bytes(f) for f in frames])]


@pytest.mark.parametrize("key", [KEY, None], ids=["signed", "unsigned"])
def test_encode_many_batches_small_messages_in_order(key: bytes | None) -> None:
    codec = WireCodec(key)
    messages = [SessionMessage("t", "m", "w", i) for i in range(5)]
    messages += [Message("big", "m", "w", np.arange(20_000)), Message("last", "m", "w", "alone")]
    out = codec.encode_many(messages, incarnation="inc", seqs=range(10, 17))
    assert [len(frames) for frames in out] == [1, 4 if key else 3, 1]  # a batch, the big one, a compact one
    envelopes = _open_all(codec, out)
    assert [e.header.seq for e in envelopes] == list(range(10, 17))
    got = [e.message() for e in envelopes]
    assert [m.message_id for m in got] == [m.message_id for m in messages]
    assert [m.payload for m in got[:5]] == list(range(5)) and got[6].payload == "alone"
    assert np.array_equal(got[5].payload, np.arange(20_000))
    assert sum(e.nbytes for e in envelopes[:5]) < len(out[0][0])  # each envelope counts its own entry


def test_a_batch_stays_within_max_message_bytes() -> None:
    codec = WireCodec(KEY, max_message_bytes=4096)
    messages = [Message("t", "m", "w", b"x" * 700) for _ in range(20)]
    out = codec.encode_many(messages, incarnation="i", seqs=range(1, 21))
    assert len(out) > 1 and all(len(frames) == 1 and len(frames[0]) <= 4096 for frames in out)
    assert [e.message().message_id for e in _open_all(codec, out)] == [m.message_id for m in messages]


def test_a_batch_is_refused_whole_when_any_byte_changes() -> None:
    codec = WireCodec(KEY)
    [[frame]] = codec.encode_many([Message("t", "a", "b", i) for i in range(3)], incarnation="i", seqs=[1, 2, 3])
    for i in range(len(frame)):
        mutated = bytearray(frame)
        mutated[i] ^= 0x01
        with pytest.raises(FrameError):
            codec.open_many([bytes(mutated)])
    with pytest.raises(MalformedFrame, match="open_many"):
        codec.open([frame])  # one envelope per frame cannot hold a batch
    with pytest.raises(FrameError):  # a batch's MAC is never a message's: re-split, it does not verify
        codec.open_many([frame[:-32], frame[-32:]])
    with pytest.raises(ForgedFrame):
        WireCodec(b"other key").open_many([frame])


def test_open_many_opens_a_single_message_too() -> None:
    codec = WireCodec(KEY)
    [envelope] = codec.open_many(codec.encode(Message("t", "a", "b", 1), incarnation="i", seq=1))
    assert envelope.message().payload == 1


def test_a_batch_signed_with_the_replaced_key_is_accepted_during_the_grace() -> None:
    old_sender, receiver = WireCodec(KEY), WireCodec(KEY)
    receiver.rekey(b"n" * 32, grace=60)
    [[frame]] = old_sender.encode_many([Message("t", "a", "b", i) for i in range(2)], incarnation="i", seqs=[1, 2])
    assert [e.message().payload for e in receiver.open_many([frame])] == [0, 1]


def test_encode_many_refuses_what_encode_refuses() -> None:
    codec = WireCodec(KEY)
    with pytest.raises(ConfigError):
        codec.encode_many([Message("t", "a", "b")], incarnation="i", seqs=[1, 2])
    with pytest.raises(ConfigError):
        codec.encode_many([Message("t", "a", "b"), Message("t", "a", "b", lambda: 1)], incarnation="i", seqs=[1, 2])
    assert codec.encode_many([], incarnation="i", seqs=[]) == []


# ------------------------------------------------------------------------------ big frames in parts

MIB = 1 << 20


def _received(frames: list) -> list:
    """What a driver hands over: bytes for small frames, writable memoryviews of their own memory for big ones."""
    return [bytes(f) if memoryview(f).nbytes < ZC else memoryview(bytearray(f)) for f in frames]


def test_a_frame_over_max_part_bytes_travels_as_views_in_parts_and_is_joined_once() -> None:
    codec = WireCodec(KEY)
    assert codec.max_part_bytes == PART_BYTES == 4 * MIB
    big = np.arange((9 * MIB) // 8, dtype=np.float64)  # 9 MiB: parts of 4 + 4 + 1 MiB
    frames = codec.encode(Message("x", "a", "b", {"w": big}), incarnation="i", seq=1)
    assert len(frames) == 6  # header, pickle stream, 3 parts, mac
    assert [memoryview(f).nbytes for f in frames[2:5]] == [4 * MIB, 4 * MIB, MIB]
    for part in frames[2:5]:  # no copy on send: every part is a view of the array
        assert np.shares_memory(np.frombuffer(part, dtype=np.uint8), big)
    received = _received(frames)
    envelope = codec.open(received)
    assert envelope.header.parts == ((1, 3),) and envelope.header.nframes == 4
    assert envelope.nbytes == sum(memoryview(f).nbytes for f in frames)
    out = envelope.message().payload["w"]
    assert np.array_equal(out, big) and out.flags.writeable
    assert not any(np.shares_memory(out, np.frombuffer(f, dtype=np.uint8)) for f in received[2:5])  # joined
    assert [memoryview(f).nbytes for f in envelope.payload_frames] == [len(received[1]), big.nbytes]


def test_a_frame_within_the_part_bound_is_not_split_and_stays_zero_copy() -> None:
    codec = WireCodec(KEY)
    exact = np.zeros(PART_BYTES, dtype=np.uint8)
    frames = codec.encode(Message("x", "a", "b", exact), incarnation="i", seq=1)
    assert len(frames) == 4 and memoryview(frames[2]).nbytes == PART_BYTES
    received = _received(frames)
    envelope = codec.open(received)
    assert envelope.header.parts == ()
    out = envelope.message().payload
    assert np.shares_memory(out, np.frombuffer(received[2], dtype=np.uint8))  # rebuilt on the received frame


@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_big_bytes_in_parts_come_back_as_their_type(kind: type) -> None:
    codec = WireCodec(KEY, max_part_bytes=ZC)
    blob = kind(os.urandom(5 * ZC + 3))
    payload = {"blob": blob, "small": np.arange(5), "other": kind(os.urandom(ZC))}
    frames = codec.encode(Message("x", "a", "b", payload), incarnation="i", seq=1)
    assert max(memoryview(f).nbytes for f in frames) <= codec.max_frame_bytes
    envelope = codec.open(_received(frames))
    assert envelope.header.flags & FLAG_OOB_BYTES and envelope.header.parts == ((1, 6),)
    out = envelope.message().payload
    assert out["blob"] == blob and type(out["blob"]) is kind and type(out["other"]) is kind
    assert np.array_equal(out["small"], np.arange(5))


def test_every_payload_frame_can_be_split_the_stream_several_buffers_and_msgpack() -> None:
    codec = WireCodec(KEY, max_part_bytes=ZC)
    in_band = list(range(100_000))  # a pickle stream of ~300 KB: the stream itself travels in parts
    arrays = [np.full(3 * ZC // 8, i, dtype=np.int64) for i in range(2)]
    payload = {"list": in_band, "a": arrays[0], "mid": np.arange(ZC // 8), "b": arrays[1]}
    frames = codec.encode(Message("x", "a", "b", payload), incarnation="i", seq=1)
    envelope = codec.open(_received(frames))
    assert [index for index, _ in envelope.header.parts] == [0, 1, 3]
    out = envelope.message().payload
    assert out["list"] == in_band and np.array_equal(out["mid"], np.arange(ZC // 8))
    assert np.array_equal(out["a"], arrays[0]) and np.array_equal(out["b"], arrays[1])
    packed = WireCodec(KEY, codec="msgpack", max_part_bytes=ZC)
    data = {"blob": os.urandom(3 * ZC), "n": 1}
    frames = packed.encode(Message("x", "a", "b", data), incarnation="i", seq=2)
    assert len(frames) == 2 + 4 and packed.open(frames).header.parts == ((0, 4),)
    assert packed.decode(_received(frames)).payload == data


def test_every_part_is_covered_by_the_mac_in_its_place() -> None:
    codec = WireCodec(KEY, max_part_bytes=ZC)
    frames = [bytes(f) for f in codec.encode(Message("x", "a", "b", np.arange(ZC // 2, dtype=np.int64)),
                                             incarnation="i", seq=1)]
    assert len(frames) == 2 + 4 + 1
    for i in range(2, 6):
        for pos in (0, len(frames[i]) - 1):
            forged = list(frames)
            forged[i] = bytes(b ^ 0x01 if j == pos else b for j, b in enumerate(forged[i][:pos + 1])) + \
                forged[i][pos + 1:]
            with pytest.raises(ForgedFrame):
                codec.decode(forged)
    swapped = frames[:2] + [frames[3], frames[2]] + frames[4:]
    with pytest.raises(ForgedFrame):
        codec.decode(swapped)
    with pytest.raises(ForgedFrame):  # a part dropped (the MAC covers the frame count, and comes first)
        codec.decode(frames[:3] + frames[4:])
    rejoined = frames[:2] + [frames[2] + frames[3]] + frames[4:]  # parts merged: the count no longer fits
    with pytest.raises(FrameError):
        codec.decode(rejoined)


def test_the_size_bound_counts_every_part_before_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    codec = WireCodec(KEY, max_message_bytes=10 * ZC, max_part_bytes=ZC)
    with pytest.raises(ConfigError, match="max_message_bytes"):
        codec.encode(Message("x", "a", "b", os.urandom(11 * ZC)), incarnation="i", seq=1)
    frames = [b"h" * 10] + [b"p" * ZC] * 11 + [b"m" * 32]  # every part within the part bound, 11 in all
    monkeypatch.setattr(type(codec._mac), "compute", lambda *a: pytest.fail("hashed an oversized message"))
    with pytest.raises(OversizedFrame):
        codec.open(frames)


def test_a_signed_header_whose_parts_do_not_fit_is_malformed() -> None:
    codec = Codec(KEY)
    stream = pickle.dumps(b"x" * 100)
    pieces = [stream[:40], stream[40:80], stream[80:]]
    good = _signed_with_header(codec, msgpack.packb(_fields(nframes=3, parts=[[0, 3]])), pieces)
    assert codec.decode(good).payload == b"x" * 100  # a stream in 3 parts, joined back
    for parts in ([[0, 1]], [[0, 2], [0, 2]], [[1, 2], [0, 2]], [[2, 2]], [[0, 4]], [[0, 2], [1, 2]],
                  [[-1, 3]], [0, 3], [[0, 3, 1]], [[0, "3"]]):
        frames = _signed_with_header(codec, msgpack.packb(_fields(nframes=3, parts=parts)), pieces)
        with pytest.raises(MalformedFrame):
            codec.open(frames)
    compact = WireCodec(KEY)  # a compact frame never has parts: the one-pass path hands it to the full checks
    header = msgpack.packb(_fields(parts=[[0, 2]]))
    body = [header, stream]
    assert compact._mac is not None
    mac = compact._mac.compute(body, [len(f) for f in body])
    frame = b"\xc1" + len(header).to_bytes(4, "little") + header + stream + mac
    with pytest.raises(MalformedFrame, match="parts"):
        compact.open([frame])


def test_no_frame_exceeds_max_frame_bytes() -> None:
    codec = WireCodec(KEY, max_part_bytes=ZC)
    assert codec.max_frame_bytes == frame_bound(ZC) and MAX_FRAME_BYTES == frame_bound(PART_BYTES)
    messages = [Message("t", "m", "w", b"x" * 700) for _ in range(300)]  # batches
    messages += [Message("big", "m", "w", os.urandom(10 * ZC)), Message("c", "m", "w", "x" * (ZC - 100))]
    out = codec.encode_many(messages, incarnation="i", seqs=range(1, len(messages) + 1))
    assert len(out) > 3  # the small ones in several batches, each a frame within the part bound
    assert all(memoryview(f).nbytes <= ZC for frames in out[:-2] for f in frames)
    assert all(memoryview(f).nbytes <= codec.max_frame_bytes for frames in out for f in frames)
    got = [e.message().payload for frames in out for e in codec.open_many(_received(frames))]
    assert got == [m.payload for m in messages]


def test_a_two_gib_message_fits_in_parts() -> None:
    codec = WireCodec(None, max_message_bytes=1 << 31)  # unsigned: nothing hashed, untouched pages stay unmapped
    blob = bytes((1 << 31) - 4096)
    frames = codec.encode(Message("x", "a", "b", blob), incarnation="i", seq=1)
    assert len(frames) == 2 + 512 <= MAX_FRAMES
    envelope = codec.open(frames)
    assert envelope.header.parts == ((1, 512),) and envelope.nbytes <= 1 << 31


def test_part_bounds_that_cannot_work_are_refused() -> None:
    with pytest.raises(ConfigError, match="zero_copy_threshold"):
        WireCodec(KEY, max_part_bytes=ZC - 1)
    with pytest.raises(ConfigError, match="too small"):
        WireCodec(KEY, max_message_bytes=1 << 33, max_part_bytes=ZC)  # 131072 parts
    assert WireCodec(KEY, max_message_bytes=1 << 20, max_part_bytes=1024, zero_copy_threshold=1024).max_part_bytes \
        == 1024
