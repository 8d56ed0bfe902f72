"""The seed scenarios against a real Kong, written once (`Scenarios`) and run by each runner's module:
test_docker.py (the image) and test_local.py (a Kong installed here).

Each test is named after the seed setup it comes from. Requests that must be refused carry a fresh
`X-Test-Nonce`; the echo upstream remembers the nonces it served, so `gateway.seen_upstream(nonce)`
proves that a refused request never reached it.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime as dt
import json
import re
import signal
import ssl
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kong_mtls.constants import (
    API_KEY_AUTH,
    CLIENT_CERT_AUTH,
    CONSUMER_HEADERS,
    GROUP_HEADERS,
    GUARD,
    IP_ALLOWLIST,
    VERDICT_APPLY_FLAG,
)
from kong_mtls.core.api_keys import MESSAGE_INVALID, MESSAGE_NO_KEY
from kong_mtls.core.chain import MESSAGE_FAILED_VERIFICATION, MESSAGE_NO_CERTIFICATE
from kong_mtls.core.headers import other_spellings
from kong_mtls.core.upstream import MESSAGE_UNVERIFIED
from kong_mtls.devpki import Authority, Issued
from kong_mtls.guard import GUARD_MESSAGE, GUARD_REASON, GUARD_STATUS, guard_plugin, lua_guard
from tests.harness.tls_servers import TLSUpstream
from tests.integration.runners import Gateway, eventually
from tests.integration.support import (
    Response,
    adapt_config,
    cloudflare_test_config,
    edge_test_config,
    find_route,
    lint_report,
    refused,
    resumed_session_requests,
    route_plugin,
    run_lint,
    tls_context,
    with_route_plugins,
    without_verdict_cache,
)

VISITOR = "198.51.100.23"  # TEST-NET-2: the visitor address Cloudflare would send
REFUSALS = (401, 403)


def requires(gateway: Gateway, *plugins: str) -> None:
    missing = [name for name in plugins if name not in gateway.plugins]
    if missing:
        pytest.skip(f"plugin module not in this checkout: {', '.join(missing)}")


def assert_no_forged_identity_reaches_the_upstream(gateway: Gateway) -> None:
    """alice on /mtls (her certificate) and /key (her key), each request carrying every spelling of
    every identity header we own, forged: both pass as alice, and no forged value reaches the
    upstream (Kong sets `underscores_in_headers on` and forwards `X_Consumer_Username` as readily
    as `X-Consumer-Username`)."""

    def forged(*names: str) -> dict[str, str]:
        return {spelling: "forged" for name in names for spelling in (name, *other_spellings(name))}

    identity = (*CONSUMER_HEADERS, *GROUP_HEADERS)
    key = {"apikey": gateway.api_key("ak_alice_dev")}
    for path, cert, headers in (("/mtls", "clients/alice", forged(*identity, "X-Client-Cert-DN")),
                                ("/key", None, {**forged(*identity), **key})):
        answer = gateway.https(path, cert=cert, headers=headers)
        assert answer.status == 200, (path, answer)
        assert answer.upstream_headers["x-consumer-username"] == "alice", path
        passed = {k: v for k, v in answer.upstream_headers.items() if "forged" in str(v)}
        assert not passed, (path, passed)


def nonce() -> dict[str, str]:
    return {"X-Test-Nonce": uuid.uuid4().hex}


@contextlib.contextmanager
def verdict_cache_off(gateway: Gateway) -> Iterator[None]:
    """The running config with the verdict cache off (every request asks the plugin server), then
    the original again."""
    gateway.load_config(without_verdict_cache(gateway.config))
    try:
        yield
    finally:
        gateway.restore()


def dev_ca(pki: Path, stem: str, parent: Authority | None = None) -> Authority:
    """A CA of the dev PKI (`ca/<stem>.pem` and `.key`), to issue test certificates under it."""
    cert = x509.load_pem_x509_certificate((pki / "ca" / f"{stem}.pem").read_bytes())
    key = serialization.load_pem_private_key((pki / "ca" / f"{stem}.key").read_bytes(), None)
    return Authority(subject=cert.subject, key=key, cert=cert, parent=parent)


def dev_issuing_ca(pki: Path) -> Authority:
    """The dev PKI's issuing CA, to issue test certificates that chain to the dev root."""
    return dev_ca(pki, "intermediate", parent=dev_ca(pki, "root"))


def add_test_cert(gateway: Gateway, name: str, issued: Issued) -> str:
    """Write `issued` beside the dev PKI as `test/<name>`; returns the name `gateway.https` takes."""
    folder = gateway.pki / "test"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.pem").write_text(issued.chain_pem)
    (folder / f"{name}.key").write_text(issued.key_pem)
    return f"test/{name}"


def expired_client(gateway: Gateway) -> str:
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30)
    issued = dev_issuing_ca(gateway.pki).client("alice-expired", not_before=past - dt.timedelta(days=1),
                                                not_after=past)
    return add_test_cert(gateway, "expired", issued)


def adapt_to(gateway: Gateway, config: dict) -> dict:
    """`config` as this Kong can load it (Kong < 3.8's acl has no always_use_authenticated_groups)."""
    return adapt_config(config, available=gateway.plugins, kong_version=gateway.kong_version)


