"""What each adapter offers the guard plugin's verdict cache (docs/guard.md#the-verdict-cache).

Run in-process against a recording PDK stand-in, each plugin as Kong with kong-mtls-guard loaded
starts it (only then does it leave verdicts): the inputs a verdict names (what decided it, with
the values read), how long it holds, and the calls it carries. The replay of every offer is checked
against the live request in every protocol test (tests/harness/kong_side.py `check_verdict`); the
Lua side in tests/unit/test_verdict_cache.py; real Kong in the integration scenario `test_15_...`.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import pytest

from kong_mtls.constants import (
    API_KEY_AUTH,
    CLIENT_CERT_AUTH,
    DEFAULT_VERDICT_CACHE_TTL,
    HEADER_CERT_AUTH,
    IP_ALLOWLIST,
    VERDICT_REPLAYABLE,
    shared_mark,
    verdict_slot,
)
from kong_mtls.core.addresses import MAX_HEADER_LINES
from kong_mtls.core.api_keys import credential_entry, generate_key
from kong_mtls.core.chain import spki_sha256
from kong_mtls.devpki import Authority
from kong_mtls.kong import api_key_auth, client_cert_auth, header_cert_auth, ip_allowlist
from kong_mtls.kong.runtime import PLAIN_READS, VERDICT_APPLIED_ATTRIBUTE, Refusal, VerdictInputs, phase
from tests.harness.recording_kong import RecordingKong

ALICE = {"id": "5d0b9a36-1c5e-4f0e-9a8b-3f2d1c0b0a01", "username": "alice"}
KEY = generate_key("offers")
PEER = "realip_remote_addr"


def decide(plugin: Any, answers: dict, shared: dict | None = None) -> RecordingKong:
    """One request to `plugin` in a Kong with kong-mtls-guard loaded (the instance was started from
    a config the wrapper marked): the recording PDK object, the verdict left in its kong.ctx.shared."""
    setattr(plugin, VERDICT_APPLIED_ATTRIBUTE, True)
    kong = RecordingKong(answers)
    kong.shared.update(shared or {})
    plugin.access(kong)
    return kong


def offer(plugin: Any, answers: dict, name: str,
          shared: dict | None = None) -> tuple[dict | None, RecordingKong]:
    """`decide`, then what the wrapper does (verdicts.lua): it takes the verdict and makes the calls
    of one to apply. Returns the verdict offered to the cache (None when there is none, or one only
    to apply) and the recording PDK object."""
    kong = decide(plugin, answers, shared)
    record = kong.shared.pop(verdict_slot(name), None)
    if record is not None and record.get("apply"):
        for method, args, count in record["calls"]:
            kong._call(method.removeprefix("kong."), *args[:count])
    return (record if record is not None and record["ttl"] > 0 else None), kong


def peer_answers(peer: str, headers: dict | None = None, forwarded: str | None = None) -> dict:
    return {"nginx.get_var": lambda name: peer if name == PEER else None,
            "request.get_headers": lambda *_: headers or {},
            "client.get_forwarded_ip": lambda: forwarded}


# -- ip-allowlist ----------------------------------------------------------------------------------

def test_ip_allowlist_offers_a_pass_decided_by_the_peer_alone() -> None:
    plugin = ip_allowlist.Plugin({"allow": ["192.0.2.0/24"], "client_ip_header": "X-Real-Client-IP"})
    record, kong = offer(plugin, peer_answers("192.0.2.7"), IP_ALLOWLIST)
    assert record["inputs"] == [["var", PEER, "192.0.2.7"]] and record["ttl"] == DEFAULT_VERDICT_CACHE_TTL
    methods = [call[0] for call in record["calls"]]
    assert methods == ["kong.service.request.set_headers", "kong.ctx.shared.set"]
    assert record["calls"][-1][1] == [shared_mark(IP_ALLOWLIST), kong.shared[shared_mark(IP_ALLOWLIST)]]
    assert all(count == len(args) for _, args, count in record["calls"])


def test_ip_allowlist_offers_a_refusal_before_answering_it() -> None:
    plugin = ip_allowlist.Plugin({"allow": ["192.0.2.0/24"], "verdict_cache_ttl": 5})
    record, kong = offer(plugin, peer_answers("203.0.113.9"), IP_ALLOWLIST)
    assert kong.calls[-3:] == ["ctx.shared.set", "log.warn", "response.exit"]     # the wrapper answers
    assert record["ttl"] == 5 and record["inputs"] == [["var", PEER, "203.0.113.9"]]
    (log, log_args, _), (exit_, exit_args, _) = record["calls"]
    assert (log, exit_) == ("kong.log.warn", "kong.response.exit")
    assert "reason=ADDRESS_NOT_ALLOWED" in log_args[0]
    assert exit_args == [403, {"message": "IP address not allowed: 203.0.113.9"}, {}]


HEADER_CONFIG = {"source": "header", "header_name": "X-Forwarded-For", "trusted_proxies": ["10.0.0.0/8"],
                 "allow": ["198.51.100.0/24"], "client_ip_header": "X-Real-Client-IP"}


def test_ip_allowlist_header_source_names_every_line_of_its_header() -> None:
    headers = {"x-forwarded-for": ["198.51.100.7", "10.0.0.3"], "user-agent": ["a"]}
    record, _ = offer(ip_allowlist.Plugin(HEADER_CONFIG), peer_answers("10.0.0.1", headers), IP_ALLOWLIST)
    assert record["inputs"] == [["var", PEER, "10.0.0.1"],
                                ["header", "x-forwarded-for", ["198.51.100.7", "10.0.0.3"]]]


def test_requests_alike_in_the_named_inputs_get_the_same_calls() -> None:
    """The inputs are enough: other headers never change what is decided."""
    plugin = ip_allowlist.Plugin(HEADER_CONFIG)
    records = []
    for other in ({}, {"user-agent": ["b"], "x-real-client-ip": ["6.6.6.6"]}, {"cookie": ["a=1", "b=2"]}):
        headers = {"x-forwarded-for": ["198.51.100.7"], **other}
        records.append(offer(plugin, peer_answers("10.0.0.1", headers), IP_ALLOWLIST)[0])
    assert records[0] == records[1] == records[2]


def test_a_header_map_that_may_be_cut_is_not_offered() -> None:
    headers = {f"x-h{i}": ["v"] for i in range(MAX_HEADER_LINES)}
    record, kong = offer(ip_allowlist.Plugin(HEADER_CONFIG), peer_answers("10.0.0.1", headers), IP_ALLOWLIST)
    assert record is None and "response.exit" in kong.calls


def test_ip_allowlist_forwarded_source_names_kongs_forwarded_address() -> None:
    plugin = ip_allowlist.Plugin({"source": "forwarded", "allow": ["198.51.100.0/24"]})
    record, _ = offer(plugin, peer_answers("10.0.0.1", forwarded="198.51.100.9"), IP_ALLOWLIST)
    assert record["inputs"] == [["var", PEER, "10.0.0.1"], ["var", "remote_addr", "198.51.100.9"]]


def test_no_offer_and_no_extra_call_with_a_ttl_of_zero() -> None:
    plugin = ip_allowlist.Plugin({"allow": ["192.0.2.0/24"], "verdict_cache_ttl": 0})
    record, kong = offer(plugin, peer_answers("192.0.2.7"), IP_ALLOWLIST)
    assert record is None and kong.calls == ["nginx.get_var", "ctx.shared.set", "ctx.shared.set"]  # applied


# -- api-key-auth ----------------------------------------------------------------------------------

def key_plugin(**config: Any) -> api_key_auth.Plugin:
    entry = credential_entry(KEY.key, "alice", "offers", **config.pop("credential", {}))
    return api_key_auth.Plugin({"credentials": [entry], **config})


def key_answers(headers: dict | None = None, method: str = "GET") -> dict:
    return {"request.get_headers": lambda *_: {"apikey": [KEY.key]} if headers is None else headers,
            "request.get_method": lambda: method,
            "request.get_query": lambda *_: {},
            "client.load_consumer": lambda ref, _: ALICE if ref == "alice" else None}


def test_api_key_offers_a_pass_decided_by_its_key_headers() -> None:
    plugin = key_plugin(key_names=["apikey", "X_Api_Key"], hide_credentials=True)
    record, _ = offer(plugin, key_answers(), API_KEY_AUTH)
    assert record["inputs"] == [["header", "apikey", [KEY.key]], ["header", "x_api_key", None],
                                ["header", "x-api-key", None]]
    assert 0 < record["ttl"] <= DEFAULT_VERDICT_CACHE_TTL
    assert {call[0] for call in record["calls"]} <= VERDICT_REPLAYABLE
    assert [call[0] for call in record["calls"]] == [
        "kong.client.authenticate", "kong.service.request.set_headers", "kong.ctx.shared.set"]


def test_api_key_names_the_method_when_preflights_go_unauthenticated() -> None:
    record, _ = offer(key_plugin(run_on_preflight=False), key_answers(method="POST"), API_KEY_AUTH)
    assert record["inputs"][0] == ["var", "request_method", "POST"]


def test_an_api_key_verdict_never_outlives_the_key_or_the_consumer_row() -> None:
    soon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 20))
    record, _ = offer(key_plugin(credential={"expires_at": soon}), key_answers(), API_KEY_AUTH)
    assert 0 < record["ttl"] <= 20
    record, _ = offer(key_plugin(consumer_cache_ttl=7), key_answers(), API_KEY_AUTH)
    assert 0 < record["ttl"] <= 7
    record, _ = offer(key_plugin(consumer_cache_ttl=0), key_answers(), API_KEY_AUTH)
    assert record is None                         # the consumer row is read on every request


@pytest.mark.parametrize("config", [
    {"key_in_query": True}, {"key_in_body": True}, {"anonymous": "guest"},
    {"credential": {"allowed_cidrs": ["192.0.2.0/24"]}}, {"credential": {"client_cert": True}},
], ids=["query", "body", "anonymous", "cidrs", "certificate"])
def test_api_key_verdicts_that_depend_on_more_are_not_offered(config: dict) -> None:
    cert_mark = {"verified": True, "consumer_id": ALICE["id"], "anonymous": False}
    answers = {**key_answers(), "client.get_forwarded_ip": lambda: "192.0.2.1",
               "request.get_body": lambda *_: {}}
    record, kong = offer(key_plugin(**config), answers, API_KEY_AUTH,
                         {shared_mark(CLIENT_CERT_AUTH): cert_mark})
    assert record is None and "client.authenticate" in kong.calls          # a pass, not offered


def test_api_key_refusals_and_long_header_maps_are_not_offered() -> None:
    record, kong = offer(key_plugin(), key_answers({"apikey": ["ak_x.wrong"]}), API_KEY_AUTH)
    assert record is None and "response.exit" in kong.calls
    many = {"apikey": [KEY.key], **{f"x-h{i}": ["v"] for i in range(99)}}
    record, kong = offer(key_plugin(), key_answers(many), API_KEY_AUTH)
    assert record is None and "client.authenticate" in kong.calls


# -- client-cert-auth ------------------------------------------------------------------------------

def cert_plugin(pki: Any, **config: Any) -> client_cert_auth.Plugin:
    return client_cert_auth.Plugin({"ca_certificates": [pki.root.cert_pem], "revocation_check_mode": "SKIP",
                                    **config})


def test_client_cert_auth_offers_a_pass_decided_by_the_chain(pki: Any) -> None:
    answers = {"client.tls.get_full_client_certificate_chain": lambda: pki.alice.chain_pem,
               "client.load_consumer": lambda ref, _: ALICE if ref == "alice" else None}
    record, _ = offer(cert_plugin(pki), answers, CLIENT_CERT_AUTH)
    assert record["inputs"] == [["chain", "", pki.alice.chain_pem]]
    assert 0 < record["ttl"] <= DEFAULT_VERDICT_CACHE_TTL
    not_after = min(c.not_valid_after_utc.timestamp() for c in (pki.alice.cert, pki.root.cert))
    record, _ = offer(cert_plugin(pki, verdict_cache_ttl=3600), answers, CLIENT_CERT_AUTH)
    assert record["ttl"] <= min(60, not_after - time.time())         # the consumer row's 60 s


def test_client_cert_auth_offers_the_refusal_of_a_missing_certificate(pki: Any) -> None:
    answers = {"client.tls.get_full_client_certificate_chain": lambda: None}
    record, kong = offer(cert_plugin(pki), answers, CLIENT_CERT_AUTH)
    assert record["inputs"] == [["chain", "", None]] and kong.calls[-1] == "response.exit"
    assert record["calls"][-1][1][:2] == [401, {"message": "No required TLS certificate was sent"}]


def test_a_chain_that_is_no_text_is_not_offered(pki: Any) -> None:
    answers = {"client.tls.get_full_client_certificate_chain": lambda: ["-----BEGIN CERTIFICATE-----"]}
    record, kong = offer(cert_plugin(pki), answers, CLIENT_CERT_AUTH)
    assert record is None and kong.calls[-1] == "response.exit"


def test_the_request_that_logs_start_notices_is_not_offered(pki: Any) -> None:
    plugin = cert_plugin(pki)
    plugin.start_notices = (("warn", "[kong-mtls] client-cert-auth anchor-expiring ..."),)
    answers = {"client.tls.get_full_client_certificate_chain": lambda: None}
    assert offer(plugin, answers, CLIENT_CERT_AUTH)[0] is None
    assert offer(plugin, answers, CLIENT_CERT_AUTH)[0] is not None


# -- the wrapper -----------------------------------------------------------------------------------

class Writer:
    """A plugin whose handler makes `call` (dotted, after `kong.`) before passing."""

    verdict_cache_ttl = 60

    def __init__(self, call: str) -> None:
        self.call = call

    @phase("writer", verdicts=True)
    def access(self, kong: Any, inputs: VerdictInputs) -> None:
        inputs.var(PEER, kong.nginx.get_var(PEER))
        target = kong
        for name in self.call.split("."):
            target = getattr(target, name)
        target("x")
        kong.ctx.shared.set("kong_mtls.writer", {"ok": True})
        inputs.holds_for(60)


def test_a_verdict_with_a_call_the_cache_cannot_replay_is_not_offered() -> None:
    for call, offered in (("service.request.set_headers", True), ("service.request.set_body", False),
                          ("service.set_target", False)):
        record, _ = offer(Writer(call), {"nginx.get_var": lambda _: "192.0.2.1"}, "writer")
        assert (record is not None) == offered, call
    assert "kong.request.get_header" in PLAIN_READS


# -- header-cert-auth ------------------------------------------------------------------------------

def rfc9440(cert: Any) -> str:
    import base64

    from cryptography.hazmat.primitives.serialization import Encoding
    return f":{base64.b64encode(cert.public_bytes(Encoding.DER)).decode()}:"


def edge_plugin(pki: Any, **config: Any) -> header_cert_auth.Plugin:
    return header_cert_auth.Plugin({
        "certificate_header": "Client-Cert", "certificate_header_format": "rfc9440",
        "chain_header": "Client-Cert-Chain", "trusted_proxies": ["10.0.0.0/8"],
        "ca_certificates": [pki.root.cert_pem], "allow_partial_chain": False,
        "revocation_check_mode": "SKIP", "remove_headers": ["X-Client-Verify"], **config})


def edge_answers(pki: Any, peer: str, headers: dict) -> dict:
    chain = ", ".join(rfc9440(c) for c in pki.alice.intermediates) if pki.alice.intermediates else None
    base = {"client-cert": [rfc9440(pki.alice.cert)], **({"client-cert-chain": [chain]} if chain else {})}
    return {"nginx.get_var": lambda name: peer if name == PEER else None,
            "request.get_headers": lambda *_: {**base, **headers},
            "client.load_consumer": lambda ref, _: ALICE if ref == "alice" else None}


def test_header_cert_auth_offers_a_pass_decided_by_the_peer_and_the_edges_headers(pki: Any) -> None:
    records = [offer(edge_plugin(pki), edge_answers(pki, "10.0.0.5", other), HEADER_CERT_AUTH)[0]
               for other in ({}, {"x-client-verify": ["SUCCESS"], "user-agent": ["b"]})]
    record = records[0]
    # Other headers (removed ones too) decide nothing (the TTL is the consumer row's time left).
    assert {**records[1], "ttl": record["ttl"]} == record
    assert [input_[:2] for input_ in record["inputs"]] == [
        ["var", PEER], ["header", "client-cert"], ["header", "client-cert-chain"]]
    assert record["inputs"][1][2] == [rfc9440(pki.alice.cert)]
    assert 0 < record["ttl"] <= DEFAULT_VERDICT_CACHE_TTL
    assert [call[0] for call in record["calls"]][-1] == "kong.ctx.shared.set"


def test_header_cert_auth_offers_a_strangers_refusal_by_its_peer_alone(pki: Any) -> None:
    record, kong = offer(edge_plugin(pki), edge_answers(pki, "203.0.113.9", {}), HEADER_CERT_AUTH)
    assert "request.get_headers" not in kong.calls and kong.calls[-1] == "response.exit"
    assert record["inputs"] == [["var", PEER, "203.0.113.9"]]


def test_header_cert_auth_names_the_edges_certificate_and_holds_no_longer_than_it(pki: Any) -> None:
    edge_ca = Authority.root("edge origin-pull CA")
    expiring = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=600)
    edge = edge_ca.client("edge.example", dns=["edge.example"], not_after=expiring)
    plugin = edge_plugin(pki, trusted_proxies=None, edge_ca_certificates=[edge_ca.cert_pem],
                         edge_spki_sha256=[spki_sha256(edge.cert)], verdict_cache_ttl=3600,
                         consumer_cache_ttl=3600)
    answers = {**edge_answers(pki, "203.0.113.9", {}),
               "client.tls.get_full_client_certificate_chain": lambda: edge.chain_pem}
    record, _ = offer(plugin, answers, HEADER_CERT_AUTH)
    assert record["inputs"][0] == ["chain", "", edge.chain_pem]
    assert 500 < record["ttl"] <= edge.cert.not_valid_after_utc.timestamp() - time.time() + 1




class Reader:
    """A plugin that names the peer as its only input, then reads `read(*args)` (dotted, after
    `kong.`) and refuses unless it answers something."""

    verdict_cache_ttl = 60

    def __init__(self, read: str, *args: Any) -> None:
        self.read, self.args = read, args

    @phase("reader", verdicts=True)
    def access(self, kong: Any, inputs: VerdictInputs) -> Refusal | None:
        inputs.var(PEER, kong.nginx.get_var(PEER))
        inputs.holds_for(60)
        target = kong
        for name in self.read.split("."):
            target = getattr(target, name)
        if not target(*self.args):
            return Refusal(403, "no", "NO")
        kong.ctx.shared.set("kong_mtls.reader", {"ok": True})
        return None


READS = [
    ("nginx.get_var", (PEER,), True),                     # the input itself
    ("client.load_consumer", ("alice", True), True),      # a consumer row: its cache time bounds it
    ("nginx.get_var", ("remote_addr",), False),           # another variable
    ("client.get_forwarded_ip", (), False),               # = $remote_addr, not named
    ("request.get_header", ("x-role",), False),
    ("request.get_headers", (), False),                   # no header named
    ("request.get_method", (), False),
    ("ctx.shared.get", ("kong_mtls.client-cert-auth",), False),     # another plugin's mark
    ("client.get_credential", (), False),
    ("request.get_query", (), False),
]


@pytest.mark.parametrize(("read", "args", "offered"), READS, ids=[f"{r}{a}" for r, a, _ in READS])
def test_a_verdict_resting_on_a_read_it_does_not_name_is_not_offered(read: str, args: tuple,
                                                                     offered: bool) -> None:
    """"Inputs the Python side forgot to declare": whatever a handler read and did not name as an
    input (another plugin's mark, a header, the credential ...) may have decided, so the wrapper
    offers no verdict (runtime.READ_INPUTS), pass or refusal."""
    for answer in ("yes", None):
        answers = {"nginx.get_var": lambda name: "192.0.2.1" if name == PEER else None,
                   **{read: lambda *_, answer=answer: answer}}
        if read == "ctx.shared.get":
            shared = {"kong_mtls.client-cert-auth": {"verified": True}} if answer else {}
        else:
            shared = {}
        record, kong = offer(Reader(read, *args), answers, "reader", shared)
        assert (record is not None) == offered, (read, answer)
        assert kong.calls[-1] == ("ctx.shared.set" if answer else "response.exit")
    assert {f"kong.{read}" for read, _, _ in READS} <= PLAIN_READS


# -- review: how long a verdict holds ---------------------------------------------------------------

class Clock:
    """The consumer cache's clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_client_cert_verdict_never_outlives_the_consumer_row_it_carries(pki: Any) -> None:
    """docs/guard.md: a client-cert-auth verdict holds "no longer than the consumer row is cached"
    (as api-key-auth's: the row's time left, not consumer_cache_ttl from now). Alice's row is read
    at t=0 and cached until t=60; at t=50 a second certificate of hers, and her first one again
    (remembered), may hold 10 s at most; at t=100 her row must be read again."""
    plugin = cert_plugin(pki)
    clock = Clock()
    plugin.authenticator.consumers.clock = clock
    loads: list[str] = []

    def ask(chain: str) -> dict:
        def load(ref: str, _: Any) -> Any:
            loads.append(ref)
            return ALICE if ref == "alice" else None
        answers = {"client.tls.get_full_client_certificate_chain": lambda: chain,
                   "client.load_consumer": load}
        record, _ = offer(plugin, answers, CLIENT_CERT_AUTH)
        assert record is not None
        return record

    second = pki.client("alice", dns=["alice2.clients.example"]).chain_pem
    assert ask(pki.alice.chain_pem)["ttl"] <= DEFAULT_VERDICT_CACHE_TTL and loads == ["alice"]
    clock.now += 50
    assert ask(second)["ttl"] <= 10                     # the row read at t=0, 10 s left
    assert ask(pki.alice.chain_pem)["ttl"] <= 10        # the same row, remembered with the chain
    assert loads == ["alice"]
    clock.now += 50
    ask(second)
    assert loads == ["alice", "alice"]                  # t=100: the row is read anew


def test_a_chain_padded_with_certificates_outside_its_path_is_not_offered(pki: Any) -> None:
    """review: a valid client appending any extra certificate would get a new entry (~5 KB with
    forward_client_cert) per padding; a chain with certificates outside its path is not offered."""
    plugin = cert_plugin(pki, skip_consumer_lookup=True, forward_client_cert=["rfc9440", "xfcc"])
    padded = pki.alice.chain_pem + pki.self_signed("padding").cert_pem
    answers = {"client.tls.get_full_client_certificate_chain": lambda: padded}
    record, kong = offer(plugin, answers, CLIENT_CERT_AUTH)
    assert kong.shared[shared_mark(CLIENT_CERT_AUTH)]["verified"] is True      # a pass
    assert record is None


def test_an_api_key_verdict_holds_no_longer_than_the_row_it_carries_even_if_another_request_reloads_it(
        ) -> None:
    """The server runs requests concurrently (gevent), and another request may reload the consumer
    row at any time. The verdict carries the row this request read, cached until t=60: it may hold
    until then, not for the reloaded row's time. (With Kong applying the verdict no PDK call is
    left between reading the row and the verdict, so the reload here comes while Kong applies it.)"""
    plugin = key_plugin()
    clock = Clock()
    plugin.consumers.clock = clock
    offer(plugin, key_answers(), API_KEY_AUTH)                   # t=0: alice's row read, until t=60
    clock.now += 59.9

    def meanwhile(*_: Any) -> None:                             # another request, during this one's call
        clock.now += 0.2
        plugin.consumers.get("alice", lambda _: {**ALICE, "custom_id": "reloaded"})

    record, kong = offer(plugin, {**key_answers(), "client.authenticate": meanwhile}, API_KEY_AUTH)
    assert kong.calls.count("client.authenticate") == 1 and clock.now > 1060       # applied at t=60.1
    assert 0 < record["ttl"] <= 0.1 + 1e-6                      # alice's row of t=0: until t=60


# -- changes applied by Kong's wrapper -------------------------------------------------------------

def test_with_the_wrapper_a_decided_pass_is_its_reads_and_one_call() -> None:
    plugin = ip_allowlist.Plugin({"allow": ["192.0.2.0/24"], "client_ip_header": "X-Real-Client-IP"})
    kong = decide(plugin, peer_answers("192.0.2.7"))
    record = kong.shared[verdict_slot(IP_ALLOWLIST)]
    assert kong.calls == ["nginx.get_var", "ctx.shared.set"]
    assert record["apply"] is True and record["inputs"] == [["var", PEER, "192.0.2.7"]]
    assert [call[0] for call in record["calls"]] == ["kong.service.request.set_headers",
                                                     "kong.ctx.shared.set"]
    assert record["calls"][-1][1][0] == shared_mark(IP_ALLOWLIST)
    assert shared_mark(IP_ALLOWLIST) not in kong.shared  # the wrapper sets it


def test_with_the_wrapper_and_no_cache_the_changes_come_without_inputs() -> None:
    plugin = ip_allowlist.Plugin({"allow": ["192.0.2.0/24"], "verdict_cache_ttl": 0})
    kong = decide(plugin, peer_answers("192.0.2.7"))
    record = kong.shared[verdict_slot(IP_ALLOWLIST)]
    assert kong.calls == ["nginx.get_var", "ctx.shared.set"]
    assert (record["apply"], record["ttl"], record["inputs"]) == (True, 0, [])
    assert [call[0] for call in record["calls"]] == ["kong.ctx.shared.set"]


def test_with_the_wrapper_a_refusal_is_answered_by_the_wrapper() -> None:
    plugin = ip_allowlist.Plugin({"allow": ["192.0.2.0/24"]})
    kong = decide(plugin, peer_answers("203.0.113.9"))
    record = kong.shared[verdict_slot(IP_ALLOWLIST)]
    assert kong.calls == ["nginx.get_var", "ctx.shared.set"]
    assert [call[0] for call in record["calls"]] == ["kong.log.warn", "kong.response.exit"]
    assert record["calls"][1][1] == [403, {"message": "IP address not allowed: 203.0.113.9"}, {}]


def test_with_the_wrapper_an_api_key_pass_is_its_reads_and_one_call() -> None:
    kong = decide(key_plugin(hide_credentials=True), key_answers())
    record = kong.shared[verdict_slot(API_KEY_AUTH)]
    assert kong.calls == ["request.get_headers", "client.load_consumer", "ctx.shared.set"]
    assert [call[0] for call in record["calls"]] == [
        "kong.client.authenticate", "kong.service.request.set_headers", "kong.ctx.shared.set"]


class ReadsAfterWriting:
    @phase("writer", verdicts=True)
    def access(self, kong: Any, inputs: VerdictInputs) -> None:
        inputs.var(PEER, kong.nginx.get_var(PEER))
        kong.service.request.set_headers({"x-a": ["1"]})
        kong.ctx.shared.set("kong_mtls.writer.first", kong.nginx.get_var(PEER))
        kong.ctx.shared.set("kong_mtls.writer", {"ok": True})
        inputs.holds_for(60)


def test_with_the_wrapper_a_read_after_a_change_sends_the_changes_first_and_for_good() -> None:
    record, kong = offer(ReadsAfterWriting(), {"nginx.get_var": lambda _: "192.0.2.1"}, "writer")
    assert kong.calls == ["nginx.get_var", "service.request.set_headers", "nginx.get_var", "ctx.shared.set",
                          "ctx.shared.set", "ctx.shared.set"]
    assert kong.shared["kong_mtls.writer"] == {"ok": True}  # made live: the verdict is for the cache only
    assert "apply" not in record and record["ttl"] == 60


def test_with_the_wrapper_a_change_it_cannot_make_is_sent_live_in_order_and_nothing_is_offered() -> None:
    answers = {"nginx.get_var": lambda _: "192.0.2.1"}
    record, kong = offer(Writer("service.request.set_body"), answers, "writer")
    assert record is None
    assert kong.calls == ["nginx.get_var", "service.request.set_body", "ctx.shared.set"]
    assert kong.shared == {"kong_mtls.writer": {"ok": True}}


def test_with_the_wrapper_a_read_it_does_not_know_still_gets_kongs_answer() -> None:
    """Only the calls the wrapper makes (VERDICT_REPLAYABLE) are held back. Any other call, a read
    missing from PLAIN_READS say, is made at once (after the changes held before it), so the
    handler gets Kong's answer, not None, whether or not the guard plugin is loaded."""
    assert "kong.request.get_path" not in PLAIN_READS | VERDICT_REPLAYABLE
    answers = {"nginx.get_var": lambda _: "192.0.2.1", "request.get_path": lambda: "/orders"}
    record, kong = offer(Reader("request.get_path"), answers, "reader")
    assert kong.calls == ["nginx.get_var", "request.get_path", "ctx.shared.set"]   # passed
    assert record is None and kong.shared == {"kong_mtls.reader": {"ok": True}}
