"""The threads sync operator code runs in: reused, yet each attempt finds its thread as fresh as a
new one.

A new OS thread per attempt cost about 140 µs of CPU (measured with 8 slots: start, schedule,
exit), a fifth of a busy worker's time per resumed task, while handing a job to a waiting thread
costs about 10 µs. What a new thread gives user code, a reused one gives too:

- ``threading.local`` data of the previous attempt is gone: CPython keeps a thread's share of
  each ``threading.local`` in the thread state's dict under a ``thread.local.<address>`` key,
  and those keys (only those) are dropped after each attempt; a probe checks this on the
  running interpreter first, and where it fails every attempt gets a new thread as before;
- the thread's name is the attempt's, attributes user code set on ``current_thread()`` are
  dropped, and a trace or profile function it installed is replaced by the thread's original;
- a thread whose attempt was interrupted (timeout, cancel) is never reused: the injected
  exception may still be pending, and must not land in another task's code.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import structlog

log = structlog.get_logger("deferrun.worker")

#: how long an idle thread waits for another attempt before it exits
IDLE_EXIT = 60.0

#: one sync attempt: ``run`` returns True when its thread may serve another attempt;
#: ``done`` is called after the thread was cleaned; ``failed`` if no thread could start
Job = tuple[Callable[[], bool], Callable[[], None], str, Callable[[BaseException], None]]


def _start_nowait(thread: threading.Thread) -> None:
    """``thread.start()`` without its wait for the new thread to be scheduled.

    That wait is a round of GIL hand-offs per new thread (measured: a quarter of a busy
    worker's loop time when the loop did it; done on a helper thread, that thread's hand-offs
    delayed the loop's own socket writes). Everything else is what ``Thread.start`` does on
    CPython 3.11 and 3.12.
    """
    with threading._active_limbo_lock:  # type: ignore[attr-defined]
        threading._limbo[thread] = thread  # type: ignore[attr-defined]
    try:
        threading._start_new_thread(thread._bootstrap, ())  # type: ignore[attr-defined]
    except BaseException:
        with threading._active_limbo_lock:  # type: ignore[attr-defined]
            threading._limbo.pop(thread, None)  # type: ignore[attr-defined]
        raise


#: CPython 3.11/3.12 internals used above and for thread-local data; 3.13 starts threads and
#: keeps thread-local data differently: there, a helper thread calls ``Thread.start`` and no
#: thread is reused
_NOWAIT = sys.version_info < (3, 13) and all(
    hasattr(threading, name) for name in ("_active_limbo_lock", "_limbo", "_start_new_thread")
)


#: PyThreadState_GetDict returns a borrowed reference: read it as an address, then as an object
#: (a py_object restype would be taken for a new reference and released once too often)
_GET_DICT = ctypes.pythonapi["PyThreadState_GetDict"]
_GET_DICT.restype = ctypes.c_void_p
_GET_DICT.argtypes = []


def _thread_dict() -> dict[str, Any] | None:
    """The calling thread's state dict (where CPython keeps its ``threading.local`` data)."""
    address = _GET_DICT()
    if not address:
        return None
    found = ctypes.cast(address, ctypes.py_object).value
    return found if isinstance(found, dict) else None


def _local_prefix() -> str | None:
    """How this interpreter names ``threading.local`` keys in a thread's state dict
    (``thread.local.<address>`` on CPython 3.11), found by watching a new one appear."""
    before = set(_thread_dict() or ())
    local = threading.local()
    local.seen = True
    new = [k for k in set(_thread_dict() or ()) - before if isinstance(k, str)]
    if len(new) != 1 or "." not in new[0]:
        return None
    return new[0].rsplit(".", 1)[0] + "."


_PREFIX = _local_prefix() if _NOWAIT else None


def _drop_thread_locals() -> bool:
    """Drop this thread's ``threading.local`` data; False if it is not kept where expected."""
    state = _thread_dict()
    if state is None or _PREFIX is None:
        return False
    for key in [k for k in state if isinstance(k, str) and k.startswith(_PREFIX)]:
        del state[key]
    return True


def _probe() -> bool:
    """Whether dropping those keys really empties a ``threading.local`` in this thread."""
    try:
        local = threading.local()
        local.seen = True
        return _drop_thread_locals() and not hasattr(local, "seen")
    except Exception as exc:  # any surprise means: do not reuse threads
        log.warning(
            "each sync attempt gets a new thread: thread-local data cannot be reset on this "
            "interpreter",
            error=repr(exc),
        )
        return False


class _Idle:
    __slots__ = ("inbox",)

    def __init__(self) -> None:
        self.inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()


class AttemptThreads:
    """One worker's threads for sync attempts; ``start`` never blocks the event loop."""

    def __init__(self, reuse: bool = True) -> None:
        self._lock = threading.Lock()
        self._idle: list[_Idle] = []
        self._reuse = reuse and _NOWAIT
        self._closed = False
        self._starter: queue.SimpleQueue[Job] | None = None

    def start(
        self,
        run: Callable[[], bool],
        done: Callable[[], None],
        name: str,
        failed: Callable[[BaseException], None],
    ) -> None:
        job: Job = (run, done, name, failed)
        with self._lock:
            idle = self._idle.pop() if self._idle else None
        if idle is not None:
            idle.inbox.put(job)
            return
        thread = threading.Thread(target=self._serve, args=(job,), name=name, daemon=True)
        if _NOWAIT:
            try:
                _start_nowait(thread)
            except Exception as exc:  # e.g. "can't start new thread": the attempt fails
                failed(exc)
            return
        with self._lock:
            if self._starter is None:
                self._starter = queue.SimpleQueue()
                threading.Thread(
                    target=self._start_from_helper,
                    args=(self._starter,),
                    name="deferrun-starter",
                    daemon=True,
                ).start()
        self._starter.put(job)

    def close(self) -> None:
        """Let the idle threads exit (those still running attempts exit when they end)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for each in idle:
            each.inbox.put(None)

    def _start_from_helper(self, jobs: queue.SimpleQueue[Job]) -> None:
        while True:
            job = jobs.get()
            try:
                threading.Thread(target=self._serve, args=(job,), name=job[2], daemon=True).start()
            except BaseException as exc:  # e.g. "can't start new thread": the attempt fails
                job[3](exc)

    def _serve(self, first: Job) -> None:
        me = threading.current_thread()
        fresh = _Fresh(me) if self._reuse and _probe() else None
        idle = _Idle()
        job: Job | None = first
        while job is not None:
            run, done, name, _ = job
            me.name = name
            try:
                reusable = run()
            finally:
                done()  # the outcome is recorded now; cleaning (user __del__ code) may take long
            if not (reusable and fresh is not None and fresh.restore(me)):
                return
            job = self._next(idle)

    def _next(self, idle: _Idle) -> Job | None:
        with self._lock:
            if self._closed:
                return None
            self._idle.append(idle)
        try:
            return idle.inbox.get(timeout=IDLE_EXIT)
        except queue.Empty:
            with self._lock:
                if idle in self._idle:
                    self._idle.remove(idle)
                    return None
            return idle.inbox.get()  # handed a job just as the wait ran out


#: thread attributes the pure-Python ``_threading_local.local`` keeps per thread: its data
#: lives elsewhere, keyed by the thread object, and cannot be dropped from here
_PY_LOCAL_PREFIX = "_threading_local._localimpl."


class _Fresh:
    """What this thread looked like when it started, and how to make it look so again.

    Thread-local data, attributes set on the thread and trace or profile functions are reset.
    Any other per-thread state an attempt changed (signal mask, CPU affinity, nice, async
    generator hooks, coroutine origin tracking, a running event loop) ends the thread
    instead: no later attempt may inherit it.
    """

    __slots__ = ("attrs", "interpreter_state", "os_state", "profile", "trace")

    def __init__(self, me: threading.Thread) -> None:
        self.attrs = set(vars(me))
        self.trace, self.profile = sys.gettrace(), sys.getprofile()
        self.os_state = _os_state()
        self.interpreter_state = _interpreter_state()

    def restore(self, me: threading.Thread) -> bool:
        # Dropping thread-local data runs user __del__ code, which may set state again: drop
        # until nothing comes back (a few rounds), and only then check the rest.
        for _ in range(3):
            extra = set(vars(me)) - self.attrs
            if any(name.startswith(_PY_LOCAL_PREFIX) for name in extra):
                return False
            for name in extra:
                delattr(me, name)
            if not _drop_thread_locals():
                return False
            if not _has_thread_locals() and not set(vars(me)) - self.attrs:
                break
        else:
            return False
        if sys.gettrace() is not self.trace:
            sys.settrace(self.trace)
        if sys.getprofile() is not self.profile:
            sys.setprofile(self.profile)
        return (
            self.os_state == _os_state()
            and self.interpreter_state == _interpreter_state()
            and sys.gettrace() is self.trace
            and sys.getprofile() is self.profile
        )


def _has_thread_locals() -> bool:
    state = _thread_dict()
    return state is not None and any(
        isinstance(k, str) and k.startswith(_PREFIX or "\0") for k in state
    )


def _os_state() -> tuple[Any, ...]:
    """The calling thread's signal mask, CPU affinity and nice value (Linux: all per thread)."""
    mask = (
        signal.pthread_sigmask(signal.SIG_BLOCK, []) if hasattr(signal, "pthread_sigmask") else None
    )
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        nice: int | None = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    except (AttributeError, OSError):
        nice = None
    return mask, affinity, nice


def _interpreter_state() -> tuple[Any, ...]:
    return (
        sys.get_asyncgen_hooks(),
        sys.get_coroutine_origin_tracking_depth(),
        asyncio._get_running_loop(),
    )
