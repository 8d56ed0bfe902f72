"""`kong-mtls lint`: each rule with a config that triggers it and one that does not.

Every config starts from `base()`, a small deployment that is clean (no finding at all), and
changes one thing. Plugin configs are checked by the real plugins (`plugin_checks.check_plugin`),
with trust anchors from the test PKI.
"""

from __future__ import annotations

import copy
import datetime as dt
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kong_mtls.constants import GUARD
from kong_mtls.guard import lua_guard
from kong_mtls.lint.model import InputError, normalise
from kong_mtls.lint.plugin_checks import check_plugin
from kong_mtls.lint.rules import RULE_IDS, Context, Finding, Severity, access_log_query, lint
from kong_mtls.lint.sources import parse_kong_conf
from tests.integration.support import KONG_CONF_EXAMPLE

CA_ID = "00000000-0000-4000-8000-0000000000ca"
CERT_A = "00000000-0000-4000-8000-00000000000a"
CERT_B = "00000000-0000-4000-8000-00000000000b"
EXAMPLE_CONF = parse_kong_conf(KONG_CONF_EXAMPLE.read_text())
OPTION_A = {**EXAMPLE_CONF, "nginx_proxy_ssl_verify_client": "optional_no_ca"}


def post_function(*plugins: str, extra: str | None = None) -> dict[str, Any]:
    access = [lua_guard(list(plugins))] if plugins else []
    return {"name": "post-function", "config": {"access": access + ([extra] if extra else [])}}


def guard_plugin(require: list[str] | None) -> dict[str, Any]:
    return {"name": GUARD, "config": {"require": require}}


def cert_auth(pki, **config: Any) -> dict[str, Any]:
    return {"name": "client-cert-auth",
            "config": {"ca_certificates": [pki.root.cert_pem], "revocation_check_mode": "SKIP", **config}}


def key_auth(**config: Any) -> dict[str, Any]:
    return {"name": "api-key-auth", "config": {"key_names": ["apikey"], **config}}


def upstream_identity(pki, **config: Any) -> dict[str, Any]:
    return {"name": "upstream-identity",
            "config": {"trusted_ca_pem": pki.root.cert_pem, "expected_dns_names": ["up.example"], **config}}


def base(pki) -> dict[str, Any]:
    """Clean: a global client-cert-request, an mTLS route and a key route, each guarded, on a
    Service that verifies its upstream against a CA of its own."""
    return {
        "_format_version": "3.0",
        "plugins": [{"name": "client-cert-request"}],
        "certificates": [{"id": CERT_A, "cert": "unused", "key": "unused"}],
        "ca_certificates": [{"id": CA_ID, "cert": pki.root.cert_pem}],
        "consumers": [{"username": "alice"}],
        "services": [{
            "name": "svc", "url": "https://up.example:8443", "client_certificate": CERT_A,
            "tls_verify": True, "ca_certificates": [CA_ID],
            "routes": [
                {"name": "mtls", "protocols": ["https"], "paths": ["/m"],
                 "plugins": [cert_auth(pki), post_function("client-cert-auth")]},
                {"name": "key", "protocols": ["https"], "paths": ["/k"],
                 "plugins": [key_auth(), post_function("api-key-auth")]},
            ],
        }],
    }


def route(doc: dict[str, Any], name: str) -> dict[str, Any]:
    for service in doc.get("services", []):
        for item in service.get("routes", []):
            if item["name"] == name:
                return item
    raise KeyError(name)


def set_plugins(doc: dict[str, Any], route_name: str, plugins: list[dict[str, Any]]) -> dict[str, Any]:
    route(doc, route_name)["plugins"] = plugins
    return doc


def run(doc: dict[str, Any], kong_conf: dict[str, str] | None = None,
        now: float | None = None) -> list[Finding]:
    ctx = Context(normalise(copy.deepcopy(doc)), kong_conf, check_plugin, time.time() if now is None else now)
    return lint(ctx)


