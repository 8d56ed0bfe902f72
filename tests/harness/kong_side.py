"""The Kong side of the plugin-server protocol, for tests and benchmarks.

Written from Kong's Lua source, Kong/kong 3.9.x:
* `kong/runloop/plugin_servers/rpc/mp_rpc.lua`: the MessagePack-RPC client (`Rpc:call`), the
  event loop (`bridge_loop`: HandleEvent, then one `plugin.Step*` per PDK call), `call_pdk_method`
  (only the FIRST return value of a PDK function is forwarded, so a Lua `nil, err` arrives as nil;
  unknown names are logged and answered with nil), `get_step_method` (the Step variant is chosen by
  the PDK method: StepConsumer, StepCredential, StepMultiMap ...), `fix_mmap`/`fix_raw`, and
  `handle_event` (an RPC failure is only logged: the request goes on, Kong fails OPEN; a
  "no plugin instance" error restarts the instance and retries);
* `kong/runloop/plugin_servers/plugin.lua`: `get_instance_id` (StartInstance with the config as
  JSON, keyed by the plugin id and `__seq__`; a failed StartInstance raises, which Kong answers
  with a 500), the PDK overrides in `exposed_api` (`kong.nginx.get_var`, `kong.ctx.shared.*`);
* `kong/runloop/plugins_iterator.lua` (`get_plugin_config`): the keys Kong adds to a config
  (`route_id`, `service_id`, `consumer_id`, `plugin_instance_name`, `__plugin_id`, `__key__`,
  `__seq__`); fields the user did not set are JSON null (schema defaults filled in before);
* `kong/init.lua`: a plugin handler that raises gets 500 `An unexpected error occurred`;
  `kong.response.exit` in access stops the plugin (its coroutine yields and is never resumed, so the
  plugin server never sees another Step for that event) and the remaining plugins;
* PDK behaviour in `kong/pdk/request.lua`, `client.lua`, `client/tls.lua`, `service/request.lua`,
  `response.lua`: header names case-insensitive; `get_header` returns nginx's `$http_*` value, which
  joins repeated header lines with ", " since nginx 1.23 (Kong 3.9 ships OpenResty 1.25; Kong 2.8
  returns the first line); `kong.service.request.set_header(s)` replaces every client-sent copy,
  and an empty value (`""` or `{}`) removes the header (lua-nginx-module `ngx.req.set_header`);
  `kong.client.authenticate` raises unless given a consumer or a credential table;
* `mp_rpc.lua`'s `get_field`: a PDK method is found by walking the `\\w+` segments of its name
  (`rpc/util.lua`, `index_table`: punctuation is ignored) and cached per worker by the name as sent.
  `kong.log` is the namespaced logger of the plugin running at that moment, so the cached
  `kong.log.warn` keeps the namespace of the first plugin that called it (`KongSide.method_cache`).
Kong 2.8 (`kong/runloop/plugin_servers/mp_rpc.lua` at 2.8.x) still forwarded the error of a PDK
call (`StepError`); `KongSide(kong_version="2.8")` does the same. Before 3.9, the same file's
`call_start_instance` returned the error string of a failed StartInstance where the instance
belongs, so Kong went on with a nil instance id; `KongSide(kong_version="3.4")` (or any < 3.9) too.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qsl

import msgpack

from kong_mtls.constants import (
    GUARD,
    PLUGIN_MODULES,
    VERDICT_APPLY_FLAG,
    VERDICT_CACHED_PLUGINS,
    VERDICT_REPLAYABLE,
    shared_mark,
    verdict_slot,
)
from kong_mtls.guard import GUARD_MESSAGE, GUARD_REASON, GUARD_STATUS, missing_marks
from kong_mtls.kong.runtime import PLAIN_READS
from tests.harness.lua_msgpack import Binary, EmptyMap, as_lua, pack

MESSAGE_UNEXPECTED = "An unexpected error occurred"  # kong/init.lua, handler errors
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


_WORD = re.compile(r"\w+", re.ASCII)
_SEQUENCES = itertools.count(1)

# mp_rpc.lua, get_step_method: by_pdk_method
_STEP_BY_METHOD = {
    "kong.client.get_credential": "plugin.StepCredential",
    "kong.client.load_consumer": "plugin.StepConsumer",
    "kong.client.get_consumer": "plugin.StepConsumer",
    "kong.client.authenticate": "plugin.StepCredential",
    "kong.node.get_memory_stats": "plugin.StepMemoryStats",
    "kong.router.get_route": "plugin.StepRoute",
    "kong.router.get_service": "plugin.StepService",
    "kong.request.get_query": "plugin.StepMultiMap",
    "kong.request.get_headers": "plugin.StepMultiMap",
    "kong.response.get_headers": "plugin.StepMultiMap",
    "kong.service.response.get_headers": "plugin.StepMultiMap",
}


class LuaError(Exception):
    """A Lua `error()` raised by a PDK function: Kong answers the request with a 500."""


class RpcError(Exception):
    """The plugin server answered with an error, or the socket failed."""


class _Exit(Exception):
    """`kong.response.exit`: the plugin's coroutine yields for good."""


