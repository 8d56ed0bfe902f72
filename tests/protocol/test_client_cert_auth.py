"""client-cert-auth through the real plugin server, driven as Kong 3.9 drives it, with client chains
captured from real TLS handshakes (tests/harness/tls.py)."""

from __future__ import annotations

import base64
import contextlib
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from kong_mtls.constants import API_KEY_AUTH, CLIENT_CERT_AUTH, MESSAGE_UNEXPECTED, shared_mark
from kong_mtls.core.chain import MESSAGE_FAILED_VERIFICATION, MESSAGE_NO_CERTIFICATE, cert_sha256, spki_sha256
from kong_mtls.core.headers import other_spellings
from kong_mtls.core.identity import OWNED_HEADERS, ConsumerMapping
from kong_mtls.devpki import Authority
from tests.harness.expect import assert_invalid_config
from tests.harness.kong_side import Consumer, KongSide, Outcome, Request, decided_calls, made
from tests.harness.tls import capture_client_chain

ALICE = Consumer(id="7b0c1d2e-3f40-4a5b-8c6d-7e8f90a1b2c1", username="alice", custom_id="cust-alice")
BOB = Consumer(id="7b0c1d2e-3f40-4a5b-8c6d-7e8f90a1b2c2", username="bob")
ANON = Consumer(id="7b0c1d2e-3f40-4a5b-8c6d-7e8f90a1b2c3", username="anonymous")
EVERYONE = Consumer(id="7b0c1d2e-3f40-4a5b-8c6d-7e8f90a1b2c4", username="everyone")
CONSUMERS = [ALICE, BOB, ANON, EVERYONE]
MARK = shared_mark(CLIENT_CERT_AUTH)
ALICE_SUBJECT = "CN=alice,OU=admins,OU=payments,O=Example Org"

GET_CHAIN = "kong.client.tls.get_full_client_certificate_chain"
SUCCESS_CALLS = [GET_CHAIN, "kong.client.load_consumer", "kong.client.authenticate", "kong.ctx.shared.set",
                 "kong.service.request.set_headers", "kong.ctx.shared.set"]  # the mark last
REFUSAL_CALLS = [GET_CHAIN, "kong.client.tls.set_client_verify", "kong.log.warn",
                 "kong.response.exit"]

#: Every identity header, as a client would forge it (mixed case, repeated).
SPOOFED = [(name if i % 2 else name.lower(), "spoofed") for i, name in enumerate(OWNED_HEADERS)] + [
    ("X-Consumer-ID", "spoofed-again"), ("x-client-cert-dn", "CN=admin")] + [
    # Kong forwards underscore spellings (underscores_in_headers on); CGI/WSGI upstreams merge them.
    (spelling, "spoofed-spelling") for name in OWNED_HEADERS for spelling in other_spellings(name)]


@pytest.fixture(scope="module")
def server(plugin_server):
    return plugin_server(CLIENT_CERT_AUTH)


@pytest.fixture(scope="module")
def kong_cert(pki):
    return pki.intermediate.server(["kong.test"])


@pytest.fixture(scope="module")
def chains(pki, kong_cert):
    """Chains as Kong's get_full_client_certificate_chain returns them after a real handshake."""
    cache: dict[str, str | None] = {}

    def get(name: str) -> str | None:
        if name not in cache:
            issued, send = {
                "alice": (pki.alice, True),
                "alice-leaf-only": (pki.alice, False),
                "expired": (pki.expired(), True),
                "future": (pki.not_yet_valid(), True),
                "unknown-ca": (pki.unknown_ca_client(), True),
                "wrong-eku": (pki.server_only_eku(), True),
                "too-deep": (pki.deep_chain(2)[1], True),
                "revoked": (_REVOKED.setdefault("leaf", pki.revoked_with_crl()[0]), True),
                "stranger": (pki.client("stranger", dns=["stranger.example"]), True),
                "impostor": (pki.client("alice", dns=["alice.clients.example"]), True),
                "none": (None, True),
            }[name]
            cache[name] = capture_client_chain(issued, kong_cert, send_intermediates=send)
        return cache[name]

    return get


_REVOKED: dict = {}


def base_config(pki, **extra: Any) -> dict[str, Any]:
    return {"ca_certificates": [pki.root.cert_pem], **extra}


def run(kong: KongSide, server, chain: str | None, conf: dict, *, headers=(), **kwargs: Any) -> Outcome:
    kwargs.setdefault("consumers", CONSUMERS)
    return kong.run(Request(client_chain_pem=chain, headers=list(headers)), [(server, conf)], **kwargs)


