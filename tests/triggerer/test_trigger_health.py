"""A trigger whose polls keep failing is visible: its consecutive failures, last error
(redacted) and last success are stored on its row in batches, the triggerer's metrics count
it by class, and a recovery clears it (both backends)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from deferrun.connections.redaction import register_secret
from deferrun.core.basetrigger import PollingTrigger, TriggerEvent
from deferrun.exceptions import TransientError
from deferrun.store import Store
from tests.support.hostile_ops import Returns
from tests.support.runtime import runtime_for

pytestmark = pytest.mark.anyio

SECRET = "hunter2-trigger-health-secret"


class FlakyPoll(PollingTrigger):
    """Fails its polls while ``flag`` does not exist, then waits quietly for ``done``."""

    poll_interval = 0.05
    max_backoff = 0.1

    def __init__(self, flag: str, done: str) -> None:
        self.flag = flag
        self.done = done

    async def poll(self) -> TriggerEvent | None:
        if not Path(self.flag).exists():
            raise TransientError(f"service down (token {SECRET})")
        return TriggerEvent("done") if Path(self.done).exists() else None


async def _cli(url: str, *args: str) -> str:
    done = await anyio.run_process(
        [sys.executable, "-m", "deferrun", *args, "--db", url], check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


async def _failing(store: Store, at_least: int) -> list[dict[str, Any]]:
    with anyio.fail_after(20):
        while True:
            rows = await store.failing_triggers()
            if rows and rows[0]["poll_failures"] >= at_least:
                return rows
            await anyio.sleep(0.1)


async def test_failing_polls_are_stored_shown_in_metrics_and_cleared(
    store: Store, tmp_path: Path
) -> None:
    register_secret(SECRET)
    flag, done = tmp_path / "up", tmp_path / "done"
    async with runtime_for(store, worker=False) as rt:
        assert rt.triggerer is not None
        task_id = await rt.client.submit(
            Returns(what="ok"), start_trigger=FlakyPoll(flag=str(flag), done=str(done))
        )
        [row] = await _failing(store, 3)
        assert row["task_id"] == task_id
        assert row["classpath"].endswith("test_trigger_health.FlakyPoll")
        assert "service down" in row["last_error"] and SECRET not in row["last_error"]
        assert "***" in row["last_error"]
        assert row["last_ok_at"] is None  # never succeeded
        info = await store.get_task(task_id)
        assert info is not None and info.trigger_id is not None
        health = await store.trigger_health(info.trigger_id)
        assert health is not None and health["poll_failures"] >= 3
        # the command line shows it: `deferrun task ID` and `deferrun triggers`
        url = store.url
        shown = await _cli(url, "task", task_id)
        assert "FAILING" in shown and "poll(s) in a row failed" in shown, shown
        assert "service down" in shown and SECRET not in shown, shown
        assert "never (since claimed)" in shown, shown
        listed = await _cli(url, "triggers")
        assert "failing triggers: 1" in listed and "FAILING x" in listed, listed
        assert SECRET not in listed, listed
        text = rt.triggerer.metrics.render().decode()
        assert 'deferrun_failing_triggers{trigger="' in text
        assert any(
            line.startswith("deferrun_failing_triggers{") and line.endswith(" 1.0")
            for line in text.splitlines()
        ), text
        # the service comes back: the next flush stores the recovery (failures 0, a success)
        flag.touch()
        with anyio.fail_after(20):
            while await store.failing_triggers():
                await anyio.sleep(0.1)
        health = await store.trigger_health(info.trigger_id)
        assert health is not None and health["poll_failures"] == 0
        assert health["last_ok_at"] is not None
        assert "deferrun_failing_triggers{" not in rt.triggerer.metrics.render().decode()
        done.touch()


async def test_health_writes_are_batched_not_one_per_poll(store: Store, tmp_path: Path) -> None:
    """Hundreds of failed polls in a few seconds make a handful of health writes."""
    calls = 0

    class Counting:
        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        async def record_trigger_health(self, *args: Any) -> None:
            nonlocal calls
            calls += 1
            await store.record_trigger_health(*args)

    flag, done = tmp_path / "up", tmp_path / "done"
    async with runtime_for(store, worker=False, triggerer=False) as rt:
        for _ in range(5):
            await rt.client.submit(
                Returns(what="ok"), start_trigger=FlakyPoll(flag=str(flag), done=str(done))
            )
    from deferrun.triggerer.triggerer import Triggerer

    t = Triggerer(Counting(), capacity=10, dead_after=2.0, poll_interval=0.2)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        tg.start_soon(t.run)
        rows = await _failing(store, 20)
        t.stop()
    polls = sum(r["poll_failures"] for r in rows)
    assert polls >= 20 and calls <= 10, (polls, calls)


UNREGISTERED = [  # secrets no connection registered, as an external API's error quotes them
    ("https://admin:Hunter2SuperSecretXYZ@api.example.com/x", "Hunter2SuperSecretXYZ"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig", "eyJhbGciOiJIUzI1NiJ9"),
    ("password=s3cr3t-Pa55word", "s3cr3t-Pa55word"),
    ('{"api_key": "AKIA-unregistered-key-123"}', "AKIA-unregistered-key-123"),
]


class QuotesSecrets(PollingTrigger):
    """Fails every poll with an error that quotes secrets in the shapes APIs print them."""

    poll_interval = 0.05
    max_backoff = 0.1

    async def poll(self) -> TriggerEvent | None:
        raise TransientError("GET failed: " + " | ".join(text for text, _ in UNREGISTERED))


async def test_secrets_quoted_in_a_poll_error_are_stored_redacted(store: Store) -> None:
    """Found by an attack: only registered connection secrets were hidden, so a URL password,
    a bearer token, password= and a JSON api_key reached the row, the pages and the CLI."""
    async with runtime_for(store, worker=False) as rt:
        task_id = await rt.client.submit(Returns(what="ok"), start_trigger=QuotesSecrets())
        [row] = await _failing(store, 2)
        shown = await _cli(store.url, "task", task_id) + await _cli(store.url, "triggers")
        await rt.client.cancel(task_id)
    for _, secret in UNREGISTERED:
        assert secret not in row["last_error"], row["last_error"]
        assert secret not in shown
    assert row["last_error"].count("***") >= len(UNREGISTERED)
