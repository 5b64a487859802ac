"""HTTP trigger: fires when an endpoint answers 2xx (and, optionally, a JSON field matches)."""

from __future__ import annotations

import json
import time
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, NamedTuple

from deferrun.connections.clients import (
    auth_scheme,
    check_endpoint,
    dotted,
    http_session,
    join_url,
)
from deferrun.connections.redaction import redact
from deferrun.connections.uri import get_connection
from deferrun.core.basetrigger import PollingTrigger, TriggerEvent, check_interval
from deferrun.core.trigger_keys import digest
from deferrun.exceptions import TransientError

MAX_BODY_BYTES = 1_000_000
NOT_YET = {404, 425}
RETRY_AFTER_STATUSES = {429, 503}


class ResponseTooLarge(ValueError):
    """A response body is over the trigger's ``max_body_bytes``: fails the task, never
    truncated (a cut-off JSON body would be stored as a misleading string)."""


class Response(NamedTuple):
    status: int
    body: Any
    retry_after: float | None
    location: str | None = None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, moment.timestamp() - time.time())


def check_body_limit(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_body_bytes must be a whole number of bytes >= 1, got {value!r}")
    return value


def decode_body(raw: bytes, charset: str | None) -> Any:
    """JSON when the body parses as JSON, else text (undecodable bytes replaced)."""
    try:
        text = raw.decode(charset or "utf-8", errors="replace")
    except LookupError:  # the server named a charset Python does not know
        text = raw.decode("utf-8", errors="replace")
    if not text:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


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


async def fetch(
    http_conn_id: str,
    method: str,
    endpoint: str,
    headers: dict[str, str] | None,
    data: Any,
    what: str,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> Response:
    """One request on the connection's shared session, always to the connection's host.

    Connection errors and timeouts become TransientError; a body over ``max_body_bytes``
    raises ResponseTooLarge; the body is JSON when it parses, text otherwise.
    """
    import aiohttp

    session, conn = await http_session(http_conn_id)
    url = join_url(conn, endpoint)
    kwargs: dict[str, Any] = {"headers": headers}
    if data is not None:
        kwargs["json" if isinstance(data, dict | list) else "data"] = data
    too_large = ResponseTooLarge(
        f"{what}: the response body is over max_body_bytes={max_body_bytes:,} bytes; poll an "
        "endpoint that returns less, or raise max_body_bytes (the event is stored)"
    )
    try:
        async with session.request(method, url, allow_redirects=False, **kwargs) as resp:
            status = resp.status
            retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            location = resp.headers.get("Location")
            if (resp.content_length or 0) > max_body_bytes:
                raise too_large
            chunks: list[bytes] = []
            size = 0
            async for chunk in resp.content.iter_chunked(64 * 1024):
                size += len(chunk)
                if size > max_body_bytes:
                    raise too_large
                chunks.append(chunk)
            charset = resp.charset
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        error = TransientError(f"{what}: {type(exc).__name__}: {redact(str(exc))}")
        # no connection was made, so the server never saw the request (safe to send again
        # even for a POST that starts something)
        error.request_unsent = isinstance(exc, aiohttp.ClientConnectorError)  # type: ignore[attr-defined]
        raise error from None
    return Response(status, decode_body(b"".join(chunks), charset), retry_after, location)


async def request(
    http_conn_id: str,
    method: str,
    endpoint: str,
    headers: dict[str, str] | None,
    data: Any,
    what: str,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> tuple[int, Any]:
    """:func:`fetch` as ``(status, body)``."""
    response = await fetch(http_conn_id, method, endpoint, headers, data, what, max_body_bytes)
    return response.status, response.body


def excerpt(body: Any, limit: int = 300) -> str:
    """The start of a response body for an error message, secrets redacted."""
    return redact(str(body)[:limit])


def raise_for_redirect(status: int, location: str | None, what: str) -> None:
    """Redirects are not followed (they could lead away from the connection's host)."""
    if 300 <= status < 400:
        raise RuntimeError(
            f"{what}: HTTP {status} redirect to {redact(str(location))[:300]!r}, which is not "
            "followed; point the connection and endpoint at the final location"
        )


def raise_transient(status: int, retry_after: float | None, what: str) -> None:
    """TransientError for 5xx, 408 and 429 (Retry-After honoured on 429 and 503)."""
    if status >= 500 or status in (408, 429):
        wait = retry_after if status in RETRY_AFTER_STATUSES else None
        hint = f"; the server asks to retry after {wait:g}s" if wait is not None else ""
        raise TransientError(f"{what}: HTTP {status}{hint}", retry_after=wait)


def raise_for_auth(status: int, body: Any, conn_id: str, what: str) -> None:
    if status in (401, 403):
        raise PermissionError(
            f"{what}: HTTP {status} {'unauthorized' if status == 401 else 'forbidden'}; "
            f"{describe_auth(conn_id)}: {excerpt(body, 200)}"
        )


def describe_auth(conn_id: str) -> str:
    """What a 401 should tell: which auth scheme was sent and which URI field to check."""
    try:
        conn = get_connection(conn_id)
        scheme = auth_scheme(conn)
    except Exception as exc:  # the request was made, so this is unlikely; say so, don't hide it
        return f"check connection {conn_id!r} ({type(exc).__name__}: {redact(str(exc))})"
    if scheme == "basic":
        if not conn.login:
            return (
                f"connection {conn_id!r} sent no credentials (no login); add login:password, "
                "or the token as password with ?auth=token or ?auth=bearer"
            )
        return (
            f"connection {conn_id!r} sent Basic auth; check its login/password, or set "
            "?auth=token or ?auth=bearer if the API expects a token"
        )
    return (
        f"connection {conn_id!r} sent 'Authorization: {scheme.capitalize()} ***' (auth={scheme}); "
        "check the token in its password field, or the auth scheme"
    )


class HttpTrigger(PollingTrigger):
    """Polls ``endpoint`` on ``http_conn_id`` until it answers 2xx.

    ``endpoint`` is a path (and query) joined to the connection's base URL as
    ``base + "/" + endpoint``; a full URL or a ``..`` segment is refused, so the connection's
    credentials only ever go to its own host. 404 and 425 mean "not yet"; 408, 429, 5xx and
    connection errors back off (at least ``Retry-After`` on 429/503); 401/403 and other 4xx
    fail the task, and so does a body over ``max_body_bytes``. ``response_check`` optionally
    requires a JSON field to match, e.g. ``{"field": "state", "equals": "ready"}``.
    Event: ``{"status": code, "body": ...}`` (redirects are not followed).
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
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        validate_check(response_check)
        self.endpoint = check_endpoint(endpoint)
        self.http_conn_id = http_conn_id
        self.method = method.upper()
        self.headers = headers
        self.data = data
        self.poll_interval = check_interval(poll_interval)
        self.response_check = response_check
        self.max_body_bytes = check_body_limit(max_body_bytes)

    def shared_poll_key(self) -> str:
        """Identical requests (connection, method, endpoint, headers, body) share one."""
        return request_key(
            self.http_conn_id,
            self.method,
            self.endpoint,
            self.headers,
            self.data,
            self.max_body_bytes,
        )

    async def poll(self) -> TriggerEvent | None:
        return answer_of(await type(self).poll_many([self]))

    @classmethod
    async def poll_many(cls, triggers: list[Any]) -> list[TriggerEvent | BaseException | None]:
        """One request for every trigger of a shared poll; each checks the response itself."""
        first = triggers[0]
        what = f"{first.method} {first.endpoint} on {first.http_conn_id!r}"
        status, body, retry_after, location = await fetch(
            first.http_conn_id,
            first.method,
            first.endpoint,
            first.headers,
            first.data,
            what,
            first.max_body_bytes,
        )
        raise_for_auth(status, body, first.http_conn_id, what)
        raise_transient(status, retry_after, what)
        raise_for_redirect(status, location, what)
        if status in NOT_YET:
            return [None] * len(triggers)
        if not 200 <= status < 300:
            raise RuntimeError(f"{what}: HTTP {status}: {excerpt(body)}")
        return [
            TriggerEvent({"status": status, "body": body})
            if check_response(body, t.response_check)
            else None
            for t in triggers
        ]


def request_key(
    conn_id: str, method: str, endpoint: str, headers: Any, data: Any, max_body: int
) -> str:
    """The shared-poll key of one HTTP request; headers and body only as a digest."""
    extra = f" h={digest(headers)}" if headers else ""
    extra += f" b={digest(data)}" if data is not None else ""
    return f"{conn_id} {method} /{endpoint}{extra} max={max_body}"


def answer_of(results: list[TriggerEvent | BaseException | None]) -> TriggerEvent | None:
    """The one result of ``poll_many([self])`` as ``poll()`` returns it."""
    [result] = results
    if isinstance(result, BaseException):
        raise result
    return result


__all__ = [
    "HttpTrigger",
]
