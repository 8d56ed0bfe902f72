"""The plugin-server core: Kong's MessagePack-RPC on a Unix socket, one greenlet per event.

Kong (`kong/runloop/plugin_servers/rpc/mp_rpc.lua`) sends one request at a time on a pooled
keepalive connection: `plugin.StartInstance`, `plugin.HandleEvent`, then one `plugin.Step*` per
PDK call the handler makes, each on whichever pooled connection it takes, so a Step may arrive on
another connection than its HandleEvent: events belong to the server, not to a connection.

Each event's handler runs in a greenlet of its own (a `Worker`, reused from event to event). A PDK
call switches straight back to the greenlet that resumed the handler (the connection greenlet
answering Kong's HandleEvent or Step), which sends the call to Kong; the Step that carries Kong's
result switches straight back into the handler. No channel, queue or lock on the way. The handler
may still block on gevent (a probe in the thread pool, a timeout): the connection greenlet that
resumed it waits, as Kong waits for that answer.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import gevent
import greenlet
import msgpack
from gevent import socket as gsocket
from gevent.server import StreamServer
from kong_pdk.exception import PDKException

from kong_mtls.kong.runtime import PROCESS_EXITS, VERDICT_APPLIED_ATTRIBUTE, log_line

#: The event's last answer: the handler returned.
RET = "ret"
#: PDK functions after which Kong never steps the event again.
TERMINAL_METHODS = frozenset({"kong.response.exit", "kong.response.error"})
#: The phases a plugin class may implement, in the order `--dump` lists them (kong-pdk's order).
PHASES = ("certificate", "rewrite", "log", "access", "preread", "response")
#: Idle worker greenlets kept for the next events (more are made when more events run at once).
KEEP_IDLE_WORKERS = 64
#: Step variants Kong picks by the PDK result's type (mp_rpc.lua, `get_step_method`); all carry the
#: result in `Data` and are handled alike.
STEP_METHODS = ("plugin.Step", "plugin.StepConsumer", "plugin.StepCredential", "plugin.StepRoute",
                "plugin.StepService", "plugin.StepPlugin", "plugin.StepMultiMap", "plugin.StepMemoryStats")

_log = logging.getLogger("kong_mtls")
_getcurrent = greenlet.getcurrent
_monotonic = time.monotonic


class PluginServerError(Exception):
    """An RPC error sent back to Kong (Kong matches "no plugin instance" to start an instance again)."""


class PdkPath:
    """`kong` and every attribute path under it: calling `kong.request.get_header(h)` is one PDK
    round trip with Method "kong.request.get_header". Children are made once and cached as plain
    attributes, so a path costs attribute lookups only."""

    def __init__(self, path: str) -> None:
        self._path = path

    def __getattr__(self, name: str) -> PdkPath:
        if name.startswith("__"):  # copy, pickle, inspect ... probe dunders: not PDK functions
            raise AttributeError(name)
        child = PdkPath(f"{self._path}.{name}")
        self.__dict__[name] = child
        return child

    def __call__(self, *args: Any) -> Any:
        worker = _getcurrent()
        if type(worker) is not Worker or worker.event is None:
            raise PDKException(f"{self._path} called outside a plugin event")
        return worker.event.pdk_call(self._path, args)

    def __repr__(self) -> str:
        return f"<PDK {self._path}>"


#: The `kong` object every handler gets.
KONG = PdkPath("kong")


class Raised:
    """What a worker hands back when its handler raised (the phase wrapper should never let it)."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Worker(greenlet.greenlet):
    """A greenlet that runs one event's handler after another (a new greenlet costs far more than
    a switch). Its parent is the greenlet that last resumed it, to which a PDK call and the
    handler's end switch back."""

    def __init__(self, idle: list[Worker], keep_idle: int) -> None:
        super().__init__(self._serve)
        self.event: Event | None = None
        self._idle = idle
        self._keep_idle = keep_idle

    def _serve(self, event: Event) -> Any:
        while True:
            self.event = event
            try:
                event.handler(KONG)
                out: Any = RET
            except PROCESS_EXITS:
                raise
            except BaseException as exc:
                out = Raised(exc)
            self.event = event.worker = None
            if len(self._idle) >= self._keep_idle:
                return out  # enough idle workers: this one ends
            self._idle.append(self)
            event = self.parent.switch(out)  # the next event's switch resumes us here


