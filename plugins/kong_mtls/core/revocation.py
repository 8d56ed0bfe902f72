"""Is a client certificate revoked? CRL and OCSP checks for client-cert-auth (pure core, plus I/O).

`RevocationChecker.check(leaf, issuer, mode)` answers with a `RevocationVerdict` and never raises.
Call it only after the chain is verified: the CRL and OCSP addresses come from the leaf, and in an
unverified certificate they are whatever the sender chose.

Sources, first definitive answer wins (details and reasons in docs/revocation.md):

1. CRLs given in the configuration (no network; the operator's explicit statement);
2. OCSP at the leaf's Authority Information Access responder (one small signed answer per
   certificate, usually fresher than a CRL; Enterprise mtls-auth also asks OCSP first);
3. the CRL at the leaf's CRL distribution point (a bigger download, cached by URL and shared by
   every certificate of the issuer).

Every CRL and OCSP answer is verified against the issuer (signature, issuer name, freshness; an
OCSP answer may also be signed by a delegated responder certificate that the issuer gave the
OCSP-signing EKU). Results are cached by issuer key + serial number (Enterprise caches by subject
DN, so two certificates with the same DN share one answer) until the answer's nextUpdate, bounded
by `max_ttl`; failures are cached for `negative_ttl`.

The plugin server runs gevent without monkey-patching, so a blocking socket call in a handler
stalls every request. Network work therefore runs in a thread pool of this checker while the
calling greenlet waits cooperatively, and cached answers are refreshed in the background before
they expire, so a returning client never waits for the network.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import ipaddress
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Optional

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, SignatureAlgorithmOID

#: `fetch(url, body, timeout) -> bytes`: GET when body is None, else POST an OCSP request.
#: Raises on any failure (`FetchError` for a clean message).
Fetch = Callable[[str, Optional[bytes], float], bytes]

MAX_CRL_BYTES = 10 * 1024 * 1024
MAX_OCSP_BYTES = 256 * 1024
ALLOWED_SCHEMES = ("http", "https")

_MAX_URLS_PER_SOURCE = 3    # addresses tried per source (OCSP, CRL distribution points)
_MAX_URL_CHARS = 2048
_MAX_OCSP_SINGLES = 20      # single responses examined in one OCSP answer
_MAX_OCSP_CERTS = 10        # responder certificates examined in one OCSP answer
_REFRESH_FRACTION = 0.75    # refresh in the background after this fraction of an entry's lifetime
_CRL_CACHE_BYTES = 64 * 1024 * 1024
_MAX_URL_FAILURES = 1024
_MAX_SIGNATURE_MEMO = 1024
_MAX_DETAIL_CHARS = 500
_READ_CHUNK = 64 * 1024


class RevocationMode(str, Enum):
    """`revocation_check_mode`, as in Enterprise mtls-auth."""

    SKIP = "SKIP"                        # no check
    IGNORE_CA_ERROR = "IGNORE_CA_ERROR"  # refuse revoked; allow when the status cannot be learnt
    STRICT = "STRICT"                    # allow only on a verified, fresh "good" answer


class RevocationReason(str, Enum):
    """Stable reason codes carried by `RevocationVerdict.reason` (as plain strings)."""

    GOOD = "GOOD"                              # a verified, fresh CRL or OCSP answer: not revoked
    REVOKED = "REVOKED"                        # a verified, fresh CRL or OCSP answer: revoked
    REVOCATION_UNKNOWN = "REVOCATION_UNKNOWN"  # no usable answer (no address, unreachable, garbage, stale)
    SKIPPED = "SKIPPED"                        # mode SKIP
    REVOCATION_ERROR = "REVOCATION_ERROR"      # bad call or unexpected failure: refused in every mode


@dataclass(frozen=True)
class RevocationVerdict:
    """`ok` already applies the mode; `reason` is a `RevocationReason` value; `detail` is for logs."""

    ok: bool
    reason: str
    detail: str = ""


class FetchError(Exception):
    """A CRL or OCSP address that could not be fetched; the message is safe to log."""


# -- fetching ----------------------------------------------------------------------------------------

def check_url(url: object) -> str:
    """`url` if it is an http(s) address with a host; `FetchError` otherwise (file:, ftp:, ldap: ...)."""
    if not isinstance(url, str) or not url.isascii() or len(url) > _MAX_URL_CHARS:
        raise FetchError("unusable address")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise FetchError("address with spaces or control characters")
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
    except ValueError:
        raise FetchError("malformed address") from None
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        raise FetchError(f"scheme {parts.scheme or '(none)'!r} refused (http and https only)")
    if not host:
        raise FetchError("address without a host")
    return url


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    max_redirections = 3

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        check_url(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _public_address(address: str) -> bool:
    """Whether a fetch may connect to `address`: a globally routable unicast address, so not
    loopback, link-local (cloud metadata at 169.254.169.254), private, shared or reserved space."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if any(ip in net for net in _IPV6_REFUSED):
            return False
        embedded = ip.ipv4_mapped or ip.sixtofour or next(
            (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) for net in _IPV6_EMBEDDING_IPV4 if ip in net), None)
        if embedded is not None:
            ip = embedded
    return ip.is_global and not ip.is_multicast


