"""client-cert-auth identity core: names, SPIFFE, mappings, pins, groups, consumers, decisions, headers."""

from __future__ import annotations

import base64
import types
import uuid
from urllib.parse import unquote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from kong_mtls.constants import CONSUMER_HEADERS, MESSAGE_UNEXPECTED
from kong_mtls.core.chain import (
    MESSAGE_FAILED_VERIFICATION,
    MESSAGE_NO_CERTIFICATE,
    ChainPolicy,
    ChainVerifier,
    Reason,
    cert_sha256,
    spki_sha256,
)
from kong_mtls.core.consumers import ConsumerCache
from kong_mtls.core.identity import (
    CREDENTIAL_NAMESPACE,
    HEADER_CLIENT_CERT,
    HEADER_CLIENT_CERT_CHAIN,
    HEADER_CLIENT_CERT_DN,
    HEADER_CLIENT_CERT_SAN,
    HEADER_XFCC,
    OWNED_HEADERS,
    Authenticator,
    AuthPolicy,
    ConsumerMapping,
    GroupSource,
    GroupSourceKind,
    NameKind,
    SpiffeId,
    Via,
    extract_identity,
    parse_mappings,
    parse_spiffe_id,
)
from kong_mtls.devpki import Authority, SubjectAltNames
from kong_mtls.schema import ConfigError

ALICE_ID = "00000000-0000-4000-8000-00000000a11c"
BOB_ID = "00000000-0000-4000-8000-0000000000b0"
ANON_ID = "00000000-0000-4000-8000-0000000000aa"
DEFAULT_ID = "00000000-0000-4000-8000-0000000000df"


class Consumers:
    """`kong.client.load_consumer(ref, true)` over a fixed table: by id when UUID-shaped, then by
    username (kong/pdk/client.lua); counts calls."""

    def __init__(self, *rows: dict) -> None:
        self.rows = list(rows)
        self.calls: list[str] = []

    def __call__(self, ref: str):
        self.calls.append(ref)
        for row in self.rows:
            if row["id"] == ref:
                return row
        return next((row for row in self.rows if row.get("username") == ref), None)


def consumers() -> Consumers:
    return Consumers({"id": ALICE_ID, "username": "alice", "custom_id": "cust-alice"},
                     {"id": BOB_ID, "username": "bob"},
                     {"id": ANON_ID, "username": "anonymous"},
                     {"id": DEFAULT_ID, "username": "everyone"})


def authenticator(pki, revocation=None, **policy) -> Authenticator:
    verifier = ChainVerifier(ChainPolicy(anchors=(pki.root.cert,)))
    return Authenticator(verifier, AuthPolicy(**policy), revocation=revocation)


def mapping(name: str, consumer: str | None = "alice", **kw) -> ConsumerMapping:
    return ConsumerMapping(name, consumer, **kw)


# -- names ---------------------------------------------------------------------------------------------

def test_extract_identity_of_alice(pki):
    identity = extract_identity(pki.alice.cert)
    assert identity.subject == "CN=alice,OU=admins,OU=payments,O=Example Org"
    assert identity.issuer == pki.intermediate.cert.subject.rfc4514_string()
    assert identity.common_names == ("alice",)
    assert identity.attribute_values(NameOID.ORGANIZATIONAL_UNIT_NAME.dotted_string) == ("payments", "admins")
    assert identity.dns == ("alice.clients.example",) and identity.emails == ("alice@example.org",)
    assert identity.uris == ("spiffe://example.org/ns/payments/sa/alice",) and identity.ips == ("10.1.2.3",)
    assert identity.san == ("alice.clients.example", "spiffe://example.org/ns/payments/sa/alice",
                            "alice@example.org", "10.1.2.3")
    assert identity.spiffe == SpiffeId("example.org", "/ns/payments/sa/alice")
    assert identity.spiffe.segments == ("ns", "payments", "sa", "alice")
    assert str(identity.spiffe) == "spiffe://example.org/ns/payments/sa/alice"
    assert identity.spki_sha256 == spki_sha256(pki.alice.cert)
    assert identity.fingerprint_sha256 == cert_sha256(pki.alice.cert)
    assert identity.serial == format(pki.alice.cert.serial_number, "x")


def test_names_follow_the_configured_order(pki):
    identity = extract_identity(pki.alice.cert)
    D, C = NameKind.DNS, NameKind.CN
    assert identity.names() == ((NameKind.URI, "spiffe://example.org/ns/payments/sa/alice"),
                                (D, "alice.clients.example"), (NameKind.EMAIL, "alice@example.org"),
                                (NameKind.IP, "10.1.2.3"), (C, "alice"))
    assert identity.names((NameKind.CN, NameKind.DN)) == ((C, "alice"), (NameKind.DN, identity.subject))
    twice = pki.client("same.example", dns=["same.example"])  # one value, two kinds: two names
    assert extract_identity(twice.cert).names((NameKind.DNS, NameKind.CN)) == ((D, "same.example"),
                                                                             (C, "same.example"))


