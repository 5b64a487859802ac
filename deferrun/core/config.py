"""Settings read from the environment, with the defaults DESIGN.md promises."""

from __future__ import annotations

import math
import os
import re

from deferrun.exceptions import ConfigError

DEFAULT_DB = "sqlite:///deferrun.db"


def db_url(explicit: str | None = None) -> str:
    """``--db``, else ``DEFERRUN_DB``, else the embedded default."""
    return explicit or os.environ.get("DEFERRUN_DB") or DEFAULT_DB


def env_float(name: str, default: float, minimum: float = 0.001) -> float:
    """A duration from the environment: a finite number of seconds, at least ``minimum``."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds")
    if not math.isfinite(value) or value < minimum or value > 1e9:
        raise ConfigError(
            f"{name} must be a number of seconds from {minimum:g} to 1e9, got {raw!r}"
        )
    return value


def dead_after() -> float:
    """Seconds of heartbeat silence after which a worker or triggerer counts as dead."""
    # a heartbeat goes out every dead_after/5 (at least every 0.2 s): below 1 s, a busy
    # process would be declared dead between two beats
    return env_float("DEFERRUN_DEAD_AFTER", 10.0, minimum=1.0)


def idle_poll(store: object) -> float:
    """Seconds an idle worker or triggerer waits for a wake-up before it looks anyway.

    ``DEFERRUN_POLL_INTERVAL`` if set; else 15 s where every wake-up reaches its listener
    (PostgreSQL LISTEN/NOTIFY, so polling only backs up a lost connection), 1 s otherwise.
    """
    default = 15.0 if getattr(store, "reliable_wakeups", False) else 1.0
    return env_float("DEFERRUN_POLL_INTERVAL", default, minimum=0.05)


_SECRET_QUERY = re.compile(
    r"((?:^|[?&])(?:password|passwd|pass|secret|token|sslpassword|api_key|aws_secret_access_key)"
    r"=)[^&#]*",
    re.IGNORECASE,
)


def redact_url(url: str) -> str:
    """The URL with its password (and password-like query values) replaced, for log lines
    and error messages.

    Parsed by hand, not by urlsplit: a password with an unencoded ``/``, ``#`` or ``?``
    makes urlsplit put it in the path, where a redaction by parsing would leave it.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _SECRET_QUERY.sub(r"\1***", url)
    at = rest.rfind("@")
    if at >= 0:
        userinfo, host = rest[:at], rest[at + 1 :]
        user = userinfo.split(":", 1)[0]
        rest = f"{user}:***@{host}" if ":" in userinfo else rest
    return scheme + "://" + _SECRET_QUERY.sub(r"\1***", rest)


def scrub(text: str, url: str) -> str:
    """``text`` (a driver's error, say) with ``url``'s secrets taken out wherever they appear:
    its password and password-like query values, and the pieces of them a driver that
    misparsed the URL (an unencoded / # ? in the password) may quote."""
    _, sep, rest = url.partition("://")
    secrets: list[str] = []
    at = rest.rfind("@")
    if sep and at >= 0 and ":" in rest[:at]:
        secrets.append(rest[:at].split(":", 1)[1])
    secrets += [m.group(0).split("=", 1)[1] for m in _SECRET_QUERY.finditer(url)]
    pieces = [p for s in secrets for p in (s, *re.split(r"[/#?@:&\[\]]", s))]
    for piece in sorted(pieces, key=len, reverse=True):
        if len(piece) >= 3:
            text = text.replace(piece, "***")
    return redact_url(text) if "://" in text else text


def connect_timeout() -> float:
    """Seconds to wait for a database server to answer a new connection."""
    return env_float("DEFERRUN_CONNECT_TIMEOUT", 10.0)


def query_timeout() -> float:
    """Seconds to wait for PostgreSQL to answer one statement before giving up on it."""
    return env_float("DEFERRUN_QUERY_TIMEOUT", 60.0)
