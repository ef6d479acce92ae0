"""A registry reached over TLS (`rediss://`): a real redis-server with a throw-away certificate."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest
import redis
from proxy_helpers import make_proxy, new_group

from rallypoint import Message
from rallypoint.errors import RegistryError

pytestmark = pytest.mark.timeout(60)


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{tool} is required in CI for the TLS registry test")
        pytest.skip(f"{tool} is not installed")
    return path


@pytest.fixture
def tls_redis(tmp_path):
    openssl, server = _need("openssl"), _need("redis-server")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=30)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([server, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file",
                             str(cert), "--tls-auth-clients", "no", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url, socket_timeout=1).ping()
            break
        except redis.RedisError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("TLS redis-server did not come up")
            time.sleep(0.02)
    yield url, port
    proc.kill()
    proc.wait(5)


def test_proxies_find_each_other_through_a_tls_registry(tls_redis):
    url, port = tls_redis
    group = new_group()
    with make_proxy(url, group, "master", "master") as master, \
            make_proxy(url, group, "worker", "worker_001", expected_peers={"master": 1}) as worker:
        master.isend(Message(tag="hi", source="master", destination="worker_001", payload="over tls"))
        assert worker.receive_once(timeout=5).payload == "over tls"
    # Plain text to the TLS port is refused with a registry error, not a hang.
    with pytest.raises(RegistryError):
        make_proxy(f"redis://127.0.0.1:{port}/0", new_group(), "solo")
