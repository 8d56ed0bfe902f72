"""The scenarios against a Kong installed on this machine (`kong` on PATH or $KONG_BIN; 3.x, or 2.8
where the protocol allows), with the plugin servers started from this Python environment."""

from __future__ import annotations

import pytest

from tests.integration.runners import LocalRunner
from tests.integration.scenarios import (
    GuardFallbackScenarios,
    IdleInstancesScenarios,
    OptionAScenarios,
    ProcessesScenarios,
    Scenarios,
    UntrustedLuaOffScenarios,
)

RUNNER = LocalRunner
_reason = RUNNER.unavailable()
if _reason is not None:
    pytest.skip(_reason, allow_module_level=True)

pytestmark = pytest.mark.integration


class TestLocal(Scenarios):
    pass


class TestLocalOptionA(OptionAScenarios):
    pass


class TestLocalUntrustedLuaOff(UntrustedLuaOffScenarios):
    pass


class TestLocalProcesses(ProcessesScenarios):
    pass


class TestLocalIdleInstances(IdleInstancesScenarios):
    pass


class TestLocalGuardFallback(GuardFallbackScenarios):
    pass
