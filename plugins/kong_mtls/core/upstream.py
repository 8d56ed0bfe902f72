"""Who is the upstream? A real TLS probe, an identity verdict, and a short-lived verdict cache.

Kong OSS verifies an upstream's certificate chain and host name per connection when the Service has
`tls_verify` on, but cannot check the certificate's other SAN entries, a SPIFFE ID, or pin its key.
This module does that by connecting to the upstream the way Kong does, and judging what it presents:

* `UpstreamPolicy.build(...)`: the trust store (CA PEM text and/or files), Kong's client certificate
  and key (files; presented to the upstream like the Service's `client_certificate`), the expected
  identity (SAN DNS names, SAN URIs such as SPIFFE IDs, SHA-256 pins of the SubjectPublicKeyInfo) and
  timeouts. Config problems raise `ConfigError` naming the field.
* `probe(target, settings)`: one TCP connect + TLS handshake with Python's `ssl` (OpenSSL, the same
  verification nginx runs for `proxy_ssl_verify`), bounded by one deadline, never raising. In TLS 1.3
  a server judges the client certificate after the handshake has completed on the client side, so the
  probe then waits (at most `post_handshake_wait`) for the server's verdict: an alert means our
  certificate was refused; a session ticket or data means it was accepted. A chain OpenSSL accepted
  is verified once more, as presented on that connection, with `cryptography`'s web-PKI server
  verifier (`webpki_problem`): stricter than OpenSSL on what a server certificate may be.
* `evaluate(observation, policy)` → `Verdict` with a stable `Reason`, plus `ExpiryNotice`s for the
  upstream's certificate and Kong's own client certificate when they expire within the warning window.
* `VerdictCache`: verdicts per target with a TTL (shorter for failures) and a refresh-ahead point, so
  a caller serves from cache and refreshes in the background before the verdict goes stale.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import re
import selectors
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import verification

from kong_mtls.core.chain import normalize_sha256, spki_sha256
from kong_mtls.files import FileReadError, read_limited
from kong_mtls.schema import ConfigError

#: Client-facing message of a refusal (the reason and the details go to the log only).
MESSAGE_UNVERIFIED = "The upstream server's identity could not be verified"
#: Status of a refusal: Kong answers 502 when it cannot get a valid answer from the upstream.
REFUSAL_STATUS = 502
#: Service protocols for which Kong talks TLS to the upstream.
TLS_PROTOCOLS = frozenset({"https", "grpcs", "tls", "wss"})

DEFAULT_TIMEOUT = 5.0
DEFAULT_POST_HANDSHAKE_WAIT = 0.5
DEFAULT_WARNING_DAYS = 14
#: A verdict older than this fraction of its TTL is refreshed in the background while still served.
REFRESH_FRACTION = 0.5
MIN_TLS_VERSION = ssl.TLSVersion.TLSv1_2

# OpenSSL X509_V_ERR_* codes (include/openssl/x509_vfy.h) mapped to our reasons.
_X509_V_ERR_CERT_NOT_YET_VALID = 9
_X509_V_ERR_CERT_HAS_EXPIRED = 10
_X509_V_ERR_HOSTNAME_MISMATCH = 62
_X509_V_ERR_IP_ADDRESS_MISMATCH = 64

# TLS alerts a server sends when it refuses the client's certificate (or its absence in TLS 1.3).
_CLIENT_CERT_ALERTS = ("CERTIFICATE", "UNKNOWN_CA", "ACCESS_DENIED", "DECRYPT_ERROR")

_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$")
_MAX_DETAIL = 200


class Reason(str, Enum):
    """Stable codes for a verdict, logged with every refusal."""

    IDENTITY_OK = "IDENTITY_OK"
    SAN_MISMATCH = "SAN_MISMATCH"                      # none of the expected DNS names in the SAN
    URI_SAN_MISMATCH = "URI_SAN_MISMATCH"              # none of the expected URIs / SPIFFE IDs in the SAN
    SPKI_MISMATCH = "SPKI_MISMATCH"                    # the public key matches none of the pins
    HOSTNAME_MISMATCH = "HOSTNAME_MISMATCH"            # not valid for the server name (as tls_verify checks)
    UPSTREAM_CERT_EXPIRED = "UPSTREAM_CERT_EXPIRED"    # the leaf (or a chain certificate) has expired
    UPSTREAM_CERT_NOT_YET_VALID = "UPSTREAM_CERT_NOT_YET_VALID"
    UNTRUSTED_UPSTREAM = "UNTRUSTED_UPSTREAM"          # the chain does not lead to a trusted CA
    WEBPKI_REFUSED = "WEBPKI_REFUSED"                  # OpenSSL accepted the chain, the web-PKI policy not
    CLIENT_CERT_REJECTED = "CLIENT_CERT_REJECTED"      # the upstream refused Kong's client cert (or none)
    CLIENT_CERT_UNUSABLE = "CLIENT_CERT_UNUSABLE"      # Kong's client cert/key files cannot be loaded
    TRUST_STORE_UNUSABLE = "TRUST_STORE_UNUSABLE"      # the CA files cannot be loaded
    HANDSHAKE_FAILED = "HANDSHAKE_FAILED"              # any other TLS failure (protocol, cipher, not TLS)
    UPSTREAM_UNREACHABLE = "UPSTREAM_UNREACHABLE"      # name not resolved, connection refused, no route
    PROBE_TIMEOUT = "PROBE_TIMEOUT"                    # no verdict within the probe timeout
    PROBE_ERROR = "PROBE_ERROR"                        # the probe itself failed unexpectedly
    UPSTREAM_NOT_TLS = "UPSTREAM_NOT_TLS"              # the Service does not speak TLS to its upstream
    NO_TARGET = "NO_TARGET"                            # no host/port to probe
    SERVICE_UNVERIFIED = "SERVICE_UNVERIFIED"          # the Service does not verify its upstream itself
    SERVICE_NO_CA_STORE = "SERVICE_NO_CA_STORE"        # ... or only against the system trust store
    SERVICE_POOL_SHARED = "SERVICE_POOL_SHARED"        # Kong may reuse another Service's connections
    UPSTREAM_HOST_CHANGED = "UPSTREAM_HOST_CHANGED"    # the route's preserve_host: the client names the host


#: Verdicts that say the upstream presented something other than the configured identity (as opposed
#: to an upstream that could not be reached or judged): the probe's alarms, logged at `err` and counted.
IDENTITY_ALARMS = frozenset({Reason.SAN_MISMATCH, Reason.URI_SAN_MISMATCH, Reason.SPKI_MISMATCH,
                             Reason.HOSTNAME_MISMATCH, Reason.UNTRUSTED_UPSTREAM, Reason.WEBPKI_REFUSED})


class Notice(str, Enum):
    """Warnings that do not refuse anything."""

    UPSTREAM_CERT_EXPIRING = "UPSTREAM_CERT_EXPIRING"
    CLIENT_CERT_EXPIRING = "CLIENT_CERT_EXPIRING"
    CLIENT_CERT_EXPIRED = "CLIENT_CERT_EXPIRED"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _short(text: str, limit: int = _MAX_DETAIL) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


# -- certificates -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CertSummary:
    """What a certificate says about itself, for verdicts, logs and the CLI."""

    subject: str
    issuer: str
    serial: str
    not_before: dt.datetime
    not_after: dt.datetime
    dns_names: tuple[str, ...]
    uris: tuple[str, ...]
    ips: tuple[str, ...]
    spki_sha256: bytes
    fingerprint_sha256: bytes

    @classmethod
    def of(cls, cert: x509.Certificate) -> CertSummary:
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            dns = tuple(san.get_values_for_type(x509.DNSName))
            uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
            ips = tuple(str(i) for i in san.get_values_for_type(x509.IPAddress))
        except (x509.ExtensionNotFound, ValueError):
            dns, uris, ips = (), (), ()
        return cls(subject=cert.subject.rfc4514_string(), issuer=cert.issuer.rfc4514_string(),
                   serial=format(cert.serial_number, "x"), not_before=cert.not_valid_before_utc,
                   not_after=cert.not_valid_after_utc, dns_names=dns, uris=uris, ips=ips,
                   spki_sha256=bytes.fromhex(spki_sha256(cert)),
                   fingerprint_sha256=cert.fingerprint(hashes.SHA256()))

    @property
    def spki_b64(self) -> str:
        return base64.b64encode(self.spki_sha256).decode()

    def as_dict(self) -> dict[str, Any]:
        return {"subject": self.subject, "issuer": self.issuer, "serial": self.serial,
                "not_before": self.not_before.isoformat(), "not_after": self.not_after.isoformat(),
                "dns_names": list(self.dns_names), "uris": list(self.uris), "ips": list(self.ips),
                "spki_sha256": self.spki_b64, "spki_sha256_hex": self.spki_sha256.hex(),
                "fingerprint_sha256": self.fingerprint_sha256.hex()}


def parse_spki_pin(text: object) -> bytes:
    """A SHA-256 SPKI pin in any form `chain.normalize_sha256` reads, as bytes. Raises ValueError."""
    return bytes.fromhex(normalize_sha256(text))


def _shown(text: object) -> str:
    """A rejected expected name, as an error may show it: a short one whole; a long one (a key or
    a certificate pasted in the wrong field) by its length only."""
    if not isinstance(text, str):
        return f"a {type(text).__name__}"
    return repr(text) if len(text) <= 80 and "\n" not in text else f"a value of {len(text)} characters"


def _normalise_dns_name(text: object) -> str:
    if not isinstance(text, str):
        raise ValueError("expected a DNS name")
    name = text.strip().rstrip(".").lower()
    labels = name.split(".")
    if labels and labels[0] == "*":
        labels = labels[1:]
        if len(labels) < 2:
            raise ValueError(f"{_shown(text)}: a wildcard needs at least two labels after '*.'")
    if not name.isascii() or not labels or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"{_shown(text)} is not a DNS name (use the ASCII/punycode form)")
    return name


def _normalise_uri(text: object) -> str:
    if not isinstance(text, str) or not _URI.fullmatch(text.strip()) or not text.strip().isascii():
        raise ValueError(f"{_shown(text)} is not a URI (e.g. spiffe://example.org/ns/default/sa/api)")
    uri = text.strip()
    if uri.lower().startswith("spiffe://"):
        # SPIFFE: scheme and trust domain are lower case; the path is compared as is.
        rest = uri[len("spiffe://"):]
        domain, slash, path = rest.partition("/")
        if not domain or domain != domain.lower():
            raise ValueError(f"{_shown(text)}: a SPIFFE ID's trust domain must be non-empty lower case")
        uri = "spiffe://" + domain + slash + path
    return uri


def dns_name_matches(expected: str, presented: str) -> bool:
    """Does the certificate's SAN DNS entry `presented` cover the `expected` name?

    Exact match (case-insensitive), or `presented` is a wildcard `*.rest` covering exactly one
    left-most label of `expected` (RFC 6125 6.4.3). An expected wildcard matches only itself.
    """
    presented = presented.lower().rstrip(".")
    if expected == presented:
        return True
    if not presented.startswith("*.") or expected.startswith("*."):
        return False
    first, dot, rest = expected.partition(".")
    return bool(first) and bool(dot) and rest == presented[2:]


# -- configuration ----------------------------------------------------------------------------------

def check_server_name(name: object) -> str:
    """A name usable as SNI and for the certificate check (ASCII host name or IP), else ValueError."""
    if (not isinstance(name, str) or not name or len(name) > 253 or not name.isascii()
            or any(c.isspace() or c in "/:@" for c in name)):
        raise ValueError(f"invalid server name {name!r}")
    return name


@dataclass(frozen=True)
class Target:
    """Where to probe, and the server name sent as SNI and checked against the certificate."""

    host: str
    port: int
    server_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host or any(c.isspace() for c in self.host):
            raise ValueError(f"invalid host {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ValueError(f"invalid port {self.port!r}")
        if self.server_name is not None:
            check_server_name(self.server_name)

    @property
    def name(self) -> str:
        """The name sent as SNI and verified: `server_name`, else the host."""
        return self.server_name or self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_target(text: str, default_port: int | None = None) -> Target:
    """`host:port`, `[ipv6]:port`, or a bare host/IPv4 when `default_port` is given."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else None
        if not sep or (rest and port_text is None):
            raise ValueError(f"{text!r}: expected [ipv6]:port")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif ":" in text:
        raise ValueError(f"{text!r}: put an IPv6 address in brackets, e.g. [::1]:443")
    else:
        host, port_text = text, None
    if port_text is None:
        if default_port is None:
            raise ValueError(f"{text!r}: expected host:port")
        port = default_port
    elif port_text.isascii() and port_text.isdigit():
        port = int(port_text)
    else:
        raise ValueError(f"{text!r}: the port must be a number")
    return Target(host, port)


