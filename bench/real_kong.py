"""`./dev bench --kong`: our plugins in a real Kong, next to Kong's own plugins, under `wrk`.

Starts, from temporary prefixes: a static upstream (Kong's own openresty with one `return 200`
location), a TLS client proxy (the same openresty, presenting alice's dev client certificate to
Kong, because `wrk` cannot present one), and Kong itself ($KONG_BIN or `--kong`): DB-less, one nginx
worker unless asked, our plugin servers started by Kong from this Python environment. Then `wrk`
(keep-alive, 8 connections, pinned to the last core, Kong's worker pinned to the first) measures
every route once per round, in a rotating order, for several rounds, and the table gives medians:
requests/s, p50 and p99 latency, the ratio to the route without plugins (plain HTTP, or TLS with a
client certificate for the mTLS route), and CPU per request of each process, from the scheduler's
count (/proc/<pid>/task/*/schedstat, children included) before and after each measurement.

Every measured answer must be a 2xx (wrk's own count), and every route with one of our plugins must
have used CPU in its plugin servers: a refusal or a route without its plugins would be fast and wrong.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kong_mtls.constants import (
    API_KEY_AUTH,
    CLIENT_CERT_AUTH,
    CLIENT_CERT_REQUEST,
    GUARD,
    IP_ALLOWLIST,
    PLUGIN_MODULES,
    VERDICT_CACHED_PLUGINS,
)
from kong_mtls.core.api_keys import generate_key, hash_key
from kong_mtls.devpki import write_dev_pki
from kong_mtls.guard import guard_plugin

#: Kong's bundled openresty, used for the static upstream and the TLS client proxy.
OPENRESTY_CANDIDATES = ("/opt/kong/openresty/nginx/sbin/nginx", "/usr/local/openresty/nginx/sbin/nginx")
#: Our plugin servers this bench needs (client-cert-request asks TLS clients for a certificate).
PLUGINS = (IP_ALLOWLIST, CLIENT_CERT_AUTH, API_KEY_AUTH, CLIENT_CERT_REQUEST)
#: The baseline plugin (bench/bare_plugin.py: N PDK reads and nothing else), served like ours.
BARE = "bare"
BARE_SCRIPT = Path(__file__).resolve().parent / "bare_plugin.py"
#: The floor (bench/floor_server.py): the bare plugin's replies from the plainest Python server.
FLOOR = "floor"
FLOOR_SCRIPT = Path(__file__).resolve().parent / "floor_server.py"
#: The benchmark's own plugin servers (not kong-mtls plugins), by name: their scripts.
BENCH_SERVERS = {BARE: BARE_SCRIPT, FLOOR: FLOOR_SCRIPT}
LOOPBACK = ["127.0.0.0/8"]
#: Client addresses of the many-clients route (10.0.0.0 up), at random per request.
DISTINCT_CLIENTS = 65536
#: wrk's request function for that route: `%d` is the number of addresses.
DISTINCT_CLIENTS_SCRIPT = """
math.randomseed(os.time())
request = function()
  local n = math.random(0, %d - 1)
  local ip = string.format("10.0.%%d.%%d", math.floor(n / 256) %% 256, n %% 256)
  return wrk.format(nil, nil, { ["X-Forwarded-For"] = ip })
end
"""
START_TIMEOUT = 120.0
#: CPU per request above which a plugin server not on the route is shown anyway, µs.
BUSY_US = 5.0


@dataclass(frozen=True)
class Route:
    """One benchmarked route: its path, whether it is reached through the TLS client proxy, whether
    it needs the API key, its plugins, and the route it is compared with."""

    key: str
    label: str
    plugins: tuple[dict, ...] = ()
    tls: bool = False
    api_key: bool = False
    baseline: str = "plain"
    #: When not 0: each request's X-Forwarded-For is one of this many client addresses, at random.
    distinct_clients: int = 0

    @property
    def served(self) -> list[str]:
        """The plugins of this route served by a plugin server (ours and the bare baseline)."""
        return [p["name"] for p in self.plugins if p["name"] in PLUGIN_MODULES or p["name"] in BENCH_SERVERS]

    @property
    def asked(self) -> list[str]:
        """The plugins whose server every request asks (no verdict cache answers for them)."""
        return [p["name"] for p in self.plugins if p["name"] in self.served
                and (p["name"] not in VERDICT_CACHED_PLUGINS or p["config"].get("verdict_cache_ttl") == 0)]


def guard(*plugins: str) -> dict:
    """The route's kong-mtls-guard (the Lua plugin: its verdict cache answers warm requests)."""
    return guard_plugin(plugins)


