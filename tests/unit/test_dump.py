"""Each plugin entry point's `--dump` is what Kong's query_cmd expects."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from kong_mtls.constants import PLUGIN_VERSION, PRIORITIES
from tests.harness.kong_side import PLUGIN_MODULES, ROOT

# Field types Kong's metaschema accepts for plugin config fields (kong/db/schema/metaschema.lua).
KONG_TYPES = {"string", "number", "integer", "boolean", "array", "set", "map", "record", "foreign"}
KONG_PHASES = {"certificate", "rewrite", "access", "response", "preread", "log"}
PYTHON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list,
                "set": list, "map": dict, "record": dict}


def _check_field(where: str, spec: dict) -> None:
    assert spec["type"] in KONG_TYPES, f"{where}: type {spec['type']!r}"
    if spec["type"] in ("array", "set"):
        assert "elements" in spec, f"{where}: arrays need elements"
        _check_field(f"{where}[]", spec["elements"])
    if spec["type"] == "map":
        _check_field(f"{where}.keys", spec["keys"])
        _check_field(f"{where}.values", spec["values"])
    if spec["type"] == "record":
        for item in spec["fields"]:
            ((name, sub),) = item.items()
            _check_field(f"{where}.{name}", sub)
    if "default" in spec:
        assert isinstance(spec["default"], PYTHON_TYPES[spec["type"]]), f"{where}: default type"
    if "one_of" in spec:
        assert isinstance(spec["one_of"], list) and spec["one_of"]
        if "default" in spec:
            assert spec["default"] in spec["one_of"], f"{where}: default not in one_of"


@pytest.mark.parametrize("name", sorted(PLUGIN_MODULES))
def test_dump_satisfies_kong(name):
    out = subprocess.run([sys.executable, "-m", PLUGIN_MODULES[name], "--dump"], capture_output=True,
                         text=True, timeout=60, check=True, cwd=ROOT)
    infos = json.loads(out.stdout)
    assert isinstance(infos, list) and len(infos) == 1
    info = infos[0]
    assert info["Name"] == name
    assert re.fullmatch(r"\d+\.\d+\.\d+", info["Version"]) and info["Version"] == PLUGIN_VERSION
    assert isinstance(info["Priority"], int) and info["Priority"] == PRIORITIES[name]
    assert info["Phases"] and set(info["Phases"]) <= KONG_PHASES
    assert info["Schema"]["name"] == name
    (config,) = [f["config"] for f in info["Schema"]["fields"] if "config" in f]
    assert config["type"] == "record"
    for item in config["fields"]:
        ((field, spec),) = item.items()
        _check_field(field, spec)
