"""Pure-core timings: chain verification, the warm decision, API key checks, CIDR matching."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from bench import core_cidr
from bench.load import time_call
from kong_mtls.core.api_keys import ApiKeyAuth, credential_entry, generate_key
from kong_mtls.core.chain import MAX_LEAF_NAMES, ChainPolicy, ChainVerifier
from kong_mtls.devpki import Authority, cert_pem
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


def hostile_chains() -> dict[str, tuple[Authority, str]]:
    """The most expensive chains we know how to present, each with the anchor it is checked against
    (`tests/unit/test_chain.py` checks each is refused):

    * a loop: six CA certificates whose names and keys chain in a circle, under the trusted root's
      name but none signed by it (path building explores every cycle);
    * constraints: an intermediate (signed by the root) with 300 permitted DNS subtrees and a leaf
      with the most SANs accepted (MAX_LEAF_NAMES), none inside (every SAN against every subtree);
    * self-issued: a leaf and five self-issued P-384 CAs of one name and key (only serials differ),
      each a candidate issuer of the leaf and of the others;
    * wide: the leaf of an unknown CA plus five unrelated CA certificates.
    """
    root = Authority.root("bench hostile root")
    loop_cas = [Authority.root(f"bench loop {i}") for i in range(6)]
    loop = []
    for i, ca in enumerate(loop_cas):
        parent = loop_cas[(i + 1) % len(loop_cas)]
        loop.append(Authority(subject=ca.subject, key=ca.key, parent=parent,
                              cert=parent.intermediate(f"bench loop {i}", key=ca.key).cert))
    looped = loop[0].client("loop", dns=["loop.example"]).cert_pem + "".join(c.cert_pem for c in loop[1:])
    subtrees = [x509.DNSName(f"permitted-{i}.example") for i in range(300)]
    constrained = root.intermediate("bench constrained",
                                    name_constraints=x509.NameConstraints(subtrees, None))
    sans = [f"n{i}.outside.example" for i in range(MAX_LEAF_NAMES)]
    constraints = constrained.client("many", dns=sans).chain_pem
    same = Authority.root("bench same-key CA", key_kind="ec-p384")
    copies = []
    for serial in range(5):  # self-issued, one name and key, another serial each
        builder = (x509.CertificateBuilder().subject_name(same.subject).issuer_name(same.subject)
                   .public_key(same.key.public_key()).serial_number(serial + 2)
                   .not_valid_before(same.cert.not_valid_before_utc)
                   .not_valid_after(same.cert.not_valid_after_utc))
        for ext in same.cert.extensions:
            builder = builder.add_extension(ext.value, ext.critical)
        copies.append(cert_pem(builder.sign(same.key, hashes.SHA384())))
    self_issued = same.client("same", dns=["same.example"]).cert_pem + "".join(copies)
    stranger = Authority.root("bench stranger")
    wide = stranger.client("wide", dns=["wide.example"]).cert_pem + "".join(
        Authority.root(f"bench unrelated {i}").cert_pem for i in range(5))
    return {"loop of 6 CAs": (root, looped), "300 name constraints x many SANs": (root, constraints),
            "5 self-issued CAs of one name and key": (root, self_issued),
            "unknown CA with 5 unrelated CAs": (root, wide)}


def hostile_rows() -> list[str]:
    rows = []
    for name, (root, pem) in hostile_chains().items():
        verifier = ChainVerifier(ChainPolicy(anchors=(root.cert,)), cache_size=0)  # no verdict kept
        verdict = verifier.verify(pem)
        assert not verdict.ok, name
        micros = time_call(lambda pem=pem, verifier=verifier: verifier.verify(pem), repeat=50)
        rows.append(f"| hostile chain, first sight: {name} ({len(pem) // 1024} KiB, refused "
                    f"{verdict.reason.value}) | {micros:,.1f} |")
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
    lines += hostile_rows()
    lines += api_key_rows()
    lines += ["", "CIDR matching (`ip-allowlist`), µs per lookup:", "",
              "| family | CIDRs | merged ranges | membership test | whole decision, recurring addresses |"
              " whole decision, new addresses |", "|---|---:|---:|---:|---:|---:|"]
    for row in core_cidr.run():
        lines.append(f"| {row['family']} | {row['cidrs']:,} | {row['ranges']:,} | {row['lookup_us']} | "
                     f"{row['decide_warm_us']} | {row['decide_cold_us']} |")
    return lines
