"""Pipelines from the command line, on both backends: submit --after, the views of waiting
tasks, cancel and retry [--downstream] (each refusal one line, non-zero exit)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from tests.cli.test_cli import _create_database, cli
from tests.support.processes import Proc, deferrun_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, (done.stdout, done.stderr)
    return done.stdout


def refused(done: subprocess.CompletedProcess[str], message: str) -> None:
    assert done.returncode != 0, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr


def task_json(task_id: str, **kw: object) -> dict:
    return json.loads(ok(cli("task", task_id, "--json", **kw)))  # type: ignore[arg-type]


def test_submit_after_views_cancel_and_retry(
    db_url: str, tmp_path: Path, procs: Callable[..., Proc]
) -> None:
    env = deferrun_env(db_url)
    kw = {"env": env, "cwd": tmp_path}
    anyio.run(_create_database, db_url)
    step = "tests.support.pipeline_userland.Step"
    # no worker yet: a stays queued, b and c wait on it (a chain a >> b >> c) and d on both
    a = ok(cli("submit", step, "--kwargs", '{"task_id": "a", "value": 1}', **kw)).strip()
    b = ok(cli("submit", step, "--kwargs", '{"task_id": "b"}', "--after", a, **kw)).strip()
    c = ok(cli("submit", step, "--kwargs", '{"task_id": "c"}', "--after", b, **kw)).strip()
    d = ok(
        cli("submit", step, "--after", a, "--after", c, "--trigger-rule", "all_done", **kw)
    ).strip()

    listed = ok(cli("tasks", **kw))
    line = {row.split()[0]: row for row in listed.splitlines() if row[:1].isalnum()}
    assert "waits on 1 upstream (all_success), 0 ended" in line[b]
    assert "waits on 2 upstream (all_done), 0 ended" in line[d]
    waits = json.loads(ok(cli("tasks", "--json", **kw)))["waiting_on_upstream"]
    assert waits[d] == {"trigger_rule": "all_done", "upstream": 2, "ended": 0}

    shown = ok(cli("task", b, **kw))
    assert "trigger rule  all_success" in shown and "upstream (1):" in shown
    assert f"{a}  a     queued" in shown and f"{c}  c     deferred" in shown
    as_json = task_json(a, **kw)
    assert as_json["state"] == "queued" and as_json["upstream"] == []
    assert {n["id"]: n["state"] for n in as_json["downstream"]} == {b: "deferred", d: "deferred"}

    refused(cli("retry", a, **kw), f"task {a} is queued, not finished")
    refused(cli("retry", "no-such-id", **kw), "no task 'no-such-id'")
    refused(cli("cancel", "no-such-id", **kw), "no task 'no-such-id'")
    refused(cli("submit", step, "--after", "no-such-id", **kw), "unknown task id(s) no-such-id")
    refused(cli("submit", step, "--trigger-rule", "all_done", **kw), "needs at least one --after")
    refused(cli("submit", step, "--after", "", **kw), "after= takes task ids")

    # cancelling a settles everything after it in one go: b, c upstream_failed, d runs (all_done)
    cancelled = ok(cli("cancel", a, **kw))
    assert cancelled.splitlines()[0] == f"{a} cancelled"
    assert f"2 downstream task(s) ended with it: {b} {c}" in cancelled
    refused(cli("cancel", a, **kw), f"task {a} already ended cancelled")
    failed = ok(cli("tasks", "--state", "upstream_failed", **kw))
    assert b in failed and c in failed and a not in failed and d not in failed
    assert "trigger_rule all_success can no longer hold" in failed
    assert task_json(d, **kw)["state"] == "queued"

    # a (cancelled before its first try) with everything after it: they wait again and run
    # once a worker comes; d, queued (all_done held) but not started, waits again too
    put_back = ok(cli("retry", a, "--downstream", **kw)).split()
    assert put_back[0] == a and sorted(put_back[1:]) == sorted([b, c, d])
    states = {t: task_json(t, **kw)["state"] for t in (a, b, c, d)}
    assert states == {a: "up_for_retry", b: "deferred", c: "deferred", d: "deferred"}
    waiting = [ln for ln in ok(cli("task", c, **kw)).splitlines() if ln.startswith("waiting ")]
    assert waiting[0].split(None, 1)[1] == "on 1 upstream (all_success), 0 ended"

    procs(["standalone", "--slots", "2"], env)
    done = ok(cli("submit", step, "--after", c, "--wait", "60", **kw))
    assert "success" in done
    final = {t: task_json(t, **kw) for t in (a, b, c, d)}
    assert {t: f["state"] for t, f in final.items()} == dict.fromkeys((a, b, c, d), "success")
    assert final[b]["result"]["upstream"] == {a: final[a]["result"]}
    assert final[a]["try_number"] == 1 and final[b]["trigger_rule"] == "all_success"
    assert [n["state"] for n in final[c]["upstream"]] == ["success"]