def uncached(plugin: dict) -> dict:
    """`plugin` with the verdict cache off: every request asks its plugin server (the protocol's
    floor for the path)."""
    return {**plugin, "config": {**plugin["config"], "verdict_cache_ttl": 0}}


def bare(calls: int, server: str = BARE) -> dict:
    return {"name": server, "config": {"calls": calls}}


def routes(pki: Path, key_id: str, key_hash: str) -> list[Route]:
    ip_restriction = {"name": "ip-restriction", "config": {"allow": LOOPBACK}}
    key_auth = {"name": "key-auth", "config": {"key_names": ["apikey"]}}
    ip_allowlist = {"name": IP_ALLOWLIST, "config": {"allow": LOOPBACK}}
    by_forwarded_for = {"name": IP_ALLOWLIST, "config": {
        "source": "header", "header_name": "X-Forwarded-For", "trusted_proxies": LOOPBACK,
        "allow": ["10.0.0.0/8"]}}
    api_key_auth = {"name": API_KEY_AUTH, "config": {
        "key_names": ["apikey"],
        "credentials": [{"id": key_id, "hash": key_hash, "consumer": "alice"}]}}
    client_cert_auth = {"name": CLIENT_CERT_AUTH, "config": {  # as the /mtls route of kong/kong.yml
        "ca_certificate_files": [str(pki / "ca" / "root.pem")],
        "revocation_check_mode": "SKIP",
        "consumer_mappings": [{"subject_name": "spiffe://dev.kong-mtls/ns/payments/sa/alice",
                               "consumer": "alice"}],
        "consumer_by": ["username"],
        "groups_from": ["dn:OU"]}}
    return [
        Route("plain", "no plugins"),
        Route("ip-restriction", "Kong's `ip-restriction`", (ip_restriction,)),
        Route("ip-allowlist", "our `ip-allowlist` + guard", (ip_allowlist, guard(IP_ALLOWLIST))),
        Route("key-auth", "Kong's `key-auth`", (key_auth,), api_key=True),
        Route("api-key-auth", "our `api-key-auth` + guard", (api_key_auth, guard(API_KEY_AUTH)),
              api_key=True),
        Route("bare-1", "a bare Python plugin, 1 PDK call", (bare(1),)),
        Route("bare-2", "a bare Python plugin, 2 PDK calls", (bare(2),)),
        Route("bare-4", "a bare Python plugin, 4 PDK calls", (bare(4),)),
        Route("floor-1", "the floor: its replies from a plain epoll loop, 1 PDK call", (bare(1, FLOOR),)),
        Route("floor-4", "the floor: its replies from a plain epoll loop, 4 PDK calls", (bare(4, FLOOR),)),
        Route("kong-chain", "Kong's `ip-restriction` + `key-auth`", (ip_restriction, key_auth), api_key=True),
        Route("our-chain", "our `ip-allowlist` + `api-key-auth` + guard",
              (ip_allowlist, api_key_auth, guard(IP_ALLOWLIST, API_KEY_AUTH)), api_key=True),
        Route("tls", "TLS with a client certificate, no plugins", tls=True),
        Route("mtls", "our `client-cert-auth` + guard, warm", (client_cert_auth, guard(CLIENT_CERT_AUTH)),
              tls=True, baseline="tls"),
        # The same, with every request asking the plugin servers (verdict cache off).
        Route("ip-allowlist-rpc", "our `ip-allowlist` + guard, cache off",
              (uncached(ip_allowlist), guard(IP_ALLOWLIST))),
        Route("api-key-auth-rpc", "our `api-key-auth` + guard, cache off",
              (uncached(api_key_auth), guard(API_KEY_AUTH)), api_key=True),
        Route("our-chain-rpc", "our `ip-allowlist` + `api-key-auth` + guard, cache off",
              (uncached(ip_allowlist), uncached(api_key_auth), guard(IP_ALLOWLIST, API_KEY_AUTH)),
              api_key=True),
        Route("mtls-rpc", "our `client-cert-auth` + guard, warm, cache off",
              (uncached(client_cert_auth), guard(CLIENT_CERT_AUTH)), tls=True, baseline="tls"),
        # Many clients behind a trusted proxy: most requests are new to the verdict cache (which
        # keeps 10,000 per config), so they ask the plugin server; the cache's memory stays bounded.
        Route("ip-allowlist-clients", f"our `ip-allowlist` + guard, {DISTINCT_CLIENTS:,} clients by "
              "X-Forwarded-For", (by_forwarded_for, guard(IP_ALLOWLIST)), distinct_clients=DISTINCT_CLIENTS),
    ]


#: The routes of the run with several nginx workers.
MULTI_WORKER_ROUTES = ("plain", "kong-chain", "ip-allowlist", "our-chain", "our-chain-rpc", "mtls", "tls")