@dataclass(frozen=True)
class ProbeSettings:
    """How to connect: trust store, Kong's client certificate, host-name check, time limits.

    Files are read again by every probe, so rotated certificates are picked up without a restart.
    """

    ca_pem: str = ""
    ca_files: tuple[str, ...] = ()
    client_cert_file: str | None = None
    client_key_file: str | None = None
    verify_hostname: bool = True
    timeout: float = DEFAULT_TIMEOUT
    post_handshake_wait: float = DEFAULT_POST_HANDSHAKE_WAIT

    @property
    def has_trust(self) -> bool:
        return bool(self.ca_pem or self.ca_files)


@dataclass(frozen=True)
class Expectation:
    """The identity the upstream must prove. Within a kind any entry may match; every kind that is
    set must match."""

    dns_names: frozenset[str] = frozenset()
    uris: frozenset[str] = frozenset()
    spki_pins: frozenset[bytes] = frozenset()


@dataclass(frozen=True)
class UpstreamPolicy:
    settings: ProbeSettings
    expectation: Expectation
    warn_within: dt.timedelta = dt.timedelta(days=DEFAULT_WARNING_DAYS)

    @classmethod
    def build(cls, *, trusted_ca_pem: str | None = None, trusted_ca_files: Sequence[str] = (),
              client_cert_file: str | None = None, client_key_file: str | None = None,
              expected_dns_names: Sequence[str] = (), expected_uris: Sequence[str] = (),
              spki_sha256_pins: Sequence[str] = (), verify_hostname: bool = True,
              timeout: float = DEFAULT_TIMEOUT, expiry_warning_days: int = DEFAULT_WARNING_DAYS,
              post_handshake_wait: float = DEFAULT_POST_HANDSHAKE_WAIT,
              field_names: Mapping[str, str] | None = None,
              allow_unverified: bool = False) -> UpstreamPolicy:
        """Check and compile a policy; `ConfigError` names the offending field (`field_names` maps
        the keyword names to the caller's, e.g. CLI options). `allow_unverified` accepts a policy with
        neither CAs nor pins (only to look at an upstream: such a policy proves nothing)."""
        names = dict(field_names or {})

        def where(key: str, index: int | None = None) -> str:
            base = names.get(key, key)
            return base if index is None else f"{base}[{index}]"

        ca_pem = (trusted_ca_pem or "").strip()
        if ca_pem:
            try:
                load_certificates(ca_pem.encode())
            except ValueError as exc:
                raise ConfigError(where("trusted_ca_pem"), str(exc)) from None
        for i, path in enumerate(trusted_ca_files, start=1):
            try:
                load_certificates(_read(path))
            except (OSError, ValueError) as exc:
                raise ConfigError(where("trusted_ca_files", i), f"{path}: {_os_error(exc)}") from None
        if bool(client_cert_file) != bool(client_key_file):
            missing = "client_key_file" if client_cert_file else "client_cert_file"
            raise ConfigError(where(missing), "the client certificate and its key go together")
        if client_cert_file and client_key_file:
            try:
                load_client_certificate(client_cert_file, client_key_file)
            except ClientCertError as exc:
                raise ConfigError(where(exc.field), str(exc)) from None
        dns = frozenset(_each(expected_dns_names, _normalise_dns_name, where, "expected_dns_names"))
        uris = frozenset(_each(expected_uris, _normalise_uri, where, "expected_uris"))
        pins = frozenset(_each(spki_sha256_pins, parse_spki_pin, where, "spki_sha256_pins"))
        if not (ca_pem or trusted_ca_files) and not pins and not allow_unverified:
            raise ConfigError(where("trusted_ca_pem"),
                              f"give trusted CA certificates ({where('trusted_ca_pem')} or "
                              f"{where('trusted_ca_files')}) or {where('spki_sha256_pins')}: without "
                              "either nothing proves who the upstream is")
        if not 0 < timeout <= 60:
            raise ConfigError(where("timeout"), "must be more than 0 and at most 60 seconds")
        if not 0 <= expiry_warning_days <= 3650:
            raise ConfigError(where("expiry_warning_days"), "must be between 0 and 3650")
        settings = ProbeSettings(ca_pem=ca_pem, ca_files=tuple(trusted_ca_files),
                                 client_cert_file=client_cert_file or None,
                                 client_key_file=client_key_file or None,
                                 verify_hostname=verify_hostname, timeout=float(timeout),
                                 post_handshake_wait=min(post_handshake_wait, float(timeout)))
        return cls(settings, Expectation(dns, uris, pins), dt.timedelta(days=expiry_warning_days))


