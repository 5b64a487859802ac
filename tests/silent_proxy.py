"""A loopback TCP proxy to PostgreSQL that can go silent on LISTEN connections: it then
swallows their traffic both ways without closing anything, as a NAT or firewall idle drop
does (no FIN, no RST)."""

from __future__ import annotations

import select
import socket
import threading
import time


class SilencingProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.silent = threading.Event()
        self.swallowed = 0
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

    def _pipe(self, client: socket.socket, server: socket.socket) -> None:
        listening = False
        deadline = time.monotonic() + 300  # bounded, whatever the test does
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                ready, _, _ = select.select([client, server], [], [], 0.2)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    listening = listening or (sock is client and b"LISTEN" in data)
                    if listening and self.silent.is_set():
                        self.swallowed += 1
                        continue
                    (server if sock is client else client).sendall(data)
        finally:
            client.close()
            server.close()
