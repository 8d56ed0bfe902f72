"""ip-allowlist through the real plugin server: the Cloudflare origin lock and the PDK call budget."""

from __future__ import annotations

import pytest

from kong_mtls.constants import IP_ALLOWLIST, shared_mark
from kong_mtls.core.addresses import MAX_HEADER_LINES
from tests.harness.expect import assert_invalid_config
from tests.harness.kong_side import KongSide, PluginServerProcess, Request, decided_calls

MARK = shared_mark(IP_ALLOWLIST)
CF_PEER = "162.158.90.12"          # inside Cloudflare's 162.158.0.0/15
CF_PEER_V6 = "2a06:98c0:3600::103"
STRANGER = "198.51.100.23"
VISITOR = "203.0.113.77"

CF_LOCK = {"source": "header", "header_name": "CF-Connecting-IP", "trusted_proxies_presets": ["cloudflare"],
           "client_ip_header": "X-Real-Client-IP"}


@pytest.fixture(scope="module")
def allowlist(plugin_server) -> PluginServerProcess:
    return plugin_server(IP_ALLOWLIST)


def refusal_logged(outcome, reason: str) -> bool:
    return any(level == "warn" and f"reason={reason}" in msg for level, msg in outcome.logs)


# -- the Cloudflare origin lock ---------------------------------------------------------------------

@pytest.mark.parametrize("peer", [CF_PEER, CF_PEER_V6])
def test_cloudflare_peer_with_cf_connecting_ip_passes_and_publishes_the_visitor(kong, allowlist, peer):
    request = Request(realip_remote_addr=peer, client_ip=peer,
                      headers={"CF-Connecting-IP": VISITOR, "X-Real-Client-IP": "6.6.6.6"})
    outcome = kong.run(request, [(allowlist, CF_LOCK)], guard=[IP_ALLOWLIST])
    assert outcome.proxied
    assert outcome.ctx_shared[MARK] == {"client_ip": VISITOR, "peer_ip": peer, "source": "header",
                                        "trusted": True}
    # The client-sent copy is replaced by the resolved address.
    assert outcome.upstream_headers["x-real-client-ip"] == [VISITOR]
    # Two reads and two writes (with the guard's wrapper: the reads and the verdict): the whole budget.
    assert outcome.pdk_calls == decided_calls(kong, [
        "kong.nginx.get_var", "kong.request.get_headers", "kong.service.request.set_headers",
        "kong.ctx.shared.set"])


def test_cf_connecting_ip_from_a_non_cloudflare_peer_is_refused_and_never_trusted(kong, allowlist):
    request = Request(realip_remote_addr=STRANGER, client_ip=STRANGER,
                      headers={"CF-Connecting-IP": VISITOR, "X-Real-Client-IP": VISITOR})
    outcome = kong.run(request, [(allowlist, CF_LOCK)], guard=[IP_ALLOWLIST])
    assert outcome.exit.status == 403 and outcome.exit.source == IP_ALLOWLIST
    assert outcome.exit.body == {"message": f"IP address not allowed: {STRANGER}"}
    assert MARK not in outcome.ctx_shared
    assert refusal_logged(outcome, "UNTRUSTED_PEER_HEADER")
    assert "kong.service.request.set_headers" not in outcome.pdk_calls


def test_kongs_real_ip_rewrite_does_not_fool_the_lock(kong, allowlist):
    """Kong with real_ip_header = CF-Connecting-IP trusting everyone: remote_addr is the visitor, but the
    peer ($realip_remote_addr) is still a stranger, which is what the plugin checks."""
    request = Request(realip_remote_addr=STRANGER, client_ip=VISITOR, forwarded_ip=VISITOR,
                      headers={"CF-Connecting-IP": VISITOR})
    outcome = kong.run(request, [(allowlist, CF_LOCK)])
    assert outcome.exit.status == 403
    assert refusal_logged(outcome, "UNTRUSTED_PEER_HEADER")


