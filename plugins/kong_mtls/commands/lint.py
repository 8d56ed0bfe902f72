"""`kong-mtls lint`: check a Kong configuration offline for the mistakes that open or break a
deployment of these plugins (rules: docs/lint.md).

Exit codes: 0 no errors (warnings may be printed); 1 at least one error; 2 unusable input.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from kong_mtls.cli import CommandError
from kong_mtls.lint.model import InputError, KongConfig, normalise
from kong_mtls.lint.rules import RULE_IDS, Context, Finding, Severity, lint
from kong_mtls.lint.sources import (
    AdminAPI,
    SourceError,
    parse_headers,
    read_admin,
    read_declarative,
    read_kong_conf,
)

COMMAND = "lint"
EXIT_ERRORS = 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        COMMAND, help="check a kong.yml or a running Kong's configuration for deployment mistakes",
        description="Check a declarative config (kong.yml, format 1.1/2.1/3.0, YAML or JSON) or the "
                    "configuration of a running Kong (--admin) for the mistakes that open or break a "
                    "deployment of the kong-mtls plugins: routes without the fail-closed guard, "
                    "client-cert-auth over plain HTTP, shared upstream connection pools, API keys in "
                    "logged URLs, expiring trust anchors, configs the plugins would refuse, ... "
                    "(docs/lint.md).",
        epilog=f"exit codes: 0 no errors; {EXIT_ERRORS} errors found; 2 unusable input. A finding is "
               "silenced by the tag kong-mtls-lint-allow:<rule> on the entity it names (or on the "
               f"route or service a plugin belongs to). Rules: {', '.join(RULE_IDS)}")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("config", nargs="?", metavar="KONG_YML", help="declarative config file")
    source.add_argument("--admin", metavar="URL",
                        help="a running Kong's Admin API, e.g. http://localhost:8001 (GET /config when "
                             "DB-less, else the entity endpoints)")
    parser.add_argument("--admin-header", action="append", default=[], metavar="'NAME: VALUE'",
                        help="a header sent with every Admin API request (repeatable)")
    parser.add_argument("--kong-conf", metavar="PATH",
                        help="Kong's kong.conf, for the rules that depend on it (option A, access log)")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kong_mtls.lint.plugin_checks import check_plugin  # loads the plugins (and kong-pdk)

    config = load(args)
    try:
        kong_conf = read_kong_conf(args.kong_conf) if args.kong_conf else None
    except SourceError as exc:
        raise CommandError(str(exc)) from None
    findings = lint(Context(config, kong_conf, check_plugin, time.time()))
    reported = [f for f in findings if not f.allowed]
    allowed = [f for f in findings if f.allowed]
    print(json.dumps(as_json(reported, allowed), indent=2) if args.json else as_text(reported, allowed))
    return EXIT_ERRORS if any(f.severity is Severity.ERROR for f in reported) else 0


def load(args: argparse.Namespace) -> KongConfig:
    """The configuration named on the command line; CommandError (exit 2) when unusable."""
    try:
        if args.admin:
            document = read_admin(AdminAPI(args.admin, parse_headers(args.admin_header)))
            where = args.admin
        else:
            document = read_declarative(args.config)
            where = args.config
        try:
            return normalise(document)
        except InputError as exc:
            raise CommandError(f"{where}: {exc}") from None
    except SourceError as exc:
        raise CommandError(str(exc)) from None


def _finding_json(finding: Finding) -> dict[str, Any]:
    return {"severity": finding.severity.value, "rule": finding.rule, "path": finding.path,
            "message": finding.message, "fix": finding.fix}


def _summary(reported: list[Finding], allowed: list[Finding]) -> dict[str, int]:
    return {"errors": sum(f.severity is Severity.ERROR for f in reported),
            "warnings": sum(f.severity is Severity.WARNING for f in reported),
            "allowed": len(allowed)}


def as_json(reported: list[Finding], allowed: list[Finding]) -> dict[str, Any]:
    return {"findings": [_finding_json(f) for f in reported],
            "allowed": [_finding_json(f) for f in allowed],
            "summary": _summary(reported, allowed)}


def as_text(reported: list[Finding], allowed: list[Finding]) -> str:
    lines = []
    for finding in reported:
        lines.append(f"{finding.severity.value}: {finding.rule}: {finding.path}")
        lines.append(f"  {finding.message}")
        lines.append(f"  fix: {finding.fix}")
    counts = _summary(reported, allowed)
    summary = f"{counts['errors']} error(s), {counts['warnings']} warning(s)"
    if allowed:
        summary += f"; {len(allowed)} allowed by tags ({', '.join(sorted({f.rule for f in allowed}))})"
    lines.append(summary if reported or allowed else "no findings")
    return "\n".join(lines)
