"""Two ways to get a real Kong running the example config, behind one interface (`Gateway`).

* `DockerRunner`: builds docker/Dockerfile with the Docker SDK (or uses $KONG_MTLS_IT_IMAGE), then
  starts what docker/compose.yaml describes (read from that file, so both stay the same): the PKI
  job, the echo and impostor upstreams and Kong, on a private network and volume of their own.
* `LocalRunner`: a Kong installed on this machine (`kong` on PATH or $KONG_BIN, 3.x or 2.8): a
  temporary prefix, kong.conf (plugin servers started by Kong from THIS Python environment) and
  kong.yml, the echo upstreams as local processes, `kong start`, and `kong stop` afterwards.

`unavailable()` gives the one-line reason a runner cannot run here; the fixture skips with it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from tests.integration.support import (
    COMPOSE_FILE,
    ECHO_ADDRESS,
    IMPOSTOR_ADDRESS,
    KONG_CONF_EXAMPLE,
    MARKER_PATH,
    OPTION_A_SETTINGS,
    PLUGIN_MODULES,
    PLUGIN_SERVER_TIMEOUT,
    ROOT,
    RUNTIME_STATS_SCRIPT,
    SIGNAL_SCRIPT,
    TEMPLATES_DIR,
    Response,
    adapt_config,
    admin_api_entities,
    available_plugins,
    load_dev_config,
    local_kong_conf,
    parse_kong_conf,
    parse_kong_version,
    pluginserver_key,
    request,
    tls_context,
    with_config_marker,
    with_post_function_guards,
)

START_TIMEOUT = 120.0


class Gateway:
    """A running Kong with the rendered kong/kong.yml loaded; what the scenarios talk to."""

    kind = "?"

    def __init__(self, *, proxy_http: tuple[str, int], proxy_https: tuple[str, int],
                 admin: tuple[str, int], echo: tuple[str, int], pki: Path, pki_in_kong: str,
                 kong_version: tuple[int, int, int], plugins: list[str], config: dict,
                 examples: dict[str, dict]) -> None:
        self.proxy_http = proxy_http
        self.proxy_https = proxy_https
        self.admin = admin
        self.echo = echo
        self.pki = pki                  # a local copy of the dev PKI (client certificates, API keys)
        self.pki_in_kong = pki_in_kong  # where Kong and its plugin servers see the same files
        self.kong_version = kong_version
        self.plugins = plugins
        self.config = config            # the declarative config Kong started with
        self.examples = examples        # the other kong/*.yml by file name, as this Kong can load them

    # -- requests ----------------------------------------------------------------------------------
    def cert(self, name: str) -> tuple[Path, Path]:
        """Certificate chain and key files of the dev PKI, e.g. `clients/alice`."""
        return self.pki / f"{name}.pem", self.pki / f"{name}.key"

    def api_key(self, key_id: str) -> str:
        return (self.pki / "api-keys" / f"{key_id}.key").read_text().strip()

    def https(self, path: str, *, cert: str | None = None, server_name: str = "localhost",
              method: str = "GET", headers: Mapping[str, str] | None = None,
              body: bytes | None = None) -> Response:
        """A request to Kong's HTTPS proxy, presenting the dev PKI certificate `cert` if given."""
        context = tls_context(self.pki / "ca" / "root.pem", self.cert(cert) if cert else None)
        return request(self.proxy_https, path, method=method, headers=headers, body=body, tls=context,
                       server_name=server_name)

    def http(self, path: str, *, server_name: str = "localhost",
             headers: Mapping[str, str] | None = None) -> Response:
        return request(self.proxy_http, path, headers=headers, server_name=server_name)

    def admin_request(self, method: str, path: str, payload: Any = None) -> Response:
        body = json.dumps(payload).encode() if payload is not None else None
        headers = {"Content-Type": "application/json"} if body is not None else {}
        return request(self.admin, path, method=method, body=body, headers=headers,
                       server_name=self.admin[0])

    def seen_upstream(self, nonce: str) -> bool:
        """Whether the echo upstream served a request carrying `X-Test-Nonce: <nonce>`."""
        return bool(self.https(f"/public/__seen/{nonce}").json()["seen"])

    # -- configuration -----------------------------------------------------------------------------
    def load_config(self, config: Mapping[str, Any]) -> None:
        """Replace Kong's whole configuration (DB-less `POST /config`), without a restart, and wait
        until the proxy serves it (Kong answers before its workers switch)."""
        token = uuid.uuid4().hex
        answer = self.admin_request("POST", "/config",
                                    {"config": json.dumps(with_config_marker(config, token))})
        if answer.status not in (200, 201):
            raise AssertionError(f"POST /config answered {answer.status}: {answer.body[:2000]!r}")

        def live() -> bool:
            marker = self.http(f"{MARKER_PATH}/{token}")
            return marker.status == 200 and token.encode() in marker.body

        eventually(live, 30, f"{self.kind} Kong: the new config never served", self.error_log)

    def restore(self) -> None:
        """Load the config Kong started with again, and wait until it serves."""
        self.load_config(self.config)
        self.wait_ready(timeout=60)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait for the Admin API (`/status`: Kong 3.9.1's `GET /` answers 500 with plugin servers),
        then for every plugin server to vouch for a request that must pass."""
        eventually(lambda: self.admin_request("GET", "/status").status == 200, timeout,
                   f"{self.kind} Kong: Admin API /status never answered 200", self.error_log)
        # client-cert-request (global) has no route: the mtls probe needs it (or option A).
        probes: dict[str, Callable[[], Response]] = {
            "ip-allowlist": lambda: self.https("/ip"),
            "client-cert-auth": lambda: self.https("/mtls", cert="clients/alice"),
            "api-key-auth": lambda: self.https("/key", headers={"apikey": self.api_key("ak_alice_dev")}),
            "upstream-identity": lambda: self.https("/upstream"),
        }
        for name in self.plugins:
            # First the plugin server itself: the verdict cache may answer a probe without it.
            eventually(lambda name=name: self.plugin_server_answers(name), timeout,
                       f"{self.kind} Kong: the {name} plugin server never answered", self.error_log)
            probe = probes.get(name)
            if probe is not None:
                eventually(lambda probe=probe: probe().status == 200, timeout,
                           f"{self.kind} Kong: {name} never let a valid request through", self.error_log)

    # -- provided by each runner -------------------------------------------------------------------
    def signal_plugin_server(self, name: str, signum: int) -> list[int]:
        """Send `signum` (0: none) to the plugin server of `name`; returns the pids found."""
        raise NotImplementedError

    def plugin_server_answers(self, name: str) -> bool:
        """Whether the plugin server of `name` answers an RPC on its socket."""
        return self.plugin_server_stats(name) is not None

    def plugin_server_stats(self, name: str) -> dict[str, Any] | None:
        """What the plugin server of `name` answers to plugin.GetRuntimeStats (with `--processes`,
        the process serving the caller), or None when it does not answer."""
        raise NotImplementedError

    def error_log(self) -> str:
        raise NotImplementedError

    def access_log(self) -> str:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


def eventually(check: Callable[[], bool], timeout: float, message: str,
               context: Callable[[], str] | None = None) -> None:
    """Retry `check` until it returns True (exceptions count as False) or `timeout` runs out."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as exc:  # retried: the service may not be up yet
            last_error = exc
        time.sleep(0.5)
    tail = context()[-4000:] if context is not None else ""
    raise AssertionError(f"{message} (last error: {last_error!r})\n{tail}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _first_line(text: object) -> str:
    return str(text).strip().splitlines()[0] if str(text).strip() else repr(text)


# ====================================================================================================
# Docker
# ====================================================================================================
class DockerRunner:
    kind = "docker"

    @staticmethod
    def unavailable() -> str | None:
        try:
            import docker
        except ImportError:
            return "docker runner: the `docker` SDK is not installed (pip install -e '.[test]')"
        try:
            client = docker.from_env()
            client.ping()
            client.close()
        except Exception as exc:
            return f"docker runner: no Docker engine reachable ({_first_line(exc)})"
        return None

    @staticmethod
    def start(workdir: Path) -> DockerGateway:
        import docker

        gateway = DockerGateway(docker.from_env(timeout=300), workdir)
        try:
            gateway.boot()
        except BaseException:
            gateway.stop()
            raise
        return gateway


class DockerGateway(Gateway):
    kind = "docker"

    def __init__(self, client: Any, workdir: Path) -> None:  # attributes set by boot()
        self.client = client
        self.workdir = workdir
        self.name = f"kong-mtls-it-{uuid.uuid4().hex[:8]}"
        self.containers: list[Any] = []
        self.network: Any = None
        self.volume: Any = None
        self.kong: Any = None

    def boot(self) -> None:
        compose = yaml.safe_load(COMPOSE_FILE.read_text())
        services = compose["services"]
        image = self._image(services["kong"]["build"])
        self.network = self.client.networks.create(self.name, driver="bridge")
        self.volume = self.client.volumes.create(f"{self.name}-pki")

        job = self._run(image, "pki-init", services["pki-init"], pki_mode="rw")
        status = job.wait(timeout=START_TIMEOUT)
        if status.get("StatusCode") != 0:
            raise RuntimeError(f"pki-init failed: {job.logs().decode(errors='replace')}")
        pki = self._copy_out(job, "/pki")

        echo = self._run(image, "echo", services["echo"], ports={"9443/tcp": ("127.0.0.1", None)})
        self._run(image, "impostor", services["impostor"])
        environment = dict(services["kong"]["environment"])
        environment.update({
            "KONG_LOG_LEVEL": "notice",
            "KONG_NGINX_WORKER_PROCESSES": "1",
            "KONG_NGINX_HTTP_LUA_SOCKET_READ_TIMEOUT": PLUGIN_SERVER_TIMEOUT,
        })
        ports = {f"{port}/tcp": ("127.0.0.1", None) for port in (8000, 8443, 8001)}
        self.kong = self._run(image, "kong", {**services["kong"], "environment": environment}, ports=ports)

        version = self.kong.exec_run(["kong", "version"]).output.decode()
        Gateway.__init__(
            self,
            proxy_http=self._published(self.kong, 8000), proxy_https=self._published(self.kong, 8443),
            admin=self._published(self.kong, 8001), echo=self._published(echo, 9443),
            pki=pki, pki_in_kong="/pki", kong_version=parse_kong_version(version),
            plugins=list(PLUGIN_MODULES),  # the image build checks that every plugin server runs
            config=yaml.safe_load((pki / "config" / "kong.yml").read_text()),
            examples={path.name: yaml.safe_load(path.read_text()) for path in (pki / "config").glob("*.yml")},
        )
        self.wait_ready()

    def _image(self, build: Mapping[str, Any]) -> str:
        prebuilt = os.environ.get("KONG_MTLS_IT_IMAGE")
        if prebuilt:
            return prebuilt
        tag = "kong-mtls:integration"
        import docker

        try:
            self.client.images.build(path=str(ROOT), dockerfile=build["dockerfile"], tag=tag, rm=True,
                                     buildargs={k: str(v) for k, v in (build.get("args") or {}).items()})
        except docker.errors.BuildError as exc:
            log = "".join(str(item.get("stream") or item.get("error") or "") for item in exc.build_log)
            raise RuntimeError(f"docker build failed: {exc}\n{log[-6000:]}") from None
        return tag

    def _run(self, image: str, service: str, spec: Mapping[str, Any], *, pki_mode: str = "ro",
             ports: Mapping[str, Any] | None = None) -> Any:
        aliases = [service, *((spec.get("networks") or {}).get("default", {}).get("aliases") or [])]
        container = self.client.containers.run(
            image, name=f"{self.name}-{service}", detach=True,
            entrypoint=spec.get("entrypoint"), command=spec.get("command"),
            environment=spec.get("environment") or {},
            volumes={self.volume.name: {"bind": "/pki", "mode": pki_mode}},
            network=self.network.name,
            networking_config={self.network.name: self.client.api.create_endpoint_config(aliases=aliases)},
            ports=ports or {})
        self.containers.append(container)
        return container

    def _copy_out(self, container: Any, path: str) -> Path:
        stream, _ = container.get_archive(path)
        data = io.BytesIO(b"".join(stream))
        target = self.workdir / "pki-copy"
        with tarfile.open(fileobj=data) as archive:
            for member in archive.getmembers():
                if member.name.startswith("/") or ".." in member.name.split("/") or member.issym():
                    raise RuntimeError(f"unexpected path in the PKI archive: {member.name}")
            # Python 3.12+: also let tarfile refuse anything but plain files and directories.
            archive.extractall(target, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        return target / Path(path).name

    @staticmethod
    def _published(container: Any, port: int) -> tuple[str, int]:
        container.reload()
        binding = container.attrs["NetworkSettings"]["Ports"][f"{port}/tcp"][0]
        return "127.0.0.1", int(binding["HostPort"])

    def signal_plugin_server(self, name: str, signum: int) -> list[int]:
        python = "/opt/kong-mtls/bin/python"
        result = self.kong.exec_run([python, "-c", SIGNAL_SCRIPT, f"kong-mtls-{name} -p", str(signum)])
        if result.exit_code != 0:
            raise RuntimeError(f"signal script failed: {result.output.decode(errors='replace')}")
        return json.loads(result.output.decode().strip().splitlines()[-1])

    def plugin_server_stats(self, name: str) -> dict[str, Any] | None:
        socket_path = parse_kong_conf(KONG_CONF_EXAMPLE.read_text())[pluginserver_key(name, "socket")]
        result = self.kong.exec_run(["/opt/kong-mtls/bin/python", "-c", RUNTIME_STATS_SCRIPT, socket_path])
        return json.loads(result.output.decode().strip().splitlines()[-1]) if result.exit_code == 0 else None

    def error_log(self) -> str:
        if self.kong is None:
            return ""
        return self.kong.logs(stdout=True, stderr=True).decode(errors="replace")

    def access_log(self) -> str:  # the image logs both to the container's output
        return self.error_log()

    def stop(self) -> None:
        for container in reversed(self.containers):
            try:
                container.remove(force=True)
            except Exception as exc:  # keep tearing down the rest
                print(f"could not remove {container.name}: {exc}", file=sys.stderr)
        for resource in (self.network, self.volume):
            if resource is not None:
                try:
                    resource.remove()
                except Exception as exc:
                    print(f"could not remove {resource.name}: {exc}", file=sys.stderr)
        self.client.close()


# ====================================================================================================
# A locally installed Kong
# ====================================================================================================
class LocalRunner:
    kind = "local"

    @staticmethod
    def kong_bin() -> str | None:
        return os.environ.get("KONG_BIN") or shutil.which("kong")

    @classmethod
    def unavailable(cls) -> str | None:
        kong = cls.kong_bin()
        if not kong:
            return "local runner: no Kong installed (put `kong` on PATH or set KONG_BIN)"
        try:
            output = subprocess.run([kong, "version"], capture_output=True, text=True, timeout=60)
            parse_kong_version(output.stdout + output.stderr)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            return f"local runner: `{kong} version` failed ({_first_line(exc)})"
        return None

    @classmethod
    def start(cls, workdir: Path, **options: Any) -> LocalGateway:
        """`options` are LocalGateway's: `option_a`, `database`, `role`, `control_plane`, `settings`,
        `server_args`."""
        gateway = LocalGateway(cls.kong_bin() or "kong", **options)
        try:
            gateway.boot()
        except BaseException:
            gateway.stop()
            raise
        return gateway


class LocalGateway(Gateway):
    """A Kong started here from a temporary prefix, in one of these setups:

    * DB-less with the rendered kong/kong.yml (the default);
    * `option_a`: the same, asking for client certificates with nginx's optional_no_ca;
    * `database` (`PostgresServer.create_database`'s settings): Kong on PostgreSQL, kong/kong.yml
      created through the Admin API;
      with `role="control_plane"` too: a hybrid control plane (no proxy, no plugin servers started,
      only their schemas queried);
    * `control_plane` (another LocalGateway): a hybrid data plane that takes its config from it;
    * `settings`: more kong.conf settings (e.g. `untrusted_lua = off`);
    * `server_args`: more arguments for every plugin server (`--processes 2`);
    * `guard_fallback`: kong-mtls-guard not loaded, each route guarded by a post-function instead.
    """

    kind = "local"

    def __init__(self, kong: str, *, option_a: bool = False, database: Mapping[str, str] | None = None,
                 role: str = "traditional", control_plane: LocalGateway | None = None,
                 settings: Mapping[str, str] | None = None, server_args: str = "",
                 guard_fallback: bool = False) -> None:
        self.kong = kong  # other attributes set by boot()
        self.guard_fallback = guard_fallback
        self.option_a = option_a
        self.settings = dict(settings or {})
        self.server_args = server_args
        self.database = database
        self.role = "data_plane" if control_plane is not None else role
        self.control_plane = control_plane
        # Short: the plugin servers' Unix socket paths must fit in 108 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="kmtls-"))
        self.prefix = self.root / "prefix"
        self.processes: list[subprocess.Popen] = []
        self.started = False
        self.conf_file = self.root / "kong.conf"

    def boot(self) -> None:
        output = subprocess.run([self.kong, "version"], capture_output=True, text=True, timeout=60)
        version = parse_kong_version(output.stdout + output.stderr)
        pki = self.root / "pki"
        if self.control_plane is not None:  # same dev PKI: the cluster certificate, client certs
            shutil.copytree(self.control_plane.pki, pki)
        else:
            load_dev_config().prepare(pki, [str(TEMPLATES_DIR)])
        plugins = available_plugins()
        if self.control_plane is not None:  # its config, so its upstreams
            echo, upstreams = self.control_plane.echo, self.control_plane.upstreams
        else:
            echo = self._echo("echo", "upstream/server")
            impostor = self._echo("impostor", "upstream/impostor")
            upstreams = {ECHO_ADDRESS: f"localhost:{echo[1]}", IMPOSTOR_ADDRESS: f"localhost:{impostor[1]}"}
        self.upstreams = upstreams

        def adapted(name: str) -> dict:
            rendered = yaml.safe_load((pki / "config" / name).read_text())
            return adapt_config(rendered, available=plugins, kong_version=version, upstreams=upstreams,
                                request_certificates=not self.option_a)

        config = adapted("kong.yml")
        if self.guard_fallback:
            config = with_post_function_guards(config)
        declarative = self.root / "kong.yml"
        declarative.write_text(json.dumps(config))  # JSON is YAML
        ports = {"http": free_port(), "https": free_port(), "admin": free_port(), "cluster": free_port()}
        extra: dict[str, str | None] = dict(OPTION_A_SETTINGS) if self.option_a else {}
        extra.update(self._role_settings(pki, ports))
        if self.guard_fallback:
            extra["plugins"] = ",".join(["bundled", *plugins])
        extra.update(self.settings)
        if self.database is not None:
            extra.update({"database": "postgres", "declarative_config": None, **self.database})
        conf = local_kong_conf(
            parse_kong_conf(KONG_CONF_EXAMPLE.read_text()), prefix=str(self.prefix), python=sys.executable,
            plugins=plugins, declarative_config=str(declarative), ports=ports,
            ssl_cert=str(pki / "kong" / "server.pem"), ssl_cert_key=str(pki / "kong" / "server.key"),
            kong_version=version, nginx_user="root root" if os.geteuid() == 0 else None,
            serve_plugins=self.role != "control_plane", extra=extra, server_args=self.server_args)
        self.conf_file.write_text(conf)
        self.prefix.mkdir()
        if self.role == "control_plane":
            subprocess.run([self.kong, "hybrid", "gen_cert", str(pki / "kong" / "cluster.pem"),
                            str(pki / "kong" / "cluster.key")], check=True, capture_output=True, timeout=60)
        if self.database is not None:
            self.kong_command("migrations", "bootstrap")
        self.kong_command("start")
        self.started = True
        admin = ("127.0.0.1", ports["admin"])
        Gateway.__init__(
            self, proxy_http=("127.0.0.1", ports["http"]), proxy_https=("127.0.0.1", ports["https"]),
            admin=admin, echo=echo, pki=pki, pki_in_kong=str(pki),
            kong_version=version, plugins=plugins, config=config,
            examples={path.name: adapted(path.name) for path in (pki / "config").glob("*.yml")})
        self.cluster = ("127.0.0.1", ports["cluster"])
        if self.database is not None:
            eventually(lambda: self.admin_request("GET", "/status").status == 200, START_TIMEOUT,
                       f"{self.role} Kong: Admin API /status never answered 200", self.error_log)
            for path, body in admin_api_entities(config):
                answer = self.admin_request("POST", path, body)
                if answer.status != 201:
                    raise RuntimeError(f"POST {path} answered {answer.status}: {answer.body[:1000]!r}")
        if self.role == "traditional":  # a control plane has no proxy; a data plane's start is watched
            self.wait_ready()

    def _role_settings(self, pki: Path, ports: Mapping[str, int]) -> dict[str, str | None]:
        if self.role == "traditional":
            return {}
        # Hybrid mode, shared cluster certificate (`kong hybrid gen_cert`, made by the control
        # plane's boot; a data plane copies the control plane's PKI folder): both trust exactly it.
        cluster = {"role": self.role, "cluster_cert": str(pki / "kong" / "cluster.pem"),
                   "cluster_cert_key": str(pki / "kong" / "cluster.key")}
        if self.role == "control_plane":
            return {**cluster, "cluster_listen": f"127.0.0.1:{ports['cluster']}", "proxy_listen": "off"}
        assert self.control_plane is not None
        host, port = self.control_plane.cluster
        # The data plane has no Admin API: its status API stands in for it (`/status`).
        return {**cluster, "cluster_control_plane": f"{host}:{port}", "database": "off",
                "declarative_config": None, "admin_listen": "off",
                "status_listen": f"127.0.0.1:{ports['admin']}"}

    def kong_command(self, *args: str) -> str:
        done = subprocess.run([self.kong, *args, "-c", str(self.conf_file), "-p", str(self.prefix)],
                              capture_output=True, text=True, timeout=START_TIMEOUT)
        if done.returncode != 0:
            raise RuntimeError(f"kong {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n"
                               f"{done.stderr}\n{self.error_log()[-4000:]}")
        return done.stdout

    def _echo(self, name: str, cert: str) -> tuple[str, int]:
        pki = self.root / "pki"
        env = {**os.environ, "ECHO_NAME": name, "ECHO_HOST": "127.0.0.1", "ECHO_PORT": "0",
               "ECHO_CERT": str(pki / f"{cert}.pem"), "ECHO_KEY": str(pki / f"{cert}.key"),
               "ECHO_CLIENT_CA": str(pki / "ca" / "root.pem")}
        process = subprocess.Popen([sys.executable, str(ROOT / "docker" / "echo" / "echo.py")], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.processes.append(process)
        assert process.stdout is not None
        line = process.stdout.readline()
        if " listening on " not in line:
            raise RuntimeError(f"echo {name} did not start: {line!r}")
        port = int(line.split(" listening on ", 1)[1].split()[0].rsplit(":", 1)[1])
        # Nobody reads the rest of its output: drain it rather than let the pipe fill up.
        threading.Thread(target=process.stdout.read, daemon=True).start()
        return "127.0.0.1", port

    def signal_plugin_server(self, name: str, signum: int) -> list[int]:
        needle = f"{PLUGIN_MODULES[name]} -p {self.prefix}"
        result = subprocess.run([sys.executable, "-c", SIGNAL_SCRIPT, needle, str(signum)],
                                capture_output=True, text=True, timeout=30, check=True)
        return json.loads(result.stdout.strip().splitlines()[-1])

    def plugin_server_stats(self, name: str) -> dict[str, Any] | None:
        socket_path = str(self.prefix / f"{name}.sock")
        result = subprocess.run([sys.executable, "-c", RUNTIME_STATS_SCRIPT, socket_path],
                                capture_output=True, text=True, timeout=30)
        return json.loads(result.stdout) if result.returncode == 0 else None

    def error_log(self) -> str:
        return self._log("error.log")

    def access_log(self) -> str:
        return self._log("access.log")

    def _log(self, name: str) -> str:
        try:
            return (self.prefix / "logs" / name).read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.started:
            subprocess.run([self.kong, "stop", "-p", str(self.prefix)], capture_output=True, timeout=60)
        # Plugin servers Kong started from this prefix that outlived it (their command line names it).
        subprocess.run([sys.executable, "-c", SIGNAL_SCRIPT, f"-p {self.prefix}", str(int(signal.SIGTERM))],
                       capture_output=True, timeout=30)
        for process in self.processes:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(self.root, ignore_errors=True)


class PostgresServer:
    """Debian's PostgreSQL server (`apt-get install postgresql`, or $PG_BIN) on loopback, in a
    temporary directory, for Kong's database mode. Trust authentication: loopback and test data only."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="kmtls-pg-"))
        self.data = self.root / "data"
        self.port = 0
        self.started = False

    @staticmethod
    def bin_dir() -> Path | None:
        if os.environ.get("PG_BIN"):
            return Path(os.environ["PG_BIN"])
        found = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").exists()]
        return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, default=None)

    @classmethod
    def unavailable(cls) -> str | None:
        path = cls.bin_dir()
        if path is None or not (path / "initdb").exists():
            return "postgres: no PostgreSQL server here (apt-get install postgresql, or set PG_BIN)"
        if os.geteuid() == 0 and shutil.which("runuser") is None:
            return "postgres: running as root needs runuser to start the server as `postgres`"
        return None

    def _run(self, *args: str) -> None:
        path = self.bin_dir()
        assert path is not None
        command = [str(path / args[0]), *args[1:]]
        if os.geteuid() == 0:  # the server refuses to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stdout}\n{done.stderr}")

    def start(self) -> PostgresServer:
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self.port = free_port()
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-o", options,
                  "start")
        self.started = True
        self.sql("CREATE ROLE kong LOGIN")
        return self

    def sql(self, statement: str) -> None:
        self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres",
                  "-v", "ON_ERROR_STOP=1", "-c", statement)

    def create_database(self, name: str) -> dict[str, str]:
        """A new database owned by `kong`; returns the kong.conf settings that use it."""
        self.sql(f"CREATE DATABASE {name} OWNER kong")
        return {"pg_host": "127.0.0.1", "pg_port": str(self.port), "pg_user": "kong", "pg_database": name}

    def stop(self) -> None:
        if self.started:
            with contextlib.suppress(RuntimeError, subprocess.SubprocessError):
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


RUNNERS = {"docker": DockerRunner, "local": LocalRunner}
