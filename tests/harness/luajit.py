"""The guard plugin's Lua modules in lupa's LuaJIT 2.1 (Kong's Lua is OpenResty's LuaJIT 2.1), with
stand-ins for the two OpenResty libraries they require: `resty.sha256` (Python's hashlib) and
`resty.lrucache` (entries with a TTL against `ngx.now()`, at most `max` of them, least recently
used first out). Tests skip without lupa.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import pytest

from tests.integration.support import LUA_DIR

PLUGIN_DIR = LUA_DIR / "kong" / "plugins" / "kong-mtls-guard"

PRELOADS = r"""
local sha256_of, sources = ...
package.preload["resty.sha256"] = function()
  local mt = { __index = {} }
  function mt.__index:update(s) self.parts[#self.parts + 1] = s; return true end
  function mt.__index:final() return sha256_of(table.concat(self.parts)) end
  return { new = function() return setmetatable({ parts = {} }, mt) end }
end
package.preload["resty.lrucache"] = function()
  local mt = { __index = {} }
  function mt.__index:get(key)
    local entry = self.entries[key]
    if entry and entry.expires > ngx.now() then
      self.tick = self.tick + 1
      entry.used = self.tick
      return entry.value
    end
    self.entries[key] = nil
  end
  function mt.__index:set(key, value, ttl)
    local count, oldest, oldest_key = 0, math.huge, nil
    for k, e in pairs(self.entries) do
      count = count + 1
      if e.used < oldest then oldest, oldest_key = e.used, k end
    end
    if count >= self.max and self.entries[key] == nil then self.entries[oldest_key] = nil end
    self.tick = self.tick + 1
    self.entries[key] = { value = value, expires = ngx.now() + ttl, used = self.tick }
  end
  function mt.__index:count()
    local n = 0
    for _ in pairs(self.entries) do n = n + 1 end
    return n
  end
  return { new = function(max) return setmetatable({ entries = {}, max = max, tick = 0 }, mt) end }
end
for name, source in pairs(sources) do
  package.preload["kong.plugins.kong-mtls-guard." .. name] = function()
    return assert(loadstring(source, "=" .. name .. ".lua"))()
  end
end
"""


def runtime() -> Any:
    """A fresh LuaJIT runtime where `require "kong.plugins.kong-mtls-guard.<module>"` loads this
    checkout's module."""
    pytest.importorskip("lupa")
    luajit = pytest.importorskip("lupa.luajit21")
    lua = luajit.LuaRuntime()
    sources = lua.table_from({path.stem: path.read_text() for path in PLUGIN_DIR.glob("*.lua")})
    lua.execute(PRELOADS, lambda text: hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest(),
                sources)
    return lua


def lua_value(lua: Any, value: Any) -> Any:
    """A Python value as the Lua value Kong's MessagePack decoder would give: mappings and lists
    become tables (None leaves a hole)."""
    if isinstance(value, Mapping):
        table = lua.table()
        for k, v in value.items():
            table[lua_value(lua, k)] = lua_value(lua, v)
        return table
    if isinstance(value, (list, tuple)):
        table = lua.table()
        for i, v in enumerate(value, start=1):
            if v is not None:
                table[i] = lua_value(lua, v)
        return table
    return value


def python_value(value: Any) -> Any:
    """A Lua value back in Python: tables with keys 1..n become lists, other tables dicts."""
    if hasattr(value, "items") and not isinstance(value, Mapping):
        items = {python_value(k): python_value(v) for k, v in value.items()}
        if items and sorted(items, key=str) == list(range(1, len(items) + 1)):
            return [items[i] for i in range(1, len(items) + 1)]
        return items
    return value
