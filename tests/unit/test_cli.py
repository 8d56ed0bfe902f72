"""The `kong-mtls` entry point: every subcommand is reachable, documented, and fails cleanly."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kong_mtls.cli import main

SUBCOMMANDS = ["dev-pki", "check", "api-key", "cloudflare-ranges", "upstream-check", "guard", "lint"]


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0
    assert "usage: kong-mtls " + name in capsys.readouterr().out


def test_user_error_is_one_line_and_exit_code_2(capsys):
    assert main(["guard", "key-auth"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kong-mtls guard: ") and "\n" not in err


def test_installed_console_script_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kong_mtls.cli", "dev-pki", str(tmp_path), "--json"],
                         capture_output=True, text=True, timeout=60, check=True)
    assert (tmp_path / "ca" / "root.pem").exists()
    assert '"client_alice"' in out.stdout
    assert oct((tmp_path / "clients" / "alice.key").stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("option", ["--abandon-after", "--instance-idle-after"])
@pytest.mark.parametrize("value", ["0", "-5", "0.5", "nan", "abc", "86401"])
def test_plugin_servers_refuse_a_reaper_period_out_of_range(option, value, capsys):
    """0 would busy-loop the reaper, and reap events Kong still waits for or instances it uses."""
    from kong_mtls.kong.ip_allowlist import main as ip_allowlist

    with pytest.raises(SystemExit) as info:
        ip_allowlist([option, value, "-p", "/tmp"])
    assert info.value.code == 2 and option in capsys.readouterr().err
