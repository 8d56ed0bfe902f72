"""header-cert-auth's core: each edge's encoding of a real certificate chain, the edge proof, and
hostile headers. The encoders below follow each edge's public documentation, independently of the
decoder under test."""

from __future__ import annotations

import base64
import datetime as dt
import time
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from kong_mtls.core.addresses import MAX_HEADER_LINES
from kong_mtls.core.chain import MESSAGE_FAILED_VERIFICATION, MESSAGE_NO_CERTIFICATE, Reason, spki_sha256
from kong_mtls.core.forwarded import (
    MAX_FORWARDED_CHARS,
    ForwardedFormat,
    ForwardedSource,
    parse_xfcc,
    percent_decode,
)
from kong_mtls.core.identity import Via
from kong_mtls.devpki import Authority, cert_pem
from kong_mtls.kong.client_cert_auth import compile_config as client_cert_config
from kong_mtls.kong.header_cert_auth import Plugin, compile_config
from kong_mtls.schema import ConfigError

ALICE = {"id": "00000000-0000-4000-8000-00000000a11c", "username": "alice"}
EDGE = "203.0.113.7"  # TEST-NET-3: the edge's address
STRANGER = "198.51.100.99"


def der(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


# -- each edge's encoding (from its documentation) ---------------------------------------------------
def rfc9440(cert) -> str:
    """RFC 9440 / Cloudflare `cf.tls_client_auth.cert_rfc9440`: a byte sequence of the DER."""
    return ":" + base64.b64encode(der(cert)).decode() + ":"


def rfc9440_chain(certs) -> str:
    return ", ".join(rfc9440(c) for c in certs)


def cloudfront_pem(issued) -> str:
    """CloudFront-Viewer-Cert-Pem / nginx `$ssl_client_escaped_cert`: the leaf, URL-encoded PEM."""
    return quote(issued.cert_pem, safe="")


def alb_pem(issued) -> str:
    """AWS ALB passthrough `X-Amzn-Mtls-Clientcert`: the chain, URL-encoded with + = / kept."""
    return quote(issued.chain_pem, safe="+=/")


def xfcc(issued, *, chain: bool = True, quoted: bool = True) -> str:
    """Envoy's X-Forwarded-Client-Cert element: Hash, Cert, Chain (leaf included), Subject, URI."""
    q = (lambda v: f'"{v}"') if quoted else (lambda v: v)
    parts = [
        f"Hash={issued.cert.fingerprint(hashes.SHA256()).hex()}",
        f"Cert={q(quote(issued.cert_pem, safe=''))}",
    ]
    if chain:
        parts.append(f"Chain={q(quote(issued.chain_pem, safe=''))}")
    parts += [
        'Subject="CN=alice,OU=admins,OU=payments,O=Example Org"',
        "URI=spiffe://example.org/ns/payments/sa/alice",
    ]
    return ";".join(parts)


def traefik(issued, *, escaped: bool = True) -> str:
    """Traefik's X-Forwarded-Tls-Client-Cert: base64 DER, comma-separated, each query-escaped (v2)."""
    escape = (lambda t: quote(t, safe="")) if escaped else (lambda t: t)
    return ",".join(escape(base64.b64encode(der(c)).decode()) for c in (issued.cert, *issued.intermediates))


# -- configs -----------------------------------------------------------------------------------------
def config(pki, fmt: str, header: str, **extra) -> dict:
    return {
        "ca_certificates": [pki.root.cert_pem],
        "certificate_header": header,
        "certificate_header_format": fmt,
        "trusted_proxies": ["203.0.113.0/24"],
        "consumer_mappings": [
            {
                "subject_name": "spiffe://example.org/ns/payments/sa/alice",
                "consumer": "alice",
                "groups": ["mapped"],
            }
        ],
        "groups_from": ["mapping", "dn:OU"],
        **extra,
    }


def consumers(ref: str):
    return ALICE if ref in ("alice", ALICE["id"]) else None


def decide(conf: dict, headers: dict, *, peer: str = EDGE, edge_chain: str | None = None):
    auth = compile_config(conf).authenticator
    return auth.authenticate(peer, edge_chain, lambda: headers, consumers)


FORMATS = [
    (
        "rfc9440",
        "Client-Cert",
        lambda i: {"client-cert": rfc9440(i.cert), "client-cert-chain": rfc9440_chain(i.intermediates)},
        {"chain_header": "Client-Cert-Chain"},
    ),
    (
        "url_encoded_pem",
        "CloudFront-Viewer-Cert-Pem",
        lambda i: {"cloudfront-viewer-cert-pem": cloudfront_pem(i)},
        {},
    ),
    ("url_encoded_pem", "X-Amzn-Mtls-Clientcert", lambda i: {"x-amzn-mtls-clientcert": alb_pem(i)}, {}),
    ("url_encoded_pem", "ssl-client-cert", lambda i: {"ssl-client-cert": cloudfront_pem(i)}, {}),
    ("xfcc", "X-Forwarded-Client-Cert", lambda i: {"x-forwarded-client-cert": xfcc(i)}, {}),
    (
        "xfcc",
        "X-Forwarded-Client-Cert",
        lambda i: {"x-forwarded-client-cert": xfcc(i, chain=False, quoted=False)},
        {},
    ),
    ("base64_der", "X-Forwarded-Tls-Client-Cert", lambda i: {"x-forwarded-tls-client-cert": traefik(i)}, {}),
    (
        "base64_der",
        "X-Forwarded-Tls-Client-Cert",
        lambda i: {"x-forwarded-tls-client-cert": traefik(i, escaped=False)},
        {},
    ),
]


@pytest.mark.parametrize(("fmt", "header", "encode", "extra"), FORMATS)
def test_each_edge_encoding_maps_the_consumer_as_direct_mtls_does(pki, fmt, header, encode, extra):
    """Leaf-only edges (CloudFront, nginx ingress, Envoy without Chain) need the issuing CA
    configured; the others forward it."""
    conf = config(pki, fmt, header, **extra)
    conf["ca_certificates"] = [pki.root.cert_pem, pki.intermediate.cert_pem]
    decision = decide(conf, encode(pki.alice))
    assert decision.allowed and decision.via is Via.MAPPING
    assert decision.consumer == ALICE
    assert set(decision.groups) == {"mapped", "admins", "payments"}
    direct = client_cert_config(
        {k: v for k, v in conf.items() if k in ("ca_certificates", "consumer_mappings", "groups_from")}
    )
    same = direct.authenticator.authenticate(pki.alice.chain_pem, consumers)
    assert (decision.headers, decision.mark, decision.groups) == (same.headers, same.mark, same.groups)


@pytest.mark.parametrize(("fmt", "header", "encode", "extra"), FORMATS)
def test_a_forwarded_chain_that_fails_verification_is_refused(pki, fmt, header, encode, extra):
    for issued, reason in ((pki.unknown_ca_client(), Reason.UNKNOWN_CA), (pki.expired(), Reason.EXPIRED)):
        conf = {
            **config(pki, fmt, header, **extra),
            "ca_certificates": [pki.root.cert_pem, pki.intermediate.cert_pem],
        }
        decision = decide(conf, encode(issued))
        assert (decision.allowed, decision.status, decision.reason) == (False, 401, reason)
        assert decision.message == MESSAGE_FAILED_VERIFICATION


def test_the_leaf_alone_is_completed_from_configured_intermediates(pki):
    conf = config(
        pki, "rfc9440", "Client-Cert", ca_certificates=[pki.root.cert_pem, pki.intermediate.cert_pem]
    )
    assert decide(conf, {"client-cert": rfc9440(pki.alice.cert)}).allowed
    # Without the intermediate configured or forwarded there is no path.
    assert (
        decide(config(pki, "rfc9440", "Client-Cert"), {"client-cert": rfc9440(pki.alice.cert)}).reason
        is Reason.UNKNOWN_CA
    )


# -- the edge ------------------------------------------------------------------------------------------
def test_an_untrusted_peer_is_never_believed_and_its_header_never_decoded(pki):
    conf = config(pki, "rfc9440", "Client-Cert")
    for headers in ({"client-cert": rfc9440(pki.alice.cert)}, {"client-cert": "%%% not even decodable"}):
        for peer in (STRANGER, "", None, "203.0.113.7:443", "not an address", 42):
            decision = decide(conf, headers, peer=peer)
            assert (decision.allowed, decision.status, decision.reason) == (False, 401, Reason.UNTRUSTED_EDGE)
            assert decision.message == MESSAGE_NO_CERTIFICATE
    # The trusted_proxies preset of Cloudflare's published ranges works the same way.
    cf = {**conf, "trusted_proxies": None, "trusted_proxies_presets": ["cloudflare"]}
    assert decide(cf, {"client-cert": rfc9440(pki.alice.cert)}, peer=STRANGER).reason is Reason.UNTRUSTED_EDGE
    assert (
        decide(cf, {"client-cert": rfc9440(pki.alice.cert)}, peer="173.245.48.1").reason is Reason.UNKNOWN_CA
    )


def test_an_edge_proven_by_its_client_certificate(pki):
    edge_ca = Authority.root("edge origin-pull CA")
    edge = edge_ca.client("edge.example", dns=["edge.example"])
    conf = {
        **config(pki, "url_encoded_pem", "ssl-client-cert"),
        "trusted_proxies": None,
        "edge_ca_certificates": [edge_ca.cert_pem],
    }
    headers = {"ssl-client-cert": alb_pem(pki.alice)}
    assert decide(conf, headers, peer=STRANGER, edge_chain=edge.chain_pem).allowed
    for edge_chain in (None, pki.alice.chain_pem, pki.unknown_ca_client().chain_pem):
        decision = decide(conf, headers, peer=STRANGER, edge_chain=edge_chain)
        assert decision.reason is Reason.UNTRUSTED_EDGE, edge_chain
    # Both required together: the right certificate from the wrong address is refused.
    both = {**conf, "trusted_proxies": ["203.0.113.0/24"]}
    assert decide(both, headers, peer=EDGE, edge_chain=edge.chain_pem).allowed
    assert decide(both, headers, peer=STRANGER, edge_chain=edge.chain_pem).reason is Reason.UNTRUSTED_EDGE
    assert decide(both, headers, peer=EDGE, edge_chain=None).reason is Reason.UNTRUSTED_EDGE


def test_the_edges_verdict_header_when_required(pki):
    conf = config(pki, "rfc9440", "Client-Cert", edge_verdict_header="Client-Cert-Verified")
    cert = {
        "client-cert": rfc9440(pki.alice.cert),
        "client-cert-chain": rfc9440_chain(pki.alice.intermediates),
    }
    conf["chain_header"] = "Client-Cert-Chain"
    assert decide(conf, {**cert, "client-cert-verified": "true"}).allowed
    for verdict in (None, "false", "TRUE", "", ["true", "true"], ["false", "true"]):
        headers = {**cert, **({"client-cert-verified": verdict} if verdict is not None else {})}
        assert decide(conf, headers).reason is Reason.EDGE_NOT_VERIFIED, verdict


def test_no_forwarded_certificate_is_no_certificate(pki):
    conf = config(pki, "rfc9440", "Client-Cert")
    for headers in ({}, {"client-cert": ""}, {"client-cert": "  "}, {"other": "x"}):
        decision = decide(conf, headers)
        assert (decision.reason, decision.message) == (Reason.NO_CERTIFICATE, MESSAGE_NO_CERTIFICATE)
    anonymous = decide({**conf, "anonymous": "alice"}, {})
    assert anonymous.allowed and anonymous.via is Via.ANONYMOUS


# -- hostile and malformed headers ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "value",
    [
        "-----BEGIN%20CERTIFICATE-----%0AMII%G0",  # bad escape
        "-----BEGIN%20CERTIFICATE-----%0AMII%",  # truncated escape
        "-----BEGIN%20CERTIFICATE-----%0AMII%4",
        "-----BEGIN%20CERTIFICATE-----%0AMII%C3%A9",  # decodes to non-ASCII
        "-----BEGIN CERTIFICATE-----\u00e9",
        "MIIBszCCAVmgAwIBAgIU",  # base64 DER in a PEM header: formats are not guessed
        ":MIIBszCCAVmgAwIBAgIU:",
    ],
)
def test_url_encoded_pem_refuses_what_is_not_strictly_url_encoded_pem(pki, value):
    decision = decide(config(pki, "url_encoded_pem", "ssl-client-cert"), {"ssl-client-cert": value})
    assert (decision.allowed, decision.reason) == (False, Reason.MALFORMED_CHAIN)


