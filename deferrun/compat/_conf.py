"""``airflow.configuration.conf``: options from ``AIRFLOW__SECTION__KEY`` environment variables,
then a few deferrun defaults, then the caller's ``fallback``."""

from __future__ import annotations

import json
import os
from typing import Any

from deferrun.compat._exceptions import AirflowConfigException

_UNSET: Any = object()

#: deferrun is a deferrable runtime: providers' ``deferrable=conf.getboolean("operators",
#: "default_deferrable", fallback=False)`` defaults to True here (set the variable to change it)
DEFAULTS: dict[tuple[str, str], str] = {
    ("operators", "default_deferrable"): "True",
    ("core", "default_task_retries"): "0",
    ("core", "default_timezone"): "utc",
}


class DeferrunConf:
    """The subset of AirflowConfigParser provider code calls."""

    def _raw(self, section: str, key: str) -> str | None:
        value = os.environ.get(f"AIRFLOW__{section.upper()}__{key.upper()}")
        if value is not None:
            return value
        return DEFAULTS.get((section.lower(), key.lower()))

    def has_option(self, section: str, key: str) -> bool:
        return self._raw(section, key) is not None

    def get(self, section: str, key: str, fallback: Any = _UNSET, **_: Any) -> Any:
        value = self._raw(section, key)
        if value is not None:
            return value
        if fallback is not _UNSET:
            return fallback
        raise AirflowConfigException(
            f"option [{section}] {key} is not set: set AIRFLOW__{section.upper()}__"
            f"{key.upper()} or pass fallback="
        )

    def getboolean(self, section: str, key: str, fallback: Any = _UNSET, **kw: Any) -> Any:
        value = self.get(section, key, fallback=fallback, **kw)
        if not isinstance(value, str):
            return value
        lowered = value.strip().lower()
        if lowered in ("true", "t", "1", "yes", "on"):
            return True
        if lowered in ("false", "f", "0", "no", "off", ""):
            return False
        raise AirflowConfigException(
            f"option [{section}] {key} is {value!r}, not a boolean (True/False)"
        )

    def getint(self, section: str, key: str, fallback: Any = _UNSET, **kw: Any) -> Any:
        value = self.get(section, key, fallback=fallback, **kw)
        try:
            return int(value) if isinstance(value, str) else value
        except ValueError:
            raise AirflowConfigException(
                f"option [{section}] {key} is {value!r}, not an integer"
            ) from None

    def getfloat(self, section: str, key: str, fallback: Any = _UNSET, **kw: Any) -> Any:
        value = self.get(section, key, fallback=fallback, **kw)
        try:
            return float(value) if isinstance(value, str) else value
        except ValueError:
            raise AirflowConfigException(
                f"option [{section}] {key} is {value!r}, not a number"
            ) from None

    def getjson(self, section: str, key: str, fallback: Any = _UNSET, **kw: Any) -> Any:
        value = self.get(section, key, fallback=fallback, **kw)
        return json.loads(value) if isinstance(value, str) else value


conf = DeferrunConf()
