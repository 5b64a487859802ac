"""SQS trigger: one long-poll receive loop per queue, shared by every trigger waiting on it.

Each received message goes to exactly one waiting trigger whose filter it matches (oldest
waiter first); a message nobody wants is made visible again at once for other consumers. A
message is deleted only after the event that carries it is stored (the event writer's
post-write callback); if the triggerer dies in between, the message becomes visible again
after the queue's visibility timeout and is delivered again - never lost.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack
from typing import Any

import structlog

from deferrun.connections.cache import loop_client_cache
from deferrun.connections.clients import aws_client, dotted
from deferrun.core.basetrigger import BaseTrigger, TriggerEvent
from deferrun.exceptions import TransientError
from triggers.s3 import classify

log = structlog.get_logger("deferrun.sqs")

#: counts for tests and benchmarks: received, delivered, released, deleted, receive_calls
STATS: Counter[str] = Counter()
TOMBSTONE_SECONDS = 300.0  # how long a deleted MessageId is remembered against late duplicates
MAX_BATCH = 10  # SQS's limit for receive, delete and change-visibility batches
BURST = 4  # extra short-poll receivers while a backlog drains
FILTER_KEYS = {"field", "attribute", "literal", "equals", "in", "exists"}


def validate_filter(message_filter: dict[str, Any] | None) -> None:
    if message_filter is None:
        return
    if not isinstance(message_filter, dict) or not (
        {"field", "attribute", "literal"} & set(message_filter)
    ):
        raise ValueError(
            'message_filter must be like {"field": "order.status", "equals": "paid"} (a dotted '
            'path into the JSON body), {"attribute": "kind", "in": [...]} (a message '
            'attribute) or {"literal": true, "in": [...]} (the whole body)'
        )
    unknown = set(message_filter) - FILTER_KEYS
    if unknown:
        raise ValueError(f"message_filter has unknown keys {sorted(unknown)}")
    if len({"field", "attribute", "literal"} & set(message_filter)) > 1:
        raise ValueError(
            'message_filter takes one of "field", "attribute" or "literal", not several'
        )
    for key in ("field", "attribute"):
        if key in message_filter and not (
            isinstance(message_filter[key], str) and message_filter[key]
        ):
            raise ValueError(
                f"message_filter[{key!r}] must be a non-empty string, got {message_filter[key]!r}"
            )
    if "in" in message_filter and not isinstance(message_filter["in"], list | tuple):
        raise ValueError(
            f'message_filter["in"] must be a list of values, got {message_filter["in"]!r}'
        )
    if "in" in message_filter:
        try:  # values must be comparable JSON scalars/containers, never code
            json.dumps(message_filter["in"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f'message_filter["in"] must hold JSON values: {exc}') from None
    if "exists" in message_filter and not isinstance(message_filter["exists"], bool):
        raise ValueError(
            f'message_filter["exists"] must be true or false, got {message_filter["exists"]!r}'
        )


def matches(message: dict[str, Any], message_filter: dict[str, Any] | None) -> bool:
    """Whether ``message`` passes ``message_filter`` (see :func:`validate_filter`)."""
    if not message_filter:
        return True
    found, value = True, None
    if "attribute" in message_filter:
        attr = (message.get("MessageAttributes") or {}).get(message_filter["attribute"])
        if attr is None:
            attr = {
                "StringValue": (message.get("Attributes") or {}).get(message_filter["attribute"])
            }
        value = attr.get("StringValue")
        found = value is not None
    elif message_filter.get("literal"):
        value = message.get("Body")
    else:
        try:
            value = dotted(json.loads(message.get("Body") or ""), message_filter["field"])
        except (ValueError, KeyError, IndexError, TypeError):
            found = False
    if "exists" in message_filter:
        return found == bool(message_filter["exists"])
    if not found:
        return False
    if "equals" in message_filter:
        return bool(value == message_filter["equals"])
    if "in" in message_filter:
        return value in message_filter["in"]
    return bool(value)


class _Waiter:
    __slots__ = ("filter", "future", "max_messages", "wait_time")

    def __init__(self, message_filter: dict[str, Any] | None, max_messages: int, wait: int):
        self.filter = message_filter
        self.max_messages = max_messages
        self.wait_time = wait
        self.future: asyncio.Future[list[dict[str, Any]]] = (
            asyncio.get_running_loop().create_future()
        )


class QueueLoop:
    """The receive loop of one queue on one connection in this process (see module doc)."""

    def __init__(self, conn_id: str, queue_url: str) -> None:
        self.conn_id = conn_id
        self.queue_url = queue_url
        self.waiters: list[_Waiter] = []
        self._receiver: asyncio.Task[None] | None = None
        self._janitor: asyncio.Task[None] | None = None
        self._to_delete: list[str] = []
        self._to_release: list[str] = []
        self._work = asyncio.Event()
        self._bursts = 0
        #: MessageId -> newest receipt handle of messages handed to a waiter whose event is
        #: not stored yet: never handed to another waiter, their visibility kept extended
        self._held: dict[str, str] = {}
        #: MessageIds deleted recently (time deleted): a late duplicate receive is deleted too
        self._deleted: dict[str, float] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        self._visibility: int | None = None

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        # an empty context: the loop serves every trigger, not the one that started it
        return asyncio.get_running_loop().create_task(
            coro, name=name, context=contextvars.Context()
        )

    def add(self, waiter: _Waiter) -> None:
        self.waiters.append(waiter)
        if self._receiver is None or self._receiver.done():
            self._receiver = self._spawn(self._receive_loop(), f"sqs-receive:{self.queue_url}")

    def remove(self, waiter: _Waiter) -> None:
        try:
            self.waiters.remove(waiter)
        except ValueError:
            pass  # already handed its messages

    def finish(self, messages: Iterable[dict[str, Any]], action: str) -> None:
        """A held message's event was stored ("delete" or "keep") or not ("release")."""
        now = time.monotonic()
        while self._deleted and next(iter(self._deleted.values())) < now - TOMBSTONE_SECONDS:
            del self._deleted[next(iter(self._deleted))]
        handles = []
        for message in messages:
            handle = self._held.pop(message["MessageId"], message["ReceiptHandle"])
            handles.append(handle)
            if action == "delete":
                self._deleted[message["MessageId"]] = now
        if action == "delete":
            self.delete_later(handles)
        elif action == "release":
            self.release_later(handles)

    def delete_later(self, handles: Iterable[str]) -> None:
        self._to_delete.extend(handles)
        self._wake_janitor()

    def release_later(self, handles: Iterable[str]) -> None:
        self._to_release.extend(handles)
        self._wake_janitor()

    def _wake_janitor(self) -> None:
        self._work.set()
        if self._janitor is None or self._janitor.done():
            self._janitor = self._spawn(self._janitor_loop(), f"sqs-janitor:{self.queue_url}")

    async def _receive(self, wait: int) -> int:
        """One receive call; hands its messages out and returns how many came."""
        wanted = sum(w.max_messages for w in self.waiters)
        if any(w.filter for w in self.waiters):
            wanted = MAX_BATCH  # a filtered waiter's message may be behind others
        client = await aws_client("sqs", self.conn_id)
        STATS["receive_calls"] += 1
        response = await client.receive_message(
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=max(1, min(MAX_BATCH, wanted)),
            WaitTimeSeconds=wait,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
        )
        messages = response.get("Messages") or []
        STATS["received"] += len(messages)
        self._hand_out(messages)
        return len(messages)

    async def _receive_loop(self) -> None:
        """The long poll. A full batch with more waiters left starts up to BURST short-poll
        receivers beside it, so a backlog drains at several batches per round trip."""
        failures = 0
        while self.waiters:
            try:
                got = await self._receive(min(w.wait_time for w in self.waiters))
            except Exception as exc:
                error = classify(exc, f"receiving from {self.queue_url}")
                if not isinstance(error, TransientError):
                    for waiter in self.waiters:
                        if not waiter.future.done():
                            waiter.future.set_exception(error)
                    self.waiters.clear()
                    return
                failures += 1
                delay = min(2.0**failures * 0.1, 30.0)
                log.warning("SQS receive failed; retrying", error=str(error), retry_in=delay)
                await asyncio.sleep(delay)
                continue
            failures = 0
            if got == MAX_BATCH and len(self.waiters) > MAX_BATCH:
                while self._bursts < BURST:
                    self._bursts += 1
                    self._spawn(self._burst(), f"sqs-burst:{self.queue_url}")

    async def _burst(self) -> None:
        try:
            while len(self.waiters) > MAX_BATCH and await self._receive(0) == MAX_BATCH:
                pass
        except Exception as exc:  # the long poll goes on and reports lasting errors
            log.info("SQS burst receiver stopped", error=repr(exc))
        finally:
            self._bursts -= 1

    def _matches(self, waiter: _Waiter, message: dict[str, Any]) -> bool:
        """A filter that raises fails its own waiter only; the message goes to the others."""
        try:
            return matches(message, waiter.filter)
        except Exception as exc:
            log.error("SQS message filter failed", queue=self.queue_url, error=repr(exc))
            waiter.future.set_exception(
                ValueError(f"message_filter {waiter.filter!r} failed on a message: {exc!r}")
            )
            return False

    def _hand_out(self, messages: list[dict[str, Any]]) -> None:
        taken: dict[int, list[dict[str, Any]]] = {}
        unwanted: list[str] = []
        for message in messages:
            message_id = message.get("MessageId")
            if message_id in self._held or message_id in self._deleted:
                # received again (its visibility ran out while its event was being stored):
                # it is already a waiter's; keep the newest handle, never hand it out twice
                STATS["duplicates"] += 1
                if message_id in self._held:
                    self._held[message_id] = message["ReceiptHandle"]
                else:
                    self.delete_later([message["ReceiptHandle"]])
                continue
            for index, waiter in enumerate(self.waiters):
                if waiter.future.done():
                    continue
                got = taken.setdefault(index, [])
                if len(got) < waiter.max_messages and self._matches(waiter, message):
                    got.append(message)
                    break
            else:
                unwanted.append(message["ReceiptHandle"])
        done = []
        for index, got in taken.items():
            if got:
                waiter = self.waiters[index]
                waiter.future.set_result(got)
                for message in got:
                    self._held[message["MessageId"]] = message["ReceiptHandle"]
                done.append(waiter)
                STATS["delivered"] += len(got)
        for waiter in done:
            self.waiters.remove(waiter)
        self.waiters = [w for w in self.waiters if not w.future.done()]
        if unwanted:
            self.release_later(unwanted)
        if self._held and (self._heartbeat is None or self._heartbeat.done()):
            self._heartbeat = self._spawn(self._heartbeat_loop(), f"sqs-heartbeat:{self.queue_url}")

    async def _heartbeat_loop(self) -> None:
        """While held messages wait for their events to be stored, reset their visibility to
        the queue's own timeout every third of it, so they do not reappear meanwhile (a
        triggerer killed stops this, and they come back after that timeout as before)."""
        while self._held:
            try:
                client = await aws_client("sqs", self.conn_id)
                if self._visibility is None:
                    attrs = await client.get_queue_attributes(
                        QueueUrl=self.queue_url, AttributeNames=["VisibilityTimeout"]
                    )
                    self._visibility = int(attrs["Attributes"]["VisibilityTimeout"])
                handles = list(self._held.values())
                await asyncio.gather(
                    *(
                        self._batch(
                            client.change_message_visibility_batch,
                            handles[i : i + MAX_BATCH],
                            "extended",
                            self._visibility,
                        )
                        for i in range(0, len(handles), MAX_BATCH)
                    )
                )
            except Exception as exc:
                log.warning(
                    "extending the visibility of held SQS messages failed; retrying",
                    queue=self.queue_url,
                    error=repr(exc),
                )
            await asyncio.sleep(max(0.2, (self._visibility or 3) / 3))

    async def _janitor_loop(self) -> None:
        """Deletes and releases in batches of 10, a few calls at once; retries failures."""
        while self._to_delete or self._to_release:
            self._work.clear()
            try:
                client = await aws_client("sqs", self.conn_id)
                work = (
                    (self._to_delete, client.delete_message_batch, "deleted", None),
                    (self._to_release, client.change_message_visibility_batch, "released", 0),
                )
                for pending, call, stat, timeout in work:
                    while pending:  # up to BURST batch calls at once
                        chunk = pending[: MAX_BATCH * BURST]
                        await asyncio.gather(
                            *(
                                self._batch(call, chunk[i : i + MAX_BATCH], stat, timeout)
                                for i in range(0, len(chunk), MAX_BATCH)
                            )
                        )
                        del pending[: len(chunk)]
            except Exception as exc:
                log.warning(
                    "deleting or releasing SQS messages failed; retrying (a message not deleted "
                    "becomes visible again after the visibility timeout)",
                    queue=self.queue_url,
                    error=repr(exc),
                )
                await asyncio.sleep(1.0)

    async def _batch(
        self, call: Any, handles: list[str], stat: str, timeout: int | None = None
    ) -> None:
        entries: list[dict[str, Any]] = [
            {"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(handles)
        ]
        if timeout is not None:
            for entry in entries:
                entry["VisibilityTimeout"] = timeout
        response = await call(QueueUrl=self.queue_url, Entries=entries)
        failed = response.get("Failed") or []
        for item in failed:
            log.warning("SQS batch entry failed", queue=self.queue_url, action=stat, error=item)
        STATS[stat] += len(entries) - len(failed)

    async def aclose(self) -> None:
        """Flush pending deletes/releases (bounded), then stop."""
        if self._janitor is not None and not self._janitor.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._janitor), 5.0)
            except Exception as exc:
                log.warning("SQS deletes not flushed at shutdown", error=repr(exc))
        for task in (self._receiver, self._janitor, self._heartbeat):
            if task is not None and not task.done():
                task.cancel()


