"""What the integration runners and scenarios share: pure helpers (unit-tested in
tests/unit/test_integration_support.py) and a standard-library HTTP(S) client.

Nothing here starts anything; tests/integration/runners.py does.
"""

from __future__ import annotations

import contextlib
import copy
import http.client
import importlib.util
import io
import json
import re
import socket
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kong_mtls.constants import (
    CLIENT_CERT_AUTH,
    CLIENT_CERT_REQUEST,
    GUARD,
    HEADER_CERT_AUTH,
    IP_ALLOWLIST,
    PLUGIN_MODULES,
    VERDICT_CACHED_PLUGINS,
)
from kong_mtls.guard import GUARDED_PLUGINS, lua_guard

ROOT = Path(__file__).resolve().parents[2]
KONG_CONF_EXAMPLE = ROOT / "kong.conf.example"
#: The Lua plugins of this checkout (the kong-mtls-guard); the local runner puts it on Kong's path.
LUA_DIR = ROOT / "lua"
COMPOSE_FILE = ROOT / "docker" / "compose.yaml"
TEMPLATES_DIR = ROOT / "kong"

#: Kong plugin name -> module under kong_mtls.kong.

#: Upstream addresses in the example configs (compose service names) that the local runner
#: replaces with the loopback ports of the echo processes it starts.
ECHO_ADDRESS = "echo:9443"
IMPOSTOR_ADDRESS = "upstream:9443"

#: Peers of the test client as Kong sees them (loopback, or Docker's bridge gateway behind a
#: published port): stand-ins for Cloudflare's edge in scenario 1.
STAND_IN_CLOUDFLARE = ["127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]

#: Option A of asking clients for a certificate (nginx's `optional_no_ca`), which the shipped setup
#: does not use (kong.conf.example): the suite starts a second Kong with it to show why.
OPTION_A_SETTINGS = {"nginx_proxy_ssl_verify_client": "optional_no_ca", "nginx_proxy_ssl_verify_depth": "4"}

#: The access-log format of kong.conf.example: the request line without its query string, where a
#: client may have put an API key.
ACCESS_LOG_FORMAT = "kong_mtls_no_query"

#: nginx's read timeout on Lua sockets, which bounds how long a request waits for a hung plugin
#: server (default 60s) before Kong fails open and the guard answers.
PLUGIN_SERVER_TIMEOUT = "3s"


def load_dev_config() -> Any:
    """docker/dev_config.py (the dev PKI and template rendering step of the image) as a module."""
    spec = importlib.util.spec_from_file_location("kong_mtls_dev_config", ROOT / "docker" / "dev_config.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def available_plugins() -> list[str]:
    """Our plugins whose module exists in this checkout, in priority order."""
    return [name for name, module in PLUGIN_MODULES.items()
            if importlib.util.find_spec(module) is not None]


# -- kong.conf -------------------------------------------------------------------------------------

def parse_kong_conf(text: str) -> dict[str, str]:
    """`key = value` lines of a kong.conf, in order; comment and blank lines skipped."""
    settings: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"line {number}: not `key = value`: {raw!r}")
        settings[key.strip()] = value.strip()
    return settings


def run_lint(*args: str) -> tuple[int, dict[str, Any]]:
    """`kong-mtls lint <args> --json`: its exit code and its report."""
    from kong_mtls.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["lint", *args, "--json"])
    return code, json.loads(out.getvalue())


def lint_report(report: Mapping[str, Any]) -> set[tuple[str, str, str]]:
    """(severity, rule, path) of every finding of a lint report, allowed ones included."""
    return {(f["severity"], f["rule"], f["path"]) for f in [*report["findings"], *report["allowed"]]}


def pluginserver_key(name: str, suffix: str) -> str:
    """`pluginserver_<name>_<suffix>` with Kong's `-` -> `_` rule."""
    return f"pluginserver_{name.replace('-', '_')}_{suffix}"


