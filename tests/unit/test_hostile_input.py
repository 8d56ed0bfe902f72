"""Hostile input, property-based, over every pure core and every plugin constructor.

What must hold whatever a client (or a careless config) sends:
* nothing escapes a core: every answer is a decision carrying a reason code of the core's enum;
* garbage is never let through: a mutated certificate chain passes only when every certificate of
  the verified path is byte-identical (DER) to a real one, and then as the real owner; a header
  value is used only when it is a clean address from a trusted peer; an API key authenticates only
  when the request carries a configured key verbatim and every binding holds;
* a presented API key never shows in a decision, its repr, the log detail or the upstream headers;
* a plugin config is either usable or refused with `ConfigError` naming a schema field.

Regression tests for the bugs these properties found sit next to the property that found them.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import importlib
import ipaddress
import os
import re
import tempfile
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from kong_mtls.core import api_keys, chain, identity, upstream
from kong_mtls.core.addresses import (
    MAX_HEADER_LINES,
    AddressError,
    AddressSet,
    Policy,
    Reason,
    Source,
    parse_network,
)
from kong_mtls.devpki import key_pem
from kong_mtls.kong.client_cert_auth import compile_config
from kong_mtls.kong.runtime import log_line
from kong_mtls.schema import ConfigError
from tests.harness.pki import TestPKI

#: `KONG_MTLS_FUZZ_SCALE=50` runs 50 times the examples, randomised (a bug hunt); by default the runs
#: are small and derandomised, so the suite stays fast and never flaky.
FUZZ_SCALE = int(os.environ.get("KONG_MTLS_FUZZ_SCALE", "1"))


def budget(examples: int) -> settings:
    return settings(max_examples=examples * FUZZ_SCALE, deadline=None, database=None,
                    derandomize=FUZZ_SCALE == 1,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


#: Invalid UTF-8 as the plugin server hands it to Python (msgpack `unicode_errors="surrogateescape"`).
SURROGATE_ESCAPED = st.binary(min_size=1, max_size=40).map(lambda b: b.decode("utf-8", "surrogateescape"))
ODD_TEXT = st.sampled_from(["\x00", "\r\n", "\t", " ", "\u2028", "\ufeff", "\u202e", "\x1b[2J", "\x7f",
                            "\x85", "\uff11\uff12\uff17\uff0e\uff10\uff0e\uff10\uff0e\uff11",
                            "\u0661\u0662\u0667", "\U0001d7d9", "%", "%25", "\\", '"', ",", ";", "[", "]",
                            ":"])
TEXT = st.one_of(st.text(max_size=80), SURROGATE_ESCAPED, ODD_TEXT,
                 st.lists(st.one_of(ODD_TEXT, st.text(max_size=6)), max_size=8).map("".join))
#: Anything a JSON document (or Kong's MessagePack) may hold.
JSON_VALUE = st.recursive(
    st.one_of(TEXT, st.integers(), st.floats(), st.booleans(), st.none()),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=16)


def controls(text: str) -> set[str]:
    """Characters that rewrite a terminal or a log line (C0/C1 controls, line and paragraph
    separators, bidi overrides)."""
    return {c for c in text if unicodedata.category(c) in ("Cc", "Zl", "Zp")
            or c in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"}


# ==================================================================================================
# client-cert-auth
# ==================================================================================================
class CertWorld:
    """Real certificates: alice and bob under the trusted intermediate, a stranger under another root."""

    def __init__(self) -> None:
        self.pki = pki = TestPKI()
        self.alice = pki.alice
        self.bob = pki.client("bob", dns=["bob.clients.example"])
        self.stranger = pki.unknown_ca_client()
        der = serialization.Encoding.DER
        self.alice_der = self.alice.cert.public_bytes(der)
        self.bob_der = self.bob.cert.public_bytes(der)
        self.intermediate_der = pki.intermediate.cert.public_bytes(der)
        self.root_der = pki.root.cert.public_bytes(der)
        self.stranger_der = self.stranger.cert.public_bytes(der)
        self.other_root_der = pki.other_root.cert.public_bytes(der)
        #: Leaves that verify, and the consumer each one is.
        self.owners = {self.alice_der: "alice", self.bob_der: "bob"}
        #: Every certificate a verified path may be made of.
        self.genuine = {self.alice_der, self.bob_der, self.intermediate_der, self.root_der}
        self.pool = [self.alice_der, self.bob_der, self.intermediate_der, self.root_der, self.stranger_der,
                     self.other_root_der]
        strict = {"ca_certificates": [pki.root.cert_pem], "revocation_check_mode": "SKIP"}
        self.verifier = chain.ChainVerifier(chain.ChainPolicy(anchors=(pki.root.cert,)), cache_size=0)
        self.strict = compile_config(strict).authenticator
        crl = pki.intermediate.crl().public_bytes(serialization.Encoding.PEM).decode()
        self.with_crl = compile_config({"ca_certificates": [pki.root.cert_pem],
                                        "revocation_check_mode": "STRICT", "crls": [crl]}).authenticator
        self.anonymous = compile_config({**strict, "anonymous": "nobody"}).authenticator
        self.report_only = compile_config({**strict, "report_only": True}).authenticator


@functools.lru_cache(maxsize=1)
def certs() -> CertWorld:
    return CertWorld()


CONSUMER_ROWS = {name: {"id": f"00000000-0000-4000-8000-{i:012d}", "username": name}
                 for i, name in enumerate(["alice", "bob", "stranger", "nobody"], start=1)}


def load_consumer(ref: str) -> Mapping[str, Any] | None:
    return CONSUMER_ROWS.get(ref)


def pem_block(der: bytes, *, width: int = 64, newline: str = "\n", tag: str = "CERTIFICATE") -> str:
    body = base64.b64encode(der).decode()
    lines = [body[i:i + width] for i in range(0, len(body), width)] or [""]
    return newline.join([f"-----BEGIN {tag}-----", *lines, f"-----END {tag}-----"]) + newline


def assert_refused_with_reason(decision: identity.Decision) -> None:
    assert not decision.allowed
    assert isinstance(decision.reason, chain.Reason)
    assert decision.status in (401, 500) and decision.message
    assert decision.mark is None and decision.consumer is None and decision.credential is None
    assert not decision.groups and not any(decision.headers.values())


GARBAGE_CHAIN = st.one_of(
    st.none(), st.integers(), st.floats(), st.booleans(), st.lists(TEXT, max_size=3),
    st.dictionaries(TEXT, TEXT, max_size=2), st.binary(max_size=4000), TEXT,
    # Many BEGIN lines, with or without ENDs and bodies.
    st.tuples(st.integers(0, 300), st.sampled_from(["", "AAAA\n", "-----END CERTIFICATE-----\n", "\x00"]))
    .map(lambda t: ("-----BEGIN CERTIFICATE-----\n" + t[1]) * t[0]),
    # Valid armour around random DER-ish bytes.
    st.lists(st.binary(min_size=0, max_size=600), min_size=1, max_size=4)
    .map(lambda blobs: "".join(pem_block(b) for b in blobs)),
    # Valid armour around a DER prefix that looks like a certificate (SEQUENCE, long length).
    st.binary(max_size=300).map(lambda b: pem_block(b"\x30\x82\x01\x00" + b)),
    # Over the size limit (text and bytes), and far over it.
    st.integers(chain.MAX_CHAIN_PEM_CHARS + 1, 4 * chain.MAX_CHAIN_PEM_CHARS)
    .map(lambda n: ("-----BEGIN CERTIFICATE-----\n" + "A" * n)[:n]),
    st.integers(chain.MAX_CHAIN_PEM_CHARS + 1, 2 * chain.MAX_CHAIN_PEM_CHARS).map(lambda n: b"\x00" * n),
)


@budget(250)
@given(GARBAGE_CHAIN)
def test_any_garbage_as_the_chain_is_refused_with_a_reason(value):
    world = certs()
    verdict = world.verifier.verify(value)
    assert not verdict.ok and isinstance(verdict.reason, chain.Reason)
    for authenticator in (world.strict, world.with_crl):
        decision = authenticator.authenticate(value, load_consumer)
        assert_refused_with_reason(decision)
        assert decision.status == 401
        if decision.reason is chain.Reason.NO_CERTIFICATE:
            assert decision.client_verify is None
        else:
            assert decision.client_verify == f"FAILED:{decision.reason.value}"


@budget(100)
@given(GARBAGE_CHAIN)
def test_garbage_passes_anonymous_and_report_only_configs_only_as_unverified(value):
    world = certs()
    anonymous = world.anonymous.authenticate(value, load_consumer)
    assert anonymous.allowed and anonymous.via is identity.Via.ANONYMOUS
    assert isinstance(anonymous.reason, chain.Reason) and not anonymous.verified
    assert anonymous.consumer == CONSUMER_ROWS["nobody"] and anonymous.credential is None
    assert anonymous.mark["verified"] is False and anonymous.mark["anonymous"] is True
    report = world.report_only.authenticate(value, load_consumer)
    assert report.allowed and report.via is identity.Via.REPORT_ONLY
    assert isinstance(report.reason, chain.Reason) and not report.verified and report.consumer is None
    assert report.mark["verified"] is False and report.mark["consumer_id"] is None
    for decision in (anonymous, report):
        # No certificate identity is ever forwarded for an unverified chain.
        for name in identity.CERT_HEADERS:
            assert decision.headers[name] == []


@st.composite
def mutated_chain(draw) -> str:
    """A real chain put through 1-3 mutations at the DER level, then written as PEM (possibly
    mangled too)."""
    world = certs()
    ders = [draw(st.sampled_from([world.alice_der, world.bob_der])), world.intermediate_der]
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "extend", "splice", "overwrite", "shuffle",
                                     "duplicate", "drop", "foreign"]))
        i = draw(st.integers(0, len(ders) - 1))
        der = bytearray(ders[i])
        if kind == "flip" and der:
            for _ in range(draw(st.integers(1, 6))):
                der[draw(st.integers(0, len(der) - 1))] ^= 1 << draw(st.integers(0, 7))
            ders[i] = bytes(der)
        elif kind == "truncate":
            ders[i] = bytes(der[:draw(st.integers(0, max(len(der) - 1, 0)))])
        elif kind == "extend":
            ders[i] = bytes(der) + draw(st.binary(min_size=1, max_size=64))
        elif kind == "splice":
            other = draw(st.sampled_from(world.pool))
            cut = draw(st.integers(0, min(len(der), len(other))))
            ders[i] = bytes(der[:cut]) + other[cut:]
        elif kind == "overwrite" and der:
            at = draw(st.integers(0, len(der) - 1))
            patch = draw(st.binary(min_size=1, max_size=16))
            ders[i] = bytes(der[:at]) + patch + bytes(der[at + len(patch):])
        elif kind == "shuffle":
            ders = draw(st.permutations(ders))
        elif kind == "duplicate":
            ders.insert(draw(st.integers(0, len(ders))), ders[i])
        elif kind == "drop" and len(ders) > 1:
            del ders[i]
        elif kind == "foreign":
            ders.insert(draw(st.integers(0, len(ders))), draw(st.sampled_from(world.pool)))
    width = draw(st.sampled_from([64, 76, 1, 10_000]))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    pem = "".join(pem_block(d, width=width, newline=newline) for d in ders)
    text_kind = draw(st.sampled_from(["none", "none", "insert", "delete", "replace"]))
    if text_kind != "none" and pem:
        at = draw(st.integers(0, len(pem) - 1))
        if text_kind == "insert":
            pem = pem[:at] + draw(TEXT) + pem[at:]
        elif text_kind == "delete":
            pem = pem[:at] + pem[at + draw(st.integers(1, 8)):]
        else:
            pem = pem[:at] + draw(st.sampled_from("A/+=-\n x\x00é")) + pem[at + 1:]
    return pem


def der_of(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@budget(400)
@given(mutated_chain())
def test_a_mutated_real_chain_passes_only_when_every_certificate_is_genuine(pem):
    world = certs()
    verdict = world.verifier.verify(pem)
    if not verdict.ok:
        assert isinstance(verdict.reason, chain.Reason)
    else:
        path = [der_of(c) for c in verdict.chain.path]
        assert path[0] in world.owners, "a mutated leaf verified"
        assert set(path) <= world.genuine, "a mutated CA certificate ended up in a verified path"
    for authenticator in (world.strict, world.with_crl):
        decision = authenticator.authenticate(pem, load_consumer)
        event(f"allowed={decision.allowed} reason={decision.reason}")
        if not decision.allowed:
            assert_refused_with_reason(decision)
            continue
        leaf = der_of(decision.chain.leaf)
        # Authenticated as the genuine owner of a byte-identical genuine leaf, and as nobody else.
        assert leaf in world.owners
        assert decision.consumer == CONSUMER_ROWS[world.owners[leaf]]
        assert decision.verified and decision.reason is None and decision.mark["verified"] is True
        assert {der_of(c) for c in decision.chain.path} <= world.genuine
        assert verdict.ok and der_of(verdict.chain.leaf) == leaf


@budget(60)
@given(mutated_chain())
def test_a_cached_verdict_never_differs_from_a_fresh_one(pem):
    """Caches are keyed by the presented text: asking twice, or after other chains, changes nothing."""
    world = certs()
    first = world.strict.authenticate(pem, load_consumer)
    world.strict.authenticate(world.alice.chain_pem, load_consumer)
    again = world.strict.authenticate(pem, load_consumer)
    fresh = world.verifier.verify(pem)
    assert (first.allowed, first.reason) == (again.allowed, again.reason)
    assert first.allowed == fresh.ok


def test_the_genuine_chains_do_pass():
    """The properties above would hold vacuously if nothing passed."""
    world = certs()
    for issued, owner in ((world.alice, "alice"), (world.bob, "bob")):
        decision = world.strict.authenticate(issued.chain_pem, load_consumer)
        assert decision.allowed and decision.consumer == CONSUMER_ROWS[owner]
    assert not world.strict.authenticate(world.stranger.chain_pem, load_consumer).allowed


ASCII_TEXT = st.text(st.characters(max_codepoint=127), min_size=1, max_size=40)


@st.composite
def hostile_names(draw) -> dict[str, Any]:
    return {
        "cn": draw(st.one_of(st.text(min_size=1, max_size=64), ODD_TEXT)),
        "ous": draw(st.lists(st.one_of(st.text(min_size=1, max_size=64), ODD_TEXT), max_size=3)),
        "dns": draw(st.lists(ASCII_TEXT, max_size=2)),
        "uris": draw(st.lists(st.one_of(ASCII_TEXT, ASCII_TEXT.map(lambda s: "spiffe://td/" + s)),
                              max_size=2)),
        "emails": draw(st.lists(ASCII_TEXT, max_size=1)),
    }


@functools.lru_cache(maxsize=1)
def name_world() -> tuple[Any, Any, Any]:
    world = certs()
    base = {"ca_certificates": [world.pki.root.cert_pem], "revocation_check_mode": "SKIP",
            "groups_from": ["mapping", "cn", "dn", "dn:OU", "spiffe_id", "spiffe_trust_domain",
                            "spiffe_path"],
            "forward_client_cert": ["rfc9440", "xfcc"],
            "name_sources": ["uri", "dns", "email", "ip", "cn", "dn"]}
    accept_all = compile_config({**base, "skip_consumer_lookup": True}).authenticator
    by_name = compile_config({**base, "consumer_by": ["username", "id"]}).authenticator
    return world, accept_all, by_name


def _issue(authority, names: Mapping[str, Any]):
    try:
        return authority.client(names["cn"], dns=names["dns"], uris=names["uris"], emails=names["emails"],
                                organizational_units=names["ous"])
    except ValueError:  # cryptography refuses to encode it: no such certificate can be presented
        return None


def header_safe(value: Any) -> bool:
    return value == [] or (isinstance(value, str) and value.isascii() and value.isprintable())


@budget(120)
@given(hostile_names())
def test_a_verified_certificate_with_hostile_names_gives_only_safe_headers_and_groups(names):
    """A trusted CA may sign whatever names a requester asked for: what reaches the upstream is still
    printable ASCII header text, and groups are printable."""
    world, accept_all, by_name = name_world()
    issued = _issue(world.pki.intermediate, names)
    assume(issued is not None)
    decision = accept_all.authenticate(issued.chain_pem, load_consumer)
    assert decision.allowed and decision.via is identity.Via.SKIP_CONSUMER_LOOKUP
    for name, value in decision.headers.items():
        assert header_safe(value), (name, value)
    assert all(g.isprintable() and 0 < len(g) <= 256 for g in decision.groups)
    named = by_name.authenticate(issued.chain_pem, lambda ref: None)
    assert not named.allowed and named.reason is chain.Reason.NO_CONSUMER


@budget(80)
@given(hostile_names())
def test_an_unverified_certificate_with_hostile_names_is_refused_with_a_reason(names):
    world, _, _ = name_world()
    issued = _issue(world.pki.other_root, names)
    assume(issued is not None)
    decision = world.strict.authenticate(issued.chain_pem, load_consumer)
    assert_refused_with_reason(decision)
    assert decision.reason is chain.Reason.UNKNOWN_CA


def test_the_refusal_log_line_of_an_unverified_certificate_has_no_control_characters():
    """The subject of an unverified certificate is the client's to choose; it is logged escaped."""
    world = certs()
    evil = world.pki.other_root.client("evil\x1b[2J\x1b[1;31mFAKE\u2028x\x85y\u202e")
    decision = world.strict.authenticate(evil.chain_pem, load_consumer)
    assert not decision.allowed
    line = log_line("client-cert-auth", "refused", status=decision.status, reason=decision.reason.value,
                    detail=decision.detail)
    assert not controls(line), sorted(controls(line))


