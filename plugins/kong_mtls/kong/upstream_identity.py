"""Kong adapter for the upstream-identity plugin: Kong checks who the upstream is before proxying.

Per request (access phase):
1. `kong.service.set_tls_verify(true)` (and `set_tls_verify_depth(n)` when configured), so Kong
   verifies the upstream's chain and name on a connection it opens for the request even if the
   Service says otherwise;
2. `kong.router.get_service()` (one call): the Service must be one whose connections only Kong's own
   verification against its own CAs protects (`core.upstream.service_tls_problem`: TLS, `tls_verify`,
   `ca_certificates`, a `client_certificate` that gives it its own connection pool); then
   `kong.router.get_route()`: a route with `preserve_host` is refused (Kong would send and verify
   the client's Host); the probe target is the configured `host`/`port`, else the Service's;
3. the verdict for that target comes from the instance's cache. The probe itself (connect, TLS
   handshake: blocking network I/O) runs in gevent's thread pool — the plugin server runs gevent
   without monkey-patching, so a blocking socket in a greenlet would stall every request. A fresh
   verdict is served at once; past half its TTL it is still served and refreshed in the background;
   with no usable verdict the request waits cooperatively for the probe, at most the probe timeout.
   The probe monitors: a verdict that saw another identity is counted (`alarms`) and logged once at
   err; every verdict but IDENTITY_OK refuses (fail closed), yet a pass vouches only for what the
   probe saw, not for Kong's connection;
4. pass: one `kong.ctx.shared.set` of the mark the fail-closed guard requires; refusal: 502 with the
   reason code in the log.

A pass with a cached verdict costs 4 PDK calls (5 with `tls_verify_depth`). The identity logic is
kong_mtls.core.upstream; docs/upstream-identity.md.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import gevent
from gevent.event import AsyncResult

from kong_mtls import schema
from kong_mtls.constants import UPSTREAM_IDENTITY, shared_mark
from kong_mtls.core.upstream import (
    MESSAGE_UNVERIFIED,
    REFUSAL_STATUS,
    Freshness,
    Reason,
    Target,
    UpstreamPolicy,
    Verdict,
    VerdictCache,
    check,
    check_server_name,
    preserved_host_problem,
    service_tls_problem,
)
from kong_mtls.kong.runtime import Refusal, log_line, pdk_log, phase
from kong_mtls.kong.server import serve
from kong_mtls.schema import ConfigError

MARK = shared_mark(UPSTREAM_IDENTITY)
DEFAULT_PORT = 443
#: Extra time a waiting request allows beyond the probe timeout (thread hand-off, scheduling).
WAIT_MARGIN = 0.5
#: Alarms kept for the next request to log (beyond: the oldest go, `alarms=N` still counts them).
MAX_UNLOGGED_ALARMS = 16

Schema = [
    schema.string("host", len_min=1),
    schema.integer("port", between=(1, 65535)),
    schema.string("sni", len_min=1),
    schema.string("trusted_ca_pem", len_min=1),
    schema.strings("trusted_ca_files", default=[]),
    schema.string("client_cert_file", len_min=1),
    schema.string("client_key_file", len_min=1),
    schema.strings("expected_dns_names", default=[]),
    schema.strings("expected_uris", default=[]),
    schema.strings("spki_sha256_pins", default=[]),
    schema.boolean("verify_hostname", default=True),
    schema.boolean("enforce_tls_verify", default=True),
    schema.integer("tls_verify_depth", between=(0, 64)),
    schema.number("cache_ttl", default=60, between=(1, 86400)),
    schema.number("failure_ttl", default=5, between=(1, 3600)),
    schema.number("probe_timeout", default=5, between=(0.1, 60)),
    schema.integer("expiry_warning_days", default=14, between=(0, 3650)),
]


class Plugin:
    def __init__(self, config: Mapping[str, Any]) -> None:
        conf = schema.validate(Schema, config)
        self.policy = UpstreamPolicy.build(
            trusted_ca_pem=conf["trusted_ca_pem"], trusted_ca_files=conf["trusted_ca_files"],
            client_cert_file=conf["client_cert_file"], client_key_file=conf["client_key_file"],
            expected_dns_names=conf["expected_dns_names"], expected_uris=conf["expected_uris"],
            spki_sha256_pins=conf["spki_sha256_pins"], verify_hostname=conf["verify_hostname"],
            timeout=conf["probe_timeout"], expiry_warning_days=conf["expiry_warning_days"],
            field_names={"timeout": "probe_timeout"})
        if conf["sni"] is not None:
            try:
                check_server_name(conf["sni"])
            except ValueError as exc:
                raise ConfigError("sni", str(exc)) from None
        self.fixed_target: Target | None = None
        if conf["host"] is not None:
            try:
                self.fixed_target = Target(conf["host"], conf["port"] or DEFAULT_PORT, conf["sni"])
            except ValueError as exc:
                raise ConfigError("host", str(exc)) from None
        self.port: int | None = conf["port"]
        self.sni: str | None = conf["sni"]
        self.enforce_tls_verify: bool = conf["enforce_tls_verify"]
        if not self.enforce_tls_verify:
            self.start_notices = (("err", log_line(
                UPSTREAM_IDENTITY, "instance", reason="TLS_VERIFY_NOT_ENFORCED",
                detail="enforce_tls_verify is false: tls_verify is not set per request; requests are "
                       "refused unless the Service sets tls_verify itself")),)
        self.tls_verify_depth: int | None = conf["tls_verify_depth"]
        self.wait_timeout = conf["probe_timeout"] + WAIT_MARGIN
        self.cache = VerdictCache(conf["cache_ttl"], conf["failure_ttl"])
        self._inflight: dict[Target, AsyncResult] = {}
        #: Probes of this instance that saw another identity than the configured one (IDENTITY_ALARMS).
        self.alarms = 0
        #: Their verdicts, until a request logs them: a background refresh's alarm is logged even when
        #: no request uses that verdict before the next probe replaces it.
        self._unlogged_alarms: deque[tuple[int, Verdict]] = deque(maxlen=MAX_UNLOGGED_ALARMS)

    @phase(UPSTREAM_IDENTITY)
    def access(self, kong: Any) -> Refusal | None:
        if self.enforce_tls_verify:
            kong.service.set_tls_verify(True)
            if self.tls_verify_depth is not None:
                kong.service.set_tls_verify_depth(self.tls_verify_depth)
        service = kong.router.get_service()
        target = self.fixed_target or self._service_target(service)
        if isinstance(target, Verdict):
            return _refusal(target)
        problem = (service_tls_problem(service, target)
                   or preserved_host_problem(kong.router.get_route(), target))
        if problem is not None:
            return _refusal(problem)
        verdict = self._verdict(kong, target)
        if self.cache.first_use(target):
            self._announce(kong, verdict)
        while self._unlogged_alarms:
            count, seen = self._unlogged_alarms.popleft()
            pdk_log(kong, UPSTREAM_IDENTITY, "err",
                    log_line(UPSTREAM_IDENTITY, "alarm", reason=seen.reason.value, alarms=count,
                             detail=seen.describe()))
        if not verdict.ok:
            return _refusal(verdict)
        kong.ctx.shared.set(MARK, verdict.mark())
        return None

    def _announce(self, kong: Any, verdict: Verdict) -> None:
        """Once per verdict: its expiry warnings. (Alarms are logged from `_unlogged_alarms`, once
        per probe that saw another identity, by the next request whatever verdict it uses.)"""
        for notice in verdict.notices:
            pdk_log(kong, UPSTREAM_IDENTITY, "warn",
                    log_line(UPSTREAM_IDENTITY, "warning", reason=notice.notice.value,
                             target=str(verdict.target), detail=notice.describe()))

    def _service_target(self, service: Any) -> Target | Verdict:
        placeholder = Target("service", self.port or DEFAULT_PORT)
        if not isinstance(service, Mapping) or not service.get("host"):
            return Verdict.failure(placeholder, Reason.NO_TARGET,
                                   "no Service for this request; set the plugin's host")
        port = self.port or service.get("port") or DEFAULT_PORT
        try:
            return Target(str(service["host"]), int(port), self.sni)
        except (TypeError, ValueError) as exc:
            return Verdict.failure(placeholder, Reason.NO_TARGET, f"unusable service target: {exc}")

    def _verdict(self, kong: Any, target: Target) -> Verdict:
        verdict, freshness = self.cache.lookup(target)
        if freshness is Freshness.FRESH:
            return verdict
        job = self._probe(target)
        if freshness is Freshness.REFRESH_DUE:
            return verdict  # still valid; the probe refreshes it in the background
        # No usable verdict: wait for the probe, and say so in Kong's log (other events of the
        # server go on meanwhile: the wait is a gevent wait).
        pdk_log(kong, UPSTREAM_IDENTITY, "info", log_line(UPSTREAM_IDENTITY, "probing", target=str(target),
                                                          reason=f"{freshness.value}_VERDICT"))
        try:
            return job.get(timeout=self.wait_timeout)
        except gevent.Timeout:
            return Verdict.failure(target, Reason.PROBE_TIMEOUT,
                                   f"no verdict within {self.wait_timeout:g}s")

    def _probe(self, target: Target) -> AsyncResult:
        """Start a probe of `target` unless one is already running (one per target at a time)."""
        job = self._inflight.get(target)
        if job is None:
            job = self._inflight[target] = AsyncResult()
            gevent.spawn(self._run_probe, target, job)
        return job

    def _run_probe(self, target: Target, job: AsyncResult) -> None:
        try:
            verdict = gevent.get_hub().threadpool.apply(check, (target, self.policy))
        except Exception as exc:  # check() does not raise; the thread pool itself might
            verdict = Verdict.failure(target, Reason.PROBE_ERROR, f"{type(exc).__name__}: {exc}")
        if verdict.alarm:
            self.alarms += 1
            self._unlogged_alarms.append((self.alarms, verdict))
        self.cache.store(target, verdict)
        self._inflight.pop(target, None)
        job.set(verdict)


def _refusal(verdict: Verdict) -> Refusal:
    return Refusal(REFUSAL_STATUS, MESSAGE_UNVERIFIED, verdict.reason.value, verdict.describe())


def main(argv: Sequence[str] | None = None) -> int:
    return serve(UPSTREAM_IDENTITY, Plugin, Schema, argv)


if __name__ == "__main__":
    sys.exit(main())
