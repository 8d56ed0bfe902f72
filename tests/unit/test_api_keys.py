"""api-key-auth core: key format and hashing, the credential table, key extraction, decisions."""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kong_mtls.constants import (
    CONSUMER_HEADERS,
    HEADER_ANONYMOUS_CONSUMER,
    HEADER_CONSUMER_CUSTOM_ID,
    HEADER_CONSUMER_ID,
    HEADER_CONSUMER_USERNAME,
    HEADER_CREDENTIAL_IDENTIFIER,
    HEADER_WWW_AUTHENTICATE,
)
from kong_mtls.core.api_keys import (
    MAX_KEY_LENGTH,
    ApiKeyAuth,
    CredentialTable,
    KeySettings,
    KeySource,
    Outcome,
    Reason,
    SkipReason,
    credential_entry,
    credential_identifier,
    extract_key,
    generate_key,
    hash_key,
    hidden_query_args,
    key_index,
    kong_credential,
    parse_rfc3339,
    pass_mark,
    resolve_client_ip,
    skip_headers,
    upstream_headers,
)
from kong_mtls.core.consumers import ConsumerCache
from kong_mtls.schema import ConfigError

NOW = 1_800_000_000.0
ALICE = {"id": "0f6a1f5e-8a53-4f7e-9d43-6c0d5e2a1b01", "username": "alice", "custom_id": "cust-1"}
BOB = {"id": "0f6a1f5e-8a53-4f7e-9d43-6c0d5e2a1b02", "username": "bob"}
GUEST = {"id": "0f6a1f5e-8a53-4f7e-9d43-6c0d5e2a1b0a", "username": "guest"}
CONSUMERS = [ALICE, BOB, GUEST]
SPKI = "ab" * 32

# Keys are generated once per test session; nothing secret is committed.
PLAIN = generate_key("plain")
EXPIRING = generate_key("expiring")
NETWORK = generate_key("network")
CERT = generate_key("cert")
PINNED = generate_key("pinned")
MIGRATED_KEY = "9f0c1e2d3b4a59687766554433221100"  # the shape of a key-auth generated key
DOTTED_KEY = "plain.looks-like-an-id-but-is-a-legacy-key"  # a legacy key whose prefix is a known id
INDEX_SECRET = "test-deployment-index-secret"  # the config's key_index_secret


def entries() -> list[dict[str, Any]]:
    return [
        credential_entry(PLAIN.key, "alice", "plain"),
        credential_entry(EXPIRING.key, "alice", "expiring", expires_at="2027-01-15T08:01:00Z"),  # NOW + 60 s
        credential_entry(NETWORK.key, "bob", "network", allowed_cidrs=["10.0.0.0/8", "2001:db8::/32"]),
        credential_entry(CERT.key, "alice", "cert", client_cert=True),
        credential_entry(PINNED.key, ALICE["id"], "pinned", client_spki_sha256=[SPKI.upper()]),
        credential_entry(MIGRATED_KEY, "bob", "legacy-1", index_secret=INDEX_SECRET),
        credential_entry(DOTTED_KEY, "bob", "legacy-2", index_secret=INDEX_SECRET),
    ]


ENTRIES = entries()


def make(**config: Any) -> ApiKeyAuth:
    """Query keys on unless a test says otherwise (off by default: URLs end up in logs)."""
    config.setdefault("credentials", ENTRIES)
    config.setdefault("key_in_query", True)
    config.setdefault("key_index_secret", INDEX_SECRET)
    return ApiKeyAuth.from_config(config)


def find_consumer(ref: str) -> dict | None:
    """`kong.client.load_consumer(ref, true)`: by id, then by username."""
    for consumer in CONSUMERS:
        if ref in (consumer["id"], consumer.get("username")):
            return dict(consumer)
    return None


class Req:
    """One request's data, with a record of which loaders the core called."""

    def __init__(self, headers: dict | None = None, query: dict | None = None, body: Any = None,
                 ip_mark: Any = None, forwarded_ip: str = "203.0.113.5", cert_mark: Any = None) -> None:
        self.headers = headers or {}
        self.query = query or {}
        self.body = body
        self.ip_mark = ip_mark
        self.forwarded_ip = forwarded_ip
        self.cert_mark = cert_mark
        self.calls: list[str] = []

    def _load(self, name: str, value: Any):
        def load(*args: Any) -> Any:
            self.calls.append(name)
            return value(*args) if callable(value) else value
        return load

    def run(self, auth: ApiKeyAuth, now: float = NOW):
        return auth.authenticate(
            load_headers=self._load("headers", self.headers),
            load_query=self._load("query", self.query),
            load_body=self._load("body", self.body),
            load_consumer=self._load("consumer", find_consumer),
            load_client_ip=self._load("client_ip", lambda: resolve_client_ip(self.ip_mark,
                                                                            lambda: self.forwarded_ip)),
            load_cert_mark=self._load("cert_mark", self.cert_mark),
            now=now,
        )