def test_ipv6_and_cn_only(pki):
    identity = extract_identity(pki.client("v6", ips=["2001:db8::1"]).cert)
    assert identity.ips == ("2001:db8::1",)
    assert identity.names() == ((NameKind.IP, "2001:db8::1"), (NameKind.CN, "v6"))
    cn_only = extract_identity(pki.client("only-cn").cert)
    assert cn_only.san == () and cn_only.names() == ((NameKind.CN, "only-cn"),) and cn_only.spiffe is None


@pytest.mark.parametrize(("uri", "expected"), [
    ("spiffe://example.org", SpiffeId("example.org", "")),
    ("spiffe://example.org/ns/x/sa/y", SpiffeId("example.org", "/ns/x/sa/y")),
    ("spiffe://td-1_a.b/A.b-c_d", SpiffeId("td-1_a.b", "/A.b-c_d")),
    ("SPIFFE://example.org/x", None),
    ("spiffe://Example.org/x", None),          # trust domain must be lower case
    ("spiffe://example.org/x/", None),          # trailing slash
    ("spiffe://example.org//x", None),          # empty segment
    ("spiffe://example.org/./x", None),
    ("spiffe://example.org/../x", None),
    ("spiffe://example.org:8443/x", None),      # port
    ("spiffe://user@example.org/x", None),      # user info
    ("spiffe://example.org/x?y=1", None),
    ("spiffe://example.org/x#f", None),
    ("spiffe:///x", None),
    ("https://example.org/x", None),
    ("spiffe://example.org/" + "a" * 3000, None),
])
def test_parse_spiffe_id(uri, expected):
    assert parse_spiffe_id(uri) == expected


def test_two_spiffe_ids_are_ambiguous(pki):
    two = pki.client("two", uris=["spiffe://a.example/x", "spiffe://b.example/y"])
    assert extract_identity(two.cert).spiffe is None


def test_odd_string_encodings_are_read_and_escaped_for_headers(pki):
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Ünïcødé Org", _type=_ASN1Type.BMPString),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "univ 𝄞", _type=_ASN1Type.UniversalString),
        x509.NameAttribute(NameOID.LOCALITY_NAME, "t61 caf\xe9", _type=_ASN1Type.T61String),
        x509.NameAttribute(NameOID.COMMON_NAME, "evil\r\nX-Injected: 1,=+\"\\<>;#"),
    ])
    issued = pki.intermediate.issue(subject, sans=SubjectAltNames(
        dns=["odd.example"], uris=["https://x.example/a,b;c=d\"e"], emails=["o@example.org"]))
    identity = extract_identity(issued.cert)
    assert identity.attribute_values(NameOID.ORGANIZATION_NAME.dotted_string) == ("Ünïcødé Org",)
    assert identity.attribute_values(NameOID.ORGANIZATIONAL_UNIT_NAME.dotted_string) == ("univ 𝄞",)
    assert identity.common_names == ("evil\r\nX-Injected: 1,=+\"\\<>;#",)
    sources = tuple(GroupSource.parse(s) for s in ("cn", "dn:OU", "dn:O"))
    auth = authenticator(pki, skip_consumer_lookup=True, forward_client_cert=frozenset({"rfc9440", "xfcc"}),
                         groups_from=sources)
    decision = auth.authenticate(issued.chain_pem, consumers())
    assert decision.allowed and decision.via is Via.SKIP_CONSUMER_LOOKUP
    assert decision.groups == ("univ 𝄞", "Ünïcødé Org")  # the CN with CR/LF cannot be a group
    for name, value in decision.headers.items():
        for text in value if isinstance(value, list) else [value]:
            assert text.isascii() and text.isprintable(), (name, text)
    dn = decision.headers[HEADER_CLIENT_CERT_DN]
    assert dn.startswith("CN=evil\\0D\\0AX-Injected: 1\\,=\\+") and "caf\\C3\\A9" in dn
    assert decision.headers[HEADER_CLIENT_CERT_SAN] == "odd.example,https://x.example/a%2Cb;c=d\"e,o@example.org"
    xfcc = decision.headers[HEADER_XFCC]
    assert 'Subject="CN=evil\\\\0D\\\\0AX-Injected' in xfcc
    assert 'URI="https://x.example/a%2Cb;c=d\\"e"' in xfcc


# -- group sources ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "kind", "oid"), [
    ("mapping", GroupSourceKind.MAPPING, None),
    ("CN", GroupSourceKind.CN, None),
    ("dn", GroupSourceKind.DN, None),
    ("dn:OU", GroupSourceKind.ATTRIBUTE, "2.5.4.11"),
    ("dn:ou", GroupSourceKind.ATTRIBUTE, "2.5.4.11"),
    ("DN:O", GroupSourceKind.ATTRIBUTE, "2.5.4.10"),
    ("dn:1.3.6.1.4.1.99999.3", GroupSourceKind.ATTRIBUTE, "1.3.6.1.4.1.99999.3"),
    ("spiffe_path", GroupSourceKind.SPIFFE_PATH, None),
    ("spiffe_id", GroupSourceKind.SPIFFE_ID, None),
    ("spiffe_trust_domain", GroupSourceKind.SPIFFE_TRUST_DOMAIN, None),
])
def test_group_source_parse(text, kind, oid):
    assert GroupSource.parse(text) == GroupSource(kind, oid)


