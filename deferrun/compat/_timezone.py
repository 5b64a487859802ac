"""``airflow.utils.timezone`` as provider code uses it: aware UTC datetimes everywhere.

Naive datetimes are taken to be UTC (Airflow's default time zone). Values are stdlib
``datetime`` objects (Airflow returns pendulum ones; both compare and add alike).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

utc = dt.UTC


def utcnow() -> dt.datetime:
    """Now, aware, in UTC."""
    return dt.datetime.now(utc)


def utc_epoch() -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=utc)


def is_localized(value: dt.datetime) -> bool:
    return value.utcoffset() is not None


def is_naive(value: dt.datetime) -> bool:
    return value.utcoffset() is None


def make_aware(value: dt.datetime | None, timezone: dt.tzinfo | None = None) -> dt.datetime | None:
    """A naive datetime read as wall time in ``timezone`` (UTC by default)."""
    if value is None:
        return None
    if is_localized(value):
        raise ValueError(f"make_aware expects a naive datetime, got {value!r}")
    return value.replace(tzinfo=timezone or utc)


def make_naive(value: dt.datetime, timezone: dt.tzinfo | None = None) -> dt.datetime:
    """An aware datetime as naive wall time in ``timezone`` (UTC by default)."""
    if is_naive(value):
        raise ValueError(f"make_naive expects an aware datetime, got {value!r}")
    return value.astimezone(timezone or utc).replace(tzinfo=None)


def convert_to_utc(value: dt.datetime | None) -> dt.datetime | None:
    """``value`` in UTC; a naive value is taken to be UTC already."""
    if value is None:
        return None
    if is_naive(value):
        return value.replace(tzinfo=utc)
    return value.astimezone(utc)


def coerce_datetime(value: dt.datetime | None, tz: dt.tzinfo | None = None) -> dt.datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=tz or utc) if is_naive(value) else value


def parse(string: str, timezone: dt.tzinfo | None = None, **_: Any) -> dt.datetime:
    """An ISO 8601 string as an aware datetime (naive strings in ``timezone``, else UTC)."""
    try:
        value = dt.datetime.fromisoformat(string.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"timezone.parse: {string!r} is not an ISO 8601 date-time") from exc
    return value if is_localized(value) else value.replace(tzinfo=timezone or utc)


def datetime(*args: Any, **kwargs: Any) -> dt.datetime:
    """``datetime.datetime(...)`` that defaults to UTC instead of naive."""
    if "tzinfo" not in kwargs and len(args) < 8:
        kwargs["tzinfo"] = utc
    return dt.datetime(*args, **kwargs)


def from_timestamp(timestamp: float, tz: dt.tzinfo | None = None) -> dt.datetime:
    return dt.datetime.fromtimestamp(timestamp, tz or utc)