def rules(doc: dict[str, Any], kong_conf: dict[str, str] | None = EXAMPLE_CONF,
          **kw: Any) -> dict[str, list[Finding]]:
    out: dict[str, list[Finding]] = {}
    for finding in run(doc, kong_conf, **kw):
        assert finding.rule in RULE_IDS
        out.setdefault(finding.rule, []).append(finding)
    return out


def test_the_base_config_is_clean(pki):
    assert run(base(pki), EXAMPLE_CONF) == []


def test_every_rule_id_is_documented():
    from tests.integration.support import ROOT
    text = (ROOT / "docs" / "lint.md").read_text()
    for rule in RULE_IDS:
        assert f"### `{rule}`" in text, rule


# -- the guard ----------------------------------------------------------------------------------------

def test_unguarded_route(pki):
    doc = set_plugins(base(pki), "mtls", [cert_auth(pki)])
    (finding,) = rules(doc)["unguarded-route"]
    assert (finding.severity, finding.path) == (Severity.ERROR, "routes[mtls]")
    assert "client-cert-auth" in finding.message and "kong-mtls guard client-cert-auth" in finding.fix
    # A guard for another plugin does not cover this one.
    doc = set_plugins(base(pki), "mtls", [cert_auth(pki), key_auth(), post_function("api-key-auth")])
    (finding,) = rules(doc)["unguarded-route"]
    assert finding.message.startswith("client-cert-auth runs here")


@pytest.mark.parametrize("where", ["service", "global", "guard-plugin-auto", "guard-plugin-list", "merged"])
def test_a_guard_from_any_scope_covers_the_route(pki, where):
    doc = set_plugins(base(pki), "mtls", [cert_auth(pki)])
    if where == "service":
        doc["services"][0]["plugins"] = [post_function("client-cert-auth")]
    elif where == "global":  # the key route's own guard displaces it there, and covers its plugin
        doc["plugins"].append(post_function("client-cert-auth"))
    elif where == "guard-plugin-auto":
        doc["plugins"].append({"name": GUARD})
    elif where == "guard-plugin-list":
        route(doc, "mtls")["plugins"].append(guard_plugin(["client-cert-auth"]))
    else:  # the user's own post-function code with the guard merged in
        route(doc, "mtls")["plugins"].append(post_function("client-cert-auth", extra="return function() end"))
    assert rules(doc) == {}


def test_a_routes_own_post_function_displaces_the_services_guard(pki):
    doc = set_plugins(base(pki), "mtls", [cert_auth(pki), post_function(extra="kong.log.info('mine')")])
    doc["services"][0]["plugins"] = [post_function("client-cert-auth")]
    found = rules(doc)
    (finding,) = found["guard-displaced"]
    assert "unguarded-route" not in found
    assert finding.path == "routes[mtls]"
    assert "services[svc].plugins[post-function]" in finding.message
    assert "routes[mtls].plugins[post-function]" in finding.message


def test_a_route_and_service_config_outranks_the_route_config(pki):
    doc = base(pki)
    doc["plugins"].append({**post_function(extra="kong.log.info('mine')"), "route": "mtls", "service": "svc"})
    (finding,) = rules(doc)["guard-displaced"]
    assert "plugins[post-function]" in finding.message and "routes[mtls]+services[svc]" in finding.message


def test_a_consumer_post_function_displaces_the_guard_for_that_consumers_requests(pki):
    doc = base(pki)
    doc["consumers"][0]["plugins"] = [post_function(extra="kong.log.info('alice')")]
    found = rules(doc)["guard-displaced"]
    assert {f.path for f in found} == {"routes[mtls]", "routes[key]"}
    assert all("authenticated as alice" in f.message for f in found)
    # The consumer's own config with the guard merged in keeps it.
    doc["consumers"][0]["plugins"] = [post_function("client-cert-auth", "api-key-auth")]
    assert "guard-displaced" not in rules(doc)


def test_disabled_configs_take_no_part(pki):
    doc = base(pki)
    route(doc, "mtls")["plugins"].append({"name": "post-function", "enabled": False,
                                          "config": {"access": ["return"]}})
    # Kong refuses two enabled configs of one plugin on one route; a disabled one is only skipped.
    assert rules(doc) == {}


