-- kong-mtls-guard: the fail-closed guard of the kong-mtls Python plugins (docs/guard.md).
--
-- Kong lets a request through when a plugin server errors, hangs or dies: it only logs the RPC
-- error. Each kong-mtls plugin therefore leaves a mark in kong.ctx.shared when, and only when, it
-- lets a request pass. This plugin runs after all of them and answers 503 unless every plugin it
-- requires left its mark.
--
--   config.require set: exactly those plugins must have left their mark.
--   config.require unset ("auto"): every kong-mtls plugin that Kong selected for this request
--   (the same route / service / consumer / global lookup Kong's plugins iterator does) must have
--   left its mark. One global guard then protects every route. If this Kong's iterator does not
--   expose what it selected, every request is refused (reason GUARD_NO_PLUGIN_LIST): the guard
--   never guesses.
--
-- The constants below are mirrored by kong_mtls.constants / kong_mtls.guard (Python);
-- tests/unit/test_guard_plugin.py checks that both agree.

local STATUS = 503
local MESSAGE = "Access control is unavailable, please retry later"
local REASON_NO_VERDICT = "GUARD_NO_VERDICT"
local REASON_NO_PLUGIN_LIST = "GUARD_NO_PLUGIN_LIST"
local MARK_PREFIX = "kong_mtls."

-- The kong-mtls plugins that leave a mark (client-cert-request protects nothing by itself).
local GUARDED_PLUGINS = { "ip-allowlist", "client-cert-auth", "header-cert-auth", "api-key-auth", "upstream-identity" }

local MARKS = {}
for _, name in ipairs(GUARDED_PLUGINS) do
  MARKS[name] = MARK_PREFIX .. name
end

local verdicts = require "kong.plugins.kong-mtls-guard.verdicts"

local ngx = ngx
local null = ngx.null
local type = type


local KongMtlsGuard = {
  -- Below every kong-mtls plugin (upstream-identity: 800); above every bundled plugin that can
  -- answer a request itself or send it elsewhere in the access phase (redirect 779, the ai-*
  -- plugins 768-777, standard-webhooks 760, aws-lambda 750, azure-functions 749, proxy-cache 100,
  -- request-termination 2, pre/post-function's user code at -1000).
  PRIORITY = 780,
  VERSION = "0.1.0",
  -- For the schema (one_of): the one list of names.
  GUARDED_PLUGINS = GUARDED_PLUGINS,
}


local lookup_cfg  -- Kong's own config lookup (plugins_iterator.lookup_cfg), or false when absent

local function kong_lookup()
  if lookup_cfg == nil then
    local ok, iterator = pcall(require, "kong.runloop.plugins_iterator")
    lookup_cfg = ok and type(iterator) == "table" and type(iterator.lookup_cfg) == "function"
                 and iterator.lookup_cfg or false
  end
  return lookup_cfg
end


-- Our plugins' handlers by name, once per plugin list (Kong builds a new list when the
-- configuration changes; the old one is then collected with its entry).
local handlers_by_list = setmetatable({}, { __mode = "k" })

local function our_handlers(list)
  local handlers = handlers_by_list[list]
  if not handlers then
    handlers = {}
    for i = 1, list[0] or #list do
      local plugin = list[i]
      if type(plugin) == "table" and MARKS[plugin.name] then
        handlers[plugin.name] = plugin.handler
      end
    end
    handlers_by_list[list] = handlers
  end
  return handlers
end


local function id_of(entity)
  return type(entity) == "table" and entity.id or nil
end


-- The kong-mtls plugins Kong selected for this request, or nil when this Kong does not expose its
-- selection. Kong's access-phase iterator (kong/runloop/plugins_iterator.lua, 3.4 and 3.9) keeps
-- the workspace's plugin list and per-plugin configs in ngx.ctx.plugins.ws and picks a config with
-- lookup_cfg(combos, route_id, service_id, consumer_id) when it reaches a plugin. The consumer is
-- the one authenticated at that moment, which may be before or after an auth plugin ran: a plugin
-- counts as selected if a config applies with no consumer or with the current one.
local function selected(ctx)
  local collected = ctx.plugins
  local ws = type(collected) == "table" and collected.ws
  local combos = type(ws) == "table" and ws.combos
  local list = type(ws) == "table" and ws.plugins
  local lookup = kong_lookup()
  if type(combos) ~= "table" or type(list) ~= "table" or not lookup then
    return nil
  end

  local route_id = id_of(ctx.route)
  local service_id = id_of(ctx.service)
  local consumer_id = id_of(ctx.authenticated_consumer)
  local names = {}
  local handlers = our_handlers(list)
  for _, name in ipairs(GUARDED_PLUGINS) do
    local configs = combos[name]
    if configs then
      local handler = handlers[name] or {}
      local route = not handler.no_route and route_id or nil
      local service = not handler.no_service and service_id or nil
      local consumer = not handler.no_consumer and consumer_id or nil
      if lookup(configs, route, service, nil) or (consumer and lookup(configs, route, service, consumer)) then
        names[#names + 1] = name
      end
    end
  end
  return names
end


local function refuse(reason, detail_name, detail)
  kong.log.err("[kong-mtls] guard refused reason=", reason, " ", detail_name, "=", detail)
  return kong.response.exit(STATUS, { message = MESSAGE })
end


-- Each worker: the verdict cache in front of our plugins' access handlers (verdicts.lua). Kong
-- runs init_worker for every loaded plugin, configured or not.
function KongMtlsGuard:init_worker()
  local db = kong.db
  verdicts.install(db and db.plugins and db.plugins.handlers)
end


function KongMtlsGuard:access(conf)
  local required = conf.require
  if required == nil or required == null then
    required = selected(ngx.ctx)
    if required == nil then
      return refuse(REASON_NO_PLUGIN_LIST, "detail",
                    "\"auto mode: this Kong does not expose the plugins it selected; set config.require\"")
    end
  end

  local shared = kong.ctx.shared
  for i = 1, #required do
    local mark = MARKS[required[i]]
    if not mark or not shared[mark] then
      return refuse(REASON_NO_VERDICT, "missing", mark or (MARK_PREFIX .. tostring(required[i])))
    end
  end
end


return KongMtlsGuard
