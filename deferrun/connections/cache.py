"""One client per connection and event loop: an aiohttp session, aiobotocore client or asyncpg
pool created once and shared by every trigger of that loop that uses the connection, closed
together when the loop's process stops (see :mod:`deferrun.connections.clients`)."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import anyio
import structlog

log = structlog.get_logger("deferrun.connections")


class ClientCache:
    """One client per (kind, conn_id) for one event loop, created once, closed together."""

    def __init__(self) -> None:
        self._clients: dict[tuple[str, str], Any] = {}
        self._locks: dict[tuple[str, str], anyio.Lock] = {}
        self._stack = AsyncExitStack()
        self.created: dict[tuple[str, str], int] = {}

    async def get(
        self, kind: str, conn_id: str, factory: Callable[[AsyncExitStack], Awaitable[Any]]
    ) -> Any:
        key = (kind, conn_id)
        client = self._clients.get(key)
        if client is not None:
            return client
        lock = self._locks.setdefault(key, anyio.Lock())
        async with lock:  # a thousand triggers starting at once create one client
            client = self._clients.get(key)
            if client is None:
                client = await factory(self._stack)
                self._clients[key] = client
                self.created[key] = self.created.get(key, 0) + 1
                log.debug("shared client created", kind=kind, conn_id=conn_id)
        return client

    async def aclose(self) -> None:
        self._clients.clear()
        try:
            await self._stack.aclose()
        except Exception as exc:
            log.warning("closing shared clients failed", error=repr(exc))
        self._stack = AsyncExitStack()


_CACHES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ClientCache] = (
    weakref.WeakKeyDictionary()
)


def loop_client_cache() -> ClientCache:
    """The client cache of the running event loop."""
    loop = asyncio.get_running_loop()
    cache = _CACHES.get(loop)
    if cache is None:
        cache = _CACHES[loop] = ClientCache()
    return cache


async def close_loop_clients() -> None:
    loop = asyncio.get_running_loop()
    cache = _CACHES.pop(loop, None)
    if cache is not None:
        await cache.aclose()
