"""HTTP token/bearer auth + headers, and DbtCloudRunJobOperator against a dbt Cloud-shaped API."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest

from deferrun import Client, TaskState
from deferrun.connections.clients import http_headers
from deferrun.connections.redaction import redact
from deferrun.connections.uri import Connection
from deferrun.operators import DbtCloudRunJobOperator, RunJobOperator
from deferrun.store import Store
from deferrun.testing import arun_trigger
from tests.support.dbt_cloud import ACCOUNT, DBT_TOKEN, DbtRun, FakeDbtCloud
from tests.support.processes import Proc, deferrun_env, wait_until
from tests.support.runtime import runtime_for
from triggers.http import HttpTrigger

pytestmark = pytest.mark.anyio


@pytest.fixture
def dbt_conn(dbt: FakeDbtCloud, monkeypatch: pytest.MonkeyPatch) -> FakeDbtCloud:
    dbt.throttle_polls = dbt.throttle_submits = dbt.throttle_cancels = dbt.fail_submits = 0
    dbt.retry_after = 1
    monkeypatch.setenv("DEFERRUN_CONN_DBT_CLOUD_DEFAULT", dbt.uri())
    return dbt


def run_path(run_id: int) -> str:
    return f"api/v2/accounts/{ACCOUNT}/runs/{run_id}/"


# --------------------------------------------------------------------------- connections


def test_auth_schemes_and_extra_headers() -> None:
    def headers(uri: str) -> dict[str, str]:
        return http_headers(Connection.from_uri("c", uri))

    assert headers("https://acct:tok-123@h?auth=token") == {"Authorization": "Token tok-123"}
    assert headers("https://acct:tok-123@h?auth=bearer") == {"Authorization": "Bearer tok-123"}
    assert headers("https://u:p-w@h")["Authorization"].startswith("Basic ")
    assert headers("https://u:p-w@h?auth=basic")["Authorization"].startswith("Basic ")
    assert headers("https://h?header.X-Team=data&header.X-Api-Key=k-9876") == {
        "X-Team": "data",
        "X-Api-Key": "k-9876",
    }
    assert redact("key k-9876 sent") == "key *** sent"  # a secret-looking header is redacted
    with pytest.raises(Exception, match="auth='digest' is not supported"):
        headers("https://a:b@h?auth=digest")
    with pytest.raises(Exception, match="uses auth=token but has no password"):
        headers("https://acct@h?auth=token")


async def test_token_auth_and_headers_reach_the_server(
    dbt: FakeDbtCloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = dbt.runs.setdefault(1, DbtRun(1, 110, 10, 0))
    monkeypatch.setenv("DEFERRUN_CONN_TOK", dbt.uri(extra="header.X-Team=analytics"))
    trigger = HttpTrigger(
        endpoint=run_path(run.id), http_conn_id="tok", headers={"X-Req": "1"}, poll_interval=0.05
    )
    event = await arun_trigger(trigger, timeout=10)
    assert event.payload["status"] == 200
    assert dbt.seen_auth[-1] == "Token"
    assert dbt.seen_headers[-1]["X-Team"] == "analytics"
    assert dbt.seen_headers[-1]["X-Req"] == "1"


@pytest.mark.parametrize(
    ("auth", "named"),
    [(None, "sent Basic auth"), ("basic", "sent Basic auth"), ("bearer", "Bearer ***")],
)
async def test_401_names_the_scheme_sent(
    dbt: FakeDbtCloud, monkeypatch: pytest.MonkeyPatch, auth: str | None, named: str
) -> None:
    monkeypatch.setenv("DEFERRUN_CONN_WRONG", dbt.uri(auth=auth))
    trigger = HttpTrigger(endpoint=run_path(1), http_conn_id="wrong", poll_interval=0.05)
    with pytest.raises(PermissionError) as caught:
        await arun_trigger(trigger, timeout=10)
    assert "HTTP 401 unauthorized" in str(caught.value) and named in str(caught.value)
    assert DBT_TOKEN not in str(caught.value)


async def test_run_job_operator_with_token_auth(store: Store, dbt_conn: FakeDbtCloud) -> None:
    async with runtime_for(store) as rt:
        info = await rt.run_to_end(
            RunJobOperator(
                http_conn_id="dbt_cloud_default",
                submit_endpoint=f"api/v2/accounts/{ACCOUNT}/jobs/210/run/",
                submit_json={"cause": "generic"},
                status_endpoint=f"api/v2/accounts/{ACCOUNT}/runs/{{run_id}}/",
                run_id_field="data.id",
                status_field="data.status",
                success_states=["10"],
                failure_states=["20", "30"],
                poll_interval=0.05,
                headers={"X-Client": "deferrun-tests"},
            )
        )
    assert info.state is TaskState.SUCCESS, info.error
    assert info.result["data"]["status"] == 10
    assert dbt_conn.seen_headers[-1]["X-Client"] == "deferrun-tests"


# --------------------------------------------------------------------------- dbt Cloud operator


def op(job_id: int, **kwargs: object) -> DbtCloudRunJobOperator:
    return DbtCloudRunJobOperator(
        job_id=job_id, account_id=ACCOUNT, check_interval=0.05, timeout=30, **kwargs
    )


async def test_dbt_success_error_and_cancelled(store: Store, dbt_conn: FakeDbtCloud) -> None:
    seen = len(dbt_conn.seen_auth)
    async with runtime_for(store) as rt:
        ok = await rt.run_to_end(op(110, steps_override=["dbt build -s orders"], cause="ci"))
        error = await rt.run_to_end(op(120))
        cancelled = await rt.run_to_end(op(130))
    assert ok.state is TaskState.SUCCESS, ok.error
    assert ok.result["status"] == 10 and ok.result["status_humanized"] == "success"
    run = dbt_conn.runs[ok.result["run_id"]]
    assert (run.cause, run.steps) == ("ci", ["dbt build -s orders"])
    assert error.state is TaskState.FAILED
    assert "ended error (status 20): Database Error in model orders" in (error.error or "")
    assert "JobRunFailed" in (error.error or "") and "dbt Cloud run 7" in (error.error or "")
    assert cancelled.state is TaskState.FAILED and "ended cancelled" in (cancelled.error or "")
    assert set(dbt_conn.seen_auth[seen:]) == {"Token"}


@pytest.mark.slow
async def test_dbt_429_retry_after_is_honoured(store: Store, dbt_conn: FakeDbtCloud) -> None:
    dbt_conn.throttle_submits, dbt_conn.throttle_polls, dbt_conn.retry_after = 1, 1, 1
    submits, polls = len(dbt_conn.submit_times), len(dbt_conn.poll_times)
    async with runtime_for(store) as rt:
        info = await rt.run_to_end(op(110))
    assert info.state is TaskState.SUCCESS, info.error
    s = dbt_conn.submit_times[submits:]
    p = dbt_conn.poll_times[polls:]
    assert len(s) == 2 and s[1] - s[0] >= 0.95  # waited Retry-After, not check_interval
    assert p[1] - p[0] >= 0.95


async def test_cancelling_the_task_cancels_the_run(store: Store, dbt_conn: FakeDbtCloud) -> None:
    # a triggerer that misses heartbeats for 3/4 of dead_after treats a vanished trigger as
    # adopted, not cancelled: a generous dead_after keeps a loaded machine from looking paused
    async with runtime_for(store, reconcile_interval=0.2, dead_after=8.0) as rt:
        task_id = await rt.client.submit(op(199))  # a run that never ends by itself
        with anyio.fail_after(15):
            while (await rt.client.get(task_id)).state is not TaskState.DEFERRED:
                await anyio.sleep(0.05)
        run = max(dbt_conn.runs.values(), key=lambda r: r.id)
        # a cancel reaches the run only while a triggerer runs the trigger (README): wait
        # until it has polled the run once, not only until the trigger row is stored
        with anyio.fail_after(15):
            while run.polls == 0:
                await anyio.sleep(0.05)
        await rt.client.cancel(task_id)
        with anyio.fail_after(10):
            while run.cancels == 0:
                await anyio.sleep(0.05)
    assert run.cancels == 1 and run.status == 30


async def test_triggerer_restart_never_cancels_the_run(
    store: Store, dbt_conn: FakeDbtCloud
) -> None:
    async with runtime_for(store, reconcile_interval=0.2) as rt:
        task_id = await rt.client.submit(op(199))
        with anyio.fail_after(15):
            while (await rt.client.get(task_id)).state is not TaskState.DEFERRED:
                await anyio.sleep(0.05)
        run = max(dbt_conn.runs.values(), key=lambda r: r.id)
        polls = run.polls
        with anyio.fail_after(10):
            while run.polls == polls:  # the first triggerer polls it
                await anyio.sleep(0.05)
    # that runtime shut down (its triggerer cancelled the trigger); a new one takes over
    assert run.cancels == 0
    async with runtime_for(store, reconcile_interval=0.2) as rt:
        polls = run.polls
        with anyio.fail_after(10):
            while run.polls == polls:
                await anyio.sleep(0.05)
        run.outcome = 10  # now let it finish
        info = await rt.client.wait(task_id, timeout=15)
    assert info.state is TaskState.SUCCESS, info.error
    assert run.cancels == 0


async def test_a_5xx_on_submit_fails_without_starting_a_second_run(
    store: Store, dbt_conn: FakeDbtCloud
) -> None:
    """The submission POST is not idempotent: a 502 (the run was started behind it) is not
    retried; the task fails saying a run may have been started, naming the job."""
    dbt_conn.fail_submits = 1
    submits = len(dbt_conn.submit_times)
    async with runtime_for(store) as rt:
        info = await rt.run_to_end(op(110, retries=2))
    assert info.state is TaskState.FAILED
    assert "HTTP 502" in (info.error or "") and "job 110 may have been started" in (
        info.error or ""
    )
    assert len(dbt_conn.submit_times) - submits == 1  # no second POST, no duplicate run


async def test_a_null_run_id_fails_the_task(store: Store, dbt_conn: FakeDbtCloud) -> None:
    async with runtime_for(store) as rt:
        info = await rt.run_to_end(op(198))  # answers {"data": {"id": null}}
    assert info.state is TaskState.FAILED
    assert "no run id at data.id" in (info.error or ""), info.error


@pytest.mark.slow
async def test_a_throttled_cancel_is_retried(store: Store, dbt_conn: FakeDbtCloud) -> None:
    """dbt Cloud answers the cancel with 429 twice: it is retried after Retry-After until the
    run is cancelled (it used to be tried once and the run went on)."""
    dbt_conn.throttle_cancels = 2
    calls = dbt_conn.cancel_calls
    # a triggerer that misses heartbeats for 3/4 of dead_after treats a vanished trigger as
    # adopted, not cancelled: a generous dead_after keeps a loaded machine from looking paused
    async with runtime_for(store, reconcile_interval=0.2, dead_after=8.0) as rt:
        task_id = await rt.client.submit(op(199))  # a run that never ends by itself
        with anyio.fail_after(15):
            while (await rt.client.get(task_id)).state is not TaskState.DEFERRED:
                await anyio.sleep(0.05)
        run = max(dbt_conn.runs.values(), key=lambda r: r.id)
        await rt.client.cancel(task_id)
        with anyio.fail_after(15):
            while run.cancels == 0:
                await anyio.sleep(0.05)
    assert run.status == 30 and run.cancels == 1
    assert dbt_conn.cancel_calls - calls == 3


@pytest.mark.slow
def test_a_paused_triggerer_whose_trigger_was_adopted_never_cancels_the_run(
    db_url: str, dbt: FakeDbtCloud, procs: Callable[..., Proc]
) -> None:
    """Triggerer A is SIGSTOPped past dead_after, B adopts the dbt trigger, the user cancels
    the task (B cancels the run), then A resumes and finds the trigger gone with its task
    cancelled: A must not cancel the run a second time (the trigger was no longer its)."""
    import os
    import signal

    dbt.throttle_polls = dbt.throttle_submits = dbt.throttle_cancels = dbt.fail_submits = 0
    env = deferrun_env(db_url, dead_after="2")
    env["DEFERRUN_CONN_DBT_CLOUD_DEFAULT"] = dbt.uri()
    procs(["worker"], env)
    a = procs(["triggerer"], env)
    with Client(db_url) as client:
        task_id = client.submit(op(199))  # never ends until cancelled
        wait_until(lambda: len(client.triggers()) == 1, 20, message="deferred")
        owner = wait_until(lambda: client.triggers()[0].triggerer_id, 20, message="claimed")
        run = max(dbt.runs.values(), key=lambda r: r.id)
        wait_until(lambda: run.polls > 0, 20, message="A polls the run")
        os.kill(a.popen.pid, signal.SIGSTOP)
        try:
            procs(["triggerer"], env)
            wait_until(
                lambda: client.triggers()[0].triggerer_id not in (None, owner),
                30,
                message="B adopts the trigger",
            )
            client.cancel(task_id)
            wait_until(lambda: run.cancels == 1, 20, message="B cancels the run")
            run.status = 3  # dbt Cloud cancels asynchronously: A's next poll must not end it
        finally:
            os.kill(a.popen.pid, signal.SIGCONT)
        wait_until(
            lambda: "no longer assigned here" in a.output(), 30, message="A resumes, reconciles"
        )
        wait_until(
            lambda: "after a liveness gap" in a.output() or run.cancels > 1,
            10,
            message="A decides about the cancel",
        )
    assert run.cancels == 1, a.output()[-2000:]


def test_basic_auth_with_an_empty_login_and_short_passwords() -> None:
    """http://:pw@host sends Basic of ":pw" (as requests and aiohttp do) instead of nothing;
    a password too short to redact is sent, with a warning that it will not be redacted."""
    import base64

    from structlog.testing import capture_logs

    headers = http_headers(Connection.from_uri("c", "http://:pwSECRETel@127.0.0.1:1"))
    assert headers["Authorization"] == "Basic " + base64.b64encode(b":pwSECRETel").decode()
    assert redact(headers["Authorization"]) == "Basic ***"
    with capture_logs() as logs:
        short = http_headers(Connection.from_uri("c", "http://u:ab@127.0.0.1:1?auth=token"))
    assert short["Authorization"] == "Token ab"
    assert any("not redacted" in entry["event"] for entry in logs), logs