def _each(items: Sequence[Any], parse: Callable[[Any], Any], where: Callable[..., str],
          key: str) -> list[Any]:
    out = []
    for i, item in enumerate(items, start=1):
        try:
            out.append(parse(item))
        except ValueError as exc:
            raise ConfigError(where(key, i), str(exc)) from None
    return out


def _read(path: str) -> bytes:
    try:
        return read_limited(path)
    except FileReadError as exc:
        raise OSError(str(exc)) from None


def _os_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def load_certificates(pem: bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM text; ValueError when there is none or one is broken."""
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise ValueError("no PEM certificate found")
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise ValueError("a PEM certificate could not be parsed") from None


class ClientCertError(ValueError):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(problem)
        self.field = field


def load_client_certificate(cert_file: str, key_file: str) -> x509.Certificate:
    """Kong's client certificate (leaf first in the file) after checking the key belongs to it.
    Errors never include key material."""
    try:
        certs = load_certificates(_read(cert_file))
    except (OSError, ValueError) as exc:
        raise ClientCertError("client_cert_file", f"{cert_file}: {_os_error(exc)}") from None
    try:
        key = serialization.load_pem_private_key(_read(key_file), password=None)
    except OSError as exc:
        raise ClientCertError("client_key_file", f"{key_file}: {_os_error(exc)}") from None
    except TypeError:
        raise ClientCertError("client_key_file",
                              f"{key_file}: the key is encrypted; give an unencrypted PEM key") from None
    except Exception:  # cryptography raises ValueError and others for junk input
        raise ClientCertError("client_key_file", f"{key_file}: not a PEM private key") from None
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if certs[0].public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        raise ClientCertError("client_key_file", f"{key_file}: the key does not match {cert_file}")
    return certs[0]


# -- probe ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Observation:
    """What one probe saw. `failure` is set when no identity could be established."""

    target: Target
    failure: Reason | None = None
    detail: str = ""
    certificate: CertSummary | None = None   # the upstream's leaf (captured even if verification failed)
    chain_verified: bool = False             # the chain was verified against the trust store
    tls_version: str | None = None
    cipher: str | None = None
    client_certificate: CertSummary | None = None  # what Kong presented


class _Failed(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = _short(detail)


def _no_password() -> bytes:
    # Never let OpenSSL prompt on a terminal for an encrypted key: fail instead.
    return b""


def _trust_anchors(settings: ProbeSettings) -> list[x509.Certificate]:
    """The trusted CA certificates, read now (files may have been rotated)."""
    pem = settings.ca_pem
    try:
        for path in settings.ca_files:
            pem += "\n" + _read(path).decode("ascii", "replace")
        return load_certificates(pem.encode())
    except (OSError, ValueError) as exc:
        raise _Failed(Reason.TRUST_STORE_UNUSABLE, f"cannot load the trusted CAs: {_os_error(exc)}") \
            from None


def _context(settings: ProbeSettings, anchors: Sequence[x509.Certificate] | None) -> ssl.SSLContext:
    """A client context verifying against `anchors` (None: verify nothing)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = MIN_TLS_VERSION
    if anchors is not None:
        try:
            ctx.load_verify_locations(cadata="".join(
                c.public_bytes(serialization.Encoding.PEM).decode() for c in anchors))
        except (ValueError, ssl.SSLError) as exc:
            raise _Failed(Reason.TRUST_STORE_UNUSABLE, f"cannot load the trusted CAs: {_os_error(exc)}") \
                from None
        ctx.check_hostname = settings.verify_hostname
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if settings.client_cert_file and settings.client_key_file:
        try:
            ctx.load_cert_chain(settings.client_cert_file, settings.client_key_file, password=_no_password)
        except (OSError, ssl.SSLError) as exc:
            raise _Failed(Reason.CLIENT_CERT_UNUSABLE,
                          f"cannot load the client certificate {settings.client_cert_file}: "
                          f"{_os_error(exc)}") from None
    return ctx


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.seconds = seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise _Failed(Reason.PROBE_TIMEOUT, f"no answer within {self.seconds:g}s")
        return left


def _wait(sock: ssl.SSLSocket, events: int, timeout: float) -> bool:
    with selectors.DefaultSelector() as selector:
        selector.register(sock, events)
        return bool(selector.select(timeout))


def _connect(target: Target, deadline: _Deadline) -> socket.socket:
    try:
        return socket.create_connection((target.host, target.port), timeout=deadline.left())
    except socket.timeout:
        raise _Failed(Reason.PROBE_TIMEOUT, f"TCP connect did not complete within "
                                            f"{deadline.seconds:g}s") from None
    except socket.gaierror as exc:
        raise _Failed(Reason.UPSTREAM_UNREACHABLE, f"cannot resolve {target.host}: {exc.strerror}") from None
    except OSError as exc:
        raise _Failed(Reason.UPSTREAM_UNREACHABLE, f"cannot connect: {_os_error(exc)}") from None


def _alert_reason(exc: ssl.SSLError) -> Reason:
    name = (exc.reason or "").upper()
    if "ALERT" in name and any(word in name for word in _CLIENT_CERT_ALERTS):
        return Reason.CLIENT_CERT_REJECTED
    return Reason.HANDSHAKE_FAILED


def _verify_failure(exc: ssl.SSLCertVerificationError) -> _Failed:
    code = exc.verify_code
    message = exc.verify_message or str(exc)
    if code == _X509_V_ERR_CERT_HAS_EXPIRED:
        return _Failed(Reason.UPSTREAM_CERT_EXPIRED, message)
    if code == _X509_V_ERR_CERT_NOT_YET_VALID:
        return _Failed(Reason.UPSTREAM_CERT_NOT_YET_VALID, message)
    if code in (_X509_V_ERR_HOSTNAME_MISMATCH, _X509_V_ERR_IP_ADDRESS_MISMATCH):
        return _Failed(Reason.HOSTNAME_MISMATCH, message)
    return _Failed(Reason.UNTRUSTED_UPSTREAM, message)


def _handshake(ctx: ssl.SSLContext, target: Target, deadline: _Deadline) -> ssl.SSLSocket:
    raw = _connect(target, deadline)
    try:
        tls = ctx.wrap_socket(raw, server_hostname=target.name, do_handshake_on_connect=False)
    except (ssl.SSLError, ValueError, OSError) as exc:
        raw.close()
        raise _Failed(Reason.HANDSHAKE_FAILED, f"cannot start TLS: {exc}") from None
    try:
        tls.setblocking(False)
        while True:
            try:
                tls.do_handshake()
                return tls
            except ssl.SSLWantReadError:
                ready = _wait(tls, selectors.EVENT_READ, deadline.left())
            except ssl.SSLWantWriteError:
                ready = _wait(tls, selectors.EVENT_WRITE, deadline.left())
            if not ready:
                deadline.left()  # raises once the deadline has passed
    except _Failed:
        tls.close()
        raise
    except ssl.SSLCertVerificationError as exc:
        tls.close()
        raise _verify_failure(exc) from None
    except ssl.SSLEOFError:
        tls.close()
        raise _Failed(Reason.HANDSHAKE_FAILED, "the upstream closed the connection during the TLS "
                                               "handshake") from None
    except ssl.SSLError as exc:
        tls.close()
        raise _Failed(_alert_reason(exc), f"TLS handshake failed: {exc.reason or exc}") from None
    except OSError as exc:
        tls.close()
        raise _Failed(Reason.HANDSHAKE_FAILED, f"connection lost during the TLS handshake: "
                                               f"{_os_error(exc)}") from None


def _await_client_cert_verdict(tls: ssl.SSLSocket, settings: ProbeSettings, deadline: _Deadline) -> None:
    """TLS 1.3: the server checks our certificate after our side of the handshake is done; it
    answers with an alert (refused) or session tickets (accepted). Wait a little for either."""
    if tls.version() != "TLSv1.3" or settings.post_handshake_wait <= 0:
        return
    until = min(deadline.end, time.monotonic() + settings.post_handshake_wait)
    while True:
        try:
            if tls.recv(1):
                return  # the server spoke first: it accepted the connection
            raise _Failed(Reason.HANDSHAKE_FAILED, "the upstream closed the connection right after "
                                                   "the TLS handshake")
        except ssl.SSLWantReadError:
            session = tls.session
            if session is not None and session.has_ticket:
                return  # tickets are only sent to a client whose certificate was accepted
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            raise _Failed(Reason.HANDSHAKE_FAILED, "the upstream closed the connection right after "
                                                   "the TLS handshake") from None
        except ssl.SSLError as exc:
            raise _Failed(_alert_reason(exc), f"the upstream refused the connection after the "
                                              f"handshake: {exc.reason or exc}") from None
        except OSError as exc:
            raise _Failed(Reason.HANDSHAKE_FAILED, f"connection lost after the TLS handshake: "
                                                   f"{_os_error(exc)}") from None
        left = until - time.monotonic()
        if left <= 0 or not _wait(tls, selectors.EVENT_READ, left):
            return  # no word from the server: it did not refuse us


def _peer_certificate(tls: ssl.SSLSocket) -> CertSummary | None:
    der = tls.getpeercert(binary_form=True)
    return CertSummary.of(x509.load_der_x509_certificate(der)) if der else None


def _presented_chain(tls: ssl.SSLSocket) -> list[x509.Certificate]:
    """The certificates the upstream sent on this connection, leaf first, as OpenSSL received them.

    Python 3.13+ has `SSLSocket.get_unverified_chain()` (DER bytes); 3.10-3.12 have the same
    OpenSSL call (`SSL_get_peer_cert_chain`) on the socket's `_sslobj` (certificate objects).
    Older Pythons cannot return it: the probe then fails closed."""
    get = getattr(tls, "get_unverified_chain", None) or getattr(tls._sslobj, "get_unverified_chain", None)
    if get is None:
        raise _Failed(Reason.PROBE_ERROR, "this Python cannot return the upstream's certificate chain "
                                          "(Python 3.10 or later is needed)")
    chain = [x509.load_der_x509_certificate(c) if isinstance(c, bytes)
             else x509.load_pem_x509_certificate(c.public_bytes().encode()) for c in get() or ()]
    if not chain:
        raise _Failed(Reason.HANDSHAKE_FAILED, "the upstream presented no certificate")
    return chain


_ENCOUNTERED = re.compile(r"\s*\(encountered processing <Certificate.*$", re.DOTALL)


def webpki_problem(chain: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate],
                   server_name: str | None, now: dt.datetime | None = None) -> str | None:
    """Why `cryptography`'s web-PKI server verifier refuses the presented `chain` (leaf first) for
    `server_name`, or None when it accepts it.

    It is stricter than OpenSSL: a CA certificate as the leaf, a leaf without subjectAltName (OpenSSL
    falls back to the CN), a missing authority key identifier, a wildcard SAN reaching into a name
    constraint's excluded subtree are refused. `server_name` None (host-name check off):
    the name checked is the leaf's own first DNS (else IP) SAN, so only the name match is skipped."""
    leaf = chain[0]
    if server_name is None:
        summary = CertSummary.of(leaf)
        server_name = (summary.dns_names or summary.ips or (None,))[0]
        if server_name is None:
            return "the certificate has no DNS or IP subjectAltName"
    try:
        subject: verification.DNSName | verification.IPAddress = \
            verification.IPAddress(ipaddress.ip_address(server_name))
    except ValueError:
        try:
            subject = verification.DNSName(server_name)
        except ValueError:
            return f"{server_name!r} is not a name the web-PKI policy can check"
    try:
        verifier = (verification.PolicyBuilder().store(verification.Store(list(anchors)))
                    .time(now or _now()).build_server_verifier(subject))
        verifier.verify(leaf, list(chain[1:]))
    except verification.VerificationError as exc:
        return "web-PKI policy: " + _ENCOUNTERED.sub("", str(exc))
    except ValueError as exc:  # e.g. an empty store
        return f"web-PKI policy: {exc}"
    return None


