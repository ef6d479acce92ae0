"""The `rallypoint` command line: check, draw and registry, in-process (fast) and as a real subprocess.

In-process tests call `rallypoint.cli.main([...])` and read what it printed with capsys; a few run
`python -m rallypoint ...` (and the installed `rallypoint` script) to cover the real entry points.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
import unicodedata
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from rallypoint import cli
from rallypoint.engine import load_spec

CLI_TIMEOUT = 30.0  # seconds for one `python -m rallypoint` run (imports included)
READY_TIMEOUT = 15.0  # seconds for `rallypoint registry` to answer PING
STOP_TIMEOUT = 5.0  # seconds for it to exit after SIGTERM

TASK = load_spec("task").session("task")

TWO_SESSIONS = """\
# two session types in one file
session ping {
    states sent, answered
    initial sent
    final answered
    sent -> answered on completed
}
session two_phase {
    states prepare, prepared, committed, aborted
    initial prepare
    final committed, aborted
    prepare -> prepared on received
    prepare, prepared -> committed on commit
    prepare, prepared -> aborted on abort
}
rule votes = worker:vote:100%
"""


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = CLI_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """`python -m rallypoint ARGS` in a subprocess, under a deadline."""
    return subprocess.run(
        [sys.executable, "-m", "rallypoint", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`rallypoint.cli.main(args)` in this process: (exit status, stdout, stderr)."""
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def assert_points_at(err: str, text_line: str, line: int, column: int) -> None:
    """stderr names `line, column` and shows `text_line` with a caret under that column."""
    assert f"line {line}, column {column}" in err, err
    lines = err.splitlines()
    assert text_line in lines, err
    caret = lines[lines.index(text_line) + 1]
    assert caret.rstrip() == " " * (column - 1) + "^", f"caret line {caret!r} in:\n{err}"


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


# ---------------------------------------------------------------------------------------------- check


@pytest.mark.parametrize(
    ("rule", "printed"),
    [
        ("worker:update:60%", "worker:update:60%"),
        ("worker:update:60% AND master:sync:1", "worker:update:60% AND master:sync:1"),
        ("worker:update:60% && master:sync:1", "worker:update:60% AND master:sync:1"),
        ("(worker_01:update:2 AND worker_02:update:3) OR worker_03:update:1",
         "worker_01:update:2 AND worker_02:update:3 OR worker_03:update:1"),
        ("worker_01:update:2 AND (worker_02:update:3 || worker_03:update:1)",
         "worker_01:update:2 AND (worker_02:update:3 OR worker_03:update:1)"),
        ("*:stop:1", "*:stop:1"),
        ("worker:*:100%", "worker:*:100%"),
    ],
)
def test_check_a_good_rule_prints_its_parsed_form(capsys, rule, printed):
    code, out, err = main(capsys, "check", rule)
    assert (code, err) == (0, "")
    first, second = out.splitlines()
    assert first == f"rule ok: {printed}"
    assert second.startswith("  ") and "Unit(source=" in second


def test_check_prints_the_ast_of_the_rule(capsys):
    code, out, _ = main(capsys, "check", "worker:update:60% AND master:sync:1")
    assert code == 0
    assert out.splitlines()[1] == (
        "  And(parts=(Unit(source='worker', tag='update', amount=60, percent=True), "
        "Unit(source='master', tag='sync', amount=1, percent=False)))"
    )


@pytest.mark.parametrize(
    ("rule", "column", "expected"),
    [
        ("worker:update:", 15, "expected one of: an amount (10 or 60%)"),
        ("worker:update:10 AND", 21, "expected one of: '(', '*', a name"),
        ("worker::1", 8, "expected one of: '*', a name"),
        ("(worker:a:1", 12, "expected one of: ')', AND, OR"),
        ("worker:a:1 master:b:1", 12, "expected one of: AND, OR, end of input"),
        ("worker:a:x", 10, "expected one of: an amount (10 or 60%)"),
        ("wor ker:a:1", 5, "expected one of: ':'"),
    ],
)
def test_check_a_bad_rule_says_where_and_what_was_expected(capsys, rule, column, expected):
    code, out, err = main(capsys, "check", rule)
    assert code == 1
    assert out == ""
    assert err.startswith("error: ")
    assert_points_at(err, rule, 1, column)
    assert expected in err.splitlines()


