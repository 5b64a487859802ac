"""SQL trigger: fires when the first cell of the first row of a query is truthy."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Any

from deferrun.connections.clients import pg_pool
from deferrun.connections.redaction import redact
from deferrun.core.basetrigger import PollingTrigger, TriggerEvent, check_interval
from deferrun.core.trigger_keys import digest
from deferrun.exceptions import ConfigError, TransientError

# Raised before any byte reaches the server, by options in the connection's URI (asyncpg's
# ClientConfigurationError is also a ValueError) or a certificate/key file it names: retrying
# cannot help.
CONFIG_ERRORS = (
    ValueError,
    TypeError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
)


def _transient_server_errors() -> tuple[type[BaseException], ...]:
    import asyncpg

    return (
        asyncpg.PostgresConnectionError,
        asyncpg.CannotConnectNowError,
        asyncpg.TooManyConnectionsError,
        asyncpg.AdminShutdownError,
        asyncpg.CrashShutdownError,
    )


class SqlTrigger(PollingTrigger):
    """Runs ``sql`` (PostgreSQL, asyncpg) every ``poll_interval`` seconds.

    ``parameters`` are bound as ``$1, $2, ...`` - never formatted into the SQL. Fires with the
    first row (as a dict) when its first cell is truthy. A SQL error, bad credentials or a
    connection misconfigured on our side (bad ``sslmode``, unknown option, missing certificate
    file) fail the task with a clear message; only lost or refused connections are retried.
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
        self.poll_interval = check_interval(poll_interval)

    async def _connect(self) -> tuple[Any, Any]:
        """(pool, connection); classifies what can go wrong before the query is sent."""
        import asyncpg

        try:
            pool = await pg_pool(self.conn_id)
            return pool, await pool.acquire()
        except (
            asyncpg.InvalidPasswordError,
            asyncpg.InvalidAuthorizationSpecificationError,
        ) as exc:
            raise PermissionError(
                f"connection {self.conn_id!r} was refused by the database: {redact(str(exc))}"
            ) from None
        except CONFIG_ERRORS as exc:
            raise ConfigError(
                f"connection {self.conn_id!r} is misconfigured: {type(exc).__name__}: "
                f"{redact(str(exc))}; fix the options in its URI (DEFERRUN_CONN_...)"
            ) from None
        except ssl.SSLCertVerificationError as exc:
            raise PermissionError(
                f"connection {self.conn_id!r}: the server's TLS certificate was not trusted "
                f"({redact(str(exc))}); fix sslmode/sslrootcert in its URI"
            ) from None
        except (asyncpg.PostgresError, OSError, TimeoutError, asyncpg.InterfaceError) as exc:
            raise self._classified(exc, f"connecting with {self.conn_id!r} failed") from None

    def _classified(self, exc: BaseException, what: str) -> Exception:
        """A server error worth retrying (or the connection lost) is transient; any other
        server error fails the task, with every secret redacted."""
        import asyncpg

        if isinstance(exc, asyncpg.PostgresError) and not isinstance(
            exc, _transient_server_errors()
        ):
            return RuntimeError(f"{what}: {type(exc).__name__}: {redact(str(exc))}")
        return TransientError(f"{self.conn_id!r}: {type(exc).__name__}: {redact(str(exc))}")

    def shared_poll_key(self) -> str:
        """The same SQL and parameters on one connection share one query."""
        return f"{self.conn_id} sql={digest(self.sql)} params={digest(self.parameters)}"

    async def poll(self) -> TriggerEvent | None:
        [result] = await type(self).poll_many([self])
        if isinstance(result, BaseException):
            raise result
        return result

    @classmethod
    async def poll_many(cls, triggers: list[Any]) -> list[TriggerEvent | BaseException | None]:
        """One query answers every trigger of a shared poll (they run the same SQL)."""
        event = await triggers[0]._query()
        return [event] * len(triggers)

    async def _query(self) -> TriggerEvent | None:
        import asyncpg

        pool, conn = await self._connect()
        try:
            row = await conn.fetchrow(self.sql, *self.parameters)
        except (ValueError, TypeError) as exc:  # raised by asyncpg's codecs, before sending
            raise ValueError(
                f"{self.conn_id!r}: the query's parameters were rejected: {type(exc).__name__}: "
                f"{redact(str(exc))}"
            ) from None
        except (asyncpg.PostgresError, OSError, TimeoutError, asyncpg.InterfaceError) as exc:
            raise self._classified(exc, f"SQL error on {self.conn_id!r}") from None
        finally:
            await pool.release(conn)
        if row is None or not row[0]:
            return None
        return TriggerEvent(dict(row.items()))


__all__ = [
    "SqlTrigger",
]
