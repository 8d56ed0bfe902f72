-- kong-mtls verdict cache (docs/guard.md#the-verdict-cache): Kong applies, in-process, a verdict a
-- kong-mtls plugin server already gave for the same inputs, instead of asking it again.
--
-- Every PDK round trip to a plugin server costs tens of microseconds on each side; a warm request
-- of ours has none. It works like this, per plugin config (Kong's `conf` table, rebuilt when the
-- configuration changes, so a change empties the cache):
--
-- * On a request the cache cannot answer, Kong calls the plugin server as usual. The plugin's
--   verdict comes back in kong.ctx.shared["kong_mtls.verdict.<plugin>"]: the inputs that decided it
--   (kind, name and the value the plugin read), how long it holds, and the PDK calls the plugin
--   made that change the request (upstream headers, consumer, marks, the answer and its log line).
-- * The verdict is kept only if this side reads the very same input values (the plugin's view and
--   ours must agree), under the SHA-256 of those values, for at most its TTL.
-- * A later request with the same values under the same plugin config gets the same calls, in the
--   same order, with fresh copies of their arguments. Nothing else reaches the plugin server.
-- * The plugin server also leaves to Kong the calls of the request it decides: told by a key of
--   ours in the plugin's config, it makes none that changes the request and puts them all in the
--   verdict, marked `apply`; they are applied here, in-process, in one go (one PDK round trip
--   for them all instead of one each), kept or not.
--
-- Only plain reads are inputs (an nginx variable, every line of one request header, the client's
-- certificate chain); a header map Kong could not read whole is never an input, so such a request
-- always goes to the plugin server. Only the calls listed in REPLAYABLE are replayed: a verdict
-- with any other call is not kept.

local resty_sha256 = require "resty.sha256"
local lrucache = require "resty.lrucache"

local ngx = ngx
local type = type
local tostring = tostring
local concat = table.concat
local unpack = unpack
local pairs = pairs

local SLOT_PREFIX = "kong_mtls.verdict."
-- The config key that tells a plugin server this wrapper applies its verdicts
-- (kong_mtls.constants.VERDICT_APPLY_FLAG says the same).
local APPLY_FLAG = "__kong_mtls_applies_verdicts"
-- As many header lines as the plugins read (kong_mtls.core.addresses.MAX_HEADER_LINES): a request
-- with this many or more is never answered from the cache.
local MAX_HEADER_LINES = 1000
-- Longest a verdict is kept (kong_mtls.constants.MAX_VERDICT_CACHE_TTL), whatever it says.
local MAX_TTL = 3600
-- Verdicts kept per worker, of every plugin config (least recently used ones go first).
local MAX_ENTRIES = 10000
-- Different input sets per plugin config (e.g. an untrusted peer decided alone, a trusted proxy
-- with its header): a verdict naming yet another set is not kept.
local MAX_INPUT_SETS = 4

-- The plugins that offer verdicts (kong_mtls.constants.VERDICT_CACHED_PLUGINS says the same).
local CACHED_PLUGINS = { "ip-allowlist", "client-cert-auth", "header-cert-auth", "api-key-auth" }

-- The PDK calls a verdict may carry (kong_mtls.constants.VERDICT_REPLAYABLE says the same).
local REPLAYABLE = {
  "kong.client.authenticate",
  "kong.client.tls.set_client_verify",
  "kong.ctx.shared.set",
  "kong.log.debug",
  "kong.log.info",
  "kong.log.notice",
  "kong.log.warn",
  "kong.log.err",
  "kong.response.exit",
  "kong.service.request.set_headers",
}
local REPLAYABLE_SET = {}
for _, name in ipairs(REPLAYABLE) do
  REPLAYABLE_SET[name] = true
end

local UNREADABLE = {}  -- an input this side cannot read as the plugin would have


-- The request's header lines as a plugin is about to see them, or UNREADABLE when there may be
-- more than the plugins read. Read before each plugin runs: a plugin may change them (api-key-auth
-- removes the key it read with hide_credentials), and what decided is what it saw.
local function read_headers()
  local headers, err = ngx.req.get_headers(MAX_HEADER_LINES)
  if err == "truncated" then
    return UNREADABLE
  end
  local lines = 0
  for _, value in pairs(headers) do
    lines = lines + (type(value) == "table" and #value or 1)
  end
  if lines >= MAX_HEADER_LINES then
    return UNREADABLE
  end
  return headers
end


-- Each reader takes the input's name and `view`, this request's reads for one plugin.
local READERS = {
  var = function(name)
    return ngx.var[name]
  end,
  header = function(name, view)
    local headers = view.headers
    if headers == nil then
      headers = read_headers()
      view.headers = headers
    end
    if headers == UNREADABLE then
      return UNREADABLE
    end
    -- The name exactly as nginx stored it (lower case): no `_` to `-` folding.
    local value = rawget(headers, name)
    if type(value) == "string" then
      return { value }
    end
    return value
  end,
  chain = function()
    return kong.client.tls.get_full_client_certificate_chain()
  end,
}


-- One value, written so that different values never write the same text: nil, a string, or a
-- list of strings (header lines).
local function encode(value, out)
  local kind = type(value)
  if kind == "string" then
    out[#out + 1] = "s" .. #value .. ":"
    out[#out + 1] = value
  elseif value == nil or value == ngx.null then
    out[#out + 1] = "n"
  elseif kind == "table" then
    out[#out + 1] = "l" .. #value .. ":"
    for i = 1, #value do
      if type(value[i]) ~= "string" then
        return false
      end
      encode(value[i], out)
    end
  else
    return false
  end
  return true
end


local function digest(parts)
  local sha = resty_sha256:new()
  sha:update(concat(parts))
  return sha:final()
end


-- The cache key of this request for an input set, or nil when an input cannot be read.
local function key_of(inputs, view)
  local parts = {}
  for i = 1, #inputs do
    local input = inputs[i]
    local value = READERS[input[1]](input[2], view)
    if value == UNREADABLE or not encode(value, parts) then
      return nil
    end
  end
  return digest(parts)
end


local function deep_copy(value)
  if type(value) ~= "table" then
    return value
  end
  local copy = {}
  for k, v in pairs(value) do
    copy[k] = deep_copy(v)
  end
  return copy
end


-- The PDK function a call names, looked up now: kong.log is the running plugin's own logger.
local function pdk_function(method)
  local target = _G
  for segment in method:gmatch("[^.]+") do
    target = type(target) == "table" and target[segment] or nil
  end
  return target
end


local function replay(calls)
  local shared = kong.ctx.shared
  for i = 1, #calls do
    local call = calls[i]
    local args = deep_copy(call[2])
    if call[1] == "kong.ctx.shared.set" then
      shared[args[1]] = args[2]
    else
      pdk_function(call[1])(unpack(args, 1, call[3]))
    end
  end
end


-- A verdict's calls, checked: each a REPLAYABLE PDK function with its arguments; nil when
-- anything is off.
local function checked_calls(calls)
  if type(calls) ~= "table" or #calls == 0 then
    return nil
  end
  for i = 1, #calls do
    local call = calls[i]
    if type(call) ~= "table" or not REPLAYABLE_SET[call[1]] or type(call[2]) ~= "table"
       or type(call[3]) ~= "number" then
      return nil
    end
  end
  return calls
end


-- A verdict as the plugin server sent it, checked for keeping: its inputs ({kind, name} and the
-- plugin's values), calls and TTL; nil when anything is off.
local function checked(record)
  if type(record) ~= "table" then
    return nil
  end
  local ttl, inputs, calls = record.ttl, record.inputs, checked_calls(record.calls)
  -- `not (ttl > 0)`: a NaN is no TTL (compared, it would pass for the longest one).
  if type(ttl) ~= "number" or not (ttl > 0) or type(inputs) ~= "table" or not calls or #inputs == 0 then
    return nil
  end
  for i = 1, #inputs do
    local input = inputs[i]
    if type(input) ~= "table" or not READERS[input[1]] or type(input[2]) ~= "string" then
      return nil
    end
  end
  return ttl < MAX_TTL and ttl or MAX_TTL, inputs, calls
end


local function input_set_name(inputs)
  local parts = {}
  for i = 1, #inputs do
    parts[#parts + 1] = inputs[i][1] .. "\0" .. inputs[i][2]
  end
  return concat(parts, "\0\0")
end


-- conf -> its input sets, each { inputs = {{kind, name}, ...}, name = ..., prefix = ... }. A set's
-- verdicts are in `entries` under its prefix (a number never given twice in a worker) and the key.
local by_conf = setmetatable({}, { __mode = "k" })
local entries
local sets_made = 0


local function lookup(conf, view)
  local sets = by_conf[conf]
  if sets then
    for i = 1, #sets do
      local set = sets[i]
      local key = key_of(set.inputs, view)
      local calls = key and entries:get(set.prefix .. key)
      if calls then
        return calls
      end
    end
  end
  return nil
end


local function keep(record, conf, view)
  if record == nil or type(record) == "table" and record.apply == true and record.ttl == 0 then
    return
  end
  local ttl, inputs, calls = checked(record)
  if not ttl then
    kong.log.notice("[kong-mtls] verdict not cached reason=VERDICT_MALFORMED")
    return
  end

  local ours, theirs = {}, {}
  for i = 1, #inputs do
    local input = inputs[i]
    local value = READERS[input[1]](input[2], view)
    if value == UNREADABLE or not encode(value, ours) or not encode(input[3], theirs)
       or concat(ours) ~= concat(theirs) then
      kong.log.notice("[kong-mtls] verdict not cached reason=VERDICT_INPUT_DIFFERS input=", input[1],
                      ":", input[2])
      return
    end
  end

  local name = input_set_name(inputs)
  local sets = by_conf[conf]
  if not sets then
    sets = {}
    by_conf[conf] = sets
  end
  local set
  for i = 1, #sets do
    if sets[i].name == name then
      set = sets[i]
    end
  end
  if not set then
    if #sets >= MAX_INPUT_SETS then
      return
    end
    local names = {}
    for i = 1, #inputs do
      names[i] = { inputs[i][1], inputs[i][2] }
    end
    sets_made = sets_made + 1
    set = { inputs = names, name = name, prefix = sets_made .. ":" }
    sets[#sets + 1] = set
  end
  entries = entries or assert(lrucache.new(MAX_ENTRIES))
  entries:set(set.prefix .. digest(ours), calls, ttl)
end


-- `handler.access` of a kong-mtls plugin served by a plugin server, answering from the cache.
-- The plugin's own handler runs in a coroutine of ours: in the access phase kong.response.exit
-- yields (Kong runs each plugin in a coroutine and never resumes one that answered), and the
-- verdict of a refusal must be kept before this handler yields in turn.
--
-- APPLY_FLAG in the plugin's config (sent to the plugin server when Kong starts the instance) tells
-- the plugin server that this wrapper applies its verdicts: it then makes no call that changes the
-- request, and leaves them all, with the answer if any, in a verdict marked `apply`, which is
-- applied here, in-process, whether or not it is kept.
local function cached_access(plugin_name, access)
  local slot = SLOT_PREFIX .. plugin_name
  return function(self, conf)
    local view = {}
    local calls = lookup(conf, view)
    if calls then
      return replay(calls)
    end
    if view.headers == nil then
      view.headers = read_headers()
    end
    if conf[APPLY_FLAG] == nil then
      conf[APPLY_FLAG] = true
    end
    -- Only what the plugin server leaves in this event is its verdict (any plugin can write here).
    local shared = kong.ctx.shared
    shared[slot] = nil
    local co = coroutine.create(access)
    local ran, err = coroutine.resume(co, self, conf)
    local record = shared[slot]
    shared[slot] = nil
    local to_apply = type(record) == "table" and record.apply == true
    -- The plugin server answered (kong.response.exit): a verdict to apply is then neither applied
    -- nor kept (later requests get nothing this one did not); a verdict it made itself is kept.
    local answered = ran and coroutine.status(co) == "suspended"
    if not (answered and to_apply) then
      local kept, keep_err = pcall(keep, record, conf, view)
      if not kept then
        kong.log.err("[kong-mtls] verdict not cached reason=VERDICT_CACHE_ERROR detail=", tostring(keep_err))
      end
    end
    if not ran then
      error(err, 0)
    end
    if answered then
      return coroutine.yield()
    end
    if to_apply then
      local changes = checked_calls(record.calls)
      if not changes then  -- Kong answers 500: nothing of the verdict is applied
        error("[kong-mtls] verdict not applied reason=VERDICT_MALFORMED", 0)
      end
      return replay(changes)
    end
  end
end


local installed = setmetatable({}, { __mode = "k" })

-- Put the cache in front of the access handler of each of CACHED_PLUGINS Kong loaded (`handlers`:
-- Kong's name -> handler table, kong.db.plugins.handlers). Once per handler, in each worker.
local function install(handlers)
  if type(handlers) ~= "table" then
    return 0
  end
  local count = 0
  for _, name in ipairs(CACHED_PLUGINS) do
    local handler = handlers[name]
    if type(handler) == "table" and type(handler.access) == "function" and not installed[handler] then
      handler.access = cached_access(name, handler.access)
      installed[handler] = true
      count = count + 1
    end
  end
  return count
end


return {
  install = install,
  CACHED_PLUGINS = CACHED_PLUGINS,
  REPLAYABLE = REPLAYABLE,
  SLOT_PREFIX = SLOT_PREFIX,
  APPLY_FLAG = APPLY_FLAG,
}