LOG_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def test_a_certificate_subject_cannot_forge_log_fields():
    """Quotes in a field are escaped: `CN=x" reason=OK status=200` stays inside `detail`."""
    world = certs()
    evil = world.pki.other_root.client('x" reason=OK status=200 detail="')
    decision = world.strict.authenticate(evil.chain_pem, load_consumer)
    line = log_line("client-cert-auth", "refused", status=decision.status, reason=decision.reason.value,
                    detail=decision.detail)
    fields = LOG_FIELD.findall(line)
    assert [name for name, _ in fields] == ["status", "reason", "detail"], line
    assert dict(fields)["reason"] == decision.reason.value
    # Any value a client chooses (a header, a SAN, a key id) is logged the same way.
    raw = log_line("ip-allowlist", "refused", reason="IP_NOT_ALLOWED", detail='1.2.3.4" reason=OK x="')
    assert [name for name, _ in LOG_FIELD.findall(raw)] == ["reason", "detail"], raw


def test_the_certificate_count_limit_holds_for_standard_pem():
    world = certs()
    too_many = world.alice.cert_pem + world.pki.intermediate.cert_pem * chain.MAX_CHAIN_CERTIFICATES
    verdict = world.verifier.verify(too_many)
    assert verdict.reason is chain.Reason.CHAIN_TOO_LARGE


