"""Values Airflow-style triggers carry: Enums (by class path, under the trust rules), dicts
with int keys, pendulum datetimes."""

from __future__ import annotations

import enum
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pendulum
import pytest

from deferrun.core.classpaths import set_trusted_modules
from deferrun.core.serialization import dumps, loads
from deferrun.exceptions import ClassLoadError, SerializationError
from tests.support.airflow_style import JobStatus, Priority


@pytest.mark.parametrize(
    "value",
    [
        JobStatus.SUCCESS,
        Priority.HIGH,
        {"status": JobStatus.ERROR, "codes": [Priority.LOW]},
        {1: "queued", 10: "success", 20: [1, 2]},
        {(1, 2): "tuple key", None: 0, 2.5: "float key"},
        {"outer": {3: {"inner": {4: True}}}},
    ],
    ids=["str-enum", "int-enum", "nested-enum", "int-keys", "other-keys", "nested-int-keys"],
)
def test_round_trip_keeps_types(value: object) -> None:
    back = loads(dumps(value))
    assert back == value
    assert repr(back) == repr(value)  # IntEnum == int, so compare the types too


def test_int_enum_is_not_stored_as_plain_int() -> None:
    back = loads(dumps(Priority.HIGH))
    assert type(back) is Priority


def test_enum_loads_under_trust_rules() -> None:
    text = dumps(JobStatus.SUCCESS)
    set_trusted_modules(["some_other_package"])
    try:
        with pytest.raises(ClassLoadError, match="not trusted"):
            loads(text)
    finally:
        set_trusted_modules(None)
    assert loads(text) is JobStatus.SUCCESS


def test_enum_from_main_or_bad_value_is_refused() -> None:
    class Local(enum.Enum):  # defined in a function: no other process could import it
        A = 1

    with pytest.raises(SerializationError, match="inside a function"):
        dumps(Local.A)
    forged = dumps(JobStatus.SUCCESS).replace('"v":10', '"v":999')
    with pytest.raises(SerializationError, match="not a member"):
        loads(forged)


def test_pendulum_datetime_comes_back_as_pendulum() -> None:
    moment = pendulum.datetime(2026, 3, 29, 2, 30, tz="Europe/Berlin")
    back = loads(dumps({"at": moment}))["at"]
    assert isinstance(back, pendulum.DateTime)
    assert back == moment and back.utcoffset() == moment.utcoffset()
    assert back.timezone_name == "Europe/Berlin"
    plain = loads(dumps(datetime(2026, 1, 1, tzinfo=UTC)))
    assert type(plain) is datetime


def test_repeated_dst_hour_keeps_its_fold() -> None:
    """01:30 on the night clocks go back happens twice; the second (fold=1) must not come
    back as the first, an hour early (a DateTimeTrigger would fire an hour early)."""
    zone = ZoneInfo("America/New_York")
    for moment in (
        datetime(2024, 11, 3, 1, 30, tzinfo=zone, fold=1),
        pendulum.datetime(2024, 11, 3, 1, 30, tz="America/New_York", fold=1),
        datetime(2024, 11, 3, 1, 30, tzinfo=zone),  # the first 01:30
    ):
        back = loads(dumps(moment))
        assert back.timestamp() == moment.timestamp() and back.fold == moment.fold
        assert type(back) is type(moment)
    # the stored form before the fold was kept still loads (as fold=0)
    old = '{"__deferrun__":"datetime","v":"2024-11-03T01:30:00","tz":"America/New_York"}'
    assert loads(old).utcoffset() == timedelta(hours=-4)
