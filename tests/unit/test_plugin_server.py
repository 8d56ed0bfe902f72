"""The plugin-server core in process: the `kong` object, PDK errors, calls Kong cannot be sent."""

from __future__ import annotations

import json

import msgpack
import pytest
from kong_pdk.exception import PDKException

from kong_mtls.kong.plugin_server import KONG, RET
from kong_mtls.kong.server import new_server


def test_the_kong_object_names_the_pdk_function_and_caches_its_path():
    assert repr(KONG.request.get_header) == "<PDK kong.request.get_header>"
    assert KONG.request is KONG.request and KONG.client.tls is KONG.client.tls
    with pytest.raises(AttributeError):
        KONG.__deepcopy__  # noqa: B018 - dunders are never PDK functions
    with pytest.raises(PDKException, match="outside a plugin event"):
        KONG.request.get_header("x")


class Recorder:
    """Records what its PDK calls returned or raised."""

    seen: list = []

    def __init__(self, config: dict) -> None:
        self.arg = object() if config.get("unencodable") else "x"

    def access(self, kong) -> None:
        try:
            Recorder.seen.append(kong.request.get_header(self.arg))
        except PDKException as exc:
            Recorder.seen.append(f"raised: {exc}")
        kong.log.notice("done", 42, {"a": 1}, None)


def _start(server, config: dict) -> int:
    return server.start_instance({"Name": "recorder", "Config": json.dumps(config)})["Id"]


def test_step_error_raises_pdk_exception_and_python_style_values_come_back():
    server = new_server("recorder", Recorder)
    Recorder.seen = []
    iid = _start(server, {})
    call = server.handle_event({"InstanceId": iid, "EventName": "access"})
    assert call["Data"] == {"Method": "kong.request.get_header", "Args": ("x",)}
    log = server.step_error({"EventId": call["EventId"], "Data": "boom"})
    assert Recorder.seen == ["raised: exception from kong.request.get_header: boom"]
    # kong.log carries any value: what MessagePack cannot, as text (None included, as kong-pdk).
    assert log["Data"] == {"Method": "kong.log.notice", "Args": ("done", 42, {"a": 1}, "None")}
    assert server.step({"EventId": log["EventId"], "Data": None})["Data"] == RET
    call = server.handle_event({"InstanceId": iid, "EventName": "access"})
    server.step({"EventId": call["EventId"], "Data": "value"})
    assert Recorder.seen[-1] == "value"


def test_a_pdk_call_kong_cannot_be_sent_raises_in_the_handler():
    server = new_server("recorder", Recorder)
    Recorder.seen = []
    iid = _start(server, {"unencodable": True})
    answer = server.answer([0, 7, "plugin.HandleEvent", [{"InstanceId": iid, "EventName": "access"}]])
    packed = server._packed(msgpack.Packer(), answer)
    msgid, error, result = msgpack.unpackb(packed)[1:]
    assert (msgid, error) == (7, None)
    assert result["Data"]["Method"] == "kong.log.notice"  # the handler went on after the PDK error
    assert Recorder.seen[0].startswith("raised: exception from kong.request.get_header: cannot send")


@pytest.mark.parametrize("count", ["0", "65", "two"])
def test_a_process_count_out_of_range_is_refused_before_anything_starts(count, tmp_path, capsys):
    from kong_mtls.kong.server import serve

    with pytest.raises(SystemExit) as exited:
        serve("recorder", Recorder, [], ["-p", str(tmp_path), "--processes", count])
    assert exited.value.code == 2
    assert "--processes" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no socket
