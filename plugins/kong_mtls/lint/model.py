"""A Kong configuration as plain entities, and which plugin config Kong runs for a request.

Input is a declarative config (`_format_version` 1.1, 2.1 or 3.0; entities nested or flat, as
written by hand or as `GET /config` exports it) or the same top-level keys filled from the Admin
API's entity endpoints (references as `{"id": ...}`). References are resolved by id or name.

Which config of a plugin runs: Kong keeps one config per plugin and scope, and for each request
runs only the most specific one (route+service+consumer, route+consumer, service+consumer,
route+service, consumer, route, service, global: Kong's `plugins_iterator.lua`, 3.4 and 3.9 alike).
Disabled configs (`enabled: false`) do not take part. The consumer is the one an auth plugin
authenticated, so configs scoped to a consumer apply to plugins that run after authentication,
such as the guard.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional
from urllib.parse import urlsplit

FORMAT_VERSIONS = ("1.1", "2.1", "3.0")
#: Kong's defaults for a route without `protocols`.
DEFAULT_ROUTE_PROTOCOLS = ("http", "https")
_DEFAULT_PORTS = {"http": 80, "https": 443, "grpc": 80, "grpcs": 443, "ws": 80, "wss": 443}

#: (route key, service key, consumer key); None where the config names none.
Scope = tuple[Optional[str], Optional[str], Optional[str]]

#: Kong's order of precedence: which of (route, service, consumer) a config's scope names.
_PRECEDENCE = (
    (True, True, True), (True, False, True), (False, True, True), (True, True, False),
    (False, False, True), (True, False, False), (False, True, False), (False, False, False),
)


class InputError(ValueError):
    """A configuration that cannot be read as Kong's; the message says where."""


class _Entity:
    """An entity a finding names as `<table>[<label>]`."""

    TABLE: ClassVar[str]
    label: str

    @property
    def path(self) -> str:
        return f"{self.TABLE}[{self.label}]"


@dataclass(frozen=True)
class Service(_Entity):
    TABLE: ClassVar[str] = "services"
    key: str
    label: str
    name: str | None
    id: str | None
    protocol: str
    host: str | None
    port: int | None
    tls_verify: bool | None
    tls_verify_depth: int | None
    ca_certificates: tuple[str, ...]
    client_certificate: str | None
    tags: frozenset[str]

    def as_kong(self) -> dict[str, Any]:
        """The fields `kong.router.get_service()` returns that the plugins read."""
        return {"name": self.name, "id": self.id, "protocol": self.protocol, "host": self.host,
                "port": self.port, "tls_verify": self.tls_verify,
                "tls_verify_depth": self.tls_verify_depth,
                "ca_certificates": list(self.ca_certificates) or None,
                "client_certificate": {"id": self.client_certificate} if self.client_certificate else None}


@dataclass(frozen=True)
class Route(_Entity):
    TABLE: ClassVar[str] = "routes"
    key: str
    label: str
    service: str | None
    protocols: tuple[str, ...]
    tags: frozenset[str]
    preserve_host: bool = False


@dataclass(frozen=True)
class Consumer(_Entity):
    TABLE: ClassVar[str] = "consumers"
    key: str
    label: str
    id: str | None
    username: str | None
    custom_id: str | None


@dataclass(frozen=True)
class CaCertificate(_Entity):
    TABLE: ClassVar[str] = "ca_certificates"
    label: str
    cert: Any
    tags: frozenset[str]


@dataclass(frozen=True)
class PluginConfig:
    name: str
    config: Mapping[str, Any]
    scope: Scope
    enabled: bool
    tags: frozenset[str]
    path: str

    @property
    def route(self) -> str | None:
        return self.scope[0]

    @property
    def service(self) -> str | None:
        return self.scope[1]

    @property
    def consumer(self) -> str | None:
        return self.scope[2]


