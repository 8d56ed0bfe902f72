"""kong_mtls.schema: one declaration for Kong and for our own config checks."""

from __future__ import annotations

import pytest

from kong_mtls import schema
from kong_mtls.schema import ConfigError, validate

FIELDS = [
    schema.string("mode", default="enforce", one_of=["enforce", "report_only"]),
    schema.integer("depth", default=4, between=(1, 16)),
    schema.boolean("strict", default=False),
    schema.strings("names", default=["apikey"], len_min=1),
    schema.strings("allow"),
    schema.records("credentials", [schema.string("id", required=True),
                                   schema.integer("expires_at"),
                                   schema.strings("cidrs", default=[])]),
    schema.string_map("labels"),
]


def test_defaults_fill_nulls_as_kong_sends_them():
    # Kong sends unset fields as JSON null and adds its own keys.
    config = validate(FIELDS, {"mode": None, "depth": None, "route_id": "r", "__seq__": 3})
    assert config == {"mode": "enforce", "depth": 4, "strict": False, "names": ["apikey"], "allow": None,
                      "credentials": None, "labels": None}


def test_defaults_are_copies():
    first = validate(FIELDS, {})
    first["names"].append("x")
    assert validate(FIELDS, {})["names"] == ["apikey"]


def test_records_in_arrays_get_defaults_and_checks():
    config = validate(FIELDS, {"credentials": [{"id": "a", "expires_at": 5.0}]})
    assert config["credentials"] == [{"id": "a", "expires_at": 5, "cidrs": []}]
    with pytest.raises(ConfigError, match=r"credentials\[2\]\.id: required field missing"):
        validate(FIELDS, {"credentials": [{"id": "a"}, {"expires_at": 1}]})


def test_empty_lua_table_encoded_as_object_is_an_empty_array():
    assert validate(FIELDS, {"allow": {}})["allow"] == []


@pytest.mark.parametrize(("config", "field", "problem"), [
    ({"mode": "loose"}, "mode", "expected one of: enforce, report_only"),
    ({"depth": 0}, "depth", "between 1 and 16"),
    ({"depth": 2.5}, "depth", "expected an integer"),
    ({"depth": True}, "depth", "expected an integer"),
    ({"strict": "yes"}, "strict", "expected a boolean"),
    ({"names": []}, "names", "length must be at least 1"),
    ({"names": "apikey"}, "names", "expected an array"),
    ({"names": ["a", None]}, "names[2]", "null element"),
    ({"names": ["a", 3]}, "names[2]", "expected a string"),
    ({"labels": {"a": 1}}, "labels.a", "expected a string"),
    ({"credentials": ["x"]}, "credentials[1]", "expected a record"),
])
def test_invalid_values_name_the_field(config, field, problem):
    with pytest.raises(ConfigError) as info:
        validate(FIELDS, config)
    assert info.value.field == field
    assert problem in str(info.value)


def test_builders_emit_kong_field_format():
    assert schema.strings("names", default=["a"], one_of=["a", "b"]) == {
        "names": {"type": "array", "elements": {"type": "string", "one_of": ["a", "b"]}, "default": ["a"]}}
    assert schema.integer("n", between=(1, 2)) == {"n": {"type": "integer", "between": [1, 2]}}
