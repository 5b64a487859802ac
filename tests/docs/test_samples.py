"""Every code block in README.md and docs/ that is meant to run is run (conventions in
``tests/docs/samples.py``), the quickstart end to end with real processes, as a reader
follows it."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from deferrun import Client, TaskState
from tests.docs.samples import REPO, SHELLS, Block, PageRun, blocks, page_env, pages

README = REPO / "README.md"


def _page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


def _runnable_pages() -> list[object]:
    """Pages with something to run, README aside (the quickstart test runs it)."""
    params: list[object] = []
    for page in pages():
        found = [b for b in blocks(page) if b.runs]
        if page == README or not found:
            continue
        marks = [pytest.mark.e2e] if any(b.lang in SHELLS for b in found) else []
        params.append(pytest.param(page, id=_page_id(page), marks=marks))
    return params


@pytest.mark.parametrize("page", pages(), ids=_page_id)
def test_blocks_follow_the_conventions(page: Path) -> None:
    """Markers are ones the runner knows, fragments say why, and every Python block at least
    compiles (a fragment too); YAML blocks parse."""
    for block in blocks(page):
        marker = block.marker
        if marker is not None:
            assert marker == "run" or marker.startswith(("run: ", "not run: ")), (
                f"{block.where}: unknown marker <!-- {marker} -->"
            )
            if marker.startswith("not run"):
                assert marker.removeprefix("not run:").strip(), (
                    f"{block.where}: say why the block is not run: <!-- not run: REASON -->"
                )
            elif block.lang not in SHELLS:
                pytest.fail(f"{block.where}: <!-- {marker} --> is for shell blocks only")
            else:
                assert marker in ("run", "run: background") or re.fullmatch(
                    r'run: until ".+"', marker
                ), f"{block.where}: unknown run marker <!-- {marker} -->"
        if block.lang == "python":
            compile(block.code, block.where, "exec")
            if block.title is not None:
                assert re.fullmatch(r"\w+\.py", block.title), (
                    f"{block.where}: a titled Python block names a module file, not {block.title!r}"
                )
        if block.lang == "yaml":
            yaml = pytest.importorskip("yaml")
            yaml.safe_load(block.code)


@pytest.mark.parametrize("page", _runnable_pages())
def test_page_samples_run(page: Path, tmp_path: Path) -> None:
    run = PageRun(tmp_path)
    try:
        run.run_page(page)
        run.check_background()
    finally:
        run.close()


def _quickstart(page: Path) -> list[Block]:
    return [b for b in blocks(page) if b.runs or b.title == "myflows.py"]


@pytest.mark.e2e
def test_quickstart_end_to_end(tmp_path: Path) -> None:
    """README's quickstart as a reader follows it: myflows.py written, a real
    ``deferrun triggerer --import myflows`` and ``deferrun worker --import myflows`` started,
    a task submitted, seen deferred, the file made to arrive, the task seen resumed to
    success; then the Python client's task too. Every wait is bounded and polls a condition
    (``<!-- run: until ... -->``); the processes are stopped in any case."""
    steps = _quickstart(README)
    background = [" ".join(b.code.split()) for b in steps if b.marker == "run: background"]
    assert background == [
        "export PYTHONPATH=$PWD deferrun triggerer --import myflows",
        "export PYTHONPATH=$PWD deferrun worker --import myflows",
    ], "the quickstart starts a triggerer and a worker that import myflows"
    until = [b.marker for b in steps if b.marker and b.marker.startswith("run: until")]
    assert until == ['run: until "state +deferred"', 'run: until "state +success"']
    assert (REPO / "docs/quickstart.md").read_text().count('--8<-- "README.md:quickstart"') == 1

    run = PageRun(tmp_path)
    try:
        for block in steps:
            run.run(block)
        run.check_background()  # neither process stopped along the way

        db = run.env["DEFERRUN_DB"]
        with Client(db) as client:
            tasks = client.list()
        assert len(tasks) == 2, tasks  # one from the command line, one from Python
        assert {t.state for t in tasks} == {TaskState.SUCCESS}
        assert [t.result for t in tasks] == [3, 3]
        cli_task = tasks[-1]  # newest first: the command line's came first
        logs = subprocess.run(
            ["deferrun", "logs", cli_task.id, "--json"],
            cwd=tmp_path,
            env=run.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        events = [json.loads(line)["event"] for line in logs.splitlines()]
        for expected in ("waiting for the file", "task deferred", "trigger fired", "counted"):
            assert expected in events, (expected, events)
        assert events.index("task deferred") < events.index("trigger fired")
        assert events.index("trigger fired") < events.index("counted")
    finally:
        run.close()


def test_setup_commands_are_the_ones_ci_runs() -> None:
    """README's test command is what .ci/run runs verbatim; its demo command ends in
    ``deferrun standalone --demo`` (run below)."""
    sh = [b.code.strip() for b in blocks(README) if b.lang == "sh" and b.marker is None]
    demo, tests = sh[0], sh[1]
    assert demo.endswith(".venv/bin/deferrun standalone --demo"), demo
    assert tests.startswith("python3 -m venv .venv && ") and "-m pytest" in tests, tests
    ci = (REPO / ".ci/run").read_text().splitlines()
    assert tests in ci, ".ci/run must run README's test command verbatim"


@pytest.mark.e2e
def test_the_demo_runs(tmp_path: Path) -> None:
    done = subprocess.run(
        ["deferrun", "standalone", "--demo"],
        cwd=tmp_path,
        env=page_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "demo finished" in done.stdout


#: ``deferrun.db`` is the default database's file name, not a module
NOT_MODULES = {"deferrun.db"}
DOTTED = re.compile(r"`((?:deferrun|triggers)(?:\.[A-Za-z_]\w*)+)")
PATH = re.compile(r"`((?:deferrun|triggers|tests|benchmarks|deploy|docs)/[\w./-]*)`")


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


@pytest.mark.parametrize("page", [*pages(), REPO / "CHANGELOG.md"], ids=_page_id)
def test_names_in_prose_exist(page: Path) -> None:
    """Module paths, dotted names and files the text names exist in today's layout."""
    text = page.read_text()
    missing = sorted(
        {d for d in DOTTED.findall(text) if d not in NOT_MODULES and not _resolves(d)}
        | {p for p in PATH.findall(text) if not (REPO / p).exists()}
    )
    assert not missing, f"{_page_id(page)} names what does not exist: {missing}"


def test_every_page_is_in_the_site() -> None:
    """The README's links into docs/ point at pages that exist."""
    links = re.findall(r"\]\((docs/[^)#]+)", README.read_text())
    assert links
    for link in links:
        assert (REPO / link).exists(), link


def test_the_site_builds_without_warnings(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**page_env(tmp_path), "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
