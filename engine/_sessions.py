"""Session types compiled from specs, lightweight live sessions, the session tracker and session catalogs.

    >>> spec = load_spec("task")                       # specs/task.spec, shipped with the package
    >>> task = spec.session("task")
    >>> s = task.start("id-1", peer="worker_001")
    >>> s.trigger("received"), s.trigger("completed"), s.is_final
    ('receive', 'complete', True)

Each session type compiles to ONE `transitions.Machine` (kept as `.machine`, the source of truth, for
inspection and drawing); live sessions are small `__slots__` objects stepped through a dict read off that
machine. Nothing here does I/O except reading spec files (and the parsed ASTs shipped next to the built-in
ones), and nothing reads a clock: timeouts are decided by the caller, who then calls `SessionTracker.expire()`.

There is no process-wide catalog: a `SessionCatalog` is made by whoever needs one (a proxy, a tracker, a
table) and passed along. Only the compiled built-in types are shared between catalogs, and those are never
changed after compiling.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Union

from rallypoint.errors import (
    ConfigError,
    IllegalTransition,
    SpecError,
    UnknownSession,
    UnknownSessionType,
)
from rallypoint.grammar import Expr, SessionDef, SpecFile, parse_spec
from rallypoint.grammar._saved import load_spec_ast

from ._message import SessionType
from ._rules import check_rule

if TYPE_CHECKING:
    from transitions import Machine

logger = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_SESSION_TYPES",
    "MAX_STATES",
    "MAX_TRANSITIONS",
    "CompiledSessionType",
    "Session",
    "SessionCatalog",
    "SessionTracker",
    "Spec",
    "SpecSource",
    "builtin_spec_names",
    "compile_session",
    "load_spec",
]

BUILTIN_SESSION_TYPES = ("task", "notification")
"""Session types every catalog loads from the package's `specs/<name>.spec` on first use."""

_SPECS_PACKAGE = "rallypoint.specs"
_SPEC_NAME = re.compile(r"[A-Za-z_][\w\-]*")
# transitions refuses a trigger named like the model attribute ("state" by default); no model is ever attached
# to our machines, so we move the attribute out of the way and every event name stays legal.
_MODEL_ATTRIBUTE = "_rallypoint_state"

_Pos = tuple[Union[int, None], Union[int, None]]  # (line, column) of a declaration, when known


