"""Hostile input, property-based: nothing escapes a core, every refusal has a reason code, and
garbage is never let through."""

from __future__ import annotations

import base64
import functools
import re

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kong_mtls.core import api_keys, chain, identity, upstream
from kong_mtls.core.addresses import (
    MAX_HEADER_LINES,
    AddressSet,
    Policy,
    Reason,
    Source,
    parse_ip,
    parse_network,
)
from kong_mtls.kong.client_cert_auth import compile_config
from tests.harness.pki import TestPKI

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SURROGATE_BYTES = st.binary(max_size=40).map(lambda b: b.decode("utf-8", "surrogateescape"))
TEXT = st.one_of(st.text(max_size=120), SURROGATE_BYTES)


@functools.lru_cache(maxsize=1)
def world() -> dict:
    pki = TestPKI()
    alice = pki.alice
    return {
        "pki": pki,
        "alice": alice,
        "ders": [alice.cert.public_bytes(serialization.Encoding.DER),
                 *(c.public_bytes(serialization.Encoding.DER) for c in alice.intermediates)],
        "verifier": chain.ChainVerifier(chain.ChainPolicy(anchors=(pki.root.cert,)), cache_size=0),
        "authenticator": compile_config({"ca_certificates": [pki.root.cert_pem],
                                         "revocation_check_mode": "SKIP"}).authenticator,
    }


def pem_of(der: bytes) -> str:
    body = base64.encodebytes(der).decode()
    return f"-----BEGIN CERTIFICATE-----\n{body}-----END CERTIFICATE-----\n"


# -- client-cert-auth ------------------------------------------------------------------------------

@FAST
@given(st.one_of(TEXT, st.binary(max_size=3000), st.none(), st.integers(), st.lists(st.text(max_size=5))))
def test_any_chain_value_gets_a_reasoned_refusal(value):
    verdict = world()["verifier"].verify(value)
    assert not verdict.ok and isinstance(verdict.reason, chain.Reason)
    decision = world()["authenticator"].authenticate(value, lambda ref: None)
    assert not decision.allowed and decision.reason is not None and decision.mark is None


@st.composite
def mutated_chain(draw):
    """A real chain with one of: bit flips, truncation, splice, reorder, duplication."""
    ders = list(world()["ders"])
    kind = draw(st.sampled_from(["flip", "truncate", "splice", "reorder", "duplicate", "text"]))
    target = draw(st.integers(0, len(ders) - 1))
    der = bytearray(ders[target])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(0, len(der) - 1))
            der[pos] ^= 1 << draw(st.integers(0, 7))
        ders[target] = bytes(der)
    elif kind == "truncate":
        ders[target] = bytes(der[:draw(st.integers(0, len(der) - 1))])
    elif kind == "splice":
        cut = draw(st.integers(1, len(der) - 1))
        other = ders[(target + 1) % len(ders)]
        ders[target] = bytes(der[:cut]) + other[cut:]
    elif kind == "reorder":
        ders.reverse()
    elif kind == "duplicate":
        ders = [ders[0], *ders]
    pem = "".join(pem_of(d) for d in ders)
    if kind == "text":
        pos = draw(st.integers(0, len(pem) - 1))
        pem = pem[:pos] + draw(TEXT) + pem[pos:]
    return pem


@FAST
@given(mutated_chain())
def test_a_mutated_real_chain_passes_only_if_its_leaf_is_untouched(pem):
    verdict = world()["verifier"].verify(pem)
    if verdict.ok:
        # Reordering or duplicating certificates is harmless; a changed leaf never verifies.
        assert verdict.chain.leaf.public_bytes(serialization.Encoding.DER) == world()["ders"][0]
    else:
        assert isinstance(verdict.reason, chain.Reason)


@FAST
@given(st.text(max_size=200))
def test_names_and_spiffe_ids_parse_or_are_none(uri):
    parsed = identity.parse_spiffe_id(uri)
    assert parsed is None or str(parsed).startswith("spiffe://")


# -- ip-allowlist ----------------------------------------------------------------------------------