# --------------------------------------------------------------------------------------------
# The plugin server process
# --------------------------------------------------------------------------------------------
class PluginServerProcess:
    """A real plugin server started as Kong starts it (`<start_cmd> -p <prefix>`)."""

    def __init__(self, name: str, module: str | None = None, prefix: str | None = None,
                 extra_args: Sequence[str] = ()) -> None:
        self.name = name
        self.module = module or PLUGIN_MODULES[name]
        self._own_prefix = prefix is None
        self.prefix = prefix or tempfile.mkdtemp(prefix="kong-mtls-")
        self.socket_path = os.path.join(self.prefix, f"{name}.sock")
        self.log_path = os.path.join(self.prefix, f"{name}.log")
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen | None = None
        info = self.dump()[0]
        self.priority: int = info["Priority"]
        self.version: str = info["Version"]
        self.schema: dict = info["Schema"]

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", self.module, *args]

    def dump(self) -> list[dict]:
        """Kong's `query_cmd`: `<entry> --dump`, a JSON array of plugin infos."""
        out = subprocess.run(self.command("--dump"), capture_output=True, text=True, timeout=60,
                             check=True, cwd=ROOT)
        return json.loads(out.stdout)

    def start(self, timeout: float = 20.0) -> PluginServerProcess:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(self.command("-p", self.prefix, *self.extra_args), stdout=log,
                                     stderr=subprocess.STDOUT, cwd=ROOT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} plugin server exited: {self.output()}")
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(self.socket_path)
                return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"{self.name} plugin server did not listen on {self.socket_path}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        """Die abruptly (SIGKILL), as a crashed plugin server does."""
        if self.proc:
            self.proc.kill()
            self.proc.wait(5)

    def pause(self) -> None:
        """Hang (SIGSTOP): the socket accepts, nothing answers."""
        if self.proc:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> PluginServerProcess:
        """What Kong's process manager does when its plugin server dies: start it again."""
        self.stop()
        return self.start()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def output(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def rss_kb(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def close(self) -> None:
        self.stop()
        if self._own_prefix:
            for entry in os.listdir(self.prefix):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.prefix, entry))
            with contextlib.suppress(OSError):
                os.rmdir(self.prefix)


# --------------------------------------------------------------------------------------------
# MessagePack-RPC client (mp_rpc.lua, Rpc:call)
# --------------------------------------------------------------------------------------------
class RpcConnection:
    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self.msg_id = 0
        self._sock: socket.socket | None = None
        self._unpacker: msgpack.Unpacker | None = None

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._unpacker = msgpack.Unpacker(raw=False, strict_map_key=False,
                                          unicode_errors="surrogateescape")

    def close(self) -> None:
        if self._sock:
            self._sock.close()
        self._sock = None

    def call(self, method: str, *args: Any) -> Any:
        self.msg_id += 1
        msg_id = self.msg_id
        try:
            if self._sock is None:
                self._connect()
            self._sock.sendall(pack([0, msg_id, method, list(args)]))
            while True:
                for message in self._unpacker:
                    if message[0] == 2:  # notification
                        continue
                    if message[0] != 1 or message[1] != msg_id:
                        raise RpcError(f"unexpected RPC response {message[:2]} to #{msg_id}")
                    if message[2] is not None:
                        raise RpcError(str(message[2]))
                    return message[3]
                data = self._sock.recv(65536)
                if not data:
                    raise RpcError("no data")
                self._unpacker.feed(data)
        except socket.timeout as exc:
            self.close()
            raise RpcError("timeout") from exc
        except OSError as exc:
            self.close()
            raise RpcError(str(exc)) from exc


# --------------------------------------------------------------------------------------------
# Scenario and outcome
# --------------------------------------------------------------------------------------------
HeaderValue = Any  # str | bytes | list of those


@dataclass
class Consumer:
    id: str
    username: str | None = None
    custom_id: str | None = None

    def as_lua(self) -> dict:
        row = {"id": self.id, "created_at": 1_700_000_000, "type": 0}
        if self.username is not None:
            row["username"] = self.username
        if self.custom_id is not None:
            row["custom_id"] = self.custom_id
        return row


@dataclass
class Request:
    method: str = "GET"
    path: str = "/"
    headers: Mapping[str, HeaderValue] | Sequence[tuple[str, HeaderValue]] = field(default_factory=dict)
    query: Mapping[str, Any] = field(default_factory=dict)
    body: bytes = b""
    client_ip: str = "198.51.100.7"
    realip_remote_addr: str | None = None
    forwarded_ip: str | None = None
    client_chain_pem: str | None = None
    scheme: str = "https"
    host: str = "api.example.test"
    port: int = 443
    vars: Mapping[str, Any] = field(default_factory=dict)
    route: Mapping[str, Any] = field(default_factory=lambda: {"id": "00000000-0000-4000-8000-00000000a001",
                                                                "name": "test-route"})
    # A Service that verifies its upstream against a CA store of its own (upstream-identity's rule).
    service: Mapping[str, Any] = field(default_factory=lambda: {
        "id": "00000000-0000-4000-8000-00000000b001", "name": "test-service", "host": "upstream.test",
        "port": 443, "protocol": "https", "tls_verify": True,
        "ca_certificates": ["00000000-0000-4000-8000-00000000c001"],
        "client_certificate": {"id": "00000000-0000-4000-8000-00000000d001"}})


@dataclass
class Exit:
    status: int
    body: Any
    headers: dict[str, Any]
    source: str  # plugin name, "kong" (handler error) or "guard"