class CompiledSessionType:
    """A session type: its states, initial and final states, events, and the `transitions.Machine` they
    compiled to.

    Why not drive every session through the machine: measured here, `machine.events[e].trigger(model)` costs
    ~15 us per transition and `add_model` ~34 us per session (plus a model object with bound trigger
    methods), against targets of <= 10 us per transition and <= 1 KiB per live session, and a proxy may
    hold many thousands of sessions. So the machine is built once per type, the transition table
    `{(state, event): dest}` is read from the machine's own `events` (not re-derived from the AST, so the
    machine stays the single source of truth), and a `Session` just looks its next state up in that dict.
    """

    def __init__(self, name: str, states: tuple[str, ...], initial: str, finals: tuple[str, ...],
                 machine: Machine) -> None:
        self.name = name
        self.states = states
        self.initial = initial
        self.finals = finals
        self.machine = machine
        self._finals = frozenset(finals)
        next_state: dict[tuple[str, str], str] = {}
        for event_name, event in machine.events.items():
            for source, candidates in event.transitions.items():
                if candidates:  # no conditions are attached, so the first transition is the one that fires
                    dest = candidates[0].dest
                    next_state[(source, event_name)] = source if dest is None else dest
        self._next = next_state
        self.events: tuple[str, ...] = tuple(machine.events)

    def next_state(self, state: str, event: str) -> str | None:
        """The state `event` leads to from `state`, or None if `state` does not accept `event`."""
        return self._next.get((state, event))

    def transitions_from(self, state: str) -> dict[str, str]:
        """`{event: dest}` for every event `state` accepts (empty for a final state)."""
        return {event: self._next[(state, event)] for event in self.events if (state, event) in self._next}

    def is_final(self, state: str) -> bool:
        return state in self._finals

    def start(self, session_id: str, peer: str | None = None, stage: str | None = None) -> Session:
        """A new session of this type in its initial state (or in `stage`, which must be declared)."""
        if stage is None:
            stage = self.initial
        elif stage not in self.states:
            raise ConfigError(
                f"session type {self.name!r} has no state {stage!r} (states: {', '.join(self.states)})"
            )
        return Session(session_id, self, stage, peer)

    def edges(self) -> list[tuple[str, str, str]]:
        """`(source, event, dest)` for every transition, by declared state order, then event order."""
        # A sort of the table, not a states x events scan: a big spec has thousands of both.
        state_order = {state: i for i, state in enumerate(self.states)}
        event_order = {event: i for i, event in enumerate(self.events)}
        ordered = sorted(self._next.items(), key=lambda item: (state_order[item[0][0]], event_order[item[0][1]]))
        return [(state, event, dest) for (state, event), dest in ordered]

    def to_mermaid(self) -> str:
        """Mermaid `stateDiagram-v2` text of this session type."""
        lines = ["stateDiagram-v2", f"    [*] --> {self.initial}"]
        lines += [f"    {src} --> {dest} : {event}" for src, event, dest in self.edges()]
        lines += [f"    {final} --> [*]" for final in self.finals]
        return "\n".join(lines) + "\n"

    def to_dot(self) -> str:
        """Graphviz dot text of this session type (finals drawn with a double border)."""
        lines = [
            f"digraph {_dot_id(self.name)} {{",
            "    rankdir=LR;",
            '    node [shape=box, style=rounded, fontname="Helvetica"];',
            '    edge [fontname="Helvetica"];',
            '    "__start__" [shape=point, label=""];',
        ]
        lines += [f"    {_dot_id(final)} [peripheries=2];" for final in self.finals]
        lines.append(f'    "__start__" -> {_dot_id(self.initial)};')
        lines += [
            f"    {_dot_id(src)} -> {_dot_id(dest)} [label={_dot_id(event)}];"
            for src, event, dest in self.edges()
        ]
        lines.append("}")
        return "\n".join(lines) + "\n"

    def _key(self) -> tuple[object, ...]:
        return (self.name, self.states, self.initial, self._finals, frozenset(self._next.items()))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompiledSessionType):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return (
            f"CompiledSessionType({self.name!r}, states={self.states!r}, initial={self.initial!r}, "
            f"finals={self.finals!r})"
        )


