"""The Kong-side fail-closed guard and its model."""

from __future__ import annotations

import json

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


# -- `kong-mtls guard` -------------------------------------------------------------------------------

def _guard_command(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    from kong_mtls.cli import main

    assert main(["guard", *args]) == 0
    return capsys.readouterr().out


def test_guard_command_prints_the_plugin_entry_by_default(capsys):
    import yaml

    assert yaml.safe_load(_guard_command(capsys)) == [{"name": "kong-mtls-guard"}]          # auto mode
    printed = yaml.safe_load(_guard_command(capsys, "client-cert-auth", "api-key-auth"))
    assert printed == [{"name": "kong-mtls-guard",
                        "config": {"require": ["client-cert-auth", "api-key-auth"]}}]
    assert json.loads(_guard_command(capsys, "ip-allowlist", "--format", "json")) == {
        "name": "kong-mtls-guard", "config": {"require": ["ip-allowlist"]}}


def test_guard_command_prints_the_post_function_fallback(capsys):
    import yaml

    code = lua_guard(["upstream-identity"])
    assert _guard_command(capsys, "--post-function", "upstream-identity", "--format", "lua") == code
    entry = {"name": "post-function", "config": {"access": [code]}}
    assert yaml.safe_load(_guard_command(capsys, "--post-function", "upstream-identity")) == [entry]
    printed = _guard_command(capsys, "--post-function", "upstream-identity", "--format", "json")
    assert json.loads(printed) == entry


@pytest.mark.parametrize("args", [["--post-function"], ["--format", "lua", "api-key-auth"], ["key-auth"],
                                  ["--post-function", "api-key-auth", "nope"]])
def test_guard_command_refuses_what_it_cannot_print(args, capsys):
    from kong_mtls.cli import main

    assert main(["guard", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kong-mtls guard: ") and "\n" not in err