def kong_config(route_list: Sequence[Route], upstream_port: int, api_key: str) -> dict:
    """The declarative config: one Service on the static upstream, a route per `Route`."""
    return {
        "_format_version": "3.0",
        "plugins": [{"name": CLIENT_CERT_REQUEST}],
        "consumers": [{"username": "alice", "keyauth_credentials": [{"key": api_key}]}],
        "services": [{
            "name": "static", "url": f"http://127.0.0.1:{upstream_port}",
            "routes": [{"name": r.key, "paths": [f"/{r.key}"], "strip_path": False,
                        "protocols": ["https"] if r.tls else ["http"],
                        "plugins": [dict(p) for p in r.plugins]} for r in route_list],
        }],
    }


# -- parsing (unit-tested in tests/unit/test_bench_real_kong.py) -----------------------------------

@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_us: float
    p99_us: float
    non_2xx: int
    socket_errors: int


_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}
_DURATION = re.compile(r"^\s*([\d.]+)(us|ms|s|m|h)\s*$")


def wrk_duration_us(text: str) -> float:
    """A wrk latency (`412.00us`, `1.20ms`, `2.00s`) in microseconds."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> WrkResult:
    """What `wrk --latency` printed: totals, the 50% and 99% latencies, error counts."""
    totals = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h),", output, re.MULTILINE)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    p50 = re.search(r"^\s+50(?:\.000)?%\s+(\S+)", output, re.MULTILINE)
    p99 = re.search(r"^\s+99(?:\.000)?%\s+(\S+)", output, re.MULTILINE)
    if not (totals and rps and p50 and p99):
        raise ValueError(f"unexpected wrk output (run with --latency?):\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return WrkResult(
        requests=int(totals.group(1)),
        seconds=wrk_duration_us(totals.group(2) + totals.group(3)) / 1e6,
        rps=float(rps.group(1)),
        p50_us=wrk_duration_us(p50.group(1)),
        p99_us=wrk_duration_us(p99.group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
    )


def parse_proc_stat(text: str) -> tuple[int, int]:
    """(ppid, utime + stime in clock ticks) from the text of /proc/<pid>/stat. The command name
    (field 2) is in parentheses and may hold spaces and parentheses itself: fields are counted
    from its last `)`."""
    end = text.rfind(")")
    if end < 0:
        raise ValueError("not a /proc/<pid>/stat line")
    fields = text[end + 1:].split()
    # After the name: state(3) ppid(4) ... utime(14) stime(15), so index field - 3.
    if len(fields) < 13:
        raise ValueError("truncated /proc/<pid>/stat line")
    return int(fields[1]), int(fields[11]) + int(fields[12])


def cpu_ns(pid: int) -> int:
    """CPU time of `pid` (every thread) and of its children (a plugin server with `--processes`
    forks them), in ns: the scheduler's own count (/proc/<pid>/task/<tid>/schedstat). utime and
    stime in /proc/<pid>/stat are sampled at clock ticks, which misjudges a process that wakes for
    a few µs thousands of times a second (a plugin server) by tens of percent either way."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(p) for p in f.read().split()]
    except OSError:
        children = []
    for child in children:
        with contextlib.suppress(OSError):
            total += cpu_ns(child)
    return total


# -- processes -------------------------------------------------------------------------------------

def openresty() -> str:
    for path in (os.environ.get("OPENRESTY_BIN"), *OPENRESTY_CANDIDATES, shutil.which("openresty")):
        if path and os.access(path, os.X_OK):
            return path
    raise SystemExit("bench: no openresty/nginx for the static upstream (set OPENRESTY_BIN)")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _pids() -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


