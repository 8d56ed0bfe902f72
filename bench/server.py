"""`python -m bench.server`: what the plugin server itself costs per event, in its own CPU time.

Drives the bare plugin (bench/bare_plugin.py, `calls` PDK round trips, no logic) over its Unix
socket as Kong does (mp_rpc.lua: one MessagePack-RPC request per pooled connection at a time,
HandleEvent, then one `plugin.Step` per PDK call), with a client that costs the server nothing:
the answers to `kong.request.get_header` are canned. Each RPC takes the next connection of a
small pool, so Steps arrive on other connections than their HandleEvent, as they may from Kong.
CPU is the server's (all its processes') time on a core, from /proc/<pid>/schedstat.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Sequence

import msgpack

from tests.harness.kong_side import PluginServerProcess


class Pool:
    """Kong's side: `size` keepalive connections, each RPC on the next one."""

    def __init__(self, path: str, size: int) -> None:
        self.socks = []
        for _ in range(size):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            self.socks.append(sock)
        self.unpackers = [msgpack.Unpacker(strict_map_key=False) for _ in self.socks]
        self.turn = itertools.cycle(range(size))
        self.msg_id = 0

    def call(self, method: str, arg: object) -> object:
        slot = next(self.turn)
        sock, unpacker = self.socks[slot], self.unpackers[slot]
        self.msg_id += 1
        sock.sendall(msgpack.packb([0, self.msg_id, method, [arg]]))
        while True:
            for message in unpacker:
                if message[1] != self.msg_id or message[2] is not None:
                    raise RuntimeError(f"unexpected answer {message}")
                return message[3]
            data = sock.recv(65536)
            if not data:
                raise RuntimeError("connection closed")
            unpacker.feed(data)

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


def event(pool: Pool, instance: int) -> int:
    """One access event of the bare plugin; returns its PDK calls."""
    step = pool.call("plugin.HandleEvent", {"InstanceId": instance, "EventName": "access"})
    calls = 0
    while step["Data"] != "ret":
        calls += 1
        step = pool.call("plugin.Step", {"EventId": step["EventId"], "Data": None})
    return calls


def process_tree(pid: int) -> list[int]:
    """`pid` and its children (a server with --processes forks them)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(p) for p in f.read().split()]
    except OSError:
        children = []
    return [pid, *(p for child in children for p in process_tree(child))]


def cpu_ns(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


def measure(server: PluginServerProcess, calls: int, *, events: int, rounds: int, pool_size: int,
            inflight: int = 1) -> float:
    """Median over `rounds` of the server's CPU µs per event, with `inflight` events at a time
    (one Kong-side thread and pool each, as concurrent requests in Kong's workers)."""
    pools = [Pool(server.socket_path, pool_size) for _ in range(inflight)]
    try:
        config = {"calls": calls, "__plugin_id": f"bench-{calls}", "__seq__": 1}
        instance = pools[0].call("plugin.StartInstance", {"Name": "bare", "Config": json.dumps(config)})["Id"]
        for _ in range(500):  # warm-up
            assert event(pools[0], instance) == calls
        pids = process_tree(server.pid)
        per_pool = max(1, events // inflight)

        def drive(pool: Pool) -> None:
            for _ in range(per_pool):
                event(pool, instance)

        samples = []
        for _ in range(rounds):
            threads = [threading.Thread(target=drive, args=(pool,)) for pool in pools]
            before = cpu_ns(pids)
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            samples.append((cpu_ns(pids) - before) / (per_pool * inflight) / 1e3)
        return statistics.median(samples)
    finally:
        for pool in pools:
            pool.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=5000, help="events per round (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, the median is reported")
    parser.add_argument("--pool", type=int, default=4, help="Kong-side connections (default %(default)s)")
    parser.add_argument("--calls", default="1,4", help="PDK calls per event to measure (default %(default)s)")
    parser.add_argument("--inflight", default="1,4",
                        help="events in flight at once, comma-separated (default %(default)s)")
    parser.add_argument("server_args", nargs="*", help="extra plugin-server arguments (after --)")
    args = parser.parse_args(argv)
    server = PluginServerProcess("bare", "bench.bare_plugin", extra_args=args.server_args).start()
    try:
        print(f"plugin-server CPU per event (bench.bare_plugin, {args.events} events x {args.rounds} rounds, "
              f"pool of {args.pool} connections, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')})")
        for inflight in (int(n) for n in args.inflight.split(",")):
            for calls in (int(n) for n in args.calls.split(",")):
                cpu = measure(server, calls, events=args.events, rounds=args.rounds, pool_size=args.pool,
                              inflight=inflight)
                print(f"  {inflight} in flight, {calls} PDK call{'s' if calls > 1 else ''}: {cpu:.1f} µs")
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