def test_the_certificate_count_limit_cannot_be_bypassed_with_the_x509_certificate_tag():
    """cryptography also reads `X509 CERTIFICATE` blocks: they count towards the limit too."""
    world = certs()
    alternate = pem_block(world.intermediate_der, tag="X509 CERTIFICATE")
    chain_text = world.alice.cert_pem + alternate * 60
    assert len(chain_text) <= chain.MAX_CHAIN_PEM_CHARS
    verdict = world.verifier.verify(chain_text)
    assert verdict.reason is chain.Reason.CHAIN_TOO_LARGE, verdict


SPIFFE_PARTS = st.sampled_from(["spiffe://", "example.org", "/", "a", ".", "..", "\n", "%", "A", "?", "#",
                                ":443", "@", "-", "_"])


@budget(150)
@given(st.one_of(st.text(max_size=120), SURROGATE_ESCAPED,
                 st.lists(st.one_of(SPIFFE_PARTS, TEXT), max_size=8).map("".join)))
def test_spiffe_ids_parse_to_themselves_or_to_none(uri):
    parsed = identity.parse_spiffe_id(uri)
    if parsed is None:
        return
    assert str(parsed) == uri
    assert re.fullmatch(r"[a-z0-9._-]+", parsed.trust_domain)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", s) and s not in (".", "..") for s in parsed.segments)


@pytest.mark.parametrize("uri", ["spiffe://example.org\n", "spiffe://example.org/ns/payments\n",
                                 "spiffe://example.org\n/ns"])
def test_a_spiffe_id_with_a_trailing_newline_is_not_one(uri):
    """(`$` in a regex also matches before a final newline.)"""
    assert identity.parse_spiffe_id(uri) is None


# ==================================================================================================
# ip-allowlist
# ==================================================================================================
TRUSTED = ["10.0.0.0/8", "192.0.2.1", "2001:db8::/32"]
ALLOW = ["203.0.113.0/24", "198.51.100.0/24", "2001:db8:1::/48", "10.20.0.0/16"]
DENY = ["203.0.113.66", "198.51.100.0/25"]


def _set(cidrs: Iterable[str]) -> AddressSet:
    return AddressSet([parse_network(c) for c in cidrs])


def _nets(cidrs: Iterable[str]) -> list:
    return [ipaddress.ip_network(c) for c in cidrs]


POLICIES = {
    "cf": Policy(Source.HEADER, allow=_set(ALLOW), deny=_set(DENY), trusted_proxies=_set(TRUSTED),
                 header_name="CF-Connecting-IP"),
    "cf-open-peers": Policy(Source.HEADER, allow=_set(ALLOW), trusted_proxies=_set(TRUSTED),
                            header_name="CF-Connecting-IP", require_trusted_peer=False),
    "xff1": Policy(Source.HEADER, allow=_set(ALLOW), deny=_set(DENY), trusted_proxies=_set(TRUSTED),
                   header_name="X-Forwarded-For"),
    "xff2": Policy(Source.HEADER, allow=_set(ALLOW), trusted_proxies=_set(TRUSTED),
                   header_name="X-Forwarded-For", forwarded_for_hops=2),
    "xff3": Policy(Source.HEADER, deny=_set(DENY), trusted_proxies=_set(TRUSTED),
                   header_name="x-forwarded-for", forwarded_for_hops=3),
}
TRUSTED_PEERS = ["10.1.2.3", "::ffff:10.9.9.9", "192.0.2.1", "2001:db8::5", "::ffff:a01:203"]
UNTRUSTED_PEERS = ["192.0.2.2", "8.8.8.8", "2001:db9::1", "203.0.113.7", "::1", "127.0.0.1"]
SOME_ADDRESSES = ["203.0.113.7", "203.0.113.66", "198.51.100.1", "198.51.100.200", "10.20.1.1", "10.1.2.3",
                  "192.0.2.1", "8.8.8.8", "2001:db8:1::7", "2001:db8::9", "2001:db9::1", "::1", "0.0.0.0",
                  "::"]