def assert_no_spoofed_values(outcome: Outcome) -> None:
    for name, values in outcome.upstream_headers.items():
        assert not any(v.startswith("spoofed") or v == "CN=admin" for v in values), (name, values)


# -- success ---------------------------------------------------------------------------------------------

def test_success_sets_consumer_groups_and_headers(kong, server, pki, chains):
    mapping = {"subject_name": "spiffe://example.org/ns/payments/sa/alice", "consumer": "alice",
               "groups": ["ops"]}
    conf = base_config(pki, consumer_mappings=[mapping], groups_from=["mapping", "dn:OU"],
                       forward_client_cert=["rfc9440"])
    outcome = run(kong, server, chains("alice"), conf, headers=SPOOFED)
    assert outcome.proxied and outcome.client_verify is None
    credential_id = ConsumerMapping(mapping["subject_name"], "alice").credential_id
    ((consumer, credential),) = outcome.authenticated
    assert consumer["id"] == ALICE.id and consumer["username"] == "alice"
    assert credential == {"id": credential_id, "consumer": {"id": ALICE.id}}
    assert outcome.ctx_shared["authenticated_groups"] == ["ops", "payments", "admins"]
    assert outcome.ctx_shared[MARK] == {
        "verified": True, "consumer_id": ALICE.id, "consumer_username": "alice", "anonymous": False,
        "spki_sha256": spki_sha256(pki.alice.cert), "subject": ALICE_SUBJECT,
        "fingerprint_sha256": cert_sha256(pki.alice.cert)}
    headers = outcome.upstream_headers
    assert headers["x-consumer-id"] == [ALICE.id] and headers["x-consumer-username"] == ["alice"]
    assert headers["x-consumer-custom-id"] == ["cust-alice"]
    assert headers["x-credential-identifier"] == [credential_id]
    assert "x-anonymous-consumer" not in headers
    assert headers["x-client-cert-dn"] == [ALICE_SUBJECT]
    assert headers["x-client-cert-san"] == ["alice.clients.example,spiffe://example.org/ns/payments/sa/alice,"
                                           "alice@example.org,10.1.2.3"]
    der = pki.alice.cert.public_bytes(serialization.Encoding.DER)
    assert headers["client-cert"] == [f":{base64.b64encode(der).decode()}:"]
    assert len(headers["client-cert-chain"]) == 1
    assert "x-forwarded-client-cert" not in headers
    assert_no_spoofed_values(outcome)
    assert outcome.pdk_calls == decided_calls(kong, SUCCESS_CALLS)


def test_returning_client_costs_five_round_trips(kong, server, pki, chains):
    conf = base_config(pki)  # auto-match by username, no groups
    first = run(kong, server, chains("alice"), conf)
    assert first.proxied and first.authenticated[0][0]["id"] == ALICE.id
    assert first.pdk_calls.count("kong.client.load_consumer") == 1  # consumer_by compares the CN only
    second = run(kong, server, chains("alice"), conf)
    assert second.proxied and second.authenticated[0][0]["id"] == ALICE.id
    assert second.pdk_calls == decided_calls(kong, [
        GET_CHAIN, "kong.client.authenticate", "kong.service.request.set_headers", "kong.ctx.shared.set"])


def test_skip_consumer_lookup(kong, server, pki, chains):
    conf = base_config(pki, skip_consumer_lookup=True, groups_from=["cn", "spiffe_path"])
    outcome = run(kong, server, chains("alice"), conf, headers=SPOOFED)
    assert outcome.proxied and outcome.authenticated == []
    assert outcome.ctx_shared["authenticated_groups"] == ["alice", "ns", "payments", "sa"]
    mark = outcome.ctx_shared[MARK]
    assert mark["verified"] is True and mark.get("consumer_id") is None  # (a nil field does not exist in Lua)
    assert outcome.upstream_headers["x-client-cert-dn"] == [ALICE_SUBJECT]
    assert "x-consumer-id" not in outcome.upstream_headers
    assert_no_spoofed_values(outcome)
    assert outcome.pdk_calls == decided_calls(kong, [
        GET_CHAIN, "kong.ctx.shared.set", "kong.service.request.set_headers", "kong.ctx.shared.set"])