def cert_mark(consumer: dict | None = ALICE, verified: bool = True, spki: str = SPKI) -> dict:
    return {"verified": verified, "consumer_id": consumer["id"] if consumer else None,
            "consumer_username": consumer["username"] if consumer else None,
            "anonymous": consumer is None, "spki_sha256": spki, "subject": "CN=alice",
            "fingerprint_sha256": "cd" * 32}


def assert_refused(decision, reason: Reason, message: str = "Unauthorized", status: int = 401) -> None:
    assert decision.outcome is Outcome.REFUSED
    assert decision.reason is reason
    assert (decision.status, decision.message) == (status, message)
    if status == 401:
        assert decision.headers == {HEADER_WWW_AUTHENTICATE: "Key"}


# ====================================================================================================
# Key format, hashing
# ====================================================================================================
def test_generated_key_is_id_dot_256_bit_secret() -> None:
    one, two = generate_key(), generate_key()
    pattern = re.compile(r"^(ak_[0-9a-f]{16})\.([A-Za-z0-9_-]{43})$")
    match = pattern.match(one.key)
    assert match and match.group(1) == one.key_id
    assert pattern.match(two.key) and one.key != two.key and one.key_id != two.key_id
    assert generate_key("team-a_1").key.startswith("team-a_1.")
    with pytest.raises(ValueError):
        generate_key("has.dot")
    assert one.key not in repr(one)


def test_hash_is_salted_hmac_sha256() -> None:
    salt = bytes(range(16))
    text = hash_key("some-key", salt)
    scheme, salt_b64, mac_b64 = text.split(":")
    assert scheme == "hmac-sha256" and salt_b64 == "AAECAwQFBgcICQoLDA0ODw"
    import base64
    import hmac
    mac = base64.urlsafe_b64decode(mac_b64 + "=")
    assert mac == hmac.new(salt, b"some-key", hashlib.sha256).digest()
    # a fresh salt each time: the same key never gives the same stored value twice
    assert hash_key("some-key") != hash_key("some-key")
    assert "some-key" not in text


def test_key_index_is_an_hmac_under_the_deployments_secret() -> None:
    """No table precomputed for one deployment, or for a public prefix, finds keys in another."""
    index = key_index(MIGRATED_KEY, INDEX_SECRET)
    assert re.fullmatch(r"[0-9a-f]{32}", index) and index == key_index(MIGRATED_KEY, INDEX_SECRET)
    assert index == hmac.new(INDEX_SECRET.encode(), MIGRATED_KEY.encode(), hashlib.sha256).hexdigest()[:32]
    assert index != key_index(MIGRATED_KEY, INDEX_SECRET + "x")
    assert index != key_index(MIGRATED_KEY + "x", INDEX_SECRET)


def test_key_index_needs_a_secret_of_sixteen_characters() -> None:
    with pytest.raises(ConfigError, match="key_index_secret"):
        CredentialTable.from_config(ENTRIES)                    # migrated keys, no secret
    with pytest.raises(ConfigError, match="key_index_secret"):
        ApiKeyAuth.from_config({"credentials": ENTRIES, "key_index_secret": "too short"})
    # a config without migrated keys needs none
    assert len(CredentialTable.from_config([credential_entry(PLAIN.key, "alice", "plain")])) == 1


def test_credential_identifier_is_a_stable_uuid5_of_the_key_id() -> None:
    assert credential_identifier("plain") == credential_identifier("plain")
    assert credential_identifier("plain") != credential_identifier("plain2")
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                        credential_identifier("plain"))


@pytest.mark.parametrize(("text", "expected"), [
    ("2027-01-15T08:00:00Z", NOW),
    ("2027-01-15T09:00:00+01:00", NOW),
    ("2027-01-15T07:30:00-00:30", NOW),
    ("2027-01-15t08:00:00.123456789z", NOW + 0.123456),
])
def test_rfc3339_with_offset(text: str, expected: float) -> None:
    assert parse_rfc3339(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["2027-01-15T08:00:00", "2027-01-15", "1800000000",
                                  "2027-13-01T00:00:00Z", ""])
