"""The upstream-identity adapter in-process (gevent, no plugin server): config, refresh-ahead,
single flight. The protocol tests cover the same plugin through the real plugin server."""

from __future__ import annotations

import gevent
import pytest

from kong_mtls.constants import UPSTREAM_IDENTITY, shared_mark
from kong_mtls.core.upstream import MESSAGE_UNVERIFIED, REFRESH_FRACTION, CertSummary, Reason, Target
from kong_mtls.devpki import SERVER_AUTH, SubjectAltNames, name
from kong_mtls.kong.upstream_identity import Plugin
from kong_mtls.schema import ConfigError
from tests.harness.tls_servers import TLSUpstream, closed_port, write_pem_files

HOST = "upstream.test"
MARK = shared_mark(UPSTREAM_IDENTITY)


#: What `kong.router.get_service()` gives for a Service that verifies its upstream with its own CAs,
#: on connections of its own (its own client certificate entity).
VERIFYING_SERVICE = {"name": "svc", "host": HOST, "port": 443, "protocol": "https", "tls_verify": True,
                     "ca_certificates": ["00000000-0000-4000-8000-00000000c001"],
                     "client_certificate": {"id": "00000000-0000-4000-8000-00000000d001"}}


class FakeKong:
    """Just the PDK calls the plugin makes, recorded."""

    def __init__(self, service: dict | None = VERIFYING_SERVICE, route: dict | None = None) -> None:
        self.calls: list[tuple] = []
        self.shared: dict = {}
        self.exit: tuple | None = None
        kong = self

        class _NS:
            def __init__(self, prefix: str) -> None:
                self.prefix = prefix

            def __getattr__(self, attr: str):
                attr = attr.rstrip(".")  # Kong ignores the punctuation of a PDK method name

                def call(*args):
                    kong.calls.append((f"{self.prefix}.{attr}", *args))
                    if f"{self.prefix}.{attr}" == "ctx.shared.set":
                        kong.shared[args[0]] = args[1]
                    if f"{self.prefix}.{attr}" == "response.exit":
                        kong.exit = args
                    if f"{self.prefix}.{attr}" == "router.get_service":
                        return service
                    if f"{self.prefix}.{attr}" == "router.get_route":
                        return route
                    return None
                return call

        self.service, self.log, self.response, self.router = (_NS("service"), _NS("log"), _NS("response"),
                                                              _NS("router"))
        self.ctx = type("Ctx", (), {"shared": _NS("ctx.shared")})()

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def upstream(pki):
    cert = pki.intermediate.issue(name(HOST), sans=SubjectAltNames(dns=[HOST]),
                                  extended_key_usage=(SERVER_AUTH,))
    with TLSUpstream(cert, client_cas=[pki.root]) as server:
        yield server


@pytest.fixture
def conf(pki, upstream, tmp_path):
    cert, key = write_pem_files(tmp_path, pki.client("kong-gateway"), "kong")
    return {"host": "127.0.0.1", "port": upstream.port, "sni": HOST, "trusted_ca_pem": pki.root.cert_pem,
            "client_cert_file": cert, "client_key_file": key, "cache_ttl": 60, "probe_timeout": 3}


def plugin_with_clock(conf: dict) -> tuple[Plugin, Clock]:
    plugin = Plugin(conf)
    clock = Clock()
    plugin.cache.clock = clock
    return plugin, clock


def wait_idle(plugin: Plugin) -> None:
    for _ in range(500):
        if not plugin._inflight:
            return
        gevent.sleep(0.01)
    raise AssertionError("probe still running")


def test_refresh_ahead_serves_from_cache_and_probes_in_background(conf, upstream):
    plugin, clock = plugin_with_clock(conf)
    start = upstream.connection_count
    cold = FakeKong()
    plugin.access(cold)
    assert cold.exit is None and cold.shared[MARK]["reason"] == "IDENTITY_OK"
    assert "log.info" in cold.names() and upstream.connection_count == start + 1

    clock.t = 60 * REFRESH_FRACTION + 1          # past the refresh point, within the TTL
    warm = FakeKong()
    plugin.access(warm)
    assert warm.exit is None and warm.names() == ["service.set_tls_verify", "router.get_service",
                                                  "router.get_route", "ctx.shared.set"]
    assert plugin._inflight, "a background refresh is running"
    wait_idle(plugin)
    assert upstream.connection_count == start + 2

    clock.t += 1                                  # the refreshed verdict is fresh again
    plugin.access(FakeKong())
    assert not plugin._inflight and upstream.connection_count == start + 2

    clock.t += 61                                 # expired: the request waits for a new probe
    late = FakeKong()
    plugin.access(late)
    assert "log.info" in late.names() and late.exit is None and upstream.connection_count == start + 3


def test_a_replaced_upstream_key_is_noticed_only_after_the_ttl(conf, pki):
    """What the probe does not guarantee: within the TTL, a changed upstream is not seen."""
    original = pki.intermediate.server([HOST])
    with TLSUpstream(original, client_cas=[pki.root]) as server:
        plugin, clock = plugin_with_clock(dict(conf, port=server.port, spki_sha256_pins=[
            CertSummary.of(original.cert).spki_b64]))
        first = FakeKong()
        plugin.access(first)
        assert first.exit is None
        server.present(pki.intermediate.server([HOST]))   # same CA and name, another key
        clock.t = 10
        cached = FakeKong()
        plugin.access(cached)
        assert cached.exit is None, "still the cached verdict"
        clock.t = 61
        after = FakeKong()
        plugin.access(after)
        assert after.exit[0] == 502
        assert "reason=SPKI_MISMATCH" in next(c for c in after.calls if c[0] == "log.warn")[1]