def tls_version(version: ssl.TLSVersion, context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = context.maximum_version = version
    return context


def _sf_binary(cert: x509.Certificate) -> str:
    """RFC 9440's encoding, as Cloudflare's `cf.tls_client_auth.cert_rfc9440` gives it."""
    return ":" + base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode() + ":"


def log_lines(gateway: Gateway, text: str, level: str = "error", since: int = 0) -> list[str]:
    """Lines of Kong's error log at `level` that contain `text`, from character `since` on."""
    lines = gateway.error_log()[since:].splitlines()
    return [line for line in lines if f"[{level}]" in line and text in line]


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
        gateway.load_config(cloudflare_test_config(gateway.examples["cloudflare-origin-lock.yml"],
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
        # Query keys are off by default (URLs end up in logs): a key there is not read.
        headers = nonce()
        in_query = gateway.https(f"/key?apikey={key}&page=2", headers=headers)
        assert (in_query.status, in_query.json()) == (401, {"message": MESSAGE_NO_KEY})
        assert not gateway.seen_upstream(headers["X-Test-Nonce"])

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

        ca = gateway.pki / "ca" / "echo-upstream.pem"                                  # echo's own CA
        assert refused(gateway.echo, tls_context(ca))                                   # no certificate
        assert refused(gateway.echo, tls_context(ca, gateway.cert("clients/stranger")))  # another CA
        kong_cert = tls_context(ca, gateway.cert("kong/upstream-client"))
        assert not refused(gateway.echo, kong_cert)

    def test_4d_kong_refuses_a_mismatching_upstream(self, gateway: Gateway) -> None:
        # `public` (the echo Service, verified against the dev root) leaves a pooled connection to
        # echo; the untrusted-ca Service has its own client certificate entity, so its own pool:
        # Kong verifies echo against the wrong CA on a new connection and refuses.
        assert gateway.https("/public").status == 200
        headers = nonce()
        assert gateway.https("/upstream/untrusted-ca", headers=headers).status == 502   # Kong's own check
        assert not gateway.seen_upstream(headers["X-Test-Nonce"])

        requires(gateway, "upstream-identity")
        ok = gateway.https("/upstream")
        assert (ok.status, ok.json()["server"]) == (200, "echo")
        impostor = gateway.https("/upstream/impostor")
        assert (impostor.status, impostor.json()) == (502, {"message": MESSAGE_UNVERIFIED})
        # The probe saw a certificate that echo's CA did not issue: an alarm, at error level.
        assert log_lines(gateway, "upstream-identity alarm reason=UNTRUSTED_UPSTREAM")

    def test_4d2_upstream_identity_refuses_a_service_without_its_own_ca_store(self, gateway: Gateway) -> None:
        """Kong verifies the upstream against the Service's ca_certificates, or else its system
        trust store (any public CA): upstream-identity refuses to vouch for such a Service."""
        requires(gateway, "upstream-identity")
        config = copy.deepcopy(gateway.config)
        echo = next(s for s in config["services"] if s["name"] == "echo")
        no_ca = {k: v for k, v in echo.items() if k not in ("routes", "ca_certificates")}
        route = {**copy.deepcopy(find_route(config, "upstream")), "name": "upstream-no-ca",
                 "paths": ["/upstream/no-ca"]}
        no_ca.update(name="echo-system-store", routes=[route])
        config["services"].append(no_ca)
        try:
            gateway.load_config(config)
            headers = nonce()
            answer = gateway.https("/upstream/no-ca", headers=headers)
            assert (answer.status, answer.json()) == (502, {"message": MESSAGE_UNVERIFIED})
            assert "reason=SERVICE_NO_CA_STORE" in gateway.error_log()
        finally:
            gateway.restore()
        assert not gateway.seen_upstream(headers["X-Test-Nonce"])

    def test_4d5_a_route_that_preserves_the_clients_host_is_refused(self, gateway: Gateway) -> None:
        """With preserve_host Kong sends, and verifies, the client's Host as the upstream's name: a
        client could pick another virtual host behind the address than the one the probe and the
        CA store vouch for. (Kong sets $upstream_host only after the plugins' access phase, so the
        name cannot be compared then.) upstream-identity refuses such a route (502
        UPSTREAM_HOST_CHANGED), whatever the Host; the same route without preserve_host passes."""
        requires(gateway, "upstream-identity")
        config = copy.deepcopy(gateway.config)
        echo = next(s for s in config["services"] if s["name"] == "echo")
        route = {**copy.deepcopy(find_route(config, "upstream")), "name": "upstream-preserve",
                 "paths": ["/upstream/preserve"], "preserve_host": True}
        echo["routes"].append(route)
        service_host = urlsplit(echo["url"]).hostname
        try:
            gateway.load_config(config)
            headers = {"Host": "backoffice.example", **nonce()}
            answer = gateway.https("/upstream/preserve", headers=headers)
            assert (answer.status, answer.json()) == (502, {"message": MESSAGE_UNVERIFIED})
            assert "reason=UPSTREAM_HOST_CHANGED" in gateway.error_log()
            assert not gateway.seen_upstream(headers["X-Test-Nonce"])
            assert gateway.https("/upstream/preserve", headers={"Host": service_host}).status == 502
            route["preserve_host"] = False
            gateway.load_config(config)
            assert gateway.https("/upstream/preserve", headers={"Host": "backoffice.example"}).status == 200
        finally:
            gateway.restore()

    def test_4d3_a_look_alike_upstream_is_never_reached_even_when_the_probe_sees_echo(
            self, gateway: Gateway) -> None:
        """The recipe holds on Kong's own connection, not on the probe's word. `impostor` (kong.yml)
        expects echo's identity at the look-alike's address and trusts only echo's CA. Here its probe
        is pointed at the real echo (as when the probe and Kong reach different servers) and passes;
        a lax Service has just opened a pooled connection to the look-alike. Kong still opens a
        connection of its own (own client certificate entity) and its handshake refuses: 502, the
        look-alike never sees the request. Without a client certificate entity the plugin refuses
        (SERVICE_POOL_SHARED); sharing the lax Service's entity — which the plugin cannot see — puts
        the request on the lax connection (what the docs list as not guaranteed)."""
        requires(gateway, "upstream-identity")
        base = copy.deepcopy(gateway.config)
        services = {s["name"]: s for s in base["services"]}
        echo_url = urllib.parse.urlsplit(services["echo"]["url"])
        lax_cert = {**next(c for c in base["certificates"]
                           if c["id"] == services["echo"]["client_certificate"]), "id": str(uuid.uuid4())}
        base["certificates"].append(lax_cert)
        # A lax Service to the look-alike's address: no verification, a client certificate entity
        # of its own. It also lets the test ask the look-alike which nonces it served.
        base["services"].append({"name": "lax-look-alike", "url": services["impostor"]["url"],
                                 "client_certificate": lax_cert["id"], "tls_verify": False,
                                 "routes": [{"name": "lax-look-alike", "paths": ["/lax-look-alike"]}]})
        split = copy.deepcopy(find_route(base, "upstream-impostor"))
        identity = route_plugin(split, "upstream-identity")
        identity["config"].update(host=echo_url.hostname, port=echo_url.port, sni=echo_url.hostname)
        split.update(name="upstream-split", paths=["/upstream/split"])

        def with_strict(**changes: object) -> dict:
            config = copy.deepcopy(base)
            strict = {**copy.deepcopy(services["impostor"]), "name": "strict", "routes": [split]}
            strict.update(changes)
            config["services"].append({k: v for k, v in strict.items() if v is not None})
            return config

        def reached(headers: dict[str, str]) -> bool:
            return bool(gateway.https(f"/lax-look-alike/__seen/{headers['X-Test-Nonce']}").json()["seen"])

        try:
            since = len(gateway.error_log())
            gateway.load_config(with_strict())
            lax = gateway.https("/lax-look-alike")                 # opens (and pools) a connection
            assert (lax.status, lax.json()["server"]) == (200, "impostor")
            headers = nonce()
            answer = gateway.https("/upstream/split", headers=headers)
            # Kong's own answer (its handshake refused the look-alike), not the plugin's
            assert answer.status == 502 and b"invalid response was received from the upstream" in answer.body
            assert not reached(headers)
            assert not log_lines(gateway, "alarm", since=since)   # the probe saw echo: no alarm

            gateway.load_config(with_strict(client_certificate=None))
            assert gateway.https("/lax-look-alike").status == 200
            headers = nonce()
            answer = gateway.https("/upstream/split", headers=headers)
            assert (answer.status, answer.json()) == (502, {"message": MESSAGE_UNVERIFIED})
            assert log_lines(gateway, "refused status=502 reason=SERVICE_POOL_SHARED", "warn", since)
            assert not reached(headers)

            gateway.load_config(with_strict(client_certificate=lax_cert["id"]))
            assert gateway.https("/lax-look-alike").status == 200
            headers = nonce()
            shared = gateway.https("/upstream/split", headers=headers)
            assert (shared.status, shared.json()["server"]) == (200, "impostor"), \
                "Kong no longer reuses a pooled connection across TLS settings"
            assert reached(headers)
        finally:
            gateway.restore()

    def test_4d4_a_certificate_the_services_own_ca_misissued_is_caught_by_the_probe_only(
            self, gateway: Gateway) -> None:
        """What only the probe checks. An upstream with a valid certificate from echo's own CA (the
        only CA the Service trusts), echo's host names, and another SPIFFE ID: Kong's handshake
        accepts it. With the probe reaching that server, the plugin refuses (URI_SAN_MISMATCH, an
        alarm at error) and the upstream never sees the request, also after a lax Service pooled a
        connection to it. With the probe reaching another server (here: the real echo), Kong proxies
        to it — the docs' first "what remains"."""
        requires(gateway, "upstream-identity")
        if gateway.kind != "local":
            pytest.skip("the misissued upstream runs in the test process, on loopback")
        pki = gateway.pki
        misissued = dev_ca(pki, "echo-upstream").server(["upstream", "echo", "localhost"], ips=["127.0.0.1"],
                                   sans_uris=["spiffe://dev.kong-mtls/upstream/impostor"])
        base = copy.deepcopy(gateway.config)
        services = {s["name"]: s for s in base["services"]}
        echo_url = urllib.parse.urlsplit(services["echo"]["url"])
        template = next(c for c in base["certificates"] if c["id"] == services["echo"]["client_certificate"])
        own, lax = ({**template, "id": str(uuid.uuid4())} for _ in range(2))
        base["certificates"] += [own, lax]
        checked = copy.deepcopy(find_route(base, "upstream"))
        checked.update(name="upstream-misissued", paths=["/upstream/misissued"])
        probe_elsewhere = copy.deepcopy(checked)
        probe_elsewhere.update(name="upstream-misissued-split", paths=["/upstream/misissued-split"])
        route_plugin(probe_elsewhere, "upstream-identity")["config"].update(
            host=echo_url.hostname, port=echo_url.port, sni=echo_url.hostname)

        with TLSUpstream(misissued, client_cas=[(pki / "ca/root.pem").read_text()]) as server:
            url = f"https://localhost:{server.port}"
            strict = {**copy.deepcopy(services["echo"]), "name": "misissued", "url": url,
                      "client_certificate": own["id"], "routes": [checked, probe_elsewhere]}
            base["services"] += [strict, {
                "name": "lax-misissued", "url": url, "client_certificate": lax["id"], "tls_verify": False,
                "routes": [{"name": "lax-misissued", "paths": ["/lax-misissued"]}]}]

            def reached(headers: dict[str, str]) -> bool:
                return any(r.header("X-Test-Nonce") == headers["X-Test-Nonce"]
                           for c in server.connections for r in c.requests)

            try:
                since = len(gateway.error_log())
                gateway.load_config(base)
                assert gateway.https("/lax-misissued").status == 200       # a pooled connection to it
                headers = nonce()
                answer = gateway.https("/upstream/misissued", headers=headers)
                assert (answer.status, answer.json()) == (502, {"message": MESSAGE_UNVERIFIED})
                assert log_lines(gateway, "upstream-identity alarm reason=URI_SAN_MISMATCH", since=since)
                assert not reached(headers)

                headers = nonce()
                answer = gateway.https("/upstream/misissued-split", headers=headers)
                assert answer.status == 200 and reached(headers), "Kong's handshake checks no SPIFFE ID"
            finally:
                gateway.restore()

    def test_4e_kong_reuses_a_pooled_upstream_connection_across_tls_settings(self, gateway: Gateway) -> None:
        """What Kong does NOT guarantee (docs/upstream-identity.md): with the same client
        certificate entity as `echo`, the untrusted-ca Service shares echo's connection pool
        (`ip|port|SNI|client certificate id`) and is served over a connection echo's Service opened
        and verified; only on a fresh pool does Kong refuse."""
        config = copy.deepcopy(gateway.config)
        service = next(s for s in config["services"] if s["name"] == "echo-untrusted-ca")
        service["client_certificate"] = next(s for s in config["services"]
                                             if s["name"] == "echo")["client_certificate"]
        try:
            gateway.load_config(config)
            assert gateway.https("/public").status == 200       # opens (and pools) a verified connection
            shared_pool = gateway.https("/upstream/untrusted-ca")
            assert shared_pool.status == 200, "Kong no longer reuses pooled connections across TLS settings"
        finally:
            gateway.restore()

    def test_4g_a_name_of_one_kind_or_outside_a_cas_constraints_never_logs_in(self, gateway: Gateway) -> None:
        """Typed names: a CN spelled like alice's SPIFFE ID is not alice (/mtls maps her SPIFFE ID,
        and auto-matches usernames to CNs only). Name constraints hold for the CN: a partner CA
        constrained to partner.example issues `CN=alice` without SAN; it is refused."""
        requires(gateway, "client-cert-auth")
        issuing = dev_issuing_ca(gateway.pki)
        spelled = add_test_cert(gateway, "cn-spiffe", issuing.client("spiffe://dev.kong-mtls/ns/payments/sa/alice"))
        headers = nonce()
        answer = gateway.https("/mtls", cert=spelled, headers=headers)
        assert (answer.status, answer.json()) == (401, {"message": MESSAGE_FAILED_VERIFICATION})
        assert not gateway.seen_upstream(headers["X-Test-Nonce"])

        partner = issuing.intermediate("partner CA", name_constraints=x509.NameConstraints(
            [x509.DNSName("partner.example")], None))
        impostor = add_test_cert(gateway, "partner-alice", partner.client("alice"))
        headers = nonce()
        answer = gateway.https("/mtls", cert=impostor, headers=headers)
        assert (answer.status, answer.json()) == (401, {"message": MESSAGE_FAILED_VERIFICATION})
        assert not gateway.seen_upstream(headers["X-Test-Nonce"])
        eventually(lambda: "reason=OUTSIDE_NAME_CONSTRAINTS" in gateway.error_log(), 10,
                   "the refusal's reason was not logged", gateway.error_log)

    def test_4h_a_group_with_a_comma_never_reaches_the_upstream(self, gateway: Gateway) -> None:
        """Kong's acl joins the groups into X-Consumer-Groups with ", ", which upstreams split on
        commas: an OU `x,admins` would read as a group `admins`. It is not published."""
        requires(gateway, "client-cert-auth")
        config = copy.deepcopy(gateway.config)
        mtls = find_route(config, "mtls")
        support = copy.deepcopy(mtls)
        support.update(name="mtls-support", paths=["/mtls/support"])
        support["plugins"] = [route_plugin(mtls, "client-cert-auth"),
                              {"name": "acl", "config": {"allow": ["support"],
                                                         "always_use_authenticated_groups": True}}]
        config["services"][0]["routes"].append(support)
        bob = add_test_cert(gateway, "bob-comma", dev_issuing_ca(gateway.pki).client(
            "bob", emails=["bob@example.org"], organizational_units=["support", "x,admins"]))
        try:
            gateway.load_config(adapt_to(gateway, config))
            answer = gateway.https("/mtls/support", cert=bob)
            assert answer.status == 200, answer
            sent = [answer.upstream_headers.get(name.lower()) for name in GROUP_HEADERS]
            # As an upstream reads them: split on commas, trimmed. (Kong >= 3.8 sends the
            # certificate's groups as X-Authenticated-Groups; 3.4 bob's consumer groups.)
            read = {group.strip() for value in sent if value for group in value.split(",")}
            assert read == {"support"}, sent
        finally:
            gateway.restore()

    def test_4f_no_spelling_of_an_identity_header_gets_through(self, gateway: Gateway) -> None:
        """Kong sets `underscores_in_headers on`: it forwarded client-sent `X_Consumer_Username`
        as readily as `X-Consumer-Username`. Every spelling of every header we own is removed, the
        groups headers included (Kong's acl is not on /mtls and /key)."""
        requires(gateway, "client-cert-auth", "api-key-auth")
        assert_no_forged_identity_reaches_the_upstream(gateway)

    def test_12_client_certificates_forwarded_by_an_edge(self, gateway: Gateway) -> None:
        """The test client plays the edge: Cloudflare (its address in the stand-in ranges, the dev
        AOP certificate on the connection, RFC 9440 headers) and an ALB (URL-encoded PEM chain)."""
        requires(gateway, "header-cert-auth")
        host = "api.example.test"
        gateway.load_config(edge_test_config(gateway.examples["edge-client-certs.yml"]))
        try:
            def chain(name: str) -> list[x509.Certificate]:
                return x509.load_pem_x509_certificates(gateway.cert(name)[0].read_bytes())

            def cloudflare(certs: list[x509.Certificate], verified: str = "true") -> dict[str, str]:
                return {"Client-Cert": _sf_binary(certs[0]),
                        "Client-Cert-Chain": ", ".join(_sf_binary(c) for c in certs[1:]),
                        "Client-Cert-Verified": verified}

            def edge(path: str, headers: dict, cert: str | None = "aop/client") -> Response:
                return gateway.https(path, server_name=host, cert=cert, headers=headers)

            alice = chain("clients/alice")
            eventually(lambda: edge("/cloudflare", cloudflare(alice)).status == 200, 30,
                       "the edge config never took effect", gateway.error_log)
            forged = {"X-Consumer-Username": "mallory", "Client_Cert": "forged",
                      "Client-Cert_Chain": "forged"}
            ok = edge("/cloudflare", {**cloudflare(alice), **forged})
            assert ok.status == 200
            upstream = ok.upstream_headers
            assert upstream["x-consumer-username"] == "alice"      # her SPIFFE ID mapping, as with mTLS
            assert "CN=alice" in upstream["x-client-cert-dn"]
            sent = {name.replace("_", "-").lower() for name in upstream}
            assert not sent & {"client-cert", "client-cert-chain", "client-cert-verified"}, upstream
            bob = edge("/cloudflare", cloudflare(chain("clients/bob")))
            assert bob.upstream_headers["x-consumer-username"] == "bob"          # CN = username

            stranger = chain("clients/stranger")
            expired = chain(expired_client(gateway))
            for path, headers, cert, message in (
                # Not from a Cloudflare address; no AOP certificate; not the edge's certificate.
                ("/cloudflare-real", cloudflare(alice), "aop/client", MESSAGE_NO_CERTIFICATE),
                ("/cloudflare", cloudflare(alice), None, MESSAGE_NO_CERTIFICATE),
                ("/cloudflare", cloudflare(alice), "clients/alice", MESSAGE_NO_CERTIFICATE),
                ("/cloudflare", cloudflare(alice, "false"), "aop/client", MESSAGE_FAILED_VERIFICATION),
                ("/cloudflare", cloudflare(stranger), "aop/client", MESSAGE_FAILED_VERIFICATION),
                ("/cloudflare", cloudflare(expired), "aop/client", MESSAGE_FAILED_VERIFICATION),
                ("/cloudflare", {**cloudflare(alice), "Client-Cert": "%%%"}, "aop/client",
                 MESSAGE_FAILED_VERIFICATION),
            ):
                headers = {**headers, **nonce()}
                answer = edge(path, headers, cert)
                assert (answer.status, answer.json()) == (401, {"message": message}), (path, cert, answer)
                assert not gateway.seen_upstream(headers["X-Test-Nonce"])
            log = gateway.error_log()
            for reason in ("UNTRUSTED_EDGE", "EDGE_NOT_VERIFIED", "UNKNOWN_CA", "EXPIRED", "MALFORMED_CHAIN"):
                assert f"[header-cert-auth] [kong-mtls] header-cert-auth refused status=401 reason={reason}" \
                    in log, reason

            # AWS ALB passthrough: the whole chain as URL-encoded PEM, from the ALB's address.
            alb = {"X-Amzn-Mtls-Clientcert": quote(gateway.cert("clients/bob")[0].read_text(), safe="+=/")}
            answer = edge("/alb", alb, cert=None)
            assert (answer.status, answer.upstream_headers["x-consumer-username"]) == (200, "bob")
            headers = {"X-Amzn-Mtls-Clientcert": quote(gateway.cert("clients/stranger")[0].read_text()),
                       **nonce()}
            assert edge("/alb", headers, cert=None).status == 401
            assert not gateway.seen_upstream(headers["X-Test-Nonce"])

            # The verdict cache, with the plugin server stopped: what it decided, Kong decides alike.
            def from_kong_alone() -> None:
                again = edge("/cloudflare", {**cloudflare(alice), **forged, **nonce()})
                assert (again.status, again.upstream_headers["x-consumer-username"]) == (200, "alice")
                assert edge("/cloudflare", {**cloudflare(stranger), **nonce()}).status == 401
                assert edge("/alb", alb, cert=None).upstream_headers["x-consumer-username"] == "bob"
                unseen = {"X-Amzn-Mtls-Clientcert": quote(gateway.cert("clients/alice")[0].read_text(),
                                                          safe="+=/"), **nonce()}
                answer = edge("/alb", unseen, cert=None)
                assert (answer.status, answer.json()) == (GUARD_STATUS, {"message": GUARD_MESSAGE}), answer
                assert not gateway.seen_upstream(unseen["X-Test-Nonce"])

            gateway.signal_plugin_server("header-cert-auth", signal.SIGSTOP)
            try:
                from_kong_alone()
            finally:   # Kong starts a new one; restore() below waits until every server answers
                gateway.signal_plugin_server("header-cert-auth", signal.SIGKILL)
        finally:
            gateway.restore()

    def test_5_plugin_enabled_and_changed_at_runtime(self, gateway: Gateway) -> None:
        requires(gateway, "api-key-auth")
        key = gateway.api_key("ak_alice_dev")
        credentials = route_plugin(find_route(gateway.config, "key"), "api-key-auth")["config"]["credentials"]
        guard = guard_plugin(["api-key-auth"])   # the route's own guard, in place of the global one

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
        """With the verdict cache off, every request asks the plugin server (test_15 shows what the
        cache answers while the server is down: only what the plugin decided before)."""
        requires(gateway, "api-key-auth")
        with verdict_cache_off(gateway):
            self._fail_closed_when_the_plugin_server_dies_or_hangs(gateway)

    @staticmethod
    def _fail_closed_when_the_plugin_server_dies_or_hangs(gateway: Gateway) -> None:
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

    def test_6b_a_plugin_server_that_stops_and_continues(self, gateway: Gateway) -> None:
        """SIGSTOP then SIGCONT: while stopped, requests time out (the guard's 503); after it
        continues Kong may answer some requests 500 ("unexpected RPC response ID": answers to
        requests it gave up on). Never is a request proxied unchecked, and service comes back.
        (Verdict cache off: every request asks the plugin server.)"""
        requires(gateway, "api-key-auth")
        with verdict_cache_off(gateway):
            self._stops_and_continues(gateway)

    @staticmethod
    def _stops_and_continues(gateway: Gateway) -> None:
        valid = {"apikey": gateway.api_key("ak_alice_dev")}
        assert gateway.https("/key", headers=valid).status == 200
        gateway.signal_plugin_server("api-key-auth", signal.SIGSTOP)
        try:
            headers = {**valid, **nonce()}
            answer = gateway.https("/key", headers=headers)
            assert answer.status in (500, 503), answer
            assert not gateway.seen_upstream(headers["X-Test-Nonce"])
        finally:
            gateway.signal_plugin_server("api-key-auth", signal.SIGCONT)
        statuses = []
        for _ in range(8):
            headers = nonce()                                   # no key: must never pass
            answer = gateway.https("/key", headers=headers)
            statuses.append(answer.status)
            assert answer.status in (401, 500, 503), answer
            assert not gateway.seen_upstream(headers["X-Test-Nonce"])
        eventually(lambda: gateway.https("/key", headers=valid).status == 200, 30,
                   "api-key-auth did not serve again after SIGCONT", gateway.error_log)

    def test_6c_a_restarted_plugin_server_never_serves_another_routes_config(self, gateway: Gateway) -> None:
        """Kong's worker keeps the instance ids a plugin server gave it. kong-pdk numbered them from
        0 in each server lifetime: the first instance after a restart took the id of the first one
        before it, and a strict route was served by a report-only route's config. (Verdict cache
        off: the first requests after each restart reach the new plugin server.)"""
        requires(gateway, "client-cert-auth")
        with verdict_cache_off(gateway):
            self._restarted_server_serves_its_own_configs(gateway)

    @staticmethod
    def _restarted_server_serves_its_own_configs(gateway: Gateway) -> None:
        def restart_then_first(path: str, cert: str | None) -> None:
            before = gateway.signal_plugin_server("client-cert-auth", 0)
            gateway.signal_plugin_server("client-cert-auth", signal.SIGKILL)
            eventually(lambda: not set(gateway.signal_plugin_server("client-cert-auth", 0)) & set(before)
                       and gateway.https(path, cert=cert).status == 200, 60,
                       f"{path} never served after a restart", gateway.error_log)

        restart_then_first("/mtls", "clients/alice")     # the first instance of that lifetime
        restart_then_first("/aop/report-only", None)     # ... and of the next one
        headers = nonce()
        answer = gateway.https("/mtls", headers=headers)
        assert (answer.status, answer.json()) == (401, {"message": MESSAGE_NO_CERTIFICATE})
        assert not gateway.seen_upstream(headers["X-Test-Nonce"])

    def test_7_resuming_clients_always_present_their_certificate(self, gateway: Gateway) -> None:
        """Browsers and HTTP libraries offer the previous TLS session on a new connection. The
        global client-cert-request turns session reuse off, so every connection is a full
        handshake that carries the client's chain (TLS 1.2 and 1.3)."""
        requires(gateway, "client-cert-auth", "client-cert-request")
        ca = gateway.pki / "ca" / "root.pem"
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            context = tls_version(version, tls_context(ca, gateway.cert("clients/alice")))
            results = resumed_session_requests(gateway.proxy_https, "/mtls", context, 4)
            assert [status for status, _, _ in results] == [200] * 4, (version, results)
            assert not any(reused for _, reused, _ in results), (version, results)

    def test_8_api_keys_never_appear_in_kongs_logs(self, gateway: Gateway) -> None:
        """The shipped setup: keys in headers (the only place api-key-auth reads by default) and
        an access log without query strings. A key a client puts in the URL is refused, and still
        reaches nginx's error log with the request line of the refusal (documented)."""
        requires(gateway, "api-key-auth")
        key = gateway.api_key("ak_alice_dev")
        secret = key.partition(".")[2]
        assert gateway.https("/key", headers={"apikey": key}).status == 200
        assert gateway.https("/key", headers={"apikey": key + "x"}).status == 401
        assert gateway.https("/key", headers={"apikey": "ak_alice_dev." + secret[::-1]}).status == 401
        if "client-cert-auth" in gateway.plugins:
            bound = gateway.api_key("ak_alice_bound")
            assert gateway.https("/key/bound", cert="clients/bob", headers={"apikey": bound}).status == 401
        assert gateway.https(f"/key?apikey={key}").status == 401
        eventually(lambda: "/key" in gateway.access_log(), 10, "no access log line", gateway.access_log)
        assert secret not in gateway.access_log()
        in_error_log = [line for line in gateway.error_log().splitlines() if secret in line]
        assert all(f"/key?apikey={key}" in line for line in in_error_log), in_error_log

    def test_9_each_plugin_logs_under_its_own_name(self, gateway: Gateway) -> None:
        """Kong caches PDK functions per worker by name; a `kong.log` function keeps the namespace
        of the plugin that first called it. Each of ours spells its own."""
        requires(gateway, "ip-allowlist", "client-cert-auth", "api-key-auth")
        assert gateway.https("/ip/blocked").status == 403
        assert gateway.https("/mtls").status == 401
        assert gateway.https("/key").status == 401
        log = gateway.error_log()
        for name in (IP_ALLOWLIST, CLIENT_CERT_AUTH, API_KEY_AUTH):
            lines = [line for line in log.splitlines() if f"[kong-mtls] {name} refused" in line]
            assert lines, f"no refusal of {name} in Kong's log"
            assert all(f"[{name}] [kong-mtls] {name} refused" in line for line in lines), lines[-3:]
            # Written by the guard plugin's wrapper, which applies the verdict (docs/architecture.md).
            assert all(" verdicts.lua:" in line for line in lines), lines[-3:]

    def test_10_start_time_problems_are_visible_at_kongs_default_log_level(self, gateway: Gateway) -> None:
        """Kong logs a plugin server's own output at `info` (hidden at its default `notice`): an
        expiring trust anchor and a refused config reach Kong's log through the PDK instead."""
        requires(gateway, "client-cert-auth")
        soon = Authority.root("integration soon-expiring root", days=10)
        root = (gateway.pki / "ca" / "root.pem").read_text()
        config = with_route_plugins(gateway.config, "public", [
            {"name": "client-cert-auth", "config": {"ca_certificates": [soon.cert_pem, root],
                                                    "revocation_check_mode": "SKIP",
                                                    "skip_consumer_lookup": True}}])
        config = copy.deepcopy(config)
        config["services"][0]["routes"].append({
            "name": "broken", "paths": ["/broken"],
            "plugins": [{"name": "client-cert-auth", "config": {"ca_certificates": ["not a PEM"]}}]})
        try:
            gateway.load_config(config)
            assert gateway.https("/public", cert="clients/alice").status == 200
            answer = gateway.https("/broken", cert="clients/alice")
            assert (answer.status, answer.json()) == (500, {"message": "An unexpected error occurred"})
            log = gateway.error_log()
            assert re.search(r"\[warn\].*\[client-cert-auth\] \[kong-mtls\] client-cert-auth anchor-expiring"
                             r".*integration soon-expiring root", log), log[-3000:]
            assert re.search(r"\[warn\].*reason=INVALID_CONFIG.*ca_certificates\[1\]", log), log[-3000:]
        finally:
            gateway.restore()

    def test_11_what_nginx_refuses_before_any_plugin(self, gateway: Gateway) -> None:
        """Client certificates over OpenSSL's 100 kB certificate-list limit end the handshake; request
        headers beyond nginx's buffers get nginx's 400. An expired certificate reaches the plugin
        (option B): its 401, not nginx's page."""
        requires(gateway, "client-cert-auth", "client-cert-request")
        huge = dev_issuing_ca(gateway.pki).issue(
            x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "huge")]),
            extended_key_usage=None)
        padded = add_test_cert(gateway, "huge", _padded(huge, 1024 * 1024))
        with pytest.raises((ssl.SSLError, ConnectionError)):
            gateway.https("/mtls", cert=padded)

        big = gateway.https("/public", headers={"X-Big": "x" * 12000})
        assert big.status == 400

        headers = nonce()
        expired = gateway.https("/mtls", cert=expired_client(gateway), headers=headers)
        assert (expired.status, expired.json()) == (401, {"message": MESSAGE_FAILED_VERIFICATION})
        assert not gateway.seen_upstream(headers["X-Test-Nonce"])

    def test_13_lint_reads_the_running_configuration(self, gateway: Gateway, tmp_path: Path) -> None:
        """`kong-mtls lint --admin` on the running DB-less Kong (Kong's own export, `GET /config`:
        flat entities, references by id, every field filled in) reports exactly what it reports for
        the declarative config Kong started with."""
        declared = tmp_path / "kong.json"
        declared.write_text(json.dumps(gateway.config))
        code, from_file = run_lint(str(declared))
        admin_code, from_admin = run_lint("--admin", f"http://{gateway.admin[0]}:{gateway.admin[1]}")
        assert lint_report(from_admin) == lint_report(from_file)
        assert admin_code == code
        if gateway.pki_in_kong == str(gateway.pki):  # the files the plugin configs name are readable here
            assert (code, from_admin["findings"]) == (0, [])
            assert ("warning", "report-only", "routes[aop-report-only].plugins[client-cert-auth]") \
                in lint_report(from_admin)

    # -- the fail-closed guard plugin (kong-mtls-guard, docs/guard.md) ------------------------------

    def test_14_the_guard_plugin_when_a_plugin_server_hangs_dies_and_restarts(self, gateway: Gateway) -> None:
        """Both forms of kong-mtls-guard: auto (the global guard of kong/kong.yml on /key) and a
        route's own guard requiring api-key-auth (/key/required; Kong runs it instead of the
        global one). Hung: Kong gives up after the socket timeout and goes on without the plugin;
        the guard answers 503 and logs why. Killed: no request is proxied unchecked. Restarted by
        Kong: each route's own verdicts again."""
        requires(gateway, "api-key-auth")
        config = without_verdict_cache(gateway.config)   # every request asks the plugin server
        required = copy.deepcopy(find_route(config, "key"))
        required.update(name="key-required", paths=["/key/required"])
        required["plugins"].append(guard_plugin(["api-key-auth"]))
        config["services"][0]["routes"].append(required)
        valid = {"apikey": gateway.api_key("ak_alice_dev")}
        paths = ("/key", "/key/required")
        refused_line = (f"[kong-mtls-guard] [kong-mtls] guard refused reason={GUARD_REASON} "
                        "missing=kong_mtls.api-key-auth")
        try:
            gateway.load_config(config)
            for path in paths:
                assert gateway.https(path, headers=valid).status == 200, path
            logged = gateway.error_log().count(refused_line)
            before = gateway.signal_plugin_server("api-key-auth", 0)
            gateway.signal_plugin_server("api-key-auth", signal.SIGSTOP)          # hung
            try:
                for path in paths:
                    headers = {**valid, **nonce()}
                    answer = gateway.https(path, headers=headers)
                    assert (answer.status, answer.json()) == (GUARD_STATUS, {"message": GUARD_MESSAGE}), path
                    assert not gateway.seen_upstream(headers["X-Test-Nonce"])
            finally:
                gateway.signal_plugin_server("api-key-auth", signal.SIGKILL)      # dead
            assert gateway.error_log().count(refused_line) >= logged + len(paths)

            for path in paths:                                  # until Kong has started a new one
                headers = nonce()
                answer = gateway.https(path, headers=headers)
                assert answer.status != 200 and not gateway.seen_upstream(headers["X-Test-Nonce"]), answer

            for path in paths:                                  # restarted
                eventually(lambda path=path: gateway.https(path, headers=valid).status == 200, 60,
                           f"{path}: service did not resume", gateway.error_log)
                headers = nonce()
                answer = gateway.https(path, headers=headers)
                assert answer.status == 401, answer
                assert not gateway.seen_upstream(headers["X-Test-Nonce"])
            assert not set(gateway.signal_plugin_server("api-key-auth", 0)) & set(before)
        finally:
            gateway.restore()

    def test_14b_a_users_own_post_function_beside_the_guard(self, gateway: Gateway) -> None:
        """A route with a post-function of its own: the guard plugin still decides (a plugin of its
        own name, and it runs first), and the user's function still runs. The fallback form shows
        the pitfall the plugin removes: a Service's post-function guard is not run on a route
        with its own post-function (Kong runs the most specific config), and the request goes
        through unchecked."""
        requires(gateway, "api-key-auth")
        valid = {"apikey": gateway.api_key("ak_alice_dev")}
        users = {"name": "post-function",
                 "config": {"access": ['kong.response.set_header("X-User-Function", "ran")']}}
        uncached = without_verdict_cache(gateway.config)   # every request asks the plugin server
        key_plugins = find_route(uncached, "key")["plugins"]
        with_user = with_route_plugins(uncached, "key", [*key_plugins, users])
        try:
            gateway.load_config(with_user)
            ok = gateway.https("/key", headers=valid)
            assert (ok.status, ok.headers.get("x-user-function")) == (200, "ran")
            assert gateway.https("/key").status == 401
            self._while_stopped(gateway, "api-key-auth", lambda: self._guarded(gateway, "/key", valid))

            # The fallback, on a Service of /key's own, without the plugin: displaced by the
            # route's function.
            fallback = copy.deepcopy(with_user)
            fallback["plugins"] = [p for p in fallback["plugins"] if p["name"] != GUARD]
            echo = next(s for s in fallback["services"] if s["name"] == "echo")
            key_route = find_route(fallback, "key")
            echo["routes"].remove(key_route)
            fallback_guard = {"name": "post-function", "config": {"access": [lua_guard(["api-key-auth"])]}}
            fallback["services"].append({**{k: v for k, v in echo.items() if k != "routes"},
                                         "name": "echo-keyed", "routes": [key_route],
                                         "plugins": [fallback_guard]})
            gateway.load_config(fallback)
            assert gateway.https("/key", headers=valid).headers.get("x-user-function") == "ran"

            def displaced() -> None:
                headers = {**valid, **nonce()}
                answer = gateway.https("/key", headers=headers)
                assert answer.status == 200, "Kong no longer displaces a Service's post-function"
                assert gateway.seen_upstream(headers["X-Test-Nonce"])

            self._while_stopped(gateway, "api-key-auth", displaced)
        finally:
            gateway.restore()

    def test_14c_auto_mode_requires_what_kong_selected_at_each_scope(self, gateway: Gateway) -> None:
        """The global guard in auto mode finds our plugins wherever Kong took their config from:
        the route (/upstream, /ip), the Service (/scoped: ip-allowlist on a Service), a consumer
        (/scoped/alice: upstream-identity for alice, whom api-key-auth authenticated first; our
        plugins refuse consumer scope, so alice gets 500 INVALID_CONFIG, and the guard's 503 when
        the plugin server is down). A route none of ours is selected for passes (/public,
        /scoped/alice without alice)."""
        requires(gateway, "ip-allowlist", "api-key-auth", "upstream-identity")
        config = without_verdict_cache(gateway.config)   # every request asks the plugin server
        echo = next(s for s in config["services"] if s["name"] == "echo")
        key = find_route(config, "key")
        loopback = route_plugin(find_route(config, "ip"), "ip-allowlist")
        alice_only = {"name": "upstream-identity", "route": "scoped-alice", "consumer": "alice",
                      "config": route_plugin(find_route(config, "upstream"), "upstream-identity")["config"]}
        config["services"].append({
            **{k: v for k, v in echo.items() if k != "routes"}, "name": "scoped", "plugins": [loopback],
            "routes": [{"name": "scoped", "paths": ["/scoped"]},
                       {"name": "scoped-alice", "paths": ["/scoped/alice"],
                        "plugins": [route_plugin(key, "api-key-auth")]}]})
        config["plugins"].append(alice_only)
        valid = {"apikey": gateway.api_key("ak_alice_dev")}
        try:
            gateway.load_config(adapt_to(gateway, config))
            for path in ("/scoped", "/upstream", "/ip", "/public"):
                answer = gateway.https(path, headers=valid)
                assert answer.status == 200, (path, answer)
            headers = {**valid, **nonce()}
            answer = gateway.https("/scoped/alice", headers=headers)
            assert answer.status == 500 and not gateway.seen_upstream(headers["X-Test-Nonce"]), answer
            eventually(lambda: "kong-mtls plugins cannot be scoped to a consumer" in gateway.error_log(), 10,
                       "the consumer-scoped config was not refused", gateway.error_log)
            assert gateway.https("/scoped/alice").status == 401

            def upstream_identity_missing() -> None:
                for path in ("/upstream", "/scoped/alice"):
                    self._guarded(gateway, path, valid, missing="upstream-identity")
                assert gateway.https("/public").status == 200
                assert gateway.https("/scoped", headers=valid).status == 200

            def ip_allowlist_missing() -> None:
                for path in ("/ip", "/scoped"):
                    self._guarded(gateway, path, {}, missing="ip-allowlist")
                assert gateway.https("/public").status == 200

            self._while_stopped(gateway, "upstream-identity", upstream_identity_missing)
            self._while_stopped(gateway, "ip-allowlist", ip_allowlist_missing)
        finally:
            gateway.restore()

    def test_14d_kong_refuses_a_guard_config_that_would_protect_nothing(self, gateway: Gateway) -> None:
        """The guard's schema, as real Kong applies it: an empty or unknown `require`, or a guard
        scoped to a consumer (skipped for every other request), is refused when written."""
        base = copy.deepcopy(gateway.config)
        bad_configs = [({**guard_plugin(), "config": {"require": []}}, b"length must be at least 1"),
                       ({**guard_plugin(), "config": {"require": ["key-auth"]}},
                        b"expected one of: ip-allowlist, client-cert-auth, header-cert-auth, api-key-auth, "
                        b"upstream-identity"),
                       ({**guard_plugin(), "consumer": "alice"}, b'"consumer":"value must be null"')]
        for bad, error in bad_configs:
            config = copy.deepcopy(base)
            config["plugins"] = [p for p in config["plugins"] if p["name"] != GUARD] + [bad]
            answer = gateway.admin_request("POST", "/config", {"config": json.dumps(config)})
            assert answer.status == 400 and error in answer.body, (bad, answer.status, answer.body[-500:])
        # Only the guard's wrapper may tell a plugin server that Kong applies its verdicts (then
        # it makes no change itself): a config author cannot, Kong refuses the key as unknown.
        for name, route in ((IP_ALLOWLIST, "ip"), (API_KEY_AUTH, "key"), (CLIENT_CERT_AUTH, "mtls")):
            config = copy.deepcopy(base)
            route_plugin(find_route(config, route), name)["config"][VERDICT_APPLY_FLAG] = True
            answer = gateway.admin_request("POST", "/config", {"config": json.dumps(config)})
            unknown = f'"{VERDICT_APPLY_FLAG}":"unknown field"'.encode()
            assert answer.status == 400 and unknown in answer.body, (name, answer.status, answer.body[-500:])
        assert gateway.https("/key").status == 401                     # the running config is kept

    def test_15_kong_answers_a_decided_request_itself_from_the_verdict_cache(self, gateway: Gateway) -> None:
        """The guard plugin's verdict cache in real Kong, with each plugin server stopped: the peer,
        key or certificate it already decided gets exactly the same verdict from Kong alone (the
        same upstream headers; a refusal with the same answer and log line), one it never decided
        meets the guard's 503; and a changed plugin config is decided anew."""
        requires(gateway, "ip-allowlist", "client-cert-auth", "api-key-auth")
        key = {"apikey": gateway.api_key("ak_alice_dev")}
        cases = (("ip-allowlist", "/ip", None, {}, ("/ip/blocked", None, {}, 403)),
                 ("api-key-auth", "/key", None, key, None),
                 ("client-cert-auth", "/mtls", "clients/alice", {}, ("/mtls", None, {}, 401)))
        varying = {"x-test-nonce", "x-kong-request-id", "x-forwarded-port"}
        try:
            for name, path, cert, headers, refusal in cases:
                decided = gateway.https(path, cert=cert, headers=headers)
                assert decided.status == 200, (name, decided)
                # Started from a config the guard's wrapper marked: the plugin server left every
                # change to Kong (what reached the upstream above was made by the wrapper).
                assert gateway.plugin_server_stats(name)["InstancesWithVerdictsApplied"] >= 1, name
                identity = {k: v for k, v in decided.upstream_headers.items() if k not in varying}
                if refusal is not None:
                    assert gateway.https(refusal[0], cert=refusal[1], headers=refusal[2]).status == refusal[3]

                def from_kong_alone(name: str = name, path: str = path, cert: str | None = cert,
                                    headers: dict = headers, identity: dict = identity,
                                    refusal: tuple | None = refusal) -> None:
                    sent = {**headers, **nonce()}
                    again = gateway.https(path, cert=cert, headers=sent)
                    assert again.status == 200 and gateway.seen_upstream(sent["X-Test-Nonce"]), (name, again)
                    assert {k: v for k, v in again.upstream_headers.items() if k not in varying} == identity
                    if refusal is not None:
                        logged = gateway.error_log().count(f"{name} refused")
                        refused_again = gateway.https(refusal[0], cert=refusal[1], headers=refusal[2])
                        assert refused_again.status == refusal[3], (name, refused_again)
                        eventually(lambda: gateway.error_log().count(f"{name} refused") > logged, 10,
                                   f"{name}: the cached refusal was not logged", gateway.error_log)
                    undecided = {"ip-allowlist": None, "api-key-auth": ("/key", None, {"apikey": "ak_x.y"}),
                                 "client-cert-auth": ("/mtls", "clients/bob", {})}[name]
                    if undecided is not None:
                        self._guarded(gateway, undecided[0], undecided[2], missing=name, cert=undecided[1])

                self._while_stopped(gateway, name, from_kong_alone)

            # A changed config is decided anew: Kong builds new plugin config tables, which start
            # with no verdicts (the first request after the change already gets the new answer).
            assert gateway.https("/ip").status == 200
            changed = copy.deepcopy(gateway.config)
            route_plugin(find_route(changed, "ip"), "ip-allowlist")["config"]["allow"] = ["192.0.2.0/24"]
            gateway.load_config(changed)
            headers = nonce()
            assert gateway.https("/ip", headers=headers).status == 403
            assert not gateway.seen_upstream(headers["X-Test-Nonce"])
        finally:
            gateway.restore()

    @staticmethod
    def _guarded(gateway: Gateway, path: str, headers: dict[str, str], missing: str = "api-key-auth",
                 cert: str | None = None) -> None:
        """A request that must meet the guard's 503, logged for the `missing` plugin's mark, and
        never reach the upstream."""
        line = f"[kong-mtls] guard refused reason={GUARD_REASON} missing=kong_mtls.{missing}"
        logged = gateway.error_log().count(line)
        sent = {**headers, **nonce()}
        answer = gateway.https(path, headers=sent, cert=cert)
        assert (answer.status, answer.json()) == (GUARD_STATUS, {"message": GUARD_MESSAGE}), (path, answer)
        assert "x-user-function" not in answer.headers     # the guard answered before it
        assert not gateway.seen_upstream(sent["X-Test-Nonce"])
        eventually(lambda: gateway.error_log().count(line) > logged, 10, f"{path}: no `{line}`",
                   gateway.error_log)

    @staticmethod
    def _while_stopped(gateway: Gateway, name: str, check: Callable[[], None]) -> None:
        """Run `check` with `name`'s plugin server stopped, then kill it and wait until every
        plugin server (Kong starts a new one) vouches for a valid request again."""
        gateway.signal_plugin_server(name, signal.SIGSTOP)
        try:
            check()
        finally:
            gateway.signal_plugin_server(name, signal.SIGKILL)
        gateway.wait_ready(timeout=60)