FULLWIDTH_DIGITS = str.maketrans("0123456789", "".join(chr(0xFF10 + i) for i in range(10)))


@st.composite
def address_element(draw) -> str:
    """One element of a proxy header, as clean or as crooked as clients and proxies write them."""
    address = draw(st.one_of(st.sampled_from(SOME_ADDRESSES), st.ip_addresses().map(str)))
    ip = ipaddress.ip_address(address)
    forms = [address, f" {address}", f"{address}\t", address.upper()]
    if ip.version == 4:
        octets = address.split(".")
        forms += [f"{address}:{draw(st.integers(0, 99999))}", f"::ffff:{address}", f"[::ffff:{address}]:443",
                  ".".join(o.zfill(3) for o in octets), "0x" + ip.packed.hex(), str(int(ip)),
                  ".".join(octets[:3]),
                  f"{address}/32", f"{address}.", f"{address}\x00", f"\x00{address}", f"{address}\r\nX-A: b"]
    else:
        forms += [f"[{address}]", f"[{address}]:{draw(st.integers(0, 99999))}", f"{address}%eth0",
                  f"[{address}%25eth0]:80", f"[{address}", f"{address}]", ip.exploded, f"[{ip.exploded}]:1"]
    form = draw(st.sampled_from(forms))
    return form.translate(FULLWIDTH_DIGITS) if draw(st.integers(0, 9)) == 0 else form


ELEMENT = st.one_of(address_element(), address_element(), TEXT, st.sampled_from(["", "unknown", "_hidden"]))
HEADER_VALUE = st.one_of(
    ELEMENT,
    st.tuples(st.lists(ELEMENT, min_size=1, max_size=6), st.sampled_from([", ", ",", " , ", ",\t", ";"]))
    .map(lambda t: t[1].join(t[0])),
    st.tuples(ELEMENT, st.integers(10, 3000)).map(lambda t: ", ".join([t[0]] * t[1])),  # very long
    st.integers(100_000, 1_000_000).map(lambda n: "1" * n),
    st.none(), st.integers(), st.lists(TEXT, max_size=3), st.binary(max_size=20),
)


@st.composite
def peers(draw) -> Any:
    """Mostly real peers (trusted and not), sometimes anything."""
    choice = draw(st.integers(0, 9))
    if choice < 6:
        return draw(st.sampled_from(TRUSTED_PEERS + UNTRUSTED_PEERS))
    if choice < 9:
        return draw(ELEMENT)
    return draw(st.one_of(st.none(), st.integers()))


PEER = peers()


def oracle_address(element: str):
    """An independent, strict reading of one proxy-header element (after trimming spaces and tabs):
    `v4`, `v4:port`, `v6`, `[v6]`, `[v6]:port`; IPv4-mapped IPv6 read as IPv4. None otherwise."""
    text = element.strip(" \t")
    if not re.fullmatch(r"[0-9A-Fa-f:.\[\]]+", text):
        return None
    bracketed = re.fullmatch(r"\[([^\]]*)\](?::([0-9]{1,5}))?", text)
    port = None
    if bracketed:
        host, port = bracketed.group(1), bracketed.group(2)
        if ":" not in host:
            return None
    elif text.count(":") == 1:
        host, port = text.split(":")
        if not re.fullmatch(r"[0-9]{1,5}", port):
            return None
    else:
        host = text
    if port is not None and not 0 < int(port) <= 65535:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.version == 4 and str(ip) != host:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def oracle_peer(peer: Any):
    """The peer as nginx's `$realip_remote_addr` holds it: a bare IP literal, nothing around it."""
    if not isinstance(peer, str) or not re.fullmatch(r"[0-9A-Fa-f:.]+", peer):
        return None
    try:
        ip = ipaddress.ip_address(peer)
    except ValueError:
        return None
    if ip.version == 4:
        return ip if str(ip) == peer else None
    return ip.ipv4_mapped or ip


def peer_is_trusted(peer: Any) -> bool:
    ip = oracle_peer(peer)
    return ip is not None and in_any(ip, TRUSTED)


def in_any(ip, cidrs: Iterable[str]) -> bool:
    return any(ip in net for net in _nets(cidrs) if net.version == ip.version)


def check_address_decision(policy: Policy, peer: Any, header: Any, decision) -> None:
    event(f"reason={decision.reason.value}")
    assert isinstance(decision.reason, Reason)
    assert decision.allowed == (decision.reason is Reason.ALLOWED)
    if not decision.allowed:
        assert decision.detail
        return
    assert isinstance(peer, str)
    client = ipaddress.ip_address(decision.client_ip)
    assert str(client) == decision.client_ip
    if not peer_is_trusted(peer):
        # An untrusted peer's header is never used: only the peer itself, and only when allowed to be.
        assert header is None and not policy.require_trusted_peer
        assert client == oracle_peer(peer)
    else:
        assert isinstance(header, str)
        hops = policy.forwarded_for_hops
        elements = header.split(",") if policy.header_is_list else [header]
        assert len(elements) >= hops
        used = [oracle_address(e) for e in elements[-hops:]]
        assert None not in used, f"a malformed element was used: {elements[-hops:]!r}"
        assert used[0] == client
        assert all(in_any(proxy, TRUSTED) for proxy in used[1:])
    assert not in_any(client, DENY if policy.deny else [])
    if policy.allow:
        assert in_any(client, ALLOW)


@budget(600)
@given(name=st.sampled_from(sorted(POLICIES)), peer=PEER, header=HEADER_VALUE)
def test_a_header_is_used_only_from_a_trusted_peer_and_only_when_clean(name, peer, header):
    policy = POLICIES[name]
    decision = policy.decide(peer, header=header)
    check_address_decision(policy, peer, header, decision)
    if oracle_peer(peer) is not None and not peer_is_trusted(peer) and header is not None:
        assert decision.reason is Reason.UNTRUSTED_PEER_HEADER


DIRECT_POLICIES = {
    "peer": Policy(Source.PEER, allow=_set(ALLOW), deny=_set(DENY)),
    "forwarded": Policy(Source.FORWARDED, allow=_set(ALLOW), deny=_set(DENY)),
    "peer-deny-only": Policy(Source.PEER, deny=_set(DENY)),
}


@budget(300)
@given(name=st.sampled_from(sorted(DIRECT_POLICIES)), peer=PEER,
       forwarded=st.one_of(st.sampled_from(SOME_ADDRESSES), ELEMENT, st.none(), st.integers()))
def test_peer_and_forwarded_sources_check_exactly_the_address_kong_gives(name, peer, forwarded):
    """Kong's own values (`$realip_remote_addr`, `get_forwarded_ip()`) are used only when they are
    bare IP literals, and then exactly."""
    policy = DIRECT_POLICIES[name]
    decision = policy.decide(peer, forwarded=forwarded)
    event(f"reason={decision.reason.value}")
    assert isinstance(decision.reason, Reason)
    if not decision.allowed:
        return
    used = oracle_peer(peer if policy.source is Source.PEER else forwarded)
    assert used is not None and ipaddress.ip_address(decision.client_ip) == used
    assert not in_any(used, DENY)
    if policy.allow:
        assert in_any(used, ALLOW)


@st.composite
def proxied_list(draw) -> str:
    """What a client wrote, then the client's address, then what each proxy appended (mostly trusted
    addresses, sometimes crooked)."""
    written = draw(st.lists(ELEMENT, max_size=2))
    client = draw(st.one_of(st.sampled_from(SOME_ADDRESSES), address_element()))
    proxy = st.one_of(st.sampled_from(["10.0.0.1", "192.0.2.1", "2001:db8::1", "[2001:db8::2]:80",
                                       "10.1.1.1:8080"]), address_element())
    proxies = draw(st.lists(proxy, max_size=3))
    return draw(st.sampled_from([", ", ","])).join([*written, client, *proxies])