#: IPv6 ranges that carry an IPv4 address in their last 32 bits (well-known NAT64, IPv4-compatible,
#: SIIT): judged by that IPv4 address.
_IPV6_EMBEDDING_IPV4 = tuple(ipaddress.IPv6Network(n) for n in ("64:ff9b::/96", "::/96", "::ffff:0:0:0/96"))
#: Refused outright: site-local, and local-use NAT64 (RFC 8215), whose prefixes of /48 to /64 put the
#: IPv4 address anywhere in bits 48-103.
_IPV6_REFUSED = (ipaddress.IPv6Network("fec0::/10"), ipaddress.IPv6Network("64:ff9b:1::/48"))


def _connect(host: str, port: int, timeout: float | None, allow_private: bool) -> socket.socket:
    """A TCP connection to `host`, made to an address checked first (no second name lookup that a
    rebinding DNS answer could turn elsewhere)."""
    refused = []
    last_error: OSError | None = None
    for family, kind, proto, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        if not allow_private and not _public_address(sockaddr[0]):
            refused.append(sockaddr[0])
            continue
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            last_error = exc
    if last_error is not None:
        raise last_error
    raise FetchError(f"{host} resolves to non-public addresses only ({', '.join(refused[:3])}); "
                     "refused (revocation_allow_private_addresses)")


class _GuardedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args: Any, allow_private: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.allow_private = allow_private

    def connect(self) -> None:
        self.sock = _connect(self.host, self.port, self.timeout, self.allow_private)


class _GuardedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args: Any, allow_private: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.allow_private = allow_private

    def connect(self) -> None:
        sock = _connect(self.host, self.port, self.timeout, self.allow_private)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, allow_private: bool) -> None:
        super().__init__()
        self.allow_private = allow_private

    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_GuardedHTTPConnection, req, allow_private=self.allow_private)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, allow_private: bool) -> None:
        super().__init__()
        self.allow_private = allow_private

    def https_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_GuardedHTTPSConnection, req, context=self._context,
                            allow_private=self.allow_private)


class UrllibFetcher:
    """The default `Fetch`: urllib, http(s) only (redirects too), no proxy, bounded size and time,
    and only to public addresses unless `allow_private` (CRL and OCSP addresses come from the
    client's certificate: without this, they would reach loopback, cloud metadata or the LAN).

    `timeout` bounds each socket operation and, between reads, the whole download.
    """

    def __init__(self, max_bytes: int = MAX_CRL_BYTES, allow_private: bool = False) -> None:
        self.max_bytes = max_bytes
        self._opener = urllib.request.OpenerDirector()
        for handler in (_GuardedHTTPHandler(allow_private), _GuardedHTTPSHandler(allow_private),
                        _HttpOnlyRedirects(),
                        urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor(),
                        urllib.request.UnknownHandler()):
            self._opener.add_handler(handler)

    def __call__(self, url: str, body: bytes | None, timeout: float) -> bytes:
        check_url(url)
        headers = {"User-Agent": "kong-mtls-revocation"}
        if body is not None:
            headers["Content-Type"] = "application/ocsp-request"
            headers["Accept"] = "application/ocsp-response"
        request = urllib.request.Request(url, data=body, headers=headers,
                                         method="GET" if body is None else "POST")
        deadline = time.monotonic() + timeout
        try:
            with self._opener.open(request, timeout=timeout) as response:
                declared = response.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > self.max_bytes:
                    raise FetchError(f"answer larger than {self.max_bytes} bytes")
                chunks: list[bytes] = []
                size = 0
                while True:
                    if time.monotonic() > deadline:
                        raise FetchError("timed out")
                    chunk = response.read1(_READ_CHUNK)
                    if not chunk:
                        return b"".join(chunks)
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise FetchError(f"answer larger than {self.max_bytes} bytes")
                    chunks.append(chunk)
        except FetchError:
            raise
        except Exception as exc:
            raise FetchError(_describe_failure(exc)) from None


