"""Built-in triggers against real servers on loopback: moto (S3, Glue), aiohttp, PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import date

import anyio
import anyio.to_thread
import pytest

from deferrun.connections.cache import loop_client_cache
from deferrun.connections.redaction import redact
from deferrun.connections.uri import Connection
from deferrun.exceptions import TransientError
from deferrun.testing import arun_trigger
from tests.support.services import FakeServices, Moto
from triggers.http import HttpTrigger
from triggers.job import GlueJobRunTrigger, JobStatusTrigger
from triggers.s3 import S3KeyTrigger, literal_prefix
from triggers.sql import SqlTrigger

pytestmark = pytest.mark.anyio


@pytest.fixture
def api(services: FakeServices, monkeypatch: pytest.MonkeyPatch) -> FakeServices:
    monkeypatch.setenv("DEFERRUN_CONN_HTTP_DEFAULT", services.uri())
    monkeypatch.setenv("DEFERRUN_CONN_JOBS", services.uri())
    return services


def post_json(url: str, body: dict[str, object]) -> None:
    import json
    import urllib.request

    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert 200 <= resp.status < 300


async def put_later(aws: Moto, bucket: str, keys: list[str], delay: float) -> None:
    await anyio.sleep(delay)
    s3 = aws.boto("s3")
    for key in keys:
        await anyio.to_thread.run_sync(lambda k=key: s3.put_object(Bucket=bucket, Key=k, Body=b"x"))


# --------------------------------------------------------------------------- connections


def test_connection_uris_parse_and_never_show_secrets() -> None:
    conn = Connection.from_uri(
        "aws_x",
        "aws://AKIA%2FX:se%2Bcret%2Fkey@?region_name=eu-west-1"
        "&endpoint_url=http%3A%2F%2F127.0.0.1%3A9",
    )
    assert (conn.login, conn.password) == ("AKIA/X", "se+cret/key")
    assert conn.extra == {"region_name": "eu-west-1", "endpoint_url": "http://127.0.0.1:9"}
    assert "se+cret" not in repr(conn) and "se+cret" not in str(conn)
    assert redact("boom: se+cret/key and se%2Bcret%2Fkey") == "boom: *** and ***"
    http = Connection.from_uri("h", "https://me:pw-123@example.test:8443/api/v2")
    assert http.base_url == "https://example.test:8443/api/v2"
    pg = Connection.from_uri("p", "postgresql://u:p%40ss@127.0.0.1:5432/db")
    assert pg.dsn() == "postgresql://u:p%40ss@127.0.0.1:5432/db"


# --------------------------------------------------------------------------- S3


def test_literal_prefix() -> None:
    assert literal_prefix("data/2026-*/part-?.csv") == "data/2026-"
    assert literal_prefix("exact/key.csv") == "exact/key.csv"
    assert literal_prefix("[ab]/x") == ""


async def test_s3_fires_when_the_key_appears(aws: Moto, bucket: str) -> None:
    trigger = S3KeyTrigger(bucket_name=bucket, bucket_key="in/data.csv", poll_interval=0.1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(put_later, aws, bucket, ["in/data.csv"], 0.5)
        event = await arun_trigger(trigger, timeout=15)
    assert event.payload == {"status": "success", "keys": ["in/data.csv"]}


async def test_s3_keeps_waiting_while_absent(aws: Moto, bucket: str) -> None:
    trigger = S3KeyTrigger(bucket_name=bucket, bucket_key=["a.csv", "b.csv"], poll_interval=0.1)
    await put_later(aws, bucket, ["a.csv"], 0)  # one of two is not enough
    with pytest.raises(TimeoutError):
        await arun_trigger(trigger, timeout=1.0)


@pytest.mark.slow
async def test_s3_wildcard_across_pages(aws: Moto, bucket: str) -> None:
    s3 = aws.boto("s3")

    def fill() -> None:
        for i in range(1100):  # more than one page of list_objects_v2
            s3.put_object(Bucket=bucket, Key=f"logs/2026-01-01/noise-{i:04d}.txt", Body=b"")

    await anyio.to_thread.run_sync(fill)
    trigger = S3KeyTrigger(
        bucket_name=bucket,
        bucket_key="logs/2026-*/part-*.parquet",
        wildcard_match=True,
        poll_interval=0.1,
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(
            put_later,
            aws,
            bucket,
            ["logs/2026-01-01/part-0.parquet", "logs/2026-01-02/part-1.parquet"],
            0.3,
        )
        event = await arun_trigger(trigger, timeout=30)
    assert event.payload["keys"] in (
        ["logs/2026-01-01/part-0.parquet"],
        ["logs/2026-01-01/part-0.parquet", "logs/2026-01-02/part-1.parquet"],
    )


async def test_s3_url_key_and_missing_bucket(aws: Moto, bucket: str) -> None:
    await put_later(aws, bucket, ["k"], 0)
    event = await arun_trigger(
        S3KeyTrigger(bucket_name=None, bucket_key=f"s3://{bucket}/k"), timeout=10
    )
    assert event.payload["keys"] == ["k"]
    with pytest.raises(FileNotFoundError, match="bucket 'no-such-bucket-x' does not exist"):
        await arun_trigger(S3KeyTrigger(bucket_name="no-such-bucket-x", bucket_key="k"), timeout=10)


async def test_s3_bad_credentials_fail_clearly(
    moto: Moto, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEFERRUN_CONN_AWS_BAD", moto.uri(key="AKIAWRONGKEY000", secret="nope-x"))
    with pytest.raises(
        PermissionError, match=r"InvalidClientTokenId|InvalidAccessKeyId|403"
    ) as err:
        await arun_trigger(
            S3KeyTrigger(bucket_name=bucket, bucket_key="k", aws_conn_id="aws_bad"), timeout=10
        )
    assert "credentials" in str(err.value)


async def test_one_s3_client_for_many_triggers(aws: Moto, bucket: str) -> None:
    await put_later(aws, bucket, [f"k{i}" for i in range(50)], 0)
    triggers = [S3KeyTrigger(bucket_name=bucket, bucket_key=f"k{i}") for i in range(50)]
    events = []

    async def one(t: S3KeyTrigger) -> None:
        event = await t.poll()
        events.append(event)

    async with anyio.create_task_group() as tg:
        for t in triggers:
            tg.start_soon(one, t)
    assert len(events) == 50 and all(e is not None for e in events)
    assert loop_client_cache().created == {
        ("aws:s3", "aws_default"): 1,
        ("s3-bucket", f"aws_default/{bucket}"): 1,
    }


# --------------------------------------------------------------------------- HTTP


async def test_http_404_means_not_yet_then_fires(api: FakeServices) -> None:
    name = uuid.uuid4().hex

    async def ready_later() -> None:
        await anyio.sleep(0.5)
        api.ready[name] = {"state": "ready"}

    trigger = HttpTrigger(endpoint=f"health/{name}", poll_interval=0.1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(ready_later)
        event = await arun_trigger(trigger, timeout=10)
    assert event.payload == {"status": 200, "body": {"name": name, "state": "ready"}}
    assert api.requests[f"/health/{name}"] >= 3


async def test_http_json_check(api: FakeServices) -> None:
    name = uuid.uuid4().hex
    api.ready[name] = {"state": "warming"}
    trigger = HttpTrigger(
        endpoint=f"health/{name}",
        poll_interval=0.1,
        response_check={"field": "state", "in": ["ready", "done"]},
    )

    async def flip() -> None:
        await anyio.sleep(0.4)
        api.ready[name] = {"state": "done"}

    async with anyio.create_task_group() as tg:
        tg.start_soon(flip)
        event = await arun_trigger(trigger, timeout=10)
    assert event.payload["body"]["state"] == "done"


async def test_http_5xx_is_retried_with_backoff(api: FakeServices) -> None:
    name = uuid.uuid4().hex
    api.flaky_failures[name] = 3
    trigger = HttpTrigger(endpoint=f"flaky/{name}", poll_interval=0.02)
    event = await arun_trigger(trigger, timeout=10)
    assert event.payload["body"] == {"ok": True, "name": name}
    assert api.requests[f"/flaky/{name}"] == 4


async def test_http_auth_failure_is_permanent(
    services: FakeServices, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEFERRUN_CONN_HTTP_BAD", services.uri(password="wrong-pass-9"))
    with pytest.raises(PermissionError, match="HTTP 401 unauthorized") as err:
        await arun_trigger(HttpTrigger(endpoint="health/x", http_conn_id="http_bad"), timeout=10)
    assert "wrong-pass-9" not in str(err.value)


async def test_http_other_4xx_fails_and_slow_response_is_transient(
    api: FakeServices, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(RuntimeError, match="HTTP 400"):
        await arun_trigger(HttpTrigger(endpoint="bad-request"), timeout=10)
    monkeypatch.setattr("deferrun.connections.clients.HTTP_TIMEOUT", 0.3)
    from deferrun.connections.cache import close_loop_clients

    await close_loop_clients()
    with pytest.raises(TransientError, match="Timeout"):
        await HttpTrigger(endpoint="slow?seconds=2").poll()
    await close_loop_clients()


async def test_unknown_connection_says_what_to_set() -> None:
    from deferrun.exceptions import ConfigError

    with pytest.raises(ConfigError, match="set DEFERRUN_CONN_NOPE_CONN"):
        await arun_trigger(HttpTrigger(endpoint="x", http_conn_id="nope-conn"), timeout=5)


# --------------------------------------------------------------------------- SQL


@pytest.fixture
def sql_conn(pg_url: str, pg_app_user: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    user, password = pg_app_user
    dbname = pg_url.rsplit("/", 1)[1]
    uri = pg_url.replace("postgres@", f"{user}:{password}@")
    monkeypatch.setenv("DEFERRUN_CONN_POSTGRES_DEFAULT", uri)

    async def grant() -> None:
        import asyncpg

        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute("CREATE TABLE loads (day date PRIMARY KEY, done boolean)")
            await conn.execute(f"GRANT ALL ON loads TO {user}")
            await conn.execute(f'GRANT CONNECT ON DATABASE "{dbname}" TO {user}')
        finally:
            await conn.close()

    anyio.run(grant)
    return pg_url


async def test_sql_fires_when_truthy_with_bound_parameters(sql_conn: str) -> None:
    import asyncpg

    trigger = SqlTrigger(
        sql="SELECT done, day FROM loads WHERE day = $1::date",
        parameters=[date(2026, 11, 20)],
        poll_interval=0.1,
    )

    async def load_later() -> None:
        await anyio.sleep(0.3)
        conn = await asyncpg.connect(sql_conn)
        await conn.execute("INSERT INTO loads VALUES ('2026-11-20', false)")
        await anyio.sleep(0.3)
        await conn.execute("UPDATE loads SET done = true")
        await conn.close()

    async with anyio.create_task_group() as tg:
        tg.start_soon(load_later)
        event = await arun_trigger(trigger, timeout=10)
    assert event.payload["done"] is True
    assert str(event.payload["day"]) == "2026-11-20"


async def test_sql_parameters_are_never_formatted_into_sql(sql_conn: str) -> None:
    hostile = "x'; DROP TABLE loads; --"
    trigger = SqlTrigger(
        sql="SELECT count(*) = 0 FROM loads WHERE day::text = $1", parameters=[hostile]
    )
    event = await arun_trigger(trigger, timeout=10)
    assert event.payload == {"?column?": True}
    event = await arun_trigger(SqlTrigger(sql="SELECT to_regclass('loads') IS NOT NULL"), 10)
    assert event.payload == {"?column?": True}  # the table is still there


async def test_sql_error_and_bad_password(
    sql_conn: str, pg_app_user: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(RuntimeError, match='relation "no_such_table" does not exist'):
        await arun_trigger(SqlTrigger(sql="SELECT 1 FROM no_such_table"), timeout=10)
    user, password = pg_app_user
    monkeypatch.setenv(
        "DEFERRUN_CONN_PG_BAD", sql_conn.replace("postgres@", f"{user}:wrong-{password}@")
    )
    with pytest.raises(PermissionError, match="refused by the database") as err:
        await arun_trigger(SqlTrigger(sql="SELECT 1", conn_id="pg_bad"), timeout=10)
    assert password not in str(err.value)


# --------------------------------------------------------------------------- jobs


async def test_job_status_success_and_failure(api: FakeServices) -> None:
    from tests.support import services

    api.runs["run-ok-1"] = services.Run(id="run-ok-1", outcome="success", polls_to_finish=2)
    api.runs["run-bad-1"] = services.Run(id="run-bad-1", outcome="failed", polls_to_finish=1)
    common = {"http_conn_id": "jobs", "status_field": "state.life_cycle", "poll_interval": 0.05}
    good = await arun_trigger(
        JobStatusTrigger(status_endpoint="api/runs/run-ok-1", **common), timeout=10
    )
    bad = await arun_trigger(
        JobStatusTrigger(status_endpoint="api/runs/run-bad-1", **common), timeout=10
    )
    assert good.payload["status"] == "success" and good.payload["state"] == "SUCCESS"
    assert bad.payload["status"] == "failed"
    assert bad.payload["body"]["error"] == "division by zero in model orders"


async def test_job_unknown_run_fails_after_grace(api: FakeServices) -> None:
    trigger = JobStatusTrigger(
        status_endpoint="api/runs/run-missing",
        http_conn_id="jobs",
        poll_interval=0.05,
        not_found_grace=0.3,
    )
    with pytest.raises(LookupError, match="not found"):
        await arun_trigger(trigger, timeout=10)


async def test_glue_job_run_trigger(aws: Moto) -> None:
    glue = aws.boto("glue")
    glue.create_job(
        Name="nightly-etl",
        Role="arn:aws:iam::123456789012:role/glue",
        Command={"Name": "glueetl", "ScriptLocation": "s3://scripts/etl.py"},
    )
    post_json(
        f"{aws.endpoint}/moto-api/state-manager/set-transition",
        {"model_name": "glue::job_run", "transition": {"progression": "manual", "times": 2}},
    )
    run_id = glue.start_job_run(JobName="nightly-etl")["JobRunId"]
    event = await arun_trigger(
        GlueJobRunTrigger(job_name="nightly-etl", run_id=run_id, poll_interval=0.05), timeout=15
    )
    assert event.payload["status"] == "success"
    assert event.payload["state"] == "SUCCEEDED" and event.payload["body"]["Id"] == run_id
