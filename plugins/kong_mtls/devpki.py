"""A small certificate authority for development PKIs and tests (never for production keys).

Used by `kong-mtls dev-pki` (the image's first-start job) and by the test suite's PKI factory.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = Union[rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey]

KEY_KINDS = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096", "ed25519")
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH


def new_key(kind: str = "ec-p256") -> PrivateKey:
    if kind == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind.startswith("rsa-"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(kind[4:]))
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key kind {kind!r}; expected one of {', '.join(KEY_KINDS)}")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _hash_for(key: PrivateKey) -> hashes.HashAlgorithm | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def key_pem(key: PrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def name(common_name: str | None = None, *, organization: str | None = None,
         organizational_units: Sequence[str] = (), country: str | None = None) -> x509.Name:
    attrs = []
    if country:
        attrs.append(x509.NameAttribute(NameOID.COUNTRY_NAME, country))
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    attrs.extend(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou) for ou in organizational_units)
    if common_name is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


@dataclass(frozen=True)
class Issued:
    """A certificate with its private key and the intermediates a client would send after it."""

    cert: x509.Certificate
    key: PrivateKey
    intermediates: tuple[x509.Certificate, ...] = ()

    @property
    def cert_pem(self) -> str:
        return cert_pem(self.cert)

    @property
    def key_pem(self) -> str:
        return key_pem(self.key)

    @property
    def chain_pem(self) -> str:
        """Leaf first, then intermediates: what Kong's get_full_client_certificate_chain returns."""
        return "".join(cert_pem(c) for c in (self.cert, *self.intermediates))


@dataclass(frozen=True)
class SubjectAltNames:
    dns: Sequence[str] = ()
    uris: Sequence[str] = ()
    emails: Sequence[str] = ()
    ips: Sequence[str] = ()

    def extension(self) -> x509.SubjectAlternativeName | None:
        names: list[x509.GeneralName] = []
        names += [x509.DNSName(d) for d in self.dns]
        names += [x509.UniformResourceIdentifier(u) for u in self.uris]
        names += [x509.RFC822Name(e) for e in self.emails]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in self.ips]
        return x509.SubjectAlternativeName(names) if names else None


