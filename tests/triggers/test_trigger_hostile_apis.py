"""Built-in triggers and sensors against hostile APIs and hostile arguments.

Each test reproduces a break a hostile tester found: credentials sent to another host, Retry-After
ignored, busy polling, SQL misconfiguration retried forever, huge bodies silently truncated.
Real aiohttp servers and PostgreSQL on 127.0.0.1; no mocks.
"""

from __future__ import annotations

import base64
import itertools
import math
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

from deferrun import TaskState
from deferrun.core.basetrigger import BaseTrigger, PollingTrigger, TriggerEvent
from deferrun.exceptions import ConfigError, TransientError, TriggerFailed
from deferrun.sensors import (
    DateTimeSensor,
    FileSensor,
    HttpSensor,
    JobRunSensor,
    S3KeySensor,
    SqlSensor,
    TimeDeltaSensor,
)
from deferrun.store import Store
from deferrun.testing import arun_trigger
from tests.support.pgcluster import free_port
from tests.support.runtime import runtime_for
from tests.support.services import HostileApi
from triggers.file import FileTrigger
from triggers.http import HttpTrigger, ResponseTooLarge, parse_retry_after, request
from triggers.job import GlueJobRunTrigger, JobStatusTrigger
from triggers.s3 import S3KeyTrigger
from triggers.sql import SqlTrigger

PASSWORD = "Hush-S3CRET-pw"
TOKEN = base64.b64encode(f"login:{PASSWORD}".encode()).decode()


@pytest.fixture(scope="module")
def home() -> Iterator[HostileApi]:
    """The host the connection names."""
    api = HostileApi()
    api.start()
    yield api
    api.stop()


@pytest.fixture(scope="module")
def other() -> Iterator[HostileApi]:
    """Another host, which must never see the connection's credentials."""
    api = HostileApi()
    api.start()
    yield api
    api.stop()


