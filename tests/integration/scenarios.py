"""The seed scenarios against a real Kong, written once (`Scenarios`) and run by each runner's module:
test_docker.py (the image) and test_local.py (a Kong installed here).

Each test is named after the seed setup it comes from. Requests that must be refused carry a fresh
`X-Test-Nonce`; the echo upstream remembers the nonces it served, so `gateway.seen_upstream(nonce)`
proves that a refused request never reached it.
"""

from __future__ import annotations

import signal
import uuid

import pytest
from cryptography import x509

from kong_mtls.core.api_keys import MESSAGE_INVALID, MESSAGE_NO_KEY
from kong_mtls.core.chain import MESSAGE_FAILED_VERIFICATION, MESSAGE_NO_CERTIFICATE
from kong_mtls.core.upstream import MESSAGE_UNVERIFIED
from kong_mtls.guard import lua_guard
from tests.integration.runners import Gateway, eventually
from tests.integration.support import (
    Response,
    cloudflare_test_config,
    find_route,
    refused,
    route_plugin,
    tls_context,
    with_route_plugins,
)

VISITOR = "198.51.100.23"  # TEST-NET-2: the visitor address Cloudflare would send
REFUSALS = (401, 403)


def requires(gateway: Gateway, *plugins: str) -> None:
    missing = [name for name in plugins if name not in gateway.plugins]
    if missing:
        pytest.skip(f"plugin module not in this checkout: {', '.join(missing)}")


def nonce() -> dict[str, str]:
    return {"X-Test-Nonce": uuid.uuid4().hex}


def leaf_dns_names(der: bytes | None) -> list[str]:
    assert der is not None
    san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return san.value.get_values_for_type(x509.DNSName)