@pytest.mark.parametrize("text", ["ou", "dn:", "dn:NOPE", "dn:1.2.", "spiffe", "groups", ""])
def test_group_source_parse_refuses(text):
    with pytest.raises(ValueError):
        GroupSource.parse(text)


def test_several_groups_per_certificate(pki):
    sources = tuple(GroupSource.parse(s) for s in ("dn:OU", "cn", "spiffe_path", "spiffe_trust_domain",
                                                    "mapping", "dn:O"))
    auth = authenticator(pki, groups_from=sources,
                         consumer_mappings=(mapping("alice", groups=("g1", "admins"),
                                                    name_type=NameKind.CN),))
    decision = auth.authenticate(pki.alice.chain_pem, consumers())
    assert decision.allowed and decision.via is Via.MAPPING
    assert decision.groups == ("payments", "admins", "alice", "ns", "sa", "example.org", "g1", "Example Org")


def test_dn_and_spiffe_id_groups(pki):
    sources = (GroupSource.parse("dn"), GroupSource.parse("spiffe_id"))
    decision = authenticator(pki, skip_consumer_lookup=True, groups_from=sources).authenticate(
        pki.alice.chain_pem, consumers())
    assert decision.groups == ("CN=alice,OU=admins,OU=payments,O=Example Org",
                               "spiffe://example.org/ns/payments/sa/alice")


# -- mappings -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "name"), [
    ("spiffe", "spiffe://example.org/ns/payments/sa/bob"),
    ("dns", "bob.clients.example"),
    ("email", "bob@example.org"),
    ("ip", "192.0.2.44"),
    ("cn", "bob-cn"),
])
def test_mapping_by_each_name_kind(pki, kind, name):
    issued = {
        "spiffe": lambda: pki.client(None, uris=[name]),
        "dns": lambda: pki.client(None, dns=[name]),
        "email": lambda: pki.client(None, emails=[name]),
        "ip": lambda: pki.client(None, ips=[name]),
        "cn": lambda: pki.client(name),
    }[kind]()
    typed = NameKind.CN if kind == "cn" else None  # a CN mapping is never inferred
    auth = authenticator(pki, consumer_mappings=(mapping(name, "bob", name_type=typed),),
                         consumer_by=frozenset())
    decision = auth.authenticate(issued.chain_pem, consumers())
    assert decision.allowed and decision.via is Via.MAPPING and decision.consumer["id"] == BOB_ID
    assert decision.credential == {"id": auth.policy.consumer_mappings[0].credential_id,
                                   "consumer": {"id": BOB_ID}}
    assert decision.headers["X-Consumer-ID"] == BOB_ID
    assert decision.headers["X-Credential-Identifier"] == auth.policy.consumer_mappings[0].credential_id


def test_mapping_follows_name_preference(pki):
    by_uri = mapping("spiffe://example.org/ns/payments/sa/alice", "alice")
    by_cn = mapping("alice", "bob", name_type=NameKind.CN)
    auth = authenticator(pki, consumer_mappings=(by_cn, by_uri))
    assert auth.authenticate(pki.alice.chain_pem, consumers()).consumer["id"] == ALICE_ID
    cn_first = authenticator(pki, consumer_mappings=(by_cn, by_uri), name_sources=(NameKind.CN, NameKind.URI))
    assert cn_first.authenticate(pki.alice.chain_pem, consumers()).consumer["id"] == BOB_ID


def test_names_outside_the_sources_do_not_map(pki):
    with pytest.raises(ConfigError, match="name_sources does not list cn"):
        authenticator(pki, consumer_mappings=(mapping("alice", name_type=NameKind.CN),),
                      name_sources=(NameKind.DNS,), consumer_by=frozenset())
    dn = authenticator(pki, consumer_mappings=(mapping("CN=alice,OU=admins,OU=payments,O=Example Org",
                                                       name_type=NameKind.DN),),
                       name_sources=(NameKind.DN,))
    assert dn.authenticate(pki.alice.chain_pem, consumers()).consumer["id"] == ALICE_ID


def test_spki_pinned_mapping_rejects_another_key_with_the_same_name(pki):
    genuine = pki.client("payments-api", dns=["payments.example"])
    impostor = pki.client("payments-api", dns=["payments.example"])  # same names, other key
    pinned = mapping("payments.example", "bob", spki_sha256=spki_sha256(genuine.cert))
    auth = authenticator(pki, consumer_mappings=(pinned,), default_consumer="everyone")
    assert auth.authenticate(genuine.chain_pem, consumers()).consumer["id"] == BOB_ID
    refused = auth.authenticate(impostor.chain_pem, consumers())
    assert not refused.allowed and refused.reason is Reason.PIN_MISMATCH
    assert refused.status == 401 and refused.message == MESSAGE_FAILED_VERIFICATION
    assert not refused.verified and refused.client_verify == "FAILED:PIN_MISMATCH"


