"""Connections: ``DEFERRUN_CONN_<ID>`` URIs, resolved where they are used, never stored.

Triggers and operators take a ``conn_id``; the URI (with its secrets) is read from the
environment of the process that runs them - the triggerer for deferrable waits, the worker for
poke/reschedule sensors and operators. Every secret seen here is registered for redaction, so
it is replaced by ``***`` in log lines, stored logs and task errors.

This module also holds the per-process client cache: one aiohttp session, aiobotocore client
or asyncpg pool per connection and event loop, shared by every trigger that uses it.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import traceback
import weakref
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import anyio
import msgspec
import structlog

from deferrun.exceptions import ConfigError

log = structlog.get_logger("deferrun.connections")

_SECRETS: set[str] = set()
_SECRETS_LOCK = threading.Lock()
_SECRET_RE: re.Pattern[str] | None = None


def register_secret(value: str | None) -> None:
    """Remember a secret so redact() hides it wherever it would be printed or stored."""
    global _SECRET_RE
    if not value or len(value) < 3:
        return
    with _SECRETS_LOCK:
        for form in (value, quote(value, safe="")):
            _SECRETS.add(form)
        ordered = sorted(_SECRETS, key=len, reverse=True)
        _SECRET_RE = re.compile("|".join(re.escape(s) for s in ordered))


def redact(text: str) -> str:
    pattern = _SECRET_RE
    return pattern.sub("***", text) if pattern is not None and text else text


def format_error(exc: BaseException) -> str:
    """The traceback as stored in the task row, with every known secret redacted."""
    return redact("".join(traceback.format_exception(exc)).rstrip())


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redact_value(v) for v in value)
    return value


def redact_processor(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: no registered secret reaches a log line."""
    if _SECRET_RE is None:
        return event_dict
    return {k: _redact_value(v) for k, v in event_dict.items()}


#: extra names whose values are secrets, matched with '-' read as '_' (x-api-key, api_key...)
_SECRET_NAME = re.compile(
    r"(^|_)pass(word|wd|phrase)?($|_)|password|secret|token|api_?key|private_?key|credential|"
    r"cookie|authorization|session_?id|signature"
)
#: names that describe a secret rather than hold one (token_type=bearer, token_url=...)
_NOT_SECRET = ("_type", "_url", "_uri", "_path", "_file", "_endpoint", "_expires", "_name")


def _secret_name(name: str) -> bool:
    name = name.replace("-", "_").lower()
    if name.startswith("header."):  # an HTTP header passed as an extra
        name = name[len("header.") :]
    return bool(_SECRET_NAME.search(name)) and not name.endswith(_NOT_SECRET)


def register_extra_secrets(extra: Any, secret: bool = False) -> None:
    """Register the values of secret-named extras, walking nested dicts and lists (an
    Airflow ``__extra__`` JSON); everything under a secret-named key counts as secret. A
    ``Bearer <token>`` style value also registers its token on its own."""
    if isinstance(extra, dict):
        for key, value in extra.items():
            register_extra_secrets(value, secret or (isinstance(key, str) and _secret_name(key)))
    elif isinstance(extra, list | tuple):
        for value in extra:
            register_extra_secrets(value, secret)
    elif secret and isinstance(extra, str):
        register_secret(extra)
        _, _, credential = extra.strip().partition(" ")
        if credential:
            register_secret(credential.strip())


def _register_unparsed(uri: str) -> None:
    """A URI urllib cannot parse may still hold a password (with an unencoded '/', '#' or '?'):
    register whatever looks like one, and its pieces, before reporting the error."""
    _, sep, rest = uri.partition("://")
    if not sep or "@" not in rest:
        return
    userinfo = rest.rsplit("@", 1)[0]
    _, colon, password = userinfo.partition(":")
    if not colon:
        return
    for candidate in (password, unquote(password), *re.split(r"[/#?:]", password)):
        register_secret(candidate)


