"""Pure-core timings: chain verification, the warm decision, API key checks, CIDR matching."""

from __future__ import annotations

from bench import core_cidr
from bench.load import time_call
from kong_mtls.core.api_keys import ApiKeyAuth, credential_entry, generate_key
from kong_mtls.core.chain import ChainPolicy, ChainVerifier
from kong_mtls.devpki import Authority
from kong_mtls.kong.client_cert_auth import compile_config

KEY_KINDS = ("rsa-2048", "rsa-4096", "ec-p256")
ALICE = {"id": "6b3c8a2e-9a4f-4e53-8f0e-2f5b0c1d7a11", "username": "alice"}


def _chain(kind: str) -> tuple[Authority, str]:
    """root -> intermediate -> leaf, every key of `kind`; the leaf's PEM chain as a client sends it."""
    root = Authority.root(f"bench {kind} root", key_kind=kind)
    issuing = root.intermediate(f"bench {kind} issuing", key_kind=kind)
    return root, issuing.client("alice", dns=["alice.example"], key_kind=kind).chain_pem


def chain_rows() -> list[str]:
    rows = []
    for kind in KEY_KINDS:
        root, pem = _chain(kind)
        cold = ChainVerifier(ChainPolicy(anchors=(root.cert,)), cache_size=0)
        assert cold.verify(pem).ok
        micros = time_call(lambda cold=cold, pem=pem: cold.verify(pem), repeat=200)
        rows.append(f"| cold chain verification, {kind}, chain of 3 | {micros:,.1f} |")
    root, pem = _chain("ec-p256")
    config = {"ca_certificates": [root.cert_pem], "revocation_check_mode": "SKIP"}
    authenticator = compile_config(config).authenticator
    load = {"alice": ALICE}.get
    assert authenticator.authenticate(pem, load).allowed
    rows.append(f"| warm client-cert-auth decision (verified chain and consumer cached) | "
                f"{time_call(lambda: authenticator.authenticate(pem, load)):,.1f} |")
    return rows


def api_key_rows() -> list[str]:
    keys = [generate_key() for _ in range(2000)]
    auth = ApiKeyAuth.from_config({"credentials": [credential_entry(k.key, "alice", k.key_id) for k in keys],
                                   "key_names": ["apikey"]})
    match = auth.credentials.match
    key = keys[1234].key
    assert match(key).credential is not None
    micros = time_call(lambda: match(key))
    return [f"| API key lookup and constant-time check, 2,000 credentials | {micros:,.1f} |"]


def section() -> list[str]:
    lines = ["## Pure cores", "", "| operation | µs per call |", "|---|---:|"]
    lines += chain_rows()
    lines += api_key_rows()
    lines += ["", "CIDR matching (`ip-allowlist`), µs per lookup:", "",
              "| family | CIDRs | merged ranges | membership test | whole decision, recurring addresses |"
              " whole decision, new addresses |", "|---|---:|---:|---:|---:|---:|"]
    for row in core_cidr.run():
        lines.append(f"| {row['family']} | {row['cidrs']:,} | {row['ranges']:,} | {row['lookup_us']} | "
                     f"{row['decide_warm_us']} | {row['decide_cold_us']} |")
    return lines
