"""`kong-mtls api-key`: create API keys for the api-key-auth plugin, or hash existing key-auth keys.

`api-key new` prints a new random key ONCE, with the credential entry (a hash, never the key) to
paste under the plugin's `config.credentials`. `api-key hash` reads an existing key (one migrated
from Kong's key-auth) from stdin, never from the command line where it would land in the shell
history and in `ps`, and prints its entry.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from kong_mtls.cli import CommandError
from kong_mtls.core.api_keys import (
    GENERATED_ID_PREFIX,
    KEY_ID_PATTERN,
    MAX_KEY_LENGTH,
    credential_entry,
    credential_identifier,
    generate_key,
    index_secret,
    new_key_id,
    parse_rfc3339,
)
from kong_mtls.files import FileReadError, read_limited
from kong_mtls.schema import ConfigError

COMMAND = "api-key"
#: Migrated keys shorter than this get a warning: their hash can be attacked by guessing.
SHORT_KEY = 20
MIGRATED_ID_PREFIX = "ka_"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        COMMAND, help="create API keys for api-key-auth, or hash existing key-auth keys",
        description="Create API keys for the api-key-auth plugin (the key is printed once, the config "
                    "holds only its hash), or hash a key migrated from Kong's key-auth.")
    actions = parser.add_subparsers(dest="action", metavar="<action>", required=True)

    new = actions.add_parser(
        "new", help="create a random key; print it once with its credential entry",
        description="Create a random API key <id>.<secret> (256-bit secret). The key is printed once "
                    "and stored nowhere: hand it to the client. Paste the credential entry under the "
                    "plugin's config.credentials.")
    _entry_options(new, id_help="key id, the part before the dot (default: ak_ + 16 random hex digits)")
    new.set_defaults(func=run_new)

    hashed = actions.add_parser(
        "hash", help="hash an existing key read from stdin (migration from key-auth)",
        description="Read ONE existing API key from stdin (typed without echo on a terminal, or piped) "
                    "and print its credential entry, with the key_index that finds it without an id. "
                    "The key is never taken from the command line.")
    _entry_options(hashed, id_help="credential id for logs and X-Credential-Identifier, e.g. the "
                                   "key-auth credential's id (default: ka_ + 16 random hex digits)")
    hashed.add_argument("--index-secret-file", required=True, metavar="PATH",
                        help="file holding the deployment's key_index_secret (16+ characters, the same "
                             "value as the plugin's config.key_index_secret); never on the command line")
    hashed.set_defaults(func=run_hash)


def _entry_options(parser: argparse.ArgumentParser, id_help: str) -> None:
    parser.add_argument("--consumer", required=True, help="Kong consumer id or username")
    parser.add_argument("--id", dest="key_id", help=id_help)
    parser.add_argument("--expires-at", help="RFC 3339 date-time with offset, e.g. 2026-01-31T00:00:00Z")
    parser.add_argument("--allowed-cidr", action="append", dest="allowed_cidrs", default=[],
                        metavar="CIDR", help="accept the key only from this address or network "
                                             "(repeatable)")
    parser.add_argument("--client-cert", action="store_true",
                        help="require a client certificate that client-cert-auth mapped to the same "
                             "consumer")
    parser.add_argument("--client-spki-sha256", action="append", default=[], metavar="HEX",
                        help="require a verified client certificate with this SPKI SHA-256 "
                             "(repeatable)")
    parser.add_argument("--format", choices=("yaml", "json"), default="yaml",
                        help="yaml (declarative kong.yml, default) or json (Admin API, scripts)")


def run_new(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    key = generate_key(_key_id(args, GENERATED_ID_PREFIX))
    entry = _entry(args, key.key, key.key_id)
    if args.format == "json":
        out.write(json.dumps({"key": key.key, "credential": entry,
                              "credential_identifier": credential_identifier(key.key_id)}, indent=2) + "\n")
        return 0
    out.write("API key (shown only this once and stored nowhere; hand it to the client now):\n\n"
              f"    {key.key}\n\n")
    out.write(_yaml_comment(entry))
    out.write(_yaml_entry(entry))
    return 0


def run_hash(args: argparse.Namespace, stdin: TextIO | None = None, out: TextIO | None = None,
             err: TextIO | None = None) -> int:
    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    key = read_key(stdin)
    if len(key) < SHORT_KEY:
        err.write(f"warning: this key has fewer than {SHORT_KEY} characters; a short or guessable key "
                  "can be recovered from its hash by trial. Replace it with `kong-mtls api-key new` "
                  "soon.\n")
    entry = _entry(args, key, _key_id(args, MIGRATED_ID_PREFIX), secret=_index_secret(args))
    if args.format == "json":
        out.write(json.dumps({"credential": entry,
                              "credential_identifier": credential_identifier(entry["id"])}, indent=2) + "\n")
        return 0
    out.write(_yaml_comment(entry))
    out.write(_yaml_entry(entry))
    return 0


def read_key(stdin: TextIO) -> str:
    """One key from stdin: hidden input on a terminal, else the piped text minus its final newline."""
    if stdin.isatty():
        text = getpass.getpass("API key (input hidden): ")
    else:
        text = stdin.read(4 * MAX_KEY_LENGTH + 3)
        if text.endswith("\n"):
            text = text[:-1]
        if text.endswith("\r"):
            text = text[:-1]
    if not text:
        raise CommandError("no key on stdin (pipe one key, e.g. `printf '%s' \"$KEY\" | kong-mtls "
                           "api-key hash ...`)")
    if "\n" in text or "\r" in text:
        raise CommandError("stdin holds more than one line; give exactly one key")
    if text != text.strip():
        raise CommandError("the key starts or ends with whitespace, which nginx strips from header "
                           "values; check what was piped")
    if len(text.encode("utf-8", "surrogateescape")) > MAX_KEY_LENGTH:
        raise CommandError(f"the key is longer than {MAX_KEY_LENGTH} bytes")
    return text


def _key_id(args: argparse.Namespace, prefix: str) -> str:
    if args.key_id is None:
        return new_key_id(prefix)
    if not KEY_ID_PATTERN.fullmatch(args.key_id):
        raise CommandError("--id: 1 to 64 characters among A-Z a-z 0-9 _ -")
    return args.key_id


def _index_secret(args: argparse.Namespace) -> str:
    try:
        text = read_limited(args.index_secret_file, 4096).decode("utf-8").rstrip("\r\n")
    except FileReadError as exc:
        raise CommandError(f"--index-secret-file: {exc}") from None
    except UnicodeDecodeError:
        raise CommandError("--index-secret-file: not UTF-8 text") from None
    try:
        index_secret(text)
    except ConfigError as exc:
        raise CommandError(f"--index-secret-file: {exc.problem}") from None
    return text


def _entry(args: argparse.Namespace, key: str, key_id: str,
           secret: str | None = None) -> dict[str, Any]:
    if not args.consumer.strip():
        raise CommandError("--consumer: give the consumer's id or username")
    if args.expires_at is not None:
        try:
            expires = parse_rfc3339(args.expires_at)
        except ValueError as exc:
            raise CommandError(f"--expires-at: {exc}") from None
        if expires <= time.time():
            raise CommandError("--expires-at is in the past")
    try:
        return credential_entry(key, args.consumer, key_id, index_secret=secret,
                                expires_at=args.expires_at, allowed_cidrs=args.allowed_cidrs,
                                client_cert=args.client_cert,
                                client_spki_sha256=args.client_spki_sha256)
    except ConfigError as exc:
        option = {"allowed_cidrs": "--allowed-cidr", "client_spki_sha256": "--client-spki-sha256"}
        name = next((flag for field, flag in option.items() if f".{field}" in exc.field), exc.field)
        raise CommandError(f"{name}: {exc.problem}") from None


def _yaml_comment(entry: Mapping[str, Any]) -> str:
    return ("# api-key-auth credential: add it under config.credentials of the plugin.\n"
            f"# Sent upstream as X-Credential-Identifier: {credential_identifier(entry['id'])}\n")


def _yaml_entry(entry: Mapping[str, Any]) -> str:
    """One YAML list item; strings are JSON-quoted, which YAML reads as double-quoted scalars."""
    lines = []
    for i, (name, value) in enumerate(entry.items()):
        lead = "- " if i == 0 else "  "
        if isinstance(value, list):
            lines.append(f"{lead}{name}:")
            lines.extend(f"    - {json.dumps(v)}" for v in value)
        else:
            lines.append(f"{lead}{name}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"
