"""One dedicated kong-pdk plugin server per Kong plugin.

Kong 3.9 registers only the first plugin of a multi-plugin server, so every plugin has its own
entry point. This replaces kong-pdk's `start_dedicated_server` (same flags Kong uses: `--dump`,
`-p <prefix>`) to fix what is unsafe in kong-pdk 0.36 for an auth plugin:

* always gevent mode (the thread mode serialises events behind a global lock) and python-style
  PDK return values (lua-style `(value, err)` tuples make `if kong.request.get_header(h):` always
  true);
* the socket reader decodes invalid UTF-8 (a header with raw bytes) with `surrogateescape` and
  packs it back the same way. kong-pdk's reader raises on it and drops the connection, which Kong
  answers by letting the request through (fail open);
* an event that ends with `kong.response.exit` is finished at once; kong-pdk keeps its greenlet
  (and, when exit was the first PDK call, the event) forever;
* instance ids name the config (a hash of plugin name and config): kong-pdk counts them from 0 in
  every server lifetime, so after a restart an id a Kong worker still holds named another route's
  instance (another trust bundle, `report_only` ...). A hashed id is unknown to a new server
  ("no plugin instance": Kong starts it again) or names the very same config;
* events Kong gave up on (its socket timed out while the handler waited) are reaped after
  `--abandon-after` seconds without a Step from Kong; kong-pdk keeps their entry and greenlet forever;
* `plugin.GetRuntimeStats` reports open events and greenlets (Kong never calls it; the soak test does).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import logging
import os
import re
import sys
import time
import types
from collections.abc import Sequence
from typing import Any

import gevent
import msgpack
from kong_pdk.listener import UnixStreamServer
from kong_pdk.logger import Logger
from kong_pdk.module import Module
from kong_pdk.server import MSG_RET, PluginServer, terminal_methods

from kong_mtls.constants import PLUGIN_VERSION, PRIORITIES
from kong_mtls.kong.runtime import (
    CONFIG_ERROR_ATTRIBUTE,
    REASON_INVALID_CONFIG,
    configure_stderr_logging,
    log_line,
)
from kong_mtls.schema import ConfigError

DEFAULT_PREFIX = "/usr/local/kong"
#: Seconds without a Step from Kong after which an event waiting for one is reaped. Kong waits at
#: most nginx's lua_socket_read_timeout (default 60 s) for an answer; this must stay above it.
DEFAULT_ABANDON_AFTER = 600.0
_CAMEL = re.compile("([a-z])([A-Z])")


def instance_id(name: str, config_json: str) -> int:
    """The id of the instance of plugin `name` with this config (as Kong sends it: route, service,
    plugin id and sequence number included): 48 bits, exact in Lua's numbers."""
    digest = hashlib.sha256(f"{name}\0{config_json}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:6], "big")


class SafePluginServer(PluginServer):
    def __init__(self, *args: Any, abandon_after: float = DEFAULT_ABANDON_AFTER, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.abandon_after = abandon_after
        #: event id -> when we handed Kong a PDK call it has not answered yet
        self._waiting_since: dict[int, float] = {}

    def start_instance(self, cfg: dict) -> dict:
        name = cfg["Name"]
        plugin = self.plugins.get(name)
        if plugin is None:
            raise ValueError(f"no plugin {name} in this server")
        iid = instance_id(name, cfg["Config"])
        config = json.loads(cfg["Config"])
        if iid not in self.instances:  # the same config from another worker: one instance
            self.instances[iid] = plugin.new(config)
        return {"Name": name, "Id": iid, "Config": config, "StartTime": time.time()}

    def handle_event(self, event: dict) -> dict:
        answer = super().handle_event(event)
        if _is_exit(answer):
            self._finish_exited(self.events.pop(answer["EventId"], None))
        self._note(answer)
        return answer

    def _step(self, data: dict, is_error: bool) -> dict:
        channel = self.events.get(data.get("EventId"))
        # Kong answered: from now until our next answer the event is ours, not waiting for Kong (a
        # handler that takes long, waiting on a probe, is never taken for abandoned).
        self._waiting_since.pop(data.get("EventId"), None)
        answer = super()._step(data, is_error)
        if _is_exit(answer):
            self._finish_exited(channel)
        self._note(answer)
        return answer

    def _note(self, answer: dict) -> None:
        if answer["EventId"] in self.events:
            self._waiting_since[answer["EventId"]] = time.monotonic()
        else:
            self._waiting_since.pop(answer["EventId"], None)

    def reap_abandoned(self) -> int:
        """Finish the events Kong stopped stepping `abandon_after` seconds ago; returns how many."""
        deadline = time.monotonic() - self.abandon_after
        stale = [eid for eid, since in self._waiting_since.items() if since < deadline]
        for eid in stale:
            del self._waiting_since[eid]
            channel = self.events.pop(eid, None)
            if channel is not None:  # its handler waits for the answer to a PDK call
                gevent.spawn(_answer_abandoned, channel)
        if stale:
            logging.getLogger("kong_mtls").warning(
                log_line("server", "reaped", reason="EVENT_ABANDONED", events=len(stale)))
        return len(stale)

    def reap_forever(self) -> None:
        while True:
            gevent.sleep(min(60.0, self.abandon_after / 2))
            self.reap_abandoned()

    @staticmethod
    def _finish_exited(channel: Any) -> None:
        """Kong never steps an event again after `exit`. kong-pdk's handler greenlet still ends by
        handing "ret" to the event's channel and, in gevent mode, blocks there forever: one leaked
        greenlet per refused request. Take its last messages so it can finish."""
        if channel is not None:
            gevent.spawn(_drain_exited, channel)

    def get_runtime_stats(self, *_: Any) -> dict:
        import greenlet  # gevent's dependency

        return {
            "Pid": os.getpid(),
            "Events": len(self.events),
            "Instances": len(self.instances),
            "Greenlets": sum(1 for o in gc.get_objects() if isinstance(o, greenlet.greenlet)),
        }


def _is_exit(answer: dict) -> bool:
    data = answer.get("Data")
    return isinstance(data, dict) and data.get("Method") in terminal_methods


def _drain_exited(channel: Any) -> None:
    while channel.get() != MSG_RET:
        # A PDK call after exit: answer it as an error (the request is already answered).
        channel.put((None, "the request was already answered by kong.response.exit"))


def _answer_abandoned(channel: Any) -> None:
    """Answer the PDK call a handler of an abandoned event waits for with an error, then every
    later one, until the handler returns."""
    channel.put((None, "Kong abandoned this request"))
    while channel.get() != MSG_RET:
        channel.put((None, "Kong abandoned this request"))


class _SocketReader:
    def __init__(self, sock: Any) -> None:
        self.sock = sock

    def read(self, n: int) -> bytes:
        return self.sock.recv(n)


class SafeUnixStreamServer(UnixStreamServer):
    """kong-pdk's listener with a byte-safe MessagePack codec."""

    def handle(self, sock: Any, address: Any, *_: Any) -> None:
        unpacker = msgpack.Unpacker(_SocketReader(sock), strict_map_key=False,
                                    unicode_errors="surrogateescape")
        packer = msgpack.Packer(unicode_errors="surrogateescape")
        try:
            for message in unpacker:
                sock.sendall(packer.pack(self._answer(message)))
        except (OSError, ValueError, msgpack.UnpackException) as exc:
            self.logger.warn(f"closing plugin-server connection: {exc}")
        finally:
            sock.close()

    def _answer(self, message: Any) -> list:
        if not (isinstance(message, list) and len(message) == 4 and message[0] == 0):
            return [1, None, "malformed request", None]
        _, msgid, method, params = message
        namespace, _, command = str(method).partition(".")
        if namespace != "plugin" or not command:
            return [1, msgid, f"RPC for {namespace} is not supported", None]
        name = command[0].lower() + _CAMEL.sub(lambda m: f"{m.group(1)}_{m.group(2).lower()}", command[1:])
        target = getattr(self.ps, name, None)
        if target is None or name.startswith("_"):
            return [1, msgid, f"no method {method}", None]
        try:
            return [1, msgid, None, target(*(params or []))]
        except Exception as exc:  # reported to Kong as the RPC error, like kong-pdk
            self.logger.warn(f"rpc {method} failed: {exc}")
            return [1, msgid, str(exc), None]


def plugin_info(name: str, plugin_cls: type, schema: list, priority: int | None = None) -> dict:
    """What `--dump` prints for one plugin (Kong reads a JSON array of these)."""
    server = SafePluginServer(loglevel=Logger.WARNING, use_gevent=True, lua_style=False)
    server.plugins[name] = _module(name, plugin_cls, schema, priority)
    return server.get_plugin_info(name)


def _module(name: str, plugin_cls: type, schema: list, priority: int | None) -> Module:
    definition = types.SimpleNamespace(Plugin=_accepting_every_config(name, plugin_cls), Schema=schema,
                                       version=PLUGIN_VERSION,
                                       priority=PRIORITIES[name] if priority is None else priority)
    return Module(name, module=definition)


def _accepting_every_config(name: str, plugin_cls: type) -> type:
    """`plugin_cls` whose instances never fail to start: a config the plugin refuses gives an
    instance that answers every request 500 and logs why (reason INVALID_CONFIG).

    Failing StartInstance is not safe on every Kong: up to 3.8, Kong's `call_start_instance`
    returns the error string where the instance belongs, so the instance id is nil; the next
    HandleEvent fails without "no plugin instance" in the error, and Kong lets the request through
    (`kong/runloop/plugin_servers/mp_rpc.lua`, `init.lua`). Kong 3.9 answers 500 itself.
    """

    class AnyConfig(plugin_cls):
        def __init__(self, config: Any) -> None:
            try:
                if isinstance(config, dict) and config.get("consumer_id"):
                    # As Kong's own auth plugins (`no_consumer`): a config for one consumer runs only
                    # once that consumer is authenticated, and another plugin may replace the consumer
                    # before the guard looks, hiding it from the guard's auto mode.
                    raise ConfigError("consumer", "kong-mtls plugins cannot be scoped to a consumer; "
                                                  "configure them on a route, a Service or globally")
                super().__init__(config)
            except Exception as exc:
                setattr(self, CONFIG_ERROR_ATTRIBUTE, exc)
                logging.getLogger("kong_mtls").error(
                    log_line(name, "instance", reason=REASON_INVALID_CONFIG, detail=str(exc)))

    AnyConfig.__name__ = AnyConfig.__qualname__ = plugin_cls.__name__
    return AnyConfig


def _seconds_at_least_one(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 1 <= value <= 86400:
        raise argparse.ArgumentTypeError("between 1 and 86400 seconds (keep it above nginx's "
                                         "lua_socket_read_timeout)")
    return value


def _arguments(name: str, argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"kong-mtls-{name}",
                                     description=f"Kong plugin server for the {name} plugin.")
    parser.add_argument("--dump", action="store_true",
                        help="print the plugin's name, version, priority, phases and schema as JSON "
                             "(Kong's pluginserver query_cmd)")
    parser.add_argument("-p", "--kong-prefix", dest="prefix", default=DEFAULT_PREFIX,
                        help=f"directory for the socket <prefix>/{name}.sock (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--abandon-after", type=_seconds_at_least_one, default=DEFAULT_ABANDON_AFTER,
                        metavar="SECONDS",
                        help="reap an event Kong has not stepped for this long (above nginx's "
                             "lua_socket_read_timeout; default %(default)g)")
    # Accepted for compatibility with kong-pdk command lines; gevent mode is always on.
    parser.add_argument("-g", "--gevent", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def serve(name: str, plugin_cls: type, schema: list, argv: Sequence[str] | None = None,
          priority: int | None = None) -> int:
    """Entry point body for one plugin: `--dump`, or serve on `<prefix>/<name>.sock`."""
    args = _arguments(name, argv)
    if args.dump:
        sys.stdout.write(json.dumps([plugin_info(name, plugin_cls, schema, priority)]))
        return 0
    if not os.path.isdir(args.prefix):
        sys.stderr.write(f"kong prefix {args.prefix} does not exist; cannot create the socket\n")
        return 2
    configure_stderr_logging(args.verbose)
    loglevel = Logger.DEBUG if args.verbose else Logger.WARNING
    server = SafePluginServer(loglevel=loglevel, use_gevent=True, name=f"{name} {PLUGIN_VERSION}",
                              lua_style=False, abandon_after=args.abandon_after)
    server.plugins[name] = _module(name, plugin_cls, schema, priority)
    gevent.spawn(server.reap_forever)
    listener = SafeUnixStreamServer(server, args.prefix, sock_name=f"{name}.sock", use_gevent=True)
    with contextlib.suppress(KeyboardInterrupt):
        listener.serve_forever()
    return 0