def _describe_failure(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        # urllib answers a redirect it will not follow (scheme other than http(s)/ftp, a loop, too
        # many hops) with the redirect's own status.
        return f"HTTP status {exc.code}" + (" (redirect not followed)" if 300 <= exc.code < 400 else "")
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        exc = exc.reason
    if isinstance(exc, FetchError):
        return str(exc)
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__


# -- parsing helpers ---------------------------------------------------------------------------------

def parse_crls(data: str | bytes) -> tuple[x509.CertificateRevocationList, ...]:
    """Every CRL in PEM text (one or more `X509 CRL` blocks) or one DER CRL; `ValueError` otherwise."""
    raw = data.encode("ascii", "replace") if isinstance(data, str) else bytes(data)
    marker = b"-----BEGIN X509 CRL-----"
    if marker not in raw:
        if raw.lstrip().startswith(b"-----BEGIN"):
            raise ValueError("PEM data without an X509 CRL block")
        try:
            return (x509.load_der_x509_crl(raw),)
        except ValueError:
            raise ValueError("not a CRL (PEM or DER)") from None
    crls = []
    for block in raw.split(marker)[1:]:
        try:
            crls.append(x509.load_pem_x509_crl(marker + block))
        except ValueError:
            raise ValueError(f"CRL #{len(crls) + 1} is not a valid PEM CRL") from None
    return tuple(crls)


def _ocsp_urls(leaf: x509.Certificate) -> list[str]:
    try:
        aia = leaf.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return []
    return [d.access_location.value for d in aia
            if d.access_method == AuthorityInformationAccessOID.OCSP
            and isinstance(d.access_location, x509.UniformResourceIdentifier)]


def _crl_urls(leaf: x509.Certificate) -> list[tuple[str, bool]]:
    """(URL, partial) for each CRL distribution point; partial when the point covers some reasons only.

    Points naming a separate CRL issuer (indirect CRLs) are left out: not supported.
    """
    try:
        points = leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return []
    return [(name.value, point.reasons is not None)
            for point in points if point.crl_issuer is None and point.full_name
            for name in point.full_name if isinstance(name, x509.UniformResourceIdentifier)]


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_DETAIL_CHARS else text[:_MAX_DETAIL_CHARS - 3] + "..."


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _may_sign_crls(issuer: x509.Certificate) -> bool:
    """RFC 5280: a CA's keyUsage must be present, and name cRLSign for the CA to sign CRLs."""
    try:
        usage = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return usage.crl_sign


#: How long a CRL without nextUpdate (which RFC 5280 requires) is believed after its lastUpdate.
#: Unbounded, an old copy served over plain http could be replayed forever.
CRL_WITHOUT_NEXT_UPDATE_MAX_AGE = 7 * 86400


def _verify_signature(public_key: Any, signature: bytes, data: bytes, hash_algorithm: Any) -> bool:
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, padding.PKCS1v15(), hash_algorithm)
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(hash_algorithm))
        elif isinstance(public_key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            public_key.verify(signature, data)
        elif isinstance(public_key, dsa.DSAPublicKey):
            public_key.verify(signature, data, hash_algorithm)
        else:
            return False
    except (InvalidSignature, UnsupportedAlgorithm, TypeError, ValueError):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _crl_scope(crl: x509.CertificateRevocationList, leaf_crl_urls: set[str],
               for_ca: bool = False) -> tuple[str | None, str]:
    """("complete" | "partial" | None when the CRL cannot speak for this certificate, why).
    `for_ca`: the certificate checked is a CA (an intermediate): a CA-only CRL (an ARL) speaks for
    it, an end-entity-only one does not (RFC 5280 6.3.3 b.2)."""
    scope, why = "complete", ""
    for ext in crl.extensions:
        value = ext.value
        if isinstance(value, x509.DeltaCRLIndicator):
            scope, why = "partial", "delta CRL"
        elif isinstance(value, x509.IssuingDistributionPoint):
            if value.indirect_crl:
                return None, "indirect CRLs are not supported"
            if value.only_contains_attribute_certs:
                return None, "the CRL covers attribute certificates only"
            if value.only_contains_ca_certs and not for_ca:
                return None, "the CRL covers CA certificates only"
            if value.only_contains_user_certs and for_ca:
                return None, "the CRL covers end-entity certificates only"
            if value.only_some_reasons:
                scope, why = "partial", "the CRL covers some reasons only"
            elif value.relative_name is not None or (value.full_name and not any(
                    isinstance(n, x509.UniformResourceIdentifier) and n.value in leaf_crl_urls
                    for n in value.full_name)):
                scope, why = "partial", "the CRL's scope is not the certificate's distribution point"
        elif ext.critical:
            return None, f"unsupported critical CRL extension {ext.oid.dotted_string}"
    return scope, why


def _entry_reason(entry: x509.RevokedCertificate) -> x509.ReasonFlags | None:
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except (x509.ExtensionNotFound, ValueError):
        return None


# -- cache records -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Answer:
    reason: RevocationReason
    detail: str
    valid_until: float | None = None  # the CRL/OCSP nextUpdate, epoch seconds

    @property
    def definitive(self) -> bool:
        return self.reason in (RevocationReason.GOOD, RevocationReason.REVOKED)


@dataclass(frozen=True)
class _Entry:
    answer: _Answer
    expires_at: float  # after this, a check resolves again (and waits)
    refresh_at: float  # after this, a check is served from the cache and refreshes in the background


@dataclass(frozen=True)
class _FetchedCRL:
    crl: x509.CertificateRevocationList | None
    fingerprint: bytes
    error: str
    size: int
    expires_at: float


class _Budget:
    """The time one resolution may spend on the network, in total."""

    def __init__(self, seconds: float) -> None:
        self._deadline = time.monotonic() + seconds

    def remaining(self) -> float:
        return self._deadline - time.monotonic()


class _KeyedLocks:
    """One lock per key, created on demand and dropped when unused (single flight per key)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[Hashable, tuple[threading.Lock, int]] = {}

    @contextlib.contextmanager
    def hold(self, key: Hashable) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.get(key, (None, 0))
            lock = lock or threading.Lock()
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


class _BadInput(ValueError):
    pass


class _BudgetSpent(FetchError):
    """Not the address's fault: this resolution has no time left (never cached as a failure)."""


def _gevent_hub() -> Any:
    """The gevent hub when called from a greenlet its loop runs (the plugin server's handlers, whose
    greenlets are resumed by the connection greenlets the hub schedules), else None."""
    if "gevent" not in sys.modules:
        return None
    from gevent._hub_local import get_hub_if_exists
    from greenlet import getcurrent

    hub = get_hub_if_exists()
    ancestor = getcurrent().parent
    while ancestor is not None:
        if ancestor is hub:
            return hub
        ancestor = ancestor.parent
    return None


# -- the checker -------------------------------------------------------------------------------------

class RevocationChecker:
    """Revocation status of verified certificates, cached. One per plugin instance; thread-safe.

    `http_timeout` bounds each fetch; one resolution spends at most twice that on the network.
    `max_ttl` bounds how long an answer is reused without asking again; `negative_ttl` how long
    "no answer" is reused; `max_entries` the number of cached results. `clock` (epoch seconds)
    drives both cache expiry and CRL/OCSP validity; `clock_skew` tolerates answers dated slightly
    in the future. The constructor raises `ValueError`/`TypeError` on bad arguments.
    """

    def __init__(self, *, static_crls: Sequence[x509.CertificateRevocationList] = (),
                 http_timeout: float = 5.0, max_ttl: float = 3600.0, fetch: Fetch | None = None,
                 clock: Callable[[], float] = time.time, negative_ttl: float = 30.0,
                 max_entries: int = 10_000, max_crl_bytes: int = MAX_CRL_BYTES,
                 clock_skew: float = 300.0, max_fetch_threads: int = 8,
                 allow_private_addresses: bool = False) -> None:
        for crl in static_crls:
            if not isinstance(crl, x509.CertificateRevocationList):
                raise TypeError("static_crls must hold cryptography CertificateRevocationList objects")
        if not http_timeout > 0 or not max_ttl > 0 or not negative_ttl >= 0 or not clock_skew >= 0:
            raise ValueError("http_timeout and max_ttl must be > 0; negative_ttl and clock_skew >= 0")
        if max_entries < 1 or max_crl_bytes < 1 or max_fetch_threads < 1:
            raise ValueError("max_entries, max_crl_bytes and max_fetch_threads must be >= 1")
        self._static = [(crl, crl.fingerprint(hashes.SHA256())) for crl in static_crls]
        self._http_timeout = float(http_timeout)
        self._max_ttl = float(max_ttl)
        self._negative_ttl = float(negative_ttl)
        self._max_entries = max_entries
        self._max_crl_bytes = max_crl_bytes
        self._clock_skew = float(clock_skew)
        self._max_fetch_threads = max_fetch_threads
        self._fetcher: Fetch = fetch or UrllibFetcher(max_crl_bytes, allow_private=allow_private_addresses)
        self._clock = clock

        self._lock = threading.Lock()  # guards every dict/set below; never held across I/O
        self._results: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._crls: OrderedDict[str, _FetchedCRL] = OrderedDict()
        self._crl_bytes = 0
        self._url_failures: dict[str, tuple[float, str]] = {}
        self._signature_memo: dict[tuple[bytes, bytes], bool] = {}
        self._refreshing: set[Hashable] = set()
        self._key_flight = _KeyedLocks()
        self._url_flight = _KeyedLocks()
        self._pool: Any = None

    # -- public ----------------------------------------------------------------------------------
    def check(self, leaf: x509.Certificate, issuer: x509.Certificate,
              mode: RevocationMode | str) -> RevocationVerdict:
        """The revocation verdict for `leaf`, issued by `issuer`, under `mode`. Never raises."""
        try:
            mode = RevocationMode(mode)
        except ValueError:
            return RevocationVerdict(False, RevocationReason.REVOCATION_ERROR.value,
                                     "unknown revocation mode")
        if mode is RevocationMode.SKIP:
            return RevocationVerdict(True, RevocationReason.SKIPPED.value, "revocation checking is off")
        try:
            key = _cache_key(leaf, issuer)
            now = self._clock()
            entry = self._cached(key, now)
            if entry is None:
                entry = self._offload(self._resolve_entry, key, leaf, issuer)
            elif entry.refresh_at <= now:
                self._refresh_in_background(key, leaf, issuer)
            return _verdict(entry.answer, mode)
        except _BadInput as exc:
            return RevocationVerdict(False, RevocationReason.REVOCATION_ERROR.value, str(exc))
        except Exception as exc:
            return RevocationVerdict(False, RevocationReason.REVOCATION_ERROR.value,
                                     f"internal error: {type(exc).__name__}")

    # -- running off the event loop --------------------------------------------------------------
    def _gevent_pool(self) -> Any:
        hub = _gevent_hub()
        if hub is None:
            return None
        if self._pool is None or self._pool.hub is not hub:
            from gevent.threadpool import ThreadPool

            self._pool = ThreadPool(self._max_fetch_threads, hub=hub)
        return self._pool

    def _offload(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in this checker's thread pool (the greenlet waits cooperatively) under gevent;
        a plain call otherwise (a thread may block)."""
        pool = self._gevent_pool()
        return fn(*args) if pool is None else pool.apply(fn, args)

    def _refresh_in_background(self, key: Hashable, leaf: x509.Certificate,
                               issuer: x509.Certificate) -> None:
        with self._lock:
            if key in self._refreshing or len(self._refreshing) >= self._max_fetch_threads:
                return
            self._refreshing.add(key)
        try:
            if _gevent_hub() is not None:
                import gevent

                gevent.spawn(self._background, key, leaf, issuer)
            else:
                threading.Thread(target=self._background, args=(key, leaf, issuer),
                                 name="kong-mtls-revocation-refresh", daemon=True).start()
        except Exception:
            with self._lock:
                self._refreshing.discard(key)
            raise

    def _background(self, key: Hashable, leaf: x509.Certificate, issuer: x509.Certificate) -> None:
        try:
            self._offload(self._refresh, key, leaf, issuer)
        finally:
            with self._lock:
                self._refreshing.discard(key)

    # -- result cache ----------------------------------------------------------------------------
    def _cached(self, key: Hashable, now: float) -> _Entry | None:
        with self._lock:
            entry = self._results.get(key)
            if entry is None or entry.expires_at <= now:
                return None
            self._results.move_to_end(key)
            return entry

    def _resolve_entry(self, key: Hashable, leaf: x509.Certificate, issuer: x509.Certificate) -> _Entry:
        with self._key_flight.hold(key):
            now = self._clock()
            entry = self._cached(key, now)  # another caller may have resolved it meanwhile
            if entry is not None:
                return entry
            return self._store(key, self._resolve(leaf, issuer, now), now)

    def _refresh(self, key: Hashable, leaf: x509.Certificate, issuer: x509.Certificate) -> None:
        with self._key_flight.hold(key):
            now = self._clock()
            self._store(key, self._resolve(leaf, issuer, now), now)

    def _store(self, key: Hashable, answer: _Answer, now: float) -> _Entry:
        if answer.definitive:
            expires = now + self._max_ttl
            if answer.valid_until is not None:
                expires = max(now, min(expires, answer.valid_until))
            entry = _Entry(answer, expires, now + _REFRESH_FRACTION * (expires - now))
        else:
            entry = _Entry(answer, now + self._negative_ttl, now + _REFRESH_FRACTION * self._negative_ttl)
            with self._lock:
                old = self._results.get(key)
            if (old is not None and old.answer.definitive and old.answer.valid_until is not None
                    and old.answer.valid_until > now):
                # No answer now, but the last signed one is still within its nextUpdate: keep it and
                # retry later rather than turning a responder outage into "unknown".
                entry = _Entry(old.answer, old.answer.valid_until, now + self._negative_ttl)
        with self._lock:
            self._results[key] = entry
            self._results.move_to_end(key)
            while len(self._results) > self._max_entries:
                self._results.popitem(last=False)
        return entry

    # -- resolution (runs off the event loop) ----------------------------------------------------
    def _resolve(self, leaf: x509.Certificate, issuer: x509.Certificate, now: float) -> _Answer:
        try:
            return self._consult_sources(leaf, issuer, now)
        except Exception as exc:
            return _Answer(RevocationReason.REVOCATION_ERROR, f"internal error: {type(exc).__name__}")

    def _consult_sources(self, leaf: x509.Certificate, issuer: x509.Certificate, now: float) -> _Answer:
        notes: list[str] = []
        issuer_fp = issuer.fingerprint(hashes.SHA256())
        crl_urls = _crl_urls(leaf)
        leaf_crl_urls = {url for url, _ in crl_urls}

        answer = self._from_static_crls(leaf, issuer, issuer_fp, leaf_crl_urls, now, notes)
        if answer is not None:
            return answer
        budget = _Budget(2 * self._http_timeout)
        for url in _ocsp_urls(leaf)[:_MAX_URLS_PER_SOURCE]:
            answer = self._from_ocsp(url, leaf, issuer, now, budget, notes)
            if answer is not None:
                return answer
        for url, partial in crl_urls[:_MAX_URLS_PER_SOURCE]:
            answer = self._from_crl_url(url, partial, leaf, issuer, issuer_fp, leaf_crl_urls, now,
                                        budget, notes)
            if answer is not None:
                return answer
        if not notes:
            notes.append("no revocation source: no configured CRL from this issuer and no OCSP or "
                         "CRL address in the certificate")
        return _Answer(RevocationReason.REVOCATION_UNKNOWN, _clip("; ".join(notes)))

    def _from_static_crls(self, leaf: x509.Certificate, issuer: x509.Certificate, issuer_fp: bytes,
                          leaf_crl_urls: set[str], now: float, notes: list[str]) -> _Answer | None:
        good: _Answer | None = None
        for number, (crl, crl_fp) in enumerate(self._static, 1):
            if crl.issuer != issuer.subject:
                continue
            answer = self._crl_answer(crl, crl_fp, False, leaf, issuer, issuer_fp, leaf_crl_urls, now,
                                      f"configured CRL #{number}", notes)
            if answer is not None and answer.reason is RevocationReason.REVOKED:
                return answer
            good = good or answer
        return good

    def _from_crl_url(self, url: str, partial: bool, leaf: x509.Certificate, issuer: x509.Certificate,
                      issuer_fp: bytes, leaf_crl_urls: set[str], now: float, budget: _Budget,
                      notes: list[str]) -> _Answer | None:
        fetched = self._fetched_crl(url, now, budget)
        if fetched.crl is None:
            notes.append(f"CRL {url}: {fetched.error}")
            return None
        return self._crl_answer(fetched.crl, fetched.fingerprint, partial, leaf, issuer, issuer_fp,
                                leaf_crl_urls, now, f"CRL {url}", notes)

    def _crl_answer(self, crl: x509.CertificateRevocationList, crl_fp: bytes, partial: bool,
                    leaf: x509.Certificate, issuer: x509.Certificate, issuer_fp: bytes,
                    leaf_crl_urls: set[str], now: float, where: str, notes: list[str]) -> _Answer | None:
        """The CRL's answer for `leaf` if the CRL is the issuer's, verified, fresh and in scope."""
        try:
            if crl.issuer != issuer.subject:
                notes.append(f"{where}: issued by another CA")
                return None
            if not _may_sign_crls(issuer):
                notes.append(f"{where}: the issuer's key usage does not allow CRL signing")
                return None
            if not self._crl_signature_ok(crl, crl_fp, issuer, issuer_fp):
                notes.append(f"{where}: signature does not verify with the issuer's key")
                return None
            last_update = crl.last_update_utc.timestamp()
            if last_update > now + self._clock_skew:
                notes.append(f"{where}: lastUpdate is in the future")
                return None
            try:
                crl.extensions.get_extension_for_class(x509.CRLNumber)
            except x509.ExtensionNotFound:
                notes.append(f"{where}: no CRL number (RFC 5280 requires one)")
                return None
            next_update = crl.next_update_utc.timestamp() if crl.next_update_utc is not None \
                else last_update + CRL_WITHOUT_NEXT_UPDATE_MAX_AGE
            if next_update < now:
                notes.append(f"{where}: stale (nextUpdate {_iso(next_update)} has passed"
                             + (")" if crl.next_update_utc is not None else
                                ", counted from lastUpdate: the CRL has none)"))
                return None
            scope, why = _crl_scope(crl, leaf_crl_urls, for_ca=_is_ca(leaf))
            if scope is None:
                notes.append(f"{where}: {why}")
                return None
            if partial:
                scope, why = "partial", "the distribution point covers some reasons only"
            entry = crl.get_revoked_certificate_by_serial_number(leaf.serial_number)
            reason = _entry_reason(entry) if entry is not None else None
            if entry is not None and reason is not x509.ReasonFlags.remove_from_crl:
                return _Answer(RevocationReason.REVOKED, _clip(
                    f"{where}: revoked on {entry.revocation_date_utc:%Y-%m-%dT%H:%M:%SZ}"
                    + (f" ({reason.value})" if reason is not None else "")), next_update)
            if scope == "partial":
                notes.append(f"{where}: does not list the certificate but is partial ({why})")
                return None
            return _Answer(RevocationReason.GOOD, _clip(f"{where}: not listed"), next_update)
        except Exception as exc:
            notes.append(f"{where}: unusable CRL ({type(exc).__name__})")
            return None

    def _crl_signature_ok(self, crl: x509.CertificateRevocationList, crl_fp: bytes,
                          issuer: x509.Certificate, issuer_fp: bytes) -> bool:
        memo_key = (crl_fp, issuer_fp)
        with self._lock:
            known = self._signature_memo.get(memo_key)
        if known is not None:
            return known
        try:
            valid = crl.is_signature_valid(issuer.public_key())
        except (UnsupportedAlgorithm, TypeError, ValueError):
            valid = False
        with self._lock:
            if len(self._signature_memo) >= _MAX_SIGNATURE_MEMO:
                self._signature_memo.clear()
            self._signature_memo[memo_key] = valid
        return valid

    def _fetched_crl(self, url: str, now: float, budget: _Budget) -> _FetchedCRL:
        """The CRL at `url`, from the cache (until its nextUpdate, at most max_ttl) or fetched once
        however many callers want it at the same time. Failures are cached for negative_ttl."""
        with self._lock:
            cached = self._crls.get(url)
        if cached is not None and cached.expires_at > now:
            return cached
        with self._url_flight.hold(url):
            with self._lock:
                cached = self._crls.get(url)
            if cached is not None and cached.expires_at > now:
                return cached
            try:
                data = self._fetch(url, None, self._max_crl_bytes, budget)
            except _BudgetSpent as exc:
                return _FetchedCRL(None, b"", str(exc), 0, now)  # not remembered
            except FetchError as exc:
                fetched = _FetchedCRL(None, b"", str(exc), 0, now + self._negative_ttl)
            else:
                fetched = self._parsed_crl(data, now)
            self._remember_crl(url, fetched)
            return fetched

    def _parsed_crl(self, data: bytes, now: float) -> _FetchedCRL:
        try:
            crls = parse_crls(data)
        except ValueError:
            crls = ()
        if len(crls) != 1:
            return _FetchedCRL(None, b"", "the answer is not one CRL (DER or PEM)", 0,
                               now + self._negative_ttl)
        crl = crls[0]
        expires = now + self._max_ttl
        next_update = crl.next_update_utc.timestamp() if crl.next_update_utc is not None \
            else crl.last_update_utc.timestamp() + CRL_WITHOUT_NEXT_UPDATE_MAX_AGE
        expires = min(expires, next_update)
        if expires <= now:  # already stale: do not fetch it again on every request
            expires = now + self._negative_ttl
        return _FetchedCRL(crl, crl.fingerprint(hashes.SHA256()), "", len(data), expires)

    def _remember_crl(self, url: str, fetched: _FetchedCRL) -> None:
        with self._lock:
            old = self._crls.pop(url, None)
            self._crl_bytes -= old.size if old is not None else 0
            self._crls[url] = fetched
            self._crl_bytes += fetched.size
            while self._crl_bytes > _CRL_CACHE_BYTES and len(self._crls) > 1:
                _, evicted = self._crls.popitem(last=False)
                self._crl_bytes -= evicted.size

    def _from_ocsp(self, url: str, leaf: x509.Certificate, issuer: x509.Certificate, now: float,
                   budget: _Budget, notes: list[str]) -> _Answer | None:
        where = f"OCSP {url}"
        with self._lock:
            failure = self._url_failures.get(url)
        if failure is not None and failure[0] > now:
            notes.append(f"{where}: {failure[1]} (retry after {_iso(failure[0])})")
            return None
        try:
            request = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA1()).build()
            data = self._fetch(url, request.public_bytes(serialization.Encoding.DER), MAX_OCSP_BYTES, budget)
        except FetchError as exc:
            if not isinstance(exc, _BudgetSpent):
                self._remember_url_failure(url, now, str(exc))
            notes.append(f"{where}: {exc}")
            return None
        try:
            answer, why = self._ocsp_answer(data, leaf, issuer, now, where)
        except Exception as exc:
            answer, why = None, f"unusable answer ({type(exc).__name__})"
        if answer is None:
            notes.append(f"{where}: {why}")
        return answer

    def _remember_url_failure(self, url: str, now: float, why: str) -> None:
        with self._lock:
            if len(self._url_failures) >= _MAX_URL_FAILURES:
                self._url_failures = {u: f for u, f in self._url_failures.items() if f[0] > now}
                if len(self._url_failures) >= _MAX_URL_FAILURES:
                    self._url_failures.clear()
            self._url_failures[url] = (now + self._negative_ttl, why)

    def _ocsp_answer(self, data: bytes, leaf: x509.Certificate, issuer: x509.Certificate, now: float,
                     where: str) -> tuple[_Answer | None, str]:
        try:
            response = ocsp.load_der_ocsp_response(data)
        except ValueError:
            return None, "the answer is not an OCSP response"
        if response.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
            return None, f"responder answered {response.response_status.name}"
        single = _single_response_for(response, leaf, issuer)
        if single is None:
            return None, "the answer is not about this certificate"
        if not self._ocsp_signed_by_authority(response, issuer, now):
            return None, "not signed by the issuer or a responder the issuer authorised"
        this_update = single.this_update_utc.timestamp()
        next_update = single.next_update_utc.timestamp() if single.next_update_utc is not None else None
        if this_update > now + self._clock_skew:
            return None, "thisUpdate is in the future"
        if next_update is not None and next_update < now:
            return None, f"stale (nextUpdate {_iso(next_update)} has passed)"
        if next_update is None and this_update < now - self._max_ttl:
            return None, "no nextUpdate and older than max_ttl"
        status = single.certificate_status
        if status is ocsp.OCSPCertStatus.GOOD:
            return _Answer(RevocationReason.GOOD, _clip(f"{where}: good"), next_update), ""
        if status is ocsp.OCSPCertStatus.REVOKED:
            reason = single.revocation_reason
            revoked_at = single.revocation_time_utc
            text = f"{where}: revoked" + (f" on {revoked_at:%Y-%m-%dT%H:%M:%SZ}" if revoked_at else "")
            text += f" ({reason.value})" if reason is not None else ""
            return _Answer(RevocationReason.REVOKED, _clip(text), next_update), ""
        return None, "the responder does not know the certificate"

    def _ocsp_signed_by_authority(self, response: ocsp.OCSPResponse, issuer: x509.Certificate,
                                  now: float) -> bool:
        """Signed by the issuer, or by a certificate the issuer issued with the OCSP-signing EKU
        (RFC 6960 section 4.2.2.2) that is valid now."""
        if response.signature_algorithm_oid == SignatureAlgorithmOID.RSASSA_PSS:
            return False  # no PSS parameters exposed for OCSP responses; unsupported
        try:
            hash_algorithm = response.signature_hash_algorithm
        except UnsupportedAlgorithm:
            return False
        candidates = [issuer, *[c for c in response.certificates[:_MAX_OCSP_CERTS]
                                if self._delegated_responder(c, issuer, now)]]
        return any(_verify_signature(c.public_key(), response.signature, response.tbs_response_bytes,
                                     hash_algorithm) for c in candidates)

    def _delegated_responder(self, cert: x509.Certificate, issuer: x509.Certificate, now: float) -> bool:
        try:
            cert.verify_directly_issued_by(issuer)
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except (x509.ExtensionNotFound, InvalidSignature, UnsupportedAlgorithm, TypeError, ValueError):
            return False
        return (ExtendedKeyUsageOID.OCSP_SIGNING in eku
                and cert.not_valid_before_utc.timestamp() <= now + self._clock_skew
                and now <= cert.not_valid_after_utc.timestamp())

    def _fetch(self, url: str, body: bytes | None, limit: int, budget: _Budget) -> bytes:
        check_url(url)
        timeout = min(self._http_timeout, budget.remaining())
        if timeout <= 0:
            raise _BudgetSpent("not tried: this check's time budget is spent")
        try:
            data = self._fetcher(url, body, timeout)
        except FetchError:
            raise
        except Exception as exc:
            raise FetchError(_describe_failure(exc)) from None
        if not isinstance(data, (bytes, bytearray)):
            raise FetchError("the fetcher returned no bytes")
        if len(data) > limit:
            raise FetchError(f"answer larger than {limit} bytes")
        return bytes(data)


def _single_response_for(response: ocsp.OCSPResponse, leaf: x509.Certificate,
                         issuer: x509.Certificate) -> ocsp.OCSPSingleResponse | None:
    """The single response whose CertID is (issuer name hash, issuer key hash, serial) of `leaf`."""
    for index, single in enumerate(response.responses):
        if index >= _MAX_OCSP_SINGLES:
            break
        if single.serial_number != leaf.serial_number:
            continue
        try:
            expected = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, single.hash_algorithm).build()
        except (UnsupportedAlgorithm, ValueError, TypeError):
            continue
        if (expected.issuer_name_hash == single.issuer_name_hash
                and expected.issuer_key_hash == single.issuer_key_hash):
            return single
    return None


def _cache_key(leaf: object, issuer: object) -> Hashable:
    """Issuer (name + public key) and serial number: what identifies a certificate to its CA."""
    if not isinstance(leaf, x509.Certificate) or not isinstance(issuer, x509.Certificate):
        raise _BadInput("the certificate and its issuer must be parsed certificates")
    if leaf.issuer != issuer.subject:
        raise _BadInput("the issuer certificate's subject is not the certificate's issuer")
    spki = issuer.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(issuer.subject.public_bytes() + spki).digest(), leaf.serial_number


def _verdict(answer: _Answer, mode: RevocationMode) -> RevocationVerdict:
    ok = answer.reason is RevocationReason.GOOD or (
        answer.reason is RevocationReason.REVOCATION_UNKNOWN and mode is RevocationMode.IGNORE_CA_ERROR)
    return RevocationVerdict(ok, answer.reason.value, answer.detail)
