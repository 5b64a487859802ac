"""The schema version both backends are at, and the numbered files that take them there.

Each backend keeps its migrations as SQL files in its own ``migrations`` folder:
``0001_initial.sql`` is the schema as version 1 created it, and ``000N_<what>.sql`` takes a
database from version N-1 to N. A new database runs every file in order, so a new database
and an upgraded one reach the current schema the same way.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources

#: the version both backends' migrations reach; a database at a higher one is refused
SCHEMA_VERSION = 10

_NAME = re.compile(r"(\d{4})_(\w+)\.sql")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migration_failed(where: str, version: int, exc: BaseException) -> str:
    """The one line a failed migration reports: the database is left as it was."""
    return (
        f"{where}: upgrading the deferrun schema from version {version} to {version + 1} "
        f"failed ({exc}); it is left at version {version}. It was likely made by a development "
        "build: restore it from a backup or start with a new database"
    )


@functools.cache
def migrations(package: str) -> tuple[Migration, ...]:
    """``package``'s migrations in order, one per version from 1 to SCHEMA_VERSION.

    A missing, doubled or extra version is an incomplete installation: refused here rather
    than leaving a database half upgraded.
    """
    found: dict[int, list[Migration]] = {}
    for entry in resources.files(package).joinpath("migrations").iterdir():
        match = _NAME.fullmatch(entry.name)
        if match:
            version = int(match[1])
            found.setdefault(version, []).append(Migration(version, match[2], entry.read_text()))
    numbers = sorted(v for v, files in found.items() for _ in files)
    if numbers != list(range(1, SCHEMA_VERSION + 1)):
        raise RuntimeError(
            f"{package}.migrations holds schema versions {numbers}, not 1 to {SCHEMA_VERSION} "
            "once each; this deferrun installation is incomplete - reinstall it"
        )
    return tuple(found[v][0] for v in numbers)