class Event:
    """One plugin event, run by a worker greenlet until its handler returns."""

    __slots__ = ("closed", "handler", "id", "waiting_since", "worker")

    def __init__(self, event_id: int, handler: Callable[[Any], Any], worker: Worker) -> None:
        self.id = event_id
        self.handler = handler
        self.worker: Worker | None = worker
        #: When we handed Kong the PDK call it has not answered yet; None while the handler runs.
        self.waiting_since: float | None = None
        #: Why no PDK call reaches Kong any more (exit sent, or Kong abandoned the event); None
        #: while Kong steps the event.
        self.closed: str | None = None

    def pdk_call(self, method: str, args: tuple) -> Any:
        if self.closed is not None:
            if method in TERMINAL_METHODS:
                return None
            raise PDKException(f"exception from {method}: {self.closed}")
        if method.startswith("kong.log"):  # Kong logs any value; MessagePack cannot carry any
            args = tuple(a if type(a) in (str, int, list, dict) else str(a) for a in args)
        call = {"Method": method, "Args": args}
        worker = self.worker
        if method in TERMINAL_METHODS:
            self.closed = "the request was already answered by kong.response.exit"
            worker.parent.switch(call)  # the server runs us to our end, then sends the exit
            return None
        data, err = worker.parent.switch(call)
        if err:
            raise PDKException(f"exception from {method}: {err}")
        return data


class Instance:
    """A started plugin instance: the plugin object built from one config."""

    __slots__ = ("config", "name", "plugin", "start_time", "used")

    def __init__(self, name: str, config: Any, plugin: Any) -> None:
        self.name = name
        self.config = config
        self.plugin = plugin
        self.start_time = time.time()
        #: Set by every event (and StartInstance), cleared by the reaper (`drop_idle_instances`).
        self.used = True


