"""The floor server of the real-Kong bench answers Kong's RPCs as the bare plugin's server does."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.real_kong import FLOOR_SCRIPT
from bench.server import Pool, event


@pytest.fixture
def floor_socket(tmp_path: Path):
    process = subprocess.Popen([sys.executable, str(FLOOR_SCRIPT), "-p", str(tmp_path)])
    path = tmp_path / "floor.sock"
    try:
        deadline = time.monotonic() + 20
        while not path.exists():
            assert process.poll() is None and time.monotonic() < deadline, "floor server did not start"
            time.sleep(0.05)
        yield str(path)
    finally:
        process.kill()
        process.wait()


def test_each_event_makes_its_instances_number_of_calls_across_pooled_connections(floor_socket) -> None:
    pool = Pool(floor_socket, 3)  # Steps arrive on other connections than their HandleEvent
    try:
        started = {calls: pool.call("plugin.StartInstance", {"Name": "floor", "Config": json.dumps(
            {"calls": calls, "__seq__": 1})})["Id"] for calls in (1, 4)}
        assert [event(pool, started[1]), event(pool, started[4]), event(pool, started[1])] == [1, 4, 1]
        with pytest.raises(RuntimeError, match="floor server: KeyError"):
            pool.call("plugin.HandleEvent", {"InstanceId": 999, "EventName": "access"})
    finally:
        pool.close()


def test_dump_describes_the_bare_plugins_schema_under_the_floors_name() -> None:
    done = subprocess.run([sys.executable, str(FLOOR_SCRIPT), "--dump"], capture_output=True, text=True,
                          timeout=60, check=True)
    (info,) = json.loads(done.stdout)
    assert (info["Name"], info["Phases"]) == ("floor", ["access"])
    assert info["Schema"]["fields"][0]["config"]["fields"] == [
        {"calls": {"type": "integer", "default": 1, "between": [1, 64]}}]
