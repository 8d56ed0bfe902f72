"""The `gateway` fixture: a real Kong running the example config, started once per runner module.

test_docker.py and test_local.py each name their runner (`RUNNER`) and, when it cannot run here,
skip the whole module with one line saying why (e.g. "docker runner: no Docker engine reachable
(...)").
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.runners import Gateway


@pytest.fixture(scope="module")
def gateway(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    runner = request.module.RUNNER
    gw = runner.start(tmp_path_factory.mktemp(f"kong-{runner.kind}"))
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def option_a(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A second Kong of the same runner, asking for client certificates with nginx's optional_no_ca."""
    runner = request.module.RUNNER
    gw = runner.start(tmp_path_factory.mktemp(f"kong-{runner.kind}-option-a"), option_a=True)
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def untrusted_lua_off(request: pytest.FixtureRequest,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A Kong of the same runner with `untrusted_lua = off` (no pre-/post-function code runs)."""
    runner = request.module.RUNNER
    gw = runner.start(tmp_path_factory.mktemp(f"kong-{runner.kind}-untrusted-lua-off"),
                      settings={"untrusted_lua": "off"})
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def two_processes(request: pytest.FixtureRequest,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A Kong of the same runner with two nginx workers, each plugin server run with `--processes 2`."""
    runner = request.module.RUNNER
    gw = runner.start(tmp_path_factory.mktemp(f"kong-{runner.kind}-two-processes"),
                      settings={"nginx_worker_processes": "2"}, server_args="--processes 2")
    try:
        yield gw
    finally:
        gw.stop()
