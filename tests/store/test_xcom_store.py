"""XCom rows on both backends: fenced on the claim, overwritten by key, cleared for a fresh
try, read by downstream tasks; and the push-side checks (size, key, reserved name)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from deferrun.client import build_task
from deferrun.store import Store
from deferrun.worker.context import MAX_XCOM_BYTES, TaskInstance, XComError, XComState
from tests.support.userland import DeferOnce


@pytest.mark.anyio
async def test_xcom_writes_are_fenced_and_reach_downstream(store: Store) -> None:
    up = build_task(DeferOnce(value=1))
    await store.submit(up)
    [claim] = await store.claim_tasks("w1", ["default"], 10)
    token = claim.claim_token
    assert await store.write_xcoms(up.id, token + 1, {"a": '"stale"'}, clear=False) is False
    assert await store.write_xcoms(up.id, token, {"a": '"1"', "b": "[1]"}, clear=False)
    assert await store.write_xcoms(up.id, token, {"a": '"2"'}, clear=False)  # same key: replaced
    down = build_task(DeferOnce(value=2), after=[up.id])
    await store.submit(down)
    assert await store.load_xcoms(down.id) == {up.id: {"a": '"2"', "b": "[1]"}}
    assert await store.load_xcoms(up.id) == {up.id: {"a": '"2"', "b": "[1]"}}
    assert await store.write_xcoms(up.id, token, {"c": "3"}, clear=True)  # a fresh try
    assert await store.load_xcoms(down.id) == {up.id: {"c": "3"}}
    await store.complete_task(up.id, token, "5")
    assert await store.write_xcoms(up.id, token, {"late": "1"}, clear=False) is False
    assert await store.load_xcoms(down.id) == {up.id: {"c": "3"}}


@pytest.mark.anyio
async def test_a_user_retry_drops_the_earlier_tries_xcoms_with_its_result(store: Store) -> None:
    """A downstream task reading a retried task before its new try ends saw the old try's
    pushes beside no return value (the retry had cleared only the result)."""
    up = build_task(DeferOnce(value=1))
    await store.submit(up)
    [claim] = await store.claim_tasks("w1", ["default"], 10)
    assert await store.write_xcoms(up.id, claim.claim_token, {"k": '{"try": 1}'}, clear=False)
    await store.complete_task(up.id, claim.claim_token, '"r1"')
    down = build_task(DeferOnce(value=2), after=[up.id])
    await store.submit(down)
    assert await store.load_xcoms(down.id) == {up.id: {"k": '{"try": 1}'}}
    assert await store.retry_task(up.id) == [up.id]
    assert await store.load_xcoms(down.id) == {}
    assert (await store.get_task(up.id)).result is None  # type: ignore[union-attr]


def _ti() -> TaskInstance:
    claimed = SimpleNamespace(id="t-1", try_number=1, max_tries=1, queue="default")
    attempt = SimpleNamespace(claimed=claimed, xcom=XComState(), upstream={})
    op = SimpleNamespace(task_id="mine", pool=None)
    return TaskInstance(attempt, op, "dag", "t-1")  # type: ignore[arg-type]


def test_push_checks_and_own_pull() -> None:
    ti = _ti()
    ti.xcom_push("k", {"n": 1})
    assert ti.xcom_pull(key="k") == {"n": 1} and ti.xcom_pull(task_ids="t-1", key="k")
    assert ti.xcom_pull(key="other", default=0) == 0
    with pytest.raises(XComError, match="DEFERRUN_MAX_XCOM_BYTES"):
        ti.xcom_push("big", "x" * MAX_XCOM_BYTES)
    with pytest.raises(XComError, match="reserved"):
        ti.xcom_push("return_value", 1)
    with pytest.raises(XComError, match="non-empty string"):
        ti.xcom_push("", 1)
    with pytest.raises(Exception, match="cannot be stored"):
        ti.xcom_push("obj", object())


def test_push_refuses_text_utf8_cannot_hold_at_the_call() -> None:
    """A key or value with a lone surrogate used to pass the checks and then fail the whole
    attempt when the worker wrote it; it is refused by xcom_push itself."""
    ti = _ti()
    with pytest.raises(XComError, match="not valid UTF-8"):
        ti.xcom_push("key\udcff", 1)
    with pytest.raises(XComError, match="not valid UTF-8"):
        ti.xcom_push("k", {"nested": ["x\udcff"]})
    ti.xcom_push("ok", "ünï ✓ 🚀")
    assert ti.xcom_pull(key="ok") == "ünï ✓ 🚀"


@pytest.mark.slow
def test_ti_max_tries_is_the_retries_as_in_airflow() -> None:
    op = SimpleNamespace(task_id="t")
    claimed = SimpleNamespace(id="t-1", try_number=1, max_tries=3, queue="default")  # retries=2
    attempt = SimpleNamespace(claimed=claimed, xcom=XComState(), upstream={})
    assert TaskInstance(attempt, op, "dag", "t-1").max_tries == 2  # type: ignore[arg-type]
