"""API keys that are never stored in plaintext, optionally bound to a network or a client certificate.

Pure core of the `api-key-auth` plugin: plain data in, immutable decisions out. The request surface
mirrors Kong's bundled `key-auth` (Kong/kong 3.9 `kong/plugins/key-auth/handler.lua`): the same key
names and places, the same search order (per name: header, then query, then body), the same 401
messages and `WWW-Authenticate` value, the same anonymous "logical OR" and preflight rules.

What differs is the credential store. Credentials live in the plugin config as hashes:

* a new key reads `<key id>.<secret>`: the id gives an O(1) lookup, the secret is 256 random bits;
* a key migrated from `key-auth` has no id in it, so the credential carries a `key_index`, a
  truncated SHA-256 of the key under a fixed domain prefix, for the same O(1) lookup;
* every credential stores `hmac-sha256:<salt>:<mac>` = HMAC-SHA256(salt, key), compared in constant
  time. Keys are high-entropy random secrets, so a fast keyed construction is the right tool: a
  password KDF (bcrypt, scrypt, argon2) would add milliseconds to every request and protect nothing
  that 256 random bits do not already protect.

Nothing here logs, and no decision, refusal or exception carries the presented key.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import hashlib
import hmac
import re
import secrets
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from kong_mtls.constants import (
    CONSUMER_HEADERS,
    GROUP_HEADERS,
    HEADER_ANONYMOUS_CONSUMER,
    HEADER_CONSUMER_CUSTOM_ID,
    HEADER_CONSUMER_ID,
    HEADER_CONSUMER_USERNAME,
    HEADER_CREDENTIAL_IDENTIFIER,
    HEADER_WWW_AUTHENTICATE,
    MESSAGE_UNEXPECTED,
)
from kong_mtls.core.addresses import IPNetwork, parse_ip, parse_network
from kong_mtls.core.chain import normalize_sha256
from kong_mtls.core.consumers import LoadConsumer, is_consumer
from kong_mtls.schema import ConfigError

# -- client-facing messages (Kong 3.9 key-auth handler.lua) -----------------------------------------
MESSAGE_NO_KEY = "No API key found in request"
MESSAGE_DUPLICATE_KEY = "Duplicate API key found"
MESSAGE_INVALID = "Unauthorized"

# -- key and hash format ----------------------------------------------------------------------------
HASH_SCHEME = "hmac-sha256"
KEY_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
KEY_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")  # Kong's typedefs.header_name
GENERATED_ID_PREFIX = "ak_"
SECRET_BYTES = 32
SALT_BYTES = 16
MAC_BYTES = 32
KEY_INDEX_BYTES = 16
#: Longer presented keys are refused without hashing them (a body can carry megabytes).
MAX_KEY_LENGTH = 1024
#: `key_index` is an HMAC of the key under the deployment's `key_index_secret`: with a fixed key,
#: one precomputed table would find weak migrated keys in every deployment's config.
MIN_INDEX_SECRET_CHARS = 16
#: Namespace of the credential ids given to Kong (`kong.client.authenticate`, X-Credential-Identifier).
CREDENTIAL_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:kong-mtls:api-key-auth:credential")

_INDEX_PATTERN = re.compile(r"^[0-9a-f]{32}$")
_RFC3339 = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})$"
)


class Reason(str, Enum):
    """Why a request did not authenticate with its key (logged; never sent to the client)."""

    NO_KEY = "NO_KEY"
    DUPLICATE_KEY = "DUPLICATE_KEY"
    MALFORMED_KEY = "MALFORMED_KEY"
    UNKNOWN_KEY = "UNKNOWN_KEY"
    WRONG_SECRET = "WRONG_SECRET"
    KEY_EXPIRED = "KEY_EXPIRED"
    CLIENT_IP_UNKNOWN = "CLIENT_IP_UNKNOWN"
    CLIENT_IP_NOT_ALLOWED = "CLIENT_IP_NOT_ALLOWED"
    CERT_MISSING = "CERT_MISSING"
    CERT_CONSUMER_MISMATCH = "CERT_CONSUMER_MISMATCH"
    CERT_SPKI_MISMATCH = "CERT_SPKI_MISMATCH"
    CONSUMER_NOT_FOUND = "CONSUMER_NOT_FOUND"
    ANONYMOUS_NOT_FOUND = "ANONYMOUS_NOT_FOUND"


class SkipReason(str, Enum):
    """Why the plugin let a request through without looking for a key (as key-auth does)."""

    PREFLIGHT = "PREFLIGHT"
    ALREADY_AUTHENTICATED = "ALREADY_AUTHENTICATED"


class Outcome(str, Enum):
    AUTHENTICATED = "AUTHENTICATED"
    ANONYMOUS = "ANONYMOUS"
    REFUSED = "REFUSED"


class KeySource(str, Enum):
    HEADER = "header"
    QUERY = "query"
    BODY = "body"


# ====================================================================================================
# Keys and hashes
# ====================================================================================================
@dataclass(frozen=True)
class NewKey:
    key_id: str
    key: str = field(repr=False)


def new_key_id(prefix: str = GENERATED_ID_PREFIX) -> str:
    return prefix + secrets.token_hex(8)


def generate_key(key_id: str | None = None) -> NewKey:
    """A new random key `<key id>.<secret>` (256-bit secret, base64url)."""
    key_id = new_key_id() if key_id is None else key_id
    if not KEY_ID_PATTERN.fullmatch(key_id):
        raise ValueError("a key id is 1 to 64 characters among A-Z a-z 0-9 _ -")
    return NewKey(key_id, f"{key_id}.{secrets.token_urlsafe(SECRET_BYTES)}")


def key_bytes(key: str) -> bytes | None:
    """The bytes of a presented key (the plugin server decodes Kong's strings with
    surrogateescape, so this gives back the exact bytes); None if unusable or too long."""
    if not isinstance(key, str) or len(key) > MAX_KEY_LENGTH:
        return None
    try:
        data = key.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return None
    return data if len(data) <= MAX_KEY_LENGTH else None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(salt: bytes, data: bytes) -> bytes:
    return hmac.new(salt, data, hashlib.sha256).digest()


def hash_key(key: str, salt: bytes | None = None) -> str:
    """`hmac-sha256:<salt>:<mac>` for a key, with a fresh random salt unless one is given."""
    data = key_bytes(key)
    if data is None or not data:
        raise ValueError(f"an API key is 1 to {MAX_KEY_LENGTH} bytes")
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    return f"{HASH_SCHEME}:{_b64(salt)}:{_b64(_mac(salt, data))}"


def key_index(key: str, secret: str) -> str:
    """The lookup index of a key that has no id in it (keys migrated from key-auth), under the
    deployment's `key_index_secret`."""
    data = key_bytes(key)
    if data is None or not data:
        raise ValueError(f"an API key is 1 to {MAX_KEY_LENGTH} bytes")
    return _index_of(data, index_secret(secret))


