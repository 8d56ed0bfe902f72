"""Who a verified client certificate is, and what client-cert-auth decides for it (pure).

* `extract_identity`: the names of a leaf (SAN URI with SPIFFE IDs parsed, SAN DNS, email and IP,
  CN, every DN attribute, the RFC 4514 DN), its SPKI and fingerprint.
* `ConsumerMapping` / `AuthPolicy`: explicit mappings (subject name -> consumer, optionally pinned to
  a CA of the path and/or to the leaf's SPKI), auto-match by consumer username (or id), then
  `default_consumer`, then `anonymous`; `skip_consumer_lookup` accepts any verified certificate.
  Groups for Kong's `acl` come from the CN, the DN, any DN attribute (every `OU` ...), SPIFFE path
  segments and the mapping, several per certificate.
* `Authenticator.authenticate(chain_pem, load_consumer)`: the whole decision for one request - chain
  verification (`kong_mtls.core.chain`), revocation (an injected callable), identity, consumer and
  groups, the upstream headers and the `kong.ctx.shared` mark - as one immutable `Decision`.
  Everything derived from the certificate alone is memoised per presented chain, and consumer
  lookups are cached with a TTL (negative results too), so a returning client costs a hash, a few
  dict lookups and no PDK call besides those that publish the result.

The Kong adapter (`kong_mtls.kong.client_cert_auth`) and `kong-mtls check` both use this, so the
offline check answers exactly what the plugin would.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Union
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from kong_mtls.constants import (
    CONSUMER_HEADERS,
    GROUP_HEADERS,
    HEADER_ANONYMOUS_CONSUMER,
    HEADER_CONSUMER_CUSTOM_ID,
    HEADER_CONSUMER_ID,
    HEADER_CONSUMER_USERNAME,
    HEADER_CREDENTIAL_IDENTIFIER,
    MESSAGE_UNEXPECTED,
)
from kong_mtls.core.chain import (
    LRU,
    MESSAGE_FAILED_VERIFICATION,
    MESSAGE_NO_CERTIFICATE,
    ChainVerifier,
    Reason,
    VerifiedChain,
    cert_sha256,
    describe,
    normalize_sha256,
    spki_sha256,
)
from kong_mtls.core.consumers import ConsumerCache, LoadConsumer
from kong_mtls.schema import ConfigError

# -- headers this plugin sends upstream (besides Kong's consumer headers) ------------------------------
HEADER_CLIENT_CERT_DN = "X-Client-Cert-DN"        # as Enterprise mtls-auth (RFC 4514 here)
HEADER_CLIENT_CERT_SAN = "X-Client-Cert-SAN"      # as Enterprise mtls-auth: SAN values, comma-separated
HEADER_CLIENT_CERT = "Client-Cert"                # RFC 9440: `:<base64 DER>:`
HEADER_CLIENT_CERT_CHAIN = "Client-Cert-Chain"    # RFC 9440: the path between leaf and anchor
HEADER_XFCC = "X-Forwarded-Client-Cert"           # Envoy's format: Hash, Cert, Subject, URI, DNS
CERT_HEADERS = (HEADER_CLIENT_CERT_DN, HEADER_CLIENT_CERT_SAN, HEADER_CLIENT_CERT,
                HEADER_CLIENT_CERT_CHAIN, HEADER_XFCC)
#: Every header this plugin owns: client-sent copies are removed on every pass, whatever the options.
OWNED_HEADERS = (*CONSUMER_HEADERS, *GROUP_HEADERS, *CERT_HEADERS)

#: `forward_client_cert` values.
FORWARD_RFC9440 = "rfc9440"
FORWARD_XFCC = "xfcc"
FORWARD_FORMATS = (FORWARD_RFC9440, FORWARD_XFCC)

#: Namespace of the credential ids handed to `kong.client.authenticate` (uuid5 of the mapping).
CREDENTIAL_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:kong-mtls:client-cert-auth:credential")

#: Header values longer than this are not sent (an upstream would refuse the request anyway).
MAX_HEADER_VALUE = 16 * 1024

HeaderValue = Union[str, list]


class NameKind(str, Enum):
    """Where a subject name comes from, for `name_sources` (the order of preference)."""

    URI = "uri"
    DNS = "dns"
    EMAIL = "email"
    IP = "ip"
    CN = "cn"
    DN = "dn"  # the whole subject as an RFC 4514 string


#: Like Enterprise mtls-auth: the SANs, then the CN. Names keep their kind: a mapping matches only
#: names of its `name_type`, and `consumer_by` compares only CNs with usernames or ids.
DEFAULT_NAME_ORDER = (NameKind.URI, NameKind.DNS, NameKind.EMAIL, NameKind.IP, NameKind.CN)

#: A name together with its kind: a value of one kind never matches a mapping of another.
TypedName = tuple[NameKind, str]


def infer_name_kind(text: str) -> NameKind:
    """The kind of a mapping's `subject_name` when `name_type` is not given: `ip` for an IP
    literal, `uri` for `<scheme>:...` with `//` (SPIFFE IDs included), `email` for text with `@`,
    otherwise `dns`. A CN or a whole DN is never inferred: it must be named."""
    try:
        ipaddress.ip_address(text)
        return NameKind.IP
    except ValueError:
        pass
    if _URI_SCHEME.match(text):
        return NameKind.URI
    if "@" in text:
        return NameKind.EMAIL
    return NameKind.DNS


_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_CN_OID = NameOID.COMMON_NAME.dotted_string


class IdentityError(ValueError):
    """A certificate whose names cannot be read."""


# ====================================================================================================
# Names and SPIFFE IDs
# ====================================================================================================
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")
_PATH_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")
_SPIFFE_MAX = 2048


@dataclass(frozen=True)
class SpiffeId:
    """`spiffe://<trust_domain><path>` (SPIFFE-ID spec: lower-case trust domain, path segments of
    letters, digits, `.`, `-`, `_`, no `.`/`..` segments, no query, fragment, port or user info)."""

    trust_domain: str
    path: str

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.split("/")[1:]) if self.path else ()

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"


def parse_spiffe_id(uri: str) -> SpiffeId | None:
    """A SPIFFE ID, or None when `uri` is not a valid one."""
    if not uri.startswith("spiffe://") or len(uri) > _SPIFFE_MAX:
        return None
    rest = uri[len("spiffe://"):]
    domain, slash, path = rest.partition("/")
    if not _TRUST_DOMAIN.fullmatch(domain):
        return None
    if not slash:
        return SpiffeId(domain, "")
    segments = path.split("/")
    for segment in segments:
        if not _PATH_SEGMENT.fullmatch(segment) or segment in (".", ".."):
            return None
    return SpiffeId(domain, "/" + path)


@dataclass(frozen=True)
class CertIdentity:
    """What a leaf says about its holder. Text is as decoded by cryptography (any ASN.1 string type);
    header values are escaped separately."""

    subject: str                                   # RFC 4514
    issuer: str                                    # RFC 4514
    serial: str                                    # hex
    attributes: tuple[tuple[str, str], ...]        # (dotted OID, value) in certificate order
    common_names: tuple[str, ...]
    uris: tuple[str, ...]
    dns: tuple[str, ...]
    emails: tuple[str, ...]
    ips: tuple[str, ...]
    san: tuple[str, ...]                           # SAN values in certificate order (X-Client-Cert-SAN)
    spiffe: SpiffeId | None                        # the one valid SPIFFE ID among the URIs, if exactly one
    spki_sha256: str
    fingerprint_sha256: str

    def names(self, order: Sequence[NameKind] = DEFAULT_NAME_ORDER) -> tuple[TypedName, ...]:
        """Candidate subject names with their kind, in order of preference, without duplicates."""
        by_kind = {NameKind.URI: self.uris, NameKind.DNS: self.dns, NameKind.EMAIL: self.emails,
                   NameKind.IP: self.ips, NameKind.CN: self.common_names, NameKind.DN: (self.subject,)}
        out: dict[TypedName, None] = {}
        for kind in order:
            for value in by_kind[kind]:
                if value:
                    out.setdefault((kind, value), None)
        return tuple(out)

    def attribute_values(self, oid: str) -> tuple[str, ...]:
        return tuple(value for key, value in self.attributes if key == oid)


def _text(value: object) -> str:
    if isinstance(value, bytes):  # BIT STRING attributes (x500UniqueIdentifier)
        return value.hex()
    return str(value)


def extract_identity(cert: x509.Certificate) -> CertIdentity:
    """Read the leaf's names. Raises IdentityError for a certificate whose names cryptography
    cannot decode."""
    try:
        attributes = tuple((a.oid.dotted_string, _text(a.value)) for a in cert.subject)
        try:
            san_ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            san_ext = None
        uris: list[str] = []
        dns: list[str] = []
        emails: list[str] = []
        ips: list[str] = []
        san: list[str] = []
        kinds = ((x509.UniformResourceIdentifier, uris), (x509.DNSName, dns), (x509.RFC822Name, emails))
        for name in san_ext or ():
            if isinstance(name, x509.IPAddress):
                if isinstance(name.value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
                    ips.append(str(name.value))  # (a network is only meaningful in name constraints)
                    san.append(ips[-1])
                continue
            for kind, values in kinds:
                if isinstance(name, kind):
                    values.append(name.value)
                    san.append(name.value)
        spiffe_ids = [s for s in (parse_spiffe_id(u) for u in uris) if s is not None]
        return CertIdentity(
            subject=cert.subject.rfc4514_string(),
            issuer=cert.issuer.rfc4514_string(),
            serial=format(cert.serial_number, "x"),
            attributes=attributes,
            common_names=tuple(v for k, v in attributes if k == _CN_OID),
            uris=tuple(uris), dns=tuple(dns), emails=tuple(emails), ips=tuple(ips), san=tuple(san),
            spiffe=spiffe_ids[0] if len(spiffe_ids) == 1 else None,
            spki_sha256=spki_sha256(cert),
            fingerprint_sha256=cert_sha256(cert),
        )
    except Exception as exc:  # cryptography decodes names lazily and may raise many kinds of errors
        raise IdentityError(f"unreadable certificate names: {type(exc).__name__}: {exc}") from None


# ====================================================================================================
# Name constraints for names taken from the subject
# ====================================================================================================
class _Outside(str):
    """Why the CN, used as an identity, is outside a CA's name constraints (memoised facts)."""


