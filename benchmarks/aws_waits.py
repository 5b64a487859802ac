"""Cost of the issue-14 waits in one real `deferrun triggerer` against moto (through a counting
proxy): 1,000 SQS sensors on one queue, and 1,000 AwsWaiterTriggers beside 1,000 S3KeyTriggers.

    python -m benchmarks.aws_waits --out DIR [--tasks 1000] [--poll-interval 5] [--intervals 3]

SQS: receive requests and triggerer CPU while all wait (idle), then the time from sending 1,000
messages until 1,000 events are stored (triggerer metric) and until every task has ended.
Waiters vs S3: requests per poll interval, triggerer CPU, CPU per poll and RSS per trigger.
Prints tables and writes DIR/aws_waits.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from benchmarks._harness import (
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
from benchmarks.builtin_triggers import _submit, measure, metric, start_counted_moto
from deferrun.aws_sensors import EmrStepSensor, SqsSensor
from deferrun.sensors import S3KeySensor


def moto_baseline(sqs: Any, n: int) -> dict[str, float]:
    """The same 1,000 messages sent, received and deleted by one plain boto3 client: what the
    moto server itself costs on this machine, for scale."""
    url = sqs.create_queue(QueueName="baseline")["QueueUrl"]
    start = time.perf_counter()
    for i in range(0, n, 10):
        entries = [{"Id": str(j), "MessageBody": str(i + j)} for j in range(10)]
        sqs.send_message_batch(QueueUrl=url, Entries=entries)
    sent = time.perf_counter() - start
    start, got = time.perf_counter(), 0
    for _ in range(n):  # bounded: at most one call per message
        messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
        if messages:
            sqs.delete_message_batch(
                QueueUrl=url,
                Entries=[
                    {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                    for i, m in enumerate(messages)
                ],
            )
        got += len(messages)
        if got >= n:
            break
    return {
        "moto_send_s": round(sent, 2),
        "moto_receive_delete_s": round(time.perf_counter() - start, 2),
    }


def sqs_run(
    n: int, aws_uri: str, moto_port: int, proxy: Any, workdir: Path, idle_s: float = 20.0
) -> dict[str, Any]:
    import boto3

    sqs = boto3.client(
        "sqs",
        region_name="us-east-1",
        endpoint_url=f"http://127.0.0.1:{moto_port}",
        aws_access_key_id="k",
        aws_secret_access_key="s",
    )
    url = sqs.create_queue(QueueName="bench")["QueueUrl"]
    db = f"sqlite:///{workdir / 'sqs.db'}"
    env = env_for(db, DEFERRUN_CONN_AWS_DEFAULT=aws_uri)
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
        workdir / "sqs-triggerer.log",
    )
    worker = Process(["worker", "--slots", "16"], env, workdir / "sqs-worker.log")
    try:
        wait_for(lambda: metric(port, "deferrun_triggers_running") is not None, 30)
        anyio.run(
            _submit,
            db,
            [
                SqsSensor(
                    sqs_queue=url,
                    max_messages=1,
                    wait_time_seconds=20,
                    mode="deferrable",
                    timeout=3600,
                )
                for _ in range(n)
            ],
        )
        wait_for(lambda: metric(port, "deferrun_triggers_running") == n, 300, 0.5)
        time.sleep(3)  # first receive, client creation
        c0, cpu0, t0 = proxy.count, triggerer.cpu_seconds(), time.perf_counter()
        time.sleep(idle_s)
        c1, cpu1, t1 = proxy.count, triggerer.cpu_seconds(), time.perf_counter()
        idle = {
            "idle_window_s": idle_s,
            "receive_requests_in_idle_window": c1 - c0,
            "triggerer_cpu_pct_idle": round((cpu1 - cpu0) / (t1 - t0) * 100, 2),
        }
        events0 = metric(port, "deferrun_trigger_events_total") or 0.0
        entries = [
            [{"Id": str(j), "MessageBody": f'{{"n": {i + j}}}'} for j in range(10)]
            for i in range(0, n, 10)
        ]
        start = time.perf_counter()
        for batch in entries:
            sqs.send_message_batch(QueueUrl=url, Entries=batch)
        sent = time.perf_counter() - start
        wait_for(
            lambda: (metric(port, "deferrun_trigger_events_total") or 0) - events0 >= n, 120, 0.05
        )
        stored = time.perf_counter() - start
        wait_for(lambda: metric(port, "deferrun_triggers_running") == 0, 120, 0.05)

        def left() -> int:
            a = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
            return int(a["ApproximateNumberOfMessages"]) + int(
                a["ApproximateNumberOfMessagesNotVisible"]
            )

        wait_for(lambda: left() == 0, 120, 0.1)
        deleted = time.perf_counter() - start
        return {
            "tasks": n,
            **moto_baseline(sqs, n),
            **idle,
            "send_s": round(sent, 2),
            "events_stored_s": round(stored, 2),
            "all_deleted_s": round(deleted, 2),
        }
    finally:
        triggerer.stop()
        worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--poll-interval", type=float, default=5.0)
    parser.add_argument("--intervals", type=int, default=3)
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    add_out_argument(parser)
    args = parser.parse_args()
    out_dir = prepare_out(args.out)
    n, interval = args.tasks, args.poll_interval
    workdir = Path(tempfile.mkdtemp(prefix="deferrun-bench-aws-"))
    import boto3

    moto, proxy, moto_port = start_counted_moto()
    aws_uri = f"aws://k:s@?region_name=us-east-1&endpoint_url=http%3A%2F%2F127.0.0.1%3A{proxy.port}"
    boto = {
        "region_name": "us-east-1",
        "endpoint_url": f"http://127.0.0.1:{moto_port}",
        "aws_access_key_id": "k",
        "aws_secret_access_key": "s",
    }
    boto3.client("s3", **boto).create_bucket(Bucket="landing")
    emr = boto3.client("emr", **boto)
    cluster = emr.run_job_flow(
        Name="bench",
        Instances={"InstanceCount": 1, "KeepJobFlowAliveWhenNoSteps": True},
        ReleaseLabel="emr-6.0.0",
        JobFlowRole="r",
        ServiceRole="r",
    )["JobFlowId"]
    steps: list[str] = []
    for _ in range(0, n, 100):  # moto's steps stay RUNNING: the waiters poll without end
        steps += emr.add_job_flow_steps(
            JobFlowId=cluster,
            Steps=[{"Name": "s", "ActionOnFailure": "CONTINUE", "HadoopJarStep": {"Jar": "x"}}]
            * 100,
        )["StepIds"]
    try:
        sqs_result = sqs_run(n, aws_uri, moto_port, proxy, workdir, args.idle_seconds)
        env = {"DEFERRUN_CONN_AWS_DEFAULT": aws_uri}
        waiter = measure(
            "waiter",
            n,
            interval,
            args.intervals,
            env,
            [
                EmrStepSensor(
                    job_flow_id=cluster, step_id=steps[i], mode="deferrable", poke_interval=interval
                )
                for i in range(n)
            ],
            lambda: proxy.count,
            workdir,
        )
        s3 = measure(
            "s3",
            n,
            interval,
            args.intervals,
            env,
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
    finally:
        moto.stop()
    for r in (waiter, s3):
        polls = r["requests_per_poll_interval"] * (1.0 / interval)
        # no request in the measured window (a tiny run): no per-poll figure to give
        r["cpu_ms_per_poll"] = (
            round(r["triggerer_cpu_pct"] / 100 / polls * 1000, 3) if polls else None
        )
        r["rss_kib_per_trigger"] = round(r["rss_above_idle_mib"] * 1024 / n, 1)
    out = {"machine": machine(), "sqs": sqs_result, "waiter": waiter, "s3": s3}
    path = write_json(out_dir, "aws_waits", out)
    print(f"\n{n} SqsSensor tasks on one queue ({out['machine']['cores']} cores)\n")
    print(table(list(sqs_result), [list(sqs_result.values())]))
    print(f"\n{n} waiting triggers, poll interval {interval:g} s\n")
    print(
        table(
            ["trigger", "requests / interval", "triggerer CPU", "CPU / poll", "RSS / trigger"],
            [
                [
                    k,
                    r["requests_per_poll_interval"],
                    f"{r['triggerer_cpu_pct']} %",
                    f"{r['cpu_ms_per_poll']} ms",
                    f"{r['rss_kib_per_trigger']} KiB",
                ]
                for k, r in (("AwsWaiterTrigger (EMR StepComplete)", waiter), ("S3KeyTrigger", s3))
            ],
        )
    )
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
