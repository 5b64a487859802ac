"""Wake-ups between processes on one host: one-byte UDP datagrams on loopback.

SQLite has no LISTEN/NOTIFY. Each worker/triggerer binds a UDP socket on 127.0.0.1 and records
its port in the ``processes`` table; after a commit that makes work available, the writer sends
a datagram to every process of the role that can take it. A lost datagram costs at most one
fallback poll interval; a datagram to a dead process is simply dropped by the kernel.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable

import structlog

from deferrun.store.base import Wakeup

log = structlog.get_logger("deferrun.notify")


class UdpListener:
    """Receives wake-up datagrams and sets a Wakeup; no task needed (loop reader callback)."""

    def __init__(self, wakeup: Wakeup) -> None:
        self.wakeup = wakeup
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port: int = self.sock.getsockname()[1]
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        try:
            while True:
                self.sock.recv(64)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            log.warning("wake-up socket read failed; falling back to polling", error=str(exc))
        self.wakeup.set()

    def close(self) -> None:
        try:
            self._loop.remove_reader(self.sock.fileno())
        except (ValueError, RuntimeError):
            pass
        self.sock.close()


class UdpSender:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)

    def send(self, ports: Iterable[int]) -> None:
        for port in ports:
            try:
                self.sock.sendto(b"w", ("127.0.0.1", port))
            except (BlockingIOError, ConnectionRefusedError):
                pass  # buffer full (a wake-up is already pending there) or process gone
            except OSError as exc:
                log.debug("wake-up datagram not sent", port=port, error=str(exc))

    def close(self) -> None:
        self.sock.close()
