"""The Cloudflare origin lock of kong/cloudflare-origin-lock.yml, through the real plugin servers.

The example's three plugin configs are used as shipped (rendered with a dev PKI as the image does),
except that the dev PKI's stand-in for Cloudflare's Authenticated Origin Pulls CA replaces the real
one (no test can hold a certificate Cloudflare issued). Peers are addresses from Cloudflare's
published ranges.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from kong_mtls.constants import API_KEY_AUTH, CLIENT_CERT_AUTH, IP_ALLOWLIST, shared_mark
from kong_mtls.devpki import Issued
from kong_mtls.guard import GUARD_STATUS
from tests.harness.kong_side import Consumer, KongSide, PluginServerProcess, Request
from tests.harness.tls import capture_client_chain
from tests.integration.support import TEMPLATES_DIR, find_route, load_dev_config, route_plugin

CLOUDFLARE_PEER = "162.158.90.14"
VISITOR = "198.51.100.23"
GUARDED = [IP_ALLOWLIST, CLIENT_CERT_AUTH, API_KEY_AUTH]


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> dict:
    pki = tmp_path_factory.mktemp("origin-lock-pki")
    (rendered,) = [p for p in load_dev_config().prepare(pki, [str(TEMPLATES_DIR)])
                   if p.name == "cloudflare-origin-lock.yml"]
    route = find_route(yaml.safe_load(rendered.read_text()), "orders")
    configs = {name: copy.deepcopy(route_plugin(route, name)["config"]) for name in GUARDED}
    aop_ca = (pki / "aop" / "ca.pem").read_text()
    assert configs[CLIENT_CERT_AUTH].pop("ca_presets") == ["cloudflare-origin-pull"]
    configs[CLIENT_CERT_AUTH]["ca_certificates"] = [aop_ca]
    key = (pki / "api-keys" / "ak_alice_dev.key").read_text().strip()
    aop_client = capture_client_chain(_issued(pki, "aop/client"), _issued(pki, "kong/server"))
    other_client = capture_client_chain(_issued(pki, "clients/alice"), _issued(pki, "kong/server"))
    return {"configs": configs, "key": key, "aop_chain": aop_client, "other_chain": other_client}


def _issued(pki: Path, stem: str) -> Issued:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    certs = x509.load_pem_x509_certificates((pki / f"{stem}.pem").read_bytes())
    key = load_pem_private_key((pki / f"{stem}.key").read_bytes(), None)
    return Issued(cert=certs[0], key=key, intermediates=tuple(certs[1:]))


@pytest.fixture(scope="module")
def servers(plugin_server) -> dict[str, PluginServerProcess]:
    return {name: plugin_server(name) for name in GUARDED}


def _run(kong: KongSide, example: dict, servers: dict, *, peer: str = CLOUDFLARE_PEER,
         chain: str | None = "aop", key: str | None = "valid", headers: dict | None = None):
    sent = {"CF-Connecting-IP": VISITOR, **(headers or {})}
    if key is not None:
        sent["apikey"] = example["key"] if key == "valid" else key
    pem = example[f"{chain}_chain"] if chain else None
    return kong.run(Request(client_ip=peer, client_chain_pem=pem, headers=sent),
                    [(servers[name], example["configs"][name]) for name in GUARDED],
                    consumers=[_ALICE], guard=GUARDED)


_ALICE = Consumer(id="9d3f0c6e-1b2a-4c5d-8e7f-0a1b2c3d4e5f", username="alice")


def test_cloudflare_with_origin_pull_cert_and_user_key_reaches_the_upstream(kong, example, servers):
    outcome = _run(kong, example, servers, headers={"X-Real-Client-IP": "6.6.6.6"})
    assert outcome.proxied, outcome.log_text()
    # Only now is CF-Connecting-IP the client address: published upstream (the spoofed copy replaced)
    # and to the plugins after ip-allowlist.
    assert outcome.upstream_headers["x-real-client-ip"] == [VISITOR]
    assert outcome.ctx_shared[shared_mark(IP_ALLOWLIST)]["client_ip"] == VISITOR
    assert outcome.ctx_shared[shared_mark(CLIENT_CERT_AUTH)]["verified"] is True
    assert outcome.upstream_headers["x-consumer-username"] == ["alice"]
    assert "apikey" not in outcome.upstream_headers  # hide_credentials


def test_same_request_from_outside_cloudflare_is_refused_and_the_header_never_trusted(kong, example, servers):
    outcome = _run(kong, example, servers, peer=VISITOR)
    assert outcome.exit.status == 403 and outcome.exit.source == IP_ALLOWLIST
    assert shared_mark(IP_ALLOWLIST) not in outcome.ctx_shared


@pytest.mark.parametrize("chain", [None, "other"])
def test_cloudflare_peer_without_the_origin_pull_certificate_is_refused(kong, example, servers, chain):
    outcome = _run(kong, example, servers, chain=chain)
    assert outcome.exit.status == 401 and outcome.exit.source == CLIENT_CERT_AUTH


@pytest.mark.parametrize("key", [None, "ak_alice_dev.wrong"])
def test_end_user_without_a_valid_key_is_refused(kong, example, servers, key):
    outcome = _run(kong, example, servers, key=key)
    assert outcome.exit.status == 401 and outcome.exit.source == API_KEY_AUTH


def test_each_plugin_logs_under_its_own_name_in_one_kong_worker(kong, example, servers):
    """Kong caches a PDK method per worker by its name, with the plugin namespace of the first
    caller (mp_rpc.lua get_field): with one shared `kong.log.warn`, every refusal below would be
    tagged [client-cert-auth]."""
    refused_by = {}
    for name, kwargs in ((CLIENT_CERT_AUTH, {"chain": None}), (API_KEY_AUTH, {"key": None}),
                         (IP_ALLOWLIST, {"peer": VISITOR})):
        outcome = _run(kong, example, servers, **kwargs)
        assert outcome.exit.source == name
        (line,) = [m for level, m in outcome.logs if level == "warn" and " refused " in m]
        refused_by[name] = line
    for name, line in refused_by.items():
        assert line.startswith(f"[{name}] [kong-mtls] {name} refused "), line


def test_a_dead_plugin_server_is_caught_by_the_guard(example, servers):
    dead = PluginServerProcess(API_KEY_AUTH).start()
    try:
        with KongSide(rpc_timeout=1.0) as kong:
            assert _run(kong, example, {**servers, API_KEY_AUTH: dead}).proxied
            dead.kill()  # after Kong started its instance: a failing StartInstance would be a 500
            outcome = _run(kong, example, {**servers, API_KEY_AUTH: dead})
        assert outcome.rpc_errors, "Kong met a dead plugin server and carried on (fail open)"
        assert outcome.exit.status == GUARD_STATUS and outcome.exit.source == "guard"
    finally:
        dead.close()


@pytest.fixture
def kong(kong_either):
    """Each test here runs in a Kong without and with kong-mtls-guard loaded (tests/conftest.py)."""
    return kong_either
