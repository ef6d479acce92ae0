"""rallypoint.grammar: the rule and session-spec languages, parsed with Lark into frozen AST dataclasses.

Knows nothing of messages or sockets. Lark itself is imported on the first text parsed (`_lalr`), so
importing this package is cheap.
"""

from ._ast import WILDCARD as WILDCARD
from ._ast import And as And
from ._ast import Expr as Expr
from ._ast import Or as Or
from ._ast import RuleDef as RuleDef
from ._ast import SessionDef as SessionDef
from ._ast import SpecFile as SpecFile
from ._ast import TransitionDef as TransitionDef
from ._ast import Unit as Unit
from ._parse import as_rule as as_rule
from ._parse import parse_rule as parse_rule
from ._parse import parse_spec as parse_spec
from ._parse import rule_from_tuple as rule_from_tuple

__all__ = [
    "And",
    "Expr",
    "Or",
    "RuleDef",
    "SessionDef",
    "SpecFile",
    "TransitionDef",
    "Unit",
    "WILDCARD",
    "as_rule",
    "parse_rule",
    "parse_spec",
    "rule_from_tuple",
]
