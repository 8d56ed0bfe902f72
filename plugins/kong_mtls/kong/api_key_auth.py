"""Kong adapter of the `api-key-auth` plugin: hashed API keys, optionally bound to the client certificate.

The decisions are in `kong_mtls.core.api_keys`; this module only moves data between Kong and the core,
with as few PDK round trips as the request allows: one `get_headers` for every key name, the query
or the body only when the key is not found before them, the other plugins' verdicts only for a
credential bound to them, and one `set_headers` for all upstream header changes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from kong_pdk.exception import PDKException

from kong_mtls import schema
from kong_mtls.constants import API_KEY_AUTH, CLIENT_CERT_AUTH, HEADER_CERT_AUTH, IP_ALLOWLIST, shared_mark
from kong_mtls.core.addresses import whole_header_map
from kong_mtls.core.api_keys import (
    ApiKeyAuth,
    Outcome,
    hidden_query_args,
    kong_credential,
    pass_mark,
    resolve_client_ip,
    skip_headers,
    upstream_headers,
)
from kong_mtls.core.consumers import ConsumerCache
from kong_mtls.core.headers import with_every_spelling
from kong_mtls.kong.runtime import PhaseResult, Refusal, VerdictInputs, phase
from kong_mtls.kong.server import serve

NAME = API_KEY_AUTH
MARK = shared_mark(API_KEY_AUTH)
#: The nginx variable holding what `kong.request.get_method()` returns.
METHOD_VARIABLE = "request_method"
#: How many header lines Kong's `get_headers()` returns at most: a map this long may be cut.
KONG_DEFAULT_HEADER_LINES = 100

Schema = [
    schema.strings("key_names", default=["apikey"], required=True, len_min=1),
    schema.boolean("key_in_header", default=True, required=True),
    schema.boolean("key_in_query", default=False, required=True),  # URLs end up in logs
    schema.boolean("key_in_body", default=False, required=True),
    schema.boolean("hide_credentials", default=False, required=True),
    schema.string("anonymous"),
    schema.boolean("run_on_preflight", default=True, required=True),
    schema.string("realm"),
    schema.integer("consumer_cache_ttl", default=60, required=True, between=(0, 86400)),
    # The HMAC key of the credentials' key_index (keys migrated from key-auth): one per deployment.
    schema.string("key_index_secret"),
    schema.records("credentials", [
        schema.string("id", required=True),
        schema.string("hash", required=True),
        schema.string("consumer", required=True),
        schema.string("key_index"),
        schema.string("expires_at"),
        schema.strings("allowed_cidrs"),
        schema.boolean("client_cert", default=False),
        schema.strings("client_spki_sha256"),
    ], default=[], required=True),
    schema.verdict_cache_ttl(),
]

class Plugin:
    def __init__(self, config: Mapping[str, Any]) -> None:
        settings = schema.validate(Schema, config)
        self.auth = ApiKeyAuth.from_config(settings)
        self.consumers = ConsumerCache(float(settings["consumer_cache_ttl"]))
        self.verdict_cache_ttl: int = settings["verdict_cache_ttl"]
        # Only the key headers and the method decide a request (no query, body or anonymous), so a
        # pass may be cached under them.
        self.cacheable = (not self.auth.settings.key_in_query and not self.auth.settings.key_in_body
                          and self.auth.anonymous is None)
        #: The header names a key is looked up under, as Kong's header map spells them: the inputs
        #: of a cached pass.
        self.key_header_inputs = tuple(
            spelling for name in self.auth.settings.key_names
            for spelling in dict.fromkeys((name.lower(), name.lower().replace("_", "-"))))

    @phase(NAME, verdicts=True)
    def access(self, kong: Any, inputs: VerdictInputs) -> PhaseResult:
        auth = self.auth
        read: dict[str, Any] = {}

        def load_method() -> Any:
            read["method"] = kong.request.get_method()
            return read["method"]

        def load_headers() -> Any:
            read["headers"] = kong.request.get_headers()
            return read["headers"]

        # Loaders are lambdas: each `kong.x.y` lookup builds kong-pdk objects, so only the reads the
        # request needs are even looked up.
        skipped = auth.skip_reason(load_method, lambda: kong.client.get_credential())
        if skipped is not None:
            headers = skip_headers(skipped, kong.client.get_consumer, auth.settings)
            if headers is not None:
                kong.service.request.set_headers(with_every_spelling(headers))
            for name in hidden_query_args(auth.settings):
                kong.service.request.clear_query_arg(name)
            kong.ctx.shared.set(MARK, pass_mark(skipped=skipped))
            return None

        def load_consumer(ref: str) -> Any:
            return self.consumers.get(ref, lambda r: kong.client.load_consumer(r, True))

        def load_body() -> Any:
            try:
                return kong.request.get_body()
            except PDKException:  # Kong 2.8 forwards "unsupported content type" as an error
                return None

        decision = auth.authenticate(
            load_headers=load_headers,
            load_query=lambda: kong.request.get_query(),
            load_body=load_body,
            load_consumer=load_consumer,
            load_client_ip=lambda: resolve_client_ip(kong.ctx.shared.get(shared_mark(IP_ALLOWLIST)),
                                                     lambda: kong.client.get_forwarded_ip()),
            # The certificate of Kong's handshake, else one an edge forwarded (header-cert-auth): the
            # same verification decided both.
            load_cert_mark=lambda: (kong.ctx.shared.get(shared_mark(CLIENT_CERT_AUTH))
                                    or kong.ctx.shared.get(shared_mark(HEADER_CERT_AUTH))),
            now=time.time(),
        )
        if decision.outcome is Outcome.REFUSED:
            return Refusal(decision.status, decision.message, decision.reason.value,
                           detail=decision.log_detail(), headers=decision.headers)
        # Now: during the calls below, another request may reload the row this decision carries.
        row_until = (self.consumers.until(decision.credential.consumer)
                     if decision.outcome is Outcome.AUTHENTICATED else None)

        credential = kong_credential(decision)
        if credential is None:  # a nil credential would leave a hole in the RPC argument list
            kong.client.authenticate(dict(decision.consumer))
        else:
            kong.client.authenticate(dict(decision.consumer), credential)
        kong.service.request.set_headers(with_every_spelling(upstream_headers(decision)))
        if decision.rewrite.query is not None:
            kong.service.request.set_query(dict(decision.rewrite.query))
        if decision.rewrite.body is not None:
            kong.service.request.set_body(dict(decision.rewrite.body))
        kong.ctx.shared.set(MARK, pass_mark(decision))
        if self.cacheable and decision.outcome is Outcome.AUTHENTICATED:
            self._declare(inputs, decision.credential, read, row_until)
        return None

    def _declare(self, inputs: VerdictInputs, credential: Any, read: Mapping[str, Any],
                 row_until: float | None) -> None:
        """The inputs of a pass decided by a key header alone: every spelling of every key name
        (and the method, read when preflights are not authenticated), holding no longer than the
        consumer row it carries (cached until `row_until`). A key bound to addresses or to the
        certificate depends on more, and is not cached."""
        headers = whole_header_map(read.get("headers"), KONG_DEFAULT_HEADER_LINES)
        if credential.needs_client_ip or credential.needs_certificate or headers is None:
            return
        if "method" in read:
            inputs.var(METHOD_VARIABLE, read["method"])
        for spelling in self.key_header_inputs:
            inputs.header(spelling, headers.get(spelling))
        ttl = min(self.verdict_cache_ttl, self.consumers.left(row_until))
        if credential.expires_at is not None:
            ttl = min(ttl, credential.expires_at - time.time())
        inputs.holds_for(ttl)


def main(argv: Sequence[str] | None = None) -> int:
    return serve(NAME, Plugin, Schema, argv)


if __name__ == "__main__":
    sys.exit(main())