def test_guard_without_plugin(pki):
    doc = set_plugins(base(pki), "mtls", [cert_auth(pki), post_function("client-cert-auth", "api-key-auth")])
    (finding,) = rules(doc)["guard-without-plugin"]
    assert "api-key-auth" in finding.message and "503" in finding.message
    doc = set_plugins(base(pki), "mtls", [cert_auth(pki), guard_plugin(["ip-allowlist"])])
    found = rules(doc)
    assert "ip-allowlist" in found["guard-without-plugin"][0].message
    assert "unguarded-route" in found
    # Auto mode requires only what runs.
    doc = set_plugins(base(pki), "mtls", [cert_auth(pki), guard_plugin(None)])
    assert rules(doc) == {}


# -- asking for client certificates ------------------------------------------------------------------

def test_cert_auth_plain_http(pki):
    doc = base(pki)
    del route(doc, "mtls")["protocols"]  # Kong's default: http and https
    (finding,) = rules(doc)["cert-auth-plain-http"]
    assert finding.path == "routes[mtls]" and "http" in finding.message
    # Plain HTTP on a route without client-cert-auth is not this rule's business.
    doc = base(pki)
    route(doc, "key")["protocols"] = ["http", "https"]
    assert "cert-auth-plain-http" not in rules(doc)


def test_no_certificate_request(pki):
    doc = base(pki)
    doc["plugins"] = []
    (without_conf,) = rules(doc, None)["no-certificate-request"]
    (with_conf,) = rules(doc, EXAMPLE_CONF)["no-certificate-request"]
    assert (without_conf.severity, with_conf.severity) == (Severity.WARNING, Severity.ERROR)
    assert "routes[mtls]" in with_conf.message
    doc["services"][0]["plugins"] = [{"name": "client-cert-request"}]
    (scoped,) = rules(doc)["no-certificate-request"]
    assert "not global" in scoped.message
    # No client-cert-auth anywhere: nothing to ask for.
    doc = set_plugins(base(pki), "mtls", [])
    doc["plugins"] = []
    assert rules(doc) == {}


def test_session_resumption(pki):
    doc = base(pki)
    doc["plugins"] = []
    (finding,) = rules(doc, OPTION_A)["session-resumption"]
    assert finding.path == "kong.conf:nginx_proxy_ssl_verify_client"
    assert "no-certificate-request" not in rules(doc, OPTION_A)
    doc["plugins"] = [{"name": "client-cert-request", "config": {"disable_session_reuse": False}}]
    (finding,) = rules(doc, EXAMPLE_CONF)["session-resumption"]
    assert finding.path == "plugins[client-cert-request]"
    # The remedy: the global plugin with session reuse off, also alongside option A.
    assert rules(base(pki), OPTION_A) == {}


# -- upstream TLS ----------------------------------------------------------------------------------------

def second_service(doc: dict[str, Any], **fields: Any) -> dict[str, Any]:
    service = {"name": "other", "url": "https://UP.example:8443", "client_certificate": CERT_A,
               "tls_verify": True, "ca_certificates": [CA_ID],
               "routes": [{"name": "other", "protocols": ["https"], "paths": ["/o"]}], **fields}
    doc["services"].append(service)
    doc["certificates"].append({"id": CERT_B, "cert": "unused", "key": "unused"})
    return doc


def test_shared_upstream_pool(pki):
    (finding,) = rules(second_service(base(pki), tls_verify=False))["shared-upstream-pool"]
    assert "up.example:8443" in finding.message and "tls_verify off" in finding.message
    assert "services[other] via routes[other]" in finding.message
    doc = second_service(base(pki), tls_verify_depth=1)
    assert "depth 1" in rules(doc)["shared-upstream-pool"][0].message
    # Same settings, or a client certificate entity of its own: no finding.
    assert rules(second_service(base(pki))) == {}
    assert rules(second_service(base(pki), tls_verify=False, client_certificate=CERT_B)) == {}


