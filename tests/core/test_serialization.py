from __future__ import annotations

import decimal
import json
import socket
import uuid
from datetime import UTC, date, datetime, time, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from deferrun import BaseOperator, BaseTrigger, SerializationError
from deferrun.client import build_task
from deferrun.core.classpaths import instantiate, load_class
from deferrun.core.deferral import prepare_deferral
from deferrun.core.serialization import dumps, loads
from deferrun.exceptions import ClassLoadError
from tests.support.userland import AirflowStyleTrigger, DeferOnce, EchoTrigger, ForgedTrigger
from triggers.time import DateTimeTrigger, TimeDeltaTrigger

ROUND_TRIP = [
    datetime(2026, 3, 29, 1, 30, 15, 123456, tzinfo=UTC),
    datetime(2026, 3, 29, 2, 30, tzinfo=ZoneInfo("Europe/Berlin")),
    datetime(2026, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=-3, minutes=-30))),
    datetime(2026, 1, 1, 12, 0),
    date(2026, 2, 28),
    time(23, 59, 59, 999999, tzinfo=UTC),
    timedelta(days=-1, seconds=3, microseconds=7),
    timedelta(microseconds=1),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    b"\x00\xffbinary",
    (1, "two", (3.0,)),
    {1, 2, 3},
    frozenset({"a"}),
    decimal.Decimal("1.10"),
    Path("/tmp/x.csv"),
    float("inf"),
    {"__deferrun__": "not a tag, user data", "v": 1},
    {"nested": [{"when": datetime(2026, 1, 1, tzinfo=UTC)}, None, True, 1.5]},
]


@pytest.mark.parametrize("value", ROUND_TRIP, ids=lambda v: type(v).__name__)
def test_round_trip_is_exact(value: object) -> None:
    back = loads(dumps(value))
    assert back == value
    assert type(back) is type(value)
    if isinstance(value, datetime):
        assert back.tzinfo == value.tzinfo or back.utcoffset() == value.utcoffset()
        assert back.utcoffset() == value.utcoffset()


def test_stored_rows_are_readable_json() -> None:
    text = dumps({"bucket": "b", "when": datetime(2026, 1, 1, tzinfo=UTC)})
    parsed = json.loads(text)
    assert parsed["bucket"] == "b"
    assert parsed["when"]["v"] == "2026-01-01T00:00:00"


def test_zoneinfo_keeps_its_zone() -> None:
    moment = datetime(2026, 7, 1, 9, 0, tzinfo=ZoneInfo("America/New_York"))
    back = loads(dumps(moment))
    assert back.tzinfo == ZoneInfo("America/New_York")


def test_unserializable_kwarg_is_refused_at_submit_naming_the_argument() -> None:
    sock = socket.socket()
    try:
        op = DeferOnce(kind="echo", value={"client": sock})
        with pytest.raises(SerializationError) as err:
            build_task(op)
        assert "DeferOnce kwargs['value']['client']" in str(err.value)
        assert "socket" in str(err.value)
    finally:
        sock.close()


def test_unstorable_keys_refused() -> None:
    # int keys are stored now (Airflow triggers carry them); a key that is no storable value
    # is still refused, named by its path
    with pytest.raises(SerializationError, match=r"kwargs\['m'\] key <object"):
        dumps({"m": {object(): "x"}}, "kwargs")


def test_default_serialize_captures_constructor_kwargs() -> None:
    trig = EchoTrigger("v", 2.5)  # positional arguments become keywords
    assert trig.serialize() == ("tests.support.userland.EchoTrigger", {"value": "v", "delay": 2.5})
    rebuilt = instantiate(*trig.serialize(), BaseTrigger, "trigger")
    assert isinstance(rebuilt, EchoTrigger)
    assert rebuilt.value == "v"


def test_airflow_style_explicit_serialize_keeps_working() -> None:
    trig = AirflowStyleTrigger("n", 0.1)
    assert trig.serialize()[0] == "tests.support.userland.AirflowStyleTrigger"
    deferral = prepare_deferral(_defer_signal(trig))
    assert loads(deferral.kwargs) == {"name": "n", "delay": 0.1}


def _defer_signal(trigger: BaseTrigger):  # type: ignore[no-untyped-def]
    from deferrun import TaskDeferred

    return TaskDeferred(trigger=trigger, method_name="m")


def test_time_delta_trigger_is_fixed_at_defer_time() -> None:
    before = datetime.now(UTC)
    trig = TimeDeltaTrigger(timedelta(seconds=30))
    classpath, kwargs = trig.serialize()
    assert classpath == "triggers.time.DateTimeTrigger"
    assert (
        before + timedelta(seconds=30)
        <= kwargs["moment"]
        <= datetime.now(UTC) + timedelta(seconds=30)
    )


def test_naive_moment_refused_with_advice() -> None:
    with pytest.raises(ValueError, match="no time zone"):
        DateTimeTrigger(datetime(2026, 1, 1))


def test_load_class_refuses_functions_without_calling_them(tmp_path: Path) -> None:
    with pytest.raises(ClassLoadError, match="not a BaseTrigger subclass"):
        load_class("os.system", BaseTrigger)
    with pytest.raises(ClassLoadError, match="not a BaseOperator subclass"):
        load_class("tests.support.userland.EchoTrigger", BaseOperator)
    with pytest.raises(ClassLoadError, match="cannot import"):
        load_class("no_such_module_xyz.Trigger", BaseTrigger)
    with pytest.raises(ClassLoadError, match="has no 'Nope'"):
        load_class("tests.support.userland.Nope", BaseTrigger)
    with pytest.raises(ClassLoadError, match="not a dotted classpath"):
        load_class("os.system; rm -rf /", BaseTrigger)


def test_forged_trigger_is_refused_at_defer_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(ClassLoadError, match="not a BaseTrigger subclass"):
        prepare_deferral(_defer_signal(ForgedTrigger(path=str(marker))))
    assert not marker.exists()


def test_kwargs_that_do_not_fit_fail_clearly() -> None:
    with pytest.raises(
        SerializationError, match=r"do not fit trigger tests\.support\.userland\.EchoTrigger"
    ):
        instantiate("tests.support.userland.EchoTrigger", {"valeu": 1}, BaseTrigger, "trigger")


def test_trigger_defined_in_main_is_refused() -> None:
    cls = type("Local", (BaseTrigger,), {"__module__": "__main__"})
    with pytest.raises(SerializationError, match="defined in __main__"):
        cls().serialize()
