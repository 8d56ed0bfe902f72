"""`kong-mtls upstream-check host:port`: the upstream-identity plugin's check, once, from a shell.

It connects as the plugin's probe does (same trust store, same client certificate, same expected
identity), prints what the upstream presented — subject, issuer, SANs, SPKI SHA-256, validity, TLS
version — and the verdict with its reason code.

Exit codes: 0 the identity is verified; 1 it does not match or could not be established (or
`--insecure`: nothing was verified); 2 bad arguments or unreadable files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import Any

from kong_mtls.cli import CommandError
from kong_mtls.core.upstream import (
    DEFAULT_TIMEOUT,
    DEFAULT_WARNING_DAYS,
    CertSummary,
    Observation,
    ProbeSettings,
    Target,
    UpstreamPolicy,
    Verdict,
    evaluate,
    parse_target,
    probe,
)
from kong_mtls.kong.runtime import printable
from kong_mtls.schema import ConfigError

COMMAND = "upstream-check"
EXIT_OK = 0
EXIT_REFUSED = 1

#: Policy keyword -> the option that sets it, for error messages.
OPTION_NAMES = {
    "trusted_ca_pem": "--ca",
    "trusted_ca_files": "--ca",
    "client_cert_file": "--cert",
    "client_key_file": "--key",
    "expected_dns_names": "--expect-san",
    "expected_uris": "--expect-uri",
    "spki_sha256_pins": "--expect-spki",
    "timeout": "--timeout",
    "expiry_warning_days": "--warn-days",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        COMMAND, help="check an upstream's TLS identity once, as the upstream-identity plugin does",
        description="Connect to host:port with a real TLS handshake (presenting --cert/--key when "
                    "given), verify the chain against --ca, check the expected SAN DNS names, SAN "
                    "URIs / SPIFFE IDs and SPKI pins, and print what the upstream presented.",
        epilog="exit codes: 0 identity verified; 1 mismatch, refused or unreachable (and always with "
               "--insecure); 2 bad arguments or unreadable files")
    parser.add_argument("target", metavar="host:port", help="the upstream ([ipv6]:port for IPv6; "
                                                            "port 443 when omitted)")
    parser.add_argument("--ca", action="append", default=[], metavar="FILE",
                        help="trusted CA certificates (PEM); repeatable")
    parser.add_argument("--cert", metavar="FILE", help="client certificate (PEM, leaf first) to present")
    parser.add_argument("--key", metavar="FILE", help="its private key (PEM, unencrypted)")
    parser.add_argument("--expect-san", action="append", default=[], metavar="DNS",
                        help="a DNS name the certificate's SAN must carry; repeatable, any may match")
    parser.add_argument("--expect-uri", "--expect-spiffe", dest="expect_uri", action="append", default=[],
                        metavar="URI", help="a SAN URI (e.g. a SPIFFE ID) the certificate must carry; "
                                            "repeatable, any may match")
    parser.add_argument("--expect-spki", action="append", default=[], metavar="PIN",
                        help="SHA-256 of the SubjectPublicKeyInfo, base64 or hex; repeatable, any may match")
    parser.add_argument("--sni", metavar="NAME",
                        help="server name to send and verify (default: the host)")
    parser.add_argument("--no-verify-hostname", action="store_true",
                        help="do not check the certificate against the server name")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds for connect + handshake (default: %(default)s)")
    parser.add_argument("--warn-days", type=int, default=DEFAULT_WARNING_DAYS,
                        help="warn when a certificate expires within this many days (default: %(default)s)")
    parser.add_argument("--insecure", action="store_true",
                        help="verify nothing, only show what the upstream presents (exit code 1)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        target = parse_target(args.target, default_port=443)
        target = Target(target.host, target.port, args.sni)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    if args.insecure:
        if args.ca or args.expect_san or args.expect_uri or args.expect_spki:
            raise CommandError("--insecure verifies nothing; drop it, or drop --ca/--expect-*")
        settings = _insecure_settings(args)
        observation = probe(target, settings)
        _print(args, observation, None)
        return EXIT_REFUSED
    try:
        policy = UpstreamPolicy.build(
            trusted_ca_files=args.ca, client_cert_file=args.cert, client_key_file=args.key,
            expected_dns_names=args.expect_san, expected_uris=args.expect_uri,
            spki_sha256_pins=args.expect_spki, verify_hostname=not args.no_verify_hostname,
            timeout=args.timeout, expiry_warning_days=args.warn_days, field_names=OPTION_NAMES)
    except ConfigError as exc:
        raise CommandError(f"{exc.field}: {exc.problem}") from None
    verdict = evaluate(probe(target, policy.settings), policy)
    _print(args, verdict.observation, verdict)
    return EXIT_OK if verdict.ok else EXIT_REFUSED


def _insecure_settings(args: argparse.Namespace) -> ProbeSettings:
    try:
        policy = UpstreamPolicy.build(client_cert_file=args.cert, client_key_file=args.key,
                                      timeout=args.timeout, field_names=OPTION_NAMES,
                                      allow_unverified=True)
    except ConfigError as exc:
        raise CommandError(f"{exc.field}: {exc.problem}") from None
    return policy.settings


def _print(args: argparse.Namespace, observation: Observation, verdict: Verdict | None) -> None:
    if args.json:
        json.dump(_as_json(observation, verdict), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    now = dt.datetime.now(dt.timezone.utc)
    target = observation.target
    rows: list[tuple[str, str]] = [("target", f"{target} (server name {target.name})")]
    if observation.tls_version:
        rows.append(("tls", f"{observation.tls_version} {observation.cipher or ''}".strip()))
    cert = observation.certificate
    if cert is not None:
        rows += _cert_rows(cert, now)
        rows.append(("chain", _chain_status(args, observation)))
    else:
        rows.append(("certificate", "none seen"))
    client = observation.client_certificate
    rows.append(("client cert", f"{client.subject} (expires {client.not_after.isoformat()})"
                 if client else "none presented"))
    if verdict is None:
        rows.append(("verdict", "NOT VERIFIED (--insecure)"))
        if observation.failure is not None:
            rows.append(("error", f"{observation.failure.value}: {observation.detail}"))
    else:
        for notice in verdict.notices:
            rows.append(("warning", f"{notice.notice.value}: {notice.describe(now)}"))
        outcome = "OK" if verdict.ok else "REFUSED"
        rows.append(("verdict", f"{outcome} ({verdict.reason.value})"
                     + (f": {verdict.detail}" if verdict.detail else "")))
        if verdict.alarm:
            rows.append(("alarm", "the upstream presented another identity than the expected one "
                                  "(the plugin logs this at err and counts it)"))
    width = max(len(label) for label, _ in rows) + 1
    for label, value in rows:
        print(f"{label + ':':<{width}} {printable(value)}")



def _chain_status(args: argparse.Namespace, observation: Observation) -> str:
    if observation.chain_verified:
        return "verified against the trusted CAs (OpenSSL and the web-PKI policy)"
    if args.insecure:
        return "NOT verified (--insecure)"
    if not args.ca:
        return "NOT verified (no --ca: the identity rests on --expect-spki)"
    return "verification failed (see the verdict)"


def _cert_rows(cert: CertSummary, now: dt.datetime) -> list[tuple[str, str]]:
    left = (cert.not_after - now).days
    validity = f"{cert.not_before.isoformat()} .. {cert.not_after.isoformat()}"
    validity += f" (expired {-left} days ago)" if cert.not_after < now else f" ({left} days left)"
    return [
        ("subject", cert.subject),
        ("issuer", cert.issuer),
        ("serial", cert.serial),
        ("validity", validity),
        ("SAN DNS", ", ".join(cert.dns_names) or "-"),
        ("SAN URI", ", ".join(cert.uris) or "-"),
        ("SAN IP", ", ".join(cert.ips) or "-"),
        ("SPKI SHA-256", f"{cert.spki_b64} (hex {cert.spki_sha256.hex()})"),
        ("SHA-256", cert.fingerprint_sha256.hex()),
    ]


def _as_json(observation: Observation, verdict: Verdict | None) -> dict[str, Any]:
    target = observation.target
    out: dict[str, Any] = {
        "target": str(target), "server_name": target.name,
        "tls_version": observation.tls_version, "cipher": observation.cipher,
        "certificate": observation.certificate.as_dict() if observation.certificate else None,
        "chain_verified": observation.chain_verified,
        "client_certificate": (observation.client_certificate.as_dict()
                               if observation.client_certificate else None),
    }
    if verdict is None:
        out.update(ok=False, reason="NOT_VERIFIED",
                   detail=f"{observation.failure.value}: {observation.detail}" if observation.failure else "")
    else:
        out.update(ok=verdict.ok, reason=verdict.reason.value, detail=verdict.detail, alarm=verdict.alarm,
                   warnings=[{"code": n.notice.value, "message": n.describe()} for n in verdict.notices])
    return out
