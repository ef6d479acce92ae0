"""Hostile networks: a stranger cannot make a member buffer more than a few MB, and big arrays still travel.

libzmq's ZMQ_MAXMSGSIZE bounds every frame, handshake commands included, and ZmqDriver sets it to the
largest frame the wire codec sends (`MAX_FRAME_BYTES`, ~4 MiB: bigger payload frames travel in parts). The
victim (a gated ZmqDriver with default options) runs in a subprocess; memory is its peak RSS (VmHWM, reset
before each attack), so a buffer allocated and freed in between still counts. Loopback only.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from conftest import TOKEN, Victim
from test_handshake_gate import FLOOD_BYTES, legitimate_client_gets_through, push
from zmtp_raw import COMMAND, LONG, RawZmtp, frame_header, greeting

from rallypoint.proxy._wire import MAX_FRAME_BYTES

pytestmark = pytest.mark.timeout(60)

MB = 1 << 20
MARGIN_KB = 4 * 1024  # allocator and interpreter noise on top of what an attack may cost
BOUND_KB = MAX_FRAME_BYTES // 1024


def hello_header(size: int) -> bytes:
    """The start of a PLAIN HELLO command announcing `size` bytes (name included), long form."""
    return bytes((COMMAND | LONG,)) + size.to_bytes(8, "big") + b"\x05HELLO"


def peak_growth_kb(victim: Victim, base: dict[str, int]) -> int:
    return int(victim.stats()["hwm_kb"]) - int(base["rss_kb"])


def wait_closed(raw: RawZmtp) -> None:
    """Read until the victim closes the connection (its refusal), under the socket's timeout."""
    raw.sock.settimeout(10.0)
    try:
        while raw.sock.recv(65536):
            pass
    except ConnectionResetError:
        pass


@pytest.mark.parametrize("announced", [MAX_FRAME_BYTES + 1, 1 << 30, (1 << 63) - 1])
def test_a_stranger_hello_over_the_bound_is_reset_at_its_header(victims: Callable[..., Victim],
                                                                announced: int) -> None:
    victim = victims()
    base = victim.stats(reset_peak=True)
    with RawZmtp("127.0.0.1", victim.port, mechanism="PLAIN") as raw:
        raw.send_raw(greeting("PLAIN") + hello_header(announced))
        sent = push(raw, bytes(MB), FLOOD_BYTES)
    assert sent < FLOOD_BYTES, "the victim kept reading an oversized handshake command"
    grown = peak_growth_kb(victim, base)
    assert grown < MARGIN_KB, f"peak RSS grew by {grown} KiB for a HELLO announcing {announced} bytes"
    legitimate_client_gets_through(victim, before=0)


@pytest.mark.parametrize("mechanism", ["NULL", "PLAIN"])
def test_a_stranger_part_over_the_bound_is_reset_at_its_header(victims: Callable[..., Victim],
                                                               mechanism: str) -> None:
    # A message part instead of the handshake's command: the decoder checks its size first all the same.
    victim = victims()
    base = victim.stats(reset_peak=True)
    with RawZmtp("127.0.0.1", victim.port, mechanism=mechanism) as raw:
        raw.send_raw(greeting(mechanism) + frame_header(1 << 30))
        sent = push(raw, bytes(MB), FLOOD_BYTES)
    assert sent < FLOOD_BYTES, "the victim kept reading an oversized part from a stranger"
    grown = peak_growth_kb(victim, base)
    assert grown < MARGIN_KB, f"peak RSS grew by {grown} KiB"
    assert victim.stats()["delivered"] == 0


def test_a_stranger_hello_within_the_bound_costs_at_most_the_bound(victims: Callable[..., Victim]) -> None:
    victim = victims()
    base = victim.stats(reset_peak=True)
    with RawZmtp("127.0.0.1", victim.port, mechanism="PLAIN") as raw:
        raw.send_raw(greeting("PLAIN") + hello_header(MAX_FRAME_BYTES) + bytes(MAX_FRAME_BYTES - 6))
        wait_closed(raw)  # buffered whole, then refused: not a HELLO PLAIN can parse
    grown = peak_growth_kb(victim, base)
    assert grown < BOUND_KB + MARGIN_KB, f"peak RSS grew by {grown} KiB, over the {BOUND_KB} KiB bound"
    stats = victim.wait_for(lambda s: s["refused"] >= 1)
    assert stats["delivered"] == 0
    legitimate_client_gets_through(victim, before=0)


def test_strangers_cost_at_most_the_bound_each(victims: Callable[..., Victim]) -> None:
    # Every stranger's handshake command is buffered at once (each one byte short), then they all finish.
    victim = victims()
    base = victim.stats(reset_peak=True)
    strangers = [RawZmtp("127.0.0.1", victim.port, mechanism="PLAIN") for _ in range(4)]
    try:
        for raw in strangers:
            raw.send_raw(greeting("PLAIN") + hello_header(MAX_FRAME_BYTES) + bytes(MAX_FRAME_BYTES - 7))
        for raw in strangers:
            raw.send_raw(b"\0")
            wait_closed(raw)
    finally:
        for raw in strangers:
            raw.close()
    grown = peak_growth_kb(victim, base)
    assert grown < len(strangers) * BOUND_KB + MARGIN_KB, f"peak RSS grew by {grown} KiB"
    assert victim.wait_for(lambda s: s["refused"] >= len(strangers))["delivered"] == 0


def test_a_member_may_send_a_frame_of_exactly_the_bound_and_no_more(victims: Callable[..., Victim]) -> None:
    victim = victims()
    base = victim.stats(reset_peak=True)
    with RawZmtp("127.0.0.1", victim.port, mechanism="PLAIN", password=TOKEN) as raw:
        assert raw.handshake()
        raw.send_part(bytes(MAX_FRAME_BYTES))
        victim.wait_for(lambda s: s["delivered"] == 1)
        raw.send_raw(frame_header(MAX_FRAME_BYTES + 1))
        sent = push(raw, bytes(MB), FLOOD_BYTES)
    assert sent < FLOOD_BYTES, "the victim kept reading a part over the bound"
    assert peak_growth_kb(victim, base) < 2 * BOUND_KB + MARGIN_KB
    assert victim.stats()["delivered"] == 1
