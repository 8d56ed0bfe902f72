"""The floor: the least a Python process can do to serve Kong a plugin that makes `calls` PDK calls.

A plugin server for one plugin, "floor", that answers Kong's MessagePack-RPC with the replies the
bare plugin's server gives (bench/bare_plugin.py: `calls` x `kong.request.get_header`, then "ret"),
from one plain `select.epoll` loop: no gevent, no greenlet, no handler, no phase wrapper, no
logging, no checks beyond what the protocol needs. What it costs per event in real Kong
(`./dev bench --kong --routes plain,bare-1,floor-1`) is the part of our server's cost that no
Python server on Kong's socket can avoid: the kernel's (each RPC wakes the process, each answer
wakes Kong's worker) and the interpreter's least (one loop turn, one unpack, one pack per RPC).
Not a plugin anyone should run: it serves the benchmark only.
"""

from __future__ import annotations

import json
import os
import select
import socket
import sys

import msgpack

NAME = "floor"
CALL = {"Method": "kong.request.get_header", "Args": ["x-bench"]}


class FloorServer:
    """Kong's RPC methods for the floor plugin, as plainly as Python allows."""

    def __init__(self) -> None:
        self.instances: dict[int, int] = {}  # instance id -> PDK calls per event
        self.events: dict[int, int] = {}  # event id -> PDK calls still to make
        self.next_event = 1

    def answer(self, method: str, arg: dict) -> dict:
        if method == "plugin.Step":
            eid = arg["EventId"]
            left = self.events.pop(eid)
            if left:
                self.events[eid] = left - 1
                return {"Data": CALL, "EventId": eid}
            return {"Data": "ret", "EventId": eid}
        if method == "plugin.HandleEvent":
            eid = self.next_event
            self.next_event = eid + 1
            self.events[eid] = self.instances[arg["InstanceId"]] - 1
            return {"Data": CALL, "EventId": eid}
        if method == "plugin.StartInstance":
            config = json.loads(arg["Config"])
            iid = len(self.instances) + 1
            self.instances[iid] = int(config.get("calls") or 1)
            return {"Name": NAME, "Id": iid, "Config": config, "StartTime": 0}
        raise KeyError(method)


def serve(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4096)
    listener.setblocking(False)
    poll = select.epoll()
    poll.register(listener.fileno(), select.EPOLLIN)
    server = FloorServer()
    connections: dict[int, tuple[socket.socket, msgpack.Unpacker]] = {}
    packb = msgpack.packb
    while True:
        for fd, _ in poll.poll():
            if fd == listener.fileno():
                conn, _address = listener.accept()
                conn.setblocking(False)
                poll.register(conn.fileno(), select.EPOLLIN)
                connections[conn.fileno()] = (conn, msgpack.Unpacker(strict_map_key=False))
                continue
            conn, unpacker = connections[fd]
            try:
                data = conn.recv(65536)
            except BlockingIOError:
                continue
            if not data:
                poll.unregister(fd)
                del connections[fd]
                conn.close()
                continue
            unpacker.feed(data)
            for _, msgid, method, params in unpacker:
                try:
                    reply = [1, msgid, None, server.answer(method, params[0])]
                except (KeyError, ValueError, TypeError, IndexError) as exc:
                    reply = [1, msgid, f"floor server: {exc!r}", None]
                conn.sendall(packb(reply))  # a few dozen bytes: the socket buffer takes them


def main(argv: list[str]) -> int:
    if "--dump" in argv:
        from bare_plugin import Plugin, Schema  # run as a script: bench/ is on sys.path

        from kong_mtls.kong.server import plugin_info

        sys.stdout.write(json.dumps([plugin_info(NAME, Plugin, Schema, priority=1000)]))
        return 0
    prefix = argv[argv.index("-p") + 1]
    serve(os.path.join(prefix, f"{NAME}.sock"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