@pytest.mark.parametrize(
    "value",
    [
        "MIIB",
        ":MIIB",
        "MIIB:",
        ":MII B=:",
        ":MIIBAA==:;param=1",
        ":!!!!:",
        "::",
        ":MIIBAA===:",
        "-----BEGIN%20CERTIFICATE-----",
        ":" + "A" * 10 + ":",  # decodes, but to no certificate
    ],
)
def test_rfc9440_refuses_anything_but_one_byte_sequence(pki, value):
    decision = decide(config(pki, "rfc9440", "Client-Cert"), {"client-cert": value})
    assert (decision.allowed, decision.reason) == (False, Reason.MALFORMED_CHAIN), value


@pytest.mark.parametrize(
    ("fmt", "header"),
    [
        ("rfc9440", "client-cert"),
        ("url_encoded_pem", "ssl-client-cert"),
        ("base64_der", "x-forwarded-tls-client-cert"),
    ],
)
def test_several_lines_of_a_one_value_header_are_refused(pki, fmt, header):
    """A second line is someone else's copy (the client's, when the edge appends rather than sets)."""
    good = {
        "rfc9440": rfc9440(pki.alice.cert),
        "url_encoded_pem": alb_pem(pki.alice),
        "base64_der": traefik(pki.alice),
    }[fmt]
    stranger = {
        "rfc9440": rfc9440(pki.client("mallory").cert),
        "url_encoded_pem": alb_pem(pki.client("mallory")),
        "base64_der": traefik(pki.client("mallory")),
    }[fmt]
    for lines in ([stranger, good], [good, good], [good, ""]):
        decision = decide(config(pki, fmt, header), {header: lines})
        assert (decision.allowed, decision.reason) == (False, Reason.MALFORMED_CHAIN)