def test_rfc3339_without_offset_or_invalid_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rfc3339(text)


# ====================================================================================================
# Config validation
# ====================================================================================================
def bad(records: list[dict], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        CredentialTable.from_config(records)
    assert info.value.field == field, str(info.value)


def test_config_errors_name_the_field() -> None:
    good = ENTRIES[0]
    bad([good, {**ENTRIES[1], "hash": "sha256:abc"}], "credentials[2].hash")
    bad([{**good, "hash": "hmac-sha256:AAAA:AAAA"}], "credentials[1].hash")  # salt and MAC too short
    bad([{**good, "hash": "hmac-sha256:!!:??"}], "credentials[1].hash")
    bad([good, {**ENTRIES[1], "id": "plain"}], "credentials[2].id")
    bad([{**good, "id": "with.dot"}], "credentials[1].id")
    bad([{**good, "id": None}], "credentials[1].id")
    bad([{**good, "consumer": ""}], "credentials[1].consumer")
    bad([{**good, "expires_at": "2027-01-01 00:00:00"}], "credentials[1].expires_at")
    bad([{**good, "allowed_cidrs": ["10.0.0.0/8", "10.1.2.3/8"]}], "credentials[1].allowed_cidrs[2]")
    bad([{**good, "allowed_cidrs": ["not-an-ip"]}], "credentials[1].allowed_cidrs[1]")
    bad([{**good, "client_spki_sha256": ["abc"]}], "credentials[1].client_spki_sha256[1]")
    bad([{**good, "client_cert": "yes"}], "credentials[1].client_cert")
    bad([{**good, "key_index": "xyz"}], "credentials[1].key_index")
    bad([ENTRIES[5], {**ENTRIES[6], "key_index": ENTRIES[5]["key_index"]}], "credentials[2].key_index")
    bad([good, {**good, "id": "copy"}], "credentials[2].hash")  # the same hash pasted twice
    bad(["not a record"], "credentials[1]")


def test_plugin_level_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"key_names\[2\]"):
        make(key_names=["apikey", "bad name"])
    with pytest.raises(ConfigError, match="key_names"):
        make(key_names=[])
    with pytest.raises(ConfigError, match="realm"):
        make(realm='a"b')
    with pytest.raises(ConfigError, match="key_in_query"):
        make(key_in_query="yes")


def test_credential_entry_normalises_pins_and_keeps_only_the_hash() -> None:
    colons = ":".join(SPKI.upper()[i:i + 2] for i in range(0, 64, 2))
    entry = credential_entry(PINNED.key, "alice", "pinned", client_spki_sha256=[colons])
    assert entry["client_spki_sha256"] == [SPKI]
    assert PINNED.key not in repr(entry) and PINNED.key.split(".", 1)[1] not in repr(entry)


# ====================================================================================================
# Lookup and verification
# ====================================================================================================
TABLE = CredentialTable.from_config(ENTRIES, index_secret=INDEX_SECRET.encode())


def test_lookup_by_id_and_by_index() -> None:
    assert TABLE.match(PLAIN.key).credential.key_id == "plain"
    assert TABLE.match(MIGRATED_KEY).credential.key_id == "legacy-1"
    # a legacy key whose prefix happens to be a known id is still found through its index
    assert TABLE.match(DOTTED_KEY).credential.key_id == "legacy-2"
    assert len(TABLE) == len(ENTRIES)


def test_wrong_secret_with_the_right_id_is_refused() -> None:
    forged = "plain." + generate_key().key.split(".", 1)[1]
    match = TABLE.match(forged)
    assert match.reason is Reason.WRONG_SECRET and match.credential.key_id == "plain"
    # one character off
    last = PLAIN.key[-1]
    match = TABLE.match(PLAIN.key[:-1] + ("A" if last != "A" else "B"))
    assert match.reason is Reason.WRONG_SECRET


def test_unknown_and_malformed_keys() -> None:
    assert TABLE.match(generate_key().key).reason is Reason.UNKNOWN_KEY
    assert TABLE.match("no-dot-and-not-migrated").reason is Reason.UNKNOWN_KEY
    assert TABLE.match("x" * (MAX_KEY_LENGTH + 1)).reason is Reason.MALFORMED_KEY
    assert TABLE.match("\ud800").reason is Reason.MALFORMED_KEY  # not encodable
    # an id-format credential is never found through the index, nor a legacy one through an id
    assert TABLE.match("legacy-1." + MIGRATED_KEY).reason is Reason.UNKNOWN_KEY


