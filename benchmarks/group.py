"""Group benchmarks: how membership scales with the group's size, every figure against a baseline of the same run.

    python benchmarks/group.py [--window 30] [--rounds 3] [--quick] [--only quiet,memory,join]

1. Quiet groups: registry bytes per second (Redis' own INFO counters, total_net_input_bytes and
   total_net_output_bytes) for a joined, idle group of 8 and of 32 member processes, each group on its own
   redis-server, both measured over the same window once every member has joined and a settle time passed.
   Target: 32 members cost at most 5x what 8 do (linear would be 4x). The window (30 s) must hold each member's
   periodic whole-list read (every max(10 leases, N refreshes) = 30 s at these sizes), or it would miss that cost.
2. 1,000 simulated members: N proxies on the in-memory registry and driver in this one process join, the master
   broadcasts a task to every worker, they answer, and a RegisterTable evaluates `worker:sum:60%` over the
   replies. Per-member cost at N = 10, 100, 1,000, and its ratio to N = 10 (linear cost: about 1x).
3. Join time: a master and N workers (N = 8, 16, 32, 64) started as separate interpreters, from the last start
   until every one has joined, beside the floor: N + 1 bare interpreters started the same way that import pyzmq
   and redis-py, ping Redis and bind a socket. Target: within 1.5x of the floor at every N.

Nothing here asserts on time: read the ratios. Rallypoint's modules are byte-compiled first, as an installed
package has them (see benchmarks/proxy.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _proxy_benchmarks():
    """benchmarks/proxy.py, for its redis-server starter, join scripts and join floor (one definition of each)."""
    spec = importlib.util.spec_from_file_location("rallypoint_proxy_benchmarks", _HERE / "proxy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(_HERE))
    spec.loader.exec_module(module)
    return module


PB = _proxy_benchmarks()


# ---------------------------------------------------------------- 1. quiet groups: registry bytes per second

def _start_group(url: str, size: int) -> list[subprocess.Popen[str]]:
    """A master expecting size-1 workers and size-1 workers expecting the master, each its own interpreter, each
    printing one line once joined and then holding on until its stdin closes."""
    group = f"quiet-{uuid.uuid4().hex[:6]}"
    specs = [("master", "master", f"worker:{size - 1}")] + [
        ("worker", f"worker_{i:03d}", "master:1") for i in range(size - 1)]
    return [subprocess.Popen([sys.executable, "-c", PB.JOINER, kind, name, expect, url, group],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for kind, name, expect in specs]


def _counters(client) -> tuple[int, int, int]:
    stats = client.info("stats")
    return stats["total_net_input_bytes"], stats["total_net_output_bytes"], stats["total_commands_processed"]


def _stop(procs: list[subprocess.Popen[str]]) -> list[str]:
    """Release the members (they close and leave); their stderr lines that say something went wrong."""
    for p in procs:
        p.stdin.close()
    noise = []
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        err = p.stderr.read()
        noise += [line for line in err.splitlines()
                  if "WARNING" in line or "re-registered" in line or "gone" in line or "Error" in line]
    return noise


def quiet_groups(sizes: tuple[int, ...], window: float, settle: float) -> dict[int, dict[str, float]]:
    """Registry traffic of idle groups of each size, on one redis-server each, over the same `window`."""
    import redis

    servers = [PB.Registry() for _ in sizes]
    groups: list[list[subprocess.Popen[str]]] = []
    try:
        if any(s.proc is None for s in servers):
            raise SystemExit("the quiet-group benchmark needs redis-server on PATH (it reads Redis' INFO counters)")
        clients = [redis.Redis.from_url(s.url) for s in servers]
        for server, size in zip(servers, sizes, strict=True):
            groups.append(_start_group(server.url, size))
        for procs in groups:  # every member joined (a line from each), or a failure
            for p in procs:
                if not p.stdout.readline():
                    raise SystemExit(f"a member exited before joining: {p.stderr.read()[-2000:]}")
        time.sleep(settle)  # the join's last member-list reads are over (a fixed window is the measurement)
        before = [_counters(c) for c in clients]
        time.sleep(window)
        after = [_counters(c) for c in clients]
        again = [_counters(c) for c in clients]  # what one INFO itself costs, to take out (two are inside)
        result = {}
        for size, b, a, g in zip(sizes, before, after, again, strict=True):
            info_in, info_out = g[0] - a[0], g[1] - a[1]
            result[size] = {
                "in": (a[0] - b[0] - info_in) / window,
                "out": (a[1] - b[1] - info_out) / window,
                "commands": (a[2] - b[2] - (g[2] - a[2])) / window,
            }
        noise = [line for procs in groups for line in _stop(procs)]
        groups.clear()
        for size in sizes:
            result[size]["noise"] = float(len(noise))
        if noise:
            print(f"   member log lines with WARNING/gone/re-registered/Error: {len(noise)}, e.g. {noise[0]}")
        return result
    finally:
        for procs in groups:
            for p in procs:
                p.kill()
                p.wait()
        for s in servers:
            s.close()


# ---------------------------------------------------------------- 2. 1,000 simulated members in one process

# Every simulated member has its own lease keeper thread, and all of them share this process's one GIL: with the
# default lease (3 s, renewed every 0.5 s) 1,000 keepers re-reading a 1,000-member list at every change starve each
# other, leases lapse, members re-register, the list changes again (measured: thousands of "re-registered" lines,
# no end). A lease this long keeps the keepers out of the phases measured here, which is what a member in its own
# process would see; --sim-lease 3 shows the default.
SIM_LEASE = 120.0


def simulated(n: int) -> dict[str, float]:
    """Seconds per member for each phase of a job of one master and `n` in-memory workers."""
    from rallypoint import Proxy, SessionType
    from rallypoint.engine import RegisterTable
    from rallypoint.proxy import InMemoryNetwork, InMemoryRegistry, Liveness, Timeouts

    registry, network = InMemoryRegistry(), InMemoryNetwork()
    liveness = Liveness(lease=SIM_LEASE, refresh=SIM_LEASE / 4)
    group = f"sim-{uuid.uuid4().hex[:6]}"
    timeouts = Timeouts(join=120, reply=120)

    def member(kind: str, name: str, expected: dict[str, int]) -> Proxy:
        return Proxy(group_name=group, component_type=kind, name=name, expected_peers=expected,
                     registry=registry, driver=network.driver(), timeouts=timeouts, liveness=liveness)

    phases: dict[str, float] = {}
    t = time.perf_counter()
    master = member("master", "master", {})
    workers = [member("worker", f"worker_{i:04d}", {"master": 1}) for i in range(n)]
    phases["join"] = time.perf_counter() - t
    t = time.perf_counter()
    master.refresh_peers()
    if len(master.peers.get("worker", [])) != n:
        raise RuntimeError(f"the master lists {len(master.peers.get('worker', []))} of {n} workers")
    phases["view"] = time.perf_counter() - t

    t = time.perf_counter()
    sessions = master.ibroadcast("worker", "sum", SessionType.TASK, payload=[1, 2, 3])
    phases["broadcast"] = time.perf_counter() - t
    if len(sessions) != n:
        raise RuntimeError(f"broadcast reached {len(sessions)} of {n} workers")
    t = time.perf_counter()
    for w in workers:
        message = w.receive_once(timeout=30)
        w.reply(message, tag="sum", payload=sum(message.payload))
    phases["answer"] = time.perf_counter() - t

    fired = {"quorum": 0, "replies": 0}

    def on_quorum(that, proxy, messages) -> None:
        fired["quorum"] += 1

    def on_reply(that, proxy, messages) -> None:
        fired["replies"] += len(messages)

    table = RegisterTable(lambda: master.peers)
    table.register_event_handler("worker:sum:60%", on_quorum)
    table.register_event_handler("worker:sum:1", on_reply)
    receive = rules = 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        message = master.receive_once(timeout=30)
        t1 = time.perf_counter()
        table.push(message)
        for handler, messages in table.get():
            handler(None, master, messages)
        rules += time.perf_counter() - t1
        receive += t1 - t0
    phases["gather"], phases["rule"] = receive, rules
    if fired["replies"] != n or fired["quorum"] < 1:
        raise RuntimeError(f"rules fired {fired} for {n} replies")
    if {master.session_stage(s) for s in sessions} != {"complete"}:
        raise RuntimeError("not every task session completed")

    t = time.perf_counter()
    for w in workers:
        w.close()
    master.close()
    phases["close"] = time.perf_counter() - t
    registry.close()
    return {k: v / n for k, v in phases.items()}


# ---------------------------------------------------------------- 3. join time against the floor

def join_against_floor(url: str, sizes: tuple[int, ...], rounds: int) -> dict[int, tuple[list[float], list[float]]]:
    """For each N: (join times of a master + N workers, floors of N + 1 bare interpreters), interleaved rounds."""
    out: dict[int, tuple[list[float], list[float]]] = {n: ([], []) for n in sizes}
    for r in range(rounds):
        for n in sizes:
            joined, _ = PB.join_time(url, n)
            out[n][0].append(joined)
            out[n][1].append(PB.join_floor(url, n + 1))
        print(f"join round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return out


# ---------------------------------------------------------------- report

def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--window", type=float, default=30.0, help="seconds of quiet measured (default 30)")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after the last join before measuring")
    parser.add_argument("--rounds", type=int, default=3, help="join-time rounds per N")
    parser.add_argument("--quick", action="store_true", help="a smoke run: short window, N up to 100 and 16")
    parser.add_argument("--only", default="quiet,memory,join", help="comma-separated: quiet, memory, join")
    parser.add_argument("--sim-lease", type=float, default=SIM_LEASE, help="lease of the simulated members")
    args = parser.parse_args()
    globals()["SIM_LEASE"] = args.sim_lease
    only = set(args.only.split(","))
    window = 5.0 if args.quick else args.window
    sim_sizes = (10, 100) if args.quick else (10, 100, 1000)
    join_sizes = (8, 16) if args.quick else (8, 16, 32, 64)
    PB.compile_bytecode()

    if "quiet" in only:
        quiet = quiet_groups((8, 32), window, args.settle)
        print(f"\n1. quiet groups, registry traffic over {window:.0f}s, {args.settle:.0f}s after the last join "
              "(redis INFO, one server per group, same window)")
        for size, figures in quiet.items():
            total = figures["in"] + figures["out"]
            print(f"   {size:>3} members: in {figures['in']:>9,.0f} B/s  out {figures['out']:>9,.0f} B/s  "
                  f"total {total:>9,.0f} B/s  ({total / size:,.0f} B/s per member, "
                  f"{figures['commands']:.0f} commands/s)")
        small, big = (quiet[s]["in"] + quiet[s]["out"] for s in (8, 32))
        ratio = big / small
        print(f"   32 vs 8 members: {ratio:.2f}x  (4x the members; linear is 4x, quadratic 16x)  target <= 5x "
              f"{'PASS' if ratio <= 5 else 'MISS'}")

    if "memory" in only:
        print("\n2. simulated members, in-memory registry and driver, one process: microseconds per member "
              f"(lease {SIM_LEASE:g} s, see SIM_LEASE)")
        results = {n: simulated(n) for n in sim_sizes}
        phases = list(results[sim_sizes[0]])
        print(f"   {'N':>6} " + " ".join(f"{p:>10}" for p in phases) + f" {'total':>10}")
        for n, per in results.items():
            print(f"   {n:>6} " + " ".join(f"{per[p] * 1e6:>10,.1f}" for p in phases)
                  + f" {sum(per.values()) * 1e6:>10,.1f}")
        base = results[sim_sizes[0]]
        for n in sim_sizes[1:]:
            per = results[n]
            ratios = "  ".join(f"{p} {per[p] / base[p]:.2f}x" for p in phases)
            total = sum(per.values()) / sum(base.values())
            print(f"   per member at N={n} vs N={sim_sizes[0]}: total {total:.2f}x  ({ratios})  "
                  f"linear: about 1x  {'PASS' if total <= 2 else 'MISS'} (<= 2x)")

    if "join" in only:
        registry = PB.Registry()
        try:
            joins = join_against_floor(registry.url, join_sizes, args.rounds)
        finally:
            registry.close()
        print(f"\n3. join time, master + N workers ready after the last start, vs N + 1 bare interpreters "
              f"(import pyzmq + redis-py, ping Redis, bind), medians of {args.rounds} interleaved rounds")
        for n, (joined, floors) in joins.items():
            ratio = statistics.median(a / b for a, b in zip(joined, floors, strict=True))
            print(f"   N={n:>3}: join {statistics.median(joined):6.2f} s (max {max(joined):6.2f})  floor "
                  f"{statistics.median(floors):6.2f} s  ratio {ratio:5.2f}x  target <= 1.5x "
                  f"{'PASS' if ratio <= 1.5 else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
