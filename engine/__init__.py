"""rallypoint.engine: messages, rule evaluation (RegisterTable) and session state machines.

Pure: no sockets, no Redis, no threads, no clock (callers pass time in where it matters). The only I/O is
reading spec files in `load_spec`. Modules import downward only, in this order (no cycle, no late imports
between them); there is no process-wide state but the compiled built-in session types. Layout:

    _ids.py       new_id: cheap unique ids in UUID form
    _message.py   Message, SessionMessage, SessionType, tag_text
    _rules.py     pure helpers: prefix matching, quorum arithmetic, rule checks, handler-key resolution
    _sessions.py  compile_session, CompiledSessionType, Session, SessionCatalog, SessionTracker, load_spec
    _table.py     RegisterTable: buffers messages per rule and reports the rules that are met
"""

from ._ids import new_id as new_id
from ._message import Message as Message
from ._message import SessionMessage as SessionMessage
from ._message import SessionType as SessionType
from ._message import tag_text as tag_text
from ._rules import check_rule as check_rule
from ._rules import quorum as quorum
from ._rules import source_matches as source_matches
from ._sessions import BUILTIN_SESSION_TYPES as BUILTIN_SESSION_TYPES
from ._sessions import MAX_STATES as MAX_STATES
from ._sessions import MAX_TRANSITIONS as MAX_TRANSITIONS
from ._sessions import CompiledSessionType as CompiledSessionType
from ._sessions import Session as Session
from ._sessions import SessionCatalog as SessionCatalog
from ._sessions import SessionTracker as SessionTracker
from ._sessions import Spec as Spec
from ._sessions import SpecSource as SpecSource
from ._sessions import builtin_spec_names as builtin_spec_names
from ._sessions import compile_session as compile_session
from ._sessions import load_spec as load_spec
from ._table import Handler as Handler
from ._table import PeerView as PeerView
from ._table import RegisterTable as RegisterTable

__all__ = [
    "BUILTIN_SESSION_TYPES",
    "CompiledSessionType",
    "Handler",
    "MAX_STATES",
    "MAX_TRANSITIONS",
    "Message",
    "PeerView",
    "RegisterTable",
    "Session",
    "SessionCatalog",
    "SessionMessage",
    "SessionTracker",
    "SessionType",
    "Spec",
    "SpecSource",
    "builtin_spec_names",
    "check_rule",
    "compile_session",
    "load_spec",
    "new_id",
    "quorum",
    "source_matches",
    "tag_text",
]
