"""Which event loop the long-running processes use: uvloop when it is installed, else asyncio.

``DEFERRUN_LOOP=auto|uvloop|asyncio`` (default auto) decides. uvloop is an optional extra
(``pip install 'deferrun[uvloop]'``): it makes the loop's own work (callbacks, sockets, timers)
cheaper, and nothing in deferrun depends on which loop runs it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from typing import Any

from deferrun.exceptions import ConfigError

LOOP_ENV = "DEFERRUN_LOOP"
CHOICES = ("auto", "uvloop", "asyncio")


def choose(value: str | None = None) -> str:
    """``"uvloop"`` or ``"asyncio"`` for ``value`` (default: $DEFERRUN_LOOP, else auto)."""
    wanted = (value if value is not None else os.environ.get(LOOP_ENV, "")).strip().lower()
    wanted = wanted or "auto"
    if wanted not in CHOICES:
        raise ConfigError(f"{LOOP_ENV}={wanted!r} is not a loop; use one of {', '.join(CHOICES)}")
    installed = importlib.util.find_spec("uvloop") is not None
    if wanted == "uvloop" and not installed:
        raise ConfigError(
            f"{LOOP_ENV}=uvloop but uvloop is not installed; "
            "pip install 'deferrun[uvloop]' or set DEFERRUN_LOOP=asyncio"
        )
    if wanted == "asyncio" or not installed:
        return "asyncio"
    return "uvloop"


def backend_options(choice: str) -> dict[str, Any]:
    """``anyio.run(..., backend_options=...)`` for the chosen loop."""
    if choice == "uvloop":
        import uvloop

        return {"loop_factory": uvloop.new_event_loop}
    return {}


def running_loop_name() -> str:
    """The running loop's implementation, as logged at start (uvloop or asyncio)."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"
