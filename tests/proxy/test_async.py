"""AsyncProxy against real processes and a real Redis: async and blocking members in one group, many requests in
flight, cancellation, async @dist handlers, peers killed and proxies closed under pending awaits.

Every test runs on the default asyncio loop and on uvloop, in asyncio's debug mode with
`slow_callback_duration` at 50 ms, and fails if asyncio logged anything (a slow callback is a blocking call on
the loop; a never-retrieved exception or a never-awaited coroutine is a bug).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from proxy_helpers import FAST, PeerProcess, new_group

from rallypoint import AsyncProxy, Message, Proxy, SessionMessage, SessionType, Timeouts, dist
from rallypoint.errors import PeerGone, ProxyClosed, Timeout

ASYNC_PEER = Path(__file__).with_name("async_peer.py")
TIMEOUTS = Timeouts(join=20.0, connect=3.0, reply=20.0, close=0.5)

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is in the test extras
    uvloop = None

LOOPS = ["asyncio"] + (["uvloop"] if uvloop is not None else [])


@pytest.fixture(params=LOOPS)
def run(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture) -> Iterator[Callable[..., Any]]:
    """run(coroutine function, *args): on the loop under test, in debug mode, slow callbacks at 50 ms."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop
    caplog.set_level(logging.WARNING, logger="asyncio")

    def runner(main: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        with asyncio.Runner(debug=True, loop_factory=factory) as loop_runner:
            loop_runner.get_loop().slow_callback_duration = 0.05
            return loop_runner.run(main(*args))

    yield runner
    complaints = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert complaints == [], complaints


def async_master(registry: str, group: str, workers: int, **kwargs: Any) -> AsyncProxy:
    kwargs.setdefault("liveness", FAST)
    return AsyncProxy(group_name=group, component_type="master", name="master", registry=registry,
                      expected_peers={"worker": workers}, timeouts=TIMEOUTS, **kwargs)


class AsyncPeer(PeerProcess):
    """A tests/proxy/async_peer.py process (an AsyncProxy worker with async @dist handlers)."""

    def __init__(self, registry: str, group: str, name: str, *extra: str) -> None:  # noqa: D107
        self.name = name
        self.args = [sys.executable, str(ASYNC_PEER), registry, group, name, *extra]
        self.proc = None
        self.start()


def blocking_workers(registry: str, group: str, n: int) -> list[PeerProcess]:
    return [PeerProcess("worker", registry, group, f"worker_{i}") for i in range(n)]


def close_all(peers: list[PeerProcess]) -> None:
    for peer in peers:
        peer.close()


async def until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `predicate` on the loop until it is truthy, or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# ------------------------------------------------------------------------------------ mixed groups


def test_async_master_with_blocking_workers(registry_url, run):
    group = new_group()
    workers = blocking_workers(registry_url, group, 4)

    async def main() -> None:
        async with async_master(registry_url, group, 4) as proxy:
            names = proxy.peers["worker"]
            assert names == [f"worker_{i}" for i in range(4)]
            [reply] = await proxy.send(SessionMessage("sum", destination=names[0], payload=[1, 2, 3]))
            assert reply.payload == 6 and reply.source == names[0]
            assert proxy.session_stage(reply.session_id) == "complete"
            scattered = await proxy.scatter("sum", SessionType.TASK, [(w, [i, 10]) for i, w in enumerate(names)])
            assert sorted((m.source, m.payload) for m in scattered) == [(w, i + 10) for i, w in enumerate(names)]
            echoed = await proxy.broadcast("worker", "echo", SessionType.TASK, payload="hi")
            assert sorted(m.source for m in echoed) == names and {m.payload for m in echoed} == {"hi"}
            sids = await proxy.isend(SessionMessage("echo", destination=names[1], payload=42))
            [got] = await proxy.receive_by_id(sids)
            assert got.payload == 42 and got.session_id == sids[0]
            assert await proxy.send(SessionMessage("echo", destination=names[2], payload=1,
                                                   session_type=SessionType.NOTIFICATION)) == []
            await proxy.broadcast("worker", "stop", SessionType.NOTIFICATION)

    try:
        run(main)
        for worker in workers:
            assert worker.wait(10) == 0, worker.stderr_text()
    finally:
        close_all(workers)


def test_blocking_master_with_async_workers_and_async_handlers(registry_url, run):
    """The reverse: async workers (async @dist handlers, one lane per rule) answer a blocking master; a slow
    handler does not stop the worker from receiving and answering others meanwhile."""
    group = new_group()
    extra = ("--uvloop",) if "uvloop" in repr(run) else ()
    workers = [AsyncPeer(registry_url, group, f"worker_{i}", *extra) for i in range(2)]
    try:
        with Proxy(group_name=group, component_type="master", name="master", registry=registry_url,
                   expected_peers={"worker": 2}, timeouts=TIMEOUTS, liveness=FAST) as master:
            [slow] = master.isend(SessionMessage("slow", destination="worker_0", payload=5.0))
            fast = [master.send(SessionMessage("echo", destination="worker_0", payload=i))[0] for i in range(20)]
            assert [m.payload for m in fast] == list(range(20))
            assert slow in master.awaiting_replies()  # answered 20 echoes while the slow handler ran
            [done] = master.receive_by_id([slow], timeout=20)
            assert done.payload == "done"
            replies = master.broadcast("worker", "echo", SessionType.TASK, payload="x")
            assert sorted(m.source for m in replies) == ["worker_0", "worker_1"]
            master.broadcast("worker", "stop", SessionType.NOTIFICATION)
        run(asyncio.sleep, 0)  # the fixture's loop checks run at least once
        for worker in workers:
            assert worker.wait(10) == 0, worker.stderr_text()
    finally:
        close_all(workers)


# ------------------------------------------------------------------------------------ many in flight


def test_a_thousand_concurrent_sends_each_get_their_own_reply(registry_url, run):
    group = new_group()
    workers = blocking_workers(registry_url, group, 4)

    async def main() -> None:
        async with async_master(registry_url, group, 4) as proxy:
            names = proxy.peers["worker"]
            requests = [SessionMessage("echo", destination=names[i % 4], payload=(i, "x" * (i % 7)))
                        for i in range(1000)]
            results = await asyncio.gather(*(proxy.send(r) for r in requests))
            for request, replies in zip(requests, results, strict=True):
                [reply] = replies
                assert reply.session_id == request.session_id
                assert reply.payload == request.payload
                assert reply.source == request.destination
            assert proxy.in_flight == 0 and proxy.awaiting_replies() == {}
            await proxy.broadcast("worker", "stop", SessionType.NOTIFICATION)

    try:
        run(main)
    finally:
        close_all(workers)


# ------------------------------------------------------------------------------------ cancellation


def test_cancelled_send_ends_its_session_and_the_late_reply_is_counted(registry_url, run):
    group = new_group()
    workers = blocking_workers(registry_url, group, 1)

    async def main() -> None:
        async with async_master(registry_url, group, 1) as proxy:
            slow = SessionMessage("slow", destination="worker_0", payload=0.5)
            timed_out = SessionMessage("slow", destination="worker_0", payload=0.5)
            task = asyncio.ensure_future(proxy.send(slow))
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(proxy.send(timed_out), timeout=0.1)
            await until(lambda: slow.session_id in proxy.awaiting_replies(), 5, "the slow send to be on its way")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for message in (slow, timed_out):
                info = proxy.session(message.session_id)
                assert info is not None and info.ended == "cancelled" and not info.awaiting
                assert proxy.session_stage(message.session_id) == "failed"
            # Other requests go on meanwhile (the worker answers in order: these come after both slow ones).
            [echo] = await proxy.send(SessionMessage("echo", destination="worker_0", payload="after"))
            assert echo.payload == "after"
            assert proxy.stats.dropped_late == 2  # both late replies came before the echo, and were dropped
            assert proxy.in_flight == 0 and proxy.live_sessions == 0
            await proxy.broadcast("worker", "stop", SessionType.NOTIFICATION)

    try:
        run(main)
    finally:
        close_all(workers)


def test_timeout_raises_timeout_and_leaves_the_session_waiting(registry_url, run):
    group = new_group()
    workers = blocking_workers(registry_url, group, 1)

    async def main() -> None:
        async with async_master(registry_url, group, 1) as proxy:
            message = SessionMessage("slow", destination="worker_0", payload=0.3)
            with pytest.raises(Timeout) as caught:
                await proxy.send(message, timeout=0.05)
            assert caught.value.session_ids == (message.session_id,) or \
                list(caught.value.session_ids) == [message.session_id]
            [late] = await proxy.receive_by_id([message.session_id], timeout=10)  # as the blocking proxy
            assert late.payload == "done"
            await proxy.broadcast("worker", "stop", SessionType.NOTIFICATION)

    try:
        run(main)
    finally:
        close_all(workers)


# ------------------------------------------------------------------------------------ faults and closing


def test_peer_killed_under_pending_awaits_raises_peer_gone_for_each(registry_url, run):
    group = new_group()
    workers = blocking_workers(registry_url, group, 2)

    async def main() -> None:
        async with async_master(registry_url, group, 2) as proxy:
            doomed = [asyncio.ensure_future(proxy.send(SessionMessage("slow", destination="worker_0",
                                                                      payload=30.0))) for _ in range(10)]
            await until(lambda: len(proxy.awaiting_replies()) == 10, 5, "10 sends in flight")
            workers[0].kill()
            outcomes = await asyncio.gather(*doomed, return_exceptions=True)
            for outcome in outcomes:
                assert isinstance(outcome, PeerGone), outcome
                assert outcome.peers == ("worker_0",) and not outcome.left and outcome.replies == []
            [reply] = await proxy.send(SessionMessage("echo", destination="worker_1", payload="alive"))
            assert reply.payload == "alive"
            assert proxy.peer_state("worker_0") == "gone"
            await proxy.broadcast("worker", "stop", SessionType.NOTIFICATION)

    try:
        run(main)
    finally:
        close_all(workers)


def test_close_while_requests_are_pending(registry_url, run):
    group = new_group()
    workers = blocking_workers(registry_url, group, 1)

    async def main() -> None:
        proxy = await async_master(registry_url, group, 1).join()
        pending = [asyncio.ensure_future(proxy.send(SessionMessage("slow", destination="worker_0",
                                                                   payload=0.5))) for _ in range(5)]
        receiving = asyncio.ensure_future(proxy.receive_once(timeout=None))
        await until(lambda: len(proxy.awaiting_replies()) == 5, 5, "5 sends in flight")
        started = time.monotonic()
        await proxy.close()
        assert time.monotonic() - started < 5.0  # bounded by Timeouts.close, not by the replies
        outcomes = await asyncio.gather(*pending, receiving, return_exceptions=True)
        assert all(isinstance(outcome, ProxyClosed) for outcome in outcomes), outcomes
        assert proxy.closed
        await proxy.close()  # idempotent
        with pytest.raises(ProxyClosed):
            await proxy.send(SessionMessage("echo", destination="worker_0", payload=1))

    try:
        run(main)
        # The worker heard the master leave (it was closed, not crashed): its launch() ends by itself.
        assert workers[0].wait(20) == 0, workers[0].stderr_text()
    finally:
        close_all(workers)


# ------------------------------------------------------------------------------------ async @dist


def test_async_dist_handlers_with_a_quorum_rule(registry_url, run):
    """An async master's @dist class: a `worker:update:75%` rule fires once 3 of 4 workers reported, its async
    handler runs on the loop, and a second rule's handler runs in its own lane meanwhile."""
    group = new_group()
    workers = [AsyncPeer(registry_url, group, f"worker_{i}") for i in range(4)]
    fired: list[list[Message]] = []
    pings: list[str] = []

    async def on_quorum(that: Any, proxy: AsyncProxy, messages: list[Message]) -> None:
        fired.append(messages)
        await asyncio.sleep(0)  # a real await inside the handler
        proxy.stop()

    def on_any_update(that: Any, proxy: AsyncProxy, messages: list[Message]) -> None:
        pings.extend(m.source for m in messages)

    async def main() -> None:
        proxy = async_master(registry_url, group, 4)

        @dist(proxy, {"worker:update:75%": on_quorum, "worker:update:1": on_any_update})
        class Master:
            pass

        async with proxy:
            await proxy.ibroadcast("worker", "report", SessionType.NOTIFICATION, payload=7)
            await asyncio.wait_for(Master().launch(), timeout=20)
            assert len(fired) == 1
            sources = [m.source for m in fired[0]]
            assert len(sources) == 3 and len(set(sources)) == 3 and all(s.startswith("worker_") for s in sources)
            assert {m.payload for m in fired[0]} == {7} and {m.tag for m in fired[0]} == {"update"}
            assert len(pings) >= 3  # the other rule saw each update as it came
            await proxy.broadcast("worker", "stop", SessionType.NOTIFICATION)

    try:
        run(main)
        for worker in workers:
            assert worker.wait(10) == 0, worker.stderr_text()
    finally:
        close_all(workers)


def test_async_dist_handler_error_stops_launch_and_propagates(registry_url, run):
    group = new_group()
    workers = blocking_workers(registry_url, group, 1)

    async def broken(that: Any, proxy: AsyncProxy, messages: list[Message]) -> None:
        raise RuntimeError("handler broke")

    async def main() -> None:
        proxy = async_master(registry_url, group, 1)

        @dist(proxy, {"worker:*:1": broken})
        class Master:
            pass

        async with proxy:
            # A notification the worker answers with its echo: the reply comes through receive(), into launch().
            await proxy.isend(SessionMessage("echo", destination="worker_0", payload=1,
                                             session_type=SessionType.NOTIFICATION))
            with pytest.raises(RuntimeError, match="handler broke"):
                await asyncio.wait_for(Master().launch(), timeout=20)
            await proxy.broadcast("worker", "stop", SessionType.NOTIFICATION)

    try:
        run(main)
    finally:
        close_all(workers)


def test_join_timeout_and_use_before_join(registry_url, run):
    async def main() -> None:
        proxy = AsyncProxy(group_name=new_group(), component_type="master", registry=registry_url,
                           expected_peers={"worker": 1}, join_timeout=0.3, liveness=FAST)
        assert proxy.peers == {} and proxy.expected_peers == {"worker": 1}
        with pytest.raises(ProxyClosed):
            await proxy.send(SessionMessage("echo", destination="worker_0"))
        from rallypoint.errors import JoinTimeout

        with pytest.raises(JoinTimeout):
            await proxy.join()
        await proxy.close()

    run(main)


def test_async_proxies_on_the_in_memory_registry_and_driver(run):
    """No sockets at all: the in-memory driver gives the loop a descriptor to watch too (`fds()`)."""
    from rallypoint.proxy import InMemoryNetwork, InMemoryRegistry

    registry, network, group = InMemoryRegistry(), InMemoryNetwork(), new_group()

    def member(kind: str, name: str, expected: dict[str, int]) -> AsyncProxy:
        return AsyncProxy(group_name=group, component_type=kind, name=name, expected_peers=expected,
                          registry=registry, driver=network.driver(), timeouts=TIMEOUTS)

    async def serve(worker: AsyncProxy) -> None:
        async for message in worker.receive():
            await worker.reply(message, payload=sum(message.payload))

    async def main() -> None:
        async with member("master", "master", {}) as master, \
                member("worker", "worker_0", {"master": 1}) as worker:
            server = asyncio.ensure_future(serve(worker))
            replies = await asyncio.gather(*(master.send(SessionMessage("sum", destination="worker_0",
                                                                        payload=[n, 1])) for n in range(20)))
            assert sorted(reply.payload for [reply] in replies) == [n + 1 for n in range(20)]
            worker.stop()
            await asyncio.wait_for(server, 5)

    run(main)