def test_shared_pool_between_routes_that_upstream_identity_verifies_and_routes_it_does_not(pki):
    doc = base(pki)
    doc["services"][0]["tls_verify"] = False
    route(doc, "key")["plugins"] = [key_auth(), upstream_identity(pki),
                                    post_function("api-key-auth", "upstream-identity")]
    (finding,) = rules(doc)["shared-upstream-pool"]
    assert "routes[key]" in finding.message and "routes[mtls]" in finding.message
    doc["services"][0]["tls_verify"] = True
    assert rules(doc) == {}


def test_verify_without_ca(pki):
    doc = base(pki)
    del doc["services"][0]["ca_certificates"]
    (finding,) = rules(doc)["verify-without-ca"]
    assert (finding.severity, finding.path) == (Severity.WARNING, "services[svc]")
    doc["services"][0]["tls_verify"] = False
    assert "verify-without-ca" not in rules(doc)


def test_upstream_identity_service(pki):
    doc = set_plugins(base(pki), "key", [upstream_identity(pki), post_function("upstream-identity")])
    assert rules(doc) == {}
    del doc["services"][0]["ca_certificates"]
    (finding,) = rules(doc)["upstream-identity-service"]
    assert "SERVICE_NO_CA_STORE" in finding.message and finding.path == "routes[key]"
    # enforce_tls_verify: false leaves it to the Service's tls_verify.
    doc = set_plugins(base(pki), "key", [upstream_identity(pki, enforce_tls_verify=False),
                                         post_function("upstream-identity")])
    assert rules(doc) == {}
    doc["services"][0]["tls_verify"] = False
    assert "SERVICE_UNVERIFIED" in rules(doc)["upstream-identity-service"][0].message
    doc["services"][0]["url"] = "http://up.example"
    assert "UPSTREAM_NOT_TLS" in rules(doc)["upstream-identity-service"][0].message


# -- credentials and logs ------------------------------------------------------------------------------

def test_api_key_in_logged_query(pki):
    doc = set_plugins(base(pki), "key", [key_auth(key_in_query=True), post_function("api-key-auth")])
    for conf in (None, {}, {"proxy_access_log": "logs/access.log combined"}):
        (finding,) = rules(doc, conf)["api-key-in-logged-query"]
        assert finding.path == "routes[key].plugins[api-key-auth]"
    # kong.conf.example logs `$request_method $uri`: no query string.
    assert rules(doc, EXAMPLE_CONF) == {}
    assert rules(doc, {"proxy_access_log": "off"}) == {}
    # ... but a logging plugin on the route logs the whole URI.
    route(doc, "key")["plugins"].append({"name": "file-log", "config": {"path": "/tmp/x.log"}})
    (finding,) = rules(doc, EXAMPLE_CONF)["api-key-in-logged-query"]
    assert "routes[key].plugins[file-log]" in finding.message
    # Keys only in headers: no finding, whatever is logged.
    doc = set_plugins(base(pki), "key", [key_auth(), post_function("api-key-auth")])
    assert rules(doc, None) == {}


@pytest.mark.parametrize(("fmt", "logs_query"), [
    ("'$remote_addr \"$request_method $uri\"'", False),
    ("'$remote_addr \"$request\"'", True),
    ("escape=json '{\"u\":\"$request_uri\"}'", True),
    ("'$args'", True),
    ("'$arg_apikey'", True),
])
def test_access_log_formats(fmt, logs_query):
    conf = {"proxy_access_log": "logs/access.log mine", "nginx_http_log_format": f"mine {fmt}"}
    assert (access_log_query(conf) is not None) is logs_query


def test_report_only(pki):
    assert "report-only" not in rules(set_plugins(base(pki), "mtls", [
        cert_auth(pki, report_only=False), post_function("client-cert-auth")]))
    doc = set_plugins(base(pki), "mtls", [cert_auth(pki, report_only=True),
                                          post_function("client-cert-auth")])
    (finding,) = rules(doc)["report-only"]
    assert (finding.severity, finding.path) == (Severity.WARNING, "routes[mtls].plugins[client-cert-auth]")
    assert not finding.allowed
    # The allow tag on the plugin, or on its route, silences it.
    route(doc, "mtls")["tags"] = ["kong-mtls-lint-allow:report-only"]
    assert rules(doc)["report-only"][0].allowed


