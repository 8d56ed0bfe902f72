"""The kong-mtls-guard Lua plugin (lua/kong/plugins/kong-mtls-guard/).

* its constants agree with the Python ones (the Lua cannot import them): name, priority, version,
  marks, status, message, reason codes, the list of guarded plugins; the rockspec installs both
  modules;
* its access handler, run in LuaJIT (lupa) with a stand-in for the parts of Kong it touches:
  `require` mode, auto mode over the plugins Kong selected (ngx.ctx.plugins.ws, as Kong 3.4 and 3.9
  keep it), and auto mode on a Kong that does not expose them. Real Kong: the integration
  scenarios `test_12_...`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest

from kong_mtls import __version__
from kong_mtls.constants import GUARD, PRIORITIES, SHARED_MARK_PREFIX, shared_mark
from kong_mtls.guard import (
    GUARD_MESSAGE,
    GUARD_REASON,
    GUARD_REASON_NO_PLUGIN_LIST,
    GUARD_STATUS,
    GUARDED_PLUGINS,
    guard_plugin,
    lua_guard,
)
from tests.harness.luajit import runtime as lua_runtime
from tests.integration.support import KONG_CONF_EXAMPLE, LUA_DIR, ROOT, parse_kong_conf

PLUGIN_DIR = LUA_DIR / "kong" / "plugins" / GUARD
HANDLER = (PLUGIN_DIR / "handler.lua").read_text()
SCHEMA = (PLUGIN_DIR / "schema.lua").read_text()


def lua_string(name: str) -> str:
    match = re.search(rf'^local {name} = "([^"\\]*)"$', HANDLER, re.MULTILINE)
    assert match, f"handler.lua: no `local {name} = \"...\"`"
    return match.group(1)


def lua_number(name: str) -> int:
    match = re.search(rf"^\s*(?:local )?{name} = (-?\d+),?$", HANDLER, re.MULTILINE)
    assert match, f"handler.lua: no `{name} = <number>`"
    return int(match.group(1))


# -- one fact, two languages -----------------------------------------------------------------------

def test_the_lua_guard_answers_and_logs_as_the_python_side_says() -> None:
    assert lua_number("STATUS") == GUARD_STATUS
    assert lua_string("MESSAGE") == GUARD_MESSAGE
    assert lua_string("REASON_NO_VERDICT") == GUARD_REASON
    assert lua_string("REASON_NO_PLUGIN_LIST") == GUARD_REASON_NO_PLUGIN_LIST
    assert lua_string("MARK_PREFIX") == SHARED_MARK_PREFIX


def test_the_lua_guard_knows_the_same_plugins_priority_and_version() -> None:
    listed = re.search(r"^local GUARDED_PLUGINS = \{ (.*) \}$", HANDLER, re.MULTILINE)
    assert listed, "handler.lua: no GUARDED_PLUGINS list"
    assert tuple(re.findall(r'"([^"]+)"', listed.group(1))) == GUARDED_PLUGINS
    assert lua_number("PRIORITY") == PRIORITIES[GUARD]
    assert f'VERSION = "{__version__}",' in HANDLER
    # After every plugin of ours that leaves a mark.
    assert all(PRIORITIES[GUARD] < PRIORITIES[name] for name in GUARDED_PLUGINS)
    assert f'name = "{GUARD}",' in SCHEMA
    assert 'require("kong.plugins.kong-mtls-guard.handler").GUARDED_PLUGINS' in SCHEMA


def test_the_rockspec_installs_both_modules_at_this_version() -> None:
    rockspecs = sorted(ROOT.glob("kong-plugin-*.rockspec"))
    assert [path.name for path in rockspecs] == [f"kong-plugin-{GUARD}-{__version__}-1.rockspec"]
    text = rockspecs[0].read_text()
    assert f'version = "{__version__}-1"' in text
    assert 'type = "builtin"' in text
    modules = dict(re.findall(r'\["(kong\.plugins\.[^"]+)"\] = "([^"]+)"', text))
    assert modules == {f"kong.plugins.{GUARD}.{part}": f"lua/kong/plugins/{GUARD}/{part}.lua"
                       for part in ("handler", "schema", "verdicts")}
    assert all((ROOT / path).is_file() for path in modules.values())


def test_the_plugin_entry_and_the_post_function_fallback() -> None:
    assert guard_plugin() == {"name": GUARD}                              # auto mode
    assert guard_plugin(["api-key-auth", "ip-allowlist", "api-key-auth"]) == {
        "name": GUARD, "config": {"require": ["api-key-auth", "ip-allowlist"]}}
    with pytest.raises(ValueError, match="key-auth"):
        guard_plugin(["key-auth"])
    with pytest.raises(ValueError):
        lua_guard([])                                                     # no auto mode there


def test_kong_conf_example_loads_the_guard_and_the_image_installs_it() -> None:
    conf = parse_kong_conf(KONG_CONF_EXAMPLE.read_text())
    assert GUARD in conf["plugins"].split(",")
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "COPY lua " in dockerfile and "luarocks make kong-plugin-kong-mtls-guard-" in dockerfile


# -- the handler in LuaJIT -------------------------------------------------------------------------

#: A stand-in for what the handler touches: kong.ctx.shared, kong.log.err, kong.response.exit,
#: ngx.ctx, ngx.null, and Kong's plugins iterator (its config lookup: the most specific of
#: route+service, route, service, global when no consumer is given; with a consumer, the
#: consumer-scoped keys first). `run(conf, ctx, shared)` returns the exit (status, message) or nil
#: and the logged lines.
HARNESS = r"""
local handler_source, iterator_present = ...
local exits, logs = {}, {}
ngx = { null = setmetatable({}, { __tostring = function() return "null" end }), ctx = {} }
kong = {
  ctx = { shared = {} },
  log = { err = function(...) logs[#logs + 1] = table.concat({ ... }) end },
  response = { exit = function(status, body) exits[#exits + 1] = { status, body.message } end },
}
local function key(r, s, c) return (r or "") .. ":" .. (s or "") .. ":" .. (c or "") end
package.loaded["kong.runloop.plugins_iterator"] = nil
package.preload["kong.runloop.plugins_iterator"] = function()
  if not iterator_present then error("module 'kong.runloop.plugins_iterator' not found") end
  return { lookup_cfg = function(combos, r, s, c)
    if c then
      for _, k in ipairs({ key(r, s, c), key(r, nil, c), key(nil, s, c), key(nil, nil, c) }) do
        if combos[k] then return combos[k] end
      end
    end
    for _, k in ipairs({ key(r, s, nil), key(r, nil, nil), key(nil, s, nil), key() }) do
      if combos[k] then return combos[k] end
    end
  end }
end
local handler = assert(loadstring(handler_source, "=handler.lua"))()
return handler, function(conf, ctx, shared)
  exits, logs = {}, {}
  ngx.ctx, kong.ctx.shared = ctx, shared
  handler:access(conf)
  return exits[1], logs
end
"""


def _lua_table(lua: Any, value: Any) -> Any:
    if isinstance(value, Mapping):
        table = lua.table()
        for k, v in value.items():
            table[k] = _lua_table(lua, v)
        return table
    if isinstance(value, (list, tuple)):
        return lua.table(*(_lua_table(lua, v) for v in value))
    return value


class Guard:
    """handler.lua loaded in a fresh LuaJIT runtime."""

    def __init__(self, iterator_present: bool = True) -> None:
        self.lua = lua_runtime()
        self.handler, self._run = self.lua.execute(HARNESS, HANDLER, iterator_present)

    def access(self, conf: Mapping[str, Any] | None, ctx: Mapping[str, Any],
               marked: Sequence[str] = (), shared: Mapping[str, Any] | None = None,
               ) -> tuple[tuple[int, str] | None, list[str]]:
        """Run access(conf); `marked` plugins left a mark, `shared` adds kong.ctx.shared keys."""
        shared = {**{shared_mark(name): {"verified": True} for name in marked}, **(shared or {})}
        lua_conf = _lua_table(self.lua, conf or {})
        if conf is None:
            lua_conf["require"] = self.lua.eval("ngx.null")
        exit_, logs = self._run(lua_conf, _lua_table(self.lua, ctx), _lua_table(self.lua, shared))
        return (None if exit_ is None else (exit_[1], exit_[2])), list(logs.values())

    def kong_ctx(self, configs: Mapping[str, Sequence[str]], route: str = "r1", service: str = "s1",
                 consumer: str | None = None) -> dict[str, Any]:
        """ngx.ctx as Kong's access phase leaves it: `configs` maps a plugin name to the compound
        keys (route:service:consumer) it is configured on."""
        names = [*configs, "acl"]
        plugins = {0: len(names), **{i: {"name": n, "handler": {}} for i, n in enumerate(names, start=1)}}
        combos = {name: {key: {"__plugin_id": key} for key in keys} for name, keys in configs.items()}
        ctx: dict[str, Any] = {"route": {"id": route}, "service": {"id": service},
                               "plugins": {"ws": {"plugins": plugins, "combos": combos}}}
        if consumer:
            ctx["authenticated_consumer"] = {"id": consumer}
        return ctx


@pytest.fixture(scope="module")
def guard() -> Iterator[Guard]:
    yield Guard()


REFUSED = (GUARD_STATUS, GUARD_MESSAGE)


def test_require_mode_needs_every_listed_mark(guard: Guard) -> None:
    conf = {"require": ["client-cert-auth", "api-key-auth"]}
    assert guard.access(conf, {}, ["client-cert-auth", "api-key-auth"]) == (None, [])
    refused, logs = guard.access(conf, {}, ["client-cert-auth", "ip-allowlist"])
    assert refused == REFUSED
    assert logs == [f"[kong-mtls] guard refused reason={GUARD_REASON} missing=kong_mtls.api-key-auth"]


def test_require_mode_ignores_what_kong_selected(guard: Guard) -> None:
    ctx = guard.kong_ctx({"ip-allowlist": ["r1::"]})
    assert guard.access({"require": ["api-key-auth"]}, ctx, ["api-key-auth"]) == (None, [])


def test_a_false_mark_is_no_mark_and_an_empty_table_is_one(guard: Guard) -> None:
    conf = {"require": ["ip-allowlist"]}
    assert guard.access(conf, {}, shared={shared_mark("ip-allowlist"): False})[0] == REFUSED
    assert guard.access(conf, {}, shared={shared_mark("ip-allowlist"): {}}) == (None, [])


@pytest.mark.parametrize(("configs", "consumer", "needed"), [
    ({}, None, []),                                                       # none of ours: pass
    ({"api-key-auth": ["r1::"]}, None, ["api-key-auth"]),                 # on the route
    ({"api-key-auth": [":s1:"]}, None, ["api-key-auth"]),                 # on its service
    ({"api-key-auth": ["::"]}, None, ["api-key-auth"]),                   # global
    ({"api-key-auth": ["r2::"], "ip-allowlist": [":s2:"]}, None, []),     # other routes' configs
    ({"upstream-identity": ["r1::"], "ip-allowlist": ["::"]}, None, ["ip-allowlist", "upstream-identity"]),
    ({"ip-allowlist": ["r1::c1"]}, "c1", ["ip-allowlist"]),               # this consumer's config
    ({"ip-allowlist": ["r1::c2"]}, "c1", []),                             # another consumer's
])
def test_auto_mode_needs_the_marks_of_the_plugins_kong_selected(
        guard: Guard, configs: dict, consumer: str | None, needed: list[str]) -> None:
    ctx = guard.kong_ctx(configs, consumer=consumer)
    assert guard.access(None, ctx, needed) == (None, [])
    for missing in needed:
        exit_, logs = guard.access(None, ctx, [name for name in needed if name != missing])
        assert exit_ == REFUSED
        assert logs == [f"[kong-mtls] guard refused reason={GUARD_REASON} missing={shared_mark(missing)}"]


def test_auto_mode_is_also_an_empty_config(guard: Guard) -> None:
    ctx = guard.kong_ctx({"client-cert-auth": ["r1::"]})
    assert guard.access({}, ctx)[0] == REFUSED
    assert guard.access({}, ctx, ["client-cert-auth"]) == (None, [])


@pytest.mark.parametrize("ctx", [{}, {"plugins": {}}, {"plugins": {"ws": {"plugins": {0: 0}}}}])
def test_auto_mode_refuses_when_kong_does_not_expose_its_selection(guard: Guard, ctx: dict) -> None:
    exit_, logs = guard.access(None, ctx, list(GUARDED_PLUGINS))
    assert exit_ == REFUSED
    assert len(logs) == 1 and f"reason={GUARD_REASON_NO_PLUGIN_LIST} " in logs[0]


def test_auto_mode_refuses_without_kongs_lookup_and_require_mode_does_not_need_it() -> None:
    guard = Guard(iterator_present=False)
    ctx = guard.kong_ctx({})
    assert guard.access(None, ctx)[0] == REFUSED
    assert guard.access({"require": ["ip-allowlist"]}, ctx, ["ip-allowlist"]) == (None, [])
