"""`@dist(proxy, handler_dict)`: turn a local class into a distributed worker with `launch()`."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any

from rallypoint.engine import Message, RegisterTable, SessionCatalog
from rallypoint.errors import ConfigError, PeerGone

from ._proxy import Proxy

logger = logging.getLogger(__name__)

Handler = Callable[[Any, Proxy, list[Message]], Any]
ErrorHook = Callable[[BaseException, Handler, list[Message]], Any]
PeerGoneHook = Callable[[Any, Proxy, str], Any]


def dist(
    proxy: Proxy,
    handler_dict: Mapping[Any, Handler],
    *,
    on_error: ErrorHook | None = None,
    rules: Mapping[str, Any] | None = None,
    catalog: SessionCatalog | None = None,
    on_peer_gone: PeerGoneHook | None = None,
) -> Callable[[type], type]:
    """Make `cls` distributed: `launch()` feeds received messages to a rule table and calls handlers.

        @dist(proxy, {"master:rollout:1": on_rollout})
        class Worker:
            ...

        Worker().launch()      # returns after proxy.stop(), Worker.stop(), or SIGTERM

    Keys of `handler_dict` are text rules, the seed's tuple form, or rule names: from `rules`, then from
    the named rules of `catalog` (default: the proxy's own catalog, `proxy.catalog`). Each handler is
    called as `handler(that, proxy, messages)` with the local instance, the proxy and exactly the messages
    that met its rule. A handler that raises stops `launch()` and the error propagates, unless
    `on_error(exc, handler, messages)` is given, which is called instead and the loop goes on. Attribute
    access on the distributed instance falls through to the local one.

    Every rule is parsed and checked here, when the decorator runs: a malformed rule or an unknown rule name
    raises at once, and a rule whose source can match no expected peer type and no live peer is logged (one
    warning). `launch()` ends normally when every peer of an expected type left (closed) and everything they
    sent was handled; when every peer of one is gone (crashed, cut off) for `Liveness.orphan_after`, it raises
    PeerGone, or, given `on_peer_gone(that, proxy, peer)`, calls that for each of them and goes on.
    """
    if not isinstance(proxy, Proxy):
        raise ConfigError(f"dist() needs a Proxy, not {type(proxy).__name__}")
    if not handler_dict:
        raise ConfigError("dist() needs at least one event -> handler entry")
    for key, handler in handler_dict.items():
        if not callable(handler):
            raise ConfigError(f"handler for {key!r} is not callable")
    named_by = catalog if catalog is not None else _catalog_of(proxy)
    # Checked now, before any instance exists: errors and warnings show where the rules are written.
    checker = RegisterTable(lambda: proxy.peers, rules=rules, catalog=named_by, expected_types=proxy.expected_peers)
    for event, handler in handler_dict.items():
        checker.register_event_handler(event, handler)

    def decorate(cls: type) -> type:
        class Distributed:
            __slots__ = ("local_instance", "proxy", "_table", "_stopped")

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self.local_instance = cls(*args, **kwargs)
                self.proxy = proxy
                self._table = RegisterTable(lambda: proxy.peers, rules=rules, catalog=named_by)
                for event, handler in handler_dict.items():
                    self._table.register_event_handler(event, handler)
                self._stopped = threading.Event()

            def __getattr__(self, name: str) -> Any:
                # Only called when normal lookup fails: the local class's attributes show through.
                return getattr(object.__getattribute__(self, "local_instance"), name)

            @property
            def register_table(self) -> RegisterTable:
                return self._table

            def stop(self) -> None:
                """Make `launch()` return; safe from any thread, a handler or a signal handler."""
                self._stopped.set()
                proxy.stop()

            def launch(self, *, handle_sigterm: bool = True) -> None:
                """Receive and dispatch until stopped, or until the job is over (every peer of an expected type
                left). With `handle_sigterm`, SIGTERM stops it and closes the proxy: the process is asked to
                end, so it leaves the group properly (its peers hear it left, not that it crashed)."""
                terminated = threading.Event()

                def on_sigterm() -> None:
                    terminated.set()
                    self.stop()

                restore = _install_sigterm(on_sigterm) if handle_sigterm else None
                try:
                    while not self._dispatch_until_done():
                        pass
                finally:
                    self._stopped.clear()
                    if restore is not None:
                        restore()
                    if terminated.is_set():
                        proxy.close()

            def _dispatch_until_done(self) -> bool:
                """One receive loop; True when launch() is done, False to start another (after on_peer_gone)."""
                incoming = proxy.receive(timeout=None)
                try:
                    for message in incoming:
                        self._table.push(message)
                        for handler, messages in self._table.get():
                            self._call(handler, messages)
                            if self._stopped.is_set():
                                return True
                        if self._stopped.is_set():
                            return True
                except PeerGone as exc:
                    if on_peer_gone is None:
                        raise
                    for peer in exc.peers:
                        on_peer_gone(self.local_instance, proxy, peer)
                    return self._stopped.is_set() or proxy.closed
                finally:
                    incoming.close()  # ends the receive loop now, consuming the stop request
                return True

            def _call(self, handler: Handler, messages: list[Message]) -> None:
                try:
                    handler(self.local_instance, proxy, messages)
                except Exception as exc:
                    if on_error is None:
                        raise
                    logger.exception("handler %s failed", getattr(handler, "__name__", handler))
                    on_error(exc, handler, messages)

        Distributed.__name__ = cls.__name__
        Distributed.__qualname__ = cls.__qualname__
        Distributed.__doc__ = cls.__doc__
        Distributed.__module__ = cls.__module__
        return Distributed

    return decorate


def _catalog_of(proxy: Proxy) -> SessionCatalog:
    """The proxy's catalog, or one with the built-in types for a proxy that keeps none."""
    found = getattr(proxy, "catalog", None)
    return found if isinstance(found, SessionCatalog) else SessionCatalog()


def _install_sigterm(stop: Callable[[], None]) -> Callable[[], None] | None:
    """Route SIGTERM to `stop` while launch() runs (main thread only); returns how to undo it."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        logger.info("SIGTERM: stopping launch()")
        stop()

    signal.signal(signal.SIGTERM, on_sigterm)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore
