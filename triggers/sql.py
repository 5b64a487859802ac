"""SQL trigger: fires when the first cell of the first row of a query is truthy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deferrun.basetrigger import PollingTrigger, TriggerEvent
from deferrun.connections import redact
from deferrun.exceptions import TransientError
from deferrun.shared_clients import pg_pool


class SqlTrigger(PollingTrigger):
    """Runs ``sql`` (PostgreSQL, asyncpg) every ``poll_interval`` seconds.

    ``parameters`` are bound as ``$1, $2, ...`` - never formatted into the SQL. Fires with the
    first row (as a dict) when its first cell is truthy. A SQL error or bad credentials fail
    the task with the database's message; lost connections are retried with backoff.
    """

    def __init__(
        self,
        sql: str,
        conn_id: str = "postgres_default",
        parameters: Sequence[Any] | None = None,
        poll_interval: float = 5.0,
    ) -> None:
        if isinstance(parameters, dict):
            raise ValueError(
                "parameters must be a list bound to $1, $2, ... (asyncpg has no named parameters)"
            )
        self.sql = sql
        self.conn_id = conn_id
        self.parameters = list(parameters or [])
        self.poll_interval = poll_interval

    async def poll(self) -> TriggerEvent | None:
        import asyncpg

        try:
            pool = await pg_pool(self.conn_id)
            row = await pool.fetchrow(self.sql, *self.parameters)
        except (
            asyncpg.InvalidPasswordError,
            asyncpg.InvalidAuthorizationSpecificationError,
        ) as exc:
            raise PermissionError(
                f"connection {self.conn_id!r} was refused by the database: {redact(str(exc))}"
            ) from None
        except asyncpg.PostgresError as exc:
            if isinstance(exc, asyncpg.PostgresConnectionError | asyncpg.CannotConnectNowError):
                raise TransientError(f"{self.conn_id!r}: {exc}") from None
            raise RuntimeError(
                f"SQL error on {self.conn_id!r}: {type(exc).__name__}: {exc}"
            ) from None
        except (OSError, TimeoutError, asyncpg.InterfaceError) as exc:
            raise TransientError(
                f"{self.conn_id!r}: {type(exc).__name__}: {redact(str(exc))}"
            ) from None
        if row is None or not row[0]:
            return None
        return TriggerEvent(dict(row.items()))
