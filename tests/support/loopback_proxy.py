"""Loopback TCP proxies to PostgreSQL that misbehave the way networks do.

One thread per connection, each bounded in time; a subclass decides what happens to each
chunk of bytes (pass it on, swallow it, or cut the connection).
"""

from __future__ import annotations

import select
import socket
import threading
import time
from typing import Any, Literal

Verdict = Literal["pass", "drop", "stop"]


class LoopbackProxy:
    def __init__(self, target_port: int, port: int = 0) -> None:
        self.target_port = target_port
        self._stop = threading.Event()
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", port))
        self._server.listen(50)
        self._server.settimeout(0.2)
        self.port = int(self._server.getsockname()[1])
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def close(self) -> None:
        self._stop.set()
        for thread in list(self._threads):
            thread.join(5)
        self._server.close()

    def handle(
        self, from_client: bool, data: bytes, state: dict[str, Any], server: socket.socket
    ) -> Verdict:
        return "pass"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            server = socket.create_connection(("127.0.0.1", self.target_port))
            thread = threading.Thread(target=self._pipe, args=(client, server), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _pipe(self, client: socket.socket, server: socket.socket) -> None:
        state: dict[str, Any] = {}
        deadline = time.monotonic() + 300  # bounded, whatever the test does
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                ready, _, _ = select.select([client, server], [], [], 0.2)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    verdict = self.handle(sock is client, data, state, server)
                    if verdict == "stop":
                        return
                    if verdict == "pass":
                        (server if sock is client else client).sendall(data)
        finally:
            client.close()
            server.close()


class CommitCutProxy(LoopbackProxy):
    """Loses the reply to one transaction's COMMIT.

    Once a client connection has sent ``marker`` (text of a statement in the transaction to
    hit), its next COMMIT is forwarded, the server's answer awaited (so the commit has
    happened) and dropped, and both sides closed: the client sees the connection lost while
    reading the COMMIT reply. One shot; every other connection and byte passes through.
    """

    def __init__(self, target_port: int, marker: bytes) -> None:
        self.marker = marker
        self.cut_at: float | None = None  # time.time() when the COMMIT reply was dropped
        self._armed = True
        self._lock = threading.Lock()
        super().__init__(target_port)

    def _take_shot(self) -> bool:
        with self._lock:
            shot, self._armed = self._armed, False
            return shot

    def handle(
        self, from_client: bool, data: bytes, state: dict[str, Any], server: socket.socket
    ) -> Verdict:
        if not from_client:
            return "pass"
        state["marked"] = state.get("marked") or (self._armed and self.marker in data)
        if state["marked"] and b"COMMIT" in data.upper() and self._take_shot():
            server.sendall(data)
            server.settimeout(10)
            server.recv(65536)  # the commit is done: lose its answer
            self.cut_at = time.time()
            return "stop"
        return "pass"


class SilencingProxy(LoopbackProxy):
    """Can go silent on LISTEN connections: it then swallows their traffic both ways without
    closing anything, as a NAT or firewall idle drop does (no FIN, no RST)."""

    def __init__(self, target_port: int) -> None:
        self.silent = threading.Event()
        self.swallowed = 0
        super().__init__(target_port)

    def handle(
        self, from_client: bool, data: bytes, state: dict[str, Any], server: socket.socket
    ) -> Verdict:
        state["listening"] = state.get("listening") or (from_client and b"LISTEN" in data)
        if state["listening"] and self.silent.is_set():
            self.swallowed += 1
            return "drop"
        return "pass"