class UntrustedLuaOffScenarios:
    """A Kong with `untrusted_lua = off` (no pre-/post-function code), a common hardening: the
    guard plugin protects it; the post-function fallback cannot be deployed there."""

    def test_u1_the_guard_plugin_works_where_post_function_code_cannot_run(
            self, untrusted_lua_off: Gateway) -> None:
        """Kong 3.4 and 3.9 accept a post-function config, then fail every request of its route
        (the connection is closed without an answer): the fallback guard is no option here."""
        gateway = untrusted_lua_off
        requires(gateway, "api-key-auth")
        valid = {"apikey": gateway.api_key("ak_alice_dev")}
        key_plugins = find_route(gateway.config, "key")["plugins"]
        fallback = with_route_plugins(gateway.config, "key", [
            *key_plugins, {"name": "post-function", "config": {"access": [lua_guard(["api-key-auth"])]}}])
        try:
            gateway.load_config(fallback)
            with pytest.raises(ConnectionError):
                gateway.https("/key", headers=valid)
            assert "'untrusted_lua' config option is set to 'off'" in gateway.error_log()
        finally:
            gateway.restore()

        assert gateway.https("/key", headers=valid).status == 200
        # A key the verdict cache cannot answer for (a refused key is never cached).
        Scenarios._while_stopped(gateway, "api-key-auth",
                                 lambda: Scenarios._guarded(gateway, "/key", {"apikey": "ak_alice_dev.x"}))
        headers = nonce()
        assert gateway.https("/key", headers=headers).status == 401
        assert not gateway.seen_upstream(headers["X-Test-Nonce"])