@dataclass
class Outcome:
    exit: Exit | None = None
    upstream_headers: dict[str, list[str]] = field(default_factory=dict)
    upstream_query: dict[str, list[str]] = field(default_factory=dict)
    upstream_body: bytes = b""
    authenticated: list[tuple[Any, Any]] = field(default_factory=list)
    ctx_shared: dict[str, Any] = field(default_factory=dict)
    logs: list[tuple[str, str]] = field(default_factory=list)
    pdk_calls: list[str] = field(default_factory=list)
    #: The calls the guard plugin's wrapper made from verdicts marked `apply` (no round trip).
    applied: list[str] = field(default_factory=list)
    #: The arguments of each call in `pdk_calls`, as the plugin server sent them, and what Kong
    #: answered (what the plugin got back).
    pdk_args: list[list[Any]] = field(default_factory=list)
    pdk_results: list[Any] = field(default_factory=list)
    #: (plugin name, PDK calls it made) for each plugin that ran, in order.
    events: list[tuple[str, int]] = field(default_factory=list)
    client_verify: str | None = None
    service_tls: dict[str, Any] = field(default_factory=dict)
    handshake: dict[str, Any] = field(default_factory=dict)
    rpc_errors: list[str] = field(default_factory=list)
    #: (plugin name, record) for each verdict a plugin left for the verdict cache (taken out of
    #: kong.ctx.shared as verdicts.lua takes it), each checked by `check_verdict`.
    verdicts: list[tuple[str, Any]] = field(default_factory=list)

    @property
    def proxied(self) -> bool:
        return self.exit is None

    @property
    def status(self) -> int:
        """The status the client would see (200 standing for "proxied to the upstream")."""
        return self.exit.status if self.exit else 200

    @property
    def message(self) -> Any:
        return self.exit.body.get("message") if self.exit and isinstance(self.exit.body, dict) else None

    def header(self, name: str) -> str | None:
        values = self.upstream_headers.get(name.lower())
        return ", ".join(values) if values else None

    def log_text(self) -> str:
        return "\n".join(f"{level} {msg}" for level, msg in self.logs)


# --------------------------------------------------------------------------------------------
# The PDK as Kong implements it, over one request
# --------------------------------------------------------------------------------------------
_UUID_CHARS = set("0123456789abcdefABCDEF-")


def _is_uuid(value: str) -> bool:
    return len(value) == 36 and set(value) <= _UUID_CHARS


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