def test_partial_chain_from_a_client_that_sends_no_intermediate(kong, server, pki, chains):
    refused = run(kong, server, chains("alice-leaf-only"), base_config(pki))
    assert refused.status == 401 and "reason=UNKNOWN_CA" in refused.log_text()
    known = base_config(pki, ca_certificates=[pki.root.cert_pem, pki.intermediate.cert_pem])
    assert run(kong, server, chains("alice-leaf-only"), known).proxied
    partial = base_config(pki, ca_certificates=[pki.intermediate.cert_pem], allow_partial_chain=True)
    assert run(kong, server, chains("alice-leaf-only"), partial).proxied


# -- failures ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("chain", "reason", "extra"), [
    ("expired", "EXPIRED", {}),
    ("future", "NOT_YET_VALID", {}),
    ("unknown-ca", "UNKNOWN_CA", {}),
    ("wrong-eku", "BAD_EKU", {}),
    ("too-deep", "CHAIN_TOO_DEEP", {"max_chain_depth": 1}),
    ("revoked", "REVOKED", {"crls": "CRL", "revocation_check_mode": "STRICT"}),
    ("impostor", "PIN_MISMATCH", {"consumer_mappings": "PINNED"}),
    ("stranger", "NO_CONSUMER", {}),
])
def test_every_failure_returns_401(kong, server, pki, chains, chain, reason, extra):
    pem = chains(chain)
    if extra.get("crls") == "CRL":
        extra = {**extra, "crls": [pki.intermediate.crl().public_bytes(serialization.Encoding.PEM).decode()]}
    if extra.get("consumer_mappings") == "PINNED":
        extra = {"consumer_mappings": [{"subject_name": "alice.clients.example", "consumer": "alice",
                                        "spki_sha256": spki_sha256(pki.alice.cert)}]}
    outcome = run(kong, server, pem, base_config(pki, **extra))
    assert outcome.exit.status == 401 and outcome.exit.source == CLIENT_CERT_AUTH
    assert outcome.exit.body == {"message": MESSAGE_FAILED_VERIFICATION}
    assert f"reason={reason}" in outcome.log_text()
    assert outcome.client_verify == f"FAILED:{reason}"
    assert MARK not in outcome.ctx_shared and outcome.authenticated == []
    assert made(outcome)[-2:] == REFUSAL_CALLS[-2:] and outcome.pdk_calls[0] == GET_CHAIN


def test_no_certificate(kong, server, pki, chains):
    assert chains("none") is None
    outcome = run(kong, server, None, base_config(pki), headers=SPOOFED)
    assert outcome.exit.status == 401 and outcome.exit.body == {"message": MESSAGE_NO_CERTIFICATE}
    assert "reason=NO_CERTIFICATE" in outcome.log_text() and outcome.client_verify is None
    assert outcome.pdk_calls == decided_calls(kong, [GET_CHAIN, "kong.log.warn",
                                                     "kong.response.exit"])


def test_refusal_pdk_calls(kong, server, pki, chains):
    outcome = run(kong, server, chains("expired"), base_config(pki))
    assert outcome.pdk_calls == decided_calls(kong, REFUSAL_CALLS)


GARBAGE = {
    "not-pem": "hello, I am a certificate",
    "truncated-der": "-----BEGIN CERTIFICATE-----\nMIIByTCCAXCgAwIBAgIUOX21HH/9619WoJFa\n"
                     "-----END CERTIFICATE-----\n",
    "10mb": "-----BEGIN CERTIFICATE-----\n" + "A" * (10 * 1024 * 1024),
    "non-ascii": "-----BEGIN CERTIFICATE-----\nMIIé\n-----END CERTIFICATE-----\n",
    "invalid-utf8": "-----BEGIN CERTIFICATE-----\nMII\udcff\udcfe\n-----END CERTIFICATE-----\n",
}


@pytest.mark.parametrize(("name", "reason"), [
    ("not-pem", "MALFORMED_CHAIN"), ("truncated-der", "MALFORMED_CHAIN"), ("10mb", "CHAIN_TOO_LARGE"),
    ("non-ascii", "MALFORMED_CHAIN"), ("invalid-utf8", "MALFORMED_CHAIN"), ("50-certs", "CHAIN_TOO_LARGE"),
])
def test_garbage_chains_are_refused_with_a_reason(kong, server, pki, name, reason):
    pem = pki.alice.cert_pem * 50 if name == "50-certs" else GARBAGE[name]
    outcome = run(kong, server, pem, base_config(pki))
    assert outcome.exit.status == 401 and outcome.exit.body == {"message": MESSAGE_FAILED_VERIFICATION}
    assert f"reason={reason}" in outcome.log_text() and not outcome.rpc_errors
    # the server is not wedged
    assert run(kong, server, pki.alice.chain_pem, base_config(pki)).proxied