def _padded(issued: Issued, size: int) -> Issued:
    """`issued` re-signed by its own key with a `size`-byte unknown non-critical extension."""
    cert = issued.cert
    builder = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(cert.subject)
               .public_key(issued.key.public_key()).serial_number(cert.serial_number)
               .not_valid_before(cert.not_valid_before_utc).not_valid_after(cert.not_valid_after_utc)
               .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"),
                                                         b"\x04\x00" + b"p" * size), critical=False))
    from cryptography.hazmat.primitives import hashes

    return Issued(cert=builder.sign(issued.key, hashes.SHA256()), key=issued.key, intermediates=())


class OptionAScenarios:
    """Kong asking for client certificates with nginx's `optional_no_ca` (option A), which the
    shipped setup does not use: the reasons, shown. Needs the `option_a` fixture (a second Kong)."""

    def test_a1_resumed_sessions_reach_the_plugin_without_a_certificate(self, option_a: Gateway) -> None:
        ca = option_a.pki / "ca" / "root.pem"
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            context = tls_version(version, tls_context(ca, option_a.cert("clients/alice")))
            results = resumed_session_requests(option_a.proxy_https, "/mtls", context, 3)
            assert results[0][0] == 200, results
            resumed = [(status, body) for status, reused, body in results if reused]
            assert resumed, f"{version}: Kong resumed no session"
            for status, body in resumed:
                assert (status, json.loads(body)) == (401, {"message": MESSAGE_NO_CERTIFICATE})

    def test_a2_nginx_answers_an_expired_certificate_with_its_own_page(self, option_a: Gateway) -> None:
        headers = nonce()
        answer = option_a.https("/mtls", cert=expired_client(option_a), headers=headers)
        assert answer.status == 400
        assert b"The SSL certificate error" in answer.body
        assert answer.headers["content-type"].startswith("text/html")
        assert not option_a.seen_upstream(headers["X-Test-Nonce"])


