"""A short soak through every plugin server (the long one is `./dev soak`)."""

from __future__ import annotations

import pytest

from bench.soak import RSS_LIMIT_KB, soak


@pytest.mark.parametrize("guard_loaded", [False, True], ids=["guard-not-loaded", "guard-loaded"])
def test_mixed_traffic_keeps_servers_flat(guard_loaded: bool) -> None:
    # Every request is checked against its expected status inside `soak` (it raises otherwise).
    result = soak(total=1500, warmup=300, guard_loaded=guard_loaded)
    assert set(result) == {"ip-allowlist", "client-cert-auth", "api-key-auth", "upstream-identity", "trivial"}
    for server, (before, after) in result.items():
        assert after.greenlets - before.greenlets < 5, server  # one leaked per refusal would be +100s
        assert after.events == 0, server
        assert after.rss_kb - before.rss_kb < RSS_LIMIT_KB, server
