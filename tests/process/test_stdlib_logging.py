"""Lines logged through the standard library's ``logging`` (as ported Airflow code does, with a
module-level ``logging.getLogger(__name__)``) get the same treatment as structlog's: the task's
and trigger's ids, the task's stored log, JSON rendering with ``--log-format json`` (an
exception as one field), and ``--log-level`` filtering - in a real process, on both backends."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from deferrun import TaskState
from deferrun.client import Client
from tests.support.processes import Proc, deferrun_env, wait_until
from tests.support.runtime import install_user_module

pytestmark = pytest.mark.e2e

USER_MODULE = """
import logging
from typing import Any

from deferrun import BaseOperator, BaseTrigger, TriggerEvent

log = logging.getLogger(__name__)


class StdlibTrigger(BaseTrigger):
    def __init__(self, lines: int = 3) -> None:
        self.lines = lines

    async def run(self):
        for i in range(self.lines):
            log.warning("stdlib trigger line %d", i)
        logging.getLogger("x").debug("stdlib trigger debug")  # below --log-level info
        try:
            raise ValueError("boom\\nsecond line")
        except ValueError:
            log.exception("stdlib trigger exception")
        yield TriggerEvent(self.lines)


class StdlibOperator(BaseOperator):
    def execute(self, context: Any) -> Any:
        logging.getLogger("x").warning("stdlib operator line %d", 1)
        self.defer(trigger=StdlibTrigger(), method_name="resume")

    def resume(self, context: Any, event: Any = None) -> Any:
        log.info("stdlib operator resumed with %s", event)
        return event
"""


def _stored(task_id: str, env: dict[str, str]) -> list[dict[str, object]]:
    done = subprocess.run(
        [sys.executable, "-m", "deferrun", "logs", task_id, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


@pytest.mark.slow
def test_stdlib_logging_carries_ids_reaches_task_log_and_renders_json(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, procs: Callable[..., Proc]
) -> None:
    moddir = install_user_module(tmp_path, monkeypatch, "stdlib_ops", USER_MODULE)
    from stdlib_ops import StdlibOperator  # type: ignore[import-not-found]

    env = deferrun_env(db_url, moddir, DEFERRUN_IMPORTS="tests.support,stdlib_ops")
    proc = procs(["standalone", "--log-level", "info"], env)
    with Client(db_url) as client:
        task_id = client.submit(StdlibOperator())
        info = client.wait(task_id, timeout=30)
    assert info.state is TaskState.SUCCESS, info.error

    wanted = ("stdlib operator line 1", "stdlib trigger line 2", "stdlib operator resumed with 3")
    wait_until(
        lambda: all(any(e.get("event") == w for e in _stored(task_id, env)) for w in wanted),
        15,
        message="the standard library's lines in the task's stored log",
    )
    stored = {str(e["event"]): e for e in _stored(task_id, env)}
    for i in range(3):
        line = stored[f"stdlib trigger line {i}"]
        assert line["task_id"] == task_id and line.get("trigger_id"), line
        assert line["level"] == "warning" and line["logger"] == "stdlib_ops", line
    assert stored["stdlib operator line 1"]["task_id"] == task_id
    assert stored["stdlib operator resumed with 3"]["task_id"] == task_id
    assert "stdlib trigger exception" in stored
    assert not any("debug" in event for event in stored)

    wait_until(lambda: "stdlib operator resumed" in proc.output(), 10, message="printed")
    proc.stop()
    printed = []
    for line in proc.output().splitlines():
        if line.strip():
            printed.append(json.loads(line))  # every line is one JSON object
    by_event = {str(e.get("event")): e for e in printed}
    assert by_event["stdlib trigger line 0"]["task_id"] == task_id
    assert by_event["stdlib trigger line 0"].get("trigger_id")
    assert by_event["stdlib operator line 1"]["task_id"] == task_id
    failure = by_event["stdlib trigger exception"]
    assert failure["task_id"] == task_id
    assert "boom" in json.dumps(failure["exception"])  # the traceback is one field
    assert not any("debug" in event for event in by_event)
    # rendered once: no second handler prints the same line
    assert sum(e.get("event") == "stdlib trigger line 1" for e in printed) == 1


def test_a_record_whose_args_do_not_fit_is_still_one_json_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """User code's ``log.warning("a %s %s", 1)`` printed Python's multi-line "--- Logging
    error ---" report into the JSON stream and lost the line."""
    import logging

    import structlog

    from deferrun.process.log import configure_logging

    saved = structlog.get_config()
    root = logging.getLogger()
    others = list(root.handlers)  # pytest's capture handler raises on a bad record itself
    for handler in others:
        root.removeHandler(handler)
    try:
        configure_logging("json", "info")
        logging.getLogger("usercode").warning("a %s %s", 1)
    finally:
        structlog.configure(**saved)
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in others:
            root.addHandler(handler)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    entry = json.loads(lines[0])
    assert "a %s %s" in entry["event"] and "could not format" in entry["event"], entry
    assert entry["logger"] == "usercode" and entry["level"] == "warning"


def test_an_oversized_stored_line_is_still_json() -> None:
    """``deferrun logs --json`` is read by programs: a line over the limit used to be cut
    mid-JSON."""
    from deferrun.process.tasklogs import TaskLogSink

    sink = TaskLogSink(None, "worker", max_line=8192)  # type: ignore[arg-type]
    sink.add({"event": "huge " + "x" * 100_000, "task_id": "t1", "level": "info"})
    sink.add({"event": "blob", "task_id": "t1", "level": "info", "rows": list(range(50_000))})
    for _task, _at, _source, line in sink._buffer:
        entry = json.loads(line)
        assert entry["truncated"] is True and entry["task_id"] == "t1", entry
        assert len(line) < 2 * 8192
