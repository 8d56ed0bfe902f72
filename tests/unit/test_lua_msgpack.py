"""The harness encodes values as Kong's Lua side does (lua-MessagePack via mp_rpc.lua)."""

from __future__ import annotations

import msgpack
import pytest

from tests.harness.lua_msgpack import Binary, EmptyMap, as_lua, lua_args, pack


@pytest.mark.parametrize("value", [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32, 2**63, -1, -32, -33, -129,
                                   -(2**15) - 1, -(2**31) - 1, -(2**63), 1.5, None, True, False, "é",
                                   "x" * 40, "y" * 70000, [1, [2, {"a": "b"}]], {"k": [1, 2]}])
def test_values_round_trip_through_standard_msgpack(value):
    assert msgpack.unpackb(pack(value), raw=False, strict_map_key=False) == value


def test_integral_numbers_pack_as_integers_like_luajit():
    assert pack(3.0) == pack(3)


def test_lua_strings_are_str_even_with_invalid_utf8_and_raw_bodies_are_bin():
    encoded = pack(b"caf\xe9")
    assert encoded[0] == 0xA4  # fixstr
    assert msgpack.unpackb(encoded, raw=True) == b"caf\xe9"
    assert pack(Binary(b"\x00\x01"))[:2] == bytes((0xC4, 2))


def test_empty_tables_are_arrays_unless_kong_fixed_them_as_maps():
    assert pack({}) == pack([]) == bytes((0x90,))
    assert pack(EmptyMap()) == bytes((0x80,))


def test_nil_holes_end_lua_argument_lists():
    assert lua_args([None, {"id": "c"}]) == []
    assert lua_args([401, {"message": "x"}, None]) == [401, {"message": "x"}]
    assert as_lua({"a": None, "b": [1, None, 3]}) == {"b": [1]}