_DNS_NAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)"
                       r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*$")


def _dns_within(name: str, base: str) -> bool:
    """RFC 5280 DNS name constraint: `base` holds itself and its subdomains; `.base` only these; an
    empty base (or `.`) every name (the CA/Browser Forum's way to exclude all DNS names)."""
    name, base = name.lower().rstrip("."), base.lower().rstrip(".")
    if not base:
        return True
    if base.startswith("."):
        return name.endswith(base)
    return name == base or name.endswith("." + base)


def cn_outside_name_constraints(path: Sequence[x509.Certificate], identity: CertIdentity) -> str | None:
    """Why the leaf's CN, used as a name, breaks a name constraint of a CA in `path`, or None.

    The verifier applies name constraints to subjectAltName values only; a CN used as an identity
    (a consumer name, a group) must hold them too, or a CA constrained to `partner.example` could
    issue `CN=admin` without SAN. Below a CA with name constraints the CN must be a DNS name, inside
    one of its permitted DNS subtrees where it permits any, and in none of its excluded DNS subtrees.
    (The verifier refuses directoryName constraints altogether.)
    """
    for ca in path[1:]:
        try:
            constraints = ca.extensions.get_extension_for_class(x509.NameConstraints).value
        except x509.ExtensionNotFound:
            continue
        permitted = list(constraints.permitted_subtrees or ())
        permitted_dns = [n.value for n in permitted if isinstance(n, x509.DNSName)]
        excluded_dns = [n.value for n in constraints.excluded_subtrees or () if isinstance(n, x509.DNSName)]
        for cn in identity.common_names:
            if _DNS_NAME.fullmatch(cn) is None:  # no constraint type can vouch for it: closed
                return f"CN {cn!r} is no DNS name and {describe(ca)} has name constraints"
            if permitted and not any(_dns_within(cn, base) for base in permitted_dns):
                return f"CN {cn!r} is outside the permitted subtrees of {describe(ca)}"
            if any(_dns_within(cn, base) for base in excluded_dns):
                return f"CN {cn!r} is in an excluded subtree of {describe(ca)}"
    return None


