-- kong-mtls-guard's configuration (docs/guard.md).
local typedefs = require "kong.db.schema.typedefs"
local GUARDED_PLUGINS = require("kong.plugins.kong-mtls-guard.handler").GUARDED_PLUGINS

return {
  name = "kong-mtls-guard",
  fields = {
    -- Per route, per service or global; a consumer-scoped guard could be skipped for the very
    -- requests it must check.
    { consumer = typedefs.no_consumer },
    { protocols = typedefs.protocols_http },
    { config = {
        type = "record",
        fields = {
          -- The kong-mtls plugins whose mark is required. Unset: every kong-mtls plugin Kong
          -- selected for the request (auto). An empty list is refused: it would protect nothing.
          { require = {
              type = "array",
              required = false,
              len_min = 1,
              elements = { type = "string", one_of = GUARDED_PLUGINS },
          } },
        },
    } },
  },
}
