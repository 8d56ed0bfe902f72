"""`kong-mtls dev-pki`: create a development PKI (CAs, Kong's server and client certs, clients)."""

from __future__ import annotations

import argparse
import json
import os

from kong_mtls.cli import CommandError
from kong_mtls.devpki import write_dev_pki


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dev-pki", help="create a development PKI (never for production)",
        description="Create a root and issuing CA, Kong's server certificates, Kong's client certificate for "
                    "upstreams, client certificates (alice, bob, and one from an unrelated CA), a stand-in "
                    "for Cloudflare's Authenticated Origin Pulls CA, and upstream server certificates. "
                    "Existing files are kept unless --force.")
    parser.add_argument("out_dir", help="directory to write into (created if missing)")
    parser.add_argument("--kong-host", action="append", dest="kong_hosts",
                        help="host name for Kong's server certificate (repeatable; default: localhost, kong, "
                             "api.example.test)")
    parser.add_argument("--force", action="store_true", help="replace an existing PKI")
    parser.add_argument("--json", action="store_true", help="print the file map as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    existed = os.path.exists(os.path.join(args.out_dir, "ca", "root.pem"))
    try:
        kwargs = {"kong_hosts": args.kong_hosts} if args.kong_hosts else {}
        paths = write_dev_pki(args.out_dir, force=args.force, **kwargs)
    except OSError as exc:
        raise CommandError(f"cannot write {args.out_dir}: {exc.strerror}") from exc
    if args.json:
        print(json.dumps(paths, indent=2))
    else:
        state = "kept existing" if existed and not args.force else "created"
        print(f"{state} development PKI in {args.out_dir}")
        for name, path in paths.items():
            print(f"  {name:22} {path}")
    return 0
