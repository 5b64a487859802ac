"""Connections: ``DEFERRUN_CONN_<ID>`` URIs, resolved where they are used, never stored.

Triggers and operators take a ``conn_id``; the URI (with its secrets) is read from the
environment of the process that runs them - the triggerer for deferrable waits, the worker for
poke/reschedule sensors and operators. Every secret seen here is registered for redaction
(:mod:`deferrun.connections.redaction`).
"""

from __future__ import annotations

import os
import re
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import msgspec

from deferrun.connections.redaction import (
    register_extra_secrets,
    register_secret,
    register_unparsed_uri,
)
from deferrun.exceptions import ConfigError


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
            register_unparsed_uri(uri)
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
