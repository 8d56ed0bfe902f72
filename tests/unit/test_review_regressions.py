"""Regressions from an outside review of the trust changes: each test failed before its fix.

Names taken from the subject and name constraints, revocation of intermediates through the CRLs
that speak for CAs, the fetch guard's IPv6 forms, and preset lists' total width.
"""

from __future__ import annotations

import datetime as dt
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from kong_mtls.core.chain import ChainPolicy, ChainVerifier, Reason
from kong_mtls.core.identity import Authenticator, AuthPolicy, GroupSource
from kong_mtls.core.revocation import RevocationChecker, _public_address
from kong_mtls.devpki import Authority
from kong_mtls.presets import PresetError, parse_cidr_list

ADMIN = {"id": "00000000-0000-0000-0000-0000000000a1", "username": "admin"}
MAIL_ADMIN = {"id": "00000000-0000-0000-0000-0000000000a2", "username": "admin@corp.example"}


def lookup(*rows):
    return lambda ref: next((r for r in rows if ref in (r["id"], r["username"])), None)


def auth(root: Authority, **policy) -> Authenticator:
    return Authenticator(ChainVerifier(ChainPolicy(anchors=(root.cert,))), AuthPolicy(**policy))


def test_a_ca_excluding_every_dns_name_cannot_issue_a_cn_login():
    """The CA/Browser Forum way to forbid DNS names: an excluded zero-length dNSName."""
    root = Authority.root("root")
    no_dns = root.intermediate("email-only partner CA", name_constraints=x509.NameConstraints(None, [
        x509.DNSName(""), x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")),
        x509.IPAddress(ipaddress.ip_network("::/0"))]))
    leaf = no_dns.client("admin", emails=["someone@partner.example"])
    assert auth(root).authenticate(leaf.chain_pem, lookup(ADMIN)).reason is Reason.OUTSIDE_NAME_CONSTRAINTS
    groups = auth(root, skip_consumer_lookup=True, groups_from=(GroupSource.parse("cn"),))
    assert groups.authenticate(no_dns.client("admins").chain_pem, lookup()).reason \
        is Reason.OUTSIDE_NAME_CONSTRAINTS


def test_a_cn_that_is_no_dns_name_is_refused_below_a_constrained_ca():
    root = Authority.root("root")
    ca = root.intermediate("partner CA", name_constraints=x509.NameConstraints(None, [
        x509.RFC822Name("corp.example"), x509.DNSName("corp.example")]))
    decision = auth(root).authenticate(ca.client("admin@corp.example").chain_pem, lookup(MAIL_ADMIN))
    assert decision.reason is Reason.OUTSIDE_NAME_CONSTRAINTS


@pytest.mark.parametrize("source", ["cn", "dn:CN", "dn:2.5.4.3"])
def test_every_group_source_reading_the_cn_holds_the_constraints(source):
    root = Authority.root("root")
    ca = root.intermediate("partner CA", name_constraints=x509.NameConstraints(
        [x509.DNSName("partner.example")], None))
    decision = auth(root, skip_consumer_lookup=True, groups_from=(GroupSource.parse(source),)).authenticate(
        ca.client("admins").chain_pem, lookup())
    assert decision.reason is Reason.OUTSIDE_NAME_CONSTRAINTS


def _crl(ca: Authority, serials, idp=None) -> x509.CertificateRevocationList:
    last = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject).last_update(last)
               .next_update(last + dt.timedelta(days=1)).add_extension(x509.CRLNumber(1), critical=False))
    if idp is not None:
        builder = builder.add_extension(idp, critical=True)
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(last).build())
    return builder.sign(ca.key, hashes.SHA256())


def _idp(url=None, user=False, ca=False) -> x509.IssuingDistributionPoint:
    return x509.IssuingDistributionPoint(
        full_name=[x509.UniformResourceIdentifier(url)] if url else None, relative_name=None,
        only_contains_user_certs=user, only_contains_ca_certs=ca, only_some_reasons=None,
        indirect_crl=False, only_contains_attribute_certs=False)


def _decide(root, leaf, static, fetched, mode):
    checker = RevocationChecker(static_crls=static, fetch=lambda url, body, timeout: fetched[url])
    authenticator = Authenticator(ChainVerifier(ChainPolicy(anchors=(root.cert,))),
                                  AuthPolicy(skip_consumer_lookup=True),
                                  revocation=lambda cert, issuer: checker.check(cert, issuer, mode))
    return authenticator.authenticate(leaf.chain_pem, lookup())


URL = "http://pki.example/root-arl.crl"


@pytest.mark.parametrize("mode", ["IGNORE_CA_ERROR", "STRICT"])
def test_an_intermediate_revoked_in_the_roots_ca_only_crl_is_revoked(mode):
    """Roots often list their intermediates' revocations in a CRL for CA certificates only (an ARL)."""
    root = Authority.root("root")
    issuing = root.intermediate("issuing", crl_url=URL)
    arl = _crl(root, [issuing.cert.serial_number], _idp(URL, ca=True))
    fetched = {URL: arl.public_bytes(serialization.Encoding.DER)}
    decision = _decide(root, issuing.client("alice"), [_crl(issuing, [])], fetched, mode)
    assert decision.reason is Reason.REVOKED, decision.detail


def test_a_crl_for_end_entities_only_never_vouches_for_an_intermediate():
    root = Authority.root("root")
    issuing = root.intermediate("issuing", crl_url=URL)
    fetched = {URL: _crl(root, [issuing.cert.serial_number], _idp(URL, ca=True)).public_bytes(
        serialization.Encoding.DER)}
    user_only = _crl(root, [], _idp(user=True))
    decision = _decide(root, issuing.client("alice"), [_crl(issuing, []), user_only], fetched, "STRICT")
    assert decision.reason is Reason.REVOKED, decision.detail


@pytest.mark.parametrize("address", ["64:ff9b::a9fe:a9fe", "64:ff9b::a00:1", "64:ff9b:1::a00:1",
                                     "64:ff9b:1:a9fe:a9:fe00:808:808",
                                     "2002:a9fe:a9fe::", "::a00:1", "::ffff:0:a00:1", "fec0::1"])
def test_ipv6_forms_of_private_ipv4_addresses_are_no_fetch_targets(address):
    assert not _public_address(address)


def test_public_addresses_stay_fetch_targets():
    for address in ("8.8.8.8", "2606:4700::1", "64:ff9b::808:808"):
        assert _public_address(address), address


def test_a_preset_list_covering_more_than_one_slash_8_in_all_is_refused():
    with pytest.raises(PresetError, match="more addresses than one /8"):
        parse_cidr_list({"name": "cloudflare", "ipv4_cidrs": [f"{i}.0.0.0/8" for i in range(256)]}, "x")


@pytest.mark.parametrize("secret", ["sixteen-chars-ok ", " sixteen-chars-ok", "sixteen\tchars-ok"])
def test_an_index_secret_with_surrounding_or_control_spaces_is_refused(secret):
    """The CLI reads the secret from a file without its line end: the plugin's copy must be the same."""
    from kong_mtls.core.api_keys import index_secret
    from kong_mtls.schema import ConfigError

    with pytest.raises(ConfigError, match="key_index_secret"):
        index_secret(secret)