# ====================================================================================================
# Groups
# ====================================================================================================
class GroupSourceKind(str, Enum):
    MAPPING = "mapping"                          # the matched mapping's `groups`
    CN = "cn"                                    # every CN
    DN = "dn"                                    # the whole subject (RFC 4514)
    ATTRIBUTE = "dn:"                            # `dn:OU`, `dn:O`, `dn:2.5.4.11` ... every value
    SPIFFE_ID = "spiffe_id"                      # the SPIFFE ID
    SPIFFE_TRUST_DOMAIN = "spiffe_trust_domain"
    SPIFFE_PATH = "spiffe_path"                  # every path segment


_ATTRIBUTE_OIDS = {
    "CN": NameOID.COMMON_NAME, "C": NameOID.COUNTRY_NAME, "L": NameOID.LOCALITY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME, "STREET": NameOID.STREET_ADDRESS,
    "O": NameOID.ORGANIZATION_NAME, "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "DC": NameOID.DOMAIN_COMPONENT, "UID": NameOID.USER_ID, "SERIALNUMBER": NameOID.SERIAL_NUMBER,
    "EMAILADDRESS": NameOID.EMAIL_ADDRESS, "TITLE": NameOID.TITLE, "GN": NameOID.GIVEN_NAME,
    "SN": NameOID.SURNAME, "ORGANIZATIONIDENTIFIER": NameOID.ORGANIZATION_IDENTIFIER,
    "BUSINESSCATEGORY": NameOID.BUSINESS_CATEGORY, "POSTALCODE": NameOID.POSTAL_CODE,
    "PSEUDONYM": NameOID.PSEUDONYM, "DNQUALIFIER": NameOID.DN_QUALIFIER,
}
_DOTTED = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")


@dataclass(frozen=True)
class GroupSource:
    kind: GroupSourceKind
    oid: str | None = None  # for ATTRIBUTE

    @classmethod
    def parse(cls, text: str) -> GroupSource:
        """`mapping`, `cn`, `dn`, `dn:<ATTR>` (a short name such as OU, O, L, DC, UID, or a dotted
        OID), `spiffe_id`, `spiffe_trust_domain`, `spiffe_path`. Raises ValueError."""
        value = text.strip()
        lowered = value.lower()
        if lowered.startswith("dn:"):
            attr = value[3:].strip()
            oid = _ATTRIBUTE_OIDS.get(attr.upper())
            if oid is not None:
                return cls(GroupSourceKind.ATTRIBUTE, oid.dotted_string)
            if _DOTTED.fullmatch(attr):
                return cls(GroupSourceKind.ATTRIBUTE, attr)
            raise ValueError(f"unknown DN attribute {attr!r}; use one of {', '.join(_ATTRIBUTE_OIDS)} "
                             "or a dotted OID")
        for kind in GroupSourceKind:
            if kind is not GroupSourceKind.ATTRIBUTE and lowered == kind.value:
                return cls(kind)
        raise ValueError(f"unknown group source {text!r}; expected mapping, cn, dn, dn:<ATTR>, "
                         "spiffe_id, spiffe_trust_domain or spiffe_path")

    def values(self, identity: CertIdentity, mapping: ConsumerMapping | None) -> tuple[str, ...]:
        kind = self.kind
        if kind is GroupSourceKind.MAPPING:
            return mapping.groups if mapping is not None else ()
        if kind is GroupSourceKind.CN:
            return identity.common_names
        if kind is GroupSourceKind.DN:
            return (identity.subject,)
        if kind is GroupSourceKind.ATTRIBUTE:
            return identity.attribute_values(self.oid or "")
        spiffe = identity.spiffe
        if spiffe is None:
            return ()
        if kind is GroupSourceKind.SPIFFE_ID:
            return (str(spiffe),)
        if kind is GroupSourceKind.SPIFFE_TRUST_DOMAIN:
            return (spiffe.trust_domain,)
        return spiffe.segments


