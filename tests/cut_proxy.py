"""A loopback TCP proxy to PostgreSQL that loses the reply to one transaction's COMMIT.

Once a client connection has sent ``marker`` (text of a statement in the transaction to hit),
the proxy forwards that connection's next COMMIT, waits for the server's answer (so the commit
has happened), drops it, and closes both sides: the client sees the connection lost while
reading the COMMIT reply. One shot; every other connection and byte passes through.
"""

from __future__ import annotations

import select
import socket
import threading
import time


class CommitCutProxy:
    def __init__(self, target_port: int, marker: bytes) -> None:
        self.target_port = target_port
        self.marker = marker
        self.cut_at: float | None = None  # time.time() when the COMMIT reply was dropped
        self._armed = True
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
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

    def _take_shot(self) -> bool:
        with self._lock:
            shot, self._armed = self._armed, False
            return shot

    def _pipe(self, client: socket.socket, server: socket.socket) -> None:
        marked = False
        deadline = time.monotonic() + 300  # bounded, whatever the test does
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                ready, _, _ = select.select([client, server], [], [], 0.2)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is client:
                        marked = marked or (self._armed and self.marker in data)
                        if marked and b"COMMIT" in data.upper() and self._take_shot():
                            server.sendall(data)
                            server.settimeout(10)
                            server.recv(65536)  # the commit is done: lose its answer
                            self.cut_at = time.time()
                            return
                    (server if sock is client else client).sendall(data)
        finally:
            client.close()
            server.close()
