"""`kong-mtls check`: decide offline what client-cert-auth or header-cert-auth would do with a
certificate chain, given as PEM or as the header value an edge forwards.

The plugin config is compiled exactly as the plugin server compiles it (`compile_config` of
`kong_mtls.kong.client_cert_auth` or `kong_mtls.kong.header_cert_auth`) and the chain goes through
the same `Authenticator`; a header value is decoded by the same `ForwardedSource`, in the config's
format (header-cert-auth) or the one `--format` names. What proves the edge (its address, its
certificate) is not checked offline. Kong's consumers are taken from a JSON file instead of Kong's
database (looked up like `kong.client.load_consumer(ref, true)`: by id, then by username).

Exit codes: 0 the request would reach the upstream (including anonymous and report_only passes);
1 it would be refused; 2 bad arguments or an invalid config.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import uuid
from collections.abc import Mapping
from typing import Any

from kong_mtls.cli import CommandError
from kong_mtls.constants import CLIENT_CERT_AUTH, HEADER_CERT_AUTH
from kong_mtls.core.chain import describe
from kong_mtls.core.forwarded import FORWARDED_FORMATS, ForwardedFormat, ForwardedSource
from kong_mtls.core.identity import Decision, Via
from kong_mtls.files import FileReadError, read_limited
from kong_mtls.schema import ConfigError

COMMAND = "check"
EXIT_REFUSED = 1
MAX_FILE_BYTES = 16 * 1024 * 1024


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        COMMAND, help="check a client certificate chain against a client-cert-auth or header-cert-auth "
                      "config, offline",
        description="Verify a client certificate (or chain), as PEM or as the header value an edge "
                    "forwards, against a client-cert-auth or header-cert-auth plugin config as the "
                    "plugin would, and print the decision, the reason code, the consumer and groups "
                    "it maps to and the headers sent upstream. The edge itself (its address or "
                    "certificate, header-cert-auth) is not checked offline.",
        epilog="exit codes: 0 the request would pass (also anonymous and report_only passes); "
               f"{EXIT_REFUSED} it would be refused; 2 bad arguments or an invalid config")
    parser.add_argument("--config", required=True, metavar="FILE",
                        help="plugin config as JSON: the config object, or a plugin entity "
                             '{"name": "client-cert-auth", "config": {...}} as the Admin API returns it')
    parser.add_argument("--plugin", choices=(CLIENT_CERT_AUTH, HEADER_CERT_AUTH),
                        help="which plugin a bare config object is for (a plugin entity names its own; "
                             f"default {CLIENT_CERT_AUTH})")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--chain", metavar="FILE",
                        help="PEM file: the client certificate, then the intermediates it sends "
                             "('-' = stdin)")
    source.add_argument("--header-value", metavar="FILE",
                        help="file holding the certificate header's value as the edge sends it (one "
                             "line; '-' = stdin), decoded in the header-cert-auth config's format or "
                             "--format")
    parser.add_argument("--chain-header-value", metavar="FILE",
                        help="with --header-value in the rfc9440 format: the Client-Cert-Chain value")
    parser.add_argument("--format", choices=FORWARDED_FORMATS,
                        help="the --header-value format (required with a client-cert-auth config)")
    parser.add_argument("--consumers", metavar="FILE",
                        help='JSON list of Kong consumers [{"id", "username", "custom_id"}] (or '
                             '{"consumers": [...]}); without it no consumer exists')
    parser.add_argument("--at", metavar="TIME",
                        help="check at this ISO 8601 time instead of now (e.g. 2029-10-01T00:00:00Z)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # The plugins' own config compilers (imported here: they load kong-pdk, which other commands skip).
    from kong_mtls.kong import client_cert_auth, header_cert_auth

    moment = _parse_time(args.at) if args.at else None
    plugin, config = _plugin_config(_read_json(args.config, "--config"), args.plugin)
    consumers = _consumers(_read_json(args.consumers, "--consumers")) if args.consumers else []
    clock = {"clock": lambda: moment} if moment is not None else {}
    try:
        if plugin == HEADER_CERT_AUTH:
            forwarded = header_cert_auth.compile_config(config, **clock)
            authenticator, source, warnings = (forwarded.authenticator.authenticator,
                                               forwarded.authenticator.source, forwarded.warnings)
        else:
            direct = client_cert_auth.compile_config(config, **clock)
            authenticator, source, warnings = direct.authenticator, None, direct.warnings
    except ConfigError as exc:
        raise CommandError(f"{args.config}: {exc}") from None
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    lookup = _Lookup(consumers)
    if args.header_value is None:
        if args.chain_header_value or args.format:
            raise CommandError("--chain-header-value and --format go with --header-value")
        decision = authenticator.authenticate(_read(args.chain, "--chain"), lookup)
    else:
        source = _forwarded_source(source, args)
        read = source.read(_header_lines(args, source))
        decision = (authenticator.authenticate(read.pem, lookup) if read.reason is None
                    else authenticator.refuse(read.reason, read.detail, lookup))
    if args.json:
        print(json.dumps(_as_json(decision), indent=2))
    else:
        print(_as_text(decision))
    return 0 if decision.allowed else EXIT_REFUSED


# -- inputs ------------------------------------------------------------------------------------------

def _read(path: str, option: str) -> bytes:
    if path != "-":
        try:
            return read_limited(path, MAX_FILE_BYTES)
        except FileReadError as exc:
            raise CommandError(f"{option} {path}: {exc}") from None
    data = sys.stdin.buffer.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise CommandError(f"{option} -: larger than {MAX_FILE_BYTES} bytes")
    return data


def _read_json(path: str, option: str) -> Any:
    try:
        return json.loads(_read(path, option))
    except ValueError as exc:
        raise CommandError(f"{option} {path}: not valid JSON ({exc}); YAML is not read, convert it "
                           "to JSON first") from None


def _plugin_config(document: Any, plugin: str | None) -> tuple[str, Mapping[str, Any]]:
    """(plugin name, config) of a config object or plugin entity."""
    if not isinstance(document, Mapping):
        raise CommandError("--config: expected a JSON object")
    if "config" in document and isinstance(document.get("config"), Mapping):
        name = document.get("name", plugin or CLIENT_CERT_AUTH)
        if name not in (CLIENT_CERT_AUTH, HEADER_CERT_AUTH) or (plugin and name != plugin):
            raise CommandError(f"--config: this is a {name!r} plugin, not {plugin or CLIENT_CERT_AUTH}")
        return name, document["config"]
    return plugin or CLIENT_CERT_AUTH, document


def _forwarded_source(configured: ForwardedSource | None, args: argparse.Namespace) -> ForwardedSource:
    """The config's source (header-cert-auth), or one in the --format given; never a guess."""
    if configured is None:
        if args.format is None:
            raise CommandError(f"--header-value with a {CLIENT_CERT_AUTH} config needs --format")
        configured = ForwardedSource(header="certificate", format=ForwardedFormat(args.format))
    elif args.format is not None and args.format != configured.format.value:
        raise CommandError(f"--format {args.format}: the config's certificate_header_format is "
                           f"{configured.format.value}")
    if args.chain_header_value is not None:
        if configured.format is not ForwardedFormat.RFC9440:
            raise CommandError("--chain-header-value: only the rfc9440 format has a chain header")
        return ForwardedSource(header=configured.header, format=configured.format,
                               chain_header=configured.chain_header or "X-Kong-Mtls-Check-Chain")
    return configured


