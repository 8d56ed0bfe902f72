"""Real TLS servers on loopback, for tests that need an upstream on the other end of a socket.

* `TLSUpstream`: an HTTPS server (Python `ssl`, one thread per connection) presenting a chosen
  certificate (optionally one per SNI name), optionally requiring a client certificate from given CAs
  (like nginx `ssl_verify_client on` plus `ssl_client_certificate`, but refusing at the TLS level
  with an alert). It answers every HTTP request with JSON describing what it saw — method, path,
  headers, body, the client certificate and the TLS session — and records every connection,
  including refused handshakes and connections that sent no request (a probe), in `connections`.
* `SilentServer`: accepts TCP connections and never says a word (a hung upstream).
* `closed_port()`: a loopback port nothing listens on (an upstream that is down).

Keys are written to a private temporary directory only for as long as `ssl` needs to load them.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from kong_mtls.devpki import Authority, Issued

#: A trust anchor for client certificates: a CA, an issued certificate, or PEM text.
ClientCA = Union[Authority, Issued, str]

_READ_TIMEOUT = 5.0
_MAX_HEAD = 64 * 1024
_MAX_BODY = 1024 * 1024


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        return ", ".join(values) if values else None


@dataclass
class SeenConnection:
    """One accepted TCP connection, as the upstream saw it."""

    peer: tuple[str, int]
    accepted: bool = False             # the TLS handshake completed (client certificate accepted)
    error: str | None = None           # why the handshake failed
    server_name: str | None = None     # SNI sent by the client
    tls_version: str | None = None
    client_cert: x509.Certificate | None = None
    requests: list[SeenRequest] = field(default_factory=list)


Handler = Callable[[SeenRequest, SeenConnection], "tuple[int, Mapping[str, str], bytes]"]


def _cert_json(cert: x509.Certificate | None) -> dict[str, Any] | None:
    if cert is None:
        return None
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(getattr(n, "value", n)) for n in sans]
    except x509.ExtensionNotFound:
        names = []
    return {"subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(),
            "sans": names, "sha256": cert.fingerprint(hashes.SHA256()).hex()}


def echo_handler(request: SeenRequest, conn: SeenConnection) -> tuple[int, Mapping[str, str], bytes]:
    """Answer 200 with JSON: what the upstream received and who connected."""
    headers: dict[str, list[str]] = {}
    for name, value in request.headers:
        headers.setdefault(name.lower(), []).append(value)
    body = {
        "method": request.method,
        "path": request.path,
        "headers": {k: ", ".join(v) for k, v in headers.items()},
        "body": request.body.decode("utf-8", "replace"),
        "client_cert": _cert_json(conn.client_cert),
        "tls": {"version": conn.tls_version, "server_name": conn.server_name},
    }
    return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()


def _trust_pem(cas: Iterable[ClientCA]) -> str:
    out = []
    for ca in cas:
        out.append(ca if isinstance(ca, str) else ca.cert_pem)
    return "".join(out)


class TLSUpstream:
    """An HTTPS upstream on loopback; use as a context manager or call start()/stop()."""

    def __init__(self, cert: Issued, *, client_cas: Iterable[ClientCA] = (),
                 require_client_cert: bool = True, sni_certs: Mapping[str, Issued] | None = None,
                 host: str = "127.0.0.1", port: int = 0, max_version: ssl.TLSVersion | None = None,
                 handler: Handler = echo_handler) -> None:
        self.host = host
        self._requested_port = port
        self.client_ca_pem = _trust_pem(client_cas)
        self.require_client_cert = require_client_cert
        self.max_version = max_version
        self.handler = handler
        self.connections: list[SeenConnection] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._sni: dict[int, str] = {}
        self._context = self._make_context(cert)
        self._sni_contexts = {name.lower(): self._make_context(c) for name, c in (sni_certs or {}).items()}

    # -- configuration --------------------------------------------------------------------------
    def _make_context(self, cert: Issued) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if self.max_version is not None:
            ctx.maximum_version = self.max_version
        with tempfile.TemporaryDirectory(prefix="tls-upstream-") as tmp:
            ctx.load_cert_chain(*write_pem_files(tmp, cert, "server"))
        if self.client_ca_pem:
            ctx.load_verify_locations(cadata=self.client_ca_pem)
            ctx.verify_mode = ssl.CERT_REQUIRED if self.require_client_cert else ssl.CERT_OPTIONAL
        ctx.sni_callback = self._on_sni
        return ctx

    def present(self, cert: Issued) -> None:
        """Present another certificate from now on (e.g. a rotated or replaced one)."""
        self._context = self._make_context(cert)

    def _on_sni(self, sslobj: Any, server_name: str | None, ctx: ssl.SSLContext) -> None:
        if server_name:
            self._sni[id(sslobj)] = server_name
            chosen = self._sni_contexts.get(server_name.lower())
            if chosen is not None:
                sslobj.context = chosen

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> TLSUpstream:
        listener = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self._requested_port))
        listener.listen(64)
        listener.settimeout(0.1)
        self._listener = listener
        self._thread = threading.Thread(target=self._serve, name=f"tls-upstream-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._listener is not None:
            self._listener.close()
        self._thread = self._listener = None

    def __enter__(self) -> TLSUpstream:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._listener is not None, "not started"
        return self._listener.getsockname()[1]

    @property
    def address(self) -> str:
        """`host:port`, as a probe target."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    # -- what was seen --------------------------------------------------------------------------
    @property
    def connection_count(self) -> int:
        """TCP connections accepted so far (exact as soon as a client's handshake has completed)."""
        with self._lock:
            return len(self.connections)

    def wait_for(self, count: int, timeout: float = 5.0) -> list[SeenConnection]:
        """Wait until `count` connections have been fully handled; return them all."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                done = [c for c in self.connections if c.accepted or c.error]
            if len(done) >= count:
                return done
            time.sleep(0.01)
        raise AssertionError(f"expected {count} connections, saw {len(done)}")

    # -- serving --------------------------------------------------------------------------------
    def _serve(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, peer = self._listener.accept()
            except (socket.timeout, OSError):
                continue
            # Recorded before the handshake, so a client whose handshake completed is always counted.
            seen = SeenConnection(peer=tuple(peer[:2]))
            with self._lock:
                self.connections.append(seen)
            threading.Thread(target=self._handle, args=(conn, seen), daemon=True).start()

    def _handle(self, raw: socket.socket, seen: SeenConnection) -> None:
        raw.settimeout(_READ_TIMEOUT)
        try:
            tls = self._context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            seen.error = str(exc) or type(exc).__name__
            raw.close()
            return
        try:
            seen.server_name = self._sni.pop(id(tls), None)
            seen.tls_version = tls.version()
            der = tls.getpeercert(binary_form=True)
            seen.client_cert = x509.load_der_x509_certificate(der) if der else None
            seen.accepted = True
            self._serve_requests(tls, seen)
        except (ssl.SSLError, OSError, ValueError):
            pass  # the client went away (a probe closes right after the handshake)
        finally:
            with contextlib.suppress(OSError):
                tls.close()

    def _serve_requests(self, tls: ssl.SSLSocket, seen: SeenConnection) -> None:
        buffer = b""
        while True:
            request, buffer = _read_request(tls, buffer)
            if request is None:
                return
            seen.requests.append(request)
            status, headers, body = self.handler(request, seen)
            head = [f"HTTP/1.1 {status} {'OK' if status < 400 else 'Error'}",
                    f"Content-Length: {len(body)}"]
            head += [f"{k}: {v}" for k, v in headers.items()]
            close = (request.header("Connection") or "").lower() == "close"
            if close:
                head.append("Connection: close")
            tls.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
            if close:
                return


def _read_request(tls: ssl.SSLSocket, buffer: bytes) -> tuple[SeenRequest | None, bytes]:
    while b"\r\n\r\n" not in buffer:
        if len(buffer) > _MAX_HEAD:
            return None, b""
        chunk = tls.recv(65536)
        if not chunk:
            return None, b""
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = [*lines[0].split(" ", 2), "", ""][:3]
    headers = tuple((n.strip(), v.strip()) for n, _, v in (line.partition(":") for line in lines[1:]))
    length = 0
    for name, value in headers:
        if name.lower() == "content-length" and value.isdigit():
            length = min(int(value), _MAX_BODY)
    while len(rest) < length:
        chunk = tls.recv(65536)
        if not chunk:
            break
        rest += chunk
    return SeenRequest(method, path, headers, rest[:length]), rest[length:]


def https_get(upstream: TLSUpstream, path: str = "/", *, ca_pem: str, client: Issued | None = None,
              server_name: str | None = None, headers: Mapping[str, str] | None = None,
              timeout: float = 5.0) -> tuple[int, dict]:
    """A minimal HTTPS client for tests: GET `path` and return (status, JSON body)."""
    ctx = ssl.create_default_context(cadata=ca_pem)
    ctx.check_hostname = server_name is not None
    if client is not None:
        with tempfile.TemporaryDirectory(prefix="tls-client-") as tmp:
            ctx.load_cert_chain(*write_pem_files(tmp, client, "client"))
    with socket.create_connection((upstream.host, upstream.port), timeout=timeout) as raw, \
            ctx.wrap_socket(raw, server_hostname=server_name or upstream.host) as tls:
        lines = [f"GET {path} HTTP/1.1", f"Host: {server_name or upstream.host}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        tls.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while True:
            chunk = tls.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body or b"null")


class SilentServer:
    """Accepts TCP connections and never answers: a hung upstream."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._listener = socket.socket(socket.AF_INET)
        self._listener.bind((host, 0))
        self._listener.listen(16)
        self.host = host
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        self._listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
                self._held.append(conn)
            except (socket.timeout, OSError):
                continue

    @property
    def port(self) -> int:
        return self._listener.getsockname()[1]

    def wait_for_connection(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._held:
            if time.monotonic() > deadline:
                raise AssertionError("nobody connected")
            time.sleep(0.01)

    def __enter__(self) -> SilentServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self._held:
            conn.close()
        self._listener.close()


def closed_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on (bound then released: connecting to it is refused)."""
    with socket.socket(socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def write_pem_files(directory: str | os.PathLike, issued: Issued, stem: str) -> tuple[str, str]:
    """Write `<stem>.crt` (leaf + intermediates) and `<stem>.key` (mode 0600) into a test's temporary
    directory, as a Kong image holds its client certificate; return both paths."""
    cert_path = os.path.join(directory, f"{stem}.crt")
    key_path = os.path.join(directory, f"{stem}.key")
    with open(cert_path, "w") as f:
        f.write(issued.chain_pem)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(issued.key_pem)
    return cert_path, key_path
