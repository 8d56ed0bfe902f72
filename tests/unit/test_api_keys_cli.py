"""`kong-mtls api-key new | hash`: the key is shown once (new) or never (hash); entries work as config."""

from __future__ import annotations

import argparse
import io
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest

from kong_mtls import schema
from kong_mtls.cli import CommandError
from kong_mtls.commands import api_keys
from kong_mtls.core.api_keys import CredentialTable, credential_identifier
from kong_mtls.kong.api_key_auth import Plugin
from kong_mtls.kong.api_key_auth import Schema as PLUGIN_SCHEMA

LEGACY_KEY = "3c9f0d61a7b24e8f9a1c5d7e2b4f6a80"


def parser() -> argparse.ArgumentParser:
    """The command's own parser (as `kong_mtls.cli` builds it, without the other commands)."""
    root = argparse.ArgumentParser(prog="kong-mtls")
    api_keys.register(root.add_subparsers(dest="command", required=True))
    return root


INDEX_SECRET = "cli-test-index-secret"
_SECRET_FILE = Path(tempfile.mkdtemp(prefix="kong-mtls-cli-")) / "index-secret"
_SECRET_FILE.write_text(INDEX_SECRET + "\n")


def run(argv: list[str], stdin: str | None = None, tty: bool = False) -> tuple[str, str]:
    """`argv` through the CLI's parser; `hash` gets the test deployment's --index-secret-file."""
    if argv[:2] == ["api-key", "hash"] and "--index-secret-file" not in argv:
        argv = [*argv, "--index-secret-file", str(_SECRET_FILE)]
    args = parser().parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    if args.action == "new":
        assert args.func(args, out=out) == 0
    else:
        source = io.StringIO(stdin or "")
        source.isatty = lambda: tty  # type: ignore[method-assign]
        assert args.func(args, stdin=source, out=out, err=err) == 0
    return out.getvalue(), err.getvalue()


def yaml_entry(text: str) -> dict[str, Any]:
    """Read back the one list item the command prints (JSON-quoted scalars, lists of them)."""
    entry: dict[str, Any] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        item = re.match(r"^(?:- |  )(\w+):(?: (.*))?$", line)
        if item:
            current = item.group(1)
            entry[current] = json.loads(item.group(2)) if item.group(2) else []
        else:
            value = re.match(r"^    - (.*)$", line)
            assert value, line
            entry[current].append(json.loads(value.group(1)))
    return entry


def authenticates(entry: dict[str, Any], key: str) -> bool:
    return CredentialTable.from_config([entry], index_secret=INDEX_SECRET.encode()).match(key).reason is None


def test_hash_needs_the_deployments_index_secret_from_a_file(tmp_path) -> None:
    with pytest.raises(SystemExit) as info:                      # required, and never an argument value
        parser().parse_args(["api-key", "hash", "--consumer", "carol"])
    assert info.value.code == 2
    short = tmp_path / "short"
    short.write_text("too short")
    args = parser().parse_args(["api-key", "hash", "--consumer", "carol", "--index-secret-file", str(short)])
    with pytest.raises(CommandError, match=r"--index-secret-file: .*16 or more"):
        args.func(args, stdin=io.StringIO(LEGACY_KEY), out=io.StringIO(), err=io.StringIO())


def test_new_prints_the_key_once_with_an_entry_that_verifies_it() -> None:
    out, _ = run(["api-key", "new", "--consumer", "alice", "--id", "billing-1"])
    keys = re.findall(r"billing-1\.[A-Za-z0-9_-]{43}", out)
    assert len(keys) == 1, out
    key = keys[0]
    entry = yaml_entry(out.split(key, 1)[1])
    assert entry["id"] == "billing-1" and entry["consumer"] == "alice"
    assert entry["hash"].startswith("hmac-sha256:") and "key_index" not in entry
    assert authenticates(entry, key)
    assert credential_identifier("billing-1") in out


