"""Cheap unique ids in UUID form.

`uuid.uuid4()` costs ~4 us here (a urandom read per call). A message needs two ids, so we draw 80 random
bits once per process (again after fork) and count in the low 48 bits: still RFC 4122 version-4 text,
unique across processes with overwhelming probability, and ~1 us.
"""

from __future__ import annotations

import itertools
import os
import uuid

_counter = itertools.count()
_format = "%012x".__mod__


def _reseed() -> None:
    global _counter, _format
    h = uuid.uuid4().hex
    # 8-4-4(version nibble 4)-4(variant nibble 8..b)-: the node part is the counter.
    prefix = f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-"
    _counter = itertools.count(int(h[20:], 16) & 0xFFFFFF)
    # A bound `%` of a prebuilt template is the cheapest formatting CPython offers (~0.35 us vs ~0.6 us).
    _format = (prefix.replace("%", "%%") + "%012x").__mod__


_reseed()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed)


def new_id() -> str:
    """A new unique id, formatted as a UUID string."""
    return _format(next(_counter))