def test_key_with_raw_bytes_round_trips() -> None:
    raw = b"caf\xe9-key-\xff".decode("utf-8", "surrogateescape")  # how the server decodes raw bytes
    table = CredentialTable.from_config([credential_entry(raw, "bob", "raw", index_secret=INDEX_SECRET)],
                                        index_secret=INDEX_SECRET.encode())
    assert table.match(raw).credential.key_id == "raw"


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=80))
def test_no_arbitrary_text_matches_or_raises(text: str) -> None:
    match = TABLE.match(text)
    assert match.reason in (Reason.UNKNOWN_KEY, Reason.MALFORMED_KEY, Reason.WRONG_SECRET)


# ====================================================================================================
# Extraction: header, query, form and JSON body; duplicates; hide_credentials
# ====================================================================================================
def test_key_in_header() -> None:
    req = Req(headers={"apikey": [PLAIN.key]})
    decision = req.run(make())
    assert decision.outcome is Outcome.AUTHENTICATED and decision.source is KeySource.HEADER
    assert decision.consumer == ALICE and decision.key_id == "plain"
    assert req.calls == ["headers", "consumer"]  # no query, body, IP or certificate read


def test_query_keys_are_off_by_default() -> None:
    auth = ApiKeyAuth.from_config({"credentials": ENTRIES, "key_index_secret": INDEX_SECRET})
    assert not auth.settings.key_in_query


def test_key_in_query() -> None:
    req = Req(query={"other": ["1"], "apikey": [PLAIN.key]})
    decision = req.run(make())
    assert decision.outcome is Outcome.AUTHENTICATED and decision.source is KeySource.QUERY
    assert "body" not in req.calls


def test_key_in_form_body() -> None:
    req = Req(body={"apikey": PLAIN.key, "field": "x"})
    decision = req.run(make(key_in_body=True))
    assert decision.outcome is Outcome.AUTHENTICATED and decision.source is KeySource.BODY
    assert req.calls == ["headers", "query", "body", "consumer"]


def test_key_in_json_body() -> None:
    req = Req(body={"apikey": MIGRATED_KEY, "data": {"nested": [1, 2]}})
    decision = req.run(make(key_in_body=True))
    assert decision.outcome is Outcome.AUTHENTICATED and decision.consumer == BOB
    assert decision.source is KeySource.BODY


def test_body_is_ignored_unless_enabled_and_non_mappings_read_as_empty() -> None:
    assert_refused(Req(body={"apikey": PLAIN.key}).run(make()), Reason.NO_KEY, "No API key found in request")
    for body in (None, [PLAIN.key], "apikey=" + PLAIN.key, 42):
        assert Req(body=body).run(make(key_in_body=True)).reason is Reason.NO_KEY


def test_header_wins_over_query_and_key_names_are_tried_in_order() -> None:
    req = Req(headers={"apikey": [PLAIN.key]}, query={"apikey": ["garbage"]})
    assert req.run(make()).outcome is Outcome.AUTHENTICATED
    req = Req(headers={"x-api-key": [MIGRATED_KEY]}, query={"token": [PLAIN.key]})
    decision = req.run(make(key_names=["token", "x_api_key"]))
    # "token" comes first and is found in the query before x_api_key's header is considered
    assert decision.key_id == "plain" and decision.source is KeySource.QUERY


def test_header_names_match_like_nginx_but_query_names_exactly() -> None:
    decision = Req(headers={"x-api-key": [PLAIN.key]}).run(make(key_names=["X_Api_Key"]))
    assert decision.outcome is Outcome.AUTHENTICATED
    decision = Req(query={"x-api-key": [PLAIN.key]}).run(make(key_names=["x_api_key"]))
    assert decision.reason is Reason.NO_KEY


def test_places_can_be_switched_off() -> None:
    auth = make(key_in_header=False)
    assert Req(headers={"apikey": [PLAIN.key]}).run(auth).reason is Reason.NO_KEY
    req = Req(headers={"apikey": [PLAIN.key]})
    assert req.run(make(key_in_query=False, key_in_header=False, key_in_body=False)).reason is Reason.NO_KEY
    assert req.calls == []