def test_ca_pinned_mappings(pki):
    other_ca = pki.root.intermediate("other issuing CA")
    from_main = pki.client("svc", dns=["svc.example"])
    from_other = other_ca.client("svc", dns=["svc.example"])
    pinned = mapping("svc.example", "bob", ca_sha256=cert_sha256(pki.intermediate.cert))
    auth = authenticator(pki, consumer_mappings=(pinned,))
    assert auth.authenticate(from_main.chain_pem, consumers()).consumer["id"] == BOB_ID
    assert auth.authenticate(from_other.chain_pem, consumers()).reason is Reason.PIN_MISMATCH
    # A pin on the root matches every path through it; pins accept ':' hex and base64.
    root_fp = cert_sha256(pki.root.cert)
    (by_root,) = parse_mappings([{"subject_name": "svc.example", "consumer": "bob",
                                  "ca_sha256": ":".join(root_fp[i:i + 2] for i in range(0, 64, 2)).upper()}])
    assert authenticator(pki, consumer_mappings=(by_root,)).authenticate(from_other.chain_pem,
                                                                          consumers()).allowed


def test_the_most_specific_mapping_wins_and_rotation_maps_each_ca(pki):
    other_ca = pki.root.intermediate("rotation CA")
    old = pki.client("svc", dns=["svc.example"])
    new = other_ca.client("svc", dns=["svc.example"])
    loose = mapping("svc.example", "everyone")
    old_pin = mapping("svc.example", "alice", ca_sha256=cert_sha256(pki.intermediate.cert))
    new_pin = mapping("svc.example", "bob", ca_sha256=cert_sha256(other_ca.cert))
    auth = authenticator(pki, consumer_mappings=(loose, old_pin, new_pin))
    assert auth.authenticate(old.chain_pem, consumers()).consumer["id"] == ALICE_ID
    assert auth.authenticate(new.chain_pem, consumers()).consumer["id"] == BOB_ID
    stranger = pki.root.intermediate("third CA").client("svc", dns=["svc.example"])
    assert auth.authenticate(stranger.chain_pem, consumers()).consumer["id"] == DEFAULT_ID


def test_mapped_consumer_missing_is_no_consumer(pki):
    auth = authenticator(pki, consumer_mappings=(mapping("alice", "ghost", name_type=NameKind.CN),),
                         default_consumer="everyone")
    decision = auth.authenticate(pki.alice.chain_pem, consumers())
    assert decision.reason is Reason.NO_CONSUMER and decision.status == 401 and "ghost" in decision.detail


def test_credential_ids_are_stable_and_distinct():
    a = mapping("alice", "alice")
    assert a.credential_id == mapping("alice", "alice").credential_id
    assert uuid.UUID(a.credential_id).version == 5
    assert len({a.credential_id, mapping("alice", "bob").credential_id,
                mapping("alice", "alice", spki_sha256="0" * 64).credential_id}) == 3


def test_parse_mappings():
    (m,) = parse_mappings([{"subject_name": "x", "consumer": "c", "spki_sha256": "AB" * 32,
                            "groups": ["g"]}])
    assert m == ConsumerMapping("x", "c", None, "ab" * 32, ("g",))
    with pytest.raises(ConfigError) as info:
        parse_mappings([{"subject_name": "x", "consumer": "c"}, {"subject_name": "x", "consumer": "d"}])
    assert info.value.field == "consumer_mappings[2]"
    for bad, field in [({"consumer": "c"}, "subject_name"),
                       ({"subject_name": "x", "ca_sha256": "zz"}, "ca_sha256"),
                       ({"subject_name": "x", "spki_sha256": "12"}, "spki_sha256"),
                       ({"subject_name": "x", "groups": ["ok", "bad\n"]}, "groups[2]"),
                       ({"subject_name": "x", "consumer": ""}, "consumer")]:
        with pytest.raises(ConfigError) as info:
            parse_mappings([bad])
        assert info.value.field == f"consumer_mappings[1].{field}"


@pytest.mark.parametrize(("policy", "field"), [
    ({"name_sources": ()}, "name_sources"),
    ({"consumer_by": frozenset({"custom_id"})}, "consumer_by"),
    ({"forward_client_cert": frozenset({"pem"})}, "forward_client_cert"),
    ({"skip_consumer_lookup": True, "consumer_mappings": (mapping("x"),)}, "consumer_mappings[1].consumer"),
    ({"consumer_mappings": (mapping("x", None),)}, "consumer_mappings[1].consumer"),
    ({"skip_consumer_lookup": True, "default_consumer": "everyone"}, "default_consumer"),
])
def test_conflicting_policies(policy, field):
    with pytest.raises(ConfigError) as info:
        AuthPolicy(**policy)
    assert info.value.field == field


# -- auto-match, default, anonymous -----------------------------------------------------------------