@dataclass
class Authority:
    """A CA (root when `parent` is None) that issues leaves, intermediates, CRLs."""

    subject: x509.Name
    key: PrivateKey
    cert: x509.Certificate
    parent: Authority | None = None
    revoked: dict[int, dt.datetime] = field(default_factory=dict)

    @classmethod
    def root(cls, common_name: str = "kong-mtls dev root CA", *, key_kind: str = "ec-p256",
             organization: str | None = "kong-mtls dev", days: int = 3650,
             path_length: int | None = None, key: PrivateKey | None = None) -> Authority:
        key = key or new_key(key_kind)
        subject = name(common_name, organization=organization)
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, _hash_for(key))
        )
        return cls(subject=subject, key=key, cert=cert)

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """This CA's certificate and its parents' up to, but excluding, the root."""
        if self.parent is None:
            return ()
        return (self.cert, *self.parent.chain)

    @property
    def cert_pem(self) -> str:
        return cert_pem(self.cert)

    def intermediate(self, common_name: str, *, key_kind: str = "ec-p256", days: int = 1825,
                     path_length: int | None = None, organization: str | None = "kong-mtls dev",
                     crl_url: str | None = None, ocsp_url: str | None = None,
                     key: PrivateKey | None = None,
                     name_constraints: x509.NameConstraints | None = None) -> Authority:
        key = key or new_key(key_kind)
        subject = name(common_name, organization=organization)
        now = _now()
        builder = self._builder(subject, key.public_key(), now - dt.timedelta(minutes=5),
                                now + dt.timedelta(days=days), crl_url, ocsp_url)
        builder = (builder
                   .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
                   .add_extension(_ca_key_usage(), critical=True))
        if name_constraints is not None:
            builder = builder.add_extension(name_constraints, critical=True)
        return Authority(subject=subject, key=key, cert=builder.sign(self.key, _hash_for(self.key)),
                         parent=self)

    def issue(self, subject: x509.Name, *, sans: SubjectAltNames | None = None,
              key_kind: str = "ec-p256", key: PrivateKey | None = None,
              not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
              extended_key_usage: Iterable[x509.ObjectIdentifier] | None = (CLIENT_AUTH,),
              key_usage: x509.KeyUsage | None = None, crl_url: str | None = None,
              ocsp_url: str | None = None, critical_san: bool = False) -> Issued:
        """Issue an end-entity certificate. `extended_key_usage=None` leaves the extension out."""
        key = key or new_key(key_kind)
        now = _now()
        builder = self._builder(subject, key.public_key(), not_before or now - dt.timedelta(minutes=5),
                                not_after or now + dt.timedelta(days=365), crl_url, ocsp_url)
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        builder = builder.add_extension(key_usage or _leaf_key_usage(key), critical=True)
        if extended_key_usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(extended_key_usage)), critical=False)
        san = (sans or SubjectAltNames()).extension()
        if san is not None:  # critical when the subject is empty, as RFC 5280 requires (and Go does)
            builder = builder.add_extension(san, critical=critical_san or len(subject) == 0)
        cert = builder.sign(self.key, _hash_for(self.key))
        return Issued(cert=cert, key=key, intermediates=self.chain)

    def client(self, common_name: str | None, *, dns: Sequence[str] = (), uris: Sequence[str] = (),
               emails: Sequence[str] = (), ips: Sequence[str] = (), organization: str | None = None,
               organizational_units: Sequence[str] = (), **kwargs) -> Issued:
        """A client certificate (EKU clientAuth unless overridden)."""
        subject = name(common_name, organization=organization, organizational_units=organizational_units)
        return self.issue(subject, sans=SubjectAltNames(dns, uris, emails, ips), **kwargs)

    def server(self, hostnames: Sequence[str], *, ips: Sequence[str] = (), sans_uris: Sequence[str] = (),
               **kwargs) -> Issued:
        """A TLS server certificate for the given host names (EKU serverAuth)."""
        kwargs.setdefault("extended_key_usage", (SERVER_AUTH,))
        common_name = hostnames[0] if hostnames else (ips[0] if ips else "server")
        return self.issue(name(common_name), sans=SubjectAltNames(dns=hostnames, uris=sans_uris, ips=ips),
                          **kwargs)

    def revoke(self, cert: x509.Certificate, when: dt.datetime | None = None) -> None:
        self.revoked[cert.serial_number] = when or _now() - dt.timedelta(minutes=1)

    def crl(self, *, next_update: dt.timedelta = dt.timedelta(days=1),
            last_update: dt.datetime | None = None) -> x509.CertificateRevocationList:
        last = last_update or _now() - dt.timedelta(minutes=1)
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(self.subject)
                   .last_update(last).next_update(last + next_update)
                   .add_extension(x509.CRLNumber(int(last.timestamp())), critical=False))
        for serial, when in self.revoked.items():
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build())
        return builder.sign(self.key, _hash_for(self.key))

    def _builder(self, subject: x509.Name, public_key, not_before: dt.datetime, not_after: dt.datetime,
                 crl_url: str | None, ocsp_url: str | None) -> x509.CertificateBuilder:
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(self.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
        )
        if crl_url:
            builder = builder.add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(crl_url)], relative_name=None, reasons=None,
                crl_issuer=None)]), critical=False)
        if ocsp_url:
            builder = builder.add_extension(x509.AuthorityInformationAccess([x509.AccessDescription(
                x509.oid.AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(ocsp_url))]),
                critical=False)
        return builder


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                         encipher_only=False, decipher_only=False)


def _leaf_key_usage(key: PrivateKey) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False,
                         key_encipherment=isinstance(key, rsa.RSAPrivateKey), data_encipherment=False,
                         key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False,
                         decipher_only=False)


