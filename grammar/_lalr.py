"""The Lark side of parsing: the LALR parsers for the two grammars, the tree-to-AST transformers and the
translation of every Lark failure into our syntax errors.

Imported on the first parse (by `_parse`), not with rallypoint: importing Lark costs ~50 ms, which every
process of a job would otherwise pay whether or not it ever parses a rule.

Both grammars are `.lark` files next to this module, loaded on first use as LALR parsers whose tables are
cached per user (`_open`), so only a machine's first parse pays for building them. Every failure
leaves as `RuleSyntaxError` (rules) or `SpecSyntaxError` (specs) carrying line, column, the offending
line with a caret under the column, the unexpected text and the expected things in words; no Lark
exception escapes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import stat
import sys
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

import lark
from lark import Lark, Token, Transformer_NonRecursive
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedInput, UnexpectedToken, VisitError
from lark.lark import PostLex

from rallypoint.errors import ParseError, RuleSyntaxError, SpecSyntaxError

from ._ast import MAX_NESTING, And, Expr, Or, RuleDef, SessionDef, SpecFile, TransitionDef, Unit, combine

__all__ = ["parse_rule_text", "parse_spec_text"]

logger = logging.getLogger(__name__)

# Terminal names (without a leading "_") as a person would say them in "expected one of: ...".
_WORDS = {
    "NAME": "a name",
    "IDENT": "a name",
    "STAR": "'*'",
    "AMOUNT": "an amount (10 or 60%)",
    "AND": "AND",
    "OR": "OR",
    "COLON": "':'",
    "LPAR": "'('",
    "RPAR": "')'",
    "SESSION": "'session'",
    "RULE": "'rule'",
    "STATES": "'states'",
    "INITIAL": "'initial'",
    "FINAL": "'final'",
    "ON": "'on'",
    "ARROW": "'->'",
    "COMMA": "','",
    "EQUAL": "'='",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "NL": "end of line",
    "$END": "end of input",
}


class _Problem(Exception):
    """A problem Lark's grammar cannot see (bad amount, repeated statement, deep nesting) at offset `pos`."""

    def __init__(self, reason: str, pos: int, text: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.pos = pos
        self.text = text


class _Layout(PostLex):
    """Bounds parenthesis nesting and, for specs, makes line ends inside parentheses insignificant."""

    def __init__(self, newlines: bool) -> None:
        # The contextual lexer only looks for terminals the parser accepts next; a line end inside
        # parentheses is never accepted there, so ask for it everywhere and drop it here.
        self.always_accept: tuple[str, ...] = ("_NL",) if newlines else ()

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        depth = 0
        previous = "_NL"  # a leading line end is as droppable as a repeated one
        for token in stream:
            if token.type == "_LPAR":
                depth += 1
                if depth > MAX_NESTING:
                    raise _Problem(f"parentheses nested deeper than {MAX_NESTING}", token.start_pos or 0, "(")
            elif token.type == "_RPAR":
                depth = max(depth - 1, 0)  # an unbalanced ')' is the parser's to report
            elif token.type == "_NL" and (depth or previous == "_NL"):
                continue
            previous = token.type
            yield token


_PACKAGE = __package__ or "rallypoint.grammar"
# spec.lark %imports rules.lark, so both texts go into the spec parser's cache name.
_SOURCES = {"rules.lark": ("rules.lark",), "spec.lark": ("spec.lark", "rules.lark")}


def _build(grammar: str, *, newlines: bool, cache: str | None = None) -> Lark:
    """The LALR parser for `grammar`; with `cache`, Lark loads it from that file or builds and saves it there."""
    return Lark.open_from_package(
        _PACKAGE,
        grammar,
        parser="lalr",
        lexer="contextual",
        postlex=_Layout(newlines),
        maybe_placeholders=False,
        cache=cache or False,
    )


def _cache_dir() -> Path | None:
    """This user's folder for parser caches, made if need be; None when there is no safe, writable one.

    `$RALLYPOINT_CACHE_DIR`, else `$XDG_CACHE_HOME/rallypoint`, else `~/.cache/rallypoint`. Lark unpickles
    its cache files, so a folder anyone else can write to is never used: that would let them run code here.
    """
    chosen = os.environ.get("RALLYPOINT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "rallypoint"
    )
    path = Path(chosen)
    if not path.is_absolute():  # no home, or a relative setting: nowhere we could find again
        return None
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        status = path.stat()
    except OSError:
        return None
    ours = not hasattr(os, "getuid") or status.st_uid == os.getuid()
    if not ours or status.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or not os.access(path, os.W_OK | os.X_OK):
        return None
    return path


def _cache_name(grammar: str) -> str:
    """One file per grammar text, Lark version and Python version (Lark checks all three inside too), so
    that environments sharing the folder keep their own files instead of overwriting one another's."""
    digest = hashlib.sha256()
    for name in _SOURCES[grammar]:
        digest.update(resources.files(_PACKAGE).joinpath(name).read_bytes())
    python = "%d%d" % sys.version_info[:2]
    return f"{grammar}-{digest.hexdigest()[:16]}-lark{lark.__version__}-py{python}.cache"


def _open(grammar: str, *, newlines: bool) -> Lark:
    """The LALR parser for `grammar`, from this user's cache when it is there (a few ms, not ~100 ms).

    Lark's own `cache=` saves and loads the tables, and builds them from the grammar again whenever the
    file does not match (another grammar text, Lark or Python version) or cannot be read, so a stale,
    foreign or damaged file is never an error; nor is having no cache folder (then nothing is saved).
    Lark writes the file in place, so it is written under an exclusive lock and read under a shared one:
    the processes of a job starting together build it once and never read it half-written.
    """
    directory = _cache_dir()
    if directory is None:
        return _build(grammar, newlines=newlines)
    target = directory / _cache_name(grammar)
    with _locked(directory / "parsers.lock", exclusive=not target.exists()):
        return _build(grammar, newlines=newlines, cache=str(target))


_LOCK_WAIT = 5.0  # seconds; building takes ~0.1 s, so a lock held longer belongs to a frozen process


@contextlib.contextmanager
def _locked(path: Path, *, exclusive: bool) -> Iterator[None]:
    """Holds an advisory lock on `path` for the block, waiting at most `_LOCK_WAIT`; without one (no
    `fcntl`, an unlockable file system, a holder that does not let go) the block runs all the same."""
    try:
        import fcntl

        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except (ImportError, OSError):
        yield
        return
    try:
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + _LOCK_WAIT
        while True:
            try:
                fcntl.flock(handle, mode)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    logger.debug("parser cache lock %s still held after %ss; going on without", path, _LOCK_WAIT)
                    break
                time.sleep(0.01)
            except OSError:
                break
        yield
    finally:
        os.close(handle)  # and with it the lock


# Built (or loaded) once, on the first parse.
@functools.cache
def _rule_parser() -> Lark:
    return _open("rules.lark", newlines=False)


@functools.cache
def _spec_parser() -> Lark:
    return _open("spec.lark", newlines=True)


def _amount(token: Token) -> tuple[int, bool]:
    percent = token.endswith("%")
    value = int(token[:-1] if percent else token)
    if value == 0:
        raise _Problem(f"amount {token} must be at least 1", token.start_pos or 0, str(token))
    if percent and value > 100:
        raise _Problem(f"amount {token} is more than 100%", token.start_pos or 0, str(token))
    return value, percent


def _at(token: Token) -> tuple[int, int]:
    """(line, column) of a token; the lexer always sets both, the types just cannot say so."""
    return token.line or 1, token.column or 1


class _ToExpr(Transformer_NonRecursive[Token, Any]):
    """Rule parse tree -> `Unit` / `And` / `Or`. Non-recursive so deep nesting cannot exhaust the stack."""

    __visit_tokens__ = False  # tokens stay as they are; skipping the per-token call saves a fifth of a parse

    def unit(self, children: list[Token]) -> Unit:
        source, tag, amount = children
        return Unit(str(source), str(tag), *_amount(amount))

    def and_expr(self, children: list[Expr]) -> Expr:
        return combine(And, children)

    def or_expr(self, children: list[Expr]) -> Expr:
        return combine(Or, children)


class _ToSpec(_ToExpr):
    """Spec parse tree -> `SpecFile`; also checks that `states` and `initial` are there, none twice."""

    def __init__(self, origin: str) -> None:
        super().__init__()
        self.origin = origin

    def start(self, children: list[SessionDef | RuleDef]) -> SpecFile:
        return SpecFile(
            sessions=tuple(c for c in children if isinstance(c, SessionDef)),
            rules=tuple(c for c in children if isinstance(c, RuleDef)),
            origin=self.origin,
        )

    # A statement becomes (keyword token, names); session_def sorts them out.
    def states(self, children: list[Token]) -> tuple[Token, list[Token]]:
        return children[0], children[1:]

    initial = final = states

    def sources(self, children: list[Token]) -> list[Token]:
        return children

    def transition(self, children: list[Any]) -> TransitionDef:
        sources, dest, event = children
        return TransitionDef(tuple(map(str, sources)), str(dest), str(event), *_at(sources[0]))

    def session_def(self, children: list[Any]) -> SessionDef:
        keyword, name, *statements = children
        seen: dict[str, list[Token]] = {}
        transitions: list[TransitionDef] = []
        for statement in statements:
            if isinstance(statement, TransitionDef):
                transitions.append(statement)
                continue
            word, names = statement
            if word.type in seen:
                raise _Problem(
                    f"session '{name}' has a second '{word}' statement", word.start_pos or 0, str(word)
                )
            seen[word.type] = names
        for required in ("STATES", "INITIAL"):
            if required not in seen:
                raise _Problem(
                    f"session '{name}' has no '{required.lower()}' statement",
                    keyword.start_pos or 0,
                    str(keyword),
                )
        states, (initial,), finals = seen["STATES"], seen["INITIAL"], seen.get("FINAL", [])
        line, column = _at(keyword)
        return SessionDef(
            name=str(name),
            states=tuple(map(str, states)),
            initial=str(initial),
            finals=tuple(map(str, finals)),
            transitions=tuple(transitions),
            line=line,
            column=column,
            state_positions=tuple((str(s), *_at(s)) for s in states),
            initial_position=_at(initial),
            final_positions=tuple((str(s), *_at(s)) for s in finals),
        )

    def rule_def(self, children: list[Any]) -> RuleDef:
        keyword, name, expr = children
        return RuleDef(str(name), expr, *_at(keyword))


# ---- errors --------------------------------------------------------------------------------------------


def _where(text: str, pos: int) -> tuple[int, int]:
    """1-based (line, column) of offset `pos`."""
    return text.count("\n", 0, pos) + 1, pos - (text.rfind("\n", 0, pos) + 1) + 1


def _end_of(text: str, end: Token) -> int:
    """Where to put the caret for a premature end: just past the last real token.

    Lark's end token borrows the position of the last token, which may be a run of blank lines and
    comments; then the end of the line that run starts on is the more useful place to point at.
    """
    start, stop = end.start_pos or 0, end.end_pos or 0
    last = text[start:stop]
    return start if last and (last.isspace() or last.lstrip().startswith("#")) else stop


def _caret(text: str, pos: int, span: int = 80) -> str:
    """The line around `pos` with a caret under it, drawn as Lark's `UnexpectedInput.get_context` draws it
    but with a wider window, so a rule of ordinary length shows whole."""
    before = text[max(pos - span, 0) : pos].rsplit("\n", 1)[-1]
    after = text[pos : pos + span].split("\n", 1)[0]
    return before + after + "\n" + " " * len(before.expandtabs()) + "^\n"


def _expected(parser: Lark, text: str, pos: int, exc: UnexpectedToken | UnexpectedCharacters) -> list[str]:
    """What could come at `pos`, in words.

    Lark's own sets are taken either from a merged LALR state, which can offer a ')' at the top level, or
    after the parser already reduced on the bad token, which hides the AND/OR that could have extended the
    last unit. So replay the text before `pos` and ask the parser which terminals it would take there.
    """
    try:
        replay = parser.parse_interactive(text[:pos])
        replay.exhaust_lexer()
        names = set(replay.accepts())  # type: ignore[no-untyped-call]
    except (LarkError, _Problem):  # cannot replay: settle for what Lark said
        names = set(exc.allowed if isinstance(exc, UnexpectedCharacters) else exc.expected or ())
    return [_WORDS.get(t.lstrip("_"), t.lstrip("_").lower()) for t in names if t not in parser.lexer_conf.ignore]


def _raise(
    kind: type[ParseError], exc: BaseException, text: str, origin: str | None, parser: Lark
) -> NoReturn:
    """Re-raise any failure of a parse as `kind` (our exception), with position and context when known."""
    expected: list[str] = []
    if isinstance(exc, VisitError):
        exc = exc.orig_exc
    if isinstance(exc, _Problem):
        reason, pos, found = exc.reason, exc.pos, exc.text
    elif isinstance(exc, UnexpectedToken):
        token = exc.token
        if token.type == "$END":
            pos, found, reason = _end_of(text, token), "", "unexpected end of input"
        elif token.type == "_NL":
            pos, found, reason = token.start_pos or 0, "\n", "unexpected end of line"
        else:
            pos, found, reason = token.start_pos or 0, str(token), f"unexpected {str(token)!r}"
        expected = _expected(parser, text, pos, exc)
    elif isinstance(exc, UnexpectedCharacters):
        pos = exc.pos_in_stream or 0
        found = text[pos : pos + 1]
        reason = f"unexpected character {found!r}"
        expected = _expected(parser, text, pos, exc)
    elif isinstance(exc, UnexpectedInput):  # UnexpectedEOF; the LALR parser reports the end as a token
        pos, found, reason = len(text), "", "unexpected end of input"
    elif isinstance(exc, RecursionError):
        raise kind(f"{origin + ': ' if origin else ''}nested too deeply to parse") from exc
    else:
        raise kind(f"{origin + ': ' if origin else ''}cannot parse: {exc}") from exc
    if kind is RuleSyntaxError and not text.strip():
        reason = "empty rule expression"
    line, column = _where(text, pos)
    raise kind(
        f"{origin}: {reason}" if origin else reason,
        line=line,
        column=column,
        context=_caret(text, pos),
        expected=expected,
        text=found,
    ) from exc



# ---- entry points (for `_parse`, which has checked that the text is a str) ----------------------------


def parse_rule_text(text: str) -> Expr:
    """The AST of rule expression `text`; raises `RuleSyntaxError`."""
    try:
        tree = _rule_parser().parse(text)
        expr: Expr = _ToExpr().transform(tree)
    except (LarkError, _Problem, RecursionError) as exc:
        _raise(RuleSyntaxError, exc, text, None, _rule_parser())
    return expr


def parse_spec_text(text: str, origin: str) -> SpecFile:
    """The AST of spec `text`; raises `SpecSyntaxError` naming `origin`."""
    try:
        tree = _spec_parser().parse(text)
        spec: SpecFile = _ToSpec(origin).transform(tree)
    except (LarkError, _Problem, RecursionError) as exc:
        _raise(SpecSyntaxError, exc, text, origin, _spec_parser())
    return spec
