"""The verdict cache of the guard plugin (lua/kong/plugins/kong-mtls-guard/verdicts.lua), in LuaJIT.

A stand-in Kong: `ngx.var`, `ngx.req.get_headers`, `ngx.now`, and the PDK functions a verdict
replays, each noting its call. The plugin server is a Lua function standing for the RPC: it counts
its events, makes the calls its verdict names, and leaves the verdict in kong.ctx.shared as the
Python side does (`kong_mtls.kong.runtime`). What the Python side offers is checked against the
replay in tests/harness/kong_side.py (`check_verdict`, every protocol test); real Kong:
tests/integration/scenarios.py `test_15_...`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from kong_mtls.constants import (
    MAX_VERDICT_CACHE_TTL,
    VERDICT_APPLY_FLAG,
    VERDICT_CACHED_PLUGINS,
    VERDICT_REPLAYABLE,
    VERDICT_SLOT_PREFIX,
)
from kong_mtls.core.addresses import MAX_HEADER_LINES
from kong_mtls.guard import GUARDED_PLUGINS
from tests.harness.kong_side import Outcome, Request, RequestState, apply_verdict
from tests.harness.luajit import PLUGIN_DIR, lua_value, python_value, runtime

SOURCE = (PLUGIN_DIR / "verdicts.lua").read_text()

STAND_IN = r"""
local calls, logs, events = {}, {}, { count = 0 }
local clock = { now = 1000 }
local request = { var = {}, headers = {}, chain = nil }
local function note(name) return function(...) calls[#calls + 1] = { name, ... } end end
ngx = {
  null = setmetatable({}, {}),
  ctx = {},
  var = setmetatable({}, { __index = function(_, k) return request.var[k] end }),
  now = function() return clock.now end,
  req = { get_headers = function(max)
    local out, n = {}, 0
    for _, pair in ipairs(request.headers) do
      n = n + 1
      if n > max then return out, "truncated" end
      local name, value = pair[1]:lower(), pair[2]
      local seen = out[name]
      if seen == nil then out[name] = value
      elseif type(seen) == "table" then seen[#seen + 1] = value
      else out[name] = { seen, value } end
    end
    return out
  end },
}
kong = {
  ctx = { shared = {} },
  log = {
    notice = function(...) logs[#logs + 1] = table.concat({ "notice ", ... }) end,
    err = function(...) logs[#logs + 1] = table.concat({ "err ", ... }) end,
    warn = note("kong.log.warn"),
  },
  client = { authenticate = note("kong.client.authenticate"),
             tls = { set_client_verify = note("kong.client.tls.set_client_verify"),
                     get_full_client_certificate_chain = function() return request.chain end } },
  -- As Kong's: the request's headers are what the upstream gets (an empty list removes one).
  service = { request = { set_headers = function(map)
    note("kong.service.request.set_headers")(map)
    for name, value in pairs(map) do
      local kept = {}
      for _, pair in ipairs(request.headers) do
        if pair[1]:lower() ~= name:lower() then kept[#kept + 1] = pair end
      end
      for _, v in ipairs(type(value) == "table" and value or { value }) do kept[#kept + 1] = { name, v } end
      request.headers = kept
    end
  end } },
  -- As Kong's in the access phase: the answer is kept, and the plugin's coroutine yields for good.
  response = { exit = function(...) note("kong.response.exit")(...); coroutine.yield() end },
}

local verdicts = require "kong.plugins.kong-mtls-guard.verdicts"

-- The plugin server: leaves its verdict, then makes the calls it names (as the live plugin would:
-- the verdict goes before a refusal's answer, which yields), unless the verdict is one to apply
-- (then it makes none; `answer_live` has it answer 403 itself all the same). It notes whether the
-- config it got says the wrapper applies verdicts.
local server = { verdict = nil, told = nil }
local function access(self, conf)
  events.count = events.count + 1
  server.told = conf[verdicts.APPLY_FLAG]
  local verdict = server.verdict
  if verdict == nil then return end
  kong.ctx.shared["kong_mtls.verdict." .. self.name] = verdict
  if type(verdict) == "table" and verdict.apply then
    if verdict.answer_live then kong.response.exit(403) end
    return
  end
  if type(verdict) ~= "table" or type(verdict.calls) ~= "table" then return end
  for _, call in ipairs(verdict.calls) do
    if type(call[2]) ~= "table" then return end
    if call[1] == "kong.ctx.shared.set" then
      kong.ctx.shared[call[2][1]] = call[2][2]
    elseif call[1] == "kong.response.exit" then
      kong.response.exit(unpack(call[2], 1, call[3]))
    else
      note(call[1])(unpack(call[2], 1, call[3]))
    end
  end
end

local handlers = {}
for _, name in ipairs({ "ip-allowlist", "client-cert-auth", "api-key-auth", "upstream-identity" }) do
  handlers[name] = { name = name, access = access }
end
return {
  install = function()
    return verdicts.install(handlers)
  end,
  wrapped = function(name) return handlers[name].access ~= access end,
  -- One request: fresh ngx.ctx and kong.ctx.shared, then the plugin's access handler.
  request = function(name, conf, var, headers, chain, verdict, shared)
    calls, logs = {}, {}
    ngx.ctx, kong.ctx.shared = {}, shared or {}
    request.var, request.headers, request.chain = var or {}, headers or {}, chain
    server.verdict = verdict
    -- As Kong runs an access handler: in a coroutine of its own, resumed once.
    local co = coroutine.create(handlers[name].access)
    assert(coroutine.resume(co, handlers[name], conf))
    return calls, logs, kong.ctx.shared
  end,
  events = events,
  server = server,
  clock = clock,
  module = verdicts,
}
"""

PEER = "realip_remote_addr"
MARK = "kong_mtls.ip-allowlist"


def verdict(inputs: list, calls: list, ttl: float = 60, apply: bool = False) -> dict[str, Any]:
    """A verdict as the Python side leaves it: [kind, name, value] inputs, [method, args, n] calls;
    `apply`: the plugin server made none of the calls, the wrapper makes them."""
    record = {"ttl": ttl, "inputs": inputs, "calls": [[m, list(a), len(a)] for m, a in calls]}
    return {**record, "apply": True} if apply else record


def allow(peer: str, client_ip: str | None = None, ttl: float = 60, apply: bool = False) -> dict[str, Any]:
    calls = []
    if client_ip:
        calls.append(("kong.service.request.set_headers", ({"x-real-client-ip": [client_ip]},)))
    calls.append(("kong.ctx.shared.set", (MARK, {"client_ip": client_ip or peer, "trusted": True})))
    return verdict([["var", PEER, peer]], calls, ttl, apply)


class Kong:
    """verdicts.lua in a fresh LuaJIT with the stand-in Kong."""

    def __init__(self, prelude: str = "") -> None:
        self.lua = runtime()
        if prelude:  # Lua run before verdicts.lua is loaded (stand-ins of its own)
            self.lua.execute(prelude, SOURCE)
        self.side = self.lua.execute(STAND_IN)
        self.confs: dict[str, Any] = {}
        assert self.side.install() == 3              # header-cert-auth is not loaded in this Kong

    def conf(self, name: str = "a") -> Any:
        """A plugin config table (Kong's `conf`): the same name gives the same table."""
        return self.confs.setdefault(name, self.lua.table())

    def request(self, *, plugin: str = "ip-allowlist", conf: str = "a", var: Mapping[str, str] | None = None,
                headers: list[tuple[str, str]] | None = None, chain: str | None = None,
                offer: Mapping[str, Any] | None = None,
                shared: Mapping[str, Any] | None = None) -> tuple[list, list, dict]:
        """One request; `offer` is the verdict the plugin server leaves if it is asked, `shared`
        what kong.ctx.shared holds before the plugin runs. Returns the replayed or live calls
        (name, args...), the log lines, and kong.ctx.shared."""
        calls, logs, shared = self.side.request(
            plugin, self.conf(conf), lua_value(self.lua, dict(var or {})),
            lua_value(self.lua, [list(h) for h in headers or []]), chain,
            lua_value(self.lua, offer) if offer is not None else None,
            lua_value(self.lua, dict(shared)) if shared is not None else None)
        return python_value(calls) or [], python_value(logs) or [], python_value(shared) or {}

    @property
    def events(self) -> int:
        return int(self.side.events["count"])

    def advance(self, seconds: float) -> None:
        self.side.clock["now"] = self.side.clock["now"] + seconds


@pytest.fixture
def kong() -> Iterator[Kong]:
    yield Kong()


# -- one fact, two languages -----------------------------------------------------------------------

def _lua_constant(name: str) -> str:
    match = re.search(rf"^local {name} = (.+)$", SOURCE, re.MULTILINE)
    assert match, f"verdicts.lua: no `local {name} = ...`"
    return match.group(1).strip()


def test_the_lua_side_replays_and_limits_what_the_python_side_says() -> None:
    listed = re.search(r"^local REPLAYABLE = \{\n(.*?)\n\}", SOURCE, re.MULTILINE | re.DOTALL)
    assert listed and frozenset(re.findall(r'"([^"]+)"', listed.group(1))) == VERDICT_REPLAYABLE
    assert _lua_constant("SLOT_PREFIX") == f'"{VERDICT_SLOT_PREFIX}"'
    assert _lua_constant("APPLY_FLAG") == f'"{VERDICT_APPLY_FLAG}"'
    assert int(_lua_constant("MAX_TTL")) == MAX_VERDICT_CACHE_TTL
    assert int(_lua_constant("MAX_HEADER_LINES")) == MAX_HEADER_LINES
    handler = (PLUGIN_DIR / "handler.lua").read_text()
    assert "verdicts.install(db and db.plugins and db.plugins.handlers)" in handler
    cached = re.search(r"^local CACHED_PLUGINS = \{ (.*) \}$", SOURCE, re.MULTILINE)
    assert cached and tuple(re.findall(r'"([^"]+)"', cached.group(1))) == VERDICT_CACHED_PLUGINS
    assert set(VERDICT_CACHED_PLUGINS) <= set(GUARDED_PLUGINS)


# -- kept, replayed --------------------------------------------------------------------------------

def test_a_verdict_is_replayed_for_the_same_inputs_without_asking_the_plugin_server(kong: Kong) -> None:
    offer = allow("192.0.2.10", client_ip="192.0.2.10")
    live, _, shared = kong.request(var={PEER: "192.0.2.10"}, offer=offer)
    assert kong.events == 1 and shared == {MARK: {"client_ip": "192.0.2.10", "trusted": True}}
    assert VERDICT_SLOT_PREFIX + "ip-allowlist" not in shared       # taken out of kong.ctx.shared
    for _ in range(3):
        replayed, _, shared = kong.request(var={PEER: "192.0.2.10"}, offer=offer)
        assert replayed == live and shared == {MARK: {"client_ip": "192.0.2.10", "trusted": True}}
    assert kong.events == 1


def test_replayed_arguments_are_fresh_copies(kong: Kong) -> None:
    offer = allow("192.0.2.10")
    kong.request(var={PEER: "192.0.2.10"}, offer=offer)
    kong.request(var={PEER: "192.0.2.10"})
    kong.lua.execute('kong.ctx.shared["kong_mtls.ip-allowlist"].client_ip = "tampered"')
    _, _, shared = kong.request(var={PEER: "192.0.2.10"})
    assert shared[MARK]["client_ip"] == "192.0.2.10" and kong.events == 1


def test_another_input_value_asks_the_plugin_server(kong: Kong) -> None:
    kong.request(var={PEER: "192.0.2.10"}, offer=allow("192.0.2.10"))
    _, _, shared = kong.request(var={PEER: "192.0.2.11"})           # the server leaves nothing
    assert kong.events == 2 and shared == {}
    kong.request(var={PEER: "192.0.2.11"}, offer=allow("192.0.2.11"))
    assert kong.events == 3
    kong.request(var={PEER: "192.0.2.11"})
    kong.request(var={PEER: "192.0.2.10"})
    assert kong.events == 3


def test_a_refusal_is_replayed_with_its_log_line(kong: Kong) -> None:
    line = "[kong-mtls] ip-allowlist refused status=403 reason=NOT_ALLOWED"
    offer = verdict([["var", PEER, "203.0.113.9"]],
                    [("kong.log.warn", (line,)),
                     ("kong.response.exit", (403, {"message": "IP address not allowed: 203.0.113.9"}, {}))])
    live, _, _ = kong.request(var={PEER: "203.0.113.9"}, offer=offer)
    replayed, _, shared = kong.request(var={PEER: "203.0.113.9"})
    answer = ["kong.response.exit", 403, {"message": "IP address not allowed: 203.0.113.9"}, {}]
    assert replayed == live == [["kong.log.warn", line], answer]
    assert kong.events == 1 and shared == {}


# -- applied ---------------------------------------------------------------------------------------

def test_the_plugin_server_is_told_that_the_wrapper_applies_its_verdicts(kong: Kong) -> None:
    kong.request(var={PEER: "192.0.2.10"})
    assert kong.side.server["told"] is True
    assert kong.conf()[VERDICT_APPLY_FLAG] is True  # in the config Kong starts the instance with


def test_a_verdict_to_apply_makes_its_changes_here_and_is_kept(kong: Kong) -> None:
    offer = allow("192.0.2.10", client_ip="192.0.2.10", apply=True)
    applied, logs, shared = kong.request(var={PEER: "192.0.2.10"}, offer=offer)
    assert applied == [["kong.service.request.set_headers", {"x-real-client-ip": ["192.0.2.10"]}]]
    assert shared == {MARK: {"client_ip": "192.0.2.10", "trusted": True}} and logs == []
    replayed, _, shared = kong.request(var={PEER: "192.0.2.10"})
    assert replayed == applied and MARK in shared and kong.events == 1


def test_a_verdict_to_apply_with_no_ttl_is_applied_and_not_kept(kong: Kong) -> None:
    offer = {**allow("192.0.2.10", apply=True), "ttl": 0, "inputs": []}
    _, logs, shared = kong.request(var={PEER: "192.0.2.10"}, offer=offer)
    assert shared == {MARK: {"client_ip": "192.0.2.10", "trusted": True}} and logs == []
    _, _, shared = kong.request(var={PEER: "192.0.2.10"})  # asked again: the server leaves nothing
    assert shared == {} and kong.events == 2


def test_a_refusal_to_apply_is_answered_here_with_its_log_line(kong: Kong) -> None:
    line = "[kong-mtls] ip-allowlist refused status=403 reason=NOT_ALLOWED"
    answer = (403, {"message": "IP address not allowed: 203.0.113.9"}, {})
    offer = verdict([["var", PEER, "203.0.113.9"]],
                    [("kong.log.warn", (line,)), ("kong.response.exit", answer)], apply=True)
    applied, _, _ = kong.request(var={PEER: "203.0.113.9"}, offer=offer)
    assert applied == [["kong.log.warn", line], ["kong.response.exit", *answer]]
    replayed, _, _ = kong.request(var={PEER: "203.0.113.9"})
    assert replayed == applied and kong.events == 1


@pytest.mark.parametrize("calls", [
    [["kong.service.request.clear_header", ["x-consumer-id"], 1]],     # not replayable
    [], "calls", [["kong.ctx.shared.set", "args", 1]],
])
def test_a_malformed_verdict_to_apply_is_kongs_500_and_nothing_of_it_is_made(kong: Kong, calls: Any) -> None:
    offer = {"ttl": 0, "inputs": [], "apply": True, "calls": calls}
    with pytest.raises(pytest.importorskip("lupa.luajit21").LuaError,
                       match="verdict not applied reason=VERDICT_MALFORMED"):
        kong.request(var={PEER: "192.0.2.10"}, offer=offer)
    assert python_value(kong.lua.eval("kong.ctx.shared")) in ({}, None)


@pytest.mark.parametrize("ttl", [0, 60])
def test_a_verdict_to_apply_is_neither_made_nor_kept_after_the_plugin_server_answered(kong: Kong,
                                                                                     ttl: int) -> None:
    offer = {**allow("192.0.2.10", client_ip="192.0.2.10", ttl=ttl, apply=True), "answer_live": True}
    if not ttl:
        offer["inputs"] = []
    calls, _, shared = kong.request(var={PEER: "192.0.2.10"}, offer=offer)
    assert calls == [["kong.response.exit", 403]] and MARK not in shared
    _, _, shared = kong.request(var={PEER: "192.0.2.10"})  # asked again: nothing was kept
    assert kong.events == 2 and MARK not in shared


@pytest.mark.parametrize("planted", [allow("192.0.2.10", apply=True), allow("192.0.2.10")],
                         ids=["to-apply", "to-keep"])
def test_only_a_verdict_the_plugin_server_left_in_this_event_is_applied_or_kept(kong: Kong,
                                                                                planted: Any) -> None:
    """A record already in the verdict slot when the plugin runs (any earlier plugin can write
    kong.ctx.shared; one that copied client data there under a client-chosen key) is not the plugin
    server's: when the plugin server leaves nothing (it failed, Kong carried on), nothing of it is
    applied, so the guard still misses the mark, nor kept for the next requests."""
    slot = VERDICT_SLOT_PREFIX + "ip-allowlist"
    calls, logs, shared = kong.request(var={PEER: "192.0.2.10"}, shared={slot: planted})
    assert calls == [] and logs == [] and MARK not in shared and slot not in shared
    kong.request(var={PEER: "192.0.2.10"})
    assert kong.events == 2


def test_arguments_are_replayed_up_to_their_count_holes_included(kong: Kong) -> None:
    offer = {"ttl": 60, "inputs": [["var", PEER, "192.0.2.1"]],
             "calls": [["kong.client.authenticate", [{"id": "c1"}, None], 2],
                       ["kong.ctx.shared.set", [MARK, {"ok": True}], 2]]}
    kong.request(var={PEER: "192.0.2.1"}, offer=offer)
    calls, _, _ = kong.request(var={PEER: "192.0.2.1"})
    assert calls == [["kong.client.authenticate", {"id": "c1"}]] and kong.events == 1


# -- inputs ----------------------------------------------------------------------------------------

def header_verdict(peer: str, lines: list[str] | None) -> dict[str, Any]:
    return verdict([["var", PEER, peer], ["header", "x-forwarded-for", lines]],
                   [("kong.ctx.shared.set", (MARK, {"client_ip": "198.51.100.7"}))])


def test_header_lines_are_an_input_every_line_of_it(kong: Kong) -> None:
    one = [("X-Forwarded-For", "198.51.100.7"), ("User-Agent", "a")]
    kong.request(var={PEER: "10.0.0.1"}, headers=one, offer=header_verdict("10.0.0.1", ["198.51.100.7"]))
    kong.request(var={PEER: "10.0.0.1"}, headers=[("x-forwarded-for", "198.51.100.7"), ("User-Agent", "b")])
    assert kong.events == 1                                     # other headers are no input
    kong.request(var={PEER: "10.0.0.1"}, headers=[*one, ("X-Forwarded-For", "6.6.6.6")])
    kong.request(var={PEER: "10.0.0.1"}, headers=[("X-Forwarded-For", "6.6.6.6"), *one])
    kong.request(var={PEER: "10.0.0.1"})                        # no header at all
    assert kong.events == 4


def test_an_absent_header_is_an_input_too(kong: Kong) -> None:
    kong.request(var={PEER: "10.0.0.1"}, offer=header_verdict("10.0.0.1", None))
    kong.request(var={PEER: "10.0.0.1"})
    assert kong.events == 1
    kong.request(var={PEER: "10.0.0.1"}, headers=[("X-Forwarded-For", "")])
    assert kong.events == 2


def test_inputs_are_what_the_plugin_saw_before_it_changed_the_request(kong: Kong) -> None:
    """api-key-auth with hide_credentials removes the key header it decided on."""
    offer = verdict([["header", "apikey", ["k1"]]],
                    [("kong.service.request.set_headers", ({"apikey": []},)),
                     ("kong.ctx.shared.set", ("kong_mtls.api-key-auth", {"key_id": "k1"}))])
    live, logs, _ = kong.request(plugin="api-key-auth", headers=[("apikey", "k1")], offer=offer)
    assert logs == []
    replayed, _, shared = kong.request(plugin="api-key-auth", headers=[("apikey", "k1")])
    assert replayed == live and shared == {"kong_mtls.api-key-auth": {"key_id": "k1"}} and kong.events == 1
    kong.request(plugin="api-key-auth", headers=[("apikey", "k2")])
    assert kong.events == 2


def test_header_names_are_matched_as_nginx_stores_them(kong: Kong) -> None:
    """The plugin reads `x-forwarded-for`; a line sent as `X_Forwarded_For` is another header
    (nginx's lookup would turn `_` into `-`, the cache does not)."""
    kong.request(var={PEER: "10.0.0.1"}, offer=header_verdict("10.0.0.1", None))
    kong.request(var={PEER: "10.0.0.1"}, headers=[("X_Forwarded_For", "198.51.100.7")])
    assert kong.events == 1


def test_a_header_map_that_may_be_cut_is_never_an_input(kong: Kong) -> None:
    many = [(f"x-h{i}", "v") for i in range(MAX_HEADER_LINES - 1)]
    offer = header_verdict("10.0.0.1", None)
    kong.request(var={PEER: "10.0.0.1"}, headers=many, offer=offer)           # 999 lines: kept
    kong.request(var={PEER: "10.0.0.1"}, headers=many)
    assert kong.events == 1
    full = [*many, ("x-last", "v")]                                           # 1000 lines
    _, logs, _ = kong.request(var={PEER: "10.0.0.1"}, headers=full, offer=offer)
    kong.request(var={PEER: "10.0.0.1"}, headers=full)
    kong.request(var={PEER: "10.0.0.1"}, headers=[*full, ("x-more", "v")])   # truncated
    assert kong.events == 4
    assert any("VERDICT_INPUT_DIFFERS" in line for line in logs)


def test_a_verdict_whose_values_this_side_reads_otherwise_is_not_kept(kong: Kong) -> None:
    """The plugin's view and Kong's must agree, or the key would not be what decided."""
    _, logs, _ = kong.request(var={PEER: "10.0.0.1"}, offer=allow("10.0.0.2"))
    assert logs == ["notice [kong-mtls] verdict not cached reason=VERDICT_INPUT_DIFFERS "
                    "input=var:realip_remote_addr"]
    kong.request(var={PEER: "10.0.0.1"})
    kong.request(var={PEER: "10.0.0.2"})
    assert kong.events == 3


def test_the_client_chain_is_an_input(kong: Kong) -> None:
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    offer = verdict([["chain", "", pem]], [("kong.ctx.shared.set", ("kong_mtls.client-cert-auth", {"v": 1}))])
    kong.request(plugin="client-cert-auth", chain=pem, offer=offer)
    kong.request(plugin="client-cert-auth", chain=pem)
    kong.request(plugin="client-cert-auth", chain=pem.replace("MIIB", "MIIC"))
    kong.request(plugin="client-cert-auth", chain=None)
    assert kong.events == 3


# -- lifetime --------------------------------------------------------------------------------------

def test_a_verdict_lives_its_ttl_and_never_longer_than_the_cap(kong: Kong) -> None:
    kong.request(var={PEER: "192.0.2.1"}, offer=allow("192.0.2.1", ttl=5))
    kong.advance(4.9)
    kong.request(var={PEER: "192.0.2.1"})
    assert kong.events == 1
    kong.advance(0.2)
    kong.request(var={PEER: "192.0.2.1"})
    assert kong.events == 2
    kong.request(var={PEER: "192.0.2.2"}, offer=allow("192.0.2.2", ttl=10 * MAX_VERDICT_CACHE_TTL))
    kong.advance(MAX_VERDICT_CACHE_TTL + 1)
    kong.request(var={PEER: "192.0.2.2"})
    assert kong.events == 4


def test_another_plugin_config_has_its_own_verdicts(kong: Kong) -> None:
    """Kong builds new conf tables when the configuration changes: the old verdicts are not used."""
    kong.request(conf="a", var={PEER: "192.0.2.1"}, offer=allow("192.0.2.1"))
    kong.request(conf="b", var={PEER: "192.0.2.1"})
    kong.request(conf="a", var={PEER: "192.0.2.1"})
    assert kong.events == 2


def test_a_failed_plugin_server_leaves_nothing_to_keep(kong: Kong) -> None:
    for _ in range(2):
        calls, _, shared = kong.request(var={PEER: "192.0.2.1"})
        assert calls == [] and shared == {}
    assert kong.events == 2


# -- what is refused -------------------------------------------------------------------------------

@pytest.mark.parametrize("offer", [
    {"inputs": [["var", PEER, "192.0.2.1"]], "calls": [["kong.response.exit", [403], 1]]},          # no ttl
    {"ttl": 0, "inputs": [["var", PEER, "192.0.2.1"]], "calls": [["kong.response.exit", [403], 1]]},
    {"ttl": float("nan"), "inputs": [["var", PEER, "192.0.2.1"]],
     "calls": [["kong.response.exit", [403], 1]]},
    {"ttl": 60, "inputs": [], "calls": [["kong.response.exit", [403], 1]]},                        # no input
    {"ttl": 60, "inputs": [["cookie", "a", "1"]], "calls": [["kong.response.exit", [403], 1]]},
    {"ttl": 60, "inputs": [["var", PEER, "192.0.2.1"]], "calls": []},                             # no call
    {"ttl": 60, "inputs": [["var", PEER, "192.0.2.1"]],
     "calls": [["kong.service.request.set_body", [{"a": 1}], 1]]},                       # not replayable
    {"ttl": 60, "inputs": [["var", PEER, "192.0.2.1"]], "calls": [["kong.response.exit", 403, 1]]},
    "a string",
], ids=["no-ttl", "zero-ttl", "nan-ttl", "no-input", "unknown-input", "no-call", "set_body", "bad-args",
        "not-a-table"])
def test_a_malformed_or_unreplayable_verdict_is_not_kept(kong: Kong, offer: Any) -> None:
    _, logs, shared = kong.request(var={PEER: "192.0.2.1"}, offer=offer)
    assert logs == ["notice [kong-mtls] verdict not cached reason=VERDICT_MALFORMED"]
    assert VERDICT_SLOT_PREFIX + "ip-allowlist" not in shared
    kong.request(var={PEER: "192.0.2.1"})
    assert kong.events == 2


def test_at_most_four_input_sets_per_config(kong: Kong) -> None:
    """Each peer decided with one more header as input: four sets are kept, the fifth is not."""
    def offer(i: int) -> dict[str, Any]:
        inputs = [["var", PEER, f"192.0.2.{i}"]] + [["header", f"x-h{j}", None] for j in range(i)]
        return verdict(inputs, [("kong.ctx.shared.set", (MARK, {"i": i}))])

    for i in range(5):
        kong.request(var={PEER: f"192.0.2.{i}"}, offer=offer(i))
    for i in range(5):
        _, _, shared = kong.request(var={PEER: f"192.0.2.{i}"})
        assert shared == ({MARK: {"i": i}} if i < 4 else {})
    assert kong.events == 6


def test_install_wraps_each_handler_once(kong: Kong) -> None:
    assert kong.side.install() == 0
    assert kong.side.wrapped("api-key-auth") and not kong.side.wrapped("upstream-identity")
    kong.request(var={PEER: "192.0.2.1"}, offer=allow("192.0.2.1"))
    kong.request(var={PEER: "192.0.2.1"})
    assert kong.events == 1


# -- review findings -------------------------------------------------------------------------------

#: verdicts.lua with MAX_ENTRIES at 10, and every LRU it builds listed in CACHES (to count entries).
SMALL_AND_COUNTED = r"""
local source = ...
source = source:gsub("local MAX_ENTRIES = %d+", "local MAX_ENTRIES = 10")
package.preload["kong.plugins.kong-mtls-guard.verdicts"] = function()
  return assert(loadstring(source, "=verdicts.lua"))()
end
local lrucache = require "resty.lrucache"
local new = lrucache.new
CACHES = {}
lrucache.new = function(max)
  local cache = new(max)
  CACHES[#CACHES + 1] = cache
  return cache
end
"""


def test_a_worker_keeps_a_bounded_number_of_verdicts_whatever_the_number_of_configs() -> None:
    """review: a client with many addresses (IPv6) on many routes, each with its own config, does
    not grow a worker beyond MAX_ENTRIES verdicts (one LRU per worker)."""
    kong = Kong(SMALL_AND_COUNTED)
    line = "[kong-mtls] ip-allowlist refused status=403 reason=ADDRESS_NOT_ALLOWED"
    for route in range(20):                          # 20 routes, each with its own ip-allowlist config
        for i in range(10):
            peer = f"2001:db8::{route:x}:{i:x}"
            offer = verdict([["var", PEER, peer]], [("kong.log.warn", (line,)),
                                                    ("kong.response.exit", (403, {"message": "no"}, {}))])
            kong.request(conf=f"route-{route}", var={PEER: peer}, offer=offer)
    kept = kong.lua.eval("(function() local n = 0 for _, c in ipairs(CACHES) do n = n + c:count() end "
                         "return n end)()")
    assert kept <= 10, f"{kept} verdicts kept in one worker (at most MAX_ENTRIES, 10 here)"


def test_a_request_with_more_lines_than_api_key_auth_reads_can_still_be_answered(kong: Kong) -> None:
    """api-key-auth offers no verdict from a request of 100 header lines or more (Kong's default
    get_headers may have cut its key), but Kong reads up to 1,000 lines itself: such a request is
    answered by a verdict kept from a shorter one when every key line is the same (docs/guard.md)."""
    offer = verdict([["header", "apikey", ["k1"]]],
                    [("kong.ctx.shared.set", ("kong_mtls.api-key-auth", {"key_id": "k1"}))])
    kong.request(plugin="api-key-auth", headers=[("apikey", "k1")], offer=offer)
    padding = [(f"x-h{i}", "v") for i in range(150)]
    _, _, shared = kong.request(plugin="api-key-auth", headers=[*padding, ("apikey", "k1")])
    assert shared == {"kong_mtls.api-key-auth": {"key_id": "k1"}} and kong.events == 1
    kong.request(plugin="api-key-auth", headers=[("apikey", "k1"), *padding, ("apikey", "k2")])
    assert kong.events == 2                                       # a second key line past line 100


def test_the_harness_answers_a_verdict_whose_replay_raises_as_kong_does() -> None:
    """A call of a verdict to apply that raises in Lua (here `set_headers` without a table)
    leaves verdicts.lua's handler with the error, which Kong answers 500 (as it does for the same
    error in a live PDK call): tests/harness/kong_side.py `apply_verdict` says the same, and no
    later call of the verdict is made."""
    state = RequestState(Request(), [], {}, "3.9", Outcome(), "access", {})
    state.plugin_name = "api-key-auth"
    record = {"apply": True, "ttl": 0, "inputs": [],
              "calls": [["kong.service.request.set_headers", ["x-a"], 1],
                        ["kong.ctx.shared.set", ["kong_mtls.api-key-auth", {"ok": True}], 2]]}
    assert apply_verdict(record, state) is True
    assert state.outcome.exit.status == 500 and state.outcome.ctx_shared == {}
    assert "headers must be a table" in state.outcome.logs[-1][1]
