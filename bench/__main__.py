"""`./dev bench`: what the plugins cost per request, next to bare plugins with the same round trips.

With --kong, or KONG_BIN set (and no --harness): in a real Kong next to Kong's own plugins, under
wrk (bench/real_kong.py). Otherwise harness-only: protocol figures go through the real plugin
servers and the Kong-side driver of the test suite (tests/harness/kong_side.py), which is Python
too: absolute numbers include its own cost, the comparison with the bare plugins (same driver,
same round trips) isolates ours.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

from bench import cases, core
from bench.load import HEADER, Case, Result, compare, handler_us, measure, run_once
from tests.harness.kong_side import KongSide

CONNECTIONS = (1, 8)


def protocol_section(requests: int) -> list[str]:
    lines = ["## Through the plugin servers", "", HEADER]
    comparisons = [
        "", "Each warm path against two baselines, measured in rotating blocks on one connection: *bare*, "
        "plugins making the same number of PDK calls per plugin event (`bench/bare_plugin.py`), and "
        "*replay*, plugins making exactly the same PDK calls with the same arguments "
        "(`bench/replay_plugin.py`). CPU is what the plugin-server processes used per request.", "",
        "| path (warm) | p50 µs: ours / bare / replay | plugin-server CPU µs: ours / bare / replay "
        "| CPU added vs replay | our handlers' own Python, µs (in process) | that, over bare p50 |",
        "|---|---:|---:|---:|---:|---:|"]
    with cases.world() as w, cases.upstream_identity(w) as (upstream_warm, upstream_first_use):
        key = cases.new_key()
        plugin_cases: list[Case] = [
            cases.ip_allowlist(w), cases.ip_allowlist(w, cold=True), upstream_warm,
            cases.client_cert_auth(w), cases.client_cert_auth(w, cold=True),
            cases.api_key_auth(w, key), cases.api_key_auth(w, key, cold=True),
            cases.full_chain(w, key),
        ]
        baselines: dict[tuple[int, ...], Result] = {}
        lines.extend(_rows(cases.bare(w, (1,)), requests, baselines))
        for case in plugin_cases:
            results = [measure(case, connections=c, requests=requests) for c in CONNECTIONS]
            lines.extend(r.row() for r in results)
            split = results[0].split
            if split not in baselines:
                lines.extend(_rows(cases.bare(w, split), requests, baselines))
            if "cold" not in case.name:
                with KongSide() as kong:
                    run_once(case, kong)
                    recorded = run_once(case, kong)  # warm: what every request after the first does
                costs = compare({"ours": case, "bare": cases.bare(w, split),
                                 "replay": cases.replay(w, case, recorded)}, requests=requests)
                ours, bare, replay = costs["ours"], costs["bare"], costs["replay"]
                own = handler_us(case, recorded)
                comparisons.append(
                    f"| {case.name} | {ours.p50_us:,.0f} / {bare.p50_us:,.0f} / {replay.p50_us:,.0f} | "
                    f"{ours.cpu_us:,.0f} / {bare.cpu_us:,.0f} / {replay.cpu_us:,.0f} | "
                    f"{100 * (ours.cpu_us / replay.cpu_us - 1):+.0f}% | {own:,.1f} | "
                    f"{100 * own / bare.p50_us:.1f}% |")
        lines += ["", first_use_row(upstream_first_use)]
    return lines + comparisons


def first_use_row(first_use, count: int = 40) -> str:
    """upstream-identity's cold path: the first request of a new instance waits for the probe."""
    timings = []
    with KongSide() as kong:
        for n in range(count):
            started = time.perf_counter()
            run_once(first_use(f"first-use-{n}"), kong)
            timings.append((time.perf_counter() - started) * 1e6)
    timings.sort()
    return (f"upstream-identity, first request of a new instance (StartInstance, then a real TLS probe of "
            f"the upstream with Kong's client certificate): p50 {timings[len(timings) // 2]:,.0f} µs over "
            f"{count} instances; later requests are served from the cached verdict (row above).")


def _rows(case: Case, requests: int, baselines: dict[tuple[int, ...], Result]) -> list[str]:
    results = [measure(case, connections=c, requests=requests) for c in CONNECTIONS]
    baselines[results[0].split] = results[0]
    return [r.row() for r in results]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000, help="requests per protocol measurement")
    parser.add_argument("--skip-protocol", action="store_true", help="pure-core timings only")
    real = parser.add_argument_group("real Kong (bench/real_kong.py; the default when KONG_BIN is set)")
    real.add_argument("--kong", metavar="KONG_BIN", nargs="?", const="", default=None,
                      help="measure in a real Kong: this `kong` (default $KONG_BIN, else `kong` on PATH)")
    real.add_argument("--harness", action="store_true",
                      help="the harness-only tables even when KONG_BIN is set")
    real.add_argument("--workers", default="1,2",
                      help="nginx worker counts to run, comma-separated (default %(default)s; runs after "
                           "the first measure a subset of the routes)")
    real.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default %(default)s)")
    real.add_argument("--seconds", type=float, default=5.0, help="wrk duration per route and round")
    real.add_argument("--warmup", type=float, default=2.0, help="wrk warm-up per route, seconds")
    real.add_argument("--connections", type=int, default=8, help="wrk connections (default %(default)s)")
    real.add_argument("--threads", type=int, default=1, help="wrk threads (default %(default)s)")
    real.add_argument("--server-args", default="", metavar="ARGS",
                      help="extra arguments for every plugin server's start_cmd, e.g. '--processes 2'")
    real.add_argument("--routes", default="", metavar="KEYS",
                      help="only these routes, comma-separated (e.g. plain,bare-1,bare-4; default: all with "
                           "one worker, a subset with more)")
    real.add_argument("--readme", action="store_true",
                      help="also write the table into README.md's Benchmarks section")
    args = parser.parse_args(argv)
    kong = args.kong if args.kong is not None else (None if args.harness else os.environ.get("KONG_BIN"))
    if kong is not None:
        from bench import real_kong

        binary = kong or os.environ.get("KONG_BIN") or "kong"
        try:
            workers = [int(n) for n in args.workers.split(",") if n.strip()]
        except ValueError:
            parser.error(f"--workers: not a list of numbers: {args.workers!r}")
        if not workers or any(n < 1 for n in workers):
            parser.error("--workers: one or more counts of at least 1")
        return real_kong.main(binary, workers=workers, rounds=args.rounds, seconds=args.seconds,
                              warmup=args.warmup, connections=args.connections, threads=args.threads,
                              readme=args.readme, server_args=args.server_args,
                              route_keys=[k for k in args.routes.split(",") if k] or None)
    started = time.time()
    out = [f"# kong-mtls benchmarks ({time.strftime('%Y-%m-%d')})", "", f"Machine: {machine()}", ""]
    out += core.section()
    if not args.skip_protocol:
        out += ["", *protocol_section(args.requests)]
    out += ["", f"_{time.time() - started:.0f} s_"]
    text = "\n".join(out) + "\n"
    os.makedirs("bench/results", exist_ok=True)
    with open("bench/results/latest.md", "w") as f:
        f.write(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