class Connection(msgspec.Struct, frozen=True):
    """A parsed connection URI: ``scheme://login:password@host:port/path?extra=...``."""

    conn_id: str
    conn_type: str
    host: str | None = None
    port: int | None = None
    login: str | None = None
    password: str | None = None
    path: str = ""
    extra: dict[str, str] = msgspec.field(default_factory=dict)

    @classmethod
    def from_uri(cls, conn_id: str, uri: str) -> Connection:
        try:
            parts = urlsplit(uri)
            port = parts.port
        except ValueError:  # urllib's message quotes parts of the URI: the password, maybe
            _register_unparsed(uri)
            raise ConfigError(
                f"connection {conn_id!r}: {env_var(conn_id)} is not a valid URI (a port that "
                "is not a number, or a '/', '#', '?' or '@' left unencoded in the login or "
                "password); percent-encode the login and password "
                "(urllib.parse.quote(password, safe='')), e.g. http://login:password@host:port/base"
            ) from None
        if not parts.scheme:
            raise ConfigError(
                f"connection {conn_id!r}: the URI has no scheme (aws://, "
                "postgresql://, http://, https://)"
            )
        login = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        register_secret(password)
        extra = dict(parse_qsl(parts.query))
        register_extra_secrets(extra)
        return cls(
            conn_id=conn_id,
            conn_type=parts.scheme.lower(),
            host=parts.hostname,
            port=port,
            login=login,
            password=password,
            path=unquote(parts.path),
            extra=extra,
        )

    def __repr__(self) -> str:  # never show the password
        return (
            f"Connection({self.conn_id!r}, {self.conn_type}://"
            f"{self.login + ':***@' if self.login else ''}{self.host or ''}"
            f"{':' + str(self.port) if self.port else ''}{self.path})"
        )

    __str__ = __repr__

    @property
    def base_url(self) -> str:
        """``scheme://host:port/path`` for HTTP connections (no credentials in it)."""
        netloc = self.host or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"
        if self.port:
            netloc += f":{self.port}"
        return f"{self.conn_type}://{netloc}{self.path}"

    def dsn(self, exclude: frozenset[str] = frozenset()) -> str:
        """A libpq-style DSN (for asyncpg), credentials included: never log it.

        ``exclude`` names extras that are deferrun options, not server settings.
        """
        auth = ""
        if self.login:
            auth = quote(self.login, safe="")
            if self.password:
                auth += ":" + quote(self.password, safe="")
            auth += "@"
        host = self.host or "localhost"
        port = f":{self.port}" if self.port else ""
        query = "&".join(
            f"{k}={quote(v, safe='')}" for k, v in self.extra.items() if k not in exclude
        )
        return f"postgresql://{auth}{host}{port}{self.path}{'?' + query if query else ''}"


def env_var(conn_id: str) -> str:
    return "DEFERRUN_CONN_" + re.sub(r"[^A-Za-z0-9]", "_", conn_id).upper()


def get_connection(conn_id: str) -> Connection:
    """Resolve ``conn_id`` from ``DEFERRUN_CONN_<ID>`` in this process's environment."""
    name = env_var(conn_id)
    uri = os.environ.get(name)
    if not uri:
        raise ConfigError(
            f"connection {conn_id!r} is not defined in this process: set {name} to its URI "
            "(e.g. aws://KEY:SECRET@?region_name=eu-west-1, postgresql://user:pw@host/db, "
            "https://login:password@host/base) for the triggerer and the workers"
        )
    return Connection.from_uri(conn_id, uri)


# --------------------------------------------------------------------------- shared clients


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


def shared_clients() -> ClientCache:
    """The client cache of the running event loop."""
    loop = asyncio.get_running_loop()
    cache = _CACHES.get(loop)
    if cache is None:
        cache = _CACHES[loop] = ClientCache()
    return cache


async def close_shared_clients() -> None:
    loop = asyncio.get_running_loop()
    cache = _CACHES.pop(loop, None)
    if cache is not None:
        await cache.aclose()