def _clean_groups(values: Iterable[str], dn: bool = False) -> tuple[str, ...]:
    """Drop empty values, ones an HTTP header could not carry, ones with surrounding spaces (which
    upstreams trim) and ones with a comma: Kong's acl
    joins groups with ", " into one upstream header, which upstreams split on commas, so
    `support,admins` would read as a group `admins`. A whole DN (`dn`, RFC 4514) keeps the commas
    between its RDNs (its pieces all hold `=`) but not an escaped comma inside a value."""
    out: dict[str, None] = {}
    for value in values:
        if value and len(value) <= 256 and value.isprintable() and value == value.strip() and \
                ("\\," not in value if dn else "," not in value):
            out.setdefault(value, None)
    return tuple(out)


# ====================================================================================================
# Consumer mappings and policy
# ====================================================================================================
@dataclass(frozen=True)
class ConsumerMapping:
    """`subject_name` -> `consumer` (id or username; None with skip_consumer_lookup), optionally
    pinned: `ca_sha256` must be the fingerprint of a CA certificate of the verified path (the
    issuer, an intermediate or the anchor), `spki_sha256` the leaf's SPKI hash."""

    subject_name: str
    consumer: str | None = None
    ca_sha256: str | None = None
    spki_sha256: str | None = None
    groups: tuple[str, ...] = ()
    name_type: NameKind | None = None  # None: inferred from subject_name (`infer_name_kind`)
    credential_id: str = field(init=False)

    def __post_init__(self) -> None:
        if self.name_type is None:
            object.__setattr__(self, "name_type", infer_name_kind(self.subject_name))
        key = "\x1f".join((self.subject_name, self.consumer or "", self.ca_sha256 or "",
                           self.spki_sha256 or ""))
        object.__setattr__(self, "credential_id", str(uuid.uuid5(CREDENTIAL_NAMESPACE, "mapping\x1f" + key)))

    @property
    def typed_name(self) -> TypedName:
        assert self.name_type is not None  # set in __post_init__
        return self.name_type, self.subject_name

    @property
    def specificity(self) -> int:
        return (self.ca_sha256 is not None) + (self.spki_sha256 is not None)

    def pins_hold(self, spki: str, ca_sha256: Sequence[str]) -> bool:
        if self.spki_sha256 is not None and self.spki_sha256 != spki:
            return False
        return self.ca_sha256 is None or self.ca_sha256 in ca_sha256


def parse_mappings(items: Sequence[Mapping[str, Any]], field_name: str = "consumer_mappings") -> tuple[
        ConsumerMapping, ...]:
    """Config records `{subject_name, name_type, consumer, ca_sha256, spki_sha256, groups}` -> mappings.
    Raises ConfigError naming `consumer_mappings[i].<field>`."""
    out: list[ConsumerMapping] = []
    seen: dict[tuple, int] = {}
    for i, item in enumerate(items, start=1):
        where = f"{field_name}[{i}]"
        name = item.get("subject_name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}.subject_name", "required, a non-empty string")
        pins = {}
        for pin in ("ca_sha256", "spki_sha256"):
            value = item.get(pin)
            if value is None:
                pins[pin] = None
                continue
            try:
                pins[pin] = normalize_sha256(value)
            except (ValueError, AttributeError) as exc:
                raise ConfigError(f"{where}.{pin}", str(exc)) from None
        groups = tuple(item.get("groups") or ())
        for j, group in enumerate(groups, start=1):
            if not isinstance(group, str) or _clean_groups([group]) != (group,):
                raise ConfigError(f"{where}.groups[{j}]", "printable text of 1-256 characters expected")
        consumer = item.get("consumer")
        if consumer is not None and (not isinstance(consumer, str) or not consumer):
            raise ConfigError(f"{where}.consumer", "a consumer id or username")
        name_type = item.get("name_type")
        try:
            kind = NameKind(name_type) if name_type is not None else None
        except ValueError:
            raise ConfigError(f"{where}.name_type",
                              f"one of {', '.join(k.value for k in NameKind)}") from None
        mapping = ConsumerMapping(name, consumer, pins["ca_sha256"], pins["spki_sha256"], groups, kind)
        key = (mapping.typed_name, mapping.ca_sha256, mapping.spki_sha256)
        if key in seen:
            raise ConfigError(where, f"same subject_name, name_type and pins as {field_name}[{seen[key]}]")
        seen[key] = i
        out.append(mapping)
    return tuple(out)


