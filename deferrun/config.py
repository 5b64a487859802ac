"""Settings read from the environment, with the defaults DESIGN.md promises."""

from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

from deferrun.exceptions import ConfigError

DEFAULT_DB = "sqlite:///deferrun.db"


def db_url(explicit: str | None = None) -> str:
    """``--db``, else ``DEFERRUN_DB``, else the embedded default."""
    return explicit or os.environ.get("DEFERRUN_DB") or DEFAULT_DB


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds")
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {raw!r}")
    return value


def dead_after() -> float:
    """Seconds of heartbeat silence after which a worker or triggerer counts as dead."""
    return env_float("DEFERRUN_DEAD_AFTER", 10.0)


def redact_url(url: str) -> str:
    """The URL with its password replaced, for log lines and error messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))


def connect_timeout() -> float:
    """Seconds to wait for a database server to answer a new connection."""
    return env_float("DEFERRUN_CONNECT_TIMEOUT", 10.0)
