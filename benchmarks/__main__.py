"""Run every benchmark in sequence and write one Markdown report with their tables and PNGs.

    python -m benchmarks [--out DIR] [--tiny] [--only NAME,...]

Sizes fit a 2-core machine in under 15 minutes; ``--tiny`` runs toy sizes (the test suite's
smoke check). Each benchmark still runs alone (``python -m benchmarks.<name> --help``); this
runs them as subprocesses with the arguments shown in the report. DIR defaults to
benchmarks/results/ (the committed reference results): pass another --out for a trial run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._harness import REPO, machine, prepare_out

#: (name, module, arguments at full size, arguments at tiny size)
STEPS: list[tuple[str, str, list[str], list[str]]] = [
    (
        "cycle-sqlite",
        "benchmarks.cycle",
        ["--tasks", "1000", "--latency-tasks", "300", "--live", "5000"],
        ["--tasks", "40", "--latency-tasks", "20", "--live", "200", "--slots", "4"],
    ),
    (
        "cycle-postgres",
        "benchmarks.cycle",
        ["--backend", "postgres", "--tasks", "1000", "--latency-tasks", "300", "--live", "5000"],
        ["--backend", "postgres", "--tasks", "40", "--latency-tasks", "20", "--live", "200"],
    ),
    (
        "triggerer_scale (timers)",
        "benchmarks.triggerer_scale",
        ["--sizes", "1000,10000", "--backends", "sqlite"],
        ["--sizes", "200", "--backends", "sqlite", "--defer-rate-guess", "100"],
    ),
    (
        "triggerer_scale (burst)",
        "benchmarks.triggerer_scale",
        ["--mode", "burst", "--sizes", "10000", "--backends", "sqlite,postgres"],
        ["--mode", "burst", "--sizes", "200", "--backends", "sqlite", "--defer-rate-guess", "100"],
    ),
    (
        "sensor_slots",
        "benchmarks.sensor_slots",
        ["--sensors", "100", "--compute", "20", "--stagger", "10"],
        [
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
        ],
    ),
    (
        "builtin_triggers",
        "benchmarks.builtin_triggers",
        ["--triggers", "500", "--poll-interval", "2", "--intervals", "3"],
        ["--triggers", "20", "--poll-interval", "0.5", "--intervals", "2"],
    ),
    (
        "pipelines",
        "benchmarks.pipelines",
        ["--fanout", "5000", "--chain", "300", "--repeat", "1"],
        [
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
        ],
    ),
    (
        "idle",
        "benchmarks.idle",
        ["--window", "30"],
        ["--window", "2", "--poll-intervals", "default"],
    ),
    (
        "shared_polls",
        "benchmarks.shared_polls",
        ["--tasks", "1000", "--poll-interval", "2", "--intervals", "3"],
        ["--tasks", "20", "--poll-interval", "0.5", "--intervals", "2"],
    ),
    (
        "aws_waits",
        "benchmarks.aws_waits",
        ["--tasks", "300", "--poll-interval", "2", "--intervals", "3", "--idle-seconds", "10"],
        ["--tasks", "20", "--poll-interval", "0.5", "--intervals", "1", "--idle-seconds", "2"],
    ),
    (
        "web_pages",
        "benchmarks.web_pages",
        ["--rows", "200000", "--clean-rows", "50000", "--resume", "300", "--repeat", "1"],
        [
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
        ],
    ),
    ("listing", "benchmarks.listing", ["--rows", "1000000"], ["--rows", "2000"]),
    (
        "fleet",
        "benchmarks.fleet",
        ["--triggers", "20000"],
        ["--triggers", "400", "--dead-after", "3"],
    ),
    (
        "full_triggerer",
        "benchmarks.full_triggerer",
        ["--triggers", "1000", "--window", "10"],
        ["--triggers", "50", "--window", "1", "--kinds", "timer"],
    ),
]


def run_step(module: str, args: list[str], out: Path, timeout: float) -> tuple[int, str, float]:
    started = time.monotonic()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    try:
        done = subprocess.run(
            [sys.executable, "-m", module, "--out", str(out), *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        code, text = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        code, text = -1, f"timed out after {timeout:g}s\n{exc.stdout or ''}"
    return code, text if isinstance(text, str) else text.decode(), time.monotonic() - started


def report_section(
    name: str, cmd: str, code: int, text: str, seconds: float, pngs: list[str]
) -> str:
    tables = [line for line in text.splitlines() if line.startswith("|")]
    lines = [f"## {name}", "", f"`{cmd}` ({seconds:.0f} s)", ""]
    if code != 0:
        tail = "\n".join(text.splitlines()[-15:])
        lines += [f"**failed (exit {code})**", "", "```", tail, "```", ""]
    lines += [*tables, ""]
    lines += [f"![{png}]({png})" for png in pngs]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (a smoke check)")
    parser.add_argument("--only", default="", help="comma list of step names to run")
    parser.add_argument("--step-timeout", type=float, default=600.0)
    args = parser.parse_args()
    out = prepare_out(args.out)
    only = {s for s in args.only.split(",") if s}
    info = machine()
    load = os.getloadavg()
    sections = []
    failed = 0
    for name, module, full, tiny in STEPS:
        if only and name not in only:
            continue
        step_args = tiny if args.tiny else full
        before = {p.name: p.stat().st_mtime for p in out.glob("*.png")}
        print(f"running {name} ...", flush=True)
        code, text, seconds = run_step(module, step_args, out, args.step_timeout)
        failed += code != 0
        pngs = sorted(p.name for p in out.glob("*.png") if before.get(p.name) != p.stat().st_mtime)
        cmd = f"python -m {module} --out DIR {' '.join(step_args)}"
        sections.append(report_section(name, cmd, code, text, seconds, pngs))
        print(f"  {name}: exit {code} in {seconds:.0f} s", flush=True)
    head = (
        "# deferrun benchmarks\n\n"
        f"{info['cores']} cores, {info['memory_gib']} GiB, Python {info['python']}, "
        f"load average at start {load[0]:.2f} (other work on the machine skews wall times)"
        f"{', tiny sizes' if args.tiny else ''}.\n\n"
    )
    report = out / "report.md"
    report.write_text(head + "\n".join(sections))
    print(f"\nwritten: {report}")
    if failed:
        raise SystemExit(f"{failed} benchmark(s) failed; see {report}")


if __name__ == "__main__":
    main()