def test_anonymous_and_anonymous_missing(pki):
    no_anonymous = [key_auth(anonymous=None), post_function("api-key-auth")]
    assert rules(set_plugins(base(pki), "key", no_anonymous)) == {}
    doc = set_plugins(base(pki), "mtls", [cert_auth(pki, anonymous="alice"),
                                          post_function("client-cert-auth")])
    found = rules(doc)
    assert set(found) == {"anonymous"} and found["anonymous"][0].severity is Severity.WARNING
    doc = set_plugins(base(pki), "key", [key_auth(anonymous="ghost"), post_function("api-key-auth")])
    found = rules(doc)
    assert set(found) == {"anonymous", "anonymous-missing"}
    assert found["anonymous-missing"][0].path == "routes[key].plugins[api-key-auth]"


# -- trust anchors and plugin configs --------------------------------------------------------------------

def test_anchor_expiring(pki):
    not_after = pki.root.cert.not_valid_after_utc
    soon = (not_after - dt.timedelta(days=30)).timestamp()
    found = rules(base(pki), now=soon)["anchor-expiring"]
    assert {f.path for f in found} == {f"ca_certificates[{CA_ID}]", "routes[mtls].plugins[client-cert-auth]"}
    assert all(f.severity is Severity.WARNING and "in 30 days" in f.message for f in found)
    late = (not_after + dt.timedelta(days=2)).timestamp()
    assert all(f.severity is Severity.ERROR for f in rules(base(pki), now=late)["anchor-expiring"])
    assert "anchor-expiring" not in rules(base(pki), now=(not_after - dt.timedelta(days=91)).timestamp())


def test_invalid_plugin_config(pki):
    # Every config of base() builds its plugin: client-cert-auth, api-key-auth, client-cert-request.
    assert "invalid-plugin-config" not in rules(base(pki))
    doc = set_plugins(base(pki), "mtls", [{"name": "client-cert-auth", "config": {}},
                                          post_function("client-cert-auth")])
    (finding,) = rules(doc)["invalid-plugin-config"]
    assert "no trust anchor" in finding.message and "docs/client-cert-auth.md" in finding.fix
    doc = set_plugins(base(pki), "key", [key_auth(key_names="apikey"), post_function("api-key-auth")])
    assert "key_names" in rules(doc)["invalid-plugin-config"][0].message
    doc = set_plugins(base(pki), "mtls", [cert_auth(pki), guard_plugin(["acl"])])
    assert "acl" in rules(doc)["invalid-plugin-config"][0].message


def test_invalid_ca_certificate(pki):
    assert "invalid-ca-certificate" not in rules(base(pki))
    doc = base(pki)
    doc["ca_certificates"][0]["cert"] = "@pki:ca/root.pem"
    (finding,) = rules(doc)["invalid-ca-certificate"]
    assert finding.path == f"ca_certificates[{CA_ID}]"


# -- reading configurations ----------------------------------------------------------------------------

def test_flat_entities_as_the_admin_api_returns_them(pki):
    """Top-level routes and plugins with {"id": ...} references read like the nested config."""
    doc = base(pki)
    service = doc["services"][0]
    service["id"] = "00000000-0000-4000-8000-000000000501"
    flat = {"_format_version": "3.0", "ca_certificates": doc["ca_certificates"], "routes": [], "plugins": [],
            "consumers": [{"id": "00000000-0000-4000-8000-0000000000c1", "username": "alice"}],
            "certificates": doc["certificates"]}
    flat["plugins"].append({"name": "client-cert-request", "route": None, "service": None, "consumer": None})
    for n, item in enumerate(service.pop("routes"), start=1):
        route_id = f"00000000-0000-4000-8000-00000000060{n}"
        for plugin in item.pop("plugins"):
            flat["plugins"].append({**plugin, "route": {"id": route_id}, "service": None})
        flat["routes"].append({**item, "id": route_id, "service": {"id": service["id"]}})
    flat["services"] = [{**service, "client_certificate": {"id": CERT_A}}]
    assert run(flat, EXAMPLE_CONF) == []
    flat["plugins"] = [p for p in flat["plugins"] if p["name"] != "post-function"]
    assert {f.path for f in run(flat, EXAMPLE_CONF)} == {"routes[mtls]", "routes[key]"}


