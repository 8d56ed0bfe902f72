"""header-cert-auth through the real plugin server, driven as Kong drives it: an edge forwarding the
client's certificate, a stranger sending the same header, and what reaches the upstream."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import serialization

from kong_mtls.constants import HEADER_CERT_AUTH, shared_mark
from kong_mtls.core.chain import MESSAGE_FAILED_VERIFICATION, MESSAGE_NO_CERTIFICATE
from kong_mtls.core.headers import other_spellings
from kong_mtls.core.identity import OWNED_HEADERS
from kong_mtls.devpki import Authority
from tests.harness.kong_side import Consumer, Request, decided_calls

ALICE = Consumer(id="7b0c1d2e-3f40-4a5b-8c6d-7e8f90a1b2c1", username="alice")
MARK = shared_mark(HEADER_CERT_AUTH)
EDGE = "203.0.113.10"  # the edge's own address (TEST-NET-3)
CLOUDFLARE_PEER = "173.245.48.10"  # inside Cloudflare's 173.245.48.0/20
STRANGER = "198.51.100.23"
FORWARDED = ("Client-Cert", "Client-Cert-Chain", "Client-Cert-Verified")


@pytest.fixture(scope="module")
def server(plugin_server):
    return plugin_server(HEADER_CERT_AUTH)


def sf(cert) -> str:
    return ":" + base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode() + ":"


@pytest.fixture(scope="module")
def cloudflare(pki) -> dict:
    """RFC 9440 headers from a Cloudflare Transform Rule, the verdict header, and the edge's
    addresses as trusted peers (see test_an_edge_proven_by_authenticated_origin_pulls for AOP)."""
    return {
        "ca_certificates": [pki.root.cert_pem],
        "certificate_header": "Client-Cert",
        "certificate_header_format": "rfc9440",
        "chain_header": "Client-Cert-Chain",
        "trusted_proxies": ["203.0.113.0/24"],
        "edge_verdict_header": "Client-Cert-Verified",
        "consumer_mappings": [
            {"subject_name": "spiffe://example.org/ns/payments/sa/alice", "consumer": "alice"}
        ],
    }


def forwarded(issued) -> dict[str, str]:
    return {
        "Client-Cert": sf(issued.cert),
        "Client-Cert-Chain": ", ".join(sf(c) for c in issued.intermediates),
        "Client-Cert-Verified": "true",
    }


def spoofed() -> list[tuple[str, str]]:
    """Identity headers and certificate headers a client adds itself, in every spelling."""
    names = [*OWNED_HEADERS, *FORWARDED]
    return [
        (spelling, "spoofed")
        for name in names
        for spelling in (name, *other_spellings(name))
        if spelling.lower() not in {f.lower() for f in FORWARDED}
    ]


def test_a_certificate_forwarded_by_the_edge_maps_the_consumer(kong, server, cloudflare, pki):
    request = Request(realip_remote_addr=EDGE, headers=[*forwarded(pki.alice).items(), *spoofed()])
    outcome = kong.run(request, [(server, cloudflare)], consumers=[ALICE], guard=[HEADER_CERT_AUTH])
    assert outcome.proxied
    assert outcome.authenticated[0][0]["username"] == "alice"
    assert outcome.upstream_headers["x-consumer-username"] == ["alice"]
    assert outcome.ctx_shared[MARK]["verified"] is True
    # Nothing the client or the edge wrote about the certificate reaches the upstream.
    for name in FORWARDED:
        for spelling in (name, *other_spellings(name)):
            assert spelling.lower() not in outcome.upstream_headers, spelling
    assert not [k for k, v in outcome.upstream_headers.items() if "spoofed" in v]
    assert outcome.pdk_calls == decided_calls(kong, [
        "kong.nginx.get_var",
        "kong.request.get_headers",
        "kong.client.load_consumer",
        "kong.client.authenticate",
        "kong.service.request.set_headers",
        "kong.ctx.shared.set",
    ])
    if not kong.verdict_wrapper:  # no one would take a verdict
        assert outcome.verdicts == []
        return
    (name, verdict), = outcome.verdicts
    assert name == HEADER_CERT_AUTH and verdict["inputs"][0][:2] == ["var", "realip_remote_addr"]
    assert {kind for kind, *_ in verdict["inputs"][1:]} == {"header"}          # the edge's headers


def test_the_same_header_from_a_stranger_is_refused_and_never_forwarded(kong, server, cloudflare, pki):
    request = Request(realip_remote_addr=STRANGER, headers=forwarded(pki.alice))
    outcome = kong.run(request, [(server, cloudflare)], consumers=[ALICE], guard=[HEADER_CERT_AUTH])
    assert (outcome.exit.status, outcome.exit.body) == (401, {"message": MESSAGE_NO_CERTIFICATE})
    assert any("reason=UNTRUSTED_EDGE" in line for _, line in outcome.logs)
    assert MARK not in outcome.ctx_shared and not outcome.authenticated

    assert "kong.request.get_headers" not in outcome.pdk_calls  # a stranger's headers are not even read


def test_other_edge_headers_are_removed_and_a_forwarded_leaf_replaces_the_edges(
    kong, server, cloudflare, pki
):
    """`remove_headers` (CloudFront's sibling headers, say) go in every spelling; with
    forward_client_cert the verified leaf is sent in the header the edge used, whatever its case."""
    conf = {
        **cloudflare,
        "certificate_header": "client-cert",
        "forward_client_cert": ["rfc9440"],
        "remove_headers": ["CloudFront-Viewer-Cert-Subject"],
    }
    headers = [
        *forwarded(pki.alice).items(),
        ("CloudFront-Viewer-Cert-Subject", "CN=admin"),
        ("CloudFront_Viewer_Cert_Subject", "CN=admin"),
    ]
    outcome = kong.run(
        Request(realip_remote_addr=EDGE, headers=headers),
        [(server, conf)],
        consumers=[ALICE],
        guard=[HEADER_CERT_AUTH],
    )
    assert outcome.proxied
    assert outcome.upstream_headers["client-cert"] == [sf(pki.alice.cert)]
    assert not [name for name in outcome.upstream_headers if "viewer" in name]


@pytest.mark.parametrize(
    "proxies",
    [{"trusted_proxies_presets": ["cloudflare"]}, {"trusted_proxies": ["173.245.48.0/20", "104.16.0.0/13"]}],
)
def test_edge_proofs_every_cloudflare_zone_shares_are_logged_at_err(kong, server, cloudflare, pki, proxies):
    """Cloudflare's ranges, as the preset or typed by hand, prove only "some Cloudflare zone"."""
    shared = {**cloudflare, "trusted_proxies": None, **proxies}
    outcome = kong.run(
        Request(realip_remote_addr=CLOUDFLARE_PEER, headers=forwarded(pki.alice)),
        [(server, shared)],
        consumers=[ALICE],
        guard=[HEADER_CERT_AUTH],
    )
    assert outcome.proxied
    assert any(level == "err" and "reason=EDGE_PROOF_SHARED" in line for level, line in outcome.logs)
    # Not logged when the edge is also pinned down by something of its own.
    own = {**cloudflare, "trusted_proxies": ["203.0.113.0/24"]}
    outcome = kong.run(
        Request(realip_remote_addr=EDGE, headers=forwarded(pki.alice)),
        [(server, own)],
        consumers=[ALICE],
        guard=[HEADER_CERT_AUTH],
    )
    assert outcome.proxied and not any(level == "err" for level, _ in outcome.logs)


def test_a_forwarded_chain_that_fails_verification_is_refused(kong, server, cloudflare, pki):
    for issued, reason in ((pki.unknown_ca_client(), "UNKNOWN_CA"), (pki.expired(), "EXPIRED")):
        outcome = kong.run(
            Request(realip_remote_addr=EDGE, headers=forwarded(issued)),
            [(server, cloudflare)],
            consumers=[ALICE],
            guard=[HEADER_CERT_AUTH],
        )
        assert (outcome.exit.status, outcome.exit.body) == (401, {"message": MESSAGE_FAILED_VERIFICATION})
        assert any(f"reason={reason}" in line for _, line in outcome.logs)


def test_the_edges_verdict_is_required_when_configured(kong, server, cloudflare, pki):
    headers = {**forwarded(pki.alice), "Client-Cert-Verified": "false"}
    outcome = kong.run(
        Request(realip_remote_addr=EDGE, headers=headers),
        [(server, cloudflare)],
        consumers=[ALICE],
        guard=[HEADER_CERT_AUTH],
    )
    assert outcome.exit.status == 401
    assert any("reason=EDGE_NOT_VERIFIED" in line for _, line in outcome.logs)


def test_an_edge_proven_by_authenticated_origin_pulls(kong, server, pki):
    """The edge's own client certificate on Kong's connection (AOP, an ALB's or Envoy's)."""
    aop_ca = Authority.root("zone origin-pull CA")
    aop = aop_ca.client("origin-pull.example", dns=["origin-pull.example"])
    conf = {
        "ca_certificates": [pki.root.cert_pem],
        "certificate_header": "X-Amzn-Mtls-Clientcert",
        "certificate_header_format": "url_encoded_pem",
        "edge_ca_certificates": [aop_ca.cert_pem],
        "skip_consumer_lookup": True,
    }
    from urllib.parse import quote

    headers = {"X-Amzn-Mtls-Clientcert": quote(pki.alice.chain_pem, safe="+=/")}
    ok = kong.run(
        Request(realip_remote_addr=STRANGER, client_chain_pem=aop.chain_pem, headers=headers),
        [(server, conf)],
        guard=[HEADER_CERT_AUTH],
    )
    assert ok.proxied and "CN=alice" in ok.upstream_headers["x-client-cert-dn"][0]
    assert "kong.nginx.get_var" not in ok.pdk_calls
    for chain in (None, pki.alice.chain_pem):
        outcome = kong.run(
            Request(realip_remote_addr=EDGE, client_chain_pem=chain, headers=headers),
            [(server, conf)],
            guard=[HEADER_CERT_AUTH],
        )
        assert outcome.exit.status == 401, chain


@pytest.fixture
def kong(kong_either):
    """Each test here runs in a Kong without and with kong-mtls-guard loaded (tests/conftest.py)."""
    return kong_either
