"""The benchmarked paths, built once with their PKI, keys and plugin servers."""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from bench.load import Case
from kong_mtls.core.api_keys import NewKey, credential_entry, generate_key
from tests.harness.kong_side import Consumer, Outcome, PluginServerProcess, Request
from tests.harness.pki import TestPKI
from tests.harness.tls import capture_client_chain

CLOUDFLARE_PEER = "172.68.10.20"
VISITOR = "203.0.113.50"
ALICE = Consumer(id="6b3c8a2e-9a4f-4e53-8f0e-2f5b0c1d7a11", username="alice")
COLD_CHAINS = 200


@dataclass
class World:
    """Everything the cases share: servers (started once), PKI, one API key."""

    pki: TestPKI = field(default_factory=TestPKI)
    servers: dict[str, PluginServerProcess] = field(default_factory=dict)

    def server(self, name: str, module: str | None = None) -> PluginServerProcess:
        if name not in self.servers:
            self.servers[name] = PluginServerProcess(name, module).start()
        return self.servers[name]

    def close(self) -> None:
        for server in self.servers.values():
            server.close()


@contextlib.contextmanager
def world() -> Iterator[World]:
    w = World()
    try:
        yield w
    finally:
        w.close()


def bare(w: World, split: tuple[int, ...]) -> Case:
    """Bare plugins making the same PDK calls per plugin event as a measured path (`split`)."""
    server = w.server("bare", "bench.bare_plugin")
    label = " + ".join(str(n) for n in split)
    plugins = len(split)
    name = f"bare plugin{'s' if plugins > 1 else ''}, {label} call{'s' if sum(split) > 1 else ''}"
    # One instance per position, as Kong has one per configured plugin.
    return Case(name, [(server, {"calls": n, "__plugin_id": f"bare-{i}"}) for i, n in enumerate(split)],
                lambda i: Request())


def replay(w: World, case: Case, outcome: Outcome) -> Case:
    """Replay plugins making exactly the PDK calls (arguments included) each of `outcome`'s plugin
    events made."""
    server = w.server("replay", "bench.replay_plugin")
    calls = list(zip(outcome.pdk_calls, outcome.pdk_args))
    plugins, start = [], 0
    for i, (_, count) in enumerate(outcome.events):
        recorded = json.dumps(calls[start:start + count], default=str)
        plugins.append((server, {"calls": recorded, "__plugin_id": f"replay-{i}"}))
        start += count
    return Case(f"replay of {case.name}", plugins, case.request, consumers=case.consumers)


def ip_allowlist_config() -> dict:
    return {"source": "header", "header_name": "CF-Connecting-IP", "trusted_proxies_presets": ["cloudflare"],
            "client_ip_header": "X-Real-Client-IP"}


def ip_allowlist(w: World, *, cold: bool = False) -> Case:
    def visitor(i: int) -> str:
        return f"198.{18 + (i >> 16) % 2}.{(i >> 8) % 256}.{i % 256}" if cold else VISITOR

    suffix = ", cold (a new visitor each time)" if cold else ""
    return Case(f"ip-allowlist (Cloudflare peer, CF-Connecting-IP){suffix}",
                [(w.server("ip-allowlist"), ip_allowlist_config())],
                lambda i: Request(client_ip=CLOUDFLARE_PEER, headers={"CF-Connecting-IP": visitor(i)}))


UPSTREAM_HOST = "upstream.test"


@contextlib.contextmanager
def upstream_config(w: World) -> Iterator[dict]:
    """An upstream-identity config for a real TLS upstream on loopback that requires Kong's client
    certificate; the upstream runs while the context is open."""
    from kong_mtls.devpki import SERVER_AUTH, SubjectAltNames, name
    from tests.harness.tls_servers import TLSUpstream, write_pem_files

    pki = w.pki
    cert = pki.intermediate.issue(name(UPSTREAM_HOST), sans=SubjectAltNames(dns=[UPSTREAM_HOST]),
                                  extended_key_usage=(SERVER_AUTH,))
    with tempfile.TemporaryDirectory() as tmp, TLSUpstream(cert, client_cas=[pki.root]) as upstream:
        cert_file, key_file = write_pem_files(tmp, pki.client("kong-gateway"), "kong")
        yield {"host": "127.0.0.1", "port": upstream.port, "sni": UPSTREAM_HOST,
               "trusted_ca_pem": pki.root.cert_pem, "client_cert_file": cert_file,
               "client_key_file": key_file, "expected_dns_names": [UPSTREAM_HOST]}


@contextlib.contextmanager
def upstream_identity(w: World) -> Iterator[tuple[Case, Callable[[str], Case]]]:
    """The warm case (verdict cached) and a factory of first-use cases (a new plugin instance: its
    first request waits for the probe)."""
    with upstream_config(w) as config:
        server = w.server("upstream-identity")

        def first_use(plugin_id: str) -> Case:
            return Case("upstream-identity, first use", [(server, {**config, "__plugin_id": plugin_id})],
                        lambda i: Request())

        warm = Case("upstream-identity, warm (verdict cached)", [(server, config)], lambda i: Request())
        yield warm, first_use


def client_cert_config(w: World, *, cold: bool = False) -> dict:
    config = {"ca_certificates": [w.pki.root.cert_pem], "revocation_check_mode": "SKIP",
              "groups_from": ["dn:OU"]}
    if cold:
        config.update({"cache_size": 0, "consumer_cache_ttl": 0})
    return config


def client_cert_auth(w: World, *, cold: bool = False) -> Case:
    server_cert = w.pki.root.server(["kong.test"])
    if cold:
        chains = [capture_client_chain(w.pki.client("alice", organizational_units=["payments"]), server_cert)
                  for _ in range(COLD_CHAINS)]
    else:
        chains = [capture_client_chain(w.pki.alice, server_cert)]
    return Case(f"client-cert-auth, {'cold (chain and consumer not cached)' if cold else 'warm'}",
                [(w.server("client-cert-auth"), client_cert_config(w, cold=cold))],
                lambda i: Request(client_chain_pem=chains[i % len(chains)]), consumers=[ALICE])


def api_key_config(key: NewKey, *, cold: bool = False) -> dict:
    return {"credentials": [credential_entry(key.key, "alice", key.key_id)],
            "consumer_cache_ttl": 0 if cold else 60}


def api_key_auth(w: World, key: NewKey, *, cold: bool = False) -> Case:
    return Case(f"api-key-auth, {'cold (consumer not cached)' if cold else 'warm'}",
                [(w.server("api-key-auth"), api_key_config(key, cold=cold))],
                lambda i: Request(headers={"apikey": key.key}), consumers=[ALICE])


def full_chain(w: World, key: NewKey) -> Case:
    chain = capture_client_chain(w.pki.alice, w.pki.root.server(["kong.test"]))
    return Case("ip-allowlist + client-cert-auth + api-key-auth, warm",
                [(w.server("ip-allowlist"), ip_allowlist_config()),
                 (w.server("client-cert-auth"), client_cert_config(w)),
                 (w.server("api-key-auth"), api_key_config(key))],
                lambda i: Request(client_ip=CLOUDFLARE_PEER, client_chain_pem=chain,
                                  headers={"CF-Connecting-IP": VISITOR, "apikey": key.key}),
                consumers=[ALICE])


def new_key() -> NewKey:
    return generate_key()
