"""`kong-mtls cloudflare-ranges` against a local HTTP server on loopback serving copies of the lists."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kong_mtls.cli import main
from kong_mtls.commands.cloudflare import EXIT_CHANGED, EXIT_FETCH_FAILED, MAX_BODY_BYTES
from kong_mtls.kong.ip_allowlist import Plugin
from kong_mtls.presets import cidr_list, read_cidr_list

SHIPPED = cidr_list("cloudflare")
V4_TEXT = "\n".join(SHIPPED.ipv4_cidrs)            # Cloudflare serves no trailing newline
V6_TEXT = "\n".join(SHIPPED.ipv6_cidrs) + "\n"


class Mirror:
    """Routes path -> (status, body, headers); `hang` paths wait until the test ends."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, bytes, dict[str, str]]] = {}
        self.released = threading.Event()
        self.requests: list[tuple[str, str]] = []
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                mirror.requests.append((self.path, self.headers.get("User-Agent", "")))
                if self.path == "/hang":
                    mirror.released.wait(10)
                    return
                status, body, headers = mirror.routes.get(self.path, (404, b"not found", {}))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def serve(self, path: str, body: str | bytes, status: int = 200, **headers: str) -> str:
        self.routes[path] = (status, body.encode() if isinstance(body, str) else body, headers)
        return self.base + path