class ProcessesScenarios:
    """Two nginx workers, every plugin server with `--processes 2` (docs/architecture.md, "Several
    processes"): each worker's RPCs, Steps included, reach the process holding its events."""

    def test_p1_two_workers_two_processes_answer_every_request_right(self, two_processes: Gateway) -> None:
        from concurrent.futures import ThreadPoolExecutor

        gateway = two_processes
        requires(gateway, "api-key-auth", "client-cert-auth")
        assert len(gateway.signal_plugin_server("api-key-auth", 0)) == 3  # the parent and two children
        valid = {"apikey": gateway.api_key("ak_alice_dev")}
        logged = len(gateway.error_log())  # what start-up logged (readiness probes) is not ours

        def one(i: int) -> tuple[int, int, int]:
            sent = {**(valid if i % 2 == 0 else {}), **nonce()}
            key = gateway.https("/key", headers=sent)
            mtls = gateway.https("/mtls", cert="clients/alice" if i % 3 else None)
            return key.status, mtls.status, i

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(240)))
        wrong = [(i, key, mtls) for key, mtls, i in results
                 if key != (200 if i % 2 == 0 else 401) or mtls != (200 if i % 3 else 401)]
        assert not wrong, wrong[:10]
        suspect = [line for line in gateway.error_log()[logged:].splitlines()
                   if "not found" in line or "[kong-mtls] guard refused" in line]
        assert not suspect, suspect[:10]


