"""`kong-mtls lint` on the command line: inputs (file, Admin API), output, exit codes."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from kong_mtls.cli import main
from tests.integration.support import KONG_CONF_EXAMPLE
from tests.unit.test_lint import base, set_plugins


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["lint", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def write(tmp_path):
    def write(doc: Any, name: str = "kong.yml") -> str:
        path = tmp_path / name
        path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
        return str(path)
    return write


def test_clean_config_exits_0(capsys, pki, write):
    code, out, err = run(capsys, write(base(pki)), "--kong-conf", str(KONG_CONF_EXAMPLE))
    assert (code, out.strip(), err) == (0, "no findings", "")


def test_errors_exit_1_with_path_message_and_fix(capsys, pki, write):
    doc = set_plugins(base(pki), "mtls", [{"name": "client-cert-auth",
                                           "config": {"ca_certificates": [pki.root.cert_pem],
                                                      "revocation_check_mode": "SKIP"}}])
    code, out, _ = run(capsys, write(doc))
    assert code == 1
    lines = out.splitlines()
    assert lines[0] == "error: unguarded-route: routes[mtls]"
    assert lines[1].startswith("  client-cert-auth runs here without the fail-closed guard")
    assert lines[2].startswith("  fix: ")
    assert lines[-1] == "1 error(s), 0 warning(s)"


def test_warnings_alone_exit_0_and_json_output(capsys, pki, write):
    doc = base(pki)
    del doc["services"][0]["ca_certificates"]
    code, out, _ = run(capsys, write(doc, "kong.json"), "--json", "--kong-conf", str(KONG_CONF_EXAMPLE))
    assert code == 0
    result = json.loads(out)
    assert result["summary"] == {"errors": 0, "warnings": 1, "allowed": 0}
    (finding,) = result["findings"]
    assert set(finding) == {"severity", "rule", "path", "message", "fix"}
    assert (finding["severity"], finding["rule"], finding["path"]) == ("warning", "verify-without-ca",
                                                                       "services[svc]")


@pytest.mark.parametrize(("content", "problem"), [
    ("services: [\n", "not valid YAML or JSON at line"),
    ("- 1\n", "expected a declarative config"),
    ("_format_version: '9.9'\n", "_format_version '9.9'"),
    ("_format_version: '3.0'\nroutes: [{name: r, service: gone}]\n", "routes[r]: service 'gone' is not in"),
])
def test_unusable_input_exits_2_with_one_line(capsys, write, content, problem):
    path = write(content)
    code, out, err = run(capsys, path)
    assert (code, out) == (2, "")
    assert err.startswith(f"kong-mtls lint: {path}") and problem in err and err.count("\n") == 1


def test_missing_files_exit_2(capsys, pki, write, tmp_path):
    code, _, err = run(capsys, str(tmp_path / "nope.yml"))
    assert code == 2 and "cannot read" in err
    code, _, err = run(capsys, write(base(pki)), "--kong-conf", str(tmp_path / "nope.conf"))
    assert code == 2 and "--kong-conf" in err


# -- the Admin API ---------------------------------------------------------------------------------------

class FakeAdmin(BaseHTTPRequestHandler):
    """Kong's Admin API as far as lint reads it: DB-less `GET /config`, or paginated entities."""

    declarative: dict[str, Any] | None = None
    entities: dict[str, list[Any]] = {}
    seen: list[str] = []

    def do_GET(self) -> None:
        type(self).seen.append(self.path)
        if self.headers.get("Kong-Admin-Token") != "t0ken":
            return self._answer(401, {"message": "Invalid credentials"})
        url = urlsplit(self.path)
        if url.path == "/config":
            if self.declarative is None:
                return self._answer(400, {"message": "this endpoint is only available when Kong is "
                                                     "configured to not use a database"})
            return self._answer(200, {"config": yaml.safe_dump(self.declarative)})
        rows = self.entities.get(url.path.strip("/"))
        if rows is None:
            return self._answer(404, {"message": "Not found"})
        offset = int(parse_qs(url.query).get("offset", ["0"])[0])
        page = rows[offset:offset + 2]  # tiny pages: pagination is exercised
        more = offset + 2 < len(rows)
        return self._answer(200, {"data": page, "next": f"{url.path}?offset={offset + 2}" if more else None})

    def _answer(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def admin() -> Iterator[tuple[str, type[FakeAdmin]]]:
    handler = type("Admin", (FakeAdmin,), {"declarative": None, "entities": {}, "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def test_admin_db_less_reads_get_config(capsys, pki, admin):
    url, handler = admin
    handler.declarative = set_plugins(base(pki), "key", [{"name": "api-key-auth"}])
    code, out, _ = run(capsys, "--admin", url, "--admin-header", "Kong-Admin-Token: t0ken")
    assert code == 1 and "unguarded-route: routes[key]" in out
    assert handler.seen == ["/config"]


def test_admin_with_a_database_reads_every_page_of_the_entity_endpoints(capsys, pki, admin):
    url, handler = admin
    service_id = "00000000-0000-4000-8000-000000000501"
    routes, plugins = [], [{"id": "p0", "name": "client-cert-request", "route": None, "service": None,
                            "consumer": None, "config": {"disable_session_reuse": True}, "enabled": True}]
    for n in range(5):
        route_id = f"00000000-0000-4000-8000-00000000060{n}"
        routes.append({"id": route_id, "name": f"r{n}", "protocols": ["https"],
                       "service": {"id": service_id}})
        plugins.append({"id": f"p{n + 1}", "name": "api-key-auth", "route": {"id": route_id}, "service": None,
                        "consumer": None, "config": {"key_names": ["apikey"]}, "enabled": True})
    plugins.append({"id": "g", "name": "kong-mtls-guard", "route": None, "service": {"id": service_id},
                    "consumer": None, "config": {"require": None}, "enabled": True})
    handler.entities = {
        "services": [{"id": service_id, "name": "svc", "protocol": "https", "host": "up.example", "port": 443,
                      "tls_verify": None, "ca_certificates": None, "client_certificate": None}],
        "routes": routes, "plugins": plugins, "consumers": [], "certificates": [], "ca_certificates": [],
    }
    header = ("--admin-header", "Kong-Admin-Token: t0ken")
    code, out, _ = run(capsys, "--admin", url, *header, "--kong-conf", str(KONG_CONF_EXAMPLE))
    assert (code, out.strip()) == (0, "no findings")
    assert sum(path.startswith("/routes") for path in handler.seen) == 3  # 5 routes, pages of 2
    # The guard on the service is displaced on the routes where a route's own config of it exists.
    plugins.append({"id": "x", "name": "kong-mtls-guard", "route": {"id": routes[3]["id"]}, "service": None,
                    "consumer": None, "config": {"require": ["ip-allowlist"]}, "enabled": True})
    code, out, _ = run(capsys, "--admin", url, *header, "--kong-conf", str(KONG_CONF_EXAMPLE))
    assert code == 1 and "guard-displaced: routes[r3]" in out and "routes[r2]" not in out


def test_admin_problems_exit_2(capsys, admin):
    url, _handler = admin
    code, _, err = run(capsys, "--admin", url)
    assert code == 2 and "401" in err and "--admin-header" in err
    code, _, err = run(capsys, "--admin", "http://127.0.0.1:1")
    assert code == 2 and "cannot reach the Admin API" in err
    code, _, err = run(capsys, "--admin", "localhost:8001")
    assert code == 2 and "expected http(s)://host:port" in err
    code, _, err = run(capsys, "--admin", url, "--admin-header", "no colon")
    assert code == 2 and "expected 'Name: value'" in err


def test_yaml_alias_bombs_and_cycles_are_refused(capsys, write):
    bomb = "_format_version: '3.0'\na: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{name}: &{name} [{', '.join(['*' + prev] * 10)}]\n" for prev, name in zip("abcdefgh", "bcdefghi"))
    for content in (bomb, "_format_version: '3.0'\nplugins: &p [*p]\n"):
        code, out, err = run(capsys, write(content))
        assert (code, out) == (2, "") and "once YAML aliases are expanded" in err


def test_admin_secrets_stay_home(capsys, admin):
    """The token never follows a redirect, and no credential is ever echoed (guard review)."""
    url, _handler = admin
    elsewhere = ThreadingHTTPServer(("127.0.0.1", 0), type("Elsewhere", (FakeAdmin,), {"seen": []}))
    seen_elsewhere: list[str] = []

    class Redirecting(FakeAdmin):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{elsewhere.server_address[1]}/config")
            self.end_headers()

    redirecting = ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (elsewhere, redirecting)]
    for thread in threads:
        thread.start()
    try:
        code, out, err = run(capsys, "--admin", f"http://127.0.0.1:{redirecting.server_address[1]}",
                             "--admin-header", "Kong-Admin-Token: SECRETTOKEN")
        seen_elsewhere.extend(elsewhere.RequestHandlerClass.seen)
        assert code == 2 and "SECRETTOKEN" not in out + err
        assert seen_elsewhere == []
    finally:
        for server in (elsewhere, redirecting):
            server.shutdown()
            server.server_close()
    for args in (["--admin", url.replace("http://", "http://admin:SECRETPASS@")],
                 ["--admin", url + "/?token=SECRETQ"],
                 ["--admin", url, "--admin-header", "Kong-Admin-Token SECRETTOKEN"],
                 ["--admin", "http://[::1"]):
        code, out, err = run(capsys, *args)
        assert code == 2 and "SECRET" not in out + err, (args, err)
