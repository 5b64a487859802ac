"""Sync attempts reuse threads, and each attempt still finds its thread as a new one."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest

from deferrun.worker.attempt_threads import _NOWAIT, AttemptThreads

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


class _Replants:
    """A thread-local value whose finalizer plants state for whoever runs next (a pooled
    resource that returns itself to a per-thread cache when dropped)."""

    def __del__(self) -> None:
        _local.value = "planted by __del__"
        threading.current_thread().user_mark = "planted by __del__"  # type: ignore[attr-defined]
        sys.settrace(lambda *a: None)


def _leave_replanter() -> bool:
    _local.value = _Replants()
    return True


def test_state_a_finalizer_plants_while_cleaning_is_not_inherited() -> None:
    pool = AttemptThreads()
    try:
        seen = _run_all(pool, [_leave_replanter, lambda: True, lambda: True])
    finally:
        pool.close()
    for later in seen[1:]:
        assert later["local"] is None and later["mark"] is None, seen
        assert later["trace"] is None, seen


def test_the_attempt_ends_before_its_leftovers_are_cleaned() -> None:
    """A slow finalizer of a thread-local value must not hold the attempt's outcome: the
    attempt is done as soon as its code returns, as with a thread of its own."""
    release = threading.Event()

    class Slow:
        def __del__(self) -> None:
            release.wait(30)

    def leave_slow() -> bool:
        _local.slow = Slow()
        return True

    pool = AttemptThreads()
    finished = threading.Event()
    try:
        pool.start(leave_slow, finished.set, "slow", lambda exc: finished.set())
        assert finished.wait(10), "the attempt waited for its thread's clean-up"
        # a second attempt meanwhile gets another thread
        second = threading.Event()
        pool.start(lambda: True, second.set, "second", lambda exc: second.set())
        assert second.wait(10)
    finally:
        release.set()
        pool.close()


def _os_and_interpreter_changes() -> list[Callable[[], Any]]:
    import asyncio
    import os
    import signal

    def nice() -> None:
        os.nice(1)

    def mask() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])

    def affinity() -> None:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    def hooks() -> None:
        sys.set_asyncgen_hooks(firstiter=lambda agen: None)

    def origin() -> None:
        sys.set_coroutine_origin_tracking_depth(5)

    def running_loop() -> None:
        asyncio.events._set_running_loop(asyncio.new_event_loop())

    return [nice, mask, affinity, hooks, origin, running_loop]


@pytest.mark.parametrize("change", _os_and_interpreter_changes(), ids=lambda f: f.__name__)
def test_a_thread_whose_other_state_changed_is_not_reused(change: Callable[[], Any]) -> None:
    """Per-thread state that cannot be reset (signal mask, affinity, nice, async generator
    hooks, coroutine origin tracking, a running loop) ends the thread."""
    pool = AttemptThreads()
    try:
        seen = _run_all(pool, [lambda: (change(), True)[1], lambda: True])
    finally:
        pool.close()
    assert seen[0]["thread"] is not seen[1]["thread"]


def test_pure_python_thread_locals_are_not_inherited() -> None:
    import _threading_local

    py_local = _threading_local.local()

    def set_it() -> bool:
        py_local.value = "left behind"
        return True

    got: list[Any] = []

    def read_it() -> bool:
        got.append(getattr(py_local, "value", None))
        return True

    pool = AttemptThreads()
    try:
        _run_all(pool, [set_it, read_it])
    finally:
        pool.close()
    assert got == [None]
