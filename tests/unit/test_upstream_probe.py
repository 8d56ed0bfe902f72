"""The probe against real TLS servers on loopback (kong_mtls.core.upstream.check)."""

from __future__ import annotations

import os
import socket
import ssl
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from kong_mtls.core.upstream import CertSummary, Notice, Reason, Target, UpstreamPolicy, check, webpki_problem
from kong_mtls.devpki import SERVER_AUTH, Authority, Issued, SubjectAltNames, name, new_key
from tests.harness.pki import DAY, now
from tests.harness.tls_servers import SilentServer, TLSUpstream, closed_port, https_get, write_pem_files

HOST = "upstream.test"
SPIFFE = "spiffe://example.org/ns/backend/sa/api"
WILDCARD_HOST = "api.example.test"


@pytest.fixture(scope="module")
def certs(pki):
    ca = pki.intermediate

    def server(dns, uris=(), **kwargs):
        return ca.issue(name(dns[0]), sans=SubjectAltNames(dns=dns, uris=uris),
                        extended_key_usage=(SERVER_AUTH,), **kwargs)

    return {
        "upstream": server([HOST], [SPIFFE]),
        "other_san": server(["other.test"], ["spiffe://example.org/ns/backend/sa/other"]),
        "expired": server([HOST], not_before=now() - 30 * DAY, not_after=now() - DAY),
        "expiring": server([HOST], not_after=now() + 3 * DAY),
        "untrusted": pki.other_root.server([HOST]),
        "kong": pki.client("kong-gateway", dns=["kong.internal"]),
        "stranger": pki.unknown_ca_client(),
    }


@pytest.fixture(scope="module")
def files(certs, tmp_path_factory):
    directory = tmp_path_factory.mktemp("upstream-probe")
    return {key: write_pem_files(directory, certs[key], key) for key in ("kong", "stranger")}


@pytest.fixture(scope="module")
def upstream(certs, pki):
    """Requires a client certificate issued under the test root (Kong's is; the stranger's is not)."""
    with TLSUpstream(certs["upstream"], client_cas=[pki.root]) as server:
        yield server


def build(pki, files=None, client="kong", **kwargs) -> UpstreamPolicy:
    kwargs.setdefault("trusted_ca_pem", pki.root.cert_pem)
    kwargs.setdefault("timeout", 3)
    if files is not None and client is not None:
        kwargs["client_cert_file"], kwargs["client_key_file"] = files[client]
    return UpstreamPolicy.build(**kwargs)


def target(server, sni: str | None = HOST) -> Target:
    return Target("127.0.0.1", server.port, sni)


# -- the test upstream itself ------------------------------------------------------------------------

def test_upstream_requires_a_client_cert_from_its_ca(upstream, certs, pki):
    status, body = https_get(upstream, "/echo", ca_pem=pki.root.cert_pem, client=certs["kong"],
                             server_name=HOST, headers={"X-Test": "1"})
    assert status == 200 and body["path"] == "/echo" and body["headers"]["x-test"] == "1"
    assert body["client_cert"]["subject"] == "CN=kong-gateway"
    assert body["tls"]["server_name"] == HOST
    for client in (None, certs["stranger"]):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            https_get(upstream, ca_pem=pki.root.cert_pem, client=client, server_name=HOST)


# -- client certificate ----------------------------------------------------------------------------