@pytest.mark.parametrize(("doc", "problem"), [
    ([], "expected a declarative config"),
    ({"services": []}, "no _format_version"),
    ({"_format_version": "4.0"}, "'4.0' is not one of"),
    ({"_format_version": "3.0", "services": {"a": 1}}, "services: expected a list"),
    ({"_format_version": "3.0", "services": ["x"]}, "services[1]: expected a mapping"),
    ({"_format_version": "3.0", "routes": [{"name": "r", "service": "nope"}]}, "service 'nope' is not in"),
    ({"_format_version": "3.0", "services": [{"name": "s", "port": "80"}]},
     "services[s].port: expected an integer"),
    ({"_format_version": "3.0", "plugins": [{"config": {}}]}, "a plugin needs a name"),
    ({"_format_version": "3.0", "plugins": [{"name": "x", "config": []}]}, "config: expected a mapping"),
    ({"_format_version": "3.0", "plugins": [{"name": "x"}, {"name": "x"}]}, "Kong refuses this config"),
    ({"_format_version": "3.0", "services": [{"name": "a"}, {"name": "a"}]},
     "a second entity with this id or name"),
])
def test_unusable_configs_are_refused_with_where(doc, problem):
    with pytest.raises(InputError, match=None) as caught:
        normalise(doc)
    assert problem in str(caught.value)


def test_kong_conf_comments_and_overrides():
    conf = parse_kong_conf("# a comment\nproxy_access_log = off  # inline\nA_Key = x\\#y\na_key = z\n")
    assert conf == {"proxy_access_log": "off", "a_key": "z"}
    with pytest.raises(ValueError, match="line 1"):
        parse_kong_conf("not a setting\n")


# -- hostile input ---------------------------------------------------------------------------------------

_KEYS = ["_format_version", "services", "routes", "plugins", "consumers", "ca_certificates", "name", "id",
         "url", "host", "port", "protocol", "protocols", "tls_verify", "tls_verify_depth",
         "client_certificate", "service", "route", "consumer", "config", "enabled", "tags", "username",
         "cert", "access", "require", "report_only", "anonymous", "key_in_query", "disable_session_reuse",
         "enforce_tls_verify", "instance_name"]
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.floats(allow_nan=True),
                     st.sampled_from(["3.0", "https", "http", "x", "post-function", "kong-mtls-guard",
                                      "client-cert-auth", "api-key-auth", "upstream-identity",
                                      "client-cert-request", "https://h:1", "https://[::1", "alice", ""]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(_KEYS), inner, max_size=5)), max_leaves=40)


def _entity(required: dict[str, Any], **optional: Any) -> st.SearchStrategy[dict[str, Any]]:
    """Mostly well-formed entities, any field sometimes replaced by junk."""
    return st.fixed_dictionaries(required, optional={k: st.one_of(v, _VALUES) for k, v in optional.items()})


_NAMES = st.sampled_from(["a", "b", "c"])
_PLUGIN = _entity({"name": st.sampled_from(["post-function", "kong-mtls-guard", "client-cert-auth",
                                            "api-key-auth", "ip-allowlist", "upstream-identity",
                                            "client-cert-request", "file-log"])},
                  config=st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=4),
                  enabled=st.booleans(), route=_NAMES, service=_NAMES, consumer=_NAMES,
                  tags=st.lists(st.just("kong-mtls-lint-allow:report-only"), max_size=1))
_ROUTE = _entity({"name": _NAMES}, protocols=st.lists(st.sampled_from(["http", "https", "grpc"]), max_size=2),
                 plugins=st.lists(_PLUGIN, max_size=3), service=_NAMES)