@pytest.mark.parametrize(("req", "auth_config"), [
    (Req(headers={"apikey": ["a", "b"]}), {}),
    (Req(query={"apikey": ["a", "b"]}), {}),
    (Req(query={"apikey": [True, "a"]}), {}),  # `?apikey&apikey=a`
    (Req(body={"apikey": ["a", "b"]}), {"key_in_body": True}),
    (Req(body={"apikey": {"nested": "object"}}), {"key_in_body": True}),
])
def test_duplicate_key(req: Req, auth_config: dict) -> None:
    assert_refused(req.run(make(**auth_config)), Reason.DUPLICATE_KEY, "Duplicate API key found")


def test_unusable_values_are_skipped_like_key_auth() -> None:
    # `?apikey` (no value) and a JSON number are no key; the search goes on with the next name
    req = Req(query={"apikey": [], "token": [PLAIN.key]})
    assert req.run(make(key_names=["apikey", "token"])).key_id == "plain"
    assert Req(body={"apikey": 12345}).run(make(key_in_body=True)).reason is Reason.NO_KEY


def test_no_key_and_empty_key() -> None:
    assert_refused(Req().run(make()), Reason.NO_KEY, "No API key found in request")
    assert_refused(Req(headers={"apikey": [""]}).run(make()), Reason.NO_KEY, "No API key found in request")


def test_realm_in_www_authenticate() -> None:
    decision = Req().run(make(realm="payments"))
    assert decision.headers == {HEADER_WWW_AUTHENTICATE: 'Key realm="payments"'}


HIDE = KeySettings(key_in_query=True, key_in_body=True, hide_credentials=True)


def test_hide_credentials_header() -> None:
    found = extract_key(HIDE, lambda: {"apikey": [PLAIN.key]}, lambda: {"q": ["1"]}, lambda: {"a": "b"})
    assert found.key == PLAIN.key and found.rewrite.clear_headers == ("apikey",)
    # the query and body hold no key of that name: they are left untouched
    assert found.rewrite.query is None and found.rewrite.body is None


def test_hide_credentials_query() -> None:
    query = {"apikey": [PLAIN.key], "page": ["2"], "flag": [], "multi": ["a", "b"]}
    found = extract_key(HIDE, dict, lambda: query, dict)
    assert found.source is KeySource.QUERY
    assert found.rewrite.query == {"page": ["2"], "flag": True, "multi": ["a", "b"]}


def test_hide_credentials_form_and_json_body() -> None:
    for body in ({"apikey": PLAIN.key, "amount": "10"}, {"apikey": PLAIN.key, "items": [1, {"x": None}]}):
        found = extract_key(HIDE, dict, dict, lambda body=body: body)
        assert found.source is KeySource.BODY
        assert found.rewrite.body == {k: v for k, v in body.items() if k != "apikey"}
        assert PLAIN.key not in repr(found)


def test_hide_credentials_strips_every_copy_of_the_name() -> None:
    # key in the header, another copy in the query and in the body: all three are stripped
    found = extract_key(HIDE, lambda: {"apikey": [PLAIN.key]}, lambda: {"apikey": ["x"]},
                        lambda: {"apikey": "y", "k": "v"})
    assert found.rewrite.query == {} and found.rewrite.body == {"k": "v"}
    # a duplicated key is stripped too (key-auth forwards it when anonymous is set)
    found = extract_key(HIDE, lambda: {"apikey": ["a", "b"]}, dict, dict)
    assert found.duplicate and found.rewrite.clear_headers == ("apikey",)


def test_hide_credentials_off_changes_nothing() -> None:
    found = extract_key(KeySettings(), lambda: {"apikey": [PLAIN.key]}, lambda: {"apikey": ["x"]}, dict)
    assert found.rewrite.clear_headers == () and found.rewrite.query is None


def test_hidden_header_is_removed_in_the_same_set_headers_call() -> None:
    decision = Req(headers={"x-key": [PLAIN.key]}).run(make(key_names=["X_Key"], hide_credentials=True))
    headers = upstream_headers(decision)
    assert headers["x_key"] == [] and headers["x-key"] == []
    assert PLAIN.key not in repr(headers)


# ====================================================================================================
# Expiry, network and certificate bindings
# ====================================================================================================
def test_expired_key() -> None:
    req = Req(headers={"apikey": [EXPIRING.key]})
    assert req.run(make(), now=NOW + 59).outcome is Outcome.AUTHENTICATED
    decision = req.run(make(), now=NOW + 60)
    assert_refused(decision, Reason.KEY_EXPIRED)
    assert decision.key_id == "expiring"


