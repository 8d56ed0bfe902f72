"""The plugin server reaps only events that wait for Kong, never one whose handler is busy."""

from __future__ import annotations

import time

from kong_pdk.logger import Logger

from kong_mtls.kong.server import SafePluginServer


class BusyHandlerChannel:
    """An event's channel whose handler, after Kong's Step, works a long time (a probe, say) before
    its next PDK call: the reaper runs meanwhile."""

    def __init__(self, server: SafePluginServer) -> None:
        self.server = server
        self.reaped_meanwhile: int | None = None

    def put(self, _message: object) -> None:
        pass

    def get(self) -> dict:
        self.reaped_meanwhile = self.server.reap_abandoned()
        return {"Method": "kong.ctx.shared.set", "Args": ["k", "v"]}


def test_an_event_kong_just_stepped_is_not_taken_for_abandoned():
    server = SafePluginServer(loglevel=Logger.WARNING, use_gevent=True, lua_style=False, abandon_after=1)
    channel = BusyHandlerChannel(server)
    server.events[7] = channel
    server._waiting_since[7] = time.monotonic() - 3600   # Kong took its time to answer the last call
    answer = server._step({"EventId": 7, "Data": None}, False)
    assert channel.reaped_meanwhile == 0 and 7 in server.events
    assert answer["Data"]["Method"] == "kong.ctx.shared.set" and 7 in server._waiting_since
