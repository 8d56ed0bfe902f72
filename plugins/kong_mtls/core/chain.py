"""Client certificate chains: parsing, trust anchors and verification for client-cert-auth (pure).

* `read_chain` takes the PEM chain exactly as Kong's `kong.client.tls.get_full_client_certificate_chain()`
  returns it (leaf first) and refuses, with a reason code and never an exception, anything that is
  not a clean, bounded list of certificates. Size and count limits are enforced before parsing.
* `ChainVerifier.verify` builds the path from the presented intermediates to the configured trust
  anchors with `cryptography.x509.verification` (Rust path building, webpki-style checks), with our
  own end-entity extension policy: a subjectAltName and an authorityKeyIdentifier are optional (CN-only
  client certificates are still common in enterprise PKIs, and OpenSSL accepts them), the extended key
  usage is checked here so it can be configured, and a leaf whose key usage forbids signatures is
  refused (a TLS client signs the handshake). cryptography's error messages are mapped to stable
  `Reason` codes; they go to the log, never to the client.
* Verified chains are cached in a bounded LRU keyed by the SHA-256 of the presented PEM text, until
  the earliest `notAfter` in the path: a returning client costs one hash and one dict lookup, no
  signature check. Refusals are cached briefly too, so a client repeating a bad certificate over a
  keep-alive connection costs no more.

Revocation is not checked here (see `kong_mtls.core.revocation`); `VerifiedChain.issuer` is what it
needs.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Generic, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from kong_mtls.files import FileReadError, read_limited


class Reason(str, Enum):
    """Stable reason codes of client-cert-auth, logged with every refusal (never sent to clients)."""

    NO_CERTIFICATE = "NO_CERTIFICATE"            # the client sent no certificate
    MALFORMED_CHAIN = "MALFORMED_CHAIN"          # not a clean PEM list of parseable certificates
    CHAIN_TOO_LARGE = "CHAIN_TOO_LARGE"          # over MAX_CHAIN_PEM_CHARS or MAX_CHAIN_CERTIFICATES
    UNKNOWN_CA = "UNKNOWN_CA"                    # no path to a configured trust anchor
    BAD_SIGNATURE = "BAD_SIGNATURE"              # names a known issuer, but that issuer did not sign it
    EXPIRED = "EXPIRED"                          # a certificate of the path is past its notAfter
    NOT_YET_VALID = "NOT_YET_VALID"              # a certificate of the path is before its notBefore
    BAD_EKU = "BAD_EKU"                          # extended key usage lacks the required purpose
    BAD_KEY_USAGE = "BAD_KEY_USAGE"              # the leaf's key usage forbids digital signatures
    CHAIN_TOO_DEEP = "CHAIN_TOO_DEEP"            # more intermediates than max_chain_depth
    LEAF_IS_CA = "LEAF_IS_CA"                    # the client presented a CA certificate as its own
    INVALID_CA = "INVALID_CA"                    # an issuer is no usable CA (cA, path length, names)
    UNSUPPORTED_ALGORITHM = "UNSUPPORTED_ALGORITHM"  # a key or signature algorithm the verifier refuses
    BAD_EXTENSION = "BAD_EXTENSION"              # unknown critical, missing required or malformed extension
    INVALID_CERTIFICATE = "INVALID_CERTIFICATE"  # any other verification failure
    REVOKED = "REVOKED"                          # the leaf is revoked (CRL or OCSP)
    REVOCATION_UNKNOWN = "REVOCATION_UNKNOWN"    # revocation status could not be established (STRICT)
    PIN_MISMATCH = "PIN_MISMATCH"                # a mapping for the name is pinned to another CA or key
    OUTSIDE_NAME_CONSTRAINTS = "OUTSIDE_NAME_CONSTRAINTS"  # a CN/DN used as identity breaks constraints
    UNTRUSTED_EDGE = "UNTRUSTED_EDGE"            # header-cert-auth: the request did not come from the edge
    EDGE_NOT_VERIFIED = "EDGE_NOT_VERIFIED"      # header-cert-auth: the edge's verdict header is not a pass
    NO_CONSUMER = "NO_CONSUMER"                  # verified, but no consumer matches (and no default)
    ANONYMOUS_NOT_FOUND = "ANONYMOUS_NOT_FOUND"  # the configured anonymous consumer does not exist (500)
    DEFAULT_CONSUMER_NOT_FOUND = "DEFAULT_CONSUMER_NOT_FOUND"  # same for default_consumer (500)


#: Client-facing messages, as Kong Enterprise's mtls-auth words them.
MESSAGE_NO_CERTIFICATE = "No required TLS certificate was sent"
MESSAGE_FAILED_VERIFICATION = "TLS certificate failed verification"

#: Limits on the presented chain, checked before any parsing. A real client chain is a few KB and a
#: handful of certificates; nginx's own default limit on the whole handshake is far below 64 KB.
MAX_CHAIN_PEM_CHARS = 64 * 1024
MAX_CHAIN_CERTIFICATES = 16
#: A client certificate names one holder: more SANs only multiply the name-constraint checks.
MAX_LEAF_NAMES = 100
#: How long a refusal stays cached for the same presented chain.
REFUSAL_CACHE_SECONDS = 30.0
#: Anchors expiring within this many days are reported by `expiring_anchors`.
ANCHOR_EXPIRY_WARNING_DAYS = 90

_PEM_BEGIN = "-----BEGIN CERTIFICATE-----"
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_EKU_NAMES = {
    "client_auth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "server_auth": ExtendedKeyUsageOID.SERVER_AUTH,
    "email_protection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "code_signing": ExtendedKeyUsageOID.CODE_SIGNING,
}
_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")


class ChainConfigError(ValueError):
    """Configured trust material that cannot be used (bad PEM, not a CA, bad option)."""


# ====================================================================================================
# Small helpers shared with the identity core
# ====================================================================================================
K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
    """A bounded mapping that forgets the least recently used entry. Not thread-safe; the plugin
    server runs handlers in gevent greenlets, which never switch inside these methods."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._data: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        if self.max_entries <= 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def pop(self, key: K) -> None:
        self._data.pop(key, None)

    def __len__(self) -> int:
        return len(self._data)


