-- The kong-mtls fail-closed guard as a Kong plugin of its own (docs/guard.md), installable without
-- the rest of kong-mtls:  luarocks make kong-plugin-kong-mtls-guard-0.1.0-1.rockspec
-- (run it with Kong's luarocks, then add kong-mtls-guard to `plugins =` in kong.conf).
rockspec_format = "3.0"
package = "kong-plugin-kong-mtls-guard"
version = "0.1.0-1"

-- Built from this checkout (`luarocks make`); the project publishes no rock of its own yet.
source = {
  url = "file://.",
}

description = {
  summary = "Fail-closed guard for the kong-mtls Python plugins: 503 unless each of them vouched for the request",
  license = "Apache-2.0",
}

dependencies = {
  "lua >= 5.1",
}

build = {
  type = "builtin",
  modules = {
    ["kong.plugins.kong-mtls-guard.handler"] = "lua/kong/plugins/kong-mtls-guard/handler.lua",
    ["kong.plugins.kong-mtls-guard.schema"] = "lua/kong/plugins/kong-mtls-guard/schema.lua",
    ["kong.plugins.kong-mtls-guard.verdicts"] = "lua/kong/plugins/kong-mtls-guard/verdicts.lua",
  },
}
