"""The public surface, pinned: what users import from each public module, and the line between
it and the rooms. A name added or removed here is a decision, not an accident (as anyio pins
its own)."""

from __future__ import annotations

import ast
import importlib
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

PUBLIC: dict[str, list[str]] = {
    "deferrun": [
        "AsyncClient",
        "BaseOperator",
        "BaseSensor",
        "BaseTrigger",
        "Client",
        "ConfigError",
        "Context",
        "DeferrunError",
        "FailTask",
        "PollingTrigger",
        "SerializationError",
        "SkipTask",
        "TaskDeferred",
        "TaskEnded",
        "TaskFailedEvent",
        "TaskInfo",
        "TaskNotFound",
        "TaskSkippedEvent",
        "TaskState",
        "TaskSuccessEvent",
        "TaskTimeout",
        "TransientError",
        "TriggerEvent",
        "TriggerFailed",
        "TriggerInfo",
        "__version__",
    ],
    "deferrun.client": ["AsyncClient", "Client"],
    "deferrun.exceptions": [
        "AttemptCancelled",
        "AttemptInterrupted",
        "AttemptTimedOut",
        "ClassLoadError",
        "ConfigError",
        "DeferrunError",
        "FailTask",
        "RetryRefused",
        "SerializationError",
        "SkipTask",
        "StoreGone",
        "StoreUnavailable",
        "TaskDeferred",
        "TaskEnded",
        "TaskNotFound",
        "TaskReschedule",
        "TaskTimeout",
        "TransientError",
        "TriggerFailed",
    ],
    "deferrun.sensors": [
        "BaseSensor",
        "DateTimeSensor",
        "FileSensor",
        "HttpSensor",
        "JobRunFailed",
        "JobRunSensor",
        "S3KeySensor",
        "SensorTimeout",
        "SqlSensor",
        "TaskSensor",
        "TimeDeltaSensor",
        "TriggerSensor",
    ],
    "deferrun.operators": ["DbtCloudRunJobOperator", "JobRunFailed", "RunJobOperator"],
    "deferrun.aws_sensors": [
        "AthenaQuerySensor",
        "AwsWaiterSensor",
        "BatchJobSensor",
        "EmrJobFlowSensor",
        "EmrStepSensor",
        "GlueCrawlerSensor",
        "SqsSensor",
    ],
    "deferrun.testing": ["arun_trigger", "run_trigger"],
    "deferrun.demo": [
        "AsyncHello",
        "Countdown",
        "FetchResult",
        "RunFinishedTrigger",
        "StartJobRun",
        "WaitForRun",
        "WriteFileLater",
    ],
    "triggers.time": ["DateTimeTrigger", "TimeDeltaTrigger"],
    "triggers.file": ["FileTrigger"],
    "triggers.s3": ["S3KeyTrigger"],
    "triggers.http": ["HttpTrigger"],
    "triggers.sql": ["SqlTrigger"],
    "triggers.job": ["GlueJobRunTrigger", "JobStatusTrigger"],
    "triggers.task": ["TaskStateTrigger"],
    "triggers.aws": ["AwsWaiterTrigger", "WaiterFailed"],
    "triggers.sqs": ["SqsTrigger"],
    "triggers.dbt": ["DbtCloudRunTrigger", "cancel_run", "cancel_run_retrying", "status_name"],
}

ROOMS = ["cli", "connections", "core", "process", "store", "triggerer", "worker"]


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_module_exports_exactly_its_pinned_names(module: str) -> None:
    mod = importlib.import_module(module)
    assert sorted(mod.__all__) == sorted(PUBLIC[module])
    missing = [name for name in mod.__all__ if not hasattr(mod, name)]
    assert not missing, f"{module}.__all__ names what it does not define: {missing}"


def test_compat_airflow_exports_what_it_defines() -> None:
    mod = importlib.import_module("deferrun.compat.airflow")
    assert {"BaseTrigger", "TriggerEvent", "BaseOperator", "BaseHook"} <= set(mod.__all__)
    assert [name for name in mod.__all__ if not hasattr(mod, name)] == []


def test_the_package_top_holds_only_the_public_face_and_the_rooms() -> None:
    entries = sorted(  # a folder left with only __pycache__ by a checkout is no room
        p.name for p in (ROOT / "deferrun").iterdir() if p.is_file() or any(p.rglob("*.py"))
    )
    modules = sorted(m.rsplit(".", 1)[-1] + ".py" for m in PUBLIC if m.startswith("deferrun."))
    expected = sorted(["__init__.py", "__main__.py", "py.typed", *modules, *ROOMS, "web", "compat"])
    assert entries == expected


@pytest.mark.parametrize("room", ROOMS)
def test_every_room_says_it_is_internal(room: str) -> None:
    doc = importlib.import_module(f"deferrun.{room}").__doc__ or ""
    assert "Internal" in doc, f"deferrun.{room} does not say which of its modules are public"


def _imports_of_private_names() -> list[str]:
    """Imports of an underscore name from another room (or another top-level package)."""

    def room(module: str) -> str:
        parts = module.split(".")
        if parts[0] == "deferrun" and len(parts) > 2 and (ROOT / "deferrun" / parts[1]).is_dir():
            return ".".join(parts[:2])
        return ".".join(parts[:2]) if parts[0] == "deferrun" else parts[0]

    found = []
    for path in [*(ROOT / "deferrun").rglob("*.py"), *(ROOT / "triggers").rglob("*.py")]:
        rel = path.relative_to(ROOT).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.level == 0):
                continue
            if node.module.split(".")[0] not in ("deferrun", "triggers"):
                continue
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                if private and room(node.module) != room(module):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {alias.name}")
    return found


def test_no_room_imports_another_rooms_private_name() -> None:
    assert _imports_of_private_names() == []


def test_room_contracts_hold() -> None:
    """The layers, private modules and acyclic rooms of .importlinter (also run in CI)."""
    lint = pathlib.Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    done = subprocess.run(
        [str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
