"""The foundation through the real plugin server: round trips, refusals, errors, fail-open."""

from __future__ import annotations

import time

import pytest

from kong_mtls.constants import MESSAGE_UNEXPECTED
from kong_mtls.guard import GUARD_MESSAGE, GUARD_STATUS, GUARDED_PLUGINS
from tests.harness.expect import assert_invalid_config
from tests.harness.kong_side import KongSide, PluginServerProcess, Request


@pytest.fixture(scope="module")
def trivial(plugin_server) -> PluginServerProcess:
    return plugin_server("trivial", "tests.plugins.trivial")


def test_pdk_round_trip_sets_upstream_header(kong, trivial):
    outcome = kong.run(Request(headers={"x-echo": "hello"}), [(trivial, {})])
    assert outcome.proxied
    assert outcome.upstream_headers["x-echoed"] == ["hello"]
    assert outcome.ctx_shared["kong_mtls.trivial"] == {"echoed": "hello"}
    assert outcome.pdk_calls == [
        "kong.request.get_header",
        "kong.service.request.set_header",
        "kong.ctx.shared.set",
    ]


def test_repeated_header_lines_arrive_joined_as_in_kong_3_9(kong, trivial):
    outcome = kong.run(Request(headers=[("X-Echo", "a"), ("x-echo", "b")]), [(trivial, {})])
    assert outcome.upstream_headers["x-echoed"] == ["a, b"]
    with KongSide(kong_version="2.8") as old:
        assert old.run(Request(headers=[("X-Echo", "a"), ("x-echo", "b")]), [(trivial, {})]).upstream_headers[
            "x-echoed"
        ] == ["a"]


def test_refusal_answers_kong_style_and_logs_reason(kong, trivial):
    outcome = kong.run(Request(headers={"x-echo": "v"}), [(trivial, {"mode": "refuse"})])
    assert outcome.exit.status == 403
    assert outcome.exit.body == {"message": "Go away"}
    assert any("reason=TEST_REFUSED" in msg and level == "warn" for level, msg in outcome.logs)
    # Nothing after exit: the handler returned at once.
    assert outcome.pdk_calls[-1] == "kong.response.exit"
    assert "kong.service.request.set_header" not in outcome.pdk_calls


@pytest.mark.parametrize("mode", ["raise-first", "raise-later", "timeout-escapes"])
def test_exception_gives_500_and_server_keeps_serving(kong, trivial, mode):
    for _ in range(3):
        outcome = kong.run(Request(headers={"x-echo": "v"}), [(trivial, {"mode": mode})])
        assert outcome.exit.status == 500
        assert outcome.exit.body == {"message": MESSAGE_UNEXPECTED}
        assert any("reason=UNEXPECTED_ERROR" in msg for _, msg in outcome.logs)
    # The server is not wedged: the next event of another instance is answered normally.
    ok = kong.run(Request(headers={"x-echo": "after"}), [(trivial, {})])
    assert ok.proxied and ok.upstream_headers["x-echoed"] == ["after"]
    assert "boom" in trivial.output()


def test_unknown_pdk_function_is_answered_with_nil(kong, trivial):
    outcome = kong.run(Request(headers={"x-echo": "v"}), [(trivial, {"mode": "unknown-pdk"})])
    assert outcome.proxied
    assert outcome.upstream_headers["x-echoed"] == ["nil"]
    assert ("err", "could not find pdk method: kong.request.no_such_function") in outcome.logs


def test_invalid_config_answers_500_and_logs_the_field(kong, trivial):
    # The instance starts anyway (failing StartInstance fails open on Kong < 3.9, see
    # test_start_instance_failure_fails_open_on_kong_before_3_9) and refuses every request.
    for _ in range(2):
        outcome = kong.run(Request(), [(trivial, {"calls": 0})], guard=["trivial"])
        assert_invalid_config(outcome, "trivial", "calls")