@pytest.fixture
def conn(home: HostileApi, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(
        "DEFERRUN_CONN_HOSTILE", f"http://login:{PASSWORD}@127.0.0.1:{home.port}/api/v1"
    )
    return "hostile"


def no_secret(text: str) -> None:
    assert PASSWORD not in text and TOKEN not in text, text


def gaps(hits: list[Any]) -> list[float]:
    return [b.at - a.at for a, b in itertools.pairwise(hits)]


# --------------------------------------------------------------------------- 1. credentials


def hostile_endpoints(other_port: int) -> list[str]:
    return [
        f"http://127.0.0.1:{other_port}/steal",
        f"HTTPS://127.0.0.1:{other_port}/steal",
        f"//127.0.0.1:{other_port}/steal",
        "../../steal3",
        "status/../../../steal",
        "a/%2e%2e/%2E%2E/steal",
        "a/%252e%252e/steal",
        "a\\..\\..\\steal",
        "..;/steal",
        "ok\r\nX-Injected: 1",
    ]


def builders(conn_id: str) -> list[Callable[[str], object]]:
    return [
        lambda e: HttpTrigger(endpoint=e, http_conn_id=conn_id),
        lambda e: JobStatusTrigger(status_endpoint=e, http_conn_id=conn_id),
        lambda e: HttpSensor(task_id="s", endpoint=e, http_conn_id=conn_id),
        lambda e: JobRunSensor(task_id="s", status_endpoint=e, http_conn_id=conn_id),
    ]


def test_url_or_dotdot_endpoints_are_refused_at_construction(
    conn: str, home: HostileApi, other: HostileApi
) -> None:
    before = (len(home.hits), len(other.hits))
    for endpoint in hostile_endpoints(other.port):
        for build in builders(conn):
            with pytest.raises(ValueError, match="endpoint") as err:
                build(endpoint)
            message = str(err.value)
            assert "\n" not in message and (
                "URL" in message or ".." in message or "control" in message
            )
    assert (len(home.hits), len(other.hits)) == before


@pytest.mark.anyio
async def test_request_refuses_a_url_endpoint_before_sending(
    conn: str, home: HostileApi, other: HostileApi
) -> None:
    """The shared request() (RunJobOperator's submit uses it) checks too, not only __init__."""
    before = (len(home.hits), len(other.hits))
    for endpoint in hostile_endpoints(other.port):
        with pytest.raises(ValueError):
            await request(conn, "POST", endpoint, None, {"x": 1}, "submit")
    assert (len(home.hits), len(other.hits)) == before


@pytest.mark.anyio
async def test_forged_trigger_row_with_a_url_fails_at_once_and_sends_nothing(
    conn: str, home: HostileApi, other: HostileApi
) -> None:
    """A stored row is rebuilt with cls(**kwargs), so a forged endpoint fails the load."""
    trigger = HttpTrigger(endpoint="ok", http_conn_id=conn, poll_interval=0.05)
    trigger._init_kwargs["endpoint"] = f"http://127.0.0.1:{other.port}/steal"
    started = time.monotonic()
    with pytest.raises((TriggerFailed, ValueError), match="is a URL, not a path"):
        await arun_trigger(trigger, timeout=10)
    assert time.monotonic() - started < 5
    assert other.hits == []
    assert not home.paths("/steal")


@pytest.mark.anyio
async def test_relative_endpoints_join_below_the_base_path(conn: str, home: HostileApi) -> None:
    """base + "/" + endpoint, as Airflow's HttpHook does; credentials go to the home host."""
    for endpoint, expected in [
        ("ok", "/api/v1/ok"),
        ("/ok", "/api/v1/ok"),
        ("ok?x=../..&y=http://z", "/api/v1/ok?x=../..&y=http://z"),
        ("./ok", "/api/v1/ok"),
    ]:
        start = len(home.hits)
        event = await arun_trigger(HttpTrigger(endpoint=endpoint, http_conn_id=conn), timeout=10)
        assert event.payload["status"] == 200
        hit = home.hits[start]
        assert hit.path_qs == expected
        assert hit.authorization == f"Basic {TOKEN}"


@pytest.mark.anyio
async def test_redirects_are_not_followed_to_another_host(
    conn: str, home: HostileApi, other: HostileApi
) -> None:
    target = f"http://127.0.0.1:{other.port}/steal"
    with pytest.raises(RuntimeError, match="redirect") as err:
        await arun_trigger(HttpTrigger(endpoint=f"redirect?to={target}", http_conn_id=conn), 10)
    no_secret(str(err.value))
    assert not other.paths("/steal")


@pytest.mark.anyio
async def test_no_secret_in_errors_even_when_the_server_echoes_it(conn: str) -> None:
    with pytest.raises(PermissionError, match="HTTP 401") as err:
        await arun_trigger(HttpTrigger(endpoint="echo401", http_conn_id=conn), timeout=10)
    no_secret(str(err.value))
    with pytest.raises(PermissionError, match="HTTP 401") as err:
        await arun_trigger(JobStatusTrigger(status_endpoint="echo401", http_conn_id=conn), 10)
    no_secret(str(err.value))


# --------------------------------------------------------------------------- 2. Retry-After


def test_parse_retry_after() -> None:
    from email.utils import formatdate

    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-5") is None
    ahead = parse_retry_after(formatdate(time.time() + 30, usegmt=True))
    assert ahead is not None and 28 <= ahead <= 31
    assert parse_retry_after(formatdate(time.time() - 30, usegmt=True)) == 0.0


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize(
    ("route", "floor"), [("429?ra=1", 1.0), ("503?ra=1", 1.0), ("429?ra=date:3", 1.9)]
)
async def test_retry_after_is_a_floor_between_requests(
    conn: str, home: HostileApi, route: str, floor: float
) -> None:
    """Was: 429 polled every poll_interval regardless of Retry-After (150 requests in 75 s)."""
    route = f"{uuid.uuid4().hex}/{route}&times=2"
    trigger = HttpTrigger(endpoint=route, http_conn_id=conn, poll_interval=0.05)
    event = await arun_trigger(trigger, timeout=20)
    assert event.payload["body"]["status"] == "SUCCESS"
    hits = home.paths("/" + route.split("?")[0])
    assert len(hits) == 3
    assert all(g >= floor for g in gaps(hits)), gaps(hits)


@pytest.mark.anyio
async def test_job_status_trigger_honours_retry_after(conn: str, home: HostileApi) -> None:
    run = uuid.uuid4().hex
    trigger = JobStatusTrigger(
        status_endpoint=f"jobs/{run}/429?ra=1&times=1", http_conn_id=conn, poll_interval=0.05
    )
    event = await arun_trigger(trigger, timeout=20)
    assert event.payload["status"] == "success"
    hits = home.paths(f"/jobs/{run}/429")
    assert len(hits) == 2
    assert gaps(hits)[0] >= 1.0


@pytest.mark.anyio
async def test_429_without_retry_after_backs_off_exponentially(conn: str, home: HostileApi) -> None:
    run = uuid.uuid4().hex
    trigger = HttpTrigger(endpoint=f"{run}/429?times=4", http_conn_id=conn, poll_interval=0.05)
    await arun_trigger(trigger, timeout=20)
    hits = home.paths(f"/{run}/429")
    assert len(hits) == 5
    g = gaps(hits)
    # 0.1, 0.2, 0.4, 0.8 s (+-10 %); a flat 0.05 s poll (the old behaviour) fails this
    assert g[0] >= 0.085 and g[3] >= 0.7 and g[3] > 3 * g[0], g


def test_retry_after_is_capped_at_max_backoff() -> None:
    trigger = HttpTrigger(endpoint="ok", poll_interval=1.0)
    assert 300.0 <= trigger.retry_delay(1, 10_000.0) <= 330.0
    assert 50.0 <= trigger.retry_delay(1, 50.0) <= 55.0
    assert 1.8 <= trigger.retry_delay(1, None) <= 2.2
    assert 1.8 <= trigger.retry_delay(1, 0.5) <= 2.2  # backoff already longer than asked
    assert 1.8 <= trigger.retry_delay(1, math.nan) <= 2.2


# --------------------------------------------------------------------------- 3. intervals

BAD_INTERVALS = [0, 0.0, -1, 0.001, math.nan, math.inf, True, "5", None]


@pytest.mark.parametrize("value", BAD_INTERVALS, ids=repr)
def test_triggers_refuse_busy_or_absurd_poll_intervals(value: Any) -> None:
    builds: list[Callable[[], BaseTrigger]] = [
        lambda: HttpTrigger(endpoint="x", poll_interval=value),
        lambda: JobStatusTrigger(status_endpoint="x", http_conn_id="c", poll_interval=value),
        lambda: SqlTrigger(sql="SELECT 1", poll_interval=value),
        lambda: S3KeyTrigger(bucket_name="b", bucket_key="k", poll_interval=value),
        lambda: GlueJobRunTrigger(job_name="j", run_id="r", poll_interval=value),
        lambda: FileTrigger(filepath="/tmp/x", poll_interval=value),
    ]
    for build in builds:
        with pytest.raises(ValueError, match="poll_interval must be"):
            build()


@pytest.mark.parametrize("value", [0, 0.0, 0.001, math.nan, math.inf, timedelta(0)], ids=repr)
def test_builtin_sensors_refuse_busy_poke_intervals(value: Any) -> None:
    """Was: HttpSensor(poke_interval=0) made 10,485 requests in 5 s."""
    common = {"task_id": "s", "poke_interval": value}
    builds: list[Callable[[], object]] = [
        lambda: HttpSensor(endpoint="x", **common),
        lambda: JobRunSensor(status_endpoint="x", http_conn_id="c", **common),
        lambda: SqlSensor(sql="SELECT 1", **common),
        lambda: S3KeySensor(bucket_name="b", bucket_key="k", **common),
        lambda: FileSensor(filepath="/tmp/x", **common),
        lambda: DateTimeSensor(target_time="2030-01-01T00:00:00+00:00", **common),
        lambda: TimeDeltaSensor(delta=1, **common),
    ]
    for build in builds:
        with pytest.raises(ValueError, match="poke_interval must be"):
            build()
    HttpSensor(endpoint="x", task_id="s", poke_interval=0.01)  # the minimum is accepted


class ZeroIntervalTrigger(PollingTrigger):
    poll_interval = 0.0

    async def poll(self) -> TriggerEvent | None:
        return None


@pytest.mark.anyio
async def test_polling_trigger_run_refuses_a_zero_interval_subclass() -> None:
    with pytest.raises(ValueError, match="poll_interval must be"):
        async for _ in ZeroIntervalTrigger().run():
            break


# --------------------------------------------------------------------------- 4. SQL config


@dataclass
class PgConns:
    """Defines DEFERRUN_CONN_<ID> URIs for the password-checked role, with extra options."""

    pg_url: str
    user: str
    password: str
    monkeypatch: pytest.MonkeyPatch

    def define(self, conn_id: str, query: str) -> str:
        authed = self.pg_url.replace("postgres@", f"{self.user}:{self.password}@")
        self.monkeypatch.setenv(f"DEFERRUN_CONN_{conn_id.upper()}", f"{authed}?{query}")
        return conn_id


@pytest.fixture
def pg_conns(pg_url: str, pg_app_user: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> PgConns:
    return PgConns(pg_url, *pg_app_user, monkeypatch)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("query", "match"),
    [
        ("sslmode=bogus", "sslmode"),
        ("target_session_attrs=nonsense", "target_session_attrs"),
        ("sslmode=verify-full&sslrootcert=/nonexistent/root.crt", "misconfigured"),
    ],
)
async def test_sql_configuration_errors_fail_at_once(
    pg_conns: PgConns, query: str, match: str
) -> None:
    """Was: asyncpg's ClientConfigurationError retried as transient until the timeout."""
    conn_id = pg_conns.define("pg_misconf", query)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=match) as err:
        await arun_trigger(SqlTrigger(sql="SELECT 1", conn_id=conn_id, poll_interval=0.05), 20)
    assert time.monotonic() - started < 10
    assert "\n" not in str(err.value) and pg_conns.password not in str(err.value)


