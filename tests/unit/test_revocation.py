"""Revocation core: CRLs (configured and fetched) and OCSP against real loopback HTTP endpoints."""

from __future__ import annotations

import datetime as dt
import functools
import threading
import time
from collections.abc import Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from kong_mtls.core import revocation as _revocation
from kong_mtls.core.revocation import (
    FetchError,
    RevocationMode,
    RevocationReason,
    RevocationVerdict,
    UrllibFetcher,
    check_url,
    parse_crls,
)
from kong_mtls.devpki import Authority, Issued, new_key
from tests.harness.revocation_servers import RevocationServer, delegated_responder, refused_url

#: The test responders listen on loopback, which a checker refuses to reach unless told.
RevocationChecker = functools.partial(_revocation.RevocationChecker, allow_private_addresses=True)

SKIP, IGNORE, STRICT = RevocationMode.SKIP, RevocationMode.IGNORE_CA_ERROR, RevocationMode.STRICT
GOOD, REVOKED = RevocationReason.GOOD, RevocationReason.REVOKED
UNKNOWN, SKIPPED = RevocationReason.REVOCATION_UNKNOWN, RevocationReason.SKIPPED
ERROR = RevocationReason.REVOCATION_ERROR

# (ok, reason) per mode for a certificate whose status is revoked / unknown.
WHEN_REVOKED = {SKIP: (True, SKIPPED), IGNORE: (False, REVOKED), STRICT: (False, REVOKED)}
WHEN_UNKNOWN = {SKIP: (True, SKIPPED), IGNORE: (True, UNKNOWN), STRICT: (False, UNKNOWN)}
ALL_MODES = pytest.mark.parametrize("mode", [SKIP, IGNORE, STRICT], ids=lambda m: m.value)


def outcome(verdict: RevocationVerdict) -> tuple[bool, str]:
    return verdict.ok, verdict.reason


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class CountingFetch:
    """The default fetcher, counting calls (for addresses with no server to count hits)."""

    def __init__(self) -> None:
        self.urls: list[str] = []
        self._inner = UrllibFetcher(allow_private=True)

    def __call__(self, url: str, body: bytes | None, timeout: float) -> bytes:
        self.urls.append(url)
        return self._inner(url, body, timeout)


