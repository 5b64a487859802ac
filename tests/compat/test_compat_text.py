"""Text UTF-8 cannot hold (lone surrogates, as bytes decoded with surrogateescape give) in
an operator's log call or a trigger's error: never fails the task or loses the error."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest

from deferrun import Client, TaskState
from tests.cli.test_cli import _create_database
from tests.compat.test_compat_secrets import _stored_text
from tests.support.airflow_style import SurrogateText
from tests.support.processes import Proc, deferrun_env, wait_until

pytestmark = pytest.mark.e2e


def test_log_line_with_a_surrogate_is_escaped() -> None:
    from deferrun.process.tasklogs import _encode_line

    line = _encode_line({"event": "log \udcff line", "task_id": "t"})
    assert "udcff" in line and line.encode("utf-8")


@pytest.mark.slow
def test_surrogates_in_a_log_call_or_trigger_error(db_url: str, procs: Callable[..., Proc]) -> None:
    env = deferrun_env(db_url, DEFERRUN_IMPORTS="tests.support.airflow_style")
    anyio.run(_create_database, db_url)
    procs(["triggerer"], env)
    procs(["worker", "--slots", "2"], env)
    with Client(db_url) as client:
        logged = client.submit(SurrogateText(task_id="log", how="log", retries=1, retry_delay=0))
        raised = client.submit(SurrogateText(task_id="trig", how="defer"))
        log_info = client.wait(logged, timeout=60)
        trig_info = client.wait(raised, timeout=60)
    wait_until(
        lambda: "log \\\\udcff line" in _stored_text(db_url),
        20,
        message="the log line to be stored (escaped)",
    )
    assert log_info.state is TaskState.SUCCESS and log_info.result == {"try": 1}, log_info
    assert trig_info.state is TaskState.FAILED, trig_info
    error = trig_info.error or ""
    assert "internal error" not in error, error
    assert "boom \\udcff from the trigger" in error and "Traceback" in error, error
