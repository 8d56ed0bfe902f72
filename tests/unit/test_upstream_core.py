"""kong_mtls.core.upstream without the network: config, pins, names, verdicts, notices, cache."""

from __future__ import annotations

import base64
import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kong_mtls.core.upstream import (
    CertSummary,
    Freshness,
    Notice,
    Observation,
    Reason,
    Target,
    UpstreamPolicy,
    Verdict,
    VerdictCache,
    dns_name_matches,
    evaluate,
    parse_spki_pin,
    parse_target,
)
from kong_mtls.devpki import SERVER_AUTH, SubjectAltNames, name
from kong_mtls.schema import ConfigError
from tests.harness.pki import DAY, now
from tests.harness.tls_servers import write_pem_files

SPIFFE = "spiffe://example.org/ns/payments/sa/api"


@pytest.fixture(scope="module")
def upstream_cert(pki):
    return pki.intermediate.issue(name("api.internal"), extended_key_usage=(SERVER_AUTH,),
                                  sans=SubjectAltNames(dns=["api.internal", "*.svc.internal"], uris=[SPIFFE]))


@pytest.fixture(scope="module")
def summary(upstream_cert) -> CertSummary:
    return CertSummary.of(upstream_cert.cert)


def policy(pki, **kwargs) -> UpstreamPolicy:
    kwargs.setdefault("trusted_ca_pem", pki.root.cert_pem)
    return UpstreamPolicy.build(**kwargs)


def seen(summary: CertSummary, client: CertSummary | None = None) -> Observation:
    return Observation(Target("127.0.0.1", 8443, "api.internal"), certificate=summary, chain_verified=True,
                       tls_version="TLSv1.3", client_certificate=client)


# -- pins, names, targets ------------------------------------------------------------------------

def test_spki_pin_accepts_base64_hex_and_prefixed_forms(summary):
    raw = summary.spki_sha256
    b64 = base64.b64encode(raw).decode()
    assert parse_spki_pin(b64) == raw
    assert parse_spki_pin(f"sha256/{b64}") == raw
    assert parse_spki_pin(raw.hex().upper()) == raw
    assert parse_spki_pin(":".join(f"{b:02x}" for b in raw)) == raw


@pytest.mark.parametrize("text", ["", "   ", "abc", "00" * 31, "00" * 33,
                                  base64.b64encode(b"x" * 31).decode(), "not base64 at all!!", None, 42])
def test_spki_pin_rejects_anything_else(text):
    with pytest.raises(ValueError):
        parse_spki_pin(text)


@given(st.binary(min_size=32, max_size=32))
def test_spki_pin_round_trips_any_digest(raw):
    assert parse_spki_pin(base64.b64encode(raw).decode()) == raw
    assert parse_spki_pin(raw.hex()) == raw


@pytest.mark.parametrize("expected, presented, match", [
    ("api.internal", "api.internal", True),
    ("api.internal", "API.Internal", True),
    ("api.internal", "api.internal.", True),
    ("a.svc.internal", "*.svc.internal", True),
    ("a.b.svc.internal", "*.svc.internal", False),   # one label only
    ("svc.internal", "*.svc.internal", False),
    ("*.svc.internal", "*.svc.internal", True),       # an expected wildcard matches only itself
    ("*.svc.internal", "a.svc.internal", False),
    ("api.internal", "api.internal.evil", False),
    ("api.internal", "*.internal", True),
])
def test_dns_name_matching(expected, presented, match):
    assert dns_name_matches(expected, presented) is match


@pytest.mark.parametrize("text, host, port", [
    ("upstream.test:8443", "upstream.test", 8443),
    ("127.0.0.1:443", "127.0.0.1", 443),
    ("[::1]:8443", "::1", 8443),
    ("upstream.test", "upstream.test", 443),
    ("[::1]", "::1", 443),
])
def test_parse_target(text, host, port):
    target = parse_target(text, default_port=443)
    assert (target.host, target.port) == (host, port)