def test_cidr_bound_key_from_inside_and_outside() -> None:
    inside = Req(headers={"apikey": [NETWORK.key]}, forwarded_ip="10.20.30.40")
    assert inside.run(make()).outcome is Outcome.AUTHENTICATED
    assert inside.calls == ["headers", "client_ip", "consumer"]
    assert Req(headers={"apikey": [NETWORK.key]}, forwarded_ip="2001:db8::7").run(make()).consumer == BOB
    assert Req(headers={"apikey": [NETWORK.key]}, forwarded_ip="::ffff:10.0.0.1").run(make()).consumer == BOB
    outside = Req(headers={"apikey": [NETWORK.key]}, forwarded_ip="192.0.2.1")
    decision = outside.run(make())
    assert_refused(decision, Reason.CLIENT_IP_NOT_ALLOWED)
    assert "consumer" not in outside.calls  # refused before any consumer lookup
    unknown = Req(headers={"apikey": [NETWORK.key]}, forwarded_ip="")
    assert_refused(unknown.run(make()), Reason.CLIENT_IP_UNKNOWN)


def test_cidr_binding_reads_addresses_as_ip_allowlist_does() -> None:
    """One parser for addresses and CIDRs (kong_mtls.core.addresses): an IPv4-mapped network in
    allowed_cidrs means the IPv4 network, as in ip-allowlist, instead of matching no client at all."""
    mapped = generate_key("mapped")
    entry = credential_entry(mapped.key, "bob", "mapped", allowed_cidrs=["::ffff:10.0.0.0/104"])
    auth = make(credentials=[entry])
    for client in ("10.1.2.3", "::ffff:10.1.2.3"):
        assert Req(headers={"apikey": [mapped.key]}, forwarded_ip=client).run(auth).consumer == BOB, client
    assert_refused(Req(headers={"apikey": [mapped.key]}, forwarded_ip="11.0.0.1").run(auth),
                   Reason.CLIENT_IP_NOT_ALLOWED)
    with pytest.raises(ConfigError) as info:
        make(credentials=[credential_entry(mapped.key, "bob", "mapped", allowed_cidrs=["010.0.0.0/8"])])
    assert info.value.field == "credential.allowed_cidrs[1]"


def test_cidr_binding_prefers_ip_allowlist_client_ip() -> None:
    mark = {"client_ip": "10.9.9.9", "peer_ip": "192.0.2.1", "source": "header", "trusted": True}
    assert Req(headers={"apikey": [NETWORK.key]}, ip_mark=mark, forwarded_ip="192.0.2.1").run(
        make()).outcome is Outcome.AUTHENTICATED
    mark = {"client_ip": "192.0.2.1", "peer_ip": "192.0.2.1", "source": "peer", "trusted": False}
    assert Req(headers={"apikey": [NETWORK.key]}, ip_mark=mark, forwarded_ip="10.0.0.1").run(
        make()).reason is Reason.CLIENT_IP_NOT_ALLOWED
    assert resolve_client_ip({"client_ip": None}, lambda: "10.0.0.2") == "10.0.0.2"
    assert resolve_client_ip("garbage", lambda: "10.0.0.3") == "10.0.0.3"


def test_cert_bound_key_with_the_matching_consumer() -> None:
    req = Req(headers={"apikey": [CERT.key]}, cert_mark=cert_mark(ALICE))
    assert req.run(make()).outcome is Outcome.AUTHENTICATED
    assert req.calls == ["headers", "consumer", "cert_mark"]


def test_cert_bound_key_with_another_consumer() -> None:
    decision = Req(headers={"apikey": [CERT.key]}, cert_mark=cert_mark(BOB)).run(make())
    assert_refused(decision, Reason.CERT_CONSUMER_MISMATCH)


def test_cert_bound_key_without_a_certificate() -> None:
    assert_refused(Req(headers={"apikey": [CERT.key]}).run(make()), Reason.CERT_MISSING)
    # client-cert-auth let the request through as its anonymous consumer, or only reported
    assert_refused(Req(headers={"apikey": [CERT.key]}, cert_mark=cert_mark(None)).run(make()),
                   Reason.CERT_MISSING)
    report_only = Req(headers={"apikey": [CERT.key]}, cert_mark=cert_mark(ALICE, verified=False))
    assert_refused(report_only.run(make()), Reason.CERT_MISSING)