class IdleInstancesScenarios:
    """Plugin servers started with `--instance-idle-after 2` (docs/architecture.md, "Idle
    instances are dropped"). Needs the `idle_instances` fixture (another Kong)."""

    def test_i1_idle_instances_go_and_kong_starts_a_used_one_again(self, idle_instances: Gateway) -> None:
        """Every config load gives each plugin config a new `__seq__`, hence a new instance. Kong
        closes the old one only on a worker's next request for that plugin: never for a deleted
        plugin, nor for one that gets no more requests (here /key's, started before the loads)."""
        gateway = idle_instances
        requires(gateway, "api-key-auth")
        key = gateway.api_key("ak_alice_dev")
        credentials = route_plugin(find_route(gateway.config, "key"), "api-key-auth")["config"]["credentials"]
        guard = guard_plugin(["api-key-auth"])

        def protect(key_name: str) -> dict:  # verdict cache off: every request reaches the server
            config = {"credentials": credentials, "key_names": [key_name], "verdict_cache_ttl": 0}
            plugins = [{"name": "api-key-auth", "config": config}, guard]
            return with_route_plugins(gateway.config, "public", plugins)

        def instances() -> int:
            stats = gateway.plugin_server_stats("api-key-auth")
            assert stats is not None, "the api-key-auth plugin server did not answer"
            return stats["Instances"]

        def allowed() -> bool:
            return gateway.https("/public", headers={"x-key": key}).status == 200

        refused = nonce()
        try:
            for key_name in ("apikey", "x-api-key", "x-key"):        # three configs, one after the other
                gateway.load_config(protect(key_name))
                eventually(lambda key_name=key_name: gateway.https("/public", headers={key_name: key}).status
                           == 200, 30, f"the config for {key_name} did not take effect", gateway.error_log)
            # No request for a while: the server drops every instance, the route's own included.
            eventually(lambda: instances() == 0, 30, "idle instances were never dropped", gateway.error_log)
            logged = len(gateway.error_log())
            answer = gateway.https("/public", headers=refused)
            assert (answer.status, answer.json()) == (401, {"message": MESSAGE_NO_KEY})
            assert allowed()
            # Kong's worker still held the dropped instance's id: it started the instance again.
            assert log_lines(gateway, "[api-key-auth] no plugin instance", level="warn", since=logged)
            # In use: exactly the route's instance (each count taken right after a request to it).
            eventually(lambda: allowed() and instances() == 1, 30, "not only the route's instance is left",
                       gateway.error_log)
        finally:
            gateway.restore()
        assert not gateway.seen_upstream(refused["X-Test-Nonce"])
        assert log_lines(gateway, "reason=INSTANCE_IDLE", level="info")


