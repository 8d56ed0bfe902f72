"""Kong adapter for client-cert-auth: mutual-TLS consumer authentication (Enterprise mtls-auth for OSS).

The config is compiled once per plugin instance (`compile_config`, also used by `kong-mtls check`)
into a `kong_mtls.core.identity.Authenticator`. A request then costs:

* one `kong.client.tls.get_full_client_certificate_chain()`;
* `kong.client.load_consumer(ref, true)` only on a consumer-cache miss (Kong has no custom_id lookup
  a plugin server can call, so consumers are matched by id or username only);
* on a pass: `kong.client.authenticate` (only with a consumer table: over RPC a nil consumer raises
  in Lua), `kong.ctx.shared.set("authenticated_groups", ...)` when there are groups, one
  `kong.service.request.set_headers` carrying every identity header (empty values remove what the
  client sent), and last one `kong.ctx.shared.set` of the mark the fail-closed guard and
  api-key-auth read;
* on a failure with a certificate: `kong.client.tls.set_client_verify("FAILED:<reason>")`.
  "SUCCESS" is not set on success: it would cost a round trip per request, and the plugin's verdict
  is published in the mark and the headers.

Semantics are documented in docs/client-cert-auth.md.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from kong_mtls import schema
from kong_mtls.constants import CLIENT_CERT_AUTH, SHARED_AUTHENTICATED_GROUPS, shared_mark
from kong_mtls.core.chain import (
    ChainConfigError,
    ChainPolicy,
    ChainVerifier,
    check_anchor,
    describe,
    expiring_anchors,
    parse_eku,
    parse_pem_certificates,
    read_certificate_file,
)
from kong_mtls.core.headers import with_every_spelling
from kong_mtls.core.identity import (
    DEFAULT_NAME_ORDER,
    FORWARD_FORMATS,
    Authenticator,
    AuthPolicy,
    Decision,
    GroupSource,
    NameKind,
    Via,
    parse_mappings,
)
from kong_mtls.core.revocation import RevocationChecker, RevocationMode, parse_crls
from kong_mtls.kong.runtime import Refusal, VerdictInputs, log_line, pdk_log, phase
from kong_mtls.kong.server import serve
from kong_mtls.presets import CA_PRESET_NAMES, PresetError, load_ca_preset
from kong_mtls.schema import ConfigError

_log = logging.getLogger("kong_mtls")

#: The fields header-cert-auth shares: trust anchors, revocation, mapping, what reaches the upstream.
CERTIFICATE_FIELDS = [
    # Trust anchors: PEM texts (each may hold several certificates), PEM files, shipped presets.
    schema.strings("ca_certificates"),
    schema.strings("ca_certificate_files"),
    schema.strings("ca_presets", one_of=CA_PRESET_NAMES),
    schema.boolean("allow_partial_chain", default=False),
    schema.integer("max_chain_depth", default=4, between=(0, 16)),
    schema.string("required_eku", default="client_auth", len_min=1),
    schema.integer("validation_time_skew", default=0, between=(0, 86400)),
    # Revocation (kong_mtls.core.revocation).
    schema.string("revocation_check_mode", default=RevocationMode.IGNORE_CA_ERROR.value,
                  one_of=[m.value for m in RevocationMode]),
    schema.strings("crls"),
    schema.integer("http_timeout", default=5000, between=(100, 60000)),
    schema.integer("revocation_cache_ttl", default=3600, between=(1, 7 * 86400)),
    # CRL/OCSP addresses come from client certificates: loopback, link-local and private ones only
    # when the operator says so (a responder on the LAN).
    schema.boolean("revocation_allow_private_addresses", default=False),
    # Identity -> consumer and groups.
    schema.strings("name_sources", default=[k.value for k in DEFAULT_NAME_ORDER],
                   one_of=[k.value for k in NameKind], len_min=1),
    schema.records("consumer_mappings", [
        schema.string("subject_name", required=True, len_min=1),
        schema.string("name_type", one_of=[k.value for k in NameKind]),
        schema.string("consumer", len_min=1),
        schema.string("ca_sha256", len_min=1),
        schema.string("spki_sha256", len_min=1),
        schema.strings("groups"),
    ]),
    schema.strings("consumer_by", default=["username"], one_of=["username", "id"]),
    schema.string("default_consumer", len_min=1),
    schema.string("anonymous", len_min=1),
    schema.boolean("skip_consumer_lookup", default=False),
    schema.integer("consumer_cache_ttl", default=60, between=(0, 86400)),
    schema.strings("groups_from", default=["mapping"]),
    # What reaches the upstream, and how strictly.
    schema.strings("forward_client_cert", one_of=FORWARD_FORMATS),
    schema.boolean("report_only", default=False),
    schema.integer("cache_size", default=4096, between=(0, 1_000_000)),
]

Schema = [*CERTIFICATE_FIELDS, schema.verdict_cache_ttl()]


@dataclass(frozen=True)
class Compiled:
    """A compiled config: the authenticator, the anchors and what to warn about at start."""

    authenticator: Authenticator
    anchors: tuple[x509.Certificate, ...]
    warnings: tuple[str, ...]


def compile_config(config: Mapping[str, Any] | None, *, clock: Callable[[], float] = time.time) -> Compiled:
    """Validate a client-cert-auth config and build its authenticator. Raises ConfigError naming the
    field. `clock` (epoch seconds) drives certificate validity (`kong-mtls check --at`)."""
    return compile_validated(schema.validate(Schema, config), clock=clock)


def compile_validated(conf: Mapping[str, Any], *, clock: Callable[[], float] = time.time,
                      plugin: str = CLIENT_CERT_AUTH) -> Compiled:
    """`compile_config` for a config already validated against a schema holding `Schema`'s fields
    (header-cert-auth's holds them all)."""
    anchors = anchors_of(conf)
    try:
        eku = parse_eku(conf["required_eku"])
    except ValueError as exc:
        raise ConfigError("required_eku", str(exc)) from None
    try:
        policy = ChainPolicy(anchors=anchors, allow_partial_chain=conf["allow_partial_chain"],
                             max_chain_depth=conf["max_chain_depth"], required_eku=eku,
                             time_skew=float(conf["validation_time_skew"]))
    except ChainConfigError as exc:
        field = "allow_partial_chain" if "allow_partial_chain" in str(exc) else "ca_certificates"
        raise ConfigError(field, str(exc)) from None
    groups = []
    for i, text in enumerate(conf["groups_from"] or (), start=1):
        try:
            groups.append(GroupSource.parse(text))
        except ValueError as exc:
            raise ConfigError(f"groups_from[{i}]", str(exc)) from None
    auth_policy = AuthPolicy(
        name_sources=tuple(NameKind(k) for k in conf["name_sources"]),
        consumer_mappings=parse_mappings(conf["consumer_mappings"] or ()),
        consumer_by=frozenset(conf["consumer_by"] or ()),
        default_consumer=conf["default_consumer"],
        anonymous=conf["anonymous"],
        skip_consumer_lookup=conf["skip_consumer_lookup"],
        groups_from=tuple(groups),
        forward_client_cert=frozenset(conf["forward_client_cert"] or ()),
        report_only=conf["report_only"],
    )
    verifier = ChainVerifier(policy, cache_size=conf["cache_size"], clock=clock)
    authenticator = Authenticator(verifier, auth_policy, revocation=_revocation(conf, clock),
                                  consumer_cache_ttl=conf["consumer_cache_ttl"], memo_size=conf["cache_size"])
    warnings = []
    for cert, days in expiring_anchors(policy.anchors, clock()):
        state = f"expired {-days} days ago" if days < 0 else f"expires in {days} days"
        warnings.append(log_line(plugin, "anchor-expiring", anchor=describe(cert), state=state,
                                 not_after=cert.not_valid_after_utc.date().isoformat()))
    return Compiled(authenticator, policy.anchors, tuple(warnings))


def anchors_of(conf: Mapping[str, Any], prefix: str = "", *,
               required: bool = True) -> tuple[x509.Certificate, ...]:
    """The trust anchors of the `<prefix>ca_certificates`, `<prefix>ca_certificate_files` and
    `<prefix>ca_presets` fields; ConfigError names the field of a bad one."""
    anchors: list[x509.Certificate] = []
    sources: list[tuple[str, Callable[[], list[x509.Certificate]]]] = []
    for i, text in enumerate(conf[f"{prefix}ca_certificates"] or (), start=1):
        sources.append((f"{prefix}ca_certificates[{i}]", lambda text=text: parse_pem_certificates(text)))
    for i, path in enumerate(conf[f"{prefix}ca_certificate_files"] or (), start=1):
        sources.append((f"{prefix}ca_certificate_files[{i}]", lambda path=path: read_certificate_file(path)))
    for i, name in enumerate(conf[f"{prefix}ca_presets"] or (), start=1):
        sources.append((f"{prefix}ca_presets[{i}]", lambda name=name: load_ca_preset(name)))
    for where, load in sources:
        try:
            certs = load()
            for cert in certs:
                check_anchor(cert)
        except (ChainConfigError, PresetError) as exc:
            raise ConfigError(where, str(exc)) from None
        anchors.extend(certs)
    if not anchors and required:
        fields = f"{prefix}ca_certificates, {prefix}ca_certificate_files or {prefix}ca_presets"
        raise ConfigError(f"{prefix}ca_certificates", f"no trust anchor configured (set {fields})")
    return tuple(anchors)


def _revocation(conf: Mapping[str, Any], clock: Callable[[], float]) -> Callable[..., Any] | None:
    mode = RevocationMode(conf["revocation_check_mode"])
    if mode is RevocationMode.SKIP:
        if conf["crls"]:
            raise ConfigError("crls", "CRLs are not used when revocation_check_mode is SKIP")
        return None
    crls = []
    for i, text in enumerate(conf["crls"] or (), start=1):
        try:
            crls.extend(parse_crls(text))
        except ValueError as exc:
            raise ConfigError(f"crls[{i}]", str(exc)) from None
    checker = RevocationChecker(static_crls=crls, http_timeout=conf["http_timeout"] / 1000.0,
                                allow_private_addresses=conf["revocation_allow_private_addresses"],
                                max_ttl=float(conf["revocation_cache_ttl"]), clock=clock)
    return lambda leaf, issuer: checker.check(leaf, issuer, mode)


class Plugin:
    def __init__(self, config: Mapping[str, Any]) -> None:
        conf = schema.validate(Schema, config)
        compiled = compile_validated(conf)
        self.authenticator = compiled.authenticator
        self.verdict_cache_ttl: int = conf["verdict_cache_ttl"]
        self.start_notices = tuple(("warn", w) for w in compiled.warnings)  # through Kong, first request
        for warning in compiled.warnings:
            _log.warning(warning)

    @phase(CLIENT_CERT_AUTH, verdicts=True)
    def access(self, kong: Any, inputs: VerdictInputs) -> Refusal | None:
        pem = kong.client.tls.get_full_client_certificate_chain()
        inputs.chain(pem)
        decision = self.authenticator.authenticate(pem, lambda ref: kong.client.load_consumer(ref, True))
        inputs.holds_for(verdict_ttl(decision, self.verdict_cache_ttl, self.authenticator.consumers.left))
        if decision.client_verify is not None:
            kong.client.tls.set_client_verify(decision.client_verify)
        if not decision.allowed:
            reason = decision.reason.value if decision.reason else "UNKNOWN"
            return Refusal(decision.status, decision.message, reason, decision.detail)
        publish(kong, CLIENT_CERT_AUTH, decision)
        return None


def verdict_ttl(decision: Decision, cache_ttl: float, left: Callable[[float | None], float]) -> float:
    """How long a decision holds for the same presented chain: `verdict_cache_ttl`, no longer than
    the consumer row it carries is still cached (`left(decision.consumer_until)`, the consumer
    cache's `left`), nor than the path is valid; not at all when the client sent certificates
    outside the verified path."""
    ttl = cache_ttl
    if decision.consumer is not None:
        ttl = min(ttl, left(decision.consumer_until))
    if decision.chain is not None:
        ttl = min(ttl, decision.chain.valid_until - time.time())
        if set(decision.chain.presented) - set(decision.chain.path):
            return 0.0  # padded with certificates of no use: each padding would be an entry of its own
    return ttl


def publish(kong: Any, plugin: str, decision: Decision, removed: Sequence[str] = ()) -> None:
    """Publish a pass of `plugin` (client-cert-auth or header-cert-auth): report-only line, consumer,
    groups, the upstream headers (with `removed` headers gone in every spelling) and, last, the mark."""
    if decision.via is Via.REPORT_ONLY and decision.reason is not None:
        pdk_log(kong, plugin, "warn", log_line(plugin, "report-only", reason=decision.reason.value,
                                               detail=decision.detail))
    if decision.consumer is not None:
        kong.client.authenticate(dict(decision.consumer),
                                 dict(decision.credential) if decision.credential else None)
    if decision.groups:
        kong.ctx.shared.set(SHARED_AUTHENTICATED_GROUPS, list(decision.groups))
    # A removed header that is also set (in another case) is set: one table entry per header name.
    setting = {name.lower() for name in decision.headers}
    headers: dict[str, Any] = {name: [] for name in removed if name.lower() not in setting}
    headers.update(decision.headers)
    kong.service.request.set_headers(with_every_spelling(headers))
    # Last: the guard proxies on this mark, and Kong goes on if the plugin server fails between
    # two calls; set earlier, a failed set_headers would let client-sent identity headers through.
    kong.ctx.shared.set(shared_mark(plugin), dict(decision.mark or {}))


def main(argv: Sequence[str] | None = None) -> int:
    return serve(CLIENT_CERT_AUTH, Plugin, Schema, argv)


if __name__ == "__main__":
    sys.exit(main())
