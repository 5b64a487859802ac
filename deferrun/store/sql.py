"""Statements as data, and the two SQL dialects they are rendered into.

Every transition is written once, as a *program*: a generator that yields :class:`Run` (a
named statement with its parameters) and :class:`Notify`, receives each statement's rows, and
returns its result. A connector drives the program inside one transaction: SQLite runs it
whole on its database thread (one thread hop per transaction), PostgreSQL awaits each
statement on one connection. The backends therefore differ only in dialect, connection
handling and how they deliver wake-ups; no rule of the state machine lives in a backend.

Statements are written in a neutral dialect: ``:name`` parameters, ``{now}`` for the
database's clock in epoch seconds, ``{skip_locked}`` where PostgreSQL must not wait for rows
another claimer holds, ``{claim_lock}`` to serialize trigger claims, ``{lock}`` to hold a row
until the transaction ends, ``{binary}`` after ``ORDER BY id`` to lock rows in byte order (the
order Python sorts ids in, whatever the database's collation), ``IN_TEXTS(:p)``
and ``IN_INTS(:p)`` to match a list parameter, and ``{count}`` after a statement run once per
item (``many``) whose affected rows are counted.
"""

from __future__ import annotations

import re
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

Channel = Literal["tasks", "triggers"]
Row = Sequence[Any]
R = TypeVar("R")

_PARAM = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")
_IN_LIST = re.compile(r"IN_(TEXTS|INTS)\(:([a-z_][a-z0-9_]*)\)")


@dataclass(frozen=True, slots=True)
class Query:
    """A named statement in the neutral dialect; ``many`` runs it once per parameter set."""

    name: str
    text: str
    many: bool = False


@dataclass(frozen=True, slots=True)
class Run:
    """Run ``query``; the program receives its rows (or, for ``many``, ``[(count,)]``)."""

    query: Query
    params: Mapping[str, Any] | Sequence[Mapping[str, Any]]
    #: run once per parameter set (a list); the program receives every row of all of them
    each: bool = False


@dataclass(frozen=True, slots=True)
class Notify:
    """Wake the processes listening on ``channels`` once the transaction commits."""

    channels: tuple[Channel, ...]


#: a transaction body: yields statements and wake-ups, receives rows, returns its result
Program = Generator[Run | Notify, list[Row], R]


def states_sql(states: Any) -> str:
    """A set of task states as an SQL list literal: ``('failed', 'success')``."""
    return "(" + ", ".join(f"'{s}'" for s in sorted(states)) + ")"


def run(query: Query, **params: Any) -> Run:
    return Run(query, params)


def run_many(query: Query, items: Sequence[Mapping[str, Any]]) -> Run:
    return Run(query, list(items))


def run_each(query: Query, items: Sequence[Mapping[str, Any]]) -> Run:
    """``query`` once per item, every row returned: one round trip on PostgreSQL (pipelined)."""
    return Run(query, list(items), each=True)


@dataclass(frozen=True, slots=True)
class Rendered:
    """A statement in one backend's dialect: its text and the order of its parameters."""

    text: str
    names: tuple[str, ...]
    many: bool

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        return [params[n] for n in self.names]


class Dialect:
    """Renders neutral statements (cached per query) for one backend."""

    name: str
    now: str
    skip_locked: str
    lock: str
    count: str
    claim_lock: str
    binary: str

    def __init__(self) -> None:
        self._cache: dict[str, Rendered] = {}

    def render(self, query: Query) -> Rendered:
        hit = self._cache.get(query.name)
        if hit is None:
            text = query.text.format(
                now=self.now,
                skip_locked=self.skip_locked,
                lock=self.lock,
                count=self.count,
                claim_lock=self.claim_lock,
                binary=self.binary,
            )
            text = _IN_LIST.sub(lambda m: self.in_list(m.group(2), m.group(1) == "INTS"), text)
            hit = self._cache[query.name] = self._params(text, query.many)
        return hit

    def _params(self, text: str, many: bool) -> Rendered:
        raise NotImplementedError

    def in_list(self, param: str, ints: bool) -> str:
        raise NotImplementedError


class SQLiteDialect(Dialect):
    """sqlite3 takes ``:name`` parameters itself; the clock is a parameter set per statement.

    ``{now}`` is bound to the host's ``time.time()``: one host shares one clock.
    """

    name = "sqlite"
    now = ":now_"
    skip_locked = ""  # BEGIN IMMEDIATE already serializes writers
    lock = ""
    count = ""  # executemany reports its rowcount; RETURNING would zero it
    claim_lock = "SELECT 1"  # BEGIN IMMEDIATE already serializes claims
    binary = ""  # BINARY, byte order, is SQLite's default collation

    def _params(self, text: str, many: bool) -> Rendered:
        return Rendered(text, (), many)

    def in_list(self, param: str, ints: bool) -> str:
        return f"IN (SELECT value FROM json_each(:{param}))"  # the connector binds JSON


class PostgresDialect(Dialect):
    """asyncpg takes ``$n`` parameters; the clock is the server's, so hosts never disagree."""

    name = "postgres"
    now = "extract(epoch from clock_timestamp())::double precision"
    skip_locked = "FOR UPDATE SKIP LOCKED"
    lock = "FOR UPDATE"
    count = "RETURNING 1"  # fetchmany returns a row per affected row
    #: one trigger claim at a time across triggerers, so a group of identical triggers is
    #: never split by two claims racing (held to the end of the claim's transaction)
    claim_lock = "SELECT pg_advisory_xact_lock(7212012)"
    binary = ' COLLATE "C"'

    def in_list(self, param: str, ints: bool) -> str:
        return f"= ANY(:{param}::{'bigint' if ints else 'text'}[])"

    def _params(self, text: str, many: bool) -> Rendered:
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in names:
                names.append(name)
            return f"${names.index(name) + 1}"

        return Rendered(_PARAM.sub(number, text), tuple(names), many)


def drive_sync(program: Program[R], execute: Any) -> tuple[R, set[Channel]]:
    """Run ``program`` to completion with a synchronous ``execute(Run) -> rows``."""
    channels: set[Channel] = set()
    rows: list[Row] | None = None
    try:
        while True:
            step = program.send(rows)  # type: ignore[arg-type]
            if isinstance(step, Notify):
                channels.update(step.channels)
                rows = []
            else:
                rows = execute(step)
    except StopIteration as done:
        return done.value, channels