class GuardFallbackScenarios:
    """A Kong that does not load kong-mtls-guard (a managed gateway that takes configuration only):
    each route of ours is guarded by a post-function instead (docs/guard.md, "The `post-function`
    fallback"). Needs the `guard_fallback` fixture (another Kong)."""

    def test_g1_without_the_guard_plugin_the_servers_make_each_change_and_the_fallback_fails_closed(
            self, guard_fallback: Gateway) -> None:
        """No wrapper marks the plugins' configs: the plugin servers make every change themselves
        and hand Kong no verdict (nothing would take it). Identity headers in every spelling are
        still removed, refusals answered, and with a plugin server stopped the post-function guard
        answers 503."""
        gateway = guard_fallback
        requires(gateway, "client-cert-auth", "api-key-auth", "ip-allowlist")
        assert_no_forged_identity_reaches_the_upstream(gateway)
        key = {"apikey": gateway.api_key("ak_alice_dev")}
        assert gateway.https("/ip").status == 200
        for path, headers, status in (("/ip/blocked", nonce(), 403),
                                      ("/key", {"apikey": key["apikey"] + "x", **nonce()}, 401)):
            assert gateway.https(path, headers=headers).status == status, path
            assert not gateway.seen_upstream(headers["X-Test-Nonce"]), path
        for name in ("ip-allowlist", "api-key-auth", "client-cert-auth"):
            stats = gateway.plugin_server_stats(name)
            assert stats is not None and stats["Instances"] >= 1, name
            assert stats["InstancesWithVerdictsApplied"] == 0, name
        Scenarios._while_stopped(gateway, "api-key-auth",
                                 lambda: Scenarios._guarded(gateway, "/key", key, missing="api-key-auth"))
