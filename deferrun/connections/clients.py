"""Shared clients for built-in triggers, sensors and operators: one per connection per loop.

A thousand S3 triggers on ``aws_default`` share one aiobotocore client (and its connection
pool); a thousand HTTP triggers on one host share one aiohttp session; SQL triggers share one
asyncpg pool per connection. Clients live until the process shuts down.
"""

from __future__ import annotations

import base64
import re
from contextlib import AsyncExitStack
from typing import Any
from urllib.parse import unquote

import anyio
import anyio.to_thread
import structlog

from deferrun.connections.cache import loop_client_cache
from deferrun.connections.redaction import register_secret
from deferrun.connections.uri import Connection, get_connection
from deferrun.core.config import connect_timeout

HTTP_TIMEOUT = 30.0
# Connection extras that configure deferrun's pool; libpq/asyncpg would send any other query
# parameter to the server as a setting (and "max_size" is no PostgreSQL setting).
POOL_OPTIONS = frozenset({"max_size"})


def _warm_botocore(session: Any, service: str) -> None:
    """Fill the session's loader cache with the service's JSON models, in a thread.

    Parsing them is most of what a new client costs (measured: 96 ms of CPU on the loop cold,
    15 ms warm), and the loader caches them, so create_client then barely blocks the loop.
    """
    loader = session.get_component("data_loader")
    for kind in ("service-2", "endpoint-rule-set-1"):
        try:
            loader.load_service_model(service, kind)
        except Exception:  # a service without that file: create_client will say more
            continue
    loader.load_data("endpoints")
    loader.load_data("partitions")


async def aws_client(service: str, conn_id: str) -> Any:
    """The shared aiobotocore client for ``service`` on connection ``conn_id``."""
    conn = get_connection(conn_id)

    async def factory(stack: AsyncExitStack) -> Any:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        session = get_session()
        await anyio.to_thread.run_sync(_warm_botocore, session, service)
        options = {
            "region_name": conn.extra.get("region_name") or "us-east-1",
            "endpoint_url": conn.extra.get("endpoint_url"),
            "aws_access_key_id": conn.login,
            "aws_secret_access_key": conn.password,
            "aws_session_token": conn.extra.get("aws_session_token"),
        }
        config = AioConfig(
            retries={"max_attempts": 2, "mode": "standard"},
            connect_timeout=10,
            read_timeout=HTTP_TIMEOUT,
            max_pool_connections=int(conn.extra.get("max_pool_connections", 50)),
        )
        return await stack.enter_async_context(
            session.create_client(service, config=config, **{k: v for k, v in options.items() if v})
        )

    return await loop_client_cache().get(f"aws:{service}", conn_id, factory)


AUTH_SCHEMES = ("basic", "token", "bearer")
#: header names whose values are registered as secrets (redacted from logs and errors)
_SECRET_HEADER = re.compile(r"key|token|secret|auth|password|session|cookie", re.IGNORECASE)


def auth_scheme(conn: Connection) -> str:
    """The connection's ``?auth=`` scheme: basic (the default), token or bearer."""
    scheme = conn.extra.get("auth", "basic").strip().lower() or "basic"
    if scheme not in AUTH_SCHEMES:
        from deferrun.exceptions import ConfigError

        raise ConfigError(
            f"connection {conn.conn_id!r}: auth={scheme!r} is not supported; use "
            "auth=basic (login:password), auth=token or auth=bearer (the password is the token)"
        )
    return scheme


MIN_REDACTED = 3  # connections.register_secret ignores shorter strings


def http_headers(conn: Connection) -> dict[str, str]:
    """Default headers for ``conn``: its ``Authorization`` and every ``?header.X-Name=value``.

    The secret is always the URI's password: ``Token <password>``, ``Bearer <password>``, or
    Basic of ``login:password``. Values of secret-looking headers are registered for redaction.
    """
    headers: dict[str, str] = {}
    for key, value in conn.extra.items():
        if key.startswith("header.") and len(key) > len("header."):
            name = key[len("header.") :]
            headers[name] = value
            if _SECRET_HEADER.search(name):
                register_secret(value)
    scheme = auth_scheme(conn)
    if conn.password and len(conn.password) < MIN_REDACTED:
        structlog.get_logger("deferrun.connections").warning(
            f"connection {conn.conn_id!r} has a password shorter than {MIN_REDACTED} characters: "
            "it is sent, but not redacted from logs and errors (that would mangle them); use a "
            "longer secret"
        )
    if scheme == "basic":
        if conn.login or conn.password:  # an empty user with a password, as requests sends
            token = base64.b64encode(f"{conn.login or ''}:{conn.password or ''}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
            register_secret(token)
    elif not conn.password:
        from deferrun.exceptions import ConfigError

        raise ConfigError(
            f"connection {conn.conn_id!r} uses auth={scheme} but has no password: put the token "
            "in the URI's password field, e.g. https://ACCOUNT:TOKEN@host?auth=" + scheme
        )
    else:
        headers["Authorization"] = f"{scheme.capitalize()} {conn.password}"
    return headers


async def http_session(conn_id: str) -> tuple[Any, Connection]:
    """The shared aiohttp session for ``conn_id``, sending the connection's auth and headers."""
    import aiohttp

    conn = get_connection(conn_id)
    if conn.conn_type not in ("http", "https"):
        from deferrun.exceptions import ConfigError

        raise ConfigError(f"connection {conn_id!r} is {conn.conn_type}://, not http(s)://")
    headers = http_headers(conn)

    async def factory(stack: AsyncExitStack) -> Any:
        session = aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT),
            connector=aiohttp.TCPConnector(limit=int(conn.extra.get("max_connections", 100))),
        )
        stack.push_async_callback(session.close)
        return session

    return await loop_client_cache().get("http", conn_id, factory), conn


