"""The `gateway` fixture: a real Kong running the example config, started once per runner module.

test_docker.py and test_local.py each name their runner (`RUNNER`) and, when it cannot run here,
skip the whole module with one line saying why (e.g. "docker runner: no Docker engine reachable
(...)").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.runners import Gateway


@contextlib.contextmanager
def _kong(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, suffix: str = "",
          **options: Any) -> Iterator[Gateway]:
    """A Kong of the module's runner, started with `options` and stopped after its tests."""
    runner = request.module.RUNNER
    gw = runner.start(tmp_path_factory.mktemp(f"kong-{runner.kind}{suffix}"), **options)
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def gateway(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with _kong(request, tmp_path_factory) as gw:
        yield gw


@pytest.fixture(scope="module")
def option_a(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A second Kong of the same runner, asking for client certificates with nginx's optional_no_ca."""
    with _kong(request, tmp_path_factory, "-option-a", option_a=True) as gw:
        yield gw


@pytest.fixture(scope="module")
def untrusted_lua_off(request: pytest.FixtureRequest,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A Kong of the same runner with `untrusted_lua = off` (no pre-/post-function code runs)."""
    with _kong(request, tmp_path_factory, "-untrusted-lua-off", settings={"untrusted_lua": "off"}) as gw:
        yield gw


@pytest.fixture(scope="module")
def two_processes(request: pytest.FixtureRequest,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A Kong of the same runner with two nginx workers, each plugin server run with `--processes 2`."""
    with _kong(request, tmp_path_factory, "-two-processes", settings={"nginx_worker_processes": "2"},
               server_args="--processes 2") as gw:
        yield gw


@pytest.fixture(scope="module")
def idle_instances(request: pytest.FixtureRequest,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A Kong of the same runner whose plugin servers drop instances idle for 2 s (logged at info)."""
    with _kong(request, tmp_path_factory, "-idle-instances", settings={"log_level": "info"},
               server_args="--instance-idle-after 2") as gw:
        yield gw


@pytest.fixture(scope="module")
def guard_fallback(request: pytest.FixtureRequest,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A Kong of the same runner without kong-mtls-guard loaded: each route of ours is guarded by a
    post-function (the fallback of docs/guard.md)."""
    with _kong(request, tmp_path_factory, "-guard-fallback", guard_fallback=True) as gw:
        yield gw