@dataclass
class KongConfig:
    services: dict[str, Service] = field(default_factory=dict)
    routes: dict[str, Route] = field(default_factory=dict)
    consumers: dict[str, Consumer] = field(default_factory=dict)
    ca_certificates: list[CaCertificate] = field(default_factory=list)
    plugins: list[PluginConfig] = field(default_factory=list)
    _combos: dict[str, dict[Scope, PluginConfig]] = field(default_factory=dict)

    def add_plugin(self, plugin: PluginConfig) -> None:
        self.plugins.append(plugin)
        if not plugin.enabled:
            return
        combos = self._combos.setdefault(plugin.name, {})
        if plugin.scope in combos:
            raise InputError(f"{plugin.path}: a second {plugin.name} config for the same route, service "
                             f"and consumer as {combos[plugin.scope].path} (Kong refuses this config)")
        combos[plugin.scope] = plugin

    def enabled(self, name: str) -> list[PluginConfig]:
        """Every enabled config of plugin `name`."""
        return list(self._combos.get(name, {}).values())

    def enabled_names(self) -> list[str]:
        """The names of the plugins with at least one enabled config."""
        return sorted(self._combos)

    def effective(self, name: str, route: str | None, service: str | None,
                  consumer: str | None = None) -> PluginConfig | None:
        """The config of `name` Kong runs for a request on `route` of `service` by `consumer`."""
        return next(self._applying(name, route, service, consumer), None)

    def candidates(self, name: str, route: str | None, service: str | None,
                   consumer: str | None = None) -> list[PluginConfig]:
        """Every config of `name` that could apply to such a request, most specific first."""
        return list(self._applying(name, route, service, consumer))

    def _applying(self, name: str, route: str | None, service: str | None,
                  consumer: str | None) -> Iterator[PluginConfig]:
        combos = self._combos.get(name) or {}
        for has_route, has_service, has_consumer in _PRECEDENCE:
            if (has_route and route is None) or (has_service and service is None) or \
                    (has_consumer and consumer is None):
                continue
            hit = combos.get((route if has_route else None, service if has_service else None,
                              consumer if has_consumer else None))
            if hit is not None:
                yield hit

    def route_service(self, route: Route) -> Service | None:
        return self.services.get(route.service) if route.service else None

    def find_consumer(self, ref: str) -> Consumer | None:
        """Like `kong.client.load_consumer(ref, true)`: by id, then by username."""
        for consumer in self.consumers.values():
            if consumer.id == ref:
                return consumer
        return next((c for c in self.consumers.values() if c.username == ref), None)

    def scope_path(self, scope: Scope) -> str:
        """`routes[a]`, `services[b]+consumers[c]`, or '' for global."""
        parts = []
        for key, table in zip(scope, (self.routes, self.services, self.consumers)):
            if key is not None:
                parts.append(table[key].path)
        return "+".join(parts)


# -- reading ---------------------------------------------------------------------------------------

def normalise(document: Any) -> KongConfig:
    """The entities of a declarative config (see the module docstring). Raises InputError."""
    if not isinstance(document, Mapping):
        raise InputError("expected a declarative config: a mapping with _format_version, services, ...")
    version = document.get("_format_version")
    if version is None:
        raise InputError("no _format_version: not a Kong declarative config")
    if str(version) not in FORMAT_VERSIONS:
        raise InputError(f"_format_version {version!r} is not one of {', '.join(FORMAT_VERSIONS)}")
    return _Reader(document).read()


@dataclass
class _RawPlugin:
    """A plugin as declared: nested (`scope` known) or top-level (`refs` to resolve)."""

    body: Mapping[str, Any]
    where: str
    scope: Scope | None = None
    refs: tuple[Any, Any, Any] = (None, None, None)


