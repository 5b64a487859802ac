"""User-style classes and fixtures data for the status-page tests: a task in every state, with
secrets in its kwargs, its trigger's kwargs, its result, its error and its log lines."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec

from deferrun.client import build_task
from deferrun.core import serialization
from deferrun.core.baseoperator import BaseOperator, Context
from deferrun.core.basetrigger import BaseTrigger, TriggerEvent
from deferrun.core.models import Deferral
from deferrun.store import Store
from tests.support.userland import Flaky, NeverTrigger

SECRET_PASSWORD = "hunter2-SECRET-pw"
SECRET_URL_PASSWORD = "pw-SECRET-in-url"
SECRET_TOKEN = "tok-SECRET-bearer-123"
# secrets quoted the ways errors, reprs, YAML-ish text and structured log fields quote them
QUOTED = {
    "repr_dict": "{'password': 'pw-err-5'}",
    "repr_kw": "password='pw-repr-6'",
    "yaml_dq": 'api_key: "ak-yaml-7"',
    "yaml_sq": "token: 'tok-yaml-7b'",
    "json": '{"client_secret": "cs-json-7c"}',
}
LOG_SECRETS = ("pw-log-8", "ak-log-9")
SECRETS = (
    SECRET_PASSWORD,
    SECRET_URL_PASSWORD,
    SECRET_TOKEN,
    "pw-err-5",
    "pw-repr-6",
    "ak-yaml-7",
    "tok-yaml-7b",
    "cs-json-7c",
    *LOG_SECRETS,
)
QUOTED_TEXT = " ".join(QUOTED.values())
DSN = f"postgresql://app:{SECRET_URL_PASSWORD}@db.example.com:5432/warehouse"
SECRET_KWARGS = {
    "password": SECRET_PASSWORD,
    "dsn": DSN,
    "headers": {"Authorization": f"Bearer {SECRET_TOKEN}", "X-Note": QUOTED_TEXT},
}


class ChattyTrigger(BaseTrigger):
    """Logs a line every ``interval`` seconds and never fires (until cancelled)."""

    def __init__(self, dsn: str, password: str, interval: float = 0.3) -> None:
        self.dsn = dsn
        self.password = password
        self.interval = interval

    async def run(self) -> AsyncIterator[TriggerEvent]:
        for n in range(1, 100_000):
            self.log.info(f"still waiting on {self.dsn}", poll=n)
            await anyio.sleep(self.interval)
        yield TriggerEvent(None)


class WaitChatty(BaseOperator):
    def __init__(self, *, dsn: str, password: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dsn = dsn
        self.password = password

    def execute(self, context: Context) -> Any:
        self.log.info("deferring until the warehouse answers")
        self.defer(trigger=ChattyTrigger(dsn=self.dsn, password=self.password), method_name="done")

    def done(self, context: Context, event: Any = None) -> Any:
        return event


class SecretOp(BaseOperator):
    """Carries secrets in its kwargs; returns at once."""

    def __init__(
        self,
        *,
        password: str = "",
        dsn: str = "",
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.password = password
        self.dsn = dsn
        self.headers = headers or {}

    def execute(self, context: Context) -> Any:
        return "ok"


def _secret_deferral() -> Deferral:
    return Deferral(
        classpath="tests.support.userland.NeverTrigger",
        kwargs=serialization.dumps(NeverTrigger(marker=f"{DSN} {QUOTED_TEXT}").serialize()[1]),
        method_name="resume",
        method_kwargs=serialization.dumps({"auth": SECRET_KWARGS}),
        timeout=3600.0,
    )


class Sleepy(BaseOperator):
    """Runs (holding its slot) for ``seconds``."""

    def __init__(self, *, seconds: float = 300.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seconds = seconds

    async def execute(self, context: Context) -> Any:
        self.log.info("working", seconds=self.seconds)
        await anyio.sleep(self.seconds)


def structured_line() -> str:
    """A line as ``self.log.info("connecting", password=..., api_key=...)`` stores it."""
    return msgspec.json.encode(
        {
            "event": "connecting",
            "level": "info",
            "password": LOG_SECRETS[0],
            "api_key": LOG_SECRETS[1],
            "attempt": 2,
        }
    ).decode()


async def every_state(store: Store, queue: str = "manual", running: bool = True) -> dict[str, str]:
    """One task per state, made through the store's own transitions (claimed as a worker
    that serves ``queue``, which no real worker serves); returns state -> task id.
    ``running=False`` leaves the running one out (a live reaper would fail it: no such
    worker heartbeats)."""

    def op(kind: type[BaseOperator] = SecretOp, **kw: Any) -> Any:
        kwargs: dict[str, Any] = SECRET_KWARGS if kind is SecretOp else {}
        return build_task(kind(queue=queue, **{**kwargs, **kw}))

    ids: dict[str, str] = {}

    async def claimed(task: Any) -> int:
        await store.submit(task)
        [claim] = await store.claim_tasks("manual-worker", [queue], 1)
        assert claim.id == task.id
        return claim.claim_token

    if running:
        t = op(task_id="secret-running")
        await claimed(t)
        ids["running"] = t.id
    t = op(task_id="secret-deferred")
    await store.defer_task(t.id, await claimed(t), _secret_deferral())
    ids["deferred"] = t.id
    t = op(Flaky, task_id="retrying", retries=2, retry_delay=3600)
    await store.fail_task(t.id, await claimed(t), "flaky", retry=True)
    ids["up_for_retry"] = t.id
    t = op(task_id="rescheduled")
    await store.reschedule_task(t.id, await claimed(t), 3600)
    ids["up_for_reschedule"] = t.id
    t = op(task_id="succeeded")
    result = serialization.dumps(
        {"rows": 3, "token": SECRET_TOKEN, "url": DSN, "note": QUOTED_TEXT}
    )
    await store.complete_task(t.id, await claimed(t), result)
    ids["success"] = t.id
    t = op(task_id="failed-task")
    error = (
        f"Traceback (most recent call last):\n  File 'op.py', line 3, in execute\n"
        f"ConnectionError: could not connect to {DSN} (password={SECRET_PASSWORD})\n"
        f"  with {QUOTED_TEXT}"
    )
    await store.fail_task(t.id, await claimed(t), error, retry=False)
    ids["failed"] = t.id
    t = op(task_id="skipped-task")
    await store.skip_task(t.id, await claimed(t), "nothing to do today")
    ids["skipped"] = t.id
    t = op(task_id="cancelled-task")
    await store.submit(t)
    await store.cancel_task(t.id)
    ids["cancelled"] = t.id
    t = build_task(SecretOp(queue=queue, task_id="downstream"), after=[ids["failed"]])
    await store.submit(t)
    ids["upstream_failed"] = t.id
    t = op(task_id="secret-queued")  # last: the claims above would take it
    await store.submit(t)
    ids["queued"] = t.id
    await store.append_task_logs(
        [
            (ids["deferred"], time.time(), "worker", f"connecting to {DSN}"),
            (ids["deferred"], time.time(), "worker", f"Authorization: Bearer {SECRET_TOKEN}"),
            (ids["deferred"], time.time(), "worker", f"settings {QUOTED_TEXT}"),
            (ids["deferred"], time.time(), "trigger", structured_line()),
        ],
        keep=100,
    )
    return ids