@pytest.mark.parametrize("text", ["::1:443", "host:port", "host:0", "host:70000", ":443", "[::1]x", "a b:1"])
def test_parse_target_rejects(text):
    with pytest.raises(ValueError):
        parse_target(text, default_port=443)


@pytest.mark.parametrize("sni", ["", "a b", "x" * 254, "h:1", "ünï.example"])
def test_target_rejects_bad_server_names(sni):
    with pytest.raises(ValueError):
        Target("127.0.0.1", 443, sni)


def test_target_str_and_name():
    assert str(Target("::1", 443)) == "[::1]:443"
    assert Target("10.0.0.1", 443).name == "10.0.0.1"
    assert Target("10.0.0.1", 443, "api.internal").name == "api.internal"


# -- policy building -----------------------------------------------------------------------------

def test_policy_needs_a_trust_anchor_or_a_pin(pki, summary):
    with pytest.raises(ConfigError) as err:
        UpstreamPolicy.build(expected_dns_names=["api.internal"])
    assert err.value.field == "trusted_ca_pem" and "nothing proves" in err.value.problem
    pinned = UpstreamPolicy.build(spki_sha256_pins=[summary.spki_b64])
    assert not pinned.settings.has_trust and pinned.expectation.spki_pins == {summary.spki_sha256}
    assert UpstreamPolicy.build(allow_unverified=True).settings.has_trust is False


@pytest.mark.parametrize("kwargs, field", [
    ({"trusted_ca_pem": "not a pem"}, "trusted_ca_pem"),
    ({"trusted_ca_files": ["/nonexistent/ca.pem"]}, "trusted_ca_files[1]"),
    ({"expected_dns_names": ["ok.example", "bad name"]}, "expected_dns_names[2]"),
    ({"expected_dns_names": ["*.com"]}, "expected_dns_names[1]"),
    ({"expected_uris": ["no-scheme"]}, "expected_uris[1]"),
    ({"expected_uris": ["spiffe://Example.org/x"]}, "expected_uris[1]"),
    ({"spki_sha256_pins": ["short"]}, "spki_sha256_pins[1]"),
    ({"client_cert_file": "/x.crt"}, "client_key_file"),
    ({"client_key_file": "/x.key"}, "client_cert_file"),
    ({"timeout": 0}, "timeout"),
    ({"expiry_warning_days": -1}, "expiry_warning_days"),
])
def test_policy_config_errors_name_the_field(pki, kwargs, field):
    with pytest.raises(ConfigError) as err:
        policy(pki, **kwargs)
    assert err.value.field == field


def test_policy_field_names_can_be_renamed(pki):
    with pytest.raises(ConfigError) as err:
        policy(pki, spki_sha256_pins=["short"], field_names={"spki_sha256_pins": "--expect-spki"})
    assert err.value.field == "--expect-spki[1]"


def test_policy_normalises_names(pki):
    built = policy(pki, expected_dns_names=["API.Internal."], expected_uris=[f" {SPIFFE} "])
    assert built.expectation.dns_names == {"api.internal"}
    assert built.expectation.uris == {SPIFFE}


def test_client_certificate_files_are_checked(pki, tmp_path):
    kong = pki.client("kong-gateway")
    cert, key = write_pem_files(tmp_path, kong, "kong")
    assert policy(pki, client_cert_file=cert, client_key_file=key).settings.client_cert_file == cert
    _, other_key = write_pem_files(tmp_path, pki.client("someone-else"), "other")
    with pytest.raises(ConfigError) as err:
        policy(pki, client_cert_file=cert, client_key_file=other_key)
    assert err.value.field == "client_key_file" and "does not match" in err.value.problem
    with pytest.raises(ConfigError) as err:
        policy(pki, client_cert_file=cert, client_key_file=cert)
    assert err.value.field == "client_key_file" and "not a PEM private key" in err.value.problem
    with pytest.raises(ConfigError) as err:
        policy(pki, client_cert_file=key, client_key_file=key)
    assert err.value.field == "client_cert_file"