class Openresty:
    """One openresty process (no master, no daemon) serving `server` blocks from its own prefix."""

    def __init__(self, binary: str, name: str, servers: str, cpu: int | None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=f"kmb-{name}-"))
        (self.root / "logs").mkdir()
        conf = self.root / "nginx.conf"
        conf.write_text(
            "daemon off;\nmaster_process off;\nworker_processes 1;\n"
            f"pid {self.root}/nginx.pid;\nerror_log {self.root}/logs/error.log warn;\n"
            "events { worker_connections 1024; }\n"
            "http {\n  access_log off;\n  keepalive_requests 1000000;\n  keepalive_timeout 300s;\n"
            f"{servers}\n}}\n")
        self.process = subprocess.Popen([binary, "-p", str(self.root), "-c", str(conf)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        preexec_fn=_pin(cpu))
        self.pid = self.process.pid

    def check(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"openresty {self.root} exited: {self.process.stderr.read().decode()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.root, ignore_errors=True)


def _pin(cpu: int | None):  # a preexec_fn
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def upstream_servers(port: int) -> str:
    return (f"  server {{ listen 127.0.0.1:{port} reuseport backlog=4096;\n"
            "    location / { default_type text/plain; return 200 \"ok\\n\"; } }")


def tls_proxy_servers(port: int, kong_https: int, cert: Path, key: Path) -> str:
    """Plain HTTP in, TLS to Kong with alice's client certificate, keep-alive on both sides."""
    return (f"  upstream kong_tls {{ server 127.0.0.1:{kong_https}; keepalive 64; "
            "keepalive_requests 1000000; keepalive_timeout 300s; }\n"
            f"  server {{ listen 127.0.0.1:{port} backlog=4096;\n"
            "    location / { proxy_pass https://kong_tls; proxy_http_version 1.1;\n"
            "      proxy_set_header Connection \"\"; proxy_set_header Host localhost;\n"
            f"      proxy_ssl_certificate {cert}; proxy_ssl_certificate_key {key};\n"
            "      proxy_ssl_server_name on; proxy_ssl_name localhost; } }")


def kong_version(binary: str) -> str:
    out = subprocess.run([binary, "version"], capture_output=True, text=True, timeout=60)
    match = re.search(r"(\d+\.\d+\.\d+)", out.stdout + out.stderr)
    if match is None:
        raise SystemExit(f"bench: `{binary} version` printed no version: {out.stdout}{out.stderr}")
    return match.group(1)


@dataclass
class Kong:
    """A Kong started from a temporary prefix with the bench routes."""

    binary: str
    workers: int
    #: Extra arguments for every plugin server's start_cmd (`--processes 2`, say).
    server_args: str = ""
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="kmb-kong-")))
    started: bool = False

    @property
    def prefix(self) -> Path:
        return self.root / "prefix"

    def start(self, config: Mapping, pki: Path, ports: Mapping[str, int]) -> None:
        from tests.integration.support import (
            KONG_CONF_EXAMPLE,
            local_kong_conf,
            parse_kong_conf,
            pluginserver_key,
        )

        version = tuple(int(n) for n in kong_version(self.binary).split("."))
        declarative = self.root / "kong.json"
        declarative.write_text(json.dumps(config))
        conf = local_kong_conf(
            parse_kong_conf(KONG_CONF_EXAMPLE.read_text()), prefix=str(self.prefix), python=sys.executable,
            plugins=list(PLUGINS), declarative_config=str(declarative),
            ports={"http": ports["http"], "https": ports["https"], "admin": ports["admin"]},
            ssl_cert=str(pki / "kong" / "server.pem"), ssl_cert_key=str(pki / "kong" / "server.key"),
            kong_version=version, nginx_user="root root" if os.geteuid() == 0 else None,  # type: ignore[arg-type]
            extra={"nginx_worker_processes": str(self.workers),
                   # As Kong's default proxy_listen: with several workers, each gets its share of
                   # the connections (without reuseport one worker tends to accept them all).
                   "proxy_listen": f"127.0.0.1:{ports['http']} reuseport backlog=16384, "
                                   f"127.0.0.1:{ports['https']} ssl reuseport backlog=16384",
                   # Keep-alive for the whole run on both sides (defaults: 1,000 requests).
                   "nginx_http_keepalive_requests": "1000000",
                   "upstream_keepalive_max_requests": "1000000",
                   "proxy_access_log": "off",
                   "plugins": ",".join(["bundled", *PLUGINS, *BENCH_SERVERS, GUARD]),
                   "pluginserver_names": ",".join([*PLUGINS, *BENCH_SERVERS]),
                   **{key: value for name, script in BENCH_SERVERS.items() for key, value in (
                       (f"pluginserver_{name}_socket", f"{self.prefix}/{name}.sock"),
                       (f"pluginserver_{name}_start_cmd", self._start_cmd(str(script))),
                       (f"pluginserver_{name}_query_cmd", f"{sys.executable} {script} --dump"))},
                   **{pluginserver_key(name, "start_cmd"): self._start_cmd(f"-m {PLUGIN_MODULES[name]}")
                      for name in PLUGINS}})
        (self.root / "kong.conf").write_text(conf)
        self.prefix.mkdir()
        done = subprocess.run([self.binary, "start", "-c", str(self.root / "kong.conf"),
                               "-p", str(self.prefix)], capture_output=True, text=True, timeout=START_TIMEOUT)
        self.started = True
        if done.returncode != 0:
            raise RuntimeError(f"kong start failed:\n{done.stdout}\n{done.stderr}\n"
                               f"{self.error_log()[-3000:]}")

    def _start_cmd(self, entry: str) -> str:
        return f"{sys.executable} {entry} -p {self.prefix} {self.server_args}".rstrip()

    def error_log(self) -> str:
        try:
            return (self.prefix / "logs" / "error.log").read_text(errors="replace")
        except OSError:
            return ""

    def master(self) -> int:
        return int((self.prefix / "pids" / "nginx.pid").read_text().strip())

    def workers_pids(self) -> list[int]:
        master = self.master()
        found = []
        for pid in _pids():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    ppid, _ = parse_proc_stat(f.read())
            except (OSError, ValueError):
                continue
            if ppid == master and "worker process" in _cmdline(pid):
                found.append(pid)
        return sorted(found)

    def plugin_servers(self) -> dict[str, int]:
        """Plugin name -> pid of its server (Kong starts them with `-m <module> -p <prefix>`)."""
        needles = {name: f"-m {PLUGIN_MODULES[name]} -p {self.prefix}" for name in PLUGINS}
        needles.update({name: f"{script} -p {self.prefix}" for name, script in BENCH_SERVERS.items()})
        found: dict[str, list[int]] = {}
        for pid in _pids():
            line = _cmdline(pid)
            for name, needle in needles.items():
                if needle in line:
                    found.setdefault(name, []).append(pid)
        # With --processes, the server's children share its command line: the server is the one
        # whose parent is not one of them.
        return {name: next(p for p in pids if _ppid(p) not in pids) for name, pids in found.items()}

    def stop(self) -> None:
        if self.started:
            subprocess.run([self.binary, "stop", "-p", str(self.prefix)], capture_output=True, timeout=60)
            for pid in self.plugin_servers().values():  # any that outlived Kong
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)
        shutil.rmtree(self.root, ignore_errors=True)


