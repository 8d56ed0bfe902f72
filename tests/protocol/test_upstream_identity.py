"""upstream-identity through the real plugin server, probing real TLS upstreams on loopback."""

from __future__ import annotations

import threading

import pytest

from kong_mtls.constants import UPSTREAM_IDENTITY, shared_mark
from kong_mtls.core.upstream import MESSAGE_UNVERIFIED, CertSummary
from kong_mtls.devpki import SERVER_AUTH, SubjectAltNames, name
from tests.harness.expect import assert_invalid_config
from tests.harness.kong_side import KongSide, Request
from tests.harness.pki import DAY, now
from tests.harness.tls_servers import SilentServer, TLSUpstream, closed_port, write_pem_files

HOST = "upstream.test"
SPIFFE = "spiffe://example.org/ns/backend/sa/api"
MARK = shared_mark(UPSTREAM_IDENTITY)
SET_VERIFY = "kong.service.set_tls_verify"
GET_SERVICE = "kong.router.get_service"  # the Service's own TLS settings are checked
GET_ROUTE = "kong.router.get_route"  # a route with preserve_host is refused


@pytest.fixture(scope="module")
def plugin(plugin_server):
    return plugin_server(UPSTREAM_IDENTITY)


@pytest.fixture(scope="module")
def certs(pki):
    def server(dns, uris=(), **kwargs):
        return pki.intermediate.issue(name(dns[0]), sans=SubjectAltNames(dns=dns, uris=uris),
                                      extended_key_usage=(SERVER_AUTH,), **kwargs)

    return {
        "upstream": server([HOST], [SPIFFE]),
        "other_san": server(["other.test"]),
        "expired": server([HOST], not_before=now() - 30 * DAY, not_after=now() - DAY),
        "expiring": server([HOST], not_after=now() + 3 * DAY),
        "kong": pki.client("kong-gateway"),
        "stranger": pki.unknown_ca_client(),
    }


@pytest.fixture(scope="module")
def files(certs, tmp_path_factory):
    directory = tmp_path_factory.mktemp("upstream-identity")
    return {key: write_pem_files(directory, certs[key], key) for key in ("kong", "stranger")}


@pytest.fixture(scope="module")
def upstream(certs, pki):
    with TLSUpstream(certs["upstream"], client_cas=[pki.root]) as server:
        yield server


def config(pki, files, port: int, client: str = "kong", **extra) -> dict:
    conf = {"host": "127.0.0.1", "port": port, "sni": HOST, "trusted_ca_pem": pki.root.cert_pem,
            "probe_timeout": 3}
    conf["client_cert_file"], conf["client_key_file"] = files[client]
    conf.update(extra)
    return conf


def logged(outcome, text: str) -> bool:
    return any(text in message for _, message in outcome.logs)


def assert_refused(outcome, reason: str, *, enforced: bool = True) -> None:
    assert outcome.exit is not None and outcome.exit.status == 502, outcome.logs
    assert outcome.exit.body == {"message": MESSAGE_UNVERIFIED}
    assert outcome.exit.source == UPSTREAM_IDENTITY
    assert logged(outcome, f"reason={reason}"), outcome.logs
    assert MARK not in outcome.ctx_shared
    if enforced:
        assert outcome.service_tls == {"verify": True}   # verification enforced even on a refusal


# -- allowed ----------------------------------------------------------------------------------------

def test_matching_identity_is_allowed_and_cached(kong, plugin, upstream, pki, files, certs):
    conf = config(pki, files, upstream.port, expected_dns_names=[HOST], expected_uris=[SPIFFE],
                  spki_sha256_pins=[CertSummary.of(certs["upstream"].cert).spki_b64])
    before = upstream.connection_count
    first = kong.run(Request(), [(plugin, conf)], guard=[UPSTREAM_IDENTITY])
    assert first.proxied, first.logs
    assert first.service_tls == {"verify": True}
    mark = first.ctx_shared[MARK]
    assert mark["target"] == f"127.0.0.1:{upstream.port}" and mark["reason"] == "IDENTITY_OK"
    assert mark["subject"] == f"CN={HOST}"
    # Cold cache: the request waited for the probe (after a log line, its first PDK call but one).
    assert first.pdk_calls == [SET_VERIFY, GET_SERVICE, GET_ROUTE, "kong.log.info", "kong.ctx.shared.set"]
    assert upstream.connection_count == before + 1
    probed = upstream.wait_for(before + 1)[-1]
    assert probed.accepted and probed.client_cert.subject.rfc4514_string() == "CN=kong-gateway"

    second = kong.run(Request(), [(plugin, conf)], guard=[UPSTREAM_IDENTITY])
    assert second.proxied and second.ctx_shared[MARK] == mark
    assert second.pdk_calls == [SET_VERIFY, GET_SERVICE, GET_ROUTE, "kong.ctx.shared.set"]
    assert upstream.connection_count == before + 1, "the second request within the TTL did not probe again"


