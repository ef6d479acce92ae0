"""The `rallypoint` command: check rules and specs, draw session machines, serve a registry, run the demo.

    rallypoint check 'worker:update:60% AND master:sync:1'
    rallypoint check specs/task.spec
    rallypoint draw task -o task.md
    rallypoint registry --port 6380
    rallypoint demo --workers 4
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rallypoint.errors import ConfigError, Error, RegistryError

if TYPE_CHECKING:
    from rallypoint.engine import Spec

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