def index_secret(secret: object, where: str = "key_index_secret") -> bytes:
    """The HMAC key of `key_index`; ConfigError unless a string of MIN_INDEX_SECRET_CHARS or more."""
    if not isinstance(secret, str) or len(secret) < MIN_INDEX_SECRET_CHARS or not secret.isprintable() \
            or secret != secret.strip():
        raise ConfigError(where, f"a printable secret of {MIN_INDEX_SECRET_CHARS} or more characters, "
                                 "no surrounding spaces (the same in every config that holds migrated keys)")
    return secret.encode()


def _index_of(data: bytes, secret: bytes) -> str:
    return hmac.new(secret, data, hashlib.sha256).digest()[:KEY_INDEX_BYTES].hex()


def credential_identifier(key_id: str) -> str:
    """The stable credential id given to Kong and sent upstream as X-Credential-Identifier."""
    return str(uuid.uuid5(CREDENTIAL_NAMESPACE, key_id))


def parse_rfc3339(text: str) -> float:
    """Epoch seconds of an RFC 3339 date-time with an explicit offset (`Z` or `+hh:mm`)."""
    match = _RFC3339.fullmatch(text) if isinstance(text, str) else None
    if not match:
        raise ValueError("expected an RFC 3339 date-time with an offset, e.g. 2026-01-31T00:00:00Z")
    day, clock, fraction, offset = match.groups()
    fraction = ((fraction or "") + "000000")[:6]
    offset = "+00:00" if offset in ("Z", "z") else offset
    try:
        return dt.datetime.fromisoformat(f"{day}T{clock}.{fraction}{offset}").timestamp()
    except ValueError as exc:
        raise ValueError(f"not a valid date-time: {exc}") from None