@budget(300)
@given(name=st.sampled_from(sorted(POLICIES)), peer=st.sampled_from(TRUSTED_PEERS), header=proxied_list())
def test_clean_lists_from_a_trusted_peer_are_judged_by_their_rightmost_hops(name, peer, header):
    """The same property where passes are common (mostly well-formed lists)."""
    policy = POLICIES[name]
    check_address_decision(policy, peer, header, policy.decide(peer, header=header))


@st.composite
def header_map(draw) -> Any:
    name = draw(st.sampled_from(["x-forwarded-for", "cf-connecting-ip"]))
    plain = st.sampled_from([*SOME_ADDRESSES, "10.0.0.1", "192.0.2.1"])
    lines = draw(st.lists(st.one_of(plain, address_element(), ELEMENT), max_size=4))
    headers: dict[Any, Any] = draw(st.dictionaries(st.text(max_size=12).map(str.lower),
                                                   st.one_of(st.lists(TEXT, max_size=3), TEXT), max_size=5))
    shape = draw(st.sampled_from(["lines", "string", "odd", "absent"]))
    if shape == "lines":
        headers[name] = lines
    elif shape == "string":
        headers[name] = ", ".join(lines)
    elif shape == "odd":
        headers[name] = draw(st.one_of(st.integers(), st.lists(st.integers(), max_size=2), st.none(),
                                       st.dictionaries(TEXT, TEXT, max_size=2), st.just([])))
    if draw(st.integers(0, 4)) == 0:
        return draw(st.one_of(st.none(), st.integers(), TEXT, st.lists(TEXT, max_size=2)))
    return headers


@budget(300)
@given(name=st.sampled_from(sorted(POLICIES)), peer=PEER, headers=header_map())
def test_kongs_header_maps_of_any_shape_are_judged_like_the_joined_header(name, peer, headers):
    policy = POLICIES[name]
    decision = policy.decide_headers(peer, headers)
    assert isinstance(decision.reason, Reason)
    if not decision.allowed:
        return
    assert isinstance(headers, Mapping)
    value = headers.get(policy.header_name.lower())
    joined = ", ".join(value) if isinstance(value, list) else value
    assert isinstance(joined, str) or (joined is None and not policy.require_trusted_peer)
    check_address_decision(policy, peer, joined, decision)


@budget(30)
@given(extra=st.integers(0, 50), peer=st.sampled_from(TRUSTED_PEERS))
def test_a_header_map_that_may_have_been_cut_is_refused(extra, peer):
    headers: dict[str, Any] = {"x-forwarded-for": ["203.0.113.7"]}
    headers.update({f"x-filler-{i}": ["v"] for i in range(MAX_HEADER_LINES - 1 + extra)})
    decision = POLICIES["xff1"].decide_headers(peer, headers)
    assert decision.reason is Reason.HEADER_MALFORMED


@budget(300)
@given(st.one_of(TEXT, st.tuples(address_element(), st.integers(-5, 200)).map(lambda t: f"{t[0]}/{t[1]}"),
                 st.none(), st.integers(), st.lists(TEXT, max_size=2)))
def test_config_cidrs_parse_to_exactly_their_addresses_or_raise_address_error(text):
    try:
        network = parse_network(text)
    except AddressError:
        return
    assert isinstance(text, str) and re.fullmatch(r"[0-9A-Fa-f:./]+", text)
    host = text.split("/")[0]
    expected = ipaddress.ip_address(host)
    if expected.version == 6 and expected.ipv4_mapped is not None and network.version == 4:
        expected = expected.ipv4_mapped
    assert network.network_address == expected  # no host bits were silently dropped


# ==================================================================================================
# api-key-auth
# ==================================================================================================
NOW = 1_800_000_000.0
EXPIRED_AT = "2020-01-01T00:00:00Z"



HOSTILE_INDEX_SECRET = "hostile-index-secret"

class KeyWorld:
    def __init__(self) -> None:
        pki = certs().pki
        self.spki = chain.spki_sha256(pki.alice.cert)
        names = ("alice", "carol", "dave", "erin", "frank", "ghost")
        made = {name: api_keys.generate_key() for name in names}
        legacy = "legacy-" + base64.urlsafe_b64encode(os.urandom(24)).decode()
        self.keys: dict[str, str] = {name: new.key for name, new in made.items()}
        self.keys["bob"] = legacy
        entries = [
            api_keys.credential_entry(made["alice"].key, "alice", made["alice"].key_id),
            api_keys.credential_entry(legacy, "bob", "legacy-bob", index_secret=HOSTILE_INDEX_SECRET),
            api_keys.credential_entry(made["carol"].key, "carol", made["carol"].key_id,
                                      expires_at=EXPIRED_AT),
            api_keys.credential_entry(made["dave"].key, "dave", made["dave"].key_id,
                                      allowed_cidrs=["10.0.0.0/8"]),
            api_keys.credential_entry(made["erin"].key, "erin", made["erin"].key_id, client_cert=True),
            api_keys.credential_entry(made["frank"].key, "frank", made["frank"].key_id,
                                      client_spki_sha256=[self.spki]),
            api_keys.credential_entry(made["ghost"].key, "ghost", made["ghost"].key_id),  # no such consumer
        ]
        self.owner_of_id = {e["id"]: e["consumer"] for e in entries}
        self.key_names = ("apikey", "x_api_key")
        config = {"key_names": list(self.key_names), "key_in_header": True, "key_in_query": True,
                  "key_in_body": True, "credentials": entries, "key_index_secret": HOSTILE_INDEX_SECRET}
        self.strict = api_keys.ApiKeyAuth.from_config(config)
        self.hiding = api_keys.ApiKeyAuth.from_config({**config, "hide_credentials": True})
        self.anonymous = api_keys.ApiKeyAuth.from_config({**config, "anonymous": "nobody"})
        self.rows = {name: {"id": f"id-{name}", "username": name}
                     for name in ("alice", "bob", "carol", "dave", "erin", "frank", "nobody")}


@functools.lru_cache(maxsize=1)
def keys() -> KeyWorld:
    return KeyWorld()


def mutate_key(key: str, draw) -> str:
    kind = draw(st.sampled_from(["flip", "truncate", "append", "upper", "spaces", "bearer", "id-only", "nul",
                                 "surrogate", "swap-id", "double"]))
    at = draw(st.integers(0, len(key) - 1))
    if kind == "flip":
        return key[:at] + chr(ord(key[at]) ^ 1) + key[at + 1:]
    if kind == "truncate":
        return key[:at]
    if kind == "append":
        return key + draw(st.text(min_size=1, max_size=3))
    if kind == "upper":
        return key.swapcase()
    if kind == "spaces":
        return f" {key} "
    if kind == "bearer":
        return f"Bearer {key}"
    if kind == "id-only":
        return key.partition(".")[0] + "."
    if kind == "nul":
        return key[:at] + "\x00" + key[at:]
    if kind == "surrogate":
        return key + "\udcff"
    if kind == "swap-id":
        other = draw(st.sampled_from(sorted(keys().keys.values())))
        return key.partition(".")[0] + "." + other.partition(".")[2]
    return key + key


@st.composite
def presented_value(draw) -> Any:
    world = keys()
    real = draw(st.sampled_from(sorted(world.keys.values())))
    kind = draw(st.sampled_from(["real", "mutated", "mutated", "text", "huge"]))
    if kind == "real":
        text = real
    elif kind == "mutated":
        text = mutate_key(real, draw)
    elif kind == "text":
        text = draw(TEXT)
    else:
        text = "k" * draw(st.integers(1025, 5000))
    shape = draw(st.sampled_from(["str", "list1", "list2", "odd"]))
    if shape == "str":
        return text
    if shape == "list1":
        return [text]
    if shape == "list2":
        return [text, draw(st.one_of(st.just(real), TEXT))]
    return draw(st.one_of(st.integers(), st.floats(), st.booleans(), st.just([]),
                          st.lists(st.integers(), max_size=2), st.dictionaries(TEXT, TEXT, max_size=2),
                          st.just({"apikey": real})))


