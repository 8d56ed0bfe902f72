"""Drive a plugin server through the Kong-side harness and measure it."""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tests.harness.kong_side import Consumer, KongSide, Outcome, PluginServerProcess, Request, RequestState
from tests.harness.lua_msgpack import as_lua


@dataclass(frozen=True)
class Case:
    """One benchmarked path: which plugins, which request, what the outcome must be."""

    name: str
    plugins: Sequence[tuple[PluginServerProcess, dict]]
    request: Callable[[int], Request]
    consumers: Sequence[Consumer] = ()
    expect_status: int = 200


@dataclass(frozen=True)
class Result:
    case: str
    connections: int
    requests: int
    rps: float
    p50_us: float
    p99_us: float
    round_trips: int
    #: PDK calls of each plugin that ran (one plugin event each).
    split: tuple[int, ...]

    def row(self) -> str:
        return (f"| {self.case} | {self.connections} | {self.round_trips} | {self.rps:,.0f} | "
                f"{self.p50_us:,.0f} | {self.p99_us:,.0f} |")


HEADER = ("| path | Kong-side connections | PDK round trips | requests/s | p50 µs | p99 µs |\n"
          "|---|---:|---:|---:|---:|---:|")


def run_once(case: Case, kong: KongSide, i: int = 0) -> Outcome:
    outcome = kong.run(case.request(i), case.plugins, consumers=case.consumers)
    if outcome.status != case.expect_status:
        raise AssertionError(f"{case.name}: expected {case.expect_status}, got {outcome.status} "
                             f"{outcome.exit} {outcome.rpc_errors} {outcome.log_text()}")
    return outcome


def measure(case: Case, *, connections: int = 1, requests: int = 2000, warmup: int = 100) -> Result:
    """Run `requests` requests over `connections` concurrent Kong-side connections."""
    per_worker = max(1, requests // connections)
    latencies: list[list[float]] = [[] for _ in range(connections)]
    sample: list[Outcome] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(connections + 1)

    def worker(slot: int) -> None:
        try:
            with KongSide() as kong:
                for i in range(warmup):
                    run_once(case, kong, i)
                sample.append(run_once(case, kong))
                barrier.wait()
                record = latencies[slot]
                for i in range(per_worker):
                    started = time.perf_counter()
                    run_once(case, kong, i)
                    record.append(time.perf_counter() - started)
        except BaseException as exc:  # reported after join
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(connections)]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    flat = sorted(x for record in latencies for x in record)
    return Result(case.name, connections, len(flat), len(flat) / elapsed,
                  statistics.median(flat) * 1e6, flat[int(len(flat) * 0.99) - 1] * 1e6,
                  len(sample[0].pdk_calls), tuple(calls for _, calls in sample[0].events))


@dataclass(frozen=True)
class Cost:
    """One path's p50 latency and the plugin servers' CPU time per request."""

    p50_us: float
    cpu_us: float


def cpu_ns(servers: Sequence[PluginServerProcess]) -> int:
    """CPU time the processes have run, in ns (/proc/<pid>/schedstat, first field)."""
    total = 0
    for server in servers:
        with open(f"/proc/{server.pid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


def compare(paths: dict[str, Case], *, requests: int = 2000, block: int = 200,
            warmup: int = 100) -> dict[str, Cost]:
    """Measure several paths in rotating blocks on one connection, so that drift in the machine's
    load falls on all alike; CPU time is counted on each path's plugin servers only."""
    latencies: dict[str, list[float]] = {label: [] for label in paths}
    cpu = dict.fromkeys(paths, 0)
    servers = {label: _servers(case) for label, case in paths.items()}
    labels = list(paths)
    with KongSide() as kong:
        for i in range(warmup):
            for case in paths.values():
                run_once(case, kong, i)
        for n in range(max(1, requests // block)):
            for label in labels[n % len(labels):] + labels[:n % len(labels)]:
                case = paths[label]
                before = cpu_ns(servers[label])
                for i in range(block):
                    started = time.perf_counter()
                    run_once(case, kong, i)
                    latencies[label].append(time.perf_counter() - started)
                cpu[label] += cpu_ns(servers[label]) - before
    return {label: Cost(statistics.median(latencies[label]) * 1e6, cpu[label] / len(latencies[label]) / 1e3)
            for label in paths}


def handler_us(case: Case, recorded: Outcome, *, repeat: int = 2000) -> float:
    """Python time per request spent in our plugins' handlers, PDK excluded: each plugin's access
    handler runs in this process against kong-pdk's own PDK object, whose calls return what Kong
    answered in `recorded` (a warm request), so only our code is timed."""
    import importlib

    from kong_pdk.pdk import FakeClasses

    from kong_mtls.constants import PLUGIN_MODULES

    handlers = []
    start = 0
    warm = RequestState(case.request(0), case.consumers, {}, "3.9", Outcome())
    kong_emulator = FakeClasses("kong", lambda method, *args: warm.call(method, as_lua(list(args)))[0])
    for (server, config), (_, count) in zip(case.plugins, recorded.events):
        plugin = importlib.import_module(PLUGIN_MODULES[server.name]).Plugin(config)
        plugin.access(kong_emulator)  # fills the instance's caches, as the recorded request found them
        handlers.append((plugin, recorded.pdk_results[start:start + count]))
        start += count

    def one_request() -> None:
        for plugin, results in handlers:
            answers = iter(results)
            plugin.access(FakeClasses("kong", lambda method, *args, answers=answers: next(answers)))

    return time_call(one_request, repeat=repeat)


def _servers(case: Case) -> list[PluginServerProcess]:
    unique = {id(server): server for server, _ in case.plugins}
    return list(unique.values())


def time_call(fn: Callable[[], Any], *, repeat: int = 2000, rounds: int = 5) -> float:
    """Best-of-`rounds` mean microseconds per call of `fn` (a pure-core timing)."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - started) / repeat)
    return best * 1e6
