"""The plugin server reaps only events that wait for Kong, never one whose handler is busy, and
drops the instances no event used for a whole period."""

from __future__ import annotations

import json

import gevent

from kong_mtls.kong.plugin_server import RET
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


class OneCall:
    """Reads one header in its access phase and remembers what Kong answered."""

    seen: list = []

    def __init__(self, config: dict) -> None:
        pass

    def access(self, kong) -> None:
        OneCall.seen.append(kong.request.get_header("x"))


def _one_call_server():
    server = new_server("one-call", OneCall)
    OneCall.seen = []
    return server, server.start_instance({"Name": "one-call", "Config": json.dumps({"route_id": "r"})})["Id"]


def _run_event(server, iid: int, value: str) -> None:
    call = server.handle_event({"InstanceId": iid, "EventName": "access"})
    assert call["Data"]["Method"] == "kong.request.get_header"
    assert server.step({"EventId": call["EventId"], "Data": value})["Data"] == RET


def test_an_instance_no_event_used_for_a_whole_period_is_dropped_until_kong_starts_it_again():
    server, iid = _one_call_server()
    assert server.drop_idle_instances() == 0  # started during this period
    assert server.drop_idle_instances() == 1 and server.instances == {}
    # What Kong gets: its "no plugin instance" match starts the instance again and retries.
    event = {"InstanceId": iid, "EventName": "access"}
    assert server.answer([0, 9, "plugin.HandleEvent", [event]]) == [1, 9, f"no plugin instance #{iid}", None]
    assert server.start_instance({"Name": "one-call", "Config": json.dumps({"route_id": "r"})})["Id"] == iid
    _run_event(server, iid, "again")
    assert OneCall.seen == ["again"]


def test_an_instance_used_in_every_period_is_kept():
    server, iid = _one_call_server()
    for period in range(3):
        _run_event(server, iid, f"period {period}")
        assert server.drop_idle_instances() == 0
    assert iid in server.instances
    assert server.drop_idle_instances() == 1  # then a period without an event


def test_kong_starting_a_known_instance_again_keeps_it():
    """Kong 3.9 forgets every instance of a plugin on one "no plugin instance" and starts each
    again on its next request: that start counts as a use."""
    server, iid = _one_call_server()
    assert server.drop_idle_instances() == 0
    server.start_instance({"Name": "one-call", "Config": json.dumps({"route_id": "r"})})
    assert server.drop_idle_instances() == 0 and iid in server.instances


def test_an_event_in_flight_on_a_dropped_instance_runs_to_its_end():
    server, iid = _one_call_server()
    call = server.handle_event({"InstanceId": iid, "EventName": "access"})
    server.drop_idle_instances()
    assert server.drop_idle_instances() == 1 and server.instances == {}
    assert server.step({"EventId": call["EventId"], "Data": "late answer"})["Data"] == RET
    assert OneCall.seen == ["late answer"] and server.events == {}
