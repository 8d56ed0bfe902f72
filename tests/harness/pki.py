"""Test PKI factory: every certificate and key is generated at test time (nothing on disk).

One `TestPKI` per test session (see the `pki` fixture): a root CA, an intermediate under it, an
unrelated root, and builders for the leaves the tests need. Keys are EC P-256 unless a test asks for
RSA, to keep the suite fast.
"""

from __future__ import annotations

import datetime as dt
from functools import cached_property

from cryptography import x509

from kong_mtls.devpki import SERVER_AUTH, Authority, Issued, new_key

DAY = dt.timedelta(days=1)


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


class TestPKI:
    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        self.root = Authority.root("kong-mtls test root CA")
        self.intermediate = self.root.intermediate("kong-mtls test issuing CA")
        self.other_root = Authority.root("unrelated root CA", organization="Elsewhere Inc")

    # -- leaves under the intermediate ------------------------------------------------------------
    def client(self, common_name: str | None = "client.example", **kwargs) -> Issued:
        """A client leaf issued by the intermediate; kwargs go to `Authority.client`."""
        return self.intermediate.client(common_name, **kwargs)

    @cached_property
    def alice(self) -> Issued:
        """A typical client: CN + SAN DNS/URI(SPIFFE)/email/IP, O and two OUs."""
        return self.client("alice", dns=["alice.clients.example"],
                           uris=["spiffe://example.org/ns/payments/sa/alice"],
                           emails=["alice@example.org"], ips=["10.1.2.3"],
                           organization="Example Org", organizational_units=["payments", "admins"])

    def expired(self, **kwargs) -> Issued:
        return self.client("expired", not_before=now() - 30 * DAY, not_after=now() - DAY, **kwargs)

    def not_yet_valid(self, **kwargs) -> Issued:
        return self.client("future", not_before=now() + DAY, not_after=now() + 30 * DAY, **kwargs)

    def server_only_eku(self) -> Issued:
        return self.client("wrong-eku", dns=["wrong-eku.example"], extended_key_usage=[SERVER_AUTH])

    def no_eku(self) -> Issued:
        return self.client("no-eku", dns=["no-eku.example"], extended_key_usage=None)

    def cert_sign_only_key_usage(self) -> Issued:
        """A leaf whose key usage forbids signatures (cannot authenticate a TLS client)."""
        usage = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=True, key_cert_sign=False,
                              crl_sign=False, encipher_only=False, decipher_only=False)
        return self.client("bad-key-usage", dns=["bad-ku.example"], key_usage=usage)

    def self_signed(self, common_name: str = "self-signed") -> Issued:
        ca = Authority.root(common_name, organization=None)
        return Issued(cert=ca.cert, key=ca.key)

    def rsa_client(self, bits: int = 2048) -> Issued:
        return self.client(f"rsa-{bits}", dns=[f"rsa{bits}.example"], key=new_key(f"rsa-{bits}"))

    def revoked_with_crl(self) -> tuple[Issued, x509.CertificateRevocationList]:
        """A leaf revoked by the intermediate, and the intermediate's CRL listing it."""
        leaf = self.client("revoked", dns=["revoked.example"])
        self.intermediate.revoke(leaf.cert)
        return leaf, self.intermediate.crl()

    # -- other hierarchies -----------------------------------------------------------------------
    def unknown_ca_client(self) -> Issued:
        return self.other_root.client("stranger", dns=["stranger.example"])

    def deep_chain(self, depth: int) -> tuple[Authority, Issued]:
        """A leaf under `depth` intermediates below the root (depth 1 = like `client`)."""
        ca = self.root
        for i in range(depth):
            ca = ca.intermediate(f"level {i + 1} CA")
        return ca, ca.client("deep", dns=["deep.example"])

