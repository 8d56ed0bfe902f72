"""Hostile requests through the real plugin servers, as Kong 3.9 delivers them: each is refused or
passed as it should be, never answered 500, never left hanging (an RPC timeout shows in
`rpc_errors`), never proxied when it should have been refused, and no presented key or raw control
character reaches the log. (Header-level basics are in test_hostile_requests.py.)"""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives import serialization

from kong_mtls.constants import API_KEY_AUTH, CLIENT_CERT_AUTH, IP_ALLOWLIST, shared_mark
from kong_mtls.core.api_keys import credential_entry, generate_key
from kong_mtls.core.identity import OWNED_HEADERS
from tests.harness.kong_side import Consumer, Outcome, Request

ALICE = Consumer(id="5e0f7a36-0d6c-4c2e-9a53-35d4b5f1c0aa", username="alice")
KEY = generate_key()
API_CONFIG = {"credentials": [credential_entry(KEY.key, "alice", KEY.key_id)], "key_in_body": True,
              "key_in_query": True, "hide_credentials": True}
XFF = {"source": "header", "header_name": "X-Forwarded-For", "trusted_proxies": ["10.0.0.0/8"],
       "allow": ["203.0.113.0/24"], "client_ip_header": "X-Real-Client-IP"}
PROXY = "10.0.0.5"
VISITOR = "203.0.113.7"


def pem(der: bytes) -> str:
    body = base64.encodebytes(der).decode()
    return f"-----BEGIN CERTIFICATE-----\n{body}-----END CERTIFICATE-----\n"


def refused(outcome: Outcome, status: int, reason: str) -> None:
    assert not outcome.rpc_errors, outcome.rpc_errors
    assert outcome.exit is not None and outcome.exit.status == status, outcome.log_text()
    assert outcome.exit.source not in ("kong", "guard"), outcome.log_text()
    assert any(f"reason={reason}" in msg for _, msg in outcome.logs), outcome.log_text()


def clean_log(outcome: Outcome, *secrets: str) -> None:
    text = outcome.log_text()
    for secret in secrets:
        assert secret not in text
    assert not any(ord(c) < 32 and c not in "\n\t" for c in text), repr(text)


# -- client-cert-auth -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cert_server(plugin_server):
    return plugin_server(CLIENT_CERT_AUTH)


@pytest.fixture(scope="module")
def cert_config(pki):
    return {"ca_certificates": [pki.root.cert_pem], "revocation_check_mode": "SKIP"}


