"""Every example in README.md runs as written and prints what README says it prints.

- ```python blocks run in a fresh interpreter; a `print(x)  # shown` line says what it prints, and the output
  must match those comments in order.
- A `# worker.py` block and a `# master.py` block are a pair: both run as processes against a real registry
  (the `redis_server` fixture, passed as RALLYPOINT_REGISTRY, the Proxy's default registry).
- Commands in ```bash and plain ``` blocks are classified in COMMANDS: each is run (on a free port where
  it serves one) or skipped for a stated reason; a command nobody classified fails the test. A `$ command`
  block shows output that must be exactly what the program prints. The demo's sample output is matched
  line by line, modulo what varies between runs (port, group id, timings, which workers make the quorum).
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUN_TIMEOUT = 30.0  # seconds for one example or command
PAIR_TIMEOUT = 30.0  # seconds for the worker.py / master.py pair


@dataclass(frozen=True)
class Block:
    lang: str
    text: str
    line: int  # 1-based line of the opening fence in README.md

    @property
    def first_line(self) -> str:
        return self.text.splitlines()[0] if self.text else ""


def readme_blocks() -> list[Block]:
    blocks: list[Block] = []
    lang: str | None = None
    start = 0
    body: list[str] = []
    for number, line in enumerate(README.read_text().splitlines(), 1):
        fence = re.match(r"^```(\S*)\s*$", line)
        if lang is None and fence:
            lang, start, body = fence[1], number, []
        elif lang is not None and line.rstrip() == "```":
            blocks.append(Block(lang, "\n".join(body) + "\n", start))
            lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, f"README.md: unclosed ``` fence opened at line {start}"
    return blocks


BLOCKS = readme_blocks()
PYTHON = [b for b in BLOCKS if b.lang == "python"]
PAIR_MARK = re.compile(r"^# (worker|master)\.py\s*$")
SELF_CONTAINED = [b for b in PYTHON if not PAIR_MARK.match(b.first_line)]
PAIR = {PAIR_MARK.match(b.first_line)[1]: b for b in PYTHON if PAIR_MARK.match(b.first_line)}


def expected_prints(code: str) -> list[str]:
    """What `print(...)  # shown` lines say the block prints, in order."""
    return [m[1].rstrip() for m in re.finditer(r"^\s*print\(.*\)\s+# (.*)$", code, re.M)]


def run_python_file(path: Path, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=RUN_TIMEOUT,
                          cwd=cwd, env=env)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RALLYPOINT_REGISTRY"}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def test_readme_has_the_examples_this_file_knows_about():
    assert len(SELF_CONTAINED) >= 3, [b.first_line for b in PYTHON]
    assert set(PAIR) == {"worker", "master"}, "a `# worker.py` block needs its `# master.py` and back"
    assert PYTHON.index(PAIR["worker"]) < PYTHON.index(PAIR["master"])


@pytest.mark.parametrize("block", SELF_CONTAINED, ids=lambda b: f"line{b.line}")
def test_python_example_runs_and_prints_what_readme_says(block, tmp_path):
    script = tmp_path / f"readme_line{block.line}.py"
    script.write_text(block.text)
    result = run_python_file(script, tmp_path, clean_env())
    assert result.returncode == 0, f"README.md line {block.line}:\n{block.text}\n{result.stderr}"
    assert result.stdout.splitlines() == expected_prints(block.text), f"README.md line {block.line}"


@pytest.mark.timeout(60)
def test_master_and_worker_pair_runs_as_two_processes(redis_server, tmp_path):
    worker_py = tmp_path / "worker.py"
    master_py = tmp_path / "master.py"
    worker_py.write_text(PAIR["worker"].text)
    master_py.write_text(PAIR["master"].text)
    env = clean_env(RALLYPOINT_REGISTRY=redis_server.url)
    worker = subprocess.Popen([sys.executable, str(worker_py)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        master = subprocess.run([sys.executable, str(master_py)], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=PAIR_TIMEOUT)
        worker_out, worker_err = worker.communicate(timeout=PAIR_TIMEOUT)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert master.returncode == 0, master.stderr
    expected = expected_prints(PAIR["master"].text)
    assert expected == ["[2, 4, 6]", "complete"]
    assert master.stdout.splitlines() == expected
    assert worker.returncode == 0, worker_err
    assert worker_out == ""


# ---------------------------------------------------------------------------------------- commands

SKIPPED = {
    "pip install": "installs the package: the test run already has it installed",
    "python -m pytest": "is this test suite",
}


def command_lines(block: Block) -> list[tuple[str, bool]]:
    """(command, shows_output) for each command of a bash or plain block; plain blocks without `$` or
    `rallypoint`/`pip`/`python` lines are sample output, not commands."""
    commands = []
    for line in block.text.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:], True))
        elif block.lang in ("bash", "") and re.match(r"^(rallypoint|pip|python) ", line):
            commands.append((line, False))
    return commands


ALL_COMMANDS = [(cmd, shows, block) for block in BLOCKS for cmd, shows in command_lines(block)]


def classify(command: str) -> str:
    argv = shlex.split(command, comments=True)
    for prefix, _ in SKIPPED.items():
        if command.startswith(prefix):
            return "skip"
    if argv[:1] == ["rallypoint"] and len(argv) > 1 and argv[1] in ("check", "draw", "demo", "registry"):
        return argv[1]
    return "unknown"


def test_readme_commands_are_all_known():
    assert len(ALL_COMMANDS) >= 8, ALL_COMMANDS
    unknown = [cmd for cmd, _, _ in ALL_COMMANDS if classify(cmd) == "unknown"]
    assert not unknown, f"README commands test_readme.py neither runs nor skips: {unknown}"


def output_after(block: Block, command: str) -> str:
    """The lines shown after `$ command` in `block`, up to the next `$` line."""
    lines = block.text.splitlines()
    start = lines.index(f"$ {command}") + 1
    shown = []
    for line in lines[start:]:
        if line.startswith("$ "):
            break
        shown.append(line)
    return "\n".join(shown) + "\n"


@pytest.fixture
def workdir(tmp_path):
    """A directory where README's relative paths (specs/task.spec) resolve, and files may be written."""
    shutil.copytree(ROOT / "specs", tmp_path / "specs")
    return tmp_path