def _header_lines(args: argparse.Namespace, source: ForwardedSource) -> dict[str, str]:
    """The header values as `get_headers` would give them: one line each, final newline dropped."""
    values = [("--header-value", source.header, args.header_value),
              ("--chain-header-value", source.chain_header, args.chain_header_value)]
    out = {}
    for option, header, path in values:
        if path is None or header is None:
            continue
        try:
            text = _read(path, option).decode("ascii")
        except UnicodeDecodeError:
            raise CommandError(f"{option} {path}: not ASCII (header values are)") from None
        text = text.removesuffix("\n").removesuffix("\r")
        if "\n" in text or "\r" in text:
            raise CommandError(f"{option} {path}: more than one line")
        out[header.lower()] = text
    return out


def _consumers(document: Any) -> list[dict[str, Any]]:
    rows = document.get("consumers") if isinstance(document, Mapping) else document
    if not isinstance(rows, list):
        raise CommandError('--consumers: expected a JSON list of consumers or {"consumers": [...]}')
    out = []
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, Mapping) or not (isinstance(row.get("id"), str) or
                                                isinstance(row.get("username"), str)):
            raise CommandError(f"--consumers: entry {i} needs an id or a username")
        consumer = {k: row[k] for k in ("id", "username", "custom_id") if isinstance(row.get(k), str)}
        # Like Kong's declarative config, a consumer without an id gets a stable one.
        consumer.setdefault("id", str(uuid.uuid5(uuid.NAMESPACE_DNS, f"consumer:{consumer['username']}")))
        out.append(consumer)
    return out


