"""Kong adapter for the ip-allowlist plugin: allow/deny by IP, checking an explicit address.

Everything is compiled once in `Plugin.__init__` (one `Policy` per plugin instance); a request costs
one PDK read (`peer`) or two (`forwarded`; `header`, which reads every header line with
`get_headers`, because Kongs before 3.9 give `get_header` only the first line of a repeated
header), then on a pass one `kong.ctx.shared.set`
and, when `client_ip_header` is configured, one `kong.service.request.set_headers`.
Semantics are documented in docs/ip-allowlist.md; the decision logic is kong_mtls.core.addresses.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from kong_mtls import schema
from kong_mtls.constants import IP_ALLOWLIST, shared_mark
from kong_mtls.core.addresses import (
    MAX_HEADER_LINES,
    AddressError,
    AddressSet,
    IPNetwork,
    Policy,
    Source,
    parse_network,
    whole_header_map,
)
from kong_mtls.core.headers import header_name_problem, with_every_spelling
from kong_mtls.kong.runtime import Refusal, VerdictInputs, phase
from kong_mtls.kong.server import serve
from kong_mtls.presets import CIDR_PRESET_NAMES, PresetError, load_cidr_preset, width_problem
from kong_mtls.schema import ConfigError

#: The nginx variable holding the TCP peer before any real-IP rewrite.
PEER_VARIABLE = "realip_remote_addr"
#: The nginx variable `kong.client.get_forwarded_ip()` returns (after Kong's real-IP rewrite).
FORWARDED_VARIABLE = "remote_addr"
MARK = shared_mark(IP_ALLOWLIST)

Schema = [
    schema.strings("allow"),
    schema.strings("deny"),
    schema.strings("allow_presets", one_of=CIDR_PRESET_NAMES),
    schema.strings("deny_presets", one_of=CIDR_PRESET_NAMES),
    schema.string("source", default=Source.PEER.value, one_of=[s.value for s in Source]),
    schema.string("header_name", len_min=1),
    schema.strings("trusted_proxies"),
    schema.strings("trusted_proxies_presets", one_of=CIDR_PRESET_NAMES),
    schema.integer("forwarded_for_hops", default=1, between=(1, 32)),
    schema.boolean("require_trusted_peer", default=True),
    schema.integer("status", default=403, between=(400, 599)),
    schema.string("message", len_min=1),
    schema.string("client_ip_header", len_min=1),
    schema.string_map("preset_files"),
    schema.verdict_cache_ttl(),
]


class Plugin:
    def __init__(self, config: Mapping[str, Any]) -> None:
        conf = schema.validate(Schema, config)
        for name in ("header_name", "client_ip_header"):
            problem = header_name_problem(conf[name]) if conf[name] is not None else None
            if problem:
                raise ConfigError(name, problem)
        if (conf["header_name"] or "").lower() == "forwarded":
            raise ConfigError("header_name", "the RFC 7239 Forwarded header is not supported; "
                                             "use X-Forwarded-For")
        presets = Presets(conf["preset_files"] or {})
        self.policy = Policy(
            source=Source(conf["source"]),
            allow=address_set(conf, "allow", presets),
            deny=address_set(conf, "deny", presets),
            trusted_proxies=address_set(conf, "trusted_proxies", presets),
            header_name=conf["header_name"],
            forwarded_for_hops=conf["forwarded_for_hops"],
            require_trusted_peer=conf["require_trusted_peer"],
        )
        self.status: int = conf["status"]
        self.message: str | None = conf["message"]
        self.client_ip_header: str | None = conf["client_ip_header"]
        self.verdict_cache_ttl: int = conf["verdict_cache_ttl"]
        #: `header_name` as Kong's header map spells it.
        self.header_input = (conf["header_name"] or "").lower()

    @phase(IP_ALLOWLIST, verdicts=True)
    def access(self, kong: Any, inputs: VerdictInputs) -> Refusal | None:
        policy = self.policy
        peer = kong.nginx.get_var(PEER_VARIABLE)
        inputs.var(PEER_VARIABLE, peer)
        if policy.source is Source.HEADER:
            headers = whole_header_map(kong.request.get_headers(MAX_HEADER_LINES))
            decision = policy.decide_whole(peer, headers)
            if headers is not None:  # else refused, and never cached: the lines were not all read
                inputs.header(self.header_input, headers.get(self.header_input))
                inputs.holds_for(self.verdict_cache_ttl)
        elif policy.source is Source.FORWARDED:
            forwarded = kong.client.get_forwarded_ip()
            inputs.var(FORWARDED_VARIABLE, forwarded)
            decision = policy.decide(peer, forwarded=forwarded)
            inputs.holds_for(self.verdict_cache_ttl)
        else:
            decision = policy.decide(peer)
            inputs.holds_for(self.verdict_cache_ttl)
        if not decision.allowed:
            return Refusal(self.status, decision.message(self.message), decision.reason.value,
                           decision.detail)
        if self.client_ip_header:
            # Replaces every client-sent copy of the header.
            kong.service.request.set_headers(with_every_spelling({self.client_ip_header: decision.client_ip}))
        kong.ctx.shared.set(MARK, decision.shared_mark())
        return None


class Presets:
    """Preset CIDRs for one config, each read once; `preset_files` overrides the shipped lists."""

    def __init__(self, files: Mapping[str, str]) -> None:
        for name in files:
            if name not in CIDR_PRESET_NAMES:
                raise ConfigError(f"preset_files.{name}",
                                  f"unknown preset; known: {', '.join(CIDR_PRESET_NAMES)}")
        self.files = dict(files)
        self.loaded: dict[str, tuple[str, ...]] = {}
        for name in self.files:
            self.get(name, f"preset_files.{name}")

    def get(self, name: str, field: str) -> tuple[str, ...]:
        if name not in self.loaded:
            override = self.files.get(name)
            try:
                self.loaded[name] = load_cidr_preset(name, override)
            except PresetError as exc:
                raise ConfigError(f"preset_files.{name}" if override else field, str(exc)) from None
        return self.loaded[name]


#: Trusted proxies together: at most this many of the widest ranges (room for the private ranges,
#: loopback and Cloudflare's, not for "everyone").
MAX_TRUSTED_PROXY_RANGES = 4


def address_set(conf: Mapping[str, Any], field: str, presets: Presets) -> AddressSet:
    """The CIDRs of `field` and `<field>_presets`. Trusted proxies are held to the presets' width
    limit: a wider range would make every peer in it a proxy whose headers are believed."""
    networks = _networks(field, conf[field] or ())
    if field == "trusted_proxies":
        for i, network in enumerate(networks, start=1):
            problem = width_problem([network])
            if problem:
                raise ConfigError(f"{field}[{i}]", f"{problem}: every peer in it would be a trusted proxy")
        problem = width_problem(networks, ranges=MAX_TRUSTED_PROXY_RANGES)
        if problem:
            raise ConfigError(field, f"{problem}: every peer in them would be a trusted proxy")
    for i, name in enumerate(conf[f"{field}_presets"] or (), start=1):
        networks.extend(_networks(f"{field}_presets[{i}]", presets.get(name, f"{field}_presets[{i}]")))
    return AddressSet(networks)


def _networks(field: str, items: Sequence[str]) -> list[IPNetwork]:
    networks = []
    for i, text in enumerate(items, start=1):
        try:
            networks.append(parse_network(text))
        except AddressError as exc:
            raise ConfigError(f"{field}[{i}]", str(exc)) from None
    return networks


def main(argv: Sequence[str] | None = None) -> int:
    return serve(IP_ALLOWLIST, Plugin, Schema, argv)


if __name__ == "__main__":
    sys.exit(main())
