"""One dedicated plugin server per Kong plugin, on our own plugin-server core (`plugin_server`).

Kong 3.9 registers only the first plugin of a multi-plugin server, so every plugin has its own
entry point (same flags Kong uses with kong-pdk: `--dump`, `-p <prefix>`). kong-pdk 0.36's server
is not used: what it does unsafely for an auth plugin is done safely here, and cheaply:

* handlers run in greenlets (kong-pdk's thread mode serialises events behind a global lock) and PDK
  calls return python-style values (lua-style `(value, err)` tuples make
  `if kong.request.get_header(h):` always true); a PDK error raises kong-pdk's `PDKException`;
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
* instances no event used for `--instance-idle-after` seconds are dropped (Kong never closes the
  instance of a deleted plugin; it starts a dropped one again on "no plugin instance");
* a config the plugin refuses, or one scoped to a consumer, still starts an instance, which answers
  every request 500 with reason INVALID_CONFIG (see `_accepting_every_config`);
* `plugin.GetRuntimeStats` reports open events, instances and greenlets (Kong never calls it; the
  tests do).

`--processes N` serves from N processes, each Kong worker served by one (`processes`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from kong_mtls.constants import PLUGIN_VERSION, PRIORITIES, VERDICT_APPLY_FLAG
from kong_mtls.kong import plugin_server
from kong_mtls.kong.plugin_server import PHASES, PluginServer
from kong_mtls.kong.processes import MAX_PROCESSES, Supervisor
from kong_mtls.kong.runtime import (
    CONFIG_ERROR_ATTRIBUTE,
    REASON_INVALID_CONFIG,
    VERDICT_APPLIED_ATTRIBUTE,
    configure_stderr_logging,
    log_line,
)
from kong_mtls.schema import ConfigError

DEFAULT_PREFIX = "/usr/local/kong"
#: Seconds without a Step from Kong after which an event waiting for one is reaped. Kong waits at
#: most nginx's lua_socket_read_timeout (default 60 s) for an answer; this must stay above it.
DEFAULT_ABANDON_AFTER = 600.0
#: Seconds an instance may go without an event before it is dropped (Kong starts it again if asked).
DEFAULT_INSTANCE_IDLE_AFTER = 3600.0


def instance_id(name: str, config_json: str) -> int:
    """The id of the instance of plugin `name` with this config (as Kong sends it: route, service,
    plugin id and sequence number included): 48 bits, exact in Lua's numbers."""
    digest = hashlib.sha256(f"{name}\0{config_json}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:6], "big")


def new_server(name: str, plugin_cls: type, *, abandon_after: float = DEFAULT_ABANDON_AFTER,
               instance_idle_after: float = DEFAULT_INSTANCE_IDLE_AFTER) -> PluginServer:
    """The plugin server for `plugin_cls`, whose instances start whatever the config."""
    return PluginServer(name, _accepting_every_config(name, plugin_cls), abandon_after=abandon_after,
                        instance_idle_after=instance_idle_after, instance_id=instance_id)


def plugin_info(name: str, plugin_cls: type, schema: list, priority: int | None = None) -> dict:
    """What `--dump` prints for one plugin (Kong reads a JSON array of these)."""
    return {
        "Name": name,
        "Phases": [p for p in PHASES if hasattr(plugin_cls, p)],
        "Priority": PRIORITIES[name] if priority is None else priority,
        "Version": PLUGIN_VERSION,
        "Schema": {"name": name, "fields": [{"config": {"type": "record", "fields": schema}}]},
    }


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
                # Kong's wrapper applies this instance's verdicts (verdicts.lua, which alone adds the key).
                setattr(self, VERDICT_APPLIED_ATTRIBUTE, config.get(VERDICT_APPLY_FLAG) is True)
            except Exception as exc:
                setattr(self, CONFIG_ERROR_ATTRIBUTE, exc)
                logging.getLogger("kong_mtls").error(
                    log_line(name, "instance", reason=REASON_INVALID_CONFIG, detail=str(exc)))

    AnyConfig.__name__ = AnyConfig.__qualname__ = plugin_cls.__name__
    return AnyConfig


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 1 <= value <= 86400:  # also refuses nan: a period of 0 or nan would busy-loop the reaper
        raise argparse.ArgumentTypeError("between 1 and 86400 seconds")
    return value


def _process_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of processes: {text!r}") from None
    if not 1 <= value <= MAX_PROCESSES:
        raise argparse.ArgumentTypeError(f"between 1 and {MAX_PROCESSES}")
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
    parser.add_argument("--abandon-after", type=_seconds, default=DEFAULT_ABANDON_AFTER, metavar="SECONDS",
                        help="reap an event Kong has not stepped for this long (keep it above nginx's "
                             "lua_socket_read_timeout; 1 to 86400, default %(default)g)")
    parser.add_argument("--instance-idle-after", type=_seconds, default=DEFAULT_INSTANCE_IDLE_AFTER,
                        metavar="SECONDS",
                        help="drop a plugin instance no request used for this long to twice this long "
                             "(Kong starts it again when asked; 1 to 86400, default %(default)g)")
    parser.add_argument("--processes", type=_process_count, default=1, metavar="N",
                        help="serve from N processes, each Kong worker served by one of them "
                             "(default %(default)s; about one per nginx worker)")
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
    server = new_server(name, plugin_cls, abandon_after=args.abandon_after,
                        instance_idle_after=args.instance_idle_after)
    listener = plugin_server.listen(os.path.join(args.prefix, f"{name}.sock"))
    if args.processes == 1:
        with contextlib.suppress(KeyboardInterrupt):
            plugin_server.run(server, listener)
    else:
        Supervisor(listener, args.processes, lambda channel: plugin_server.run_handed(server, channel)).run()
    return 0