def wait_for(predicate, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def ca(pki) -> Authority:
    """A fresh issuing CA per test, so revocations do not leak between tests."""
    return pki.root.intermediate("revocation test CA")


@pytest.fixture
def server(ca) -> Iterator[RevocationServer]:
    with RevocationServer(ca) as srv:
        yield srv


def revoke(server: RevocationServer, leaf: Issued) -> None:
    server.authority.revoke(leaf.cert)
    server.refresh_crl()


# -- the three sources, under the three modes --------------------------------------------------------

@ALL_MODES
def test_revoked_by_configured_crl(ca, mode):
    leaf = ca.client("revoked-static")
    ca.revoke(leaf.cert)
    verdict = RevocationChecker(static_crls=[ca.crl()]).check(leaf.cert, ca.cert, mode)
    assert outcome(verdict) == WHEN_REVOKED[mode]
    if mode is not SKIP:
        assert verdict.detail.startswith("configured CRL #1: revoked on ")


def test_configured_crl_not_listing_the_certificate_is_good_even_in_strict(ca):
    leaf = ca.client("fine")
    ca.revoke(ca.client("someone else").cert)
    verdict = RevocationChecker(static_crls=[ca.crl()]).check(leaf.cert, ca.cert, STRICT)
    assert outcome(verdict) == (True, GOOD)


@ALL_MODES
@pytest.mark.parametrize("pem", [False, True], ids=["der", "pem"])
def test_revoked_by_crl_fetched_from_the_distribution_point(server, mode, pem):
    leaf = server.client("revoked-cdp", ocsp_url=False, pem=pem)
    revoke(server, leaf)
    verdict = RevocationChecker(http_timeout=2).check(leaf.cert, server.authority.cert, mode)
    assert outcome(verdict) == WHEN_REVOKED[mode]
    assert server.hits["crl"] == (0 if mode is SKIP else 1)


@ALL_MODES
def test_revoked_by_ocsp(server, mode):
    leaf = server.client("revoked-ocsp", crl_url=False)
    revoke(server, leaf)
    verdict = RevocationChecker(http_timeout=2).check(leaf.cert, server.authority.cert, mode)
    assert outcome(verdict) == WHEN_REVOKED[mode]
    assert server.hits["ocsp"] == (0 if mode is SKIP else 1)
    if mode is not SKIP:
        assert verdict.detail.startswith(f"OCSP {server.ocsp_url}: revoked on ")


@pytest.mark.parametrize("source", ["ocsp", "crl"])
def test_good_answer_from_the_network_passes_strict(server, source):
    leaf = server.client("good", ocsp_url=source == "ocsp", crl_url=source == "crl")
    verdict = RevocationChecker(http_timeout=2).check(leaf.cert, server.authority.cert, STRICT)
    assert outcome(verdict) == (True, GOOD)
    assert server.hits[source] == 1


# -- order of the sources ----------------------------------------------------------------------------

def test_configured_crl_answers_before_any_network_source(server):
    leaf = server.client("both")
    server.authority.revoke(leaf.cert)
    checker = RevocationChecker(static_crls=[server.authority.crl()])
    assert outcome(checker.check(leaf.cert, server.authority.cert, STRICT)) == (False, REVOKED)
    assert server.hits == {}


def test_ocsp_answers_before_the_distribution_point_crl(server):
    leaf = server.client("both")
    revoke(server, leaf)
    verdict = RevocationChecker(http_timeout=2).check(leaf.cert, server.authority.cert, STRICT)
    assert verdict.detail.startswith("OCSP ")
    assert (server.hits["ocsp"], server.hits["crl"]) == (1, 0)


@pytest.mark.parametrize("failure", ["error", "garbage", "unknown-status"])
def test_distribution_point_crl_is_used_when_ocsp_gives_no_answer(server, failure):
    leaf = server.client("fallback")
    revoke(server, leaf)
    if failure == "unknown-status":
        server.ocsp_status[leaf.cert.serial_number] = "unknown"
    else:
        server.ocsp_behaviour = failure
    verdict = RevocationChecker(http_timeout=2).check(leaf.cert, server.authority.cert, STRICT)
    assert outcome(verdict) == (False, REVOKED)
    assert verdict.detail.startswith(f"CRL {server.crl_url}: revoked")
    assert (server.hits["ocsp"], server.hits["crl"]) == (1, 1)


def _bare_crl(ca: Authority, *, last_update: dt.datetime, next_update: dt.datetime | None,
              number: bool = True) -> x509.CertificateRevocationList:
    """A CRL by `ca`; without `next_update`, re-encoded and signed again without that field
    (cryptography's builder always writes one, as RFC 5280 requires)."""
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject).last_update(last_update)
               .next_update(next_update or last_update + dt.timedelta(days=1)))
    if number:
        builder = builder.add_extension(x509.CRLNumber(7), critical=False)
    crl = builder.sign(ca.key, hashes.SHA256())
    if next_update is not None:
        return crl
    tbs = _der_items(_der_content(crl.tbs_certlist_bytes))
    # version, signature algorithm, issuer, thisUpdate, nextUpdate, [crlExtensions]: drop nextUpdate
    tbs = _der(0x30, b"".join(item for i, item in enumerate(tbs) if i != 4))
    from cryptography.hazmat.primitives.asymmetric import ec

    signature = ca.key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    algorithm = _der_items(_der_content(crl.public_bytes(serialization.Encoding.DER)))[1]
    der = _der(0x30, tbs + algorithm + _der(0x03, b"\x00" + signature))
    return x509.load_der_x509_crl(der)


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    length = bytes([size]) if size < 128 else bytes([0x80 | ((size.bit_length() + 7) // 8)]) + \
        size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag]) + length + content


def _der_content(der: bytes) -> bytes:
    return _der_items(der, content=True)[0]


def _der_items(der: bytes, content: bool = False) -> list[bytes]:
    """The top-level TLV elements of `der` (whole, or their contents)."""
    items, i = [], 0
    while i < len(der):
        size, head = der[i + 1], 2
        if size & 0x80:
            count = size & 0x7F
            size, head = int.from_bytes(der[i + 2:i + 2 + count], "big"), 2 + count
        items.append(der[i + head:i + head + size] if content else der[i:i + head + size])
        i += head + size
    return items


def test_a_crl_without_next_update_is_believed_for_seven_days_only(ca):
    """RFC 5280 requires nextUpdate; without one, an old copy could be replayed for ever."""
    leaf = ca.client("replayed")
    fresh = _bare_crl(ca, last_update=utcnow() - dt.timedelta(days=1), next_update=None)
    assert fresh.next_update_utc is None and fresh.is_signature_valid(ca.key.public_key())
    assert outcome(RevocationChecker(static_crls=[fresh]).check(leaf.cert, ca.cert, STRICT)) == (True, GOOD)
    old = _bare_crl(ca, last_update=utcnow() - dt.timedelta(days=8), next_update=None)
    verdict = RevocationChecker(static_crls=[old]).check(leaf.cert, ca.cert, STRICT)
    assert outcome(verdict) == (False, UNKNOWN) and "has none" in verdict.detail


def test_a_crl_without_a_crl_number_is_not_used(ca):
    leaf = ca.client("unnumbered")
    crl = _bare_crl(ca, last_update=utcnow() - dt.timedelta(minutes=1),
                    next_update=utcnow() + dt.timedelta(days=1), number=False)
    verdict = RevocationChecker(static_crls=[crl]).check(leaf.cert, ca.cert, STRICT)
    assert outcome(verdict) == (False, UNKNOWN) and "CRL number" in verdict.detail


def test_stale_configured_crl_falls_through_to_the_network(server):
    leaf = server.client("stale-static", crl_url=False)
    stale = server.authority.crl(last_update=utcnow() - dt.timedelta(days=2),
                                 next_update=dt.timedelta(days=1))
    verdict = RevocationChecker(static_crls=[stale]).check(leaf.cert, server.authority.cert, STRICT)
    assert outcome(verdict) == (True, GOOD)
    assert server.hits["ocsp"] == 1


# -- no answer: unreachable, hung, garbage, wrong signer, stale --------------------------------------

@ALL_MODES
def test_unreachable_responder_and_crl(ca, mode):
    leaf = ca.client("unreachable", ocsp_url=refused_url("/ocsp"), crl_url=refused_url("/crl"))
    verdict = RevocationChecker(http_timeout=2).check(leaf.cert, ca.cert, mode)
    assert outcome(verdict) == WHEN_UNKNOWN[mode]
    if mode is not SKIP:
        assert verdict.detail.count("connection refused") == 2


def test_server_switched_down_refuses_connections(server):
    leaf = server.client("down", crl_url=False)
    server.down()
    verdict = RevocationChecker(http_timeout=2).check(leaf.cert, server.authority.cert, STRICT)
    assert outcome(verdict) == (False, UNKNOWN)
    assert "connection refused" in verdict.detail


def test_hung_responder_times_out(server):
    server.ocsp_behaviour = "hang"
    leaf = server.client("hung", crl_url=False)
    checker = RevocationChecker(http_timeout=0.3)
    assert outcome(checker.check(leaf.cert, server.authority.cert, STRICT)) == (False, UNKNOWN)
    verdict = checker.check(leaf.cert, server.authority.cert, IGNORE)  # from the negative cache
    assert outcome(verdict) == (True, UNKNOWN)
    assert "timed out" in verdict.detail
    assert server.hits["ocsp"] == 1


@pytest.mark.parametrize(("endpoint", "why"), [("ocsp", "not an OCSP response"), ("crl", "not one CRL")])
def test_garbage_answers(server, endpoint, why):
    leaf = server.client("garbage", ocsp_url=endpoint == "ocsp", crl_url=endpoint == "crl")
    revoke(server, leaf)
    setattr(server, f"{endpoint}_behaviour", "garbage")
    verdict = RevocationChecker(http_timeout=2).check(leaf.cert, server.authority.cert, STRICT)
    assert outcome(verdict) == (False, UNKNOWN)
    assert why in verdict.detail


@pytest.mark.parametrize("endpoint", ["ocsp", "crl"])
def test_oversized_answers_are_refused(server, endpoint):
    leaf = server.client("huge", ocsp_url=endpoint == "ocsp", crl_url=endpoint == "crl")
    setattr(server, f"{endpoint}_behaviour", "huge")
    checker = RevocationChecker(http_timeout=2, max_crl_bytes=100_000)
    verdict = checker.check(leaf.cert, server.authority.cert, STRICT)
    assert outcome(verdict) == (False, UNKNOWN)
    assert "larger than" in verdict.detail


@pytest.mark.parametrize("signer", ["unrelated-ca", "issued-without-ocsp-eku", "responder-of-another-ca"])
def test_ocsp_answer_from_an_unauthorised_signer_is_not_trusted(pki, server, signer):
    if signer == "unrelated-ca":
        server.ocsp_signer = Issued(cert=pki.other_root.cert, key=pki.other_root.key)
    elif signer == "issued-without-ocsp-eku":
        server.ocsp_signer = delegated_responder(server.authority, ocsp_signing=False)
    else:
        server.ocsp_signer = delegated_responder(pki.other_root)
    leaf = server.client("forged-good", crl_url=False)  # the forged answer says "good"
    verdict = RevocationChecker(http_timeout=2).check(leaf.cert, server.authority.cert, STRICT)
    assert outcome(verdict) == (False, UNKNOWN)
    assert "not signed by the issuer" in verdict.detail


def test_ocsp_answer_from_a_delegated_responder_is_trusted(server):
    server.ocsp_signer = delegated_responder(server.authority)
    good, bad = server.client("good", crl_url=False), server.client("bad", crl_url=False)
    server.authority.revoke(bad.cert)
    checker = RevocationChecker(http_timeout=2)
    assert outcome(checker.check(good.cert, server.authority.cert, STRICT)) == (True, GOOD)
    assert outcome(checker.check(bad.cert, server.authority.cert, STRICT)) == (False, REVOKED)


@pytest.mark.parametrize(("this_update", "next_update", "why"), [
    (-2 * 3600, 3600, "stale"),                    # nextUpdate an hour ago
    (3600, 3600, "thisUpdate is in the future"),   # beyond the 5 min clock skew
    (-2 * 3600, None, "no nextUpdate and older than max_ttl"),
])
def test_ocsp_answer_outside_its_validity_is_not_trusted(server, this_update, next_update, why):
    server.ocsp_this_update = utcnow() + dt.timedelta(seconds=this_update)
    server.ocsp_next_update = dt.timedelta(seconds=next_update) if next_update else None
    leaf = server.client("timing", crl_url=False)
    verdict = RevocationChecker(http_timeout=2).check(leaf.cert, server.authority.cert, STRICT)
    assert outcome(verdict) == (False, UNKNOWN)
    assert why in verdict.detail


@pytest.mark.parametrize("where", ["configured", "fetched"])
def test_stale_crl_is_not_trusted(server, where):
    leaf = server.client("stale", ocsp_url=False)
    server.authority.revoke(leaf.cert)
    server.refresh_crl(last_update=utcnow() - dt.timedelta(days=2), next_update=dt.timedelta(days=1))
    static = [server.crl] if where == "configured" else []
    leaf_cert = leaf.cert if where == "fetched" else server.authority.client("no-cdp").cert
    verdict = RevocationChecker(static_crls=static, http_timeout=2).check(leaf_cert, server.authority.cert,
                                                                           STRICT)
    assert outcome(verdict) == (False, UNKNOWN)
    assert "stale (nextUpdate" in verdict.detail


@pytest.mark.parametrize("where", ["configured", "fetched"])
def test_crl_signed_by_another_key_under_the_same_name_is_not_trusted(server, where):
    impostor = Authority.root("revocation test CA", organization="kong-mtls dev")
    assert impostor.subject == server.authority.subject
    leaf = server.client("victim", ocsp_url=False)
    server.crl = impostor.crl()  # lists nothing: would say "good"
    static = [server.crl] if where == "configured" else []
    leaf_cert = leaf.cert if where == "fetched" else server.authority.client("no-cdp").cert
    verdict = RevocationChecker(static_crls=static, http_timeout=2).check(leaf_cert, server.authority.cert,
                                                                           STRICT)
    assert outcome(verdict) == (False, UNKNOWN)
    assert "signature does not verify" in verdict.detail


def _crl_with(ca: Authority, extension: x509.ExtensionType, revoked: tuple[int, ...] = ()):
    last = utcnow() - dt.timedelta(minutes=1)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject)
               .last_update(last).next_update(last + dt.timedelta(days=1))
               .add_extension(extension, critical=True))
    if not isinstance(extension, x509.CRLNumber):
        builder = builder.add_extension(x509.CRLNumber(1), critical=False)
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(last).build())
    return builder.sign(ca.key, hashes.SHA256())


