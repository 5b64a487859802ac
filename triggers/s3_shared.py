"""One shared poll for many S3KeyTriggers under one bucket and folder prefix.

Per interval, either one paginated ``ListObjectsV2`` of the shared prefix answers every
member, or (when the listing would cost more requests than the members' keys) one ``HEAD``
per distinct key. The switch: a listing is abandoned as soon as it needs more pages than
there are distinct exact keys to check, and the number of pages it needed is remembered per
prefix; while that count exceeds the keys, the poll HEADs instead, and it lists again only
once the members hold more keys than that count. So a prefix with millions of objects (a
thousand pages) is never listed to find a few keys, and a thousand keys under a small prefix
cost one or a few requests. Wildcard members always need the listing.
"""

from __future__ import annotations

import asyncio
import bisect
import fnmatch
from typing import Any

from deferrun.core.basetrigger import TriggerEvent

#: pages a listing of (conn, bucket, prefix) needed last time (a floor when abandoned)
LISTING_PAGES: dict[tuple[str, str, str], int] = {}
HEAD_CONCURRENCY = 16
PAGE_SIZE = 1000  # S3's own maximum keys per ListObjectsV2 page
#: what the last poll of each prefix did, for tests and the benchmark: "list" or "head"
LAST_MODE: dict[tuple[str, str, str], str] = {}


async def poll_shared(triggers: list[Any]) -> list[TriggerEvent | BaseException | None]:
    first = triggers[0]
    conn_id, bucket = first.aws_conn_id, first.targets[0][0]
    prefix = first.shared_poll_key().split(f"s3://{bucket}/", 1)[1]
    client = await first._client()
    await first._check_bucket(client, bucket)
    exact = sorted({key for t in triggers if not t.wildcard_match for _, key in t.targets})
    wildcards = any(t.wildcard_match for t in triggers)
    where = (conn_id, bucket, prefix)
    listed: list[str] | None = None
    if wildcards or LISTING_PAGES.get(where, 0) <= len(exact):
        listed = await _list(first, client, bucket, prefix, None if wildcards else len(exact))
    if listed is None:
        LAST_MODE[where] = "head"
        present = await _heads(first, client, bucket, exact)
    else:
        LAST_MODE[where] = "list"
        present = set(listed)
    return [_answer(t, present, listed) for t in triggers]


async def _list(
    first: Any, client: Any, bucket: str, prefix: str, max_pages: int | None
) -> list[str] | None:
    """Every key under ``prefix`` (sorted, as S3 returns them), or None once the listing
    needs more than ``max_pages`` pages."""
    from triggers.s3 import classify

    where = (first.aws_conn_id, bucket, prefix)
    found: list[str] = []
    pages = 0
    try:
        paginator = client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(
            Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": PAGE_SIZE}
        ):
            pages += 1
            if max_pages is not None and pages > max(max_pages, 1):
                LISTING_PAGES[where] = pages
                return None
            found.extend(o["Key"] for o in page.get("Contents", ()))
    except Exception as exc:
        raise classify(exc, f"listing s3://{bucket}/{prefix}") from exc
    LISTING_PAGES[where] = pages
    return found


async def _heads(first: Any, client: Any, bucket: str, keys: list[str]) -> set[str]:
    gate = asyncio.Semaphore(HEAD_CONCURRENCY)

    async def exists(key: str) -> str | None:
        async with gate:
            return key if await first._exists(client, bucket, key) else None

    found = await asyncio.gather(*(exists(k) for k in keys))
    return {k for k in found if k is not None}


def _answer(trigger: Any, present: set[str], listed: list[str] | None) -> TriggerEvent | None:
    keys: list[str] = []
    for _, key in trigger.targets:
        if trigger.wildcard_match:
            assert listed is not None
            matched = _matching(listed, key)
            if not matched:
                return None
            keys.extend(matched)
        elif key in present:
            keys.append(key)
        else:
            return None
    return TriggerEvent({"status": "success", "keys": keys})


def _matching(listed: list[str], pattern: str) -> list[str]:
    """Listed keys matching ``pattern``, looking only at those under its literal prefix."""
    from triggers.s3 import literal_prefix

    start = literal_prefix(pattern)
    i = bisect.bisect_left(listed, start)
    out: list[str] = []
    while i < len(listed) and listed[i].startswith(start):
        if fnmatch.fnmatchcase(listed[i], pattern):
            out.append(listed[i])
        i += 1
    return out