def test_encrypted_client_key_is_refused_without_leaking_it(pki, tmp_path):
    from cryptography.hazmat.primitives import serialization

    kong = pki.client("kong-gateway")
    cert, _ = write_pem_files(tmp_path, kong, "kong")
    encrypted = kong.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(b"secret-pass"))
    key_path = tmp_path / "enc.key"
    key_path.write_bytes(encrypted)
    with pytest.raises(ConfigError) as err:
        policy(pki, client_cert_file=cert, client_key_file=str(key_path))
    assert "encrypted" in err.value.problem
    assert "PRIVATE KEY" not in str(err.value) and "secret-pass" not in str(err.value)


# -- evaluate --------------------------------------------------------------------------------------

def test_evaluate_ok_with_every_kind_of_expectation(pki, summary):
    built = policy(pki, expected_dns_names=["api.internal"], expected_uris=[SPIFFE],
                   spki_sha256_pins=[summary.spki_b64])
    verdict = evaluate(seen(summary), built)
    assert verdict.ok and verdict.reason is Reason.IDENTITY_OK
    assert verdict.mark()["spki_sha256"] == summary.spki_b64
    assert verdict.mark()["target"] == "127.0.0.1:8443"


def test_evaluate_any_of_within_a_kind(pki, summary):
    built = policy(pki, expected_dns_names=["other.internal", "x.svc.internal"])
    assert evaluate(seen(summary), built).ok


@pytest.mark.parametrize("kwargs, reason", [
    ({"expected_dns_names": ["other.internal"]}, Reason.SAN_MISMATCH),
    ({"expected_uris": ["spiffe://example.org/ns/payments/sa/other"]}, Reason.URI_SAN_MISMATCH),
    ({"spki_sha256_pins": ["A" * 43 + "="]}, Reason.SPKI_MISMATCH),
    # every configured kind must hold: a matching SAN does not excuse a wrong pin
    ({"expected_dns_names": ["api.internal"], "spki_sha256_pins": ["A" * 43 + "="]}, Reason.SPKI_MISMATCH),
    ({"expected_dns_names": ["api.internal"], "expected_uris": ["spiffe://x.org/y"]},
     Reason.URI_SAN_MISMATCH),
])
def test_evaluate_mismatches(pki, summary, kwargs, reason):
    verdict = evaluate(seen(summary), policy(pki, **kwargs))
    assert not verdict.ok and verdict.reason is reason
    assert verdict.detail


def test_evaluate_checks_validity_itself(pki, summary):
    built = policy(pki)
    assert evaluate(seen(summary), built, now=summary.not_after + DAY).reason is Reason.UPSTREAM_CERT_EXPIRED
    assert evaluate(seen(summary), built,
                    now=summary.not_before - DAY).reason is Reason.UPSTREAM_CERT_NOT_YET_VALID


def test_evaluate_keeps_a_probe_failure(pki, summary):
    failed = Observation(Target("h", 1), Reason.UPSTREAM_UNREACHABLE, "refused")
    verdict = evaluate(failed, policy(pki))
    assert verdict.reason is Reason.UPSTREAM_UNREACHABLE and verdict.detail == "refused"
    assert evaluate(Observation(Target("h", 1)), policy(pki)).reason is Reason.HANDSHAKE_FAILED


def test_expiry_notices_for_upstream_and_client(pki, summary):
    soon = CertSummary.of(pki.client("kong", not_after=now() + 5 * DAY).cert)
    expired = CertSummary.of(pki.expired().cert)
    later = CertSummary.of(pki.client("kong").cert)
    built = policy(pki, expiry_warning_days=30)
    near_end = summary.not_after - 10 * DAY
    verdict = evaluate(seen(summary, soon), built, now=near_end)
    assert verdict.ok
    codes = [n.notice for n in verdict.notices]
    assert Notice.UPSTREAM_CERT_EXPIRING in codes
    assert "expires" in verdict.notices[0].describe(near_end)
    assert [n.notice for n in evaluate(seen(summary, soon), built).notices] == [Notice.CLIENT_CERT_EXPIRING]
    assert [n.notice for n in evaluate(seen(summary, expired), built).notices] == [Notice.CLIENT_CERT_EXPIRED]
    assert evaluate(seen(summary, later), built).notices == ()
    assert evaluate(seen(summary, soon), policy(pki, expiry_warning_days=0)).notices == ()