def test_odd_string_encodings_in_names(kong, server, pki, kong_cert):
    from cryptography import x509
    from cryptography.x509.name import _ASN1Type
    from cryptography.x509.oid import NameOID

    from kong_mtls.devpki import SubjectAltNames

    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Ünïcødé", _type=_ASN1Type.BMPString),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "univ 𝄞", _type=_ASN1Type.UniversalString),
        x509.NameAttribute(NameOID.COMMON_NAME, "bob\r\nX-Injected: yes"),
    ])
    issued = pki.intermediate.issue(subject, sans=SubjectAltNames(dns=["bob.example"]))
    conf = base_config(pki, consumer_mappings=[{"subject_name": "bob.example", "consumer": "bob"}],
                       groups_from=["dn:OU", "cn"])
    outcome = run(kong, server, capture_client_chain(issued, kong_cert), conf)
    assert outcome.proxied and outcome.authenticated[0][0]["id"] == BOB.id
    assert outcome.ctx_shared["authenticated_groups"] == ["univ 𝄞"]
    assert "x-injected" not in outcome.upstream_headers
    (dn,) = outcome.upstream_headers["x-client-cert-dn"]
    assert dn.isascii() and dn.isprintable() and dn.startswith("CN=bob\\0D\\0AX-Injected: yes,")


# -- spoofing, anonymous, default_consumer, report_only ----------------------------------------------

@pytest.mark.parametrize("case", ["success", "skip", "anonymous", "report-only", "forwarding"])
def test_spoofed_headers_never_reach_the_upstream(kong, server, pki, chains, case):
    conf, chain = {
        "success": (base_config(pki), chains("alice")),
        "skip": (base_config(pki, skip_consumer_lookup=True), chains("alice")),
        "anonymous": (base_config(pki, anonymous="anonymous"), None),
        "report-only": (base_config(pki, report_only=True), chains("expired")),
        "forwarding": (base_config(pki, forward_client_cert=["rfc9440", "xfcc"]), chains("alice")),
    }[case]
    outcome = run(kong, server, chain, conf, headers=SPOOFED)
    assert outcome.proxied
    assert_no_spoofed_values(outcome)
    assert made(outcome).count("kong.service.request.set_headers") == 1


def test_a_group_holding_a_comma_is_not_published(kong, server, pki, kong_cert):
    """Kong's acl joins groups with ", " into X-Consumer-Groups, which upstreams split on commas:
    `support,admins` would read as a group `admins`."""
    from kong_mtls.devpki import SubjectAltNames, name

    subject = name("bob", organizational_units=["support, admins", "x,admins2", "ops;admins3", "support"])
    issued = pki.intermediate.issue(subject, sans=SubjectAltNames(dns=["bob.example"]))
    conf = base_config(pki, consumer_mappings=[{"subject_name": "bob.example", "consumer": "bob"}],
                       groups_from=["dn:OU"])
    outcome = run(kong, server, capture_client_chain(issued, kong_cert), conf)
    assert outcome.proxied and outcome.ctx_shared["authenticated_groups"] == ["ops;admins3", "support"]


def test_anonymous(kong, server, pki, chains):
    conf = base_config(pki, anonymous="anonymous")
    for chain in (None, chains("expired"), chains("stranger")):
        outcome = run(kong, server, chain, conf, guard=[CLIENT_CERT_AUTH])
        assert outcome.proxied
        ((consumer, credential),) = outcome.authenticated
        assert consumer["id"] == ANON.id and credential is None
        assert outcome.upstream_headers["x-anonymous-consumer"] == ["true"]
        assert outcome.upstream_headers["x-consumer-id"] == [ANON.id]
        assert "x-credential-identifier" not in outcome.upstream_headers
        mark = outcome.ctx_shared[MARK]
        assert mark["anonymous"] is True and mark["consumer_id"] == ANON.id
        assert mark["verified"] is (chain == chains("stranger"))
        assert "authenticated_groups" not in outcome.ctx_shared
    assert outcome.client_verify == "FAILED:NO_CONSUMER"


