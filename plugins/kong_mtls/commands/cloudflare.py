"""`kong-mtls cloudflare-ranges`: fetch Cloudflare's published IP ranges into a file ip-allowlist loads.

Cloudflare publishes its edge ranges as two text lists (https://www.cloudflare.com/ips-v4 and
/ips-v6, one CIDR per line) and through its API (`GET /client/v4/ips`: `result.ipv4_cidrs`,
`result.ipv6_cidrs`, `result.etag`). The command fetches one of them, checks every CIDR, prints the
difference with the shipped `cloudflare` preset (or `--compare FILE`) and, with `--output`, writes
a file in the preset format: set the plugin's `preset_files: {cloudflare: <file>}` to use it.

Exit codes: 0 done; 1 with `--check` when the ranges differ; 2 bad arguments or unwritable output;
3 the fetch failed or what was fetched is not a plausible list of ranges.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from http.client import HTTPException
from pathlib import Path
from urllib.parse import urlsplit

from kong_mtls import __version__
from kong_mtls.cli import CommandError
from kong_mtls.core.addresses import AddressError, parse_network
from kong_mtls.presets import WIDEST_PREFIX, CidrList, PresetError, cidr_list, read_cidr_list

COMMAND = "cloudflare-ranges"
PRESET = "cloudflare"
DEFAULT_V4_URL = "https://www.cloudflare.com/ips-v4"
DEFAULT_V6_URL = "https://www.cloudflare.com/ips-v6"
DEFAULT_API_URL = "https://api.cloudflare.com/client/v4/ips"
DEFAULT_TIMEOUT = 10.0

EXIT_CHANGED = 1
EXIT_FETCH_FAILED = 3

MAX_BODY_BYTES = 1024 * 1024


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        COMMAND, help="refresh Cloudflare's IP ranges into a file the ip-allowlist plugin can load",
        description="Fetch Cloudflare's published IP ranges, check every CIDR, show the difference "
                    "with the shipped cloudflare preset (or --compare FILE) and, with --output, write "
                    "a preset file; point the plugin's preset_files.cloudflare at it.",
        epilog=f"exit codes: 0 done; {EXIT_CHANGED} with --check when the ranges differ; 2 bad arguments "
               f"or unwritable output; {EXIT_FETCH_FAILED} the fetch failed or its content is not a "
               "plausible list of ranges")
    parser.add_argument("-o", "--output", metavar="FILE",
                        help="write the fetched ranges here (preset format); without it, only show the diff")
    parser.add_argument("--from", dest="origin", choices=("lists", "api"), default="lists",
                        help="fetch the two text lists (default) or the JSON API")
    parser.add_argument("--v4-url", default=DEFAULT_V4_URL, help="IPv4 list URL (default: %(default)s)")
    parser.add_argument("--v6-url", default=DEFAULT_V6_URL, help="IPv6 list URL (default: %(default)s)")
    parser.add_argument("--api-url", default=DEFAULT_API_URL, help="API URL (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds allowed for each fetch (default: %(default)s)")
    parser.add_argument("--compare", metavar="FILE",
                        help="diff against this ranges file instead of the shipped preset")
    parser.add_argument("--check", action="store_true",
                        help=f"exit {EXIT_CHANGED} when the fetched ranges differ from the compared ones")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not 0 < args.timeout <= 600:
        raise CommandError("--timeout must be between 0 and 600 seconds")
    try:
        baseline = read_cidr_list(args.compare) if args.compare else cidr_list(PRESET)
    except PresetError as exc:
        raise CommandError(str(exc)) from None
    fetched = fetch_api(args.api_url, args.timeout) if args.origin == "api" else \
        fetch_lists(args.v4_url, args.v6_url, args.timeout)
    added, removed = diff(baseline, fetched)
    label = args.compare or f"shipped preset {PRESET}"
    print(f"--- {label} (taken {baseline.taken or 'unknown'})")
    print(f"+++ {fetched.source} (taken {fetched.taken})")
    for cidr in added:
        print(f"+ {cidr}")
    for cidr in removed:
        print(f"- {cidr}")
    unchanged = len(fetched.cidrs) - len(added)
    print(f"{len(added)} added, {len(removed)} removed, {unchanged} unchanged")
    if args.output:
        write_atomically(Path(args.output), fetched.to_json())
        print(f"wrote {len(fetched.cidrs)} ranges to {args.output}")
    return EXIT_CHANGED if args.check and (added or removed) else 0


def diff(old: CidrList, new: CidrList) -> tuple[list[str], list[str]]:
    """(added, removed) CIDRs, compared in normalised form, in `new`/`old` order."""
    old_set = {str(parse_network(c)) for c in old.cidrs}
    new_set = {str(parse_network(c)) for c in new.cidrs}
    added = [c for c in (str(parse_network(c)) for c in new.cidrs) if c not in old_set]
    removed = [c for c in (str(parse_network(c)) for c in old.cidrs) if c not in new_set]
    return added, removed


def fetch_lists(v4_url: str, v6_url: str, timeout: float) -> CidrList:
    ipv4 = parse_text_list(fetch(v4_url, timeout), v4_url, 4)
    ipv6 = parse_text_list(fetch(v6_url, timeout), v6_url, 6)
    return CidrList(PRESET, _now(), f"{v4_url} {v6_url}", ipv4, ipv6)


def fetch_api(url: str, timeout: float) -> CidrList:
    try:
        document = json.loads(fetch(url, timeout))
    except ValueError as exc:
        raise _fetch_failed(f"{url}: not valid JSON: {exc}") from None
    result = document.get("result") if isinstance(document, dict) else None
    if not isinstance(result, dict) or document.get("success") is not True:
        errors = document.get("errors") if isinstance(document, dict) else None
        raise _fetch_failed(f"{url}: the API did not answer success with a result (errors: {errors!r})")
    families = []
    for key, version in (("ipv4_cidrs", 4), ("ipv6_cidrs", 6)):
        items = result.get(key)
        if not isinstance(items, list):
            raise _fetch_failed(f"{url}: result.{key} is not a list")
        families.append(_checked(items, f"{url} result.{key}", version))
    etag = result.get("etag")
    source = f"{url} (etag {etag})" if isinstance(etag, str) and etag else url
    return CidrList(PRESET, _now(), source, *families)


def parse_text_list(body: bytes, url: str, version: int) -> tuple[str, ...]:
    """One CIDR per line; blank lines ignored."""
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise _fetch_failed(f"{url}: not a plain-text list of CIDRs (non-ASCII bytes)") from None
    return _checked([line.strip() for line in text.splitlines() if line.strip()], url, version)


def _checked(items: Sequence[object], where: str, version: int) -> tuple[str, ...]:
    if not items:
        raise _fetch_failed(f"{where}: empty list")
    out: list[str] = []
    for i, item in enumerate(items, start=1):
        try:
            network = parse_network(item)
        except AddressError as exc:
            raise _fetch_failed(f"{where}: entry {i}: {exc}") from None
        if network.version != version:
            raise _fetch_failed(f"{where}: entry {i}: {item!r} is not an IPv{version} CIDR")
        if network.prefixlen < WIDEST_PREFIX[version]:
            raise _fetch_failed(f"{where}: entry {i}: {item!r} is wider than "
                                f"/{WIDEST_PREFIX[version]}; refusing an implausible range")
        if str(network) not in out:
            out.append(str(network))
    return tuple(out)


def fetch(url: str, timeout: float) -> bytes:
    """GET `url` within `timeout` seconds in total; at most MAX_BODY_BYTES."""
    _check_url(url)
    request = urllib.request.Request(url, headers={"User-Agent": f"kong-mtls/{__version__}"})
    opener = urllib.request.build_opener(_CheckedRedirects())
    deadline = time.monotonic() + timeout
    try:
        with opener.open(request, timeout=timeout) as response:
            chunks: list[bytes] = []
            size = 0
            while True:
                if time.monotonic() > deadline:
                    raise _fetch_failed(f"{url}: timed out after {timeout:g} s")
                chunk = response.read(64 * 1024)
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise _fetch_failed(f"{url}: answer larger than {MAX_BODY_BYTES} bytes")
                chunks.append(chunk)
    except urllib.error.HTTPError as exc:
        raise _fetch_failed(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise _fetch_failed(f"{url}: {exc.reason}") from None
    except (OSError, HTTPException) as exc:  # timeouts, resets, protocol errors while reading
        raise _fetch_failed(f"{url}: {type(exc).__name__}: {exc or 'failed'}") from None
    return b"".join(chunks)


def _check_url(url: str) -> None:
    """HTTPS only, except plain HTTP to a loopback address (a local mirror, or tests)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname and _is_loopback(parts.hostname):
        return
    raise CommandError(f"{url}: only https:// URLs (or http:// to a loopback address) are accepted")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to URLs `_check_url` accepts (no downgrade to plain HTTP)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[override]
        try:
            _check_url(newurl)
        except CommandError as exc:
            raise _fetch_failed(f"{req.full_url}: redirected to a refused URL: {exc}") from None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def write_atomically(path: Path, text: str) -> None:
    """Write via a temporary file in the same directory, so a reader never sees half a file."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise CommandError(f"cannot write {path}: {exc.strerror or exc}") from None


def _fetch_failed(message: str) -> CommandError:
    return CommandError(message, exit_code=EXIT_FETCH_FAILED)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