class PluginServer:
    """Instances, events and the RPC methods Kong calls, for one plugin class."""

    def __init__(self, name: str, plugin_cls: type, *, abandon_after: float, instance_idle_after: float,
                 instance_id: Callable[[str, str], int]) -> None:
        self.name = name
        self.plugin_cls = plugin_cls
        self.phases = frozenset(p for p in PHASES if hasattr(plugin_cls, p))
        self.abandon_after = abandon_after
        self.instance_idle_after = instance_idle_after
        self.instance_id = instance_id
        self.instances: dict[int, Instance] = {}
        self.events: dict[int, Event] = {}
        self.number_events_afresh()
        #: Workers waiting for an event, and the fewest there were since the reaper last looked
        #: (so many were not needed: it ends them).
        self._idle: list[Worker] = []
        self._idle_low = 0
        self.methods: dict[str, Callable[..., Any]] = {
            "plugin.StartInstance": self.start_instance,
            "plugin.CloseInstance": self.close_instance,
            "plugin.HandleEvent": self.handle_event,
            "plugin.StepError": self.step_error,
            "plugin.GetRuntimeStats": self.get_runtime_stats,
            **dict.fromkeys(STEP_METHODS, self.step),
        }

    def number_events_afresh(self) -> None:
        """Start event ids at a random 48-bit number (exact in Lua's numbers). Kong's worker may
        still hold an event of a server, or a `--processes` child, that died and was started again:
        its Step must name no event here ("not found"), never another request's event."""
        self._next_event = int.from_bytes(os.urandom(6), "big")

    # -- instances ---------------------------------------------------------------------------
    def start_instance(self, cfg: dict) -> dict:
        name = cfg["Name"]
        if name != self.name:
            raise PluginServerError(f"no plugin {name} in this server")
        config_json = cfg["Config"]
        iid = self.instance_id(name, config_json)
        instance = self.instances.get(iid)
        if instance is None:  # the same config from another worker: one instance
            config = json.loads(config_json)
            instance = self.instances[iid] = Instance(name, config, self.plugin_cls(config))
        else:
            instance.used = True  # Kong starts it again for an event: keep it for that event
        return {"Name": name, "Id": iid, "Config": instance.config, "StartTime": time.time()}

    def close_instance(self, iid: int) -> dict:
        instance = self.instances.pop(iid, None)
        if instance is None:
            raise PluginServerError(f"no plugin instance #{iid}")  # Kong matches these words
        return {"Name": instance.name, "Id": iid, "Config": instance.config}

    # -- events ------------------------------------------------------------------------------
    def handle_event(self, event: dict) -> dict:
        iid = event["InstanceId"]
        instance = self.instances.get(iid)
        if instance is None:
            raise PluginServerError(f"no plugin instance #{iid}")  # Kong starts it again
        instance.used = True
        phase = event["EventName"]
        if phase not in self.phases:
            raise PluginServerError(f"{self.name} has no {phase} phase")
        eid = self._next_event
        self._next_event = eid + 1
        idle = self._idle
        if idle:
            worker = idle.pop()
            if len(idle) < self._idle_low:
                self._idle_low = len(idle)
        else:
            worker = Worker(idle, KEEP_IDLE_WORKERS)
        event = Event(eid, getattr(instance.plugin, phase), worker)
        return self._drive(event, event)

    def step(self, data: dict) -> dict:
        return self._resume(data, False)

    def step_error(self, data: dict) -> dict:
        return self._resume(data, True)

    def _resume(self, data: dict, is_error: bool) -> dict:
        eid = data["EventId"]
        event = self.events.get(eid)
        if event is None or event.waiting_since is None:  # unknown, finished, or not waiting for Kong
            raise PluginServerError(f"event id {eid} not found")
        # Kong answered: until our next answer the event is ours (a handler that takes long,
        # waiting on a probe, is never taken for abandoned).
        event.waiting_since = None
        value = data.get("Data")
        return self._drive(event, (None, value) if is_error else (value, None))

    def _drive(self, event: Event, resume: Any) -> dict:
        """Run the event's handler up to its next PDK call or its end: what Kong gets back.
        `resume` is the event itself to start it, else the `(result, error)` of its PDK call."""
        out = self._switch(event, resume)
        if type(out) is dict and event.closed is None:  # a PDK call: Kong answers with a Step
            self.events[event.id] = event
            event.waiting_since = _monotonic()
            return {"Data": out, "EventId": event.id}
        self.events.pop(event.id, None)  # returned, raised, or exit: Kong never steps it again
        if type(out) is Raised:
            raise PluginServerError("the plugin handler failed") from out.exc
        if out is not RET:  # exit: the handler returns right after it; let it end before we answer
            self._finish(event, (None, None))
        return {"Data": out, "EventId": event.id}

    def _switch(self, event: Event, resume: Any) -> Any:
        worker = event.worker
        worker.parent = _getcurrent()
        out = worker.switch(resume)
        if type(out) is Raised:
            detail = f"{type(out.exc).__name__}: {out.exc}"
            _log.error(log_line(self.name, "error", reason="HANDLER_RAISED", detail=detail), exc_info=out.exc)
        return out

    def _finish(self, event: Event, result: tuple[Any, Any]) -> None:
        """Run a closed event's handler to its end: every later PDK call fails at once (exit
        answers None), so no call reaches Kong any more."""
        if event.worker is not None:
            self._switch(event, result)

    def fail_call(self, answer: dict, error: str) -> dict:
        """The PDK call in `answer` cannot be sent to Kong (MessagePack cannot carry an argument):
        raise it in the handler as a PDK error and return what the handler does next."""
        event = self.events.get(answer["EventId"])
        if event is None or event.waiting_since is None:
            raise PluginServerError(f"cannot send the PDK call to Kong: {error}")
        event.waiting_since = None
        return self._drive(event, (None, f"cannot send the call to Kong: {error}"))

    def reap_abandoned(self) -> int:
        """Finish the events Kong stopped stepping `abandon_after` seconds ago; returns how many."""
        deadline = _monotonic() - self.abandon_after
        stale = [e for e in self.events.values()
                 if e.waiting_since is not None and e.waiting_since < deadline]
        for event in stale:
            del self.events[event.id]
            event.waiting_since = None
            event.closed = "Kong abandoned this request"
            gevent.spawn(self._finish, event, (None, event.closed))
        if stale:
            _log.warning(log_line("server", "reaped", reason="EVENT_ABANDONED", events=len(stale)))
        return len(stale)

    def trim_idle(self) -> int:
        """End the workers that stayed idle since the last call; returns how many."""
        surplus = self._idle[:self._idle_low]
        del self._idle[:self._idle_low]
        for worker in surplus:
            worker.parent = _getcurrent()
            worker.throw(greenlet.GreenletExit)
        self._idle_low = len(self._idle)
        return len(surplus)

    def drop_idle_instances(self) -> int:
        """Drop the instances no event used since the last call; returns how many.

        Kong never closes the instance of a deleted plugin (nor, in a worker that gets no more
        requests for it, that of an old config), and each holds its plugin's caches. Kong asks
        for a dropped one again: our "no plugin instance" makes it start the instance and retry
        the event. An event in flight holds its handler, so it ends on the dropped instance."""
        idle = [iid for iid, instance in self.instances.items() if not instance.used]
        for iid in idle:
            del self.instances[iid]
        for instance in self.instances.values():
            instance.used = False
        if idle:
            _log.info(log_line("server", "reaped", reason="INSTANCE_IDLE", instances=len(idle)))
        return len(idle)

    def reap_forever(self) -> None:
        """Reap abandoned events and trim idle workers every tick; drop idle instances once
        `instance_idle_after` seconds of ticks have passed (the tick is at most a minute), so an
        instance goes after one to two such periods without an event."""
        tick = min(60.0, self.abandon_after / 2, self.instance_idle_after)
        since_instances = 0.0
        while True:
            gevent.sleep(tick)
            self.reap_abandoned()
            self.trim_idle()
            since_instances += tick
            if since_instances >= self.instance_idle_after:
                since_instances = 0.0
                self.drop_idle_instances()

    def get_runtime_stats(self, *_: Any) -> dict:
        """Open events, instances (and how many of them Kong's verdict wrapper serves) and live
        greenlets (Kong never calls it; the tests do)."""
        return {
            "Pid": os.getpid(),
            "Events": len(self.events),
            "Instances": len(self.instances),
            "InstancesWithVerdictsApplied": sum(
                1 for i in self.instances.values() if getattr(i.plugin, VERDICT_APPLIED_ATTRIBUTE, False)),
            "Greenlets": sum(1 for o in gc.get_objects() if isinstance(o, greenlet.greenlet)),
        }

    # -- the wire ----------------------------------------------------------------------------
    def answer(self, message: Any) -> list:
        """The response to one MessagePack-RPC request `[0, msgid, method, params]`."""
        if not (type(message) is list and len(message) == 4 and message[0] == 0):
            return [1, None, "malformed request", None]
        _, msgid, method, params = message
        target = self.methods.get(method) if type(method) is str else None
        if target is None:
            return [1, msgid, f"no method {method}", None]
        try:
            return [1, msgid, None, target(*(params if type(params) is list else [params]))]
        except Exception as exc:  # reported to Kong as the RPC error
            _log.warning(log_line(self.name, "rpc", method=method, error=str(exc)))
            return [1, msgid, str(exc), None]

    def serve_connection(self, sock: Any, _address: Any = None) -> None:
        """Answer Kong's requests on one connection until Kong closes it.

        Kong sends its next request only after our answer and its own work. The loop waits on a
        read watcher that stays registered for the connection's life (gevent's socket starts and
        stops one for every read) and reads from the socket under gevent's wrapper."""
        unpacker = msgpack.Unpacker(strict_map_key=False, unicode_errors="surrogateescape")
        packer = msgpack.Packer(unicode_errors="surrogateescape")
        raw = sock._sock  # gevent's socket wraps a non-blocking socket
        recv, send = raw.recv, raw.send
        hub = gevent.get_hub()
        me = _getcurrent()
        watcher = hub.loop.io(raw.fileno(), 1)
        waiting = False

        def readable() -> None:
            nonlocal waiting
            if waiting:
                waiting = False
                me.switch()
            else:  # bytes while we work on a request (Kong never does that): look when we wait
                watcher.stop()

        try:
            while True:
                if not watcher.active:
                    watcher.start(readable)
                waiting = True
                hub.switch()
                try:
                    data = recv(65536)
                except BlockingIOError:
                    continue
                if not data:
                    return
                unpacker.feed(data)
                for message in unpacker:
                    out = self._packed(packer, self.answer(message))
                    try:
                        sent = send(out)
                    except BlockingIOError:
                        sent = 0
                    if sent < len(out):
                        sock.sendall(out[sent:])
        # (TypeError: the unpacker meets a map key MessagePack allows and a dict does not, an array.)
        except (OSError, ValueError, TypeError, msgpack.UnpackException) as exc:
            _log.warning(log_line("server", "connection-closed", error=str(exc)))
        finally:
            waiting = False
            watcher.stop()
            watcher.close()
            sock.close()

    def _packed(self, packer: msgpack.Packer, response: list) -> bytes:
        """`response` packed. A PDK call MessagePack cannot carry is raised in its handler instead,
        and what the handler does next is packed (a handler that keeps doing it gets an error)."""
        for _ in range(100):
            try:
                return packer.pack(response)
            except (TypeError, ValueError, OverflowError) as exc:
                result = response[3]
                if not (type(result) is dict and type(result.get("Data")) is dict):
                    return packer.pack([1, response[1], f"cannot encode the answer: {exc}", None])
                try:
                    response = [1, response[1], None, self.fail_call(result, str(exc))]
                except PluginServerError as error:
                    response = [1, response[1], str(error), None]
        return packer.pack([1, response[1], "the plugin keeps making PDK calls that cannot be sent", None])


