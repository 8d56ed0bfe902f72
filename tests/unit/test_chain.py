"""client-cert-auth chain core: verification over the test PKI, reason codes, limits, caches, anchors."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import given, settings
from hypothesis import strategies as st

from kong_mtls.core import chain as chain_core
from kong_mtls.core.chain import (
    REFUSAL_CACHE_SECONDS,
    ChainConfigError,
    ChainPolicy,
    ChainVerifier,
    Reason,
    cert_sha256,
    check_anchor,
    expiring_anchors,
    normalize_sha256,
    parse_eku,
    parse_pem_certificates,
    read_certificate_file,
    spki_sha256,
)
from kong_mtls.devpki import Authority, Issued, cert_pem, name, new_key
from kong_mtls.presets import CA_PRESET_NAMES, PresetError, load_ca_preset
from tests.harness.pki import DAY, now


class Clock:
    def __init__(self, start: float | None = None) -> None:
        self.now = now().timestamp() if start is None else start

    def __call__(self) -> float:
        return self.now


def verifier(*anchors: x509.Certificate, clock=None, cache_size: int = 64, **policy) -> ChainVerifier:
    return ChainVerifier(ChainPolicy(anchors=anchors, **policy), cache_size=cache_size,
                         **({"clock": clock} if clock else {}))


def leaf_only(issued: Issued) -> str:
    return issued.cert_pem


def raw_leaf(issuer: Authority, subject: str = "raw", *, aki: bool = True, san: bool = True,
             extensions: tuple = ()) -> Issued:
    """A leaf built by hand, for extension shapes devpki does not produce."""
    key = new_key()
    builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now() - DAY).not_valid_after(now() + DAY))
    if aki:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(f"{subject}.example")]),
                                        critical=False)
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return Issued(cert=builder.sign(issuer.key, hashes.SHA256()), key=key, intermediates=issuer.chain)


@pytest.fixture(scope="module")
def v(pki) -> ChainVerifier:
    return verifier(pki.root.cert)


# -- valid chains ------------------------------------------------------------------------------------

def test_valid_chain_with_intermediate(pki, v):
    verdict = v.verify(pki.alice.chain_pem)
    assert verdict.ok and verdict.reason is None
    chain = verdict.chain
    assert chain.leaf == pki.alice.cert
    assert chain.path == (pki.alice.cert, pki.intermediate.cert, pki.root.cert)
    assert chain.issuer == pki.intermediate.cert and chain.anchor == pki.root.cert
    assert chain.intermediates == (pki.intermediate.cert,)
    assert chain.ca_sha256 == (cert_sha256(pki.intermediate.cert), cert_sha256(pki.root.cert))
    assert chain.leaf_sha256 == pki.alice.cert.fingerprint(hashes.SHA256()).hex()
    der = pki.alice.cert.public_key().public_bytes(serialization.Encoding.DER,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    assert chain.spki_sha256 == hashlib.sha256(der).hexdigest() == spki_sha256(pki.alice.cert)
    assert chain.chain_sha256 == hashlib.sha256(pki.alice.chain_pem.encode()).hexdigest()
    assert chain.valid_until == min(c.not_valid_after_utc.timestamp() for c in chain.path)


def test_chain_may_include_the_root_and_be_bytes(pki, v):
    with_root = pki.alice.chain_pem + pki.root.cert_pem
    assert v.verify(with_root).ok
    assert v.verify(with_root.encode()).ok


@pytest.mark.parametrize("kind", ["rsa", "cn-only", "no-eku"])
def test_valid_leaf_shapes(pki, v, kind):
    issued = {
        "rsa": lambda: pki.rsa_client(),
        "cn-only": lambda: pki.client("cn-only.example"),   # no subjectAltName at all
        "no-eku": lambda: pki.no_eku(),                       # RFC 5280: no EKU = any purpose
    }[kind]()
    verdict = v.verify(issued.chain_pem)
    assert verdict.ok, verdict.detail


def _shaped_leaf(issuer, *, subject: x509.Name, san_critical: bool | None, eku_critical: bool = False,
                 aki: bool = True) -> str:
    """A leaf with the given subject, SAN criticality (None: no SAN), EKU criticality and AKI."""
    key = new_key()
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now() - DAY).not_valid_after(now() + DAY)
               .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
                              critical=eku_critical))
    if aki:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False)
    if san_critical is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("shaped.example")]),
                                        critical=san_critical)
    cert = builder.sign(issuer.key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM).decode() + issuer.cert_pem


EMPTY = x509.Name([])


@pytest.mark.parametrize(("shape", "ok"), [
    ({"subject": name("s"), "san_critical": False}, True),
    ({"subject": EMPTY, "san_critical": True}, True),           # RFC 5280: empty subject, critical SAN
    ({"subject": name("cn-only"), "san_critical": None}, True),  # CN-only: the one kept relaxation
    ({"subject": EMPTY, "san_critical": False}, False),
    ({"subject": name("s"), "san_critical": True}, False),
    ({"subject": EMPTY, "san_critical": None}, False),
    ({"subject": name("s"), "san_critical": False, "eku_critical": True}, False),
    ({"subject": name("s"), "san_critical": False, "aki": False}, False),
], ids=["plain", "empty-subject-critical-san", "cn-only", "empty-subject-noncritical-san",
        "subject-and-critical-san", "empty-subject-no-san", "critical-eku", "no-aki"])
def test_what_the_verifier_accepts_of_a_leaf(pki, v, shape, ok):
    verdict = v.verify(_shaped_leaf(pki.intermediate, **shape))
    assert verdict.ok is ok, verdict.detail
    if not ok:
        assert verdict.reason is Reason.BAD_EXTENSION, verdict.detail


# -- refusals ------------------------------------------------------------------------------------------

def test_unknown_ca(pki, v):
    verdict = v.verify(pki.unknown_ca_client().chain_pem)
    assert verdict.reason is Reason.UNKNOWN_CA and not verdict.ok
    assert verdict.leaf is not None and "stranger" in verdict.detail


def test_missing_intermediate_is_an_unknown_ca(pki, v):
    assert v.verify(leaf_only(pki.alice)).reason is Reason.UNKNOWN_CA


def test_expired_and_not_yet_valid(pki, v):
    expired = v.verify(pki.expired().chain_pem)
    assert expired.reason is Reason.EXPIRED and "CN=expired" in expired.detail
    future = v.verify(pki.not_yet_valid().chain_pem)
    assert future.reason is Reason.NOT_YET_VALID and "CN=future" in future.detail


def test_expired_intermediate_is_named(pki):
    short = pki.root.intermediate("short-lived CA", days=1)
    issued = short.client("under-short", dns=["u.example"])
    clock = Clock(now().timestamp() + 2 * 86400)
    verdict = verifier(pki.root.cert, clock=clock).verify(issued.chain_pem)
    assert verdict.reason is Reason.EXPIRED
    assert "short-lived CA" in verdict.detail and "under-short" in verdict.detail


def test_time_skew_tolerates_both_edges(pki):
    # (the test CAs became valid 5 minutes before the session started)
    seconds = dt.timedelta(seconds=90)
    just_expired = pki.client("just-expired", not_before=now() - DAY, not_after=now() - seconds)
    just_future = pki.client("just-future", not_before=now() + seconds, not_after=now() + DAY)
    strict = verifier(pki.root.cert)
    assert strict.verify(just_expired.chain_pem).reason is Reason.EXPIRED
    assert strict.verify(just_future.chain_pem).reason is Reason.NOT_YET_VALID
    lenient = verifier(pki.root.cert, time_skew=600)
    assert lenient.verify(just_expired.chain_pem).ok
    future = lenient.verify(just_future.chain_pem)
    assert future.ok and future.chain.valid_from == just_future.cert.not_valid_before_utc.timestamp() - 600
    assert lenient.verify(pki.expired().chain_pem).reason is Reason.EXPIRED  # a day is beyond 10 minutes
    assert verifier(pki.root.cert, time_skew=60).verify(just_expired.chain_pem).reason is Reason.EXPIRED


def test_wrong_eku_and_configurable_eku(pki):
    server_only = pki.server_only_eku()
    default = verifier(pki.root.cert)
    refused = default.verify(server_only.chain_pem)
    assert refused.reason is Reason.BAD_EKU and "server_auth" in refused.detail
    assert verifier(pki.root.cert, required_eku=None).verify(server_only.chain_pem).ok
    as_server = verifier(pki.root.cert, required_eku=ExtendedKeyUsageOID.SERVER_AUTH)
    assert as_server.verify(server_only.chain_pem).ok
    assert as_server.verify(pki.alice.chain_pem).reason is Reason.BAD_EKU
    custom = x509.ObjectIdentifier("1.3.6.1.4.1.99999.1")
    issued = pki.client("custom-eku", extended_key_usage=[custom])
    assert verifier(pki.root.cert, required_eku=custom).verify(issued.chain_pem).ok
    assert default.verify(issued.chain_pem).reason is Reason.BAD_EKU


def test_intermediate_eku_must_allow_client_auth(pki):
    narrow = _ca_with_eku(pki.root, [ExtendedKeyUsageOID.SERVER_AUTH])
    issued = narrow.client("narrow", dns=["n.example"])
    assert verifier(pki.root.cert).verify(issued.chain_pem).reason is Reason.BAD_EKU
    assert verifier(pki.root.cert, required_eku=None).verify(issued.chain_pem).ok


def _ca_with_eku(parent: Authority, eku) -> Authority:
    key = new_key()
    cert = (x509.CertificateBuilder().subject_name(name("eku CA")).issuer_name(parent.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now() - DAY).not_valid_after(now() + 30 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                           critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
            .sign(parent.key, hashes.SHA256()))
    return Authority(subject=name("eku CA"), key=key, cert=cert, parent=parent)


def test_key_usage_without_digital_signature(pki, v):
    verdict = v.verify(pki.cert_sign_only_key_usage().chain_pem)
    assert verdict.reason is Reason.BAD_KEY_USAGE


def test_chain_depth(pki):
    _, deep4 = pki.deep_chain(4)
    _, deep5 = pki.deep_chain(5)
    default = verifier(pki.root.cert)  # max_chain_depth 4 intermediates
    assert default.verify(deep4.chain_pem).ok
    assert default.verify(deep5.chain_pem).reason is Reason.CHAIN_TOO_DEEP
    assert verifier(pki.root.cert, max_chain_depth=1).verify(pki.alice.chain_pem).ok
    direct_only = verifier(pki.root.cert, max_chain_depth=0)
    assert direct_only.verify(pki.alice.chain_pem).reason is Reason.CHAIN_TOO_DEEP


def test_partial_chain(pki):
    # An intermediate alone can only be an anchor when allow_partial_chain is on.
    with pytest.raises(ChainConfigError, match="allow_partial_chain"):
        ChainPolicy(anchors=(pki.intermediate.cert,))
    partial = verifier(pki.intermediate.cert, allow_partial_chain=True)
    verdict = partial.verify(leaf_only(pki.alice))
    assert verdict.ok and verdict.chain.path == (pki.alice.cert, pki.intermediate.cert)
    assert partial.verify(pki.alice.chain_pem).ok
    # Off: a configured intermediate is a known intermediate, the path must reach the root.
    full = verifier(pki.root.cert, pki.intermediate.cert)
    verdict = full.verify(leaf_only(pki.alice))
    assert verdict.ok and verdict.chain.path[-1] == pki.root.cert
    # A client of another intermediate under the same root is not accepted by a partial anchor.
    sibling = pki.root.intermediate("sibling CA").client("sib", dns=["sib.example"])
    assert partial.verify(sibling.chain_pem).reason is Reason.UNKNOWN_CA
    assert full.verify(sibling.chain_pem).ok


def test_ca_rotation_with_two_anchors(pki):
    old_root, new_root = Authority.root("old root"), Authority.root("new root")
    old_client = old_root.client("old-client", dns=["old.example"])
    new_client = new_root.client("new-client", dns=["new.example"])
    both = verifier(old_root.cert, new_root.cert)
    assert both.verify(old_client.chain_pem).ok and both.verify(new_client.chain_pem).ok
    after = verifier(new_root.cert)
    assert after.verify(old_client.chain_pem).reason is Reason.UNKNOWN_CA
    assert after.verify(new_client.chain_pem).ok


def test_forged_issuer_signature(pki, v):
    forger = Authority(subject=pki.intermediate.subject, key=new_key(), cert=pki.intermediate.cert,
                       parent=pki.root)
    assert v.verify(forger.client("forged", dns=["f.example"]).chain_pem).reason is Reason.BAD_SIGNATURE


def test_ca_certificate_as_leaf(pki, v):
    assert v.verify(pki.self_signed().chain_pem).reason is Reason.LEAF_IS_CA
    assert v.verify(pki.intermediate.cert_pem + pki.root.cert_pem).reason is Reason.LEAF_IS_CA


def test_issuer_that_is_not_a_ca(pki, v):
    holder = pki.client("not-a-ca", dns=["nac.example"])
    fake_ca = Authority(subject=holder.cert.subject, key=holder.key, cert=holder.cert,
                        parent=pki.intermediate)
    under = fake_ca.client("under-leaf", dns=["ul.example"])
    assert v.verify(under.chain_pem).reason is Reason.INVALID_CA


def test_path_length_constraint(pki):
    root = Authority.root("pathlen root", path_length=0)
    deeper = root.intermediate("level 1").intermediate("level 2")
    issued = deeper.client("pl", dns=["pl.example"])
    assert verifier(root.cert).verify(issued.chain_pem).reason is Reason.INVALID_CA


def test_unknown_critical_extension(pki, v):
    odd = (x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.7"), b"\x05\x00"), True)
    issued = raw_leaf(pki.intermediate, "crit", extensions=(odd,))
    assert v.verify(issued.chain_pem).reason is Reason.BAD_EXTENSION


def test_unsupported_signature_algorithm():
    root = Authority.root("ed25519 root", key_kind="ed25519")
    issued = root.client("ed", dns=["ed.example"])
    assert verifier(root.cert).verify(issued.chain_pem).reason is Reason.UNSUPPORTED_ALGORITHM


# -- malformed input: refusals with a reason, never an exception ---------------------------------------

def _body_cut(pem: str) -> str:
    lines = pem.splitlines()
    return "\n".join(lines[:4] + lines[-1:]) + "\n"  # a BEGIN, a few base64 lines, the END


@pytest.mark.parametrize(("make", "reason"), [
    (lambda p: None, Reason.NO_CERTIFICATE),
    (lambda p: "", Reason.NO_CERTIFICATE),
    (lambda p: b"", Reason.NO_CERTIFICATE),
    (lambda p: 42, Reason.MALFORMED_CHAIN),
    (lambda p: {"pem": "x"}, Reason.MALFORMED_CHAIN),
    (lambda p: "not a certificate at all", Reason.MALFORMED_CHAIN),
    (lambda p: "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", Reason.MALFORMED_CHAIN),
    (lambda p: _body_cut(p.alice.cert_pem), Reason.MALFORMED_CHAIN),                       # truncated DER
    (lambda p: p.alice.cert_pem.replace("-----END CERTIFICATE-----", ""), Reason.MALFORMED_CHAIN),
    (lambda p: "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n", Reason.MALFORMED_CHAIN),
    (lambda p: "-----BEGIN CERTIFICATE-----\n" + base64.b64encode(b"\x30\x82\xff\xff" + b"\0" * 64).decode()
     + "\n-----END CERTIFICATE-----\n", Reason.MALFORMED_CHAIN),
    (lambda p: p.alice.chain_pem.replace("M", "é", 1), Reason.MALFORMED_CHAIN),            # not ASCII
    (lambda p: p.alice.chain_pem.encode() + b"\xff", Reason.MALFORMED_CHAIN),
    (lambda p: "A" * (10 * 1024 * 1024), Reason.CHAIN_TOO_LARGE),                          # 10 MB
    (lambda p: p.alice.cert_pem * 50, Reason.CHAIN_TOO_LARGE),                              # 50 certificates
])
def test_malformed_chains_are_refused(pki, v, make, reason):
    verdict = v.verify(make(pki))
    assert verdict.reason is reason and not verdict.ok


def test_size_limits_are_checked_before_parsing(pki, monkeypatch):
    def boom(*_):
        raise AssertionError("parsed")

    monkeypatch.setattr(chain_core.x509, "load_pem_x509_certificates", boom)
    v = verifier(pki.root.cert)
    assert v.verify("-----BEGIN CERTIFICATE-----\n" * 70_000).reason is Reason.CHAIN_TOO_LARGE
    assert v.verify(pki.alice.cert_pem * 17).reason is Reason.CHAIN_TOO_LARGE


_BASE64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(max_size=3000), st.binary(max_size=3000),
                 st.builds(lambda a, b: f"-----BEGIN CERTIFICATE-----\n{a}\n-----END CERTIFICATE-----\n{b}",
                           st.text(alphabet=_BASE64 + "\n", max_size=2000), st.text(max_size=100))))
def test_arbitrary_input_never_raises_nor_passes(v, data):
    verdict = v.verify(data)
    assert not verdict.ok and isinstance(verdict.reason, Reason)


def test_a_mangled_valid_chain_is_refused(pki, v):
    pem = pki.alice.chain_pem
    lines = pem.splitlines()
    lines[5] = lines[5][:10] + ("A" if lines[5][10] != "A" else "B") + lines[5][11:]
    verdict = v.verify("\n".join(lines) + "\n")
    assert not verdict.ok and verdict.reason in (Reason.MALFORMED_CHAIN, Reason.BAD_SIGNATURE,
                                                 Reason.UNKNOWN_CA, Reason.INVALID_CERTIFICATE,
                                                 Reason.BAD_EXTENSION)


# -- caches ------------------------------------------------------------------------------------------

def test_returning_client_costs_no_verification(pki, monkeypatch):
    v = verifier(pki.root.cert)
    assert v.verify(pki.alice.chain_pem).ok and v.misses == 1

    def no_more(*_):
        raise AssertionError("verified again")

    monkeypatch.setattr(v, "_path", no_more)
    again = v.verify(pki.alice.chain_pem)
    assert again.ok and again.chain.leaf == pki.alice.cert and v.hits == 1 and v.misses == 1


def test_cache_honours_the_leaf_expiry(pki):
    clock = Clock()
    short = pki.client("short", dns=["short.example"], not_after=now() + dt.timedelta(hours=1))
    v = verifier(pki.root.cert, clock=clock)
    assert v.verify(short.chain_pem).ok
    clock.now += 2 * 3600
    verdict = v.verify(short.chain_pem)
    assert verdict.reason is Reason.EXPIRED and v.misses == 2


def test_refusals_are_cached_briefly(pki):
    clock = Clock()
    v = verifier(pki.root.cert, clock=clock)
    bad = pki.unknown_ca_client().chain_pem
    assert v.verify(bad).reason is Reason.UNKNOWN_CA
    assert v.verify(bad).reason is Reason.UNKNOWN_CA and v.misses == 1 and v.hits == 1
    clock.now += REFUSAL_CACHE_SECONDS + 1
    assert v.verify(bad).reason is Reason.UNKNOWN_CA and v.misses == 2


def test_cache_is_bounded(pki):
    v = verifier(pki.root.cert, cache_size=2)
    for i in range(4):
        assert v.verify(pki.client(f"c{i}", dns=[f"c{i}.example"]).chain_pem).ok
    assert v.cache_size == 2


def test_cache_size_zero_still_verifies(pki):
    v = verifier(pki.root.cert, cache_size=0)
    assert v.verify(pki.alice.chain_pem).ok and v.verify(pki.alice.chain_pem).ok and v.misses == 2


# -- anchors and helpers -------------------------------------------------------------------------------

def test_anchor_checks(pki):
    check_anchor(pki.root.cert)
    check_anchor(pki.intermediate.cert)
    with pytest.raises(ChainConfigError, match="not a CA"):
        check_anchor(pki.alice.cert)
    with pytest.raises(ChainConfigError, match="no trust anchor"):
        ChainPolicy(anchors=())
    key = new_key()
    bare = (x509.CertificateBuilder().subject_name(name("bare")).issuer_name(name("bare"))
            .public_key(key.public_key()).serial_number(1).not_valid_before(now() - DAY)
            .not_valid_after(now() + DAY).sign(key, hashes.SHA256()))
    with pytest.raises(ChainConfigError, match="basicConstraints"):
        check_anchor(bare)


def test_anchors_are_deduplicated_and_split(pki):
    policy = ChainPolicy(anchors=(pki.root.cert, pki.root.cert, pki.intermediate.cert))
    assert policy.anchors == (pki.root.cert, pki.intermediate.cert)
    assert policy.store_anchors == (pki.root.cert,) and policy.known_intermediates == (pki.intermediate.cert,)


def test_parse_pem_certificates(pki, tmp_path):
    assert parse_pem_certificates(pki.root.cert_pem + pki.intermediate.cert_pem) == [pki.root.cert,
                                                                                      pki.intermediate.cert]
    with pytest.raises(ChainConfigError, match="paste the PEM"):
        parse_pem_certificates("322dce96-d434-4e0d-9038-311b3520f0a3")
    with pytest.raises(ChainConfigError, match="unreadable"):
        parse_pem_certificates("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    path = tmp_path / "ca.pem"
    path.write_text("# my CA\n" + pki.root.cert_pem)
    assert read_certificate_file(str(path)) == [pki.root.cert]
    with pytest.raises(ChainConfigError, match="cannot read"):
        read_certificate_file(str(tmp_path / "missing.pem"))


def test_expiring_anchors(pki):
    soon = Authority.root("expiring root", days=30)
    found = expiring_anchors([pki.root.cert, soon.cert], now().timestamp())
    assert [cert for cert, _ in found] == [soon.cert] and 28 <= found[0][1] <= 30
    later = now().timestamp() + 40 * 86400
    assert expiring_anchors([soon.cert], later)[0][1] < 0


def test_normalize_sha256(pki):
    digest = hashlib.sha256(b"x").digest()
    expected = digest.hex()
    assert normalize_sha256(expected.upper()) == expected
    assert normalize_sha256(":".join(f"{b:02X}" for b in digest)) == expected
    assert normalize_sha256(base64.b64encode(digest).decode()) == expected
    for bad in ("", "abc", expected[:-1], base64.b64encode(b"short").decode()):
        with pytest.raises(ValueError):
            normalize_sha256(bad)


def test_parse_eku():
    assert parse_eku("client_auth") == ExtendedKeyUsageOID.CLIENT_AUTH
    assert parse_eku("SERVER_AUTH") == ExtendedKeyUsageOID.SERVER_AUTH
    assert parse_eku("any") is None
    assert parse_eku("1.3.6.1.4.1.99999.1").dotted_string == "1.3.6.1.4.1.99999.1"
    for bad in ("clientAuth2", "1.2.", "", "1..2"):
        with pytest.raises(ValueError):
            parse_eku(bad)


# -- the Cloudflare Authenticated Origin Pulls preset ------------------------------------------------

def test_cloudflare_origin_pull_preset_matches_the_published_ca():
    assert "cloudflare-origin-pull" in CA_PRESET_NAMES
    (ca,) = load_ca_preset("cloudflare-origin-pull")
    expected = ("CN=origin-pull.cloudflare.net,ST=California,L=San Francisco,OU=Origin Pull,"
                "O=CloudFlare\\, Inc.,C=US")
    assert ca.subject.rfc4514_string() == expected and ca.issuer == ca.subject
    assert ca.public_key().key_size == 4096
    assert ca.signature_hash_algorithm.name == "sha512"
    assert ca.not_valid_before_utc == dt.datetime(2019, 10, 10, 18, 45, tzinfo=dt.timezone.utc)
    assert ca.not_valid_after_utc == dt.datetime(2029, 11, 1, 17, 0, tzinfo=dt.timezone.utc)
    assert cert_sha256(ca) == "9a1ac2b4be15f9f27eee20a734cba4e9898f61001b3bd7c84b69b56a3e25a2b9"
    ca.verify_directly_issued_by(ca)  # the bytes are intact: its self-signature holds
    policy = ChainPolicy(anchors=(ca,))
    assert policy.store_anchors == (ca,)
    warn_from = dt.datetime(2029, 8, 3, tzinfo=dt.timezone.utc).timestamp()
    assert expiring_anchors([ca], warn_from - 86400) == []
    assert expiring_anchors([ca], warn_from + 86400)[0][0] == ca


def test_a_client_of_another_ca_is_refused_by_the_cloudflare_preset(pki):
    v = ChainVerifier(ChainPolicy(anchors=tuple(load_ca_preset("cloudflare-origin-pull"))))
    assert v.verify(pki.alice.chain_pem).reason is Reason.UNKNOWN_CA


def test_unknown_ca_preset():
    with pytest.raises(PresetError, match="unknown CA preset"):
        load_ca_preset("cloudflare")


def test_cert_pem_helper_roundtrip(pki):
    assert parse_pem_certificates(cert_pem(pki.alice.cert)) == [pki.alice.cert]


# -- hostile chains: refused cheaply, bounded cost (bench/core.py measures them) ------------------------

def test_more_certificates_than_the_depth_allows_are_refused_before_parsing(pki):
    shallow = verifier(pki.root.cert, max_chain_depth=1)   # leaf, 1 CA, root, two cross-signs at most
    assert shallow.verify(pki.alice.chain_pem + pki.root.cert_pem + pki.other_root.cert_pem).ok
    verdict = shallow.verify(pki.alice.chain_pem + pki.root.cert_pem + pki.other_root.cert_pem * 4)
    assert verdict.reason is Reason.CHAIN_TOO_LARGE and "limit 5" in verdict.detail


def test_a_whole_bundle_sent_to_a_partial_chain_anchor_verifies(pki):
    """An intermediate as the anchor, depth 0: a client that sends leaf, intermediate and root."""
    partial = verifier(pki.intermediate.cert, allow_partial_chain=True, max_chain_depth=0)
    assert partial.verify(pki.alice.chain_pem + pki.root.cert_pem).ok


def test_ca_certificates_sharing_one_name_and_key_cost_no_signature_storm():
    """A self-made leaf with five self-issued CAs of one name and key, differing in serial: path
    building would try them all (tens of ms with P-384). Self-issued candidates are dropped and at
    most two per name and key are kept."""
    from bench.core import hostile_chains

    root, pem = hostile_chains()["5 self-issued CAs of one name and key"]
    assert len(chain_core._path_candidates(x509.load_pem_x509_certificates(pem.encode())[1:],
                                           ChainPolicy(anchors=(root.cert,)))) == 0
    assert verifier(root.cert).verify(pem).reason is Reason.UNKNOWN_CA


def test_a_leaf_refused_by_its_own_extensions_costs_no_path_building(pki, monkeypatch):
    def no_path(*_):
        raise AssertionError("path building ran")

    v = verifier(pki.root.cert)
    monkeypatch.setattr(v, "_path", no_path)
    crowded = pki.client("crowded", dns=[f"n{i}.example" for i in range(chain_core.MAX_LEAF_NAMES + 1)])
    assert v.verify(crowded.chain_pem).reason is Reason.BAD_EXTENSION
    server_only = pki.intermediate.server(["not-a-client.example"])
    assert v.verify(server_only.chain_pem).reason is Reason.BAD_EKU


def test_the_benchmarks_hostile_chains_are_refused():
    from bench.core import hostile_chains

    for label, (root, pem) in hostile_chains().items():
        assert not verifier(root.cert).verify(pem).ok, label
