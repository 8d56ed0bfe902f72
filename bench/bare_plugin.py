"""The baseline: a plugin that makes `calls` PDK round trips and does nothing else.

Served exactly like our plugins (kong_mtls.kong.server, safe phase wrapper), so comparing a real
plugin with the bare one making the same number of calls isolates what our own logic costs.
"""

from __future__ import annotations

import sys

from kong_mtls import schema
from kong_mtls.kong.runtime import phase
from kong_mtls.kong.server import serve

NAME = "bare"

Schema = [schema.integer("calls", default=1, between=(1, 64))]


class Plugin:
    def __init__(self, config: dict) -> None:
        self.calls = schema.validate(Schema, config)["calls"]

    @phase(NAME)
    def access(self, kong) -> None:
        for _ in range(self.calls):
            kong.request.get_header("x-bench")


def main(argv=None) -> int:
    return serve(NAME, Plugin, Schema, argv, priority=1000)


if __name__ == "__main__":
    sys.exit(main())
