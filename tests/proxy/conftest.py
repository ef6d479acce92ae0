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


@pytest.fixture
def master_and_workers(registry_url):
    """A master and three worker proxies (worker_0..worker_2) in a fresh group, the master's view current."""
    group = new_group()
    master = make_proxy(registry_url, group, "master", "master")
    workers = [make_proxy(registry_url, group, "worker", f"worker_{i}", expected_peers={"master": 1})
               for i in range(3)]
    master.refresh_peers()
    yield master, workers
    for worker in workers:
        worker.close()
    master.close()
