"""The engine's public API is defined once, in rallypoint.engine.__all__, and stays sorted and importable."""

from __future__ import annotations

import types

import rallypoint.engine as engine


def test_all_is_sorted_and_lists_every_public_name() -> None:
    public = sorted(
        name for name, value in vars(engine).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    )
    assert engine.__all__ == sorted(engine.__all__)
    assert engine.__all__ == public


def test_every_name_in_all_resolves() -> None:
    for name in engine.__all__:
        assert getattr(engine, name) is not None


def test_seed_names_are_there() -> None:
    for name in ("Message", "SessionMessage", "SessionType", "RegisterTable", "tag_text", "new_id"):
        assert name in engine.__all__