class RequestState:
    """One request as Kong holds it while the plugins run, and the PDK over it."""

    def __init__(self, request: Request, consumers: Iterable[Consumer], ctx_shared: Mapping[str, Any],
                 kong_version: str, outcome: Outcome, phase: str = "access",
                 method_cache: dict[str, str] | None = None) -> None:
        self.request = request
        self.method_cache = {} if method_cache is None else method_cache
        self.log_namespace = ""
        self.phase = phase
        self.kong_version = kong_version
        self.outcome = outcome
        pairs = request.headers.items() if isinstance(request.headers, Mapping) else request.headers
        self.headers: list[tuple[str, str]] = []
        for name, value in pairs:
            for v in value if isinstance(value, list) else [value]:
                self.headers.append((name, _text(v)))
        self.upstream: list[tuple[str, str]] = list(self.headers)
        self.query = {k: v for k, v in request.query.items()}
        self.upstream_query: dict[str, list[str]] | None = None
        self.upstream_body: bytes | None = None
        self.consumers = list(consumers)
        outcome.ctx_shared.update(ctx_shared)
        self.ctx: dict[str, Any] = {}
        self.plugin_id: str | None = None
        self.plugin_name = ""

    # -- dispatch ----------------------------------------------------------------------------
    def call(self, method: str, args: list) -> tuple[Any, Any]:
        """(value, err) of a PDK call; raises LuaError for a Lua error() and _Exit for exit."""
        name = ".".join(_WORD.findall(method))  # rpc/util.lua index_table: only \w+ segments count
        self.outcome.pdk_calls.append(name)
        fn = _PDK_METHODS.get(name)
        if fn is None:
            self.log("err", f"could not find pdk method: {method}")
            return None, None
        # mp_rpc.lua get_field: the function is cached by the name as sent, and a kong.log function
        # belongs to the namespaced logger current when it was first looked up.
        self.log_namespace = self.method_cache.setdefault(method, self.plugin_name)
        if self.phase == "certificate":
            allowed = not method.startswith(_REQUEST_PHASES_ONLY)
        else:
            allowed = method not in _CERTIFICATE_PHASE_ONLY
        if not allowed:  # kong/pdk/private/phases.lua, check_phase
            raise LuaError(f"function cannot be called in {self.phase} phase")
        result = fn(self, *args)
        if isinstance(result, tuple):  # Lua multiple returns: value, err, ...
            return result[0], result[1] if len(result) > 1 else None
        return result, None

    def apply(self, method: str, args: list) -> None:
        """One call of a verdict, made by the guard plugin's wrapper in Kong (verdicts.lua, `replay`):
        no round trip, and kong.log is the running plugin's logger. Raises _Exit for exit."""
        self.outcome.applied.append(method)
        self.log_namespace = self.plugin_name
        _PDK_METHODS[method](self, *args)

    def log(self, level: str, message: str) -> None:
        self.outcome.logs.append((level, message))

    # -- kong.request --------------------------------------------------------------------------
    def _header_values(self, name: str, headers: list[tuple[str, str]] | None = None) -> list[str]:
        lname = name.lower().replace("_", "-")
        return [v for n, v in (headers if headers is not None else self.headers)
                if n.lower().replace("_", "-") == lname]

    def pdk_kong__request__get_header(self, name: Any) -> Any:
        if not isinstance(name, str):
            raise LuaError("header name must be a string")
        values = self._header_values(name)
        if not values:
            return None
        return values[0] if self.kong_version.startswith("2.") else ", ".join(values)

    def pdk_kong__request__get_headers(self, max_headers: int = 100) -> Any:
        out: dict[str, list[str]] = {}
        for n, v in self.headers[:max_headers]:
            out.setdefault(n.lower(), []).append(v)
        return (out or EmptyMap(), "truncated" if len(self.headers) > max_headers else None)

    def pdk_kong__request__get_method(self) -> str:
        return self.request.method

    def pdk_kong__request__get_path(self) -> str:
        return self.request.path

    def pdk_kong__request__get_scheme(self) -> str:
        return self.request.scheme

    def pdk_kong__request__get_host(self) -> str:
        return self.request.host

    def pdk_kong__request__get_port(self) -> int:
        return self.request.port

    def pdk_kong__request__get_http_version(self) -> float:
        return 1.1

    def pdk_kong__request__get_raw_query(self) -> str:
        from urllib.parse import urlencode

        return urlencode([(k, v) for k, vs in self.query.items()
                          for v in (vs if isinstance(vs, list) else [vs])])

    def pdk_kong__request__get_query(self, max_args: int = 100) -> Any:
        out: dict[str, Any] = {}
        for k, v in list(self.query.items())[:max_args]:
            # fix_mmap: `true` (an argument without value) becomes an empty array
            out[k] = [] if v is True else ([_text(x) for x in v] if isinstance(v, list) else [_text(v)])
        return out or EmptyMap()

    def pdk_kong__request__get_query_arg(self, name: str) -> Any:
        value = self.query.get(name)
        return value[0] if isinstance(value, list) else value

    def pdk_kong__request__get_raw_body(self) -> Any:
        return Binary(self.request.body)

    def pdk_kong__request__get_body(self, mimetype: str | None = None, max_args: int = 100) -> Any:
        content_type = (mimetype or self.pdk_kong__request__get_header("Content-Type") or "").lower()
        body = self.request.body
        if content_type.startswith("application/x-www-form-urlencoded"):
            out: dict[str, Any] = {}
            for k, v in parse_qsl(body.decode("utf-8", "surrogateescape"), keep_blank_values=True):
                out.setdefault(k, []).append(v)
            return ({k: v[0] if len(v) == 1 else v for k, v in out.items()}, None, content_type)
        if content_type.startswith("application/json"):
            try:
                return (json.loads(body or b"null"), None, content_type)
            except ValueError:
                return (None, "invalid json body", content_type)
        return (None, "unsupported content type '" + content_type + "'", content_type)

    # -- kong.client ---------------------------------------------------------------------------
    # kong/pdk/client.lua: get_ip is $realip_remote_addr (the TCP peer, before nginx's real-IP
    # rewrite); get_forwarded_ip is $remote_addr (after it).
    def pdk_kong__client__get_ip(self) -> str:
        return self.request.realip_remote_addr or self.request.client_ip

    def pdk_kong__client__get_forwarded_ip(self) -> str:
        return self.request.forwarded_ip or self.request.client_ip

    def pdk_kong__client__get_port(self) -> int:
        return 54321

    def pdk_kong__client__load_consumer(self, consumer_id: Any = None, search_by_username: Any = None) -> Any:
        if not isinstance(consumer_id, str):
            raise LuaError("consumer_id must be a string")
        for c in self.consumers:
            if _is_uuid(consumer_id) and c.id == consumer_id:
                return c.as_lua()
        if search_by_username:
            for c in self.consumers:
                if c.username == consumer_id:
                    return c.as_lua()
        return None

    def pdk_kong__client__authenticate(self, consumer: Any = None, credential: Any = None) -> Any:
        if not consumer and not credential:
            raise LuaError("either credential or consumer must be provided")
        if consumer is not None and not isinstance(consumer, dict):
            raise LuaError("consumer must be a table or nil")
        if credential is not None and not isinstance(credential, dict):
            raise LuaError("credential must be a table or nil")
        self.ctx["authenticated_consumer"] = consumer
        self.ctx["authenticated_credential"] = credential
        self.outcome.authenticated.append((consumer, credential))
        return None

    def pdk_kong__client__get_consumer(self) -> Any:
        return self.ctx.get("authenticated_consumer")

    def pdk_kong__client__get_credential(self) -> Any:
        return self.ctx.get("authenticated_credential")

    def pdk_kong__client__tls__get_full_client_certificate_chain(self) -> Any:
        return self.request.client_chain_pem

    def pdk_kong__client__tls__request_client_certificate(self, ca_certs: Any = None) -> Any:
        self.outcome.handshake["request_client_certificate"] = True
        return True

    def pdk_kong__client__tls__disable_session_reuse(self) -> Any:
        self.outcome.handshake["disable_session_reuse"] = True
        return True

    def pdk_kong__client__tls__set_client_verify(self, value: Any = None) -> Any:
        if not isinstance(value, str) or not (value in ("SUCCESS", "NONE") or value.startswith("FAILED:")):
            raise LuaError("unknown client verify value: " + _text(value))
        self.outcome.client_verify = value
        return None

    # -- kong.ctx / kong.nginx (plugin.lua, exposed_api) ------------------------------------------
    def pdk_kong__ctx__shared__get(self, key: Any = None) -> Any:
        return self.outcome.ctx_shared.get(key)

    def pdk_kong__ctx__shared__set(self, key: Any = None, value: Any = None) -> Any:
        if value is None:
            self.outcome.ctx_shared.pop(key, None)
        else:
            self.outcome.ctx_shared[key] = value
        return None

    def pdk_kong__nginx__get_var(self, name: Any = None) -> Any:
        if not isinstance(name, str):
            return None
        nginx_vars = {
            "remote_addr": self.request.forwarded_ip or self.request.client_ip,  # get_forwarded_ip
            "realip_remote_addr": self.request.realip_remote_addr or self.request.client_ip,
            "scheme": self.request.scheme,
            "host": self.request.host,
            "server_port": str(self.request.port),
            "request_method": self.request.method,
            "uri": self.request.path,
            "ssl_client_verify": "NONE" if self.request.client_chain_pem is None
            else "FAILED:unable to verify the first certificate",
        }
        nginx_vars.update(self.request.vars)
        return nginx_vars.get(name)

    def pdk_kong__nginx__get_ctx(self, key: Any = None) -> Any:
        return self.ctx.get(("ngx", key))

    def pdk_kong__nginx__set_ctx(self, key: Any = None, value: Any = None) -> Any:
        self.ctx[("ngx", key)] = value
        return None

    # -- kong.router / kong.plugin / kong.node ---------------------------------------------------
    def pdk_kong__router__get_route(self) -> Any:
        return dict(self.request.route)

    def pdk_kong__router__get_service(self) -> Any:
        return dict(self.request.service)

    def pdk_kong__plugin__get_id(self) -> Any:
        return self.plugin_id

    def pdk_kong__node__get_id(self) -> str:
        return "00000000-0000-4000-8000-0000000000e1"

    # -- kong.log -------------------------------------------------------------------------------
    def _kong_log(self, level: str, *args: Any) -> None:
        self.log(level, f"[{self.log_namespace}] " + "".join(_text(a) for a in args))

    def pdk_kong__log__err(self, *args: Any) -> None:
        self._kong_log("err", *args)

    def pdk_kong__log__warn(self, *args: Any) -> None:
        self._kong_log("warn", *args)

    def pdk_kong__log__notice(self, *args: Any) -> None:
        self._kong_log("notice", *args)

    def pdk_kong__log__info(self, *args: Any) -> None:
        self._kong_log("info", *args)

    def pdk_kong__log__debug(self, *args: Any) -> None:
        self._kong_log("debug", *args)

    def pdk_kong__log__crit(self, *args: Any) -> None:
        self._kong_log("crit", *args)

    # -- kong.response ---------------------------------------------------------------------------
    def pdk_kong__response__exit(self, status: Any = None, body: Any = None, headers: Any = None) -> None:
        if not isinstance(status, int) or not 100 <= status <= 599:
            raise LuaError("code must be a number between 100 and 599")
        if headers is not None and not isinstance(headers, dict):
            raise LuaError("headers must be a nil or table")
        if isinstance(body, (bytes, str)):
            body = _text(body)
        self.outcome.exit = Exit(status, body, dict(headers or {}), self.plugin_name)
        raise _Exit

    def pdk_kong__response__error(self, status: Any = None, message: Any = None, headers: Any = None) -> None:
        self.pdk_kong__response__exit(status, {"message": message or "An error occurred"}, headers)

    # -- kong.service ----------------------------------------------------------------------------
    def _set_upstream_header(self, name: Any, value: Any, *, replace: bool) -> None:
        if not isinstance(name, str):
            raise LuaError(f"invalid header name {name!r}: got {type(name).__name__}, expected string")
        values = value if isinstance(value, list) else [value]
        for v in values:
            if not isinstance(v, (str, bytes, int, float, bool)):
                raise LuaError(f"invalid header value for {name!r}: got {type(v).__name__}")
        values = [_text(v) for v in values]
        lname = name.lower()
        if replace:
            self.upstream = [(n, v) for n, v in self.upstream if n.lower() != lname]
            if values in ([], [""]):
                return
        self.upstream.extend((name, v) for v in values)

    def pdk_kong__service__request__set_header(self, name: Any = None, value: Any = None) -> None:
        self._set_upstream_header(name, value, replace=True)

    def pdk_kong__service__request__add_header(self, name: Any = None, value: Any = None) -> None:
        self._set_upstream_header(name, value, replace=False)

    def pdk_kong__service__request__clear_header(self, name: Any = None) -> None:
        self._set_upstream_header(name, [], replace=True)

    def pdk_kong__service__request__set_headers(self, headers: Any = None) -> None:
        if not isinstance(headers, dict):
            raise LuaError("headers must be a table")
        for name, value in headers.items():
            self._set_upstream_header(name, value, replace=True)

    def _query(self) -> dict[str, list[str]]:
        if self.upstream_query is None:
            self.upstream_query = {k: ([_text(x) for x in v] if isinstance(v, list) else
                                       ([] if v is True else [_text(v)]))
                                   for k, v in self.query.items()}
        return self.upstream_query

    def pdk_kong__service__request__set_query(self, args: Any = None) -> None:
        if not isinstance(args, dict):
            raise LuaError("args must be a table")
        self.upstream_query = {k: ([_text(x) for x in v] if isinstance(v, list) else [_text(v)])
                               for k, v in args.items()}

    def pdk_kong__service__request__clear_query_arg(self, name: Any = None) -> None:
        if not isinstance(name, str):
            raise LuaError("query argument name must be a string")
        self._query().pop(name, None)

    def pdk_kong__service__request__set_raw_query(self, query: Any = None) -> None:
        if not isinstance(query, str):
            raise LuaError("query must be a string")
        out: dict[str, list[str]] = {}
        for k, v in parse_qsl(query, keep_blank_values=True):
            out.setdefault(k, []).append(v)
        self.upstream_query = out

    def pdk_kong__service__request__set_raw_body(self, body: Any = None) -> None:
        if not isinstance(body, (str, bytes)):
            raise LuaError("body must be a string")
        self.upstream_body = body.encode("utf-8", "surrogateescape") if isinstance(body, str) else body

    def pdk_kong__service__request__set_body(self, args: Any = None, mimetype: Any = None) -> Any:
        content_type = (mimetype or self.pdk_kong__request__get_header("Content-Type") or "").lower()
        if content_type.startswith("application/json"):
            self.upstream_body = json.dumps(args).encode()
        elif content_type.startswith("application/x-www-form-urlencoded"):
            from urllib.parse import urlencode

            self.upstream_body = urlencode(
                [(k, v) for k, vs in (args or {}).items() for v in (vs if isinstance(vs, list) else [vs])]
            ).encode()
        else:
            return None, "unsupported content type '" + content_type + "'"
        return True

    def pdk_kong__service__set_tls_verify(self, on: Any = None) -> Any:
        if not isinstance(on, bool):
            raise LuaError("argument must be a boolean")
        self.outcome.service_tls["verify"] = on
        return True

    def pdk_kong__service__set_tls_verify_depth(self, depth: Any = None) -> Any:
        if not isinstance(depth, int):
            raise LuaError("argument must be a number")
        self.outcome.service_tls["verify_depth"] = depth
        return True

    # -- result ----------------------------------------------------------------------------------
    def finish(self) -> None:
        out: dict[str, list[str]] = {}
        for n, v in self.upstream:
            out.setdefault(n.lower(), []).append(v)
        self.outcome.upstream_headers = out
        self.outcome.upstream_query = self._query()
        self.outcome.upstream_body = self.request.body if self.upstream_body is None else self.upstream_body