# ====================================================================================================
# Credentials
# ====================================================================================================
@dataclass(frozen=True)
class Credential:
    """One configured credential. Salt and MAC are kept out of repr (no secret, but no need)."""

    key_id: str
    consumer: str
    salt: bytes = field(repr=False)
    mac: bytes = field(repr=False)
    key_index: str | None = None
    expires_at: float | None = None
    allowed_networks: tuple[IPNetwork, ...] = ()
    client_cert: bool = False
    spki_pins: frozenset[str] = frozenset()

    @functools.cached_property
    def credential_id(self) -> str:
        return credential_identifier(self.key_id)

    @property
    def needs_client_ip(self) -> bool:
        return bool(self.allowed_networks)

    @property
    def needs_certificate(self) -> bool:
        return self.client_cert or bool(self.spki_pins)

    def verify(self, data: bytes) -> bool:
        return hmac.compare_digest(_mac(self.salt, data), self.mac)


_DUMMY = Credential(key_id="-", consumer="-", salt=bytes(SALT_BYTES), mac=bytes(MAC_BYTES))


@dataclass(frozen=True)
class KeyMatch:
    """The credential a key selected (kept on WRONG_SECRET/KEY_EXPIRED to log its id), or why none."""

    credential: Credential | None
    reason: Reason | None


class CredentialTable:
    """All credentials of one plugin instance, indexed once: O(1) lookup by key id or key index."""

    def __init__(self, credentials: Sequence[Credential], index_secret: bytes | None = None) -> None:
        self._by_id = {c.key_id: c for c in credentials}
        self._by_index = {c.key_index: c for c in credentials if c.key_index is not None}
        if self._by_index and index_secret is None:
            raise ConfigError("key_index_secret", "required when a credential has a key_index")
        self._index_secret = index_secret or b""

    def __len__(self) -> int:
        return len(self._by_id)

    @classmethod
    def from_config(cls, records: Sequence[Mapping[str, Any]] | None, where: str = "credentials",
                    index_secret: bytes | None = None) -> CredentialTable:
        """Validate every record; ConfigError names the field, e.g. `credentials[2].hash`."""
        if records is None:
            records = []
        if not isinstance(records, Sequence) or isinstance(records, (str, bytes)):
            raise ConfigError(where, "expected an array")
        credentials: list[Credential] = []
        seen_ids: dict[str, int] = {}
        seen_index: dict[str, int] = {}
        seen_hash: dict[bytes, int] = {}
        for i, record in enumerate(records, start=1):
            here = f"{where}[{i}]"
            credential = parse_credential(record, here)
            for seen, value, name in ((seen_ids, credential.key_id, "id"),
                                      (seen_index, credential.key_index, "key_index"),
                                      (seen_hash, credential.mac, "hash")):
                if value is None:
                    continue
                if value in seen:
                    raise ConfigError(f"{here}.{name}", f"same {name} as {where}[{seen[value]}]")
                seen[value] = i
            credentials.append(credential)
        return cls(credentials, index_secret)

    def match(self, key: str) -> KeyMatch:
        """Find and verify the credential of a presented key (expiry is checked by the caller)."""
        data = key_bytes(key)
        if data is None:
            return KeyMatch(None, Reason.MALFORMED_KEY)
        candidates: list[Credential] = []
        key_id, dot, _ = key.partition(".")
        if dot:
            by_id = self._by_id.get(key_id)
            if by_id is not None and by_id.key_index is None:
                candidates.append(by_id)
        if self._by_index:
            by_index = self._by_index.get(_index_of(data, self._index_secret))
            if by_index is not None:
                candidates.append(by_index)
        if not candidates:
            _DUMMY.verify(data)  # the same work as a wrong secret: no timing hint of which ids exist
            return KeyMatch(None, Reason.UNKNOWN_KEY)
        for credential in candidates:
            if credential.verify(data):
                return KeyMatch(credential, None)
        return KeyMatch(candidates[0], Reason.WRONG_SECRET)


