"""Small operational fixes: pool options stay out of the PostgreSQL DSN, a busy --metrics-port
is one clear line, a script's unclosed Client() lets the interpreter exit, Client.counts()."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from deferrun import Client
from deferrun.connections.uri import Connection
from deferrun.testing import arun_trigger
from tests.support.processes import Proc, deferrun_env
from triggers.sql import SqlTrigger


def test_pool_options_are_not_sent_as_server_settings() -> None:
    conn = Connection.from_uri("x", "postgresql://u:p@h/db?max_size=5&application_name=app")
    assert conn.dsn(exclude=frozenset({"max_size"})) == "postgresql://u:p@h/db?application_name=app"


@pytest.mark.anyio
async def test_sql_trigger_works_with_max_size_extra(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEFERRUN_CONN_POOLED", pg_url + "?max_size=5")
    event = await arun_trigger(SqlTrigger("SELECT 42 AS answer", conn_id="pooled"), timeout=20)
    assert event.payload == {"answer": 42}


def test_busy_metrics_port_is_one_line(tmp_path: Path, procs: Callable[..., Proc]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = procs(
            ["worker", "--metrics-port", str(port), "--metrics-host", "127.0.0.1"],
            deferrun_env(f"sqlite:///{tmp_path / 'deferrun.db'}"),
        )
        assert proc.popen.wait(30) == 2
    out = proc.output()
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"--metrics-port {port}" in errors[0], out
    assert "Traceback" not in out and "ExceptionGroup" not in out


def test_script_with_unclosed_client_exits(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            f"""
            from deferrun import Client
            client = Client("sqlite:///{tmp_path / "deferrun.db"}")
            print(client.counts())
            """
        )
    )
    env = deferrun_env(f"sqlite:///{tmp_path / 'deferrun.db'}")
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "{}"
    assert "Traceback" not in done.stderr, done.stderr  # closing at exit said nothing


def test_client_counts(db_url: str) -> None:
    from tests.support.userland import DeferOnce  # type: ignore[import-not-found]

    with Client(db_url) as client:
        assert client.counts() == {}
        client.submit(DeferOnce(task_id="a"))
        client.submit(DeferOnce(task_id="b"))
        assert client.counts() == {"queued": 2}