def test_spki_pinned_key() -> None:
    assert Req(headers={"apikey": [PINNED.key]}, cert_mark=cert_mark(BOB)).run(
        make()).outcome is Outcome.AUTHENTICATED  # pin only: any consumer's certificate with that key
    decision = Req(headers={"apikey": [PINNED.key]}, cert_mark=cert_mark(ALICE, spki="cd" * 32)).run(make())
    assert_refused(decision, Reason.CERT_SPKI_MISMATCH)


def test_consumer_not_found() -> None:
    table = [credential_entry(PLAIN.key, "deleted-consumer", "plain")]
    decision = Req(headers={"apikey": [PLAIN.key]}).run(make(credentials=table))
    assert_refused(decision, Reason.CONSUMER_NOT_FOUND)


# ====================================================================================================
# Anonymous, preflight
# ====================================================================================================
@pytest.mark.parametrize(("req", "reason"), [
    (Req(), Reason.NO_KEY),
    (Req(headers={"apikey": ["plain.wrong"]}), Reason.WRONG_SECRET),
    (Req(headers={"apikey": ["a", "b"]}), Reason.DUPLICATE_KEY),
    (Req(headers={"apikey": [CERT.key]}), Reason.CERT_MISSING),
])
def test_anonymous_consumer_on_any_failure(req: Req, reason: Reason) -> None:
    decision = req.run(make(anonymous="guest"))
    assert decision.outcome is Outcome.ANONYMOUS and decision.reason is reason
    assert decision.consumer == GUEST
    assert kong_credential(decision) is None
    headers = upstream_headers(decision)
    assert headers[HEADER_ANONYMOUS_CONSUMER] == "true" and headers[HEADER_CREDENTIAL_IDENTIFIER] == []
    assert headers[HEADER_CONSUMER_USERNAME] == "guest"
    assert pass_mark(decision) == {"key_id": None, "consumer_id": GUEST["id"], "anonymous": True,
                                   "reason": reason.value}


def test_anonymous_keeps_hide_credentials() -> None:
    req = Req(query={"apikey": ["plain.wrong"], "q": ["1"]})
    decision = req.run(make(anonymous="guest", hide_credentials=True))
    assert decision.outcome is Outcome.ANONYMOUS and decision.rewrite.query == {"q": ["1"]}


def test_missing_anonymous_consumer_is_a_500() -> None:
    decision = Req().run(make(anonymous="nobody"))
    assert decision.outcome is Outcome.REFUSED and decision.reason is Reason.ANONYMOUS_NOT_FOUND
    assert decision.status == 500
    assert decision.message == "An unexpected error occurred" and decision.headers == {}


def test_valid_key_with_anonymous_configured_authenticates() -> None:
    assert Req(headers={"apikey": [PLAIN.key]}).run(make(anonymous="guest")).outcome is Outcome.AUTHENTICATED


def test_preflight() -> None:
    calls: list[str] = []

    def method(value: str):
        return lambda: calls.append("method") or value

    def credential():
        calls.append("credential")

    assert make(run_on_preflight=False).skip_reason(method("OPTIONS"), credential) is SkipReason.PREFLIGHT
    assert make(run_on_preflight=False).skip_reason(method("GET"), credential) is None
    calls.clear()
    # run_on_preflight (the default) never even reads the method; without anonymous, nor the credential
    assert make().skip_reason(method("OPTIONS"), credential) is None and calls == []
    assert pass_mark(skipped=SkipReason.PREFLIGHT) == {"key_id": None, "consumer_id": None,
                                                        "anonymous": False, "reason": "PREFLIGHT"}


def test_already_authenticated_only_matters_with_anonymous() -> None:
    other = {"id": "cred-from-client-cert-auth"}
    skipped = make(anonymous="guest").skip_reason(lambda: "GET", lambda: other)
    assert skipped is SkipReason.ALREADY_AUTHENTICATED
    assert make(anonymous="guest").skip_reason(lambda: "GET", lambda: None) is None
    assert make().skip_reason(lambda: "GET", lambda: other) is None


