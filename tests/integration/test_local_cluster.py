"""Beyond one DB-less node, on a Kong installed here: Kong on PostgreSQL (traditional mode, config
changed through the Admin API) and Kong's hybrid mode (a control plane on PostgreSQL, one data plane
on loopback). PostgreSQL is Debian's server, started and stopped by this module.

What each node needs (docs/deployment.md, "More than one node"): a traditional node and a data
plane run the plugin servers; a control plane only queries their schemas (`query_cmd`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kong_mtls.constants import VERDICT_APPLY_FLAG
from kong_mtls.core.api_keys import MESSAGE_NO_KEY
from kong_mtls.guard import GUARD_STATUS, guard_plugin
from kong_mtls.lint.sources import ENTITY_ENDPOINTS, AdminAPI, read_admin
from tests.integration.runners import Gateway, LocalRunner, PostgresServer, eventually
from tests.integration.support import lint_report, run_lint

RUNNER = LocalRunner
_reason = RUNNER.unavailable() or PostgresServer.unavailable()
if _reason is not None:
    pytest.skip(_reason, allow_module_level=True)

pytestmark = pytest.mark.integration

#: What a request without a key may get while a data plane starts: no config yet (404), Kong's 500
#: (its plugin-server socket does not exist yet: "no such file or directory" when starting the
#: instance), the guard's 503 (the plugin server failed mid-event: Kong proxies without it), or the
#: plugin's 401. Never the upstream.
STARTING = (404, 401, 500, GUARD_STATUS)


def _stopped_after(resource: Any) -> Iterator[Any]:
    """Yield `resource` to the module's tests, then stop it."""
    try:
        yield resource
    finally:
        resource.stop()


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    yield from _stopped_after(PostgresServer().start())


