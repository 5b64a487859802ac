"""HTTP trigger: fires when an endpoint answers 2xx (and, optionally, a JSON field matches)."""

from __future__ import annotations

from typing import Any

from deferrun.basetrigger import PollingTrigger, TriggerEvent
from deferrun.connections import redact
from deferrun.exceptions import TransientError
from deferrun.shared_clients import dotted, http_session, join_url

MAX_BODY = 1_000_000
NOT_YET = {404, 408, 425, 429}


def check_response(body: Any, check: dict[str, Any] | None) -> bool:
    """The declarative check: ``{"field": "a.b", "equals": x}``, ``"in": [..]`` or
    ``"exists": true`` against the decoded JSON body."""
    if not check:
        return True
    field = check.get("field", "")
    try:
        value = dotted(body, field)
    except (KeyError, IndexError, TypeError):
        return check.get("exists") is False
    if "equals" in check:
        return bool(value == check["equals"])
    if "in" in check:
        return value in check["in"]
    if "exists" in check:
        return bool(check["exists"])
    return bool(value)


def validate_check(check: dict[str, Any] | None) -> None:
    if check is None:
        return
    if not isinstance(check, dict) or "field" not in check:
        raise ValueError(
            'response_check must be like {"field": "status", "equals": "done"} '
            '(or "in": [...], or "exists": true)'
        )
    unknown = set(check) - {"field", "equals", "in", "exists"}
    if unknown:
        raise ValueError(f"response_check has unknown keys {sorted(unknown)}")


async def request(
    http_conn_id: str,
    method: str,
    endpoint: str,
    headers: dict[str, str] | None,
    data: Any,
    what: str,
) -> tuple[int, Any]:
    """One request on the connection's shared session: (status, decoded body).

    Connection errors and timeouts become TransientError; the body is JSON when it parses,
    text otherwise.
    """
    import aiohttp

    session, conn = await http_session(http_conn_id)
    url = join_url(conn, endpoint)
    kwargs: dict[str, Any] = {"headers": headers}
    if data is not None:
        kwargs["json" if isinstance(data, dict | list) else "data"] = data
    try:
        async with session.request(method, url, **kwargs) as resp:
            raw = await resp.content.read(MAX_BODY)
            status = resp.status
            text = raw.decode(resp.charset or "utf-8", errors="replace")
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise TransientError(f"{what}: {type(exc).__name__}: {redact(str(exc))}") from None
    try:
        import json

        body: Any = json.loads(text) if text else None
    except ValueError:
        body = text
    return status, body


def raise_for_auth(status: int, body: Any, conn_id: str, what: str) -> None:
    if status in (401, 403):
        raise PermissionError(
            f"{what}: HTTP {status} {'unauthorized' if status == 401 else 'forbidden'}; check "
            f"the login/password of connection {conn_id!r}: {str(body)[:200]}"
        )


class HttpTrigger(PollingTrigger):
    """Polls ``endpoint`` on ``http_conn_id`` until it answers 2xx.

    404, 408, 429, 5xx and connection errors mean "not yet" (5xx and network errors back off);
    401/403 and other 4xx fail the task. ``response_check`` optionally requires a JSON field to
    match, e.g. ``{"field": "state", "equals": "ready"}``. Event: ``{"status": code, "body": ...}``.
    """

    def __init__(
        self,
        endpoint: str,
        http_conn_id: str = "http_default",
        method: str = "GET",
        headers: dict[str, str] | None = None,
        data: Any = None,
        poll_interval: float = 5.0,
        response_check: dict[str, Any] | None = None,
    ) -> None:
        validate_check(response_check)
        self.endpoint = endpoint
        self.http_conn_id = http_conn_id
        self.method = method.upper()
        self.headers = headers
        self.data = data
        self.poll_interval = poll_interval
        self.response_check = response_check

    async def poll(self) -> TriggerEvent | None:
        what = f"{self.method} {self.endpoint} on {self.http_conn_id!r}"
        status, body = await request(
            self.http_conn_id, self.method, self.endpoint, self.headers, self.data, what
        )
        raise_for_auth(status, body, self.http_conn_id, what)
        if status >= 500:
            raise TransientError(f"{what}: HTTP {status}")
        if status in NOT_YET:
            return None
        if not 200 <= status < 300:
            raise RuntimeError(f"{what}: HTTP {status}: {str(body)[:300]}")
        if not check_response(body, self.response_check):
            return None
        return TriggerEvent({"status": status, "body": body})