# -- the run ---------------------------------------------------------------------------------------

@dataclass
class Sample:
    wrk: WrkResult
    cpu_us: dict[str, float]  # process label -> CPU µs per request


@dataclass
class Setup:
    """Everything running for one Kong run."""

    kong: Kong
    upstream: Openresty
    proxy: Openresty
    urls: dict[str, str]
    api_key: str
    processes: dict[str, int]
    #: Route key -> wrk script (the many-clients route).
    scripts: dict[str, str]


def check_tools() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("bench: the real-Kong mode needs `wrk` (Debian/Ubuntu: apt-get install -y wrk); "
                         "not found on PATH")
    return wrk


def pinning(workers: int) -> tuple[int | None, int | None]:
    """(Kong's worker core, the load side's core): with one worker, Kong's worker on the first core
    and wrk, the upstream and the TLS proxy on the last; with several, nothing pinned (the workers
    need every core)."""
    cores = sorted(os.sched_getaffinity(0))
    if workers == 1 and len(cores) > 1:
        return cores[0], cores[-1]
    return None, None


@contextlib.contextmanager
def running(binary: str, workers: int, route_list: Sequence[Route], pki: Path, key: str,
            server_args: str = "") -> Iterator[Setup]:
    kong_cpu, load_cpu = pinning(workers)
    ports = {name: free_port() for name in ("http", "https", "admin", "upstream", "proxy")}
    binary_or = openresty()
    upstream = Openresty(binary_or, "upstream", upstream_servers(ports["upstream"]), load_cpu)
    proxy = Openresty(binary_or, "tlsproxy", tls_proxy_servers(ports["proxy"], ports["https"],
                                                               pki / "clients" / "alice.pem",
                                                               pki / "clients" / "alice.key"), load_cpu)
    kong = Kong(binary, workers, server_args)
    try:
        kong.start(kong_config(route_list, ports["upstream"], key), pki, ports)
        workers_found = wait_for(lambda: kong.workers_pids() if len(kong.workers_pids()) == workers else None,
                                 f"{workers} Kong workers", kong)
        if kong_cpu is not None:
            for pid in workers_found:
                os.sched_setaffinity(pid, {kong_cpu})
        urls = {r.key: (f"http://127.0.0.1:{ports['proxy']}/{r.key}" if r.tls
                        else f"http://127.0.0.1:{ports['http']}/{r.key}") for r in route_list}
        for r in route_list:
            probe = {"X-Forwarded-For": "10.0.0.1"} if r.distinct_clients else {}
            wait_for(lambda r=r, probe=probe: http_status(urls[r.key], key if r.api_key else None,
                                                          probe) == 200,
                     f"route {r.key} answering 200", kong)
            if r.api_key and http_status(urls[r.key], None) != 401:
                raise RuntimeError(f"route {r.key} let a request without an API key through")
        upstream.check()
        proxy.check()
        servers = kong.plugin_servers()
        missing = [name for name in (*PLUGINS, *BENCH_SERVERS) if name not in servers]
        if missing:
            raise RuntimeError(f"plugin servers not found: {missing}")
        processes = {(f"nginx worker {n}" if workers > 1 else "nginx worker"): pid
                     for n, pid in enumerate(workers_found, start=1)}
        processes.update({f"{name} server": pid for name, pid in servers.items()})
        processes.update({"upstream nginx": upstream.pid, "TLS client proxy": proxy.pid})
        scripts = {}
        for r in route_list:
            if r.distinct_clients:
                path = kong.root / f"{r.key}.lua"
                path.write_text(DISTINCT_CLIENTS_SCRIPT % r.distinct_clients)
                scripts[r.key] = str(path)
        yield Setup(kong, upstream, proxy, urls, key, processes, scripts)
    finally:
        kong.stop()
        upstream.stop()
        proxy.stop()