def _client_summary(settings: ProbeSettings) -> CertSummary | None:
    if not (settings.client_cert_file and settings.client_key_file):
        return None
    try:
        return CertSummary.of(load_certificates(_read(settings.client_cert_file))[0])
    except (OSError, ValueError):
        return None


def probe(target: Target, settings: ProbeSettings) -> Observation:
    """Connect and handshake once; never raises, never exceeds `settings.timeout` by much."""
    client = None
    try:
        client = _client_summary(settings)
        deadline = _Deadline(settings.timeout)
        anchors = _trust_anchors(settings) if settings.has_trust else None
        try:
            tls = _handshake(_context(settings, anchors), target, deadline)
        except _Failed as failed:
            if failed.reason not in (Reason.UNTRUSTED_UPSTREAM, Reason.HOSTNAME_MISMATCH,
                                     Reason.UPSTREAM_CERT_EXPIRED, Reason.UPSTREAM_CERT_NOT_YET_VALID):
                raise
            return Observation(target, failed.reason, failed.detail,
                               certificate=_capture_unverified(target, settings, deadline),
                               client_certificate=client)
        try:
            # The chain first: an upstream that refuses Kong's certificate has still shown its own,
            # and another identity than the expected one must be an alarm, not a client-cert warning.
            chain = _presented_chain(tls)
            try:
                _await_client_cert_verdict(tls, settings, deadline)
            except _Failed as failed:
                if failed.reason is not Reason.CLIENT_CERT_REJECTED or not chain:
                    raise
                return Observation(target, failed.reason, failed.detail, certificate=CertSummary.of(chain[0]),
                                   client_certificate=client)
            cipher = tls.cipher()
            seen = dict(tls_version=tls.version(), cipher=cipher[0] if cipher else None,
                        client_certificate=client)
            problem = None if anchors is None else webpki_problem(
                chain, anchors, target.name if settings.verify_hostname else None)
            if problem is not None:
                return Observation(target, Reason.WEBPKI_REFUSED, _short(problem),
                                   certificate=CertSummary.of(chain[0]), **seen)
            return Observation(target, None, "", certificate=CertSummary.of(chain[0]),
                               chain_verified=anchors is not None, **seen)
        finally:
            tls.close()
    except _Failed as failed:
        return Observation(target, failed.reason, failed.detail, client_certificate=client)
    except Exception as exc:  # fail closed on anything unforeseen
        return Observation(target, Reason.PROBE_ERROR, _short(f"{type(exc).__name__}: {exc}"),
                           client_certificate=client)