def _input_value(state: RequestState, kind: str, name: str) -> Any:
    """An input of the verdict cache as verdicts.lua reads it from the request."""
    if kind == "var":
        return state.pdk_kong__nginx__get_var(name)
    if kind == "header":
        lines = [v for n, v in state.headers if n.lower() == name]
        return lines or None
    if kind == "chain":
        chain = state.pdk_kong__client__tls__get_full_client_certificate_chain()
        return _text(chain) if isinstance(chain, (bytes, str)) else chain  # as the plugin gets it
    raise AssertionError(f"verdict input of unknown kind {kind!r}")


#: The call that leaves a verdict for the verdict cache (after a pass's mark, before a refusal's log line).
OFFER_VERDICT = "kong.ctx.shared.set"


def decided_calls(kong: KongSide, live: list[str]) -> list[str]:
    """The PDK round trips of a request a plugin of VERDICT_CACHED_PLUGINS decides, from `live`,
    those of a Kong without kong-mtls-guard: with it loaded, the plugin makes its plain reads and
    one call that leaves the verdict; the guard's wrapper makes every change."""
    if not kong.verdict_wrapper:
        return live
    return [call for call in live if call in PLAIN_READS] + [OFFER_VERDICT]


def made(outcome: Outcome) -> list[str]:
    """Every PDK call made for the request: round trips, then the guard's wrapper's calls."""
    return outcome.pdk_calls + outcome.applied


