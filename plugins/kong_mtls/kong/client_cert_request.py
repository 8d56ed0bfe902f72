"""Kong adapter of `client-cert-request`: a GLOBAL plugin that asks every TLS client for a certificate.

The alternative to nginx's `ssl_verify_client optional_no_ca` (docs/client-cert-auth.md, "Requesting
the certificate", option B). In the `certificate` phase of every full handshake it calls
`kong.client.tls.request_client_certificate()`: nginx then requests a certificate but verifies
nothing itself, so every certificate error (an expired one included) becomes client-cert-auth's
401 on the routes that use it, and routes that do not are unaffected. It also calls
`kong.client.tls.disable_session_reuse()`, because a resumed session carries no client chain.
Two round trips per full handshake, none per request.

Kong runs the `certificate` phase for global plugins only; configured on a route or a service this
plugin does nothing. It leaves no mark: it protects no route, client-cert-auth does.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from kong_mtls import schema
from kong_mtls.constants import CLIENT_CERT_REQUEST
from kong_mtls.kong.runtime import phase
from kong_mtls.kong.server import serve

Schema = [schema.boolean("disable_session_reuse", default=True)]


class Plugin:
    def __init__(self, config: Mapping[str, Any]) -> None:
        self.disable_session_reuse: bool = schema.validate(Schema, config)["disable_session_reuse"]

    @phase(CLIENT_CERT_REQUEST)
    def certificate(self, kong: Any) -> None:
        kong.client.tls.request_client_certificate()
        if self.disable_session_reuse:
            kong.client.tls.disable_session_reuse()


def main(argv: Sequence[str] | None = None) -> int:
    return serve(CLIENT_CERT_REQUEST, Plugin, Schema, argv)


if __name__ == "__main__":
    sys.exit(main())
