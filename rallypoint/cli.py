"""The `rallypoint` command: check rules and specs, draw session machines, serve a registry, run the demo, and
watch a running group.

    rallypoint check 'worker:update:60% AND master:sync:1'
    rallypoint check specs/task.spec
    rallypoint draw task -o task.md
    rallypoint registry --port 6380
    rallypoint demo --workers 4
    rallypoint peers my-job --registry redis://127.0.0.1:6379
    rallypoint monitor my-job [--once | --json]
    rallypoint metrics my-job --port 9464
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import unicodedata
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rallypoint.errors import ConfigError, Error, RegistryError

if TYPE_CHECKING:
    from rich.console import RenderableType

    from rallypoint.engine import Spec
    from rallypoint.proxy._observe import GroupView, Rates, Watcher
    from rallypoint.proxy._registry import Registry

# ---- errors: one `error:` line, then context, with nothing from the input able to drive the terminal ----

_HIDDEN = frozenset({"Cc", "Cf", "Zl", "Zp"})  # control, format (bidi, zero-width), line/paragraph breaks
_CARET = re.compile(r"( *)\^")


def _escape(text: str) -> str:
    """`text` with every control or invisible formatting character written as its escape (`\\x1b`)."""
    return "".join(c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) in _HIDDEN else c
                   for c in text)


def _caret_under(raw: str, width: int) -> int:
    """Where a caret drawn `width` columns into `raw` (tabs expanded) goes once `raw` is escaped."""
    drawn = escaped = 0
    for char in raw:
        if drawn >= width:
            break
        drawn = (drawn // 8 + 1) * 8 if char == "\t" else drawn + 1
        escaped += len(_escape(char))
    return escaped


def _report(message: str) -> None:
    """Print `message` as `error: <first line>` and its context lines, escaped; carets follow the escapes."""
    lines = message.split("\n")
    shown = ["error: " + _escape(lines[0])]
    for previous, line in itertools.pairwise(lines):
        caret = _CARET.fullmatch(line)
        shown.append(" " * _caret_under(previous, len(caret.group(1))) + "^" if caret else _escape(line))
    print("\n".join(shown), file=sys.stderr)


def _fail(message: str, status: int = 1) -> int:
    _report(message)
    return status


# ---- check and draw ------------------------------------------------------------------------------------


def _looks_like_spec(arg: str) -> bool:
    """Spec text, an existing path, a built-in spec name (`task`), a one-line spec (`rule x = ...`), or
    path-like (`x.spec`, or a `/` without the `:` every rule has); anything else is a rule.

    `os.path.exists` answers False for what cannot be a path (too long, a NUL) instead of raising.
    """
    from rallypoint.engine import builtin_spec_names

    return ("{" in arg or "\n" in arg or "=" in arg or os.path.exists(arg) or arg.endswith(".spec")
            or (os.sep in arg and ":" not in arg) or arg in builtin_spec_names())


def _load(target: str) -> Spec:
    from rallypoint.engine import load_spec

    if os.path.isdir(target):
        raise ConfigError(f"{target} is a directory, not a spec file")
    return load_spec(target)


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a rule expression or a spec file; print its parsed form (errors go to `main`)."""
    from rallypoint.grammar import parse_rule

    target: str = args.target
    if _looks_like_spec(target):
        spec = _load(target)
        print(f"spec {spec.origin}: ok")
        for name, compiled in spec.session_types.items():
            print(f"  session {name}: states {', '.join(compiled.states)}; initial {compiled.initial}; "
                  f"final {', '.join(compiled.finals) or '-'}; events {', '.join(compiled.events)}")
        for name, expr in spec.rules.items():
            print(f"  rule {name} = {expr}")
    else:
        expr = parse_rule(target)
        print(f"rule ok: {expr}")
        print(f"  {expr!r}")
    return 0