@pytest.mark.parametrize(
    ("rule", "column", "message"),
    [
        ("worker:a:0", 10, "amount 0 must be at least 1"),
        ("worker:a:0%", 10, "must be at least 1"),
        ("worker:a:101%", 10, "amount 101% is more than 100%"),
    ],
)
def test_check_an_impossible_amount_is_an_error_with_its_position(capsys, rule, column, message):
    code, out, err = main(capsys, "check", rule)
    assert (code, out) == (1, "")
    assert message in err
    assert_points_at(err, rule, 1, column)


def test_check_the_readme_example_output_exactly():
    result = run_cli("check", "worker:update:")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        "error: unexpected end of input at line 1, column 15\n"
        "worker:update:\n"
        "              ^\n"
        "expected one of: an amount (10 or 60%)\n"
    )


def test_check_a_good_rule_through_python_dash_m():
    result = run_cli("check", "worker:update:60% AND master:sync:1")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines()[0] == "rule ok: worker:update:60% AND master:sync:1"


def test_the_installed_console_script_runs():
    script = Path(sys.executable).with_name("rallypoint")
    if not script.exists():
        script_path = shutil.which("rallypoint")
        if script_path is None:
            pytest.skip("no `rallypoint` console script installed next to this Python")
        script = Path(script_path)
    result = subprocess.run([str(script), "check", "*:stop:1"], capture_output=True, text=True,
                            timeout=CLI_TIMEOUT)
    assert (result.returncode, result.stdout.splitlines()[0]) == (0, "rule ok: *:stop:1"), result.stderr


@pytest.mark.parametrize("name", ["task", "notification"])
def test_check_a_builtin_spec_by_name(capsys, name):
    code, out, err = main(capsys, "check", name)
    assert (code, err) == (0, ""), err
    compiled = load_spec(name).session(name)
    lines = out.splitlines()
    assert lines[0] == f"spec <builtin {name}>: ok"
    assert lines[1] == (
        f"  session {name}: states {', '.join(compiled.states)}; initial {compiled.initial}; "
        f"final {', '.join(compiled.finals)}; events {', '.join(compiled.events)}"
    )


def test_check_the_shipped_task_spec_file(capsys):
    path = Path(__file__).resolve().parents[2] / "specs" / "task.spec"
    code, out, err = main(capsys, "check", str(path))
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"spec {path}: ok",
        "  session task: states request, receive, complete, failed, expired; initial request; "
        "final complete, failed, expired; events received, completed, peer_lost, timeout",
    ]


def test_check_a_spec_file_with_sessions_and_rules(capsys, tmp_path):
    path = tmp_path / "mine.spec"
    path.write_text(TWO_SESSIONS)
    code, out, err = main(capsys, "check", str(path))
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"spec {path}: ok",
        "  session ping: states sent, answered; initial sent; final answered; events completed",
        "  session two_phase: states prepare, prepared, committed, aborted; initial prepare; "
        "final committed, aborted; events received, commit, abort",
        "  rule votes = worker:vote:100%",
    ]


def test_check_a_spec_file_given_by_relative_path(capsys, tmp_path, monkeypatch):
    (tmp_path / "mine.spec").write_text(TWO_SESSIONS)
    monkeypatch.chdir(tmp_path)
    code, out, _ = main(capsys, "check", "mine.spec")
    assert code == 0
    assert out.splitlines()[0] == "spec mine.spec: ok"


def test_check_spec_text(capsys):
    code, out, err = main(capsys, "check", TWO_SESSIONS)
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == "spec <string>: ok"
    assert "  rule votes = worker:vote:100%" in out.splitlines()


def test_check_a_one_line_rule_spec(capsys):
    code, out, err = main(capsys, "check", "rule done = master:done:1 OR worker:done:60%")
    assert (code, err) == (0, "")
    assert out.splitlines() == ["spec <string>: ok", "  rule done = master:done:1 OR worker:done:60%"]


def test_check_a_spec_with_a_syntax_error_says_where(capsys, tmp_path):
    path = write(tmp_path / "bad.spec", """\
        session s {
            states a, b
            initial a
            a -> b on
        }
        """)
    code, out, err = main(capsys, "check", str(path))
    assert (code, out) == (1, "")
    assert err.startswith(f"error: {path}: ")
    assert_points_at(err, "    a -> b on", 4, 14)
    assert "expected one of: a name" in err