def _capture_unverified(target: Target, settings: ProbeSettings, deadline: _Deadline) -> CertSummary | None:
    """After a failed verification, connect again without verifying, only to report what the
    upstream presents."""
    try:
        tls = _handshake(_context(settings, None), target, deadline)
    except _Failed:
        return None
    try:
        return _peer_certificate(tls)
    except ValueError:
        return None
    finally:
        tls.close()


# -- verdict ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExpiryNotice:
    notice: Notice
    subject: str
    not_after: dt.datetime

    def describe(self, now: dt.datetime | None = None) -> str:
        left = self.not_after - (now or _now())
        whose = "the upstream's certificate" if self.notice is Notice.UPSTREAM_CERT_EXPIRING \
            else "Kong's client certificate"
        if left.total_seconds() < 0:
            return f"{whose} ({self.subject}) expired at {self.not_after.isoformat()}"
        return f"{whose} ({self.subject}) expires at {self.not_after.isoformat()} " \
               f"(in {left.days} days)"


#: What `Verdict.describe` keeps of the texts an upstream chooses (its names, its subject).
MAX_SUBJECT_CHARS = 60


@dataclass(frozen=True)
class Verdict:
    reason: Reason
    detail: str
    observation: Observation
    notices: tuple[ExpiryNotice, ...] = ()
    checked_at: dt.datetime = field(default_factory=_now)

    @property
    def ok(self) -> bool:
        return self.reason is Reason.IDENTITY_OK

    @property
    def alarm(self) -> bool:
        """The upstream presented something other than the configured identity (IDENTITY_ALARMS)."""
        return self.reason in IDENTITY_ALARMS

    @property
    def target(self) -> Target:
        return self.observation.target

    @classmethod
    def failure(cls, target: Target, reason: Reason, detail: str) -> Verdict:
        return cls(reason, _short(detail), Observation(target, reason, _short(detail)))

    def describe(self) -> str:
        """One line for the log: where, the key seen, why, then the subject. What the upstream
        chooses (its subject, its names in the detail) comes last and shortened, so it cannot push
        the reason and the key out of the log's field limit."""
        parts = [f"target={self.target}"]
        if self.target.server_name:
            parts.append(f"sni={self.target.server_name}")
        cert = self.observation.certificate
        if cert is not None:
            parts.append(f"spki_sha256={cert.spki_b64}")
        if self.detail:
            parts.append(_short(self.detail))
        if cert is not None:
            parts.append(f"subject={_short(cert.subject, MAX_SUBJECT_CHARS)}")
        return " ".join(parts)

    def mark(self) -> dict[str, Any]:
        """What a passing request publishes in kong.ctx.shared."""
        cert = self.observation.certificate
        out: dict[str, Any] = {"target": str(self.target), "reason": self.reason.value,
                               "checked_at": int(self.checked_at.timestamp())}
        if cert is not None:
            out["spki_sha256"] = cert.spki_b64
            out["subject"] = cert.subject
        return out