def test_verdict_describe_is_one_line_without_secrets(pki, summary):
    verdict = evaluate(seen(summary), policy(pki, expected_dns_names=["other.internal"]))
    line = verdict.describe()
    assert "\n" not in line and "target=127.0.0.1:8443" in line and "sni=api.internal" in line
    assert summary.spki_b64 in line


# -- cache -----------------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def ok_verdict(target: Target) -> Verdict:
    return Verdict(Reason.IDENTITY_OK, "", Observation(target))


def test_cache_freshness_follows_ttl_and_refresh_point():
    clock = Clock()
    cache = VerdictCache(ttl=60, failure_ttl=4, clock=clock)
    target = Target("a", 1)
    assert cache.lookup(target) == (None, Freshness.MISSING)
    cache.store(target, ok_verdict(target))
    assert cache.lookup(target)[1] is Freshness.FRESH
    clock.t += 29.9
    assert cache.lookup(target)[1] is Freshness.FRESH
    clock.t += 0.2
    assert cache.lookup(target)[1] is Freshness.REFRESH_DUE
    clock.t += 30
    verdict, freshness = cache.lookup(target)
    assert freshness is Freshness.EXPIRED and verdict.ok


def test_cache_keeps_failures_for_failure_ttl():
    clock = Clock()
    cache = VerdictCache(ttl=60, failure_ttl=4, clock=clock)
    target = Target("a", 1)
    cache.store(target, Verdict.failure(target, Reason.UPSTREAM_UNREACHABLE, "down"))
    assert cache.lookup(target)[1] is Freshness.FRESH
    clock.t += 2
    assert cache.lookup(target)[1] is Freshness.REFRESH_DUE
    clock.t += 2
    assert cache.lookup(target)[1] is Freshness.EXPIRED


def test_cache_is_per_target_bounded_and_announces_once():
    cache = VerdictCache(ttl=60, failure_ttl=5, max_entries=2, clock=Clock())
    a, b, c = Target("a", 1), Target("b", 1), Target("a", 1, "other-sni")
    for t in (a, b, c):
        cache.store(t, ok_verdict(t))
    assert len(cache) == 2
    assert cache.lookup(a)[1] is Freshness.MISSING   # oldest evicted; SNI is part of the key
    assert cache.first_use(b) is True
    assert cache.first_use(b) is False
    cache.store(b, ok_verdict(b))
    assert cache.first_use(b) is True                 # a new verdict is announced again
    assert cache.first_use(a) is False


def test_verdict_failure_is_not_ok_and_describes_itself():
    verdict = Verdict.failure(Target("h", 443), Reason.PROBE_TIMEOUT, "slow\nline")
    assert not verdict.ok and verdict.describe() == "target=h:443 slow line"
    assert verdict.checked_at <= dt.datetime.now(dt.timezone.utc)


def test_an_upstream_chosen_subject_cannot_push_the_reason_out_of_the_log(pki):
    """Review: a subject of ~300 characters put first would fill the log field (300 characters)
    with text the upstream chose. The key and the reason come first; the subject last, shortened."""
    from kong_mtls.kong.runtime import log_line
    padded = pki.intermediate.issue(name("x" * 60, organizational_units=["pad" * 20] * 4),
                                    sans=SubjectAltNames(dns=["api.internal"]),
                                    extended_key_usage=(SERVER_AUTH,))
    observed = seen(CertSummary.of(padded.cert))
    verdict = evaluate(observed, policy(pki, expected_uris=["spiffe://example.org/echo"]))
    assert verdict.reason is Reason.URI_SAN_MISMATCH
    line = log_line("upstream-identity", "alarm", reason=verdict.reason.value, detail=verdict.describe())
    field = line.split("detail=", 1)[1]
    assert f"spki_sha256={observed.certificate.spki_b64}" in field
    assert "spiffe://example.org/echo" in field
    assert field.index("spki_sha256=") < field.index("subject=")
