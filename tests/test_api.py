"""The public API is declared once per package (`__all__`), sorted, importable, and light to import."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["rallypoint", "rallypoint.grammar", "rallypoint.proxy", "rallypoint.errors"])
def test_all_is_sorted_and_every_name_resolves(module):
    mod = importlib.import_module(module)
    assert list(mod.__all__) == sorted(mod.__all__)
    for name in mod.__all__:
        assert getattr(mod, name) is not None, name


def test_the_seed_names_are_at_the_top_level():
    import rallypoint

    for name in ("Proxy", "Message", "SessionMessage", "SessionType", "dist", "RegisterTable"):
        assert name in rallypoint.__all__


TOP_LEVEL = [
    "AsyncProxy", "EmbeddedRegistryServer", "Error", "HoldPolicy", "InMemoryDriver", "InMemoryNetwork",
    "InMemoryRegistry", "Liveness", "Message", "Proxy", "RedisRegistry", "RegisterTable", "SessionMessage",
    "SessionTracker", "SessionType", "Timeouts", "ZmqDriver", "dist", "load_spec", "parse_rule",
]


def test_the_top_level_exports_exactly_the_user_facing_names():
    import rallypoint

    assert rallypoint.__all__ == TOP_LEVEL


@pytest.mark.parametrize("internal", ["WireCodec", "DriverEvent", "UNSET", "registry_from"])
def test_the_top_level_does_not_export_internals(internal):
    import rallypoint

    assert internal not in rallypoint.__all__  # it stays in rallypoint.proxy, for those who need it
    with pytest.raises(AttributeError):
        getattr(rallypoint, internal)


def test_a_lazy_top_level_name_is_the_proxy_layers_own():
    import rallypoint
    import rallypoint.proxy

    for name in ("Proxy", "dist", "Timeouts", "ZmqDriver", "EmbeddedRegistryServer"):
        assert getattr(rallypoint, name) is getattr(rallypoint.proxy, name), name


def test_every_error_derives_from_the_one_root():
    from rallypoint import errors

    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.Error), name
        assert cls.__doc__, f"{name} needs a one-line docstring"


def test_importing_the_engine_loads_neither_zmq_nor_redis_nor_lark():
    code = ("import sys, rallypoint, rallypoint.engine, rallypoint.grammar; "
            "print(sorted(m for m in ('zmq', 'redis', 'fakeredis', 'lark') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_lark_loads_only_when_a_text_is_parsed():
    # Every process of a job imports rallypoint.proxy and uses the built-in session types; Lark (~50 ms to
    # import) must wait for a rule or spec text to parse. The built-in specs come from their saved ASTs.
    code = (
        "import sys, rallypoint, rallypoint.engine, rallypoint.proxy\n"
        "from rallypoint.proxy import InMemoryNetwork, InMemoryRegistry, Proxy\n"
        "from rallypoint import SessionMessage, SessionType\n"
        "registry, network = InMemoryRegistry(), InMemoryNetwork()\n"
        "a = Proxy('g', 'master', name='a', registry=registry, driver=network.driver())\n"
        "b = Proxy('g', 'worker', name='b', registry=registry, driver=network.driver(), expected_peers={'master': 1})\n"
        "for kind in (SessionType.TASK, SessionType.NOTIFICATION):\n"
        "    b.isend(SessionMessage(tag='t', source='b', destination='a', session_type=kind))\n"
        "b.close(); a.close()\n"
        "print('lark' in sys.modules)\n"
        "rallypoint.parse_rule('a:t:1')\n"
        "print('lark' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_transport_errors_declare_what_arrived_and_which_sessions_failed():
    from rallypoint import Message
    from rallypoint.errors import DeliveryRefused, PeerGone, PeerUnreachable, Timeout, TransportError

    reply = Message(tag="t", source="w", destination="m")
    errors = [
        Timeout("late", ["s2"], replies=[reply], session_ids=["s2"]),
        PeerGone("w", "gone", ["s2"], replies=[reply]),  # session_ids still positional, as before
        DeliveryRefused("w", replies=[reply], session_ids=["s2"]),
        PeerUnreachable("w", replies=[reply], session_ids=["s2"]),
    ]
    for exc in errors:
        assert isinstance(exc, TransportError)
        assert (exc.replies, exc.session_ids) == ([reply], ("s2",)), type(exc).__name__
    assert errors[0].missing == ("s2",) and str(errors[0]) == "late"
    assert (errors[1].peer, str(errors[1])) == ("w", "gone")
    bare = TransportError("cut")
    assert (bare.replies, bare.session_ids, str(bare)) == ([], (), "cut")
