"""Connection secrets in the Airflow layer never reach a task error, a log line or the
database: passwords urllib cannot parse, header extras and nested ``__extra__`` JSON."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import anyio
import pytest

from deferrun import Client, TaskState
from deferrun.compat.airflow import BaseHook
from deferrun.connections.redaction import redact
from deferrun.exceptions import ConfigError
from tests.cli.test_cli import _create_database
from tests.support.airflow_style import LeakConnection
from tests.support.processes import Proc, deferrun_env

#: conn id -> (URI, fragments of its secrets that must never be seen)
CONNS = {
    "slash": (
        "aws://AKIAEXAMPLE:wJalrXUtnFEMI/K7MDENGbPxRfiCY@?region_name=eu-west-1",
        ["wJalrXUtnFEMI", "K7MDENGbPxRfiCY"],
    ),
    "hash": ("aws://AKIAEXAMPLE:hashLEFT77#hashRIGHT77@?region_name=x", ["hashLEFT77"]),
    "qmark": ("https://user:qmarkLEFT88?qmarkRIGHT88@example.com/b", ["qmarkLEFT88"]),
    "hdr": (
        "https://u:pw12345@127.0.0.1/b?header.X-Api-Key=HDRSECRET987"
        "&header.Authorization=Bearer%20BEARERSEC42&header.Cookie=sid%3DCOOKIESEC31",
        ["HDRSECRET987", "BEARERSEC42", "COOKIESEC31"],
    ),
    "nest": (
        "https://u:pw12345@127.0.0.1/b?__extra__="
        + quote(
            json.dumps({"auth": {"token": "NESTEDSECRET55"}, "keys": {"api-key": ["LISTSEC66"]}})
        ),
        ["NESTEDSECRET55", "LISTSEC66"],
    ),
}


def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    for conn_id, (uri, _) in CONNS.items():
        monkeypatch.setenv(f"DEFERRUN_CONN_{conn_id.upper()}", uri)


@pytest.mark.parametrize("conn_id", ["slash", "hash", "qmark"])
def test_unparsable_password_is_not_echoed_and_is_redacted(
    monkeypatch: pytest.MonkeyPatch, conn_id: str
) -> None:
    _env(monkeypatch)
    with pytest.raises(ConfigError) as caught:
        BaseHook.get_connection(conn_id)
    text = str(caught.value)
    assert f"DEFERRUN_CONN_{conn_id.upper()}" in text and "percent-encode" in text
    for fragment in CONNS[conn_id][1]:
        assert fragment not in text
        assert fragment not in redact(f"later a log line quotes {fragment}")


@pytest.mark.parametrize("conn_id", ["hdr", "nest"])
def test_header_and_nested_extras_are_redacted(
    monkeypatch: pytest.MonkeyPatch, conn_id: str
) -> None:
    _env(monkeypatch)
    conn = BaseHook.get_connection(conn_id)
    shown = redact(f"{conn.extra} {conn.extra_dejson}")
    for fragment in CONNS[conn_id][1]:
        assert fragment not in shown, shown


def _stored_text(db_url: str) -> str:
    """Every task row and stored log line, as text."""
    queries = ("SELECT * FROM deferrun_tasks", "SELECT * FROM deferrun_task_logs")
    if db_url.startswith("sqlite"):
        conn = sqlite3.connect(db_url.removeprefix("sqlite:///"))
        try:
            return repr([conn.execute(q).fetchall() for q in queries])
        finally:
            conn.close()
    import asyncpg

    async def fetch() -> str:
        conn = await asyncpg.connect(db_url)
        try:
            return repr([[tuple(r) for r in await conn.fetch(q)] for q in queries])
        finally:
            await conn.close()

    return anyio.run(fetch)


@pytest.mark.e2e
def test_no_secret_fragment_reaches_errors_logs_or_the_database(
    db_url: str, procs: Callable[..., Proc]
) -> None:
    extra: dict[str, Any] = {f"DEFERRUN_CONN_{c.upper()}": uri for c, (uri, _) in CONNS.items()}
    env = deferrun_env(db_url, DEFERRUN_IMPORTS="tests.support.airflow_style", **extra)
    anyio.run(_create_database, db_url)
    worker = procs(["worker", "--slots", "4"], env)
    with Client(db_url) as client:
        ids = {c: client.submit(LeakConnection(task_id=c, conn_id=c)) for c in CONNS}
        infos = {c: client.wait(t, timeout=60) for c, t in ids.items()}
    for info in infos.values():
        assert info.state is TaskState.FAILED, info
    for conn_id in ("slash", "hash", "qmark"):
        assert "percent-encode" in (infos[conn_id].error or "")
    seen = "\n".join(
        [worker.output(), _stored_text(db_url)] + [info.error or "" for info in infos.values()]
    )
    assert "***" in seen
    for _, fragments in CONNS.values():
        for fragment in fragments:
            assert fragment not in seen, fragment