def wait_for(check, what: str, kong: Kong, timeout: float = START_TIMEOUT):
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.3)
    raise RuntimeError(f"timed out waiting for {what} ({last!r})\n{kong.error_log()[-3000:]}")


def http_status(url: str, api_key: str | None, headers: Mapping[str, str] | None = None) -> int:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers={**({"apikey": api_key} if api_key else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


def run_wrk(wrk: str, url: str, api_key: str | None, seconds: float, connections: int, threads: int,
            cpu: int | None, script: str | None = None) -> WrkResult:
    command = [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency"]
    if api_key:
        command += ["-H", f"apikey: {api_key}"]
    if script:
        command += ["-s", script]
    done = subprocess.run([*command, url], capture_output=True, text=True, timeout=seconds + 60,
                          preexec_fn=_pin(cpu))
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr}{done.stdout}")
    return parse_wrk(done.stdout)


def measure(setup: Setup, route: Route, wrk: str, seconds: float, connections: int, threads: int,
            cpu: int | None) -> Sample:
    before = {label: cpu_ns(pid) for label, pid in setup.processes.items()}
    result = run_wrk(wrk, setup.urls[route.key], setup.api_key if route.api_key else None, seconds,
                     connections, threads, cpu, setup.scripts.get(route.key))
    after = {label: cpu_ns(pid) for label, pid in setup.processes.items()}
    if result.non_2xx or result.socket_errors:
        raise RuntimeError(f"route {route.key}: {result.non_2xx} non-2xx answers, {result.socket_errors} "
                           f"socket errors\n{setup.kong.error_log()[-3000:]}")
    cpu_us = {label: (after[label] - before[label]) / 1e3 / max(1, result.requests) for label in before}
    # (A route the verdict cache answers shows that it ran by its 2xx answers: its guard plugin
    # answers 503 to a request its plugins left no mark on.)
    idle = [name for name in route.asked if cpu_us[f"{name} server"] == 0]
    if idle:
        raise RuntimeError(f"route {route.key}: plugin servers {idle} used no CPU: did the plugin run?")
    return Sample(result, cpu_us)


@dataclass
class RouteSummary:
    route: Route
    rps: float
    p50_us: float
    p99_us: float
    cpu_us: dict[str, float]
    rounds: int
    requests: int  # per measurement, median


def summarise(route: Route, samples: Sequence[Sample]) -> RouteSummary:
    labels = samples[0].cpu_us
    return RouteSummary(route, statistics.median(s.wrk.rps for s in samples),
                        statistics.median(s.wrk.p50_us for s in samples),
                        statistics.median(s.wrk.p99_us for s in samples),
                        {label: statistics.median(s.cpu_us[label] for s in samples) for label in labels},
                        len(samples), int(statistics.median(s.wrk.requests for s in samples)))


def rss_kb(pid: int) -> int:
    """Resident memory of a process (VmRSS, kB)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@dataclass
class RunResult:
    summaries: list[RouteSummary]
    #: Process label -> resident memory (kB) after the warm-up and after the last round.
    rss_kb: dict[str, tuple[int, int]]


def run(binary: str, *, workers: int, route_keys: Sequence[str] | None, rounds: int, seconds: float,
        warmup: float, connections: int, threads: int, pki: Path, key: str, key_hash: str,
        server_args: str = "", log=print) -> RunResult:
    wrk = check_tools()
    key_id = key.split(".", 1)[0]
    route_list = [r for r in routes(pki, key_id, key_hash) if route_keys is None or r.key in route_keys]
    load_cpu = pinning(workers)[1]
    samples: dict[str, list[Sample]] = {r.key: [] for r in route_list}
    with running(binary, workers, route_list, pki, key, server_args) as setup:
        for r in route_list:  # caches, JIT, keep-alive pools
            measure(setup, r, wrk, warmup, connections, threads, load_cpu)
        gateway = {label: pid for label, pid in setup.processes.items()
                   if label.startswith("nginx worker") or label.endswith(" server")}
        start = {label: rss_kb(pid) for label, pid in gateway.items()}
        for n in range(rounds):
            order = route_list[n % len(route_list):] + route_list[:n % len(route_list)]
            for r in order:
                sample = measure(setup, r, wrk, seconds, connections, threads, load_cpu)
                samples[r.key].append(sample)
                log(f"  round {n + 1}/{rounds} {r.key}: {sample.wrk.rps:,.0f} req/s")
        rss = {label: (start[label], rss_kb(pid)) for label, pid in gateway.items()}
    return RunResult([summarise(r, samples[r.key]) for r in route_list], rss)


# -- report ----------------------------------------------------------------------------------------

def _ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def table(summaries: Sequence[RouteSummary]) -> list[str]:
    """The table: one row per route, CPU µs per request per process (processes that used some)."""
    by_key = {s.route.key: s for s in summaries}
    workers = [label for label in summaries[0].cpu_us if label.startswith("nginx worker")]
    plural = "s" if len(workers) > 1 else ""
    lines = [f"| route | req/s | vs baseline | p50 ms | p99 ms | gateway CPU µs/req | vs baseline, by CPU "
             f"| Kong worker{plural}: CPU µs/req (% of one core) "
             "| plugin servers: CPU µs/req (% of one core) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in summaries:
        base = by_key.get(s.route.baseline)
        ratio = "-" if base is None else f"{s.rps / base.rps:.2f}"
        cpu_ratio = "-" if base is None else f"{gateway_us(base) / gateway_us(s):.2f}"
        if base is not None and s.route.baseline != "plain":
            ratio += f" (vs `{base.route.key}`)"
            cpu_ratio += f" (vs `{base.route.key}`)"
        worker_cpu = " + ".join(f"{s.cpu_us[w]:.0f}" for w in workers)
        total = sum(s.cpu_us[w] for w in workers)
        worker_cpu += (f" = {total:.0f}" if len(workers) > 1 else "") + f" ({total * s.rps / 1e4:.0f}%)"
        # The route's own servers, and any other that was busy.
        servers = [(label.removesuffix(" server"), us) for label, us in s.cpu_us.items()
                   if label.endswith(" server")
                   and (label.removesuffix(" server") in s.route.served or us >= BUSY_US)]
        # µs per request x requests/s: the share of one core the (single-process) server used.
        server_text = ", ".join(f"{name} {us:.0f} ({us * s.rps / 1e4:.0f}%)" for name, us in servers) or "-"
        lines.append(f"| {s.route.label} | {s.rps:,.0f} | {ratio} | {_ms(s.p50_us)} | {_ms(s.p99_us)} | "
                     f"{gateway_us(s):.0f} | {cpu_ratio} | {worker_cpu} | {server_text} |")
    return lines


def gateway_us(summary: RouteSummary) -> float:
    """CPU per request of Kong's workers and all plugin servers (not the load side)."""
    return sum(us for label, us in summary.cpu_us.items()
               if label.startswith("nginx worker") or label.endswith(" server"))


def machine_note() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    return f"{cpu}, {os.cpu_count()} cores shared with the load generator"


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def report(version: str, runs: Mapping[int, RunResult], *, rounds: int, seconds: float,
           connections: int, note: str) -> list[str]:
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out = [f"#### Real Kong {version} ({date})", "",
           f"Machine: {note}. `wrk` with keep-alive, {connections} connections, {seconds:g} s per "
           "measurement, "
           f"median of {rounds} interleaved rounds. Upstream: a static openresty `return 200` on loopback. "
           "TLS routes go through a local openresty that presents alice's client certificate to Kong "
           "(wrk cannot), so their latency includes that hop; compare them with each other. CPU from "
           "the scheduler's count (schedstat) over each measurement; *gateway CPU* is Kong's workers "
           "plus every plugin server, per request, and *by CPU* the baseline's gateway CPU over the "
           "route's: the throughput ratio a gateway with cores of its own would see, less sensitive "
           "than req/s to the load generator and other work sharing these cores.", ""]
    for workers, result in runs.items():
        pinned = ("Kong's worker pinned to the first core, wrk, the upstream and the TLS proxy to the last"
                  if workers == 1 else "nothing pinned")
        out += [f"{workers} nginx worker{'s' if workers > 1 else ''} ({pinned}):", "",
                *table(result.summaries), ""]
        costs = protocol_costs(result.summaries)
        if costs:
            out += [costs, ""]
        out += [memory_line(result.rss_kb), ""]
    return out


def memory_line(rss: Mapping[str, tuple[int, int]]) -> str:
    """Resident memory of Kong's workers and the plugin servers over the measured rounds."""
    parts = [f"{label} {start / 1024:.1f} → {end / 1024:.1f}" for label, (start, end) in rss.items()]
    return "Resident memory (MiB) after the warm-up → after the last round: " + "; ".join(parts) + "."


def protocol_costs(summaries: Sequence[RouteSummary]) -> str | None:
    """What a PDK call and a plugin event cost, from the bare rows (and the floor's): per call, the
    slope from 1 to 4 calls; per event, what a 1-call plugin adds to "no plugins" beyond its call."""
    by_key = {s.route.key: s for s in summaries}
    if "plain" not in by_key:
        return None

    def split(s: RouteSummary, server: str) -> tuple[float, float]:
        worker = sum(us for label, us in s.cpu_us.items() if label.startswith("nginx worker"))
        return worker, s.cpu_us[f"{server} server"]

    plain = split(by_key["plain"], BARE)
    found = []
    for server, what in ((BARE, "our server (the bare plugin)"), (FLOOR, "the floor server")):
        if f"{server}-1" in by_key and f"{server}-4" in by_key:
            one, four = split(by_key[f"{server}-1"], server), split(by_key[f"{server}-4"], server)
            call = [(four[i] - one[i]) / 3 for i in (0, 1)]
            event = [one[0] - plain[0] - call[0], one[1] - call[1]]
            found.append(f"with {what}, a PDK call costs about {call[0]:.0f} µs in Kong's worker and "
                         f"{call[1]:.0f} µs in the plugin server; a plugin event, beyond its calls, about "
                         f"{event[0]:.0f} µs and {event[1]:.0f} µs")
    return ("From the bare rows: " + "; ".join(found) + ".") if found else None


README_BEGIN = "<!-- real-kong {version} begin (written by ./dev bench --kong --readme) -->"
README_END = "<!-- real-kong {version} end -->"
README_SECTION = "<!-- real-kong tables -->"


def update_readme(text: str, version: str, block: Sequence[str]) -> str:
    """`text` with the block of Kong `version` replaced, or added after the section marker and the
    blocks already there."""
    begin, end = README_BEGIN.format(version=version), README_END.format(version=version)
    new = "\n".join([begin, *block, end])
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        return head + new + rest.split(end, 1)[1]
    if README_SECTION not in text:
        raise ValueError(f"README has no {README_SECTION} marker")
    head, rest = text.split(README_SECTION, 1)
    ends = list(re.finditer(re.escape(README_END.format(version="<v>")).replace("<v>", r"[\w.]+"), rest))
    at = ends[-1].end() if ends else 0
    return head + README_SECTION + rest[:at] + "\n" + new + rest[at:]


def main(binary: str, *, workers: Sequence[int], rounds: int, seconds: float, warmup: float,
         connections: int, threads: int, readme: bool, server_args: str = "",
         route_keys: Sequence[str] | None = None) -> int:
    check_tools()
    if not os.access(binary, os.X_OK) and shutil.which(binary) is None:
        raise SystemExit(f"bench: no Kong at {binary!r}")
    note = f"{machine_note()}; load average (1 / 5 / 15 min) before the run {load_average()}"
    version = kong_version(binary)
    root = Path(tempfile.mkdtemp(prefix="kmb-pki-"))
    try:
        pki = root / "pki"
        write_dev_pki(str(pki))
        key = generate_key("bench").key
        key_hash = hash_key(key)
        runs: dict[int, RunResult] = {}
        for count in workers:
            print(f"Kong {version}, {count} worker(s):", file=sys.stderr)
            default = None if count == 1 else MULTI_WORKER_ROUTES
            runs[count] = run(binary, workers=count, route_keys=route_keys or default,
                              rounds=rounds, seconds=seconds, warmup=warmup, connections=connections,
                              threads=threads, pki=pki, key=key, key_hash=key_hash, server_args=server_args,
                              log=lambda line: print(line, file=sys.stderr))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    note += f", after it {load_average()} (the bench itself keeps both cores busy)"
    if server_args:
        note += f"; plugin servers started with `{server_args}`"
    block = report(version, runs, rounds=rounds, seconds=seconds, connections=connections, note=note)
    text = "\n".join(block) + "\n"
    os.makedirs("bench/results", exist_ok=True)
    Path(f"bench/results/real-kong-{version}.md").write_text(text)
    sys.stdout.write(text)
    if readme:
        path = Path("README.md")
        path.write_text(update_readme(path.read_text(), version, block))
    return 0
