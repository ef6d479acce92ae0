"""The built-in specs ship with their parsed ASTs: current, equal to parsing, and ignored when not current."""

from __future__ import annotations

from importlib import resources

import pytest

from rallypoint.engine import _sessions, builtin_spec_names, load_spec
from rallypoint.grammar import _saved, parse_spec

BUILTINS = builtin_spec_names()


def shipped(name: str) -> bytes:
    return resources.files(_sessions._SPECS_PACKAGE).joinpath(_sessions._saved_ast_name(name)).read_bytes()


def text_of(name: str) -> str:
    text = _sessions._read_builtin(name)
    assert text is not None
    return text


def test_the_builtin_session_types_have_saved_asts() -> None:
    assert {"task", "notification"} <= set(BUILTINS)


@pytest.mark.parametrize("name", BUILTINS)
def test_the_shipped_ast_is_current(name: str) -> None:
    assert shipped(name) == _saved.save_spec_ast(text_of(name), _sessions._builtin_origin(name)), (
        f"specs/{name}.spec or rallypoint.grammar changed: run `python -m rallypoint.specs` to rebuild the "
        "saved ASTs"
    )


@pytest.mark.parametrize("name", BUILTINS)
def test_the_saved_ast_is_what_parsing_gives_positions_included(name: str, monkeypatch) -> None:
    parsed = parse_spec(text_of(name), _sessions._builtin_origin(name))
    monkeypatch.setattr(_sessions, "parse_spec", lambda *args: pytest.fail("parsed instead of loaded"))
    saved = _sessions._parse_builtin(name, text_of(name))
    # `==` skips positions and the origin (compare=False); repr shows every field.
    assert saved == parsed and repr(saved) == repr(parsed)
    loaded = load_spec(name)
    assert loaded.origin == parsed.origin and list(loaded.session_types) == [s.name for s in parsed.sessions]


@pytest.mark.parametrize("saved", [
    b"",  # missing
    b"0" * 64 + b"\n{}",  # another text's (or another grammar's) fingerprint
    None,  # the right fingerprint, a damaged body
])
def test_a_saved_ast_that_is_not_current_is_ignored_and_the_text_parsed(saved, monkeypatch) -> None:
    text = text_of("task")
    if saved is None:
        saved = _saved.save_spec_ast(text, "<builtin task>").split(b"\n", 1)[0] + b'\n{"node": "Nope"}'
    assert _saved.load_spec_ast(saved, text) is None
    monkeypatch.setattr(_sessions, "_read_saved_ast", lambda name: saved)
    parsed = _sessions._parse_builtin("task", text)
    assert repr(parsed) == repr(parse_spec(text, "<builtin task>"))


def test_a_saved_ast_is_for_its_own_text_only() -> None:
    text = text_of("task")
    saved = _saved.save_spec_ast(text, "<builtin task>")
    assert _saved.load_spec_ast(saved, text) == parse_spec(text)
    assert _saved.load_spec_ast(saved, text.replace("request -> receive", "request -> failed")) is None


def test_a_saved_ast_from_another_grammar_is_ignored(monkeypatch) -> None:
    text = text_of("task")
    saved = _saved.save_spec_ast(text, "<builtin task>")
    monkeypatch.setattr(_saved, "_parser_digest", lambda: b"the grammar package after some edit")
    assert _saved.load_spec_ast(saved, text) is None


def test_a_file_named_like_a_builtin_in_the_working_directory_does_not_replace_it(tmp_path) -> None:
    import subprocess
    import sys

    (tmp_path / "task").write_text("not a spec at all {\n")
    (tmp_path / "notification").write_text("session notification { states a\n initial a\n final a }\n")
    script = ("from rallypoint.engine import SessionCatalog; catalog = SessionCatalog(); "
              "print(catalog.require('task').initial, sorted(catalog.require('notification').states))")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split(maxsplit=1) == ["request", "['expired', 'failed', 'receive', 'request']\n"]


@pytest.mark.parametrize("name", BUILTINS)
def test_a_saved_ast_does_not_depend_on_the_lark_version(name: str, monkeypatch) -> None:
    import lark

    # JSON of our own AST, fingerprinted by the spec text and our grammar package only: another Lark
    # release neither invalidates it nor is needed to read it.
    monkeypatch.setattr(lark, "__version__", "0.0.0-elsewhere")
    assert _saved.load_spec_ast(shipped(name), text_of(name)) == parse_spec(text_of(name))
