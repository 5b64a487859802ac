"""S3 key trigger: fires when every key (or fnmatch pattern) exists in a bucket."""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any

from deferrun.connections.cache import loop_client_cache
from deferrun.connections.clients import aws_client
from deferrun.core.basetrigger import PollingTrigger, TriggerEvent, check_interval
from deferrun.exceptions import TransientError

PERMANENT_CODES = {
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "NoSuchBucket",
    "InvalidBucketName",
    "403",
}
_WILDCARD = re.compile(r"[*?\[]")

# AWS throttling comes back as HTTP 400 with one of these codes. botocore's standard retry
# mode keeps the lists as private class attributes of botocore.retries.standard's checkers;
# we take them from there and fall back to this copy (botocore 1.43) if they move.
_FALLBACK_TRANSIENT_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "TransactionInProgressException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "LimitExceededException",
        "RequestThrottled",
        "SlowDown",
        "PriorRequestNotComplete",
        "EC2ThrottledException",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)


def _transient_codes() -> frozenset[str]:
    try:
        from botocore.retries import standard

        codes = set(standard.ThrottledRetryableChecker._THROTTLED_ERROR_CODES)
        codes |= set(standard.TransientRetryableChecker._TRANSIENT_ERROR_CODES)
    except (ImportError, AttributeError, TypeError):
        return _FALLBACK_TRANSIENT_CODES
    return frozenset(codes | _FALLBACK_TRANSIENT_CODES)


TRANSIENT_CODES = _transient_codes()


def literal_prefix(pattern: str) -> str:
    """The part of an fnmatch pattern before its first wildcard: what S3 can filter on."""
    match = _WILDCARD.search(pattern)
    return pattern if match is None else pattern[: match.start()]


def split_s3_url(bucket_name: str | None, key: str) -> tuple[str, str]:
    if key.startswith("s3://"):
        bucket, _, rest = key[5:].partition("/")
        if bucket_name and bucket_name != bucket:
            raise ValueError(
                f"key {key!r} names bucket {bucket!r}, but bucket_name is {bucket_name!r}"
            )
        return bucket, rest
    if not bucket_name:
        raise ValueError(f"key {key!r} is not an s3:// URL, so bucket_name is required")
    return bucket_name, key


def classify(exc: Exception, what: str) -> Exception:
    """Map a botocore/aiohttp error to TransientError (retry) or a clear permanent error."""
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in PERMANENT_CODES or status == 403:
            hint = ""
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "403"):
                hint = "; check the connection's credentials"
            return PermissionError(f"{what}: {code} {error.get('Message', '')}{hint}".strip())
        if status >= 500 or status == 429 or code in TRANSIENT_CODES:
            return TransientError(f"{what}: {code} (HTTP {status})")
        return RuntimeError(f"{what}: {code} {error.get('Message', '')} (HTTP {status})")
    if isinstance(exc, BotoCoreError | OSError | TimeoutError):
        return TransientError(f"{what}: {exc}")
    return exc


class S3KeyTrigger(PollingTrigger):
    """Fires when every key in ``bucket_key`` exists (fnmatch patterns with ``wildcard_match``).

    Event: ``{"status": "success", "keys": [...]}`` with the keys found. A missing bucket or
    bad credentials fail the task; network errors and 5xx are retried with backoff.
    """

    def __init__(
        self,
        bucket_name: str | None,
        bucket_key: str | Sequence[str],
        wildcard_match: bool = False,
        aws_conn_id: str = "aws_default",
        poll_interval: float = 5.0,
    ) -> None:
        keys = [bucket_key] if isinstance(bucket_key, str) else list(bucket_key)
        if not keys:
            raise ValueError("bucket_key needs at least one key")
        self.bucket_name = bucket_name
        self.bucket_key = bucket_key
        self.targets = [split_s3_url(bucket_name, k) for k in keys]
        self.wildcard_match = wildcard_match
        self.aws_conn_id = aws_conn_id
        self.poll_interval = check_interval(poll_interval)

    async def _check_bucket(self, client: Any, bucket: str) -> None:
        """HEAD the bucket once per process (shared by all triggers): 404 there is final."""

        async def check(_: AsyncExitStack) -> bool:
            try:
                await client.head_bucket(Bucket=bucket)
            except Exception as exc:
                from botocore.exceptions import ClientError

                if isinstance(exc, ClientError) and str(
                    exc.response.get("Error", {}).get("Code")
                ) in ("404", "NoSuchBucket"):
                    raise FileNotFoundError(
                        f"S3 bucket {bucket!r} does not exist (connection {self.aws_conn_id!r})"
                    ) from None
                raise classify(exc, f"checking bucket {bucket!r}") from exc
            return True

        await loop_client_cache().get("s3-bucket", f"{self.aws_conn_id}/{bucket}", check)

    async def _exists(self, client: Any, bucket: str, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            await client.head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise classify(exc, f"s3://{bucket}/{key}") from exc
        except Exception as exc:
            raise classify(exc, f"s3://{bucket}/{key}") from exc

    async def _matching(self, client: Any, bucket: str, pattern: str) -> list[str]:
        found: list[str] = []
        try:
            paginator = client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=bucket, Prefix=literal_prefix(pattern)):
                found.extend(
                    o["Key"]
                    for o in page.get("Contents", ())
                    if fnmatch.fnmatchcase(o["Key"], pattern)
                )
        except Exception as exc:
            raise classify(exc, f"listing s3://{bucket}/{literal_prefix(pattern)}") from exc
        return found

    async def _client(self) -> Any:
        try:
            return await aws_client("s3", self.aws_conn_id)
        except Exception as exc:
            raise classify(exc, f"creating an S3 client for {self.aws_conn_id!r}") from exc

    async def poll(self) -> TriggerEvent | None:
        client = await self._client()
        keys: list[str] = []
        for bucket, key in self.targets:
            await self._check_bucket(client, bucket)
            if self.wildcard_match:
                matched = await self._matching(client, bucket, key)
                if not matched:
                    return None
                keys.extend(matched)
            else:
                if not await self._exists(client, bucket, key):
                    return None
                keys.append(key)
        return TriggerEvent({"status": "success", "keys": keys})

    def shared_poll_key(self) -> str | None:
        """Keys in one bucket share a poll of their common folder prefix (see s3_shared)."""
        if len({bucket for bucket, _ in self.targets}) != 1:
            return None  # rare: keys across buckets poll alone
        prefixes = [literal_prefix(key) if self.wildcard_match else key for _, key in self.targets]
        folder = os.path.commonprefix(prefixes)  # noqa: RUF071 - cut at "/" below
        folder = folder[: folder.rfind("/") + 1]
        return f"{self.aws_conn_id} s3://{self.targets[0][0]}/{folder}"

    @classmethod
    async def poll_many(cls, triggers: list[Any]) -> list[TriggerEvent | BaseException | None]:
        from triggers.s3_shared import poll_shared

        return await poll_shared(triggers)


__all__ = [
    "S3KeyTrigger",
]
