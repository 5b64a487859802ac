"""The aiohttp application of ``deferrun web``: HTML pages, ``/api/...`` JSON, and actions.

Read-only unless started with a token. Actions then need either ``Authorization: Bearer
TOKEN`` (scripts) or a signed-in browser: ``/login`` checks the token and sets a
``SameSite=Strict`` HttpOnly cookie; each action form carries a CSRF field derived from that
cookie, and a form post whose ``Origin`` (or ``Referer``) is not this server is refused. Every
action is logged with the remote address and time, and written to the task's own log lines.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import secrets
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

import jinja2
import msgspec
import structlog
from aiohttp import web

from deferrun.core.models import FINISHED_STATES
from deferrun.exceptions import TaskNotFound
from deferrun.store import Store
from deferrun.store.base import is_connection_error
from deferrun.web import data, graph

log = structlog.get_logger("deferrun.web")

COOKIE = "deferrun_web"
SESSION_SECONDS = 12 * 3600
# refused credentials: after FAILURES within WINDOW seconds, an address is refused (429) for
# LOCKOUT seconds, so the token cannot be guessed at network speed
FAILURES, WINDOW, LOCKOUT = 5, 60.0, 60.0
STORE: web.AppKey[Store] = web.AppKey("store", Store)  # type: ignore[type-abstract]
CONFIG: web.AppKey[dict[str, Any]] = web.AppKey("config", dict)
SAMPLER: web.AppKey[data.Sampler] = web.AppKey("sampler", data.Sampler)


def _dt(value: Any) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S")
    return "-" if value is None else str(value)


def _pretty(value: Any) -> str:
    return json.dumps(msgspec.to_builtins(value, enc_hook=repr), indent=2, default=repr)


_templates = jinja2.Environment(
    loader=jinja2.PackageLoader("deferrun.web", "templates"),
    autoescape=jinja2.select_autoescape(["html"]),
    undefined=jinja2.StrictUndefined,
)
_templates.filters.update(age=data.age, dt=_dt, pretty=_pretty)
_templates.globals.update(states=data.STATES)


def _json(value: Any, status: int = 200) -> web.Response:
    body = msgspec.json.encode(value, enc_hook=repr)
    return web.Response(body=body, status=status, content_type="application/json")


# -- who may act --------------------------------------------------------------------------


def _sign(token: str, what: str) -> str:
    return hmac.new(
        token.encode(), what.encode("utf-8", "surrogatepass"), hashlib.sha256
    ).hexdigest()


def _same(given: str, expected: str) -> bool:
    """Constant-time equality of two strings of any characters (compare_digest refuses
    non-ASCII str, which a visitor controls)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode())


def _session_cookie(token: str, sid: str, expires: int) -> str:
    return f"{sid}.{expires}.{_sign(token, f'session:{sid}:{expires}')}"


def _session(request: web.Request) -> str | None:
    """The signed-in browser's session id, if its cookie is valid and has not expired (the
    expiry is in the signed value; a malformed cookie is no session)."""
    token = request.app[CONFIG]["token"]
    sid, _, rest = request.cookies.get(COOKIE, "").partition(".")
    expires = rest.partition(".")[0]
    if not (token and sid and expires.isascii() and expires.isdigit()):
        return None
    if _same(rest, _session_cookie(token, sid, int(expires)).partition(".")[2]) and (
        int(expires) > time.time()
    ):
        return sid
    return None


def _throttled(request: web.Request) -> bool:
    """True while this remote address is locked out for refused credentials."""
    locked = request.app[CONFIG]["locked"]
    until = locked.get(request.remote or "?", 0.0)
    if until and until <= time.monotonic():
        del locked[request.remote or "?"]
        return False
    return bool(until)


def _refused(request: web.Request, what: str) -> None:
    """Count a refused credential (logged without it); lock the address out after too many."""
    remote = request.remote or "?"
    now = time.monotonic()
    failures: dict[str, list[float]] = request.app[CONFIG]["failures"]
    recent = [t for t in failures.get(remote, []) if t > now - WINDOW] + [now]
    failures[remote] = recent
    if len(recent) >= FAILURES:
        del failures[remote]
        request.app[CONFIG]["locked"][remote] = now + LOCKOUT
        log.warning(
            "web: too many refused credentials; address locked out", remote=remote, seconds=LOCKOUT
        )
    log.warning("web credential refused", what=what, remote=remote)


