"""`deferrun tasks` starts without the process commands' modules: worker, triggerer and
metrics (aiohttp, prometheus_client) were most of a read-only command's start-up time (see
README, "Listing a large table")."""

from __future__ import annotations

import json
import subprocess
import sys

import anyio

from deferrun.store import open_store

PROCESS_ONLY = ["aiohttp", "prometheus_client", "deferrun.worker", "deferrun.triggerer"]
CHECK = """
import contextlib, io, json, sys
from deferrun.cli import commands as cli
with contextlib.redirect_stdout(io.StringIO()):
    code = cli.main(["tasks", "--db", sys.argv[1]])
print(json.dumps({"code": code, "loaded": [m for m in sys.argv[2:] if m in sys.modules]}))
"""


def test_read_only_command_skips_process_modules(db_url: str) -> None:
    async def create() -> None:
        await (await open_store(db_url)).close()

    anyio.run(create)
    out = subprocess.run(
        [sys.executable, "-c", CHECK, db_url, *PROCESS_ONLY],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    result = json.loads(out.splitlines()[-1])
    assert result == {"code": 0, "loaded": []}, result