def test_peer_outside_the_list_gets_the_configured_status_and_message(kong, allowlist):
    config = {**CF_LOCK, "status": 404, "message": "Not found"}
    outcome = kong.run(Request(realip_remote_addr=STRANGER), [(allowlist, config)])
    assert outcome.exit.status == 404 and outcome.exit.body == {"message": "Not found"}
    assert refusal_logged(outcome, "PEER_NOT_TRUSTED")
    peer_mode = {"allow_presets": ["cloudflare"], "status": 451, "message": "Cloudflare only"}
    outcome = kong.run(Request(realip_remote_addr=STRANGER), [(allowlist, peer_mode)])
    assert outcome.exit.status == 451 and outcome.exit.body == {"message": "Cloudflare only"}
    assert refusal_logged(outcome, "ADDRESS_NOT_ALLOWED")


@pytest.mark.parametrize("value", ["203.0.113.77, 203.0.113.78", "unknown", b"\xff\xfe203.0.113.77", ""])
def test_malformed_cf_connecting_ip_from_cloudflare_is_refused(kong, allowlist, value):
    request = Request(realip_remote_addr=CF_PEER, headers={"CF-Connecting-IP": value})
    outcome = kong.run(request, [(allowlist, CF_LOCK)], guard=[IP_ALLOWLIST])
    assert outcome.exit.status == 403 and outcome.exit.source == IP_ALLOWLIST
    assert outcome.exit.body == {"message": f"IP address not allowed: {CF_PEER}"}
    assert refusal_logged(outcome, "HEADER_MALFORMED")
    assert MARK not in outcome.ctx_shared


def test_repeated_cf_connecting_ip_lines_are_malformed(kong, allowlist):
    request = Request(realip_remote_addr=CF_PEER,
                      headers=[("CF-Connecting-IP", "6.6.6.6"), ("cf-connecting-ip", VISITOR)])
    outcome = kong.run(request, [(allowlist, CF_LOCK)])
    assert outcome.exit.status == 403 and refusal_logged(outcome, "HEADER_MALFORMED")


def test_visitor_allowlist_behind_cloudflare(kong, allowlist):
    config = {**CF_LOCK, "allow": ["203.0.113.0/24"], "deny": ["203.0.113.66"]}
    ok = kong.run(Request(realip_remote_addr=CF_PEER, headers={"CF-Connecting-IP": VISITOR}),
                  [(allowlist, config)])
    assert ok.proxied and ok.ctx_shared[MARK]["client_ip"] == VISITOR
    denied = kong.run(Request(realip_remote_addr=CF_PEER, headers={"CF-Connecting-IP": "203.0.113.66"}),
                      [(allowlist, config)])
    assert denied.exit.body == {"message": "IP address not allowed: 203.0.113.66"}
    assert refusal_logged(denied, "ADDRESS_DENIED")


# -- X-Forwarded-For ------------------------------------------------------------------------------------

XFF = {"source": "header", "header_name": "X-Forwarded-For", "trusted_proxies": ["10.0.0.0/8"],
       "forwarded_for_hops": 2}


def test_xff_hop_counting_ignores_the_clients_own_line(kong, allowlist):
    # The client sent its own X-Forwarded-For line; both proxies appended to the list.
    request = Request(realip_remote_addr="10.0.0.5",
                      headers=[("X-Forwarded-For", "1.1.1.1"), ("X-Forwarded-For", f"{VISITOR}, 10.9.0.1")])
    outcome = kong.run(request, [(allowlist, XFF)])
    assert outcome.proxied and outcome.ctx_shared[MARK]["client_ip"] == VISITOR


def test_xff_with_an_untrusted_hop_is_refused(kong, allowlist):
    request = Request(realip_remote_addr="10.0.0.5", headers={"X-Forwarded-For": f"{VISITOR}, 6.6.6.6"})
    outcome = kong.run(request, [(allowlist, XFF)])
    assert outcome.exit.status == 403 and refusal_logged(outcome, "UNTRUSTED_HOP")


# -- peer and forwarded sources --------------------------------------------------------------------------