def parse_kong_version(output: str) -> tuple[int, int, int]:
    """`kong version` prints e.g. `Kong 2.8.5` (2.x) or `3.9.1` (3.x)."""
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", output)
    if match is None:
        raise ValueError(f"no Kong version in {output!r}")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def local_kong_conf(example: Mapping[str, str], *, prefix: str, python: str, plugins: Sequence[str],
                    declarative_config: str, ports: Mapping[str, int], ssl_cert: str, ssl_cert_key: str,
                    kong_version: tuple[int, int, int], nginx_user: str | None = None,
                    serve_plugins: bool = True, extra: Mapping[str, str | None] | None = None,
                    server_args: str = "") -> str:
    """The kong.conf of the local runner: kong.conf.example's settings, with the plugin servers
    started from this Python environment (`server_args` added to their start_cmd), the guard's Lua
    from this checkout (`LUA_DIR`, before Kong's default path), everything else in `prefix`, then
    `extra` (None removes a setting).
    Without `serve_plugins` (a hybrid control plane), Kong only queries the plugin servers for
    their schemas and starts none."""
    settings: dict[str, str] = {
        key: value for key, value in example.items()
        if not key.startswith("pluginserver_") and key not in ("plugins", "admin_gui_listen")
    }
    settings.update({
        "prefix": prefix,
        "database": "off",
        "declarative_config": declarative_config,
        "proxy_listen": f"127.0.0.1:{ports['http']}, 127.0.0.1:{ports['https']} ssl",
        "admin_listen": f"127.0.0.1:{ports['admin']}",
        "ssl_cert": ssl_cert,
        "ssl_cert_key": ssl_cert_key,
        "log_level": "notice",  # Kong's default: what a user sees
        "nginx_worker_processes": "1",
        "nginx_http_lua_socket_read_timeout": PLUGIN_SERVER_TIMEOUT,
        "anonymous_reports": "off",
        "plugins": ",".join(["bundled", *plugins, GUARD]),
        "lua_package_path": f"{LUA_DIR}/?.lua;;",
    })
    if plugins:
        settings["pluginserver_names"] = ",".join(plugins)
    if kong_version >= (3, 4, 0):
        settings["admin_gui_listen"] = "off"
    if nginx_user:
        settings["nginx_user"] = nginx_user
    for name in plugins:
        module = PLUGIN_MODULES[name]
        if serve_plugins:
            settings[pluginserver_key(name, "socket")] = f"{prefix}/{name}.sock"
            start = f"{python} -m {module} -p {prefix} {server_args}"
            settings[pluginserver_key(name, "start_cmd")] = start.rstrip()
        settings[pluginserver_key(name, "query_cmd")] = f"{python} -m {module} --dump"
    for key, value in (extra or {}).items():
        if value is None:
            settings.pop(key, None)
        else:
            settings[key] = value
    return "".join(f"{key} = {value}\n" for key, value in settings.items())


# -- declarative config ----------------------------------------------------------------------------

def route_plugins(route: Mapping[str, Any]) -> list[str]:
    return [plugin["name"] for plugin in route.get("plugins") or ()]


def iter_routes(config: Mapping[str, Any]) -> Iterable[dict[str, Any]]:
    for service in config.get("services") or ():
        yield from service.get("routes") or ()