def test_exit_as_first_call_does_not_leak_events(kong, trivial):
    rpc = kong._rpc(trivial)
    before = rpc.call("plugin.GetRuntimeStats")
    for _ in range(20):
        assert kong.run(Request(), [(trivial, {"mode": "exit-first"})]).status == 401
    after = rpc.call("plugin.GetRuntimeStats")
    assert after["Events"] == before["Events"]


def test_config_reaches_plugin_with_kong_extras_and_nulls(kong, trivial):
    # Kong adds route_id, __plugin_id, __key__, __seq__; the plugin ignores them.
    outcome = kong.run(Request(headers={"x-echo": "x"}), [(trivial, {"mode": "echo", "calls": 2})])
    assert outcome.pdk_calls.count("kong.request.get_header") == 2


def test_dead_plugin_server_fails_open_and_guard_closes_it(plugin_server):
    server = PluginServerProcess("trivial", "tests.plugins.trivial").start()
    try:
        with KongSide(rpc_timeout=1.0) as kong:
            assert kong.run(Request(), [(server, {})], guard=["trivial"]).proxied
            server.kill()
            opened = kong.run(Request(), [(server, {})])
            assert opened.proxied, "Kong lets the request through when the plugin server is gone"
            assert opened.rpc_errors
            guarded = kong.run(Request(), [(server, {})], guard=["trivial"])
            assert guarded.exit.status == GUARD_STATUS and guarded.exit.source == "guard"
            assert guarded.exit.body == {"message": GUARD_MESSAGE}
            server.start()  # Kong's process manager restarts it; instances are started again
            assert kong.run(Request(headers={"x-echo": "back"}), [(server, {})]).upstream_headers[
                "x-echoed"
            ] == ["back"]
    finally:
        server.close()


def test_hung_plugin_server_fails_open_after_timeout():
    server = PluginServerProcess("trivial", "tests.plugins.trivial").start()
    try:
        with KongSide(rpc_timeout=0.5) as kong:
            assert kong.run(Request(), [(server, {})]).proxied
            server.pause()
            started = time.monotonic()
            outcome = kong.run(Request(), [(server, {})])
            assert outcome.proxied and "timeout" in outcome.rpc_errors[0]
            assert time.monotonic() - started < 5
            assert kong.run(Request(), [(server, {})], guard=["trivial"]).exit.source == "guard"
    finally:
        server.close()


def test_kong_pdk_server_without_wrapper_wedges():
    """Why the wrapper exists: kong-pdk's own server never answers again after such an exception."""
    server = PluginServerProcess("unwrapped", "tests.plugins.unwrapped", extra_args=["-g"]).start()
    try:
        with KongSide(rpc_timeout=0.5) as kong:
            first = kong.run(Request(), [(server, {})])
            assert first.proxied and "timeout" in first.rpc_errors[0]
        with KongSide(rpc_timeout=0.5) as kong:
            second = kong.run(Request(), [(server, {})])
            assert second.proxied and "timeout" in second.rpc_errors[0]
    finally:
        server.close()


def test_header_with_invalid_utf8_is_served_not_dropped(kong, trivial):
    # Kong sends Lua strings as MessagePack str whatever their bytes. kong-pdk's reader raises on
    # invalid UTF-8 and drops the connection, which Kong answers by proxying (fail open); ours
    # decodes the bytes and hands them back unchanged.
    outcome = kong.run(Request(headers={"x-echo": b"caf\xe9\xff"}), [(trivial, {})])
    assert outcome.proxied and not outcome.rpc_errors
    assert outcome.upstream_headers["x-echoed"] == [b"caf\xe9\xff".decode("utf-8", "surrogateescape")]


@pytest.mark.parametrize("mode", ["refuse", "exit-first", "raise-first", "raise-later", "timeout-escapes"])
def test_answered_requests_leave_no_greenlet_behind(kong, trivial, mode):
    # Stock kong-pdk 0.36 in gevent mode keeps one blocked greenlet per request ended by exit
    # (+100 here). A few come and go with the connections of other tests.
    rpc = kong._rpc(trivial)
    kong.run(Request(), [(trivial, {"mode": mode})])
    before = rpc.call("plugin.GetRuntimeStats")
    for _ in range(100):
        assert kong.run(Request(), [(trivial, {"mode": mode})]).exit is not None
    after = rpc.call("plugin.GetRuntimeStats")
    assert after["Greenlets"] - before["Greenlets"] < 5
    assert after["Events"] == before["Events"] == 0