def _parse_time(text: str) -> float:
    try:
        moment = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise CommandError(f"--at {text!r}: expected an ISO 8601 time such as 2029-10-01T00:00:00Z") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return moment.timestamp()


class _Lookup:
    """`kong.client.load_consumer(ref, true)` over the consumers file: by id, then by username."""

    def __init__(self, consumers: list[dict[str, Any]]) -> None:
        self.consumers = consumers

    def __call__(self, ref: str) -> dict[str, Any] | None:
        for row in self.consumers:
            if row["id"] == ref:
                return dict(row)
        return next((dict(row) for row in self.consumers if row.get("username") == ref), None)


# -- output --------------------------------------------------------------------------------------------

def _verdict(decision: Decision) -> str:
    if not decision.allowed:
        return "REFUSED"
    if decision.via is Via.REPORT_ONLY:
        return "ALLOWED (report_only: would be refused)"
    if decision.via is Via.ANONYMOUS:
        return "ALLOWED as the anonymous consumer"
    return f"ALLOWED via {decision.via.value if decision.via else '?'}"


def _as_json(decision: Decision) -> dict[str, Any]:
    consumer = dict(decision.consumer) if decision.consumer is not None else None
    return {
        "allowed": decision.allowed,
        "decision": _verdict(decision),
        "via": decision.via.value if decision.via else None,
        "status": decision.status if not decision.allowed else None,
        "message": decision.message or None,
        "reason": decision.reason.value if decision.reason else None,
        "detail": decision.detail or None,
        "verified": decision.verified,
        "certificate": decision.mark if decision.mark else None,
        "path": [describe(c) for c in decision.chain.path] if decision.chain else [],
        "consumer": consumer,
        "credential_id": decision.credential["id"] if decision.credential else None,
        "groups": list(decision.groups),
        "headers": {k: v for k, v in decision.headers.items() if v != []},
    }


def _as_text(decision: Decision) -> str:
    lines = [f"decision:    {_verdict(decision)}"]
    if not decision.allowed:
        lines.append(f"response:    {decision.status} {json.dumps({'message': decision.message})}")
    if decision.reason is not None:
        lines.append(f"reason:      {decision.reason.value}")
    if decision.detail:
        lines.append(f"detail:      {decision.detail}")
    if decision.chain is not None:
        lines.append("path:        " + "\n             ".join(describe(c) for c in decision.chain.path))
    if decision.identity is not None:
        identity = decision.identity
        lines.append(f"spki_sha256: {identity.spki_sha256}")
        if identity.spiffe is not None:
            lines.append(f"spiffe:      {identity.spiffe}")
    if decision.consumer is not None:
        consumer = decision.consumer
        extra = ", ".join(f"{k} {consumer[k]}" for k in ("id", "custom_id") if consumer.get(k))
        lines.append(f"consumer:    {consumer.get('username') or consumer.get('id')} ({extra})")
    if decision.credential is not None:
        lines.append(f"credential:  {decision.credential['id']}")
    lines.append(f"groups:      {', '.join(decision.groups) if decision.groups else '(none)'}")
    headers = [f"{k}: {v}" for k, v in decision.headers.items() if v != []]
    if headers:
        lines.append("upstream:    " + "\n             ".join(headers))
    return "\n".join(lines)