def test_check_spec_text_with_a_syntax_error_on_a_later_line(capsys):
    text = "session s {\n    states a, b\n    initial a\n    a => b on go\n}\n"
    code, _, err = main(capsys, "check", text)
    assert code == 1
    assert "line 4, column 7" in err
    assert "expected" in err


@pytest.mark.parametrize(
    ("body", "message", "line", "column"),
    [
        ("    states a, b, c\n    initial a\n    final b\n    a -> b on go\n",
         "state 'c' is unreachable from initial state 'a'", 3, 18),
        ("    states a, b\n    initial a\n    final b\n    a -> zz on go\n",
         "transition on 'go' names unknown state 'zz' (states: a, b)", 6, 5),
        ("    states a, b\n    initial zz\n    a -> b on go\n", "zz", None, None),
    ],
    ids=["unreachable-state", "unknown-state", "unknown-initial"],
)
def test_check_a_spec_that_does_not_compile_says_where(capsys, tmp_path, body, message, line, column):
    path = tmp_path / "broken.spec"
    path.write_text("# a comment line first\nsession s {\n" + body + "}\n")
    code, out, err = main(capsys, "check", str(path))
    assert (code, out) == (1, "")
    assert err.startswith("error: ")
    assert message in err
    assert re.search(r"line \d+, column \d+", err), err
    if line is not None:
        assert f"line {line}, column {column}" in err


def test_check_a_spec_with_a_bad_rule_says_where(capsys, tmp_path):
    path = write(tmp_path / "rules.spec", """\
        rule fine = worker:update:1
        rule bad = worker:update:0
        """)
    code, _, err = main(capsys, "check", str(path))
    assert code == 1
    assert "amount 0 must be at least 1" in err
    assert "line 2, column" in err


def test_check_a_spec_defining_a_session_twice(capsys):
    text = "session s {\n    states a\n    initial a\n}\nsession s {\n    states a\n    initial a\n}\n"
    code, _, err = main(capsys, "check", text)
    assert code == 1
    assert "defined twice" in err and "line 5, column" in err


def test_check_a_missing_spec_file(capsys, tmp_path):
    code, out, err = main(capsys, "check", str(tmp_path / "nope.spec"))
    assert (code, out) == (1, "")
    assert err.startswith("error: ") and "nope.spec" in err


def test_check_a_bad_spec_through_python_dash_m(tmp_path):
    path = tmp_path / "broken.spec"
    path.write_text("session s {\n    states a, b, c\n    initial a\n    a -> b on go\n}\n")
    result = run_cli("check", str(path))
    assert result.returncode == 1
    assert "unreachable" in result.stderr and "line 2, column" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------ hostile arguments

def long_rule(length: int) -> str:
    """A well-formed rule of at least `length` characters: far too long to be a file name."""
    units, rule = 0, ""
    while len(rule) < length:
        units += 1
        rule = " OR ".join(f"worker_{i:04}:update:1" for i in range(units))
    return rule


def printable(text: str) -> bool:
    """No character a terminal would act on or hide: only line ends separate lines."""
    return all(unicodedata.category(c) not in ("Cc", "Cf", "Zl", "Zp") for c in text.replace("\n", ""))


def assert_one_clean_error(code: int, out: str, err: str) -> None:
    assert (code, out) == (1, ""), err
    assert err.startswith("error: ") and err.endswith("\n"), err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.splitlines()[0]]
    assert "Traceback" not in err
    assert printable(err), repr(err)


@pytest.mark.parametrize("length", [300, 5000])
def test_check_a_rule_too_long_to_be_a_path_is_parsed_as_a_rule(capsys, length):
    rule = long_rule(length)
    code, out, err = main(capsys, "check", rule)
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == f"rule ok: {rule}"


@pytest.mark.parametrize("length", [300, 5000])
def test_check_a_bad_rule_too_long_to_be_a_path_is_one_error(capsys, length):
    rule = long_rule(length) + " AND"
    assert len(rule) > length
    code, out, err = main(capsys, "check", rule)
    assert_one_clean_error(code, out, err)
    assert f"unexpected end of input at line 1, column {len(rule) + 1}" in err.splitlines()[0]