def test_auto_match_by_username_then_id(pki):
    auth = authenticator(pki)
    decision = auth.authenticate(pki.alice.chain_pem, consumers())
    assert decision.via is Via.CONSUMER_BY and decision.consumer["id"] == ALICE_ID
    assert decision.credential["id"] == str(uuid.uuid5(CREDENTIAL_NAMESPACE, "consumer_by\x1falice"))
    by_id = pki.client(ALICE_ID)
    assert auth.authenticate(by_id.chain_pem, consumers()).reason is Reason.NO_CONSUMER  # id not enabled
    with_id = authenticator(pki, consumer_by=frozenset({"username", "id"}))
    assert with_id.authenticate(by_id.chain_pem, consumers()).consumer["id"] == ALICE_ID


def test_auto_match_disabled(pki):
    decision = authenticator(pki, consumer_by=frozenset()).authenticate(pki.alice.chain_pem, consumers())
    assert decision.reason is Reason.NO_CONSUMER and decision.status == 401


def test_default_consumer(pki):
    stranger = pki.client("nobody-known", dns=["nobody.example"])
    auth = authenticator(pki, default_consumer="everyone")
    decision = auth.authenticate(stranger.chain_pem, consumers())
    assert decision.via is Via.DEFAULT_CONSUMER and decision.consumer["id"] == DEFAULT_ID
    missing = authenticator(pki, default_consumer="ghost").authenticate(stranger.chain_pem, consumers())
    assert missing.reason is Reason.DEFAULT_CONSUMER_NOT_FOUND
    assert (missing.status, missing.message) == (500, MESSAGE_UNEXPECTED)


@pytest.mark.parametrize("case", ["no-cert", "expired", "no-consumer"])
def test_anonymous(pki, case):
    pem = {"no-cert": None, "expired": pki.expired().chain_pem,
           "no-consumer": pki.client("nobody", dns=["nobody.example"]).chain_pem}[case]
    decision = authenticator(pki, anonymous="anonymous").authenticate(pem, consumers())
    assert decision.allowed and decision.via is Via.ANONYMOUS and decision.anonymous
    assert decision.consumer["id"] == ANON_ID and decision.credential is None and decision.groups == ()
    assert decision.headers["X-Anonymous-Consumer"] == "true" and decision.headers["X-Consumer-ID"] == ANON_ID
    assert decision.headers["X-Credential-Identifier"] == []
    assert decision.mark["anonymous"] is True and decision.mark["consumer_id"] == ANON_ID
    assert decision.mark["verified"] is (case == "no-consumer")
    assert decision.reason is {"no-cert": Reason.NO_CERTIFICATE, "expired": Reason.EXPIRED,
                               "no-consumer": Reason.NO_CONSUMER}[case]
    assert decision.client_verify == (None if case == "no-cert" else f"FAILED:{decision.reason.value}")
    cert_headers = decision.headers[HEADER_CLIENT_CERT_DN]
    assert (cert_headers != []) is (case == "no-consumer")


def test_anonymous_consumer_missing_is_a_500(pki):
    decision = authenticator(pki, anonymous="ghost").authenticate(None, consumers())
    assert not decision.allowed and decision.reason is Reason.ANONYMOUS_NOT_FOUND
    assert (decision.status, decision.message) == (500, MESSAGE_UNEXPECTED)


def test_refusal_messages(pki):
    auth = authenticator(pki)
    no_cert = auth.authenticate(None, consumers())
    assert (no_cert.status, no_cert.message) == (401, MESSAGE_NO_CERTIFICATE)
    assert no_cert.reason is Reason.NO_CERTIFICATE
    assert no_cert.mark is None and no_cert.client_verify is None
    for pem, reason in [(pki.unknown_ca_client().chain_pem, Reason.UNKNOWN_CA),
                        (pki.server_only_eku().chain_pem, Reason.BAD_EKU),
                        ("garbage", Reason.MALFORMED_CHAIN)]:
        decision = auth.authenticate(pem, consumers())
        assert not decision.allowed
        assert (decision.status, decision.message) == (401, MESSAGE_FAILED_VERIFICATION)
        assert decision.reason is reason and decision.mark is None
        assert decision.client_verify == f"FAILED:{reason.value}"


# -- skip_consumer_lookup and report_only -------------------------------------------------------------

def test_skip_consumer_lookup(pki):
    load = consumers()
    auth = authenticator(pki, skip_consumer_lookup=True,
                         groups_from=(GroupSource.parse("cn"), GroupSource.parse("mapping")),
                         consumer_mappings=(ConsumerMapping("alice", None, groups=("ops",),
                                                            name_type=NameKind.CN),))
    decision = auth.authenticate(pki.alice.chain_pem, load)
    assert decision.allowed and decision.via is Via.SKIP_CONSUMER_LOOKUP and load.calls == []
    assert decision.consumer is None and decision.credential is None and decision.groups == ("alice", "ops")
    assert all(decision.headers[h] == [] for h in CONSUMER_HEADERS)
    assert decision.headers[HEADER_CLIENT_CERT_DN] == "CN=alice,OU=admins,OU=payments,O=Example Org"
    assert decision.mark == {"verified": True, "consumer_id": None, "consumer_username": None,
                             "anonymous": False,
                             "spki_sha256": spki_sha256(pki.alice.cert),
                             "subject": "CN=alice,OU=admins,OU=payments,O=Example Org",
                             "fingerprint_sha256": cert_sha256(pki.alice.cert)}


