"""`--processes 2`: every RPC of a Kong worker reaches one process, whichever connection it takes."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.harness.kong_side import ROOT, KongSide, PluginServerProcess, Request, RpcConnection, RpcError


@pytest.fixture
def server() -> Iterator[PluginServerProcess]:
    process = PluginServerProcess("trivial", "tests.plugins.trivial", extra_args=["--processes", "2"]).start()
    try:
        # The socket listens before the children are forked.
        assert wait_until(lambda: len(children(process.pid)) == 2), process.output()
        yield process
    finally:
        process.close()


def wait_until(condition, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def kong_worker(socket_path: str, tag: str, events: int, results: multiprocessing.Queue) -> None:
    """One Kong worker (its own process, hence its own pid): a pool of three connections, each RPC
    on the next one, so every Step of an event arrives on another connection than the one before."""
    try:
        pool = [RpcConnection(socket_path, 10.0) for _ in range(3)]
        config = json.dumps({"calls": 2, "route_id": tag, "__plugin_id": tag, "__seq__": 1})
        instance = pool[0].call("plugin.StartInstance", {"Name": "trivial", "Config": config})["Id"]
        turn = 0
        echoed, pids = [], set()
        for i in range(events):
            step = pool[turn % 3].call("plugin.HandleEvent", {"InstanceId": instance, "EventName": "access"})
            while step["Data"] != "ret":
                turn += 1
                if step["Data"]["Method"] == "kong.service.request.set_header":
                    echoed.append(step["Data"]["Args"][1])
                step = pool[turn % 3].call("plugin.Step", {"EventId": step["EventId"], "Data": f"{tag}-{i}"})
            pids.add(pool[turn % 3].call("plugin.GetRuntimeStats")["Pid"])
        results.put((tag, echoed == [f"{tag}-{i}" for i in range(events)], sorted(pids)))
    except Exception as exc:  # reported to the test
        results.put((tag, repr(exc), []))


def run_workers(server: PluginServerProcess, tags: list[str], events: int = 150) -> dict[str, tuple]:
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    workers = [context.Process(target=kong_worker, args=(server.socket_path, tag, events, results))
               for tag in tags]
    for worker in workers:
        worker.start()
    out = {}
    for _ in workers:
        tag, ok, pids = results.get(timeout=60)
        out[tag] = (ok, pids)
    for worker in workers:
        worker.join(10)
    return out


def test_each_kong_worker_is_served_by_one_process_and_every_step_finds_its_event(server):
    out = run_workers(server, ["worker-a", "worker-b"])
    assert out["worker-a"][0] is True and out["worker-b"][0] is True, out
    (a,), (b,) = out["worker-a"][1], out["worker-b"][1]  # one serving process each
    assert a != b and {a, b} == set(children(server.pid)), (out, children(server.pid))


def test_the_server_serves_kong_as_one_process_does(server):
    with KongSide() as kong:
        outcome = kong.run(Request(headers={"x-echo": "hello"}), [(server, {})])
        assert outcome.upstream_headers["x-echoed"] == ["hello"]
        assert kong.run(Request(), [(server, {"mode": "refuse"})]).status == 403


def test_a_child_that_dies_is_started_again(server):
    first = children(server.pid)
    assert len(first) == 2
    os.kill(first[0], signal.SIGKILL)
    assert wait_until(lambda: len(children(server.pid)) == 2 and first[0] not in children(server.pid))
    out = run_workers(server, ["after-a", "after-b"], events=20)
    assert all(ok is True for ok, _ in out.values()), out
    assert "reason=CHILD_DIED" in server.output()


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_the_children_end_with_the_parent(server, how):
    kids = children(server.pid)
    assert len(kids) == 2
    server.proc.send_signal(how)
    server.proc.wait(10)
    assert wait_until(lambda: not any(alive(pid) for pid in kids)), "a child outlived its parent"


def test_the_server_ends_when_kong_is_gone(tmp_path):
    """Kong's process manager starts the server; when Kong goes (the server is re-parented), the
    server and its children go too, and Kong's next start makes a new one."""
    command = f"{sys.executable} -m tests.plugins.trivial -p {tmp_path} --processes 2 & echo $!; read line"
    kong = subprocess.Popen(["sh", "-c", command],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    server = int(kong.stdout.readline())
    try:
        assert wait_until(lambda: len(children(server)) == 2)
        kids = children(server)
        kong.stdin.close()  # "Kong" exits
        kong.wait(10)
        assert wait_until(lambda: not alive(server) and not any(alive(pid) for pid in kids))
    finally:
        for pid in [server, *children(server)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_step_for_an_event_of_a_child_that_died_never_resumes_another_event(server):
    rpc = RpcConnection(server.socket_path, 10.0)
    config = json.dumps({"mode": "refuse", "route_id": "a", "__plugin_id": "a", "__seq__": 1})
    iid = rpc.call("plugin.StartInstance", {"Name": "trivial", "Config": config})["Id"]
    old = rpc.call("plugin.HandleEvent", {"InstanceId": iid, "EventName": "access"})
    serving = rpc.call("plugin.GetRuntimeStats")["Pid"]
    rpc.close()
    os.kill(serving, signal.SIGKILL)  # the child dies while Kong runs the event's PDK call
    assert wait_until(lambda: len(children(server.pid)) == 2 and serving not in children(server.pid))
    rpc = RpcConnection(server.socket_path, 10.0)  # the same Kong worker (pid): the new child
    config = json.dumps({"mode": "echo", "route_id": "b", "__plugin_id": "b", "__seq__": 1})
    iid = rpc.call("plugin.StartInstance", {"Name": "trivial", "Config": config})["Id"]
    new = rpc.call("plugin.HandleEvent", {"InstanceId": iid, "EventName": "access"})
    assert new["Data"]["Method"] == "kong.request.get_header"
    with pytest.raises(RpcError, match="not found"):
        rpc.call("plugin.Step", {"EventId": old["EventId"], "Data": "request A's header"})
    rpc.close()


def _runtime_pid(socket_path: str, results: multiprocessing.Queue) -> None:
    try:
        results.put(RpcConnection(socket_path, 5.0).call("plugin.GetRuntimeStats")["Pid"])
    except Exception as exc:  # reported to the test
        results.put(repr(exc))


def test_a_stuck_child_never_stops_the_other_workers_connections(server):
    """A child that stops reading (a handler stuck on the CPU, say) while its Kong worker keeps
    connecting (each request waits on it, so each takes a new connection) must cost only that
    worker's requests; another worker's new connection still reaches its own child."""
    stuck = RpcConnection(server.socket_path, 5.0).call("plugin.GetRuntimeStats")["Pid"]
    os.kill(stuck, signal.SIGSTOP)
    held = []
    try:
        for _ in range(400):
            held.append(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            held[-1].connect(server.socket_path)
        context = multiprocessing.get_context("fork")
        results = context.Queue()
        other = context.Process(target=_runtime_pid, args=(server.socket_path, results))
        other.start()
        answer = results.get(timeout=30)
        other.join(10)
        assert answer in children(server.pid) and answer != stuck, answer
    finally:
        os.kill(stuck, signal.SIGCONT)
        for sock in held:
            sock.close()


def test_each_child_drops_its_idle_instances_and_kong_starts_them_again():
    process = PluginServerProcess("trivial", "tests.plugins.trivial",
                                  extra_args=["--processes", "2", "--instance-idle-after", "1"]).start()
    try:
        assert wait_until(lambda: len(children(process.pid)) == 2), process.output()
        with KongSide() as kong:
            assert kong.run(Request(), [(process, {"mode": "refuse"})]).status == 403
            stats = kong._rpc(process).call
            assert wait_until(lambda: stats("plugin.GetRuntimeStats")["Instances"] == 0), process.output()
            again = kong.run(Request(), [(process, {"mode": "refuse"})])  # Kong still holds the id
            assert again.status == 403
            assert any("no plugin instance" in message for level, message in again.logs if level == "warn")
        assert "reason=INSTANCE_IDLE instances=1" in process.output()
    finally:
        process.close()
