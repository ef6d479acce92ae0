"""The LALR tables are cached per user through Lark's own `cache=`: built once, loaded after, and a cache
that is missing, stale, damaged, from another Lark version, or in an unsafe or unwritable folder is never
an error, only rebuilt or skipped. Nothing here depends on which Lark version is installed."""

from __future__ import annotations

import fcntl
import os
import stat
import subprocess
import sys

import lark
import pytest

from rallypoint.grammar import _lalr

GRAMMARS = [
    ("rules.lark", False, "a:b:1 AND (c:*:60% OR d:e:2)"),
    # A line end inside parentheses exercises the postlexer, which is code and not part of the cache.
    ("spec.lark", True, "session s {\n states a, b\n initial a\n a -> b on go\n}\nrule r = (a:b:1\n OR c:d:2)\n"),
]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("RALLYPOINT_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def builds(monkeypatch):
    """Counts the LALR tables Lark computes (as opposed to loads)."""
    counted: list[str] = []
    real = lark.Lark._build_parser

    def counting(self):
        counted.append(self.source_path)
        return real(self)

    monkeypatch.setattr(lark.Lark, "_build_parser", counting)
    return counted


def cached_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name != "parsers.lock")


@pytest.mark.parametrize("grammar,newlines,text", GRAMMARS)
def test_the_first_use_builds_and_caches_and_the_next_loads(grammar, newlines, text, cache_dir, builds):
    fresh = _lalr._build(grammar, newlines=newlines)
    assert len(builds) == 1
    first = _lalr._open(grammar, newlines=newlines)
    assert len(builds) == 2
    assert cached_files(cache_dir) == [_lalr._cache_name(grammar)]  # no scratch file left behind
    loaded = _lalr._open(grammar, newlines=newlines)
    assert len(builds) == 2, "the cached tables were rebuilt instead of loaded"
    assert loaded.parse(text) == first.parse(text) == fresh.parse(text)


def test_the_cache_folder_is_private_to_the_user(cache_dir):
    _lalr._open("rules.lark", newlines=False)
    assert stat.S_IMODE(cache_dir.stat().st_mode) & 0o077 == 0


def test_the_cache_name_follows_the_grammar_and_the_lark_version(monkeypatch):
    name = _lalr._cache_name("rules.lark")
    assert f"lark{lark.__version__}" in name
    assert _lalr._cache_name("spec.lark") != name
    monkeypatch.setattr(lark, "__version__", "0.0.0-elsewhere")
    assert _lalr._cache_name("rules.lark") != name


@pytest.mark.parametrize("damage", [b"", b"not a cache at all\n", b"0" * 64 + b"\n\x80\x04garbage"])
def test_a_damaged_cache_file_is_rebuilt_not_an_error(damage, cache_dir, builds):
    _lalr._open("rules.lark", newlines=False)
    target = cache_dir / _lalr._cache_name("rules.lark")
    target.write_bytes(damage)
    parser = _lalr._open("rules.lark", newlines=False)
    assert parser.parse("a:b:1") is not None
    assert len(builds) == 2
    assert len(_lalr._open("rules.lark", newlines=False).parse("a:b:1 OR c:d:2").children) == 2
    assert len(builds) == 2, "the rebuilt tables were cached again"


def test_a_cache_written_by_another_lark_version_is_rebuilt_not_an_error(cache_dir, builds, monkeypatch):
    with monkeypatch.context() as elsewhere:
        elsewhere.setattr(lark, "__version__", "0.0.0-elsewhere")  # Lark puts its version in its check too
        _lalr._open("rules.lark", newlines=False)
        foreign = cache_dir / _lalr._cache_name("rules.lark")
    ours = cache_dir / _lalr._cache_name("rules.lark")
    assert foreign != ours
    ours.write_bytes(foreign.read_bytes())  # the same name, another version's content
    assert _lalr._open("rules.lark", newlines=False).parse("a:b:1") is not None
    assert len(builds) == 2
    assert foreign.exists(), "another environment's cache is left alone"


def test_a_grammar_edit_is_a_new_cache_name(cache_dir, builds, monkeypatch):
    _lalr._open("rules.lark", newlines=False)
    monkeypatch.setitem(_lalr._SOURCES, "rules.lark", ("rules.lark", "spec.lark"))  # as if the text changed
    _lalr._open("rules.lark", newlines=False)
    assert len(builds) == 2 and len(cached_files(cache_dir)) == 2


def unusable_folders(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could plant a pickle there
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    return {"group- and world-writable": shared, "under a file": a_file / "cache", "relative": "cache"}


@pytest.mark.parametrize("kind", ["group- and world-writable", "under a file", "relative"])
def test_without_a_usable_cache_folder_the_parser_is_built_in_memory(kind, tmp_path, monkeypatch, builds):
    folder = unusable_folders(tmp_path)[kind]
    monkeypatch.setenv("RALLYPOINT_CACHE_DIR", str(folder))
    monkeypatch.chdir(tmp_path)
    assert _lalr._cache_dir() is None
    assert _lalr._open("rules.lark", newlines=False).parse("a:b:1") is not None
    assert len(builds) == 1
    if kind == "group- and world-writable":
        assert os.listdir(folder) == []


def test_the_default_folder_is_under_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.delenv("RALLYPOINT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _lalr._cache_dir() == tmp_path / "rallypoint"


def test_a_lock_that_is_never_released_only_delays_the_first_parse(cache_dir, monkeypatch):
    cache_dir.mkdir(mode=0o700)
    monkeypatch.setattr(_lalr, "_LOCK_WAIT", 0.05)
    with open(cache_dir / "parsers.lock", "w") as holder:  # a frozen process in the middle of a build
        fcntl.flock(holder, fcntl.LOCK_EX)
        assert _lalr._open("rules.lark", newlines=False).parse("a:b:1") is not None


STARTER = """
import sys, lark
from rallypoint.grammar import parse_rule
built = []
real = lark.Lark._build_parser
lark.Lark._build_parser = lambda self: built.append(1) or real(self)
print("ready", flush=True)
sys.stdin.readline()
parse_rule("worker:update:60% AND master:sync:1")
print(len(built), flush=True)
"""


def test_processes_starting_together_build_the_tables_once(cache_dir):
    env = {**os.environ, "RALLYPOINT_CACHE_DIR": str(cache_dir)}
    procs = [subprocess.Popen([sys.executable, "-c", STARTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env) for _ in range(4)]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        for proc in procs:  # all at once, as the processes of a job
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outputs = [proc.communicate(timeout=60)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert [proc.returncode for proc in procs] == [0] * 4
    assert sum(int(out) for out in outputs) == 1, outputs
    assert cached_files(cache_dir) == [_lalr._cache_name("rules.lark")]