NAME_VARIANTS = ["apikey", "APIKEY", "x_api_key", "x-api-key", "X-Api-Key", "api-key", "apikey ", "key"]


@st.composite
def request_parts(draw) -> dict[str, Any]:
    def place() -> Any:
        shape = draw(st.sampled_from(["map", "map", "map", "odd"]))
        if shape == "odd":
            return draw(st.one_of(st.none(), st.integers(), TEXT, st.just([]), JSON_VALUE))
        out: dict[Any, Any] = draw(st.dictionaries(TEXT, JSON_VALUE, max_size=3))
        for name in draw(st.lists(st.sampled_from(NAME_VARIANTS), max_size=3)):
            out[name] = draw(presented_value())
        return out

    world = keys()
    parts = {"headers": place(), "query": place(), "body": place()}
    if draw(st.integers(0, 2)) == 0:
        # One genuine key where key-auth looks first, so that passes are common enough to check.
        owner = draw(st.sampled_from(sorted(world.keys)))
        where = draw(st.sampled_from(["headers", "query", "body"]))
        value = world.keys[owner] if where == "body" else [world.keys[owner]]
        parts[where] = {draw(st.sampled_from(["apikey", "x_api_key"])): value}
    return {
        **parts,
        "client_ip": draw(st.one_of(
            st.sampled_from(["10.1.2.3", "::ffff:10.0.0.9", "192.0.2.1", "010.1.2.3"]),
            st.sampled_from(["10.1.2.3", "::ffff:10.0.0.9", "192.0.2.1", "010.1.2.3"]),
            st.none(), TEXT, st.integers())),
        "cert_mark": draw(st.one_of(
            st.none(), TEXT, st.just([]),
            st.fixed_dictionaries({"verified": st.just(True), "anonymous": st.just(False),
                                   "consumer_id": st.sampled_from(["id-erin", "id-frank"]),
                                   "spki_sha256": st.just(world.spki)}),
            st.fixed_dictionaries({"verified": st.sampled_from([True, "true", 1, False]),
                                   "anonymous": st.sampled_from([False, True, None]),
                                   "consumer_id": st.sampled_from(["id-erin", "id-frank", "id-alice", None,
                                                                   5]),
                                   "spki_sha256": st.sampled_from([world.spki, world.spki.upper(), "0" * 64,
                                                                   None])}),
        )),
        "consumer_rows": draw(st.sampled_from(["normal", "normal", "broken"])),
    }


def run_keys(auth: api_keys.ApiKeyAuth, parts: Mapping[str, Any]) -> api_keys.Decision:
    world = keys()

    def consumer(ref: str) -> Any:
        if parts["consumer_rows"] == "broken":
            return {"username": ref}  # a row without an id is no consumer
        return world.rows.get(ref)

    return auth.authenticate(load_headers=lambda: parts["headers"], load_query=lambda: parts["query"],
                             load_body=lambda: parts["body"], load_consumer=consumer,
                             load_client_ip=lambda: parts["client_ip"],
                             load_cert_mark=lambda: parts["cert_mark"], now=NOW)