def parse_credential(record: Any, where: str) -> Credential:
    if not isinstance(record, Mapping):
        raise ConfigError(where, "expected a record")

    def text(name: str, required: bool = False) -> str | None:
        value = record.get(name)
        if value is None or value == "":
            if required:
                raise ConfigError(f"{where}.{name}", "required field missing")
            return None
        if not isinstance(value, str):
            raise ConfigError(f"{where}.{name}", "expected a string")
        return value

    def texts(name: str) -> list[str]:
        value = record.get(name)
        if value is None or (isinstance(value, Mapping) and not value):
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}.{name}", "expected an array of strings")
        return value

    key_id = text("id", required=True)
    if not KEY_ID_PATTERN.fullmatch(key_id):
        raise ConfigError(f"{where}.id", "1 to 64 characters among A-Z a-z 0-9 _ -")
    salt, mac = _parse_hash(text("hash", required=True), f"{where}.hash")
    consumer = text("consumer", required=True)
    index = text("key_index")
    if index is not None:
        index = index.lower()
        if not _INDEX_PATTERN.fullmatch(index):
            raise ConfigError(f"{where}.key_index", "expected 32 hex digits as printed by "
                                                    "`kong-mtls api-key hash`")
    expires_at = text("expires_at")
    try:
        expires = parse_rfc3339(expires_at) if expires_at is not None else None
    except ValueError as exc:
        raise ConfigError(f"{where}.expires_at", str(exc)) from None
    networks = []
    for j, cidr in enumerate(texts("allowed_cidrs"), start=1):
        try:
            networks.append(parse_network(cidr))
        except ValueError as exc:
            raise ConfigError(f"{where}.allowed_cidrs[{j}]", str(exc)) from None
    pins = []
    for j, pin in enumerate(texts("client_spki_sha256"), start=1):
        try:
            pins.append(normalize_sha256(pin))
        except ValueError as exc:
            raise ConfigError(f"{where}.client_spki_sha256[{j}]", str(exc)) from None
    client_cert = record.get("client_cert")
    if client_cert is None:
        client_cert = False
    if not isinstance(client_cert, bool):
        raise ConfigError(f"{where}.client_cert", "expected a boolean")
    return Credential(key_id=key_id, consumer=consumer, salt=salt, mac=mac, key_index=index,
                      expires_at=expires, allowed_networks=tuple(networks), client_cert=client_cert,
                      spki_pins=frozenset(pins))


def _parse_hash(value: str, where: str) -> tuple[bytes, bytes]:
    problem = f"expected {HASH_SCHEME}:<salt>:<mac> as printed by `kong-mtls api-key new` or `hash`"
    scheme, _, rest = value.partition(":")
    salt_text, _, mac_text = rest.partition(":")
    if scheme != HASH_SCHEME:
        raise ConfigError(where, problem)
    try:
        salt, mac = _unb64(salt_text), _unb64(mac_text)
    except (ValueError, binascii.Error):
        raise ConfigError(where, problem) from None
    if len(salt) < SALT_BYTES or len(mac) != MAC_BYTES:
        raise ConfigError(where, f"{problem} (salt of {SALT_BYTES}+ bytes, MAC of {MAC_BYTES} bytes)")
    return salt, mac


def credential_entry(key: str, consumer: str, key_id: str, *, index_secret: str | None = None,
                     expires_at: str | None = None, allowed_cidrs: Sequence[str] = (),
                     client_cert: bool = False, client_spki_sha256: Sequence[str] = ()) -> dict[str, Any]:
    """The config record for a key (what the CLI prints); validated like the plugin validates it.
    With `index_secret` (a key migrated from key-auth, without an id), it carries a `key_index`."""
    entry: dict[str, Any] = {"id": key_id, "hash": hash_key(key), "consumer": consumer}
    if index_secret is not None:
        entry["key_index"] = key_index(key, index_secret)
    if expires_at is not None:
        entry["expires_at"] = expires_at
    if allowed_cidrs:
        entry["allowed_cidrs"] = list(allowed_cidrs)
    if client_cert:
        entry["client_cert"] = True
    if client_spki_sha256:
        entry["client_spki_sha256"] = list(client_spki_sha256)
    credential = parse_credential(entry, "credential")
    if client_spki_sha256:
        entry["client_spki_sha256"] = sorted(credential.spki_pins)
    return entry


