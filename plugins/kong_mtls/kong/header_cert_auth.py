"""Kong adapter for header-cert-auth: client certificates verified at an edge (Cloudflare API Shield,
CloudFront, an AWS ALB, Envoy, an ingress controller) and forwarded to Kong in a request header.

A second plugin rather than an option of client-cert-auth, so that which source a route trusts is
the plugin's name: a route with client-cert-auth never reads a certificate header, and one with
header-cert-auth never reads Kong's own handshake's client certificate as the client's. Its config
holds every client-cert-auth field (the same core verifies, maps and publishes) plus where the
certificate comes from and how the edge is proven. A request costs:

* `kong.nginx.get_var("realip_remote_addr")` when trusted proxies are configured;
* `kong.client.tls.get_full_client_certificate_chain()` when edge CAs are configured;
* `kong.request.get_headers(1000)` (every line of the certificate headers, which `get_header` does
  not give on Kongs before 3.9);
* then what client-cert-auth costs after its own read (`publish`), the forwarded headers removed in
  every spelling in the same `set_headers` call.

Semantics are documented in docs/header-cert-auth.md.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kong_mtls import schema
from kong_mtls.constants import HEADER_CERT_AUTH
from kong_mtls.core.addresses import MAX_HEADER_LINES
from kong_mtls.core.chain import ChainPolicy, ChainVerifier
from kong_mtls.core.forwarded import (
    FORWARDED_FORMATS,
    EdgePolicy,
    ForwardedAuthenticator,
    ForwardedFormat,
    ForwardedSource,
)
from kong_mtls.core.headers import header_name_problem
from kong_mtls.kong import client_cert_auth
from kong_mtls.kong.ip_allowlist import Presets, address_set
from kong_mtls.kong.runtime import Refusal, phase
from kong_mtls.kong.server import serve
from kong_mtls.presets import CA_PRESET_NAMES, CIDR_PRESET_NAMES
from kong_mtls.schema import ConfigError

#: The nginx variable holding the TCP peer before any real-IP rewrite.
PEER_VARIABLE = "realip_remote_addr"

Schema = [
    # Where the certificate comes from: one header, one explicit format.
    schema.string("certificate_header", required=True, len_min=1),
    schema.string("certificate_header_format", required=True, one_of=FORWARDED_FORMATS),
    schema.string("chain_header", len_min=1),
    schema.integer("xfcc_element", default=1, between=(1, 32)),
    # How a request is proven to come from the edge (at least one of the first two).
    schema.strings("trusted_proxies"),
    schema.strings("trusted_proxies_presets", one_of=CIDR_PRESET_NAMES),
    schema.strings("edge_ca_certificates"),
    schema.strings("edge_ca_certificate_files"),
    schema.strings("edge_ca_presets", one_of=CA_PRESET_NAMES),
    schema.string("edge_verdict_header", len_min=1),
    schema.strings("edge_verdict_values", default=["true"], len_min=1),
    # Everything client-cert-auth has: trust anchors, revocation, mapping, headers upstream.
    *client_cert_auth.Schema,
]


@dataclass(frozen=True)
class Compiled:
    authenticator: ForwardedAuthenticator
    warnings: tuple[str, ...]


def compile_config(config: Mapping[str, Any] | None, *, clock: Callable[[], float] = time.time) -> Compiled:
    """Validate a header-cert-auth config and build its authenticator; ConfigError names the field."""
    conf = schema.validate(Schema, config)
    for name in ("certificate_header", "chain_header", "edge_verdict_header"):
        problem = header_name_problem(conf[name]) if conf[name] is not None else None
        if problem:
            raise ConfigError(name, problem)
    fmt = ForwardedFormat(conf["certificate_header_format"])
    if conf["chain_header"] is not None and fmt is not ForwardedFormat.RFC9440:
        raise ConfigError("chain_header", f"only the rfc9440 format has a separate chain header; {fmt.value} "
                                          "carries the chain in certificate_header")
    if conf["xfcc_element"] != 1 and fmt is not ForwardedFormat.XFCC:
        raise ConfigError("xfcc_element", "only used with the xfcc format")
    core = client_cert_auth.compile_validated(conf, clock=clock, plugin=HEADER_CERT_AUTH)
    edge_anchors = client_cert_auth.anchors_of(conf, "edge_", required=False)
    edge_verifier = ChainVerifier(ChainPolicy(anchors=edge_anchors), clock=clock) if edge_anchors else None
    proxies = address_set(conf, "trusted_proxies", Presets({}))
    if not proxies and edge_verifier is None:
        raise ConfigError("trusted_proxies", "the edge must be proven: set trusted_proxies (or "
                                             "trusted_proxies_presets), edge CAs (edge_ca_*), or both")
    edge = EdgePolicy(trusted_proxies=proxies, edge_verifier=edge_verifier,
                      verdict_header=conf["edge_verdict_header"],
                      verdict_values=frozenset(conf["edge_verdict_values"]))
    source = ForwardedSource(header=conf["certificate_header"], format=fmt, chain_header=conf["chain_header"],
                             xfcc_element=conf["xfcc_element"])
    return Compiled(ForwardedAuthenticator(core.authenticator, edge, source), core.warnings)


class Plugin:
    def __init__(self, config: Mapping[str, Any]) -> None:
        compiled = compile_config(config)
        self.authenticator = compiled.authenticator
        self.start_notices = tuple(("warn", w) for w in compiled.warnings)  # through Kong, first request

    @phase(HEADER_CERT_AUTH)
    def access(self, kong: Any) -> Refusal | None:
        auth = self.authenticator
        peer = kong.nginx.get_var(PEER_VARIABLE) if auth.edge.needs_peer else None
        edge_chain = kong.client.tls.get_full_client_certificate_chain() if auth.edge.needs_edge_certificate \
            else None
        headers = kong.request.get_headers(MAX_HEADER_LINES)
        decision = auth.authenticate(peer, edge_chain, headers,
                                     lambda ref: kong.client.load_consumer(ref, True))
        if not decision.allowed:
            reason = decision.reason.value if decision.reason else "UNKNOWN"
            return Refusal(decision.status, decision.message, reason, decision.detail)
        client_cert_auth.publish(kong, HEADER_CERT_AUTH, decision, auth.removed_headers)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    return serve(HEADER_CERT_AUTH, Plugin, Schema, argv)


if __name__ == "__main__":
    sys.exit(main())
