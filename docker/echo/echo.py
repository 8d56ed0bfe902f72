"""A tiny HTTPS upstream for the kong-mtls examples and integration tests (standard library only).

It REQUIRES a client certificate issued by the dev CA (`ECHO_CLIENT_CA`): only Kong, presenting its
upstream client certificate, gets an answer; anyone else fails the TLS handshake. Every answer is
JSON: the request line, the headers exactly as received, and the client certificate it saw.

It also remembers the `X-Test-Nonce` header of the last requests it served, and answers
`GET /__seen/<nonce>` with `{"seen": true|false}`: the integration tests use it to prove that a
refused request never reached the upstream.

Environment: ECHO_CERT, ECHO_KEY (server certificate chain and key), ECHO_CLIENT_CA (CA file for
client certificates), ECHO_PORT (default 9443), ECHO_HOST (default 0.0.0.0), ECHO_NAME (reported
as "server", default "echo").
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NONCE_HEADER = "X-Test-Nonce"
SEEN_PREFIX = "/__seen/"
MAX_NONCES = 10000
MAX_BODY = 1024 * 1024
HANDSHAKE_TIMEOUT = 30


class NonceLog:
    """The last MAX_NONCES nonces seen, thread-safe."""

    def __init__(self, size: int = MAX_NONCES) -> None:
        self._order: collections.deque[str] = collections.deque(maxlen=size)
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def add(self, nonce: str) -> None:
        with self._lock:
            if nonce in self._seen:
                return
            if len(self._order) == self._order.maxlen:
                self._seen.discard(self._order[0])
            self._order.append(nonce)
            self._seen.add(nonce)

    def __contains__(self, nonce: str) -> bool:
        with self._lock:
            return nonce in self._seen


_SHORT_NAMES = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
                "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST"}


def name_text(name: tuple) -> str:
    """`getpeercert()`'s name tuple as `CN=alice,OU=payments,O=Example Org` (most specific first)."""
    parts = [f"{_SHORT_NAMES.get(key, key)}={value}" for rdn in name for key, value in rdn]
    return ",".join(reversed(parts))


def client_cert_info(peer: dict | None) -> dict | None:
    if not peer:
        return None
    return {
        "subject": name_text(peer.get("subject", ())),
        "issuer": name_text(peer.get("issuer", ())),
        "san": [f"{kind}:{value}" for kind, value in peer.get("subjectAltName", ())],
        "serial": peer.get("serialNumber"),
    }


class Handler(BaseHTTPRequestHandler):
    server_version = "kong-mtls-echo"
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(min(length, MAX_BODY)) if length > 0 else b""
        nonces: NonceLog = self.server.nonces  # type: ignore[attr-defined]
        if self.command == "GET" and self.path.startswith(SEEN_PREFIX):
            payload = {"seen": self.path[len(SEEN_PREFIX):] in nonces}
        else:
            nonce = self.headers.get(NONCE_HEADER)
            if nonce:
                nonces.add(nonce)
            payload = {
                "server": self.server.echo_name,  # type: ignore[attr-defined]
                "method": self.command,
                "path": self.path,
                "headers": {name.lower(): value for name, value in self.headers.items()},
                "body": body.decode("utf-8", "replace"),
                "client_cert": client_cert_info(self.connection.getpeercert()),
            }
        data = json.dumps(payload, indent=2, sort_keys=True).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _answer

    def log_message(self, format: str, *args) -> None:
        sys.stdout.write(f"{self.address_string()} {format % args}\n")
        sys.stdout.flush()


class EchoServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext, name: str) -> None:
        super().__init__(address, Handler)
        self.context = context
        self.echo_name = name
        self.nonces = NonceLog()

    def get_request(self):
        sock, address = super().get_request()
        sock.settimeout(HANDSHAKE_TIMEOUT)
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    def finish_request(self, request, client_address) -> None:
        # The handshake runs here, in the request's own thread: a slow or refused client never
        # blocks the accept loop.
        request.do_handshake()
        super().finish_request(request, client_address)

    def handle_error(self, request, client_address) -> None:
        # A client without an acceptable certificate ends here: one line, no traceback.
        error = sys.exc_info()[1]
        sys.stdout.write(f"{client_address[0]} refused: {type(error).__name__}: {error}\n")
        sys.stdout.flush()


def make_context(cert: str, key: str, client_ca: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    context.load_verify_locations(cafile=client_ca)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def main() -> int:
    env = os.environ
    try:
        context = make_context(env["ECHO_CERT"], env["ECHO_KEY"], env["ECHO_CLIENT_CA"])
    except KeyError as missing:
        sys.stderr.write(f"echo: set {missing.args[0]}\n")
        return 2
    server = EchoServer((env.get("ECHO_HOST", "0.0.0.0"), int(env.get("ECHO_PORT", "9443"))), context,
                        env.get("ECHO_NAME", "echo"))
    sys.stdout.write(f"echo {server.echo_name} listening on {server.server_address[0]}:"
                     f"{server.server_address[1]} (client certificate required)\n")
    sys.stdout.flush()
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