# ====================================================================================================
# Finding the key in a request
# ====================================================================================================
@dataclass(frozen=True)
class HideRewrite:
    """How to strip the key before proxying (`hide_credentials`), as data for the adapter.

    `clear_headers` are removed in the same `set_headers` call as the consumer headers; `query` and
    `body` are the whole new query / body for `set_query` / `set_body`, or None when unchanged.
    """

    clear_headers: tuple[str, ...] = ()
    query: Mapping[str, Any] | None = None
    body: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Extraction:
    key: str | None = field(default=None, repr=False)
    source: KeySource | None = None
    name: str | None = None
    duplicate: bool = False
    rewrite: HideRewrite = HideRewrite()


@dataclass(frozen=True)
class KeySettings:
    key_names: tuple[str, ...] = ("apikey",)
    key_in_header: bool = True
    key_in_query: bool = False
    key_in_body: bool = False
    hide_credentials: bool = False


_ABSENT, _SINGLE, _DUPLICATE, _UNUSABLE = range(4)


def _classify(value: Any) -> tuple[int, str | None]:
    """key-auth's reading of a value: a Lua string is a key, a table a duplicate, anything else
    (an argument without value, a JSON number ...) present but unusable."""
    if value is None:
        return _ABSENT, None
    if isinstance(value, str):
        return _SINGLE, value
    if isinstance(value, (list, tuple)):
        # Kong sends header and query values as lists (`fix_mmap`); a query flag is an empty list.
        if len(value) == 1:
            return (_SINGLE, value[0]) if isinstance(value[0], str) else (_UNUSABLE, None)
        return (_DUPLICATE, None) if value else (_UNUSABLE, None)
    if isinstance(value, Mapping):
        return _DUPLICATE, None
    return _UNUSABLE, None


def _header_lookup(headers: Mapping[str, Any], name: str) -> tuple[Any, str]:
    """nginx's header table: lower-case names; a miss retries with `_` turned into `-`."""
    normalized = name.lower().replace("_", "-")
    for candidate in (name, name.lower(), normalized):
        if candidate in headers:
            return headers[candidate], candidate
    return None, normalized


class _Lazy:
    """Calls a loader at most once; anything but a mapping reads as empty."""

    def __init__(self, loader: Callable[[], Any]) -> None:
        self._loader = loader
        self._value: Mapping[str, Any] | None = None

    def get(self) -> Mapping[str, Any]:
        if self._value is None:
            value = self._loader()
            self._value = value if isinstance(value, Mapping) else {}
        return self._value


def extract_key(settings: KeySettings, load_headers: Callable[[], Any], load_query: Callable[[], Any],
                load_body: Callable[[], Any]) -> Extraction:
    """Find the key as key-auth does, reading the query and the body only when needed.

    For each name in `key_names`: the header, then the query, then the body; the first string
    wins, and a repeated value is a duplicate. `hide_credentials` strips the name from the header,
    query and body (key-auth strips an invalid key too, which matters with `anonymous`; unlike
    key-auth it also strips a duplicated key).
    """
    headers = _Lazy(load_headers)
    query = _Lazy(load_query)
    body = _Lazy(load_body)
    for name in settings.key_names:
        kind, value, source = _ABSENT, None, None
        if settings.key_in_header:
            kind, value = _classify(_header_lookup(headers.get(), name)[0])
            source = KeySource.HEADER
        if kind == _ABSENT and settings.key_in_query:
            kind, value = _classify(query.get().get(name))
            source = KeySource.QUERY
        if kind == _ABSENT and settings.key_in_body:
            kind, value = _classify(body.get().get(name))
            source = KeySource.BODY
        if kind == _SINGLE:
            return Extraction(key=value, source=source, name=name,
                              rewrite=_hide(settings, name, headers, query, body))
        if kind == _DUPLICATE:
            return Extraction(source=source, name=name, duplicate=True,
                              rewrite=_hide(settings, name, headers, query, body))
    return Extraction()