def test_huge_values_are_refused_before_any_decoding(pki):
    started = time.process_time()
    for value in ("%41" * (10 * 1024 * 1024 // 3), ":" + "A" * 10 * 1024 * 1024 + ":"):
        for fmt, header in (("url_encoded_pem", "ssl-client-cert"), ("rfc9440", "client-cert")):
            decision = decide(config(pki, fmt, header), {header: value})
            assert (decision.allowed, decision.reason) == (False, Reason.CHAIN_TOO_LARGE)
    split = decide(
        config(pki, "xfcc", "X-Forwarded-Client-Cert"),
        {"x-forwarded-client-cert": ["Cert=" + "A" * (MAX_FORWARDED_CHARS // 2)] * 3},
    )
    assert split.reason is Reason.CHAIN_TOO_LARGE
    assert time.process_time() - started < 60  # generous: a guard against quadratic work, not a benchmark


def test_many_chain_elements_are_refused(pki):
    cert = rfc9440(pki.alice.cert)
    conf = config(pki, "rfc9440", "Client-Cert", chain_header="Client-Cert-Chain")
    decision = decide(
        conf, {"client-cert": cert, "client-cert-chain": ", ".join([rfc9440(pki.intermediate.cert)] * 16)}
    )
    assert decision.reason is Reason.CHAIN_TOO_LARGE
    many = ",".join([base64.b64encode(der(pki.alice.cert)).decode()] * 17)
    decision = decide(
        config(pki, "base64_der", "X-Forwarded-Tls-Client-Cert"), {"x-forwarded-tls-client-cert": many}
    )
    assert decision.reason is Reason.CHAIN_TOO_LARGE
    # Under the element limit but over the verifier's certificate limit: still refused.
    nine = ",".join([base64.b64encode(der(pki.intermediate.cert)).decode()] * 9)
    decision = decide(
        config(pki, "base64_der", "X-Forwarded-Tls-Client-Cert"),
        {"x-forwarded-tls-client-cert": traefik(pki.alice, escaped=False) + "," + nine},
    )
    assert decision.reason is Reason.CHAIN_TOO_LARGE


def test_a_header_map_cut_at_kongs_line_limit_is_refused(pki):
    headers = {f"x-filler-{i}": "x" for i in range(MAX_HEADER_LINES)}
    headers["client-cert"] = rfc9440(pki.alice.cert)
    assert decide(config(pki, "rfc9440", "Client-Cert"), headers).reason is Reason.MALFORMED_CHAIN
    assert (
        decide(config(pki, "rfc9440", "Client-Cert"), {"client-cert": [rfc9440(pki.alice.cert), 7]}).reason
        is Reason.MALFORMED_CHAIN
    )
    assert decide(config(pki, "rfc9440", "Client-Cert"), "not a map").reason is Reason.MALFORMED_CHAIN


# -- XFCC --------------------------------------------------------------------------------------------------
def test_xfcc_counts_its_elements_exactly_and_reads_the_first(pki):
    """The first proxy sets the element (Envoy SANITIZE_SET), each one after it appends its own:
    a client's own element, or one its certificate's names inject, changes the count."""
    forged = xfcc(pki.client("mallory", uris=["spiffe://example.org/ns/payments/sa/alice"]))
    conf = config(pki, "xfcc", "X-Forwarded-Client-Cert")
    ok = decide(conf, {"x-forwarded-client-cert": xfcc(pki.alice)})
    assert ok.allowed and ok.consumer == ALICE
    for value in ([forged, xfcc(pki.alice)], forged + "," + xfcc(pki.alice), xfcc(pki.alice) + "," + forged):
        assert decide(conf, {"x-forwarded-client-cert": value}).reason is Reason.MALFORMED_CHAIN
    # Two proxies: the client's element first, the second proxy's after it.
    two = {**conf, "xfcc_elements": 2}
    proxy_element = "By=spiffe://edge;Hash=00;URI=spiffe://example.org/edge"
    assert decide(two, {"x-forwarded-client-cert": xfcc(pki.alice) + "," + proxy_element}).consumer == ALICE
    assert decide(two, {"x-forwarded-client-cert": xfcc(pki.alice)}).reason is Reason.MALFORMED_CHAIN
    # An element without Cert or Chain: no certificate.
    assert decide(conf, {"x-forwarded-client-cert": proxy_element}).reason is Reason.NO_CERTIFICATE


def _envoy_element(issued, *, cert: bool = True, chain: bool = False) -> str:
    """What Envoy writes: Hash, Cert/Chain quoted, Subject quoted, URI= and DNS= values unescaped."""
    parts = [f"Hash={issued.cert.fingerprint(hashes.SHA256()).hex()}"]
    if cert:
        parts.append(f'Cert="{quote(issued.cert_pem, safe="")}"')
    if chain:
        parts.append(f'Chain="{quote(issued.chain_pem, safe="")}"')
    parts.append('Subject="CN=mallory"')
    san = issued.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    parts += [f"URI={u}" for u in san.get_values_for_type(x509.UniformResourceIdentifier)]
    parts += [f"DNS={d}" for d in san.get_values_for_type(x509.DNSName)]
    return ";".join(parts)


@pytest.mark.parametrize(
    ("make_name", "cert", "chain"),
    [
        (lambda a: {"uris": [f"https://m.example/x,Cert={quote(a.cert_pem, safe='')}"]}, True, False),
        (
            lambda a: {
                "uris": [
                    f"https://m.example/x,Hash={a.cert.fingerprint(hashes.SHA256()).hex()};"
                    f'Cert="{quote(a.cert_pem, safe="")}"'
                ]
            },
            True,
            False,
        ),
        (lambda a: {"uris": [f"https://m.example/x,Chain={quote(a.chain_pem, safe='')}"]}, True, True),
        (lambda a: {"dns": [f"m.example,Cert={quote(a.cert_pem, safe='')}"]}, True, False),
        (lambda a: {"uris": [f"https://m.example/x;Chain={quote(a.chain_pem, safe='')}"]}, True, False),
        (lambda a: {"uris": [f"https://m.example/x;Cert={quote(a.cert_pem, safe='')}"]}, False, False),
    ],
)
def test_names_envoy_writes_unescaped_cannot_inject_a_certificate(pki, make_name, cert, chain):
    """A certificate Envoy trusts (not Kong's CA at all) whose URI or DNS name carries `,` or `;`
    and alice's public certificate: never alice (review finding, Envoy writes these unescaped)."""
    mallory = Authority.root("a CA only Envoy trusts").client("mallory", **make_name(pki.alice))
    value = _envoy_element(mallory, cert=cert, chain=chain)
    decision = decide(config(pki, "xfcc", "X-Forwarded-Client-Cert"), {"x-forwarded-client-cert": value})
    assert (decision.allowed, decision.reason) == (False, Reason.MALFORMED_CHAIN), value[:200]


def test_the_xfcc_hash_must_be_the_certificates(pki):
    conf = config(
        pki, "xfcc", "X-Forwarded-Client-Cert", ca_certificates=[pki.root.cert_pem, pki.intermediate.cert_pem]
    )
    good = xfcc(pki.alice, chain=False)
    assert decide(conf, {"x-forwarded-client-cert": good}).allowed
    for value in (good.split(";", 1)[1], good.replace("Hash=", "Hash=00", 1), good + ";Hash=00"):
        assert decide(conf, {"x-forwarded-client-cert": value}).reason is Reason.MALFORMED_CHAIN


@pytest.mark.parametrize(
    "value",
    [
        'Cert="unterminated',
        "Cert=a;Cert=b",
        'Cert=a"b',
        "=x",
        "Cert",
        "Cert=x;;",
        'Subject="a\\',
        "Chain=%GG",
        "Cert=%2D%2D",
        ",".join(["Hash=0"] * 33),
    ],
)
def test_malformed_xfcc_is_refused(pki, value):
    decision = decide(config(pki, "xfcc", "X-Forwarded-Client-Cert"), {"x-forwarded-client-cert": value})
    assert (decision.allowed, decision.reason) == (False, Reason.MALFORMED_CHAIN), value


def test_xfcc_chain_must_start_with_the_elements_cert(pki):
    mallory = pki.client("mallory")
    value = f"Cert={quote(mallory.cert_pem, safe='')};Chain={quote(pki.alice.chain_pem, safe='')}"
    decision = decide(config(pki, "xfcc", "X-Forwarded-Client-Cert"), {"x-forwarded-client-cert": value})
    assert decision.reason is Reason.MALFORMED_CHAIN


def test_parse_xfcc_quoting():
    assert parse_xfcc('By=a;Subject="x,y;z=\\"q\\"";URI=u,Hash=h') == [
        [("by", "a"), ("subject", 'x,y;z="q"'), ("uri", "u")],
        [("hash", "h")],
    ]
    assert parse_xfcc("") is None


def test_percent_decode_is_strict():
    assert percent_decode("a%2Bb+c%0A") == "a+b+c\n"
    for bad in ("%", "%4", "%zz", "a%C3%A9", "\u00e9"):
        assert percent_decode(bad) is None


def test_forwarded_source_is_typed():
    source = ForwardedSource(header="Client-Cert", format=ForwardedFormat.RFC9440)
    assert source.read({}).pem is None and source.read({}).reason is None


# -- config ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"trusted_proxies": None}, "trusted_proxies"),
        ({"certificate_header": None}, "certificate_header"),
        ({"certificate_header_format": "auto"}, "certificate_header_format"),
        ({"certificate_header_format": None}, "certificate_header_format"),
        ({"certificate_header": "Client Cert"}, "certificate_header"),
        ({"certificate_header": "a-b-c-d-e-f-g-h-i-j"}, "certificate_header"),
        ({"chain_header": "Client-Cert-Chain", "certificate_header_format": "xfcc"}, "chain_header"),
        ({"xfcc_elements": 2}, "xfcc_elements"),
        ({"trusted_proxies": ["0.0.0.0/0"]}, "trusted_proxies[1]"),
        ({"trusted_proxies": ["::ffff:0:0/96"]}, "trusted_proxies[1]"),
        ({"certificate_header": "X_Amzn_Mtls_Clientcert"}, "certificate_header"),
        ({"chain_header": "client-cert"}, "chain_header"),
        ({"edge_verdict_header": "Client-Cert"}, "edge_verdict_header"),
        ({"certificate_header": "X-Consumer-Username"}, "certificate_header"),
        ({"certificate_header": "Host"}, "certificate_header"),
        ({"edge_verdict_header": "V", "edge_verdict_values": [""]}, "edge_verdict_values[1]"),
        ({"edge_spki_sha256": ["00" * 32]}, "edge_spki_sha256"),
        ({"remove_headers": ["Bad Header"]}, "remove_headers[1]"),
        ({"trusted_proxies": ["not-a-cidr"]}, "trusted_proxies[1]"),
        ({"edge_ca_certificates": ["not a pem"]}, "edge_ca_certificates[1]"),
        ({"edge_verdict_header": "Bad Header"}, "edge_verdict_header"),
        ({"ca_certificates": None}, "ca_certificates"),
    ],
)
def test_refused_configs_name_their_field(pki, change, field):
    with pytest.raises(ConfigError) as info:
        Plugin({**config(pki, "rfc9440", "Client-Cert"), **change})
    assert info.value.field == field


def test_forwarded_headers_are_removed_in_every_spelling_on_every_pass(pki):
    conf = config(
        pki, "rfc9440", "Client-Cert", chain_header="Client-Cert-Chain", edge_verdict_header="X-Verified"
    )
    assert compile_config(conf).authenticator.removed_headers == (
        "Client-Cert",
        "Client-Cert-Chain",
        "X-Verified",
    )


def test_the_anchor_warning_names_this_plugin(pki):
    soon = Authority.root("expiring root", days=30)
    conf = {**config(pki, "rfc9440", "Client-Cert"), "ca_certificates": [soon.cert_pem]}
    warnings = compile_config(conf, clock=lambda: dt.datetime.now(dt.timezone.utc).timestamp()).warnings
    assert warnings and all(w.startswith("[kong-mtls] header-cert-auth anchor-expiring") for w in warnings)
    assert cert_pem(soon.cert)  # the anchor is a real certificate


# -- the second review's findings -------------------------------------------------------------------------
def test_an_edge_ca_sharing_a_root_with_the_clients_never_lets_a_client_pass_as_the_edge(pki):
    """Root R issues the clients' CA and the infrastructure CA (second review): a client's own
    certificate chains to R too. A certificate the client CAs accept is never the edge's, unless
    the edge's key is pinned; an edge CA may end the path on its own."""
    clients_ca = pki.root.intermediate("clients CA")
    infra_ca = pki.root.intermediate("infra CA")
    carol = clients_ca.client("carol", dns=["carol.example"])
    mallory = clients_ca.client("mallory", dns=["mallory.example"])
    edge = infra_ca.client("edge.example", dns=["edge.example"])
    headers = {"client-cert": rfc9440(carol.cert)}
    base = {
        **config(pki, "rfc9440", "Client-Cert"),
        "trusted_proxies": None,
        "skip_consumer_lookup": True,
        "consumer_mappings": None,
        "ca_certificates": [clients_ca.cert_pem],
        "allow_partial_chain": True,
    }
    for edge_cas in ([pki.root.cert_pem, infra_ca.cert_pem], [infra_ca.cert_pem]):
        conf = {**base, "edge_ca_certificates": edge_cas}
        assert decide(conf, headers, peer=STRANGER, edge_chain=edge.chain_pem).allowed
        refused = decide(conf, headers, peer=STRANGER, edge_chain=mallory.chain_pem)
        why = "also a client certificate" if len(edge_cas) == 2 else "UNKNOWN_CA"  # R accepts her chain
        assert refused.reason is Reason.UNTRUSTED_EDGE and why in refused.detail
    # The clients' root itself as an edge CA: refused at once.
    with pytest.raises(ConfigError) as info:
        compile_config(
            {
                **base,
                "ca_certificates": [pki.root.cert_pem],
                "allow_partial_chain": False,
                "edge_ca_certificates": [pki.root.cert_pem],
            }
        )
    assert info.value.field == "edge_ca_certificates"
    # One CA for both: the edge's certificate is also a client's; only a pin tells them apart.
    both = {**base, "ca_certificates": [infra_ca.cert_pem], "edge_ca_certificates": [pki.root.cert_pem]}
    assert decide(both, headers, peer=STRANGER, edge_chain=edge.chain_pem).reason is Reason.UNTRUSTED_EDGE
    pinned = {**both, "edge_spki_sha256": [spki_sha256(edge.cert)]}
    assert decide(
        pinned, {"client-cert": rfc9440(edge.cert)}, peer=STRANGER, edge_chain=edge.chain_pem
    ).allowed
    assert (
        decide(pinned, headers, peer=STRANGER, edge_chain=mallory.chain_pem).reason is Reason.UNTRUSTED_EDGE
    )


def test_a_reissued_client_root_is_no_edge_ca(pki):
    reissued = Authority.root("kong-mtls test root CA", key=pki.root.key)
    conf = {**config(pki, "rfc9440", "Client-Cert"), "edge_ca_certificates": [reissued.cert_pem]}
    with pytest.raises(ConfigError) as info:
        compile_config(conf)
    assert info.value.field == "edge_ca_certificates"


def test_trusted_proxies_together_no_wider_than_four_slash_8s(pki):
    assert compile_config(
        {
            **config(pki, "rfc9440", "Client-Cert"),
            "trusted_proxies_presets": ["cloudflare"],
            "trusted_proxies": ["10.0.0.0/8", "127.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"],
        }
    )
    many = [f"{i}.0.0.0/8" for i in range(1, 6)]
    with pytest.raises(ConfigError) as info:
        compile_config({**config(pki, "rfc9440", "Client-Cert"), "trusted_proxies": many})
    assert info.value.field == "trusted_proxies" and "together" in info.value.problem


def test_remove_headers_may_not_name_http_or_identity_headers(pki):
    for name in ("Host", "content-length", "X-Consumer-ID"):
        with pytest.raises(ConfigError) as info:
            compile_config({**config(pki, "rfc9440", "Client-Cert"), "remove_headers": [name]})
        assert info.value.field == "remove_headers[1]"
