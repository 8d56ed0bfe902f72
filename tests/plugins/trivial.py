"""A trivial plugin served through kong_mtls.kong.server, to test the foundation itself.

`mode` picks what its access handler does: echo a header upstream, refuse, raise before or after
its first PDK call (or let a gevent.Timeout escape), call a PDK function Kong does not have, or
take a nap.
"""

from __future__ import annotations

import sys
import time

import gevent

from kong_mtls import schema
from kong_mtls.constants import shared_mark
from kong_mtls.kong.runtime import Refusal, phase
from kong_mtls.kong.server import serve

NAME = "trivial"
PRIORITY = 1000
MODES = ("echo", "refuse", "raise-first", "raise-later", "unknown-pdk", "sleep", "exit-first",
         "timeout-escapes")

Schema = [
    schema.string("mode", default="echo", one_of=MODES),
    schema.integer("calls", default=1, between=(1, 50)),
]


class Plugin:
    def __init__(self, config: dict) -> None:
        self.config = schema.validate(Schema, config)

    @phase(NAME)
    def access(self, kong) -> Refusal | None:
        mode = self.config["mode"]
        if mode == "raise-first":
            raise RuntimeError("boom before the first PDK call")
        if mode == "exit-first":
            return Refusal(401, "first call is exit", "TEST_EXIT_FIRST")
        value = None
        for _ in range(self.config["calls"]):
            value = kong.request.get_header("X-Echo")
        if mode == "raise-later":
            raise RuntimeError("boom after a PDK call")
        if mode == "timeout-escapes":  # a BaseException, as a gevent.Timeout a handler left uncaught
            raise gevent.Timeout(None, "boom: a timeout nobody caught")
        if mode == "refuse":
            return Refusal(403, "Go away", "TEST_REFUSED", detail=f"x-echo={value}")
        if mode == "unknown-pdk":
            value = kong.request.no_such_function("X-Echo")
        if mode == "sleep":
            time.sleep(3)
        kong.service.request.set_header("X-Echoed", "nil" if value is None else value)
        kong.ctx.shared.set(shared_mark(NAME), {"echoed": value})
        return None


def main(argv=None) -> int:
    return serve(NAME, Plugin, Schema, argv, priority=PRIORITY)


if __name__ == "__main__":
    sys.exit(main())
