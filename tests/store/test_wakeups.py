"""Local (SQLite) wake-ups: forged datagrams are ignored, floods are coalesced, and a process
that registers just after a writer refreshed its port list is still woken."""

from __future__ import annotations

import re
import socket
import sqlite3
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from deferrun.client import build_task
from deferrun.store import make_store
from deferrun.store.base import Wakeup
from deferrun.store.sqlite.notify import MIN_WAKE_INTERVAL, WAKE_BURST, UdpListener
from tests.support.pgcluster import free_port
from tests.support.processes import Proc, deferrun_env, wait_until

pytestmark = pytest.mark.e2e

DATAGRAMS = 10_000
BATCHES = 200  # sent every 10 ms: about 2 s of flood


def _claims(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    match = re.search(r'deferrun_store_calls_total\{method="claim_tasks"\} ([0-9.e+]+)', text)
    return float(match.group(1)) if match else 0.0


def _rx_queue(port: int) -> int | None:
    """Bytes waiting in the UDP socket bound to ``port`` (from /proc/net/udp)."""
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port:
            return int(fields[4].split(":")[1], 16)
    return None


def _flood(port: int, payloads: list[bytes]) -> float:
    """Send DATAGRAMS datagrams to ``port`` in paced batches; returns how long it took."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    started = time.monotonic()
    per_batch = DATAGRAMS // BATCHES
    sent = 0
    for batch in range(BATCHES):
        for i in range(per_batch):
            try:
                sock.sendto(payloads[(sent + i) % len(payloads)], ("127.0.0.1", port))
            except BlockingIOError:
                pass
        sent += per_batch
        next_at = started + (batch + 1) * 0.01
        while time.monotonic() < next_at:  # paced sender, bounded by the batch count
            time.sleep(0.001)
    sock.close()
    return time.monotonic() - started


def _worker_port(db: Path) -> int | None:
    conn = sqlite3.connect(db)
    try:
        sql = "SELECT wake_port FROM deferrun_processes WHERE role = 'worker'"
        row = conn.execute(sql).fetchone()
    finally:
        conn.close()
    return int(row[0]) if row else None


def _secret(db: Path) -> bytes:
    conn = sqlite3.connect(db)
    try:
        return str(
            conn.execute("SELECT value FROM deferrun_meta WHERE key = 'wake_secret'").fetchone()[0]
        ).encode()
    finally:
        conn.close()


async def _create(url: str) -> None:
    store = make_store(url)
    await store.open()
    await store.close()


@pytest.mark.slow
def test_forged_and_flooded_wakeups_keep_claims_bounded(
    tmp_path: Path, procs: Callable[..., Proc]
) -> None:
    db = tmp_path / "deferrun.db"
    anyio.run(_create, f"sqlite:///{db}")
    metrics_port = free_port()
    proc = procs(
        ["worker", "--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1"],
        deferrun_env(f"sqlite:///{db}"),
    )
    wake_port = wait_until(lambda: _worker_port(db), 20, message="worker registered")
    wait_until(lambda: _claims(metrics_port) > 0, 20, message="metrics served")

    # Forged: no secret, a guessed one, garbage. None of them may wake the worker.
    before, window = _claims(metrics_port), time.monotonic()
    elapsed = _flood(wake_port, [b"w", b"w" + b"0" * 32, b"\xff" * 40])
    wait_until(lambda: _rx_queue(wake_port) == 0, 10, 0.05, "flood drained")
    forged_claims = _claims(metrics_port) - before
    elapsed = time.monotonic() - window
    # Only the 1 s fallback poll claims (plus its wait re-arming): ~elapsed / 1 s.
    assert forged_claims <= elapsed + 3, (forged_claims, elapsed)

    # Valid secret (someone who can read the database): rate-limited, one wake per interval
    # after a first burst.
    before, window = _claims(metrics_port), time.monotonic()
    _flood(wake_port, [b"w" + _secret(db)])
    wait_until(lambda: _rx_queue(wake_port) == 0, 10, 0.05, "flood drained")
    valid_claims = _claims(metrics_port) - before
    elapsed = time.monotonic() - window
    bound = elapsed / MIN_WAKE_INTERVAL + WAKE_BURST + elapsed + 5
    assert valid_claims <= bound, (valid_claims, bound, elapsed)
    assert proc.popen.poll() is None
    print(f"claims during 10,000 datagrams: forged {forged_claims:g}, valid {valid_claims:g}")


@pytest.mark.anyio
async def test_process_registered_just_after_a_refresh_is_woken(tmp_path: Path) -> None:
    """The writer's port list is under a second old when the worker registers; its next
    notifying write must still reach the worker (before: only the 1 s fallback poll did)."""
    from tests.support.userland import DeferOnce  # type: ignore[import-not-found]

    url = f"sqlite:///{tmp_path / 'deferrun.db'}"
    writer = make_store(url, dead_after=10.0)
    await writer.open()
    late = make_store(url, dead_after=10.0)
    await late.open()
    try:
        await writer.register_process("triggerer-x", "triggerer", [], 10)  # ports cached now
        wakeup = await late.register_process("worker-x", "worker", ["default"], 1)
        await wakeup.wait(0)  # clear the registration's own wake-up, if any
        await writer.submit(build_task(DeferOnce(task_id="wake-me")))
        assert await wakeup.wait(0.5), "not woken (well under the 1 s list refresh)"
    finally:
        await late.close()
        await writer.close()


@pytest.mark.anyio
async def test_listener_rate_limits_valid_wakeups_and_ignores_forged_ones() -> None:
    """One datagram at a time for ~1 s: each would be its own wake without the limiter."""
    secret = b"s" * 32
    wakeup = Wakeup()
    listener = UdpListener(wakeup, secret)
    try:

        def send(payload: bytes, seconds: float) -> int:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            started, sent = time.monotonic(), 0
            for _ in range(20_000):  # bounded; ends on time well before
                if time.monotonic() - started > seconds:
                    break
                sock.sendto(payload, ("127.0.0.1", listener.port))
                sent += 1
                time.sleep(0.0002)
            sock.close()
            return sent

        sent = await anyio.to_thread.run_sync(send, b"wnot-the-secret", 0.3)
        with anyio.fail_after(5):
            while listener.received < sent * 0.9:  # bounded by fail_after
                await anyio.sleep(0.01)
        assert listener.wakes == 0 and listener.rejected == listener.received

        started = time.monotonic()
        sent = await anyio.to_thread.run_sync(send, b"w" + secret, 1.0)
        with anyio.fail_after(5):
            while listener.received - listener.rejected < sent * 0.9:
                await anyio.sleep(0.01)
        elapsed = time.monotonic() - started
        assert listener.wakes <= elapsed / MIN_WAKE_INTERVAL + WAKE_BURST + 2, (
            listener.wakes,
            sent,
            elapsed,
        )
        assert listener.wakes >= 10 and sent > 2 * listener.wakes, (listener.wakes, sent)
        print(f"valid datagrams {sent} in {elapsed:.2f}s -> {listener.wakes} wakes")
    finally:
        listener.close()