def cert_sha256(cert: x509.Certificate) -> str:
    """The certificate's SHA-256 fingerprint (of its DER), lower-case hex."""
    return cert.fingerprint(hashes.SHA256()).hex()


def spki_sha256(cert: x509.Certificate) -> str:
    """SHA-256 of the DER SubjectPublicKeyInfo (what HPKP and Envoy pin), lower-case hex."""
    der = cert.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def normalize_sha256(text: object) -> str:
    """A SHA-256 pin (a key's SPKI or a certificate) -> lower-case hex. Accepted: 64 hex digits in
    any case with optional `:` separators, or base64 of 32 bytes (Envoy's `verify_certificate_spki`,
    HPKP), either optionally prefixed `sha256/`. Every plugin reads pins with this. Raises
    ValueError, whose message never repeats the input (a secret pasted by mistake stays out of logs)."""
    if not isinstance(text, str):
        raise ValueError("expected a SHA-256 as text")
    value = text.strip()
    if value[:7].lower() == "sha256/":
        value = value[7:]
    hexed = value.replace(":", "").lower()
    if _SHA256_HEX.fullmatch(hexed):
        return hexed
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) == 32:
        return raw.hex()
    raise ValueError("expected a SHA-256 as 64 hex digits (':' allowed) or 44 base64 characters, "
                     "optionally prefixed 'sha256/'")


def parse_eku(text: str) -> x509.ObjectIdentifier | None:
    """`client_auth` | `server_auth` | `email_protection` | `code_signing` | a dotted OID, or `any`
    (no check: returns None). Raises ValueError."""
    value = text.strip()
    if value.lower() == "any":
        return None
    if value.lower() in _EKU_NAMES:
        return _EKU_NAMES[value.lower()]
    if _OID.fullmatch(value):
        return x509.ObjectIdentifier(value)
    raise ValueError(f"expected any, {', '.join(_EKU_NAMES)} or a dotted OID; got {text!r}")