_SERVICE = _entity({"name": _NAMES}, url=st.sampled_from(["https://up:8443", "http://up", "https://[::1]:1"]),
                   tls_verify=st.booleans(), tls_verify_depth=st.integers(0, 3),
                   ca_certificates=st.lists(st.just(CA_ID), max_size=1), client_certificate=_NAMES,
                   routes=st.lists(_ROUTE, max_size=3), plugins=st.lists(_PLUGIN, max_size=2))
_DOCUMENT = st.fixed_dictionaries({"_format_version": st.just("3.0")}, optional={
    "services": st.lists(_SERVICE, max_size=3), "routes": st.lists(_ROUTE, max_size=2),
    "plugins": st.lists(_PLUGIN, max_size=3), "ca_certificates": st.lists(_entity({"id": st.just(CA_ID)},
                                                                                  cert=_SCALARS), max_size=1),
    "consumers": st.lists(_entity({"username": _NAMES}, plugins=st.lists(_PLUGIN, max_size=2)), max_size=2)})


@given(_DOCUMENT)
@settings(max_examples=300, deadline=None)
def test_any_document_gives_findings_or_an_input_error(doc):
    try:
        config = normalise(doc)
    except InputError:
        return
    for finding in lint(Context(config, {}, check_plugin, time.time())):
        assert finding.rule in RULE_IDS


def test_kongs_order_of_precedence_between_scopes():
    """Removing the winning config each time walks Kong's order: route+service+consumer,
    route+consumer, service+consumer, route+service, consumer, route, service, global."""
    order = [("r", "s", "c"), ("r", None, "c"), (None, "s", "c"), ("r", "s", None), (None, None, "c"),
             ("r", None, None), (None, "s", None), (None, None, None)]
    doc = {"_format_version": "3.0", "services": [{"name": "s", "routes": [{"name": "r"}]}],
           "consumers": [{"username": "c"}], "plugins": []}
    for route_ref, service_ref, consumer_ref in order:
        doc["plugins"].append({"name": "post-function", "route": route_ref, "service": service_ref,
                               "consumer": consumer_ref, "config": {"access": [str(len(doc["plugins"]))]}})
    for winner in range(len(order)):
        config = normalise({**doc, "plugins": doc["plugins"][winner:]})
        route_key = next(iter(config.routes))
        service_key, consumer_key = next(iter(config.services)), next(iter(config.consumers))
        effective = config.effective("post-function", route_key, service_key, consumer_key)
        assert effective is not None and effective.config["access"] == [str(winner)]
    # Without a consumer, consumer-scoped configs never apply.
    config = normalise(doc)
    effective = config.effective("post-function", next(iter(config.routes)), next(iter(config.services)))
    assert effective is not None and effective.config["access"] == ["3"]


def test_a_plugin_of_ours_scoped_to_a_consumer_is_an_invalid_config() -> None:
    """The plugin server refuses consumer scope (500 INVALID_CONFIG): lint says so (guard review)."""
    scoped = {"_format_version": "3.0", "consumers": [{"username": "alice"}],
              "services": [{"name": "s", "url": "https://up:8443",
                            "routes": [{"name": "r", "paths": ["/r"]}]}],
              "plugins": [{"name": "kong-mtls-guard"},
                          {"name": "ip-allowlist", "route": "r", "consumer": "alice",
                           "config": {"allow": ["10.0.0.0/8"]}}]}
    findings = rules(scoped).get("invalid-plugin-config", [])
    assert findings and "scoped to a consumer" in findings[0].message
    del scoped["plugins"][1]["consumer"]
    assert "invalid-plugin-config" not in rules(scoped)


