"""Client certificates verified (or passed through) at an edge and forwarded in a header (pure).

When Cloudflare API Shield, Amazon CloudFront, an AWS ALB, Envoy, an NGINX ingress controller or
Traefik terminates the client's mutual TLS, Kong only sees what the edge forwards in a request
header. This module decides two things for header-cert-auth, and nothing else:

* `EdgePolicy.check`: did the request provably come from the edge? Its TCP peer is in the trusted
  proxies, and/or the connection presented a client certificate chaining to an edge CA
  (Cloudflare Authenticated Origin Pulls, an ALB's or Envoy's own certificate), and, when
  configured, the edge's own verdict header says the client certificate verified. A forwarded
  certificate from anyone else is never decoded.
* `ForwardedSource.read`: the header, in the one format configured (never guessed), decoded into
  the PEM chain (leaf first) that client-cert-auth's core then verifies exactly as a certificate
  from Kong's own handshake (`kong_mtls.core.identity.Authenticator`).

Decoding is strict: one line where the format has one value, no stray characters, every
percent-escape well formed, sizes bounded before anything is parsed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from kong_mtls.core.addresses import MAX_HEADER_LINES, AddressSet, parse_ip, whole_header_map
from kong_mtls.core.chain import MAX_CHAIN_CERTIFICATES, MAX_CHAIN_PEM_CHARS, ChainVerifier, Reason
from kong_mtls.core.consumers import LoadConsumer
from kong_mtls.core.identity import Authenticator, Decision


class ForwardedFormat(str, Enum):
    """How an edge encodes the client certificate in its header."""

    #: RFC 9440 byte sequences of DER: `Client-Cert: :<base64>:`, `Client-Cert-Chain: :<b64>:, ...`
    #: (Cloudflare's `cf.tls_client_auth.cert_rfc9440` / `cert_chain_rfc9440`, CloudFront).
    RFC9440 = "rfc9440"
    #: URL-encoded PEM, one or more certificates, leaf first (`CloudFront-Viewer-Cert-Pem`, AWS ALB
    #: `X-Amzn-Mtls-Clientcert` with the chain, NGINX ingress `ssl-client-cert`).
    URL_ENCODED_PEM = "url_encoded_pem"
    #: Envoy's `X-Forwarded-Client-Cert`: elements of `Key=value` pairs, `Cert=`/`Chain=` URL-encoded PEM.
    XFCC = "xfcc"
    #: Base64 DER certificates separated by commas, leaf first, perhaps percent-encoded (Traefik's
    #: `X-Forwarded-Tls-Client-Cert`).
    BASE64_DER = "base64_der"


FORWARDED_FORMATS = tuple(f.value for f in ForwardedFormat)

#: Raw header text accepted, all lines together, before any decoding: encodings are larger than the
#: PEM they carry (percent-escapes; XFCC may carry the leaf twice), and the decoded PEM is held to
#: the verifier's own limit afterwards.
MAX_FORWARDED_CHARS = 2 * MAX_CHAIN_PEM_CHARS
#: Envoy appends one element per proxy; more than this is no deployment we know.
MAX_XFCC_ELEMENTS = 32

_SF_BINARY = re.compile(r"^:([A-Za-z0-9+/]*={0,2}):$")
_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_OWS = " \t"
_PEM_BEGIN = "-----BEGIN CERTIFICATE-----"


@dataclass(frozen=True)
class Forwarded:
    """What the header holds: `pem` (leaf first), or `reason`/`detail` why it cannot be used.
    Neither: no certificate was forwarded."""

    pem: str | None = None
    reason: Reason | None = None
    detail: str = ""


NOTHING_FORWARDED = Forwarded()


def _malformed(detail: str) -> Forwarded:
    return Forwarded(reason=Reason.MALFORMED_CHAIN, detail=detail)


def header_lines(headers: Mapping[str, Any], name: str) -> list[str] | None:
    """Every line of header `name` (exactly this spelling, lower-cased as Kong's `get_headers`
    returns them) from a whole `get_headers` map (`whole_header_map`); None when not text."""
    value = headers.get(name.lower())
    if value is None:
        return []
    lines = value if isinstance(value, list) else [value]
    return lines if all(isinstance(line, str) for line in lines) else None


def percent_decode(text: str) -> str | None:
    """Strict URL decoding: `%XX` escapes only (a `+` stays a `+`, as in base64 and in the edges'
    encodings), the result ASCII; None when an escape is malformed."""
    if "%" not in text:
        return text if text.isascii() else None
    if _PERCENT.sub("", text).count("%"):
        return None
    decoded = _PERCENT.sub(lambda m: chr(int(m.group(1), 16)), text)
    return decoded if decoded.isascii() else None


def _pem(der: bytes) -> str:
    text = base64.b64encode(der).decode("ascii")
    body = "\n".join(text[i:i + 64] for i in range(0, len(text), 64))
    return f"{_PEM_BEGIN}\n{body}\n-----END CERTIFICATE-----\n"


def _base64_der(text: str) -> bytes | None:
    if not _BASE64.fullmatch(text) or len(text) % 4:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _split_list(text: str) -> list[str]:
    """An HTTP list: members separated by commas, optional whitespace around each."""
    return [member.strip(_OWS) for member in text.split(",")]


@dataclass(frozen=True)
class ForwardedSource:
    """Where and how the certificate is forwarded: one header (and, for RFC 9440, an optional
    chain header), one format, and for XFCC how many elements the header holds (exactly; the
    client's is the first, which the first proxy wrote, each proxy after it appending its own)."""

    header: str
    format: ForwardedFormat
    chain_header: str | None = None
    xfcc_elements: int = 1

    def read(self, headers: Mapping[str, Any]) -> Forwarded:
        """Decode the forwarded certificate from a whole `get_headers` map; never raises."""
        lines = header_lines(headers, self.header)
        chain_lines = header_lines(headers, self.chain_header) if self.chain_header else []
        if lines is None or chain_lines is None:
            return _malformed("a certificate header line is not text")
        size = sum(len(line) for line in (*lines, *chain_lines))
        if size > MAX_FORWARDED_CHARS:
            return Forwarded(reason=Reason.CHAIN_TOO_LARGE,
                             detail=f"forwarded certificate headers of {size} characters, limit "
                                    f"{MAX_FORWARDED_CHARS}")
        if not any(line.strip(_OWS) for line in lines):
            if len(lines) > 1:
                return _malformed(f"{len(lines)} empty {self.header} lines")
            return NOTHING_FORWARDED  # absent, or empty: the edge's "no certificate"
        if self.format is ForwardedFormat.XFCC:
            return self._xfcc(", ".join(lines))
        if len(lines) > 1:
            # One value per request: a second line is someone else's (the client's) copy.
            return _malformed(f"{len(lines)} {self.header} lines, expected one")
        value = lines[0].strip(_OWS)
        if self.format is ForwardedFormat.RFC9440:
            return self._rfc9440(value, ", ".join(chain_lines))
        if self.format is ForwardedFormat.URL_ENCODED_PEM:
            return self._url_encoded_pem(value, self.header)
        return self._base64_der_list(value)

    # -- formats ----------------------------------------------------------------------------------
    def _rfc9440(self, value: str, chain: str) -> Forwarded:
        members = [(self.header, value)]
        if chain.strip(_OWS):
            members += [(self.chain_header, member) for member in _split_list(chain)]
        if len(members) > MAX_CHAIN_CERTIFICATES:
            return Forwarded(reason=Reason.CHAIN_TOO_LARGE,
                             detail=f"{len(members)} certificates forwarded, limit {MAX_CHAIN_CERTIFICATES}")
        ders = []
        for where, member in members:
            match = _SF_BINARY.fullmatch(member)
            der = _base64_der(match.group(1)) if match else None
            if not der:
                return _malformed(f"{where} is not a list of RFC 9440 byte sequences (:base64:)")
            ders.append(der)
        return Forwarded(pem="".join(_pem(der) for der in ders))

    @staticmethod
    def _url_encoded_pem(value: str, where: str) -> Forwarded:
        pem = percent_decode(value)
        if pem is None:
            return _malformed(f"{where} holds a malformed percent-escape or non-ASCII text")
        if not pem.lstrip().startswith(_PEM_BEGIN):
            return _malformed(f"{where} is not URL-encoded PEM")
        return Forwarded(pem=pem)

    def _base64_der_list(self, value: str) -> Forwarded:
        # Neither `%` nor `,` is in the base64 alphabet: decoding the escapes first is unambiguous,
        # whether the edge escaped each certificate or the whole list.
        text = percent_decode(value)
        members = _split_list(text) if text is not None else []
        if len(members) > MAX_CHAIN_CERTIFICATES:
            return Forwarded(reason=Reason.CHAIN_TOO_LARGE,
                             detail=f"{len(members)} certificates forwarded, limit {MAX_CHAIN_CERTIFICATES}")
        ders = [_base64_der(member) for member in members]
        if not ders or not all(ders):
            return _malformed(f"{self.header} is not a comma-separated list of base64 DER certificates")
        return Forwarded(pem="".join(_pem(der) for der in ders if der))

    def _xfcc(self, value: str) -> Forwarded:
        elements = parse_xfcc(value)
        if elements is None:
            return _malformed(f"{self.header} is not a valid X-Forwarded-Client-Cert value")
        # Envoy writes URI=, DNS= and Subject= values unescaped: a name holding `,` starts an element
        # of the certificate holder's making, `;` a pair. An exact count refuses the first; the
        # element's Hash (the SHA-256 of the leaf Envoy saw, always sent) refuses the second.
        if len(elements) != self.xfcc_elements:
            return _malformed(f"{self.header} has {len(elements)} element(s), expected {self.xfcc_elements}")
        pairs = elements[0]
        found = {key: [v for k, v in pairs if k == key] for key in ("hash", "cert", "chain")}
        if any(len(values) > 1 for values in found.values()):
            return _malformed(f"{self.header}: Hash, Cert or Chain given twice in one element")
        cert = self._url_encoded_pem(found["cert"][0], f"{self.header} Cert") if found["cert"] else None
        chain = self._url_encoded_pem(found["chain"][0], f"{self.header} Chain") if found["chain"] else None
        for part in (cert, chain):
            if part is not None and part.reason is not None:
                return part
        if chain is not None and cert is not None and _first_block(chain.pem) != _first_block(cert.pem):
            # Envoy's Chain includes the leaf: it must be the element's Cert when both are sent.
            return _malformed(f"{self.header}: Chain does not start with the element's Cert")
        forwarded = chain or cert
        if forwarded is None:
            return NOTHING_FORWARDED
        leaf_hash = _leaf_sha256(forwarded.pem)
        if not found["hash"] or leaf_hash is None or found["hash"][0].lower() != leaf_hash:
            return _malformed(f"{self.header}: the element's Hash is not the SHA-256 of its certificate")
        return forwarded


def _leaf_sha256(pem: str | None) -> str | None:
    """Hex SHA-256 of the DER of the first PEM block, or None when it is not base64."""
    parts = _first_block(pem).split("-----")  # whitespace gone: ["", "BEGINCERTIFICATE", body]
    body = parts[2] if len(parts) == 3 and parts[:2] == ["", "BEGINCERTIFICATE"] else ""
    der = _base64_der(body) if body else None
    return hashlib.sha256(der).hexdigest() if der else None


def _first_block(pem: str | None) -> str:
    text = "".join((pem or "").split())
    end = text.find("-----END", len(_PEM_BEGIN))
    return text[:end]


def parse_xfcc(value: str) -> list[list[tuple[str, str]]] | None:
    """Envoy's `X-Forwarded-Client-Cert`: elements separated by `,`, each `Key=value` pairs
    separated by `;`, a value either a token or a double-quoted string with `\\` escapes (commas and
    semicolons inside quotes are data). Keys are lower-cased. None when malformed or over
    MAX_XFCC_ELEMENTS elements."""
    elements: list[list[tuple[str, str]]] = []
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(value)
    while True:
        while i < n and value[i] in _OWS:
            i += 1
        eq = value.find("=", i)
        if eq < 0:
            return None
        key = value[i:eq].strip(_OWS).lower()
        if not key or not key.replace("-", "").replace("_", "").isalnum():
            return None
        i = eq + 1
        if i < n and value[i] == '"':
            out, i = [], i + 1
            while i < n and value[i] != '"':
                if value[i] == "\\":
                    i += 1
                    if i >= n:
                        return None
                out.append(value[i])
                i += 1
            if i >= n:
                return None  # unterminated quoted string
            text, i = "".join(out), i + 1
        else:
            start = i
            while i < n and value[i] not in ",;":
                if value[i] == '"':
                    return None
                i += 1
            text = value[start:i].strip(_OWS)
        pairs.append((key, text))
        while i < n and value[i] in _OWS:
            i += 1
        if i >= n:
            elements.append(pairs)
            return elements if len(elements) <= MAX_XFCC_ELEMENTS else None
        if value[i] == ",":
            elements.append(pairs)
            pairs = []
            if len(elements) > MAX_XFCC_ELEMENTS:
                return None
        elif value[i] != ";":
            return None
        i += 1


@dataclass(frozen=True)
class EdgePolicy:
    """Which requests come from the edge. Each configured condition must hold: the TCP peer in
    `trusted_proxies` (when not empty), a client certificate of the connection that `edge_verifier`
    accepts (when set) with its key among `edge_spki_sha256` (when not empty) or else not also a
    certificate `client_verifier` accepts (a client's, when the edge's CA and the clients' share a
    root), and `verdict_header` carrying one of `verdict_values` (when set)."""

    trusted_proxies: AddressSet
    edge_verifier: ChainVerifier | None = None
    edge_spki_sha256: frozenset[str] = frozenset()
    client_verifier: ChainVerifier | None = None
    verdict_header: str | None = None
    verdict_values: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not self.trusted_proxies and self.edge_verifier is None:
            raise ValueError("an edge is proven by trusted proxies, an edge CA, or both: configure one")

    @property
    def needs_peer(self) -> bool:
        return bool(self.trusted_proxies)

    @property
    def needs_edge_certificate(self) -> bool:
        return self.edge_verifier is not None

    def check_connection(self, peer: object, edge_chain_pem: object) -> tuple[Reason, str] | None:
        """None when the connection is the edge's (peer, certificate), else (reason, detail)."""
        if self.trusted_proxies:
            address = parse_ip(peer)
            if address is None or address not in self.trusted_proxies:
                shown = peer if isinstance(peer, str) and len(peer) <= 64 else type(peer).__name__
                return Reason.UNTRUSTED_EDGE, f"peer {shown} is not a trusted proxy"
        if self.edge_verifier is not None:
            verdict = self.edge_verifier.verify(edge_chain_pem)
            if not verdict.ok:
                reason = verdict.reason.value if verdict.reason else "INVALID_CERTIFICATE"
                return Reason.UNTRUSTED_EDGE, f"no edge client certificate: {reason} {verdict.detail}".strip()
            spki = verdict.chain.spki_sha256 if verdict.chain else ""
            if self.edge_spki_sha256 and spki not in self.edge_spki_sha256:
                return Reason.UNTRUSTED_EDGE, f"edge certificate key {spki[:16]}... not in edge_spki_sha256"
            if not self.edge_spki_sha256 and self.client_verifier is not None \
                    and self.client_verifier.verify(edge_chain_pem).ok:
                return Reason.UNTRUSTED_EDGE, ("the edge certificate is also a client certificate "
                                               "(ca_certificates): pin the edge's key in edge_spki_sha256")
        return None

    def edge_valid_until(self, edge_chain_pem: object) -> float | None:
        """Until when the edge's verified certificate path is valid (epoch seconds; None when no
        edge certificate is checked or it did not verify)."""
        if self.edge_verifier is None:
            return None
        verdict = self.edge_verifier.verify(edge_chain_pem)
        return verdict.chain.valid_until if verdict.ok and verdict.chain else None

    def check_verdict(self, headers: Mapping[str, Any]) -> tuple[Reason, str] | None:
        """None when no verdict is required or the edge's says verified, else (reason, detail)."""
        if self.verdict_header is not None:
            lines = header_lines(headers, self.verdict_header)
            if lines is None or len(lines) != 1 or lines[0].strip(_OWS) not in self.verdict_values:
                shown = "absent" if not lines else "several lines" if len(lines) > 1 else repr(lines[0][:32])
                return Reason.EDGE_NOT_VERIFIED, f"{self.verdict_header}: {shown}"
        return None


def forwarded_headers(source: ForwardedSource, edge: EdgePolicy,
                      others: Sequence[str] = ()) -> tuple[str, ...]:
    """The headers the edge writes (and `others` it adds about the certificate): removed before
    proxying on every pass."""
    names: Sequence[str | None] = (source.header, source.chain_header, edge.verdict_header, *others)
    return tuple(dict.fromkeys(name for name in names if name))


class ForwardedAuthenticator:
    """header-cert-auth's decision for one request: the edge first, then the header, then exactly
    client-cert-auth's verification, revocation, identity and consumer mapping."""

    def __init__(self, authenticator: Authenticator, edge: EdgePolicy, source: ForwardedSource,
                 remove_headers: Sequence[str] = ()) -> None:
        self.authenticator = authenticator
        self.edge = edge
        self.source = source
        self.removed_headers = forwarded_headers(source, edge, remove_headers)
        #: The headers a decision reads (once the connection is the edge's).
        self.deciding_headers = forwarded_headers(source, edge)

    def authenticate(self, peer: object, edge_chain_pem: object, load_headers: Callable[[], object],
                     load_consumer: LoadConsumer) -> Decision:
        """`load_headers()` (Kong's `get_headers`) is called only once the connection is the edge's."""
        untrusted = self.edge.check_connection(peer, edge_chain_pem)
        if untrusted is not None:
            return self.authenticator.refuse(*untrusted, load_consumer)
        headers = whole_header_map(load_headers())
        if headers is None:
            return self.authenticator.refuse(Reason.MALFORMED_CHAIN, "header lines could not all be read "
                                             f"({MAX_HEADER_LINES} at most)", load_consumer)
        unverified = self.edge.check_verdict(headers)
        if unverified is not None:
            return self.authenticator.refuse(*unverified, load_consumer)
        forwarded = self.source.read(headers)
        if forwarded.reason is not None:
            return self.authenticator.refuse(forwarded.reason, forwarded.detail, load_consumer)
        return self.authenticator.authenticate(forwarded.pem, load_consumer)
