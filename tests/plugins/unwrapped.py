"""A plugin that raises WITHOUT the safe phase wrapper: shows why the wrapper exists.

Served by kong-pdk's own dedicated server (thread mode by default, as its docs show), it wedges:
the exception before the first PDK call never releases kong-pdk's event lock.
"""

from __future__ import annotations

from kong_pdk.cli import start_dedicated_server

NAME = "unwrapped"


class Plugin:
    def __init__(self, config: dict) -> None:
        self.config = config

    def access(self, kong) -> None:
        if kong is not None:
            raise RuntimeError("boom before the first PDK call")


if __name__ == "__main__":
    start_dedicated_server(NAME, Plugin, "0.1.0", 1000, [])