def test_verify_depth_is_enforced_too(kong, plugin, upstream, pki, files):
    outcome = kong.run(Request(), [(plugin, config(pki, files, upstream.port, tls_verify_depth=3))])
    assert outcome.proxied
    assert outcome.service_tls == {"verify": True, "verify_depth": 3}


def test_target_from_the_service(kong, plugin, upstream, pki, files):
    conf = config(pki, files, upstream.port)
    del conf["host"], conf["port"]
    service = {**Request().service, "id": "00000000-0000-4000-8000-00000000b009", "name": "backend",
               "host": "127.0.0.1", "port": upstream.port}
    outcome = kong.run(Request(service=service), [(plugin, conf)])
    assert outcome.proxied, outcome.logs
    assert outcome.ctx_shared[MARK]["target"] == f"127.0.0.1:{upstream.port}"
    assert outcome.pdk_calls.count("kong.router.get_service") == 1
    again = kong.run(Request(service=service), [(plugin, conf)])
    assert again.pdk_calls == [SET_VERIFY, GET_SERVICE, GET_ROUTE, "kong.ctx.shared.set"]


def test_expiring_upstream_cert_is_logged_once(kong, plugin, certs, pki, files):
    with TLSUpstream(certs["expiring"], client_cas=[pki.root]) as server:
        conf = config(pki, files, server.port, expiry_warning_days=14)
        first = kong.run(Request(), [(plugin, conf)])
        second = kong.run(Request(), [(plugin, conf)])
    assert first.proxied and second.proxied
    assert logged(first, "reason=UPSTREAM_CERT_EXPIRING")
    assert not logged(second, "UPSTREAM_CERT_EXPIRING")


# -- blocked ----------------------------------------------------------------------------------------

def test_same_ca_other_san_is_refused(kong, plugin, certs, pki, files):
    with TLSUpstream(certs["other_san"], client_cas=[pki.root]) as server:
        by_name = kong.run(Request(), [(plugin, config(pki, files, server.port))])
        by_san = kong.run(Request(), [(plugin, config(pki, files, server.port, verify_hostname=False,
                                                      expected_dns_names=[HOST]))])
    assert_refused(by_name, "HOSTNAME_MISMATCH")
    assert_refused(by_san, "SAN_MISMATCH")
    assert logged(by_san, "subject=CN=other.test")


def test_expired_upstream_cert_is_refused(kong, plugin, certs, pki, files):
    with TLSUpstream(certs["expired"], client_cas=[pki.root]) as server:
        outcome = kong.run(Request(), [(plugin, config(pki, files, server.port))], guard=[UPSTREAM_IDENTITY])
    assert_refused(outcome, "UPSTREAM_CERT_EXPIRED")


def test_target_down_is_refused_with_its_own_reason(kong, plugin, pki, files):
    outcome = kong.run(Request(), [(plugin, config(pki, files, closed_port()))])
    assert_refused(outcome, "UPSTREAM_UNREACHABLE")


def test_hung_target_is_refused_after_the_probe_timeout(kong, plugin, pki, files):
    with SilentServer() as server:
        outcome = kong.run(Request(), [(plugin, config(pki, files, server.port, probe_timeout=0.3))])
    assert_refused(outcome, "PROBE_TIMEOUT")