@pytest.fixture
def mirror(monkeypatch) -> Iterator[Mirror]:
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    m = Mirror()
    thread = threading.Thread(target=m.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield m
    m.released.set()
    m.server.shutdown()
    m.server.server_close()


def run_cli(mirror: Mirror, *args: str, v4: str = V4_TEXT, v6: str = V6_TEXT) -> int:
    return main(["cloudflare-ranges", "--v4-url", mirror.serve("/ips-v4", v4),
                 "--v6-url", mirror.serve("/ips-v6", v6), "--timeout", "5", *args])


def test_unchanged_lists_are_written_and_loadable_by_the_plugin(mirror, tmp_path, capsys):
    out = tmp_path / "cloudflare.json"
    assert run_cli(mirror, "--output", str(out), "--check") == 0
    stdout = capsys.readouterr().out
    assert "0 added, 0 removed, 22 unchanged" in stdout
    assert f"wrote 22 ranges to {out}" in stdout
    written = read_cidr_list(out)
    assert written.name == "cloudflare" and written.cidrs == SHIPPED.cidrs
    assert written.taken.endswith("Z") and "/ips-v4" in written.source
    plugin = Plugin({"source": "header", "header_name": "CF-Connecting-IP",
                     "trusted_proxies_presets": ["cloudflare"], "preset_files": {"cloudflare": str(out)}})
    assert plugin.policy.decide("173.245.48.1", header="203.0.113.1").allowed
    assert all(agent.startswith("kong-mtls/") for _, agent in mirror.requests)


def test_changes_are_shown_as_a_diff_and_fail_check(mirror, tmp_path, capsys):
    v4 = V4_TEXT.replace("131.0.72.0/22", "192.0.2.0/24")
    v6 = "2400:CB00::/32\n\n" + "\n".join(SHIPPED.ipv6_cidrs[1:]) + "\n2001:db8::/32\n"
    out = tmp_path / "cloudflare.json"
    assert run_cli(mirror, "--check", "-o", str(out), v4=v4, v6=v6) == EXIT_CHANGED
    lines = capsys.readouterr().out.splitlines()
    assert "+ 192.0.2.0/24" in lines and "+ 2001:db8::/32" in lines
    assert "- 131.0.72.0/22" in lines
    assert "- 2400:cb00::/32" not in lines                       # same range, other spelling
    assert "2 added, 1 removed, 21 unchanged" in lines
    assert "192.0.2.0/24" in read_cidr_list(out).ipv4_cidrs
    # Without --check a difference is not a failure; --compare diffs against the written file.
    assert run_cli(mirror, "--compare", str(out), v4=v4, v6=v6) == 0
    assert "0 added, 0 removed" in capsys.readouterr().out


def test_api_source(mirror, tmp_path, capsys):
    result = {"ipv4_cidrs": list(SHIPPED.ipv4_cidrs), "ipv6_cidrs": list(SHIPPED.ipv6_cidrs),
              "etag": "38f79d050aa027e3be3865e495dcc9bc"}
    body = json.dumps({"success": True, "errors": [], "messages": [], "result": result})
    url = mirror.serve("/client/v4/ips", body, **{"Content-Type": "application/json"})
    out = tmp_path / "cf.json"
    assert main(["cloudflare-ranges", "--from", "api", "--api-url", url, "-o", str(out)]) == 0
    assert "0 added, 0 removed" in capsys.readouterr().out
    written = read_cidr_list(out)
    assert written.cidrs == SHIPPED.cidrs and "etag 38f79d050aa027e3be3865e495dcc9bc" in written.source


@pytest.mark.parametrize(("body", "problem"), [
    ({"success": False, "errors": [{"code": 10000, "message": "Authentication error"}], "result": None},
     "did not answer success"),
    ({"success": True, "result": {"ipv4_cidrs": ["173.245.48.0/20"], "ipv6_cidrs": "2400:cb00::/32"}},
     "result.ipv6_cidrs is not a list"),
    ({"success": True, "result": {"ipv4_cidrs": [], "ipv6_cidrs": ["2400:cb00::/32"]}}, "empty list"),
    ("not json", "not valid JSON"),
])
def test_api_errors(mirror, capsys, body, problem):
    url = mirror.serve("/api", body if isinstance(body, str) else json.dumps(body))
    assert main(["cloudflare-ranges", "--from", "api", "--api-url", url]) == EXIT_FETCH_FAILED
    assert problem in capsys.readouterr().err


@pytest.mark.parametrize(("v4", "problem"), [
    ("<!DOCTYPE html><html>Attention Required!</html>", "entry 1"),
    ("173.245.48.0/20\n2400:cb00::/32", "entry 2: '2400:cb00::/32' is not an IPv4 CIDR"),
    ("173.245.48.0/20\n0.0.0.0/0", "wider than /8"),
    ("173.245.48.1/20", "host bits set"),
    ("", "empty list"),
    ("173.245.48.0/20\n\u00e9", "non-ASCII"),
])
def test_implausible_lists_are_refused_and_nothing_is_written(mirror, tmp_path, capsys, v4, problem):
    out = tmp_path / "cf.json"
    assert run_cli(mirror, "-o", str(out), v4=v4) == EXIT_FETCH_FAILED
    err = capsys.readouterr().err
    assert err.startswith("kong-mtls cloudflare-ranges: ") and problem in err
    assert not out.exists()


def test_http_error_and_oversized_answer(mirror, capsys):
    url = mirror.serve("/gone", "nope", status=503)
    assert main(["cloudflare-ranges", "--v4-url", url]) == EXIT_FETCH_FAILED
    assert "HTTP 503" in capsys.readouterr().err
    big = mirror.serve("/big", b"1" * (MAX_BODY_BYTES + 10))
    assert main(["cloudflare-ranges", "--v4-url", big]) == EXIT_FETCH_FAILED
    assert "larger than" in capsys.readouterr().err


def test_timeout(mirror, capsys):
    args = ["cloudflare-ranges", "--v4-url", mirror.base + "/hang", "--timeout", "0.3"]
    assert main(args) == EXIT_FETCH_FAILED
    assert "timed out" in capsys.readouterr().err


def test_connection_refused(mirror, capsys):
    port = mirror.server.server_address[1]
    mirror.server.shutdown()
    mirror.server.server_close()
    assert main(["cloudflare-ranges", "--v4-url", f"http://127.0.0.1:{port}/ips-v4"]) == EXIT_FETCH_FAILED
    assert "refused" in capsys.readouterr().err.lower()


def test_plain_http_is_only_accepted_to_loopback(mirror, capsys):
    assert main(["cloudflare-ranges", "--v4-url", "http://www.cloudflare.com/ips-v4"]) == 2
    assert "only https://" in capsys.readouterr().err
    to_plain = mirror.serve("/moved", "", status=302, Location="http://example.com/ips-v4")
    assert main(["cloudflare-ranges", "--v4-url", to_plain]) == EXIT_FETCH_FAILED
    assert "redirected to a refused URL" in capsys.readouterr().err


def test_bad_arguments(mirror, tmp_path, capsys):
    assert run_cli(mirror, "--timeout", "0") == 2
    assert "--timeout" in capsys.readouterr().err
    assert run_cli(mirror, "--compare", str(tmp_path / "missing.json")) == 2
    assert "cannot read" in capsys.readouterr().err
    assert run_cli(mirror, "-o", str(tmp_path / "no-such-dir" / "cf.json")) == 2
    assert "cannot write" in capsys.readouterr().err
