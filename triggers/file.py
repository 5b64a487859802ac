"""File trigger: fires when a path or glob pattern matches something on disk."""

from __future__ import annotations

import glob
import os
from collections.abc import AsyncIterator

import anyio
import anyio.to_thread

from deferrun.core.basetrigger import BaseTrigger, TriggerEvent, check_interval

MAX_PATHS = 1000


def match_paths(filepath: str, recursive: bool = False) -> list[str]:
    """Sorted matches of ``filepath`` (a path or glob); blocking, so call it off the loop."""
    if not glob.has_magic(filepath):
        return [filepath] if os.path.exists(filepath) else []
    return sorted(glob.iglob(filepath, recursive=recursive))


class FileTrigger(BaseTrigger):
    """Fires when ``filepath`` exists, or a glob matches (``**`` needs ``recursive=True``).

    The event payload is the sorted list of matched paths (at most 1,000). Directory scans run
    in a worker thread, so a huge directory never stalls the other triggers.
    """

    def __init__(self, filepath: str, recursive: bool = False, poll_interval: float = 5.0) -> None:
        if not isinstance(filepath, str) or not filepath:
            raise ValueError(f"filepath must be a non-empty string, got {filepath!r}")
        self.filepath = filepath
        self.recursive = recursive
        self.poll_interval = check_interval(poll_interval)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while True:
            found = await anyio.to_thread.run_sync(match_paths, self.filepath, self.recursive)
            if found:
                self.log.info("file matched", filepath=self.filepath, matches=len(found))
                yield TriggerEvent(found[:MAX_PATHS])
                return
            await anyio.sleep(self.poll_interval)


__all__ = [
    "FileTrigger",
]
