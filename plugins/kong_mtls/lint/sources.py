"""Where `kong-mtls lint` reads a configuration: a declarative file, kong.conf, a running Kong's
Admin API. Every failure is a `SourceError` with a message naming the source."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from kong_mtls.files import FileReadError, read_limited

MAX_CONFIG_BYTES = 64 * 1024 * 1024
#: Values (scalars, lists, mappings) a configuration may hold, aliases expanded.
MAX_VALUES = 2_000_000
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
#: The Admin API entity endpoints read when Kong has a database (`GET /config` is DB-less only).
#: What lint reads (never `certificates`: they hold private keys, and no rule needs them).
ENTITY_ENDPOINTS = ("services", "routes", "plugins", "consumers", "ca_certificates")
PAGE_SIZE = 1000
MAX_PAGES = 10_000
ADMIN_TIMEOUT = 10.0
_COMMENT = re.compile(r"(?<!\\)#.*$")


class SourceError(ValueError):
    """A source that cannot be read; the message says which and why."""


def parse_document(data: bytes, where: str) -> Any:
    """A declarative config as YAML (JSON is YAML too)."""
    try:
        document = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise SourceError(f"{where}: not valid YAML or JSON{at}: {problem}") from None
    except RecursionError:
        raise SourceError(f"{where}: nested too deeply") from None
    if expanded_size(document, MAX_VALUES) > MAX_VALUES:
        raise SourceError(f"{where}: more than {MAX_VALUES} values once YAML aliases are expanded")
    return document


def expanded_size(document: Any, limit: int) -> int:
    """How many values `document` holds with every shared (aliased) list or mapping counted each
    time it is used, up to just over `limit` (also for a list that contains itself): a few YAML
    aliases can stand for billions of values, which every rule would then walk."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()
    stack: list[tuple[Any, bool]] = [(document, False)]  # (value, its children are sized)
    while stack:
        value, done = stack.pop()
        if isinstance(value, dict):
            children = list(value.values())
        elif isinstance(value, list):
            children = value
        else:
            continue
        key = id(value)
        if done:
            visiting.discard(key)
            total = 1 + sum(sizes.get(id(child), 1) for child in children)
            sizes[key] = min(total, limit + 1)
        elif key in visiting:
            return limit + 1  # a cycle
        elif key not in sizes:
            visiting.add(key)
            stack.append((value, True))
            stack.extend((child, False) for child in children if isinstance(child, (dict, list)))
    return sizes.get(id(document), 1)


def read_declarative(path: str) -> Any:
    try:
        data = read_limited(path, MAX_CONFIG_BYTES)
    except FileReadError as exc:
        raise SourceError(f"{path}: {exc}") from None
    return parse_document(data, path)


def parse_kong_conf(text: str) -> dict[str, str]:
    """kong.conf's `key = value` lines as Kong reads them: `#` starts a comment unless escaped as
    `\\#`; later lines override earlier ones."""
    settings: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = _COMMENT.sub("", raw).strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"line {number}: not `key = value`: {raw.strip()[:80]!r}")
        settings[key.strip().lower()] = value.strip().replace("\\#", "#")
    return settings


def read_kong_conf(path: str) -> dict[str, str]:
    try:
        text = read_limited(path).decode("utf-8")
        return parse_kong_conf(text)
    except FileReadError as exc:
        raise SourceError(f"--kong-conf {path}: {exc}") from None
    except UnicodeDecodeError:
        raise SourceError(f"--kong-conf {path}: not UTF-8 text") from None
    except ValueError as exc:
        raise SourceError(f"--kong-conf {path}: {exc}") from None