def _hide(settings: KeySettings, name: str, headers: _Lazy, query: _Lazy, body: _Lazy) -> HideRewrite:
    if not settings.hide_credentials:
        return HideRewrite()
    clear = tuple(dict.fromkeys((name.lower(), name.lower().replace("_", "-"))))
    new_query = None
    if settings.key_in_query and name in query.get():
        # set_query takes Lua values: an argument without value (an empty list here) is `true`.
        new_query = {k: (True if isinstance(v, list) and not v else v)
                     for k, v in query.get().items() if k != name}
    new_body = None
    if settings.key_in_body and name in body.get():
        new_body = {k: v for k, v in body.get().items() if k != name}
    return HideRewrite(clear_headers=clear, query=new_query, body=new_body)


# ====================================================================================================
# Bindings
# ====================================================================================================
def resolve_client_ip(ip_allowlist_mark: Any, load_forwarded_ip: Callable[[], Any]) -> Any:
    """ip-allowlist's resolved client address when it ran, else Kong's forwarded address."""
    if isinstance(ip_allowlist_mark, Mapping):
        client_ip = ip_allowlist_mark.get("client_ip")
        if isinstance(client_ip, str) and client_ip:
            return client_ip
    return load_forwarded_ip()


def check_network(credential: Credential, client_ip: Any) -> Reason | None:
    ip = parse_ip(client_ip)
    if ip is None:
        return Reason.CLIENT_IP_UNKNOWN
    if any(ip in network for network in credential.allowed_networks):
        return None
    return Reason.CLIENT_IP_NOT_ALLOWED


def check_certificate(credential: Credential, consumer_id: Any, cert_mark: Any) -> Reason | None:
    """The client-cert-auth verdict must be a verified certificate of the same consumer (`client_cert`)
    and/or one whose SPKI is pinned (`client_spki_sha256`)."""
    if (not isinstance(cert_mark, Mapping) or cert_mark.get("verified") is not True
            or cert_mark.get("anonymous") is True):
        return Reason.CERT_MISSING
    if credential.client_cert and (not consumer_id or cert_mark.get("consumer_id") != consumer_id):
        return Reason.CERT_CONSUMER_MISMATCH
    if credential.spki_pins:
        spki = cert_mark.get("spki_sha256")
        if not isinstance(spki, str) or spki.lower() not in credential.spki_pins:
            return Reason.CERT_SPKI_MISMATCH
    return None


# ====================================================================================================
# Decisions
# ====================================================================================================
@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    reason: Reason | None = None
    status: int = 200
    message: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    credential: Credential | None = None
    consumer: Mapping[str, Any] | None = None
    source: KeySource | None = None
    rewrite: HideRewrite = HideRewrite()

    @property
    def key_id(self) -> str | None:
        return self.credential.key_id if self.credential is not None else None

    def log_detail(self) -> str:
        """What the refusal log line says besides the reason: never any part of the key."""
        parts = []
        if self.key_id is not None:
            parts.append(f"key_id={self.key_id}")
        if self.source is not None:
            parts.append(f"source={self.source.value}")
        return " ".join(parts)




