"""Tiny runs of every benchmark, so they cannot rot (figures come from full runs, not here).

Each run writes to a pytest temporary directory; the committed reference results in
benchmarks/results/ must come out of the test run byte-for-byte as they went in.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import REPO

RESULTS = REPO / "benchmarks" / "results"
BENCHMARKS = [
    "benchmarks.cycle",
    "benchmarks.triggerer_scale",
    "benchmarks.sensor_slots",
    "benchmarks.builtin_triggers",
    "benchmarks.pipelines",
    "benchmarks.shared_polls",
    "benchmarks.aws_waits",
    "benchmarks.web_pages",
    "benchmarks.idle",
    "benchmarks.listing",
    "benchmarks.fleet",
    "benchmarks.full_triggerer",
]


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (empty if it does not exist)."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(autouse=True)
def reference_results_untouched() -> Iterator[None]:
    """No benchmark run may write into the committed reference results."""
    before = tree_digest(RESULTS)
    yield
    assert tree_digest(RESULTS) == before, "a benchmark run changed benchmarks/results/"


def run_benchmark(module: str, *args: str, timeout: float = 240) -> str:
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_reference_results_are_committed() -> None:
    """The digest check above would pass vacuously on an empty directory."""
    digest = tree_digest(RESULTS)
    assert {"cycle-sqlite.json", "sensor_slots.json", "triggerer_scale.png"} <= set(digest)


@pytest.mark.parametrize("module", BENCHMARKS)
def test_out_is_required(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "--out" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("module", BENCHMARKS)
def test_out_that_cannot_be_created_fails_in_one_line(module: str, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = subprocess.run(
        [sys.executable, "-m", module, "--out", str(blocker / "results")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "cannot create --out directory" in lines[0] and str(blocker) in lines[0]


@pytest.mark.slow
@pytest.mark.e2e
def test_cycle_smoke(tmp_path: Path) -> None:
    out_dir = tmp_path / "made" / "by-the-benchmark"  # missing parents are created
    out = run_benchmark(
        "benchmarks.cycle",
        "--out",
        str(out_dir),
        "--tasks",
        "40",
        "--latency-tasks",
        "20",
        "--live",
        "200",
        "--slots",
        "4",
        "--workers",
        "2",
        "--bulk",
    )
    assert "event->resume" in out
    assert sorted(p.name for p in out_dir.iterdir()) == ["cycle-sqlite.json"]
    data = json.loads((out_dir / "cycle-sqlite.json").read_text())
    assert data["cycle"]["tasks"] == 40 and data["live_triggers"]["count"] == 200
    assert data["workers"] == 2 and data["cycle"]["bulk_submit"]
    assert len(data["cycle"]["cpu_s_workers"]) == 2


@pytest.mark.slow
@pytest.mark.e2e
def test_triggerer_scale_smoke(tmp_path: Path) -> None:
    out = run_benchmark(
        "benchmarks.triggerer_scale",
        "--out",
        str(tmp_path),
        "--sizes",
        "200",
        "--backends",
        "sqlite",
        "--defer-rate-guess",
        "100",
    )
    assert "| sqlite" in out
    data = json.loads((tmp_path / "triggerer_scale.json").read_text())
    [run] = data["runs"]
    assert run["n"] == 200 and run["lost"] == 0 and run["succeeded"] == 200
    assert (tmp_path / "triggerer_scale.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.e2e
def test_sensor_slots_smoke(tmp_path: Path) -> None:
    out = run_benchmark(
        "benchmarks.sensor_slots",
        "--out",
        str(tmp_path),
        "--slots",
        "2",
        "--sensors",
        "6",
        "--compute",
        "4",
        "--compute-seconds",
        "0.1",
        "--stagger",
        "1.5",
        "--poke-interval",
        "0.2",
    )
    assert "| deferrable" in out
    data = json.loads((tmp_path / "sensor_slots.json").read_text())
    runs = {r["mode"]: r for r in data["runs"]}
    assert set(runs) == {"baseline", "poke", "reschedule", "deferrable"}
    assert all(r["failed"] == 0 for r in runs.values())
    # The point of the whole project, checked at toy scale: deferrable sensors hold far fewer
    # slot-seconds than poke-mode ones.
    assert runs["deferrable"]["sensor_slot_seconds"] < runs["poke"]["sensor_slot_seconds"] / 5
    assert (tmp_path / "sensor_slots.png").stat().st_size > 0
    assert "| deferrable" in (tmp_path / "sensor_slots.md").read_text()


@pytest.mark.slow
@pytest.mark.e2e
def test_builtin_triggers_smoke(tmp_path: Path) -> None:
    out = run_benchmark(
        "benchmarks.builtin_triggers",
        "--out",
        str(tmp_path),
        "--triggers",
        "20",
        "--poll-interval",
        "0.5",
        "--intervals",
        "2",
    )
    assert "S3KeyTrigger" in out and "HttpTrigger" in out
    data = json.loads((tmp_path / "builtin_triggers.json").read_text())
    assert data["http"]["requests_per_poll_interval"] > 0


@pytest.mark.slow
@pytest.mark.e2e
def test_pipelines_smoke(tmp_path: Path) -> None:
    out = run_benchmark(
        "benchmarks.pipelines",
        "--out",
        str(tmp_path),
        "--backends",
        "sqlite",
        "--fanout",
        "300",
        "--chain",
        "20",
        "--repeat",
        "1",
        "--window",
        "1",
    )
    assert "link overhead p50 / p95" in out and "all queued" in out
    data = json.loads((tmp_path / "pipelines.json").read_text())
    [fan] = data["backends"]["sqlite"]["fanout_runs"]
    [chain] = data["backends"]["sqlite"]["chain_runs"]
    assert fan["n"] == 300 and fan["observed_ms"] >= fan["in_database_ms"] >= 0
    # the 300 waiters cost no store calls: both 1 s windows see the same timer-driven loops
    # (heartbeats, claims, a reap or reconcile may fall in one window only), far below 1 each
    assert fan["store_calls_waiting_total"] - fan["store_calls_idle_total"] <= 10
    assert chain["n"] == 20 and chain["link_p50_ms"] > 0


@pytest.mark.slow
@pytest.mark.e2e
def test_shared_polls_smoke(tmp_path: Path) -> None:
    out = run_benchmark(
        "benchmarks.shared_polls",
        "--out",
        str(tmp_path),
        "--tasks",
        "20",
        "--poll-interval",
        "0.5",
        "--intervals",
        "2",
    )
    assert "resumed once / twice / lost" in out
    data = json.loads((tmp_path / "shared_polls.json").read_text())
    for case in ("s3", "job", "http"):
        assert data[case]["resumed_once"] == 20 and data[case]["lost"] == 0, data[case]
        assert data[case]["requests_per_poll_interval"] <= 3, data[case]


@pytest.mark.slow
@pytest.mark.e2e
def test_aws_waits_smoke(tmp_path: Path) -> None:
    out = run_benchmark(
        "benchmarks.aws_waits",
        "--out",
        str(tmp_path),
        "--tasks",
        "20",
        "--poll-interval",
        "0.5",
        # two intervals: polls are jittered up to 10 % past the interval, so a window of
        # exactly one could hold none (it did once in a full run: 0.0 requests)
        "--intervals",
        "2",
        "--idle-seconds",
        "2",
    )
    assert "AwsWaiterTrigger" in out and "S3KeyTrigger" in out
    data = json.loads((tmp_path / "aws_waits.json").read_text())
    assert data["sqs"]["all_deleted_s"] > 0 and data["waiter"]["requests_per_poll_interval"] > 0


@pytest.mark.slow
@pytest.mark.e2e
def test_triggerer_scale_burst_smoke(tmp_path: Path) -> None:
    out = run_benchmark(
        "benchmarks.triggerer_scale",
        "--out",
        str(tmp_path),
        "--mode",
        "burst",
        "--sizes",
        "150",
        "--backends",
        "sqlite,postgres",
        "--defer-rate-guess",
        "100",
    )
    assert "last resumed s" in out
    data = json.loads((tmp_path / "triggerer_scale-burst.json").read_text())
    runs = {r["backend"]: r for r in data["runs"]}
    assert set(runs) == {"sqlite", "postgres"}
    for run in runs.values():
        assert run["n"] == 150 and run["lost"] == 0 and run["resumed_once"] == 150
        assert run["workers"] == 2 and run["slots"] == 8
        # every trigger fired at or after the one moment, and was resumed after it fired
        assert 0 <= run["fire_lateness_p50_ms"] <= run["fire_lateness_p99_ms"]
        assert run["last_resumed_after_moment_s"] > 0
    # the PostgreSQL cluster's own CPU is measured; SQLite's is inside the processes
    assert runs["sqlite"]["cpu_s_database"] is None
    assert runs["postgres"]["cpu_s_database"] > 0


@pytest.mark.slow
@pytest.mark.e2e
def test_listing_smoke(tmp_path: Path) -> None:
    out = run_benchmark("benchmarks.listing", "--out", str(tmp_path), "--rows", "500")
    assert "first_page_ms" in out
    runs = json.loads((tmp_path / "listing.json").read_text())["runs"]
    assert {r["backend"] for r in runs} == {"sqlite", "postgres"}
    assert all(r["rows"] == 500 and r["first_page_ms"] > 0 for r in runs)


@pytest.mark.slow
@pytest.mark.e2e
def test_run_all_writes_one_report(tmp_path: Path) -> None:
    """``python -m benchmarks`` runs the chosen steps into --out and reports them together."""
    out = run_benchmark(
        "benchmarks", "--out", str(tmp_path), "--tiny", "--only", "pipelines,listing"
    )
    assert "written:" in out
    report = (tmp_path / "report.md").read_text()
    assert "## pipelines" in report and "## listing" in report and "failed" not in report
    assert "## cycle-sqlite" not in report  # --only
    assert {"pipelines.json", "listing.json"} <= {p.name for p in tmp_path.iterdir()}


@pytest.mark.slow
@pytest.mark.e2e
def test_web_pages_smoke(tmp_path: Path) -> None:
    out = run_benchmark(
        "benchmarks.web_pages",
        "--out",
        str(tmp_path),
        "--backends",
        "sqlite",
        "--rows",
        "2000",
        "--clean-rows",
        "500",
        "--resume",
        "20",
        "--repeat",
        "1",
        "--spread",
        "2",
    )
    assert "|" in out
    assert (tmp_path / "web_pages.json").exists()


@pytest.mark.slow
def test_triggerer_scale_heap_smoke(tmp_path: Path) -> None:
    out = run_benchmark(
        "benchmarks.triggerer_scale",
        "--out",
        str(tmp_path),
        "--mode",
        "heap",
        "--sizes",
        "2000",
        "--fire-rate",
        "1000",
        "--measure",
        "1",
    )
    assert "B/timer" in out
    [run] = json.loads((tmp_path / "triggerer_scale-heap.json").read_text())["runs"]
    assert run["n"] == 2000 and run["loaded_before_first_moment"]
    assert run["fired"] > 0 and 0 <= run["fire_lateness_p50_ms"] <= run["fire_lateness_p99_ms"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_triggerer_scale_heap_db_smoke(tmp_path: Path, backend: str) -> None:
    """A real triggerer claims bulk-stored timers and stores every event of the window."""
    out = run_benchmark(
        "benchmarks.triggerer_scale",
        "--out",
        str(tmp_path),
        "--mode",
        "heap",
        "--db",
        backend,
        "--sizes",
        "3000",
        "--window",
        "1000",
        "--fire-rate",
        "1000",
    )
    assert "stored lateness" in out
    [run] = json.loads((tmp_path / "triggerer_scale-heap-db.json").read_text())["runs"]
    assert run["backend"] == backend and run["n"] == 3000 and run["loaded_before_first_moment"]
    assert run["fired_stored"] == 1000 and run["early"] == 0
    assert 0 <= run["stored_lateness_p50_ms"] <= run["stored_lateness_p99_ms"]
    assert run["bytes_per_timer"] > 0 and run["claim_all_s"] > 0


@pytest.mark.slow
@pytest.mark.e2e
def test_full_triggerer_smoke(tmp_path: Path) -> None:
    out = run_benchmark(
        "benchmarks.full_triggerer",
        *("--out", str(tmp_path), "--triggers", "30", "--window", "1", "--kinds", "timer"),
    )
    assert "idle CPU" in out
    runs = json.loads((tmp_path / "full_triggerer.json").read_text())["runs"]
    assert {r["full"] for r in runs} == {True, False}  # at capacity, and with room to spare
    assert all(r["idle_cpu_pct"] >= 0 for r in runs)
