"""Sync attempts reuse threads, and each attempt still finds its thread as a new one."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest

from deferrun.attempt_threads import _NOWAIT, AttemptThreads

pytestmark = pytest.mark.skipif(not _NOWAIT, reason="threads are reused on CPython 3.11/3.12")

_local = threading.local()


def _run_all(pool: AttemptThreads, bodies: list[Callable[[], bool]]) -> list[dict[str, Any]]:
    """Run each body as one attempt, one after another; what each saw of its thread."""
    seen: list[dict[str, Any]] = []
    for n, body in enumerate(bodies):
        finished = threading.Event()

        def run(body: Callable[[], bool] = body) -> bool:
            me = threading.current_thread()
            seen.append(
                {
                    "thread": me,
                    "name": me.name,
                    "local": getattr(_local, "value", None),
                    "mark": getattr(me, "user_mark", None),
                    "trace": sys.gettrace(),
                }
            )
            return body()

        pool.start(run, finished.set, f"attempt-{n}", lambda exc, f=finished: f.set())
        assert finished.wait(10), f"attempt {n} never ended"
        # the thread puts itself back on the idle list just after done(): wait for it
        for _ in range(1000):
            if pool._idle or not seen[-1]["thread"].is_alive():
                break
            threading.Event().wait(0.005)
    return seen


def _dirty() -> bool:
    """What careless operator code leaves behind in its thread."""
    _local.value = "left behind"
    threading.current_thread().user_mark = "left behind"  # type: ignore[attr-defined]
    threading.current_thread().name = "renamed"
    sys.settrace(lambda *a: None)
    return True


def test_a_reused_thread_keeps_nothing_of_the_previous_attempt() -> None:
    pool = AttemptThreads()
    try:
        seen = _run_all(pool, [_dirty, _dirty, _dirty])
    finally:
        pool.close()
    assert seen[0]["thread"] is seen[1]["thread"] is seen[2]["thread"], "no thread was reused"
    assert [s["name"] for s in seen] == ["attempt-0", "attempt-1", "attempt-2"]
    assert [s["local"] for s in seen] == [None, None, None]
    assert [s["mark"] for s in seen] == [None, None, None]
    assert all(s["trace"] is None for s in seen), seen


def test_a_thread_whose_attempt_was_interrupted_is_not_reused() -> None:
    """run() returns False when a signal was injected into its thread (it may still be
    pending): that thread ends, and the next attempt gets another one."""
    pool = AttemptThreads()
    try:
        seen = _run_all(pool, [lambda: False, lambda: True])
    finally:
        pool.close()
    first, second = seen[0]["thread"], seen[1]["thread"]
    assert first is not second
    first.join(10)
    assert not first.is_alive()


def test_closing_lets_idle_threads_exit() -> None:
    pool = AttemptThreads()
    seen = _run_all(pool, [lambda: True])
    pool.close()
    seen[0]["thread"].join(10)
    assert not seen[0]["thread"].is_alive()
