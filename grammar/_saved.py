"""Parsed specs saved as JSON, so that a spec shipped with its saved AST can be used without Lark.

A saved spec is one line holding a fingerprint, then the AST as JSON. The fingerprint covers the spec text
and every grammar and Python file of this package (the grammars, the code that turns Lark's trees into the
AST, the AST classes, this encoding): a saved AST is used only if parsing the text here would give the
same AST, and anything else (stale, missing, unreadable) means parse the text as usual.

    >>> text = "session ping {\\n states sent, done\\n initial sent\\n sent -> done on pong\\n}"
    >>> load_spec_ast(save_spec_ast(text, "ping.spec"), text) == parse_spec(text)
    True
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from importlib import resources
from typing import Any

from ._ast import And, Or, RuleDef, SessionDef, SpecFile, TransitionDef, Unit
from ._parse import parse_spec

__all__ = ["load_spec_ast", "save_spec_ast"]

_PACKAGE = __package__ or "rallypoint.grammar"
_NODES = (Unit, And, Or, TransitionDef, SessionDef, RuleDef, SpecFile)
_NODE_BY_NAME: dict[str, type[Any]] = {cls.__name__: cls for cls in _NODES}


@functools.cache
def _parser_digest() -> bytes:
    """A digest of what decides the AST a text parses to: this package's grammars and Python sources.

    All of them rather than a hand-kept list, so that no change can be missed; the price is that any edit
    here (a comment included) asks for the saved ASTs to be rebuilt, which a test points out.
    """
    digest = hashlib.sha256()
    root = resources.files(_PACKAGE)
    for name in sorted(entry.name for entry in root.iterdir() if entry.name.endswith((".lark", ".py"))):
        digest.update(f"{name}\0".encode() + root.joinpath(name).read_bytes() + b"\0")
    return digest.digest()


def _fingerprint(text: str) -> str:
    return hashlib.sha256(_parser_digest() + text.encode()).hexdigest()


def _to_json(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_json(item) for item in value]
    if isinstance(value, _NODES):
        fields = {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"node": type(value).__name__, **fields}
    return value  # str, int, bool or None


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_from_json(item) for item in value)
    if isinstance(value, dict):
        fields = {name: _from_json(item) for name, item in value.items() if name != "node"}
        return _NODE_BY_NAME[value["node"]](**fields)
    return value


def save_spec_ast(text: str, origin: str) -> bytes:
    """Parse spec `text` (raising `SpecSyntaxError` as `parse_spec` does) and return its AST for saving."""
    spec = _to_json(parse_spec(text, origin))
    return _fingerprint(text).encode() + b"\n" + json.dumps(spec, indent=1).encode() + b"\n"


def load_spec_ast(saved: bytes, text: str) -> SpecFile | None:
    """The AST `saved` holds, if it was saved from exactly `text` by this grammar; otherwise None."""
    fingerprint, _, body = saved.partition(b"\n")
    try:
        if fingerprint.decode("ascii", "replace") != _fingerprint(text):
            return None
        spec = _from_json(json.loads(body))
    except (OSError, ValueError, TypeError, KeyError):  # a source unreadable, or a damaged file
        return None
    return spec if isinstance(spec, SpecFile) else None