def listen(path: str, backlog: int = 4096) -> socket.socket:
    """A listening Unix stream socket at `path` (a stale one from a previous server is replaced)."""
    if os.path.exists(path):
        os.remove(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(backlog)
    return listener


def exit_with_parent() -> None:
    """Kong's process manager starts us and restarts us when we die: when Kong is gone (we were
    re-parented), we go too. (A child of `--processes` watches the parent that forked it.)"""
    parent = os.getppid()
    while True:
        gevent.sleep(1)
        if os.getppid() != parent:
            _log.info(log_line("server", "exit", reason="PARENT_GONE"))
            os._exit(0)


def run(server: PluginServer, listener: socket.socket) -> None:
    """Serve Kong's connections on `listener` forever."""
    gevent.spawn(server.reap_forever)
    gevent.spawn(exit_with_parent)
    StreamServer(gsocket.socket(fileno=listener.detach()), server.serve_connection).serve_forever()


def run_handed(server: PluginServer, channel: socket.socket) -> None:
    """A child of `--processes`: serve the connections the parent hands over `channel` (one
    SOCK_SEQPACKET message with one descriptor each) until the parent is gone."""
    server.number_events_afresh()  # not the ids of the parent when it forked, as every child had
    gevent.spawn(server.reap_forever)
    gevent.spawn(exit_with_parent)
    handed = gsocket.socket(fileno=channel.detach())
    while True:
        message, fds, _flags, _address = socket.recv_fds(handed, 16, 4)
        if not message and not fds:
            return
        for fd in fds:
            gevent.spawn(server.serve_connection, gsocket.socket(fileno=fd))
