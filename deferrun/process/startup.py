"""Start-up of worker/triggerer processes: which modules stored rows may name, and the store
guard that turns a fatal store error into a clean stop of the whole process."""

from __future__ import annotations

import inspect
import os
from typing import Any

import structlog

from deferrun.core import classpaths
from deferrun.exceptions import ConfigError, DeferrunError, StoreGone

log = structlog.get_logger("deferrun.cli")


class FatalGuard:
    """Wraps the store so that a fatal store error (the database file deleted or replaced)
    stops the whole process: the worker and triggerer loops retry every other error."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.fatal: DeferrunError | None = None
        self.on_fatal: Any = None

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name.startswith("_") or not inspect.iscoroutinefunction(attr):
            return attr

        async def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return await attr(*args, **kwargs)
            except StoreGone as exc:
                if self.fatal is None:
                    self.fatal = exc
                    log.error("stopping: the database is gone", error=str(exc))
                    if self.on_fatal is not None:
                        self.on_fatal()
                raise

        setattr(self, name, guarded)
        return guarded


def trusted_packages(imports: list[str] | None) -> list[str] | None:
    """``--import`` packages, else ``DEFERRUN_IMPORTS``; None when neither is given."""
    if imports:
        if not all(p.strip() for p in imports):
            raise ConfigError(
                "--import '' names no module: pass a package name (--import myflows), or leave "
                "the flag out to use DEFERRUN_IMPORTS"
            )
        return [p.strip() for p in imports]
    env = os.environ.get("DEFERRUN_IMPORTS", "")
    packages = [p.strip() for p in env.split(",") if p.strip()]
    return packages or None


def configure_trust(imports: list[str] | None) -> None:
    """Import the trusted packages and load stored classes only from them (plus deferrun and
    triggers). Without any, only deferrun and triggers load, as Celery's ``-A`` names the one
    app: a row naming another module fails its task with the flag to add, so whoever can
    write to the database cannot make this process import any installed module."""
    packages = trusted_packages(imports) or []
    if packages:
        classpaths.import_trusted(packages)
    classpaths.set_trusted_modules(packages)
    if packages:
        log.info("loading classes only from trusted packages", packages=list(packages))
    else:
        log.info(
            "no --import given: stored classes load only from deferrun and triggers; pass "
            "--import PKG (or DEFERRUN_IMPORTS=PKG,...) to run your own operators and triggers"
        )


# --------------------------------------------------------------------------- process commands