def test_client_cert_refused_by_upstream_and_failure_cached(kong, plugin, upstream, pki, files):
    conf = config(pki, files, upstream.port, client="stranger")
    before = upstream.connection_count
    first = kong.run(Request(), [(plugin, conf)])
    second = kong.run(Request(), [(plugin, conf)])
    assert_refused(first, "CLIENT_CERT_REJECTED")
    assert_refused(second, "CLIENT_CERT_REJECTED")
    assert upstream.connection_count == before + 1, "failure_ttl: the refusal was cached"
    assert "certificate" in upstream.wait_for(before + 1)[-1].error.lower()
    assert second.pdk_calls == [SET_VERIFY, GET_SERVICE, GET_ROUTE, "kong.log.warn", "kong.response.exit"]


def test_service_without_tls_is_refused(kong, plugin, pki, files, upstream):
    conf = config(pki, files, upstream.port)
    del conf["host"]
    service = {"id": "00000000-0000-4000-8000-00000000b00a", "name": "plain", "host": "127.0.0.1",
               "port": upstream.port, "protocol": "http"}
    assert_refused(kong.run(Request(service=service), [(plugin, conf)]), "UPSTREAM_NOT_TLS")


@pytest.mark.parametrize(("change", "reason"), [
    ({"tls_verify": None}, "SERVICE_UNVERIFIED"),
    ({"ca_certificates": None}, "SERVICE_NO_CA_STORE"),
    ({"client_certificate": None}, "SERVICE_POOL_SHARED"),   # pooled with any Service to the address
    ({"protocol": "grpcs"}, "SERVICE_POOL_SHARED"),          # Kong pools grpcs by ip|port only
])
def test_a_service_kong_would_not_verify_with_its_own_cas_is_refused(kong, plugin, pki, files, upstream,
                                                                    change, reason):
    """The probe checks what it sees; only Kong's handshake protects the connection Kong proxies over.
    The Service must set tls_verify itself (its routes without the plugin share its connections),
    name its own CAs and have connections of its own (a client certificate entity, which Kong's pool
    key includes) — whether or not the plugin also forces tls_verify per request."""
    conf = {**config(pki, files, upstream.port), "enforce_tls_verify": False}
    service = {**Request().service, **change}
    outcome = kong.run(Request(service=service), [(plugin, conf)])
    assert_refused(outcome, reason, enforced=False)
    # turning enforcement off is logged at error, on the instance's first request
    assert any(level == "err" and "reason=TLS_VERIFY_NOT_ENFORCED" in m for level, m in outcome.logs)
    forced = kong.run(Request(service=service), [(plugin, {**conf, "enforce_tls_verify": True})])
    assert_refused(forced, reason)


def test_config_without_trust_answers_500_naming_the_field(kong, plugin):
    outcome = kong.run(Request(), [(plugin, {"host": "127.0.0.1", "expected_dns_names": [HOST]})])
    assert_invalid_config(outcome, UPSTREAM_IDENTITY, "trusted_ca_pem")


# -- the event loop -------------------------------------------------------------------------------

def test_a_waiting_probe_does_not_block_other_requests(plugin, upstream, pki, files):
    """While one request waits for a hung upstream's probe, another one is answered."""
    with SilentServer() as hung, KongSide() as warm, KongSide() as cold:
        good = config(pki, files, upstream.port)
        assert warm.run(Request(), [(plugin, good)]).proxied          # cache the good verdict
        results: list = []
        waiting = threading.Thread(target=lambda: results.append(
            cold.run(Request(), [(plugin, config(pki, files, hung.port, probe_timeout=1.5))])))
        waiting.start()
        try:
            hung.wait_for_connection()                              # the probe is under way
            served = warm.run(Request(), [(plugin, good)])
            still_waiting = waiting.is_alive()
        finally:
            waiting.join(10)
    assert served.proxied and still_waiting
    assert_refused(results[0], "PROBE_TIMEOUT")


def test_a_route_that_preserves_the_clients_host_is_refused(kong, plugin, upstream, pki, files):
    """preserve_host: Kong would send and verify the client's Host, so the client would pick the
    virtual host behind the address (upstream review). 502 UPSTREAM_HOST_CHANGED, nothing probed."""
    before = upstream.connection_count
    request = Request(route={"id": "00000000-0000-4000-8000-00000000a002", "name": "r",
                             "preserve_host": True})
    outcome = kong.run(request, [(plugin, config(pki, files, upstream.port))], guard=[UPSTREAM_IDENTITY])
    assert_refused(outcome, "UPSTREAM_HOST_CHANGED")
    assert upstream.connection_count == before
