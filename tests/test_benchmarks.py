"""Tiny runs of every benchmark, so they cannot rot (figures come from full runs, not here)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.e2e

RESULTS = REPO / "benchmarks" / "results"


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


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """Keep a developer's full-run results: smoke runs write over the same files."""
    saved = tmp_path / "saved"
    if RESULTS.exists():
        shutil.copytree(RESULTS, saved)
    yield RESULTS
    if saved.exists():
        shutil.rmtree(RESULTS, ignore_errors=True)
        shutil.copytree(saved, RESULTS)


def test_cycle_smoke(results: Path) -> None:
    out = run_benchmark(
        "benchmarks.cycle",
        "--tasks",
        "40",
        "--latency-tasks",
        "20",
        "--live",
        "200",
        "--slots",
        "4",
    )
    assert "event->resume" in out
    data = json.loads((results / "cycle-sqlite.json").read_text())
    assert data["cycle"]["tasks"] == 40 and data["live_triggers"]["count"] == 200


def test_triggerer_scale_smoke(results: Path) -> None:
    out = run_benchmark(
        "benchmarks.triggerer_scale",
        "--sizes",
        "200",
        "--backends",
        "sqlite",
        "--defer-rate-guess",
        "100",
    )
    assert "| sqlite" in out
    data = json.loads((results / "triggerer_scale.json").read_text())
    [run] = data["runs"]
    assert run["n"] == 200 and run["lost"] == 0 and run["succeeded"] == 200
    assert (results / "triggerer_scale.png").stat().st_size > 0


def test_sensor_slots_smoke(results: Path) -> None:
    out = run_benchmark(
        "benchmarks.sensor_slots",
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
    data = json.loads((results / "sensor_slots.json").read_text())
    runs = {r["mode"]: r for r in data["runs"]}
    assert set(runs) == {"baseline", "poke", "reschedule", "deferrable"}
    assert all(r["failed"] == 0 for r in runs.values())
    # The point of the whole project, checked at toy scale: deferrable sensors hold far fewer
    # slot-seconds than poke-mode ones.
    assert runs["deferrable"]["sensor_slot_seconds"] < runs["poke"]["sensor_slot_seconds"] / 5
    assert (results / "sensor_slots.png").stat().st_size > 0


def test_builtin_triggers_smoke(results: Path) -> None:
    out = run_benchmark(
        "benchmarks.builtin_triggers",
        "--triggers",
        "20",
        "--poll-interval",
        "0.5",
        "--intervals",
        "2",
    )
    assert "S3KeyTrigger" in out and "HttpTrigger" in out
    data = json.loads((results / "builtin_triggers.json").read_text())
    assert data["http"]["requests_per_poll_interval"] > 0