def test_concurrent_requests_share_one_probe(conf, upstream):
    plugin = Plugin(conf)
    start = upstream.connection_count
    kongs = [FakeKong() for _ in range(5)]
    gevent.joinall([gevent.spawn(plugin.access, k) for k in kongs], timeout=10, raise_error=True)
    assert all(k.exit is None and MARK in k.shared for k in kongs)
    assert upstream.connection_count == start + 1


def test_refusal_goes_through_the_phase_wrapper(conf):
    conf = dict(conf, expected_dns_names=["someone-else.test"])
    kong = FakeKong()
    Plugin(conf).access(kong)
    assert kong.exit[0] == 502 and kong.exit[1] == {"message": MESSAGE_UNVERIFIED}
    assert MARK not in kong.shared
    warn = next(c for c in kong.calls if c[0] == "log.warn")
    assert "reason=SAN_MISMATCH" in warn[1]


def test_a_probe_that_sees_another_identity_alarms_once_per_verdict(conf):
    """Monitoring: each probe that saw another identity is counted and logged once at err; every
    request meanwhile is refused (warn). A probe that could not judge the upstream is no alarm."""
    plugin, clock = plugin_with_clock(dict(conf, expected_dns_names=["someone-else.test"], failure_ttl=5))

    def errors(kong: FakeKong) -> list[str]:
        return [c[1] for c in kong.calls if c[0] == "log.err"]

    first, second = FakeKong(), FakeKong()
    plugin.access(first)
    plugin.access(second)                                  # the same cached verdict
    assert first.exit[0] == second.exit[0] == 502
    assert len(errors(first)) == 1 and not errors(second)
    assert "upstream-identity alarm reason=SAN_MISMATCH alarms=1 " in errors(first)[0]
    assert "reason=SAN_MISMATCH" in next(c for c in second.calls if c[0] == "log.warn")[1]
    clock.t += 5                                          # the refusal expires: probed again
    third = FakeKong()
    plugin.access(third)
    assert plugin.alarms == 2 and "alarms=2" in errors(third)[0]

    # A background refresh that sees another identity, with no request using that verdict before
    # a passing probe replaces it, is still logged by the next request (upstream review).
    plugin.policy = Plugin(conf).policy                    # the upstream's identity is expected again
    clock.t += 5
    fourth = FakeKong()
    plugin.access(fourth)
    assert fourth.exit is None and not errors(fourth)
    plugin.policy = Plugin(dict(conf, expected_dns_names=["someone-else.test"])).policy
    clock.t += 60 * REFRESH_FRACTION + 1                  # due for refresh: served, probed behind
    fifth = FakeKong()
    plugin.access(fifth)
    wait_idle(plugin)
    assert fifth.exit is None and plugin.alarms == 3      # the refresh saw another identity
    clock.t += 5 + 1                                       # its refusal expired unused
    plugin.policy = Plugin(conf).policy
    clock.t += 60
    sixth = FakeKong()
    plugin.access(sixth)
    assert sixth.exit is None and any("alarms=3" in line for line in errors(sixth)), sixth.calls

    down = Plugin(dict(conf, port=closed_port()))
    unreachable = FakeKong()
    down.access(unreachable)
    assert unreachable.exit[0] == 502 and not errors(unreachable) and down.alarms == 0


def test_a_service_without_a_pool_of_its_own_is_refused_before_any_probe(conf, upstream):
    start = upstream.connection_count
    for change in ({"client_certificate": None}, {"protocol": "grpcs"}):
        kong = FakeKong(service={**VERIFYING_SERVICE, **change})
        Plugin(conf).access(kong)
        assert kong.exit[0] == 502 and MARK not in kong.shared
        assert "reason=SERVICE_POOL_SHARED" in next(c for c in kong.calls if c[0] == "log.warn")[1]
    assert upstream.connection_count == start


def test_enforce_tls_verify_can_be_turned_off(conf):
    kong = FakeKong()
    Plugin(dict(conf, enforce_tls_verify=False)).access(kong)
    assert "service.set_tls_verify" not in kong.names() and MARK in kong.shared


def test_service_target_needs_a_host(conf):
    conf = dict(conf)
    del conf["host"]
    kong = FakeKong(service=None)
    Plugin(conf).access(kong)
    assert kong.exit[0] == 502
    assert "reason=NO_TARGET" in next(c for c in kong.calls if c[0] == "log.warn")[1]


@pytest.mark.parametrize("change, field", [
    ({"host": "bad host"}, "host"),
    ({"sni": "bad sni"}, "sni"),
    ({"trusted_ca_pem": None}, "trusted_ca_pem"),
    ({"client_key_file": None}, "client_key_file"),
    ({"probe_timeout": 0}, "probe_timeout"),
    ({"cache_ttl": 0}, "cache_ttl"),
    ({"spki_sha256_pins": ["nope"]}, "spki_sha256_pins[1]"),
    ({"tls_verify_depth": 100}, "tls_verify_depth"),
])
def test_bad_config_names_the_field(conf, change, field):
    with pytest.raises(ConfigError) as err:
        Plugin(dict(conf, **change))
    assert err.value.field == field


@pytest.mark.parametrize(("route", "refused"), [
    ({"name": "r", "preserve_host": True}, True), ({"name": "r", "preserve_host": False}, False),
    ({"name": "r"}, False), (None, False),
])
def test_a_route_preserving_the_clients_host_is_refused(route, refused):
    """With preserve_host Kong sends and verifies the client's Host (upstream review): 502
    UPSTREAM_HOST_CHANGED."""
    from kong_mtls.core.upstream import preserved_host_problem
    problem = preserved_host_problem(route, Target(HOST, 443))
    assert (problem is not None) is refused
    if refused:
        assert problem.reason is Reason.UPSTREAM_HOST_CHANGED
