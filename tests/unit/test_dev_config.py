"""docker/dev_config.py (the dev PKI and template rendering of the image) and docker/echo/echo.py
(the upstream that requires Kong's client certificate)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from kong_mtls.core.api_keys import CredentialTable
from kong_mtls.devpki import DEV_PKI_LAYOUT
from tests.integration.support import ROOT, load_dev_config, refused, request, tls_context

dev_config = load_dev_config()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    dev_config.prepare(directory, [])
    return directory


def test_prepare_creates_the_pki_once_and_renders_into_config(pki: Path, tmp_path: Path) -> None:
    assert all((pki / rel).is_file() for rel in DEV_PKI_LAYOUT.values())
    root_before = (pki / "ca" / "root.pem").read_text()
    template = tmp_path / "example.yml"
    template.write_text('ca: "@pki:ca/root.pem"\n')
    (out,) = dev_config.prepare(pki, [str(tmp_path)])
    assert out == pki / "config" / "example.yml"
    assert (pki / "ca" / "root.pem").read_text() == root_before      # kept, not regenerated
    assert yaml.safe_load(out.read_text()) == {"ca": root_before}
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_render_fills_pem_content_paths_and_key_hashes(pki: Path) -> None:
    text = ('cert: "@pki:kong/server.pem"\n'
            'file: "@pki-path:ca/root.pem"\n'
            'hash: "@api-key-hash:ak_test"\n'
            '# a comment keeps its "@pki:kong/server.key" as it is\n')
    out = dev_config.render(text, pki)
    data = yaml.safe_load(out)
    assert data["cert"] == (pki / "kong" / "server.pem").read_text()
    assert data["file"] == str((pki / "ca" / "root.pem").resolve())
    assert out.splitlines()[-1] == text.splitlines()[-1]
    key_file = pki / "api-keys" / "ak_test.key"
    key = key_file.read_text().strip()
    assert key.startswith("ak_test.") and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    table = CredentialTable.from_config([{"id": "ak_test", "hash": data["hash"], "consumer": "alice"}])
    assert table.match(key).reason is None                            # the hash is of that key
    again = yaml.safe_load(dev_config.render(text, pki))
    assert key_file.read_text().strip() == key                        # created once
    assert CredentialTable.from_config([{"id": "ak_test", "hash": again["hash"], "consumer": "a"}]) \
        .match(key).reason is None


@pytest.mark.parametrize("text", ['x: "@pki:../etc/passwd"', 'x: "@pki:/etc/passwd"', 'x: "@pki:ca/none.pem"',
                                  'x: "@api-key-hash:bad.id"'])
def test_render_refuses_unsafe_or_missing_files(pki: Path, text: str) -> None:
    with pytest.raises(dev_config.RenderError):
        dev_config.render(text, pki)


def test_main_usage_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert dev_config.main([]) == 2
    template = tmp_path / "bad.yml"
    template.write_text('x: "@pki:missing.pem"\n')
    assert dev_config.main([str(tmp_path / "pki"), str(template)]) == 1
    assert "missing.pem" in capsys.readouterr().err


# -- echo --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def echo(pki: Path):
    env = {**os.environ, "ECHO_HOST": "127.0.0.1", "ECHO_PORT": "0", "ECHO_NAME": "echo-test",
           "ECHO_CERT": str(pki / "upstream" / "server.pem"),
           "ECHO_KEY": str(pki / "upstream" / "server.key"),
           "ECHO_CLIENT_CA": str(pki / "ca" / "root.pem")}
    process = subprocess.Popen([sys.executable, str(ROOT / "docker" / "echo" / "echo.py")], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = process.stdout.readline()
        assert " listening on " in line, line
        yield "127.0.0.1", int(line.split(" listening on ", 1)[1].split()[0].rsplit(":", 1)[1])
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_echo_answers_kong_with_headers_and_its_certificate_and_remembers_nonces(pki: Path, echo) -> None:
    kong = tls_context(pki / "ca" / "echo-upstream.pem", (pki / "kong" / "upstream-client.pem",
                                                          pki / "kong" / "upstream-client.key"))
    answer = request(echo, "/x?y=1", tls=kong, headers={"X-Test-Nonce": "n-1", "X-Other": "v"})
    body = answer.json()
    assert (answer.status, body["server"], body["path"]) == (200, "echo-test", "/x?y=1")
    assert body["headers"]["x-other"] == "v"
    assert body["client_cert"]["subject"] == "CN=kong-gateway"
    assert "URI:spiffe://dev.kong-mtls/gateway" in body["client_cert"]["san"]
    server = x509.load_der_x509_certificate(answer.server_cert)     # what the client saw
    assert "echo" in server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.DNSName)
    assert json.loads(request(echo, "/__seen/n-1", tls=kong).body) == {"seen": True}
    assert json.loads(request(echo, "/__seen/n-2", tls=kong).body) == {"seen": False}


def test_echo_refuses_clients_without_a_dev_ca_certificate(pki: Path, echo) -> None:
    ca = pki / "ca" / "echo-upstream.pem"  # echo's own CA issued its certificate
    assert refused(echo, tls_context(ca))
    stranger = (pki / "clients" / "stranger.pem", pki / "clients" / "stranger.key")
    assert refused(echo, tls_context(ca, stranger))
