"""Safe defaults: processes load user code only from ``--import`` modules (a row from any
other module fails its task with the flag to add), ``/metrics`` and ``/healthz`` listen on
127.0.0.1 unless ``--metrics-host`` says otherwise, and every subcommand's ``--help`` has a
description and shows its defaults."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable, Iterator

import anyio
import pytest

from deferrun.cli.commands import build_parser, main
from deferrun.client import AsyncClient
from deferrun.core import classpaths
from deferrun.core.baseoperator import BaseOperator
from deferrun.core.models import TaskInfo
from deferrun.exceptions import ClassLoadError
from deferrun.process.startup import configure_trust
from deferrun.sensors import TimeDeltaSensor
from tests.support.processes import Proc, deferrun_env, wait_until
from tests.support.userland import Outcome

SUBCOMMANDS = [
    ["standalone"],
    ["triggerer"],
    ["worker"],
    ["submit"],
    ["cancel"],
    ["retry"],
    ["db"],
    ["db", "clean"],
    ["web"],
    ["tasks"],
    ["task"],
    ["triggers"],
    ["logs"],
]


@pytest.fixture
def restore_trust() -> Iterator[None]:
    before = classpaths.trusted_modules()
    yield
    classpaths.set_trusted_modules(None if before is None else list(before))


def test_without_import_only_deferrun_and_triggers_load(
    monkeypatch: pytest.MonkeyPatch, restore_trust: None
) -> None:
    monkeypatch.delenv("DEFERRUN_IMPORTS", raising=False)
    configure_trust([])
    assert classpaths.trusted_modules() == ("deferrun", "triggers")
    assert classpaths.load_class("deferrun.sensors.TimeDeltaSensor", BaseOperator)
    with pytest.raises(ClassLoadError) as info:
        classpaths.load_class("tests.support.userland.Outcome", BaseOperator)
    message = str(info.value)
    assert "\n" not in message
    assert "--import tests.support.userland (or its package: --import tests)" in message
    monkeypatch.setenv("DEFERRUN_IMPORTS", "tests.support")
    configure_trust([])
    assert classpaths.load_class("tests.support.userland.Outcome", BaseOperator)


async def _submit(db_url: str) -> list[str]:
    async with AsyncClient(db_url) as client:
        return [
            await client.submit(Outcome(what="ok", task_id="user-code")),
            await client.submit(TimeDeltaSensor(delta=0, task_id="built-in")),
        ]


async def _get(db_url: str, ids: list[str]) -> list[TaskInfo]:
    async with AsyncClient(db_url) as client:
        return [await client.get(task_id) for task_id in ids]


@pytest.mark.slow
def test_a_process_without_import_fails_user_rows_with_the_flag_to_add(
    sqlite_url: str, procs: Callable[..., Proc]
) -> None:
    ids = anyio.run(_submit, sqlite_url)
    env = deferrun_env(sqlite_url)
    env.pop("DEFERRUN_IMPORTS")
    proc = procs(["standalone"], env)

    def ended() -> list[TaskInfo] | None:
        infos = anyio.run(_get, sqlite_url, ids)
        return infos if all(i.finished for i in infos) else None

    user, built_in = wait_until(ended, 30, 0.2, "both tasks end")
    assert user.state == "failed" and user.try_number == 1
    assert "--import tests.support.userland" in (user.error or ""), user.error
    assert built_in.state == "success", built_in.error
    assert proc.popen.poll() is None
    starts = [
        json.loads(line)["event"]
        for line in proc.output().splitlines()
        if line.startswith("{") and "no --import given" in line
    ]
    assert len(starts) == 1 and "load only from deferrun and triggers" in starts[0]


def test_metrics_listen_on_loopback_unless_told() -> None:
    parser = build_parser()
    for command in ("standalone", "triggerer", "worker"):
        assert parser.parse_args([command]).metrics_host == "127.0.0.1"
        args = parser.parse_args([command, "--metrics-host", "0.0.0.0"])
        assert args.metrics_host == "0.0.0.0"


def _help(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([*argv, "--help"])
    return out.getvalue()


@pytest.mark.parametrize("argv", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_help_describes_it(argv: list[str]) -> None:
    text = _help(argv)
    description = text.split("\n\n")[1]
    assert not description.startswith(("positional", "options")), text
    assert description.strip() and "\n" not in description.strip()[:60], text


def test_help_shows_defaults() -> None:
    assert "--slots SLOTS         tasks run at once (default: 8)" in _help(["worker"])
    standalone = _help(["standalone"])
    assert "(default: 2)" in standalone and "(default: 1000)" in standalone
    assert "most triggers run at once (default: 1000)" in _help(["triggerer"])
    assert "(default: 127.0.0.1" in _help(["worker"])
    assert "most tasks listed (default: 50)" in _help(["tasks"])
    assert "(default 500)" in _help(["db", "clean"])  # said by the option itself: not twice
    assert "(default: 500)" not in _help(["db", "clean"])
    assert "else only deferrun and triggers" in " ".join(_help(["worker"]).split())


@pytest.mark.parametrize(
    ("imports", "error"),
    [
        ([""], "--import '' names no module"),  # found by an attack: DEFERRUN_IMPORTS then
        (["  "], "--import '' names no module"),  # was ignored without a word
        (["deferrun.__main__"], "a __main__ module runs its program when imported"),
    ],
)
def test_import_values_that_name_nothing_or_a_program_are_refused(
    imports: list[str], error: str, restore_trust: None
) -> None:
    from deferrun.exceptions import ConfigError

    with pytest.raises(ConfigError, match=error.replace("(", r"\(")):
        configure_trust(imports)
