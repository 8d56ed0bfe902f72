"""api-key-auth through the real plugin server, driven as Kong 3.9 drives it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kong_mtls.constants import (
    API_KEY_AUTH,
    CLIENT_CERT_AUTH,
    HEADER_CERT_AUTH,
    IP_ALLOWLIST,
    shared_mark,
    verdict_slot,
)
from kong_mtls.core.api_keys import credential_entry, credential_identifier, generate_key
from tests.harness.expect import assert_invalid_config
from tests.harness.kong_side import Consumer, KongSide, Outcome, Request, decided_calls, made

ALICE = Consumer(id="5d0b9a36-1c5e-4f0e-9a8b-3f2d1c0b0a01", username="alice", custom_id="cust-a")
BOB = Consumer(id="5d0b9a36-1c5e-4f0e-9a8b-3f2d1c0b0a02", username="bob")
GUEST = Consumer(id="5d0b9a36-1c5e-4f0e-9a8b-3f2d1c0b0a0f", username="guest")
CONSUMERS = [ALICE, BOB, GUEST]
MARK = shared_mark(API_KEY_AUTH)
SPKI = "5a" * 32

PLAIN = generate_key("plain")
EXPIRED = generate_key("expired")
NETWORK = generate_key("network")
CERT = generate_key("cert")
LEGACY = "e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6"
INDEX_SECRET = "protocol-test-index-secret"
FORGED = "plain." + generate_key().key.split(".", 1)[1]
SECRETS = [PLAIN.key, EXPIRED.key, NETWORK.key, CERT.key, LEGACY, FORGED]

CREDENTIALS = [
    credential_entry(PLAIN.key, "alice", "plain"),
    credential_entry(EXPIRED.key, "alice", "expired", expires_at="2020-09-13T12:26:40Z"),
    credential_entry(NETWORK.key, "bob", "network", allowed_cidrs=["10.0.0.0/8"]),
    credential_entry(CERT.key, ALICE.id, "cert", client_cert=True, client_spki_sha256=[SPKI]),
    credential_entry(LEGACY, "bob", "legacy", index_secret=INDEX_SECRET),
]


@pytest.fixture(scope="module")
def server(plugin_server):
    return plugin_server(API_KEY_AUTH)


def config(**extra: Any) -> dict[str, Any]:
    """Every source on but the body (key_in_query is off by default: URLs end up in logs)."""
    return {"credentials": CREDENTIALS, "key_in_query": True, "key_index_secret": INDEX_SECRET, **extra}


def run(kong: KongSide, server, request: Request, conf: dict | None = None, **kwargs: Any) -> Outcome:
    kwargs.setdefault("consumers", CONSUMERS)
    return kong.run(request, [(server, conf or config())], **kwargs)


def header_request(key: str, **kwargs: Any) -> Request:
    headers = {"apikey": key, **kwargs.pop("headers", {})}
    return Request(headers=headers, **kwargs)


def cert_mark(consumer: Consumer) -> dict:
    return {"verified": True, "consumer_id": consumer.id, "consumer_username": consumer.username,
            "anonymous": False, "spki_sha256": SPKI, "subject": "CN=client", "fingerprint_sha256": "77" * 32}


# -- success -----------------------------------------------------------------------------------------
def test_valid_key_in_header(kong: KongSide, server) -> None:
    spoofed = {"X-Consumer-Username": "admin", "X-Anonymous-Consumer": "true", "X-Credential-Identifier": "x",
               "X_Consumer_Username": "admin", "X-Consumer_ID": "forged", "X_Consumer_Groups": "admins",
               "X-Authenticated-Groups": "admins"}
    outcome = run(kong, server, header_request(PLAIN.key, headers=spoofed))
    for forged in ("x_consumer_username", "x-consumer_id", "x_consumer_groups", "x-authenticated-groups"):
        assert forged not in outcome.upstream_headers, forged
    assert outcome.proxied and not outcome.rpc_errors
    credential = {"id": credential_identifier("plain"), "consumer": {"id": ALICE.id}}
    assert outcome.authenticated == [(ALICE.as_lua(), credential)]
    assert outcome.header("X-Consumer-ID") == ALICE.id
    assert outcome.header("X-Consumer-Username") == "alice"
    assert outcome.header("X-Consumer-Custom-ID") == "cust-a"
    assert outcome.header("X-Credential-Identifier") == credential_identifier("plain")
    assert outcome.header("X-Anonymous-Consumer") is None
    assert outcome.ctx_shared[MARK] == {"key_id": "plain", "consumer_id": ALICE.id, "anonymous": False}
    assert outcome.pdk_calls == decided_calls(kong, [
        "kong.request.get_headers", "kong.client.load_consumer", "kong.client.authenticate",
        "kong.service.request.set_headers", "kong.ctx.shared.set"])


def test_consumer_lookups_are_cached_by_the_instance(kong: KongSide, server) -> None:
    run(kong, server, header_request(PLAIN.key))
    again = run(kong, server, header_request(PLAIN.key))
    assert again.proxied and "kong.client.load_consumer" not in again.pdk_calls
    assert again.pdk_calls == decided_calls(kong, [
        "kong.request.get_headers", "kong.client.authenticate", "kong.service.request.set_headers",
        "kong.ctx.shared.set"])


def test_migrated_key_in_query_and_form_and_json_body(kong: KongSide, server) -> None:
    outcome = run(kong, server, Request(query={"apikey": LEGACY, "page": "2"}))
    assert outcome.proxied and outcome.header("X-Consumer-Username") == "bob"
    assert outcome.upstream_query["apikey"] == [LEGACY]  # hide_credentials is off
    conf = config(key_in_body=True)
    form = Request(method="POST", headers={"Content-Type": "application/x-www-form-urlencoded"},
                   body=f"apikey={LEGACY}&x=1".encode())
    assert run(kong, server, form, conf).header("X-Consumer-Username") == "bob"
    body = Request(method="POST", headers={"Content-Type": "application/json"},
                   body=json.dumps({"apikey": PLAIN.key, "n": 1}).encode())
    assert run(kong, server, body, conf).header("X-Consumer-Username") == "alice"


def test_body_is_read_only_when_needed(kong: KongSide, server) -> None:
    outcome = run(kong, server, header_request(PLAIN.key), config(key_in_body=True))
    assert "kong.request.get_body" not in outcome.pdk_calls
    assert "kong.request.get_query" not in outcome.pdk_calls


# -- hide_credentials ------------------------------------------------------------------------------
def test_hide_credentials_header(kong: KongSide, server) -> None:
    outcome = run(kong, server, header_request(PLAIN.key, headers={"Accept": "*/*"}),
                  config(hide_credentials=True))
    assert outcome.proxied and "apikey" not in outcome.upstream_headers
    assert outcome.header("accept") == "*/*"
    assert made(outcome).count("kong.service.request.set_headers") == 1


def test_query_keys_are_not_read_by_default(kong: KongSide, server) -> None:
    outcome = run(kong, server, Request(query={"apikey": PLAIN.key}),
                  {"credentials": CREDENTIALS, "key_index_secret": INDEX_SECRET})
    assert (outcome.status, outcome.message) == (401, "No API key found in request")
    assert "kong.request.get_query" not in outcome.pdk_calls


def test_hide_credentials_query(kong: KongSide, server) -> None:
    request = Request(query={"apikey": PLAIN.key, "page": "2"})
    outcome = run(kong, server, request, config(hide_credentials=True))
    assert outcome.proxied and outcome.upstream_query == {"page": ["2"]}


def test_hide_credentials_form_body(kong: KongSide, server) -> None:
    request = Request(method="POST", headers={"Content-Type": "application/x-www-form-urlencoded"},
                      body=f"amount=10&apikey={PLAIN.key}".encode())
    outcome = run(kong, server, request, config(key_in_body=True, hide_credentials=True))
    assert outcome.proxied and outcome.upstream_body == b"amount=10"


def test_hide_credentials_json_body(kong: KongSide, server) -> None:
    request = Request(method="POST", headers={"Content-Type": "application/json"},
                      body=json.dumps({"apikey": PLAIN.key, "order": {"id": 7}}).encode())
    outcome = run(kong, server, request, config(key_in_body=True, hide_credentials=True))
    assert outcome.proxied and json.loads(outcome.upstream_body) == {"order": {"id": 7}}


# -- failures: status, body, header; no mark, no consumer ---------------------------------------------
FAILURES = [
    ("no key", Request(), "No API key found in request", "NO_KEY"),
    ("duplicate header", Request(headers=[("apikey", PLAIN.key), ("apikey", PLAIN.key)]),
     "Duplicate API key found", "DUPLICATE_KEY"),
    ("duplicate query", Request(query={"apikey": [LEGACY, LEGACY]}), "Duplicate API key found",
     "DUPLICATE_KEY"),
    ("unknown key", header_request(generate_key().key), "Unauthorized", "UNKNOWN_KEY"),
    ("wrong secret, right id", header_request(FORGED), "Unauthorized", "WRONG_SECRET"),
    ("expired", header_request(EXPIRED.key), "Unauthorized", "KEY_EXPIRED"),
    ("outside the CIDR", header_request(NETWORK.key, client_ip="192.0.2.9"), "Unauthorized",
     "CLIENT_IP_NOT_ALLOWED"),
    ("no certificate", header_request(CERT.key), "Unauthorized", "CERT_MISSING"),
]


@pytest.mark.parametrize(("request_", "message", "reason"), [f[1:] for f in FAILURES],
                         ids=[f[0] for f in FAILURES])
def test_failures(kong: KongSide, server, request_: Request, message: str, reason: str) -> None:
    outcome = run(kong, server, request_)
    assert outcome.exit is not None and outcome.exit.source == API_KEY_AUTH
    assert (outcome.exit.status, outcome.exit.body) == (401, {"message": message})
    assert outcome.exit.headers == {"WWW-Authenticate": "Key"}
    assert MARK not in outcome.ctx_shared and outcome.authenticated == []
    assert f"reason={reason}" in outcome.log_text()


def test_realm(kong: KongSide, server) -> None:
    outcome = run(kong, server, Request(), config(realm="orders"))
    assert outcome.exit.headers == {"WWW-Authenticate": 'Key realm="orders"'}


def test_cidr_bound_key_uses_ip_allowlist_verdict(kong: KongSide, server) -> None:
    inside = {shared_mark(IP_ALLOWLIST): {"client_ip": "10.1.2.3", "peer_ip": "192.0.2.9", "source": "header",
                                           "trusted": True}}
    outcome = run(kong, server, header_request(NETWORK.key, client_ip="192.0.2.9"), ctx_shared=inside)
    assert outcome.proxied and outcome.header("X-Consumer-Username") == "bob"
    assert "kong.client.get_forwarded_ip" not in outcome.pdk_calls
    outcome = run(kong, server, header_request(NETWORK.key, client_ip="10.0.0.9"))
    assert outcome.proxied and "kong.client.get_forwarded_ip" in outcome.pdk_calls


def test_cert_bound_key(kong: KongSide, server) -> None:
    # Kong's handshake (client-cert-auth), or a certificate an edge forwarded (header-cert-auth).
    for verifier in (CLIENT_CERT_AUTH, HEADER_CERT_AUTH):
        same = {shared_mark(verifier): cert_mark(ALICE)}
        outcome = run(kong, server, header_request(CERT.key), ctx_shared=same)
        assert outcome.proxied and outcome.header("X-Consumer-ID") == ALICE.id
        other = {shared_mark(verifier): cert_mark(BOB)}
        outcome = run(kong, server, header_request(CERT.key), ctx_shared=other)
        assert outcome.status == 401 and "reason=CERT_CONSUMER_MISMATCH" in outcome.log_text()


def test_consumer_not_found(kong: KongSide, server) -> None:
    outcome = run(kong, server, header_request(PLAIN.key), consumers=[BOB])
    assert outcome.status == 401 and "reason=CONSUMER_NOT_FOUND" in outcome.log_text()


# -- anonymous, preflight --------------------------------------------------------------------------------
def test_anonymous(kong: KongSide, server) -> None:
    outcome = run(kong, server, header_request(FORGED, headers={"X-Consumer-Custom-ID": "spoof"}),
                  config(anonymous="guest", hide_credentials=True))
    assert outcome.proxied
    assert outcome.authenticated == [(GUEST.as_lua(), None)]
    assert outcome.header("X-Anonymous-Consumer") == "true"
    assert outcome.header("X-Consumer-Username") == "guest"
    assert outcome.header("X-Consumer-Custom-ID") is None
    assert outcome.header("X-Credential-Identifier") is None
    assert "apikey" not in outcome.upstream_headers
    assert outcome.ctx_shared[MARK] == {"consumer_id": GUEST.id, "anonymous": True, "reason": "WRONG_SECRET"}


def test_anonymous_consumer_missing_is_a_500(kong: KongSide, server) -> None:
    outcome = run(kong, server, Request(), config(anonymous="nobody"))
    assert (outcome.status, outcome.message) == (500, "An unexpected error occurred")
    assert MARK not in outcome.ctx_shared and "reason=ANONYMOUS_NOT_FOUND" in outcome.log_text()


def test_anonymous_skips_an_already_authenticated_request(kong: KongSide, server) -> None:
    # Another auth plugin authenticated first (played here by a second instance with its own config):
    # with `anonymous`, key-auth's logical OR stops there without looking for a key.
    first = config(key_names=["x-first-key"])
    second = config(anonymous="guest")
    outcome = kong.run(Request(headers={"x-first-key": PLAIN.key}), [(server, first), (server, second)],
                       consumers=CONSUMERS)
    assert outcome.proxied and len(outcome.authenticated) == 1
    assert outcome.pdk_calls[-2:] == ["kong.client.get_credential", "kong.ctx.shared.set"]
    assert outcome.ctx_shared[MARK] == {"anonymous": False, "reason": "ALREADY_AUTHENTICATED"}


def test_preflight(kong: KongSide, server) -> None:
    outcome = run(kong, server, Request(method="OPTIONS"), config(run_on_preflight=False))
    assert outcome.proxied and outcome.authenticated == []
    assert outcome.pdk_calls == decided_calls(kong, [
        "kong.request.get_method", "kong.client.get_consumer", "kong.service.request.set_headers",
        "kong.ctx.shared.set"])
    assert outcome.ctx_shared[MARK] == {"anonymous": False, "reason": "PREFLIGHT"}
    assert run(kong, server, Request(method="OPTIONS")).status == 401  # run_on_preflight defaults to true


def test_preflight_never_forwards_forged_identity_headers(kong: KongSide, server) -> None:
    spoofed = {"X-Consumer-ID": ALICE.id, "X-Consumer-Username": "alice", "X-Consumer-Custom-ID": "cust-a",
               "X-Credential-Identifier": credential_identifier("plain"), "X-Anonymous-Consumer": "false"}
    outcome = run(kong, server, Request(method="OPTIONS", headers=spoofed), config(run_on_preflight=False),
                  guard=[API_KEY_AUTH])
    assert outcome.proxied  # the guard lets it through on the PREFLIGHT mark ...
    for name in spoofed:  # ... so nothing a client claims about itself may go with it
        assert outcome.header(name) is None, name


def test_hide_credentials_holds_on_a_skipped_preflight(kong: KongSide, server) -> None:
    """The key goes upstream on no path: a preflight let through without looking still loses it."""
    request = Request(method="OPTIONS", headers={"apikey": PLAIN.key},
                      query={"apikey": PLAIN.key, "page": "2"})
    outcome = run(kong, server, request, config(run_on_preflight=False, hide_credentials=True))
    assert outcome.proxied and "apikey" not in outcome.upstream_headers
    assert outcome.upstream_query == {"page": ["2"]}


def test_preflight_keeps_the_headers_of_an_earlier_authentication(kong: KongSide, server) -> None:
    first = config(key_names=["x-first-key"])
    second = config(run_on_preflight=False)
    outcome = kong.run(Request(method="OPTIONS", headers={"x-first-key": PLAIN.key}),
                       [(server, first), (server, second)], consumers=CONSUMERS)
    assert outcome.proxied and outcome.ctx_shared[MARK]["reason"] == "PREFLIGHT"
    assert outcome.header("X-Consumer-ID") == ALICE.id
    assert outcome.header("X-Credential-Identifier") == credential_identifier("plain")


# -- guard, config errors, Kong 2.8 --------------------------------------------------------------------------
def test_guard_sees_the_mark_only_on_pass(kong: KongSide, server) -> None:
    assert run(kong, server, header_request(PLAIN.key), guard=[API_KEY_AUTH]).proxied
    refused = run(kong, server, header_request(FORGED), guard=[API_KEY_AUTH])
    assert refused.exit.source == API_KEY_AUTH and refused.status == 401


def test_bad_credential_config_answers_500_naming_the_field(kong: KongSide, server) -> None:
    broken = [CREDENTIALS[0], {**CREDENTIALS[1], "hash": "sha256:nope"}]
    outcome = run(kong, server, header_request(PLAIN.key), config(credentials=broken))
    assert_invalid_config(outcome, API_KEY_AUTH, "credentials[2].hash")


def test_kong_28_body_errors_are_no_key(server) -> None:
    with KongSide(kong_version="2.8") as kong28:
        outcome = run(kong28, server, Request(method="GET"), config(key_in_body=True))
    assert (outcome.status, outcome.message) == (401, "No API key found in request")


# -- the secret never shows ------------------------------------------------------------------------------
def test_secret_appears_nowhere(kong: KongSide, server) -> None:
    hide = config(hide_credentials=True, key_in_body=True)
    scenarios = [
        (header_request(PLAIN.key), hide),
        (Request(query={"apikey": FORGED}), hide),
        (header_request(EXPIRED.key), hide),
        (header_request(NETWORK.key, client_ip="192.0.2.1"), hide),
        (header_request(CERT.key), hide),
        (Request(method="POST", headers={"Content-Type": "application/json"},
                 body=json.dumps({"apikey": LEGACY}).encode()), hide),
        (header_request(LEGACY + "0"), hide),
        (header_request(FORGED), config(anonymous="guest", hide_credentials=True)),
        (Request(headers=[("apikey", PLAIN.key), ("apikey", FORGED)]),
         config(anonymous="guest", hide_credentials=True)),
    ]
    seen = []
    for request, conf in scenarios:
        outcome = run(kong, server, request, conf)
        # what the client sees when refused, what the upstream gets when proxied, and the logs
        upstream = [outcome.upstream_headers, outcome.upstream_query, outcome.upstream_body.decode()]
        seen.append(json.dumps({
            "logs": outcome.logs, "exit": outcome.exit and [outcome.exit.body, outcome.exit.headers],
            "upstream": upstream if outcome.proxied else None, "authenticated": outcome.authenticated,
            "ctx_shared": outcome.ctx_shared,
        }, default=str))
    assert sum(1 for entry in seen if '"upstream": null' not in entry) == 4  # proxied scenarios
    seen.append(server.output())
    everything = "\n".join(seen)
    for key in SECRETS:
        for secret in {key, key.split(".", 1)[-1]}:
            assert secret not in everything


def test_a_record_another_plugin_planted_in_the_verdict_slot_is_never_applied(server) -> None:
    """With kong-mtls-guard loaded, only what the plugin server leaves in this event is applied. A
    pass whose changes the wrapper cannot make (the query rewritten without the key) leaves no
    verdict; a record an earlier plugin put in the slot (one copying client data into
    kong.ctx.shared, say) must not give the request another identity."""
    planted = {"apply": True, "ttl": 0, "inputs": [],
               "calls": [["kong.service.request.set_headers", [{"X-Consumer-Username": "admin"}], 1]]}
    with KongSide(verdict_wrapper=True) as kong:
        outcome = run(kong, server, Request(query={"apikey": PLAIN.key, "page": "2"}),
                      config(hide_credentials=True), ctx_shared={verdict_slot(API_KEY_AUTH): planted})
    assert outcome.proxied and outcome.upstream_query == {"page": ["2"]} and outcome.verdicts == []
    assert outcome.header("X-Consumer-Username") == "alice"


@pytest.fixture
def kong(kong_either):
    """Each test here runs in a Kong without and with kong-mtls-guard loaded (tests/conftest.py)."""
    return kong_either
