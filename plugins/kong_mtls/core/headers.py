"""Every spelling of the headers we own.

Kong sets nginx's `underscores_in_headers on`: a client-sent `X_Consumer_ID` reaches the upstream
as readily as `X-Consumer-ID`, and CGI/WSGI-style upstreams (Django, Flask under many servers, PHP)
read both as the same variable. nginx matches header names without case but tells `-` from `_`, so
replacing `X-Consumer-ID` leaves `X_Consumer_ID` and `X-Consumer_ID` in place. Each header we set
or remove is therefore sent to `kong.service.request.set_headers` with every other spelling too,
as an empty list (which removes it), in the same single call.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Mapping
from typing import Any

# RFC 9110 field-name token.
_FIELD_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
#: A configured header name has 2**separators spellings: beyond this, it is no real header.
MAX_NAME_SEPARATORS = 8


def header_name_problem(name: str) -> str | None:
    """Why `name` cannot be a configured header name (set or removed in every spelling), or None."""
    if not _FIELD_NAME.fullmatch(name):
        return f"{name!r} is not a valid HTTP header name"
    if name.count("-") + name.count("_") > MAX_NAME_SEPARATORS:
        return f"{name!r} has more than {MAX_NAME_SEPARATORS} '-' or '_'"
    return None


@functools.lru_cache(maxsize=256)
def other_spellings(name: str) -> tuple[str, ...]:
    """`name` with each `-` or `_` written either way, `name` itself excluded."""
    parts = name.replace("_", "-").split("-")
    spelled = (parts[0] + "".join(sep + part for sep, part in zip(seps, parts[1:]))
               for seps in itertools.product("-_", repeat=len(parts) - 1))
    return tuple(s for s in spelled if s.lower() != name.lower())


def with_every_spelling(headers: Mapping[str, Any]) -> dict[str, Any]:
    """`headers` for one `set_headers` call, plus an empty list (remove) for every other spelling of
    each name. A spelling that is itself a key, in any case, keeps its own value: Kong applies the
    table in no set order, so one header name appears once."""
    changes = dict(_removals(tuple(headers)))
    changes.update(headers)
    return changes


@functools.lru_cache(maxsize=64)
def _removals(names: tuple[str, ...]) -> dict[str, Any]:
    """The removals for a set of names: a plugin sends the same names on every request. Callers
    copy it (its lists are shared, and never changed). A spelling that is one of the names, in any
    case, is not removed."""
    setting = {name.lower() for name in names}
    return {other: [] for name in names for other in other_spellings(name) if other.lower() not in setting}
