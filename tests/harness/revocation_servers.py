"""Real CRL and OCSP HTTP endpoints on loopback for the revocation tests.

`RevocationServer(authority)` serves, on 127.0.0.1 and an ephemeral port:

* `GET /crl` (DER) and `GET /crl.pem` (PEM): `server.crl`, by default the authority's current CRL;
* `POST /ocsp` (DER body) and `GET /ocsp/<base64 request>` (RFC 6960 appendix A): an OCSP response
  built with `ocsp_response`, "revoked" for serials in `authority.revoked`, "good" otherwise (or
  what `ocsp_status` says for a serial), signed by `ocsp_signer` (the issuer unless set);
* `GET /redirect`: a 302 to `redirect_to`.

Switches: `crl_behaviour` / `ocsp_behaviour` = "ok" | "hang" (wait for `release`, at most
`hang_limit` s, then answer) | "garbage" (200 with junk) | "error" (HTTP 500) | "huge" (200 with
`huge_bytes` of junk); `down()` / `up()` close and reopen the port (connection refused meanwhile);
`hits` counts requests per endpoint ("crl", "ocsp", "redirect").
"""

from __future__ import annotations

import base64
import datetime as dt
import socket
import threading
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from kong_mtls.devpki import Authority, Issued, PrivateKey, name

Behaviour = Literal["ok", "hang", "garbage", "error", "huge"]
OCSPStatus = Literal["good", "revoked", "unknown"]

GARBAGE = b"\x30\x82\x01\x00this is not DER at all" + bytes(range(64))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _signing_hash(key: PrivateKey) -> hashes.HashAlgorithm | None:
    return None if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)) else hashes.SHA256()


def delegated_responder(authority: Authority, *, ocsp_signing: bool = True,
                        common_name: str = "OCSP responder") -> Issued:
    """A responder certificate issued by `authority`; with the OCSP-signing EKU unless told not to."""
    eku = [ExtendedKeyUsageOID.OCSP_SIGNING] if ocsp_signing else [ExtendedKeyUsageOID.CLIENT_AUTH]
    return authority.issue(name(common_name), extended_key_usage=eku)


def ocsp_response(request: ocsp.OCSPRequest, authority: Authority, *, status: OCSPStatus = "good",
                  signer: Issued | None = None, this_update: dt.datetime | None = None,
                  next_update: dt.timedelta | None = dt.timedelta(hours=1),
                  revoked_at: dt.datetime | None = None,
                  reason: x509.ReasonFlags | None = None) -> ocsp.OCSPResponse:
    """A signed response to `request` (the CertID echoed as asked) by `authority` or `signer`.

    `signer` is any certificate and key (a delegated responder, or a wrong one for tests); it is
    sent along in the response.
    """
    this = this_update or _now() - dt.timedelta(minutes=1)
    cert_status = {"good": ocsp.OCSPCertStatus.GOOD, "revoked": ocsp.OCSPCertStatus.REVOKED,
                   "unknown": ocsp.OCSPCertStatus.UNKNOWN}[status]
    revoked = status == "revoked"
    builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
        request.issuer_name_hash, request.issuer_key_hash, request.serial_number, request.hash_algorithm,
        cert_status, this, this + next_update if next_update is not None else None,
        (revoked_at or this - dt.timedelta(minutes=1)) if revoked else None, reason if revoked else None)
    signer_cert, signer_key = (signer.cert, signer.key) if signer else (authority.cert, authority.key)
    builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, signer_cert)
    if signer is not None:
        builder = builder.certificates([signer_cert])
    return builder.sign(signer_key, _signing_hash(signer_key))