class Scenarios:
    """Mixed into TestDocker / TestLocal, which provide the `gateway` fixture."""

    def test_1_cloudflare_only_origin_with_key_auth(self, gateway: Gateway) -> None:
        requires(gateway, "ip-allowlist", "client-cert-auth", "api-key-auth")
        host = "api.example.test"
        key = {"apikey": gateway.api_key("ak_alice_dev")}
        cloudflare = {"CF-Connecting-IP": VISITOR}
        gateway.load_config(cloudflare_test_config(gateway.cloudflare_config,
                                                   aop_ca_file=f"{gateway.pki_in_kong}/aop/ca.pem"))
        try:
            def origin(path: str = "/orders", *, cert: str | None = "aop/client",
                       headers: dict | None = None) -> Response:
                return gateway.https(path, server_name=host, cert=cert, headers=headers)

            eventually(lambda: origin(headers={**cloudflare, **key}).status == 200, 30,
                       "the Cloudflare config never took effect", gateway.error_log)
            ok = origin(headers={**cloudflare, **key})
            assert host in leaf_dns_names(ok.server_cert)            # the origin certificate, by SNI
            upstream = ok.upstream_headers
            assert upstream["x-real-client-ip"] == VISITOR
            assert upstream["x-consumer-username"] == "alice"
            assert "apikey" not in upstream                          # hide_credentials

            assert gateway.http("/orders", server_name=host, headers={**cloudflare, **key}).status == 426

            for headers, cert in (
                ({**cloudflare, **nonce()}, "aop/client"),                      # no key
                ({**cloudflare, "apikey": "ak_alice_dev.wrong", **nonce()}, "aop/client"),
                ({**cloudflare, **key, **nonce()}, None),                       # no AOP certificate
                ({**cloudflare, **key, **nonce()}, "clients/alice"),            # not Cloudflare's certificate
                ({**key, **nonce()}, "aop/client"),                             # no CF-Connecting-IP
            ):
                answer = origin(cert=cert, headers=headers)
                assert answer.status in REFUSALS, (headers, cert, answer)
                assert not gateway.seen_upstream(headers["X-Test-Nonce"])

            # The same route with only Cloudflare's real ranges: this client is no Cloudflare peer.
            stranger = {**cloudflare, **key, **nonce()}
            answer = origin("/orders-real", headers=stranger)
            assert answer.status == 403
            assert answer.json()["message"].startswith("IP address not allowed")
            assert not gateway.seen_upstream(stranger["X-Test-Nonce"])
        finally:
            gateway.restore()

    def test_2_authenticated_origin_pulls(self, gateway: Gateway) -> None:
        requires(gateway, "client-cert-auth")
        ok = gateway.https("/aop", cert="aop/client")
        assert ok.status == 200
        assert "dev stand-in" in ok.upstream_headers["x-client-cert-dn"]

        for cert, message in ((None, MESSAGE_NO_CERTIFICATE), ("clients/alice", MESSAGE_FAILED_VERIFICATION),
                              ("clients/stranger", MESSAGE_FAILED_VERIFICATION)):
            headers = nonce()
            answer = gateway.https("/aop", cert=cert, headers=headers)
            assert (answer.status, answer.json()) == (401, {"message": message}), cert
            assert not gateway.seen_upstream(headers["X-Test-Nonce"])

        # report_only: both kinds of failure are let through, and logged.
        for cert in (None, "clients/alice", "aop/client"):
            assert gateway.https("/aop/report-only", cert=cert).status == 200, cert
        eventually(lambda: "client-cert-auth report-only" in gateway.error_log(), 10,
                   "report_only failures were not logged", gateway.error_log)

    def test_3_consumer_key_auth(self, gateway: Gateway) -> None:
        requires(gateway, "api-key-auth")
        key = gateway.api_key("ak_alice_dev")

        headers = nonce()
        answer = gateway.https("/key", headers=headers)
        assert (answer.status, answer.json()) == (401, {"message": MESSAGE_NO_KEY})
        assert not gateway.seen_upstream(headers["X-Test-Nonce"])
        headers = {"apikey": key + "x", **nonce()}
        answer = gateway.https("/key", headers=headers)
        assert (answer.status, answer.json()) == (401, {"message": MESSAGE_INVALID})
        assert not gateway.seen_upstream(headers["X-Test-Nonce"])

        ok = gateway.https("/key", headers={"apikey": key})
        assert ok.status == 200
        assert ok.upstream_headers["x-consumer-username"] == "alice"
        assert "apikey" not in ok.upstream_headers
        in_query = gateway.https(f"/key?apikey={key}&page=2")
        assert in_query.status == 200
        assert in_query.json()["path"] == "/?page=2"       # the key is stripped from the query too

        if "client-cert-auth" in gateway.plugins:          # a key bound to alice's certificate
            bound = {"apikey": gateway.api_key("ak_alice_bound")}
            assert gateway.https("/key/bound", cert="clients/alice", headers=bound).status == 200
            assert gateway.https("/key/bound", cert="clients/bob", headers=bound).status == 401
            assert gateway.https("/key/bound", headers=bound).status == 401

    def test_4a_per_sni_server_certificates(self, gateway: Gateway) -> None:
        api = gateway.https("/public", server_name="api.example.test")
        other = gateway.https("/public", server_name="other.example.test")
        assert (api.status, other.status) == (200, 200)
        assert "api.example.test" in leaf_dns_names(api.server_cert)
        assert leaf_dns_names(other.server_cert) == ["other.example.test"]

    def test_4b_client_mtls_with_consumers_and_acl_groups(self, gateway: Gateway) -> None:
        requires(gateway, "client-cert-auth")
        alice = gateway.https("/mtls", cert="clients/alice")
        assert alice.status == 200
        assert alice.upstream_headers["x-consumer-username"] == "alice"    # by her SPIFFE ID mapping
        assert gateway.https("/mtls", cert="clients/bob").upstream_headers["x-consumer-username"] == "bob"
        spoofed = gateway.https("/mtls", cert="clients/bob", headers={"X-Consumer-Username": "alice"})
        assert spoofed.upstream_headers["x-consumer-username"] == "bob"

        for cert in (None, "clients/stranger"):
            headers = nonce()
            assert gateway.https("/mtls", cert=cert, headers=headers).status == 401
            assert not gateway.seen_upstream(headers["X-Test-Nonce"])

        # Kong's bundled acl, with the groups taken from the certificates' OUs.
        assert gateway.https("/mtls/payments", cert="clients/alice").status == 200
        headers = nonce()
        answer = gateway.https("/mtls/payments", cert="clients/bob", headers=headers)
        assert answer.status == 403
        assert not gateway.seen_upstream(headers["X-Test-Nonce"])

        # A route without the plugin serves clients without a certificate.
        assert gateway.https("/public").status == 200

    def test_4c_kong_presents_its_client_certificate_upstream(self, gateway: Gateway) -> None:
        answer = gateway.https("/public")
        assert answer.status == 200
        assert answer.json()["client_cert"]["subject"] == "CN=kong-gateway"

        ca = gateway.pki / "ca" / "root.pem"
        assert refused(gateway.echo, tls_context(ca))                                   # no certificate
        assert refused(gateway.echo, tls_context(ca, gateway.cert("clients/stranger")))  # another CA
        kong_cert = tls_context(ca, gateway.cert("kong/upstream-client"))
        assert not refused(gateway.echo, kong_cert)

    def test_4d_kong_refuses_a_mismatching_upstream(self, gateway: Gateway) -> None:
        headers = nonce()
        assert gateway.https("/upstream/untrusted-ca", headers=headers).status == 502   # Kong's own check
        assert not gateway.seen_upstream(headers["X-Test-Nonce"])

        requires(gateway, "upstream-identity")
        ok = gateway.https("/upstream")
        assert (ok.status, ok.json()["server"]) == (200, "echo")
        impostor = gateway.https("/upstream/impostor")
        assert (impostor.status, impostor.json()) == (502, {"message": MESSAGE_UNVERIFIED})
        assert "URI_SAN_MISMATCH" in gateway.error_log()

    def test_5_plugin_enabled_and_changed_at_runtime(self, gateway: Gateway) -> None:
        requires(gateway, "api-key-auth")
        key = gateway.api_key("ak_alice_dev")
        credentials = route_plugin(find_route(gateway.config, "key"), "api-key-auth")["config"]["credentials"]
        guard = {"name": "post-function", "config": {"access": [lua_guard(["api-key-auth"])]}}

        def protect(config: dict) -> dict:
            return with_route_plugins(gateway.config, "public",
                                      [{"name": "api-key-auth", "config": config}, guard])

        assert gateway.https("/public").status == 200
        try:
            gateway.load_config(protect({"credentials": credentials}))      # enable on the route
            eventually(lambda: gateway.https("/public").status == 401, 30,
                       "api-key-auth was not enabled", gateway.error_log)
            assert gateway.https("/public", headers={"apikey": key}).status == 200

            # Change its config.
            gateway.load_config(protect({"credentials": credentials, "key_names": ["x-api-key"]}))
            eventually(lambda: gateway.https("/public", headers={"x-api-key": key}).status == 200, 30,
                       "the new key_names did not take effect", gateway.error_log)
            assert gateway.https("/public", headers={"apikey": key}).status == 401
        finally:
            gateway.restore()
        assert gateway.https("/public").status == 200                      # removed again

    def test_6_fail_closed_when_the_plugin_server_dies_or_hangs(self, gateway: Gateway) -> None:
        requires(gateway, "api-key-auth")
        valid = {"apikey": gateway.api_key("ak_alice_dev")}
        assert gateway.https("/key", headers=valid).status == 200
        before = gateway.signal_plugin_server("api-key-auth", 0)
        assert before, "no api-key-auth plugin server process found"

        gateway.signal_plugin_server("api-key-auth", signal.SIGSTOP)       # hung
        try:
            for headers in ({**valid, **nonce()}, nonce()):
                answer = gateway.https("/key", headers=headers)
                assert answer.status in (401, 500, 502, 503, 504), answer
                assert not gateway.seen_upstream(headers["X-Test-Nonce"])
        finally:
            gateway.signal_plugin_server("api-key-auth", signal.SIGKILL)   # dead (ends a stopped one too)

        # Until Kong has started it again, a valid request is refused, never proxied unchecked.
        headers = {**valid, **nonce()}
        answer = gateway.https("/key", headers=headers)
        assert answer.status == 200 or not gateway.seen_upstream(headers["X-Test-Nonce"])

        eventually(lambda: gateway.https("/key", headers=valid).status == 200, 60,
                   "service did not resume after the plugin server was killed", gateway.error_log)
        after = gateway.signal_plugin_server("api-key-auth", 0)
        assert after and not set(after) & set(before)                     # Kong started a new one
        headers = nonce()
        assert gateway.https("/key", headers=headers).status == 401
        assert not gateway.seen_upstream(headers["X-Test-Nonce"])
