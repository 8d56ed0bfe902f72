"""The plugin-server core over its socket: events belong to the server, not to a connection."""

from __future__ import annotations

import json
import socket

import pytest

from tests.harness.kong_side import PluginServerProcess, RpcConnection, RpcError


@pytest.fixture(scope="module")
def trivial(plugin_server) -> PluginServerProcess:
    return plugin_server("trivial", "tests.plugins.trivial")


def _instance(rpc: RpcConnection, config: dict) -> int:
    config = {"route_id": "r", "__plugin_id": f"cross-{json.dumps(config, sort_keys=True)}", "__seq__": 1,
              **config}
    return rpc.call("plugin.StartInstance", {"Name": "trivial", "Config": json.dumps(config)})["Id"]


def test_steps_arrive_on_other_pooled_connections_than_their_event(trivial):
    """Kong takes a pooled connection per RPC: HandleEvent on one, each Step on whichever is free.
    Two events interleaved over three connections each get their own answers."""
    pool = [RpcConnection(trivial.socket_path, 5.0) for _ in range(3)]
    try:
        iid = _instance(pool[0], {"mode": "echo", "calls": 2})
        first = pool[0].call("plugin.HandleEvent", {"InstanceId": iid, "EventName": "access"})
        second = pool[1].call("plugin.HandleEvent", {"InstanceId": iid, "EventName": "access"})
        assert first["EventId"] != second["EventId"]
        assert first["Data"]["Method"] == second["Data"]["Method"] == "kong.request.get_header"
        # Each event's two header reads answered on connections it did not start on, crossed over.
        first = pool[2].call("plugin.Step", {"EventId": first["EventId"], "Data": "one"})
        second = pool[0].call("plugin.Step", {"EventId": second["EventId"], "Data": "two"})
        second = pool[2].call("plugin.Step", {"EventId": second["EventId"], "Data": "two-b"})
        first = pool[1].call("plugin.Step", {"EventId": first["EventId"], "Data": "one-b"})
        assert first["Data"] == {"Method": "kong.service.request.set_header", "Args": ["X-Echoed", "one-b"]}
        assert second["Data"] == {"Method": "kong.service.request.set_header", "Args": ["X-Echoed", "two-b"]}
        for step in (first, second):
            step = pool[0].call("plugin.Step", {"EventId": step["EventId"], "Data": True})
            assert step["Data"]["Method"] == "kong.ctx.shared.set"
            assert pool[1].call("plugin.Step", {"EventId": step["EventId"], "Data": None})["Data"] == "ret"
        with pytest.raises(RpcError, match="not found"):  # finished: a late Step is refused
            pool[2].call("plugin.Step", {"EventId": first["EventId"], "Data": None})
        assert pool[2].call("plugin.GetRuntimeStats")["Events"] == 0
    finally:
        for rpc in pool:
            rpc.close()


def test_a_step_for_an_event_that_waits_for_no_step_is_refused(trivial):
    """A Step for an unknown event, or one with a bad shape, is an RPC error; the server serves on."""
    rpc = RpcConnection(trivial.socket_path, 5.0)
    try:
        with pytest.raises(RpcError, match="not found"):
            rpc.call("plugin.Step", {"EventId": 987654321, "Data": None})
        with pytest.raises(RpcError):
            rpc.call("plugin.Step", "not a map")
        with pytest.raises(RpcError, match="no method"):
            rpc.call("plugin.NoSuchThing")
        with pytest.raises(RpcError, match="has no access2 phase"):
            rpc.call("plugin.HandleEvent", {"InstanceId": _instance(rpc, {}), "EventName": "access2"})
        iid = _instance(rpc, {})
        step = rpc.call("plugin.HandleEvent", {"InstanceId": iid, "EventName": "access"})
        assert step["Data"]["Method"] == "kong.request.get_header"
        while step["Data"] != "ret":
            step = rpc.call("plugin.Step", {"EventId": step["EventId"], "Data": None})
        assert rpc.call("plugin.GetRuntimeStats")["Events"] == 0
    finally:
        rpc.close()



def test_a_step_for_an_event_from_before_a_restart_never_resumes_another_event():
    """Kong's worker runs request A's event; its PDK call is in Kong's hands when the plugin server
    dies and Kong's process manager starts it again. The new server starts request B's event. A's
    coroutine then sends its Step (A's header value) with A's event id: it must be refused, not
    handed to B's handler (which would get A's data, and A would run B's next PDK call: B's mark)."""
    server = PluginServerProcess("trivial", "tests.plugins.trivial").start()
    try:
        rpc = RpcConnection(server.socket_path, 5.0)
        old = rpc.call("plugin.HandleEvent", {"InstanceId": _instance(rpc, {"mode": "refuse"}),
                                              "EventName": "access"})
        assert old["Data"]["Method"] == "kong.request.get_header"
        rpc.close()
        server.restart()
        rpc = RpcConnection(server.socket_path, 5.0)
        new = rpc.call("plugin.HandleEvent", {"InstanceId": _instance(rpc, {"mode": "echo"}),
                                              "EventName": "access"})
        assert new["Data"]["Method"] == "kong.request.get_header"
        with pytest.raises(RpcError, match="not found"):
            rpc.call("plugin.Step", {"EventId": old["EventId"], "Data": "request A's header"})
        rpc.close()
    finally:
        server.close()



def test_a_map_keyed_by_an_array_closes_that_connection_with_a_log_line():
    """MessagePack allows any key; Python's dict does not. The connection is closed and logged like
    any other undecodable input (never an uncaught exception), and the server serves on."""
    server = PluginServerProcess("trivial", "tests.plugins.trivial").start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.connect(server.socket_path)
            raw.sendall(b"\x94\x00\x01\xabplugin.Step\x91\x81\x91\x01\x01")  # [0, 1, Step, [{[1]: 1}]]
            raw.settimeout(5.0)
            assert raw.recv(100) == b""
        rpc = RpcConnection(server.socket_path, 5.0)
        assert rpc.call("plugin.GetRuntimeStats")["Events"] == 0
        rpc.close()
        output = server.output()
        assert "connection-closed" in output and "Traceback" not in output, output
    finally:
        server.close()
