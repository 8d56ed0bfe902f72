"""`--processes N`: N plugin-server processes behind one socket, each Kong worker served by one.

N processes accepting on the same socket would misroute: Kong takes a pooled connection per RPC,
so the Step for an event may come on another connection than its HandleEvent, accepted by another
process, which does not hold the event. What is always true is that every RPC of an event comes
from the nginx worker that runs the request (its coroutine drives the event, over that worker's
own connection pool). So a parent accepts each connection, reads the connecting process's pid
(`SO_PEERCRED`), and hands the connection (`SCM_RIGHTS`) to the child that serves that pid: all
connections of one Kong worker, hence every RPC of each of its events, reach one process.
Instances follow too: each Kong worker starts its own (its instance ids are cached per worker);
a child started again after a crash answers "no plugin instance", and the worker starts them again.
Kong workers are assigned to the child serving the fewest live ones, so N workers spread over N
processes. Connections are pooled and long-lived: the parent's work per request is nothing.

The parent exits when Kong does (it is re-parented) or on SIGTERM/SIGINT, ending its children;
children die with the parent (`PR_SET_PDEATHSIG`, and a watchdog on their parent pid); a child
that dies is started again.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import struct
import time
from collections.abc import Callable

from kong_mtls.kong.runtime import log_line

_log = logging.getLogger("kong_mtls")
_PR_SET_PDEATHSIG = 1
#: Most processes `--processes` accepts.
MAX_PROCESSES = 64


def peer_pid(conn: socket.socket) -> int:
    """The pid of the process that connected `conn` (a Unix stream socket)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


def _alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


class _Child:
    def __init__(self, pid: int, channel: socket.socket) -> None:
        self.pid = pid
        self.channel = channel  # the parent's end: connections are handed over it
        # Never wait on a child: one that stopped reading (stuck) would stop every worker's new
        # connections once its channel is full. Its own worker's requests fail open instead (the
        # guard answers them). (MSG_DONTWAIT is not enough: a send with descriptors still waits.)
        channel.setblocking(False)
        self.peers: set[int] = set()


class Supervisor:
    """The parent: accepts Kong's connections and hands each to the child serving its worker."""

    def __init__(self, listener: socket.socket, count: int,
                 child_main: Callable[[socket.socket], None]) -> None:
        self.listener = listener
        self.count = count
        self.child_main = child_main
        self.children: list[_Child | None] = [None] * count
        self._owner: dict[int, int] = {}  # Kong worker pid -> child index

    def _spawn(self, index: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child
            status = 1
            try:
                ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
                if os.getppid() != parent:  # the parent died before prctl
                    os._exit(0)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                self.listener.close()
                ours.close()
                for child in self.children:
                    if child is not None:
                        child.channel.close()
                self.child_main(theirs)
                status = 0
            except BaseException:
                _log.exception(log_line("server", "child-failed"))
            finally:
                os._exit(status)
        theirs.close()
        previous = self.children[index]
        self.children[index] = _Child(pid, ours)
        if previous is not None:
            previous.channel.close()
            self.children[index].peers = previous.peers

    def _reap(self) -> None:
        """Start again every child that died."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for index, child in enumerate(self.children):
                if child is not None and child.pid == pid:
                    _log.error(log_line("server", "child-died", reason="CHILD_DIED", pid=pid,
                                        status=os.waitstatus_to_exitcode(status)))
                    time.sleep(0.1)  # no busy loop if it dies at once
                    self._spawn(index)

    def _child_for(self, worker: int) -> _Child:
        index = self._owner.get(worker)
        if index is None:
            for child in self.children:  # forget Kong workers that are gone
                if child is not None:
                    child.peers = {p for p in child.peers if _alive(p)}
            self._owner = {p: i for p, i in self._owner.items() if _alive(p)}
            index = min(range(self.count), key=lambda i: len(self.children[i].peers))
            self._owner[worker] = index
            self.children[index].peers.add(worker)
        return self.children[index]

    def _hand(self, conn: socket.socket) -> None:
        try:
            child = self._child_for(peer_pid(conn))
            socket.send_fds(child.channel, [b"c"], [conn.fileno()])
        except OSError as exc:  # the child is gone or stuck: Kong sees the connection close
            _log.error(log_line("server", "handover-failed", error=str(exc)))
        finally:
            conn.close()

    def run(self) -> None:
        """Start the children and hand them connections until Kong goes or we are told to stop."""

        def stop(_signum: int, _frame: object) -> None:
            raise SystemExit(0)

        kong = os.getppid()
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        try:
            for index in range(self.count):
                self._spawn(index)
            self.listener.settimeout(1.0)
            while os.getppid() == kong:
                self._reap()
                try:
                    conn, _ = self.listener.accept()
                except socket.timeout:
                    continue
                except OSError as exc:  # out of descriptors, say: Kong retries; do not spin
                    _log.error(log_line("server", "accept-failed", error=str(exc)))
                    time.sleep(0.1)
                    continue
                conn.settimeout(None)
                self._hand(conn)
        finally:
            self._stop_children()

    def _stop_children(self) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        live = [c.pid for c in self.children if c is not None]
        for pid in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while live and time.monotonic() < deadline:
            live = [pid for pid in live if not _reaped(pid)]
            time.sleep(0.02)
        for pid in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def _reaped(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return True
