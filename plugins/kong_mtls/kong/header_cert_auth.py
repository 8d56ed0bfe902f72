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

from cryptography import x509

from kong_mtls import schema
from kong_mtls.constants import CONSUMER_HEADERS, GROUP_HEADERS, HEADER_CERT_AUTH
from kong_mtls.core.addresses import MAX_HEADER_LINES, AddressSet, parse_network, whole_header_map
from kong_mtls.core.chain import (
    ChainConfigError,
    ChainPolicy,
    ChainVerifier,
    cert_sha256,
    describe,
    normalize_sha256,
    spki_sha256,
)
from kong_mtls.core.forwarded import (
    FORWARDED_FORMATS,
    MAX_XFCC_ELEMENTS,
    EdgePolicy,
    ForwardedAuthenticator,
    ForwardedFormat,
    ForwardedSource,
)
from kong_mtls.core.headers import header_name_problem
from kong_mtls.core.identity import HEADER_CLIENT_CERT_DN, HEADER_CLIENT_CERT_SAN, Decision
from kong_mtls.kong import client_cert_auth
from kong_mtls.kong.ip_allowlist import PEER_VARIABLE, Presets, address_set
from kong_mtls.kong.runtime import Refusal, VerdictInputs, log_line, phase
from kong_mtls.kong.server import serve
from kong_mtls.presets import CA_PRESET_NAMES, CIDR_PRESET_NAMES, load_ca_preset, load_cidr_preset
from kong_mtls.schema import ConfigError

Schema = [
    # Where the certificate comes from: one header, one explicit format.
    schema.string("certificate_header", required=True, len_min=1),
    schema.string("certificate_header_format", required=True, one_of=FORWARDED_FORMATS),
    schema.string("chain_header", len_min=1),
    schema.integer("xfcc_elements", default=1, between=(1, MAX_XFCC_ELEMENTS)),
    # Other headers the edge adds about the client certificate (removed on every pass).
    schema.strings("remove_headers"),
    # How a request is proven to come from the edge (at least one of the first two).
    schema.strings("trusted_proxies"),
    schema.strings("trusted_proxies_presets", one_of=CIDR_PRESET_NAMES),
    schema.string_map("preset_files"),
    schema.strings("edge_ca_certificates"),
    schema.strings("edge_ca_certificate_files"),
    schema.strings("edge_ca_presets", one_of=CA_PRESET_NAMES),
    schema.strings("edge_spki_sha256"),
    schema.string("edge_verdict_header", len_min=1),
    schema.strings("edge_verdict_values", default=["true"], len_min=1),
    # Everything client-cert-auth has: trust anchors, revocation, mapping, headers upstream.
    *client_cert_auth.CERTIFICATE_FIELDS,
    schema.verdict_cache_ttl(),
]


#: Headers a certificate header may not be: HTTP framing and routing, and the identity headers we
#: set (the certificate headers we may forward, `Client-Cert` ..., are what edges write too).
RESERVED_HEADERS = frozenset(name.lower() for name in (
    "Host", "Content-Length", "Content-Type", "Transfer-Encoding", "Connection", "Upgrade", "TE",
    "Trailer", "Keep-Alive", "Proxy-Connection", "Authorization", "Cookie", "X-Forwarded-For",
    "X-Forwarded-Proto", "X-Forwarded-Host", "X-Forwarded-Port", "X-Real-IP", "Forwarded",
    *CONSUMER_HEADERS, *GROUP_HEADERS, HEADER_CLIENT_CERT_DN, HEADER_CLIENT_CERT_SAN))

#: Logged at err on the first request when every edge proof is one all Cloudflare zones share.
REASON_SHARED_EDGE_PROOF = "EDGE_PROOF_SHARED"


@dataclass(frozen=True)
class Compiled:
    authenticator: ForwardedAuthenticator
    anchors: tuple[x509.Certificate, ...]  # the client CAs, then the edge's
    warnings: tuple[str, ...]
    errors: tuple[str, ...] = ()