def test_report_only_never_blocks(pki):
    auth = authenticator(pki, report_only=True)
    expired = pki.expired()
    decision = auth.authenticate(expired.chain_pem, consumers())
    assert decision.allowed and decision.via is Via.REPORT_ONLY and decision.reason is Reason.EXPIRED
    assert decision.consumer is None and decision.groups == ()
    assert all(v == [] for v in decision.headers.values()) and set(decision.headers) == set(OWNED_HEADERS)
    assert decision.mark["verified"] is False and decision.mark["subject"] == "CN=expired"
    assert decision.mark["spki_sha256"] == spki_sha256(expired.cert)
    nothing = auth.authenticate(None, consumers())
    assert nothing.allowed and nothing.reason is Reason.NO_CERTIFICATE and nothing.mark["subject"] == ""
    good = auth.authenticate(pki.alice.chain_pem, consumers())
    assert good.via is Via.CONSUMER_BY and good.reason is None  # a good certificate authenticates as usual
    ghost = authenticator(pki, report_only=True, default_consumer="ghost").authenticate(
        pki.client("x", dns=["x.example"]).chain_pem, consumers())
    assert ghost.allowed and ghost.reason is Reason.DEFAULT_CONSUMER_NOT_FOUND


# -- revocation hook -------------------------------------------------------------------------------------

def test_revocation_verdicts(pki):
    seen = []

    def revoked(leaf, issuer):
        seen.append((leaf, issuer))
        return types.SimpleNamespace(ok=False, reason="REVOKED", detail="serial listed")

    decision = authenticator(pki, revocation=revoked).authenticate(pki.alice.chain_pem, consumers())
    assert decision.reason is Reason.REVOKED and decision.status == 401 and "serial listed" in decision.detail
    assert seen == [(pki.alice.cert, pki.intermediate.cert)]      # the first refusal ends it
    unknown = authenticator(pki, revocation=lambda leaf, issuer: types.SimpleNamespace(
        ok=False, reason="REVOCATION_UNKNOWN", detail="unreachable")).authenticate(pki.alice.chain_pem,
                                                                                   consumers())
    assert unknown.reason is Reason.REVOCATION_UNKNOWN
    checked = []
    good = authenticator(pki, revocation=lambda leaf, issuer: checked.append((leaf, issuer)) or
                         types.SimpleNamespace(ok=True, reason="GOOD", detail="")).authenticate(
        pki.alice.chain_pem, consumers())
    assert good.allowed and good.via is Via.CONSUMER_BY
    # every certificate below the anchor, each with its issuer
    assert checked == [(pki.alice.cert, pki.intermediate.cert), (pki.intermediate.cert, pki.root.cert)]


def test_revoked_via_configured_crl_with_the_revocation_core(pki):
    revocation = pytest.importorskip("kong_mtls.core.revocation")
    leaf, crl = pki.revoked_with_crl()
    checker = revocation.RevocationChecker(static_crls=[crl, pki.root.crl()])  # STRICT: every CA too

    def check(cert, issuer):
        return checker.check(cert, issuer, revocation.RevocationMode.STRICT)

    auth = authenticator(pki, revocation=check, default_consumer="everyone")
    assert auth.authenticate(leaf.chain_pem, consumers()).reason is Reason.REVOKED
    assert auth.authenticate(pki.alice.chain_pem, consumers()).allowed


def test_a_revoked_intermediate_revokes_its_leaves_in_strict(pki):
    """The root's CRL lists the issuing CA: a valid leaf it issued is refused (REVOKED)."""
    revocation = pytest.importorskip("kong_mtls.core.revocation")
    root = Authority.root("revoking root")
    issuing = root.intermediate("revoked issuing CA")
    root.revoke(issuing.cert)
    leaf = issuing.client("alice", dns=["alice.example"])
    checker = revocation.RevocationChecker(static_crls=[root.crl(), issuing.crl()])
    verifier = ChainVerifier(ChainPolicy(anchors=(root.cert,)))
    auth = Authenticator(verifier, AuthPolicy(default_consumer="everyone"), revocation=lambda cert, issuer:
                         checker.check(cert, issuer, revocation.RevocationMode.STRICT))
    decision = auth.authenticate(leaf.chain_pem, consumers())
    assert decision.reason is Reason.REVOKED and "revoked issuing CA" in decision.detail


# -- headers -------------------------------------------------------------------------------------------

