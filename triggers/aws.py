"""AWS waiters as triggers: any botocore waiter (or one of deferrun's), polled asynchronously.

The waiter's model (operation, delay, maxAttempts, acceptors) comes from botocore's data
(``waiters-2.json``) or, for services botocore has no waiter for (Glue crawlers, Athena,
Batch), from ``triggers/aws_waiters/<service>.json`` in the same format. Acceptors are matched
with botocore's own pure matcher functions (path, pathAll, pathAny, status, error); each poll
is one API call on the shared aiobotocore client.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from deferrun.connections.clients import aws_client
from deferrun.core.basetrigger import PollingTrigger, TriggerEvent, check_interval
from triggers.s3 import classify

OWN_WAITERS = Path(__file__).with_name("aws_waiters")
MAX_RESPONSE_BYTES = 64_000
REASON_KEYS = ("reason", "message", "error")
MAX_ATTEMPTS = 1_000_000  # beyond this, use max_attempts=0 and the task's timeout

_MODELS: dict[str, Any] = {}
_MODELS_LOCK = threading.Lock()


class WaiterFailed(RuntimeError):
    """The waiter reached a failure acceptor (or ran out of attempts)."""


def waiter_model(service: str) -> Any:
    """botocore's WaiterModel for ``service`` merged with deferrun's own waiters (cached).

    Reads JSON files: call it from a thread, not the event loop (the trigger does).
    """
    with _MODELS_LOCK:
        model = _MODELS.get(service)
        if model is not None:
            return model
    import botocore.session
    from botocore.exceptions import DataNotFoundError
    from botocore.waiter import WaiterModel

    config: dict[str, Any] = {"version": 2, "waiters": {}}
    try:
        loaded = botocore.session.get_session().get_component("data_loader")
        config["waiters"].update(loaded.load_service_model(service, "waiters-2")["waiters"])
    except DataNotFoundError:
        pass  # botocore has no waiters for this service; ours may
    own = OWN_WAITERS / f"{service}.json"
    if own.exists():
        config["waiters"].update(json.loads(own.read_text())["waiters"])
    model = WaiterModel(config)
    with _MODELS_LOCK:
        _MODELS[service] = model
    return model


def waiter_config(service: str, waiter_name: str) -> Any:
    model = waiter_model(service)
    if waiter_name not in model.waiter_names:
        raise ValueError(
            f"no AWS waiter {waiter_name!r} for service {service!r}; known: "
            f"{', '.join(model.waiter_names) or 'none'}"
        )
    return model.get_waiter(waiter_name)


def failure_reason(response: Any, limit: int = 500) -> str:
    """Fields that explain a failure (``*Reason``, ``*Message``, ``*Error*``), found anywhere."""
    found: list[str] = []

    def walk(value: Any, key: str) -> None:
        if len(found) >= 4:
            return
        if isinstance(value, dict):
            for k, v in value.items():
                if k != "ResponseMetadata":
                    walk(v, str(k))
        elif isinstance(value, list):
            for v in value[:20]:
                walk(v, key)
        elif (
            isinstance(value, str | int)
            and value != ""
            and any(w in key.lower() for w in REASON_KEYS)
        ):
            found.append(f"{key}={value}")

    walk(response, "")
    return "; ".join(found)[:limit]


def storable(response: Any) -> Any:
    """The response as JSON values (datetimes as ISO text), without ResponseMetadata;
    None if it is too large to be an event."""
    if isinstance(response, dict):
        response = {k: v for k, v in response.items() if k != "ResponseMetadata"}
    text = json.dumps(response, default=str)
    return json.loads(text) if len(text) <= MAX_RESPONSE_BYTES else None


class AwsWaiterTrigger(PollingTrigger):
    """Runs AWS waiter ``waiter_name`` of ``service`` with API arguments ``args``.

    ``poll_interval`` and ``max_attempts`` default to the waiter's own delay and maxAttempts;
    ``max_attempts=0`` polls until the task's deferral timeout instead. Event:
    ``{"status": "success", "waiter": name, "response": {...}}``. A failure acceptor fails
    the task with the response's reason fields; an error response no acceptor expects is
    retried if transient (throttling, 5xx) and fails the task otherwise.
    """

    def __init__(
        self,
        service: str,
        waiter_name: str,
        args: dict[str, Any],
        aws_conn_id: str = "aws_default",
        poll_interval: float | None = None,
        max_attempts: int | None = None,
    ) -> None:
        self.service = service
        self.waiter_name = waiter_name
        self.args = dict(args)
        self.aws_conn_id = aws_conn_id
        self.poll_interval = check_interval(poll_interval) if poll_interval is not None else 0.0
        if max_attempts is not None and (
            isinstance(max_attempts, bool)
            or not isinstance(max_attempts, int)
            or not 0 <= max_attempts <= MAX_ATTEMPTS
        ):
            raise ValueError(
                f"max_attempts must be a whole number 0..{MAX_ATTEMPTS} (0: until the task's "
                f"timeout), got {max_attempts!r}"
            )
        self.max_attempts = max_attempts
        self._config: Any = None
        self._attempts = 0

    async def _load(self) -> Any:
        if self._config is None:
            import anyio.to_thread

            config = _MODELS.get(self.service)
            if config is None:
                await anyio.to_thread.run_sync(waiter_model, self.service)
            self._config = waiter_config(self.service, self.waiter_name)
            if not self.poll_interval:
                self.poll_interval = float(self._config.delay)
            if self.max_attempts is None:
                self.max_attempts = int(self._config.max_attempts)
        return self._config

    async def run(self) -> Any:
        await self._load()  # poll_interval comes from the model when not given
        async for event in super().run():
            yield event

    async def poll(self) -> TriggerEvent | None:
        from botocore import xform_name
        from botocore.exceptions import ClientError

        config = await self._load()
        what = f"AWS waiter {self.service}.{self.waiter_name}"
        try:
            client = await aws_client(self.service, self.aws_conn_id)
            call = getattr(client, xform_name(config.operation))
        except Exception as exc:
            raise classify(exc, what) from exc
        error: Exception | None = None
        try:
            response = await call(**self.args)
        except ClientError as exc:
            response, error = exc.response, exc
        except Exception as exc:
            raise classify(exc, what) from exc
        self._attempts += 1
        for acceptor in config.acceptors:
            if acceptor.matcher_func(response):
                if acceptor.state == "success":
                    return TriggerEvent(
                        {
                            "status": "success",
                            "waiter": self.waiter_name,
                            "response": storable(response),
                        }
                    )
                if acceptor.state == "failure":
                    reason = (
                        failure_reason(response) or f"{acceptor.argument} is {acceptor.expected}"
                    )
                    raise WaiterFailed(
                        f"{what} ({self.args}) reached a failure state "
                        f"({acceptor.matcher} {acceptor.argument or ''} = {acceptor.expected!r}): "
                        f"{reason}"
                    )
                break  # retry
        else:
            if error is not None:  # an error no acceptor expects: transient or final
                raise classify(error, what) from error
        if self.max_attempts and self._attempts >= self.max_attempts:
            raise WaiterFailed(
                f"{what} ({self.args}) did not reach a success state in {self._attempts} "
                f"attempts; last response: {failure_reason(response) or storable(response)}"
            )
        return None


__all__ = [
    "AwsWaiterTrigger",
    "WaiterFailed",
]
