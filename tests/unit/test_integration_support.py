"""The pure helpers of the integration suite (tests/integration/support.py), and the compose file
the Docker runner reads."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid

import pytest
import yaml

from kong_mtls.constants import GUARD, PLUGIN_MODULES
from kong_mtls.guard import post_function_guards
from tests.integration.support import (
    COMPOSE_FILE,
    ECHO_ADDRESS,
    KONG_CONF_EXAMPLE,
    LUA_DIR,
    SIGNAL_SCRIPT,
    STAND_IN_CLOUDFLARE,
    TEMPLATES_DIR,
    adapt_config,
    cloudflare_test_config,
    find_route,
    load_dev_config,
    local_kong_conf,
    parse_kong_conf,
    parse_kong_version,
    pluginserver_key,
    route_plugin,
    with_post_function_guards,
    with_route_plugins,
)

PORTS = {"http": 18000, "https": 18443, "admin": 18001}


def test_parse_kong_conf_skips_comments_and_refuses_garbage() -> None:
    text = "# c\n\nplugins = bundled,x\n  a_b =  1 2 \n"
    assert parse_kong_conf(text) == {"plugins": "bundled,x", "a_b": "1 2"}
    with pytest.raises(ValueError, match="line 2"):
        parse_kong_conf("a = 1\nnot a setting\n")


@pytest.mark.parametrize(("output", "version"), [("Kong 2.8.5\n", (2, 8, 5)), ("3.9.1\n", (3, 9, 1)),
                                                  ("Kong Enterprise 3.4.3.12", (3, 4, 3))])
def test_parse_kong_version(output: str, version: tuple[int, int, int]) -> None:
    assert parse_kong_version(output) == version


def test_pluginserver_key_uses_kongs_dash_rule() -> None:
    assert pluginserver_key("client-cert-auth", "socket") == "pluginserver_client_cert_auth_socket"


def _local_conf(version: tuple[int, int, int], plugins: list[str], **kwargs) -> dict[str, str]:
    example = parse_kong_conf(KONG_CONF_EXAMPLE.read_text())
    text = local_kong_conf(example, prefix="/t/p", python="/v/bin/python", plugins=plugins,
                           declarative_config="/t/kong.yml", ports=PORTS,
                           ssl_cert="/t/s.pem", ssl_cert_key="/t/s.key", kong_version=version, **kwargs)
    return parse_kong_conf(text)


def test_local_kong_conf_starts_the_plugin_servers_from_this_environment() -> None:
    conf = _local_conf((3, 9, 1), ["ip-allowlist", "api-key-auth"])
    assert conf["plugins"] == "bundled,ip-allowlist,api-key-auth,kong-mtls-guard"
    assert conf["lua_package_path"] == f"{LUA_DIR}/?.lua;;"   # the guard from this checkout
    assert (LUA_DIR / "kong" / "plugins" / "kong-mtls-guard" / "handler.lua").is_file()
    assert conf["pluginserver_names"] == "ip-allowlist,api-key-auth"
    assert conf["pluginserver_api_key_auth_socket"] == "/t/p/api-key-auth.sock"
    command = "/v/bin/python -m kong_mtls.kong.api_key_auth"
    assert conf["pluginserver_api_key_auth_start_cmd"] == f"{command} -p /t/p"
    assert conf["pluginserver_api_key_auth_query_cmd"] == f"{command} --dump"
    assert not any(key.startswith("pluginserver_client_cert_auth") for key in conf)   # not registered
    # Option B (the global client-cert-request of the examples): nginx asks for nothing itself.
    assert "nginx_proxy_ssl_verify_client" not in conf
    assert conf["proxy_listen"] == "127.0.0.1:18000, 127.0.0.1:18443 ssl"
    assert (conf["database"], conf["declarative_config"]) == ("off", "/t/kong.yml")
    assert conf["admin_gui_listen"] == "off"
    assert "nginx_user" not in conf


def test_local_kong_conf_for_kong_2_8_and_root() -> None:
    conf = _local_conf((2, 8, 5), [], nginx_user="root root")
    assert "admin_gui_listen" not in conf             # Kong Manager OSS came with 3.4
    assert "pluginserver_names" not in conf
    assert (conf["plugins"], conf["nginx_user"]) == ("bundled,kong-mtls-guard", "root root")


CONFIG = {
    "_format_version": "3.0",
    "services": [{
        "name": "echo", "url": f"https://{ECHO_ADDRESS}",
        "routes": [
            {"name": "open", "paths": ["/open"]},
            {"name": "cert", "plugins": [{"name": "client-cert-auth", "config": {}}]},
            {"name": "groups", "plugins": [{"name": "acl", "config": {
                "allow": ["a"], "always_use_authenticated_groups": True}}]},
        ],
    }],
}


def test_adapt_config_drops_routes_of_missing_plugins_and_moves_upstreams() -> None:
    out = adapt_config(CONFIG, available=["ip-allowlist"], kong_version=(3, 9, 1),
                       upstreams={ECHO_ADDRESS: "localhost:4321"})
    assert [r["name"] for r in out["services"][0]["routes"]] == ["open", "groups"]
    assert out["services"][0]["url"] == "https://localhost:4321"
    assert route_plugin(find_route(out, "groups"), "acl")["config"]["always_use_authenticated_groups"] is True
    assert out["_format_version"] == "3.0"
    assert len(CONFIG["services"][0]["routes"]) == 3                  # the input is not changed


def test_adapt_config_for_older_kongs() -> None:
    older = adapt_config(CONFIG, available=["client-cert-auth"], kong_version=(3, 4, 2))
    acl = route_plugin(find_route(older, "groups"), "acl")["config"]
    assert acl == {"allow": ["a"]}                                    # the option came with Kong 3.8
    assert adapt_config(CONFIG, available=[], kong_version=(2, 8, 5))["_format_version"] == "2.1"


def test_cloudflare_test_config_stands_in_for_cloudflare_on_one_route_only() -> None:
    ip = {"source": "header", "header_name": "CF-Connecting-IP", "trusted_proxies_presets": ["cloudflare"]}
    config = {"_format_version": "3.0", "services": [{"name": "orders", "routes": [{
        "name": "orders", "paths": ["/orders"],
        "plugins": [{"name": "ip-allowlist", "config": dict(ip)},
                    {"name": "client-cert-auth", "config": {"ca_presets": ["cloudflare-origin-pull"]}}]}]}]}
    out = cloudflare_test_config(config, aop_ca_file="/pki/aop/ca.pem")
    orders, real = find_route(out, "orders"), find_route(out, "orders-real")
    assert route_plugin(orders, "ip-allowlist")["config"]["trusted_proxies"] == STAND_IN_CLOUDFLARE
    assert route_plugin(real, "ip-allowlist")["config"] == ip
    assert real["paths"] == ["/orders-real"]
    for route in (orders, real):
        assert route_plugin(route, "client-cert-auth")["config"] == {
            "ca_certificate_files": ["/pki/aop/ca.pem"], "revocation_check_mode": "SKIP"}
    assert find_route(out, "public")["paths"] == ["/public"]
    assert "trusted_proxies" not in route_plugin(find_route(config, "orders"), "ip-allowlist")["config"]


def test_with_route_plugins_replaces_one_routes_plugins() -> None:
    out = with_route_plugins(CONFIG, "open", [{"name": "api-key-auth", "config": {}}])
    assert find_route(out, "open")["plugins"] == [{"name": "api-key-auth", "config": {}}]
    assert "plugins" not in find_route(CONFIG, "open")


def test_signal_script_finds_and_signals_processes_by_command_line() -> None:
    marker = f"kong-mtls-signal-test-{uuid.uuid4().hex}"
    child = subprocess.Popen([sys.executable, "-c", "import time, sys; time.sleep(60)", marker])
    try:
        def run(signum: int) -> list[int]:
            result = subprocess.run([sys.executable, "-c", SIGNAL_SCRIPT, marker, str(signum)],
                                    capture_output=True, text=True, timeout=30, check=True)
            return json.loads(result.stdout)

        assert run(0) == [child.pid]
        assert child.poll() is None                                   # signal 0 only lists
        assert run(int(signal.SIGTERM)) == [child.pid]
        assert child.wait(timeout=10) == -signal.SIGTERM
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_compose_file_is_what_the_docker_runner_reads() -> None:
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    assert services["kong"]["build"]["dockerfile"] == "docker/Dockerfile"
    assert services["kong"]["environment"]["KONG_DECLARATIVE_CONFIG"] == "/pki/config/kong.yml"
    assert services["pki-init"]["command"] == ["/pki", "/opt/kong-mtls/share/kong"]
    assert "upstream" in services["impostor"]["networks"]["default"]["aliases"]
    for name in ("pki-init", "echo", "impostor", "kong"):
        text = json.dumps(services[name])
        assert "${" not in text, f"{name}: the runner does not interpolate variables"
    assert services["kong"]["depends_on"]["pki-init"]["condition"] == "service_completed_successfully"


def _unguarded(config: dict, loaded: str) -> list[str]:
    """The lint findings that a route of ours runs without a guard, or with one that cannot run, on
    a Kong whose kong.conf `plugins` is `loaded`."""
    from kong_mtls.lint.model import normalise
    from kong_mtls.lint.plugin_checks import check_plugin
    from kong_mtls.lint.rules import Context, lint

    kong_conf = {**parse_kong_conf(KONG_CONF_EXAMPLE.read_text()), "plugins": loaded}
    findings = lint(Context(normalise(json.loads(json.dumps(config))), kong_conf, check_plugin, 0.0))
    return [f"{f.rule} {f.path}" for f in findings if f.rule in ("unguarded-route", "guard-without-plugin")]


def test_with_post_function_guards_guards_every_route_of_ours_in_kong_yml(tmp_path) -> None:
    """The fallback Kong of test_g1 (kong-mtls-guard not loaded): every route with a plugin of ours
    gets a post-function guard, as lint sees it, and no kong-mtls-guard entry is left."""
    load_dev_config().prepare(tmp_path, [str(TEMPLATES_DIR)])
    config = yaml.safe_load((tmp_path / "config" / "kong.yml").read_text())
    fallback = with_post_function_guards(config)
    assert GUARD not in json.dumps(fallback)
    assert _unguarded(fallback, "bundled," + ",".join(PLUGIN_MODULES)) == []
    assert _unguarded(config | {"plugins": []}, "bundled," + ",".join(PLUGIN_MODULES))  # the check can fail


def test_with_post_function_guards_sees_plugins_of_ours_on_services_and_globally() -> None:
    """Kong runs a Service's and a global plugin on every route they reach: those routes need the
    fallback guard too, requiring those plugins' marks."""
    config = {
        "_format_version": "3.0",
        "plugins": [{"name": "ip-allowlist", "config": {"allow": ["192.0.2.0/24"]}}, {"name": GUARD}],
        "services": [{
            "name": "svc", "url": "http://up.example",
            "plugins": [{"name": "api-key-auth", "config": {"key_names": ["apikey"]}}],
            "routes": [{"name": "plain", "paths": ["/plain"]}],
        }],
    }
    fallback = with_post_function_guards(config)
    assert _unguarded(fallback, "bundled," + ",".join(PLUGIN_MODULES)) == []
    (guard,) = find_route(fallback, "plain")["plugins"]
    assert guard["name"] == "post-function"
    assert set(post_function_guards(guard["config"]["access"])) == {"ip-allowlist", "api-key-auth"}