@dataclass(frozen=True)
class ApiKeyAuth:
    """Everything one plugin instance decides, built once from its validated config."""

    settings: KeySettings
    credentials: CredentialTable
    anonymous: str | None = None
    run_on_preflight: bool = True
    realm: str | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ApiKeyAuth:
        names = config.get("key_names")
        names = KeySettings.key_names if names is None else tuple(names)
        if not names:
            raise ConfigError("key_names", "at least one key name is required")
        for i, name in enumerate(names, start=1):
            if not isinstance(name, str) or not KEY_NAME_PATTERN.fullmatch(name):
                raise ConfigError(f"key_names[{i}]", "a key name is made of A-Z a-z 0-9 _ -")
        realm = config.get("realm") or None
        if realm is not None and (not isinstance(realm, str)
                                  or re.search(r'["\\\x00-\x1f\x7f]', realm)):
            raise ConfigError("realm", "no quotes, backslashes or control characters")
        anonymous = config.get("anonymous") or None
        if anonymous is not None and not isinstance(anonymous, str):
            raise ConfigError("anonymous", "expected a consumer id or username")
        settings = KeySettings(
            key_names=names,
            key_in_header=_flag(config, "key_in_header", True),
            key_in_query=_flag(config, "key_in_query", False),
            key_in_body=_flag(config, "key_in_body", False),
            hide_credentials=_flag(config, "hide_credentials", False),
        )
        secret = config.get("key_index_secret")
        credentials = CredentialTable.from_config(
            config.get("credentials"), index_secret=index_secret(secret) if secret is not None else None)
        return cls(settings=settings, credentials=credentials,
                   anonymous=anonymous, run_on_preflight=_flag(config, "run_on_preflight", True),
                   realm=realm)

    @property
    def www_authenticate(self) -> str:
        return f'Key realm="{self.realm}"' if self.realm else "Key"

    def skip_reason(self, load_method: Callable[[], Any],
                    load_credential: Callable[[], Any]) -> SkipReason | None:
        """key-auth's two early exits: an unauthenticated preflight, and (only with `anonymous`)
        a request another auth plugin already authenticated."""
        if not self.run_on_preflight and load_method() == "OPTIONS":
            return SkipReason.PREFLIGHT
        if self.anonymous is not None and load_credential():
            return SkipReason.ALREADY_AUTHENTICATED
        return None

    def authenticate(self, *, load_headers: Callable[[], Any], load_query: Callable[[], Any],
                     load_body: Callable[[], Any], load_consumer: LoadConsumer,
                     load_client_ip: Callable[[], Any], load_cert_mark: Callable[[], Any],
                     now: float | None = None) -> Decision:
        """The verdict for one request; each loader is called only when its data is needed."""
        found = extract_key(self.settings, load_headers, load_query, load_body)
        decision = self._verify(found, load_consumer, load_client_ip, load_cert_mark,
                                time.time() if now is None else now)
        if decision.outcome is not Outcome.REFUSED or self.anonymous is None:
            return decision
        # logical OR (key-auth with `anonymous`): any failure lets the anonymous consumer through.
        consumer = load_consumer(self.anonymous)
        if not is_consumer(consumer):
            return Decision(Outcome.REFUSED, Reason.ANONYMOUS_NOT_FOUND, 500, MESSAGE_UNEXPECTED,
                            credential=decision.credential, source=decision.source)
        return Decision(Outcome.ANONYMOUS, decision.reason, credential=decision.credential,
                        consumer=consumer, source=decision.source, rewrite=found.rewrite)

    def _verify(self, found: Extraction, load_consumer: LoadConsumer, load_client_ip: Callable[[], Any],
                load_cert_mark: Callable[[], Any], now: float) -> Decision:
        if found.duplicate:
            return self._refuse(Reason.DUPLICATE_KEY, MESSAGE_DUPLICATE_KEY, found)
        if not found.key:
            return self._refuse(Reason.NO_KEY, MESSAGE_NO_KEY, found)
        match = self.credentials.match(found.key)
        credential = match.credential
        if match.reason is not None:
            return self._refuse(match.reason, MESSAGE_INVALID, found, credential)
        if credential.expires_at is not None and now >= credential.expires_at:
            return self._refuse(Reason.KEY_EXPIRED, MESSAGE_INVALID, found, credential)
        if credential.needs_client_ip:
            reason = check_network(credential, load_client_ip())
            if reason is not None:
                return self._refuse(reason, MESSAGE_INVALID, found, credential)
        consumer = load_consumer(credential.consumer)
        if not is_consumer(consumer):
            return self._refuse(Reason.CONSUMER_NOT_FOUND, MESSAGE_INVALID, found, credential)
        if credential.needs_certificate:
            reason = check_certificate(credential, consumer.get("id"), load_cert_mark())
            if reason is not None:
                return self._refuse(reason, MESSAGE_INVALID, found, credential)
        return Decision(Outcome.AUTHENTICATED, credential=credential, consumer=consumer,
                        source=found.source, rewrite=found.rewrite)

    def _refuse(self, reason: Reason, message: str, found: Extraction,
                credential: Credential | None = None) -> Decision:
        return Decision(Outcome.REFUSED, reason, 401, message,
                        headers={HEADER_WWW_AUTHENTICATE: self.www_authenticate},
                        credential=credential, source=found.source)