async def queue_loop(conn_id: str, queue_url: str) -> QueueLoop:
    async def factory(stack: AsyncExitStack) -> QueueLoop:
        loop = QueueLoop(conn_id, queue_url)
        stack.push_async_callback(loop.aclose)
        return loop

    return await loop_client_cache().get("sqs-queue", f"{conn_id}|{queue_url}", factory)


def slim(message: dict[str, Any]) -> dict[str, Any]:
    """What the event keeps of a message (not its receipt handle)."""
    keep = ("MessageId", "Body", "MD5OfBody", "Attributes", "MessageAttributes")
    return {k: message[k] for k in keep if k in message}


class SqsTrigger(BaseTrigger):
    """Fires with up to ``max_messages`` messages from ``queue_url`` that pass
    ``message_filter``. Event: ``{"messages": [{"MessageId", "Body", ...}, ...]}``.

    With ``delete_on_event`` the messages are deleted once the event is stored; without it
    they stay invisible until the queue's visibility timeout, then return to the queue.
    """

    #: each waiting task takes its own messages: two identical triggers are two receivers,
    #: never one run() whose messages would resume both tasks
    shareable = False

    def __init__(
        self,
        queue_url: str,
        max_messages: int = 1,
        message_filter: dict[str, Any] | None = None,
        delete_on_event: bool = True,
        aws_conn_id: str = "aws_default",
        wait_time_seconds: int = 20,
    ) -> None:
        if isinstance(max_messages, bool) or not 1 <= int(max_messages) <= MAX_BATCH:
            raise ValueError(f"max_messages must be 1..10 (SQS's limit), got {max_messages!r}")
        if not 0 <= int(wait_time_seconds) <= 20:
            raise ValueError(f"wait_time_seconds must be 0..20, got {wait_time_seconds!r}")
        validate_filter(message_filter)
        self.queue_url = queue_url
        self.max_messages = int(max_messages)
        self.message_filter = message_filter
        self.delete_on_event = delete_on_event
        self.aws_conn_id = aws_conn_id
        self.wait_time_seconds = int(wait_time_seconds)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        loop = await queue_loop(self.aws_conn_id, self.queue_url)
        waiter = _Waiter(self.message_filter, self.max_messages, self.wait_time_seconds)
        loop.add(waiter)
        try:
            messages = await waiter.future
        except BaseException:
            loop.remove(waiter)
            handed = waiter.future.done() and not waiter.future.cancelled()
            if handed and waiter.future.exception() is None:  # handed over, then cancelled
                loop.finish(waiter.future.result(), "release")
            raise
        # From here the event writer owns them: deleted once the event is stored, released if
        # a failure is stored instead (on_event_written); if neither happens (killed), they
        # time out back.
        if self.trigger_id is not None:
            self._handed = (loop, messages)
        else:  # run outside a triggerer: nothing will tell us the event was stored
            loop.finish(messages, "keep")
        yield TriggerEvent({"messages": [slim(m) for m in messages]})

    def on_event_written(self, stored: bool) -> None:
        handed: tuple[QueueLoop, list[dict[str, Any]]] | None = getattr(self, "_handed", None)
        if handed is None:
            return
        self._handed = None
        loop, messages = handed
        if not stored:
            loop.finish(messages, "release")  # the task did not get them: offer them again
        else:
            loop.finish(messages, "delete" if self.delete_on_event else "keep")