TRUSTED = AddressSet([parse_network("10.0.0.0/8"), parse_network("2001:db8::/32")])
HEADER_POLICIES = {
    "cf": Policy(Source.HEADER, trusted_proxies=TRUSTED, header_name="CF-Connecting-IP"),
    "xff": Policy(Source.HEADER, trusted_proxies=TRUSTED, header_name="X-Forwarded-For",
                  forwarded_for_hops=2),
}
ADDRESS_LIKE = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}"),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]:443"),
    st.ip_addresses(v=4).map(lambda a: f"{a}:80"),
    st.sampled_from(["fe80::1%eth0", "010.1.1.1", "1.2.3", "unknown", "_hidden", "", " ", "0x7f.1",
                     "1.2.3.4\x00"]),
    TEXT,
)
HEADER_VALUE = st.one_of(
    ADDRESS_LIKE,
    st.lists(ADDRESS_LIKE, max_size=6).map(", ".join),
    st.lists(ADDRESS_LIKE, max_size=6).map(",".join),
    st.integers(), st.none(), st.lists(TEXT, max_size=3),
)


@FAST
@given(peer=st.one_of(ADDRESS_LIKE, st.none(), st.integers()), header=HEADER_VALUE,
       policy=st.sampled_from(sorted(HEADER_POLICIES)))
def test_header_source_never_trusts_an_untrusted_peer_or_a_malformed_value(peer, header, policy):
    decision = HEADER_POLICIES[policy].decide(peer, header=header)
    assert isinstance(decision.reason, Reason)
    if decision.allowed:
        assert isinstance(peer, str) and isinstance(header, str)
        assert parse_ip(decision.peer_ip) in TRUSTED
        assert parse_ip(decision.client_ip) is not None


@FAST
@given(peer=st.ip_addresses().map(str), header=HEADER_VALUE.filter(lambda v: v is not None))
def test_an_untrusted_peer_with_any_header_is_refused(peer, header):
    assume(parse_ip(peer) not in TRUSTED)
    assert not HEADER_POLICIES["cf"].decide(peer, header=header).allowed


@FAST
@given(headers=st.one_of(
    st.dictionaries(st.text(max_size=20).map(str.lower),
                    st.one_of(st.lists(TEXT, max_size=4), TEXT, st.integers(), st.none()), max_size=8),
    st.none(), st.text(max_size=10), st.lists(st.integers(), max_size=3)))
def test_any_header_map_from_kong_is_handled(headers):
    decision = HEADER_POLICIES["xff"].decide_headers("10.1.2.3", headers)
    assert isinstance(decision.reason, Reason)


def test_a_header_map_at_kongs_limit_is_refused():
    headers = {f"x-{i}": ["v"] for i in range(MAX_HEADER_LINES - 1)}
    headers["cf-connecting-ip"] = ["203.0.113.9"]
    assert not HEADER_POLICIES["cf"].decide_headers("10.1.2.3", headers).allowed


# -- api-key-auth ----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def key_world() -> tuple[api_keys.ApiKeyAuth, str]:
    new = api_keys.generate_key()
    auth = api_keys.ApiKeyAuth.from_config({
        "key_names": ["apikey"], "key_in_header": True, "key_in_query": True, "key_in_body": True,
        "credentials": [api_keys.credential_entry(new.key, "alice", new.key_id)]})
    return auth, new.key