def evaluate(observation: Observation, policy: UpstreamPolicy, now: dt.datetime | None = None) -> Verdict:
    """Judge an observation against the expected identity."""
    now = now or _now()
    notices = _notices(observation, policy.warn_within, now)
    cert = observation.certificate
    if observation.failure is Reason.CLIENT_CERT_REJECTED and cert is not None:
        # It refused Kong's certificate after showing its own: another identity is the alarm.
        reason, detail = _identity(cert, policy.expectation, now)
        if reason in IDENTITY_ALARMS:
            return Verdict(reason, _short(f"{detail}; it also refused Kong's client certificate"),
                           observation, notices, now)
    if observation.failure is not None:
        return Verdict(observation.failure, observation.detail, observation, notices, now)
    if cert is None:
        return Verdict(Reason.HANDSHAKE_FAILED, "the upstream presented no certificate", observation,
                       notices, now)
    reason, detail = _identity(cert, policy.expectation, now)
    return Verdict(reason, _short(detail), observation, notices, now)


def _identity(cert: CertSummary, expect: Expectation, now: dt.datetime) -> tuple[Reason, str]:
    """The certificate's validity and names against the expected identity."""
    reason, detail = Reason.IDENTITY_OK, ""
    if now < cert.not_before:
        reason, detail = Reason.UPSTREAM_CERT_NOT_YET_VALID, f"valid from {cert.not_before.isoformat()}"
    elif now > cert.not_after:
        reason, detail = Reason.UPSTREAM_CERT_EXPIRED, f"expired at {cert.not_after.isoformat()}"
    elif expect.spki_pins and cert.spki_sha256 not in expect.spki_pins:
        reason, detail = Reason.SPKI_MISMATCH, "the public key matches none of the pins"
    elif expect.dns_names and not any(dns_name_matches(e, p) for e in expect.dns_names
                                      for p in cert.dns_names):
        reason = Reason.SAN_MISMATCH
        detail = f"SAN DNS {list(cert.dns_names)} has none of {sorted(expect.dns_names)}"
    elif expect.uris and not expect.uris.intersection(cert.uris):
        reason = Reason.URI_SAN_MISMATCH
        detail = f"SAN URI {list(cert.uris)} has none of {sorted(expect.uris)}"
    return reason, detail


