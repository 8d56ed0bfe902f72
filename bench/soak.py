"""`./dev soak`: a long mixed run through every plugin server; memory, greenlets and open events must
stay flat, and every request must get its expected answer.

The mix covers each plugin's success path and every refusal path, plus a handler whose first PDK
call is `kong.response.exit` and one that raises before any PDK call (the two cases that leak or
wedge a stock kong-pdk 0.36 server).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from bench import cases
from bench.load import Case, run_once
from tests.harness.kong_side import KongSide, PluginServerProcess, Request
from tests.harness.tls import capture_client_chain
from tests.harness.tls_servers import closed_port

UPSTREAM_HOST = "upstream.test"
RSS_LIMIT_KB = 5 * 1024


@dataclass(frozen=True)
class ServerStats:
    rss_kb: int
    greenlets: int
    events: int


@contextlib.contextmanager
def mix(w: cases.World) -> Iterator[list[Case]]:
    """Every path, each with the status Kong would answer."""
    pki = w.pki
    kong_cert = pki.root.server(["kong.test"])
    alice = capture_client_chain(pki.alice, kong_cert)
    stranger = capture_client_chain(pki.unknown_ca_client(), kong_cert)
    expired = capture_client_chain(pki.expired(), kong_cert)
    key = cases.new_key()
    ip = w.server("ip-allowlist")
    cert = w.server("client-cert-auth")
    api = w.server("api-key-auth")
    up = w.server("upstream-identity")
    trivial = w.server("trivial", "tests.plugins.trivial")
    ip_conf = cases.ip_allowlist_config()
    cert_conf = cases.client_cert_config(w)
    key_conf = cases.api_key_config(key)
    with cases.upstream_config(w) as up_conf:
        down_conf = {**up_conf, "port": closed_port()}
        peer, visitor = cases.CLOUDFLARE_PEER, cases.VISITOR
        yield [
            Case("ip pass", [(ip, ip_conf)],
                 lambda i: Request(client_ip=peer, headers={"CF-Connecting-IP": visitor})),
            Case("ip untrusted peer header", [(ip, ip_conf)],
                 lambda i: Request(client_ip=visitor, headers={"CF-Connecting-IP": "1.2.3.4"}),
                 expect_status=403),
            Case("ip malformed header", [(ip, ip_conf)],
                 lambda i: Request(client_ip=peer, headers={"CF-Connecting-IP": "1.2.3.4, 5.6.7.8"}),
                 expect_status=403),
            Case("cert pass", [(cert, cert_conf)], lambda i: Request(client_chain_pem=alice),
                 consumers=[cases.ALICE]),
            Case("cert none", [(cert, cert_conf)], lambda i: Request(), expect_status=401),
            Case("cert unknown CA", [(cert, cert_conf)], lambda i: Request(client_chain_pem=stranger),
                 expect_status=401),
            Case("cert expired", [(cert, cert_conf)], lambda i: Request(client_chain_pem=expired),
                 expect_status=401),
            Case("cert garbage", [(cert, cert_conf)],
                 lambda i: Request(client_chain_pem=f"-----BEGIN CERTIFICATE-----\n{i}\n"),
                 expect_status=401),
            Case("key pass", [(api, key_conf)], lambda i: Request(headers={"apikey": key.key}),
                 consumers=[cases.ALICE]),
            Case("key missing", [(api, key_conf)], lambda i: Request(), expect_status=401),
            Case("key wrong", [(api, key_conf)], lambda i: Request(headers={"apikey": f"{key.key_id}.x{i}"}),
                 expect_status=401),
            Case("upstream pass", [(up, up_conf)], lambda i: Request()),
            Case("upstream down", [(up, down_conf)], lambda i: Request(), expect_status=502),
            Case("exit as first PDK call", [(trivial, {"mode": "exit-first"})], lambda i: Request(),
                 expect_status=401),
            Case("raise before first PDK call", [(trivial, {"mode": "raise-first"})], lambda i: Request(),
                 expect_status=500),
        ]


def stats(kong: KongSide, server: PluginServerProcess) -> ServerStats:
    runtime = kong._rpc(server).call("plugin.GetRuntimeStats")
    return ServerStats(server.rss_kb(), runtime["Greenlets"], runtime["Events"])


def soak(total: int, warmup: int, *, progress: bool = False,
         guard_loaded: bool = False) -> dict[str, tuple[ServerStats, ServerStats]]:
    """Run `warmup` then `total` requests round-robin over the mix (in a Kong with kong-mtls-guard
    loaded: its wrapper applies the verdicts); return stats per server."""
    with cases.world() as w, mix(w) as paths, KongSide(verdict_wrapper=guard_loaded) as kong:
        for i in range(warmup):
            run_once(paths[i % len(paths)], kong, i)
        before = {name: stats(kong, s) for name, s in w.servers.items()}
        started = time.monotonic()
        for i in range(total):
            run_once(paths[i % len(paths)], kong, i)
            if progress and i and i % 20_000 == 0:
                rate = i / (time.monotonic() - started)
                print(f"  {i:,} requests, {rate:,.0f}/s", file=sys.stderr)
        after = {name: stats(kong, s) for name, s in w.servers.items()}
    return {name: (before[name], after[name]) for name in before}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--warmup", type=int, default=5_000)
    parser.add_argument("--guard-loaded", action="store_true",
                        help="Kong's side as with kong-mtls-guard loaded (its wrapper applies the verdicts)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    result = soak(args.requests, args.warmup, progress=True, guard_loaded=args.guard_loaded)
    elapsed = time.monotonic() - started
    print(f"{args.requests:,} requests after {args.warmup:,} of warm-up"
          f"{', kong-mtls-guard loaded' if args.guard_loaded else ''}, every answer as expected, "
          f"{elapsed:.0f} s\n")
    print("| plugin server | RSS after warm-up (KiB) | RSS at end (KiB) | growth (KiB) | greenlets "
          "| open events |")
    print("|---|---:|---:|---:|---:|---:|")
    worst = 0
    for server, (before, after) in result.items():
        growth = after.rss_kb - before.rss_kb
        worst = max(worst, growth)
        print(f"| {server} | {before.rss_kb:,} | {after.rss_kb:,} | {growth:+,} | "
              f"{before.greenlets} -> {after.greenlets} | {before.events} -> {after.events} |")
    return 0 if worst < RSS_LIMIT_KB else 1


if __name__ == "__main__":
    sys.exit(main())
