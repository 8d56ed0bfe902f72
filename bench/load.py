"""Drive a plugin server through the Kong-side harness and measure it."""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tests.harness.kong_side import Consumer, KongSide, Outcome, PluginServerProcess, Request


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
    round_trips: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(connections + 1)

    def worker(slot: int) -> None:
        try:
            with KongSide() as kong:
                for i in range(warmup):
                    run_once(case, kong, i)
                round_trips.append(len(run_once(case, kong).pdk_calls))
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
                  statistics.median(flat) * 1e6, flat[int(len(flat) * 0.99) - 1] * 1e6, round_trips[0])


def time_call(fn: Callable[[], Any], *, repeat: int = 2000, rounds: int = 5) -> float:
    """Best-of-`rounds` mean microseconds per call of `fn` (a pure-core timing)."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - started) / repeat)
    return best * 1e6
