"""The `deferrun` command as users type it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from deferrun.store import open_store
from tests.support.processes import Proc, deferrun_env, wait_until

pytestmark = pytest.mark.e2e


def cli(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deferrun", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def _create_database(url: str) -> None:
    store = await open_store(url)
    await store.close()


@pytest.mark.slow
def test_demo_runs_to_completion(tmp_path: Path) -> None:
    env = deferrun_env(f"sqlite:///{tmp_path / 'demo.db'}")
    env.pop("DEFERRUN_IMPORTS")  # the demo needs no --import: its code is deferrun's own
    done = cli("standalone", "--demo", env=env, cwd=tmp_path, timeout=90)
    assert done.returncode == 0, done.stderr
    assert "demo finished" in done.stdout
    table = done.stdout.split("task ")[-1]
    states = [ln.split()[1] for ln in table.split("demo finished")[0].splitlines()[2:] if ln]
    assert states == ["success"] * 9, done.stdout
    assert "fetch-result   success  run-" in done.stdout  # read context["upstream"]
    assert "wait-for-run   deferred  (waits on 1 upstream (all_success)" in done.stdout


@pytest.mark.slow
def test_submit_wait_and_inspect(
    sqlite_url: str, tmp_path: Path, procs: Callable[..., Proc]
) -> None:
    env = deferrun_env(sqlite_url)
    server = procs(["standalone", "--slots", "2"], env)
    wait_until(lambda: server.output().count("started") >= 2, 20, message="standalone to start")

    done = cli(
        "submit",
        "tests.support.userland.DeferOnce",
        "--kwargs",
        '{"value": {"answer": 42}}',
        "--wait",
        "30",
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    task_id = done.stdout.splitlines()[0]
    assert "success" in done.stdout and '"answer":42' in done.stdout

    marker = tmp_path / "cleanup.txt"
    waiting = cli(
        "submit",
        "tests.support.userland.DeferOnce",
        "--kwargs",
        json.dumps({"kind": "never", "value": str(marker)}),
        env=env,
        cwd=tmp_path,
    )
    waiting_id = waiting.stdout.strip()
    wait_until(
        lambda: "deferred" in cli("task", waiting_id, env=env, cwd=tmp_path).stdout,
        20,
        message="the task to defer",
    )

    shown = cli("task", task_id, env=env, cwd=tmp_path)
    assert shown.returncode == 0 and "state" in shown.stdout and "success" in shown.stdout

    listed = cli("tasks", env=env, cwd=tmp_path)
    assert "deferred=1" in listed.stdout and "success=1" in listed.stdout
    assert task_id in listed.stdout and "tests.support.userland.NeverTrigger" in listed.stdout

    as_json = json.loads(cli("tasks", "--json", env=env, cwd=tmp_path).stdout)
    assert as_json["counts"] == {"success": 1, "deferred": 1}

    triggers = cli("triggers", env=env, cwd=tmp_path)
    assert "triggerers: 1 alive" in triggers.stdout
    assert (
        "tests.support.userland.NeverTrigger" in triggers.stdout and waiting_id in triggers.stdout
    )

    only_deferred = cli("tasks", "--state", "deferred", env=env, cwd=tmp_path)
    assert (
        waiting_id in only_deferred.stdout and task_id not in only_deferred.stdout.split("\n", 1)[1]
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--db", "mysql://admin:hunter2@db/x", "tasks"], "unsupported database URL"),
        (["--db", "sqlite:////no/such/dir/x.db", "tasks"], "does not exist"),
        (["submit", "no_such_pkg.Operator"], "cannot import 'no_such_pkg.Operator'"),
        (["submit", "os.system"], "not a BaseOperator subclass"),
        (
            ["submit", "tests.support.userland.DeferOnce", "--kwargs", "{bad"],
            "--kwargs is not valid JSON",
        ),
        (
            ["submit", "tests.support.userland.DeferOnce", "--kwargs", "[1]"],
            "must be a JSON object",
        ),
        (
            ["submit", "tests.support.userland.DeferOnce", "--kwargs", '{"nope": 1}'],
            "do not fit operator",
        ),
        (["task", "does-not-exist"], "no task 'does-not-exist'"),
    ],
)
def test_clear_errors(sqlite_url: str, tmp_path: Path, args: list[str], message: str) -> None:
    env = deferrun_env(sqlite_url)
    if args[0] == "task":  # read-only commands refuse a missing database: create it first
        anyio.run(_create_database, sqlite_url)
    done = cli(*args, env=env, cwd=tmp_path)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert "hunter2" not in done.stderr


def test_stored_text_cannot_drive_the_terminal(db_url: str, tmp_path: Path) -> None:
    """A task name or error with terminal control sequences (anyone who submits chooses the
    name; errors often quote an external API) is shown escaped by tasks, task and logs."""
    from deferrun.client import AsyncClient
    from tests.support.hostile_ops import Returns

    hostile = "\x1b]0;owned-title\x07\x1b[2J\x1b[31mlooks-fine\r"

    async def submit() -> str:
        store = await open_store(db_url)
        try:
            return await AsyncClient(store=store).submit(Returns(what="x", task_id=hostile))
        finally:
            await store.close()

    task_id = anyio.run(submit)
    env = deferrun_env(db_url)
    for args in (["tasks"], ["task", task_id]):
        done = cli(*args, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "\x1b" not in done.stdout and "\r" not in done.stdout, repr(done.stdout)
        assert "\\x1b]0;owned-title" in done.stdout, done.stdout