def test_peer_mode_needs_one_read_and_checks_the_real_peer(kong, allowlist):
    config = {"allow": ["192.0.2.0/24"]}
    ok = kong.run(Request(realip_remote_addr="192.0.2.10", client_ip="192.0.2.10"), [(allowlist, config)])
    assert ok.proxied
    assert ok.pdk_calls == decided_calls(kong, ["kong.nginx.get_var", "kong.ctx.shared.set"])
    assert ok.ctx_shared[MARK] == {"client_ip": "192.0.2.10", "peer_ip": "192.0.2.10", "source": "peer",
                                   "trusted": True}
    # Kong's rewrite made remote_addr look allowed; the peer is not.
    spoofed = kong.run(Request(realip_remote_addr=STRANGER, client_ip="192.0.2.10",
                               headers={"X-Forwarded-For": "192.0.2.10"}), [(allowlist, config)])
    assert spoofed.exit.status == 403
    assert spoofed.exit.body == {"message": f"IP address not allowed: {STRANGER}"}


def test_peer_over_a_unix_socket_is_refused(kong, allowlist):
    outcome = kong.run(Request(realip_remote_addr="unix:", client_ip="unix:"),
                       [(allowlist, {"allow": ["0.0.0.0/0"]})])
    assert outcome.exit.status == 403
    assert outcome.exit.body == {"message": "Cannot identify the client IP address"}
    assert refusal_logged(outcome, "NO_ADDRESS")


def test_forwarded_mode_checks_kongs_resolved_address(kong, allowlist):
    config = {"source": "forwarded", "allow": ["203.0.113.0/24"], "client_ip_header": "X-Real-Client-IP"}
    ok = kong.run(Request(realip_remote_addr="10.0.0.5", forwarded_ip=VISITOR), [(allowlist, config)])
    assert ok.proxied
    assert ok.pdk_calls == decided_calls(kong, [
        "kong.nginx.get_var", "kong.client.get_forwarded_ip", "kong.service.request.set_headers",
        "kong.ctx.shared.set"])
    assert ok.ctx_shared[MARK]["source"] == "forwarded"
    assert ok.upstream_headers["x-real-client-ip"] == [VISITOR]
    refused = kong.run(Request(realip_remote_addr=VISITOR, forwarded_ip=STRANGER), [(allowlist, config)])
    assert refused.exit.status == 403 and refusal_logged(refused, "ADDRESS_NOT_ALLOWED")


# -- config and the guard -------------------------------------------------------------------------------

def test_bad_config_answers_500_naming_the_field(kong, allowlist):
    outcome = kong.run(Request(), [(allowlist, {"allow": ["10.1.2.3/8"]})])
    assert_invalid_config(outcome, IP_ALLOWLIST, "allow[1]")
    assert "host bits" in outcome.log_text()


@pytest.mark.parametrize("kong_version", ["2.8", "3.9"])
def test_every_header_line_counts_on_every_kong_version(allowlist, kong_version):
    """Kongs before 3.9 (nginx < 1.23) give `get_header` only the first line of a repeated header.
    Behind a proxy that adds its own X-Forwarded-For line instead of appending to the client's, the
    client's line comes first: reading it would let the client pick its address."""
    with KongSide(kong_version=kong_version) as kong:
        one_hop = {**XFF, "forwarded_for_hops": 1}
        appended = kong.run(Request(realip_remote_addr="10.0.0.5",
                                    headers=[("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", VISITOR)]),
                            [(allowlist, one_hop)])
        assert appended.proxied and appended.ctx_shared[MARK]["client_ip"] == VISITOR
        doubled = kong.run(Request(realip_remote_addr=CF_PEER, headers=[("CF-Connecting-IP", "6.6.6.6"),
                                                                         ("CF-Connecting-IP", VISITOR)]),
                           [(allowlist, CF_LOCK)])
        assert doubled.exit.status == 403 and refusal_logged(doubled, "HEADER_MALFORMED")


def test_a_request_with_more_header_lines_than_kong_returns_is_refused(kong, allowlist):
    padding = [(f"X-Pad-{i}", "x") for i in range(MAX_HEADER_LINES)]
    outcome = kong.run(Request(realip_remote_addr=CF_PEER, headers=[*padding, ("CF-Connecting-IP", VISITOR)]),
                       [(allowlist, CF_LOCK)])
    assert outcome.exit.status == 403 and refusal_logged(outcome, "HEADER_MALFORMED")


@pytest.fixture
def kong(kong_either):
    """Each test here runs in a Kong without and with kong-mtls-guard loaded (tests/conftest.py)."""
    return kong_either
