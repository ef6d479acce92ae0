"""`rallypoint demo`: a real master and worker processes, with the embedded registry or a real Redis."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from rallypoint import cli

DEMO_TIMEOUT = 45.0  # seconds for a whole demo run; the demo itself takes a few


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m rallypoint demo ARGS`, under a deadline (the demo reaps its own workers)."""
    return subprocess.run(
        [sys.executable, "-m", "rallypoint", "demo", "--timeout", "20", *args],
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def chunk_sums(workers: int, numbers: int) -> dict[str, int]:
    """What each worker must report: the demo deals 1..numbers round-robin to worker_001, worker_002, ..."""
    values = range(1, numbers + 1)
    return {f"worker_{i + 1:03d}": sum(values[i::workers]) for i in range(workers)}


def assert_demo_ok(result: subprocess.CompletedProcess[str], workers: int, numbers: int) -> list[str]:
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    lines = result.stdout.splitlines()
    names = ", ".join(f"worker_{i + 1:03d}" for i in range(workers))
    assert f"started {workers} worker processes" in lines
    assert any(re.fullmatch(rf"master joined 'demo-[0-9a-f]{{8}}' with {workers} workers in [\d.]+s: {names}",
                            line) for line in lines), lines
    assert f"scattered {numbers} numbers in {workers} chunks" in lines
    reported = dict(re.findall(r"^  (worker_\d{3}) -> (\d+)$", result.stdout, re.M))
    assert {name: int(total) for name, total in reported.items()} == chunk_sums(workers, numbers)
    expected = numbers * (numbers + 1) // 2
    assert f"total {expected} (expected {expected}); task sessions: ['complete']" in lines
    assert re.fullmatch(r"OK in [\d.]+s", lines[-1]), lines
    assert "FAILED" not in result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    return lines


@pytest.mark.timeout(60)
def test_demo_with_the_embedded_registry():
    result = run_demo("--workers", "3", "--numbers", "1000")
    lines = assert_demo_ok(result, workers=3, numbers=1000)
    assert re.fullmatch(r"embedded registry at redis://127\.0\.0\.1:\d+", lines[0]), lines
    # 60% of 3 workers is a quorum of 2: the progress line reports exactly 2 of the 3 chunk sums.
    [quorum] = [line for line in lines if line.startswith("60% quorum")]
    match = re.fullmatch(r"60% quorum: 2 of 3 workers reported \(partial sum (\d+)\)", quorum)
    assert match, quorum
    sums = sorted(chunk_sums(3, 1000).values())
    assert int(match[1]) in {a + b for i, a in enumerate(sums) for b in sums[i + 1:]}
    assert "500500" in result.stdout


@pytest.mark.timeout(60)
def test_demo_with_a_real_redis(redis_server):
    result = run_demo("--workers", "2", "--numbers", "100", "--registry", redis_server.url)
    lines = assert_demo_ok(result, workers=2, numbers=100)
    assert not any(line.startswith("embedded registry") for line in lines)
    assert "total 5050 (expected 5050); task sessions: ['complete']" in lines


@pytest.mark.timeout(60)
def test_demo_with_one_worker_and_fewer_numbers_than_workers():
    result = run_demo("--workers", "3", "--numbers", "2")  # one worker gets an empty chunk and sums to 0
    assert_demo_ok(result, workers=3, numbers=2)


@pytest.mark.parametrize("workers", ["0", "-2"])
def test_demo_with_no_workers_is_refused(workers):
    result = run_demo("--workers", workers)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == f"error: --workers must be at least 1, not {workers}\n"


def test_demo_refusals_need_no_processes(capsys):
    assert cli.main(["demo", "--workers", "0"]) == 2
    assert cli.main(["demo", "--numbers", "-1"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == ["error: --workers must be at least 1, not 0",
                                "error: --numbers must be at least 0, not -1"]


@pytest.mark.timeout(60)
def test_demo_against_a_registry_nobody_serves_fails_cleanly(redis_server):
    url = redis_server.url
    redis_server.stop()  # the port is closed now: joining cannot reach the registry
    result = subprocess.run(
        [sys.executable, "-m", "rallypoint", "demo", "--workers", "1", "--timeout", "3", "--registry", url],
        capture_output=True, text=True, timeout=DEMO_TIMEOUT,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED: RegistryError" in result.stdout or "FAILED: JoinTimeout" in result.stdout, result.stdout
    # Each worker says why in one line, not with a traceback.
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("worker_001: error: "), result.stderr
