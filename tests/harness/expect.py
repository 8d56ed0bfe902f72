"""Assertions several protocol tests share."""

from __future__ import annotations

from kong_mtls.constants import MESSAGE_UNEXPECTED
from kong_mtls.kong.runtime import REASON_INVALID_CONFIG
from tests.harness.kong_side import Outcome


def assert_invalid_config(outcome: Outcome, plugin: str, field: str) -> None:
    """A config the plugin refused: its instance answers 500, and the log names the field."""
    assert outcome.exit is not None, "a request under a refused config was proxied"
    assert (outcome.exit.status, outcome.exit.source) == (500, plugin), outcome.exit
    assert outcome.exit.body == {"message": MESSAGE_UNEXPECTED}
    lines = [msg for level, msg in outcome.logs if f"reason={REASON_INVALID_CONFIG}" in msg]
    assert lines and f"invalid config: {field}" in lines[0], outcome.log_text()
    assert not outcome.rpc_errors
