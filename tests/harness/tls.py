"""Client chains that crossed a real TLS handshake.

`capture_client_chain` runs a full handshake between a pyOpenSSL server configured like nginx with
`ssl_verify_client optional_no_ca` (it requests a certificate and accepts whatever the client sends,
leaving verification to the plugin) and a pyOpenSSL client presenting its certificate and
intermediates. It returns what the server saw, formatted as Kong's
`kong.client.tls.get_full_client_certificate_chain()` returns it: the PEM of the client's
certificate followed by the rest of the chain the client sent, or None if it sent none.
"""

from __future__ import annotations

from OpenSSL import SSL, crypto

from kong_mtls.devpki import Issued

_PUMP_LIMIT = 200


def _server_context(server: Issued) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate(server.cert)
    ctx.use_privatekey(server.key)
    # optional_no_ca: request a certificate, accept any (or none); the plugin decides.
    ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: True)
    return ctx


def _client_context(client: Issued | None, send_intermediates: bool) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_verify(SSL.VERIFY_NONE, lambda *args: True)
    if client is not None:
        ctx.use_certificate(client.cert)
        ctx.use_privatekey(client.key)
        if send_intermediates:
            for extra in client.intermediates:
                ctx.add_extra_chain_cert(extra)
    return ctx


def capture_client_chain(client: Issued | None, server: Issued, *, send_intermediates: bool = True,
                         tls_version: int | None = None) -> str | None:
    """Handshake in memory and return the client chain as the server saw it (PEM, leaf first)."""
    server_ctx = _server_context(server)
    client_ctx = _client_context(client, send_intermediates)
    if tls_version is not None:
        for ctx in (server_ctx, client_ctx):
            ctx.set_min_proto_version(tls_version)
            ctx.set_max_proto_version(tls_version)
    s = SSL.Connection(server_ctx, None)
    s.set_accept_state()
    c = SSL.Connection(client_ctx, None)
    c.set_connect_state()
    _handshake(c, s)
    leaf = s.get_peer_certificate()
    if leaf is None:
        return None
    certs = [leaf.to_cryptography()]
    for extra in s.get_peer_cert_chain() or []:
        extra_c = extra.to_cryptography()
        if extra_c != certs[0]:
            certs.append(extra_c)
    return "".join(crypto.dump_certificate(crypto.FILETYPE_PEM, crypto.X509.from_cryptography(x)).decode()
                   for x in certs)


def _handshake(client: SSL.Connection, server: SSL.Connection) -> None:
    done = {"client": False, "server": False}
    for _ in range(_PUMP_LIMIT):
        for name, conn in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    conn.do_handshake()
                    done[name] = True
                except SSL.WantReadError:
                    pass
        moved = _pump(client, server) + _pump(server, client)
        if all(done.values()) and not moved:
            # TLS 1.3: the client learns the server's verdict on its certificate on first read.
            return
    raise RuntimeError("TLS handshake did not complete")


def _pump(src: SSL.Connection, dst: SSL.Connection) -> int:
    moved = 0
    while True:
        try:
            data = src.bio_read(65536)
        except SSL.WantReadError:
            return moved
        dst.bio_write(data)
        moved += len(data)