def test_every_owned_header_is_always_set(pki):
    auth = authenticator(pki, forward_client_cert=frozenset({"rfc9440", "xfcc"}))
    decision = auth.authenticate(pki.alice.chain_pem, consumers())
    assert set(decision.headers) == set(OWNED_HEADERS)
    assert decision.headers["X-Consumer-ID"] == ALICE_ID
    assert decision.headers["X-Consumer-Custom-ID"] == "cust-alice"
    assert decision.headers["X-Consumer-Username"] == "alice"
    assert decision.headers["X-Anonymous-Consumer"] == []
    assert decision.headers[HEADER_CLIENT_CERT_SAN] == ("alice.clients.example,spiffe://example.org/ns/payments/"
                                                        "sa/alice,alice@example.org,10.1.2.3")
    bare = authenticator(pki).authenticate(pki.alice.chain_pem, consumers())
    assert bare.headers[HEADER_CLIENT_CERT] == [] and bare.headers[HEADER_XFCC] == []


def test_rfc9440_headers(pki):
    decision = authenticator(pki, forward_client_cert=frozenset({"rfc9440"})).authenticate(
        pki.alice.chain_pem + pki.root.cert_pem, consumers())
    value = decision.headers[HEADER_CLIENT_CERT]
    assert value.startswith(":") and value.endswith(":")
    assert base64.b64decode(value[1:-1]) == pki.alice.cert.public_bytes(serialization.Encoding.DER)
    chain = decision.headers[HEADER_CLIENT_CERT_CHAIN]
    items = [item.strip() for item in chain.split(",")]
    assert [base64.b64decode(i[1:-1]) for i in items] == [
        pki.intermediate.cert.public_bytes(serialization.Encoding.DER)]  # leaf and anchor excluded


def test_xfcc_header(pki):
    decision = authenticator(pki, forward_client_cert=frozenset({"xfcc"})).authenticate(
        pki.alice.chain_pem, consumers())
    fields = decision.headers[HEADER_XFCC].split(";")
    assert fields[0] == f"Hash={cert_sha256(pki.alice.cert)}"
    assert x509.load_pem_x509_certificate(unquote(fields[1][len("Cert="):]).encode()) == pki.alice.cert
    assert fields[2] == 'Subject="CN=alice,OU=admins,OU=payments,O=Example Org"'
    assert fields[3:] == ["URI=spiffe://example.org/ns/payments/sa/alice", "DNS=alice.clients.example"]


# -- caches --------------------------------------------------------------------------------------------

def test_consumer_lookups_are_cached_with_ttl_and_misses_too():
    clock = types.SimpleNamespace(now=1000.0)
    cache = ConsumerCache(ttl=60, clock=lambda: clock.now)
    load = consumers()
    assert cache.get("alice", load)["id"] == ALICE_ID and cache.get("alice", load)["id"] == ALICE_ID
    assert cache.get("ghost", load) is None and cache.get("ghost", load) is None
    assert load.calls == ["alice", "ghost"]
    clock.now += 61
    cache.get("alice", load)
    assert load.calls == ["alice", "ghost", "alice"]
    off = ConsumerCache(ttl=0)
    off.get("alice", load)
    off.get("alice", load)
    assert load.calls.count("alice") == 4
    assert ConsumerCache(ttl=60).get("x", lambda ref: {"no": "id"}) is None  # not a consumer row


def test_returning_client_costs_no_lookup_and_no_verification(pki, monkeypatch):
    auth = authenticator(pki, consumer_mappings=(mapping("alice"),),
                         groups_from=(GroupSource.parse("dn:OU"),))
    load = consumers()
    first = auth.authenticate(pki.alice.chain_pem, load)
    assert first.allowed and load.calls == ["alice"]

    def no_more(*_):
        raise AssertionError("verified again")

    monkeypatch.setattr(auth.verifier, "_path", no_more)
    monkeypatch.setattr("kong_mtls.core.identity.extract_identity", no_more)
    second = auth.authenticate(pki.alice.chain_pem, load)
    assert second.allowed and load.calls == ["alice"]
    assert second.groups == first.groups == ("payments", "admins")
    assert second.headers == first.headers and second.mark == first.mark


def test_auto_match_caches_misses_per_name(pki):
    load = consumers()
    auth = authenticator(pki, default_consumer="everyone")
    stranger = pki.client("stranger-cn", dns=["stranger.example"])
    assert auth.authenticate(stranger.chain_pem, load).via is Via.DEFAULT_CONSUMER
    assert load.calls == ["stranger-cn", "everyone"]   # consumer_by compares CNs only
    auth.authenticate(stranger.chain_pem, load)
    assert len(load.calls) == 2


def test_unreadable_names_are_a_refusal(pki, monkeypatch):
    def broken(_):
        from kong_mtls.core.identity import IdentityError
        raise IdentityError("unreadable certificate names: boom")

    monkeypatch.setattr("kong_mtls.core.identity.extract_identity", broken)
    decision = authenticator(pki).authenticate(pki.alice.chain_pem, consumers())
    assert decision.reason is Reason.MALFORMED_CHAIN and decision.status == 401


def test_other_hierarchy_names_do_not_matter(pki):
    # The same names from an untrusted CA never reach the mapping.
    twin = Authority.root("twin root").client("alice", dns=["alice.clients.example"])
    auth = authenticator(pki, consumer_mappings=(mapping("alice"),))
    decision = auth.authenticate(twin.chain_pem, consumers())
    assert decision.reason is Reason.UNKNOWN_CA