@pytest.mark.anyio
async def test_sql_password_in_query_string_never_shows(
    pg_conns: PgConns, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = pg_conns.pg_url.replace("postgres@", "")
    monkeypatch.setenv(
        "DEFERRUN_CONN_PG_QS", f"{base}?user=deferrun_app&password={PASSWORD}&sslmode=bogus"
    )
    with pytest.raises(ConfigError) as err:
        await arun_trigger(SqlTrigger(sql="SELECT 1", conn_id="pg_qs"), 20)
    no_secret(str(err.value))


@pytest.mark.anyio
async def test_sql_bad_parameter_fails_and_refused_connection_is_transient(
    pg_conns: PgConns, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn_id = pg_conns.define("pg_ok", "application_name=x")
    with pytest.raises(RuntimeError, match="invalid input for query argument"):
        await arun_trigger(
            SqlTrigger(sql="SELECT $1::int > 0", conn_id=conn_id, parameters=["not-an-int"]), 20
        )
    monkeypatch.setenv(
        "DEFERRUN_CONN_PG_DOWN", f"postgresql://u:{PASSWORD}@127.0.0.1:{free_port()}/x"
    )
    with pytest.raises(TransientError) as err:
        await SqlTrigger(sql="SELECT 1", conn_id="pg_down").poll()
    no_secret(str(err.value))
    from deferrun.connections.cache import close_loop_clients

    await close_loop_clients()


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["poke", "deferrable"])
async def test_sql_sensor_with_bad_sslmode_fails_the_task_quickly(
    store: Store, pg_conns: PgConns, mode: str
) -> None:
    """Both backends: the task fails long before its sensor timeout, with the reason."""
    conn_id = pg_conns.define("pg_bogus", "sslmode=bogus")
    started = time.monotonic()
    async with runtime_for(store, slots=1) as rt:
        task_id = await rt.client.submit(
            SqlSensor(sql="SELECT 1", conn_id=conn_id, mode=mode, poke_interval=0.05, timeout=120)
        )
        info = await rt.client.wait(task_id, timeout=30)
    assert info.state is TaskState.FAILED
    assert "sslmode" in (info.error or "")
    assert pg_conns.password not in (info.error or "")
    assert time.monotonic() - started < 30


# --------------------------------------------------------------------------- 5. body size


@pytest.mark.anyio
@pytest.mark.parametrize("route", ["big?n=5000000", "stream?n=2000000"])
async def test_a_body_over_the_limit_fails_instead_of_being_truncated(
    conn: str, route: str
) -> None:
    """Was: a 5 MB JSON body fired as a success with a ~64 KB truncated string."""
    with pytest.raises(ResponseTooLarge, match="max_body_bytes=1,000,000") as err:
        await arun_trigger(HttpTrigger(endpoint=route, http_conn_id=conn), timeout=20)
    assert "\n" not in str(err.value)
    with pytest.raises(ResponseTooLarge, match="max_body_bytes=1,000,000"):
        await arun_trigger(JobStatusTrigger(status_endpoint=route, http_conn_id=conn), 20)


@pytest.mark.anyio
async def test_bodies_under_the_limit_arrive_whole(conn: str) -> None:
    event = await arun_trigger(HttpTrigger(endpoint="stream?n=300000", http_conn_id=conn), 20)
    assert event.payload["body"] == {"pad": "x" * 300_000}  # parsed JSON, not a cut string
    event = await arun_trigger(
        HttpTrigger(endpoint="text?n=500", http_conn_id=conn, max_body_bytes=1000), 20
    )
    assert event.payload["body"] == "t" * 500
    with pytest.raises(ResponseTooLarge, match="max_body_bytes=1,000 "):
        await arun_trigger(
            HttpTrigger(endpoint="text?n=2000", http_conn_id=conn, max_body_bytes=1000), 20
        )
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match="max_body_bytes"):
            HttpTrigger(endpoint="ok", max_body_bytes=bad)


@pytest.mark.anyio
async def test_http_sensor_with_a_huge_body_fails_the_task(
    store: Store, conn: str, home: HostileApi
) -> None:
    """Both backends: the size error reaches the task instead of a truncated success."""
    async with runtime_for(store, slots=1) as rt:
        task_id = await rt.client.submit(
            HttpSensor(
                endpoint="big?n=3000000",
                http_conn_id=conn,
                mode="deferrable",
                poke_interval=0.05,
                timeout=60,
            )
        )
        info = await rt.client.wait(task_id, timeout=30)
    assert info.state is TaskState.FAILED
    assert "max_body_bytes=1,000,000" in (info.error or "")
    no_secret(info.error or "")