def _idp(**flags) -> x509.IssuingDistributionPoint:
    args = dict(full_name=None, relative_name=None, only_contains_user_certs=False,
                only_contains_ca_certs=False, only_some_reasons=None, indirect_crl=False,
                only_contains_attribute_certs=False)
    args.update(flags)
    return x509.IssuingDistributionPoint(**args)


@pytest.mark.parametrize(("extension", "why", "listed"), [
    (x509.DeltaCRLIndicator(1), "partial (delta CRL)", REVOKED),
    (_idp(only_some_reasons=frozenset({x509.ReasonFlags.key_compromise})), "some reasons only", REVOKED),
    (_idp(full_name=[x509.UniformResourceIdentifier("http://elsewhere.example/crl")]), "scope", REVOKED),
    (_idp(only_contains_ca_certs=True), "CA certificates only", UNKNOWN),
    (_idp(indirect_crl=True), "indirect CRLs are not supported", UNKNOWN),
], ids=["delta", "some-reasons", "other-scope", "ca-only", "indirect"])
def test_partial_crl_never_says_good(ca, extension, why, listed):
    leaf, revoked = ca.client("not-listed"), ca.client("listed")
    crl = _crl_with(ca, extension, revoked=(revoked.cert.serial_number,))
    checker = RevocationChecker(static_crls=[crl])
    verdict = checker.check(leaf.cert, ca.cert, STRICT)
    assert outcome(verdict) == (False, UNKNOWN)
    assert why in verdict.detail
    # A listed serial is revoked even in a partial CRL (unless the CRL cannot speak for the leaf).
    assert outcome(checker.check(revoked.cert, ca.cert, STRICT)) == (False, listed)


