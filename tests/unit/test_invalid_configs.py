"""Every plugin refuses a config it cannot use when its instance starts, naming the field.

(Kong validates configs against the plugin's schema too, but a config can also reach the plugin
server by other paths; the refusal is what makes the instance answer 500 instead of running a
broken plugin. Protocol tests check that path for each plugin.)"""

from __future__ import annotations

import importlib

import pytest

from kong_mtls.schema import ConfigError
from tests.harness.pki import TestPKI

PKI = TestPKI()
ROOT = PKI.root.cert_pem
CERT = {"ca_certificates": [ROOT], "revocation_check_mode": "SKIP"}
TRUNCATED_PEM = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
HASH = "hmac-sha256:" + "A" * 22 + ":" + "B" * 43

CASES = [
    # module, config, field
    ("ip_allowlist", {}, "allow"),
    ("ip_allowlist", {"allow": ["10.0.0.1/8"]}, "allow[1]"),
    ("ip_allowlist", {"allow": ["not-an-ip"]}, "allow[1]"),
    ("ip_allowlist", {"deny": ["10.0.0.0/33"]}, "deny[1]"),
    ("ip_allowlist", {"allow_presets": ["nope"]}, "allow_presets[1]"),
    ("ip_allowlist", {"source": "header", "header_name": "CF-Connecting-IP"}, "trusted_proxies"),
    ("ip_allowlist", {"source": "header", "trusted_proxies": ["10.0.0.0/8"]}, "header_name"),
    ("ip_allowlist", {"allow": ["10.0.0.0/8"], "header_name": "X-Real-IP"}, "header_name"),
    ("ip_allowlist", {"allow": ["10.0.0.0/8"], "status": 200}, "status"),
    ("ip_allowlist", {"allow": ["10.0.0.0/8"], "client_ip_header": "Bad Header"}, "client_ip_header"),
    ("client_cert_auth", {}, "ca_certificates"),
    ("client_cert_auth", {"ca_certificates": [TRUNCATED_PEM]}, "ca_certificates[1]"),
    ("client_cert_auth", {"ca_certificates": ["not a pem"]}, "ca_certificates[1]"),
    ("client_cert_auth", {"ca_certificate_files": ["/nonexistent/ca.pem"]}, "ca_certificate_files[1]"),
    ("client_cert_auth", {"ca_presets": ["no-such-ca"]}, "ca_presets[1]"),
    ("client_cert_auth", {**CERT, "required_eku": "not-a-purpose"}, "required_eku"),
    ("client_cert_auth", {**CERT, "max_chain_depth": 99}, "max_chain_depth"),
    ("client_cert_auth", {**CERT, "crls": ["garbage"], "revocation_check_mode": "STRICT"}, "crls[1]"),
    ("client_cert_auth", {**CERT, "revocation_check_mode": "OFF"}, "revocation_check_mode"),
    ("client_cert_auth", {**CERT, "groups_from": ["nonsense"]}, "groups_from[1]"),
    ("api_key_auth", {"credentials": [{"id": "a", "hash": "plaintext-key", "consumer": "alice"}]},
     "credentials[1].hash"),
    ("api_key_auth", {"credentials": [{"id": "a", "hash": HASH, "consumer": "alice"},
                                      {"id": "a", "hash": HASH, "consumer": "bob"}]}, "credentials[2].id"),
    ("api_key_auth", {"credentials": [{"id": "a", "hash": HASH, "consumer": "alice",
                                       "allowed_cidrs": ["300.0.0.0/8"]}]},
     "credentials[1].allowed_cidrs[1]"),
    ("api_key_auth", {"credentials": [{"id": "a", "hash": HASH, "consumer": "alice",
                                       "expires_at": "tomorrow"}]}, "credentials[1].expires_at"),
    ("api_key_auth", {"key_names": []}, "key_names"),
    ("upstream_identity", {}, "trusted_ca_pem"),
    ("upstream_identity", {"trusted_ca_pem": "not a pem"}, "trusted_ca_pem"),
    ("upstream_identity", {"trusted_ca_pem": ROOT, "port": 70000}, "port"),
    ("upstream_identity", {"trusted_ca_pem": ROOT, "spki_sha256_pins": ["xyz"]}, "spki_sha256_pins[1]"),
    ("client_cert_request", {"disable_session_reuse": "yes"}, "disable_session_reuse"),
]


@pytest.mark.parametrize(("module", "config", "field"), CASES, ids=[f"{m}:{f}" for m, _, f in CASES])
def test_invalid_config_is_refused_naming_the_field(module, config, field):
    plugin = importlib.import_module(f"kong_mtls.kong.{module}")
    with pytest.raises(ConfigError) as info:
        plugin.Plugin(config)
    assert info.value.field.startswith(field), str(info.value)
    assert field.split("[")[0] in str(info.value)