def rallypoint(argv: list[str], cwd: Path, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rallypoint", *argv[1:]], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=clean_env())


CHECK_AND_DRAW = [(c, shows, b) for c, shows, b in ALL_COMMANDS if classify(c) in ("check", "draw")]


def command_id(command: str) -> str:
    return shlex.join(shlex.split(command, comments=True))


@pytest.mark.parametrize(
    ("command", "shows", "block"), CHECK_AND_DRAW, ids=[command_id(c) for c, _, _ in CHECK_AND_DRAW]
)
def test_check_and_draw_commands_do_what_readme_says(command, shows, block, workdir):
    argv = shlex.split(command, comments=True)
    result = rallypoint(argv, workdir)
    if shows:
        assert result.stdout + result.stderr == output_after(block, command), f"README.md line {block.line}"
        return
    output = argv[argv.index("-o") + 1] if "-o" in argv else None
    if output and output.endswith((".svg", ".png", ".pdf")) and shutil.which("dot") is None:
        # README: "via Graphviz `dot`, when installed"; without it the error says what to install.
        assert result.returncode == 1 and "Graphviz" in result.stderr, result.stderr
        return
    assert result.returncode == 0, result.stderr
    if argv[1] == "check":
        assert "states" in result.stdout and "events" in result.stdout
    if output:
        assert result.stdout == f"wrote {output}\n"
        text = (workdir / output).read_text()
        if output.endswith(".md"):
            assert text.startswith("```mermaid\nstateDiagram-v2\n")
        elif output.endswith(".svg"):
            assert "<svg" in text


REGISTRY = [cmd for cmd, _, _ in ALL_COMMANDS if classify(cmd) == "registry"]


@pytest.mark.parametrize("command", REGISTRY, ids=command_id)
def test_registry_command_serves_until_sigterm(command, workdir):
    # The same command on a free port instead of the one in README (which may be taken on this machine).
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = shlex.split(command, comments=True)
    argv[argv.index("--port") + 1] = str(port)
    proc = subprocess.Popen([sys.executable, "-m", "rallypoint", *argv[1:]], cwd=workdir, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = redis.Redis(port=port, socket_timeout=1.0, socket_connect_timeout=0.5)
    try:
        deadline = time.monotonic() + 15.0
        while True:
            try:
                assert client.ping()
                break
            except redis.RedisError:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "registry did not answer PING in 15s"
                time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=5.0)
        assert proc.returncode == 0
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# --------------------------------------------------------------------------------------------- demo

VARYING = [  # (pattern in README's sample output, what it stands for in a real run)
    (r"redis://127\.0\.0\.1:\d+", r"redis://127\.0\.0\.1:\d+"),
    (r"'demo-[0-9a-f]{8}'", r"'demo-[0-9a-f]{8}'"),
    (r"\b\d+\.\d+s\b", r"\d+\.\d+s"),
    (r"partial sum \d+", r"partial sum \d+"),
]


def line_pattern(shown: str) -> str:
    """A regex for a line of sample output: literal, except the parts that vary from run to run."""
    pieces, last = [], 0
    for m in sorted((m for pat, _ in VARYING for m in re.finditer(pat, shown)), key=lambda m: m.start()):
        pattern = next(rep for pat, rep in VARYING if re.fullmatch(pat, m[0]))
        pieces += [re.escape(shown[last:m.start()]), pattern]
        last = m.end()
    return "".join(pieces) + re.escape(shown[last:])


def demo_sample() -> tuple[str, list[str]]:
    """README's demo command and the sample output block that follows it."""
    index = next(i for i, b in enumerate(BLOCKS) for cmd, _ in command_lines(b) if classify(cmd) == "demo")
    [command] = [cmd for cmd, _ in command_lines(BLOCKS[index]) if classify(cmd) == "demo"]
    sample = BLOCKS[index + 1]
    assert sample.lang == "" and "OK in" in sample.text, "the demo command is followed by its sample output"
    return command, sample.text.splitlines()


def chunk_sums(workers: int, numbers: int) -> dict[str, int]:
    values = range(1, numbers + 1)
    return {f"worker_{i + 1:03d}": sum(values[i::workers]) for i in range(workers)}


def test_demo_sample_output_is_consistent_with_itself():
    command, sample = demo_sample()
    argv = shlex.split(command, comments=True)
    workers = int(argv[argv.index("--workers") + 1]) if "--workers" in argv else 4
    numbers = 10_000
    sums = chunk_sums(workers, numbers)
    total = numbers * (numbers + 1) // 2
    for line in sample:
        if m := re.fullmatch(r"  (worker_\d+) -> (\d+)", line):
            assert sums[m[1]] == int(m[2]), f"README shows {line.strip()!r}, the demo prints {sums[m[1]]}"
        if m := re.fullmatch(r"60% quorum: (\d+) of (\d+) workers reported \(partial sum (\d+)\)", line):
            quorum = -(-60 * workers // 100)
            assert (int(m[1]), int(m[2])) == (quorum, workers)
            possible = {sum(c) for c in itertools.combinations(sums.values(), quorum)}
            assert int(m[3]) in possible, f"README's partial sum {m[3]} is no sum of {quorum} chunks"
        if m := re.fullmatch(r"total (\d+) \(expected (\d+)\).*", line):
            assert int(m[1]) == int(m[2]) == total
    assert f"started {workers} worker processes" in sample
    assert f"scattered {numbers} numbers in {workers} chunks" in sample


@pytest.mark.timeout(60)
def test_demo_prints_what_readme_shows(workdir):
    command, sample = demo_sample()
    argv = shlex.split(command, comments=True)
    result = rallypoint(argv, workdir, timeout=45.0)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    # Replies (and the quorum line among them) come in whatever order the workers finish: anywhere.
    anywhere = [s for s in sample if re.match(r"  worker_\d+ -> |60% quorum", s)]
    in_order = [s for s in sample if s not in anywhere and s.strip() != "..."]
    for shown in anywhere:
        assert any(re.fullmatch(line_pattern(shown), line) for line in lines), (shown, lines)
    position = 0
    for shown in in_order:
        pattern = line_pattern(shown)
        while position < len(lines) and not re.fullmatch(pattern, lines[position]):
            position += 1
        assert position < len(lines), f"README's demo line {shown!r} not printed in order:\n{result.stdout}"
        position += 1


def test_readme_links_to_files_that_exist():
    for target in re.findall(r"\]\(([^)#:]+)\)", README.read_text()):
        assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"
