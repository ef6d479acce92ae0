"""The shipped pre-built parser tables match the grammars, and are what gets loaded."""

from __future__ import annotations

from importlib import resources

import pytest

from rallypoint.grammar import _lalr


@pytest.mark.parametrize("grammar", ["rules.lark", "spec.lark"])
def test_shipped_tables_are_current(grammar):
    blob = resources.files(_lalr._PACKAGE).joinpath(_lalr._cache_name(grammar)).read_bytes()
    fingerprint = blob.partition(b"\n")[0].decode()
    assert fingerprint == _lalr._fingerprint(grammar), (
        f"{grammar} changed: run `python -m rallypoint.grammar._lalr` to rebuild the shipped tables"
    )


@pytest.mark.parametrize("grammar,newlines,text", [
    ("rules.lark", False, "a:b:1 AND (c:*:60% OR d:e:2)"),
    ("spec.lark", True, "session s {\n states a, b\n initial a\n a -> b on go\n}\nrule r = a:b:1\n"),
])
def test_tables_load_without_building_and_parse_like_a_fresh_build(grammar, newlines, text, monkeypatch):
    fresh = _lalr._build(grammar, newlines=newlines)

    def no_build(*args, **kwargs):
        raise AssertionError("the parser was built instead of loaded")

    monkeypatch.setattr(_lalr, "_build", no_build)
    loaded = _lalr._open(grammar, newlines=newlines)
    assert loaded.parse(text) == fresh.parse(text)


def test_a_stale_table_falls_back_to_building(monkeypatch):
    monkeypatch.setattr(_lalr, "_fingerprint", lambda grammar: "stale")
    built = []
    real_build = _lalr._build
    monkeypatch.setattr(_lalr, "_build", lambda g, **kw: built.append(g) or real_build(g, **kw))
    parser = _lalr._open("rules.lark", newlines=False)
    assert built == ["rules.lark"]
    assert parser.parse("a:b:1") is not None
