"""`@dist(proxy, handler_dict)`: turn a local class into a distributed worker with `launch()`."""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from rallypoint.engine import Message, RegisterTable, SessionCatalog
from rallypoint.errors import ConfigError, PeerGone

from ._proxy import Proxy

if TYPE_CHECKING:
    from ._async import AsyncProxy

logger = logging.getLogger(__name__)

# The proxy argument is a Proxy, or an AsyncProxy for a class decorated with one (then handlers may be async).
Handler = Callable[[Any, Any, list[Message]], Any]
ErrorHook = Callable[[BaseException, Handler, list[Message]], Any]
PeerGoneHook = Callable[[Any, Any, str], Any]


def dist(
    proxy: Proxy | AsyncProxy,
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

    With an `AsyncProxy`, `launch()` is a coroutine (`await Worker().launch()`) that runs on the event loop,
    and handlers (and `on_error`, `on_peer_gone`) may be `async def`. Each handler runs in a task of its own
    (its lane): the calls of one handler run one after another, in the order its rule was met, while the
    proxy goes on receiving; different handlers may overlap (one awaits, another runs). A plain `def` handler
    runs on the loop too, in its lane, and should not block. `launch()` returns once the handler calls already
    queued have finished.
    """
    from ._async import AsyncProxy

    if not isinstance(proxy, (Proxy, AsyncProxy)):
        raise ConfigError(f"dist() needs a Proxy or an AsyncProxy, not {type(proxy).__name__}")
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
            __slots__ = ("local_instance", "proxy", "_table", "_stopped", "_failure")

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self.local_instance = cls(*args, **kwargs)
                self.proxy = proxy
                self._table = RegisterTable(lambda: proxy.peers, rules=rules, catalog=named_by)
                for event, handler in handler_dict.items():
                    self._table.register_event_handler(event, handler)
                self._stopped = threading.Event()
                self._failure: BaseException | None = None

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

            def launch(self, *, handle_sigterm: bool = True) -> Any:
                """Receive and dispatch until stopped, or until the job is over (every peer of an expected type
                left). With `handle_sigterm`, SIGTERM stops it and closes the proxy: the process is asked to
                end, so it leaves the group properly (its peers hear it left, not that it crashed).

                With an AsyncProxy this returns a coroutine: `await Worker().launch()`."""
                if isinstance(proxy, AsyncProxy):
                    return self._launch_async(proxy, handle_sigterm)
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
                assert isinstance(proxy, Proxy)
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
                started = time.perf_counter_ns()
                try:
                    handler(self.local_instance, proxy, messages)
                except Exception as exc:
                    if on_error is None:
                        raise
                    logger.exception("handler %s failed", getattr(handler, "__name__", handler))
                    on_error(exc, handler, messages)
                finally:
                    _count_handler(proxy.stats, started)

            # ---------------------------------------------------------------- with an AsyncProxy

            async def _launch_async(self, aproxy: AsyncProxy, handle_sigterm: bool) -> None:
                loop = asyncio.get_running_loop()
                terminated = False

                def on_sigterm() -> None:
                    nonlocal terminated
                    logger.info("SIGTERM: stopping launch()")
                    terminated = True
                    self.stop()

                restore = _install_loop_sigterm(loop, on_sigterm) if handle_sigterm else None
                lanes: dict[int, tuple[asyncio.Queue[list[Message]], asyncio.Task[None]]] = {}
                self._failure = None
                try:
                    while not await self._dispatch_async(aproxy, lanes):
                        pass
                    if self._failure is None:  # what met a rule before the end is still handled
                        await asyncio.gather(*(queue.join() for queue, _ in lanes.values()))
                finally:
                    for _, task in lanes.values():
                        task.cancel()
                    await asyncio.gather(*(task for _, task in lanes.values()), return_exceptions=True)
                    self._stopped.clear()
                    if restore is not None:
                        restore()
                    if terminated:
                        await aproxy.close()
                if self._failure is not None:
                    failure, self._failure = self._failure, None
                    raise failure

            async def _dispatch_async(self, aproxy: AsyncProxy,
                                      lanes: dict[int, tuple[asyncio.Queue[list[Message]], asyncio.Task[None]]]
                                      ) -> bool:
                incoming = aproxy.receive(timeout=None)
                try:
                    async for message in incoming:
                        self._table.push(message)
                        for handler, messages in self._table.get():
                            lane = lanes.get(id(handler))
                            if lane is None:
                                queue: asyncio.Queue[list[Message]] = asyncio.Queue()
                                task = asyncio.ensure_future(self._lane(aproxy, handler, queue))
                                lane = lanes[id(handler)] = (queue, task)
                            lane[0].put_nowait(messages)
                        if self._stopped.is_set() or self._failure is not None:
                            return True
                except PeerGone as exc:
                    if on_peer_gone is None:
                        raise
                    for peer in exc.peers:
                        await _maybe_await(on_peer_gone(self.local_instance, aproxy, peer))
                    return self._stopped.is_set() or aproxy.closed
                finally:
                    await incoming.aclose()
                return True

            async def _lane(self, aproxy: AsyncProxy, handler: Handler, queue: asyncio.Queue[list[Message]]
                            ) -> None:
                """One handler's calls, one at a time, in the order its rule was met."""
                while True:
                    messages = await queue.get()
                    try:
                        if self._failure is None:
                            await self._call_async(aproxy, handler, messages)
                    except Exception as exc:  # no on_error: launch() stops and raises it
                        self._failure = exc
                        self.stop()
                    finally:
                        queue.task_done()

            async def _call_async(self, aproxy: AsyncProxy, handler: Handler, messages: list[Message]) -> None:
                started = time.perf_counter_ns()
                try:
                    await _maybe_await(handler(self.local_instance, aproxy, messages))
                except Exception as exc:
                    if on_error is None:
                        raise
                    logger.exception("handler %s failed", getattr(handler, "__name__", handler))
                    await _maybe_await(on_error(exc, handler, messages))
                finally:
                    _count_handler(aproxy.stats, started)

        Distributed.__name__ = cls.__name__
        Distributed.__qualname__ = cls.__qualname__
        Distributed.__doc__ = cls.__doc__
        Distributed.__module__ = cls.__module__
        return Distributed

    return decorate


def _count_handler(stats: Any, started_ns: int) -> None:
    """One handler call, and its time, in the proxy's stats (what watchers of the group see)."""
    stats.handler_calls += 1
    stats.handler_ns += time.perf_counter_ns() - started_ns


def _catalog_of(proxy: Proxy | AsyncProxy) -> SessionCatalog:
    """The proxy's catalog, or one with the built-in types for a proxy that keeps none."""
    found = getattr(proxy, "catalog", None)
    return found if isinstance(found, SessionCatalog) else SessionCatalog()


async def _maybe_await(result: Any) -> Any:
    """The result of a handler: awaited when it is awaitable (an `async def` handler), as is otherwise."""
    if inspect.isawaitable(result):
        return await result
    return result


def _install_loop_sigterm(loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> Callable[[], None] | None:
    """Route SIGTERM to `stop` through the event loop while an async launch() runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    try:
        loop.add_signal_handler(signal.SIGTERM, stop)
    except (NotImplementedError, RuntimeError, ValueError):  # a loop without signal support
        return None

    def restore() -> None:
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, previous)

    return restore


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