# ====================================================================================================
# What goes to Kong
# ====================================================================================================
def test_upstream_headers_and_credential_of_an_authenticated_request() -> None:
    decision = Req(headers={"apikey": [PLAIN.key]}).run(make())
    assert upstream_headers(decision) == {
        HEADER_CONSUMER_ID: ALICE["id"],
        HEADER_CONSUMER_CUSTOM_ID: "cust-1",
        HEADER_CONSUMER_USERNAME: "alice",
        HEADER_CREDENTIAL_IDENTIFIER: credential_identifier("plain"),
        HEADER_ANONYMOUS_CONSUMER: [],
        "X-Consumer-Groups": [],            # client-sent copies removed; Kong's acl sets its own
        "X-Authenticated-Groups": [],
    }
    assert kong_credential(decision) == {"id": credential_identifier("plain"),
                                         "consumer": {"id": ALICE["id"]}}
    assert pass_mark(decision) == {"key_id": "plain", "consumer_id": ALICE["id"], "anonymous": False,
                                   "reason": None}
    bob = Req(headers={"apikey": [MIGRATED_KEY]}).run(make())
    assert upstream_headers(bob)[HEADER_CONSUMER_CUSTOM_ID] == []  # removes a client-sent copy


def test_consumer_cache_keeps_hits_and_misses_for_their_ttl() -> None:
    clock = [0.0]
    loads: list[str] = []

    def loader(ref: str):
        loads.append(ref)
        return find_consumer(ref)

    cache = ConsumerCache(60, clock=lambda: clock[0], negative_ttl=10)
    for _ in range(3):
        assert cache.get("alice", loader) == ALICE
        assert cache.get("ghost", loader) is None
    assert loads == ["alice", "ghost"]
    clock[0] = 11  # the miss expired, the hit did not
    cache.get("alice", loader)
    cache.get("ghost", loader)
    assert loads == ["alice", "ghost", "ghost"]
    clock[0] = 61
    cache.get("alice", loader)
    assert loads[-1] == "alice" and len(loads) == 4
    uncached = ConsumerCache(0)
    uncached.get("alice", loader)
    uncached.get("alice", loader)
    assert len(loads) == 6
    # a malformed answer is a miss
    assert ConsumerCache(60).get("x", lambda r: {"username": "no id"}) is None


# ====================================================================================================
# The secret never shows
# ====================================================================================================
def secret_scenarios():
    forged = "plain." + generate_key().key.split(".", 1)[1]
    auth = make(hide_credentials=True, key_in_body=True)
    yield PLAIN.key, Req(headers={"apikey": [PLAIN.key]}), auth
    yield forged, Req(query={"apikey": [forged]}), auth
    yield EXPIRING.key, Req(body={"apikey": EXPIRING.key}), auth
    yield NETWORK.key, Req(headers={"apikey": [NETWORK.key]}, forwarded_ip="192.0.2.1"), auth
    yield CERT.key, Req(headers={"apikey": [CERT.key]}, cert_mark=cert_mark(BOB)), auth
    yield MIGRATED_KEY, Req(headers={"apikey": [MIGRATED_KEY + "x"]}), auth
    yield forged, Req(headers={"apikey": [forged]}), make(anonymous="guest", hide_credentials=True)


def test_decisions_never_carry_the_secret() -> None:
    for key, req, auth in secret_scenarios():
        secret = key.split(".", 1)[-1][:16]
        decision = req.run(auth, now=NOW + 120)
        passed = decision.outcome is not Outcome.REFUSED
        rendered = " ".join([repr(decision), str(decision), decision.log_detail(),
                             repr(upstream_headers(decision)) if passed else "",
                             repr(pass_mark(decision)) if passed else ""])
        assert secret not in rendered, decision.reason


def test_skip_headers_strip_forged_identity_only_on_an_unauthenticated_preflight() -> None:
    forged = {name: [] for name in (*CONSUMER_HEADERS, "X-Consumer-Groups", "X-Authenticated-Groups")}
    plain = KeySettings()
    assert skip_headers(SkipReason.PREFLIGHT, lambda: None, plain) == forged
    assert skip_headers(SkipReason.PREFLIGHT, lambda: "junk", plain) == forged
    # after an earlier plugin authenticated the request, its headers stand
    assert skip_headers(SkipReason.PREFLIGHT, lambda: {"id": "c1"}, plain) is None
    assert skip_headers(SkipReason.ALREADY_AUTHENTICATED, lambda: None, plain) is None


def test_hide_credentials_strips_the_key_of_a_skipped_request_too() -> None:
    hide = KeySettings(key_names=("apikey", "x-key"), key_in_query=True, hide_credentials=True)
    assert skip_headers(SkipReason.ALREADY_AUTHENTICATED, lambda: None, hide) == {"apikey": [], "x-key": []}
    assert hidden_query_args(hide) == ("apikey", "x-key")
    assert hidden_query_args(KeySettings(hide_credentials=True)) == ()     # query keys not read
    assert hidden_query_args(KeySettings(key_in_query=True)) == ()         # hide_credentials off