async def pg_pool(conn_id: str) -> Any:
    """The shared asyncpg pool for ``conn_id``."""
    import asyncpg

    conn = get_connection(conn_id)

    async def factory(stack: AsyncExitStack) -> Any:
        pool = await asyncpg.create_pool(
            conn.dsn(exclude=POOL_OPTIONS),
            min_size=0,
            max_size=int(conn.extra.get("max_size", 10)),
            timeout=connect_timeout(),
        )
        stack.push_async_callback(pool.close)
        return pool

    return await loop_client_cache().get("postgres", conn_id, factory)


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def check_endpoint(endpoint: Any, name: str = "endpoint") -> str:
    """``endpoint`` if it is a path (and query) under the connection's base path, else ValueError.

    The connection's credentials go with every request, so an endpoint must never pick the
    host (``http://other/..``, ``//other``) or climb out of the base path (``..``, also
    percent-encoded): the request always goes to the connection's scheme, host and port.
    """
    if not isinstance(endpoint, str):
        raise ValueError(f"{name} must be a string path such as 'api/status', got {endpoint!r}")
    shown = repr(endpoint[:200])
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in endpoint):
        raise ValueError(f"{name} {shown} contains control characters; pass a plain URL path")
    path = re.split(r"[?#]", endpoint, maxsplit=1)[0]
    if path.startswith(("//", "\\\\", "/\\", "\\/")) or _SCHEME.match(path):
        raise ValueError(
            f"{name} {shown} is a URL, not a path: requests go only to the connection's host "
            "(its credentials go with them); put the host in the connection and pass a path "
            "such as 'api/v1/status' (or './a:b' if the first part has a ':')"
        )
    decoded = path
    for _ in range(3):  # "%252e%252e" is ".." to a server that decodes twice
        decoded = unquote(decoded)
    # "..;x" is ".." to servers that drop path parameters (Tomcat, some proxies)
    if any(seg.split(";", 1)[0] == ".." for seg in re.split(r"[/\\]", decoded)):
        raise ValueError(
            f"{name} {shown} has a '..' segment, which would leave the connection's base "
            "path; pass a path below it, or change the connection's base URL"
        )
    return endpoint


def join_url(conn: Connection, endpoint: str, name: str = "endpoint") -> str:
    """The connection's base URL + "/" + ``endpoint`` (Airflow HttpHook's rule, not urljoin).

    Refuses (ValueError) an endpoint that is a URL or climbs out of the base path, and checks
    that the result still points at the connection's scheme, host and port.
    """
    import yarl

    check_endpoint(endpoint, name)
    if not conn.host:
        from deferrun.exceptions import ConfigError

        raise ConfigError(
            f"connection {conn.conn_id!r} has no host; set e.g. http://host:port/base"
        )
    base = conn.base_url
    if base.endswith("/") or endpoint.startswith("/") or not endpoint:
        url = base + endpoint
    else:
        url = base + "/" + endpoint
    if yarl.URL(url).origin() != yarl.URL(base).origin():
        raise ValueError(
            f"{name} {endpoint[:200]!r} would send the request away from connection "
            f"{conn.conn_id!r}'s host; pass a path below its base URL"
        )
    return url


def dotted(body: Any, path: str) -> Any:
    """``body['a']['b'][0]`` for ``path='a.b.0'``; KeyError naming the missing part."""
    value = body
    for part in path.split(".") if path else []:
        if isinstance(value, list) and part.lstrip("-").isdigit():
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise KeyError(f"{path!r}: no {part!r} in {str(value)[:200]}")
    return value