@dataclass(frozen=True)
class AuthPolicy:
    """Everything after chain verification. Field names match the plugin config."""

    name_sources: tuple[NameKind, ...] = DEFAULT_NAME_ORDER
    consumer_mappings: tuple[ConsumerMapping, ...] = ()
    consumer_by: frozenset[str] = frozenset({"username"})   # "username" and/or "id"; empty = no auto-match
    default_consumer: str | None = None
    anonymous: str | None = None
    skip_consumer_lookup: bool = False
    groups_from: tuple[GroupSource, ...] = (GroupSource(GroupSourceKind.MAPPING),)
    forward_client_cert: frozenset[str] = frozenset()
    report_only: bool = False

    def __post_init__(self) -> None:
        if not self.name_sources:
            raise ConfigError("name_sources", "at least one name source is needed")
        unknown = set(self.consumer_by) - {"username", "id"}
        if unknown:
            raise ConfigError("consumer_by", f"unknown: {', '.join(sorted(unknown))} (custom_id cannot be "
                                             "looked up from a plugin server)")
        if set(self.forward_client_cert) - set(FORWARD_FORMATS):
            raise ConfigError("forward_client_cert", f"expected any of {', '.join(FORWARD_FORMATS)}")
        for i, mapping in enumerate(self.consumer_mappings, start=1):
            if mapping.name_type not in self.name_sources:
                raise ConfigError(f"consumer_mappings[{i}].subject_name",
                                  f"a {mapping.name_type.value} name, but name_sources does not list "
                                  f"{mapping.name_type.value} (set name_type, or add it to name_sources)")
            if self.skip_consumer_lookup and mapping.consumer is not None:
                raise ConfigError(f"consumer_mappings[{i}].consumer",
                                  "not used when skip_consumer_lookup is true (mappings then only pin "
                                  "names and give groups)")
            if not self.skip_consumer_lookup and mapping.consumer is None:
                raise ConfigError(f"consumer_mappings[{i}].consumer",
                                  "required unless skip_consumer_lookup is true")
        if self.skip_consumer_lookup and self.default_consumer is not None:
            raise ConfigError("default_consumer", "not used when skip_consumer_lookup is true")


# ====================================================================================================
# Consumer lookups
# ====================================================================================================
# ====================================================================================================
# Decisions
# ====================================================================================================
class Via(str, Enum):
    """How the request was let through."""

    MAPPING = "mapping"
    CONSUMER_BY = "consumer_by"
    DEFAULT_CONSUMER = "default_consumer"
    SKIP_CONSUMER_LOOKUP = "skip_consumer_lookup"
    ANONYMOUS = "anonymous"
    REPORT_ONLY = "report_only"


@dataclass(frozen=True)
class Decision:
    """One request's outcome. `allowed` False: answer `status`/`message` and log `reason`/`detail`.
    `allowed` True: authenticate `consumer` with `credential` (when a consumer), publish `groups`
    and `mark`, set `headers` upstream. `reason` is also set on passes that are not a successful
    authentication (anonymous, report_only) to say why."""

    allowed: bool
    via: Via | None = None
    reason: Reason | None = None
    detail: str = ""
    status: int = 200
    message: str = ""
    verified: bool = False
    cert_presented: bool = False
    consumer: Mapping[str, Any] | None = None
    credential: Mapping[str, Any] | None = None
    groups: tuple[str, ...] = ()
    headers: Mapping[str, HeaderValue] = field(default_factory=dict)
    mark: Mapping[str, Any] | None = None
    chain: VerifiedChain | None = None
    identity: CertIdentity | None = None
    #: When `consumer`, a cached row, stops being used (the consumer cache's clock); None: no row,
    #: or one that was not cached.
    consumer_until: float | None = None

    @property
    def anonymous(self) -> bool:
        return self.via is Via.ANONYMOUS

    @property
    def client_verify(self) -> str | None:
        """The `$ssl_client_verify` value to set (`FAILED:<reason>`), or None to leave nginx's."""
        if self.reason is not None and self.cert_presented:
            return f"FAILED:{self.reason.value}"
        return None


@dataclass(frozen=True)
class _Facts:
    """Everything the certificate alone decides, memoised per presented chain."""

    identity: CertIdentity
    names: tuple[TypedName, ...]
    mapping: ConsumerMapping | None
    pin_mismatch: str | None
    groups: tuple[str, ...]
    cert_headers: Mapping[str, HeaderValue]
    cn_outside: str | None = None  # why the CN may not be used as a name (name constraints)


