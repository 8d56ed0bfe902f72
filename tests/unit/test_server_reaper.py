"""The plugin server reaps only events that wait for Kong, never one whose handler is busy."""

from __future__ import annotations

import json

import gevent

from kong_mtls.kong.runtime import phase
from kong_mtls.kong.server import new_server


class BusyPlugin:
    """After Kong's answer to its first PDK call, the handler works a long time (a probe, say)
    before its next call: the reaper runs meanwhile."""

    server = None
    reaped_meanwhile: int | None = None

    def __init__(self, config: dict) -> None:
        pass

    @phase("busy")
    def access(self, kong) -> None:
        kong.request.get_header("x")
        BusyPlugin.reaped_meanwhile = BusyPlugin.server.reap_abandoned()
        kong.ctx.shared.set("k", "v")


def test_an_event_kong_just_stepped_is_not_taken_for_abandoned():
    server = BusyPlugin.server = new_server("busy", BusyPlugin, abandon_after=1)
    started = server.start_instance({"Name": "busy", "Config": json.dumps({})})
    first = server.handle_event({"InstanceId": started["Id"], "EventName": "access"})
    assert first["Data"]["Method"] == "kong.request.get_header"
    event = server.events[first["EventId"]]
    event.waiting_since -= 3600  # Kong took its time to answer the last call
    answer = server.step({"EventId": first["EventId"], "Data": None})
    assert BusyPlugin.reaped_meanwhile == 0 and first["EventId"] in server.events
    assert answer["Data"]["Method"] == "kong.ctx.shared.set" and event.waiting_since is not None


def test_an_event_kong_stopped_stepping_is_reaped_and_its_handler_finishes():
    server = BusyPlugin.server = new_server("busy", BusyPlugin, abandon_after=1)
    started = server.start_instance({"Name": "busy", "Config": json.dumps({})})
    first = server.handle_event({"InstanceId": started["Id"], "EventName": "access"})
    event = server.events[first["EventId"]]
    event.waiting_since -= 3600
    assert server.reap_abandoned() == 1
    assert server.events == {}
    gevent.sleep(0)  # the reaper resumed the handler with an error: it runs to its end
    assert event.worker is None  # its worker is free again