class _Reader:
    def __init__(self, document: Mapping[str, Any]) -> None:
        self.document = document
        self.out = KongConfig()
        self.raw_plugins: list[_RawPlugin] = []
        # (route, where it was declared, its service: a key when nested, else a reference)
        self.raw_routes: list[tuple[Mapping[str, Any], str, Any, bool]] = []
        self.index: dict[str, dict[str, str]] = {"services": {}, "routes": {}, "consumers": {}}
        self.keys: set[str] = set()  # entity keys already read (they name their kind)

    def read(self) -> KongConfig:
        doc = self.document
        for i, body in _items(doc, "services", "services"):
            self._service(body, i)
        for i, body in _items(doc, "routes", "routes"):
            self.raw_routes.append((body, f"routes[{_label(body, i)}]", _ref(body.get("service")), False))
        for i, body in _items(doc, "consumers", "consumers"):
            self._consumer(body, i)
        for i, body in _items(doc, "ca_certificates", "ca_certificates"):
            self.out.ca_certificates.append(
                CaCertificate(_label(body, i, "id"), body.get("cert"), _tags(body, f"ca_certificates[{i}]")))
        for i, body in _items(doc, "plugins", "plugins"):
            refs = (_ref(body.get("route")), _ref(body.get("service")), _ref(body.get("consumer")))
            self.raw_plugins.append(_RawPlugin(body, f"plugins[{i}]", refs=refs))
        for n, (body, where, service, nested) in enumerate(self.raw_routes, start=1):
            if not nested and service is not None:
                service = self._resolve("services", service, where)
            self._route(body, n, service)
        for raw in self.raw_plugins:
            self._plugin(raw)
        return self.out

    # Entities --------------------------------------------------------------------------------------
    def _register(self, table: str, key: str, body: Mapping[str, Any], where: str,
                  names: Sequence[str] = ("name",)) -> None:
        index = self.index[table]
        if key in self.keys:
            raise InputError(f"{where}: a second entity with this {' or '.join(('id', *names))}")
        self.keys.add(key)
        for field_name in ("id", *names):
            value = body.get(field_name)
            if value is None:
                continue
            if not isinstance(value, str):
                raise InputError(f"{where}.{field_name}: expected a string")
            if index.get(value, key) != key:
                raise InputError(f"{where}: {field_name} {value!r} is used twice")
            index[value] = key

    def _service(self, body: Mapping[str, Any], i: int) -> None:
        label = _label(body, i)
        where = f"services[{label}]"
        key = _key("service", body, i)
        self._register("services", key, body, where)
        protocol, host, port = body.get("protocol"), body.get("host"), body.get("port")
        url = body.get("url")
        if url is not None:
            if not isinstance(url, str):
                raise InputError(f"{where}.url: expected a string")
            try:
                parts = urlsplit(url)
                url_port = parts.port
            except ValueError as exc:
                raise InputError(f"{where}.url: {exc}") from None
            protocol = protocol or parts.scheme or None
            host = host or parts.hostname
            port = port or url_port
        protocol = _string(protocol, f"{where}.protocol") or "http"
        if port is None:
            port = _DEFAULT_PORTS.get(protocol, 80)
        depth = body.get("tls_verify_depth")
        self.out.services[key] = Service(
            key=key, label=label, name=_string(body.get("name"), f"{where}.name"),
            id=_string(body.get("id"), f"{where}.id"), protocol=protocol,
            host=_string(host, f"{where}.host"), port=_integer(port, f"{where}.port"),
            tls_verify=_boolean(body.get("tls_verify"), f"{where}.tls_verify"),
            tls_verify_depth=_integer(depth, f"{where}.tls_verify_depth"),
            ca_certificates=tuple(_strings(body.get("ca_certificates"), f"{where}.ca_certificates")),
            client_certificate=_ref(body.get("client_certificate")),
            tags=_tags(body, where))
        for j, route in _items(body, "routes", f"{where}.routes"):
            self.raw_routes.append((route, f"{where}.routes[{j}]", key, True))
        for j, plugin in _items(body, "plugins", f"{where}.plugins"):
            self.raw_plugins.append(_RawPlugin(plugin, f"{where}.plugins[{j}]", scope=(None, key, None)))

    def _route(self, body: Mapping[str, Any], n: int, service: str | None) -> None:
        label = _label(body, n)
        where = f"routes[{label}]"
        key = _key("route", body, n)
        self._register("routes", key, body, where)
        protocols = body.get("protocols")
        route = Route(key=key, label=label, service=service,
                      protocols=tuple(_strings(protocols, f"{where}.protocols")) if protocols is not None
                      else DEFAULT_ROUTE_PROTOCOLS,
                      tags=_tags(body, where), preserve_host=body.get("preserve_host") is True)
        self.out.routes[key] = route
        for j, plugin in _items(body, "plugins", f"{where}.plugins"):
            self.raw_plugins.append(_RawPlugin(plugin, f"{where}.plugins[{j}]", scope=(key, None, None)))

    def _consumer(self, body: Mapping[str, Any], i: int) -> None:
        label = _label(body, i, "username", "id", "custom_id")
        where = f"consumers[{label}]"
        key = _key("consumer", body, i, "username")
        self._register("consumers", key, body, where, names=("username",))
        self.out.consumers[key] = Consumer(
            key=key, label=label, id=_string(body.get("id"), f"{where}.id"),
            username=_string(body.get("username"), f"{where}.username"),
            custom_id=_string(body.get("custom_id"), f"{where}.custom_id"))
        for j, plugin in _items(body, "plugins", f"{where}.plugins"):
            self.raw_plugins.append(_RawPlugin(plugin, f"{where}.plugins[{j}]", scope=(None, None, key)))

    def _plugin(self, raw: _RawPlugin) -> None:
        body, where = raw.body, raw.where
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise InputError(f"{where}: a plugin needs a name")
        scope = raw.scope
        if scope is None:
            route, service, consumer = (None if ref is None else self._resolve(table, ref, where)
                                        for table, ref in zip(("routes", "services", "consumers"), raw.refs))
            scope = (route, service, consumer)
        config = body.get("config")
        if config is None:
            config = {}
        if not isinstance(config, Mapping):
            raise InputError(f"{where}.config: expected a mapping")
        enabled = body.get("enabled")
        label = body.get("instance_name") if isinstance(body.get("instance_name"), str) else name
        prefix = self.out.scope_path(scope)
        path = f"{prefix}.plugins[{label}]" if prefix else f"plugins[{label}]"
        self.out.add_plugin(PluginConfig(name=name, config=config, scope=scope,
                                         enabled=_boolean(enabled, f"{where}.enabled") is not False,
                                         tags=_tags(body, where), path=path))

    def _resolve(self, table: str, ref: Any, where: str) -> str:
        if not isinstance(ref, str):
            raise InputError(f"{where}: {table[:-1]} reference should be an id or a name")
        key = self.index[table].get(ref)
        if key is None:
            raise InputError(f"{where}: {table[:-1]} {ref!r} is not in this config")
        return key


