"""Redaction: every secret a connection holds is registered here and replaced by ``***`` in
log lines, stored logs and task errors, wherever it would be printed or stored."""

from __future__ import annotations

import re
import threading
import traceback
from typing import Any
from urllib.parse import quote, unquote

from deferrun.core.config import redact_url

_SECRETS: set[str] = set()
_SECRETS_LOCK = threading.Lock()
_SECRET_RE: re.Pattern[str] | None = None


def register_secret(value: str | None) -> None:
    """Remember a secret so redact() hides it wherever it would be printed or stored."""
    global _SECRET_RE
    if not value or len(value) < 3:
        return
    with _SECRETS_LOCK:
        for form in (value, quote(value, safe="")):
            _SECRETS.add(form)
        ordered = sorted(_SECRETS, key=len, reverse=True)
        _SECRET_RE = re.compile("|".join(re.escape(s) for s in ordered))


def redact(text: str) -> str:
    pattern = _SECRET_RE
    return pattern.sub("***", text) if pattern is not None and text else text


def format_error(exc: BaseException) -> str:
    """The traceback as stored in the task row, with every known secret redacted."""
    return redact("".join(traceback.format_exception(exc)).rstrip())


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redact_value(v) for v in value)
    return value


def redact_processor(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: no registered secret reaches a log line."""
    if _SECRET_RE is None:
        return event_dict
    return {k: _redact_value(v) for k, v in event_dict.items()}


#: extra names whose values are secrets, matched with '-' read as '_' (x-api-key, api_key...)
_SECRET_NAME = re.compile(
    r"(^|_)pass(word|wd|phrase)?($|_)|password|secret|token|api_?key|private_?key|credential|"
    r"cookie|authorization|session_?id|signature"
)
#: names that describe a secret rather than hold one (token_type=bearer, token_url=...)
_NOT_SECRET = ("_type", "_url", "_uri", "_path", "_file", "_endpoint", "_expires", "_name")


def _secret_name(name: str) -> bool:
    name = name.replace("-", "_").lower()
    if name.startswith("header."):  # an HTTP header passed as an extra
        name = name[len("header.") :]
    return bool(_SECRET_NAME.search(name)) and not name.endswith(_NOT_SECRET)


def register_extra_secrets(extra: Any, secret: bool = False) -> None:
    """Register the values of secret-named extras, walking nested dicts and lists (an
    Airflow ``__extra__`` JSON); everything under a secret-named key counts as secret. A
    ``Bearer <token>`` style value also registers its token on its own."""
    if isinstance(extra, dict):
        for key, value in extra.items():
            register_extra_secrets(value, secret or (isinstance(key, str) and _secret_name(key)))
    elif isinstance(extra, list | tuple):
        for value in extra:
            register_extra_secrets(value, secret)
    elif secret and isinstance(extra, str):
        register_secret(extra)
        _, _, credential = extra.strip().partition(" ")
        if credential:
            register_secret(credential.strip())


def register_unparsed_uri(uri: str) -> None:
    """A URI urllib cannot parse may still hold a password (with an unencoded '/', '#' or '?'):
    register whatever looks like one, and its pieces, before reporting the error."""
    _, sep, rest = uri.partition("://")
    if not sep or "@" not in rest:
        return
    userinfo = rest.rsplit("@", 1)[0]
    _, colon, password = userinfo.partition(":")
    if not colon:
        return
    for candidate in (password, unquote(password), *re.split(r"[/#?:]", password)):
        register_secret(candidate)


# a secret-looking key, quoted or not (JSON, Python repr, YAML-ish, key=value), then its value:
# quoted (kept quoted, escapes allowed, also JSON escaped inside a string) or a bare word
_KEY = r"(?:password|passwd|pwd|secret|token|api_?key|access_?key|private_?key|credentials?)"
_SECRET_TEXT = re.compile(
    r"(?i)\b((?:bearer|token|basic)\s+)[A-Za-z0-9._~+/=-]{6,}"
    r"|((?:\\?[\"'])?\b[\w-]*" + _KEY + r"[\w-]*(?:\\?[\"'])?\s*[=:]\s*)"
    r"(\\\"(?:[^\\]|\\[^\"])*\\\"|\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|[^\s&,;'\"}\]\\]+)"
)


def _hide(match: re.Match[str]) -> str:
    if match.group(1):
        return match.group(1) + "***"
    value = match.group(3)
    quote = value[:2] if value.startswith("\\") else value[0] if value[0] in "\"'" else ""
    return match.group(2) + quote + "***" + quote


def redact_text(text: str) -> str:
    """Secrets in free text: URL passwords, ``password=..``, bearer/basic tokens, and every
    connection secret this process has seen. For text that a page, a JSON view or a stored
    column shows, which may quote an external API's error or a URL with its password."""
    if "://" in text:
        text = redact_url(text)
    text = _SECRET_TEXT.sub(_hide, text)
    return redact(text)