def test_start_instance_failure_fails_open_on_kong_before_3_9():
    """Why our servers never fail StartInstance (a refused config gives an instance that answers
    500): Kong up to 3.8 takes the error for the instance, sends HandleEvent without an id, and
    proxies the request when that fails."""
    server = PluginServerProcess("unwrapped", "tests.plugins.unwrapped", extra_args=["-g"]).start()
    try:
        with KongSide(kong_version="3.4", rpc_timeout=2.0) as old:
            outcome = old.run(Request(), [(server, {"fail_init": True})])
            assert outcome.proxied and outcome.rpc_errors
        with KongSide() as new:
            assert new.run(Request(), [(server, {"fail_init": True})]).exit.status == 500
    finally:
        server.close()


def test_an_instance_id_from_before_a_restart_never_names_another_config():
    """Kong workers keep the instance ids they were given. kong-pdk numbers instances from 0 in
    every server lifetime: after a restart, worker A's id for its strict route named the lenient
    instance worker B had just started, and A's requests were served by B's config."""
    server = PluginServerProcess("trivial", "tests.plugins.trivial").start()
    strict, lenient = {"mode": "refuse"}, {"mode": "echo"}
    try:
        with KongSide() as worker_a, KongSide() as worker_b:
            assert worker_a.run(Request(route={"id": "strict"}), [(server, strict)]).status == 403
            server.restart()
            worker_a.close()  # its pooled connection died with the old server
            worker_b.close()
            assert worker_b.run(Request(route={"id": "lenient"}), [(server, lenient)]).proxied
            again = worker_a.run(Request(route={"id": "strict"}), [(server, strict)])
            assert again.status == 403, "a stale instance id reached another route's instance"
            assert any("no plugin instance" in message for _, message in again.logs)
    finally:
        server.close()


def test_events_kong_abandoned_are_reaped():
    """Kong gives up on an event when its socket times out; the handler's greenlet then waits for
    a Step that never comes. The server reaps such events after --abandon-after seconds."""
    server = PluginServerProcess(
        "trivial", "tests.plugins.trivial", extra_args=["--abandon-after", "1"]
    ).start()
    try:
        with KongSide(rpc_timeout=0.5) as kong:
            stats = kong._rpc(server).call("plugin.GetRuntimeStats")
            for _ in range(4):
                assert kong.run(Request(), [(server, {"mode": "sleep"})]).rpc_errors  # timed out
        deadline = time.monotonic() + 15
        while True:
            with KongSide() as probe:
                after = probe._rpc(server).call("plugin.GetRuntimeStats")
            settled = after["Events"] == stats["Events"] and after["Greenlets"] - stats["Greenlets"] < 4
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert after["Events"] == stats["Events"], after
        assert after["Greenlets"] - stats["Greenlets"] < 4, (stats, after)
        assert "reason=EVENT_ABANDONED" in server.output()
    finally:
        server.close()


@pytest.mark.parametrize("name", GUARDED_PLUGINS)
def test_no_plugin_of_ours_runs_scoped_to_a_consumer(kong, plugin_server, name):
    """As Kong's own auth plugins: a consumer-scoped config runs only once another plugin has
    authenticated that consumer, which a later plugin may replace before the guard looks (guard
    review). Such an instance answers every request 500 INVALID_CONFIG, naming the field."""
    outcome = kong.run(
        Request(),
        [(plugin_server(name), {"consumer_id": "7b0c1d2e-3f40-4a5b-8c6d-7e8f90a1b2c1"})],
        guard=[name],
    )
    assert (outcome.exit.status, outcome.exit.body) == (500, {"message": MESSAGE_UNEXPECTED})
    assert any("reason=INVALID_CONFIG" in line and "consumer" in line for _, line in outcome.logs)
