"""client-cert-auth config: what Plugin(config) accepts, refuses (naming the field) and compiles."""

from __future__ import annotations

import datetime as dt
import logging

import pytest
from cryptography.hazmat.primitives import serialization

from kong_mtls.constants import CLIENT_CERT_AUTH, PRIORITIES
from kong_mtls.core.chain import Reason
from kong_mtls.core.identity import NameKind, Via
from kong_mtls.devpki import Authority
from kong_mtls.kong.client_cert_auth import Plugin, Schema, compile_config
from kong_mtls.kong.server import plugin_info
from kong_mtls.schema import ConfigError

MAPPED = {"subject_name": "a", "consumer": "c"}


@pytest.fixture(scope="module")
def base(pki) -> dict:
    return {"ca_certificates": [pki.root.cert_pem]}


def field_of(config: dict) -> str:
    with pytest.raises(ConfigError) as info:
        Plugin(config)
    return info.value.field


def no_consumer(ref):
    return None


# -- refused configs -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("make", "field"), [
    (lambda p, b: {}, "ca_certificates"),
    (lambda p, b: {"ca_certificates": {}}, "ca_certificates"),                     # Kong's empty array
    (lambda p, b: {"ca_certificates": ["not a pem"]}, "ca_certificates[1]"),
    (lambda p, b: {"ca_certificates": ["322dce96-d434-4e0d-9038-311b3520f0a3"]}, "ca_certificates[1]"),
    (lambda p, b: {"ca_certificates": [p.root.cert_pem, p.alice.cert_pem]}, "ca_certificates[2]"),
    (lambda p, b: {"ca_certificates": [p.root.cert_pem[:300]]}, "ca_certificates[1]"),
    (lambda p, b: {"ca_certificate_files": ["/nonexistent/ca.pem"]}, "ca_certificate_files[1]"),
    (lambda p, b: {"ca_presets": ["cloudflare"]}, "ca_presets[1]"),
    (lambda p, b: {"ca_certificates": [p.intermediate.cert_pem]}, "allow_partial_chain"),
    (lambda p, b: {**b, "max_chain_depth": 17}, "max_chain_depth"),
    (lambda p, b: {**b, "required_eku": "clientAuthentication"}, "required_eku"),
    (lambda p, b: {**b, "validation_time_skew": -1}, "validation_time_skew"),
    (lambda p, b: {**b, "revocation_check_mode": "OFF"}, "revocation_check_mode"),
    (lambda p, b: {**b, "revocation_check_mode": "SKIP", "crls": ["x"]}, "crls"),
    (lambda p, b: {**b, "crls": ["not a crl"]}, "crls[1]"),
    (lambda p, b: {**b, "name_sources": []}, "name_sources"),
    (lambda p, b: {**b, "name_sources": ["uri", "upn"]}, "name_sources[2]"),
    (lambda p, b: {**b, "consumer_mappings": [{"consumer": "alice"}]}, "consumer_mappings[1].subject_name"),
    (lambda p, b: {**b, "consumer_mappings": [{"subject_name": "a"}]}, "consumer_mappings[1].consumer"),
    (lambda p, b: {**b, "consumer_mappings": [{"subject_name": "a", "consumer": "c", "spki_sha256": "abc"}]},
     "consumer_mappings[1].spki_sha256"),
    (lambda p, b: {**b, "consumer_mappings": [{"subject_name": "a", "consumer": "c", "ca_sha256": "xyz"}]},
     "consumer_mappings[1].ca_sha256"),
    (lambda p, b: {**b, "skip_consumer_lookup": True, "consumer_mappings": [MAPPED]},
     "consumer_mappings[1].consumer"),
    (lambda p, b: {**b, "skip_consumer_lookup": True, "default_consumer": "everyone"}, "default_consumer"),
    (lambda p, b: {**b, "consumer_by": ["custom_id"]}, "consumer_by[1]"),
    (lambda p, b: {**b, "groups_from": ["OU"]}, "groups_from[1]"),
    (lambda p, b: {**b, "groups_from": ["cn", "dn:NOPE"]}, "groups_from[2]"),
    (lambda p, b: {**b, "forward_client_cert": ["pem"]}, "forward_client_cert[1]"),
    (lambda p, b: {**b, "anonymous": ""}, "anonymous"),
    (lambda p, b: {**b, "consumer_cache_ttl": -5}, "consumer_cache_ttl"),
    (lambda p, b: {**b, "http_timeout": 0}, "http_timeout"),
])
def test_bad_config_is_refused_naming_the_field(pki, base, make, field):
    assert field_of(make(pki, base)) == field


def test_error_messages_help(pki):
    with pytest.raises(ConfigError, match="paste the PEM"):
        Plugin({"ca_certificates": ["322dce96-d434-4e0d-9038-311b3520f0a3"]})
    with pytest.raises(ConfigError, match="not a CA certificate"):
        Plugin({"ca_certificates": [pki.alice.cert_pem]})
    with pytest.raises(ConfigError, match="no trust anchor configured"):
        Plugin({"ca_certificates": []})


# -- accepted configs ------------------------------------------------------------------------------------

