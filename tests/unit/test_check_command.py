"""`kong-mtls check`: offline decisions for a chain against a client-cert-auth config."""

from __future__ import annotations

import base64
import io
import json
import types
from urllib.parse import quote

import pytest
from cryptography.hazmat.primitives import hashes, serialization

from kong_mtls.cli import main
from kong_mtls.core.chain import cert_sha256

ALICE_ID = "00000000-0000-4000-8000-00000000a11c"


@pytest.fixture
def files(pki, tmp_path):
    def write(name: str, content) -> str:
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return str(path)

    config = {"ca_certificates": [pki.root.cert_pem], "revocation_check_mode": "SKIP",
              "groups_from": ["dn:OU", "mapping"],
              "consumer_mappings": [{"subject_name": "alice", "name_type": "cn", "consumer": "alice",
                                     "groups": ["ops"]}]}
    return types.SimpleNamespace(
        write=write,
        config=write("config.json", config),
        entity=write("entity.json", {"name": "client-cert-auth", "config": config}),
        alice=write("alice.pem", pki.alice.chain_pem),
        expired=write("expired.pem", pki.expired().chain_pem),
        consumers=write("consumers.json", [{"id": ALICE_ID, "username": "alice"}]),
    )


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["check", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_allowed_prints_consumer_and_groups(capsys, files):
    code, out, _ = run(capsys, "--config", files.config, "--chain", files.alice,
                       "--consumers", files.consumers)
    assert code == 0
    assert "ALLOWED via mapping" in out
    assert f"consumer:    alice (id {ALICE_ID})" in out
    assert "groups:      payments, admins, ops" in out
    assert "X-Consumer-Username: alice" in out


def test_refused_prints_reason(capsys, files):
    code, out, _ = run(capsys, "--config", files.entity, "--chain", files.expired)
    assert code == 1
    assert "REFUSED" in out and "reason:      EXPIRED" in out
    assert '401 {"message": "TLS certificate failed verification"}' in out


def test_no_consumer_without_consumers_file(capsys, files):
    code, out, _ = run(capsys, "--config", files.config, "--chain", files.alice)
    assert code == 1 and "NO_CONSUMER" in out


def test_json_output(capsys, pki, files):
    code, out, _ = run(capsys, "--config", files.config, "--chain", files.alice,
                       "--consumers", files.consumers, "--json")
    result = json.loads(out)
    assert code == 0 and result["allowed"] is True and result["via"] == "mapping"
    assert result["consumer"]["username"] == "alice" and result["groups"] == ["payments", "admins", "ops"]
    assert result["certificate"]["fingerprint_sha256"] == cert_sha256(pki.alice.cert)
    assert result["headers"]["X-Consumer-ID"] == ALICE_ID
    assert len(result["path"]) == 3


def test_at_a_later_time(capsys, files):
    code, out, err = run(capsys, "--config", files.config, "--chain", files.alice, "--consumers",
                         files.consumers, "--at", "2045-01-01T00:00:00Z", "--json")
    assert code == 1 and json.loads(out)["reason"] == "EXPIRED"
    assert "anchor-expiring" in err  # the test root has expired by then


def test_report_only_passes_with_exit_0(capsys, pki, files):
    config = files.write("report.json", {"ca_certificates": [pki.root.cert_pem], "report_only": True,
                                         "revocation_check_mode": "SKIP"})
    code, out, _ = run(capsys, "--config", config, "--chain", files.expired)
    assert code == 0 and "report_only: would be refused" in out and "EXPIRED" in out


def test_chain_from_stdin(capsys, monkeypatch, pki, files):
    monkeypatch.setattr("sys.stdin", types.SimpleNamespace(buffer=io.BytesIO(pki.alice.chain_pem.encode())))
    code, out, _ = run(capsys, "--config", files.config, "--chain", "-", "--consumers", files.consumers)
    assert code == 0 and "ALLOWED" in out


def test_consumers_without_ids_get_stable_ones(capsys, pki, files):
    consumers = files.write("by-name.json", {"consumers": [{"username": "alice"}]})
    first = run(capsys, "--config", files.config, "--chain", files.alice, "--consumers", consumers, "--json")
    second = run(capsys, "--config", files.config, "--chain", files.alice, "--consumers", consumers, "--json")
    assert json.loads(first[1])["consumer"]["id"] == json.loads(second[1])["consumer"]["id"]


@pytest.mark.parametrize(("make", "message"), [
    (lambda f: ["--config", f.write("bad.json", "{not json"), "--chain", f.alice], "not valid JSON"),
    (lambda f: ["--config", f.write("list.json", [1]), "--chain", f.alice], "expected a JSON object"),
    (lambda f: ["--config", f.write("other.json", {"name": "key-auth", "config": {}}), "--chain", f.alice],
     "not client-cert-auth"),
    (lambda f: ["--config", f.write("empty.json", {}), "--chain", f.alice], "ca_certificates"),
    (lambda f: ["--config", f.write("eku.json", {"ca_certificates": ["x"]}), "--chain", f.alice],
     "ca_certificates[1]"),
    (lambda f: ["--config", f.config, "--chain", "/nonexistent.pem"], "cannot read"),
    (lambda f: ["--config", f.config, "--chain", f.alice, "--consumers", f.write("c.json", {"x": 1})],
     "--consumers"),
    (lambda f: ["--config", f.config, "--chain", f.alice,
                "--consumers", f.write("c2.json", [{"custom_id": "x"}])], "entry 1"),
    (lambda f: ["--config", f.config, "--chain", f.alice, "--at", "yesterday"], "--at"),
])
def test_usage_errors_exit_2(capsys, files, make, message):
    code, _, err = run(capsys, *make(files))
    assert code == 2 and message in err


def test_missing_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["check", "--chain", "x.pem"])
    assert info.value.code == 2


