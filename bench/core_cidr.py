"""ip-allowlist's CIDR matching: per-lookup cost with 10 and with 10,000 CIDRs, IPv4 and IPv6.

`lookup_us` is one membership test on an already parsed address (`address in AddressSet`);
`decide_us` is a whole `Policy.decide` from the peer string (parse, deny, allow, result), which is
what a request costs in Python on top of its PDK round trips: `cold` with 20,000 distinct addresses
(every parse misses the core's memo), `warm` with 500 recurring ones (a realistic set of proxies
or clients). The sets are built once, as a plugin instance does; `build_ms` is that one-off cost.
Run: `python -m bench.core_cidr`.
"""

from __future__ import annotations

import ipaddress
import random
import time
from collections.abc import Callable

from kong_mtls.core.addresses import AddressSet, IPNetwork, Policy, Source, parse_ip

SIZES = (10, 10_000)
LOOKUPS = 20_000
WARM_SET = 500
REPEATS = 5
_BITS = {4: 32, 6: 128}
_PREFIXES = {4: (8, 32), 6: (16, 128)}


def _networks(version: int, count: int, rng: random.Random) -> list[IPNetwork]:
    bits = _BITS[version]
    low, high = _PREFIXES[version]
    network = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
    return [network((rng.getrandbits(bits), rng.randint(low, high)), strict=False) for _ in range(count)]


def _addresses(version: int, networks: list[IPNetwork], rng: random.Random) -> list[str]:
    """Half inside a listed network, half random (mostly outside)."""
    bits = _BITS[version]
    factory = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    out = []
    for i in range(LOOKUPS):
        if i % 2:
            n = rng.choice(networks)
            out.append(str(factory(int(n.network_address) + rng.randrange(n.num_addresses))))
        else:
            out.append(str(factory(rng.getrandbits(bits))))
    return out


def _best_us(fn: Callable[[], object], count: int) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best / count * 1e6


def run() -> list[dict]:
    rng = random.Random(20261124)
    return [_row(version, size, rng) for version in (4, 6) for size in SIZES]


def _row(version: int, size: int, rng: random.Random) -> dict:
    networks = _networks(version, size, rng)
    start = time.perf_counter()
    compiled = AddressSet(networks)
    build_ms = (time.perf_counter() - start) * 1e3
    policy = Policy(Source.PEER, allow=compiled, deny=AddressSet(networks[: max(1, size // 100)]))
    texts = _addresses(version, networks, rng)
    parsed = [parse_ip(t) for t in texts]
    warm = texts[:WARM_SET] * (LOOKUPS // WARM_SET)
    return {
        "family": f"IPv{version}",
        "cidrs": size,
        "ranges": len(compiled),
        "build_ms": round(build_ms, 2),
        "hit_ratio": round(sum(1 for a in parsed if a in compiled) / len(parsed), 2),
        "lookup_us": round(_best_us(lambda: [a in compiled for a in parsed], len(parsed)), 3),
        "decide_cold_us": round(_best_us(lambda: [policy.decide(t) for t in texts], len(texts)), 3),
        "decide_warm_us": round(_best_us(lambda: [policy.decide(t) for t in warm], len(warm)), 3),
    }


def main() -> None:
    rows = run()
    columns = list(rows[0])
    print("  ".join(f"{c:>14}" for c in columns))
    for row in rows:
        print("  ".join(f"{row[c]!s:>14}" for c in columns))


if __name__ == "__main__":
    main()