def test_anonymous_consumer_missing_is_a_500(kong, server, pki):
    outcome = run(kong, server, None, base_config(pki, anonymous="ghost"))
    assert outcome.exit.status == 500 and outcome.exit.body == {"message": MESSAGE_UNEXPECTED}
    assert "reason=ANONYMOUS_NOT_FOUND" in outcome.log_text()


def test_default_consumer(kong, server, pki, chains):
    outcome = run(kong, server, chains("stranger"), base_config(pki, default_consumer="everyone"))
    assert outcome.proxied and outcome.authenticated[0][0]["id"] == EVERYONE.id
    assert outcome.upstream_headers["x-consumer-username"] == ["everyone"]
    assert outcome.ctx_shared[MARK]["anonymous"] is False
    assert outcome.upstream_headers["x-client-cert-dn"] == ["CN=stranger"]


def test_report_only_verifies_and_logs_but_never_blocks(kong, server, pki, chains):
    conf = base_config(pki, report_only=True)
    outcome = run(kong, server, chains("expired"), conf, guard=[CLIENT_CERT_AUTH])
    assert outcome.proxied and outcome.authenticated == []
    assert ("warn" in dict(outcome.logs)) and "report-only reason=EXPIRED" in outcome.log_text()
    assert outcome.client_verify == "FAILED:EXPIRED"
    mark = outcome.ctx_shared[MARK]
    assert mark["verified"] is False and mark.get("consumer_id") is None and mark["subject"] == "CN=expired"
    none = run(kong, server, None, conf)
    assert none.proxied and "report-only reason=NO_CERTIFICATE" in none.log_text()
    good = run(kong, server, chains("alice"), conf)
    assert good.proxied and good.authenticated[0][0]["id"] == ALICE.id
    assert "report-only" not in good.log_text()


# -- the guard, Kong 2.8, start-up ------------------------------------------------------------------------

def test_guard_sees_the_mark_only_on_passes(kong, server, pki, chains):
    assert run(kong, server, chains("alice"), base_config(pki), guard=[CLIENT_CERT_AUTH]).proxied
    refused = run(kong, server, chains("unknown-ca"), base_config(pki), guard=[CLIENT_CERT_AUTH])
    assert refused.exit.source == CLIENT_CERT_AUTH and refused.exit.status == 401


def test_kong_2_8(server, pki, chains):
    with KongSide(kong_version="2.8") as old:
        outcome = run(old, server, chains("alice"), base_config(pki))
        assert outcome.proxied and outcome.authenticated[0][0]["id"] == ALICE.id
        assert run(old, server, chains("expired"), base_config(pki)).exit.status == 401


def test_invalid_config_answers_500_naming_the_field(kong, server):
    outcome = run(kong, server, None, {"ca_certificates": ["not a pem"]})
    assert_invalid_config(outcome, CLIENT_CERT_AUTH, "ca_certificates[1]")


def test_expiring_anchor_is_logged_at_start(kong, server, pki):
    soon = Authority.root("protocol soon-expiring root", days=10)
    conf = {"ca_certificates": [soon.cert_pem, pki.root.cert_pem]}
    first = run(kong, server, None, conf)
    assert first.status == 401
    assert "anchor-expiring" in server.output() and "protocol soon-expiring root" in server.output()
    # Kong logs the server's own output at `info`; the warning also reaches Kong's log through the
    # PDK, at `warn` (visible at Kong's default level), once per instance.
    warnings = [m for level, m in first.logs if level == "warn" and "anchor-expiring" in m]
    assert len(warnings) == 1 and warnings[0].startswith(f"[{CLIENT_CERT_AUTH}] [kong-mtls]")
    assert "protocol soon-expiring root" in warnings[0]
    assert "anchor-expiring" not in run(kong, server, None, conf).log_text()


def test_certificate_bound_api_key(kong, server, plugin_server, pki, chains):
    """api-key-auth reads the mark: a key bound to the certificate's consumer and SPKI."""
    from kong_mtls.core.api_keys import credential_entry, generate_key

    key = generate_key("bound")
    keys = plugin_server(API_KEY_AUTH)
    api_conf = {"credentials": [credential_entry(key.key, ALICE.id, "bound", client_cert=True,
                                                 client_spki_sha256=[spki_sha256(pki.alice.cert)])]}
    plugins = [(server, base_config(pki)), (keys, api_conf)]
    ok = kong.run(Request(client_chain_pem=chains("alice"), headers={"apikey": key.key}), plugins,
                  consumers=CONSUMERS, guard=[CLIENT_CERT_AUTH, API_KEY_AUTH])
    assert ok.proxied, ok.log_text()
    other = kong.run(Request(client_chain_pem=chains("stranger"), headers={"apikey": key.key}),
                     [(server, base_config(pki, default_consumer="everyone")), (keys, api_conf)],
                     consumers=CONSUMERS)
    assert other.exit.status == 401 and other.exit.source == API_KEY_AUTH