HOSTILE = {
    "terminal escapes": "worker:\x1b[2J\x1b]0;owned\x07update:1",
    "C1 control and DEL": "worker:up\x9b31m\x7fdate:1",
    "bidi override": "worker:update:1 AND \u202emaster:sync:1",
    "carriage return": "worker:update:1\rOK",
    "backspaces": "worker:\x08\x08\x08update:1",
}


@pytest.mark.parametrize("rule", HOSTILE.values(), ids=HOSTILE.keys())
def test_check_a_rule_with_control_characters_shows_them_escaped(capsys, rule):
    code, out, err = main(capsys, "check", rule)
    assert_one_clean_error(code, out, err)
    hostile = next(c for c in rule if unicodedata.category(c) in ("Cc", "Cf"))
    assert hostile.encode("unicode_escape").decode() in err  # shown, as \x1b, never acted on


def test_the_caret_still_points_at_the_bad_character_after_escapes(capsys):
    # A form feed and a tab are whitespace to the grammar; the BEL after them is the error.
    code, _, err = main(capsys, "check", "worker:\x0c\tx:\x07")
    assert code == 1
    lines = err.splitlines()
    shown = "worker:\\x0c\\tx:\\x07"
    assert lines[2] == " " * shown.index("\\x07") + "^" and lines[1] == shown, err


def test_check_a_rule_with_a_nul_is_one_error(capsys):
    code, out, err = main(capsys, "check", "worker:up\x00date:1")
    assert_one_clean_error(code, out, err)
    assert "\\x00" in err


@pytest.mark.parametrize("path", ["missing.spec", "missing/dir/file", "missing/dir/file.txt"])
def test_check_a_path_that_does_not_exist_is_one_error(capsys, tmp_path, path):
    target = str(tmp_path / path)
    code, out, err = main(capsys, "check", target)
    assert_one_clean_error(code, out, err)
    assert target in err.splitlines()[0]


@pytest.mark.parametrize("command", ["check", "draw"])
def test_a_directory_as_the_spec_is_one_error(capsys, tmp_path, command):
    code, out, err = main(capsys, command, str(tmp_path))
    assert_one_clean_error(code, out, err)
    assert err == f"error: {tmp_path} is a directory, not a spec file\n"


def test_a_spec_file_with_control_characters_is_shown_escaped(capsys, tmp_path):
    path = tmp_path / "evil.spec"
    path.write_text("session s {\n    states a, \x1b[31mb\n    initial a\n}\n")
    code, out, err = main(capsys, "check", str(path))
    assert_one_clean_error(code, out, err)
    assert "\\x1b" in err


def test_draw_to_a_folder_that_does_not_exist_is_one_error(capsys, tmp_path):
    code, out, err = main(capsys, "draw", "task", "-o", str(tmp_path / "no" / "such" / "task.md"))
    assert_one_clean_error(code, out, err)
    assert "No such file or directory" in err


@pytest.mark.parametrize("arg", [long_rule(5000) + " AND", "worker:\x1b[2Jupdate:", "/no/such/folder/x.spec"],
                         ids=["long", "escapes", "missing"])
def test_hostile_arguments_through_python_dash_m(arg):
    result = run_cli("check", arg)
    assert_one_clean_error(result.returncode, result.stdout, result.stderr)


def test_check_needs_a_target(capsys):
    with pytest.raises(SystemExit) as exc_info:
        cli.main(["check"])
    assert exc_info.value.code == 2
    assert "target" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- draw


def mermaid_edges(text: str) -> set[tuple[str, str, str]]:
    return {(m[1], m[3], m[2]) for m in re.finditer(r"^\s+(\w+) --> (\w+) : (\w+)$", text, re.M)}


def test_draw_task_to_stdout_is_a_fenced_mermaid_block(capsys):
    code, out, err = main(capsys, "draw", "task")
    assert (code, err) == (0, "")
    assert out.startswith("```mermaid\nstateDiagram-v2\n")
    assert out.endswith("```\n")
    assert f"    [*] --> {TASK.initial}" in out.splitlines()
    assert mermaid_edges(out) == set(TASK.edges())
    for final in TASK.finals:
        assert f"    {final} --> [*]" in out.splitlines()