def _utc(moment: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(moment, dt.timezone.utc)


def describe(cert: x509.Certificate) -> str:
    """`CN=...,O=... (sha256 1a2b3c4d...)` for log lines; never raises."""
    try:
        subject = cert.subject.rfc4514_string()
    except Exception:  # a name cryptography cannot render
        subject = "<unreadable subject>"
    try:
        return f"{subject} (sha256 {cert_sha256(cert)[:16]})"
    except Exception:
        return subject


# ====================================================================================================
# Trust anchors (config time)
# ====================================================================================================
def parse_pem_certificates(text: str | bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM text (config input). Raises ChainConfigError."""
    if isinstance(text, str):
        try:
            data = text.encode("ascii")
        except UnicodeEncodeError:
            raise ChainConfigError("PEM must be ASCII") from None
    else:
        data = text
    if _PEM_BEGIN.encode() not in data:
        raise ChainConfigError("no PEM certificate found (expected -----BEGIN CERTIFICATE-----; "
                               "Kong CA certificate ids cannot be read by a plugin server, paste the PEM)")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ChainConfigError(f"unreadable PEM certificate: {exc}") from None


def read_certificate_file(path: str) -> list[x509.Certificate]:
    """The certificates of a PEM file. Raises ChainConfigError."""
    try:
        return parse_pem_certificates(read_limited(path))
    except (FileReadError, ChainConfigError) as exc:
        raise ChainConfigError(f"{path}: {exc}") from None


#: What reading a certificate's extensions may raise: cryptography parses them all on first access,
#: and a name it cannot represent (x400Address, ediPartyName) is no ValueError.
EXTENSION_ERRORS = (ValueError, x509.UnsupportedGeneralNameType)


def check_anchor(cert: x509.Certificate) -> None:
    """Refuse a certificate the verifier could never use as a trust anchor: it must be a CA
    (basicConstraints cA) allowed to sign certificates (keyUsage keyCertSign)."""
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise ChainConfigError(f"{describe(cert)} has no basicConstraints extension; "
                               "it cannot be a trust anchor") from None
    except EXTENSION_ERRORS as exc:
        raise ChainConfigError(f"{describe(cert)}: unreadable extensions: {exc}") from None
    if not constraints.ca:
        raise ChainConfigError(f"{describe(cert)} is not a CA certificate (basicConstraints cA=false); "
                               "to pin a client certificate, map its SPKI instead")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise ChainConfigError(f"{describe(cert)} has no keyUsage extension; it cannot be a trust "
                               "anchor") from None
    if not usage.key_cert_sign:
        raise ChainConfigError(f"{describe(cert)} has a keyUsage without keyCertSign")


def is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except Exception:  # ValueError, TypeError or InvalidSignature: not self-signed
        return False
    return True


def expiring_anchors(anchors: Iterable[x509.Certificate], now: float | None = None,
                     within_days: int = ANCHOR_EXPIRY_WARNING_DAYS) -> list[tuple[x509.Certificate, int]]:
    """Anchors already expired or expiring within `within_days`, with the days left (negative when
    expired), soonest first."""
    moment = _utc(time.time() if now is None else now)
    out = []
    for cert in anchors:
        left = cert.not_valid_after_utc - moment
        if left <= dt.timedelta(days=within_days):
            out.append((cert, left.days))
    return sorted(out, key=lambda item: item[1])


# ====================================================================================================
# Policy and results
# ====================================================================================================
@dataclass(frozen=True)
class ChainPolicy:
    """What a client chain must satisfy.

    `anchors`: trusted CA certificates. With `allow_partial_chain` false (the default, as in OpenSSL),
    only self-signed anchors end a path; the other configured CAs are used as known intermediates,
    so a client may omit them. With it true, any configured CA ends a path (an intermediate may be
    the anchor). `max_chain_depth` counts the CA certificates between the leaf and the anchor
    (0 = the anchor issued the leaf). `required_eku` None = no EKU check; otherwise a leaf that has
    an EKU extension must list it (a leaf without the extension passes, as RFC 5280 and OpenSSL
    have it). `time_skew` widens every validity window by that many seconds on both ends.
    """

    anchors: tuple[x509.Certificate, ...]
    allow_partial_chain: bool = False
    max_chain_depth: int = 4
    required_eku: x509.ObjectIdentifier | None = ExtendedKeyUsageOID.CLIENT_AUTH
    time_skew: float = 0.0
    max_pem_chars: int = MAX_CHAIN_PEM_CHARS
    max_certificates: int = MAX_CHAIN_CERTIFICATES
    store_anchors: tuple[x509.Certificate, ...] = field(init=False, repr=False)
    known_intermediates: tuple[x509.Certificate, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.anchors:
            raise ChainConfigError("no trust anchor configured")
        if not 0 <= self.max_chain_depth <= 32:
            raise ChainConfigError("max_chain_depth must be between 0 and 32")
        if self.time_skew < 0:
            raise ChainConfigError("time_skew must not be negative")
        unique: dict[bytes, x509.Certificate] = {}
        for cert in self.anchors:
            check_anchor(cert)
            unique.setdefault(cert.fingerprint(hashes.SHA256()), cert)
        anchors = tuple(unique.values())
        if self.allow_partial_chain:
            store, known = anchors, ()
        else:
            store = tuple(c for c in anchors if is_self_signed(c))
            known = tuple(c for c in anchors if not is_self_signed(c))
            if not store:
                raise ChainConfigError("no self-signed root among the trust anchors: add the root, or set "
                                       "allow_partial_chain to let an intermediate end the path")
        object.__setattr__(self, "anchors", anchors)
        object.__setattr__(self, "store_anchors", store)
        object.__setattr__(self, "known_intermediates", known)


@dataclass(frozen=True)
class VerifiedChain:
    """A chain that verified: the path from the leaf to its anchor and what callers need from it."""

    leaf: x509.Certificate
    path: tuple[x509.Certificate, ...]           # leaf, intermediates ..., anchor
    presented: tuple[x509.Certificate, ...]      # as the client sent them, leaf first
    chain_sha256: str                            # SHA-256 of the presented PEM text (the cache key)
    leaf_sha256: str                             # the leaf's fingerprint
    spki_sha256: str                             # SHA-256 of the leaf's SubjectPublicKeyInfo
    ca_sha256: tuple[str, ...]                   # fingerprints of the CA certificates of the path
    valid_from: float                            # epoch seconds; skew included
    valid_until: float                           # earliest notAfter of the path, skew included

    @property
    def issuer(self) -> x509.Certificate | None:
        """The certificate that signed the leaf (for revocation checks)."""
        return self.path[1] if len(self.path) > 1 else None

    @property
    def anchor(self) -> x509.Certificate:
        return self.path[-1]

    @property
    def intermediates(self) -> tuple[x509.Certificate, ...]:
        """The path between leaf and anchor (RFC 9440 `Client-Cert-Chain`)."""
        return self.path[1:-1]


@dataclass(frozen=True)
class ChainVerdict:
    """`chain` when verified, else `reason` (and `detail` for the log). `leaf` is the presented
    leaf whenever it could be parsed, verified or not (for logs and report-only marks)."""

    chain: VerifiedChain | None = None
    reason: Reason | None = None
    detail: str = ""
    leaf: x509.Certificate | None = None

    @property
    def ok(self) -> bool:
        return self.chain is not None


def read_chain(pem: object, max_chars: int = MAX_CHAIN_PEM_CHARS) -> tuple[bytes, ChainVerdict | None]:
    """Check the presented chain's form before anything is parsed: `(ascii_bytes, None)`, or
    `(b"", refusal)`."""
    if pem is None or pem == "" or pem == b"":
        return b"", ChainVerdict(reason=Reason.NO_CERTIFICATE, detail="no client certificate")
    if not isinstance(pem, (str, bytes)):
        return b"", ChainVerdict(reason=Reason.MALFORMED_CHAIN, detail=f"chain is a {type(pem).__name__}")
    if len(pem) > max_chars:
        return b"", ChainVerdict(reason=Reason.CHAIN_TOO_LARGE,
                                 detail=f"{len(pem)} characters, limit {max_chars}")
    if isinstance(pem, str):
        try:
            data = pem.encode("ascii")
        except UnicodeEncodeError:
            return b"", ChainVerdict(reason=Reason.MALFORMED_CHAIN, detail="chain is not ASCII PEM")
    else:
        data = pem
        if not data.isascii():
            return b"", ChainVerdict(reason=Reason.MALFORMED_CHAIN, detail="chain is not ASCII PEM")
    return data, None


# ====================================================================================================
# Verification
# ====================================================================================================
def _message_reason(message: str) -> Reason:
    """Map a cryptography VerificationError message (cryptography 45-50) to our reason code."""
    for needle, reason in _MESSAGE_REASONS:
        if needle in message:
            return reason
    return Reason.INVALID_CERTIFICATE


_MESSAGE_REASONS = (
    ("exceeds max depth", Reason.CHAIN_TOO_DEEP),
    ("not valid at validation time", Reason.EXPIRED),  # refined by _time_reason
    ("EKU", Reason.BAD_EKU),
    ("signature does not match", Reason.BAD_SIGNATURE),
    ("must not be asserted in an EE", Reason.LEAF_IS_CA),
    ("basicConstraints", Reason.INVALID_CA),
    ("path length", Reason.INVALID_CA),
    ("name constraint", Reason.INVALID_CA),
    ("Forbidden", Reason.UNSUPPORTED_ALGORITHM),
    ("RSA key", Reason.UNSUPPORTED_ALGORITHM),
    ("invalid extension", Reason.BAD_EXTENSION),
    ("extension validator failed", Reason.BAD_EXTENSION),  # _san_rules
    ("no interior errors", Reason.UNKNOWN_CA),
)


def _time_reason(certs: Sequence[x509.Certificate],
                 moment: dt.datetime) -> tuple[Reason, str, x509.Certificate | None]:
    """Which certificate is out of its validity window at `moment` (leaf first)."""
    for cert in certs:
        if cert.not_valid_before_utc > moment:
            since = cert.not_valid_before_utc.isoformat()
            return Reason.NOT_YET_VALID, f"valid from {since}: {describe(cert)}", cert
        if cert.not_valid_after_utc < moment:
            return Reason.EXPIRED, f"expired {cert.not_valid_after_utc.isoformat()}: {describe(cert)}", cert
    return Reason.EXPIRED, "a certificate of the path is outside its validity period", None


def _eku_name(oid: x509.ObjectIdentifier) -> str:
    return next((name for name, known in _EKU_NAMES.items() if known == oid), oid.dotted_string)


def _leaf_usage_problem(leaf: x509.Certificate,
                        eku: x509.ObjectIdentifier | None) -> tuple[Reason, str] | None:
    try:
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    except EXTENSION_ERRORS as exc:
        return Reason.MALFORMED_CHAIN, f"unreadable extensions: {exc}"
    try:
        names = len(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        names = 0
    if names > MAX_LEAF_NAMES:
        return Reason.BAD_EXTENSION, f"subjectAltName with {names} names, limit {MAX_LEAF_NAMES}"
    if usage is not None and not usage.digital_signature:
        return Reason.BAD_KEY_USAGE, "keyUsage lacks digitalSignature"
    if eku is not None:
        try:
            purposes = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            return None
        if eku not in purposes:
            listed = ", ".join(_eku_name(p) for p in purposes) or "none"
            return Reason.BAD_EKU, f"extendedKeyUsage lacks {_eku_name(eku)} (has {listed})"
    return None


def _path_candidates(presented: Sequence[x509.Certificate], policy: ChainPolicy) -> list[x509.Certificate]:
    """The CA certificates path building may use: the configured intermediates and the presented
    ones, without duplicates, without self-issued ones (a root the client appended is in the store
    already or useless), and at most two per subject and key (a CA and one cross-signed copy). A
    crafted set of CAs sharing one name and key otherwise costs path building many signature checks."""
    out: dict[str, x509.Certificate] = {}
    per_subject_key: dict[tuple[bytes, bytes], int] = {}
    for cert in [*policy.known_intermediates, *presented]:
        if cert.issuer == cert.subject:
            continue
        group = (cert.subject.public_bytes(), cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
        fingerprint = cert_sha256(cert)
        if fingerprint in out or per_subject_key.get(group, 0) >= 2:
            continue
        per_subject_key[group] = per_subject_key.get(group, 0) + 1
        out[fingerprint] = cert
    return list(out.values())


def _san_rules(_policy: Any, cert: x509.Certificate, san: x509.SubjectAlternativeName | None) -> None:
    """RFC 5280 4.2.1.6: with an empty subject the subjectAltName must be critical; with a subject,
    it is not (the web PKI refuses a critical one)."""
    if san is None:
        if len(cert.subject) == 0:
            raise ValueError("a leaf with an empty subject needs a subjectAltName")
        return
    critical = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical
    if len(cert.subject) == 0 and not critical:
        raise ValueError("an empty subject requires a critical subjectAltName")
    if len(cert.subject) > 0 and critical:
        raise ValueError("a critical subjectAltName beside a non-empty subject")


class ChainVerifier:
    """Verifies presented chains against one `ChainPolicy`, with the caches described above.

    `clock` returns epoch seconds (tests and `kong-mtls check --at` pass their own)."""

    def __init__(self, policy: ChainPolicy, *, cache_size: int = 4096,
                 clock: Callable[[], float] = time.time) -> None:
        self.policy = policy
        self.clock = clock
        self._verified: LRU[str, VerifiedChain] = LRU(cache_size)
        self._refused: LRU[str, tuple[float, ChainVerdict]] = LRU(min(cache_size, 1024))
        self.hits = 0
        self.misses = 0
        # The web PKI's end-entity rules with two relaxations, each for a documented need
        # (docs/client-cert-auth.md, "What the verifier accepts"): subjectAltName may be absent
        # (CN-only client certificates of enterprise PKIs), its criticality then checked as RFC 5280
        # says; extendedKeyUsage is any purpose, non-critical (the purpose is checked afterwards
        # against `required_eku`, which may be another than clientAuth).
        ee = (verification.ExtensionPolicy.webpki_defaults_ee()
              .may_be_present(x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, _san_rules)
              .may_be_present(x509.ExtendedKeyUsage, verification.Criticality.NON_CRITICAL, None))
        ca = verification.ExtensionPolicy.webpki_defaults_ca()
        if policy.required_eku != ExtendedKeyUsageOID.CLIENT_AUTH:
            # The client verifier checks CA certificates' EKU against clientAuth; another purpose
            # (or none) is checked on the leaf only.
            ca = ca.may_be_present(x509.ExtendedKeyUsage, verification.Criticality.AGNOSTIC, None)
        self._ee_policy = ee
        self._ca_policy = ca
        self._store = verification.Store(list(policy.store_anchors))

    def verify(self, pem: object) -> ChainVerdict:
        """Verify the presented chain (PEM, leaf first); never raises."""
        policy = self.policy
        data, refusal = read_chain(pem, policy.max_pem_chars)
        if refusal is not None:
            return refusal
        key = hashlib.sha256(data).hexdigest()
        now = self.clock()
        cached = self._verified.get(key)
        if cached is not None:
            if cached.valid_from <= now <= cached.valid_until:
                self.hits += 1
                return ChainVerdict(chain=cached, leaf=cached.leaf)
            self._verified.pop(key)
        refused = self._refused.get(key)
        if refused is not None:
            if now < refused[0]:
                self.hits += 1
                return refused[1]
            self._refused.pop(key)
        self.misses += 1
        try:
            verdict = self._verify(data, key, now)
        except Exception as exc:  # a certificate cryptography parses but cannot process
            verdict = ChainVerdict(reason=Reason.MALFORMED_CHAIN, detail=f"{type(exc).__name__}: {exc}")
        if verdict.chain is not None:
            self._verified.put(key, verdict.chain)
        else:
            self._refused.put(key, (now + REFUSAL_CACHE_SECONDS, verdict))
        return verdict

    def _verify(self, data: bytes, key: str, now: float) -> ChainVerdict:
        policy = self.policy
        # Every PEM block counts, whatever its label: cryptography also reads "X509 CERTIFICATE".
        # A usable chain holds the leaf, at most max_chain_depth CAs, perhaps the root and a
        # cross-signed CA or two: more candidates only feed path building.
        count = data.count(b"-----BEGIN ")
        limit = min(policy.max_certificates, policy.max_chain_depth + 4)
        if count > limit:
            return ChainVerdict(reason=Reason.CHAIN_TOO_LARGE, detail=f"{count} certificates, limit {limit}")
        if count == 0:
            return ChainVerdict(reason=Reason.MALFORMED_CHAIN, detail="no PEM certificate in the chain")
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            return ChainVerdict(reason=Reason.MALFORMED_CHAIN, detail=f"unreadable PEM: {exc}")
        leaf, presented_intermediates = certs[0], certs[1:]
        # Cheap refusals before path building: the leaf's own key usage and purpose.
        problem = _leaf_usage_problem(leaf, policy.required_eku)
        if problem is not None:
            return ChainVerdict(reason=problem[0], detail=f"{problem[1]}: {describe(leaf)}", leaf=leaf)
        intermediates = _path_candidates(presented_intermediates, policy)
        moment = _utc(now)
        try:
            path = self._path(leaf, intermediates, moment)
        except verification.VerificationError as exc:
            reason, detail, culprit = self._explain(str(exc), certs, moment)
            retry_at = self._skewed_time(reason, culprit, moment)
            if retry_at is None:
                return ChainVerdict(reason=reason, detail=detail, leaf=leaf)
            try:
                path = self._path(leaf, intermediates, retry_at)
            except verification.VerificationError:
                return ChainVerdict(reason=reason, detail=detail, leaf=leaf)
        skew = policy.time_skew
        chain = VerifiedChain(
            leaf=leaf, path=tuple(path), presented=tuple(certs), chain_sha256=key,
            leaf_sha256=cert_sha256(leaf), spki_sha256=spki_sha256(leaf),
            ca_sha256=tuple(cert_sha256(c) for c in path[1:]),
            valid_from=max(c.not_valid_before_utc.timestamp() for c in path) - skew,
            valid_until=min(c.not_valid_after_utc.timestamp() for c in path) + skew,
        )
        return ChainVerdict(chain=chain, leaf=leaf)

    def _path(self, leaf: x509.Certificate, intermediates: list[x509.Certificate],
              moment: dt.datetime) -> list[x509.Certificate]:
        builder = (verification.PolicyBuilder()
                   .store(self._store)
                   .time(moment)
                   .max_chain_depth(self.policy.max_chain_depth)
                   .extension_policies(ca_policy=self._ca_policy, ee_policy=self._ee_policy))
        return builder.build_client_verifier().verify(leaf, intermediates).chain

    def _explain(self, message: str, certs: Sequence[x509.Certificate],
                 moment: dt.datetime) -> tuple[Reason, str, x509.Certificate | None]:
        """Reason, log detail and, for a validity failure, the certificate out of its window."""
        reason = _message_reason(message)
        if reason is Reason.EXPIRED:
            candidates = [*certs, *self.policy.known_intermediates, *self.policy.store_anchors]
            reason, why, culprit = _time_reason(candidates, moment)
            if culprit is certs[0]:
                return reason, why, culprit
            return reason, f"{why} [leaf {describe(certs[0])}]", culprit
        return reason, f"{message.replace('validation failed: ', '')} [leaf {describe(certs[0])}]", None

    def _skewed_time(self, reason: Reason, culprit: x509.Certificate | None,
                     moment: dt.datetime) -> dt.datetime | None:
        """The validation time closest to now at which `culprit` is valid, if within the skew. The
        verifier takes one validation time for the whole path, so the skew is applied by checking
        again at that instant (a path valid at no single instant stays refused)."""
        skew = dt.timedelta(seconds=self.policy.time_skew)
        if not skew or culprit is None:
            return None
        if reason is Reason.EXPIRED and culprit.not_valid_after_utc >= moment - skew:
            return culprit.not_valid_after_utc
        if reason is Reason.NOT_YET_VALID and culprit.not_valid_before_utc <= moment + skew:
            return culprit.not_valid_before_utc
        return None

    @property
    def cache_size(self) -> int:
        return len(self._verified)
