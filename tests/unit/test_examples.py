"""The shipped examples: kong.conf.example and every kong/*.yml.

* kong.conf.example registers every plugin server (socket, start and query commands) and asks
  clients for a certificate;
* every kong/*.yml, rendered with a fresh dev PKI as the image renders it (docker/dev_config.py),
  is a `_format_version: "3.0"` config in which every config of our plugins builds its plugin
  (`Plugin(config)`: the schema, then the core's own checks), and every route using one of our
  plugins meets the fail-closed guard (kong-mtls-guard) for at least those plugins;
* the main examples behave as docs/deployment.md says (decided by the plugins' cores).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kong_mtls.constants import GUARD
from kong_mtls.guard import GUARDED_PLUGINS
from tests.integration.support import (
    KONG_CONF_EXAMPLE,
    PLUGIN_MODULES,
    ROOT,
    TEMPLATES_DIR,
    find_route,
    iter_routes,
    load_dev_config,
    parse_kong_conf,
    pluginserver_key,
    route_plugin,
    route_plugins,
)

TEMPLATES = sorted(TEMPLATES_DIR.glob("*.yml"))
CONSUMERS = {name: {"id": f"00000000-0000-4000-8000-00000000000{i}", "username": name}
             for i, name in enumerate(("alice", "bob"), start=1)}


def plugin_module(name: str) -> Any:
    """The plugin's Kong adapter module; skips the test when it is not written yet."""
    module = PLUGIN_MODULES[name]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} does not exist yet")
    return importlib.import_module(module)


# -- kong.conf.example -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def conf() -> dict[str, str]:
    return parse_kong_conf(KONG_CONF_EXAMPLE.read_text())


@pytest.mark.parametrize("name", list(PLUGIN_MODULES))
def test_kong_conf_registers_every_plugin_server(conf: dict[str, str], name: str) -> None:
    assert name in conf["plugins"].split(",")
    assert name in conf["pluginserver_names"].split(",")
    prefix = "/usr/local/kong"
    entry = f"/opt/kong-mtls/bin/kong-mtls-{name}"
    assert conf[pluginserver_key(name, "socket")] == f"{prefix}/{name}.sock"   # where kong-pdk listens
    assert conf[pluginserver_key(name, "start_cmd")] == f"{entry} -p {prefix}"
    assert conf[pluginserver_key(name, "query_cmd")] == f"{entry} --dump"
    # ... and that console script is the plugin's entry point.
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'kong-mtls-{name} = "{PLUGIN_MODULES[name]}:main"' in pyproject


def test_kong_conf_asks_clients_for_a_certificate_and_names_nothing_unknown(conf: dict[str, str]) -> None:
    assert conf["plugins"].split(",")[0] == "bundled"
    # Option B: the examples' global client-cert-request asks; nginx's optional_no_ca (option A)
    # would hand the plugin no certificate on a resumed TLS session.
    assert "nginx_proxy_ssl_verify_client" not in conf
    assert conf["admin_gui_listen"] == "off"
    registered = set(conf["pluginserver_names"].split(","))
    for key in conf:
        if key.startswith("pluginserver_") and key != "pluginserver_names":
            assert any(key.startswith(pluginserver_key(name, "")) for name in registered), key


def test_every_kong_conf_setting_is_commented() -> None:
    lines = KONG_CONF_EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip() and not line.lstrip().startswith("#"):
            assert i > 0 and lines[i - 1].lstrip().startswith("#"), f"no comment above: {line}"


# -- kong/*.yml ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every template rendered with a new dev PKI, parsed; plus where the PKI is."""
    pki = tmp_path_factory.mktemp("pki")
    outputs = load_dev_config().prepare(pki, [str(TEMPLATES_DIR)])
    configs = {out.name: yaml.safe_load(out.read_text()) for out in outputs}
    return {"pki": pki, "configs": configs, "texts": {out.name: out.read_text() for out in outputs}}


def test_there_are_examples_to_check() -> None:
    names = {path.name for path in TEMPLATES}
    assert {"kong.yml", "cloudflare-origin-lock.yml"} <= names


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda path: path.name)
def test_example_is_a_3_0_config_with_every_placeholder_filled(rendered: dict, template: Path) -> None:
    config = rendered["configs"][template.name]
    assert config["_format_version"] == "3.0"
    leftovers = [line for line in rendered["texts"][template.name].splitlines()
                 if re.search(r'"@(pki|pki-path|api-key-hash):', line) and not line.lstrip().startswith("#")]
    assert leftovers == []


def _our_plugin_entries() -> Iterator[tuple[str, str, str, int]]:
    """(template, route, plugin, index) for every config of our plugins in every template."""
    for template in TEMPLATES:
        for route in iter_routes(yaml.safe_load(template.read_text())):
            for index, plugin in enumerate(route.get("plugins") or ()):
                if plugin["name"] in PLUGIN_MODULES:
                    yield template.name, route["name"], plugin["name"], index


