"""Every exported metric is documented in README, and the Grafana dashboard only uses real ones."""

from __future__ import annotations

import json
import re

from deferrun.process.metrics import Metrics
from tests.support.processes import REPO

SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
}


def exported() -> tuple[set[str], set[str]]:
    """(family names as documented, every series name Prometheus scrapes)."""
    families, series = set(), set()
    metrics = Metrics()
    metrics.watch_shared_polls(lambda: [])  # registered by the triggerer that runs polls
    for family in metrics.registry.collect():
        documented = family.name + ("_total" if family.type == "counter" else "")
        families.add(documented)
        series.update(family.name + s for s in SUFFIXES[family.type])
    return families, series


def test_every_metric_is_documented_in_readme() -> None:
    readme = (REPO / "README.md").read_text()
    rows = "\n".join(line for line in readme.splitlines() if line.startswith("| `deferrun_"))
    documented = set(re.findall(r"`(deferrun_[a-z_]+)", rows))
    families, _ = exported()
    missing = sorted(families - documented)
    assert not missing, f"undocumented metrics (add them to README's metrics table): {missing}"
    extra = documented - families
    assert not extra, f"README documents metrics that do not exist: {extra}"


def test_grafana_dashboard_uses_only_exported_metrics() -> None:
    dashboard = json.loads((REPO / "deploy/grafana/deferrun.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bdeferrun_[a-z_]+", e)}
    _, series = exported()
    assert used and used <= series, f"dashboard uses metrics nobody exports: {used - series}"
    families, _ = exported()
    bases = {re.sub(r"_(bucket|sum|count)$", "", m) for m in used}
    unused = {f for f in families if f not in bases and f.removesuffix("_total") not in bases}
    assert not unused, f"exported metrics without a dashboard panel: {unused}"