def find_route(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    for route in iter_routes(config):
        if route.get("name") == name:
            return route
    raise KeyError(f"no route {name!r}")


def route_plugin(route: Mapping[str, Any], name: str) -> dict[str, Any]:
    for plugin in route.get("plugins") or ():
        if plugin["name"] == name:
            return plugin
    raise KeyError(f"route {route.get('name')!r} has no plugin {name!r}")


def adapt_config(config: Mapping[str, Any], *, available: Iterable[str],
                 kong_version: tuple[int, int, int],
                 upstreams: Mapping[str, str] | None = None,
                 request_certificates: bool = True) -> dict[str, Any]:
    """A copy of a declarative config that this Kong can load.

    * without `request_certificates`, the global client-cert-request is dropped (option A: nginx
      asks for the certificate instead);
    * routes using one of our plugins whose module does not exist yet are dropped (Kong would refuse
      the whole config);
    * `upstreams` maps `host:port` in Service URLs to another (the local runner's echo ports);
    * Kong < 3.0 reads format "2.1", and its `acl` has no `always_use_authenticated_groups` (3.8+).
    """
    out = copy.deepcopy(dict(config))
    missing = set(PLUGIN_MODULES) - set(available)
    if not request_certificates:
        missing.add(CLIENT_CERT_REQUEST)
    out["plugins"] = [p for p in out.get("plugins") or () if p["name"] not in missing]
    for service in out.get("services") or ():
        service["routes"] = [route for route in service.get("routes") or ()
                             if not missing.intersection(route_plugins(route))]
        for old, new in (upstreams or {}).items():
            if "url" in service:
                service["url"] = service["url"].replace(f"//{old}", f"//{new}")
    if kong_version < (3, 8, 0):
        for route in iter_routes(out):
            for plugin in route.get("plugins") or ():
                if plugin["name"] == "acl":
                    plugin["config"].pop("always_use_authenticated_groups", None)
    if kong_version < (3, 0, 0):
        out["_format_version"] = "2.1"
    return out


def with_post_function_guards(config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` for a Kong that does not load kong-mtls-guard (the post-function fallback of
    docs/guard.md): every kong-mtls-guard entry goes, and each route that plugins of ours reach
    (its own, its Service's, global ones) gets a post-function guard that requires their marks."""
    out = copy.deepcopy(dict(config))

    def ours(scope: dict[str, Any]) -> list[str]:
        scope["plugins"] = [p for p in scope.get("plugins") or () if p["name"] != GUARD]
        return [name for name in route_plugins(scope) if name in GUARDED_PLUGINS]

    everywhere = ours(out)
    for service in out.get("services") or ():
        on_service = ours(service)
        for route in service.get("routes") or ():
            required = list(dict.fromkeys([*ours(route), *on_service, *everywhere]))
            if required:
                guard = {"name": "post-function", "config": {"access": [lua_guard(required)]}}
                route["plugins"].append(guard)
    return out


def cloudflare_test_config(config: Mapping[str, Any], *, aop_ca_file: str) -> dict[str, Any]:
    """Scenario 1's config: kong/cloudflare-origin-lock.yml with the test client standing in for
    Cloudflare (its addresses added to `trusted_proxies`, the dev AOP CA instead of Cloudflare's),
    plus the same route with only the real Cloudflare ranges at /orders-real, and an open /public
    route to the same upstream (where the tests ask the echo service what it saw)."""
    out = copy.deepcopy(dict(config))
    service = out["services"][0]
    route = find_route(out, "orders")
    real = copy.deepcopy(route)
    real.update(name="orders-real", paths=["/orders-real"])
    ip_config = route_plugin(route, IP_ALLOWLIST)["config"]
    ip_config["trusted_proxies"] = list(ip_config.get("trusted_proxies") or ()) + STAND_IN_CLOUDFLARE
    for target in (route, real):
        cert_auth = route_plugin(target, CLIENT_CERT_AUTH)["config"]
        cert_auth.pop("ca_presets", None)
        cert_auth["ca_certificate_files"] = [aop_ca_file]
        cert_auth["revocation_check_mode"] = "SKIP"
    service["routes"] += [real, {"name": "public", "paths": ["/public"]}]
    return out


def edge_test_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Scenario 12's config: kong/edge-client-certs.yml with the test client standing in for the
    edge (its addresses as Cloudflare's and the ALB's; the example's AOP CA is the dev one), plus the
    Cloudflare route with only the real Cloudflare ranges at /cloudflare-real, and an open /public
    route to the same upstream."""
    out = copy.deepcopy(dict(config))
    route = find_route(out, "cloudflare-api-shield")
    real = copy.deepcopy(route)
    real.update(name="cloudflare-real", paths=["/cloudflare-real"])
    route_plugin(route, HEADER_CERT_AUTH)["config"].update(trusted_proxies_presets=None,
                                                            trusted_proxies=STAND_IN_CLOUDFLARE)
    route_plugin(find_route(out, "alb-passthrough"), HEADER_CERT_AUTH)["config"]["trusted_proxies"] += \
        STAND_IN_CLOUDFLARE
    out["services"][0]["routes"] += [real, {"name": "public", "paths": ["/public"]}]
    return out


def admin_api_entities(config: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The Admin API requests (path, body) that create what a declarative config declares, in an
    order Kong accepts. For database mode: Kong 3.9.1's `kong config db_import` fails as soon as a
    plugin server is configured (`plugin_servers/init.lua` reads the `kong` global, nil in the CLI)."""
    requests: list[tuple[str, dict[str, Any]]] = []
    for cert in config.get("certificates") or ():
        body = {k: v for k, v in cert.items() if k != "snis"}
        body["snis"] = [sni["name"] for sni in cert.get("snis") or ()]
        requests.append(("/certificates", body))
    for ca in config.get("ca_certificates") or ():
        requests.append(("/ca_certificates", dict(ca)))
    for consumer in config.get("consumers") or ():
        requests.append(("/consumers", {k: v for k, v in consumer.items() if k != "acls"}))
        for acl in consumer.get("acls") or ():
            requests.append((f"/consumers/{consumer['username']}/acls", dict(acl)))
    for plugin in config.get("plugins") or ():
        requests.append(("/plugins", dict(plugin)))
    for service in config.get("services") or ():
        body = {k: v for k, v in service.items() if k not in ("routes", "plugins")}
        if isinstance(body.get("client_certificate"), str):
            body["client_certificate"] = {"id": body["client_certificate"]}
        requests.append(("/services", body))
        for plugin in service.get("plugins") or ():
            requests.append((f"/services/{service['name']}/plugins", dict(plugin)))
        for route in service.get("routes") or ():
            requests.append((f"/services/{service['name']}/routes",
                             {k: v for k, v in route.items() if k != "plugins"}))
            for plugin in route.get("plugins") or ():
                requests.append((f"/routes/{route['name']}/plugins", dict(plugin)))
    return requests


MARKER_PATH = "/__kong_mtls_config"


def with_config_marker(config: Mapping[str, Any], token: str) -> dict[str, Any]:
    """A copy of `config` with a route `MARKER_PATH/<token>` that answers 200 with the token (Kong's
    request-termination): once the proxy serves it, this config is live. Kong's `POST /config`
    answers before its workers switch (the old config served for 10-70 ms in real Kong)."""
    out = copy.deepcopy(dict(config))
    out.setdefault("services", []).append({
        "name": "kong-mtls-config-marker", "url": "http://127.0.0.1:9",
        "routes": [{"name": "kong-mtls-config-marker", "paths": [f"{MARKER_PATH}/{token}"],
                    "plugins": [{"name": "request-termination",
                                 "config": {"status_code": 200, "message": token}}]}],
    })
    return out


def with_route_plugins(config: Mapping[str, Any], route_name: str,
                       plugins: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A copy of `config` where `route_name` carries exactly `plugins` (scenario 5)."""
    out = copy.deepcopy(dict(config))
    find_route(out, route_name)["plugins"] = [copy.deepcopy(dict(p)) for p in plugins]
    return out


# -- processes -------------------------------------------------------------------------------------

#: Signals the processes whose command line contains argv[1] with signal argv[2] (0 only lists them)
#: and prints their pids as JSON. Runs inside the Kong container (docker exec) and locally, so that
#: both runners find a plugin server the same way: by its command line.
SIGNAL_SCRIPT = r"""
import json, os, sys
needle, signum = sys.argv[1], int(sys.argv[2])
found = []
for entry in os.listdir("/proc"):
    if not entry.isdigit() or int(entry) == os.getpid():
        continue
    try:
        with open(f"/proc/{entry}/cmdline", "rb") as handle:
            cmdline = handle.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        continue
    if needle in cmdline:
        found.append(int(entry))
        if signum:
            os.kill(int(entry), signum)
print(json.dumps(sorted(found)))
"""


#: Prints the answer of the plugin server listening on argv[1] to plugin.GetRuntimeStats as JSON
#: and exits 0 (Kong restarted it and it serves), else exits 1. Runs inside the Kong container and
#: locally, like SIGNAL_SCRIPT.
RUNTIME_STATS_SCRIPT = r"""
import json, socket, sys
import msgpack
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(2)
try:
    sock.connect(sys.argv[1])
    sock.sendall(msgpack.packb([0, 1, "plugin.GetRuntimeStats", []]))
    unpacker = msgpack.Unpacker()
    while True:
        data = sock.recv(65536)
        if not data:
            sys.exit(1)
        unpacker.feed(data)
        for message in unpacker:
            if message[0] == 1 and message[1] == 1 and message[2] is None:
                print(json.dumps(message[3]))
                sys.exit(0)
            sys.exit(1)
except OSError:
    sys.exit(1)
"""


def without_verdict_cache(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `config` whose plugins of ours all have `verdict_cache_ttl: 0`: every request is
    asked of the plugin server (what the guard does when that fails needs such requests)."""
    out = copy.deepcopy(dict(config))

    def strip(plugins: list[dict[str, Any]]) -> None:
        for plugin in plugins:
            if plugin["name"] in VERDICT_CACHED_PLUGINS:
                plugin["config"] = {**plugin.get("config", {}), "verdict_cache_ttl": 0}

    strip(out.get("plugins", []))
    for service in out.get("services", []):
        strip(service.get("plugins", []))
        for route in service.get("routes", []):
            strip(route.get("plugins", []))
    return out


# -- HTTP(S) client --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    server_cert: bytes | None = field(default=None, repr=False)  # DER of Kong's leaf (HTTPS)

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def upstream_headers(self) -> dict[str, str]:
        """The headers the echo upstream received (lower-case names)."""
        return self.json()["headers"]


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a fixed address with its own SNI / certificate name (`host`)."""

    def __init__(self, address: tuple[str, int], server_name: str, context: ssl.SSLContext,
                 timeout: float) -> None:
        super().__init__(server_name, address[1], context=context, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection(self._address, self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def tls_context(ca_file: str | Path, cert: tuple[str | Path, str | Path] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    return context


def request(address: tuple[str, int], path: str, *, method: str = "GET",
            headers: Mapping[str, str] | None = None, body: bytes | None = None,
            tls: ssl.SSLContext | None = None, server_name: str = "localhost",
            timeout: float = 30) -> Response:
    """One request on a new connection: HTTPS when `tls` is given (SNI and name check against
    `server_name`), else plain HTTP. The Host header is `server_name` unless given."""
    all_headers = {"Host": server_name, **(headers or {})}
    if tls is None:
        conn: http.client.HTTPConnection = http.client.HTTPConnection(*address, timeout=timeout)
    else:
        conn = _PinnedHTTPSConnection(address, server_name, tls, timeout)
    try:
        conn.request(method, path, body=body, headers=all_headers)
        # Before reading the answer: http.client drops the socket of a `Connection: close` answer.
        server_cert = conn.sock.getpeercert(binary_form=True) if tls is not None else None
        answer = conn.getresponse()
        data = answer.read()
        return Response(answer.status, {k.lower(): v for k, v in answer.getheaders()}, data, server_cert)
    finally:
        conn.close()


def resumed_session_requests(address: tuple[str, int], path: str, tls: ssl.SSLContext, count: int,
                             server_name: str = "localhost") -> list[tuple[int, bool, bytes]]:
    """`count` requests, each on a new connection that offers the TLS session of the one before
    (as browsers and HTTP client libraries do): (status, whether the server resumed it, body)."""
    session = None
    results = []
    for _ in range(count):
        with socket.create_connection(address, 10) as raw, \
                tls.wrap_socket(raw, server_hostname=server_name, session=session) as conn:
            conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            results.append((int(data.split(b" ", 2)[1]), conn.session_reused, data.split(b"\r\n\r\n", 1)[-1]))
            session = conn.session  # after the answer: a TLS 1.3 ticket arrives after the handshake
    return results


def refused(address: tuple[str, int], tls: ssl.SSLContext, server_name: str = "localhost") -> bool:
    """True when the server ends the connection during or right after the TLS handshake (how a
    server that requires a client certificate refuses one without, TLS 1.2 or 1.3)."""
    try:
        request(address, "/", tls=tls, server_name=server_name, timeout=10)
    except (ssl.SSLError, ConnectionError):
        return True
    return False