def _dot_id(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Session:
    """One live session: its id, type, current state and the peer on the other side."""

    __slots__ = ("id", "type", "state", "peer")

    def __init__(self, session_id: str, session_type: CompiledSessionType, state: str,
                 peer: str | None = None) -> None:
        self.id = session_id
        self.type = session_type
        self.state = state
        self.peer = peer

    def trigger(self, event: str) -> str:
        """Fire `event`; return the new state. Raises IllegalTransition if the state does not accept it."""
        dest = self.type._next.get((self.state, event))
        if dest is None:
            raise IllegalTransition(self.id, self.type.name, self.state, event)
        self.state = dest
        return dest

    def may_trigger(self, event: str) -> bool:
        """Whether the current state accepts `event`."""
        return (self.state, event) in self.type._next

    @property
    def is_final(self) -> bool:
        return self.state in self.type._finals

    def __repr__(self) -> str:
        return f"Session({self.id!r}, type={self.type.name!r}, state={self.state!r}, peer={self.peer!r})"


MAX_STATES = 10_000
"""The most states one session type may declare; more is refused with SpecError before any work."""

MAX_TRANSITIONS = 100_000
"""The most transitions one session type may declare, counting `a, b -> c on e` as two; more is refused."""


def compile_session(defn: SessionDef) -> CompiledSessionType:
    """Check a session definition and compile it to a `transitions.Machine`.

    Raises SpecError, with the line and column of the offending declaration, for: more than MAX_STATES
    states or MAX_TRANSITIONS transitions, a state declared twice, an initial or final state that is not
    declared, a transition naming an undeclared state, a transition out of a final state, two transitions
    on the same event from the same state to different states (nondeterministic), and a state not reachable
    from the initial state. A non-final state with no way out is allowed (a session can rest there until the
    caller forgets it). Time and memory are linear in the size of the definition.
    """
    _check_size(defn)
    declared = _check_states(defn)
    finals = _check_initial_and_finals(defn, declared)
    edges = _check_transitions(defn, declared, frozenset(finals))
    _check_reachable(defn, declared, edges)
    machine = _build_machine(defn, finals)
    return CompiledSessionType(defn.name, tuple(defn.states), defn.initial, finals, machine)


def _session_where(defn: SessionDef) -> dict[str, Any]:
    return {"line": defn.line, "column": defn.column}


def _check_size(defn: SessionDef) -> None:
    """Refuse an oversized definition before spending anything on it."""
    where = _session_where(defn)
    if len(defn.states) > MAX_STATES:
        raise SpecError(
            f"session {defn.name}: declares {len(defn.states)} states, more than the limit of {MAX_STATES}",
            **where,
        )
    count = sum(len(t.sources) for t in defn.transitions)
    if count > MAX_TRANSITIONS:
        raise SpecError(
            f"session {defn.name}: declares {count} transitions, more than the limit of {MAX_TRANSITIONS}",
            **where,
        )


def _check_states(defn: SessionDef) -> dict[str, _Pos]:
    """`{state: where it was declared}`, in declared order; refuses duplicates and an empty list."""
    session_at: _Pos = (defn.line, defn.column)
    # For a duplicate, the last position recorded for a name is where it was declared again.
    positions: dict[str, _Pos] = {state: (line, column) for state, line, column in defn.state_positions}
    declared: dict[str, _Pos] = {}
    for state in defn.states:
        at = positions.get(state, session_at)
        if state in declared:
            raise SpecError(f"session {defn.name}: state {state!r} is declared twice", line=at[0], column=at[1])
        declared[state] = at
    if not declared:
        raise SpecError(f"session {defn.name}: declares no states", **_session_where(defn))
    return declared


def _known(declared: Mapping[str, _Pos]) -> str:
    """The declared states, for an error message (shortened: a spec may declare thousands)."""
    names = list(declared)
    shown = ", ".join(names[:20])
    return shown if len(names) <= 20 else f"{shown}, ... ({len(names)} in all)"


def _check_initial_and_finals(defn: SessionDef, declared: Mapping[str, _Pos]) -> tuple[str, ...]:
    """The final states, deduplicated in declared order; refuses an undeclared initial or final state."""
    session_at: _Pos = (defn.line, defn.column)
    if defn.initial not in declared:
        line, column = defn.initial_position or session_at
        raise SpecError(
            f"session {defn.name}: initial state {defn.initial!r} is not declared (states: {_known(declared)})",
            line=line, column=column,
        )
    final_at: dict[str, _Pos] = {final: (line, column) for final, line, column in defn.final_positions}
    for final in defn.finals:
        if final not in declared:
            line, column = final_at.get(final, session_at)
            raise SpecError(
                f"session {defn.name}: final state {final!r} is not declared (states: {_known(declared)})",
                line=line, column=column,
            )
    return tuple(dict.fromkeys(defn.finals))


def _check_transitions(defn: SessionDef, declared: Mapping[str, _Pos],
                       finals: frozenset[str]) -> dict[tuple[str, str], str]:
    """`{(source, event): dest}`; refuses unknown states, exits from finals and nondeterminism."""
    name = defn.name
    edges: dict[tuple[str, str], str] = {}
    for t in defn.transitions:
        at: dict[str, Any] = {"line": t.line, "column": t.column} if t.line is not None else _session_where(defn)
        for state in (*t.sources, t.dest):
            if state not in declared:
                raise SpecError(
                    f"session {name}: transition on {t.event!r} names unknown state {state!r} "
                    f"(states: {_known(declared)})",
                    **at,
                )
        if not t.event:
            raise SpecError(f"session {name}: transition with an empty event name", **at)
        for source in t.sources:
            if source in finals:
                raise SpecError(
                    f"session {name}: final state {source!r} cannot have a transition (on {t.event!r})", **at
                )
            previous = edges.get((source, t.event))
            if previous is not None and previous != t.dest:
                raise SpecError(
                    f"session {name}: event {t.event!r} from state {source!r} leads both to {previous!r} "
                    f"and to {t.dest!r} (nondeterministic)",
                    **at,
                )
            edges[(source, t.event)] = t.dest
    return edges


def _check_reachable(defn: SessionDef, declared: Mapping[str, _Pos], edges: Mapping[tuple[str, str], str]) -> None:
    """Refuse the first declared state the initial state cannot reach (one pass over an adjacency dict)."""
    successors: dict[str, list[str]] = {}
    for (source, _event), dest in edges.items():
        successors.setdefault(source, []).append(dest)
    reached = {defn.initial}
    frontier = [defn.initial]
    while frontier:
        for dest in successors.get(frontier.pop(), ()):
            if dest not in reached:
                reached.add(dest)
                frontier.append(dest)
    if len(reached) == len(declared):
        return
    state = next(state for state in declared if state not in reached)
    line, column = declared[state]
    raise SpecError(
        f"session {defn.name}: state {state!r} is unreachable from initial state {defn.initial!r}",
        line=line, column=column,
    )


def _build_machine(defn: SessionDef, finals: tuple[str, ...]) -> Machine:
    """The `transitions.Machine` of a checked definition.

    Built from plain data in one call: with `auto_transitions=False` and no model, transitions' own
    construction is linear in states plus transitions (measured: benchmarks/engine.py, "spec compilation").
    """
    # Imported here, with the first session type compiled: a process that only joins a group never needs it.
    from transitions import Machine, State

    final_set = frozenset(finals)
    try:
        return Machine(
            model=None,
            states=[State(state, final=state in final_set) for state in defn.states],
            transitions=[
                {"trigger": t.event, "source": list(t.sources), "dest": t.dest} for t in defn.transitions
            ],
            initial=defn.initial,
            auto_transitions=False,
            send_event=True,
            model_attribute=_MODEL_ATTRIBUTE,
            name=defn.name,
        )
    except (ValueError, TypeError) as exc:  # transitions' own checks; ours above should catch all first
        raise SpecError(f"session {defn.name}: {exc}", **_session_where(defn)) from exc


class Spec:
    """What one spec declares, compiled: session types by name and named rules."""

    def __init__(
        self, origin: str, session_types: dict[str, CompiledSessionType], rules: dict[str, Expr]
    ) -> None:
        self.origin = origin
        self.session_types = session_types
        self.rules = rules

    def session(self, name: str | SessionType) -> CompiledSessionType:
        """The session type `name`; raises UnknownSessionType."""
        key = name.value if isinstance(name, SessionType) else name
        try:
            return self.session_types[key]
        except KeyError:
            raise UnknownSessionType(
                f"spec {self.origin} defines no session type {key!r} "
                f"(it defines: {', '.join(self.session_types) or 'none'})"
            ) from None

    def __repr__(self) -> str:
        types, rules = list(self.session_types), list(self.rules)
        return f"Spec({self.origin!r}, session_types={types!r}, rules={rules!r})"


def builtin_spec_names() -> list[str]:
    """Names of the spec files shipped in the package (`load_spec(name)` loads `specs/<name>.spec`)."""
    root = importlib.resources.files(_SPECS_PACKAGE)
    return sorted(entry.name[: -len(".spec")] for entry in root.iterdir() if entry.name.endswith(".spec"))


def _read_builtin(name: str) -> str | None:
    if not _SPEC_NAME.fullmatch(name):
        return None
    resource = importlib.resources.files(_SPECS_PACKAGE).joinpath(f"{name}.spec")
    return resource.read_text(encoding="utf-8") if resource.is_file() else None


def _builtin_origin(name: str) -> str:
    return f"<builtin {name}>"


def _saved_ast_name(name: str) -> str:
    """The file next to built-in spec `name` holding its parsed AST (written by `python -m rallypoint.specs`)."""
    return f"{name}.spec.ast"


def _read_saved_ast(name: str) -> bytes:
    try:
        return importlib.resources.files(_SPECS_PACKAGE).joinpath(_saved_ast_name(name)).read_bytes()
    except OSError:
        return b""


def _parse_builtin(name: str, text: str) -> SpecFile:
    """Built-in spec `name` (whose text is `text`) parsed: read from its saved AST when that is current.

    The saved AST spares a process Lark (~50 ms to import, ~10 ms to parse both built-ins) at its first
    session. A saved AST that is missing, stale or damaged is ignored and the text parsed instead.
    """
    saved = _read_saved_ast(name)
    spec_file = load_spec_ast(saved, text) if saved else None
    return spec_file if spec_file is not None else parse_spec(text, _builtin_origin(name))


def _parse_file(path: str) -> tuple[SpecFile, str]:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read spec file {path}: {exc}") from exc
    return parse_spec(text, path), text


def _parse_source(source: str | os.PathLike[str]) -> tuple[SpecFile, str]:
    """`(parsed, text)` for spec text, a path, or a built-in name (in that order, see load_spec)."""
    if isinstance(source, os.PathLike):
        return _parse_file(os.fspath(source))
    if not isinstance(source, str):
        raise ConfigError(f"a spec source is text, a path or a built-in name, not {source!r}")
    if "\n" in source or "{" in source:
        return parse_spec(source), source
    if os.path.isfile(source):
        return _parse_file(source)
    builtin_text = _read_builtin(source)
    if builtin_text is not None:
        return _parse_builtin(source, builtin_text), builtin_text
    if "=" in source:  # a one-line spec such as `rule done = master:done:1`
        return parse_spec(source), source
    raise ConfigError(
        f"cannot load spec {source!r}: it is not spec text (no newline or '{{'), not an existing file, and "
        f"not a built-in spec name (built-in: {', '.join(builtin_spec_names()) or 'none'})"
    )


SpecSource = Union[str, os.PathLike[str], SpecFile]
"""What `load_spec` and `SessionCatalog.load` accept: spec text, a path, a built-in name, or a parsed spec."""


def load_spec(source: SpecSource, *, register: bool = False) -> Spec:
    """Parse and compile a spec. It is not added anywhere: pass it (or its source) to a `SessionCatalog`.

        >>> load_spec("task").session("task").initial
        'request'
        >>> load_spec(pathlib.Path("two_phase.spec"))   # or a path string, or the text itself

    A str is spec text if it contains a newline or `{`; otherwise the path of an existing file; otherwise
    the name of a built-in spec (`task`, `notification`); otherwise, if it contains `=`, a one-line spec
    (`rule done = master:done:1`); otherwise ConfigError. An already parsed `SpecFile` is accepted too.

    Raises SpecSyntaxError for text that does not parse (or is longer than the grammar's MAX_SPEC_CHARS)
    and SpecError (with line and column) for a spec that does not compile, including a session or rule name
    declared twice and a session type above MAX_STATES or MAX_TRANSITIONS. `register` is accepted only as
    False, for old call sites: there is no process-wide catalog to register into.
    """
    if register:
        raise ConfigError(
            "load_spec() no longer registers specs in a process-wide catalog: add the spec to the catalog that "
            "uses it, with SessionCatalog([source]) or catalog.load(source), and pass that catalog on "
            "(Proxy(catalog=...), SessionTracker(catalog=...), RegisterTable(catalog=...), dist(catalog=...))"
        )
    if isinstance(source, SpecFile):
        spec_file, text = source, ""
    else:
        spec_file, text = _parse_source(source)
    try:
        return _compile_spec(spec_file)
    except SpecError as exc:
        if exc.context or not text:
            raise
        # Show where, as syntax errors do: the file, and the offending line with a caret.
        raise SpecError(exc.reason, line=exc.line, column=exc.column, origin=spec_file.origin,
                        text=text) from exc


def _compile_spec(spec_file: SpecFile) -> Spec:
    session_types: dict[str, CompiledSessionType] = {}
    for defn in spec_file.sessions:
        if defn.name in session_types:
            raise SpecError(f"{spec_file.origin}: session {defn.name!r} is defined twice", line=defn.line,
                            column=defn.column)
        session_types[defn.name] = compile_session(defn)
    rules: dict[str, Expr] = {}
    for rule in spec_file.rules:
        if rule.name in rules:
            raise SpecError(f"{spec_file.origin}: rule {rule.name!r} is defined twice", line=rule.line,
                            column=rule.column)
        try:
            check_rule(rule.expr)
        except ConfigError as exc:
            raise SpecError(f"{spec_file.origin}: rule {rule.name!r}: {exc}", line=rule.line,
                            column=rule.column) from exc
        rules[rule.name] = rule.expr
    return Spec(spec_file.origin, session_types, rules)


@functools.cache
def _builtin_spec(name: str) -> Spec:
    """Built-in spec `name`, compiled once per process and shared by every catalog (never changed after)."""
    # From the package itself, never through load_spec(name): that looks in the working directory first,
    # where a stray file called `task` must not replace the built-in type.
    text = _read_builtin(name)
    if text is None:
        raise ConfigError(f"the built-in spec {name!r} is missing from the installed package")
    return load_spec(_parse_builtin(name, text))


class SessionCatalog:
    """The session types (and named rules) one proxy, tracker or table knows by name.

        >>> catalog = SessionCatalog(["two_phase.spec"])       # the built-in types plus these specs
        >>> catalog.require("two_phase").initial
        'prepare'
        >>> catalog.load("rule votes = worker:vote:100%")      # later additions: parse, compile, add
        Spec('<string>', session_types=[], rules=['votes'])

    `specs` are `Spec` objects or anything `load_spec` accepts (text, paths, built-in names); one source
    alone is taken as a list of one. The built-in types (`builtins`: `task` and `notification` unless told
    otherwise) are loaded on first use, compiled once per process and shared between catalogs. Adding is
    all-or-nothing per spec: a name already known with a different definition raises ConfigError and adds
    nothing (unless `replace`). Not thread-safe while being added to.
    """

    def __init__(self, specs: Iterable[Spec | SpecSource] | Spec | SpecSource = (), *,
                 builtins: Iterable[str] = BUILTIN_SESSION_TYPES) -> None:
        self._types: dict[str, CompiledSessionType] = {}
        self._rules: dict[str, Expr] = {}
        self._builtins = tuple(builtins)
        self._builtins_loaded = not self._builtins
        if isinstance(specs, (str, os.PathLike, Spec, SpecFile)):
            specs = (specs,)
        for source in specs:
            self.load(source)

    def _ensure_builtins(self) -> None:
        if self._builtins_loaded:
            return
        self._builtins_loaded = True  # set first: add_spec() below comes back here
        try:
            for name in self._builtins:
                self.add_spec(_builtin_spec(name))
        except BaseException:
            self._builtins_loaded = False
            raise

    def load(self, source: Spec | SpecSource, replace: bool = False) -> Spec:
        """Add a spec (parsed and compiled with `load_spec` unless it is a `Spec` already); return it."""
        spec = source if isinstance(source, Spec) else load_spec(source)
        self.add_spec(spec, replace)
        return spec

    def get(self, name: str | SessionType) -> CompiledSessionType | None:
        """The session type `name` (a `SessionType` or a user-defined name), or None."""
        if not self._builtins_loaded:
            self._ensure_builtins()
        if type(name) is not str:  # a SessionType: its `_value_` (a plain attribute; `.value` is a descriptor)
            name = name._value_ if isinstance(name, SessionType) else name
        return self._types.get(name)

    def require(self, name: str | SessionType) -> CompiledSessionType:
        """The session type `name`; raises UnknownSessionType listing the known names."""
        found = self.get(name)
        if found is None:
            key = name.value if isinstance(name, SessionType) else name
            raise UnknownSessionType(
                f"no session type {key!r} in this catalog (known: {', '.join(self.names())}); add the spec "
                "that defines it: SessionCatalog([spec]) or catalog.load(spec), and pass that catalog on"
            )
        return found

    def names(self) -> list[str]:
        """Known session type names, sorted."""
        self._ensure_builtins()
        return sorted(self._types)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    @property
    def rules(self) -> Mapping[str, Expr]:
        """Named rules of the specs added (read-only view)."""
        self._ensure_builtins()
        return MappingProxyType(self._rules)

    def register(self, compiled: CompiledSessionType, replace: bool = False) -> None:
        """Make `compiled` known by its name. An equal definition may be registered again; a different one
        under a known name raises ConfigError unless `replace`."""
        self._ensure_builtins()
        self._check(self._types, compiled.name, compiled, "session type", replace)
        self._types[compiled.name] = compiled

    def register_rule(self, name: str, expr: Expr, replace: bool = False) -> None:
        """Make rule `expr` known as `name` (same conflict policy as `register`)."""
        self._ensure_builtins()
        self._check(self._rules, name, expr, "rule", replace)
        self._rules[name] = expr

    def add_spec(self, spec: Spec, replace: bool = False) -> None:
        """Register every session type and rule of `spec`, or none of them if one conflicts."""
        self._ensure_builtins()
        for name, compiled in spec.session_types.items():
            self._check(self._types, name, compiled, "session type", replace)
        for name, expr in spec.rules.items():
            self._check(self._rules, name, expr, "rule", replace)
        self._types.update(spec.session_types)
        self._rules.update(spec.rules)

    @staticmethod
    def _check(known: Mapping[str, object], name: str, new: object, what: str, replace: bool) -> None:
        old = known.get(name)
        if old is not None and old != new and not replace:
            raise ConfigError(
                f"a different {what} named {name!r} is already registered; pass replace=True to replace it"
            )

    def __repr__(self) -> str:
        return f"SessionCatalog(session_types={self.names()!r}, rules={sorted(self._rules)!r})"


SessionTypeLike = Union[CompiledSessionType, SessionType, str]
"""What SessionTracker.start() accepts as a session type."""


class SessionTracker:
    """Stages of the sessions a proxy takes part in: live sessions by id, plus recently finished ones.

        >>> tracker = SessionTracker()
        >>> tracker.start("id-1", SessionType.TASK, peer="worker_001")
        >>> tracker.fire("id-1", "received")
        'receive'
        >>> tracker.fail_peer("worker_001")                 # -> [Session('id-1', ..., state='failed')]
        >>> tracker.stage("id-1")
        'failed'

    Session types named by string or `SessionType` are looked up in `catalog` (default: a catalog with the
    built-in types only). A live session costs one dict entry and one `Session`. A session that reaches a
    final state leaves the live index for a bounded LRU of `max_finished` sessions, so its final stage can
    still be asked for; beyond that it is forgotten (`stage()` then raises UnknownSession). The tracker keeps
    no clock: the caller decides which sessions timed out and calls `expire()`. Not thread-safe.
    """

    def __init__(self, max_finished: int = 10_000, *, catalog: SessionCatalog | None = None) -> None:
        if max_finished < 0:
            raise ConfigError(f"max_finished must be >= 0, not {max_finished}")
        self.max_finished = max_finished
        self._catalog = catalog if catalog is not None else SessionCatalog()
        self._live: dict[str, Session] = {}
        self._finished: OrderedDict[str, Session] = OrderedDict()

    @property
    def catalog(self) -> SessionCatalog:
        """The catalog session type names are looked up in."""
        return self._catalog

    def start(self, session_id: str, session_type: SessionTypeLike, peer: str | None = None,
              stage: str | None = None) -> Session:
        """Track a new session in its initial state (or `stage`) and return it.

        `stage=None` means the type's initial state, as in a `SessionMessage` of a user-defined type, whose
        `session_stage` is None until a tracker fills it in.

        An id that is already tracked (live, or finished and still remembered) returns the existing session
        unchanged: the first message of a session starts it, later ones with the same id find it.
        """
        existing = self._live.get(session_id) or self._finished.get(session_id)
        if existing is not None:
            return existing
        compiled = session_type if isinstance(session_type, CompiledSessionType) else (
            self._catalog.require(session_type)
        )
        session = compiled.start(session_id, peer, stage)
        if session.state in compiled._finals:
            self._remember_finished(session)
        else:
            self._live[session_id] = session
        return session

    def get(self, session_id: str) -> Session:
        """The session `session_id`, live or recently finished; raises UnknownSession."""
        session = self._live.get(session_id)
        if session is not None:
            return session
        session = self._finished.get(session_id)
        if session is None:
            raise UnknownSession(f"no session {session_id!r} is tracked (or it finished long ago)")
        self._finished.move_to_end(session_id)
        return session

    def find(self, session_id: str) -> Session | None:
        """The session `session_id`, live or recently finished, or None (for callers on a hot path)."""
        return self._live.get(session_id) or self._finished.get(session_id)

    def stage(self, session_id: str) -> str:
        """The current stage (state) of `session_id`; raises UnknownSession."""
        return self.get(session_id).state

    def fire(self, session_id: str, event: str) -> str:
        """Fire `event` on `session_id` and return the new stage.

        Raises UnknownSession, or IllegalTransition if the stage does not accept `event` (a finished
        session accepts none).
        """
        session = self._live.get(session_id)
        if session is None:
            session = self.get(session_id)  # a finished one (or UnknownSession)
            raise IllegalTransition(session_id, session.type.name, session.state, event)
        kind = session.type
        dest = kind._next.get((session.state, event))
        if dest is None:
            raise IllegalTransition(session_id, kind.name, session.state, event)
        session.state = dest
        if dest in kind._finals:
            del self._live[session_id]
            self._remember_finished(session)
        return dest

    def try_fire(self, session_id: str, event: str) -> bool:
        """Fire `event` if `session_id` is live and its stage accepts it; say whether it did (never raises).

        For the proxy's automatic events (`received`, `completed`, ...), where an unknown or finished
        session is normal (a late reply, a session another proxy started).
        """
        session = self._live.get(session_id)
        if session is None:
            return False
        kind = session.type
        dest = kind._next.get((session.state, event))
        if dest is None:
            return False
        session.state = dest
        if dest in kind._finals:
            del self._live[session_id]
            self._remember_finished(session)
        return True

    def pending_with(self, peer: str) -> list[Session]:
        """Live (non-final) sessions whose other side is `peer`."""
        # A scan, not a per-peer index: this runs when a peer fails (rare), and an index would double the
        # per-session bookkeeping on the hot path.
        return [session for session in self._live.values() if session.peer == peer]

    def fail_peer(self, peer: str, event: str = "peer_lost") -> list[Session]:
        """Fire `event` on every live session with `peer` that accepts it; return the sessions moved."""
        return self._fire_all([s.id for s in self.pending_with(peer)], event)

    def expire(self, session_ids: Iterable[str], event: str = "timeout") -> list[Session]:
        """Fire `event` on each live session of `session_ids` that accepts it; return the sessions moved.

        Unknown, finished or non-accepting ids are skipped: expiry races with replies.
        """
        return self._fire_all(session_ids, event)

    def _fire_all(self, session_ids: Iterable[str], event: str) -> list[Session]:
        moved = []
        for session_id in list(session_ids):
            session = self._live.get(session_id)
            if session is not None and self.try_fire(session_id, event):
                moved.append(session)
        return moved

    def settle(self, session_id: str) -> None:
        """Move live `session_id` to the finished LRU in the stage it is in (unknown ids are ignored).

        For a sender's side of a one-way session (a notification that went out): nothing more will come
        back for it, so keeping it live would grow the live index with every message sent. Its stage stays
        readable (bounded by `max_finished`) and no later event moves it.
        """
        session = self._live.pop(session_id, None)
        if session is not None:
            self._remember_finished(session)

    def discard(self, session_id: str) -> None:
        """Stop tracking `session_id` (live or finished); unknown ids are ignored."""
        self._live.pop(session_id, None)
        self._finished.pop(session_id, None)

    def _remember_finished(self, session: Session) -> None:
        if self.max_finished == 0:
            return
        finished = self._finished
        finished[session.id] = session
        if len(finished) > self.max_finished:
            finished.popitem(last=False)

    @property
    def live(self) -> int:
        """How many sessions are live (not in a final state)."""
        return len(self._live)

    @property
    def finished(self) -> int:
        """How many finished sessions are still remembered."""
        return len(self._finished)

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._live or session_id in self._finished

    def __repr__(self) -> str:
        return f"SessionTracker(live={self.live}, finished={self.finished}, max_finished={self.max_finished})"
