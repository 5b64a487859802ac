"""Cost of built-in triggers at scale: 1,000 S3 key triggers on one bucket, 1,000 HTTP triggers
on one host, all waiting in one real `deferrun triggerer`.

    python -m benchmarks.builtin_triggers --out DIR [--triggers 1000] [--poll-interval 5]
                                          [--intervals 3]

Reports per kind: requests per poll interval (counted at the server: the HTTP service counts
its own, S3 requests pass through a counting proxy in front of moto), triggerer CPU while
polling, and triggerer RSS. Prints a table and writes DIR/builtin_triggers.json.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import anyio
from aiohttp import ClientSession, web

from benchmarks._harness import (
    FakeServices,
    Process,
    add_out_argument,
    env_for,
    free_port,
    machine,
    prepare_out,
    table,
    wait_for,
    write_json,
)
from deferrun.client import build_task
from deferrun.sensors import HttpSensor, S3KeySensor
from deferrun.store import open_store


class CountingProxy:
    """Forwards HTTP to ``upstream`` and counts requests (runs in its own thread)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.count = 0
        self.port = free_port()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.count += 1
        body = await request.read()
        async with self.session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=request.headers,
            data=body,
            allow_redirects=False,
        ) as resp:
            payload = await resp.read()
            headers = {
                k: v
                for k, v in resp.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "content-encoding")
            }
            return web.Response(status=resp.status, body=payload, headers=headers)

    def start(self) -> None:
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()

            async def main() -> None:
                self.session = ClientSession(auto_decompress=False)
                app = web.Application()
                app.router.add_route("*", "/{tail:.*}", self.handle)
                runner = web.AppRunner(app, access_log=None)
                await runner.setup()
                await web.TCPSite(runner, "127.0.0.1", self.port).start()
                ready.set()
                await asyncio.Event().wait()

            loop.run_until_complete(main())

        threading.Thread(target=serve, daemon=True).start()
        ready.wait(10)


def start_counted_moto() -> tuple[Any, CountingProxy, int]:
    """A moto server on loopback behind a :class:`CountingProxy`: (server, proxy, moto port).
    Point deferrun at the proxy to count its requests; set up fixtures on moto directly."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log
    moto_port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    moto.start()
    proxy = CountingProxy(f"http://127.0.0.1:{moto_port}")
    proxy.start()
    return moto, proxy, moto_port


def metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


async def _submit(db: str, ops: list[Any]) -> None:
    store = await open_store(db)
    try:
        for op in ops:
            await store.submit(build_task(op))
    finally:
        await store.close()


def measure(
    kind: str,
    n: int,
    interval: float,
    intervals: int,
    env_extra: dict[str, str],
    ops: list[Any],
    counter: Any,
    workdir: Path,
) -> dict[str, Any]:
    db = f"sqlite:///{workdir / f'{kind}.db'}"
    env = env_for(db, **env_extra)
    port = free_port()
    triggerer = Process(
        [
            "triggerer",
            "--capacity",
            str(n + 10),
            "--metrics-port",
            str(port),
            "--metrics-host",
            "127.0.0.1",
        ],
        env,
        workdir / f"{kind}-triggerer.log",
    )
    worker = Process(["worker", "--slots", "8"], env, workdir / f"{kind}-worker.log")
    try:
        wait_for(lambda: metric(port, "deferrun_triggers_running") is not None, 30)
        idle_rss = triggerer.rss_mib()
        anyio.run(_submit, db, ops)
        wait_for(lambda: metric(port, "deferrun_triggers_running") == n, 300, 0.5)
        time.sleep(interval * 1.5)  # let first-poll bursts and client creation pass
        c0, cpu0, t0 = counter(), triggerer.cpu_seconds(), time.perf_counter()
        time.sleep(interval * intervals)
        c1, cpu1, t1 = counter(), triggerer.cpu_seconds(), time.perf_counter()
        rss = triggerer.rss_mib()
        return {
            "triggers": n,
            "poll_interval_s": interval,
            "requests_per_poll_interval": round((c1 - c0) / ((t1 - t0) / interval), 1),
            "triggerer_cpu_pct": round((cpu1 - cpu0) / (t1 - t0) * 100, 1),
            "triggerer_rss_mib": round(rss, 1),
            "rss_above_idle_mib": round(rss - idle_rss, 1),
        }
    finally:
        triggerer.stop()
        worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--triggers", type=int, default=1000)
    parser.add_argument("--poll-interval", type=float, default=5.0)
    parser.add_argument("--intervals", type=int, default=3)
    add_out_argument(parser)
    args = parser.parse_args()
    out_dir = prepare_out(args.out)
    n, interval = args.triggers, args.poll_interval
    workdir = Path(tempfile.mkdtemp(prefix="deferrun-bench-triggers-"))

    moto, proxy, moto_port = start_counted_moto()
    import boto3

    boto3.client(
        "s3",
        region_name="us-east-1",
        endpoint_url=f"http://127.0.0.1:{moto_port}",
        aws_access_key_id="k",
        aws_secret_access_key="s",
    ).create_bucket(Bucket="landing")
    services = FakeServices()
    services.start()
    try:
        s3 = measure(
            "s3",
            n,
            interval,
            args.intervals,
            {
                "DEFERRUN_CONN_AWS_DEFAULT": "aws://k:s@?region_name=us-east-1&endpoint_url="
                f"http%3A%2F%2F127.0.0.1%3A{proxy.port}"
            },
            [
                S3KeySensor(
                    bucket_name="landing",
                    bucket_key=f"in/{i}.csv",
                    mode="deferrable",
                    poke_interval=interval,
                )
                for i in range(n)
            ],
            lambda: proxy.count,
            workdir,
        )
        http = measure(
            "http",
            n,
            interval,
            args.intervals,
            {"DEFERRUN_CONN_HTTP_DEFAULT": services.uri()},
            [
                HttpSensor(endpoint=f"health/never-{i}", mode="deferrable", poke_interval=interval)
                for i in range(n)
            ],
            lambda: sum(services.requests.values()),
            workdir,
        )
    finally:
        services.stop()
        moto.stop()
    out = {"machine": machine(), "s3": s3, "http": http}
    path = write_json(out_dir, "builtin_triggers", out)
    rows = [
        [
            kind,
            r["triggers"],
            f"{r['poll_interval_s']:g} s",
            r["requests_per_poll_interval"],
            f"{r['triggerer_cpu_pct']} %",
            f"{r['triggerer_rss_mib']} MiB (+{r['rss_above_idle_mib']})",
        ]
        for kind, r in (("S3KeyTrigger", s3), ("HttpTrigger", http))
    ]
    print(f"\n{n} waiting triggers in one triggerer ({out['machine']['cores']} cores)\n")
    print(
        table(
            [
                "trigger",
                "live",
                "poll interval",
                "requests / interval",
                "triggerer CPU",
                "triggerer RSS",
            ],
            rows,
        )
    )
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
