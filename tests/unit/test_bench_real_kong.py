"""The pure parts of the real-Kong benchmark (bench/real_kong.py): wrk and /proc parsing, the
README block, the routes' config. Nothing here starts Kong or times anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.real_kong import (
    BARE,
    BENCH_SERVERS,
    DISTINCT_CLIENTS_SCRIPT,
    FLOOR,
    README_SECTION,
    RouteSummary,
    kong_config,
    memory_line,
    parse_proc_stat,
    parse_wrk,
    protocol_costs,
    routes,
    table,
    update_readme,
    wrk_duration_us,
)
from kong_mtls.constants import GUARD, PLUGIN_MODULES

WRK_OUTPUT = """\
Running 5s test @ http://127.0.0.1:41235/api-key-auth
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.93ms    2.10ms  41.27ms   95.12%
    Req/Sec     4.41k   312.55     4.90k    68.00%
  Latency Distribution
     50%    1.71ms
     75%    1.95ms
     90%    2.31ms
     99%   12.40ms
  21950 requests in 5.00s, 3.41MB read
Requests/sec:   4388.64
Transfer/sec:    698.11KB
"""


def test_wrk_output_parsed() -> None:
    result = parse_wrk(WRK_OUTPUT)
    assert result.requests == 21950
    assert result.seconds == pytest.approx(5.0)
    assert result.rps == pytest.approx(4388.64)
    assert result.p50_us == pytest.approx(1710.0)
    assert result.p99_us == pytest.approx(12400.0)
    assert (result.non_2xx, result.socket_errors) == (0, 0)


def test_wrk_errors_counted() -> None:
    text = WRK_OUTPUT.replace(
        "Requests/sec:",
        "  Socket errors: connect 0, read 3, write 1, timeout 2\n"
        "  Non-2xx or 3xx responses: 17\nRequests/sec:")
    result = parse_wrk(text)
    assert result.non_2xx == 17
    assert result.socket_errors == 6


def test_wrk_output_without_latency_distribution_refused() -> None:
    text = "\n".join(line for line in WRK_OUTPUT.splitlines() if "%" not in line or "Stdev" in line)
    with pytest.raises(ValueError, match="--latency"):
        parse_wrk(text)


@pytest.mark.parametrize(("text", "us"), [("412.00us", 412.0), ("1.20ms", 1200.0), ("2.00s", 2e6),
                                          ("1.00m", 60e6)])
def test_wrk_durations(text: str, us: float) -> None:
    assert wrk_duration_us(text) == pytest.approx(us)


@pytest.mark.parametrize("text", ["", "12", "1.2 ms", "-1us", "1.2ns"])
def test_bad_wrk_durations(text: str) -> None:
    with pytest.raises(ValueError):
        wrk_duration_us(text)


def _stat(comm: str, ppid: int, utime: int, stime: int) -> str:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
    return f"4242 ({comm}) S {ppid} 4242 4242 0 -1 4194624 900 0 0 0 {utime} {stime} 0 0 20 0 1 0 77 0\n"


@pytest.mark.parametrize("comm", ["nginx", "python", "a) S 1 (b", "x y (z)"])
def test_proc_stat(comm: str) -> None:
    assert parse_proc_stat(_stat(comm, 17, 1234, 56)) == (17, 1290)


@pytest.mark.parametrize("text", ["", "4242 nginx S 1 2 3", "4242 (nginx) S 1 2 3 4"])
def test_bad_proc_stat(text: str) -> None:
    with pytest.raises(ValueError):
        parse_proc_stat(text)


def test_readme_block_added_then_replaced() -> None:
    text = f"# x\n\n## Benchmarks\n\n{README_SECTION}\n\n### Soak\n"
    first = update_readme(text, "3.9.1", ["table one"])
    assert "table one" in first and first.index(README_SECTION) < first.index("table one")
    both = update_readme(first, "3.4.2", ["other table"])
    assert both.index("table one") < both.index("other table")  # in the order first written
    again = update_readme(both, "3.9.1", ["table two"])
    assert again.index("table two") < again.index("other table")
    assert "table one" not in again
    assert again.count("table two") == 1 and again.count("other table") == 1
    assert again.endswith("### Soak\n")


def test_readme_without_marker_refused() -> None:
    with pytest.raises(ValueError, match="marker"):
        update_readme("# no section\n", "3.9.1", ["t"])


def test_every_route_with_our_plugins_is_guarded_for_exactly_them() -> None:
    route_list = routes(Path("/pki"), "bench", "hmac-sha256:x:y")
    config = kong_config(route_list, 8080, "bench.secret")
    served = config["services"][0]["routes"]
    assert [r["name"] for r in served] == [r.key for r in route_list]
    guarded = 0
    for route, declared in zip(route_list, served):
        names = [p["name"] for p in declared["plugins"]]
        ours = [n for n in names if n in PLUGIN_MODULES]
        assert [n for n in route.served if n not in BENCH_SERVERS] == ours
        if not ours:
            assert GUARD not in names
            continue
        guarded += 1
        assert declared["plugins"][-1]["name"] == GUARD
        assert sorted(declared["plugins"][-1]["config"]["require"]) == sorted(ours)
    assert guarded == 9
    assert sorted(r.key for r in route_list if BARE in r.served) == ["bare-1", "bare-2", "bare-4"]
    assert sorted(r.key for r in route_list if FLOOR in r.served) == ["floor-1", "floor-4"]
    assert {r["name"]: r["protocols"] for r in served}["mtls"] == ["https"]


def test_the_cache_off_rows_ask_their_plugin_servers_on_every_request() -> None:
    by_key = {r.key: r for r in routes(Path("/pki"), "bench", "hmac-sha256:x:y")}
    for key in ("ip-allowlist", "api-key-auth", "our-chain", "mtls"):
        assert by_key[key].asked == []
        assert by_key[f"{key}-rpc"].asked == by_key[key].served
        assert [p for p in by_key[f"{key}-rpc"].plugins if p["name"] != GUARD] == [
            {**p, "config": {**p["config"], "verdict_cache_ttl": 0}} for p in by_key[key].plugins
            if p["name"] != GUARD]
    assert by_key["bare-1"].asked == ["bare"]


def _summary(route, rps: float, worker: float, servers: dict[str, float]) -> RouteSummary:
    cpu = {"nginx worker": worker, **{f"{name} server": us for name, us in servers.items()}}
    return RouteSummary(route, rps, 400.0, 4000.0, cpu, 3, int(rps * 5))


def test_table_ratios_and_protocol_costs() -> None:
    by_key = {r.key: r for r in routes(Path("/pki"), "bench", "hmac-sha256:x:y")}
    summaries = [
        _summary(by_key["plain"], 10_000, 40, {BARE: 0, FLOOR: 0, "ip-allowlist": 0}),
        _summary(by_key["bare-1"], 4_000, 100, {BARE: 80, FLOOR: 0, "ip-allowlist": 0}),
        _summary(by_key["bare-4"], 2_000, 160, {BARE: 170, FLOOR: 0, "ip-allowlist": 0}),
        _summary(by_key["ip-allowlist"], 2_500, 120, {BARE: 0, FLOOR: 0, "ip-allowlist": 100}),
    ]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table(summaries)[2:]}
    ip_row = rows["our `ip-allowlist` + guard"].split(" | ")
    assert ip_row[1:3] == ["2,500", "0.25"]
    assert ip_row[5:7] == ["220", "0.18"]  # 40 / (120 + 100)
    assert ip_row[7] == "120 (30%)" and "ip-allowlist 100 (25%)" in ip_row[8]
    assert "bare" not in ip_row[8]  # a server of another route, idle
    assert protocol_costs(summaries) == (
        "From the bare rows: with our server (the bare plugin), a PDK call costs about 20 µs in Kong's "
        "worker and 30 µs in the plugin server; a plugin event, beyond its calls, about 40 µs and 50 µs.")
    summaries += [_summary(by_key["floor-1"], 5_000, 90, {BARE: 0, FLOOR: 24, "ip-allowlist": 0}),
                  _summary(by_key["floor-4"], 3_000, 150, {BARE: 0, FLOOR: 60, "ip-allowlist": 0})]
    assert protocol_costs(summaries).endswith(
        "; with the floor server, a PDK call costs about 20 µs in Kong's worker and 12 µs in the plugin "
        "server; a plugin event, beyond its calls, about 30 µs and 12 µs.")
    assert protocol_costs(summaries[:1]) is None


def test_the_many_clients_route_varies_the_address_its_plugin_checks() -> None:
    route = next(r for r in routes(Path("/pki"), "bench", "hmac-sha256:x:y") if r.distinct_clients)
    config = route.plugins[0]["config"]
    assert (config["source"], config["header_name"]) == ("header", "X-Forwarded-For")
    script = DISTINCT_CLIENTS_SCRIPT % route.distinct_clients
    assert f"math.random(0, {route.distinct_clients} - 1)" in script
    assert '"10.0.%d.%d"' in script and config["allow"] == ["10.0.0.0/8"]


def test_the_memory_line_names_every_process() -> None:
    line = memory_line({"nginx worker": (40960, 43008), "ip-allowlist server": (30720, 30720)})
    assert line.endswith("nginx worker 40.0 → 42.0; ip-allowlist server 30.0 → 30.0.")