def test_no_revocation_source(pki, ca):
    leaf = ca.client("no-addresses")
    checker = RevocationChecker(static_crls=[pki.other_root.crl()])  # another issuer's CRL does not apply
    assert outcome(checker.check(leaf.cert, ca.cert, IGNORE)) == (True, UNKNOWN)
    verdict = checker.check(leaf.cert, ca.cert, STRICT)
    assert outcome(verdict) == (False, UNKNOWN)
    assert verdict.detail.startswith("no revocation source")


def test_only_http_addresses_are_fetched(ca):
    leaf = ca.client("schemes", ocsp_url="ftp://127.0.0.1/ocsp", crl_url="file:///etc/passwd")
    calls: list[str] = []

    def fetch(url: str, body: bytes | None, timeout: float) -> bytes:
        calls.append(url)
        return b""

    verdict = RevocationChecker(fetch=fetch).check(leaf.cert, ca.cert, STRICT)
    assert outcome(verdict) == (False, UNKNOWN)
    assert calls == []
    assert "scheme 'ftp' refused" in verdict.detail and "scheme 'file' refused" in verdict.detail


def test_one_check_spends_at_most_twice_the_http_timeout_on_the_network(ca):
    ocsp_method = x509.oid.AuthorityInformationAccessOID.OCSP
    aia = x509.AuthorityInformationAccess([
        x509.AccessDescription(ocsp_method, x509.UniformResourceIdentifier(f"http://127.0.0.1:9/ocsp{i}"))
        for i in (1, 2)])
    cdp = x509.CRLDistributionPoints([x509.DistributionPoint(
        [x509.UniformResourceIdentifier("http://127.0.0.1:9/crl")], None, None, None)])
    cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca.subject)
            .public_key(new_key().public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(utcnow() - dt.timedelta(minutes=1))
            .not_valid_after(utcnow() + dt.timedelta(days=1))
            .add_extension(aia, critical=False).add_extension(cdp, critical=False)
            .sign(ca.key, hashes.SHA256()))
    timeouts: list[float] = []

    def slow_fetch(url: str, body: bytes | None, timeout: float) -> bytes:
        timeouts.append(timeout)
        time.sleep(timeout)
        raise FetchError("timed out")

    verdict = RevocationChecker(http_timeout=0.1, fetch=slow_fetch).check(cert, ca.cert, IGNORE)
    assert outcome(verdict) == (True, UNKNOWN)
    assert len(timeouts) == 2
    assert "CRL http://127.0.0.1:9/crl: not tried: this check's time budget is spent" in verdict.detail


