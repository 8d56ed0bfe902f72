"""The guard's mark is the last thing a passing adapter publishes.

Kong lets a request go on when the plugin server stops answering in the middle of an event (a
crash, a timeout: `mp_rpc.lua` only logs). The guard then proxies if the mark is already in
`kong.ctx.shared`. So a mark published before the identity headers are written would let a request
through with whatever identity headers the client sent. These tests run each adapter in-process
against a recording stand-in for the PDK and make its header write fail.
"""

from __future__ import annotations

from typing import Any

import pytest

from kong_mtls.constants import API_KEY_AUTH, CLIENT_CERT_AUTH, IP_ALLOWLIST, shared_mark, verdict_slot
from kong_mtls.core.api_keys import credential_entry, generate_key
from kong_mtls.kong import api_key_auth, client_cert_auth, ip_allowlist
from tests.harness.recording_kong import SET_SHARED, RecordingKong

ALICE = {"id": "5d0b9a36-1c5e-4f0e-9a8b-3f2d1c0b0a01", "username": "alice"}
KEY = generate_key("marks")
SET_HEADERS = "service.request.set_headers"


def client_cert_case(pki) -> tuple[Any, dict, str]:
    plugin = client_cert_auth.Plugin({"ca_certificates": [pki.root.cert_pem], "revocation_check_mode": "SKIP",
                                      "groups_from": ["cn"]})
    answers = {"client.tls.get_full_client_certificate_chain": lambda: pki.alice.chain_pem,
               "client.load_consumer": lambda ref, _: ALICE if ref == "alice" else None}
    return plugin, answers, shared_mark(CLIENT_CERT_AUTH)


def api_key_case(pki) -> tuple[Any, dict, str]:
    plugin = api_key_auth.Plugin({"credentials": [credential_entry(KEY.key, "alice", "marks")]})
    answers = {"request.get_headers": lambda *_: {"apikey": [KEY.key]},
               "client.load_consumer": lambda ref, _: ALICE if ref == "alice" else None}
    return plugin, answers, shared_mark(API_KEY_AUTH)


def ip_allowlist_case(pki) -> tuple[Any, dict, str]:
    plugin = ip_allowlist.Plugin({"allow": ["192.0.2.0/24"], "client_ip_header": "X-Real-Client-IP"})
    answers = {"nginx.get_var": lambda name: "192.0.2.7" if name == "realip_remote_addr" else None}
    return plugin, answers, shared_mark(IP_ALLOWLIST)


CASES = {"client-cert-auth": client_cert_case, "api-key-auth": api_key_case,
         "ip-allowlist": ip_allowlist_case}


@pytest.mark.parametrize("name", list(CASES))
def test_a_pass_publishes_the_mark_last(pki, name):
    plugin, answers, mark = CASES[name](pki)
    kong = RecordingKong(answers)
    plugin.access(kong)
    assert mark in kong.shared and "response.exit" not in kong.calls
    # The mark last; no verdict: without the guard plugin's wrapper (the config carries no mark of
    # it), no one would take one.
    assert kong.calls[-1] == SET_SHARED and kong.shared_keys[-1] == mark
    assert verdict_slot(name) not in kong.shared
    assert SET_HEADERS in kong.calls


@pytest.mark.parametrize("name", list(CASES))
def test_no_mark_when_the_header_write_fails(pki, name):
    plugin, answers, mark = CASES[name](pki)
    kong = RecordingKong(answers, fail=SET_HEADERS)
    plugin.access(kong)
    assert mark not in kong.shared, kong.calls