def compile_config(config: Mapping[str, Any] | None, *, clock: Callable[[], float] = time.time) -> Compiled:
    """Validate a header-cert-auth config and build its authenticator; ConfigError names the field."""
    conf = schema.validate(Schema, config)
    _check_header_names(conf)
    fmt = ForwardedFormat(conf["certificate_header_format"])
    if conf["chain_header"] is not None and fmt is not ForwardedFormat.RFC9440:
        raise ConfigError("chain_header", f"only the rfc9440 format has a separate chain header; {fmt.value} "
                                          "carries the chain in certificate_header")
    if conf["xfcc_elements"] != 1 and fmt is not ForwardedFormat.XFCC:
        raise ConfigError("xfcc_elements", "only used with the xfcc format")
    for i, value in enumerate(conf["edge_verdict_values"], start=1):
        if not value.strip():
            raise ConfigError(f"edge_verdict_values[{i}]", "an empty verdict would match an empty header")
    core = client_cert_auth.compile_validated(conf, clock=clock, plugin=HEADER_CERT_AUTH)
    edge_anchors = client_cert_auth.anchors_of(conf, "edge_", required=False)
    clients = {(cert.subject, spki_sha256(cert)) for cert in core.anchors}
    for cert in edge_anchors:
        if (cert.subject, spki_sha256(cert)) in clients:
            raise ConfigError("edge_ca_certificates", f"{describe(cert)} is also a client CA "
                                                      "(ca_certificates): any client would pass as the edge")
    try:
        # Any edge CA may end the path: "the infrastructure CA under our root" is expressible.
        edge_verifier = ChainVerifier(ChainPolicy(anchors=edge_anchors, allow_partial_chain=True),
                                      clock=clock) if edge_anchors else None
    except ChainConfigError as exc:
        raise ConfigError("edge_ca_certificates", str(exc)) from None
    pins = []
    for i, text in enumerate(conf["edge_spki_sha256"] or (), start=1):
        try:
            pins.append(normalize_sha256(text))
        except ValueError as exc:
            raise ConfigError(f"edge_spki_sha256[{i}]", str(exc)) from None
    if pins and edge_verifier is None:
        raise ConfigError("edge_spki_sha256", "pins the edge's certificate: set its CA in edge_ca_* too")
    proxies = address_set(conf, "trusted_proxies", Presets(conf["preset_files"] or {}))
    if not proxies and edge_verifier is None:
        raise ConfigError("trusted_proxies", "the edge must be proven: set trusted_proxies (or "
                                             "trusted_proxies_presets), edge CAs (edge_ca_*), or both")
    edge = EdgePolicy(trusted_proxies=proxies, edge_verifier=edge_verifier, edge_spki_sha256=frozenset(pins),
                      client_verifier=core.authenticator.verifier,
                      verdict_header=conf["edge_verdict_header"],
                      verdict_values=frozenset(conf["edge_verdict_values"]))
    source = ForwardedSource(header=conf["certificate_header"], format=fmt, chain_header=conf["chain_header"],
                             xfcc_elements=conf["xfcc_elements"])
    errors = ()
    if not pins and _only_shared_proofs(proxies, edge_anchors):
        # Cloudflare's ranges and its global AOP certificate serve every zone alike.
        errors = (log_line(HEADER_CERT_AUTH, "shared-edge-proof", reason=REASON_SHARED_EDGE_PROOF,
                           detail="every proof configured is shared by all Cloudflare zones: any zone "
                                  "pointed at this origin can forge the header; set your zone's AOP CA "
                                  "in edge_ca_certificates"),)
    authenticator = ForwardedAuthenticator(core.authenticator, edge, source, conf["remove_headers"] or ())
    return Compiled(authenticator, (*core.anchors, *edge_anchors), core.warnings, errors)


def _only_shared_proofs(proxies: AddressSet, edge_anchors: Sequence[x509.Certificate]) -> bool:
    """Whether every proof is one all Cloudflare zones share: peers only within Cloudflare's ranges
    (however written), edge CAs only Cloudflare's global origin-pull CA."""
    cloudflare = AddressSet(parse_network(cidr) for cidr in load_cidr_preset("cloudflare"))
    aop = {cert_sha256(cert) for cert in load_ca_preset("cloudflare-origin-pull")}
    return proxies.within(cloudflare) and all(cert_sha256(cert) in aop for cert in edge_anchors)


