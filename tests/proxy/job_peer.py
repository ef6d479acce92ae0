"""A worker or master process for the end-of-job tests, driven by command-line options.

    python job_peer.py worker REGISTRY GROUP NAME [--slow-first S] [--reply] [--reply-notes] [--hook] ...
    python job_peer.py master REGISTRY GROUP NAME --plan burst|round|wait [--to A,B] [--tasks N] [--stop] ...

It prints one line per event on stdout (flushed), which the tests read:

    STARTING <name>              before `Proxy(...)` (so a test knows the process is up, joining)
    READY <name>                 joined
    TASK <payload> <source>      a worker's handler took a `task` message (one line per message)
    STOP <source>                a worker's handler took a `stop` message
    NOTE <payload> <source>      a worker's handler took a `note` message (and answered it with --reply-notes)
    HOOK <peer>                  the on_peer_gone hook was called (--hook)
    RETURNED                     launch() returned normally
    STATE <peer> <state>         proxy.peer_state(peer) once launch() ended, for every peer seen
    EXC <type> <peer> <message>  launch() (or the master's plan) raised a rallypoint error; exit status 3 for
                                 PeerGone, 4 for any other rallypoint error
    SENT <count>                 the master handed <count> messages to isend/ibroadcast
    ROUND OK                     the master's scatter got every reply it expected
    CLOSED                       close() returned

Options shared by both roles: --type (default: the role), --expect TYPE:COUNT[,TYPE:COUNT] (default
master:1 for a worker, nothing for a master), --join-timeout, --fast (fast liveness: heartbeat 0.2 s,
timeout 1.0 s, lease 2.0 s, refresh 0.2 s), --orphan-after S|none (Liveness(orphan_after=...); left out:
the library's default), --log-level LEVEL (logging to stderr as "LEVEL logger: message").
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from rallypoint import Proxy, SessionMessage, SessionType, Timeouts, dist
from rallypoint.errors import Error, PeerGone
from rallypoint.proxy import Liveness

EXIT_PEER_GONE = 3
EXIT_OTHER_ERROR = 4


def say(line: str) -> None:
    print(line, flush=True)


def parse_expect(text: str) -> dict[str, int]:
    expected: dict[str, int] = {}
    for item in filter(None, text.split(",")):
        kind, count = item.split(":")
        expected[kind] = int(count)
    return expected


def make_liveness(args: argparse.Namespace) -> Liveness | None:
    options: dict[str, object] = {}
    if args.fast:
        options.update(lease=2.0, refresh=0.2, heartbeat=0.2, heartbeat_timeout=1.0)
    if args.orphan_after is not None:
        options["orphan_after"] = None if args.orphan_after == "none" else float(args.orphan_after)
    return Liveness(**options) if options else None  # type: ignore[arg-type]


def run_worker(proxy: Proxy, args: argparse.Namespace) -> int:
    seen: set[str] = {name for names in proxy.peers.values() for name in names}
    first = [True]

    def on_task(that, proxy, messages):  # type: ignore[no-untyped-def]
        for message in messages:
            seen.add(message.source)
            if first[0] and args.slow_first:
                first[0] = False
                time.sleep(args.slow_first)  # the scenario: a handler busy on its first task
            first[0] = False
            say(f"TASK {message.payload} {message.source}")
            if args.reply:
                proxy.reply(message, payload=("done", proxy.name, message.payload))

    def on_stop(that, proxy, messages):  # type: ignore[no-untyped-def]
        for message in messages:
            seen.add(message.source)
            say(f"STOP {message.source}")
        proxy.stop()

    def on_note(that, proxy, messages):  # type: ignore[no-untyped-def]
        for message in messages:
            seen.add(message.source)
            say(f"NOTE {message.payload} {message.source}")
            if args.reply_notes:
                proxy.reply(message, payload=("ack", proxy.name, message.payload))

    def on_peer_gone(that, proxy, peer):  # type: ignore[no-untyped-def]
        seen.add(peer)
        say(f"HOOK {peer}")
        proxy.stop()

    options = {"on_peer_gone": on_peer_gone} if args.hook else {}

    @dist(proxy, {"master:task:1": on_task, "master:stop:1": on_stop, "master:note:1": on_note}, **options)
    class Worker:
        pass

    status = 0
    try:
        Worker().launch()
        say("RETURNED")
    except PeerGone as exc:
        say(f"EXC PeerGone {exc.peer} {str(exc)!r}")
        status = EXIT_PEER_GONE
    except Error as exc:
        say(f"EXC {type(exc).__name__} {getattr(exc, 'peer', None)} {str(exc)!r}")
        status = EXIT_OTHER_ERROR
    for peer in sorted(seen):
        say(f"STATE {peer} {proxy.peer_state(peer)}")
    return status


def run_master(proxy: Proxy, args: argparse.Namespace) -> int:
    destinations = args.to.split(",") if args.to else list(proxy.peers.get("worker", []))
    if args.plan == "burst":
        # The first (slow) task to each worker, then the rest, then stop to all, and close at once.
        sent = 0
        for task in range(args.tasks):
            for destination in destinations:
                proxy.isend(SessionMessage(tag="task", source=proxy.name, destination=destination, payload=task))
                sent += 1
        if args.to:  # named destinations (maybe not expected, so not in proxy.peers): one stop each
            for destination in destinations:
                proxy.isend(SessionMessage(tag="stop", source=proxy.name, destination=destination,
                                           session_type=SessionType.NOTIFICATION))
                sent += 1
        else:
            sent += len(proxy.ibroadcast("worker", "stop", SessionType.NOTIFICATION))
        say(f"SENT {sent}")
    elif args.plan == "round":
        replies = proxy.scatter("task", SessionType.TASK, [(d, i) for i, d in enumerate(destinations)],
                                timeout=20)
        got = sorted((m.source, m.payload) for m in replies)
        want = sorted((d, ("done", d, i)) for i, d in enumerate(destinations))
        if got != want:
            say(f"ROUND BAD {got!r} != {want!r}")
            return 5
        say("ROUND OK")
        if args.stop:
            proxy.ibroadcast("worker", "stop", SessionType.NOTIFICATION)
            say("SENT stop")
    elif args.plan == "wait":
        sys.stdin.readline()  # the test says when (a line or EOF), or SIGKILLs this process first
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["worker", "master"])
    parser.add_argument("registry")
    parser.add_argument("group")
    parser.add_argument("name")
    parser.add_argument("--type")
    parser.add_argument("--expect")
    parser.add_argument("--join-timeout", type=float, default=20.0)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--orphan-after")
    parser.add_argument("--log-level")
    parser.add_argument("--slow-first", type=float, default=0.0)
    parser.add_argument("--reply", action="store_true")
    parser.add_argument("--reply-notes", action="store_true")
    parser.add_argument("--hook", action="store_true")
    parser.add_argument("--plan", choices=["burst", "round", "wait"], default="wait")
    parser.add_argument("--to", default="")
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--stop", action="store_true")
    args = parser.parse_args()
    if args.log_level:
        logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                            format="%(levelname)s %(name)s: %(message)s")
    expect = args.expect if args.expect is not None else ("master:1" if args.role == "worker" else "")

    say(f"STARTING {args.name}")
    liveness = make_liveness(args)
    proxy = Proxy(group_name=args.group, component_type=args.type or args.role, name=args.name,
                  registry=args.registry, expected_peers=parse_expect(expect),
                  timeouts=Timeouts(join=args.join_timeout), **({"liveness": liveness} if liveness else {}))
    try:
        say(f"READY {proxy.name}")
        try:
            status = run_worker(proxy, args) if args.role == "worker" else run_master(proxy, args)
        except PeerGone as exc:
            say(f"EXC PeerGone {exc.peer} {str(exc)!r}")
            status = EXIT_PEER_GONE
        except Error as exc:
            say(f"EXC {type(exc).__name__} {getattr(exc, 'peer', None)} {str(exc)!r}")
            status = EXIT_OTHER_ERROR
    finally:
        proxy.close()
    say("CLOSED")
    return status


if __name__ == "__main__":
    sys.exit(main())
