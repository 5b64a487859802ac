"""The ``deferrun web`` command: options, and serving the app until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import os
import signal

import anyio
import structlog

from deferrun.exceptions import ConfigError
from deferrun.store import open_store

log = structlog.get_logger("deferrun.web")


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "web",
        parents=[common],
        help="serve a status page (HTML and JSON)",
        description="Serve a status page (HTML and JSON) of the database: read-only unless "
        "started with --token.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests for this host name (repeat for several), e.g. the name "
        "of a reverse proxy; any other Host header is refused (DNS rebinding). Default: only "
        "the --host address (and localhost for a loopback one)",
    )
    p.add_argument("--port", type=int, default=8780, help="port (default 8780)")
    p.add_argument(
        "--token",
        default=None,
        help="allow cancel/retry for whoever presents this token (default: "
        "$DEFERRUN_WEB_TOKEN; without one the server is read-only)",
    )


async def watch_database_file(store: object) -> None:
    """Stop the server (DatabaseFileGone: one line, exit code 2) once its SQLite file is
    deleted or replaced, as the other processes do: a status page must not go on showing a
    database no one else sees. Reads do not pass the store's write-time file check, so this
    looks every second."""
    from deferrun.store.sqlite import file as sqlite_file

    guard = getattr(getattr(store, "db", None), "_guard", None)
    if not isinstance(guard, sqlite_file.FileGuard):
        return  # PostgreSQL: nothing to watch
    while True:
        await anyio.sleep(sqlite_file.CHECK_INTERVAL)
        guard.check(force=True)


async def serve_command(args: argparse.Namespace) -> int:
    from aiohttp import web

    from deferrun.web import data
    from deferrun.web.app import SAMPLER, build_app

    token = args.token or os.environ.get("DEFERRUN_WEB_TOKEN") or None
    data.register_env_secrets()
    store = await open_store(args.db, create=False)
    runner: web.AppRunner | None = None
    try:
        app = build_app(store, token, host=args.host, allowed=args.allowed_host)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(
                f"--port {args.port}: cannot listen on {args.host}:{args.port} "
                f"({exc.strerror or exc}); pick a free port or stop what uses it"
            ) from None
        log.info(
            "status page listening",
            url=f"http://{args.host}:{args.port}/",
            actions="enabled (token)" if token else "read-only",
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(app[SAMPLER].run)
            tg.start_soon(watch_database_file, store)
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    break
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            if runner is not None:
                await runner.cleanup()
            await store.close()
    return 0
