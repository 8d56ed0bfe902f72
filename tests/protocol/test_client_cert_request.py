"""client-cert-request: the global certificate-phase plugin (option B of requesting certificates)."""

from __future__ import annotations

import pytest

from kong_mtls.constants import CLIENT_CERT_AUTH, CLIENT_CERT_REQUEST
from tests.harness.kong_side import Request
from tests.harness.tls import capture_client_chain

REQUEST = "kong.client.tls.request_client_certificate"
NO_REUSE = "kong.client.tls.disable_session_reuse"


@pytest.fixture(scope="module")
def server(plugin_server):
    return plugin_server(CLIENT_CERT_REQUEST)


def test_asks_for_a_certificate_and_disables_session_reuse(kong, server):
    outcome = kong.run(Request(), [(server, {})], phase="certificate")
    assert outcome.pdk_calls == [REQUEST, NO_REUSE]
    assert outcome.handshake == {"request_client_certificate": True, "disable_session_reuse": True}
    assert outcome.exit is None and not outcome.rpc_errors


def test_session_reuse_can_stay_on(kong, server):
    outcome = kong.run(Request(), [(server, {"disable_session_reuse": False})], phase="certificate")
    assert outcome.pdk_calls == [REQUEST]


def test_has_only_the_certificate_phase(server):
    assert server.dump()[0]["Phases"] == ["certificate"]


def test_expired_certificate_becomes_the_plugins_401(kong, server, plugin_server, pki):
    """Under option B nginx verifies nothing: client-cert-auth refuses what nginx would have
    answered with its own 400 page under optional_no_ca."""
    kong.run(Request(), [(server, {})], phase="certificate")
    chain = capture_client_chain(pki.expired(), pki.root.server(["kong.test"]))
    outcome = kong.run(Request(client_chain_pem=chain),
                       [(plugin_server(CLIENT_CERT_AUTH), {"ca_certificates": [pki.root.cert_pem],
                                                           "revocation_check_mode": "SKIP"})])
    assert outcome.exit.status == 401 and outcome.client_verify == "FAILED:EXPIRED"