def test_draw_to_markdown_file_has_every_state_and_event_of_task(capsys, tmp_path):
    target = tmp_path / "task.md"
    code, out, err = main(capsys, "draw", "task", "-o", str(target))
    assert (code, err) == (0, "")
    assert out == f"wrote {target}\n"
    text = target.read_text()
    assert text == f"```mermaid\n{TASK.to_mermaid()}```\n"
    states_drawn = set(re.findall(r"(\w+) -->", text)) | set(re.findall(r"--> (\w+)", text))
    assert set(TASK.states) <= states_drawn
    assert set(TASK.states) == {"request", "receive", "complete", "failed", "expired"}
    events_drawn = set(re.findall(r" : (\w+)$", text, re.M))
    assert events_drawn == set(TASK.events) == {"received", "completed", "peer_lost", "timeout"}


def test_draw_to_mmd_file_is_bare_mermaid(capsys, tmp_path):
    target = tmp_path / "task.mmd"
    code, _, _ = main(capsys, "draw", "task", "-o", str(target))
    assert code == 0
    text = target.read_text()
    assert text == TASK.to_mermaid()
    assert "```" not in text


def test_draw_a_spec_file_with_two_sessions_draws_both(capsys, tmp_path):
    path = tmp_path / "two.spec"
    path.write_text(TWO_SESSIONS)
    code, out, _ = main(capsys, "draw", str(path))
    assert code == 0
    assert out.count("```mermaid") == 2
    assert "sent --> answered : completed" in out
    assert "prepared --> committed : commit" in out


def test_draw_session_selects_one(capsys, tmp_path):
    path = tmp_path / "two.spec"
    path.write_text(TWO_SESSIONS)
    code, out, _ = main(capsys, "draw", str(path), "--session", "two_phase")
    assert code == 0
    assert out.count("```mermaid") == 1
    assert "prepare --> aborted : abort" in out
    assert "sent" not in out


def test_draw_an_unknown_session_is_an_error_naming_the_choices(capsys):
    code, out, err = main(capsys, "draw", "task", "--session", "nope")
    assert (code, out) == (1, "")
    assert err == "error: no session 'nope' in <builtin task>; it has task\n"


def test_draw_an_unknown_spec_is_an_error(capsys):
    code, out, err = main(capsys, "draw", "no_such_spec")
    assert (code, out) == (1, "")
    assert "no_such_spec" in err and "built-in" in err


def test_draw_a_spec_that_does_not_compile_is_an_error(capsys, tmp_path):
    path = tmp_path / "broken.spec"
    path.write_text("session s {\n    states a, b, c\n    initial a\n    a -> b on go\n}\n")
    code, out, err = main(capsys, "draw", str(path), "-o", str(tmp_path / "x.md"))
    assert (code, out) == (1, "")
    assert "unreachable" in err
    assert not (tmp_path / "x.md").exists()


def test_draw_to_stdout_through_python_dash_m():
    result = run_cli("draw", "task", "--session", "task")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"```mermaid\n{TASK.to_mermaid()}```\n"


def test_draw_svg_with_whatever_graphviz_this_machine_has(tmp_path):
    target = tmp_path / "task.svg"
    result = run_cli("draw", "task", "--session", "task", "-o", str(target))
    if shutil.which("dot") is None:
        assert result.returncode == 1
        assert "Graphviz" in result.stderr and "dot" in result.stderr
        assert not target.exists()
    else:
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"wrote {target}\n"
        svg = target.read_text()
        assert "<svg" in svg
        for name in (*TASK.states, *TASK.events):
            assert f">{name}<" in svg


def test_draw_svg_without_dot_says_to_install_graphviz(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: None)
    target = tmp_path / "task.svg"
    code, out, err = main(capsys, "draw", "task", "-o", str(target))
    assert (code, out) == (1, "")
    assert err.startswith("error: ")
    assert "Graphviz" in err and "`dot`" in err
    assert "-o FILE.md" in err  # and points at the way that needs nothing
    assert not target.exists()


def fake_dot(tmp_path: Path, body: str) -> str:
    """A `dot` stand-in: a script that saves its stdin and argv, then runs `body` (shell)."""
    script = tmp_path / "dot"
    script.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/dot.args\ncat > {tmp_path}/dot.stdin\n{body}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


