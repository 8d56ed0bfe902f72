"""`kong-mtls check`: decide offline what client-cert-auth would do with a certificate chain.

The plugin config is compiled exactly as the plugin server compiles it
(`kong_mtls.kong.client_cert_auth.compile_config`) and the chain goes through the same
`Authenticator`; Kong's consumers are taken from a JSON file instead of Kong's database (looked up
like `kong.client.load_consumer(ref, true)`: by id, then by username).

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
from kong_mtls.constants import CLIENT_CERT_AUTH
from kong_mtls.core.chain import describe
from kong_mtls.core.identity import Decision, Via
from kong_mtls.files import FileReadError, read_limited
from kong_mtls.schema import ConfigError

COMMAND = "check"
EXIT_REFUSED = 1
MAX_FILE_BYTES = 16 * 1024 * 1024


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        COMMAND, help="check a client certificate chain against a client-cert-auth config, offline",
        description="Verify a client certificate (or chain) against a client-cert-auth plugin config "
                    "as the plugin would, and print the decision, the reason code, the consumer and "
                    "groups it maps to and the headers sent upstream.",
        epilog="exit codes: 0 the request would pass (also anonymous and report_only passes); "
               f"{EXIT_REFUSED} it would be refused; 2 bad arguments or an invalid config")
    parser.add_argument("--config", required=True, metavar="FILE",
                        help="plugin config as JSON: the config object, or a plugin entity "
                             '{"name": "client-cert-auth", "config": {...}} as the Admin API returns it')
    parser.add_argument("--chain", required=True, metavar="FILE",
                        help="PEM file: the client certificate, then the intermediates it sends "
                             "('-' = stdin)")
    parser.add_argument("--consumers", metavar="FILE",
                        help='JSON list of Kong consumers [{"id", "username", "custom_id"}] (or '
                             '{"consumers": [...]}); without it no consumer exists')
    parser.add_argument("--at", metavar="TIME",
                        help="check at this ISO 8601 time instead of now (e.g. 2029-10-01T00:00:00Z)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # The plugin's own config compiler (imported here: it loads kong-pdk, which other commands skip).
    from kong_mtls.kong.client_cert_auth import compile_config

    moment = _parse_time(args.at) if args.at else None
    config = _plugin_config(_read_json(args.config, "--config"))
    consumers = _consumers(_read_json(args.consumers, "--consumers")) if args.consumers else []
    chain = _read(args.chain, "--chain")
    try:
        compiled = compile_config(config, **({"clock": lambda: moment} if moment is not None else {}))
    except ConfigError as exc:
        raise CommandError(f"{args.config}: {exc}") from None
    for warning in compiled.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    decision = compiled.authenticator.authenticate(chain, _Lookup(consumers))
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


def _plugin_config(document: Any) -> Mapping[str, Any]:
    if not isinstance(document, Mapping):
        raise CommandError("--config: expected a JSON object")
    if "config" in document and isinstance(document.get("config"), Mapping):
        name = document.get("name", CLIENT_CERT_AUTH)
        if name != CLIENT_CERT_AUTH:
            raise CommandError(f"--config: this is a {name!r} plugin, not {CLIENT_CERT_AUTH}")
        return document["config"]
    return document


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
