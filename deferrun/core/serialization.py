"""JSON (de)serialization of kwargs, events and results; classpaths are in ``classpaths``.

Rows stay readable JSON: plain values are stored as themselves, and the few types JSON lacks
(datetime, timedelta, UUID, bytes, ...) as ``{"__deferrun__": TAG, "v": ...}`` so they come back
exactly. Loading never unpickles, and only ever instantiates BaseTrigger / BaseOperator
subclasses, after checking that the stored kwargs fit the constructor.
"""

from __future__ import annotations

import base64
import decimal
import enum
import uuid
from datetime import UTC, date, datetime, time, timedelta, timezone, tzinfo
from pathlib import Path, PurePath, PureWindowsPath
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from deferrun.core.classpaths import classpath_of, load_class
from deferrun.exceptions import SerializationError

TAG = "__deferrun__"

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()

ALLOWED_TYPES_HINT = (
    "str, int, float, bool, None, list, tuple, set, dict, datetime, date, time, "
    "timedelta, UUID, bytes, Decimal, pathlib paths, Enum members of importable classes"
)

_PLAIN = frozenset({str, int, bool, type(None)})


def _is_pendulum(value: datetime) -> bool:
    return type(value).__module__.startswith("pendulum")


def _pendulum(value: datetime) -> datetime:
    """``value`` as a pendulum DateTime when pendulum is installed here, else as it is."""
    try:
        import pendulum
    except ImportError:
        return value
    return pendulum.instance(value)


def _tz_to_json(tz: tzinfo | None, dt: datetime | time) -> Any:
    if tz is None:
        return None
    if isinstance(tz, ZoneInfo):
        return tz.key
    offset = tz.utcoffset(dt if isinstance(dt, datetime) else None)
    if offset is None:
        raise SerializationError(f"cannot serialize time zone {tz!r}: it has no fixed UTC offset")
    return offset.total_seconds()


def _tz_from_json(value: Any) -> tzinfo | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return ZoneInfo(value)
        except ZoneInfoNotFoundError as exc:
            raise SerializationError(f"unknown time zone {value!r} in stored value") from exc
    if value == 0:
        return UTC
    return timezone(timedelta(seconds=value))


def to_jsonable(value: Any, path: str = "value") -> Any:
    """Turn ``value`` into plain JSON data, tagging the types JSON lacks.

    ``path`` names the value in errors (``kwargs['client']``), so a user sees which argument
    cannot be stored.
    """
    if type(value) in _PLAIN:
        return value
    if isinstance(value, enum.Enum):
        # by class path and value: IntEnum / StrEnum would otherwise come back as plain data
        return {
            TAG: "enum",
            "cls": classpath_of(type(value)),
            "v": to_jsonable(value.value, f"{path}.value"),
        }
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return {TAG: "float", "v": repr(value)}
        return value
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if type(key) is not str:  # int (or other) keys: stored as [key, value] pairs
                return {
                    TAG: "pairs",
                    "v": [
                        [to_jsonable(k, f"{path} key {k!r}"), to_jsonable(x, f"{path}[{k!r}]")]
                        for k, x in value.items()
                    ],
                }
            kind = type(item)
            if kind in _PLAIN or (kind is float and item - item == 0):  # finite: no NaN/inf
                out[key] = item  # the common case, without formatting a path per item
            else:
                out[key] = to_jsonable(item, f"{path}[{key!r}]")
        if TAG in out:
            return {TAG: "dict", "v": out}
        return out
    if isinstance(value, list):
        return [
            item if type(item) in _PLAIN else to_jsonable(item, f"{path}[{i}]")
            for i, item in enumerate(value)
        ]
    if isinstance(value, tuple):
        return {TAG: "tuple", "v": [to_jsonable(x, f"{path}[{i}]") for i, x in enumerate(value)]}
    if isinstance(value, set | frozenset):
        items = [to_jsonable(x, f"{path}{{...}}") for x in value]
        try:
            items.sort(key=_encoder.encode)
        except TypeError:
            pass
        return {TAG: "frozenset" if isinstance(value, frozenset) else "set", "v": items}
    if isinstance(value, datetime):
        naive = value.replace(tzinfo=None)
        tagged = {TAG: "datetime", "v": naive.isoformat(), "tz": _tz_to_json(value.tzinfo, value)}
        if value.fold:  # the repeated hour of a DST change: without it, an hour early
            tagged["fold"] = 1
        if _is_pendulum(value):
            tagged["pendulum"] = True
        return tagged
    if isinstance(value, date):
        return {TAG: "date", "v": value.isoformat()}
    if isinstance(value, time):
        naive_t = value.replace(tzinfo=None)
        return {TAG: "time", "v": naive_t.isoformat(), "tz": _tz_to_json(value.tzinfo, value)}
    if isinstance(value, timedelta):
        return {TAG: "timedelta", "v": [value.days, value.seconds, value.microseconds]}
    if isinstance(value, uuid.UUID):
        return {TAG: "uuid", "v": str(value)}
    if isinstance(value, bytes | bytearray | memoryview):
        return {TAG: "bytes", "v": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, decimal.Decimal):
        return {TAG: "decimal", "v": str(value)}
    if isinstance(value, PurePath):
        kind = "winpath" if isinstance(value, PureWindowsPath) else "path"
        return {TAG: kind, "v": str(value)}
    raise SerializationError(
        f"{path} is a {type(value).__module__}.{type(value).__qualname__}, which cannot be "
        f"stored; pass plain data ({ALLOWED_TYPES_HINT}) - for clients and credentials, pass a "
        "conn_id and create the client inside the trigger or operator"
    )


