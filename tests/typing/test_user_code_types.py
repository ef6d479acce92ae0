"""User code that uses rallypoint type-checks under `mypy --strict`, against the package as installed.

mypy runs on small scripts in a temporary directory and finds rallypoint the way it finds any installed
package (through the Python path, where it honours `py.typed` and keeps rallypoint's own errors to
itself). A second script makes mistakes on purpose: mypy must catch them, which it would not if the
public names were `Any` or `object`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("mypy", reason="the typing tests need mypy")

MYPY_TIMEOUT = 240.0  # seconds; a cold run over rallypoint and its dependencies

GOOD = """\
import rallypoint
from rallypoint import Message, Proxy, SessionMessage, Timeouts, dist
from rallypoint.errors import DeliveryRefused, PeerGone, Timeout, TransportError


def ask(proxy: rallypoint.Proxy, worker: str) -> list[object]:
    message = SessionMessage(tag="rollout", source=proxy.name, destination=worker, payload=[1, 2])
    try:
        return [reply.payload for reply in proxy.send(message, timeout=Timeouts().reply)]
    except (Timeout, PeerGone, DeliveryRefused) as exc:
        arrived: list[Message] = exc.replies
        return [reply.payload for reply in arrived] + list(exc.session_ids)
    except TransportError as exc:
        return list(exc.replies)


def serve(proxy: Proxy) -> None:
    def on_stop(that: object, proxy: Proxy, messages: list[Message]) -> None:
        proxy.stop()

    @dist(proxy, {"master:stop:1": on_stop})
    class Worker:
        pass

    Worker()
"""

BAD = """\
import rallypoint
from rallypoint import Proxy, Timeouts
from rallypoint.errors import PeerGone

proxy: Proxy = 3
timeouts: rallypoint.Timeouts = Timeouts(reply="soon")
size: int = PeerGone("w").replies
from rallypoint import WireCodec
"""


SUBPACKAGES = ("engine", "grammar", "proxy", "specs")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, name
    return Path(next(iter(spec.submodule_search_locations)))


def _lay_out_installed_package(target: Path) -> None:
    """Link rallypoint, as the import system finds it, into `target` in its installed layout.

    An editable install maps the subpackages from other folders through an import hook, which mypy cannot
    follow; the links give mypy what a regular install gives it, `py.typed` included.
    """
    top = target / "rallypoint"
    top.mkdir()
    for entry in _package_dir("rallypoint").iterdir():
        if entry.is_file() and (entry.suffix in (".py", ".pyi") or entry.name == "py.typed"):
            (top / entry.name).symlink_to(entry)
    for name in SUBPACKAGES:
        (top / name).symlink_to(_package_dir(f"rallypoint.{name}"), target_is_directory=True)


@pytest.fixture(scope="module")
def run_mypy(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("typing")
    site = root / "site"
    site.mkdir()
    _lay_out_installed_package(site)

    def run(name: str, code: str) -> subprocess.CompletedProcess[str]:
        script = root / name
        script.write_text(textwrap.dedent(code))
        env = {**os.environ, "PYTHONPATH": str(site)}
        env.pop("MYPYPATH", None)
        return subprocess.run(
            [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--no-error-summary",
             "--hide-error-context", "--no-pretty", str(script)],
            capture_output=True, text=True, timeout=MYPY_TIMEOUT, cwd=root, env=env,
        )

    yield run
    shutil.rmtree(root, ignore_errors=True)


def test_the_package_is_marked_typed() -> None:
    assert (_package_dir("rallypoint") / "py.typed").is_file()


def test_user_code_passes_mypy_strict(run_mypy) -> None:
    result = run_mypy("good.py", GOOD)
    assert (result.returncode, result.stdout) == (0, ""), result.stdout + result.stderr


def test_mypy_catches_misuse_of_the_public_names(run_mypy) -> None:
    result = run_mypy("bad.py", BAD)
    errors = {int(line.split(":")[1]): line for line in result.stdout.splitlines() if ": error: " in line}
    assert result.returncode == 1, result.stdout + result.stderr
    assert sorted(errors) == [5, 6, 7, 8], result.stdout
    assert "Incompatible types in assignment" in errors[5]  # Proxy is a real class, not Any
    assert '"Timeouts"' in errors[6]  # so is Timeouts, with typed fields
    assert '"list[Message]"' in errors[7]  # .replies is declared on the error class
    assert "WireCodec" in errors[8]  # internals are not exported from the top level
