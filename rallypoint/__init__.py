"""rallypoint: message passing between the processes of a distributed job.

Layout (imports point down only):
    rallypoint          this facade, the error tree (rallypoint.errors) and the CLI
    rallypoint.proxy    Proxy, @dist, drivers (ZeroMQ), registries (Redis, embedded), wire codec
    rallypoint.engine   Message, SessionMessage, RegisterTable, session state machines: pure, no I/O
    rallypoint.grammar  the rule and spec languages (Lark) into frozen AST dataclasses

The engine names are imported eagerly; the proxy names on first use, so `import rallypoint` for the
engine alone loads neither zmq nor redis.
"""

from rallypoint.engine import Message as Message
from rallypoint.engine import RegisterTable as RegisterTable
from rallypoint.engine import SessionMessage as SessionMessage
from rallypoint.engine import SessionTracker as SessionTracker
from rallypoint.engine import SessionType as SessionType
from rallypoint.engine import load_spec as load_spec
from rallypoint.errors import Error as Error
from rallypoint.grammar import parse_rule as parse_rule

_PROXY_NAMES = frozenset(
    {"Proxy", "dist", "Timeouts", "Liveness", "HoldPolicy", "EmbeddedRegistryServer", "InMemoryDriver",
     "InMemoryNetwork", "InMemoryRegistry", "RedisRegistry", "ZmqDriver"}
)


def __getattr__(name: str) -> object:
    if name in _PROXY_NAMES:
        import rallypoint.proxy

        return getattr(rallypoint.proxy, name)
    raise AttributeError(f"module 'rallypoint' has no attribute {name!r}")


__all__ = [
    "EmbeddedRegistryServer",
    "Error",
    "HoldPolicy",
    "InMemoryDriver",
    "InMemoryNetwork",
    "InMemoryRegistry",
    "Liveness",
    "Message",
    "Proxy",
    "RedisRegistry",
    "RegisterTable",
    "SessionMessage",
    "SessionTracker",
    "SessionType",
    "Timeouts",
    "ZmqDriver",
    "dist",
    "load_spec",
    "parse_rule",
]
__version__ = "0.1.0"