@pytest.mark.parametrize("max_version", [None, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"])
def test_upstream_accepts_kongs_client_cert_and_refuses_none_or_another(certs, pki, files, max_version):
    with TLSUpstream(certs["upstream"], client_cas=[pki.root], max_version=max_version) as server:
        ok = check(target(server), build(pki, files))
        assert ok.reason is Reason.IDENTITY_OK, ok.detail
        assert ok.observation.client_certificate.subject == "CN=kong-gateway"
        accepted = server.wait_for(1)[0]
        assert accepted.accepted and accepted.client_cert.subject.rfc4514_string() == "CN=kong-gateway"

        stranger = check(target(server), build(pki, files, client="stranger"))
        assert stranger.reason is Reason.CLIENT_CERT_REJECTED, stranger.detail
        nobody = check(target(server), build(pki))
        # TLS 1.3 names the missing certificate in its alert; TLS 1.2 only says "handshake failure".
        expected = Reason.CLIENT_CERT_REJECTED if max_version is None else Reason.HANDSHAKE_FAILED
        assert nobody.reason is expected, nobody.detail
        seen = server.wait_for(3)
        assert [c.accepted for c in seen] == [True, False, False]
        assert all(c.error for c in seen[1:])


# -- identity ---------------------------------------------------------------------------------------

def test_expected_san_spiffe_and_spki_match(upstream, pki, files, certs):
    pin = CertSummary.of(certs["upstream"].cert).spki_b64
    verdict = check(target(upstream), build(pki, files, expected_dns_names=[HOST], expected_uris=[SPIFFE],
                                            spki_sha256_pins=[pin]))
    assert verdict.ok, verdict.detail
    cert = verdict.observation.certificate
    assert cert.dns_names == (HOST,) and cert.uris == (SPIFFE,) and cert.spki_b64 == pin
    assert verdict.observation.chain_verified and verdict.observation.tls_version == "TLSv1.3"


def test_same_ca_other_san_is_refused(certs, pki, files):
    with TLSUpstream(certs["other_san"], client_cas=[pki.root]) as server:
        # As Kong's own tls_verify would: the certificate is not valid for the server name.
        by_name = check(target(server), build(pki, files))
        assert by_name.reason is Reason.HOSTNAME_MISMATCH
        assert by_name.observation.certificate.dns_names == ("other.test",)  # captured for the log
        # With the name check off, the expected SAN / SPIFFE ID still tell them apart.
        by_san = check(target(server), build(pki, files, verify_hostname=False, expected_dns_names=[HOST]))
        assert by_san.reason is Reason.SAN_MISMATCH
        by_uri = check(target(server), build(pki, files, verify_hostname=False, expected_uris=[SPIFFE]))
        assert by_uri.reason is Reason.URI_SAN_MISMATCH


def test_expired_upstream_cert_is_refused(certs, pki, files):
    with TLSUpstream(certs["expired"], client_cas=[pki.root]) as server:
        verdict = check(target(server), build(pki, files))
    assert verdict.reason is Reason.UPSTREAM_CERT_EXPIRED
    assert verdict.observation.certificate.not_after < now()


def test_untrusted_upstream_is_refused(certs, pki, files):
    with TLSUpstream(certs["untrusted"], client_cas=[pki.root]) as server:
        verdict = check(target(server), build(pki, files))
    assert verdict.reason is Reason.UNTRUSTED_UPSTREAM
    assert verdict.observation.certificate.issuer.startswith("CN=unrelated root CA")


def test_pin_only_identity_without_a_ca(pki):
    self_signed = pki.self_signed(HOST)
    pin = CertSummary.of(self_signed.cert).spki_b64
    with TLSUpstream(self_signed) as server:
        ok = check(target(server), UpstreamPolicy.build(spki_sha256_pins=[pin], timeout=3))
        assert ok.ok and not ok.observation.chain_verified
        wrong = check(target(server), UpstreamPolicy.build(spki_sha256_pins=["A" * 43 + "="], timeout=3))
        assert wrong.reason is Reason.SPKI_MISMATCH


def test_certificate_chosen_by_sni(certs, pki, files):
    with TLSUpstream(certs["other_san"], client_cas=[pki.root],
                     sni_certs={HOST: certs["upstream"]}) as server:
        assert check(target(server, HOST), build(pki, files, expected_uris=[SPIFFE])).ok
        assert check(target(server, "other.test"),
                     build(pki, files, expected_uris=[SPIFFE])).reason is Reason.URI_SAN_MISMATCH
        assert [c.server_name for c in server.wait_for(2)] == [HOST, "other.test"]


def test_expiring_upstream_cert_passes_with_a_notice(certs, pki, files):
    with TLSUpstream(certs["expiring"], client_cas=[pki.root]) as server:
        verdict = check(target(server), build(pki, files, expiry_warning_days=14))
    assert verdict.ok
    assert [n.notice for n in verdict.notices] == [Notice.UPSTREAM_CERT_EXPIRING]


# -- cannot establish -------------------------------------------------------------------------------

def test_target_down_is_unreachable(pki, files):
    verdict = check(Target("127.0.0.1", closed_port(), HOST), build(pki, files))
    assert verdict.reason is Reason.UPSTREAM_UNREACHABLE and "refused" in verdict.detail.lower()


def test_silent_target_times_out(pki, files):
    with SilentServer() as server:
        verdict = check(Target("127.0.0.1", server.port, HOST), build(pki, files, timeout=0.3))
    assert verdict.reason is Reason.PROBE_TIMEOUT


def test_plain_http_target_fails_the_handshake(pki, files):
    listener = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        verdict = check(Target("127.0.0.1", listener.getsockname()[1], HOST), build(pki, files))
    finally:
        thread.join(5)
        listener.close()
    assert verdict.reason is Reason.HANDSHAKE_FAILED


def test_files_are_read_at_each_probe(upstream, certs, pki, tmp_path):
    cert_file, key_file = write_pem_files(tmp_path, certs["kong"], "kong")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text(pki.root.cert_pem)
    policy = UpstreamPolicy.build(trusted_ca_files=[str(ca_file)], client_cert_file=cert_file,
                                  client_key_file=key_file, timeout=3)
    assert check(target(upstream), policy).ok
    write_pem_files(tmp_path, certs["stranger"], "kong")          # rotated to a certificate it refuses
    assert check(target(upstream), policy).reason is Reason.CLIENT_CERT_REJECTED
    os.unlink(key_file)
    assert check(target(upstream), policy).reason is Reason.CLIENT_CERT_UNUSABLE
    write_pem_files(tmp_path, certs["kong"], "kong")
    ca_file.write_text(pki.other_root.cert_pem)                     # the CA file now trusts someone else
    assert check(target(upstream), policy).reason is Reason.UNTRUSTED_UPSTREAM
    os.unlink(ca_file)
    verdict = check(target(upstream), policy)
    assert verdict.reason is Reason.TRUST_STORE_UNUSABLE
    assert "PRIVATE KEY" not in verdict.describe()


# -- web-PKI policy on what OpenSSL accepted ---------------------------------------------------------

def _server_cert(issuer: Authority, sans: list[x509.GeneralName] | None, *, ca: bool = False,
                 aki: bool = True) -> Issued:
    """A server certificate built by hand, to leave out or add what devpki always gets right."""
    key = new_key()
    start = now() - DAY
    builder = (x509.CertificateBuilder().subject_name(name(HOST)).issuer_name(issuer.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(start + 30 * DAY)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([SERVER_AUTH]), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if aki:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False)
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Issued(builder.sign(issuer.key, hashes.SHA256()), key, issuer.chain)


@pytest.fixture(scope="module")
def odd_certs(pki):
    excluding = pki.root.intermediate("excludes api", name_constraints=x509.NameConstraints(
        permitted_subtrees=None, excluded_subtrees=[x509.DNSName(WILDCARD_HOST)]))
    return {
        "control": _server_cert(pki.intermediate, [x509.DNSName(HOST)]),
        "ca_as_leaf": _server_cert(pki.intermediate, [x509.DNSName(HOST)], ca=True),
        "no_aki": _server_cert(pki.intermediate, [x509.DNSName(HOST)], aki=False),
        "cn_only": _server_cert(pki.intermediate, None),
        # *.example.test covers api.example.test, which its CA may not name (CVE-2025-61727's shape)
        "wildcard_into_excluded": _server_cert(excluding, [x509.DNSName("*.example.test")]),
    }


@pytest.mark.parametrize("case, words", [
    ("ca_as_leaf", "basicConstraints.cA"),
    ("no_aki", "2.5.29.35"),                  # authorityKeyIdentifier
    ("cn_only", "subjectAltName"),
    ("wildcard_into_excluded", "excluded name constraint"),
])
def test_webpki_refuses_what_openssl_accepts(odd_certs, pki, files, case, words):
    with TLSUpstream(odd_certs["control"], client_cas=[pki.root]) as server:
        control = check(target(server), build(pki, files))
        assert control.ok, control.detail
    with TLSUpstream(odd_certs[case], client_cas=[pki.root]) as server:
        verdict = check(target(server, WILDCARD_HOST if case.startswith("wildcard") else HOST),
                        build(pki, files))
    # OpenSSL verified chain and name (else UNTRUSTED_UPSTREAM / HOSTNAME_MISMATCH); the policy did not.
    assert verdict.reason is Reason.WEBPKI_REFUSED, verdict.detail
    assert words in verdict.detail and "<Certificate" not in verdict.detail
    assert verdict.observation.certificate.subject == f"CN={HOST}"
    assert not verdict.observation.chain_verified
    assert verdict.alarm


def test_webpki_policy_sees_the_intermediates_the_upstream_sent(pki, files):
    """The chain comes from the probe's own connection: without the intermediate it sent, the leaf
    could not be tied to the root at all."""
    leaf = pki.intermediate.server([HOST])
    with TLSUpstream(leaf, client_cas=[pki.root]) as server:
        assert check(target(server), build(pki, files)).ok
    lone = Issued(leaf.cert, leaf.key)                      # the same leaf, sent without the intermediate
    with TLSUpstream(lone, client_cas=[pki.root]) as server:
        assert check(target(server), build(pki, files)).reason is Reason.UNTRUSTED_UPSTREAM


def test_webpki_problem_without_a_host_name_check(odd_certs, pki):
    chain = [odd_certs["control"].cert, *odd_certs["control"].intermediates]
    assert webpki_problem(chain, [pki.root.cert], HOST) is None
    assert webpki_problem(chain, [pki.root.cert], None) is None          # checks against its own SAN
    assert webpki_problem(chain, [pki.root.cert], "other.test") is not None
    assert webpki_problem(chain, [pki.other_root.cert], HOST) is not None
    cn_only = [odd_certs["cn_only"].cert, *odd_certs["cn_only"].intermediates]
    assert webpki_problem(cn_only, [pki.root.cert], None) == "the certificate has no DNS or IP subjectAltName"
    ip_leaf = pki.intermediate.server([], ips=["127.0.0.1"])
    assert webpki_problem([ip_leaf.cert, *ip_leaf.intermediates], [pki.root.cert], "127.0.0.1") is None
    assert webpki_problem([ip_leaf.cert, *ip_leaf.intermediates], [pki.root.cert], "127.0.0.2") is not None


def test_a_python_that_cannot_return_the_chain_fails_closed():
    """Python < 3.10 has no get_unverified_chain: no web-PKI verdict, so no pass."""
    from types import SimpleNamespace

    from kong_mtls.core import upstream as core

    with pytest.raises(core._Failed) as failed:
        core._presented_chain(SimpleNamespace(_sslobj=object()))
    assert failed.value.reason is Reason.PROBE_ERROR and "3.10" in failed.value.detail


@pytest.mark.parametrize("max_version", [None, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"])
def test_refusing_kongs_certificate_does_not_hide_another_identity(certs, pki, files, max_version):
    """Review: an upstream with another identity that also refuses Kong's client certificate was
    reported as CLIENT_CERT_REJECTED (a warning), not as the identity alarm it is."""
    with TLSUpstream(certs["upstream"], client_cas=[pki.root], max_version=max_version) as server:
        wrong = check(target(server), build(pki, files, client="stranger",
                                            expected_uris=["spiffe://example.org/someone-else"]))
        if max_version is None:   # TLS 1.3: the chain is in hand before the upstream's verdict
            assert wrong.reason is Reason.URI_SAN_MISMATCH and wrong.alarm, wrong.detail
            assert "refused Kong's client certificate" in wrong.detail
        else:                     # TLS 1.2: the handshake fails before any chain is shown
            assert wrong.reason in (Reason.CLIENT_CERT_REJECTED, Reason.HANDSHAKE_FAILED)
        right = check(target(server), build(pki, files, client="stranger"))
        assert right.reason in (Reason.CLIENT_CERT_REJECTED, Reason.HANDSHAKE_FAILED) and not right.alarm