def _escape_dn(text: str) -> str:
    """RFC 4514 allows any character as `\\XX` UTF-8 hex pairs: use them for everything outside
    printable ASCII so the value is safe in an HTTP header."""
    if text.isascii() and text.isprintable():
        return text
    out = []
    for ch in text:
        if " " <= ch <= "~":
            out.append(ch)
        else:
            out.extend(f"\\{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
    return "".join(out)


def _escape_value(text: str) -> str:
    """A SAN value in a comma-separated header: percent-encode `,`, `%` and anything not printable
    ASCII (URIs keep their meaning)."""
    if text.isascii() and text.isprintable() and "," not in text and "%" not in text:
        return text
    return quote(text, safe="!#$&'()*+-./:;=?@[]_~<>\"{}|^`\\ ")


def _xfcc_value(text: str) -> str:
    if any(c in text for c in ',;="') or not text:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def _sf_binary(cert: x509.Certificate) -> str:
    return ":" + base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode() + ":"


def _fits(value: str) -> HeaderValue:
    return value if value and len(value) <= MAX_HEADER_VALUE else []


def _cert_headers(chain: VerifiedChain, identity: CertIdentity,
                  forward: frozenset[str]) -> dict[str, HeaderValue]:
    headers: dict[str, HeaderValue] = {
        HEADER_CLIENT_CERT_DN: _fits(_escape_dn(identity.subject)),
        HEADER_CLIENT_CERT_SAN: _fits(",".join(_escape_value(v) for v in identity.san)),
    }
    if FORWARD_RFC9440 in forward:
        headers[HEADER_CLIENT_CERT] = _sf_binary(chain.leaf)
        headers[HEADER_CLIENT_CERT_CHAIN] = _fits(", ".join(_sf_binary(c) for c in chain.intermediates))
    if FORWARD_XFCC in forward:
        pem = chain.leaf.public_bytes(serialization.Encoding.PEM).decode()
        parts = [f"Hash={identity.fingerprint_sha256}", f"Cert={_xfcc_value(quote(pem, safe=''))}",
                 f"Subject={_xfcc_value(_escape_dn(identity.subject))}"]
        parts += [f"URI={_xfcc_value(_escape_value(u))}" for u in identity.uris]
        parts += [f"DNS={_xfcc_value(_escape_value(d))}" for d in identity.dns]
        headers[HEADER_XFCC] = _fits(";".join(parts))
    return headers


_NO_HEADERS: dict[str, HeaderValue] = {name: [] for name in OWNED_HEADERS}


def _header_text(value: object) -> HeaderValue:
    if isinstance(value, str) and value and value.isprintable() and len(value) <= MAX_HEADER_VALUE:
        return value if value.isascii() else quote(value, safe="")
    return []


def _leaf_summary(leaf: x509.Certificate | None) -> tuple[str, str, str]:
    """(subject, spki_sha256, fingerprint) of a presented leaf for marks; never raises."""
    if leaf is None:
        return "", "", ""
    try:
        return leaf.subject.rfc4514_string(), spki_sha256(leaf), cert_sha256(leaf)
    except Exception:  # an unverified certificate cryptography cannot fully decode
        return "", "", ""


class Authenticator:
    """The decision of client-cert-auth for one plugin instance.

    `revocation(leaf, issuer)` returns an object with `ok`, `reason` and `detail` (the revocation
    core's `RevocationVerdict`), or is None when revocation is not checked."""

    def __init__(self, verifier: ChainVerifier, policy: AuthPolicy, *,
                 revocation: Callable[[x509.Certificate, x509.Certificate | None], Any] | None = None,
                 consumer_cache_ttl: float = 60.0, memo_size: int = 4096,
                 consumer_clock: Callable[[], float] = time.monotonic) -> None:
        self.verifier = verifier
        self.policy = policy
        self.revocation = revocation
        self.consumers = ConsumerCache(consumer_cache_ttl, clock=consumer_clock)
        self._memo: LRU[str, _Facts | str] = LRU(memo_size)
        # Successful resolutions per chain, kept as long as a consumer lookup is (revocation and
        # chain validity are still checked on every request).
        self._passes: LRU[str, tuple[float, Decision]] = LRU(memo_size if consumer_cache_ttl > 0 else 0)
        index: dict[TypedName, list[ConsumerMapping]] = {}
        for mapping in policy.consumer_mappings:
            index.setdefault(mapping.typed_name, []).append(mapping)
        self._mappings = {name: sorted(ms, key=lambda m: -m.specificity) for name, ms in index.items()}

    # -- the request ---------------------------------------------------------------------------------
    def authenticate(self, chain_pem: object, load_consumer: LoadConsumer) -> Decision:
        """Decide for the presented chain (PEM text as Kong gives it, or None). `load_consumer(ref)`
        returns Kong's consumer row for an id or username, or None; it is called only on cache
        misses, and its exceptions propagate."""
        verdict = self.verifier.verify(chain_pem)
        if verdict.chain is None:
            return self._fail(verdict.reason or Reason.INVALID_CERTIFICATE, verdict.detail,
                              chain_pem, verdict.leaf, load_consumer)
        chain = verdict.chain
        if self.revocation is not None:
            # Every certificate below the anchor: a revoked intermediate revokes what it issued.
            for cert, issuer in zip(chain.path, chain.path[1:]):
                revoked = self.revocation(cert, issuer)
                if not revoked.ok:
                    reason = Reason.REVOKED if str(revoked.reason).upper() == Reason.REVOKED.value \
                        else Reason.REVOCATION_UNKNOWN
                    which = "" if cert is chain.leaf else f" (CA {describe(cert)})"
                    return self._fail(reason, f"{revoked.reason}{which}: {revoked.detail}", chain_pem,
                                      chain.leaf, load_consumer)
        facts = self._facts(chain)
        if isinstance(facts, _Outside):
            return self._fail(Reason.OUTSIDE_NAME_CONSTRAINTS, facts, chain_pem, chain.leaf, load_consumer)
        if isinstance(facts, str):
            return self._fail(Reason.MALFORMED_CHAIN, facts, chain_pem, chain.leaf, load_consumer)
        if facts.pin_mismatch is not None:
            return self._fail(Reason.PIN_MISMATCH, facts.pin_mismatch, chain_pem, chain.leaf, load_consumer)
        now = self.consumers.clock()
        remembered = self._passes.get(chain.chain_sha256)
        if remembered is not None and remembered[0] > now:
            return remembered[1]
        decision = self._identify(chain, facts, chain_pem, load_consumer)
        if decision.allowed and decision.via not in (Via.ANONYMOUS, Via.REPORT_ONLY):
            # No longer than its consumer row is: remembered, the row would outlive its cache time.
            until = decision.consumer_until if decision.consumer is not None else now + self.consumers.ttl
            if until is not None:
                self._passes.put(chain.chain_sha256, (until, decision))
        return decision

    def refuse(self, reason: Reason, detail: str, load_consumer: LoadConsumer) -> Decision:
        """The outcome for a request whose certificate was never verified (header-cert-auth: not
        from the edge, or an unusable header): refused, or let through as anonymous/report_only."""
        return self._fail(reason, detail, None, None, load_consumer)

    def _identify(self, chain: VerifiedChain, facts: _Facts, chain_pem: object,
                  load_consumer: LoadConsumer) -> Decision:
        """Consumer resolution for a verified chain: mapping, consumer_by, default_consumer."""
        policy = self.policy
        if policy.skip_consumer_lookup:
            return self._pass(Via.SKIP_CONSUMER_LOOKUP, chain, facts, None, None)
        mapping = facts.mapping
        if mapping is not None:
            row = self.consumers.get(mapping.consumer or "", load_consumer)
            if row is None:
                return self._fail(Reason.NO_CONSUMER, f"mapped consumer {mapping.consumer!r} not found",
                                  chain_pem, chain.leaf, load_consumer, facts=facts, chain=chain)
            return self._pass(Via.MAPPING, chain, facts, row, mapping.credential_id,
                              self.consumers.until(mapping.consumer or ""))
        if policy.consumer_by:
            # A consumer's username or id is compared with CNs only: a DNS name, a URI or an email
            # address never logs in as the consumer of the same spelling.
            for _, name in (typed for typed in facts.names if typed[0] is NameKind.CN):
                row = self.consumers.get(name, load_consumer)
                if row is not None and (("username" in policy.consumer_by and row.get("username") == name)
                                        or ("id" in policy.consumer_by and row.get("id") == name)):
                    if facts.cn_outside:
                        return self._fail(Reason.OUTSIDE_NAME_CONSTRAINTS, facts.cn_outside, chain_pem,
                                          chain.leaf, load_consumer, facts=facts, chain=chain)
                    return self._pass(Via.CONSUMER_BY, chain, facts, row, _credential_id("consumer_by", name),
                                      self.consumers.until(name))
        if policy.default_consumer is not None:
            row = self.consumers.get(policy.default_consumer, load_consumer)
            if row is None:
                return self._fail(Reason.DEFAULT_CONSUMER_NOT_FOUND,
                                  f"default_consumer {policy.default_consumer!r} not found",
                                  chain_pem, chain.leaf, load_consumer, facts=facts, chain=chain)
            return self._pass(Via.DEFAULT_CONSUMER, chain, facts, row,
                              _credential_id("default_consumer", policy.default_consumer),
                              self.consumers.until(policy.default_consumer))
        names = [f"{kind.value}:{value}" for kind, value in facts.names[:8]]
        return self._fail(Reason.NO_CONSUMER, f"no consumer for names {names}",
                          chain_pem, chain.leaf, load_consumer, facts=facts, chain=chain)

    # -- outcomes ------------------------------------------------------------------------------------
    def _pass(self, via: Via, chain: VerifiedChain, facts: _Facts, row: Mapping[str, Any] | None,
              credential_id: str | None, consumer_until: float | None = None) -> Decision:
        identity = facts.identity
        headers = dict(_NO_HEADERS)
        credential = None
        if row is not None:
            _consumer_headers(headers, row)
            if credential_id is not None:
                credential = {"id": credential_id, "consumer": {"id": row["id"]}}
                headers[HEADER_CREDENTIAL_IDENTIFIER] = credential_id
        headers.update(facts.cert_headers)
        mark = {"verified": True, "consumer_id": row["id"] if row is not None else None,
                "consumer_username": _username(row), "anonymous": False,
                "spki_sha256": identity.spki_sha256, "subject": identity.subject,
                "fingerprint_sha256": identity.fingerprint_sha256}
        return Decision(allowed=True, via=via, verified=True, cert_presented=True, consumer=row,
                        credential=credential, groups=facts.groups, headers=headers, mark=mark,
                        chain=chain, identity=identity, consumer_until=consumer_until)

    def _fail(self, reason: Reason, detail: str, chain_pem: object, leaf: x509.Certificate | None,
              load_consumer: LoadConsumer, *, facts: _Facts | None = None,
              chain: VerifiedChain | None = None) -> Decision:
        """A failed authentication: refuse, or let through as anonymous or report_only."""
        policy = self.policy
        presented = reason is not Reason.NO_CERTIFICATE and chain_pem not in (None, "", b"")
        verified = facts is not None
        server_error = reason in (Reason.ANONYMOUS_NOT_FOUND, Reason.DEFAULT_CONSUMER_NOT_FOUND)
        common = {"reason": reason, "detail": detail, "verified": verified, "cert_presented": presented,
                  "chain": chain, "identity": facts.identity if facts else None}
        if policy.anonymous is not None and not server_error:
            row = self.consumers.get(policy.anonymous, load_consumer)
            if row is not None:
                headers = dict(_NO_HEADERS)
                _consumer_headers(headers, row)
                headers[HEADER_ANONYMOUS_CONSUMER] = "true"
                if facts is not None:
                    headers.update(facts.cert_headers)
                return Decision(allowed=True, via=Via.ANONYMOUS, consumer=row, headers=headers,
                                mark=self._mark(facts, leaf, row),
                                consumer_until=self.consumers.until(policy.anonymous), **common)
            reason, server_error = Reason.ANONYMOUS_NOT_FOUND, True
            common["reason"] = reason
            common["detail"] = f"anonymous consumer {policy.anonymous!r} not found ({detail})"
        if policy.report_only:
            headers = dict(_NO_HEADERS)
            if facts is not None:
                headers.update(facts.cert_headers)
            return Decision(allowed=True, via=Via.REPORT_ONLY, headers=headers,
                            mark=self._mark(facts, leaf, None), **common)
        if server_error:
            status, message = 500, MESSAGE_UNEXPECTED
        elif reason in (Reason.NO_CERTIFICATE, Reason.UNTRUSTED_EDGE):  # a header not believed: none
            status, message = 401, MESSAGE_NO_CERTIFICATE
        else:
            status, message = 401, MESSAGE_FAILED_VERIFICATION
        return Decision(allowed=False, status=status, message=message, **common)

    @staticmethod
    def _mark(facts: _Facts | None, leaf: x509.Certificate | None,
              row: Mapping[str, Any] | None) -> dict[str, Any]:
        if facts is not None:
            subject, spki, fingerprint = (facts.identity.subject, facts.identity.spki_sha256,
                                          facts.identity.fingerprint_sha256)
        else:
            subject, spki, fingerprint = _leaf_summary(leaf)
        return {"verified": facts is not None, "consumer_id": row["id"] if row is not None else None,
                "consumer_username": _username(row), "anonymous": row is not None,
                "spki_sha256": spki, "subject": subject, "fingerprint_sha256": fingerprint}

    # -- per-chain facts ---------------------------------------------------------------------------
    def _facts(self, chain: VerifiedChain) -> _Facts | str:
        facts = self._memo.get(chain.chain_sha256)
        if facts is None:
            facts = self._compute_facts(chain)
            self._memo.put(chain.chain_sha256, facts)
        return facts

    def _compute_facts(self, chain: VerifiedChain) -> _Facts | str:
        """The facts, or why not: a str (unreadable names), an `_Outside` (name constraints)."""
        try:
            identity = extract_identity(chain.leaf)
        except IdentityError as exc:
            return str(exc)
        policy = self.policy
        names = identity.names(policy.name_sources)
        cn_outside = cn_outside_name_constraints(chain.path, identity)
        if cn_outside and any(source.kind is GroupSourceKind.CN or (source.kind is GroupSourceKind.ATTRIBUTE
                                                                   and source.oid == _CN_OID)
                              for source in policy.groups_from):
            return _Outside(cn_outside)
        mapping, mismatch = None, None
        for name in names:
            candidates = self._mappings.get(name)
            if not candidates:
                continue
            held = [m for m in candidates if m.pins_hold(chain.spki_sha256, chain.ca_sha256)]
            if held:
                mapping = held[0]
                if name[0] is NameKind.CN and cn_outside:
                    return _Outside(cn_outside)
            else:
                mismatch = (f"name {name[1]!r} is mapped with pins the certificate does not hold "
                            f"(spki {chain.spki_sha256[:16]}..., path CAs "
                            f"{', '.join(c[:16] + '...' for c in chain.ca_sha256)})")
            break
        groups = tuple(dict.fromkeys(
            group for source in policy.groups_from
            for group in _clean_groups(source.values(identity, mapping),
                                       dn=source.kind is GroupSourceKind.DN)))
        return _Facts(identity=identity, names=names, mapping=mapping, pin_mismatch=mismatch, groups=groups,
                      cert_headers=_cert_headers(chain, identity, policy.forward_client_cert),
                      cn_outside=cn_outside)


def _credential_id(kind: str, name: str) -> str:
    return str(uuid.uuid5(CREDENTIAL_NAMESPACE, f"{kind}\x1f{name}"))


def _username(row: Mapping[str, Any] | None) -> str | None:
    value = row.get("username") if row is not None else None
    return value if isinstance(value, str) else None


def _consumer_headers(headers: dict[str, HeaderValue], row: Mapping[str, Any]) -> None:
    """Kong's auth plugins' consumer headers (kong/plugins/key-auth/handler.lua, set_consumer)."""
    headers[HEADER_CONSUMER_ID] = _header_text(row.get("id"))
    headers[HEADER_CONSUMER_CUSTOM_ID] = _header_text(row.get("custom_id"))
    headers[HEADER_CONSUMER_USERNAME] = _header_text(row.get("username"))
