"""The lint rules: one small function per rule over a `KongConfig` (docs/lint.md describes each).

Pure: no file, network or plugin-server access. What needs the plugins themselves (would they
accept this config, which trust anchors does it hold) comes in through `Context.check_plugin`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from kong_mtls.constants import (
    API_KEY_AUTH,
    CLIENT_CERT_AUTH,
    CLIENT_CERT_REQUEST,
    GUARD,
    HEADER_CERT_AUTH,
    PLUGIN_MODULES,
    UPSTREAM_IDENTITY,
)
from kong_mtls.core.chain import ChainConfigError, describe, expiring_anchors, parse_pem_certificates
from kong_mtls.core.upstream import TLS_PROTOCOLS, Reason, Target, service_tls_problem
from kong_mtls.guard import (
    GUARD_PLUGIN_REQUIRE,
    GUARDED_PLUGINS,
    POST_FUNCTION,
    post_function_guards,
)
from kong_mtls.lint.model import KongConfig, PluginConfig, Route, Service

#: A tag that silences one rule for the entity carrying it (or for what is scoped to it: a route's
#: or service's plugins): `kong-mtls-lint-allow:<rule id>`. Kong tags allow ':'.
ALLOW_TAG_PREFIX = "kong-mtls-lint-allow:"

#: Route protocols without TLS (Kong's http subsystem).
PLAINTEXT_PROTOCOLS = ("http", "grpc", "ws")
#: nginx `ssl_verify_client` values that make nginx ask clients for a certificate (option A).
VERIFY_CLIENT_ON = ("on", "optional", "optional_no_ca")
#: kong.conf settings that set nginx's `ssl_verify_client` on the proxy listener.
VERIFY_CLIENT_SETTINGS = ("nginx_proxy_ssl_verify_client", "nginx_http_ssl_verify_client")
#: Kong's default `proxy_access_log`; nginx then logs in its `combined` format (the request line).
DEFAULT_PROXY_ACCESS_LOG = "logs/access.log"
#: Kong's bundled plugins that log the request's URI with its query string.
#: opentelemetry: its request span carries the full URL, query included (`http.url`).
LOGGING_PLUGINS = ("file-log", "http-log", "tcp-log", "udp-log", "syslog", "loggly", "kafka-log",
                   "opentelemetry")
#: nginx variables that hold the query string: the request line, the URI with its arguments.
_QUERY_VARIABLES = re.compile(
    r"\$\{?(?:request|request_uri|args|query_string|arg_[A-Za-z0-9_]+)(?![A-Za-z0-9_])")


class Severity(str, Enum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True)
class Finding:
    severity: Severity
    rule: str
    path: str
    message: str
    fix: str
    #: Tags of the entities the finding is about (an allow tag among them silences it).
    tags: frozenset[str] = frozenset()

    @property
    def allowed(self) -> bool:
        return ALLOW_TAG_PREFIX + self.rule in self.tags


@dataclass(frozen=True)
class PluginCheck:
    """What a plugin says about one of its configs: why it would refuse it (None: it accepts it),
    and the trust anchors it would load."""

    error: str | None = None
    anchors: tuple[Any, ...] = ()


@dataclass
class Context:
    config: KongConfig
    #: kong.conf settings when given (`--kong-conf`), else None: the rules that need it say so.
    kong_conf: Mapping[str, str] | None
    check_plugin: Callable[[str, Mapping[str, Any]], PluginCheck]
    now: float
    _checks: dict[int, PluginCheck] = field(default_factory=dict)

    def check(self, plugin: PluginConfig) -> PluginCheck:
        """`check_plugin` once per plugin config (several rules ask)."""
        key = id(plugin)
        if key not in self._checks:
            self._checks[key] = self.check_plugin(plugin.name, plugin.config)
        return self._checks[key]

    def tags(self, plugin: PluginConfig) -> frozenset[str]:
        """The plugin's tags and those of the route, service and consumer it is scoped to."""
        out = set(plugin.tags)
        tables = (self.config.routes, self.config.services, self.config.consumers)
        for key, table in zip(plugin.scope, tables):
            entity = table.get(key) if key else None
            out.update(getattr(entity, "tags", ()))
        return frozenset(out)

    def route_tags(self, route: Route) -> frozenset[str]:
        service = self.config.route_service(route)
        return route.tags | (service.tags if service else frozenset())

    def routes(self) -> Iterator[tuple[Route, Service | None]]:
        for route in self.config.routes.values():
            yield route, self.config.route_service(route)

    def on_route(self, name: str, route: Route) -> PluginConfig | None:
        """The config of `name` Kong runs on `route` before any consumer is known."""
        return self.config.effective(name, route.key, route.service)

    def routes_of(self, plugin: PluginConfig) -> list[Route]:
        """The routes on which `plugin` is the config Kong runs (no consumer)."""
        return [route for route in self.config.routes.values() if self.on_route(plugin.name, route) is plugin]


