"""Every invalid plugin config is refused when its instance starts, with `ConfigError.field` naming
the field at fault; through the real plugin server, Kong then answers 500 and logs that field.

One table per plugin: bad PEM, bad CIDR, unknown preset, conflicting options, wrong types,
out-of-range numbers, empty required lists, duplicate credentials, bad hashes ... Each row is
`(id, config, field)`; configs needing test-time material (certificates, files) are built by a
function of the `Material` below. The rows about newlines, NUL bytes, lone surrogates and huge
numbers are regressions of bugs found by tests/unit/test_hostile_input.py.
"""

from __future__ import annotations

import base64
import functools
import importlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any, Union

import pytest
from cryptography.hazmat.primitives import serialization

from kong_mtls.constants import API_KEY_AUTH, CLIENT_CERT_AUTH, IP_ALLOWLIST, UPSTREAM_IDENTITY
from kong_mtls.core.api_keys import credential_entry, generate_key, key_index
from kong_mtls.schema import ConfigError
from tests.harness.expect import assert_invalid_config
from tests.harness.kong_side import Request
from tests.harness.pki import TestPKI

INDEX_SECRET = "validation-index-secret"


class Material:
    """Certificates, keys and files the configs point at, all made at test time."""

    def __init__(self) -> None:
        self.pki = pki = TestPKI()
        self.root = pki.root.cert_pem
        self.intermediate = pki.intermediate.cert_pem
        self.alice_cert = pki.alice.cert_pem
        self.alice_key = pki.alice.key_pem
        self.crl = pki.intermediate.crl().public_bytes(serialization.Encoding.PEM).decode()
        self.dir = tempfile.mkdtemp(prefix="kong-mtls-config-")
        kong_client = pki.intermediate.client("kong", dns=["kong.example"])
        other = pki.intermediate.client("other", dns=["other.example"])
        self.files = {
            "root": self._write("root.pem", self.root),
            "garbage": self._write("garbage.pem",
                                   "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
            "kong-cert": self._write("kong.pem", kong_client.cert_pem),
            "kong-key": self._write("kong.key", kong_client.key_pem),
            "other-key": self._write("other.key", other.key_pem),
            "not-json": self._write("ranges.json", "{not json"),
            "wrong-preset": self._write("wrong.json", json.dumps({"name": "fastly",
                                                                  "ipv4_cidrs": ["10.0.0.0/8"]})),
            "bad-cidr-preset": self._write("bad.json", json.dumps({"name": "cloudflare",
                                                                   "ipv4_cidrs": ["10.0.0.1/8"]})),
            "v6-in-v4-preset": self._write("mixed.json", json.dumps({"name": "cloudflare",
                                                                    "ipv4_cidrs": ["2001:db8::/32"]})),
            "dir": self.dir,
            "missing": os.path.join(self.dir, "missing.pem"),
        }
        key = generate_key()
        self.entry = credential_entry(key.key, "alice", key.key_id)
        legacy = "legacy-key-" + base64.urlsafe_b64encode(os.urandom(18)).decode()
        self.migrated = credential_entry(legacy, "bob", "legacy-1", index_secret=INDEX_SECRET)
        self.index = key_index(legacy, INDEX_SECRET)

    def _write(self, name: str, text: str) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as handle:
            handle.write(text)
        return path


@functools.lru_cache(maxsize=1)
def material() -> Material:
    return Material()


Config = Union[Mapping[str, Any], Callable[[Material], Any]]

#: 16 bytes of salt and a 32-byte MAC, base64url: the shape of a valid hash.
SALT, MAC = "A" * 22, "B" * 43
GOOD_HASH = f"hmac-sha256:{SALT}:{MAC}"
HEADER_SOURCE = {"source": "header", "header_name": "CF-Connecting-IP", "trusted_proxies": ["10.0.0.0/8"]}
PEER = {"allow": ["10.0.0.0/8"]}


def cert(m: Material, **extra: Any) -> dict[str, Any]:
    return {"ca_certificates": [m.root], "revocation_check_mode": "SKIP", **extra}


def cred(m: Material, **changes: Any) -> dict[str, Any]:
    entry = dict(m.entry)
    entry.update(changes)
    return {k: v for k, v in entry.items() if v is not None}


def up(m: Material, **extra: Any) -> dict[str, Any]:
    return {"trusted_ca_pem": m.root, **extra}


IP_ALLOWLIST_CASES = [
    ("nothing to check", {}, "allow"),
    ("empty allow", {"allow": []}, "allow"),
    ("kong empty array", {"allow": {}}, "allow"),
    ("host bits", {"allow": ["10.0.0.1/8"]}, "allow[1]"),
    ("prefix 33", {"allow": ["10.0.0.0/33"]}, "allow[1]"),
    ("prefix 129", {"allow": ["2001:db8::/129"]}, "allow[1]"),
    ("negative prefix", {"allow": ["10.0.0.0/-1"]}, "allow[1]"),
    ("leading zeros", {"allow": ["010.0.0.1"]}, "allow[1]"),
    ("zone id", {"allow": ["fe80::1%eth0"]}, "allow[1]"),
    ("space", {"allow": ["10.0.0.0 /8"]}, "allow[1]"),
    ("host name", {"allow": ["example.com"]}, "allow[1]"),
    ("second entry", {"allow": ["10.0.0.0/8", "bogus"]}, "allow[2]"),
    ("number entry", {"allow": [10]}, "allow[1]"),
    ("null entry", {"allow": ["10.0.0.0/8", None]}, "allow[2]"),
    ("string for array", {"allow": "10.0.0.0/8"}, "allow"),
    ("bad deny", {"deny": ["300.1.1.1"]}, "deny[1]"),
    ("bad trusted proxy", {**HEADER_SOURCE, "trusted_proxies": ["10.0.0.0/8", "1.2.3"]},
     "trusted_proxies[2]"),
    ("unknown allow preset", {"allow_presets": ["nope"]}, "allow_presets[1]"),
    ("unknown deny preset", {"deny_presets": ["aws"]}, "deny_presets[1]"),
    ("unknown proxy preset", {**HEADER_SOURCE, "trusted_proxies_presets": ["x"]},
     "trusted_proxies_presets[1]"),
    ("unknown source", {**PEER, "source": "socket"}, "source"),
    ("header source without header", {"source": "header", "trusted_proxies": ["10.0.0.0/8"]}, "header_name"),
    ("header source without proxies", {"source": "header", "header_name": "CF-Connecting-IP"},
     "trusted_proxies"),
    ("peer source with header", {**PEER, "header_name": "X-Real-IP"}, "header_name"),
    ("peer source with proxies", {**PEER, "trusted_proxies": ["10.0.0.0/8"]}, "trusted_proxies"),
    ("peer source with hops", {**PEER, "forwarded_for_hops": 2}, "forwarded_for_hops"),
    ("peer source with open peers", {**PEER, "require_trusted_peer": False}, "require_trusted_peer"),
    ("forwarded source with proxies", {**PEER, "source": "forwarded", "trusted_proxies": ["10.0.0.0/8"]},
     "trusted_proxies"),
    ("hops on a one-address header", {**HEADER_SOURCE, "forwarded_for_hops": 2}, "forwarded_for_hops"),
    ("zero hops", {**HEADER_SOURCE, "header_name": "X-Forwarded-For", "forwarded_for_hops": 0},
     "forwarded_for_hops"),
    ("33 hops", {**HEADER_SOURCE, "header_name": "X-Forwarded-For", "forwarded_for_hops": 33},
     "forwarded_for_hops"),
    ("fractional hops", {**HEADER_SOURCE, "header_name": "X-Forwarded-For", "forwarded_for_hops": 1.5},
     "forwarded_for_hops"),
    ("RFC 7239 Forwarded", {**HEADER_SOURCE, "header_name": "Forwarded"}, "header_name"),
    ("header name with colon", {**HEADER_SOURCE, "header_name": "CF:IP"}, "header_name"),
    ("empty header name", {**HEADER_SOURCE, "header_name": ""}, "header_name"),
    ("status 200", {**PEER, "status": 200}, "status"),
    ("status 600", {**PEER, "status": 600}, "status"),
    ("status as text", {**PEER, "status": "403"}, "status"),
    ("status as boolean", {**PEER, "status": True}, "status"),
    ("empty message", {**PEER, "message": ""}, "message"),
    ("bad client_ip_header", {**PEER, "client_ip_header": "Bad Header"}, "client_ip_header"),
    ("boolean as text", {**HEADER_SOURCE, "require_trusted_peer": "no"}, "require_trusted_peer"),
    ("unknown preset file", lambda m: {**PEER, "preset_files": {"nope": m.files["root"]}},
     "preset_files.nope"),
    ("missing preset file", lambda m: {**PEER, "preset_files": {"cloudflare": m.files["missing"]}},
     "preset_files.cloudflare"),
    ("preset file not JSON", lambda m: {**PEER, "preset_files": {"cloudflare": m.files["not-json"]}},
     "preset_files.cloudflare"),
    ("preset file of another preset",
     lambda m: {**PEER, "preset_files": {"cloudflare": m.files["wrong-preset"]}},
     "preset_files.cloudflare"),
    ("preset file with a bad CIDR",
     lambda m: {**PEER, "preset_files": {"cloudflare": m.files["bad-cidr-preset"]}},
     "preset_files.cloudflare"),
    ("preset file with the wrong family",
     lambda m: {**PEER, "preset_files": {"cloudflare": m.files["v6-in-v4-preset"]}},
     "preset_files.cloudflare"),
    ("preset file is a directory", lambda m: {**PEER, "preset_files": {"cloudflare": m.files["dir"]}},
     "preset_files.cloudflare"),
    ("string for map", {**PEER, "preset_files": "cloudflare"}, "preset_files"),
    ("NUL in a preset file path",
     lambda m: {**PEER, "preset_files": {"cloudflare": m.files["root"] + "\x00"}},
     "preset_files.cloudflare"),
    ("lone surrogate in a preset file path",
     lambda m: {**PEER, "preset_files": {"cloudflare": m.dir + "/\ud800"}},
     "preset_files.cloudflare"),
    ("header name ending in a newline", {**HEADER_SOURCE, "header_name": "CF-Connecting-IP\n"},
     "header_name"),
    ("client_ip_header ending in a newline", {**PEER, "client_ip_header": "X-Client-IP\n"},
     "client_ip_header"),
    ("not a record", ["allow"], "config"),
]

CLIENT_CERT_AUTH_CASES = [
    ("no anchors", {}, "ca_certificates"),
    ("kong empty array", {"ca_certificates": {}}, "ca_certificates"),
    ("not a PEM", {"ca_certificates": ["not a pem"]}, "ca_certificates[1]"),
    ("Kong CA certificate id", {"ca_certificates": ["322dce96-d434-4e0d-9038-311b3520f0a3"]},
     "ca_certificates[1]"),
    ("truncated PEM", lambda m: {"ca_certificates": [m.root[:300] + "\n-----END CERTIFICATE-----\n"]},
     "ca_certificates[1]"),
    ("body mangled", lambda m: {"ca_certificates": [m.root.replace("M", "!", 3)]}, "ca_certificates[1]"),
    ("non-ASCII PEM", lambda m: {"ca_certificates": [m.root.replace("-----\n", "-----\né", 1)]},
     "ca_certificates[1]"),
    ("private key", lambda m: {"ca_certificates": [m.alice_key]}, "ca_certificates[1]"),
    ("leaf as anchor", lambda m: {"ca_certificates": [m.alice_cert]}, "ca_certificates[1]"),
    ("leaf second", lambda m: {"ca_certificates": [m.root, m.alice_cert]}, "ca_certificates[2]"),
    ("leaf inside one PEM text", lambda m: {"ca_certificates": [m.root + m.alice_cert]},
     "ca_certificates[1]"),
    ("number", {"ca_certificates": [42]}, "ca_certificates[1]"),
    ("intermediate without its root", lambda m: {"ca_certificates": [m.intermediate]}, "allow_partial_chain"),
    ("missing file", lambda m: {"ca_certificate_files": [m.files["missing"]]}, "ca_certificate_files[1]"),
    ("directory", lambda m: {"ca_certificate_files": [m.files["dir"]]}, "ca_certificate_files[1]"),
    ("garbage file", lambda m: {"ca_certificate_files": [m.files["garbage"]]}, "ca_certificate_files[1]"),
    ("key file", lambda m: {"ca_certificate_files": [m.files["kong-key"]]}, "ca_certificate_files[1]"),
    ("NUL in a file path", lambda m: {"ca_certificate_files": [m.files["root"] + "\x00"]},
     "ca_certificate_files[1]"),
    ("lone surrogate in a file path", lambda m: {"ca_certificate_files": [m.dir + "/\ud800"]},
     "ca_certificate_files[1]"),
    ("unknown CA preset", {"ca_presets": ["nope"]}, "ca_presets[1]"),
    ("CIDR preset as CA preset", {"ca_presets": ["cloudflare"]}, "ca_presets[1]"),
    ("depth 17", lambda m: cert(m, max_chain_depth=17), "max_chain_depth"),
    ("depth -1", lambda m: cert(m, max_chain_depth=-1), "max_chain_depth"),
    ("unknown EKU", lambda m: cert(m, required_eku="clientAuthentication"), "required_eku"),
    ("empty EKU", lambda m: cert(m, required_eku=""), "required_eku"),
    ("bad OID", lambda m: cert(m, required_eku="1.2.x"), "required_eku"),
    ("skew over a day", lambda m: cert(m, validation_time_skew=86401), "validation_time_skew"),
    ("unknown revocation mode", lambda m: cert(m, revocation_check_mode="OFF"), "revocation_check_mode"),
    ("CRLs while skipping revocation", lambda m: cert(m, crls=[m.crl]), "crls"),
    ("not a CRL", lambda m: cert(m, revocation_check_mode="STRICT", crls=["garbage"]), "crls[1]"),
    ("certificate as CRL", lambda m: cert(m, revocation_check_mode="STRICT", crls=[m.crl, m.root]),
     "crls[2]"),
    ("timeout 50 ms", lambda m: cert(m, revocation_check_mode="STRICT", http_timeout=50), "http_timeout"),
    ("revocation cache 0", lambda m: cert(m, revocation_cache_ttl=0), "revocation_cache_ttl"),
    ("no name sources", lambda m: cert(m, name_sources=[]), "name_sources"),
    ("unknown name source", lambda m: cert(m, name_sources=["uri", "upn"]), "name_sources[2]"),
    ("mapping without subject", lambda m: cert(m, consumer_mappings=[{"consumer": "alice"}]),
     "consumer_mappings[1].subject_name"),
    ("mapping without consumer", lambda m: cert(m, consumer_mappings=[{"subject_name": "alice"}]),
     "consumer_mappings[1].consumer"),
    ("mapping with empty consumer",
     lambda m: cert(m, consumer_mappings=[{"subject_name": "a", "consumer": ""}]),
     "consumer_mappings[1].consumer"),
    ("mapping with bad CA pin",
     lambda m: cert(m, consumer_mappings=[{"subject_name": "a", "consumer": "c", "ca_sha256": "xyz"}]),
     "consumer_mappings[1].ca_sha256"),
    ("mapping with bad SPKI pin",
     lambda m: cert(m, consumer_mappings=[{"subject_name": "a", "consumer": "c", "spki_sha256": "0" * 63}]),
     "consumer_mappings[1].spki_sha256"),
    ("mapping with unprintable group",
     lambda m: cert(m, consumer_mappings=[{"subject_name": "a", "consumer": "c", "groups": ["ok", "a\nb"]}]),
     "consumer_mappings[1].groups[2]"),
    ("duplicate mapping",
     lambda m: cert(m, consumer_mappings=[{"subject_name": "a", "consumer": "c"},
                                          {"subject_name": "a", "consumer": "d"}]), "consumer_mappings[2]"),
    ("mapping as a map", lambda m: cert(m, consumer_mappings={"a": "c"}), "consumer_mappings"),
    ("consumer by custom_id", lambda m: cert(m, consumer_by=["custom_id"]), "consumer_by[1]"),
    ("skip lookup with a mapped consumer",
     lambda m: cert(m, skip_consumer_lookup=True, consumer_mappings=[{"subject_name": "a", "consumer": "c"}]),
     "consumer_mappings[1].consumer"),
    ("skip lookup with default consumer", lambda m: cert(m, skip_consumer_lookup=True, default_consumer="x"),
     "default_consumer"),
    ("empty default consumer", lambda m: cert(m, default_consumer=""), "default_consumer"),
    ("empty anonymous", lambda m: cert(m, anonymous=""), "anonymous"),
    ("negative consumer cache", lambda m: cert(m, consumer_cache_ttl=-1), "consumer_cache_ttl"),
    ("huge cache", lambda m: cert(m, cache_size=1_000_001), "cache_size"),
    ("unknown group source", lambda m: cert(m, groups_from=["OU"]), "groups_from[1]"),
    ("unknown DN attribute", lambda m: cert(m, groups_from=["cn", "dn:NOPE"]), "groups_from[2]"),
    ("unknown forward format", lambda m: cert(m, forward_client_cert=["pem"]), "forward_client_cert[1]"),
    ("boolean as text", lambda m: cert(m, report_only="yes"), "report_only"),
    ("boolean as number", lambda m: cert(m, allow_partial_chain=1), "allow_partial_chain"),
]

API_KEY_AUTH_CASES = [
    ("no key names", {"key_names": []}, "key_names"),
    ("key name with space", {"key_names": ["api key"]}, "key_names[1]"),
    ("empty key name", {"key_names": ["apikey", ""]}, "key_names[2]"),
    ("key names as text", {"key_names": "apikey"}, "key_names"),
    ("key name ending in a newline", lambda m: {"key_names": ["apikey\n"], "credentials": [m.entry]},
     "key_names[1]"),
    ("boolean as text", {"key_in_header": "yes"}, "key_in_header"),
    ("negative cache", {"consumer_cache_ttl": -1}, "consumer_cache_ttl"),
    ("realm with quote", {"realm": 'my "realm"'}, "realm"),
    ("realm with newline", {"realm": "a\nb"}, "realm"),
    ("anonymous as number", {"anonymous": 5}, "anonymous"),
    ("credentials as text", {"credentials": "alice"}, "credentials"),
    ("credential as number", {"credentials": [5]}, "credentials[1]"),
    ("plaintext key as hash", lambda m: {"credentials": [cred(m, hash="my-secret-key")]},
     "credentials[1].hash"),
    ("unknown hash scheme", lambda m: {"credentials": [cred(m, hash=f"bcrypt:{SALT}:{MAC}")]},
     "credentials[1].hash"),
    ("short salt", lambda m: {"credentials": [cred(m, hash=f"hmac-sha256:AAAA:{MAC}")]},
     "credentials[1].hash"),
    ("short MAC", lambda m: {"credentials": [cred(m, hash=f"hmac-sha256:{SALT}:{MAC[:40]}")]},
     "credentials[1].hash"),
    ("MAC not base64url", lambda m: {"credentials": [cred(m, hash=f"hmac-sha256:{SALT}:{MAC[:-1]}=")]},
     "credentials[1].hash"),
    ("hash without MAC", lambda m: {"credentials": [cred(m, hash=f"hmac-sha256:{SALT}")]},
     "credentials[1].hash"),
    ("missing hash", lambda m: {"credentials": [cred(m, hash=None)]}, "credentials[1].hash"),
    ("missing id", lambda m: {"credentials": [cred(m, id=None)]}, "credentials[1].id"),
    ("missing consumer", lambda m: {"credentials": [cred(m, consumer=None)]}, "credentials[1].consumer"),
    ("id with a dot", lambda m: {"credentials": [cred(m, id="ak.1")]}, "credentials[1].id"),
    ("id too long", lambda m: {"credentials": [cred(m, id="a" * 65)]}, "credentials[1].id"),
    ("id ending in a newline", lambda m: {"credentials": [cred(m, id="ak_1\n")]}, "credentials[1].id"),
    ("duplicate id", lambda m: {"credentials": [m.entry, cred(m, hash=GOOD_HASH)]}, "credentials[2].id"),
    ("duplicate hash", lambda m: {"credentials": [m.entry, cred(m, id="other")]}, "credentials[2].hash"),
    ("duplicate key index", lambda m: {"credentials": [m.migrated, cred(m, id="other", key_index=m.index)],
                                       "key_index_secret": INDEX_SECRET}, "credentials[2].key_index"),
    ("migrated keys without a key_index_secret", lambda m: {"credentials": [m.migrated]}, "key_index_secret"),
    ("key_index_secret too short", lambda m: {"credentials": [m.migrated], "key_index_secret": "short"},
     "key_index_secret"),
    ("bad key index", lambda m: {"credentials": [cred(m, key_index="xyz")]}, "credentials[1].key_index"),
    ("key index ending in a newline",
     lambda m: {"credentials": [{**m.migrated, "key_index": m.index + "\n"}],
                "key_index_secret": INDEX_SECRET},
     "credentials[1].key_index"),
    ("expiry not a date", lambda m: {"credentials": [cred(m, expires_at="tomorrow")]},
     "credentials[1].expires_at"),
    ("expiry without offset", lambda m: {"credentials": [cred(m, expires_at="2030-01-01T00:00:00")]},
     "credentials[1].expires_at"),
    ("expiry month 13", lambda m: {"credentials": [cred(m, expires_at="2030-13-01T00:00:00Z")]},
     "credentials[1].expires_at"),
    ("expiry as number", lambda m: {"credentials": [cred(m, expires_at=1_900_000_000)]},
     "credentials[1].expires_at"),
    ("bad CIDR", lambda m: {"credentials": [cred(m, allowed_cidrs=["10.0.0.0/8", "10.0.0.1/8"])]},
     "credentials[1].allowed_cidrs[2]"),
    ("bad SPKI pin", lambda m: {"credentials": [cred(m, client_spki_sha256=["abc"])]},
     "credentials[1].client_spki_sha256[1]"),
    ("client_cert as text", lambda m: {"credentials": [cred(m, client_cert="yes")]},
     "credentials[1].client_cert"),
    ("second credential bad", lambda m: {"credentials": [m.entry, {"id": "b", "hash": "x", "consumer": "c"}]},
     "credentials[2].hash"),
]

UPSTREAM_IDENTITY_CASES = [
    ("no trust", {}, "trusted_ca_pem"),
    ("no trust but names", {"expected_dns_names": ["api.example"]}, "trusted_ca_pem"),
    ("not a PEM", {"trusted_ca_pem": "not a pem"}, "trusted_ca_pem"),
    ("truncated PEM", lambda m: {"trusted_ca_pem": m.root[:200] + "\n-----END CERTIFICATE-----\n"},
     "trusted_ca_pem"),
    ("private key as CA", lambda m: {"trusted_ca_pem": m.alice_key}, "trusted_ca_pem"),
    ("empty PEM", {"trusted_ca_pem": ""}, "trusted_ca_pem"),
    ("missing CA file", lambda m: {"trusted_ca_files": [m.files["missing"]]}, "trusted_ca_files[1]"),
    ("CA file is a directory", lambda m: {"trusted_ca_files": [m.files["root"], m.files["dir"]]},
     "trusted_ca_files[2]"),
    ("garbage CA file", lambda m: {"trusted_ca_files": [m.files["garbage"]]}, "trusted_ca_files[1]"),
    ("certificate without key", lambda m: up(m, client_cert_file=m.files["kong-cert"]), "client_key_file"),
    ("key without certificate", lambda m: up(m, client_key_file=m.files["kong-key"]), "client_cert_file"),
    ("key of another certificate",
     lambda m: up(m, client_cert_file=m.files["kong-cert"], client_key_file=m.files["other-key"]),
     "client_key_file"),
    ("certificate file is a key",
     lambda m: up(m, client_cert_file=m.files["kong-key"], client_key_file=m.files["kong-key"]),
     "client_cert_file"),
    ("key file is a certificate",
     lambda m: up(m, client_cert_file=m.files["kong-cert"], client_key_file=m.files["kong-cert"]),
     "client_key_file"),
    ("missing key file",
     lambda m: up(m, client_cert_file=m.files["kong-cert"], client_key_file=m.files["missing"]),
     "client_key_file"),
    ("DNS name with space", lambda m: up(m, expected_dns_names=["api example"]), "expected_dns_names[1]"),
    ("wildcard on a TLD", lambda m: up(m, expected_dns_names=["api.example", "*.com"]),
     "expected_dns_names[2]"),
    ("IDN not in punycode", lambda m: up(m, expected_dns_names=["bücher.example"]), "expected_dns_names[1]"),
    ("not a URI", lambda m: up(m, expected_uris=["payments"]), "expected_uris[1]"),
    ("SPIFFE trust domain in capitals", lambda m: up(m, expected_uris=["spiffe://Example.org/sa/api"]),
     "expected_uris[1]"),
    ("bad pin", lambda m: up(m, spki_sha256_pins=["xyz"]), "spki_sha256_pins[1]"),
    ("pin of 31 bytes", lambda m: up(m, spki_sha256_pins=[base64.b64encode(b"x" * 31).decode()]),
     "spki_sha256_pins[1]"),
    ("port 0", lambda m: up(m, host="127.0.0.1", port=0), "port"),
    ("port 65536", lambda m: up(m, host="127.0.0.1", port=65536), "port"),
    ("host with space", lambda m: up(m, host="api example"), "host"),
    ("SNI with slash", lambda m: up(m, sni="a/b"), "sni"),
    ("SNI with port", lambda m: up(m, sni="api.example:443"), "sni"),
    ("probe timeout 0", lambda m: up(m, probe_timeout=0), "probe_timeout"),
    ("probe timeout 61 s", lambda m: up(m, probe_timeout=61), "probe_timeout"),
    ("probe timeout as text", lambda m: up(m, probe_timeout="NaN"), "probe_timeout"),
    ("cache TTL 0", lambda m: up(m, cache_ttl=0), "cache_ttl"),
    ("number beyond a double", lambda m: up(m, cache_ttl=10**400), "cache_ttl"),
    ("failure TTL 0", lambda m: up(m, failure_ttl=0), "failure_ttl"),
    ("verify depth 65", lambda m: up(m, tls_verify_depth=65), "tls_verify_depth"),
    ("warning days 3651", lambda m: up(m, expiry_warning_days=3651), "expiry_warning_days"),
    ("boolean as text", lambda m: up(m, verify_hostname="no"), "verify_hostname"),
]

CLIENT_CERT_REQUEST_CASES = [
    ("boolean as text", {"disable_session_reuse": "yes"}, "disable_session_reuse"),
    ("not a record", "disable_session_reuse", "config"),
]

TABLES = {
    "ip_allowlist": IP_ALLOWLIST_CASES,
    "client_cert_auth": CLIENT_CERT_AUTH_CASES,
    "api_key_auth": API_KEY_AUTH_CASES,
    "upstream_identity": UPSTREAM_IDENTITY_CASES,
    "client_cert_request": CLIENT_CERT_REQUEST_CASES,
}
ROWS = [(module, *row) for module, rows in TABLES.items() for row in rows]


def build(config: Config) -> Any:
    return config(material()) if callable(config) else config


def refusal(module: str, config: Config) -> ConfigError:
    plugin = importlib.import_module(f"kong_mtls.kong.{module}")
    with pytest.raises(ConfigError) as info:
        plugin.Plugin(build(config))
    return info.value


@pytest.mark.parametrize(("module", "name", "config", "field"), ROWS, ids=[f"{r[0]}: {r[1]}" for r in ROWS])
def test_an_invalid_config_is_refused_naming_its_field(module, name, config, field):
    error = refusal(module, config)
    assert error.field == field, str(error)
    assert str(error).startswith(f"invalid config: {field}: ") and error.problem


def test_the_base_configs_of_the_tables_are_valid():
    """Each table changes one thing in a config that works: check that the configs do work."""
    m = material()
    for module, config in (("ip_allowlist", PEER), ("ip_allowlist", HEADER_SOURCE),
                           ("client_cert_auth", cert(m)),
                           ("api_key_auth", {"credentials": [m.entry, m.migrated],
                                             "key_index_secret": INDEX_SECRET}),
                           ("upstream_identity", up(m)), ("client_cert_request", {}),
                           ("upstream_identity", up(m, client_cert_file=m.files["kong-cert"],
                                                    client_key_file=m.files["kong-key"], host="127.0.0.1",
                                                    port=8443, sni="api.example",
                                                    expected_uris=["spiffe://example.org/sa/api"]))):
        importlib.import_module(f"kong_mtls.kong.{module}").Plugin(config)


def test_no_refusal_echoes_a_private_key_or_an_api_key_hash():
    m = material()
    with open(m.files["kong-key"]) as handle:
        secrets = [m.alice_key.splitlines()[1], handle.read().splitlines()[1]]
    for module, name, config, _ in ROWS:
        message = str(refusal(module, config))
        assert not any(secret in message for secret in secrets), (module, name)
        assert m.entry["hash"].rpartition(":")[2] not in message, (module, name)


# -- through the real plugin servers ----------------------------------------------------------------

THROUGH_SERVER = [
    (IP_ALLOWLIST, lambda m: {"allow": ["10.0.0.0/33"]}, "allow[1]"),
    (IP_ALLOWLIST, lambda m: {"source": "header", "header_name": "CF-Connecting-IP"}, "trusted_proxies"),
    (IP_ALLOWLIST, lambda m: {"allow_presets": ["nope"]}, "allow_presets[1]"),
    (CLIENT_CERT_AUTH, lambda m: {"ca_certificates": [m.alice_cert]}, "ca_certificates[1]"),
    (CLIENT_CERT_AUTH, lambda m: cert(m, skip_consumer_lookup=True, default_consumer="x"),
     "default_consumer"),
    (API_KEY_AUTH, lambda m: {"credentials": [m.entry, cred(m, id="other")]}, "credentials[2].hash"),
    (API_KEY_AUTH, lambda m: {"credentials": [cred(m, hash="plaintext")]}, "credentials[1].hash"),
    (UPSTREAM_IDENTITY, lambda m: {"trusted_ca_pem": "not a pem"}, "trusted_ca_pem"),
    (UPSTREAM_IDENTITY, lambda m: up(m, client_cert_file=m.files["kong-cert"]), "client_key_file"),
]


@pytest.mark.parametrize(("name", "config", "field"), THROUGH_SERVER,
                         ids=[f"{n}: {f}" for n, _, f in THROUGH_SERVER])
def test_a_refused_config_answers_500_and_logs_the_field(kong, plugin_server, name, config, field):
    server = plugin_server(name)
    outcome = kong.run(Request(), [(server, build(config))])
    assert_invalid_config(outcome, name, f"{field}: ")
    assert not outcome.upstream_headers.get("x-consumer-id")
    # The server survives a refused config and serves the next instance.
    assert server.proc.poll() is None

