"""The Kong-side fail-closed guard and its model."""

from __future__ import annotations

import pytest

from kong_mtls.guard import GUARD_MESSAGE, GUARD_STATUS, lua_guard, missing_marks


def test_lua_guard_checks_every_listed_mark_and_answers_the_guard_status():
    code = lua_guard(["ip-allowlist", "api-key-auth"])
    assert 'local marks = { "kong_mtls.ip-allowlist", "kong_mtls.api-key-auth" }' in code
    assert f"kong.response.exit({GUARD_STATUS}, {{ message = \"{GUARD_MESSAGE}\" }})" in code
    assert code.count("return function()") == 1


@pytest.mark.parametrize("names", [[], ["key-auth"], ["client-cert-auth", "nope"]])
def test_lua_guard_refuses_unknown_plugins(names):
    with pytest.raises(ValueError):
        lua_guard(names)


def test_missing_marks_uses_lua_truthiness():
    shared = {"kong_mtls.ip-allowlist": {}, "kong_mtls.client-cert-auth": False,
              "kong_mtls.api-key-auth": 0}
    assert missing_marks(["ip-allowlist", "client-cert-auth", "api-key-auth", "upstream-identity"],
                         shared) == ["client-cert-auth", "upstream-identity"]
