"""MessagePack as Kong's Lua side writes and reads it.

Kong packs with lua-MessagePack (Kong/kong `kong/runloop/plugin_servers/rpc/mp_rpc.lua`):
* a Lua string is always a MessagePack *str*, whatever bytes it holds (a header with invalid UTF-8
  stays a str), except the raw bodies `mp_rpc.lua` wraps with `fix_raw`, which are *bin*;
* a Lua table is an array when its keys are 1..n, otherwise a map; an EMPTY table packs as an empty
  array unless `mp_rpc.lua` substituted `mp_empty_map` (header/query maps, `fix_mmap`);
* integral numbers pack as integers.

And on the way back, a MessagePack array holding nil is a Lua table with a hole: `unpack(args)`
then stops at the first nil, and a map entry whose value is nil does not exist.
"""

from __future__ import annotations

import struct
from typing import Any


class Binary(bytes):
    """A value Kong packs as MessagePack bin (`fix_raw`)."""


class EmptyMap(dict):
    """An empty table Kong packs as a map (`mp_empty_map`)."""


def pack(value: Any) -> bytes:
    out = bytearray()
    _pack(value, out)
    return bytes(out)


def _pack(value: Any, out: bytearray) -> None:
    if value is None:
        out.append(0xC0)
    elif value is True:
        out.append(0xC3)
    elif value is False:
        out.append(0xC2)
    elif isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        _pack_int(int(value), out)
    elif isinstance(value, int):
        _pack_int(value, out)
    elif isinstance(value, float):
        out.append(0xCB)
        out += struct.pack(">d", value)
    elif isinstance(value, Binary):
        _pack_header(len(value), out, None, 0xC4, 0xC5, 0xC6)
        out += value
    elif isinstance(value, (str, bytes)):
        data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
        # lua-MessagePack's default 'string_compat' mode: fixstr, str16, str32 (no str8).
        _pack_header(len(data), out, 0xA0, None, 0xDA, 0xDB)
        out += data
    elif isinstance(value, dict) and (value or isinstance(value, EmptyMap)):
        _pack_header(len(value), out, 0x80, None, 0xDE, 0xDF, fixmax=16)
        for k, v in value.items():
            _pack(k, out)
            _pack(v, out)
    elif isinstance(value, (list, tuple, dict)):
        items = [] if isinstance(value, dict) else value
        _pack_header(len(items), out, 0x90, None, 0xDC, 0xDD, fixmax=16)
        for item in items:
            _pack(item, out)
    else:
        raise TypeError(f"cannot pack {type(value).__name__} as a Lua value")


def _pack_header(n: int, out: bytearray, fix: int | None, b8: int | None, b16: int, b32: int,
                 fixmax: int = 32) -> None:
    if fix is not None and n < fixmax:
        out.append(fix | n)
    elif b8 is not None and n < 256:
        out += bytes((b8, n))
    elif n < 65536:
        out.append(b16)
        out += struct.pack(">H", n)
    else:
        out.append(b32)
        out += struct.pack(">I", n)


def _pack_int(n: int, out: bytearray) -> None:
    if 0 <= n < 128:
        out.append(n)
    elif -32 <= n < 0:
        out += struct.pack(">b", n)
    elif n >= 0:
        for code, fmt, limit in ((0xCC, ">B", 2**8), (0xCD, ">H", 2**16), (0xCE, ">I", 2**32),
                                 (0xCF, ">Q", 2**64)):
            if n < limit:
                out.append(code)
                out += struct.pack(fmt, n)
                return
        raise OverflowError(n)
    else:
        for code, fmt, limit in ((0xD0, ">b", 2**7), (0xD1, ">h", 2**15), (0xD2, ">i", 2**31),
                                 (0xD3, ">q", 2**63)):
            if -limit <= n:
                out.append(code)
                out += struct.pack(fmt, n)
                return
        raise OverflowError(n)


def as_lua(value: Any) -> Any:
    """What a value decoded from the plugin server becomes once it is a Lua value."""
    if isinstance(value, dict):
        return {k: as_lua(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [as_lua(v) for v in lua_args(value)]
    return value


def lua_args(values: list) -> list:
    """`unpack(t)` of a table decoded from an array: stops at the first nil (the border LuaJIT
    finds for a table built by `t[i] = v`, i = 1..n, when some v is nil)."""
    out = []
    for v in values:
        if v is None:
            break
        out.append(v)
    return out
