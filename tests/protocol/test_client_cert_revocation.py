"""client-cert-auth revocation through the real plugin server, against CRL and OCSP endpoints on
loopback: the checks run inside the gevent plugin server, off its event loop."""

from __future__ import annotations

import functools
import threading

import pytest
from cryptography.hazmat.primitives import serialization

from kong_mtls.constants import CLIENT_CERT_AUTH
from kong_mtls.core.chain import MESSAGE_FAILED_VERIFICATION
from tests.harness.kong_side import KongSide, Request
from tests.harness.revocation_servers import RevocationServer
from tests.harness.tls import capture_client_chain


@pytest.fixture(scope="module")
def server(plugin_server):
    return plugin_server(CLIENT_CERT_AUTH)


@pytest.fixture
def ca(pki):
    # A fresh issuing CA per test: revocation results are cached per issuer and serial.
    return pki.root.intermediate("revocation test CA")


@functools.lru_cache(maxsize=1)
def _root_crl(pki) -> str:
    """One CRL for the session: a new one would be a new config, so a new plugin instance."""
    return pki.root.crl().public_bytes(serialization.Encoding.PEM).decode()


def _config(pki, mode: str) -> dict:
    """The root's own CRL is configured: its issuing CAs are checked too (and revoked by nobody)."""
    root_crl = [_root_crl(pki)] if mode != "SKIP" else None
    return {"ca_certificates": [pki.root.cert_pem], "revocation_check_mode": mode,
            "skip_consumer_lookup": True, "http_timeout": 1000, "crls": root_crl,
            "revocation_allow_private_addresses": mode != "SKIP"}  # the responders are on loopback


def _run(kong, server, pki, leaf, mode):
    chain = capture_client_chain(leaf, pki.root.server(["kong.test"]))
    return kong.run(Request(client_chain_pem=chain), [(server, _config(pki, mode))])


@pytest.mark.parametrize("mode", ["IGNORE_CA_ERROR", "STRICT"])
def test_revoked_by_fetched_crl(kong, server, pki, ca, mode):
    with RevocationServer(ca) as endpoints:
        leaf = endpoints.client("revoked-by-crl", ocsp_url=False)
        ca.revoke(leaf.cert)
        endpoints.refresh_crl()
        outcome = _run(kong, server, pki, leaf, mode)
        assert outcome.exit.status == 401 and outcome.exit.body == {"message": MESSAGE_FAILED_VERIFICATION}
        assert outcome.client_verify == "FAILED:REVOKED"
        assert endpoints.hits["crl"] == 1


@pytest.mark.parametrize("mode", ["IGNORE_CA_ERROR", "STRICT"])
def test_revoked_by_ocsp(kong, server, pki, ca, mode):
    with RevocationServer(ca) as endpoints:
        leaf = endpoints.client("revoked-by-ocsp", crl_url=False)
        ca.revoke(leaf.cert)
        assert _run(kong, server, pki, leaf, mode).client_verify == "FAILED:REVOKED"
        assert endpoints.hits["ocsp"] == 1


def test_good_answer_is_cached(kong, server, pki, ca):
    with RevocationServer(ca) as endpoints:
        leaf = endpoints.client("good", crl_url=False)
        for _ in range(3):
            assert _run(kong, server, pki, leaf, "STRICT").proxied
        assert endpoints.hits["ocsp"] == 1


@pytest.mark.parametrize(("mode", "proxied"), [("SKIP", True), ("IGNORE_CA_ERROR", True), ("STRICT", False)])
def test_unreachable_responder(kong, server, pki, ca, mode, proxied):
    endpoints = RevocationServer(ca).up()
    leaf = endpoints.client("unreachable")
    ca.revoke(leaf.cert)  # revoked, but nobody can say so
    endpoints.down()
    outcome = _run(kong, server, pki, leaf, mode)
    assert outcome.proxied is proxied
    if not proxied:
        assert outcome.client_verify == "FAILED:REVOCATION_UNKNOWN"


def test_hung_responder_does_not_stall_other_requests(server, pki, ca):
    """While one request waits on a responder that does not answer, others are served."""
    with RevocationServer(ca) as endpoints:
        endpoints.ocsp_behaviour = endpoints.crl_behaviour = "hang"
        slow_leaf = endpoints.client("slow")
        slow_chain = capture_client_chain(slow_leaf, pki.root.server(["kong.test"]))
        fast_chain = capture_client_chain(pki.alice, pki.root.server(["kong.test"]))
        results = {}

        def slow() -> None:
            with KongSide() as kong:
                results["slow"] = kong.run(Request(client_chain_pem=slow_chain),
                                           [(server, _config(pki, "STRICT"))])

        thread = threading.Thread(target=slow)
        thread.start()
        try:
            with KongSide() as kong:
                while endpoints.hits["ocsp"] + endpoints.hits["crl"] == 0:
                    threading.Event().wait(0.01)
                fast = kong.run(Request(client_chain_pem=fast_chain), [(server, _config(pki, "SKIP"))])
                assert fast.proxied
                assert "slow" not in results, "the fast request was answered while the slow one waited"
        finally:
            endpoints.release.set()
            thread.join(30)
        # Released, the responder answers "good": the slow request completes and passes.
        assert results["slow"].proxied


@pytest.fixture
def kong(kong_either):
    """Each test here runs in a Kong without and with kong-mtls-guard loaded (tests/conftest.py)."""
    return kong_either