def cmd_draw(args: argparse.Namespace) -> int:
    """Draw a session type's state machine: Mermaid text (.md/.mmd or stdout), or SVG/PNG via Graphviz."""
    spec = _load(args.spec)
    names = [args.session] if args.session else list(spec.session_types)
    unknown = [n for n in names if n not in spec.session_types]
    if unknown:
        return _fail(f"no session {unknown[0]!r} in {spec.origin}; it has {', '.join(spec.session_types)}")
    out: Path | None = Path(args.output) if args.output else None
    suffix = out.suffix.lower() if out else ".md"
    if suffix in (".svg", ".png", ".pdf"):
        if len(names) != 1:
            return _fail("an image holds one session type; pick one with --session")
        dot = shutil.which("dot")
        if dot is None:
            return _fail("drawing SVG/PNG needs Graphviz's `dot` program (Debian: apt-get install graphviz); "
                         "Mermaid text needs nothing: use -o FILE.md")
        assert out is not None
        source = spec.session_types[names[0]].to_dot()
        result = subprocess.run([dot, f"-T{suffix[1:]}", "-o", str(out)], input=source.encode(),
                                capture_output=True, timeout=60)
        if result.returncode != 0:
            return _fail(f"dot failed: {result.stderr.decode(errors='replace').strip()}")
        print(f"wrote {out}")
        return 0
    text = "\n\n".join(
        f"```mermaid\n{spec.session_types[n].to_mermaid().rstrip()}\n```" if suffix == ".md"
        else spec.session_types[n].to_mermaid().rstrip()
        for n in names
    ) + "\n"
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
        print(f"wrote {out}")
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    """Serve the embedded Redis-protocol registry in the foreground until SIGINT/SIGTERM."""
    from rallypoint.proxy._embedded import EmbeddedRegistryServer

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with EmbeddedRegistryServer(host=args.host, port=args.port) as server:
            print(f"rallypoint registry serving {server.url} (Ctrl-C to stop)", flush=True)
            stop.wait()
    except (OSError, RegistryError) as exc:
        return _fail(f"cannot serve on {args.host}:{args.port}: {exc}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run a master and N worker processes through a real job and check the result."""
    from rallypoint._demo import demo

    if args.workers < 1:
        return _fail(f"--workers must be at least 1, not {args.workers}", status=2)  # a usage error, as argparse's
    if args.numbers < 0:
        return _fail(f"--numbers must be at least 0, not {args.numbers}", status=2)
    return demo(args.workers, args.numbers, args.registry, args.timeout, say=lambda s: print(s, flush=True))


# ---- watching a group: peers, monitor, metrics -----------------------------------------------------------


def _open_registry(url: str | None) -> Registry:
    """The registry at `url`, else `$RALLYPOINT_REGISTRY`, else a local Redis (as `Proxy` finds it)."""
    from rallypoint.proxy._registry import registry_from

    return registry_from(url)


def _where(registry: Registry) -> str:
    return str(getattr(registry, "redacted_url", registry))


def _no_group(group: str, registry: Registry) -> str:
    from rallypoint.proxy._observe import STATS_LINGER

    return (f"no group {group!r} in registry {_where(registry)}: no member is listed and none left or went in the "
            f"last {STATS_LINGER:.0f}s")


def _columns(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain text columns, left-aligned, two spaces apart; every cell escaped."""
    cells = [list(header)] + [[_escape(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def _counts(view: GroupView) -> str:
    states = [row.state for row in view.rows]
    return ", ".join(f"{states.count(state)} {state}" for state in ("up", "left", "gone") if state in states)


def cmd_peers(args: argparse.Namespace) -> int:
    """Print the members of a group: name, type, address, incarnation, up since, lease left, state."""
    from rallypoint.proxy._observe import read_group

    registry = _open_registry(args.registry)
    try:
        view = read_group(registry, args.group)
        if not view.rows:
            return _fail(_no_group(args.group, registry))
        rows = []
        for row in view.rows:
            since = "-"
            if row.started_at is not None:
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row.started_at))
            lease = f"{row.lease_left:.1f}s" if row.lease_left is not None else "-"
            rows.append((row.name, row.type, row.address or "-", row.incarnation, since, lease, row.state))
        print(_columns(("NAME", "TYPE", "ADDRESS", "INCARNATION", "UP SINCE", "LEASE LEFT", "STATE"), rows))
        return 0
    finally:
        registry.close()


def _stop_on_signals() -> tuple[threading.Event, dict[int, Any]]:
    """An event SIGINT and SIGTERM set, and the handlers they had (to put back)."""
    stop = threading.Event()
    previous: dict[int, Any] = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT,
                                                                                          signal.SIGTERM)}
    return stop, previous


def _restore(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _rates(watcher: Watcher, view: GroupView) -> dict[str, Rates]:
    return {row.name: rate for row in view.rows if (rate := watcher.rates(row.name)) is not None}


def cmd_monitor(args: argparse.Namespace) -> int:
    """Watch a group: a live table refreshed every `--interval` seconds, or one snapshot (`--once`, `--json`)."""
    from rallypoint.proxy._observe import Watcher, snapshot_json, table

    if not args.interval > 0:
        return _fail(f"--interval must be a positive number of seconds, not {args.interval}", status=2)
    registry = _open_registry(args.registry)
    try:
        watcher = Watcher(registry, args.group)
        view = watcher.poll()
        if not view.rows:
            return _fail(_no_group(args.group, registry))
        if args.json:
            print(json.dumps(snapshot_json(view, _where(registry)), indent=2))
            return 0
        if args.once:
            stamp = time.strftime("%H:%M:%S", time.localtime(view.at))
            print(_escape(f"group {args.group} at {_where(registry)}, {stamp}: {_counts(view)}"))
            print(_columns(*table(view)))
            return 0
        return _monitor_live(watcher, view, args.interval)
    finally:
        registry.close()


def _monitor_live(watcher: Watcher, view: GroupView, interval: float) -> int:
    from rich.console import Console
    from rich.live import Live

    stop, previous = _stop_on_signals()
    error = ""
    try:
        with Live(_render(watcher, view, error), console=Console(), refresh_per_second=4) as live:
            while not stop.wait(interval):
                try:
                    view, error = watcher.poll(), ""
                except RegistryError as exc:  # keep showing the last view; say why it is not current
                    error = str(exc)
                live.update(_render(watcher, view, error))
    finally:
        _restore(previous)
    return 0


_STATE_STYLES = {"up": "green", "left": "yellow", "gone": "bold red"}
_ALERT_COLUMNS = {"HELD": "bold yellow", "BUFFERED": "yellow", "DROPPED": "bold red", "FAILED": "red"}


def _render(watcher: Watcher, view: GroupView, error: str) -> RenderableType:
    """The live monitor's table: states in colour, non-zero drops, held, buffered and failed counts
    highlighted, members that left or are gone dimmed."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from rallypoint.proxy._observe import table

    stamp = time.strftime("%H:%M:%S", time.localtime(view.at))
    title = Text(_escape(f"rallypoint monitor: group {view.group}, {_counts(view)}, {stamp}"), style="bold")
    grid = Table(show_edge=False, pad_edge=False, header_style="bold")
    columns, rows = table(view, _rates(watcher, view))
    for column in columns:
        grid.add_column(column, justify="left" if column in ("NAME", "TYPE", "STATE") else "right", no_wrap=True)
    for row, cells in zip(view.rows, rows, strict=True):
        styled = []
        for column, cell in zip(columns, cells, strict=True):
            style = ""
            if column == "STATE":
                style = _STATE_STYLES.get(cell, "")
            elif column in _ALERT_COLUMNS and cell not in ("0", "-"):
                style = _ALERT_COLUMNS[column]
            styled.append(Text(_escape(cell), style=style))  # Text: a name is never read as markup
        grid.add_row(*styled, style="dim" if row.state != "up" else "")
    parts: list[RenderableType] = [title, grid]
    if error:
        parts.append(Text(_escape(f"registry unreachable, showing the last view: {error}"), style="bold red"))
    return Group(*parts)


def _collector(registry: Registry, group: str) -> Any:
    """A prometheus_client collector that reads the group at each scrape."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from rallypoint.proxy._observe import GroupView, metrics, read_group

    log = logging.getLogger("rallypoint.cli")

    class GroupCollector:
        def collect(self) -> Iterator[Any]:
            try:
                view, reachable = read_group(registry, group), 1.0
            except RegistryError as exc:
                log.warning("%s", exc)
                view, reachable = GroupView(group=group, at=time.time()), 0.0
            up = GaugeMetricFamily("rallypoint_registry_up", "1 when the last scrape could read the registry.",
                                   labels=["group"])
            up.add_metric([group], reachable)
            yield up
            for metric in metrics(view):
                family = (CounterMetricFamily if metric.kind == "counter" else GaugeMetricFamily)(
                    metric.name, metric.help, labels=list(metric.labels))
                for values, value in metric.samples:
                    family.add_metric(list(values), value)
                yield family

    return GroupCollector()


def cmd_metrics(args: argparse.Namespace) -> int:
    """Serve the group's metrics for Prometheus on `--host`:`--port` until SIGINT/SIGTERM."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        return _fail("rallypoint metrics needs prometheus_client: pip install 'rallypoint[metrics]'")
    from rallypoint.proxy._observe import read_group

    registry = _open_registry(args.registry)
    try:
        read_group(registry, args.group)  # a wrong URL or a dead registry fails here, not at the first scrape
        collectors = CollectorRegistry(auto_describe=False)
        collectors.register(_collector(registry, args.group))
        stop, previous = _stop_on_signals()
        try:
            try:
                server, thread = start_http_server(args.port, addr=args.host, registry=collectors)
            except OSError as exc:
                return _fail(f"cannot serve on {args.host}:{args.port}: {exc}")
            print(_escape(f"serving http://{args.host}:{server.server_port}/metrics for group {args.group} "
                          f"from {_where(registry)} (Ctrl-C to stop)"), flush=True)
            stop.wait()
            server.shutdown()
            server.server_close()
            thread.join(5)
        finally:
            _restore(previous)
        return 0
    finally:
        registry.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rallypoint", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="validate a rule expression or a spec file")
    check.add_argument("target", help="a rule such as 'worker:update:60%%', or a spec file path or text")
    check.set_defaults(func=cmd_check)

    draw = sub.add_parser("draw", help="draw a session type's state machine")
    draw.add_argument("spec", help="a spec file, or a built-in name such as 'task'")
    draw.add_argument("--session", help="which session type in the spec (default: all)")
    draw.add_argument("-o", "--output", help="FILE.md / FILE.mmd (Mermaid), FILE.svg / FILE.png (Graphviz)")
    draw.set_defaults(func=cmd_draw)

    registry = sub.add_parser("registry", help="serve an embedded registry (for machines with no Redis)")
    registry.add_argument("--host", default="127.0.0.1")
    registry.add_argument("--port", type=int, default=6379)
    registry.set_defaults(func=cmd_registry)

    demo = sub.add_parser("demo", help="run a real master/worker job on this machine")
    demo.add_argument("--workers", type=int, default=4)
    demo.add_argument("--numbers", type=int, default=10_000, help="sum the numbers 1..N")
    demo.add_argument("--registry", help="a registry URL such as redis://127.0.0.1:6379 (default: embedded)")
    demo.add_argument("--timeout", type=float, default=60.0, help="seconds for joining and for the job")
    demo.set_defaults(func=cmd_demo)

    where = "a registry URL (default: $RALLYPOINT_REGISTRY, else redis://localhost:6379/0)"
    peers = sub.add_parser("peers", help="list the members of a running group")
    peers.add_argument("group")
    peers.add_argument("--registry", help=where)
    peers.set_defaults(func=cmd_peers)

    monitor = sub.add_parser("monitor", help="watch a running group: members, states, rates, drops, held")
    monitor.add_argument("group")
    monitor.add_argument("--registry", help=where)
    shown = monitor.add_mutually_exclusive_group()
    shown.add_argument("--once", action="store_true", help="print one snapshot as plain text and exit")
    shown.add_argument("--json", action="store_true", help="print one snapshot as JSON and exit")
    monitor.add_argument("--interval", type=float, default=1.0, help="seconds between two refreshes (default 1)")
    monitor.set_defaults(func=cmd_monitor)

    metrics = sub.add_parser("metrics", help="serve a group's metrics for Prometheus (needs rallypoint[metrics])")
    metrics.add_argument("group")
    metrics.add_argument("--port", type=int, required=True)
    metrics.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)")
    metrics.add_argument("--registry", help=where)
    metrics.set_defaults(func=cmd_metrics)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every failure is `error: ...` plus context on stderr and status 1, no traceback."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (Error, OSError, subprocess.SubprocessError) as exc:  # OSError: files; SubprocessError: `dot`
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