# what a task page may say after an action: only these texts, chosen by code (?done=...), so
# a link cannot make the page say something else
DONE = {
    "cancelled": "cancelled",
    "retried": "retry: the task (and any downstream asked for) put back",
    "refused": "not done: the task has changed since the page was loaded; reload to see why",
}

TOO_MANY = "too many refused attempts from this address; try again in a minute"


def csrf_for(request: web.Request) -> str | None:
    sid = _session(request)
    token = request.app[CONFIG]["token"]
    return _sign(token, "csrf:" + sid) if sid and token else None


def _same_origin(request: web.Request) -> bool:
    source = request.headers.get("Origin") or request.headers.get("Referer")
    if not source or source == "null":
        return False
    return urlsplit(source).netloc == request.host


async def _authorize(request: web.Request, form: dict[str, Any] | None) -> str | None:
    """None when the request may act, else why not (shown to the user)."""
    token = request.app[CONFIG]["token"]
    if not token:
        return "this server is read-only: start `deferrun web` with --token to allow actions"
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        if _same(header[7:], token):
            return None
        _refused(request, "bearer token")
        return "wrong token in the Authorization header"
    if form is None:
        return "send Authorization: Bearer TOKEN"
    if not _same_origin(request):
        return "refused: the form was not posted from this server (Origin check)"
    expected = csrf_for(request)
    if expected is None:
        return "sign in with the token first (/login)"
    if not _same(str(form.get("csrf", "")), expected):
        return "refused: bad CSRF field; reload the page and try again"
    return None


# -- pages --------------------------------------------------------------------------------


def _page(request: web.Request, template: str, **context: Any) -> web.Response:
    config = request.app[CONFIG]
    html = _templates.get_template(template).render(
        read_only=not config["token"],
        signed_in=_session(request) is not None,
        csrf=csrf_for(request),
        path=request.path_qs,
        **context,
    )
    return web.Response(text=html, content_type="text/html")


async def overview_page(request: web.Request) -> web.Response:
    view = await data.overview(request.app[STORE], request.app[SAMPLER])
    history = list(request.app[SAMPLER].history)
    return _page(request, "overview.html", view=view, chart=data.chart_svg(history))


async def tasks_page(request: web.Request) -> web.Response:
    try:
        view = await data.tasks(request.app[STORE], dict(request.query))
    except ValueError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    return _page(request, "tasks.html", view=view)


async def task_page(request: web.Request) -> web.Response:
    task_id = request.match_info["task_id"]
    view = await data.task(request.app[STORE], task_id)
    if view is None:
        raise web.HTTPNotFound(text=f"no task {task_id!r} in this database")
    done = request.query.get("done", "")
    drawn = await graph.walk(request.app[STORE], task_id)
    pipeline = graph.svg(drawn) if drawn is not None and len(drawn.nodes) > 1 else None
    return _page(
        request,
        "task.html",
        task=view,
        message=DONE.get(done),
        pipeline_svg=pipeline,
        pipeline_cut=drawn.cut if drawn is not None else [],
    )


async def triggers_page(request: web.Request) -> web.Response:
    view = await data.triggers(request.app[STORE], request.query.get("classpath"))
    return _page(request, "triggers.html", view=view)


async def login_page(request: web.Request) -> web.Response:
    return _page(request, "login.html", error=None, next=request.query.get("next", "/"))


def _local_path(target: str) -> str:
    """``target`` if it is a path of this app (rebuilt from its path and query), else ``/``.

    Browsers and URL libraries drop tabs and newlines and read ``\\`` as ``/``, so
    ``/\t/evil.example`` would become ``//evil.example``: any of those refuses the target."""
    if any(c < " " or c in "\x7f\\" for c in target):
        return "/"
    parts = urlsplit(target)
    path = parts.path
    if parts.scheme or parts.netloc or not path.startswith("/") or path.startswith("//"):
        return "/"
    return path + (f"?{parts.query}" if parts.query else "")


async def login_post(request: web.Request) -> web.Response:
    form = dict(await request.post())
    token = request.app[CONFIG]["token"]
    target = _local_path(str(form.get("next") or "/"))
    if _throttled(request):
        raise web.HTTPTooManyRequests(text=TOO_MANY)
    given = str(form.get("token", ""))
    if not token or not _same_origin(request) or not _same(given, token):
        _refused(request, "sign-in")
        return _page(request, "login.html", error="wrong token (or not same origin)", next=target)
    sid = secrets.token_hex(16)
    response = web.HTTPSeeOther(target)
    cookie = _session_cookie(token, sid, int(time.time() + SESSION_SECONDS))
    response.set_cookie(COOKIE, cookie, httponly=True, samesite="Strict", max_age=SESSION_SECONDS)
    log.info("web sign-in", remote=request.remote)
    raise response


