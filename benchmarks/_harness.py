"""Shared plumbing: start real deferrun processes, sample RSS/CPU, write JSON, print tables."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from deferrun.exceptions import ConfigError
from deferrun.process import loops
from tests.support.pgcluster import free_port  # the test suite's helpers (tests/support/)
from tests.support.services import FakeServices

REPO = Path(__file__).resolve().parent.parent

__all__ = ["FakeServices", "free_port"]


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loop": loops.choose(),  # the deferrun processes' event loop (--loop / DEFERRUN_LOOP)
    }


def env_for(db: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"DEFERRUN_DB": db, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
    env["DEFERRUN_IMPORTS"] = "benchmarks,tests.support"  # the user code the processes load
    env.update(extra)
    return env


class Process:
    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115
        self.popen = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "deferrun",
                *args,
                "--log-format",
                "json",
                "--log-level",
                "warning",
            ],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.ps = psutil.Process(self.popen.pid)

    def rss_mib(self) -> float:
        return self.ps.memory_info().rss / 2**20

    def cpu_seconds(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        self._log.close()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def summary_ms(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {
        "p50_ms": round(pct(ms, 50), 2),
        "p95_ms": round(pct(ms, 95), 2),
        "p99_ms": round(pct(ms, 99), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
        "n": len(ms),
    }


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    """Every benchmark writes only where its caller says: the committed results are opt-in."""
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="directory for the JSON (and PNG) results, created if missing; "
        "pass benchmarks/results only to replace the committed reference results",
    )
    parser.add_argument(
        "--loop",
        choices=loops.CHOICES,
        action=_LoopAction,
        help="event loop of the deferrun processes started (sets DEFERRUN_LOOP; default: "
        "$DEFERRUN_LOOP, else auto: uvloop when installed)",
    )


class _LoopAction(argparse.Action):
    def __call__(self, parser: Any, namespace: Any, value: Any, option: Any = None) -> None:
        try:
            loops.choose(value)
        except ConfigError as exc:
            parser.error(str(exc))
        os.environ[loops.LOOP_ENV] = value
        setattr(namespace, self.dest, value)


def prepare_out(out: Path) -> Path:
    """Create ``out`` before any process starts, so a bad path fails in a second, not after."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SystemExit(
            f"error: cannot create --out directory {out}: {exc.strerror or exc}; "
            "pass a writable directory"
        ) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise SystemExit(f"error: --out directory {out} is not writable; pass a writable directory")
    return out


def write_json(out: Path, name: str, data: dict[str, Any]) -> Path:
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def wait_for(predicate: Any, timeout: float, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"benchmark condition not met within {timeout}s")


class DbWatch:
    """One store kept open on a background event loop, for the many polls a run makes.

    Opening a store per poll (a new connection, on PostgreSQL a new server process) cost
    the harness and the database CPU that the measured processes share on this machine.
    """

    def __init__(self, db: str) -> None:
        from anyio.from_thread import start_blocking_portal

        from deferrun.store import open_store

        self._portal_cm = start_blocking_portal()
        self.portal = self._portal_cm.__enter__()
        try:
            self.store = self.portal.call(open_store, db)
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            raise

    def counts(self) -> dict[str, int]:
        return self.portal.call(self.store.count_tasks)

    def call(self, fn: Any, *args: Any) -> Any:
        """``await fn(store, *args)`` on the watch's loop."""
        return self.portal.call(fn, self.store, *args)

    def close(self) -> None:
        try:
            self.portal.call(self.store.close)
        finally:
            self._portal_cm.__exit__(None, None, None)


def database_cpu_seconds(db: str) -> float | None:
    """CPU seconds used so far by the PostgreSQL cluster serving ``db`` (its postmaster, the
    server processes that ended, and those still running); None for SQLite, whose work is
    counted in the processes that use it."""
    if not db.startswith("postgres"):
        return None
    port = db.split("@", 1)[-1].split("/", 1)[0].rsplit(":", 1)[-1]
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if proc.info["name"] == "postgres" and "-p" in cmd and port in cmd:
            try:
                own = proc.cpu_times()
                total = own.user + own.system + own.children_user + own.children_system
                for child in proc.children(recursive=True):
                    try:
                        t = child.cpu_times()
                        total += t.user + t.system
                    except psutil.NoSuchProcess:
                        continue
                return total
            except psutil.NoSuchProcess:
                return None
    return None


def start_pg_cluster() -> Any:
    """A throwaway PostgreSQL cluster (the test suite's helper, tests/support/pgcluster.py)."""
    from tests.support.pgcluster import PgCluster, find_bindir

    bindir = find_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL server binaries not found: apt-get install postgresql")
    cluster = PgCluster(bindir)
    cluster.init()
    cluster.start()
    return cluster