def check_verdict(record: Any, before: RequestState, after: RequestState) -> None:
    """What verdicts.lua would do with a plugin's verdict, checked: the plugin's input values are
    the request's, and replaying its calls on the request as it was before the plugin ran leaves
    it exactly as the plugin left it (upstream, consumer, kong.ctx.shared, answer, log lines)."""
    assert set(record) - {"apply"} == {"ttl", "inputs", "calls"} and record["ttl"] > 0, record
    for kind, name, *value in record["inputs"]:
        ours = _input_value(before, kind, name)
        assert ours == (value[0] if value else None), f"verdict input {kind}:{name}: {value} != {ours}"
    replay = before
    replay.method_cache = {}
    logs_before = len(replay.outcome.logs)
    for method, args, count in record["calls"]:
        assert method in VERDICT_REPLAYABLE, method
        try:
            replay.call(method, list(args)[:count])
        except _Exit:
            break
    live, again = after.outcome, replay.outcome
    assert (again.exit, again.authenticated, again.client_verify, again.ctx_shared, replay.upstream,
            replay.upstream_query, replay.upstream_body, again.logs[logs_before:]) == \
        (live.exit, live.authenticated, live.client_verify, live.ctx_shared, after.upstream,
         after.upstream_query, after.upstream_body, live.logs[logs_before:]), "the verdict's replay differs"


