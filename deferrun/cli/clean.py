"""``deferrun db clean`` and the triggerer's ``--retention``: finished tasks do not pile up.

The deleting itself is a store program (:mod:`deferrun.store.retention`) run in short
batches; this module parses durations, prints reports and runs the periodic clean.
"""

from __future__ import annotations

import argparse
import re

import anyio
import structlog

from deferrun.core.models import FINISHED_STATES
from deferrun.process.liveness import outage
from deferrun.store import Store, open_store

log = structlog.get_logger("deferrun.retention")

_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd])\s*$", re.ASCII)
MAX_BATCH = 100_000
_UNIT = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``30s``, ``15m``, ``12h``, ``7d`` -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration; write a number and a unit: 30s, 15m, 12h or 7d"
        )
    return float(match.group(1)) * _UNIT[match.group(2)]


def parse_batch_size(text: str) -> int:
    """A batch size from 1 to :data:`MAX_BATCH` (one transaction must stay short)."""
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_BATCH):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a batch size; write a whole number from 1 to {MAX_BATCH:,}"
        )
    return int(text)


def clean_interval(retention: float) -> float:
    """How often the triggerer cleans: a 24th of the retention, between 10 s and 1 h."""
    return min(max(retention / 24, 10.0), 3600.0)


async def clean_periodically(store: Store, retention: float, batch_size: int = 500) -> None:
    """Run the clean every :func:`clean_interval` until cancelled; a failed run is logged
    and tried again at the next interval (retention must never stop a triggerer)."""
    interval = clean_interval(retention)
    log.info("retention on", older_than_seconds=retention, every_seconds=interval)
    while True:
        try:
            report = await store.clean_finished(retention, batch_size=batch_size)
        except Exception as exc:
            if not outage.failed("retention clean", exc):  # an outage is said once, there
                log.error("retention clean failed; trying again later", error=repr(exc))
        else:
            outage.ok()
            if report.deleted:
                log.info(
                    "retention clean",
                    deleted=report.deleted,
                    batches=report.batches,
                    seconds=round(report.seconds, 3),
                )
        await anyio.sleep(interval)


async def clean_command(args: argparse.Namespace) -> int:
    store = await open_store(args.db, create=False)
    try:
        report = await store.clean_finished(
            args.older_than,
            args.state or (),
            batch_size=args.batch_size,
            dry_run=args.dry_run,
        )
    finally:
        await store.close()
    if report.dry_run:
        print(f"would delete {report.deleted} finished task(s) (dry run; nothing deleted)")
    else:
        print(
            f"deleted {report.deleted} finished task(s) with their log lines in "
            f"{report.batches} batch(es), {report.seconds:.1f}s (longest batch "
            f"{report.longest_batch_seconds * 1000:.0f} ms)"
        )
    return 0


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """``deferrun db clean``."""
    db = sub.add_parser("db", parents=[common], help="database upkeep")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")
    p = db_sub.add_parser(
        "clean",
        parents=[common],
        help="delete finished tasks (and their log lines) that ended long enough ago",
    )
    p.add_argument(
        "--older-than",
        type=parse_duration,
        required=True,
        metavar="AGE",
        help="tasks that finished more than AGE ago: 30s, 15m, 12h, 7d",
    )
    p.add_argument(
        "--state",
        action="append",
        choices=sorted(str(s) for s in FINISHED_STATES),
        help="only tasks that ended in this state (repeat; default: every end state)",
    )
    p.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    p.add_argument(
        "--batch-size",
        type=parse_batch_size,
        default=500,
        metavar="N",
        help="tasks deleted per transaction (default 500); smaller holds locks shorter",
    )