def _notices(observation: Observation, window: dt.timedelta, now: dt.datetime) -> tuple[ExpiryNotice, ...]:
    notices = []
    upstream = observation.certificate
    if upstream is not None and now <= upstream.not_after <= now + window:
        notices.append(ExpiryNotice(Notice.UPSTREAM_CERT_EXPIRING, upstream.subject, upstream.not_after))
    client = observation.client_certificate
    if client is not None and client.not_after < now:
        notices.append(ExpiryNotice(Notice.CLIENT_CERT_EXPIRED, client.subject, client.not_after))
    elif client is not None and client.not_after <= now + window:
        notices.append(ExpiryNotice(Notice.CLIENT_CERT_EXPIRING, client.subject, client.not_after))
    return tuple(notices)


def check(target: Target, policy: UpstreamPolicy) -> Verdict:
    """Probe and judge once (what the CLI runs, and what the plugin runs off the event loop)."""
    try:
        return evaluate(probe(target, policy.settings), policy)
    except Exception as exc:  # evaluate is not expected to raise; fail closed if it does
        return Verdict.failure(target, Reason.PROBE_ERROR, f"{type(exc).__name__}: {exc}")


# -- cache ------------------------------------------------------------------------------------------

class Freshness(str, Enum):
    FRESH = "FRESH"              # serve it
    REFRESH_DUE = "REFRESH_DUE"  # serve it, and refresh in the background
    EXPIRED = "EXPIRED"          # too old to serve: probe again and wait
    MISSING = "MISSING"