def test_defaults_and_kong_extra_keys(pki):
    config = {field: None for item in Schema for field in item}
    config.update({"ca_certificates": [pki.root.cert_pem], "route_id": "r", "__seq__": 3, "__plugin_id": "p"})
    auth = Plugin(config).authenticator
    policy, chain_policy = auth.policy, auth.verifier.policy
    assert policy.name_sources == (NameKind.URI, NameKind.DNS, NameKind.EMAIL, NameKind.IP, NameKind.CN)
    assert policy.consumer_by == frozenset({"username"}) and not policy.skip_consumer_lookup
    assert not policy.report_only and policy.forward_client_cert == frozenset()
    assert chain_policy.max_chain_depth == 4 and not chain_policy.allow_partial_chain
    assert chain_policy.required_eku.dotted_string == "1.3.6.1.5.5.7.3.2"
    assert auth.revocation is not None  # IGNORE_CA_ERROR by default, as Enterprise
    assert auth.consumers.ttl == 60


def test_anchors_from_text_files_and_presets(pki, tmp_path):
    path = tmp_path / "ca.pem"
    path.write_text(pki.intermediate.cert_pem + pki.root.cert_pem)
    compiled = compile_config({"ca_certificate_files": [str(path)], "ca_presets": ["cloudflare-origin-pull"],
                               "ca_certificates": [pki.other_root.cert_pem]})
    subjects = [c.subject.rfc4514_string() for c in compiled.anchors]
    assert len(subjects) == 4 and any("origin-pull.cloudflare.net" in s for s in subjects)
    auth = compiled.authenticator
    assert auth.authenticate(pki.alice.cert_pem, no_consumer).reason is Reason.NO_CONSUMER  # chain verified
    assert auth.authenticate(pki.unknown_ca_client().chain_pem, no_consumer).reason is Reason.NO_CONSUMER


def test_options_reach_the_verifier(pki):
    config = {"ca_certificates": [pki.intermediate.cert_pem], "allow_partial_chain": True,
              "required_eku": "any", "skip_consumer_lookup": True, "revocation_check_mode": "SKIP"}
    auth = compile_config(config).authenticator
    assert auth.revocation is None
    assert auth.authenticate(pki.server_only_eku().cert_pem, no_consumer).via is Via.SKIP_CONSUMER_LOOKUP
    deep = compile_config({"ca_certificates": [pki.root.cert_pem], "max_chain_depth": 0,
                           "skip_consumer_lookup": True}).authenticator
    assert deep.authenticate(pki.alice.chain_pem, no_consumer).reason is Reason.CHAIN_TOO_DEEP


def test_configured_crl_revokes(pki):
    leaf, crl = pki.revoked_with_crl()
    crl_pem = crl.public_bytes(serialization.Encoding.PEM).decode()
    root_crl = pki.root.crl().public_bytes(serialization.Encoding.PEM).decode()  # STRICT: every CA too
    auth = compile_config({"ca_certificates": [pki.root.cert_pem], "crls": [crl_pem, root_crl],
                           "revocation_check_mode": "STRICT", "skip_consumer_lookup": True}).authenticator
    assert auth.authenticate(leaf.chain_pem, no_consumer).reason is Reason.REVOKED
    assert auth.authenticate(pki.alice.chain_pem, no_consumer).via is Via.SKIP_CONSUMER_LOOKUP


def test_expiring_anchor_is_warned_at_start(pki, caplog):
    soon = Authority.root("soon-expiring root", days=20)
    with caplog.at_level(logging.WARNING, logger="kong_mtls"):
        Plugin({"ca_certificates": [pki.root.cert_pem, soon.cert_pem]})
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "anchor-expiring" in messages[0] and "soon-expiring root" in messages[0]
    assert "expires in 19 days" in messages[0] or "expires in 20 days" in messages[0]


def test_cloudflare_preset_is_warned_about_before_it_expires():
    def at(day: str) -> float:
        return dt.datetime.fromisoformat(day).replace(tzinfo=dt.timezone.utc).timestamp()

    config = {"ca_presets": ["cloudflare-origin-pull"], "skip_consumer_lookup": True}
    assert compile_config(config, clock=lambda: at("2029-07-01")).warnings == ()
    (warning,) = compile_config(config, clock=lambda: at("2029-10-01")).warnings
    assert "origin-pull.cloudflare.net" in warning and "not_after=2029-11-01" in warning


def test_dump_reports_name_priority_and_schema():
    info = plugin_info(CLIENT_CERT_AUTH, Plugin, Schema)
    assert info["Name"] == CLIENT_CERT_AUTH and info["Priority"] == PRIORITIES[CLIENT_CERT_AUTH] == 1600
    assert info["Phases"] == ["access"]
    fields = info["Schema"]["fields"][0]["config"]["fields"]
    names = [next(iter(f)) for f in fields]
    assert names[:3] == ["ca_certificates", "ca_certificate_files", "ca_presets"]
    mode = next(f["revocation_check_mode"] for f in fields if "revocation_check_mode" in f)
    assert mode["default"] == "IGNORE_CA_ERROR" and mode["one_of"] == ["SKIP", "IGNORE_CA_ERROR", "STRICT"]