def _from_tagged(obj: dict[str, Any]) -> Any:
    tag = obj[TAG]
    v = obj.get("v")
    match tag:
        case "datetime":
            moment = datetime.fromisoformat(v).replace(
                tzinfo=_tz_from_json(obj.get("tz")), fold=1 if obj.get("fold") else 0
            )
            return _pendulum(moment) if obj.get("pendulum") else moment
        case "date":
            return date.fromisoformat(v)
        case "time":
            return time.fromisoformat(v).replace(tzinfo=_tz_from_json(obj.get("tz")))
        case "timedelta":
            return timedelta(days=v[0], seconds=v[1], microseconds=v[2])
        case "uuid":
            return uuid.UUID(v)
        case "bytes":
            return base64.b64decode(v)
        case "decimal":
            return decimal.Decimal(v)
        case "path":
            return Path(v)
        case "winpath":
            return PureWindowsPath(v)
        case "float":
            return float(v)
        case "tuple":
            return tuple(from_jsonable(x) for x in v)
        case "set":
            return {from_jsonable(x) for x in v}
        case "frozenset":
            return frozenset(from_jsonable(x) for x in v)
        case "dict":
            return {k: from_jsonable(x) for k, x in v.items()}
        case "pairs":
            return {from_jsonable(k): from_jsonable(x) for k, x in v}
        case "enum":
            return _load_enum(obj.get("cls"), from_jsonable(v))
    raise SerializationError(
        f"unknown stored type tag {tag!r}; was the row written by a newer deferrun?"
    )


def _load_enum(classpath: Any, value: Any) -> enum.Enum:
    """An Enum member by class path and value, loaded under the same trust rules as classes."""
    cls = load_class(classpath, enum.Enum)
    try:
        return cls(value)
    except Exception as exc:  # ValueError; TypeError for a bare Enum; a _missing_ of its own
        raise SerializationError(
            f"stored enum value {value!r} is not a member of {classpath} "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def from_jsonable(value: Any) -> Any:
    """Inverse of :func:`to_jsonable`."""
    if isinstance(value, list):
        return [from_jsonable(x) for x in value]
    if isinstance(value, dict):
        if TAG in value:
            return _from_tagged(value)
        return {k: from_jsonable(x) for k, x in value.items()}
    return value


def dumps(value: Any, path: str = "value") -> str:
    """Serialize ``value`` to a JSON string; SerializationError names ``path`` on failure."""
    return _encoder.encode(to_jsonable(value, path)).decode("utf-8")


def loads(text: str | bytes | None) -> Any:
    if text is None:
        return None
    try:
        raw = _decoder.decode(text)
    except msgspec.DecodeError as exc:
        raise SerializationError(f"stored value is not valid JSON: {exc}") from exc
    return from_jsonable(raw)
