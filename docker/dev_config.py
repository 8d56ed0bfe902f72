"""Prepare the development setup: the dev PKI, dev API keys, and the configs with both filled in.

    dev_config.py PKI_DIR TEMPLATE_OR_DIR...

1. creates the development PKI in PKI_DIR unless it exists (`kong_mtls.devpki.write_dev_pki`);
2. renders each template (a `.yml` file, or every `.yml` in a directory) into PKI_DIR/config/.

Why a rendering step: Kong's declarative config needs certificates as PEM *content* (the
`certificates` and `ca_certificates` entities), and `ca_certificates.cert` cannot be a vault
reference, so the templates name PKI files and this step inlines them. A template stays valid YAML;
a placeholder is a whole double-quoted scalar:

    "@pki:<path>"           the content of PKI_DIR/<path> (a certificate chain or a key)
    "@pki-path:<path>"      the absolute path PKI_DIR/<path> (for plugin fields that take a file)
    "@api-key-hash:<id>"    the hash of the development API key <id>; the key itself is created once
                            in PKI_DIR/api-keys/<id>.key (mode 0600) and never printed

Comment lines are left as they are.

Rendered files hold private keys: they are written mode 0600. Runs in the image (the compose
`pki-init` job) and in the integration suite; never for production keys.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from kong_mtls.core.api_keys import generate_key, hash_key
from kong_mtls.devpki import write_dev_pki

PLACEHOLDER = re.compile(r'"@(pki|pki-path|api-key-hash):([^"\s]*)"')
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
API_KEY_DIR = "api-keys"
CONFIG_DIR = "config"


class RenderError(ValueError):
    """A template that cannot be rendered; the message names the placeholder."""


def _pki_file(pki_dir: Path, rel: str) -> Path:
    if not _SAFE_PATH.match(rel) or any(part in (".", "..") for part in rel.split("/")):
        raise RenderError(f"unsafe PKI path {rel!r} (relative, no '..')")
    return pki_dir / rel


def api_key(pki_dir: Path, key_id: str) -> str:
    """The development API key `key_id`: read from PKI_DIR/api-keys/<id>.key, created on first use."""
    path = _pki_file(pki_dir, f"{API_KEY_DIR}/{key_id}.key")
    if path.exists():
        return path.read_text().strip()
    try:
        key = generate_key(key_id).key
    except ValueError as exc:
        raise RenderError(f"@api-key-hash:{key_id}: {exc}") from None
    _write(path, key + "\n")
    return key


def render(text: str, pki_dir: str | os.PathLike) -> str:
    """`text` with every placeholder replaced (see the module docstring)."""
    root = Path(pki_dir).resolve()

    def replace(match: re.Match) -> str:
        kind, arg = match.group(1), match.group(2)
        if kind == "api-key-hash":
            return json.dumps(hash_key(api_key(root, arg)))
        path = _pki_file(root, arg)
        if kind == "pki-path":
            return json.dumps(str(path))
        try:
            content = path.read_text()
        except OSError as exc:
            raise RenderError(f"@pki:{arg}: cannot read {path}: {exc.strerror}") from None
        # A JSON string is a valid YAML double-quoted scalar (same escapes).
        return json.dumps(content)

    return "".join(line if line.lstrip().startswith("#") else PLACEHOLDER.sub(replace, line)
                   for line in text.splitlines(keepends=True))


def templates(paths: Iterable[str]) -> list[Path]:
    """The `.yml` files named, or found directly in the directories named, sorted per directory."""
    found: list[Path] = []
    for item in map(Path, paths):
        found.extend(sorted(item.glob("*.yml")) if item.is_dir() else [item])
    return found


def _write(path: Path, text: str) -> None:
    """Write atomically, mode 0600 (rendered configs and API keys are secrets)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def prepare(pki_dir: str | os.PathLike, template_paths: Sequence[str]) -> list[Path]:
    """Create the PKI if missing, render every template into PKI_DIR/config/; returns the outputs."""
    write_dev_pki(str(pki_dir))
    outputs = []
    for template in templates(template_paths):
        out = Path(pki_dir) / CONFIG_DIR / template.name
        _write(out, render(template.read_text(), pki_dir))
        outputs.append(out)
    return outputs


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] in ("-h", "--help"):
        sys.stdout.write(__doc__.split("\n\n", 2)[1] + "\n")
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    try:
        outputs = prepare(args[0], args[1:])
    except (RenderError, OSError) as exc:
        sys.stderr.write(f"dev_config: {exc}\n")
        return 1
    sys.stdout.write(f"development PKI in {args[0]}; rendered: {', '.join(map(str, outputs))}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