def _check_header_names(conf: Mapping[str, Any]) -> None:
    """Header names: valid, written with `-` (an edge never writes `_`: only a client could send
    such a header, and the edge would never overwrite it), distinct, and none of HTTP's or ours."""
    seen: dict[str, str] = {}
    for name in ("certificate_header", "chain_header", "edge_verdict_header"):
        value = conf[name]
        if value is None:
            continue
        problem = header_name_problem(value)
        if problem is None and "_" in value:
            problem = f"{value!r}: edges write '-', a header with '_' could only come from a client"
        if problem is None and value.lower() in RESERVED_HEADERS:
            problem = f"{value!r} is a header HTTP, Kong or kong-mtls uses for something else"
        if problem is None and value.lower() in seen:
            problem = f"{value!r} is also {seen[value.lower()]}"
        if problem:
            raise ConfigError(name, problem)
        seen[value.lower()] = name
    for i, value in enumerate(conf["remove_headers"] or (), start=1):
        problem = header_name_problem(value)
        if problem is None and value.lower() in RESERVED_HEADERS:
            problem = f"{value!r} is a header HTTP, Kong or kong-mtls uses for something else"
        if problem:
            raise ConfigError(f"remove_headers[{i}]", problem)


class Plugin:
    def __init__(self, config: Mapping[str, Any]) -> None:
        conf = schema.validate(Schema, config)
        compiled = compile_config(conf)
        self.authenticator = compiled.authenticator
        self.verdict_cache_ttl: int = conf["verdict_cache_ttl"]
        # Through Kong, on the first request.
        self.start_notices = (*(("err", line) for line in compiled.errors),
                              *(("warn", line) for line in compiled.warnings))

    @phase(HEADER_CERT_AUTH, verdicts=True)
    def access(self, kong: Any, inputs: VerdictInputs) -> Refusal | None:
        auth = self.authenticator
        peer = edge_chain = None
        if auth.edge.needs_peer:
            peer = kong.nginx.get_var(PEER_VARIABLE)
            inputs.var(PEER_VARIABLE, peer)
        if auth.edge.needs_edge_certificate:
            edge_chain = kong.client.tls.get_full_client_certificate_chain()
            inputs.chain(edge_chain)
        read: list[Any] = []

        def load_headers() -> Any:
            read.append(kong.request.get_headers(MAX_HEADER_LINES))
            return read[0]

        decision = auth.authenticate(peer, edge_chain, load_headers,
                                     lambda ref: kong.client.load_consumer(ref, True))
        self._declare(inputs, decision, edge_chain, read)
        if not decision.allowed:
            reason = decision.reason.value if decision.reason else "UNKNOWN"
            return Refusal(decision.status, decision.message, reason, decision.detail)
        client_cert_auth.publish(kong, HEADER_CERT_AUTH, decision, auth.removed_headers)
        return None


    def _declare(self, inputs: VerdictInputs, decision: Decision, edge_chain: Any, read: list[Any]) -> None:
        """The headers the decision read, if it read them (a stranger's are never fetched), and how
        long it holds: as client-cert-auth's, and no longer than the edge's own certificate."""
        if read:
            headers = whole_header_map(read[0])
            if headers is None:  # refused, and never cached: the lines were not all read
                return
            for name in self.authenticator.deciding_headers:
                inputs.header(name, headers.get(name.lower()))
        ttl = client_cert_auth.verdict_ttl(decision, self.verdict_cache_ttl,
                                           self.authenticator.authenticator.consumers.left)
        edge_until = self.authenticator.edge.edge_valid_until(edge_chain)
        if edge_until is not None:
            ttl = min(ttl, edge_until - time.time())
        inputs.holds_for(ttl)


def main(argv: Sequence[str] | None = None) -> int:
    return serve(HEADER_CERT_AUTH, Plugin, Schema, argv)


if __name__ == "__main__":
    sys.exit(main())