def hostile_chains(pki) -> dict[str, object]:
    alice = pki.alice
    der = bytearray(alice.cert.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x40  # inside the signature
    intermediate = pki.intermediate.cert_pem
    return {
        "ten-megabytes": "-----BEGIN CERTIFICATE-----\n" + "A" * (10 * 1024 * 1024),
        "invalid-utf8": b"-----BEGIN CERTIFICATE-----\n\xff\xfe\xc3(\n-----END CERTIFICATE-----\n",
        "nul-bytes": alice.chain_pem.replace("\n", "\x00\n"),
        "thousand-begin-lines": "-----BEGIN CERTIFICATE-----\n" * 1000,
        "flipped-signature-bit": pem(bytes(der)) + intermediate,
        "intermediate-as-leaf": intermediate + alice.cert_pem,
        "leaf-only-no-path": pki.unknown_ca_client().chain_pem,
        "a-lua-table": ["-----BEGIN CERTIFICATE-----", "x"],
    }


CHAIN_REASONS = {
    "ten-megabytes": "CHAIN_TOO_LARGE",
    "invalid-utf8": "MALFORMED_CHAIN",
    "nul-bytes": "MALFORMED_CHAIN",
    "thousand-begin-lines": "CHAIN_TOO_LARGE",
    "flipped-signature-bit": "BAD_SIGNATURE",
    "intermediate-as-leaf": "LEAF_IS_CA",
    "leaf-only-no-path": "UNKNOWN_CA",
    "a-lua-table": "MALFORMED_CHAIN",
}


@pytest.mark.parametrize("name", sorted(CHAIN_REASONS))
def test_a_hostile_chain_is_refused_401_and_forged_identity_never_reaches_the_upstream(kong, cert_server,
                                                                                    cert_config, pki, name):
    chain = hostile_chains(pki)[name]
    forged = [(header, "forged") for header in OWNED_HEADERS]
    outcome = kong.run(Request(client_chain_pem=chain, headers=forged), [(cert_server, cert_config)],
                       consumers=[ALICE], guard=[CLIENT_CERT_AUTH])
    refused(outcome, 401, CHAIN_REASONS[name])
    assert shared_mark(CLIENT_CERT_AUTH) not in outcome.ctx_shared and not outcome.authenticated
    assert outcome.client_verify == f"FAILED:{CHAIN_REASONS[name]}"
    clean_log(outcome)


def test_an_unverified_certificate_cannot_write_control_characters_into_the_log(kong, cert_server,
                                                                                cert_config, pki):
    """Its subject is the client's to choose (ESC sequences, NEL, line separators)."""
    evil = pki.other_root.client("evil\x1b[2J\x1b[31mFAKE ALERT\x85\u2028")
    outcome = kong.run(Request(client_chain_pem=evil.chain_pem), [(cert_server, cert_config)],
                       guard=[CLIENT_CERT_AUTH])
    refused(outcome, 401, "UNKNOWN_CA")
    assert not any(c in outcome.log_text() for c in "\x1b\x85\u2028"), repr(outcome.log_text())


def test_the_server_still_verifies_after_hostile_chains(kong, cert_server, cert_config, pki):
    for chain in hostile_chains(pki).values():
        kong.run(Request(client_chain_pem=chain), [(cert_server, cert_config)], consumers=[ALICE])
    outcome = kong.run(Request(client_chain_pem=pki.alice.chain_pem), [(cert_server, cert_config)],
                       consumers=[ALICE], guard=[CLIENT_CERT_AUTH])
    assert outcome.proxied and outcome.upstream_headers["x-consumer-username"] == ["alice"]


# -- ip-allowlist -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ip_server(plugin_server):
    return plugin_server(IP_ALLOWLIST)


def test_two_hundred_forwarded_for_lines_the_last_hop_decides(kong, ip_server):
    """What the client wrote (199 spoofed lines) is ignored; the line the trusted proxy added counts."""
    lines = [("X-Forwarded-For", f"198.51.100.{i % 250}, 10.{i % 250}.0.1") for i in range(199)]
    lines.append(("X-Forwarded-For", VISITOR))
    outcome = kong.run(Request(realip_remote_addr=PROXY, headers=lines), [(ip_server, XFF)],
                       guard=[IP_ALLOWLIST])
    assert outcome.proxied and not outcome.rpc_errors, outcome.log_text()
    assert outcome.upstream_headers["x-real-client-ip"] == [VISITOR]


def test_a_spoofed_last_hop_is_refused(kong, ip_server):
    lines = [("X-Forwarded-For", VISITOR)] * 199 + [("X-Forwarded-For", "198.51.100.9")]
    outcome = kong.run(Request(realip_remote_addr=PROXY, headers=lines), [(ip_server, XFF)],
                       guard=[IP_ALLOWLIST])
    refused(outcome, 403, "ADDRESS_NOT_ALLOWED")


def test_more_header_lines_than_kong_returns_are_refused(kong, ip_server):
    lines = [(f"X-Filler-{i}", "v") for i in range(1000)] + [("X-Forwarded-For", VISITOR)]
    outcome = kong.run(Request(realip_remote_addr=PROXY, headers=lines), [(ip_server, XFF)],
                       guard=[IP_ALLOWLIST])
    refused(outcome, 403, "HEADER_MALFORMED")


@pytest.mark.parametrize(("value", "reason"), [
    ("A" * (1024 * 1024), "HEADER_MALFORMED"),
    (b"203.0.113.7\xff", "HEADER_MALFORMED"),
    ("203.0.113.7\x00", "HEADER_MALFORMED"),
    ("\x1b[2J203.0.113.7", "HEADER_MALFORMED"),
    ("fe80::1%eth0", "HEADER_MALFORMED"),
    ("203.000.113.007", "HEADER_MALFORMED"),
    ("[::ffff:203.0.113.7]:443", None),          # a mapped address with a port: the visitor
    ("x" * (1024 * 1024) + ", " + VISITOR, None),  # junk the client wrote, then the proxy's hop
])
def test_hostile_forwarded_for_values(kong, ip_server, value, reason):
    outcome = kong.run(Request(realip_remote_addr=PROXY, headers={"X-Forwarded-For": value}),
                       [(ip_server, XFF)], guard=[IP_ALLOWLIST])
    if reason is None:
        assert outcome.proxied and not outcome.rpc_errors
        assert outcome.upstream_headers["x-real-client-ip"] == [VISITOR]
    else:
        refused(outcome, 403, reason)
        assert outcome.exit.body == {"message": f"IP address not allowed: {PROXY}"}  # the value is not echoed
        clean_log(outcome)


def test_an_untrusted_peer_with_a_perfect_header_is_refused(kong, ip_server):
    outcome = kong.run(Request(realip_remote_addr="198.51.100.1", headers={"X-Forwarded-For": VISITOR}),
                       [(ip_server, XFF)], guard=[IP_ALLOWLIST])
    refused(outcome, 403, "UNTRUSTED_PEER_HEADER")


# -- api-key-auth -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def key_server(plugin_server):
    return plugin_server(API_KEY_AUTH)


def near_miss() -> str:
    """The real key id with another secret: found by id, refused on the secret."""
    return f"{KEY.key_id}.{generate_key().key.partition('.')[2]}"


@pytest.mark.parametrize("where", ["header", "query", "form", "json"])
def test_a_wrong_secret_is_refused_and_never_logged(kong, key_server, where):
    wrong = near_miss()
    request = {
        "header": Request(headers={"apikey": wrong}),
        "query": Request(query={"apikey": wrong}),
        "form": Request(method="POST", headers={"Content-Type": "application/x-www-form-urlencoded"},
                        body=f"apikey={wrong}".encode()),
        "json": Request(method="POST", headers={"Content-Type": "application/json"},
                        body=json.dumps({"apikey": wrong}).encode()),
    }[where]
    outcome = kong.run(request, [(key_server, API_CONFIG)], consumers=[ALICE], guard=[API_KEY_AUTH])
    refused(outcome, 401, "WRONG_SECRET")
    clean_log(outcome, wrong, wrong.partition(".")[2])
    assert wrong.partition(".")[2] not in json.dumps(outcome.exit.body) + json.dumps(outcome.exit.headers)


@pytest.mark.parametrize("name", ["invalid-utf8-query", "two-megabyte-query", "json-number", "json-nested",
                                  "json-array-body", "ten-megabyte-json"])
def test_hostile_keys_in_query_and_body_are_refused(kong, key_server, name):
    json_post = {"method": "POST", "headers": {"Content-Type": "application/json"}}
    request = {
        "invalid-utf8-query": Request(query={"apikey": b"ak_\xff\xfe.\xc3("}),
        "two-megabyte-query": Request(query={"apikey": "k" * (2 * 1024 * 1024)}),
        "json-number": Request(**json_post, body=b'{"apikey": 12345}'),
        "json-nested": Request(**json_post, body=json.dumps({"apikey": {"apikey": KEY.key}}).encode()),
        "json-array-body": Request(**json_post, body=json.dumps([{"apikey": KEY.key}]).encode()),
        "ten-megabyte-json": Request(**json_post, body=json.dumps({"pad": "x" * (10 * 1024 * 1024),
                                                                   "nested": {"apikey": KEY.key}}).encode()),
    }[name]
    outcome = kong.run(request, [(key_server, API_CONFIG)], consumers=[ALICE], guard=[API_KEY_AUTH])
    assert not outcome.rpc_errors and outcome.exit.status == 401 and outcome.exit.source == API_KEY_AUTH
    assert shared_mark(API_KEY_AUTH) not in outcome.ctx_shared and not outcome.authenticated
    clean_log(outcome, KEY.key, KEY.key.partition(".")[2])


def test_the_real_key_in_a_ten_megabyte_form_passes_and_is_hidden(kong, key_server):
    body = f"pad={'x' * (10 * 1024 * 1024)}&apikey={KEY.key}".encode()
    request = Request(method="POST", headers={"Content-Type": "application/x-www-form-urlencoded"}, body=body)
    outcome = kong.run(request, [(key_server, API_CONFIG)], consumers=[ALICE], guard=[API_KEY_AUTH])
    assert outcome.proxied and not outcome.rpc_errors, outcome.log_text()
    assert outcome.upstream_headers["x-consumer-username"] == ["alice"]
    assert KEY.key.encode() not in outcome.upstream_body  # hide_credentials
    clean_log(outcome, KEY.key)
