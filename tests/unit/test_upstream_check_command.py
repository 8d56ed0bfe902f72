"""`kong-mtls upstream-check`: output, exit codes and usage errors, against a real TLS upstream."""

from __future__ import annotations

import json
import re

import pytest

from kong_mtls.cli import main
from kong_mtls.core.upstream import CertSummary
from kong_mtls.devpki import SERVER_AUTH, SubjectAltNames, name
from tests.harness.tls_servers import TLSUpstream, closed_port, write_pem_files

HOST = "upstream.test"
SPIFFE = "spiffe://example.org/ns/backend/sa/api"


@pytest.fixture(scope="module")
def server_cert(pki):
    return pki.intermediate.issue(name(HOST), sans=SubjectAltNames(dns=[HOST], uris=[SPIFFE]),
                                  extended_key_usage=(SERVER_AUTH,))


@pytest.fixture(scope="module")
def upstream(server_cert, pki):
    with TLSUpstream(server_cert, client_cas=[pki.root]) as server:
        yield server


@pytest.fixture(scope="module")
def paths(pki, tmp_path_factory):
    directory = tmp_path_factory.mktemp("upstream-check")
    ca = directory / "ca.pem"
    ca.write_text(pki.root.cert_pem)
    cert, key = write_pem_files(directory, pki.client("kong-gateway"), "kong")
    return {"ca": str(ca), "cert": cert, "key": key}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["upstream-check", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def base(upstream, paths, *extra: str) -> list[str]:
    return [upstream.address, "--sni", HOST, "--ca", paths["ca"], "--cert", paths["cert"],
            "--key", paths["key"], *extra]


def test_verified_identity_prints_what_it_saw_and_exits_0(capsys, upstream, paths, server_cert):
    pin = CertSummary.of(server_cert.cert).spki_b64
    code, out, _ = run(capsys, *base(upstream, paths, "--expect-san", HOST, "--expect-spiffe", SPIFFE,
                                     "--expect-spki", pin))
    assert code == 0
    assert f"subject:      CN={HOST}" in out
    assert f"SAN DNS:      {HOST}" in out and f"SAN URI:      {SPIFFE}" in out
    assert pin in out and "issuer:       CN=kong-mtls test issuing CA" in out
    assert "verified against the trusted CAs" in out
    assert "client cert:  CN=kong-gateway" in out
    assert out.rstrip().endswith("verdict:      OK (IDENTITY_OK)")


@pytest.mark.parametrize("extra, reason", [
    (["--expect-san", "other.test"], "SAN_MISMATCH"),
    (["--expect-uri", "spiffe://example.org/other"], "URI_SAN_MISMATCH"),
    (["--expect-spki", "A" * 43 + "="], "SPKI_MISMATCH"),
])
def test_mismatch_exits_1_with_reason(capsys, upstream, paths, extra, reason):
    code, out, _ = run(capsys, *base(upstream, paths, *extra))
    assert code == 1
    assert f"verdict:      REFUSED ({reason})" in out
    assert f"CN={HOST}" in out  # what it saw is still shown
    assert "alarm:        the upstream presented another identity" in out


def test_without_client_cert_the_upstream_refuses(capsys, upstream, paths):
    code, out, _ = run(capsys, upstream.address, "--sni", HOST, "--ca", paths["ca"])
    assert code == 1 and "REFUSED (CLIENT_CERT_REJECTED)" in out
    assert re.search(r"^client cert: +none presented$", out, re.M)
    assert f"subject:      CN={HOST}" in out   # what it showed before refusing us (TLS 1.3)
    assert "alarm:" not in out  # the upstream refused us: nothing says it is someone else


def test_unreachable_exits_1(capsys, paths):
    code, out, _ = run(capsys, f"127.0.0.1:{closed_port()}", "--ca", paths["ca"])
    assert code == 1 and "REFUSED (UPSTREAM_UNREACHABLE)" in out and "certificate: none seen" in out


def test_json_output(capsys, upstream, paths):
    code, out, _ = run(capsys, *base(upstream, paths, "--json", "--expect-san", HOST))
    result = json.loads(out)
    assert code == 0 and result["ok"] is True and result["reason"] == "IDENTITY_OK"
    assert result["alarm"] is False
    assert result["certificate"]["dns_names"] == [HOST] and result["chain_verified"] is True
    assert result["client_certificate"]["subject"] == "CN=kong-gateway"
    assert result["server_name"] == HOST


def test_insecure_shows_the_pin_to_use_and_exits_1(capsys, upstream, paths, server_cert):
    code, out, _ = run(capsys, upstream.address, "--insecure", "--cert", paths["cert"], "--key", paths["key"],
                       "--json")
    result = json.loads(out)
    assert code == 1 and result["ok"] is False and result["reason"] == "NOT_VERIFIED"
    assert result["chain_verified"] is False
    pin = result["certificate"]["spki_sha256"]
    assert pin == CertSummary.of(server_cert.cert).spki_b64
    # The pin it printed is what --expect-spki takes (no CA needed then).
    code, out, _ = run(capsys, upstream.address, "--expect-spki", pin, "--cert", paths["cert"],
                       "--key", paths["key"])
    assert code == 0 and "chain:        NOT verified (no --ca" in out


@pytest.mark.parametrize("argv, message", [
    (["::1:443", "--ca", "CA"], "brackets"),
    (["h:99999", "--ca", "CA"], "invalid port"),
    (["h:443"], "--ca"),                                     # nothing to verify against
    (["h:443", "--ca", "/nonexistent/ca.pem"], "--ca[1]: /nonexistent/ca.pem"),
    (["h:443", "--ca", "CA", "--cert", "CERT"], "--key"),
    (["h:443", "--ca", "CA", "--expect-spki", "nope"], "--expect-spki[1]"),
    (["h:443", "--ca", "CA", "--expect-san", "bad name"], "--expect-san[1]"),
    (["h:443", "--ca", "CA", "--timeout", "0"], "--timeout"),
    (["h:443", "--ca", "CA", "--insecure"], "--insecure"),
])
def test_usage_errors_exit_2(capsys, paths, argv, message):
    argv = [paths["ca"] if a == "CA" else paths["cert"] if a == "CERT" else a for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("kong-mtls upstream-check: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_missing_target_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["upstream-check"])
    assert exc.value.code == 2


def test_certificate_fields_cannot_act_on_the_terminal() -> None:
    """An upstream's subject like `x\\nverdict: OK\\x1b[8m` prints as one escaped line (review)."""
    from kong_mtls.kong.runtime import printable
    shown = printable("CN=x\nverdict:      OK (IDENTITY_OK)\x1b[8m")
    assert "\n" not in shown and "\x1b" not in shown and shown.isprintable()
    assert printable("CN=plain, O=Example") == "CN=plain, O=Example"
