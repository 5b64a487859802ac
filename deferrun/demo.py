"""``deferrun standalone --demo``: tasks that wait without holding a slot, and a pipeline.

The operators and triggers live here, so stored rows keep naming ``deferrun.demo``; the
runner that submits and prints them is :mod:`deferrun.cli.demo_runner`.

The pipeline is the seed-style ``start run >> wait >> fetch result``: three tasks whose middle
one holds no worker slot (it waits on its upstream, then on a trigger that ends it).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import anyio

from deferrun.core.baseoperator import BaseOperator, Context
from deferrun.core.basetrigger import BaseTrigger, TaskSuccessEvent, TriggerEvent
from triggers.time import TimeDeltaTrigger


class Countdown(BaseOperator):
    """Defers ``rounds`` times for ``seconds`` each, carrying its progress in defer kwargs."""

    def __init__(self, *, rounds: int = 3, seconds: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rounds = rounds
        self.seconds = seconds

    def execute(self, context: Context) -> Any:
        self.log.info("countdown starts", rounds=self.rounds)
        self.defer(
            trigger=TimeDeltaTrigger(timedelta(seconds=self.seconds)),
            method_name="tick",
            kwargs={"done": 1},
        )

    def tick(self, context: Context, event: Any = None, done: int = 0) -> Any:
        self.log.info("tick", done=done, moment=str(event))
        if done < self.rounds:
            self.defer(
                trigger=TimeDeltaTrigger(timedelta(seconds=self.seconds)),
                method_name="tick",
                kwargs={"done": done + 1},
            )
        return f"{done} rounds of {self.seconds:g}s, slot-free while waiting"


class WriteFileLater(BaseOperator):
    """Waits ``delay`` seconds deferred, then writes ``path`` (something for a FileSensor)."""

    def __init__(self, *, path: str, delay: float = 2.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = path
        self.delay = delay

    def execute(self, context: Context) -> Any:
        self.defer(trigger=TimeDeltaTrigger(self.delay), method_name="write")

    def write(self, context: Context, event: Any = None) -> str:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "w") as f:
            f.write("ready\n")
        return self.path


class AsyncHello(BaseOperator):
    """An ``async def execute`` operator that defers once and then greets."""

    def __init__(self, *, name: str = "world", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.name = name

    async def execute(self, context: Context) -> Any:
        await asyncio.sleep(0.1)
        self.defer(trigger=TimeDeltaTrigger(1.5), method_name="greet")

    async def greet(self, context: Context, event: Any = None) -> str:
        return f"hello, {self.name} (resumed after the trigger fired at {event:%H:%M:%S})"


# --------------------------------------------------------------------------- the pipeline


class StartJobRun(BaseOperator):
    """Starts a (simulated, local) external job run and returns its run id at once, as
    ``RunJobOperator`` does against a job API: the run's status lives in a JSON file."""

    def __init__(self, *, runs_dir: str, seconds: float = 2.0, rows: int = 3, **kwargs: Any):
        super().__init__(**kwargs)
        self.runs_dir = runs_dir
        self.seconds = seconds
        self.rows = rows

    def execute(self, context: Context) -> Any:
        # a job API takes a moment to accept a run; the demo shows its downstream waiting
        time.sleep(1.0)
        run_id = f"run-{context['task_id'][-8:]}"
        path = os.path.join(self.runs_dir, f"{run_id}.json")
        os.makedirs(self.runs_dir, exist_ok=True)
        status = {
            "run_id": run_id,
            "finishes_at": time.time() + self.seconds,
            "rows": [{"id": i, "value": i * i} for i in range(self.rows)],
        }
        with open(path, "w") as f:
            json.dump(status, f)
        return {"run_id": run_id, "status_path": path}


class RunFinishedTrigger(BaseTrigger):
    """Polls a run's status file; ends its task itself (TaskSuccessEvent) when the run ends."""

    def __init__(self, status_path: str, poll_interval: float = 0.25) -> None:
        self.status_path = status_path
        self.poll_interval = poll_interval

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while True:
            status = json.loads(await anyio.Path(self.status_path).read_text())
            if time.time() >= status["finishes_at"]:
                yield TaskSuccessEvent(
                    {"run_id": status["run_id"], "state": "success", "path": self.status_path}
                )
                return
            await anyio.sleep(self.poll_interval)


class WaitForRun(BaseOperator):
    """Waits for the run its upstream started, holding no slot: it is submitted ``after`` the
    start task, reads the run id from ``context["upstream"]`` and defers on a trigger that
    finishes this task without a worker ever resuming it."""

    def __init__(self, *, start_task: str = "start-run", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.start_task = start_task

    def execute(self, context: Context) -> Any:
        started = context["upstream"][self.start_task]["result"]
        self.log.info("waiting for job run", run_id=started["run_id"])
        self.defer(trigger=RunFinishedTrigger(started["status_path"]), method_name="done")

    def done(self, context: Context, event: Any = None) -> Any:
        return event  # not reached: the trigger ends the task itself


class FetchResult(BaseOperator):
    """Reads the finished run's output, named by the upstream wait's result."""

    def __init__(self, *, wait_task: str = "wait-for-run", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.wait_task = wait_task

    def execute(self, context: Context) -> Any:
        run = context["upstream"][self.wait_task]["result"]
        with open(run["path"]) as f:
            rows = json.load(f)["rows"]
        return f"{run['run_id']}: {len(rows)} rows, sum of values {sum(r['value'] for r in rows)}"


__all__ = [
    "AsyncHello",
    "Countdown",
    "FetchResult",
    "RunFinishedTrigger",
    "StartJobRun",
    "WaitForRun",
    "WriteFileLater",
]
