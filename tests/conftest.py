"""Shared fixtures: the test PKI, real plugin-server processes, and Kong's side of the socket."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.kong_side import KongSide, PluginServerProcess
from tests.harness.pki import TestPKI


@pytest.fixture(scope="session")
def pki() -> TestPKI:
    return TestPKI()


@pytest.fixture(scope="session")
def plugin_servers() -> Iterator[dict[str, PluginServerProcess]]:
    servers: dict[str, PluginServerProcess] = {}
    yield servers
    for server in servers.values():
        server.close()


@pytest.fixture(scope="session")
def plugin_server(plugin_servers):
    """`plugin_server(name, module=None)`: a started plugin server, shared by the session."""

    def get(name: str, module: str | None = None) -> PluginServerProcess:
        server = plugin_servers.get(name)
        if server is None:
            server = plugin_servers[name] = PluginServerProcess(name, module).start()
        elif server.proc is None or server.proc.poll() is not None:
            server.start()
        return server

    return get


@pytest.fixture
def kong() -> Iterator[KongSide]:
    with KongSide() as side:
        yield side


@pytest.fixture(params=[False, True], ids=["guard-not-loaded", "guard-loaded"])
def kong_either(request) -> Iterator[KongSide]:
    """Kong's side without and with kong-mtls-guard loaded: with it, the guard's wrapper stands in
    front of each plugin that offers verdicts and applies the changes they leave in them."""
    with KongSide(verdict_wrapper=request.param) as side:
        yield side
