"""A short soak through every plugin server (the long one is `./dev soak`)."""

from __future__ import annotations

from bench.soak import RSS_LIMIT_KB, soak


def test_mixed_traffic_keeps_servers_flat():
    # Every request is checked against its expected status inside `soak` (it raises otherwise).
    result = soak(total=1500, warmup=300)
    assert set(result) == {"ip-allowlist", "client-cert-auth", "api-key-auth", "upstream-identity", "trivial"}
    for server, (before, after) in result.items():
        assert after.greenlets - before.greenlets < 5, server  # one leaked per refusal would be +100s
        assert after.events == 0, server
        assert after.rss_kb - before.rss_kb < RSS_LIMIT_KB, server
