"""Real ``deferrun`` subprocesses for tests and benchmarks: their environment (the
repository root on PYTHONPATH, so they import ``tests.support.*`` user code by classpath), the
process with its output captured, and a bounded wait for a condition."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


#: what worker/triggerer/standalone subprocesses load user code from (they load only what
#: --import / DEFERRUN_IMPORTS names, plus deferrun and triggers); a test with its own module
#: passes DEFERRUN_IMPORTS=f"{TEST_IMPORTS},its_module"
TEST_IMPORTS = "tests.support"


def deferrun_env(db_url: str, pythonpath: Path | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["DEFERRUN_DB"] = db_url
    env["DEFERRUN_IMPORTS"] = TEST_IMPORTS
    env["DEFERRUN_DEAD_AFTER"] = extra.pop("dead_after", "3")
    paths = [str(REPO)]
    if pythonpath is not None:
        paths.insert(0, str(pythonpath))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Proc:
    """A real ``deferrun`` subprocess, its output captured to a file for post-mortems."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "deferrun", *args, "--log-format", "json"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=log_path.parent,
        )

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode


def wait_until(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.1, message: str = "condition"
) -> Any:
    """Poll ``predicate`` (bounded in time and count) until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")
