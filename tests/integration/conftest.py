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


def _another_kong(name: str, doc: str, **options: Any) -> Any:
    """A module-scoped fixture `name`: a Kong of the same runner as `gateway`, started with `options`."""

    def fixture(request: pytest.FixtureRequest,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
        with _kong(request, tmp_path_factory, "-" + name.replace("_", "-"), **options) as gw:
            yield gw

    fixture.__doc__ = doc
    return pytest.fixture(scope="module", name=name)(fixture)


option_a = _another_kong(
    "option_a", "A second Kong asking for client certificates with nginx's optional_no_ca.", option_a=True)
untrusted_lua_off = _another_kong(
    "untrusted_lua_off", "A Kong with `untrusted_lua = off` (no pre-/post-function code runs).",
    settings={"untrusted_lua": "off"})
two_processes = _another_kong(
    "two_processes", "A Kong with two nginx workers, each plugin server run with `--processes 2`.",
    settings={"nginx_worker_processes": "2"}, server_args="--processes 2")
idle_instances = _another_kong(
    "idle_instances", "A Kong whose plugin servers drop instances idle for 2 s (logged at info).",
    settings={"log_level": "info"}, server_args="--instance-idle-after 2")
guard_fallback = _another_kong(
    "guard_fallback", "A Kong without kong-mtls-guard loaded: each route of ours is guarded by a "
    "post-function (the fallback of docs/guard.md).", guard_fallback=True)