def refused_url(path: str = "/ocsp") -> str:
    """An http URL on a loopback port nobody listens on (connection refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


class RevocationServer:
    """CRL and OCSP endpoints of one CA on loopback; a context manager."""

    def __init__(self, authority: Authority) -> None:
        self.authority = authority
        self.crl: x509.CertificateRevocationList = authority.crl()
        self.crl_behaviour: Behaviour = "ok"
        self.ocsp_behaviour: Behaviour = "ok"
        self.ocsp_status: dict[int, OCSPStatus] = {}
        self.ocsp_signer: Issued | None = None
        self.ocsp_next_update: dt.timedelta | None = dt.timedelta(hours=1)
        self.ocsp_this_update: dt.datetime | None = None
        self.redirect_to = "file:///etc/passwd"
        self.huge_bytes = 2 * 1024 * 1024
        self.hang_limit = 10.0
        self.release = threading.Event()
        self.hits: Counter[str] = Counter()
        self._hits_lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> RevocationServer:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.down()

    def up(self) -> RevocationServer:
        """Listen (again, on the same port once it has one)."""
        handler = type("Handler", (_Handler,), {"owner": self})
        httpd = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        httpd.daemon_threads = True
        self.port = httpd.server_address[1]
        self._httpd = httpd
        threading.Thread(target=httpd.serve_forever, args=(0.02,), name="revocation-server",
                         daemon=True).start()
        return self

    def down(self) -> None:
        """Stop listening: connections are refused until `up()`."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    # -- addresses and certificates ----------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def crl_url(self) -> str:
        return f"{self.base_url}/crl"

    @property
    def crl_pem_url(self) -> str:
        return f"{self.base_url}/crl.pem"

    @property
    def ocsp_url(self) -> str:
        return f"{self.base_url}/ocsp"

    def client(self, common_name: str = "client.example", *, ocsp_url: bool = True, crl_url: bool = True,
               pem: bool = False, **kwargs) -> Issued:
        """A client leaf from the authority pointing at this server's OCSP and/or CRL endpoints."""
        return self.authority.client(
            common_name, ocsp_url=self.ocsp_url if ocsp_url else None,
            crl_url=(self.crl_pem_url if pem else self.crl_url) if crl_url else None, **kwargs)

    def refresh_crl(self, **kwargs) -> None:
        """Serve a new CRL from the authority (kwargs go to `Authority.crl`)."""
        self.crl = self.authority.crl(**kwargs)

    # -- serving -----------------------------------------------------------------------------------
    def count(self, endpoint: str) -> None:
        with self._hits_lock:
            self.hits[endpoint] += 1

    def answer_ocsp(self, request_der: bytes) -> bytes:
        request = ocsp.load_der_ocsp_request(request_der)
        serial = request.serial_number
        status = self.ocsp_status.get(serial, "revoked" if serial in self.authority.revoked else "good")
        response = ocsp_response(request, self.authority, status=status, signer=self.ocsp_signer,
                                 this_update=self.ocsp_this_update, next_update=self.ocsp_next_update,
                                 revoked_at=self.authority.revoked.get(serial))
        return response.public_bytes(serialization.Encoding.DER)


class _Handler(BaseHTTPRequestHandler):
    owner: RevocationServer
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        path = self.path
        if path in ("/crl", "/crl.pem"):
            self._serve("crl", lambda: self._crl_bytes(path.endswith(".pem")))
        elif path.startswith("/ocsp/"):
            encoded = urllib.parse.unquote(path[len("/ocsp/"):])
            self._serve("ocsp", lambda: self.owner.answer_ocsp(base64.b64decode(encoded)))
        elif path == "/redirect":
            self.owner.count("redirect")
            self.send_response(302)
            self.send_header("Location", self.owner.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(404, b"")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if self.path == "/ocsp":
            self._serve("ocsp", lambda: self.owner.answer_ocsp(body))
        else:
            self._send(404, b"")

    def _crl_bytes(self, pem: bool) -> bytes:
        encoding = serialization.Encoding.PEM if pem else serialization.Encoding.DER
        return self.owner.crl.public_bytes(encoding)

    def _serve(self, endpoint: str, make) -> None:
        owner = self.owner
        owner.count(endpoint)
        behaviour = owner.crl_behaviour if endpoint == "crl" else owner.ocsp_behaviour
        if behaviour == "hang":
            owner.release.wait(owner.hang_limit)
        if behaviour == "garbage":
            self._send(200, GARBAGE)
        elif behaviour == "error":
            self._send(500, b"internal error")
        elif behaviour == "huge":
            self._send(200, b"\x30" * owner.huge_bytes)
        else:
            self._send(200, make())

    def _send(self, status: int, body: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the client gave up (timeout tests)