@dataclass
class _Entry:
    verdict: Verdict
    stored_at: float
    announced: bool = False


#: Service protocols for which Kong talks TLS to the upstream.
TLS_PROTOCOLS = frozenset({"https", "grpcs", "tls", "wss"})
#: Service protocols whose pooled upstream connections Kong keys by the Service's client certificate
#: too (`ip|port|SNI|client certificate id`, Kong 3.x's balancer); others by `ip|port` only.
CERTIFICATE_POOLED_PROTOCOLS = frozenset({"https"})


def preserved_host_problem(route: object, target: Target) -> Verdict | None:
    """Why Kong will not send (as SNI) and verify the Service's host for this route, or None: with
    the route's `preserve_host`, Kong uses the client's Host, so a client would reach whichever
    virtual host behind the address it names, not the one the CA store and the probe vouch for."""
    if isinstance(route, Mapping) and route.get("preserve_host") is True:
        return Verdict.failure(target, Reason.UPSTREAM_HOST_CHANGED,
                               f"route {route.get('name') or route.get('id')} has preserve_host: Kong "
                               "would send and verify the client's Host, not the Service's host")
    return None


def service_tls_problem(service: object, target: Target) -> Verdict | None:
    """Why Kong's own connection to the Service's upstream may not be one verified with the Service's
    own settings, or None.

    The probe only sees its own connection; what protects the connection Kong proxies over is Kong's
    handshake. So the Service must speak TLS, verify against CAs of its own (`tls_verify`,
    `ca_certificates`: without them any CA of the system trust store would do), and Kong must not hand
    it a pooled connection opened without those settings. Kong keys pools by address, port, SNI and
    the Service's `client_certificate` id, never by the verification settings: so the Service needs a
    `client_certificate` (which no other Service may use: that the plugin cannot see), and its own
    `tls_verify` even though the plugin forces it per request, since its routes without the plugin
    share its pool."""
    if not isinstance(service, Mapping):
        return Verdict.failure(target, Reason.SERVICE_UNVERIFIED, "no Service for this request")
    name = service.get("name") or service.get("id")
    protocol = str(service.get("protocol") or "")
    if protocol not in TLS_PROTOCOLS:
        return Verdict.failure(target, Reason.UPSTREAM_NOT_TLS,
                               f"service {name} uses {protocol or 'no'} protocol; Kong would not use TLS "
                               "to reach it")
    if service.get("tls_verify") is not True:
        return Verdict.failure(target, Reason.SERVICE_UNVERIFIED,
                               f"service {name} does not verify its upstream (tls_verify is not true): its "
                               "routes without this plugin would pool unverified connections")
    if not service.get("ca_certificates"):
        return Verdict.failure(target, Reason.SERVICE_NO_CA_STORE,
                               f"service {name} has no ca_certificates: Kong would verify the upstream "
                               "against its system trust store")
    if protocol not in CERTIFICATE_POOLED_PROTOCOLS:
        return Verdict.failure(target, Reason.SERVICE_POOL_SHARED,
                               f"service {name} uses {protocol}: Kong pools its upstream connections by "
                               "address and port only, shared with any other Service")
    if not service.get("client_certificate"):
        return Verdict.failure(target, Reason.SERVICE_POOL_SHARED,
                               f"service {name} has no client_certificate: Kong would reuse upstream "
                               "connections opened (and verified) for any Service with the same address, "
                               "port and SNI")
    return None


class VerdictCache:
    """Verdicts per key (a target) with a TTL (`failure_ttl` for refusals), bounded in size.

    Not thread-safe: use it from one thread (the plugin server's gevent hub).
    """

    def __init__(self, ttl: float, failure_ttl: float, *, max_entries: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.failure_ttl = failure_ttl
        self.max_entries = max_entries
        self.clock = clock
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: Hashable) -> tuple[Verdict | None, Freshness]:
        entry = self._entries.get(key)
        if entry is None:
            return None, Freshness.MISSING
        ttl = self.ttl if entry.verdict.ok else self.failure_ttl
        age = self.clock() - entry.stored_at
        if age >= ttl:
            return entry.verdict, Freshness.EXPIRED
        if age >= ttl * REFRESH_FRACTION:
            return entry.verdict, Freshness.REFRESH_DUE
        return entry.verdict, Freshness.FRESH

    def store(self, key: Hashable, verdict: Verdict) -> None:
        self._entries.pop(key, None)
        self._entries[key] = _Entry(verdict, self.clock())
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def first_use(self, key: Hashable) -> bool:
        """True once per stored verdict: for logging its notices once, not on every request."""
        entry = self._entries.get(key)
        if entry is None or entry.announced:
            return False
        entry.announced = True
        return True