def _anchor_with_raw_name_constraints(der: bytes) -> str:
    """A self-signed CA whose nameConstraints extension is `der` as it stands."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "constrained CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(7)
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                           critical=True)
            .add_extension(x509.UnrecognizedExtension(x509.oid.ExtensionOID.NAME_CONSTRAINTS, der),
                           critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize("der", [
    bytes.fromhex("3008a0063004a3023000"),              # permitted x400Address: no Python type for it
    bytes.fromhex("3008a0063004a5023000"),              # permitted ediPartyName
    bytes.fromhex("300ea00c300a87080a000000ff00ff00"),  # an IP constraint with a non-contiguous mask
])
def test_a_malformed_name_constraint_in_an_anchor_is_a_config_error(capsys, files, der):
    config = files.write("nc.json", {"ca_certificates": [_anchor_with_raw_name_constraints(der)]})
    code, _, err = run(capsys, "--config", config, "--chain", files.alice)
    assert code == 2 and "ca_certificates[1]" in err and "Traceback" not in err


# -- header values (what an edge forwards) -----------------------------------------------------------------
def _sf(cert) -> str:
    return ":" + base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode() + ":"


@pytest.mark.parametrize(("fmt", "encode"), [
    ("rfc9440", lambda p: _sf(p.alice.cert)),
    ("url_encoded_pem", lambda p: quote(p.alice.chain_pem, safe="+=/")),
    ("xfcc", lambda p: f"Hash={p.alice.cert.fingerprint(hashes.SHA256()).hex()};"
                       f"Cert={quote(p.alice.cert_pem, safe='')};"
                       f"Chain={quote(p.alice.chain_pem, safe='')}"),
    ("base64_der", lambda p: ",".join(base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode()
                                      for c in (p.alice.cert, *p.alice.intermediates))),
])
def test_a_header_value_in_each_format(capsys, files, pki, fmt, encode):
    """The leaf-only RFC 9440 value is completed by the intermediate given as a chain header."""
    value = files.write("value.txt", encode(pki) + "\n")
    chain = files.write("chain.txt", _sf(pki.intermediate.cert))
    extra = ["--chain-header-value", chain] if fmt == "rfc9440" else []
    code, out, _ = run(capsys, "--config", files.config, "--header-value", value, "--format", fmt,
                       "--consumers", files.consumers, *extra)
    assert (code, "ALLOWED via mapping" in out) == (0, True), out
    # A damaged value is refused with the reason the plugin would log.
    broken = files.write("broken.txt", encode(pki)[:-7] + "%G")
    code, out, _ = run(capsys, "--config", files.config, "--header-value", broken, "--format", fmt)
    assert code == 1 and "reason:      MALFORMED_CHAIN" in out, out


def test_a_header_cert_auth_config_brings_its_own_format(capsys, files, pki):
    config = {"ca_certificates": [pki.root.cert_pem], "revocation_check_mode": "SKIP",
              "certificate_header": "Client-Cert", "certificate_header_format": "rfc9440",
              "chain_header": "Client-Cert-Chain", "trusted_proxies_presets": ["cloudflare"],
              "consumer_mappings": [{"subject_name": "alice", "name_type": "cn", "consumer": "alice"}]}
    entity = files.write("edge.json", {"name": "header-cert-auth", "config": config})
    value = files.write("value.txt", _sf(pki.alice.cert))
    chain = files.write("chain.txt", _sf(pki.intermediate.cert))
    code, out, _ = run(capsys, "--config", entity, "--header-value", value, "--chain-header-value", chain,
                       "--consumers", files.consumers)
    assert code == 0 and "consumer:    alice" in out
    bare = files.write("bare.json", config)
    code, out, _ = run(capsys, "--config", bare, "--plugin", "header-cert-auth", "--header-value", value)
    assert code == 1 and "reason:      UNKNOWN_CA" in out      # no chain header value: no path
    for args in (["--format", "xfcc"], ["--plugin", "client-cert-auth"]):
        assert run(capsys, "--config", entity, "--header-value", value, *args)[0] == 2, args


@pytest.mark.parametrize("args", [
    ["--header-value", "VALUE"],                                  # client-cert-auth: needs --format
    ["--chain", "ALICE", "--format", "rfc9440"],                  # --format without a header value
    ["--header-value", "MULTI", "--format", "rfc9440"],           # two lines
    ["--header-value", "VALUE", "--format", "xfcc", "--chain-header-value", "VALUE"],
])
def test_header_value_argument_errors(capsys, files, pki, args):
    paths = {"VALUE": files.write("v.txt", _sf(pki.alice.cert)), "ALICE": files.alice,
             "MULTI": files.write("m.txt", _sf(pki.alice.cert) + "\n" + _sf(pki.alice.cert) + "\n")}
    code, _, err = run(capsys, "--config", files.config, *[paths.get(a, a) for a in args])
    assert code == 2 and "--" in err, err