def test_a_deleted_consumer_is_noticed_after_the_cache_ttl(pki):
    clock = types.SimpleNamespace(now=0.0)
    verifier = ChainVerifier(ChainPolicy(anchors=(pki.root.cert,)))
    auth = Authenticator(verifier, AuthPolicy(consumer_mappings=(mapping("alice"),)), consumer_cache_ttl=30,
                         consumer_clock=lambda: clock.now)
    load = consumers()
    assert auth.authenticate(pki.alice.chain_pem, load).consumer["id"] == ALICE_ID
    load.rows = [row for row in load.rows if row["username"] != "alice"]
    clock.now = 29
    assert auth.authenticate(pki.alice.chain_pem, load).allowed and load.calls == ["alice"]
    clock.now = 31
    assert auth.authenticate(pki.alice.chain_pem, load).reason is Reason.NO_CONSUMER
    assert load.calls == ["alice", "alice"]


# -- typed names and name constraints (names taken from the subject) --------------------------------

def test_a_name_of_one_kind_never_matches_a_mapping_of_another(pki):
    """A CN spelled like a mapped SPIFFE ID or DNS name does not map: mappings are typed."""
    spiffe = "spiffe://example.org/ns/payments/sa/alice"
    auth = authenticator(pki, consumer_mappings=(mapping(spiffe, "alice"), mapping("admin.example", "bob")),
                         consumer_by=frozenset())
    for cn in (spiffe, "admin.example"):
        decision = auth.authenticate(pki.client(cn).chain_pem, consumers())
        assert decision.reason is Reason.NO_CONSUMER, cn
    assert auth.policy.consumer_mappings[0].name_type is NameKind.URI
    assert auth.policy.consumer_mappings[1].name_type is NameKind.DNS


def test_consumer_by_compares_usernames_with_cns_only(pki):
    """A DNS name, an email or a URI equal to a username does not log in as that consumer."""
    auth = authenticator(pki, consumer_by=frozenset({"username"}))
    for issued in (pki.client(None, dns=["alice"]), pki.client(None, emails=["alice"]),
                   pki.client(None, uris=["alice://x"])):
        assert auth.authenticate(issued.chain_pem, consumers()).reason is Reason.NO_CONSUMER
    assert auth.authenticate(pki.client("alice").chain_pem, consumers()).consumer["id"] == ALICE_ID


def test_a_cn_only_leaf_of_a_constrained_ca_cannot_claim_another_name(pki):
    """A partner CA constrained to partner.example issues CN=admin without SAN: it must not log in as
    consumer `admin` (auto-match on the CN), nor through a CN mapping; a CN inside the subtree may."""
    partner = pki.root.intermediate("partner CA", name_constraints=x509.NameConstraints(
        [x509.DNSName("partner.example")], None))
    auth = authenticator(pki)
    admin = partner.client("alice")                      # CN-only, outside the permitted subtree
    decision = auth.authenticate(admin.chain_pem, consumers())
    assert not decision.allowed and decision.reason is Reason.OUTSIDE_NAME_CONSTRAINTS, decision.detail
    mapped = authenticator(pki, consumer_mappings=(mapping("alice", "alice", name_type=NameKind.CN),))
    assert mapped.authenticate(admin.chain_pem, consumers()).reason is Reason.OUTSIDE_NAME_CONSTRAINTS
    inside = authenticator(pki, consumer_by=frozenset(), consumer_mappings=(
        mapping("svc.partner.example", "bob", name_type=NameKind.CN),))
    assert inside.authenticate(partner.client("svc.partner.example").chain_pem, consumers()).allowed


def test_an_excluded_subtree_holds_for_the_cn(pki):
    excluded = pki.root.intermediate("no-admin CA", name_constraints=x509.NameConstraints(
        None, [x509.DNSName("admin.example")]))
    mapped = authenticator(pki, consumer_by=frozenset(), consumer_mappings=(
        mapping("x.admin.example", "bob", name_type=NameKind.CN),))
    decision = mapped.authenticate(excluded.client("x.admin.example").chain_pem, consumers())
    assert decision.reason is Reason.OUTSIDE_NAME_CONSTRAINTS
    groups = authenticator(pki, skip_consumer_lookup=True, groups_from=(GroupSource.parse("cn"),))
    assert groups.authenticate(excluded.client("x.admin.example").chain_pem, consumers()).reason \
        is Reason.OUTSIDE_NAME_CONSTRAINTS


def test_a_directory_name_constraint_is_refused_by_the_verifier(pki):
    """cryptography's verifier does not support directoryName constraints: such a CA verifies
    nothing (so no subject attribute can escape one)."""
    org = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Partner")])
    by_dn = pki.root.intermediate("dn CA", name_constraints=x509.NameConstraints(
        [x509.DirectoryName(org)], None))
    decision = authenticator(pki, skip_consumer_lookup=True).authenticate(
        by_dn.client("alice", organization="Partner").chain_pem, consumers())
    assert not decision.allowed and "directoryName" in decision.detail
