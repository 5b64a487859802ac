"""Keys that let waiting tasks share work: the affinity key of identical triggers and the
key of the shared poll a trigger joins. Computed where a deferral is stored (worker, client)
and again in the triggerer, from the stored text alone, so both always agree."""

from __future__ import annotations

import hashlib
import json
from typing import Any

MAX_POLL_KEY_CHARS = 300
#: kwargs text longer than this is hashed as stored, not re-parsed (claims run on the loop):
#: identical triggers still match (one serializer writes them), only key order then counts
MAX_CANONICAL_CHARS = 64 * 1024


def shareable(cls: type) -> bool:
    """False when the class sets ``shareable = False``: its run() is not a pure function of
    its kwargs (it reads a clock, counts its own polls, holds per-task state), so two tasks
    with identical triggers must each get their own run(). A class with an
    ``on_task_cancelled`` or ``on_event_written`` hook acts for one task (when that task is
    cancelled, or once its own event is stored), so it never shares a run() either (its polls
    may still share a request)."""
    if not getattr(cls, "shareable", True):
        return False
    from deferrun.core.basetrigger import BaseTrigger

    return all(
        getattr(cls, hook, None) is getattr(BaseTrigger, hook, None)
        for hook in ("on_task_cancelled", "on_event_written")
    )


def affinity_key(classpath: str, kwargs_json: str) -> str:
    """Hash of the classpath and the kwargs, key order ignored: equal for identical triggers."""
    if len(kwargs_json) > MAX_CANONICAL_CHARS:
        canonical = kwargs_json
    else:
        try:
            canonical = json.dumps(json.loads(kwargs_json), sort_keys=True, separators=(",", ":"))
        except ValueError:  # not plain JSON: the stored text itself still identifies it
            canonical = kwargs_json
    digest = hashlib.sha256(f"{classpath}\n{canonical}".encode()).hexdigest()
    return digest[:32]


def digest(value: Any) -> str:
    """A short stable hash of JSON-able ``value``: puts headers or a body in a poll key
    without their text (they may hold secrets)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def poll_key_of(trigger: Any) -> str | None:
    """``trigger.shared_poll_key()`` as stored for ``deferrun triggers``, or None."""
    method = getattr(trigger, "shared_poll_key", None)
    if method is None:
        return None
    key = method()
    if key is None:
        return None
    return f"{type(trigger).__qualname__} {key}"[:MAX_POLL_KEY_CHARS]
