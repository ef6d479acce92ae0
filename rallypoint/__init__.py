"""rallypoint: message passing between the processes of a distributed job.

Layout (imports point down only):
    rallypoint          this facade, the error tree (rallypoint.errors) and the CLI
    rallypoint.proxy    Proxy, @dist, drivers (ZeroMQ), registries (Redis, embedded), wire codec
    rallypoint.engine   Message, SessionMessage, RegisterTable, session state machines: pure, no I/O
    rallypoint.grammar  the rule and spec languages (Lark) into frozen AST dataclasses

The engine names are imported eagerly. The proxy names are imported on first use (`rallypoint.proxy`
costs ~100 ms, zmq and fakeredis more), so `import rallypoint` for the engine alone loads neither zmq,
redis nor Lark; the type checker sees them as the plain re-exports below.
"""

from typing import TYPE_CHECKING

from rallypoint.engine import Message as Message
from rallypoint.engine import RegisterTable as RegisterTable
from rallypoint.engine import SessionMessage as SessionMessage
from rallypoint.engine import SessionTracker as SessionTracker
from rallypoint.engine import SessionType as SessionType
from rallypoint.engine import load_spec as load_spec
from rallypoint.errors import Error as Error
from rallypoint.grammar import parse_rule as parse_rule

if TYPE_CHECKING:
    from rallypoint.proxy import AsyncProxy as AsyncProxy
    from rallypoint.proxy import HoldPolicy as HoldPolicy
    from rallypoint.proxy import InMemoryDriver as InMemoryDriver
    from rallypoint.proxy import InMemoryNetwork as InMemoryNetwork
    from rallypoint.proxy import InMemoryRegistry as InMemoryRegistry
    from rallypoint.proxy import Liveness as Liveness
    from rallypoint.proxy import Proxy as Proxy
    from rallypoint.proxy import RedisRegistry as RedisRegistry
    from rallypoint.proxy import Timeouts as Timeouts
    from rallypoint.proxy._dist import dist as dist
    from rallypoint.proxy._embedded import EmbeddedRegistryServer as EmbeddedRegistryServer
    from rallypoint.proxy._zmq import ZmqDriver as ZmqDriver

# The names above that exist at run time only once `rallypoint.proxy` is imported, by `__getattr__`.
_PROXY_NAMES = frozenset(
    {"AsyncProxy", "Proxy", "dist", "Timeouts", "Liveness", "HoldPolicy", "EmbeddedRegistryServer",
     "InMemoryDriver", "InMemoryNetwork", "InMemoryRegistry", "RedisRegistry", "ZmqDriver"}
)


if not TYPE_CHECKING:  # hidden from the type checker, which would otherwise accept any name as `object`

    def __getattr__(name: str) -> object:
        if name in _PROXY_NAMES:
            import rallypoint.proxy

            value = getattr(rallypoint.proxy, name)
            globals()[name] = value  # later look-ups skip this function
            return value
        raise AttributeError(f"module 'rallypoint' has no attribute {name!r}")


__all__ = [
    "AsyncProxy",
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
