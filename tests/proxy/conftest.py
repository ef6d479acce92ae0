"""Fixtures for the proxy tests."""

from __future__ import annotations

import pytest
from proxy_helpers import make_proxy, new_group


@pytest.fixture
def pair(registry_url):
    """A master and a worker proxy joined in a fresh group: (master, worker, group)."""
    group = new_group()
    master = make_proxy(registry_url, group, "master", "master")
    worker = make_proxy(registry_url, group, "worker", "worker_001", expected_peers={"master": 1})
    yield master, worker, group
    worker.close()
    master.close()