def test_new_json_and_options() -> None:
    spki = "0123456789abcdef" * 4
    out, _ = run(["api-key", "new", "--consumer", "bob", "--format", "json", "--expires-at",
                  "2099-01-01T00:00:00Z", "--allowed-cidr", "10.0.0.0/8", "--allowed-cidr", "192.0.2.7",
                  "--client-cert", "--client-spki-sha256", spki.upper()])
    doc = json.loads(out)
    key, entry = doc["key"], doc["credential"]
    assert out.count(key.split(".", 1)[1]) == 1
    assert re.fullmatch(r"ak_[0-9a-f]{16}", entry["id"]) and key.startswith(entry["id"] + ".")
    assert entry == {"id": entry["id"], "hash": entry["hash"], "consumer": "bob",
                     "expires_at": "2099-01-01T00:00:00Z", "allowed_cidrs": ["10.0.0.0/8", "192.0.2.7"],
                     "client_cert": True, "client_spki_sha256": [spki]}
    assert doc["credential_identifier"] == credential_identifier(entry["id"])
    assert authenticates(entry, key)
    # what the plugin itself accepts, through its schema
    plugin = Plugin(schema.validate(PLUGIN_SCHEMA, {"credentials": [entry]}))
    assert len(plugin.auth.credentials) == 1


def test_two_new_keys_differ() -> None:
    first = json.loads(run(["api-key", "new", "--consumer", "a", "--format", "json"])[0])
    second = json.loads(run(["api-key", "new", "--consumer", "a", "--format", "json"])[0])
    assert first["key"] != second["key"] and first["credential"]["hash"] != second["credential"]["hash"]


def test_hash_reads_the_key_from_stdin_and_never_prints_it() -> None:
    out, err = run(["api-key", "hash", "--consumer", "carol", "--id", "kauth-7"], stdin=LEGACY_KEY + "\n")
    assert LEGACY_KEY not in out and LEGACY_KEY not in err and err == ""
    entry = yaml_entry(out)
    assert entry["id"] == "kauth-7" and re.fullmatch(r"[0-9a-f]{32}", entry["key_index"])
    assert authenticates(entry, LEGACY_KEY)
    assert not authenticates(entry, LEGACY_KEY[:-1] + "1")


def test_hash_json_default_id_and_crlf() -> None:
    out, _ = run(["api-key", "hash", "--consumer", "carol", "--format", "json"], stdin=LEGACY_KEY + "\r\n")
    entry = json.loads(out)["credential"]
    assert re.fullmatch(r"ka_[0-9a-f]{16}", entry["id"])
    assert authenticates(entry, LEGACY_KEY)


def test_hash_from_a_terminal_uses_hidden_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api_keys.getpass, "getpass", lambda prompt: LEGACY_KEY)
    out, _ = run(["api-key", "hash", "--consumer", "carol", "--format", "json"], tty=True)
    assert authenticates(json.loads(out)["credential"], LEGACY_KEY)


def test_hash_warns_about_short_keys_without_showing_them() -> None:
    out, err = run(["api-key", "hash", "--consumer", "carol"], stdin="short-key")
    assert "warning" in err and "short-key" not in err and "short-key" not in out
    assert authenticates(yaml_entry(out), "short-key")


def test_hash_takes_no_key_on_the_command_line() -> None:
    with pytest.raises(SystemExit) as info:
        parser().parse_args(["api-key", "hash", "--consumer", "carol", LEGACY_KEY])
    assert info.value.code == 2


@pytest.mark.parametrize(("stdin", "problem"), [
    ("", "no key"),
    ("\n", "no key"),
    ("one\ntwo\n", "more than one line"),
    (" padded ", "whitespace"),
    ("k" * 1025, "longer than"),
])
def test_hash_refuses_bad_stdin_without_echoing_it(stdin: str, problem: str) -> None:
    with pytest.raises(CommandError, match=problem) as info:
        run(["api-key", "hash", "--consumer", "carol"], stdin=stdin)
    if stdin.strip():
        assert stdin.strip()[:8] not in str(info.value)


@pytest.mark.parametrize(("extra", "problem"), [
    (["--id", "has.dot"], "--id"),
    (["--expires-at", "2030-01-01"], "--expires-at"),
    (["--expires-at", "2001-01-01T00:00:00Z"], "in the past"),
    (["--allowed-cidr", "10.0.0.1/8"], "--allowed-cidr"),
    (["--client-spki-sha256", "abcd"], "--client-spki-sha256"),
])
def test_new_refuses_bad_options(extra: list[str], problem: str) -> None:
    with pytest.raises(CommandError, match=re.escape(problem)):
        run(["api-key", "new", "--consumer", "alice", *extra])


def test_consumer_is_required() -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["api-key", "new"])
    with pytest.raises(CommandError, match="--consumer"):
        run(["api-key", "new", "--consumer", " "])
