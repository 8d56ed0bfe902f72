"""`./dev bench`: what the plugins cost per request, next to bare plugins with the same round trips.

Protocol figures go through the real plugin servers and the Kong-side driver of the test suite
(tests/harness/kong_side.py), which is Python too: absolute numbers include its own cost, the
comparison with the bare plugins (same driver, same round trips) isolates ours.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

from bench import cases, core
from bench.load import HEADER, Case, Result, measure

CONNECTIONS = (1, 8)


def protocol_section(requests: int) -> list[str]:
    lines = ["## Through the plugin servers", "", HEADER]
    comparisons = ["", "| path (warm) | ours µs (p50, 1 conn.) | bare plugin, same round trips µs "
                       "| our logic adds |", "|---|---:|---:|---:|"]
    with cases.world() as w:
        key = cases.new_key()
        plugin_cases: list[Case] = [
            cases.ip_allowlist(w),
            cases.client_cert_auth(w), cases.client_cert_auth(w, cold=True),
            cases.api_key_auth(w, key), cases.api_key_auth(w, key, cold=True),
            cases.full_chain(w, key),
        ]
        bare_by_calls: dict[int, Result] = {}
        lines.extend(_rows(cases.bare(w, 1), requests, bare_by_calls))
        for case in plugin_cases:
            results = [measure(case, connections=c, requests=requests) for c in CONNECTIONS]
            lines.extend(r.row() for r in results)
            calls = results[0].round_trips
            if calls not in bare_by_calls:
                lines.extend(_rows(cases.bare(w, calls), requests, bare_by_calls))
            if "cold" not in case.name:
                ours, base = results[0].p50_us, bare_by_calls[calls].p50_us
                added = 100 * (ours / base - 1)
                comparisons.append(f"| {case.name} | {ours:,.0f} | {base:,.0f} | {added:+.0f}% |")
    return lines + comparisons


def _rows(case: Case, requests: int, bare_by_calls: dict[int, Result]) -> list[str]:
    results = [measure(case, connections=c, requests=requests) for c in CONNECTIONS]
    bare_by_calls[results[0].round_trips] = results[0]
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
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--requests", type=int, default=3000, help="requests per protocol measurement")
    parser.add_argument("--skip-protocol", action="store_true", help="pure-core timings only")
    args = parser.parse_args(argv)
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