async def logout_post(request: web.Request) -> web.Response:
    """Forget this browser's session (same-origin posts only, so no page elsewhere can)."""
    if not _same_origin(request):
        raise web.HTTPForbidden(text="refused: the form was not posted from this server")
    response = web.HTTPSeeOther("/")
    response.del_cookie(COOKIE)
    raise response


# -- JSON ---------------------------------------------------------------------------------


async def overview_api(request: web.Request) -> web.Response:
    return _json(await data.overview(request.app[STORE], request.app[SAMPLER]))


async def tasks_api(request: web.Request) -> web.Response:
    try:
        limit = min(max(int(request.query.get("limit", "50")), 1), 500)
        return _json(await data.tasks(request.app[STORE], dict(request.query), limit))
    except ValueError as exc:
        return _json({"error": str(exc)}, 400)


async def task_api(request: web.Request) -> web.Response:
    view = await data.task(request.app[STORE], request.match_info["task_id"])
    if view is None:
        return _json({"error": "no such task"}, 404)
    return _json(view)


async def logs_api(request: web.Request) -> web.Response:
    text = request.query.get("after", "0")
    after = int(text) if text.isascii() and text.isdigit() and len(text) <= 19 else -1
    if not 0 <= after < 2**63:
        return _json({"error": "after must be a log line id (an integer from 0)"}, 400)
    return _json(await data.logs(request.app[STORE], request.match_info["task_id"], after))


async def triggers_api(request: web.Request) -> web.Response:
    return _json(await data.triggers(request.app[STORE], request.query.get("classpath")))


# -- actions ------------------------------------------------------------------------------


async def _act(request: web.Request, action: str, downstream: bool) -> list[str]:
    store = request.app[STORE]
    task_id = request.match_info["task_id"]
    info = await store.get_task(task_id)
    if info is None:
        raise TaskNotFound(f"no task {task_id!r} in this database")
    if action == "cancel":
        if info.state in FINISHED_STATES:
            raise ValueError(f"task {task_id} already ended {info.state}; nothing to cancel")
        after = await store.cancel_task(task_id)
        if after is None or str(after.state) != "cancelled":
            raise ValueError(f"task {task_id} ended before it could be cancelled")
        touched = [task_id]
    else:
        touched = await store.retry_task(task_id, downstream=downstream)
    who = request.remote or "?"  # never X-Forwarded-For: any client can send it
    at = datetime.now(UTC).isoformat(timespec="seconds")
    what = action + (" with downstream" if downstream else "")
    log.info("web action", action=what, task_id=task_id, remote=who, at=at, touched=touched)
    await store.append_task_logs(
        [(task_id, time.time(), "web", f"{what} by {who} at {at} (deferrun web)")], keep=2000
    )
    return touched


async def action_api(request: web.Request) -> web.Response:
    if _throttled(request):
        return _json({"error": TOO_MANY}, 429)
    refusal = await _authorize(request, None)
    if refusal:
        log.warning("web action refused", remote=request.remote, why=refusal)
        return _json({"error": refusal}, 403)
    action = request.match_info["action"]
    try:
        touched = await _act(request, action, request.query.get("downstream") in ("1", "true"))
    except TaskNotFound as exc:
        return _json({"error": str(exc)}, 404)
    except ValueError as exc:
        return _json({"error": str(exc)}, 409)
    return _json({"action": action, "task_ids": touched})


async def action_form(request: web.Request) -> web.Response:
    form = dict(await request.post())
    task_id = request.match_info["task_id"]
    refusal = await _authorize(request, form)
    if refusal:
        log.warning("web action refused", task_id=task_id, remote=request.remote, why=refusal)
        raise web.HTTPForbidden(text=refusal)
    action = request.match_info["action"]
    if form.get("confirm") != "yes":  # the first click: say what it does, act on the second
        return await _confirm_page(request, action, task_id, form.get("downstream") == "1")
    try:
        await _act(request, action, form.get("downstream") == "1")
        done = "cancelled" if action == "cancel" else "retried"
    except (TaskNotFound, ValueError) as exc:
        log.warning("web action not done", action=action, task_id=task_id, why=str(exc))
        done = "refused"
    raise web.HTTPSeeOther(f"/tasks/{task_id}?{urlencode({'done': done})}")