# -- what nginx itself refuses under `ssl_verify_client optional_no_ca` ----------------------------------
# nginx (ngx_http_request.c, ngx_http_process_request) answers 400 "The SSL certificate error" unless
# the handshake's verify result is X509_V_OK or one of ngx_ssl_verify_error_optional()'s codes. Its
# verify callback accepts everything and keeps OpenSSL's last error; pyOpenSSL resets the error after
# each accepted callback, so the last non-zero code seen by the callback is nginx's verify result.
# self-signed leaf, self-signed in chain, no local issuer, unverifiable leaf signature, untrusted:
NGINX_OPTIONAL = {18, 19, 20, 21, 27}


def nginx_verify_result(client, server, depth: int = 4) -> int:
    from OpenSSL import SSL, crypto

    seen: list[int] = []
    server_ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    server_ctx.use_certificate(crypto.X509.from_cryptography(server.cert))
    server_ctx.use_privatekey(crypto.PKey.from_cryptography_key(server.key))
    server_ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, d, ok: seen.append(errno) or True)
    server_ctx.set_verify_depth(depth)  # nginx_proxy_ssl_verify_depth
    client_ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client_ctx.set_verify(SSL.VERIFY_NONE, lambda *args: True)
    client_ctx.use_certificate(client.cert)
    client_ctx.use_privatekey(client.key)
    for extra in client.intermediates:
        client_ctx.add_extra_chain_cert(crypto.X509.from_cryptography(extra))
    s, c = SSL.Connection(server_ctx, None), SSL.Connection(client_ctx, None)
    s.set_accept_state()
    c.set_connect_state()
    for _ in range(50):
        for conn in (c, s):
            with contextlib.suppress(SSL.WantReadError):
                conn.do_handshake()
        for src, dst in ((c, s), (s, c)):
            with contextlib.suppress(SSL.WantReadError):
                dst.bio_write(src.bio_read(65536))
    assert s.get_peer_certificate() is not None
    errors = [e for e in seen if e]
    return errors[-1] if errors else 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_which_certificates_nginx_refuses_before_the_plugin(pki, kong_cert):
    from cryptography import x509

    from kong_mtls.devpki import new_key

    agreement_only = pki.cert_sign_only_key_usage()  # keyAgreement, no digitalSignature
    encipher_only = pki.client("enc", key=new_key("rsa-2048"), key_usage=x509.KeyUsage(
        False, False, True, False, False, False, False, False, False))
    forger = Authority(subject=pki.intermediate.subject, key=new_key(), cert=pki.intermediate.cert,
                       parent=pki.root)
    holder = pki.client("not-a-ca", dns=["nac.example"])
    fake_ca = Authority(subject=holder.cert.subject, key=holder.key, cert=holder.cert,
                        parent=pki.intermediate)
    cases = {
        # reach the plugin
        "valid chain": (pki.alice, True),
        "unknown CA": (pki.unknown_ca_client(), True),
        "self-signed": (pki.self_signed(), True),
        "no EKU": (pki.no_eku(), True),
        "keyAgreement-only key usage": (agreement_only, True),
        "forged issuer signature": (forger.client("forged", dns=["f.example"]), True),
        "deeper than the nginx depth": (pki.deep_chain(6)[1], True),
        # refused by nginx with its 400 page
        "expired": (pki.expired(), False),
        "not yet valid": (pki.not_yet_valid(), False),
        "serverAuth-only EKU": (pki.server_only_eku(), False),
        "keyEncipherment-only key usage": (encipher_only, False),
        "issuer that is not a CA": (fake_ca.client("under", dns=["u.example"]), False),
    }
    for name, (issued, reaches_plugin) in cases.items():
        result = nginx_verify_result(issued, kong_cert)
        assert (result == 0 or result in NGINX_OPTIONAL) is reaches_plugin, (name, result)


@pytest.fixture
def kong(kong_either):
    """Each test here runs in a Kong without and with kong-mtls-guard loaded (tests/conftest.py)."""
    return kong_either