@pytest.mark.parametrize("suffix", ["svg", "png", "pdf"])
def test_draw_image_hands_the_dot_source_to_graphviz(capsys, tmp_path, monkeypatch, suffix):
    dot = fake_dot(tmp_path, 'shift 1; shift 1; echo "<svg/>" > "$1"')  # -T<fmt> -o <file>
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: dot if name == "dot" else None)
    target = tmp_path / f"task.{suffix}"
    code, out, err = main(capsys, "draw", "task", "-o", str(target))
    assert (code, err) == (0, "")
    assert out == f"wrote {target}\n"
    assert (tmp_path / "dot.args").read_text().split() == [f"-T{suffix}", "-o", str(target)]
    assert (tmp_path / "dot.stdin").read_text() == TASK.to_dot()
    assert target.exists()


def test_draw_image_reports_a_failing_dot(capsys, tmp_path, monkeypatch):
    dot = fake_dot(tmp_path, 'echo "Error: syntax error in line 3" >&2; exit 1')
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: dot if name == "dot" else None)
    code, out, err = main(capsys, "draw", "task", "-o", str(tmp_path / "task.svg"))
    assert (code, out) == (1, "")
    assert err == "error: dot failed: Error: syntax error in line 3\n"


def test_draw_image_of_a_spec_with_two_sessions_needs_session(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: "/bin/false")
    path = tmp_path / "two.spec"
    path.write_text(TWO_SESSIONS)
    code, _, err = main(capsys, "draw", str(path), "-o", str(tmp_path / "x.svg"))
    assert code == 1
    assert "--session" in err


# ------------------------------------------------------------------------------------------- registry


def ping_client(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0, socket_connect_timeout=0.5,
                       retry=Retry(NoBackoff(), 0))


def wait_until_it_answers(proc: subprocess.Popen[str], port: int) -> redis.Redis:
    client = ping_client(port)
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            if client.ping():
                return client
        except redis.RedisError:
            pass
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"`rallypoint registry` exited with {proc.returncode} before serving: {err}")
        if time.monotonic() > deadline:
            raise AssertionError(f"`rallypoint registry` not answering PING on {port} in {READY_TIMEOUT}s")
        time.sleep(0.02)


@pytest.fixture
def spawn_registry():
    """Start `python -m rallypoint registry --port P` processes; every one is killed at teardown."""
    procs: list[subprocess.Popen[str]] = []

    def spawn(port: int) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rallypoint", "registry", "--port", str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=STOP_TIMEOUT)


def test_registry_serves_redis_and_stops_on_sigterm(spawn_registry):
    port = free_port()
    proc = spawn_registry(port)
    client = wait_until_it_answers(proc, port)
    try:
        assert client.set("rallypoint:test", "hello")
        assert client.get("rallypoint:test") == b"hello"
        assert client.hset("group", mapping={"a": "1", "b": "2"}) == 2
        assert client.hgetall("group") == {b"a": b"1", b"b": b"2"}
    finally:
        client.close()
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    out, err = proc.communicate(timeout=STOP_TIMEOUT)
    assert proc.returncode == 0, err
    assert time.monotonic() - started < STOP_TIMEOUT
    assert out == f"rallypoint registry serving redis://127.0.0.1:{port} (Ctrl-C to stop)\n"
    with pytest.raises(redis.ConnectionError):  # and the port is closed
        ping_client(port).ping()


def test_registry_stops_on_sigint_too(spawn_registry):
    port = free_port()
    proc = spawn_registry(port)
    wait_until_it_answers(proc, port).close()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=STOP_TIMEOUT)
    assert proc.returncode == 0


def test_registry_on_a_port_in_use_exits_1_with_a_clear_message(spawn_registry):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = spawn_registry(port)
        out, err = proc.communicate(timeout=CLI_TIMEOUT)
    assert proc.returncode == 1
    assert out == ""
    assert err.startswith(f"error: cannot serve on 127.0.0.1:{port}: ")
    assert "in use" in err
    assert "Traceback" not in err


def test_registry_on_a_port_in_use_in_process(capsys):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = main(capsys, "registry", "--port", str(port))
    assert (code, out) == (1, "")
    assert f"cannot serve on 127.0.0.1:{port}" in err and "in use" in err


def test_registry_rejects_a_port_out_of_range(capsys):
    code, _, err = main(capsys, "registry", "--port", "70000")
    assert code == 1
    assert err.startswith("error: ") and "70000" in err


def test_a_command_is_required(capsys):
    with pytest.raises(SystemExit) as exc_info:
        cli.main([])
    assert exc_info.value.code == 2
    assert "command" in capsys.readouterr().err
