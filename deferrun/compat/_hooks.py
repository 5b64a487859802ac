"""``BaseHook`` and ``Connection`` with Airflow's attribute names, built from
``DEFERRUN_CONN_<ID>`` URIs, so a user's own hook that calls ``get_connection`` ports as is."""

from __future__ import annotations

import json
import os
from typing import Any

import anyio
import structlog

from deferrun.compat._exceptions import AirflowNotFoundException
from deferrun.connections import redaction, uri
from deferrun.exceptions import ConfigError


class Connection:
    """Airflow's connection attributes: host, login, password, schema, port, conn_type, extra
    (JSON text) and extra_dejson (a dict: the URI's query, or its ``__extra__`` JSON)."""

    def __init__(
        self,
        conn_id: str | None = None,
        conn_type: str | None = None,
        description: str | None = None,
        host: str | None = None,
        login: str | None = None,
        password: str | None = None,
        schema: str | None = None,
        port: int | None = None,
        extra: str | dict[str, Any] | None = None,
    ) -> None:
        self.conn_id = conn_id
        self.conn_type = conn_type
        self.description = description
        self.host = host
        self.login = login
        self.password = password
        self.schema = schema
        self.port = port
        self.extra = json.dumps(extra) if isinstance(extra, dict) else extra
        redaction.register_secret(password)
        redaction.register_extra_secrets(self.extra_dejson)

    @property
    def extra_dejson(self) -> dict[str, Any]:
        if not self.extra:
            return {}
        try:
            value = json.loads(self.extra)
        except ValueError as exc:
            raise ConfigError(
                f"connection {self.conn_id!r}: its extra is not valid JSON ({exc})"
            ) from None
        return value if isinstance(value, dict) else {}

    def get_extra_dejson(self, nested: bool = False) -> dict[str, Any]:
        return self.extra_dejson

    @classmethod
    def from_deferrun(cls, conn: uri.Connection) -> Connection:
        extra: dict[str, Any] = dict(conn.extra)
        if "__extra__" in extra:  # Airflow's URI form: the whole extra as JSON
            try:
                decoded = json.loads(extra.pop("__extra__"))
            except ValueError as exc:
                raise ConfigError(
                    f"connection {conn.conn_id!r}: __extra__ is not valid JSON ({exc})"
                ) from None
            if isinstance(decoded, dict):
                extra.update(decoded)
        return cls(
            conn_id=conn.conn_id,
            conn_type=conn.conn_type.replace("-", "_"),
            host=conn.host,
            login=conn.login,
            password=conn.password,
            schema=conn.path.lstrip("/") or None,
            port=conn.port,
            extra=extra,
        )

    def get_uri(self) -> str:
        """The URI without its password (never log a URI with credentials)."""
        auth = f"{self.login}:***@" if self.login else ""
        port = f":{self.port}" if self.port else ""
        return f"{self.conn_type}://{auth}{self.host or ''}{port}/{self.schema or ''}"

    def __repr__(self) -> str:
        return f"Connection({self.conn_id!r}, {self.get_uri()})"


class BaseHook:
    """Base of users' own hooks. Only ``get_connection`` does anything: a hook builds its own
    clients from the connection it returns."""

    conn_name_attr: str = "conn_id"
    default_conn_name: str = "default_conn_id"
    conn_type: str = ""
    hook_name: str = ""

    def __init__(self, logger_name: str | None = None, **_: Any) -> None:
        self._log_name = logger_name or f"hook.{type(self).__qualname__}"

    @property
    def log(self) -> Any:
        return structlog.get_logger(self._log_name)

    @classmethod
    def get_connection(cls, conn_id: str) -> Connection:
        """The connection ``conn_id`` from ``DEFERRUN_CONN_<ID>``; AirflowNotFoundException
        (a ConfigError) when the variable is not set."""
        name = uri.env_var(conn_id)
        if not os.environ.get(name):
            raise AirflowNotFoundException(
                f"The conn_id `{conn_id}` isn't defined: set {name} to its URI "
                "(e.g. https://login:password@host:443/base?key=value) for the triggerer and "
                "the workers"
            )
        return Connection.from_deferrun(uri.get_connection(conn_id))

    @classmethod
    async def aget_connection(cls, conn_id: str) -> Connection:
        return await anyio.to_thread.run_sync(cls.get_connection, conn_id)

    @classmethod
    def get_hook(cls, conn_id: str, hook_params: dict[str, Any] | None = None) -> Any:
        raise NotImplementedError(
            "BaseHook.get_hook needs Airflow's hook registry; build your hook class directly"
        )

    def get_conn(self) -> Any:
        raise NotImplementedError(f"{type(self).__qualname__} must implement get_conn()")

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        return {}

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {}