@pytest.fixture(scope="module")
def traditional(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    yield from _stopped_after(RUNNER.start(tmp_path_factory.mktemp("kong-db"),
                                           database=postgres.create_database("kong_db")))


@pytest.fixture(scope="module")
def control_plane(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    yield from _stopped_after(RUNNER.start(tmp_path_factory.mktemp("kong-cp"), role="control_plane",
                                           database=postgres.create_database("kong_cp")))


def nonce() -> dict[str, str]:
    return {"X-Test-Nonce": uuid.uuid4().hex}


def admin_ok(gateway: Gateway, method: str, path: str, payload: dict | None = None) -> dict:
    answer = gateway.admin_request(method, path, payload)
    assert 200 <= answer.status < 300, (method, path, answer.status, answer.body[:1000])
    return answer.json() if answer.body else {}


def route_plugin_id(gateway: Gateway, route: str, name: str) -> str:
    plugins = admin_ok(gateway, "GET", f"/routes/{route}/plugins")["data"]
    return next(p["id"] for p in plugins if p["name"] == name)


def test_postgres_node_serves_the_example(traditional: Gateway) -> None:
    alice = traditional.https("/mtls", cert="clients/alice")
    assert alice.status == 200 and alice.upstream_headers["x-consumer-username"] == "alice"
    assert traditional.https("/mtls").status == 401
    assert traditional.https("/key", headers={"apikey": traditional.api_key("ak_alice_dev")}).status == 200


def test_postgres_node_plugins_enabled_changed_and_removed_via_the_admin_api(traditional: Gateway) -> None:
    key = traditional.api_key("ak_alice_dev")
    key_plugin = route_plugin_id(traditional, "key", "api-key-auth")
    assert traditional.https("/key", headers={"apikey": key}).status == 200
    # The key the guard plugin's wrapper adds to the config Kong hands the plugin server stays in
    # that worker's config table: the Admin API neither shows it nor takes it from a config author.
    stored = admin_ok(traditional, "GET", f"/plugins/{key_plugin}")["config"]
    assert VERDICT_APPLY_FLAG not in stored
    flagged = traditional.admin_request("PATCH", f"/plugins/{key_plugin}",
                                        {"config": {**stored, VERDICT_APPLY_FLAG: True}})
    assert flagged.status == 400 and b"unknown field" in flagged.body, (flagged.status, flagged.body[:500])
    credentials = stored["credentials"]
    assert traditional.https("/public").status == 200
    plugin = admin_ok(traditional, "POST", "/routes/public/plugins",
                      {"name": "api-key-auth", "config": {"credentials": credentials}})
    guard = admin_ok(traditional, "POST", "/routes/public/plugins", guard_plugin(["api-key-auth"]))
    try:
        eventually(lambda: traditional.https("/public").status == 401, 30,
                   "api-key-auth enabled through the Admin API never applied", traditional.error_log)
        assert traditional.https("/public", headers={"apikey": key}).status == 200

        admin_ok(traditional, "PATCH", f"/plugins/{plugin['id']}",
                 {"config": {"credentials": credentials, "key_names": ["x-api-key"]}})
        eventually(lambda: traditional.https("/public", headers={"x-api-key": key}).status == 200, 30,
                   "the changed key_names never applied", traditional.error_log)
        refused = {"apikey": key, **nonce()}
        assert traditional.https("/public", headers=refused).status == 401
    finally:
        for entity in (plugin, guard):
            traditional.admin_request("DELETE", f"/plugins/{entity['id']}")
    eventually(lambda: traditional.https("/public").status == 200, 30,
               "removing the plugin never applied", traditional.error_log)
    assert not traditional.seen_upstream(refused["X-Test-Nonce"])  # /public is open again to ask


def test_postgres_node_lint_reads_every_entity_endpoint(traditional: Gateway, tmp_path: Path) -> None:
    """`kong-mtls lint --admin` on a Kong with a database (`GET /config` refused: every page of the
    entity endpoints) reports exactly what it reports for the declarative config it was filled from."""
    declared = tmp_path / "kong.json"
    declared.write_text(json.dumps(traditional.config))
    code, from_file = run_lint(str(declared))
    admin_code, from_admin = run_lint("--admin", f"http://{traditional.admin[0]}:{traditional.admin[1]}")
    assert lint_report(from_admin) == lint_report(from_file)
    assert (admin_code, code, from_admin["findings"]) == (0, 0, [])
    # Kong's own pagination (`next`), a page of 2 entities at a time, reads the same entities.
    api = AdminAPI(f"http://{traditional.admin[0]}:{traditional.admin[1]}")
    whole, paged = read_admin(api), read_admin(api, page_size=2)
    assert len(paged["routes"]) > 2
    for endpoint in ENTITY_ENDPOINTS:
        assert sorted(e["id"] for e in paged[endpoint]) == sorted(e["id"] for e in whole[endpoint]), endpoint


def test_hybrid_data_plane_enforces_the_control_planes_plugins_from_its_first_request(
        control_plane: Gateway, tmp_path_factory: pytest.TempPathFactory) -> None:
    data_plane = RUNNER.start(tmp_path_factory.mktemp("kong-dp"), control_plane=control_plane)
    try:
        # From the moment it listens: no request without a key or certificate reaches the upstream.
        # A handshake may also fail outright while the global client-cert-request's server starts
        # (nginx aborts it with a TLS internal-error alert): closed, and retried here.
        seen: list[int] = []
        answered: list[str] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            for path in ("/key", "/mtls"):
                headers = nonce()
                try:
                    answer = data_plane.https(path, headers=headers)
                except OSError:
                    continue  # not listening yet, or the handshake was aborted
                seen.append(answer.status)
                assert answer.status in STARTING, (path, seen)
                if answer.status != 404:
                    answered.append(headers["X-Test-Nonce"])
            if seen[-2:] == [401, 401]:
                break
        assert seen[-2:] == [401, 401], f"the data plane never enforced the plugins: {seen}"
        assert not [n for n in answered if data_plane.seen_upstream(n)], seen

        key = data_plane.api_key("ak_alice_dev")
        data_plane.wait_ready(timeout=60)
        ok = data_plane.https("/mtls", cert="clients/alice")
        assert ok.status == 200 and ok.upstream_headers["x-consumer-username"] == "alice"

        # A change on the control plane reaches the data plane.
        plugin_id = route_plugin_id(control_plane, "key", "api-key-auth")
        credentials = admin_ok(control_plane, "GET", f"/plugins/{plugin_id}")["config"]["credentials"]
        changed = time.monotonic()
        admin_ok(control_plane, "PATCH", f"/plugins/{plugin_id}",
                 {"config": {"credentials": credentials, "key_names": ["x-api-key"]}})
        eventually(lambda: data_plane.https("/key", headers={"x-api-key": key}).status == 200, 60,
                   "the control plane's change never reached the data plane", data_plane.error_log)
        print(f"control plane -> data plane: {time.monotonic() - changed:.1f} s")
        answer = data_plane.https("/key", headers={"apikey": key})
        assert (answer.status, answer.json()) == (401, {"message": MESSAGE_NO_KEY})
    finally:
        data_plane.stop()