async def _confirm_page(
    request: web.Request, action: str, task_id: str, downstream: bool
) -> web.Response:
    """What a cancel or retry would do, with the form (same CSRF field) that does it: one
    click on the task page never acts, with or without JavaScript."""
    view = await data.task(request.app[STORE], task_id)
    if view is None:
        raise web.HTTPNotFound(text=f"no task {task_id!r} in this database")
    return _page(request, "confirm.html", task=view, action=action, downstream=downstream)


UNAVAILABLE = "database unavailable, retrying: this page works again once the database answers"


@web.middleware
async def unavailable(request: web.Request, handler: Any) -> web.StreamResponse:
    """A database that cannot be reached is a 503 saying so, not a bare 500."""
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except web.HTTPException:
        raise
    except Exception as exc:
        if not is_connection_error(exc):
            raise
        log.warning("web: database unavailable", path=request.path, error=repr(exc))
        if request.path.startswith("/api/"):
            return _json({"error": UNAVAILABLE}, 503)
        return web.Response(text=UNAVAILABLE, status=503, headers={"Retry-After": "5"})


def _host_name(header: str) -> str:
    """The name part of a Host header (``[::1]:8780`` -> ``::1``), lower-cased."""
    name = header.strip().lower()
    if name.startswith("["):
        return name[1:].partition("]")[0]
    if name.count(":") == 1:
        name = name.partition(":")[0]
    return name.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


WILDCARDS = ("", "0.0.0.0", "::")


def allowed_hosts(bind: str, extra: Sequence[str] = ()) -> frozenset[str]:
    """Host names this server answers to: its bind address (and ``localhost`` for a loopback
    one), plus ``--allowed-host``. A page of another name that resolves here (DNS
    rebinding) is refused."""
    names = {_host_name(bind)} | {_host_name(h) for h in extra if h}
    if bind in WILDCARDS or (_is_ip(bind) and ipaddress.ip_address(bind).is_loopback):
        names |= {"localhost", "127.0.0.1", "::1"}
    return frozenset(names - {""})


@web.middleware
async def host_check(request: web.Request, handler: Any) -> web.StreamResponse:
    """Refuse a Host header that is not this server's (400): a DNS-rebinding page in a
    browser would send its own name. Bound to every interface, any IP address is allowed (a
    rebinding page has a name, not an address)."""
    config = request.app[CONFIG]
    name = _host_name(request.headers.get("Host", ""))
    if name not in config["hosts"] and not (config["bind"] in WILDCARDS and _is_ip(name)):
        log.warning("web: Host header refused", host=name[:100], remote=request.remote)
        raise web.HTTPBadRequest(
            text=f"refused: Host {name[:100]!r} is not this server's address; start deferrun "
            f"web with --allowed-host {name[:100] or 'NAME'} to serve it under that name"
        )
    return await handler(request)  # type: ignore[no-any-return]


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every response, errors in plain text included: no MIME sniffing, no framing."""
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers.setdefault("X-Frame-Options", "DENY")


def build_app(
    store: Store,
    token: str | None,
    sampler: data.Sampler | None = None,
    *,
    host: str = "127.0.0.1",
    allowed: Sequence[str] = (),
) -> web.Application:
    """The app, answering to ``host`` (its bind address) and the ``allowed`` host names."""
    app = web.Application(middlewares=[host_check, unavailable])
    app.on_response_prepare.append(_security_headers)
    app[STORE] = store
    app[CONFIG] = {
        "token": token or "",
        "failures": {},
        "locked": {},
        "bind": host,
        "hosts": allowed_hosts(host, allowed),
    }
    app[SAMPLER] = sampler or data.Sampler(store)
    actions = "{action:cancel|retry}"
    app.router.add_get("/", overview_page)
    app.router.add_get("/tasks", tasks_page)
    app.router.add_get("/tasks/{task_id}", task_page)
    app.router.add_post(f"/tasks/{{task_id}}/{actions}", action_form)
    app.router.add_get("/triggers", triggers_page)
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login_post)
    app.router.add_post("/logout", logout_post)
    app.router.add_get("/api/overview", overview_api)
    app.router.add_get("/api/tasks", tasks_api)
    app.router.add_get("/api/tasks/{task_id}", task_api)
    app.router.add_get("/api/tasks/{task_id}/logs", logs_api)
    app.router.add_post(f"/api/tasks/{{task_id}}/{actions}", action_api)
    app.router.add_get("/api/triggers", triggers_api)
    return app
