"""The demo across three hosts: the registry on the first, the master on the second, the workers on the third.

The hosts are network namespaces on one switch (netns_helpers.hosts). The registry is `rallypoint registry
--host H1`; the workers are the demo's own worker processes and the master is the demo's own master
(netns_demo_master.py; `rallypoint demo` would start its workers on its own host), each told `--registry
redis://H1:P`. While the master holds after its join, the first host lists the group, and every member must be
there with an address on its own host; then the job runs to the end and checks its sum.

Needs root and iproute2; skipped otherwise, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from netns_helpers import Host, hosts

pytestmark = [pytest.mark.netns, pytest.mark.timeout(180)]

WORKERS = 3
PORT = 6379  # free by construction: nothing else runs in a namespace made for this test
MASTER_SCRIPT = Path(__file__).with_name("netns_demo_master.py")
LIST_MEMBERS = """
import json, sys
from rallypoint.proxy import RedisRegistry
with RedisRegistry(sys.argv[1]) as registry:
    print(json.dumps({name: record.address for name, record in registry.members(sys.argv[2]).items()}))
"""


def _lines_until(proc: subprocess.Popen[str], marker: str) -> list[str]:
    """stdout lines of `proc` up to and including one starting with `marker` (all of them if it ends first)."""
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith(marker):
            break
    return lines


def _peers_cli_exists(host: Host) -> bool:
    return host.run(["rallypoint", "peers", "--help"]).returncode == 0


def _listed_from(host: Host, url: str, group: str) -> tuple[dict[str, str], str]:
    """{name: address} of the group as `host` reads it from the registry, and the text it was read from: the
    output of `rallypoint peers` when the CLI has it, else the registry's member list."""
    if _peers_cli_exists(host):
        result = host.run(["rallypoint", "peers", group, "--registry", url])
        assert result.returncode == 0, result.stderr
        listed = {}
        for line in result.stdout.splitlines():  # NAME first, then somewhere the address
            words = line.split()
            address = next((word for word in words if word.startswith("tcp://")), None)
            if address is not None:
                listed[words[0]] = address
        return listed, result.stdout
    result = host.run([sys.executable, "-c", LIST_MEMBERS, url, group])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), result.stdout


def test_demo_across_three_hosts() -> None:
    with hosts(3) as (registry_host, master_host, workers_host):
        url = f"redis://{registry_host.address}:{PORT}"
        group = f"demo-{uuid.uuid4().hex[:8]}"
        names = [f"worker_{i + 1:03d}" for i in range(WORKERS)]
        procs: list[subprocess.Popen[str]] = []
        try:
            registry = registry_host.popen(["rallypoint", "registry", "--host", registry_host.address,
                                            "--port", str(PORT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            procs.append(registry)
            serving = _lines_until(registry, "rallypoint registry serving")
            assert serving and f"serving {url} " in serving[-1], serving

            workers = [workers_host.popen([sys.executable, "-m", "rallypoint._demo", "worker", url, group, name,
                                           "--join-timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                       for name in names]
            procs.extend(workers)
            master = master_host.popen([sys.executable, str(MASTER_SCRIPT), url, group, str(WORKERS), "--hold"],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            procs.append(master)

            said = _lines_until(master, "HOLD")
            assert said and said[-1] == "HOLD", f"master: {said} {master.stderr.read() if master.stderr else ''}"
            assert said[0].startswith(f"master joined {group!r} with {WORKERS} workers"), said

            listed, shown = _listed_from(registry_host, url, group)
            print(shown)
            assert sorted(listed) == sorted(["master", *names]), shown
            assert listed["master"].startswith(f"tcp://{master_host.address}:"), shown
            for name in names:
                assert listed[name].startswith(f"tcp://{workers_host.address}:"), shown

            assert master.stdin is not None
            master.stdin.write("go\n")
            master.stdin.close()
            said += _lines_until(master, "OK in ")  # to the end if it fails (the pytest timeout bounds it)
            master.wait(timeout=30)
            err = master.stderr.read() if master.stderr else ""
            print("\n".join(said))
            if master.returncode != 0:
                for worker in workers:
                    worker.kill()
                pytest.fail(f"the master failed: {said}\n{err}\n" + "\n".join(
                    f"{name}: {worker.communicate()[1]}" for name, worker in zip(names, workers, strict=True)))
            assert "total 50005000 (expected 50005000); task sessions: ['complete']" in said
            assert said[-1].startswith("OK in "), said
            for name, worker in zip(names, workers, strict=True):
                _, worker_err = worker.communicate(timeout=30)
                assert worker.returncode == 0, f"{name}: {worker_err}"
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