#: What `write_dev_pki` creates, relative to its output directory (certificate paths; each `.pem`
#: that has a key has it beside it as `.key`).
DEV_PKI_LAYOUT = {
    "root_ca": "ca/root.pem",
    "issuing_ca": "ca/intermediate.pem",
    "kong_server": "kong/server.pem",
    "kong_server_b": "kong/server-b.pem",
    "kong_upstream_client": "kong/upstream-client.pem",
    "client_alice": "clients/alice.pem",
    "client_bob": "clients/bob.pem",
    "client_stranger": "clients/stranger.pem",
    "stranger_ca": "ca/stranger-root.pem",
    "echo_upstream_ca": "ca/echo-upstream.pem",
    "aop_ca": "aop/ca.pem",
    "aop_client": "aop/client.pem",
    "upstream_server": "upstream/server.pem",
    "upstream_impostor": "upstream/impostor.pem",
}


def write_dev_pki(out_dir: str, *, kong_hosts: Sequence[str] = ("localhost", "kong", "api.example.test"),
                  kong_hosts_b: Sequence[str] = ("other.example.test",),
                  upstream_hosts: Sequence[str] = ("upstream", "echo", "localhost"),
                  force: bool = False) -> dict[str, str]:
    """Create a complete development PKI under `out_dir`; returns name -> certificate path.

    Nothing is overwritten unless `force`: an existing `ca/root.pem` means the PKI exists.
    Certificate files hold the chain (leaf, then intermediates); keys are written mode 0600.
    """
    paths = {name: os.path.join(out_dir, rel) for name, rel in DEV_PKI_LAYOUT.items()}
    if os.path.exists(paths["root_ca"]) and not force:
        return paths
    root = Authority.root("kong-mtls dev root CA")
    issuing = root.intermediate("kong-mtls dev issuing CA")
    stranger = Authority.root("kong-mtls dev stranger CA", organization="Elsewhere")
    # Same shape as Cloudflare's Authenticated Origin Pulls CA (a self-signed root that issues the
    # client certificate Cloudflare presents), so the recipe can be tried without Cloudflare.
    aop = Authority.root("origin-pull.cloudflare.net (dev stand-in)", organization="CloudFlare, Inc. (dev)")
    # "One issuing CA per upstream identity": this CA issues the echo upstream's certificate and
    # nothing else, so a Service that trusts only it is verified by Kong's own handshake to reach echo,
    # not merely some server with a certificate from the dev CA (such as the impostor).
    echo_ca = Authority.root("kong-mtls dev echo upstream CA")
    issued: dict[str, Issued] = {
        "kong_server": issuing.server(list(kong_hosts), ips=["127.0.0.1"]),
        "kong_server_b": issuing.server(list(kong_hosts_b)),
        "kong_upstream_client": issuing.client("kong-gateway", dns=["kong.internal"],
                                               uris=["spiffe://dev.kong-mtls/gateway"]),
        "client_alice": issuing.client("alice", dns=["alice.clients.example"],
                                       uris=["spiffe://dev.kong-mtls/ns/payments/sa/alice"],
                                       emails=["alice@example.org"], organization="Example Org",
                                       organizational_units=["payments", "admins"]),
        "client_bob": issuing.client("bob", emails=["bob@example.org"], organizational_units=["support"]),
        "client_stranger": stranger.client("stranger", dns=["stranger.example"]),
        "aop_client": aop.client("Cloudflare (dev stand-in)"),
        "upstream_server": echo_ca.server(list(upstream_hosts), ips=["127.0.0.1"],
                                          sans_uris=["spiffe://dev.kong-mtls/upstream/echo"]),
        "upstream_impostor": issuing.server(list(upstream_hosts), ips=["127.0.0.1"],
                                            sans_uris=["spiffe://dev.kong-mtls/upstream/impostor"]),
    }
    cas = {"root_ca": root, "issuing_ca": issuing, "stranger_ca": stranger, "aop_ca": aop,
           "echo_upstream_ca": echo_ca}
    for name, ca in cas.items():
        _write(paths[name], ca.cert_pem, 0o644)
        _write(paths[name][:-4] + ".key", key_pem(ca.key), 0o600)
    for name, item in issued.items():
        _write(paths[name], item.chain_pem, 0o644)
        _write(paths[name][:-4] + ".key", item.key_pem, 0o600)
    return paths


def _write(path: str, text: str, mode: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)