def test_only_the_generated_guard_snippet_counts_as_a_guard() -> None:
    """A comment naming a mark next to an unrelated exit, or code that writes a mark, guards
    nothing (guard review); the generated snippet does, also merged with other code."""
    from kong_mtls.guard import post_function_guards
    generated = lua_guard(["api-key-auth"])
    assert post_function_guards([generated]) == {"api-key-auth"}
    assert post_function_guards(["local x = 1\n" + generated]) == {"api-key-auth"}
    comment = ("-- TODO guard 'kong_mtls.api-key-auth'\n"
               "return function() if kong.request.get_path() == '/health' then "
               "return kong.response.exit(200) end end")
    forging = generated + "\nkong.ctx.shared['kong_mtls.api-key-auth'] = true\n"
    assert post_function_guards([comment]) == frozenset()
    assert post_function_guards([forging]) == frozenset()


def test_upstream_identity_routes_neither_share_a_certificate_entity_nor_preserve_the_host(pki) -> None:
    """Upstream review: a Service sharing its certificate entity shares Kong's pool; with
    preserve_host the client's Host is the name Kong sends and verifies, not the probed one."""
    doc = {"_format_version": "3.0", "plugins": [{"name": "kong-mtls-guard"}],
           "certificates": [{"id": "00000000-0000-4000-8000-0000000000c1", "cert": "x", "key": "y"}],
           "ca_certificates": [{"id": "00000000-0000-4000-8000-0000000000ca", "cert": pki.root.cert_pem}],
           "services": [
               {"name": "strict", "url": "https://up.example:8443", "tls_verify": True,
                "ca_certificates": ["00000000-0000-4000-8000-0000000000ca"],
                "client_certificate": "00000000-0000-4000-8000-0000000000c1",
                "routes": [{"name": "strict", "paths": ["/s"], "plugins": [
                    {"name": "upstream-identity", "config": {"trusted_ca_pem": pki.root.cert_pem,
                                                             "expected_dns": ["up.example"]}}]}]},
               {"name": "lax", "url": "https://127.0.0.1:8443",
                "client_certificate": "00000000-0000-4000-8000-0000000000c1",
                "routes": [{"name": "lax", "paths": ["/l"]}]}]}
    messages = [f.message for f in rules(doc).get("upstream-identity-service", [])]
    assert any("shares its client_certificate with services[lax]" in m for m in messages), messages
    del doc["services"][1]["client_certificate"]
    doc["services"][0]["routes"][0]["preserve_host"] = True
    messages = [f.message for f in rules(doc).get("upstream-identity-service", [])]
    assert len(messages) == 1 and "preserve_host" in messages[0]
    doc["services"][0]["routes"][0]["preserve_host"] = False
    assert "upstream-identity-service" not in rules(doc)


def test_a_post_function_guard_behind_a_plugin_that_answers_first(pki) -> None:
    """guard review: proxy-cache (priority 100) answers from its cache before post-function
    (-1000): with the fallback guard, a cached answer reaches a client no plugin vouched for."""
    plugins = [{"name": "ip-allowlist", "config": {"allow": ["10.0.0.0/8"]}},
               {"name": "post-function", "config": {"access": [lua_guard(["ip-allowlist"])]}},
               {"name": "proxy-cache", "config": {"strategy": "memory"}}]
    doc = {"_format_version": "3.0",
           "services": [{"name": "s", "url": "https://up:8443",
                         "routes": [{"name": "r", "paths": ["/r"], "plugins": plugins}]}]}
    found = rules(doc).get("guard-too-late", [])
    assert found and "proxy-cache" in found[0].message
    doc["plugins"] = [{"name": GUARD}]                    # the guard plugin runs before proxy-cache
    plugins.pop(1)
    assert "guard-too-late" not in rules(doc)


def test_api_keys_on_a_route_that_accepts_plain_http() -> None:
    """guard review: a key sent over plain HTTP can be read on the way."""
    doc = {"_format_version": "3.0", "plugins": [{"name": GUARD}],
           "services": [{"name": "s", "url": "https://up:8443",
                         "routes": [{"name": "r", "paths": ["/r"], "protocols": ["http", "https"],
                                     "plugins": [{"name": "api-key-auth"}]}]}]}
    assert [f.path for f in rules(doc).get("api-key-plain-http", [])] == ["routes[r]"]
    doc["services"][0]["routes"][0]["protocols"] = ["https"]
    assert "api-key-plain-http" not in rules(doc)