Rule = Callable[[Context], Iterable[Finding]]


def _names(items: Iterable[str]) -> str:
    return ", ".join(sorted(items))


def _list(paths: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


# -- the fail-closed guard -----------------------------------------------------------------------------

def _access_snippets(config: Mapping[str, Any]) -> list[Any]:
    """post-function's access code (`functions`: Kong 2.x's name for it)."""
    out: list[Any] = []
    for name in ("access", "functions"):
        value = config.get(name)
        if isinstance(value, list):
            out.extend(value)
    return out


def _guard_covers(plugin: PluginConfig | None) -> frozenset[str]:
    """The plugins whose verdict this guard config requires (either form)."""
    if plugin is None:
        return frozenset()
    if plugin.name == POST_FUNCTION:
        return post_function_guards(_access_snippets(plugin.config))
    required = plugin.config.get(GUARD_PLUGIN_REQUIRE)
    if not isinstance(required, list):  # absent or null: every one of ours that runs
        return frozenset(GUARDED_PLUGINS)
    return frozenset(name for name in required if isinstance(name, str))


def _coverage(ctx: Context, route: Route, consumer: str | None) -> tuple[frozenset[str], list[PluginConfig]]:
    """What the guard Kong runs for such a request covers, and the configs it runs."""
    covered: set[str] = set()
    running = []
    for name in (POST_FUNCTION, GUARD):
        plugin = ctx.config.effective(name, route.key, route.service, consumer)
        if plugin is not None:
            running.append(plugin)
            covered |= _guard_covers(plugin)
    return frozenset(covered), running


def _displaced(ctx: Context, route: Route, consumer: str | None, missing: frozenset[str],
               running: list[PluginConfig]) -> list[PluginConfig]:
    """Less specific guard configs that would have covered `missing` but are not the ones Kong runs."""
    out = []
    for name in (POST_FUNCTION, GUARD):
        for plugin in ctx.config.candidates(name, route.key, route.service, consumer):
            if plugin not in running and _guard_covers(plugin) & missing:
                out.append(plugin)
    return out


def _ours(ctx: Context, route: Route) -> frozenset[str]:
    return frozenset(name for name in GUARDED_PLUGINS if ctx.on_route(name, route) is not None)


def _guard_consumers(ctx: Context) -> list[str]:
    return sorted({p.consumer for name in (POST_FUNCTION, GUARD)
                   for p in ctx.config.enabled(name) if p.consumer is not None})


def rule_guard(ctx: Context) -> Iterator[Finding]:
    """unguarded-route and guard-displaced: each of our plugins on a route needs the guard Kong
    actually runs there (the most specific post-function / kong-mtls-guard config) to cover it."""
    consumers = _guard_consumers(ctx)
    for route, _service in ctx.routes():
        ours = _ours(ctx, route)
        if not ours:
            continue
        tags = ctx.route_tags(route)
        covered, running = _coverage(ctx, route, None)
        missing = ours - covered
        if missing:
            displaced = _displaced(ctx, route, None, missing, running)
            if displaced:
                yield _displaced_finding(route, missing, running, displaced, "", tags)
            else:
                yield Finding(
                    Severity.ERROR, "unguarded-route", route.path,
                    f"{_names(missing)} run{'s' if len(missing) == 1 else ''} here without the fail-closed "
                    "guard: when a plugin server fails, Kong proxies the request unchecked",
                    f"add `{GUARD}` (or the post-function of `kong-mtls guard {' '.join(sorted(ours))} "
                    "--post-function --format yaml`) to the route", tags)
        for consumer in consumers:
            covered_c, running_c = _coverage(ctx, route, consumer)
            lost = (ours - covered_c) - missing
            if lost:
                displaced = _displaced(ctx, route, consumer, lost, running_c)
                who = f" for requests authenticated as {ctx.config.consumers[consumer].label}"
                yield _displaced_finding(route, lost, running_c, displaced, who, tags)


def _displaced_finding(route: Route, missing: frozenset[str], running: list[PluginConfig],
                       displaced: list[PluginConfig], who: str, tags: frozenset[str]) -> Finding:
    winners = _list([p.path for p in running]) or "nothing"
    return Finding(
        Severity.ERROR, "guard-displaced", route.path,
        f"the guard of {_list([p.path for p in displaced])} does not run{who}: Kong runs only the most "
        f"specific config of a plugin, here {winners}, which does not check {_names(missing)}",
        "put the guard's marks into that config (`kong-mtls guard ... --post-function --format lua` "
        f"merged into its access code) or use `{GUARD}`, whose config no post-function displaces", tags)


def rule_guard_without_plugin(ctx: Context) -> Iterator[Finding]:
    """guard-without-plugin: a guard that requires the verdict of a plugin not running on the route
    answers every request 503."""
    for route, _service in ctx.routes():
        ours = _ours(ctx, route)
        for plugin in _coverage(ctx, route, None)[1]:
            required = plugin.config.get(GUARD_PLUGIN_REQUIRE) if plugin.name == GUARD else None
            if plugin.name == GUARD and not isinstance(required, list):
                continue  # auto: requires what runs
            absent = _guard_covers(plugin) - ours
            if absent:
                yield Finding(
                    Severity.ERROR, "guard-without-plugin", route.path,
                    f"{plugin.path} requires the verdict of {_names(absent)}, which does not run on this "
                    "route: every request gets 503",
                    f"require only {_names(ours) or 'nothing'} here (or add {_names(absent)} to the route)",
                    ctx.route_tags(route) | plugin.tags)


#: Kong's bundled plugins that can answer a request (or send it elsewhere) in the access phase after
#: our plugins (priority <= 779) but before post-function (-1000): the fallback guard comes too late.
ANSWER_BEFORE_POST_FUNCTION = ("redirect", "standard-webhooks", "aws-lambda", "azure-functions",
                               "proxy-cache", "request-termination")


def rule_guard_too_late(ctx: Context) -> Iterator[Finding]:
    """guard-too-late: a route guarded only by the post-function fallback, with a plugin that can
    answer before it (proxy-cache serves a cached answer to a client our plugin never vouched for)."""
    answering = [name for name in ctx.config.enabled_names()
                 if name in ANSWER_BEFORE_POST_FUNCTION or name.startswith("ai-")]
    if not answering:
        return
    for route, _service in ctx.routes():
        ours = _ours(ctx, route)
        running = _coverage(ctx, route, None)[1]
        by_plugin = frozenset().union(*(_guard_covers(p) for p in running if p.name == GUARD))
        by_fallback = frozenset().union(*(_guard_covers(p) for p in running if p.name == POST_FUNCTION))
        if not (ours - by_plugin) & by_fallback:
            continue  # the guard plugin covers it, or nothing does (unguarded-route says so)
        early = [name for name in answering
                 if ctx.config.effective(name, route.key, route.service) is not None]
        if early:
            yield Finding(
                Severity.WARNING, "guard-too-late", route.path,
                f"{_names(frozenset(early))} can answer before the post-function guard (priority -1000): "
                "when a plugin server fails, that answer reaches a client no plugin of ours vouched for",
                f"use `{GUARD}` (priority 780, before them) instead of the post-function guard",
                ctx.route_tags(route))


# -- asking for client certificates ------------------------------------------------------------------

def rule_cert_auth_plain_http(ctx: Context) -> Iterator[Finding]:
    """cert-auth-plain-http: a route with client-cert-auth that accepts plain HTTP; api-key-plain-http:
    one with api-key-auth (the key travels in clear)."""
    for route, _service in ctx.routes():
        plain = [p for p in route.protocols if p in PLAINTEXT_PROTOCOLS]
        if plain and ctx.on_route(API_KEY_AUTH, route) is not None:
            yield Finding(
                Severity.WARNING, "api-key-plain-http", route.path,
                f"api-key-auth on a route that accepts {', '.join(plain)}: a key sent over it can be read "
                "on the way (and, once seen, replayed)",
                "set `protocols: [https]` on the route, unless only a TLS-terminating proxy on a private "
                "network reaches Kong over HTTP (then tag the route kong-mtls-lint-allow:api-key-plain-http)",
                ctx.route_tags(route))
        if ctx.on_route(CLIENT_CERT_AUTH, route) is None:
            continue
        if plain:
            yield Finding(
                Severity.ERROR, "cert-auth-plain-http", route.path,
                f"client-cert-auth on a route that accepts {', '.join(plain)}: no client certificate "
                "exists without TLS, the request and any credential in it travel in clear",
                "set `protocols: [https]` on the route (Kong answers 426 to plain HTTP)",
                ctx.route_tags(route))


def _verify_client(kong_conf: Mapping[str, str]) -> tuple[str, str] | None:
    for setting in VERIFY_CLIENT_SETTINGS:
        value = kong_conf.get(setting, "").strip().lower()
        if value in VERIFY_CLIENT_ON:
            return setting, value
    return None


def _cert_auth_routes(ctx: Context) -> list[str]:
    return [route.path for route, _ in ctx.routes() if ctx.on_route(CLIENT_CERT_AUTH, route) is not None]


def _global_request(ctx: Context) -> PluginConfig | None:
    return next((p for p in ctx.config.enabled(CLIENT_CERT_REQUEST) if p.scope == (None, None, None)), None)


def rule_certificate_request(ctx: Context) -> Iterator[Finding]:
    """no-certificate-request and session-resumption."""
    routes = _cert_auth_routes(ctx)
    if not routes:
        return
    request = _global_request(ctx)
    option_a = _verify_client(ctx.kong_conf) if ctx.kong_conf is not None else None
    if request is None and option_a is None:
        scoped = [p.path for p in ctx.config.enabled(CLIENT_CERT_REQUEST)]
        why = (f"; {_list(scoped)} is not global, and Kong runs the certificate phase only for global "
               "plugins" if scoped else "")
        if ctx.kong_conf is None:
            yield Finding(
                Severity.WARNING, "no-certificate-request", "plugins",
                f"client-cert-auth runs on {_list(routes)} but this config asks no client for a certificate "
                f"(no global {CLIENT_CERT_REQUEST}){why}; unless kong.conf does (option A), every request "
                "there gets 401", f"add `{CLIENT_CERT_REQUEST}` as a global plugin (pass --kong-conf to "
                "check kong.conf too)")
        else:
            yield Finding(
                Severity.ERROR, "no-certificate-request", "plugins",
                f"client-cert-auth runs on {_list(routes)} but nothing asks clients for a certificate (no "
                f"global {CLIENT_CERT_REQUEST}, no ssl_verify_client in kong.conf){why}: every request "
                "there gets 401", f"add `{CLIENT_CERT_REQUEST}` as a global plugin")
        return
    reuse_off = request is not None and request.config.get("disable_session_reuse") is not False
    if reuse_off:
        return
    if request is not None:
        path, cause = request.path, f"{CLIENT_CERT_REQUEST} has disable_session_reuse: false"
        tags = request.tags
    else:
        assert option_a is not None
        setting, value = option_a
        path, cause = f"kong.conf:{setting}", f"kong.conf asks with {setting} = {value} (option A)"
        tags = frozenset()
    yield Finding(
        Severity.ERROR, "session-resumption", path,
        f"{cause} and TLS sessions stay resumable: a resumed session reaches client-cert-auth with no "
        f"certificate at all, so clients that resume (browsers, most libraries) get intermittent 401s "
        f"on {_list(routes)}",
        f"enable `{CLIENT_CERT_REQUEST}` globally with disable_session_reuse: true (its default)", tags)


# -- upstream TLS ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Trust:
    tls_verify: bool
    ca_certificates: tuple[str, ...]
    depth: int | None

    def __str__(self) -> str:
        if not self.tls_verify:
            return "tls_verify off"
        cas = f"ca_certificates [{', '.join(self.ca_certificates)}]" if self.ca_certificates \
            else "the system trust store"
        depth = f", depth {self.depth}" if self.depth is not None else ""
        return f"tls_verify on against {cas}{depth}"


def _forced_by(ctx: Context, route: Route | None, service: Service) -> PluginConfig | None:
    """The upstream-identity config that forces verification for requests on `route`."""
    plugin = ctx.config.effective(UPSTREAM_IDENTITY, route.key if route else None, service.key)
    if plugin is not None and plugin.config.get("enforce_tls_verify") is not False:
        return plugin
    return None


def _trust(ctx: Context, route: Route | None, service: Service) -> _Trust:
    forced = _forced_by(ctx, route, service)
    depth = service.tls_verify_depth
    if forced is not None and isinstance(forced.config.get("tls_verify_depth"), int):
        depth = forced.config["tls_verify_depth"]
    verify = forced is not None or service.tls_verify is True
    return _Trust(verify, tuple(sorted(service.ca_certificates)), depth)


def rule_shared_upstream_pool(ctx: Context) -> Iterator[Finding]:
    """shared-upstream-pool: Kong reuses a kept-alive upstream connection by address, port, SNI and
    client certificate; requests that share them but verify differently share connections."""
    pools: dict[tuple[str, int | None, str | None], dict[_Trust, list[str]]] = {}
    tags: dict[tuple[str, int | None, str | None], set[str]] = {}
    routes_by_service: dict[str, list[Route]] = {}
    for route in ctx.config.routes.values():
        if route.service:
            routes_by_service.setdefault(route.service, []).append(route)
    for service in ctx.config.services.values():
        if service.protocol not in TLS_PROTOCOLS or not service.host:
            continue
        key = (service.host.lower(), service.port, service.client_certificate)
        settings = pools.setdefault(key, {})
        for route in routes_by_service.get(service.key, ()):
            settings.setdefault(_trust(ctx, route, service), []).append(f"{service.path} via {route.path}")
        tags.setdefault(key, set()).update(service.tags)
    for key, settings in pools.items():
        if len(settings) < 2:
            continue
        host, port, cert = key
        described = "; ".join(f"{_list(users, 2)}: {trust}" for trust, users in settings.items())
        first = next(iter(settings.values()))[0].split(" via ")[0]  # in the config's order
        yield Finding(
            Severity.ERROR, "shared-upstream-pool", first,
            f"one upstream connection pool ({host}:{port}, client certificate {cert or 'none'}) serves "
            f"requests verified differently ({described}): Kong reuses a pooled connection without "
            "verifying it again",
            "give each trust setting its own client_certificate entity (same certificate and key, another "
            "id) or its own host name; put routes that verify differently on separate Services",
            frozenset(tags[key]))


def rule_verify_without_ca(ctx: Context) -> Iterator[Finding]:
    """verify-without-ca: tls_verify on with no ca_certificates trusts the system store."""
    for service in ctx.config.services.values():
        if service.tls_verify is True and not service.ca_certificates and service.protocol in TLS_PROTOCOLS:
            yield Finding(
                Severity.WARNING, "verify-without-ca", service.path,
                "tls_verify is on without ca_certificates: Kong accepts any upstream certificate from a "
                "CA of its system trust store for this host name",
                "list the CA(s) that sign the upstream's certificate in the Service's ca_certificates",
                service.tags)


def rule_upstream_identity_service(ctx: Context) -> Iterator[Finding]:
    """upstream-identity-service: upstream-identity refuses (502) every request of a Service that
    Kong would not verify against CAs of its own."""
    for route, service in ctx.routes():
        plugin = ctx.on_route(UPSTREAM_IDENTITY, route)
        if plugin is None:
            continue
        tags = ctx.route_tags(route) | plugin.tags
        if service is None or not service.host:
            yield Finding(Severity.ERROR, "upstream-identity-service", route.path,
                          "upstream-identity on a route without a Service host: every request gets 502",
                          "attach the route to a Service with a host", tags)
            continue
        if service.protocol not in TLS_PROTOCOLS and plugin.config.get("host") is None:
            yield Finding(
                Severity.ERROR, "upstream-identity-service", route.path,
                f"upstream-identity refuses every request here (502, {Reason.UPSTREAM_NOT_TLS.value}): "
                f"{service.path} uses {service.protocol}, Kong would not use TLS to reach it",
                "use https for the Service (or remove upstream-identity from this route)", tags)
            continue
        try:
            target = Target(service.host, service.port or 443)
        except ValueError:
            continue
        problem = service_tls_problem(service.as_kong(), target)
        sharing = sorted(other.path for other in ctx.config.services.values()
                         if other is not service and service.client_certificate is not None
                         and other.client_certificate == service.client_certificate)
        if problem is None and sharing:
            yield Finding(
                Severity.ERROR, "upstream-identity-service", route.path,
                f"{service.path} shares its client_certificate with {', '.join(sharing)}: Kong pools "
                "connections by address, port, SNI and certificate, so this route may be proxied over "
                "a connection another Service opened and verified with its own settings",
                "give the Service a client_certificate entity used by no other Service", tags)
        if route.preserve_host:
            yield Finding(
                Severity.ERROR, "upstream-identity-service", route.path,
                "preserve_host: Kong sends (and verifies) the client's Host as the upstream name, "
                "not the name upstream-identity probes: a client picks which virtual host is reached",
                "set preserve_host: false on routes with upstream-identity", tags)
        if problem is not None:
            yield Finding(
                Severity.ERROR, "upstream-identity-service", route.path,
                f"upstream-identity refuses every request here (502, {problem.reason.value}): "
                f"{problem.detail}", _SERVICE_FIXES.get(problem.reason, "see docs/upstream-identity.md"),
                tags)


#: The fix for each of upstream-identity's Service refusals (docs/upstream-identity.md).
_SERVICE_FIXES = {
    Reason.SERVICE_UNVERIFIED: "set tls_verify: true on the Service",
    Reason.SERVICE_NO_CA_STORE: "set the Service's ca_certificates to the CA(s) of its upstream",
    Reason.SERVICE_POOL_SHARED: "give the Service (https) a client_certificate used by no other Service",
    Reason.UPSTREAM_NOT_TLS: "use https for the Service",
}


# -- credentials and logs ------------------------------------------------------------------------------

def access_log_query(kong_conf: Mapping[str, str] | None) -> str | None:
    """Why nginx's proxy access log holds query strings (None: it does not)."""
    if kong_conf is None:
        return "Kong's default proxy access log holds the request line (pass --kong-conf to check yours)"
    value = kong_conf.get("proxy_access_log", DEFAULT_PROXY_ACCESS_LOG).strip()
    if value.lower() == "off":
        return None
    tokens = value.split()
    fmt = tokens[1] if len(tokens) > 1 and "=" not in tokens[1] else "combined"
    if fmt == "combined":
        return "the proxy access log uses nginx's combined format, which holds the request line"
    declared = kong_conf.get("nginx_http_log_format", "").strip()
    name, _, definition = declared.partition(" ")
    if name != fmt:
        return f"the proxy access log's format {fmt!r} is not defined in this kong.conf"
    variables = _QUERY_VARIABLES.findall(definition)
    if variables:
        return f"the proxy access log's format {fmt!r} logs {', '.join(sorted(set(variables)))}"
    return None


def rule_api_key_in_logged_query(ctx: Context) -> Iterator[Finding]:
    """api-key-in-logged-query: keys accepted in the query string end up in access logs."""
    nginx_log = access_log_query(ctx.kong_conf)
    for plugin in ctx.config.enabled(API_KEY_AUTH):
        if plugin.config.get("key_in_query") is not True:
            continue
        loggers = sorted({logger.path for route in ctx.routes_of(plugin) for name in LOGGING_PLUGINS
                          if (logger := ctx.on_route(name, route)) is not None})
        reasons = ([nginx_log] if nginx_log else []) + ([f"{_list(loggers)} log the URI"] if loggers else [])
        if reasons:
            yield Finding(
                Severity.ERROR, "api-key-in-logged-query", plugin.path,
                f"API keys are accepted in the query string (key_in_query) and {'; '.join(reasons)}",
                "set key_in_query: false (keys in a header), or log without query strings "
                "(`proxy_access_log` with a format using $uri, as kong.conf.example does)",
                ctx.tags(plugin))


def rule_report_only(ctx: Context) -> Iterator[Finding]:
    """report-only: client-cert-auth (or header-cert-auth) lets every request through and only logs
    its refusals."""
    for plugin in (*ctx.config.enabled(CLIENT_CERT_AUTH), *ctx.config.enabled(HEADER_CERT_AUTH)):
        if plugin.config.get("report_only") is True:
            yield Finding(
                Severity.WARNING, "report-only", plugin.path,
                "report_only is on: requests that would be refused pass, only a log line says so",
                "set report_only: false once the log shows no unexpected refusals", ctx.tags(plugin))


def rule_anonymous(ctx: Context) -> Iterator[Finding]:
    """anonymous and anonymous-missing."""
    for name in (CLIENT_CERT_AUTH, HEADER_CERT_AUTH, API_KEY_AUTH):
        for plugin in ctx.config.enabled(name):
            ref = plugin.config.get("anonymous")
            if not isinstance(ref, str) or not ref:
                continue
            tags = ctx.tags(plugin)
            yield Finding(
                Severity.WARNING, "anonymous", plugin.path,
                f"anonymous is set: requests without a valid credential pass as consumer {ref!r}",
                "remove anonymous unless another auth plugin on the route must accept what this one does "
                "not (then restrict the anonymous consumer, e.g. with acl)", tags)
            if ctx.config.find_consumer(ref) is None:
                yield Finding(
                    Severity.ERROR, "anonymous-missing", plugin.path,
                    f"anonymous names consumer {ref!r}, which is not in this config (by id or username): "
                    "requests without a valid credential get 500",
                    f"create the consumer {ref!r} or fix the reference", tags)


# -- trust anchors and plugin configs --------------------------------------------------------------------

def _expiry(ctx: Context, certs: Iterable[Any], path: str, tags: frozenset[str]) -> Iterator[Finding]:
    for cert, days in expiring_anchors(certs, ctx.now):
        until = cert.not_valid_after_utc.date().isoformat()
        expired = days < 0
        yield Finding(
            Severity.ERROR if expired else Severity.WARNING, "anchor-expiring", path,
            f"trust anchor {describe(cert)} "
            + (f"expired on {until}" if expired else f"expires on {until}, in {days} days"),
            "add the CA's successor next to it now, remove the old one once every certificate it signed "
            "is replaced", tags)


def rule_anchors(ctx: Context) -> Iterator[Finding]:
    """anchor-expiring and invalid-ca-certificate."""
    for ca in ctx.config.ca_certificates:
        try:
            certs = parse_pem_certificates(ca.cert if isinstance(ca.cert, str) else "")
        except ChainConfigError:
            yield Finding(Severity.ERROR, "invalid-ca-certificate", ca.path,
                          "cert is not a PEM certificate: Kong refuses this config",
                          "give the CA certificate as PEM text (-----BEGIN CERTIFICATE-----)", ca.tags)
            continue
        yield from _expiry(ctx, certs, ca.path, ca.tags)
    for name in PLUGIN_MODULES:
        for plugin in ctx.config.enabled(name):
            yield from _expiry(ctx, ctx.check(plugin).anchors, plugin.path, ctx.tags(plugin))


_DOCS = {CLIENT_CERT_REQUEST: CLIENT_CERT_AUTH}


def rule_invalid_plugin_config(ctx: Context) -> Iterator[Finding]:
    """invalid-plugin-config: a config our plugin refuses answers every request 500."""
    for name in PLUGIN_MODULES:
        for plugin in ctx.config.enabled(name):
            error = ctx.check(plugin).error
            if plugin.consumer is not None:
                error = "kong-mtls plugins cannot be scoped to a consumer"
            if error is not None:
                yield Finding(
                    Severity.ERROR, "invalid-plugin-config", plugin.path,
                    f"{name} would refuse this config ({error}): every request it runs for gets 500",
                    f"fix the field it names (docs/{_DOCS.get(name, name)}.md describes every field)",
                    ctx.tags(plugin))
    for plugin in ctx.config.enabled(GUARD):
        required = plugin.config.get(GUARD_PLUGIN_REQUIRE)
        unknown = ([r for r in required if r not in GUARDED_PLUGINS] if isinstance(required, list)
                   else [] if required is None else [required])
        if unknown:
            yield Finding(
                Severity.ERROR, "invalid-plugin-config", plugin.path,
                f"{GUARD}'s require names {', '.join(map(str, unknown))}, not one of "
                f"{', '.join(GUARDED_PLUGINS)}",
                "list only our plugins in require, or leave it out to require every one that runs",
                ctx.tags(plugin))


#: Every rule function, in report order.
RULES: tuple[Rule, ...] = (
    rule_invalid_plugin_config,
    rule_guard,
    rule_guard_without_plugin,
    rule_guard_too_late,
    rule_cert_auth_plain_http,
    rule_certificate_request,
    rule_shared_upstream_pool,
    rule_verify_without_ca,
    rule_upstream_identity_service,
    rule_api_key_in_logged_query,
    rule_report_only,
    rule_anonymous,
    rule_anchors,
)

#: Every rule id and its default severity (docs/lint.md has one section per id).
RULE_IDS = {
    "invalid-plugin-config": Severity.ERROR,
    "unguarded-route": Severity.ERROR,
    "guard-displaced": Severity.ERROR,
    "guard-without-plugin": Severity.ERROR,
    "guard-too-late": Severity.WARNING,
    "cert-auth-plain-http": Severity.ERROR,
    "api-key-plain-http": Severity.WARNING,
    "no-certificate-request": Severity.ERROR,
    "session-resumption": Severity.ERROR,
    "shared-upstream-pool": Severity.ERROR,
    "verify-without-ca": Severity.WARNING,
    "upstream-identity-service": Severity.ERROR,
    "api-key-in-logged-query": Severity.ERROR,
    "report-only": Severity.WARNING,
    "anonymous": Severity.WARNING,
    "anonymous-missing": Severity.ERROR,
    "anchor-expiring": Severity.WARNING,
    "invalid-ca-certificate": Severity.ERROR,
}


def lint(ctx: Context) -> list[Finding]:
    """Every finding of every rule (allowed ones included: see `Finding.allowed`)."""
    return [finding for rule in RULES for finding in rule(ctx)]
