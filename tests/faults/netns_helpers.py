"""Hosts made of Linux network namespaces on one switch, for tests that run a job across "machines".

`hosts(3)` makes three namespaces (the hosts) and a fourth holding a bridge (the switch); each host has one veth
pair to the switch and one address in a private /24 of 10.214.0.0/16 chosen at random and checked unused here.
Nothing is added to this namespace (the test's own): the hosts reach each other only through the switch, and
only processes started inside them (`Host.run` / `Host.popen`, with `ip netns exec`) see that network.
Everything is removed when the context ends, whatever happened.

Needs root and iproute2; `unavailable()` skips without them, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=check)


def unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"network namespace tests must run under CI: {reason}")
    pytest.skip(reason)


def require_netns() -> None:
    """Skip (fail under CI) unless this process may create network namespaces."""
    if os.geteuid() != 0:
        unavailable("network namespaces need root")
    if shutil.which("ip") is None:
        unavailable("iproute2 ('ip') is not installed")


@dataclass(frozen=True)
class Host:
    """One namespace acting as a machine: its name and its address on the switch."""

    ns: str
    address: str

    def command(self, args: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *args]

    # Both run in "/" unless told otherwise: from a checkout, `python -m rallypoint...` would import the
    # checkout's files instead of the installed package's.
    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        kwargs.setdefault("cwd", "/")
        return subprocess.Popen(self.command(args), text=True, **kwargs)

    def run(self, args: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(args), capture_output=True, text=True, timeout=timeout, cwd="/")


def _free_prefix() -> str:
    used = ip("-4", "addr", "show").stdout + ip("-4", "route", "show", "table", "all").stdout
    for _ in range(50):
        prefix = f"10.214.{random.randrange(256)}."
        if prefix not in used:
            return prefix
    pytest.fail("no free /24 in 10.214.0.0/16")


@contextmanager
def hosts(count: int) -> Iterator[list[Host]]:
    """`count` hosts on one switch (see the module docstring); all removed on exit."""
    require_netns()
    tag = uuid.uuid4().hex[:6]
    switch = f"rp-sw-{tag}"
    prefix = _free_prefix()
    made: list[str] = []
    try:
        if ip("netns", "add", switch, check=False).returncode != 0:
            unavailable(f"cannot create a network namespace: {ip('netns', 'add', switch, check=False).stderr}")
        made.append(switch)
        ip("-n", switch, "link", "add", "br0", "type", "bridge")
        ip("-n", switch, "link", "set", "br0", "up")
        result = []
        for i in range(1, count + 1):
            ns, here, there = f"rp-h{i}-{tag}", f"rp{tag}{i}h", f"rp{tag}{i}s"
            ip("netns", "add", ns)
            made.append(ns)
            # Both ends are born inside their namespaces: nothing of this network ever exists in ours.
            ip("-n", ns, "link", "add", here, "type", "veth", "peer", "name", there, "netns", switch)
            ip("-n", switch, "link", "set", there, "master", "br0")
            ip("-n", switch, "link", "set", there, "up")
            address = f"{prefix}{i}"
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", here)
            ip("-n", ns, "link", "set", here, "up")
            ip("-n", ns, "link", "set", "lo", "up")
            result.append(Host(ns, address))
        yield result
    finally:
        for ns in reversed(made):  # deleting a namespace deletes its veth ends, and so their peers
            ip("netns", "del", ns, check=False)