# -- caching -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["ocsp", "crl"])
def test_second_check_is_served_from_the_cache(server, source):
    leaf = server.client("cached", ocsp_url=source == "ocsp", crl_url=source == "crl")
    checker = RevocationChecker(http_timeout=2)
    first = checker.check(leaf.cert, server.authority.cert, STRICT)
    assert checker.check(leaf.cert, server.authority.cert, STRICT) == first
    assert server.hits[source] == 1


def test_fetched_crl_is_shared_by_every_certificate_of_its_distribution_point(server):
    one, two = server.client("one", ocsp_url=False), server.client("two", ocsp_url=False)
    server.authority.revoke(two.cert)
    server.refresh_crl()
    checker = RevocationChecker(http_timeout=2)
    assert outcome(checker.check(one.cert, server.authority.cert, STRICT)) == (True, GOOD)
    assert outcome(checker.check(two.cert, server.authority.cert, STRICT)) == (False, REVOKED)
    assert server.hits["crl"] == 1


def test_cache_is_keyed_by_issuer_and_serial_not_by_subject_dn(server):
    kept, revoked = server.client("same-dn", crl_url=False), server.client("same-dn", crl_url=False)
    assert kept.cert.subject == revoked.cert.subject
    server.authority.revoke(revoked.cert)
    checker = RevocationChecker(http_timeout=2)
    assert outcome(checker.check(kept.cert, server.authority.cert, STRICT)) == (True, GOOD)
    assert outcome(checker.check(revoked.cert, server.authority.cert, STRICT)) == (False, REVOKED)