def apply_verdict(record: dict, state: RequestState) -> bool:
    """What the guard plugin's wrapper (verdicts.lua) does with a verdict marked `apply` after the
    plugin's event: its calls checked (else Kong's 500, nothing applied), then made in order (a
    call that raises is Kong's 500, as for the handler's own error). Returns whether the request
    was answered."""
    calls = record.get("calls")
    if not (isinstance(calls, list) and calls and all(
            isinstance(c, list) and len(c) == 3 and c[0] in VERDICT_REPLAYABLE and isinstance(c[1], list)
            and isinstance(c[2], int) for c in calls)):
        state.log("err", f"[{state.plugin_name}] [kong-mtls] verdict not applied reason=VERDICT_MALFORMED")
        state.outcome.exit = Exit(500, {"message": MESSAGE_UNEXPECTED}, {}, "kong")
        return True
    try:
        for method, args, count in calls:
            state.apply(method, list(args)[:count])
    except _Exit:
        return True
    except LuaError as exc:
        state.log("err", f"[{state.plugin_name}] {exc}")
        state.outcome.exit = Exit(500, {"message": MESSAGE_UNEXPECTED}, {}, "kong")
        return True
    return False


#: Callable in the certificate phase only; and PDK namespaces that need a request (kong/pdk/client/tls.lua,
#: kong/pdk/private/phases.lua).
_CERTIFICATE_PHASE_ONLY = frozenset({"kong.client.tls.request_client_certificate",
                                     "kong.client.tls.disable_session_reuse"})
_REQUEST_PHASES_ONLY = ("kong.request.", "kong.service.", "kong.response.", "kong.client.authenticate",
                        "kong.client.load_consumer", "kong.client.tls.get_full_client_certificate_chain")

#: PDK name -> RequestState method: `pdk_kong__client__get_ip` implements `kong.client.get_ip`.
_PDK_METHODS: dict[str, Callable[..., Any]] = {
    name[len("pdk_"):].replace("__", "."): getattr(RequestState, name)
    for name in dir(RequestState) if name.startswith("pdk_")
}


