"""deploy/prometheus/alerts.yml passes its unit tests (`promtool test rules`), and every
metric it reads is one deferrun exports (a renamed metric would silence an alert)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from deferrun.process.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing in CI: apt-get install prometheus (see .ci/run)")
        pytest.skip("promtool not installed (Debian package prometheus)")
    return found


def test_alert_rules_pass_promtool_unit_tests() -> None:
    promtool = _promtool()
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        done = subprocess.run(
            [promtool, *args], cwd=DEPLOY, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_alert_rules_read_only_exported_metrics() -> None:
    exported = set()
    for family in Metrics().registry.collect():
        exported.update(sample.name for sample in family.samples)
        exported.add(family.name)
    metrics = Metrics()
    metrics.watch_failing_triggers(lambda: {"x.Y": 1})
    exported.update(f.name for f in metrics.registry.collect())
    used = set(re.findall(r"\b(deferrun_[a-z_]+)", (DEPLOY / "alerts.yml").read_text()))
    assert used, "no deferrun metric in alerts.yml"
    assert used <= exported, sorted(used - exported)
