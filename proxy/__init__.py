"""rallypoint.proxy: the layer that touches the network.

`Proxy` (the primitives), `AsyncProxy` (its asyncio twin), `dist` (the decorator), the driver interface with
its ZeroMQ and in-memory implementations, the registry interface with its Redis, embedded and in-memory
implementations, and the wire codec. Only `_zmq` imports zmq and only `_registry`/`_embedded` import redis/fakeredis.
"""

from typing import TYPE_CHECKING

from ._config import UNSET as UNSET
from ._config import HoldPolicy as HoldPolicy
from ._config import Liveness as Liveness
from ._config import Timeouts as Timeouts
from ._driver import Driver as Driver
from ._driver import DriverEvent as DriverEvent
from ._driver import InMemoryDriver as InMemoryDriver
from ._driver import InMemoryNetwork as InMemoryNetwork
from ._proxy import Proxy as Proxy
from ._proxy import SessionInfo as SessionInfo
from ._registry import InMemoryRegistry as InMemoryRegistry
from ._registry import PeerRecord as PeerRecord
from ._registry import RedisRegistry as RedisRegistry
from ._registry import Registry as Registry
from ._registry import registry_from as registry_from
from ._stats import ProxyStats as ProxyStats
from ._trust import handshake_token as handshake_token
from ._wire import WireCodec as WireCodec

if TYPE_CHECKING:
    from ._async import AsyncProxy as AsyncProxy
    from ._dist import dist as dist


def __getattr__(name: str) -> object:
    # Imported on first use: ZmqDriver loads zmq, EmbeddedRegistryServer loads fakeredis (~160 ms), and dist
    # is only for processes that use the decorator (a Proxy does not need it).
    if name == "AsyncProxy":
        from ._async import AsyncProxy

        return AsyncProxy
    if name == "dist":
        from ._dist import dist

        return dist
    if name == "ZmqDriver":
        from ._zmq import ZmqDriver

        return ZmqDriver
    if name == "EmbeddedRegistryServer":
        from ._embedded import EmbeddedRegistryServer

        return EmbeddedRegistryServer
    raise AttributeError(f"module 'rallypoint.proxy' has no attribute {name!r}")


__all__ = [
    "AsyncProxy",
    "Driver",
    "DriverEvent",
    "EmbeddedRegistryServer",
    "HoldPolicy",
    "InMemoryDriver",
    "InMemoryNetwork",
    "InMemoryRegistry",
    "Liveness",
    "PeerRecord",
    "Proxy",
    "ProxyStats",
    "RedisRegistry",
    "Registry",
    "SessionInfo",
    "Timeouts",
    "UNSET",
    "WireCodec",
    "ZmqDriver",
    "dist",
    "handshake_token",
    "registry_from",
]
