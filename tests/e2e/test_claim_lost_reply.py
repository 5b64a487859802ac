"""A trigger claim whose COMMIT reached PostgreSQL but whose reply was lost.

A loopback proxy in front of PostgreSQL (tests/support/loopback_proxy.py) lets the triggerer's
first claim transaction commit, then drops the answer and the connection. The triggers it
claimed are assigned to a live triggerer that does not run them; the test checks they are not
lost, each runs and fires exactly once, and bounds how long they stay stranded (the triggerer
reconciles at its next claim attempt after a failed claim, about 1 s later).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from deferrun import Client, TaskState
from tests.support.loopback_proxy import CommitCutProxy
from tests.support.processes import Proc, deferrun_env, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

N = 20
#: stranded (commit lost -> every task resumed) must stay under this; the README states it
BOUND = 4.0


def test_claim_whose_commit_reply_is_lost(
    pg_url: str, procs: Callable[..., Proc], tmp_path: Path
) -> None:
    resumes = tmp_path / "resumes.log"
    procs(["worker", "--slots", "8"], deferrun_env(pg_url))
    with Client(db=pg_url) as client:
        from tests.support.hostile_userland import HostileDefer

        due = time.time()  # already due when run: distinct moments, so no two share a run()
        ids = [
            client.submit(HostileDefer(kind="good_run", at=due - i / 1000, record=str(resumes)))
            for i in range(N)
        ]
        wait_until(lambda: len(client.triggers()) == N, 30, message="every task deferred")

        port = urlsplit(pg_url).port
        proxy = CommitCutProxy(port, marker=b"pg_advisory_xact_lock(7212012)")
        try:
            proxied = pg_url.replace(f":{port}/", f":{proxy.port}/")
            triggerer = procs(["triggerer"], deferrun_env(proxied))
            wait_until(lambda: proxy.cut_at is not None, 20, message="a claim's reply lost")
            wait_until(
                lambda: all(client.get(t).finished for t in ids),
                timeout=30,
                message=f"every task resumed\n{triggerer.output()[-3000:]}",
            )
        finally:
            proxy.close()
        assert proxy.cut_at is not None
        # the lost reply is a connection error: said once, through the outage line
        out = triggerer.output()
        assert "database unreachable" in out and "claiming triggers" in out, out[-3000:]
        infos = [client.get(t) for t in ids]
    assert [i.state for i in infos] == [TaskState.SUCCESS] * N, [i.error for i in infos]
    assert all(i.try_number == 1 for i in infos), infos  # no retry: the same try resumed
    resumed = [line.split() for line in resumes.read_text().splitlines()]
    counts = Counter(r[0] for r in resumed)
    assert counts == {t: 1 for t in ids}, counts  # each fired and resumed exactly once
    stranded = max(float(r[1]) for r in resumed) - proxy.cut_at
    print(f"stranded {stranded:.2f} s after the lost COMMIT reply")
    assert stranded < BOUND, stranded


def test_a_worker_waits_for_a_database_that_is_not_up_yet(
    pg_url: str, procs: Callable[..., Proc], tmp_path: Path
) -> None:
    """Started while its database refuses connections (restarting, failing over), a worker
    retries instead of exiting, and runs once the database answers; a refused login still
    fails at once with one line."""
    from tests.support.loopback_proxy import LoopbackProxy
    from tests.support.pgcluster import free_port

    port = free_port()  # nothing listens here yet: connections are refused
    proxied = pg_url.replace(f":{urlsplit(pg_url).port}/", f":{port}/")
    worker = procs(["worker", "--slots", "2"], deferrun_env(proxied))
    wait_until(lambda: "not reachable yet; retrying" in worker.output(), 20, message="a retry")
    proxy = LoopbackProxy(urlsplit(pg_url).port or 5432, port=port)  # the database is back
    try:
        with Client(db=pg_url) as client:
            from tests.support.hostile_ops import Returns

            info = client.wait(client.submit(Returns(what="fine")), timeout=60)
        assert info.state is TaskState.SUCCESS, info
        assert worker.popen.poll() is None, worker.output()[-2000:]
    finally:
        worker.stop()
        proxy.close()
    missing = pg_url.rsplit("/", 1)[0] + "/no_such_database"  # refused: not worth waiting for
    began = time.monotonic()
    refused = procs(["worker"], deferrun_env(missing))
    assert refused.popen.wait(20) == 2, refused.output()[-2000:]
    assert time.monotonic() - began < 15
    assert "not reachable yet" not in refused.output()
