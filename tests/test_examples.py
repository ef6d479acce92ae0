"""The scripts under examples/ run as their docstrings say.

`python -m pytest` collects tests/ only (testpaths), so the engine example's tests are imported here and
collected as this module's own, and its documented command (`pytest examples/test_engine_example.py`) is
run once too.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MASTER_WORKER = EXAMPLES / "master_worker.py"
ENGINE_EXAMPLE = EXAMPLES / "test_engine_example.py"
RUN_TIMEOUT = 45.0


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"examples_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_engine_example = _load(ENGINE_EXAMPLE)
ENGINE_TESTS = sorted(name for name in vars(_engine_example) if name.startswith("test_"))
for _name in ENGINE_TESTS:  # collected here as tests/test_examples.py::test_engine_example_<name>
    globals()[f"test_engine_example_{_name[len('test_'):]}"] = getattr(_engine_example, _name)


def test_the_engine_example_has_tests():
    assert len(ENGINE_TESTS) >= 2


def test_the_engine_example_runs_with_its_documented_command():
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ENGINE_EXAMPLE)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=EXAMPLES.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(ENGINE_TESTS)} passed" in result.stdout


def run_master_worker(*args: str) -> subprocess.CompletedProcess[str]:
    # The script reaps its own worker processes (killing them in a finally); the deadline bounds the rest.
    return subprocess.run([sys.executable, str(MASTER_WORKER), *args], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def assert_fit(result: subprocess.CompletedProcess[str], workers: int, quorum: int) -> list[str]:
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stdout.splitlines()
    names = ", ".join(f"worker_{i + 1:03d}" for i in range(workers))
    assert re.fullmatch(rf"parameter server joined 'ps-[0-9a-f]{{8}}' with {workers} workers: {names}",
                        lines[1] if lines[0].startswith("embedded") else lines[0]), lines
    steps = [line for line in lines if line.startswith("step")]
    assert steps, lines
    for line in steps:
        assert re.fullmatch(rf"step +\d+: loss [\d.]+ from {quorum} of {workers} workers \(.*\)", line), line
    losses = [float(re.search(r"loss ([\d.]+)", line)[1]) for line in steps]
    assert losses[-1] < 1e-6 < losses[0]
    assert re.fullmatch(r"fit w=3\.0000 b=2\.0000 \(true w=3 b=2\) in 30 steps; \d+ stale gradients dropped; "
                        r"task sessions: \['complete'\]", lines[-2]), lines
    assert lines[-1] == "OK"
    return lines


@pytest.mark.timeout(60)
def test_master_worker_example_with_the_embedded_registry():
    result = run_master_worker("--workers", "2")
    lines = assert_fit(result, workers=2, quorum=2)  # 60% of 2 workers, rounded up, is both
    assert re.fullmatch(r"embedded registry at redis://127\.0\.0\.1:\d+", lines[0])
    assert "0 stale gradients dropped" in lines[-2]


@pytest.mark.timeout(60)
def test_master_worker_example_with_a_straggler_against_a_real_redis(redis_server):
    result = run_master_worker("--workers", "3", "--slow", "0.05", "--registry", redis_server.url)
    lines = assert_fit(result, workers=3, quorum=2)  # 60% of 3 is 2: the slow worker_003 never counts
    assert not lines[0].startswith("embedded")
    for line in lines:
        if line.startswith("step"):
            assert line.endswith("(worker_001, worker_002)"), line
    assert "30 stale gradients dropped" in lines[-2]  # each of worker_003's answers came too late


def test_master_worker_example_refuses_zero_workers():
    result = run_master_worker("--workers", "0")
    assert result.returncode == 2
    assert "--workers and --steps must be at least 1" in result.stderr