def _flag(config: Mapping[str, Any], name: str, default: bool) -> bool:
    value = config.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(name, "expected a boolean")
    return value


# ====================================================================================================
# What the adapter sends to Kong
# ====================================================================================================
def upstream_headers(decision: Decision) -> dict[str, Any]:
    """All header changes of a pass, for ONE `kong.service.request.set_headers` call.

    An empty list removes a header: client-sent copies of the consumer headers never reach the
    upstream, nor does the key when `hide_credentials` is on.
    """
    consumer = decision.consumer or {}
    authenticated = decision.outcome is Outcome.AUTHENTICATED and decision.credential is not None
    headers: dict[str, Any] = {
        HEADER_CONSUMER_ID: consumer.get("id") or [],
        HEADER_CONSUMER_CUSTOM_ID: consumer.get("custom_id") or [],
        HEADER_CONSUMER_USERNAME: consumer.get("username") or [],
        HEADER_CREDENTIAL_IDENTIFIER: decision.credential.credential_id if authenticated else [],
        HEADER_ANONYMOUS_CONSUMER: "true" if decision.outcome is Outcome.ANONYMOUS else [],
        **{name: [] for name in GROUP_HEADERS},  # Kong's acl sets its own after us
    }
    taken = {name.lower() for name in headers}
    for name in decision.rewrite.clear_headers:
        if name not in taken:
            headers[name] = []
    return headers


def skip_headers(skipped: SkipReason, load_consumer_of_request: Callable[[], Any],
                 settings: KeySettings) -> dict[str, Any] | None:
    """Header changes for a request let through without looking for a key, or None.

    After another plugin authenticated the request, its consumer headers stand. A preflight that no
    plugin authenticated gets the client-sent copies of the consumer headers removed: the mark lets
    it past the guard, and the upstream must never see forged identity headers under it. With
    `hide_credentials`, a key in a header is removed either way (`hidden_query_args` for the query).
    """
    headers: dict[str, Any] = {}
    if settings.hide_credentials and settings.key_in_header:
        headers.update((name, []) for name in settings.key_names)
    if skipped is SkipReason.PREFLIGHT and not is_consumer(load_consumer_of_request()):
        headers.update((name, []) for name in (*CONSUMER_HEADERS, *GROUP_HEADERS))
    return headers or None


def hidden_query_args(settings: KeySettings) -> tuple[str, ...]:
    """Query arguments to clear on a request let through without looking for a key: the key names
    with `hide_credentials` and `key_in_query` (a key in the body stays: reading it costs a body read)."""
    return settings.key_names if settings.hide_credentials and settings.key_in_query else ()


def kong_credential(decision: Decision) -> dict[str, Any] | None:
    """The credential table for `kong.client.authenticate` (None for the anonymous consumer)."""
    if decision.outcome is not Outcome.AUTHENTICATED or decision.credential is None:
        return None
    return {"id": decision.credential.credential_id, "consumer": {"id": decision.consumer["id"]}}


def pass_mark(decision: Decision | None = None, skipped: SkipReason | None = None) -> dict[str, Any]:
    """What the plugin publishes in kong.ctx.shared when it lets a request through (never on refusal)."""
    if decision is None:
        return {"key_id": None, "consumer_id": None, "anonymous": False,
                "reason": skipped.value if skipped else None}
    consumer = decision.consumer or {}
    anonymous = decision.outcome is Outcome.ANONYMOUS
    return {
        "key_id": None if anonymous else decision.key_id,
        "consumer_id": consumer.get("id"),
        "anonymous": anonymous,
        "reason": decision.reason.value if anonymous and decision.reason else None,
    }