VALUE = st.recursive(st.one_of(TEXT, st.integers(), st.floats(allow_nan=False), st.booleans(), st.none()),
                     lambda inner: st.one_of(st.lists(inner, max_size=3),
                                             st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                     max_leaves=12)
KEY_LIKE = st.one_of(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.-0123456789", min_size=12, max_size=80),
                     st.builds(lambda s: f"ak_{s}", st.text(alphabet="0123456789abcdef", min_size=16,
                                                             max_size=16)).map(lambda k: f"{k}.{'x' * 43}"))


@FAST
@given(header=st.one_of(KEY_LIKE, VALUE), query=VALUE, body=VALUE,
       extra=st.dictionaries(st.text(max_size=10), st.lists(TEXT, max_size=2), max_size=4))
def test_random_requests_never_authenticate_and_never_echo_the_key(header, query, body, extra):
    auth, real_key = key_world()
    assume(header != real_key)
    headers = {**extra, "apikey": header if isinstance(header, list) else [header]}
    decision = auth.authenticate(
        load_headers=lambda: headers, load_query=lambda: query, load_body=lambda: body,
        load_consumer=lambda ref: {"id": "c1", "username": ref}, load_client_ip=lambda: "203.0.113.1",
        load_cert_mark=lambda: None, now=1_800_000_000.0)
    assert decision.outcome is api_keys.Outcome.REFUSED and isinstance(decision.reason, api_keys.Reason)
    if isinstance(header, str) and len(header) >= 12:
        shown = repr(decision) + decision.log_detail() + repr(decision.headers)
        secret = header.split(".", 1)[-1]
        assert not secret or len(secret) < 12 or secret not in shown


# -- upstream-identity -----------------------------------------------------------------------------

@FAST
@given(text=st.one_of(st.text(max_size=60), SURROGATE_BYTES,
                      st.tuples(st.text(max_size=10), st.text(max_size=6)).map(":".join)),
       default=st.one_of(st.none(), st.integers(1, 65535)))
def test_targets_parse_or_raise_value_error(text, default):
    try:
        target = upstream.parse_target(text, default)
    except ValueError:
        return
    assert isinstance(target.host, str) and 0 < target.port < 65536
    assert target.port == default or str(target.port) in text


@FAST
@given(dns=st.lists(TEXT, max_size=3), uris=st.lists(TEXT, max_size=3), pins=st.lists(TEXT, max_size=3),
       ca=st.one_of(st.none(), TEXT), timeout=st.floats(allow_nan=True, allow_infinity=True),
       days=st.integers(-10, 10_000))
def test_upstream_policies_build_or_name_the_problem(dns, uris, pins, ca, timeout, days):
    from kong_mtls.schema import ConfigError

    try:
        upstream.UpstreamPolicy.build(trusted_ca_pem=ca, expected_dns_names=dns, expected_uris=uris,
                                      spki_sha256_pins=pins, timeout=timeout, expiry_warning_days=days)
    except ConfigError as exc:
        assert exc.field and re.match(r"^[a-z_]", exc.field)


# -- random configs ---------------------------------------------------------------------------------

def _schema_value(spec: dict) -> st.SearchStrategy:
    kind = spec["type"]
    if "one_of" in spec:
        return st.one_of(st.sampled_from(spec["one_of"]), TEXT)
    if kind == "string":
        return st.one_of(TEXT, st.sampled_from(["10.0.0.0/8", "-----BEGIN CERTIFICATE-----\nAA==\n"]))
    if kind == "integer":
        return st.integers(-5, 100_000)
    if kind == "number":
        return st.floats(allow_nan=True)
    if kind == "boolean":
        return st.booleans()
    if kind in ("array", "set"):
        return st.lists(_schema_value(spec["elements"]), max_size=3)
    if kind == "map":
        return st.dictionaries(st.text(max_size=10), TEXT, max_size=2)
    return st.fixed_dictionaries({}, optional={name: _schema_value(sub)
                                               for item in spec["fields"] for name, sub in item.items()})


def _config_strategy(schema_fields: list) -> st.SearchStrategy:
    optional = {name: st.one_of(_schema_value(spec), VALUE)
                for item in schema_fields for name, spec in item.items()}
    return st.fixed_dictionaries({}, optional=optional)


@pytest.mark.parametrize("module", ["ip_allowlist", "client_cert_auth", "api_key_auth", "upstream_identity",
                                    "client_cert_request"])
def test_random_configs_make_a_plugin_or_a_config_error(module):
    import importlib

    from kong_mtls.schema import ConfigError

    adapter = importlib.import_module(f"kong_mtls.kong.{module}")

    @settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_config_strategy(adapter.Schema))
    def check(config):
        try:
            adapter.Plugin(config)
        except ConfigError as exc:
            assert exc.field

    check()