def test_cache_expires_at_the_crl_next_update(server):
    clock = FakeClock()
    leaf = server.client("expiring", ocsp_url=False)
    server.refresh_crl(next_update=dt.timedelta(minutes=10))
    checker = RevocationChecker(http_timeout=2, max_ttl=86400, clock=clock)
    assert outcome(checker.check(leaf.cert, server.authority.cert, STRICT)) == (True, GOOD)
    clock.advance(5 * 60)
    checker.check(leaf.cert, server.authority.cert, STRICT)
    assert server.hits["crl"] == 1
    clock.advance(6 * 60)  # past nextUpdate: the CA publishes a new CRL, now listing the leaf
    server.authority.revoke(leaf.cert)
    last = dt.datetime.fromtimestamp(int(clock.now), dt.timezone.utc)
    server.refresh_crl(last_update=last, next_update=dt.timedelta(minutes=10))
    assert outcome(checker.check(leaf.cert, server.authority.cert, STRICT)) == (False, REVOKED)
    assert server.hits["crl"] == 2


def test_cache_lifetime_is_bounded_by_max_ttl(server):
    clock = FakeClock()
    leaf = server.client("bounded", crl_url=False)  # OCSP answers are valid for an hour
    checker = RevocationChecker(http_timeout=2, max_ttl=60, clock=clock)
    checker.check(leaf.cert, server.authority.cert, STRICT)
    clock.advance(30)
    checker.check(leaf.cert, server.authority.cert, STRICT)
    assert server.hits["ocsp"] == 1
    server.authority.revoke(leaf.cert)
    clock.advance(31)
    assert outcome(checker.check(leaf.cert, server.authority.cert, STRICT)) == (False, REVOKED)
    assert server.hits["ocsp"] == 2


def test_failures_are_cached_briefly_per_certificate_and_per_address(ca):
    clock, fetch = FakeClock(), CountingFetch()
    dead = refused_url("/ocsp")
    one, two = ca.client("one", ocsp_url=dead), ca.client("two", ocsp_url=dead)
    checker = RevocationChecker(http_timeout=2, negative_ttl=30, fetch=fetch, clock=clock)
    checker.check(one.cert, ca.cert, STRICT)
    checker.check(one.cert, ca.cert, STRICT)   # the certificate's negative entry
    verdict = checker.check(two.cert, ca.cert, STRICT)  # the address's failure, remembered
    assert fetch.urls == [dead]
    assert "connection refused (retry after" in verdict.detail
    clock.advance(31)
    checker.check(one.cert, ca.cert, STRICT)
    assert fetch.urls == [dead, dead]


def test_cache_size_is_bounded(server):
    leaves = [server.client(f"lru-{i}", crl_url=False) for i in range(3)]
    checker = RevocationChecker(http_timeout=2, max_entries=2)
    for leaf in [*leaves, leaves[2], leaves[0]]:
        checker.check(leaf.cert, server.authority.cert, STRICT)
    assert server.hits["ocsp"] == 4  # leaves[0] was evicted by leaves[2]; leaves[2] was still cached


def test_signed_answer_is_kept_until_its_next_update_when_the_responder_is_down(server):
    clock = FakeClock()
    server.ocsp_next_update = dt.timedelta(hours=2)
    leaf = server.client("kept", crl_url=False)
    checker = RevocationChecker(http_timeout=2, max_ttl=60, clock=clock)
    assert outcome(checker.check(leaf.cert, server.authority.cert, STRICT)) == (True, GOOD)
    server.down()
    clock.advance(61)  # past max_ttl: asks again, gets no answer, keeps the valid signed one
    assert outcome(checker.check(leaf.cert, server.authority.cert, STRICT)) == (True, GOOD)
    clock.advance(2 * 3600)  # past the answer's nextUpdate
    assert outcome(checker.check(leaf.cert, server.authority.cert, STRICT)) == (False, UNKNOWN)


def test_warm_entry_is_served_while_a_background_refresh_waits(server):
    clock = FakeClock()
    leaf = server.client("refresh", crl_url=False)
    checker = RevocationChecker(http_timeout=8, max_ttl=86400, clock=clock)
    assert outcome(checker.check(leaf.cert, server.authority.cert, STRICT)) == (True, GOOD)
    server.ocsp_behaviour = "hang"  # until released (at most 10 s)
    clock.advance(50 * 60)  # OCSP answer valid 1 h: past the refresh point (75 %), not expired
    results: list[RevocationVerdict] = []
    request = threading.Thread(target=lambda: results.append(
        checker.check(leaf.cert, server.authority.cert, STRICT)))
    request.start()
    request.join(5)  # a check that waited for the refresh would still be waiting (timeout 8 s)
    assert [outcome(v) for v in results] == [(True, GOOD)]
    assert wait_for(lambda: server.hits["ocsp"] == 2)
    # The refresh is stuck in the responder; checks neither wait for it nor start another one.
    assert outcome(checker.check(leaf.cert, server.authority.cert, STRICT)) == (True, GOOD)
    server.authority.revoke(leaf.cert)
    server.ocsp_behaviour = "ok"
    server.release.set()
    assert wait_for(lambda: checker.check(leaf.cert, server.authority.cert, STRICT).reason == REVOKED)
    assert server.hits["ocsp"] == 2