@pytest.mark.parametrize(("template", "route_name", "plugin_name", "index"), list(_our_plugin_entries()),
                         ids=lambda value: str(value))
def test_every_config_of_our_plugins_builds_its_plugin(rendered: dict, template: str, route_name: str,
                                                       plugin_name: str, index: int) -> None:
    module = plugin_module(plugin_name)
    plugin = find_route(rendered["configs"][template], route_name)["plugins"][index]
    assert plugin["name"] == plugin_name
    module.Plugin(plugin["config"])


def _effective_guard(config: dict, service: dict, route: dict) -> dict | None:
    """The kong-mtls-guard entry Kong runs for `route`: its own, else its Service's, else the global
    one (Kong runs the most specific config of a plugin)."""
    for scope in (route, service, config):
        guards = [p for p in scope.get("plugins") or () if p["name"] == GUARD]
        assert len(guards) <= 1
        if guards:
            return guards[0]
    return None


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda path: path.name)
def test_every_protected_route_is_guarded_for_all_of_its_plugins(template: Path) -> None:
    """Every route using one of our plugins meets kong-mtls-guard, in auto mode or requiring at
    least those plugins; the shipped examples use the plugin, not the post-function fallback."""
    config = yaml.safe_load(template.read_text())
    checked = 0
    for service in config.get("services") or ():
        for route in service.get("routes") or ():
            ours = [name for name in GUARDED_PLUGINS if name in route_plugins(route)]
            assert "post-function" not in route_plugins(route), route["name"]
            if not ours:
                continue
            guard = _effective_guard(config, service, route)
            assert guard is not None, f"route {route['name']}: no kong-mtls-guard"
            required = (guard.get("config") or {}).get("require")
            assert required is None or set(ours) <= set(required), f"route {route['name']}: {required}"
            checked += 1
    assert checked, "no protected route in this example"
    # Our guarded plugins only on routes, where the guard sees them.
    outside = [p["name"] for p in config.get("plugins") or ()]
    outside += [p["name"] for s in config.get("services") or () for p in s.get("plugins") or ()]
    assert not set(outside) & set(GUARDED_PLUGINS)


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda path: path.name)
def test_example_is_lint_clean(rendered: dict, template: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`kong-mtls lint` over each rendered example with kong.conf.example: no finding, except those its
    comments justify and its tags allow (CI runs this)."""
    from kong_mtls.cli import main

    path = rendered["pki"] / "config" / template.name
    code = main(["lint", str(path), "--kong-conf", str(KONG_CONF_EXAMPLE), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert (code, result["findings"]) == (0, [])
    allowed = {(f["rule"], f["path"]) for f in result["allowed"]}
    assert allowed == ({("report-only", "routes[aop-report-only].plugins[client-cert-auth]")}
                       if template.name == "kong.yml" else set())


# -- what the main examples do --------------------------------------------------------------------------

def _chain(pki: Path, name: str) -> str:
    return (pki / f"{name}.pem").read_text()


def _cert_decision(rendered: dict, route: str, cert: str | None, template: str = "kong.yml") -> Any:
    module = plugin_module("client-cert-auth")
    config = route_plugin(find_route(rendered["configs"][template], route), "client-cert-auth")["config"]
    pem = _chain(rendered["pki"], cert) if cert else None
    return module.Plugin(config).authenticator.authenticate(pem, CONSUMERS.get)


def test_mtls_route_maps_alice_by_spiffe_id_and_bob_by_username_with_ou_groups(rendered: dict) -> None:
    alice = _cert_decision(rendered, "mtls", "clients/alice")
    bob = _cert_decision(rendered, "mtls", "clients/bob")
    assert (alice.allowed, alice.consumer["username"], alice.via.name) == (True, "alice", "MAPPING")
    assert (bob.allowed, bob.consumer["username"]) == (True, "bob")
    assert {"payments", "admins"} <= set(alice.groups) and "payments" not in bob.groups
    for cert in ("clients/stranger", None, "aop/client"):
        refused = _cert_decision(rendered, "mtls", cert)
        assert (refused.allowed, refused.status) == (False, 401), cert
    # The path must end at the root: a leaf without its intermediate does not verify.
    module = plugin_module("client-cert-auth")
    config = route_plugin(find_route(rendered["configs"]["kong.yml"], "mtls"), "client-cert-auth")["config"]
    full = _chain(rendered["pki"], "clients/alice")
    leaf = full[:full.index("-----END CERTIFICATE-----\n") + len("-----END CERTIFICATE-----\n")]
    assert leaf != full and not module.Plugin(config).authenticator.authenticate(leaf, CONSUMERS.get).allowed


@pytest.mark.parametrize("example", ["kong.yml", "cloudflare-origin-lock.yml"])
def test_examples_that_verify_client_certificates_request_them_globally(rendered: dict, example: str) -> None:
    config = rendered["configs"][example]
    assert [p["name"] for p in config.get("plugins") or ()][:1] == ["client-cert-request"]


def test_aop_routes_accept_only_the_stand_in_ca_and_report_only_lets_all_through(rendered: dict) -> None:
    assert _cert_decision(rendered, "aop", "aop/client").allowed
    for cert in ("clients/alice", None):
        assert not _cert_decision(rendered, "aop", cert).allowed
        report = _cert_decision(rendered, "aop-report-only", cert)
        assert report.allowed and report.reason is not None


def test_key_routes_accept_the_generated_dev_keys(rendered: dict) -> None:
    plugin_module("api-key-auth")
    from kong_mtls.core.api_keys import ApiKeyAuth, Outcome

    pki, config = rendered["pki"], rendered["configs"]["kong.yml"]

    def decide(route: str, key: str, cert_mark: Any = None) -> Any:
        auth = ApiKeyAuth.from_config(route_plugin(find_route(config, route), "api-key-auth")["config"])
        return auth.authenticate(load_headers=lambda: {"apikey": [key]}, load_query=dict, load_body=dict,
                                 load_consumer=CONSUMERS.get, load_client_ip=lambda: "127.0.0.1",
                                 load_cert_mark=lambda: cert_mark)

    key = (pki / "api-keys" / "ak_alice_dev.key").read_text().strip()
    bound = (pki / "api-keys" / "ak_alice_bound.key").read_text().strip()
    assert decide("key", key).consumer["username"] == "alice"
    assert decide("key", key + "x").outcome is Outcome.REFUSED
    alice_mark = {"verified": True, "consumer_id": CONSUMERS["alice"]["id"]}
    assert decide("key-bound", bound, alice_mark).outcome is Outcome.AUTHENTICATED
    assert decide("key-bound", bound, None).outcome is Outcome.REFUSED


def test_ip_routes_and_the_cloudflare_lock(rendered: dict) -> None:
    module = plugin_module("ip-allowlist")

    def policy(route: str, template: str = "kong.yml") -> Any:
        route_config = find_route(rendered["configs"][template], route)
        return module.Plugin(route_plugin(route_config, "ip-allowlist")["config"]).policy

    assert policy("ip").decide("127.0.0.1").allowed
    assert policy("ip").decide("172.18.0.1").allowed          # Docker's gateway behind a published port
    assert not policy("ip-blocked").decide("127.0.0.1").allowed
    origin = policy("orders", "cloudflare-origin-lock.yml")
    assert not origin.decide("127.0.0.1", header="198.51.100.23").allowed
    from_cloudflare = origin.decide("173.245.48.1", header="198.51.100.23")
    assert (from_cloudflare.allowed, from_cloudflare.client_ip) == (True, "198.51.100.23")


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda path: path.name)
def test_upstream_identity_services_follow_the_recipe(rendered: dict, template: Path) -> None:
    """Every Service with an upstream-identity route is one the plugin accepts (tls_verify, CAs and a
    client certificate entity of its own), its entity is used by no other Service (Kong's pool key),
    and the plugin's probe trusts exactly the Service's CAs ("one issuing CA per upstream identity")."""
    from cryptography import x509

    from kong_mtls.core.upstream import Target, load_certificates, service_tls_problem

    config = rendered["configs"][template.name]
    services = config.get("services") or []
    owners: dict[str, list[str]] = {}
    for service in services:
        if service.get("client_certificate"):
            owners.setdefault(service["client_certificate"], []).append(service["name"])
    cas = {ca["id"]: x509.load_pem_x509_certificate(ca["cert"].encode())
           for ca in config.get("ca_certificates") or ()}
    checked = 0
    for service in services:
        for route in service.get("routes") or ():
            for plugin in route.get("plugins") or ():
                if plugin["name"] != "upstream-identity":
                    continue
                as_kong_gives_it = {**service, "protocol": service["url"].split("://", 1)[0],
                                    "client_certificate": {"id": service["client_certificate"]}}
                assert service_tls_problem(as_kong_gives_it, Target("x", 1)) is None
                assert owners[service["client_certificate"]] == [service["name"]]
                probe_cas = [c for path in plugin["config"]["trusted_ca_files"]
                             for c in load_certificates(Path(path).read_bytes())]
                assert probe_cas == [cas[i] for i in service["ca_certificates"]]
                checked += 1
    assert checked or "upstream-identity" not in rendered["texts"][template.name]
