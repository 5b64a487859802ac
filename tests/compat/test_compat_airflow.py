"""deferrun.compat.airflow in one process: the names, constructors, conf, timezone, hooks,
the exception mapping and the upstream-classpath rule."""

from __future__ import annotations

import importlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from deferrun import FailTask, SkipTask
from deferrun.client import build_task
from deferrun.connections.redaction import redact
from deferrun.core.classpaths import instantiate
from deferrun.core.deferral import prepare_deferral
from deferrun.core.serialization import dumps, loads
from deferrun.exceptions import TaskDeferred
from deferrun.worker.attempt import _classify, _Raised
from tests.support.airflow_style import (
    DbtCloudLikeHook,
    DbtCloudRunJobOperator,
    DbtCloudRunJobTrigger,
    DeferBadTrigger,
    FlagSensor,
    LeakyTrigger,
    NotStorable,
    Priority,
)

NAMES = [
    "BaseTrigger",
    "TriggerEvent",
    "TaskSuccessEvent",
    "TaskFailedEvent",
    "BaseOperator",
    "BaseSensorOperator",
    "PokeReturnValue",
    "StartTriggerArgs",
    "BaseHook",
    "AirflowException",
    "AirflowSkipException",
    "AirflowFailException",
    "AirflowSensorTimeout",
    "TaskDeferralError",
    "AirflowNotFoundException",
    "TaskDeferred",
    "timezone",
    "conf",
    "Context",
    "XCom",
    "BaseOperatorLink",
    "determine_kwargs",
    "__version__",
    "AIRFLOW_V_3_0_PLUS",
    "AIRFLOW_V_2_10_PLUS",
    "AIRFLOW_V_3_1_PLUS",
]


def test_every_listed_name_imports() -> None:
    module = importlib.import_module("deferrun.compat.airflow")
    missing = [name for name in NAMES if not hasattr(module, name)]
    assert not missing
    assert module.AIRFLOW_V_3_0_PLUS is True and module.__version__.startswith("3.")
    assert callable(module.timezone.utcnow) and callable(module.conf.getboolean)


def test_airflow_common_kwargs_are_accepted_and_readable() -> None:
    op = DbtCloudRunJobOperator(
        task_id="dbt_run",
        job_id=1,
        dag="nightly",
        owner="data-eng",
        pool="dbt",
        trigger_rule="all_done",
        do_xcom_push=False,
        retry_exponential_backoff=True,
        max_retry_delay=timedelta(minutes=5),
        default_args={"retries": 3, "retry_delay": 7, "owner": "ignored", "queue": "dbt"},
        execution_timeout=timedelta(minutes=2),
        on_failure_callback=print,
        params={"full_refresh": True},
    )
    assert (op.retries, op.retry_delay, op.queue) == (3, 7.0, "dbt")  # default_args fill in
    assert op.owner == "data-eng" and op.pool == "dbt" and op.trigger_rule == "all_done"
    assert op.execution_timeout == 120.0 and op.retry_exponential_backoff is True
    assert op.dag_id == "nightly" and op.dag.dag_id == "nightly"
    assert op.deferrable is True  # conf default_deferrable is True in deferrun
    task = build_task(op)  # storable: the callback is not stored, dag is its id
    rebuilt = instantiate(task.classpath, loads(task.kwargs), DbtCloudRunJobOperator, "operator")
    assert rebuilt.dag_id == "nightly" and rebuilt.params == {"full_refresh": True}
    assert rebuilt.on_failure_callback is None and rebuilt.retries == 3


def test_unknown_kwargs_are_refused_like_airflow() -> None:
    from deferrun.compat.airflow import AirflowException

    with pytest.raises(AirflowException, match=r"Invalid arguments.*no_such_arg"):
        DbtCloudRunJobOperator(task_id="t", job_id=1, no_such_arg=1)


def test_sensor_kwargs() -> None:
    sensor = FlagSensor(
        task_id="s",
        path="/x",
        poke_interval=5,
        timeout=30,
        mode="reschedule",
        soft_fail=True,
        exponential_backoff=True,
        max_wait=60,
        silent_fail=True,
    )
    assert (sensor.mode, sensor.poke_interval, sensor.timeout) == ("reschedule", 5.0, 30.0)
    assert sensor.soft_fail and sensor.silent_fail and sensor.max_wait == 60