class AdminAPI:
    """GETs against a Kong Admin API; `headers` go with every request (e.g. an auth token)."""

    def __init__(self, url: str, headers: Mapping[str, str] | None = None,
                 timeout: float = ADMIN_TIMEOUT) -> None:
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError on a malformed port or IPv6 literal
        except ValueError:
            raise SourceError("--admin: not a URL (expected http(s)://host:port)") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SourceError(f"--admin {_shown_url(url)}: expected http(s)://host:port")
        if parts.username or parts.password or parts.query:
            raise SourceError(f"--admin {_shown_url(url)}: credentials go in --admin-header, not in the URL")
        self.base = url.rstrip("/")
        self.headers = dict(headers or {})
        self.timeout = timeout

    def get(self, path: str) -> tuple[int, Any]:
        """(status, parsed JSON body) of GET `path` (relative to the Admin API's address)."""
        url = self.base + path if path.startswith("/") else f"{self.base}/{path}"
        request = urllib.request.Request(url, headers={"Accept": "application/json", **self.headers})
        try:
            with _NO_REDIRECTS.open(request, timeout=self.timeout) as response:
                status, body = response.status, response.read(MAX_RESPONSE_BYTES + 1)
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read(MAX_RESPONSE_BYTES + 1)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SourceError(f"--admin {self.base}: cannot reach the Admin API ({reason})") from None
        if len(body) > MAX_RESPONSE_BYTES:
            raise SourceError(f"--admin {url}: answer larger than {MAX_RESPONSE_BYTES} bytes")
        try:
            return status, json.loads(body) if body else None
        except (ValueError, RecursionError):
            raise SourceError(f"--admin {url}: answered {status} with a body that is not JSON") from None


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect would carry --admin-header (an Admin API token) to wherever it points."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        raise urllib.error.HTTPError(req.full_url, code, "redirected; not followed", headers, fp)


_NO_REDIRECTS = urllib.request.build_opener(_RefuseRedirects)


def _shown_url(url: str) -> str:
    """A URL for a message: scheme, host and path only (no credentials, no query)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        return f"{parts.scheme}://{host}{parts.path}"
    except ValueError:
        return "(malformed URL)"


def read_admin(api: AdminAPI, page_size: int = PAGE_SIZE) -> Any:
    """The configuration of the Kong behind `api` as a declarative document: `GET /config` on a
    DB-less Kong, else every page (of `page_size` entities) of each entity endpoint."""
    status, body = api.get("/config")
    if status == 200:
        if not isinstance(body, Mapping) or not isinstance(body.get("config"), str):
            raise SourceError(f"--admin {api.base}/config: expected {{\"config\": \"<declarative config>\"}}")
        return parse_document(body["config"].encode("utf-8"), f"--admin {api.base}/config")
    if status in (401, 403):
        raise SourceError(f"--admin {api.base}: {status} (pass the Admin API's credentials with "
                          "--admin-header)")
    document: dict[str, Any] = {"_format_version": "3.0"}
    for endpoint in ENTITY_ENDPOINTS:
        document[endpoint] = _every_page(api, endpoint, page_size)
    return document


def _every_page(api: AdminAPI, endpoint: str, page_size: int) -> list[Any]:
    rows: list[Any] = []
    path: str | None = f"/{endpoint}?size={page_size}"
    for _ in range(MAX_PAGES):
        if path is None:
            return rows
        status, body = api.get(path)
        if status != 200 or not isinstance(body, Mapping) or not isinstance(body.get("data"), list):
            message = body.get("message") if isinstance(body, Mapping) else None
            raise SourceError(f"--admin {api.base}/{endpoint}: answered {status}"
                              + (f" {message!r}" if isinstance(message, str) else "")
                              + ", expected a page of entities")
        rows.extend(body["data"])
        path = _next_page(body.get("next"), api.base)
    raise SourceError(f"--admin {api.base}/{endpoint}: more than {MAX_PAGES} pages")


def _next_page(value: Any, base: str) -> str | None:
    """Kong's `next` (a path, or on some versions a full URL on the Admin API) as a path."""
    if not isinstance(value, str) or not value:
        return None
    if value.startswith(("http://", "https://")):
        try:
            parts = urllib.parse.urlsplit(value)
        except ValueError:
            raise SourceError(f"--admin {base}: a malformed next-page link") from None
        prefix = urllib.parse.urlsplit(base).path.rstrip("/")
        path = parts.path[len(prefix):] if prefix and parts.path.startswith(prefix) else parts.path
        return path + (f"?{parts.query}" if parts.query else "")
    return value


def parse_headers(values: Sequence[str]) -> dict[str, str]:
    """`Name: value` strings (`--admin-header`)."""
    out = {}
    for value in values:
        name, sep, content = value.partition(":")
        if not sep or not name.strip() or any(c.isspace() for c in name.strip()):
            raise SourceError("--admin-header: expected 'Name: value' (the value is not shown)")
        out[name.strip()] = content.strip()
    return out
