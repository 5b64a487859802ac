"""``deferrun task ID --graph``: the pipeline the task page draws, as rows, on both backends;
bounded, saying what it cut, and terminal-safe."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import anyio
import pytest
import structlog

from deferrun.cli.commands import main
from deferrun.client import build_task
from deferrun.store import open_store
from tests.support.userland import Outcome


async def _pipeline(db_url: str, names: Sequence[tuple[str, Sequence[int]]]) -> list[str]:
    """Submit tasks named ``name`` after the earlier tasks at the given positions."""
    store = await open_store(db_url)
    ids: list[str] = []
    try:
        for name, after in names:
            task = build_task(
                Outcome(what="ok", task_id=name, queue="nobody"), after=[ids[i] for i in after]
            )
            await store.submit(task)
            ids.append(task.id)
    finally:
        await store.close()
    return ids


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``main`` configures structlog on this test's captured stderr, closed after the test:
    later tests' log lines must not go there."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_task_graph_prints_the_pipeline(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    a, b, c, d = anyio.run(
        _pipeline,
        db_url,
        [("extract", []), ("transform\x1b[2J", [0]), ("load", [1]), ("report", [1, 2])],
    )
    out = _run(capsys, "task", b, "--graph", "--db", db_url)
    graph = out.split("pipeline (")[1]
    rows = [line.split() for line in graph.splitlines()[3:] if line.strip()]
    assert [r[0] for r in rows] == ["-1", "this", "+1", "+1"]
    assert rows[0][1:4] == ["extract", "queued", a]
    assert rows[2][1:] == ["load", "deferred", c, "transform\\x1b[2J"]  # escaped, not obeyed
    assert rows[3][1:] == ["report", "deferred", d, "load,", "transform\\x1b[2J"]
    assert "\x1b" not in out and "cut:" not in out

    shown = json.loads(_run(capsys, "task", b, "--graph", "--json", "--db", db_url))
    assert shown["root"] == b and len(shown["nodes"]) == 4 and len(shown["edges"]) == 4
    assert shown["cut"] == []

    alone = anyio.run(_pipeline, db_url, [("alone", [])])[0]
    assert "no upstream or downstream tasks" in _run(
        capsys, "task", alone, "--graph", "--db", db_url
    )


def test_task_graph_says_what_it_cut(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    chain = [("step-0", [])] + [(f"step-{i}", [i - 1]) for i in range(1, 6)]
    fan_in = [(f"source-{i}", []) for i in range(45)]
    ids = anyio.run(_pipeline, db_url, [*chain, *fan_in, ("sink", list(range(6, 51)))])
    out = _run(capsys, "task", ids[5], "--graph", "--db", db_url)
    assert "cut: more upstream tasks beyond 3 levels, not drawn" in out
    assert "step-1" not in out and "step-2" in out
    out = _run(capsys, "task", ids[-1], "--graph", "--db", db_url)
    assert "cut: 6 more neighbouring tasks not drawn (at most 40 tasks)" in out


def test_a_huge_task_name_does_not_blow_up_the_output(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by an attack: one 20,000-character upstream name padded every row of a wide
    fan-in's table to 20 KB (40 MB for 2,000 upstreams). Cells are cut."""
    huge = "x" * 20_000
    names = [(huge, [])] + [(f"up-{i}", []) for i in range(50)]
    ids = anyio.run(_pipeline, db_url, [*names, ("sink", list(range(51)))])
    out = _run(capsys, "task", ids[-1], "--db", db_url)
    assert len(out) < 60_000, len(out)
    assert "x" * 150 in out and huge not in out and "…" in out