# -- field helpers ---------------------------------------------------------------------------------

def _items(body: Mapping[str, Any], name: str, where: str) -> Iterator[tuple[int, Mapping[str, Any]]]:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, Mapping) and not value:  # an empty table exported as {}
        return
    if not isinstance(value, list):
        raise InputError(f"{where}: expected a list")
    for i, item in enumerate(value, start=1):
        if not isinstance(item, Mapping):
            raise InputError(f"{where}[{i}]: expected a mapping")
        yield i, item


def _label(body: Mapping[str, Any], i: int, *fields: str) -> str:
    for name in fields or ("name", "id"):
        value = body.get(name)
        if isinstance(value, str) and value:
            return value
    return f"#{i}"


def _key(kind: str, body: Mapping[str, Any], i: int, name_field: str = "name") -> str:
    for name in ("id", name_field):
        value = body.get(name)
        if isinstance(value, str) and value:
            return f"{kind}:{name}:{value}"
    return f"{kind}:#{i}"


def _ref(value: Any) -> Any:
    """A foreign key as written: a string (id or name), {"id": ...} or {"name": ...}, or None."""
    if isinstance(value, Mapping):
        value = value.get("id") or value.get("name") or value.get("username")
    if value is None or isinstance(value, str):
        return value
    raise InputError(f"a reference must be an id, a name or {{id: ...}}, not {type(value).__name__}")


def _string(value: Any, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise InputError(f"{where}: expected a string")


def _integer(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{where}: expected an integer")
    return value


def _boolean(value: Any, where: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise InputError(f"{where}: expected true or false")


def _strings(value: Any, where: str) -> list[str]:
    if value is None or (isinstance(value, Mapping) and not value):
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{where}: expected a list of strings")
    return value


def _tags(body: Mapping[str, Any], where: str) -> frozenset[str]:
    return frozenset(_strings(body.get("tags"), f"{where}.tags"))