# -- gevent: fetches never block the other greenlets -------------------------------------------------

def test_slow_fetch_does_not_block_other_greenlets(server):
    gevent = pytest.importorskip("gevent")
    server.ocsp_behaviour = "hang"
    leaf = server.client("slow", crl_url=False)
    checker = RevocationChecker(http_timeout=5)
    order: list[str] = []

    def check() -> RevocationVerdict:
        verdict = checker.check(leaf.cert, server.authority.cert, STRICT)
        order.append("check")
        return verdict

    def other_request() -> None:
        # Runs only if the checking greenlet yielded: wait until its request is in the responder,
        # then unblock the responder. A blocked hub would run this after the 5 s timeout instead.
        while server.hits["ocsp"] == 0:
            gevent.sleep(0.01)
        order.append("other")
        server.release.set()

    checking, other = gevent.spawn(check), gevent.spawn(other_request)
    gevent.joinall([checking, other], timeout=10)
    assert order == ["other", "check"]
    assert outcome(checking.value) == (True, GOOD)


def test_background_refresh_under_gevent_does_not_delay_the_request(server):
    gevent = pytest.importorskip("gevent")
    clock = FakeClock()
    leaf = server.client("gevent-refresh", crl_url=False)
    checker = RevocationChecker(http_timeout=5, clock=clock)

    def check() -> RevocationVerdict:
        return checker.check(leaf.cert, server.authority.cert, STRICT)

    assert outcome(gevent.spawn(check).get(timeout=5)) == (True, GOOD)
    server.ocsp_behaviour = "hang"
    server.authority.revoke(leaf.cert)
    clock.advance(50 * 60)
    assert outcome(gevent.spawn(check).get(timeout=5)) == (True, GOOD)  # cached; refresh hangs
    assert not server.release.is_set()
    server.release.set()
    deadline = time.monotonic() + 5
    while outcome(gevent.spawn(check).get(timeout=5)) != (False, REVOKED) and time.monotonic() < deadline:
        gevent.sleep(0.01)
    assert outcome(gevent.spawn(check).get(timeout=5)) == (False, REVOKED)
    assert server.hits["ocsp"] == 2


# -- never raises ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [IGNORE, STRICT], ids=lambda m: m.value)
def test_bad_calls_are_refused_in_every_mode(pki, ca, mode):
    leaf = ca.client("bad-call")
    checker = RevocationChecker()
    for args in [(None, None), (leaf.cert, pki.other_root.cert), (b"junk", ca.cert)]:
        verdict = checker.check(*args, mode)
        assert outcome(verdict) == (False, ERROR), args
    assert outcome(checker.check(leaf.cert, ca.cert, "LOOSE")) == (False, ERROR)


def test_mode_may_be_given_as_text(ca):
    leaf = ca.client("text-mode")
    assert outcome(RevocationChecker().check(leaf.cert, ca.cert, "SKIP")) == (True, SKIPPED)


@pytest.mark.parametrize("answer", ["raises", "not-bytes"])
def test_misbehaving_fetcher_gives_unknown(ca, answer):
    leaf = ca.client("odd-fetcher", ocsp_url="http://127.0.0.1:9/ocsp", crl_url="http://127.0.0.1:9/crl")

    def fetch(url: str, body: bytes | None, timeout: float):
        if answer == "raises":
            raise RuntimeError("boom")
        return None

    verdict = RevocationChecker(fetch=fetch).check(leaf.cert, ca.cert, IGNORE)
    assert outcome(verdict) == (True, UNKNOWN)
    assert ("RuntimeError" if answer == "raises" else "no bytes") in verdict.detail


# -- the default fetcher and helpers -----------------------------------------------------------------

@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/crl", "ldap://ca.example/crl",
                                 "http:///no-host", "http://ca.example/a b", "gopher://x", "", "//x/y"])
def test_check_url_refuses_anything_but_http(url):
    with pytest.raises(FetchError):
        check_url(url)