def test_conf_env_then_defaults_then_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    from deferrun.compat.airflow import AirflowException, conf

    assert conf.getboolean("operators", "default_deferrable", fallback=False) is True
    monkeypatch.setenv("AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE", "false")
    assert conf.getboolean("operators", "default_deferrable", fallback=True) is False
    assert conf.getint("dbt", "poll", fallback=7) == 7
    monkeypatch.setenv("AIRFLOW__DBT__POLL", "12")
    assert conf.getint("dbt", "poll") == 12 and conf.get("dbt", "poll") == "12"
    with pytest.raises(AirflowException, match="AIRFLOW__DBT__MISSING"):
        conf.get("dbt", "missing")


def test_timezone_helpers() -> None:
    from deferrun.compat.airflow import timezone

    now = timezone.utcnow()
    assert now.tzinfo is not None and now.utcoffset() == timedelta(0)
    assert timezone.convert_to_utc(datetime(2026, 1, 1)) == datetime(2026, 1, 1, tzinfo=UTC)
    assert timezone.parse("2026-01-01T02:00:00+02:00") == datetime(2026, 1, 1, tzinfo=UTC)
    assert timezone.parse("2026-01-01").tzinfo is not None
    assert timezone.datetime(2026, 1, 1).tzinfo is UTC


def test_get_connection_airflow_attributes(monkeypatch: pytest.MonkeyPatch) -> None:
    from deferrun.compat.airflow import AirflowNotFoundException, BaseHook

    monkeypatch.setenv(
        "DEFERRUN_CONN_DBT_X",
        "dbt-cloud://4242:tok%2Fsecret-1@cloud.example:8443/api?proxy_scheme=https&api_key=k-123456",
    )
    conn = BaseHook.get_connection("dbt_x")
    assert (conn.conn_type, conn.host, conn.port, conn.schema) == (
        "dbt_cloud",
        "cloud.example",
        8443,
        "api",
    )
    assert (conn.login, conn.password) == ("4242", "tok/secret-1")
    assert conn.extra_dejson == {"proxy_scheme": "https", "api_key": "k-123456"}
    assert "tok/secret-1" not in repr(conn)
    assert redact("pw tok/secret-1 key k-123456") == "pw *** key ***"
    with pytest.raises(AirflowNotFoundException, match="DEFERRUN_CONN_NOPE"):
        DbtCloudLikeHook("nope").get_connection("nope")


def test_exceptions_map_to_deferrun_outcomes() -> None:
    from deferrun.compat import airflow as af

    assert isinstance(_classify(_Raised(af.AirflowSkipException("x")), "execute", None), SkipTask)
    failed = _classify(_Raised(af.AirflowFailException("x")), "execute", None)
    assert failed.retry is False  # type: ignore[union-attr]
    timeout = _classify(_Raised(af.AirflowSensorTimeout("x")), "__deferral_timeout__", None)
    assert timeout.retry is False  # type: ignore[union-attr]
    assert _classify(_Raised(af.AirflowException("x")), "execute", None).retry is True  # type: ignore[union-attr]
    assert issubclass(af.TaskDeferralError, FailTask)


def test_upstream_classpath_resolves_to_the_users_class() -> None:
    trigger = DbtCloudRunJobTrigger(
        conn_id="c", run_id=1, end_time=1.0, poll_interval=1.0, account_id=None
    )
    assert trigger.serialize()[0].startswith("airflow.providers.")
    deferral = prepare_deferral(TaskDeferred(trigger=trigger))
    assert deferral.classpath == "tests.support.airflow_style.DbtCloudRunJobTrigger"
    rebuilt = instantiate(deferral.classpath, loads(deferral.kwargs), DbtCloudRunJobTrigger, "t")
    assert rebuilt.priority is Priority.LOW and 10 in rebuilt.status_names  # Enum, int keys