def strings_in(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from strings_in(k)
            yield from strings_in(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from strings_in(v)


def presented_at_top_level(parts: Mapping[str, Any], key: str) -> bool:
    """Is `key` the value (or the single list element) of a key-name entry somewhere?"""
    for place in ("headers", "query", "body"):
        mapping = parts[place]
        if not isinstance(mapping, Mapping):
            continue
        for name, value in mapping.items():
            if not isinstance(name, str) or name.lower().replace("-", "_") not in keys().key_names:
                continue
            if value == key or value == [key]:
                return True
    return False


def shown(decision: api_keys.Decision) -> str:
    """Everything a decision exposes except the hide_credentials rewrite (which forwards what the
    client sent under other names)."""
    without_rewrite = api_keys.Decision(decision.outcome, decision.reason, decision.status,
                                        decision.message, decision.headers, decision.credential,
                                        decision.consumer, decision.source)
    return " ".join([repr(without_rewrite), decision.log_detail(), repr(api_keys.upstream_headers(decision)),
                     repr(api_keys.pass_mark(decision)), repr(api_keys.kong_credential(decision)),
                     decision.message, repr(dict(decision.headers))])


def secrets_presented(parts: Mapping[str, Any]) -> set[str]:
    """Strings of the request long enough to be keys, and the secret half of each."""
    out = set()
    for place in ("headers", "query", "body"):
        for text in strings_in(parts[place]):
            if len(text) >= 24:
                out.add(text)
                secret = text.partition(".")[2]
                if len(secret) >= 24:
                    out.add(secret)
    return out


@budget(300)
@given(request_parts(), st.sampled_from(["strict", "hiding", "anonymous"]))
def test_a_key_authenticates_only_verbatim_and_with_every_binding_held(parts, which):
    world = keys()
    auth = getattr(world, which)
    decision = run_keys(auth, parts)
    event(f"{decision.outcome.value} {decision.reason.value if decision.reason else ''}")
    assert isinstance(decision.outcome, api_keys.Outcome)
    if decision.outcome is api_keys.Outcome.REFUSED:
        assert isinstance(decision.reason, api_keys.Reason) and decision.status in (401, 500)
        assert decision.consumer is None
    elif decision.outcome is api_keys.Outcome.ANONYMOUS:
        assert which == "anonymous" and isinstance(decision.reason, api_keys.Reason)
        assert decision.consumer == world.rows["nobody"] and api_keys.kong_credential(decision) is None
    else:
        credential = decision.credential
        owner = world.owner_of_id[credential.key_id]
        real = world.keys[owner]
        assert presented_at_top_level(parts, real), "authenticated without the configured key verbatim"
        assert decision.consumer == world.rows[owner] and parts["consumer_rows"] == "normal"
        assert owner not in ("carol", "ghost")  # expired; consumer missing
        if owner == "dave":
            client_ip = ipaddress.ip_address(str(parts["client_ip"]).replace("::ffff:", ""))
            assert client_ip in ipaddress.ip_network("10.0.0.0/8")
        if owner in ("erin", "frank"):
            mark = parts["cert_mark"]
            assert mark["verified"] is True and mark["anonymous"] is not True
            if owner == "erin":
                assert mark["consumer_id"] == "id-erin"
            else:
                assert mark["spki_sha256"].lower() == world.spki
    text = shown(decision)
    for secret in secrets_presented(parts):
        assert secret not in text, "a presented key shows in the decision"


def test_the_real_keys_do_authenticate():
    """The property above would hold vacuously if nothing passed."""
    world = keys()
    for owner in ("alice", "bob"):
        parts = {"headers": {"apikey": [world.keys[owner]]}, "query": {}, "body": {}, "client_ip": None,
                 "cert_mark": None, "consumer_rows": "normal"}
        decision = run_keys(world.strict, parts)
        assert decision.outcome is api_keys.Outcome.AUTHENTICATED and decision.consumer == world.rows[owner]
        assert world.keys[owner] not in shown(decision)
        assert world.keys[owner].rpartition(".")[2] not in shown(decision)


@budget(200)
@given(st.one_of(TEXT, st.integers(1020, 1030).map(lambda n: "a" * n), SURROGATE_ESCAPED))
def test_any_presented_key_is_matched_without_raising(key):
    match = keys().strict.credentials.match(key)
    assert match.reason in (api_keys.Reason.MALFORMED_KEY, api_keys.Reason.UNKNOWN_KEY,
                            api_keys.Reason.WRONG_SECRET, None)
    assert match.reason is not None or key in keys().keys.values()


# ==================================================================================================
# upstream-identity
# ==================================================================================================
class Files:
    """Files a config may point at, written at test time."""

    def __init__(self) -> None:
        pki = certs().pki
        self.dir = tempfile.mkdtemp(prefix="kong-mtls-hostile-")
        kong_client = pki.intermediate.client("kong", dns=["kong.example"])
        other_key = ec.generate_private_key(ec.SECP256R1())
        self.paths = {
            "ca": self._write("ca.pem", pki.root.cert_pem),
            "garbage": self._write("garbage.pem", pem_block(b"nope")),
            "empty": self._write("empty.pem", ""),
            "cert": self._write("kong.pem", kong_client.cert_pem),
            "key": self._write("kong.key", kong_client.key_pem),
            "other-key": self._write("other.key", key_pem(other_key)),
            "dir": self.dir,
            "missing": os.path.join(self.dir, "missing.pem"),
        }

    def _write(self, name: str, text: str) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as handle:
            handle.write(text)
        return path


@functools.lru_cache(maxsize=1)
def files() -> Files:
    return Files()


def key_secret_line() -> str:
    """A line of the base64 body of a private key written for the tests."""
    with open(files().paths["key"]) as handle:
        return handle.read().splitlines()[1]


#: File names under the test directory: one path component, so no random text walks elsewhere.
SAFE_FILE_TEXT = st.text(st.characters(exclude_characters="/"), max_size=20)
FILE_KINDS = ["ca", "garbage", "empty", "cert", "key", "other-key", "dir", "missing"]
FILE_PATH = st.one_of(st.sampled_from(FILE_KINDS).map(lambda k: files().paths[k]),
                      SAFE_FILE_TEXT.map(lambda s: os.path.join(files().dir, "x" + s)))
PEM_TEXT = st.one_of(st.none(), st.just(""), st.builds(lambda: certs().pki.root.cert_pem),
                     st.builds(lambda: certs().pki.root.cert_pem[:200]), TEXT,
                     st.builds(lambda: certs().alice.key_pem))
PIN = st.one_of(st.builds(lambda: chain.spki_sha256(certs().alice.cert)),
                st.builds(lambda: base64.b64encode(bytes.fromhex(chain.spki_sha256(certs().alice.cert)))
                          .decode()),
                st.just("sha256/" + "A" * 43 + "="), TEXT, st.integers(), st.none())
BUILD_FIELDS = {"trusted_ca_pem", "trusted_ca_files", "client_cert_file", "client_key_file",
                "expected_dns_names", "expected_uris", "spki_sha256_pins", "timeout", "expiry_warning_days"}
OPTIONAL_FILE = st.one_of(st.none(), st.just(""), FILE_PATH)


@budget(300)
@given(ca=PEM_TEXT, ca_files=st.lists(FILE_PATH, max_size=2), cert_file=OPTIONAL_FILE, key_file=OPTIONAL_FILE,
       dns=st.lists(st.one_of(TEXT, st.integers(), st.sampled_from(
           ["api.example", "*.example.org", "*.com", "-a.example", "xn--bcher-kva.example", "a..b"])),
           max_size=3),
       uris=st.lists(st.one_of(TEXT, st.none(), st.sampled_from(
           ["spiffe://example.org/a", "spiffe://Example.org/a", "spiffe:///a", "https://x", "x"])),
           max_size=3),
       pins=st.lists(PIN, max_size=3),
       timeout=st.one_of(st.floats(), st.integers(-5, 100)),
       days=st.one_of(st.integers(-10, 5000), st.floats()),
       wait=st.floats(0, 10), verify=st.booleans(), unverified=st.booleans())
def test_upstream_policies_build_or_raise_config_error_naming_a_field(
        ca, ca_files, cert_file, key_file, dns, uris, pins, timeout, days, wait, verify, unverified):
    try:
        policy = upstream.UpstreamPolicy.build(
            trusted_ca_pem=ca, trusted_ca_files=ca_files, client_cert_file=cert_file,
            client_key_file=key_file, expected_dns_names=dns, expected_uris=uris, spki_sha256_pins=pins,
            verify_hostname=verify, timeout=timeout, expiry_warning_days=days, post_handshake_wait=wait,
            allow_unverified=unverified)
    except ConfigError as exc:
        assert re.sub(r"\[\d+\]$", "", exc.field) in BUILD_FIELDS, exc.field
        assert exc.field in str(exc)
        assert "BEGIN" not in str(exc) and key_secret_line() not in str(exc)
        return
    settings_ = policy.settings
    assert 0 < settings_.timeout <= 60 and settings_.post_handshake_wait <= settings_.timeout
    assert settings_.has_trust or policy.expectation.spki_pins or unverified
    assert all(len(pin) == 32 for pin in policy.expectation.spki_pins)


TARGET_HOST = st.one_of(TEXT, st.sampled_from(["host", "1.2.3.4", "[::1]", "[::1", "::1", "[", "]", "", " "]))
TARGET_PORT = st.one_of(st.integers(-5, 10**6).map(str), TEXT, st.sampled_from(["\u0664\u0664\u0663", ""]))


@budget(400)
@given(text=st.one_of(TEXT, st.tuples(TARGET_HOST, TARGET_PORT).map(":".join)),
       default=st.one_of(st.none(), st.integers(-5, 70_000), st.booleans()))
def test_targets_parse_or_raise_value_error(text, default):
    try:
        target = upstream.parse_target(text, default)
    except ValueError:
        return
    assert isinstance(target.port, int) and not isinstance(target.port, bool) and 0 < target.port < 65536
    assert target.host and not any(c.isspace() for c in target.host) and target.host in text
    assert target.port == default or target.port == int(text.strip().rpartition(":")[2])


# ==================================================================================================
# Every plugin's constructor with random configs
# ==================================================================================================
@functools.lru_cache(maxsize=1)
def config_pools() -> dict[str, st.SearchStrategy]:
    """Values that are valid for a field, so random configs reach the checks beyond the schema."""
    world, paths = certs(), files().paths
    pki = world.pki
    new = api_keys.generate_key()
    entry = api_keys.credential_entry(new.key, "alice", new.key_id)
    crl = pki.intermediate.crl().public_bytes(serialization.Encoding.PEM).decode()
    sha = chain.cert_sha256(pki.intermediate.cert)
    return {
        "allow": st.lists(st.sampled_from([*ALLOW, *DENY, "10.1.2.3/8", "::ffff:1.2.3.0/120",
                                           "fe80::1%eth0"]), max_size=3),
        "trusted_proxies": st.lists(st.sampled_from(TRUSTED), max_size=2),
        "header_name": st.sampled_from(["CF-Connecting-IP", "X-Forwarded-For", "X-Real-IP", "Forwarded",
                                        "a b"]),
        "source": st.sampled_from(["peer", "forwarded", "header"]),
        "preset_files": st.dictionaries(st.sampled_from(["cloudflare", "nope"]),
                                        st.sampled_from(sorted(paths.values())), max_size=1),
        "ca_certificates": st.lists(st.sampled_from([pki.root.cert_pem, pki.intermediate.cert_pem,
                                                     world.alice.cert_pem, pki.other_root.cert_pem]),
                                    max_size=2),
        "ca_certificate_files": st.lists(FILE_PATH, max_size=1),
        "crls": st.lists(st.sampled_from([crl, "not a crl"]), max_size=1),
        "required_eku": st.sampled_from(["client_auth", "any", "1.2.3.4", "serverAuth", "code_signing"]),
        "groups_from": st.lists(st.sampled_from(["mapping", "cn", "dn:OU", "dn:NOPE", "spiffe_path", "x"]),
                                max_size=2),
        "consumer_mappings": st.lists(st.fixed_dictionaries(
            {"subject_name": st.sampled_from(["alice", ""])},
            optional={"consumer": st.sampled_from(["alice", ""]), "ca_sha256": st.sampled_from([sha, "abc"]),
                      "spki_sha256": st.sampled_from([sha.upper(), "xyz"]),
                      "groups": st.lists(TEXT, max_size=2)}),
            max_size=2),
        "credentials": st.lists(st.one_of(
            st.just(entry), st.just({**entry, "id": "other"}),
            st.dictionaries(st.sampled_from([*sorted(entry), "allowed_cidrs", "expires_at"]),
                            st.one_of(TEXT, JSON_VALUE), max_size=4)), max_size=3),
        "trusted_ca_pem": PEM_TEXT,
        "trusted_ca_files": st.lists(FILE_PATH, max_size=2),
        "client_cert_file": st.one_of(st.none(), FILE_PATH),
        "client_key_file": st.one_of(st.none(), FILE_PATH),
        "spki_sha256_pins": st.lists(PIN, max_size=2),
        "expected_dns_names": st.lists(st.sampled_from(["api.example", "*.x", "a b"]), max_size=2),
        "host": st.sampled_from(["127.0.0.1", "a b", "upstream.example"]),
        "sni": st.sampled_from(["api.example", "a/b", ""]),
    }


def _typed(spec: Mapping[str, Any]) -> st.SearchStrategy:
    """A value of the field's schema type (valid or not for the field itself)."""
    kind = spec["type"]
    if "one_of" in spec:
        return st.one_of(st.sampled_from(spec["one_of"]), TEXT)
    if kind == "string":
        return TEXT
    if kind == "integer":
        return st.one_of(st.integers(-10, 200_000), st.floats(allow_nan=True))
    if kind == "number":
        return st.one_of(st.floats(), st.integers(-10, 200_000))
    if kind == "boolean":
        return st.one_of(st.booleans(), st.sampled_from(["true", 0, 1]))
    if kind in ("array", "set"):
        return st.one_of(st.lists(_typed(spec["elements"]), max_size=3), st.just({}))
    if kind == "map":
        return st.dictionaries(TEXT, TEXT, max_size=2)
    return st.fixed_dictionaries({}, optional={name: _typed(sub) for item in spec["fields"]
                                               for name, sub in item.items()})


#: Any JSON value, big integers included (Python's json reads a 400-digit number as an int).
ANY_JSON = st.deferred(lambda: st.one_of(JSON_VALUE, st.integers(10**300, 10**400)))


def config_strategy(schema_fields: list) -> st.SearchStrategy:
    pools = config_pools()
    optional = {}
    for item in schema_fields:
        ((name, spec),) = item.items()
        pool = pools.get(name, pools.get(name.replace("deny", "allow").replace("_presets", "")))
        choices = [_typed(spec), ANY_JSON]
        if pool is not None:
            choices = [pool, pool, *choices]
        optional[name] = st.one_of(*choices)
    kong_keys = {"route_id": st.text(max_size=5), "__seq__": st.integers(), "__plugin_id": st.none()}
    return st.fixed_dictionaries({}, optional={**optional, **kong_keys})


def exercise(module: str, plugin: Any, data: st.DataObject) -> None:
    """A working plugin decides hostile requests without raising."""
    if module == "ip_allowlist":
        decision = plugin.policy.decide_headers(data.draw(PEER), data.draw(header_map()))
        assert isinstance(decision.reason, Reason)
    elif module == "client_cert_auth":
        chain_value = data.draw(st.one_of(GARBAGE_CHAIN, mutated_chain()))
        decision = plugin.authenticator.authenticate(chain_value, load_consumer)
        assert isinstance(decision.reason, chain.Reason) or (decision.allowed and decision.reason is None)
        if decision.allowed and decision.verified:
            world = certs()
            assert der_of(decision.chain.leaf) in {*world.owners, world.stranger_der}
    elif module == "api_key_auth":
        decision = run_keys(plugin.auth, data.draw(request_parts()))
        assert isinstance(decision.outcome, api_keys.Outcome)


MODULES = ["ip_allowlist", "client_cert_auth", "api_key_auth", "upstream_identity", "client_cert_request"]


@pytest.mark.parametrize("module", MODULES)
def test_random_configs_make_a_plugin_or_a_config_error_naming_a_schema_field(module):
    adapter = importlib.import_module(f"kong_mtls.kong.{module}")
    fields = {name for item in adapter.Schema for name in item}

    @budget(150)
    @given(config=st.one_of(config_strategy(adapter.Schema), JSON_VALUE), data=st.data())
    def check(config, data):
        try:
            plugin = adapter.Plugin(config)
        except ConfigError as exc:
            event(f"ConfigError {exc.field}")
            root = re.split(r"[\[. ]", exc.field, maxsplit=1)[0]
            assert root in fields or root == "config", exc.field
            assert exc.problem and exc.field in str(exc)
            return
        event("plugin")
        exercise(module, plugin, data)

    check()


def test_a_config_error_never_carries_a_private_key():
    """A key pasted where a certificate belongs is refused without echoing it."""
    world = certs()
    pem = world.alice.key_pem
    secret_line = pem.splitlines()[1]
    for module, config in (("client_cert_auth", {"ca_certificates": [pem]}),
                           ("client_cert_auth", {"ca_certificates": [world.alice.chain_pem + pem]}),
                           ("upstream_identity", {"trusted_ca_pem": pem}),
                           ("api_key_auth", {"credentials": [{"id": "a", "hash": pem, "consumer": "c"}]})):
        adapter = importlib.import_module(f"kong_mtls.kong.{module}")
        with pytest.raises(ConfigError) as info:
            adapter.Plugin(config)
        assert secret_line not in str(info.value), (module, info.value.field)


@pytest.mark.parametrize("field", ["spki_sha256_pins", "expected_dns_names", "expected_uris"])
def test_a_private_key_pasted_as_an_expected_identity_is_not_echoed(field):
    """A refused config is logged by Kong (failed StartInstance): a key pasted in the wrong field
    must not be."""
    pem = certs().alice.key_pem
    with pytest.raises(ConfigError) as info:
        importlib.import_module("kong_mtls.kong.upstream_identity").Plugin({field: [pem]})
    assert info.value.field == f"{field}[1]"
    assert pem.splitlines()[1] not in str(info.value)


def test_issuing_hostile_names_is_possible_at_all():
    """The hostile-name tests assume() certificates get issued; make sure they mostly do."""
    world = certs()
    issued = _issue(world.pki.intermediate, {"cn": "x\x1b\r\n", "ous": ["\u202e"], "dns": ["a\r\n"],
                                             "uris": ["spiffe://td/a\n"], "emails": ["\x00"]})
    assert issued is not None
    assert issued.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "x\x1b\r\n"


def test_a_near_expiry_path_is_still_only_its_genuine_owner():
    """Time skew retries verification at another instant: the retried path is still the real one."""
    world = certs()
    soon = world.pki.client("soon", dns=["soon.example"],
                            not_after=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=30))
    skewed = compile_config({"ca_certificates": [world.pki.root.cert_pem], "revocation_check_mode": "SKIP",
                             "validation_time_skew": 300, "skip_consumer_lookup": True}).authenticator
    decision = skewed.authenticate(soon.chain_pem, load_consumer)
    assert decision.allowed and der_of(decision.chain.leaf) == der_of(soon.cert)
    tampered = bytearray(der_of(soon.cert))
    tampered[-5] ^= 0x01
    assert not skewed.authenticate(pem_block(bytes(tampered)) + world.pki.intermediate.cert_pem,
                                   load_consumer).allowed