def test_check_url_accepts_http_and_https():
    assert check_url("http://ca.example/crl") == "http://ca.example/crl"
    assert check_url("https://[::1]:8443/ocsp") == "https://[::1]:8443/ocsp"


@pytest.mark.parametrize(("target", "why"), [
    ("file:///etc/passwd", "redirect not followed"),  # refused by urllib itself
    ("ftp://127.0.0.1/crl", "scheme 'ftp' refused"),  # urllib would follow this one; we refuse it
])
def test_fetcher_refuses_redirects_to_other_schemes(server, target, why):
    server.redirect_to = target
    with pytest.raises(FetchError, match=why):
        UrllibFetcher(allow_private=True)(f"{server.base_url}/redirect", None, 2)


def test_fetcher_follows_http_redirects_and_reports_http_errors(server):
    server.redirect_to = server.crl_url
    data = UrllibFetcher(allow_private=True)(f"{server.base_url}/redirect", None, 2)
    assert data == server.crl.public_bytes(serialization.Encoding.DER)
    with pytest.raises(FetchError, match="HTTP status 404"):
        UrllibFetcher(allow_private=True)(f"{server.base_url}/nothing", None, 2)


def test_fetcher_bounds_the_size(server):
    server.crl_behaviour = "huge"
    with pytest.raises(FetchError, match="larger than 1000 bytes"):
        UrllibFetcher(max_bytes=1000, allow_private=True)(server.crl_url, None, 2)


def test_parse_crls(ca):
    first, second = ca.crl(), Authority.root("other").crl()
    pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in (first, second))
    assert [c.issuer for c in parse_crls(pem)] == [first.issuer, second.issuer]
    assert parse_crls(first.public_bytes(serialization.Encoding.DER))[0].issuer == first.issuer
    for junk in ["not a crl", b"\x30\x00", "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n"]:
        with pytest.raises(ValueError):
            parse_crls(junk)


def test_constructor_refuses_bad_arguments():
    with pytest.raises(TypeError):
        RevocationChecker(static_crls=["not a CRL"])
    for kwargs in [{"http_timeout": 0}, {"max_ttl": -1}, {"max_entries": 0}]:
        with pytest.raises(ValueError):
            RevocationChecker(**kwargs)


def test_checks_from_many_threads_agree(server):
    leaf = server.client("threads", crl_url=False)
    server.authority.revoke(leaf.cert)
    checker = RevocationChecker(http_timeout=2)
    results: list[RevocationVerdict] = []
    threads = [threading.Thread(target=lambda: results.append(
        checker.check(leaf.cert, server.authority.cert, STRICT))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert {outcome(v) for v in results} == {(False, REVOKED)} and len(results) == 8
    assert server.hits["ocsp"] == 1  # one resolution per certificate, however many ask at once


def test_a_crl_from_an_issuer_without_key_usage_is_not_used():
    """RFC 5280: a CA signs CRLs only if its keyUsage names cRLSign; no keyUsage is no cRLSign."""
    key = new_key()
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "CA without keyUsage")])
    now = utcnow()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    bare = Authority(subject=subject, key=key, cert=cert)
    leaf = bare.client("leaf")
    verdict = RevocationChecker(static_crls=[bare.crl()]).check(leaf.cert, cert, STRICT)
    assert outcome(verdict) == (False, UNKNOWN) and "CRL signing" in verdict.detail


# -- where fetches may go ----------------------------------------------------------------------------

@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "169.254.169.254", "10.1.2.3", "192.168.0.10",
                                     "172.16.0.1", "100.64.0.1", "::ffff:127.0.0.1", "fe80::1", "0.0.0.0"])
def test_non_public_addresses_are_not_fetch_targets(address):
    assert not _revocation._public_address(address)


def test_a_crl_address_on_loopback_is_refused_by_default(server):
    """A client chooses the CRL and OCSP addresses in its certificate: by default a fetch never
    reaches loopback, link-local (cloud metadata) or private addresses, redirects included."""
    leaf = server.client("ssrf", ocsp_url=False)
    revoke(server, leaf)
    verdict = _revocation.RevocationChecker(http_timeout=2).check(leaf.cert, server.authority.cert, STRICT)
    assert outcome(verdict) == (False, UNKNOWN)
    assert "non-public addresses" in verdict.detail and server.hits.get("crl", 0) == 0
    with pytest.raises(FetchError, match="non-public"):
        UrllibFetcher()("http://localhost:9/crl", None, 2)
    assert outcome(RevocationChecker(http_timeout=2).check(leaf.cert, server.authority.cert, STRICT)) \
        == (False, REVOKED)
