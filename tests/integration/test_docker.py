"""The scenarios against the image built from docker/Dockerfile, started as docker/compose.yaml
describes, through the Docker SDK ($KONG_MTLS_IT_IMAGE: use a prebuilt image instead)."""

from __future__ import annotations

import pytest

from tests.integration.runners import DockerRunner
from tests.integration.scenarios import Scenarios

RUNNER = DockerRunner
_reason = RUNNER.unavailable()
if _reason is not None:
    pytest.skip(_reason, allow_module_level=True)

pytestmark = pytest.mark.integration


class TestDocker(Scenarios):
    pass