# --------------------------------------------------------------------------------------------
# Kong
# --------------------------------------------------------------------------------------------
def kong_config(schema: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as Kong stores it: schema defaults filled, unset fields null (ngx.null)."""
    fields = next(f["config"]["fields"] for f in schema["fields"] if "config" in f)
    return _fill(fields, config)


def _fill(fields: list, config: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(config)
    for item in fields:
        ((name, spec),) = item.items()
        if out.get(name) is None:
            out[name] = spec.get("default")
        value = out[name]
        elements = spec.get("elements", {})
        if elements.get("type") == "record" and isinstance(value, list):
            out[name] = [_fill(elements["fields"], v) if isinstance(v, Mapping) else v for v in value]
        elif spec.get("type") == "record" and isinstance(value, Mapping):
            out[name] = _fill(spec["fields"], value)
    return out


@dataclass
class _Instance:
    seq: int
    instance_id: int | None


class KongSide:
    """Kong's end of the plugin-server sockets: one per test (or per benchmark worker)."""

    def __init__(self, kong_version: str = "3.9", rpc_timeout: float = 10.0, *,
                 verdict_wrapper: bool = False) -> None:
        self.kong_version = kong_version
        #: Whether this Kong loads kong-mtls-guard, whose wrapper (verdicts.lua) is in front of the
        #: access handler of every one of VERDICT_CACHED_PLUGINS: it adds VERDICT_APPLY_FLAG to
        #: their configs and applies the verdicts they leave (`apply_verdict`).
        self.verdict_wrapper = verdict_wrapper
        self._version = tuple(int(part) for part in kong_version.split(".")[:2])
        self.rpc_timeout = rpc_timeout
        self._connections: dict[str, RpcConnection] = {}
        self._instances: dict[str, _Instance] = {}
        self._configs: dict[str, str] = {}
        # One sequence for every KongSide: each test is a new worker of one Kong that keeps
        # running, as far as the (session-wide) plugin servers can tell.
        self._next_seq = next(_SEQUENCES)
        #: mp_rpc.lua's get_field cache of this (one-worker) Kong: method name as sent -> the
        #: namespace its function was resolved in.
        self.method_cache: dict[str, str] = {}

    def close(self) -> None:
        for conn in self._connections.values():
            conn.close()
        self._connections.clear()

    def __enter__(self) -> KongSide:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _rpc(self, server: PluginServerProcess) -> RpcConnection:
        conn = self._connections.get(server.socket_path)
        if conn is None:
            conn = self._connections[server.socket_path] = RpcConnection(server.socket_path, self.rpc_timeout)
        return conn

    def run(self, request: Request, plugins: Sequence[tuple[PluginServerProcess, Mapping[str, Any]]],
            *, consumers: Iterable[Consumer] = (), ctx_shared: Mapping[str, Any] | None = None,
            guard: Sequence[str] | None = None, phase: str = "access") -> Outcome:
        """Run `phase` of the given plugins (highest priority first) for one request.

        `guard` lists the plugins whose mark the route's fail-closed guard requires
        (kong-mtls-guard, or its post-function fallback: docs/guard.md); None means no guard.
        """
        outcome = Outcome()
        state = RequestState(request, consumers, ctx_shared or {}, self.kong_version, outcome, phase,
                             self.method_cache)
        ordered = sorted(plugins, key=lambda p: -p[0].priority)
        for server, config in ordered:
            state.plugin_name = server.name
            if self.verdict_wrapper and server.name in VERDICT_CACHED_PLUGINS and phase == "access":
                # verdicts.lua: only what the plugin server leaves in this event is its verdict.
                outcome.ctx_shared.pop(verdict_slot(server.name), None)
            calls_before = len(outcome.pdk_calls)
            before = copy.deepcopy(state)
            answered = False
            try:
                self._handle_event(server, config, phase, state)
            except _Exit:
                answered = True
            except LuaError as exc:
                state.log("err", f"[{server.name}] {exc}")
                outcome.exit = Exit(500, {"message": MESSAGE_UNEXPECTED}, {}, "kong")
                break
            finally:
                outcome.events.append((server.name, len(outcome.pdk_calls) - calls_before))
            record = outcome.ctx_shared.pop(verdict_slot(server.name), None)
            if record is not None:
                outcome.verdicts.append((server.name, record))
                to_apply = isinstance(record, dict) and record.get("apply") is True
                if not (to_apply and answered):  # after an answer, verdicts.lua neither applies nor keeps it
                    if to_apply:
                        answered = apply_verdict(record, state)
                    if not (to_apply and record.get("ttl") == 0):
                        check_verdict(record, before, state)
            if answered:
                break
        if outcome.exit is None and guard:
            missing = missing_marks(guard, outcome.ctx_shared)
            if missing:
                state.log("err", f"[{GUARD}] [kong-mtls] guard refused reason={GUARD_REASON} "
                                 f"missing={shared_mark(missing[0])}")
                outcome.exit = Exit(GUARD_STATUS, {"message": GUARD_MESSAGE}, {}, "guard")
        state.finish()
        return outcome

    # plugin.lua, get_instance_id
    def _instance_id(self, server: PluginServerProcess, config: Mapping[str, Any],
                     state: RequestState) -> int | None:
        encoded = json.dumps(config, sort_keys=True, default=str)
        plugin_id = config.get("__plugin_id") or str(uuid.uuid5(uuid.NAMESPACE_URL, server.name + encoded))
        state.plugin_id = plugin_id
        known = self._instances.get(plugin_id)
        if known and self._configs.get(plugin_id) == encoded:
            return known.instance_id
        self._next_seq = next(_SEQUENCES)
        full = kong_config(server.schema, config)
        if self.verdict_wrapper and server.name in VERDICT_CACHED_PLUGINS and state.phase == "access":
            full[VERDICT_APPLY_FLAG] = True
        # A consumer-scoped config (a test passes "consumer_id" as Kong would add it).
        full.update({"route_id": request_route_id(state.request), "consumer_id": config.get("consumer_id"),
                     "__plugin_id": plugin_id,
                     "__key__": f"plugins:{server.name}:{request_route_id(state.request)}::::",
                     "__seq__": self._next_seq})
        try:
            started = self._rpc(server).call("plugin.StartInstance",
                                             {"Name": server.name, "Config": json.dumps(full)})
        except RpcError as exc:
            if self._version < (3, 9):
                # Up to 3.8, mp_rpc.lua's call_start_instance returns the error string where the
                # instance belongs: the instance id is nil and no error is raised. (The next
                # request would then spin in get_instance_id, waiting for an id that never comes.)
                self._instances[plugin_id] = _Instance(self._next_seq, None)
                self._configs[plugin_id] = encoded
                return None
            state.log("err", f"starting instance: {exc}")
            self._instances.pop(plugin_id, None)
            raise LuaError(str(exc)) from exc
        self._instances[plugin_id] = _Instance(self._next_seq, started["Id"])
        self._configs[plugin_id] = encoded
        if known:
            with contextlib.suppress(RpcError):
                self._rpc(server).call("plugin.CloseInstance", known.instance_id)
        return started["Id"]

    # mp_rpc.lua, handle_event and bridge_loop
    def _handle_event(self, server: PluginServerProcess, config: Mapping[str, Any], phase: str,
                      state: RequestState, retried: bool = False) -> None:
        instance_id = self._instance_id(server, config, state)
        rpc = self._rpc(server)
        try:
            event = {"EventName": phase} if instance_id is None else {"InstanceId": instance_id,
                                                                      "EventName": phase}
            step = rpc.call("plugin.HandleEvent", event)
            event_id = step["EventId"]
            while step["Data"] != "ret":
                data = step["Data"]
                method = data["Method"]
                args = data.get("Args") or []
                state.outcome.pdk_args.append(args)
                value, err = state.call(method, as_lua(args))
                state.outcome.pdk_results.append(value)
                step_method = _STEP_BY_METHOD.get(method, "plugin.Step")
                if self.kong_version.startswith("2.") and value is None and err is not None:
                    step_method, value = "plugin.StepError", err
                step = rpc.call(step_method, {"EventId": event_id, "Data": value})
        except RpcError as exc:
            if "no plugin instance" in str(exc).lower() and not retried:
                state.log("warn", str(exc))
                self._instances.pop(state.plugin_id, None)
                self._handle_event(server, config, phase, state, retried=True)
                return
            # Kong logs and carries on: the request is NOT stopped (fail open).
            state.log("err", str(exc))
            state.outcome.rpc_errors.append(f"{server.name}: {exc}")


def request_route_id(request: Request) -> str:
    return str(request.route.get("id"))
