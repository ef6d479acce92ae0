"""The public API is declared once per package (`__all__`), sorted, importable, and light to import."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["rallypoint", "rallypoint.grammar", "rallypoint.proxy", "rallypoint.errors"])
def test_all_is_sorted_and_every_name_resolves(module):
    mod = importlib.import_module(module)
    assert list(mod.__all__) == sorted(mod.__all__)
    for name in mod.__all__:
        assert getattr(mod, name) is not None, name


def test_the_seed_names_are_at_the_top_level():
    import rallypoint

    for name in ("Proxy", "Message", "SessionMessage", "SessionType", "dist", "RegisterTable"):
        assert name in rallypoint.__all__


def test_every_error_derives_from_the_one_root():
    from rallypoint import errors

    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.Error), name
        assert cls.__doc__, f"{name} needs a one-line docstring"


def test_importing_the_engine_loads_neither_zmq_nor_redis():
    code = ("import sys, rallypoint, rallypoint.engine, rallypoint.grammar; "
            "print(sorted(m for m in ('zmq', 'redis', 'fakeredis') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
