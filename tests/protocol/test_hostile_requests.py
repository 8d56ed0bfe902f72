"""Hostile requests through the real plugin servers: refused or passed as they should be, never a
500, a hang, or a dropped connection (which Kong would answer by proxying)."""

from __future__ import annotations

import pytest

from kong_mtls.constants import API_KEY_AUTH, IP_ALLOWLIST
from kong_mtls.core.api_keys import credential_entry, generate_key
from tests.harness.kong_side import Consumer, Request

KEY = generate_key()
API_CONFIG = {"credentials": [credential_entry(KEY.key, "alice", KEY.key_id)], "key_in_body": True}
IP_CONFIG = {"source": "header", "header_name": "CF-Connecting-IP", "trusted_proxies_presets": ["cloudflare"]}
CF_PEER = "162.158.90.12"
ALICE = Consumer(id="5e0f7a36-0d6c-4c2e-9a53-35d4b5f1c0aa", username="alice")

HOSTILE_VALUES = {
    "invalid-utf8": b"\xff\xfe\xc3(",
    "one-megabyte": "A" * (1024 * 1024),
    "nul-and-controls": "ak_0\x00\x01\x7f.x",
    "newlines": "1.2.3.4\r\nX-Injected: yes",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_VALUES))
def test_hostile_api_keys_are_refused_cleanly(kong, plugin_server, name):
    outcome = kong.run(Request(headers={"apikey": HOSTILE_VALUES[name]}),
                       [(plugin_server(API_KEY_AUTH), API_CONFIG)], consumers=[ALICE])
    assert outcome.exit.status == 401 and not outcome.rpc_errors, outcome.log_text()


@pytest.mark.parametrize("name", sorted(HOSTILE_VALUES))
def test_hostile_client_addresses_are_refused_cleanly(kong, plugin_server, name):
    request = Request(realip_remote_addr=CF_PEER, headers={"CF-Connecting-IP": HOSTILE_VALUES[name]})
    outcome = kong.run(request, [(plugin_server(IP_ALLOWLIST), IP_CONFIG)])
    assert outcome.exit.status == 403 and not outcome.rpc_errors, outcome.log_text()
    assert "reason=HEADER_MALFORMED" in outcome.log_text()


def test_many_headers_and_a_hostile_body_still_find_the_real_key(kong, plugin_server):
    headers = [(f"X-Filler-{i}", b"\xff" * 10) for i in range(200)] + [("Content-Type", "application/json")]
    body = b'{"apikey": "' + KEY.key.encode() + b'", "nested": {"a": [1, 2, {"b": null}]}}'
    outcome = kong.run(Request(method="POST", headers=headers, body=body),
                       [(plugin_server(API_KEY_AUTH), API_CONFIG)], consumers=[ALICE])
    assert outcome.proxied and not outcome.rpc_errors, outcome.log_text()
    assert outcome.upstream_headers["x-consumer-username"] == ["alice"]


def test_a_hostile_request_leaves_the_server_serving(kong, plugin_server):
    for value in HOSTILE_VALUES.values():
        kong.run(Request(headers={"apikey": value}), [(plugin_server(API_KEY_AUTH), API_CONFIG)])
    outcome = kong.run(Request(headers={"apikey": KEY.key}), [(plugin_server(API_KEY_AUTH), API_CONFIG)],
                       consumers=[ALICE])
    assert outcome.proxied and outcome.upstream_headers["x-consumer-username"] == ["alice"]