def test_defer_fails_fast_at_the_call(tmp_path: Path) -> None:
    from deferrun.compat.airflow import TaskDeferralError

    op = DeferBadTrigger(task_id="bad", marker=str(tmp_path / "m"))
    with pytest.raises(TaskDeferralError, match="NotStorable"):
        op.defer(trigger=LeakyTrigger(handle=NotStorable()), method_name="execute_complete")
    with pytest.raises(TaskDeferralError, match="no method 'nope'"):
        op.defer(trigger=LeakyTrigger(handle=1), method_name="nope")


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"kwargs": {1: "x"}}, "argument names"),
        ({"kwargs": {"not an id": 1}}, "argument names"),
        ({"kwargs": {"context": 1}}, "cannot hold 'context'"),
        ({"kwargs": [1, 2]}, "must be a dict"),
        ({"method_name": None}, "method_name must be"),
        ({"method_name": 5}, "method_name must be"),
    ],
)
def test_defer_refuses_what_cannot_resume_at_the_call(
    tmp_path: Path, changes: dict[str, Any], match: str
) -> None:
    """Resume kwargs or a method name that would only fail after the wait (and be retried,
    running execute again) are refused by defer() itself."""
    from deferrun.compat.airflow import TaskDeferralError

    op = DeferBadTrigger(task_id="bad", marker=str(tmp_path / "m"))
    args: dict[str, Any] = {"trigger": LeakyTrigger(handle=1), "method_name": "execute_complete"}
    with pytest.raises(TaskDeferralError, match=match):
        op.defer(**{**args, **changes})
    with pytest.raises(TaskDeferred):  # an 'event' key is allowed: the trigger's event wins
        op.defer(**args, kwargs={"event": "replaced", "extra": 1})


def test_trigger_hash_and_kwargs_init() -> None:
    from deferrun.compat.airflow import BaseTrigger

    assert BaseTrigger.hash("a.B", {"x": 1}) == BaseTrigger.hash("a.B", {"x": 1})
    assert BaseTrigger.hash("a.B", {"x": 1}) != BaseTrigger.hash("a.B", {"x": 2})
    assert dumps(BaseTrigger.hash("a.B", {1: Priority.HIGH}))


def test_determine_kwargs() -> None:
    from deferrun.compat.airflow import determine_kwargs

    def f(a, ti, ds=None):  # type: ignore[no-untyped-def]
        return a

    assert determine_kwargs(f, [1], {"a": 0, "ti": "t", "logical_date": 2}) == {"ti": "t"}
    assert determine_kwargs(lambda **kw: kw, [], {"x": 1}) == {"x": 1}


def test_upstream_classpath_never_imports_an_installed_airflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an 'airflow' package on the path (Airflow installed beside deferrun): the hard-coded
    # path must still mean the user's class, and nothing of that package may be imported
    pkg = tmp_path / "airflow" / "providers" / "dbt" / "cloud" / "triggers"
    pkg.mkdir(parents=True)
    for parent in [tmp_path / "airflow", *list(pkg.relative_to(tmp_path).parents)[:-1]]:
        (tmp_path / parent / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "dbt.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(tmp_path / 'imported')!r}).write_text('yes')\n"
        "from deferrun import BaseTrigger\n"
        "class DbtCloudRunJobTrigger(BaseTrigger):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    trigger = DbtCloudRunJobTrigger(
        conn_id="c", run_id=1, end_time=1.0, poll_interval=1.0, account_id=None
    )
    deferral = prepare_deferral(TaskDeferred(trigger=trigger))
    assert deferral.classpath == "tests.support.airflow_style.DbtCloudRunJobTrigger"
    assert not (tmp_path / "imported").exists()


def test_operator_trigger_rule_applies_when_submitted_after_upstreams() -> None:
    op = DbtCloudRunJobOperator(task_id="t", job_id=1, trigger_rule="all_done")
    assert build_task(op, after=["up-1"]).trigger_rule == "all_done"
    assert build_task(op, after=["up-1"], trigger_rule="one_failed").trigger_rule == "one_failed"
    assert build_task(op).trigger_rule is None  # no upstreams: no rule
    plain = build_task(DeferBadTrigger(task_id="p", marker="m"), after=["up-1"])
    assert plain.trigger_rule == "all_success"