async def receive_once(
    conn_id: str,
    queue_url: str,
    max_messages: int,
    wait_time_seconds: int,
    message_filter: dict[str, Any] | None,
    delete: bool,
) -> list[dict[str, Any]]:
    """One receive for a poking sensor: matching messages (deleted at once when ``delete``,
    as Airflow's sensor does); the others are made visible again."""
    what = f"receiving from {queue_url}"
    try:
        client = await aws_client("sqs", conn_id)
        response = await client.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=MAX_BATCH if message_filter else max_messages,
            WaitTimeSeconds=wait_time_seconds,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
        )
        messages = response.get("Messages") or []
        wanted = [m for m in messages if matches(m, message_filter)][:max_messages]
        taken = {m["ReceiptHandle"] for m in wanted}
        unwanted = [m for m in messages if m["ReceiptHandle"] not in taken]
        for group, action in ((wanted if delete else [], "delete"), (unwanted, "release")):
            if not group:
                continue
            entries: list[dict[str, Any]] = [
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(group)
            ]
            if action == "delete":
                await client.delete_message_batch(QueueUrl=queue_url, Entries=entries)
            else:
                for entry in entries:
                    entry["VisibilityTimeout"] = 0
                await client.change_message_visibility_batch(QueueUrl=queue_url, Entries=entries)
    except Exception as exc:
        raise classify(exc, what) from exc
    return [slim(m) for m in wanted]


__all__ = [
    "SqsTrigger",
]
