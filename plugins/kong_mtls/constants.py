"""Facts shared by several plugins: names, priorities, header names, client-facing messages.

Plugin-specific messages live beside the plugin's core; everything here is used by more than one.
"""

from __future__ import annotations

from kong_mtls import __version__

#: The `x.y.z` version string every plugin reports to Kong (Kong rejects anything else).
PLUGIN_VERSION = __version__

# Kong plugin names. Kong runs plugins by descending priority (Kong's bundled plugins for reference:
# key-auth 1250, ip-restriction 990, acl 950, post-function -1000, Enterprise mtls-auth 1600).
IP_ALLOWLIST = "ip-allowlist"
CLIENT_CERT_AUTH = "client-cert-auth"
API_KEY_AUTH = "api-key-auth"
UPSTREAM_IDENTITY = "upstream-identity"
#: Client certificates an edge (Cloudflare, CloudFront, an ALB, Envoy) forwards in a header.
HEADER_CERT_AUTH = "header-cert-auth"
#: Global only: asks TLS clients for a certificate in the `certificate` phase (instead of nginx).
CLIENT_CERT_REQUEST = "client-cert-request"
#: The fail-closed guard: a Lua plugin (lua/kong/plugins/kong-mtls-guard/), not a plugin server.
GUARD = "kong-mtls-guard"

#: Kong plugin name -> the module serving it (`python -m <module>`, console script
#: `kong-mtls-<name>`).
PLUGIN_MODULES: dict[str, str] = {
    IP_ALLOWLIST: "kong_mtls.kong.ip_allowlist",
    CLIENT_CERT_AUTH: "kong_mtls.kong.client_cert_auth",
    API_KEY_AUTH: "kong_mtls.kong.api_key_auth",
    UPSTREAM_IDENTITY: "kong_mtls.kong.upstream_identity",
    CLIENT_CERT_REQUEST: "kong_mtls.kong.client_cert_request",
    HEADER_CERT_AUTH: "kong_mtls.kong.header_cert_auth",
}

#: How each plugin spells `kong.log.<level>` over RPC: Kong resolves a PDK method by the word
#: segments of its name (punctuation is ignored) and caches the function per worker by the name as
#: sent; a `kong.log` function belongs to the namespaced logger of the plugin that first called it,
#: so one shared `kong.log.warn` would tag every plugin's lines with that first plugin's name
#: (`mp_rpc.lua`, `get_field`). A spelling of its own keeps each plugin's `[name]` in Kong's log.
LOG_METHOD_SUFFIXES: dict[str, str] = {name: "." * n for n, name in enumerate(PLUGIN_MODULES, start=1)}

PRIORITIES: dict[str, int] = {
    # First: a refused peer costs nothing else, and the resolved client address is published for
    # the plugins below.
    IP_ALLOWLIST: 1800,
    # Like Enterprise mtls-auth: before key auth, so api-key-auth can bind a key to the certificate.
    CLIENT_CERT_AUTH: 1600,
    # Just after client-cert-auth, which it shares its core with (a route has one or the other).
    HEADER_CERT_AUTH: 1590,
    # Just above Kong's key-auth (1250).
    API_KEY_AUTH: 1260,
    # After acl (950): only authorised requests reach the upstream check.
    UPSTREAM_IDENTITY: 800,
    # Runs in the certificate phase only, where no other of ours runs.
    CLIENT_CERT_REQUEST: 1610,
    # The Lua guard (its handler.lua says the same; tests/unit/test_guard_plugin.py checks): after
    # every plugin of ours, before every bundled plugin that can answer or redirect a request in
    # the access phase (redirect 779, ai-* 768-777, aws-lambda 750, proxy-cache 100 ...).
    GUARD: 780,
}

#: Prefix of the kong.ctx.shared key under which each plugin publishes its verdict for a request it
#: let through. The fail-closed guard (kong_mtls.guard) refuses requests that lack the mark of a
#: plugin that should have run, which is what happens when Kong fails open on a plugin-server error.
SHARED_MARK_PREFIX = "kong_mtls."


def shared_mark(plugin_name: str) -> str:
    return f"{SHARED_MARK_PREFIX}{plugin_name}"


#: Where a plugin leaves its verdict for the guard plugin's verdict cache (lua/kong/plugins/
#: kong-mtls-guard/verdicts.lua, docs/guard.md#the-verdict-cache): the inputs that decided it, its
#: TTL, and the PDK calls to replay for a request with the same inputs.
VERDICT_SLOT_PREFIX = "kong_mtls.verdict."
#: The PDK calls the verdict cache replays (verdicts.lua's REPLAYABLE); a verdict with another is
#: not offered to it.
VERDICT_REPLAYABLE = frozenset({
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
})
#: The config key the guard plugin's wrapper (verdicts.lua) adds to the config of each of
#: VERDICT_CACHED_PLUGINS before Kong starts its instance: the plugin server then leaves every change
#: a request needs in the verdict, which the wrapper applies in-process (Kong's schemas refuse
#: unknown keys, so no configured plugin carries it).
VERDICT_APPLY_FLAG = "__kong_mtls_applies_verdicts"
#: The plugins that offer their verdicts to the cache (a `verdict_cache_ttl` field in their schema).
VERDICT_CACHED_PLUGINS = (IP_ALLOWLIST, CLIENT_CERT_AUTH, HEADER_CERT_AUTH, API_KEY_AUTH)
#: `verdict_cache_ttl`: its default and its largest value (verdicts.lua's MAX_TTL), in seconds.
DEFAULT_VERDICT_CACHE_TTL = 60
MAX_VERDICT_CACHE_TTL = 3600


def verdict_slot(plugin_name: str) -> str:
    return f"{VERDICT_SLOT_PREFIX}{plugin_name}"


# Kong's acl plugin reads the consumer's groups from here when no consumer ACL rows exist.
SHARED_AUTHENTICATED_GROUPS = "authenticated_groups"

# Headers Kong's own auth plugins send upstream (kong/plugins/key-auth/handler.lua, set_consumer).
HEADER_CONSUMER_ID = "X-Consumer-ID"
HEADER_CONSUMER_CUSTOM_ID = "X-Consumer-Custom-ID"
HEADER_CONSUMER_USERNAME = "X-Consumer-Username"
HEADER_CREDENTIAL_IDENTIFIER = "X-Credential-Identifier"
HEADER_ANONYMOUS_CONSUMER = "X-Anonymous-Consumer"
CONSUMER_HEADERS = (
    HEADER_CONSUMER_ID,
    HEADER_CONSUMER_CUSTOM_ID,
    HEADER_CONSUMER_USERNAME,
    HEADER_CREDENTIAL_IDENTIFIER,
    HEADER_ANONYMOUS_CONSUMER,
)

# Set by Kong's acl (after our plugins) from the consumer's groups; client-sent copies are removed
# by whichever of our plugins authenticates the request.
HEADER_CONSUMER_GROUPS = "X-Consumer-Groups"
HEADER_AUTHENTICATED_GROUPS = "X-Authenticated-Groups"
GROUP_HEADERS = (HEADER_CONSUMER_GROUPS, HEADER_AUTHENTICATED_GROUPS)

HEADER_WWW_AUTHENTICATE = "WWW-Authenticate"

MESSAGE_UNEXPECTED = "An unexpected error occurred"
