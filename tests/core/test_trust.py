"""Loading stored classpaths only imports trusted modules (--import / DEFERRUN_IMPORTS).

A forged row naming a module with import-time side effects (like ``antigravity``, which opens
a browser) must never make a worker or triggerer import it when --import is given; an import
that raises SystemExit fails that row, not the process; and an Airflow-style hard-coded
``serialize()`` path is stored as the class's real path so an --import triggerer can load it.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from deferrun import TaskDeferred
from deferrun.client import new_task_id
from deferrun.core import classpaths
from deferrun.core.baseoperator import BaseOperator
from deferrun.core.basetrigger import BaseTrigger
from deferrun.core.deferral import prepare_deferral
from deferrun.core.models import Deferral, NewTask, TaskInfo
from deferrun.exceptions import ClassLoadError, ConfigError
from deferrun.store import open_store
from tests.support.processes import Proc, deferrun_env, wait_until

GOOD = '''
import os
from deferrun import BaseOperator, BaseTrigger, TriggerEvent


class Hello(BaseOperator):
    def execute(self, context):
        return "hello"


class Real(BaseTrigger):
    def __init__(self, value=None):
        self.value = value

    async def run(self):
        yield TriggerEvent({"value": self.value})


class HardCoded(BaseTrigger):
    """An Airflow provider trigger: serialize() hard-codes its provider path."""

    def __init__(self, value=None):
        self.value = value

    def serialize(self):
        return ("airflow.providers.acme.triggers.HardCoded", {"value": self.value})

    async def run(self):
        yield TriggerEvent({"value": self.value})


class WaitHardCoded(BaseOperator):
    def execute(self, context):
        self.defer(trigger=HardCoded(value=7), method_name="done")

    def done(self, context, event=None):
        return event
'''

ALIAS = """
from goodpkg.core import Real as Alias  # re-exported under another module and name
"""

EVIL = """
import os
from deferrun import BaseOperator, BaseTrigger, TriggerEvent

with open(os.environ["EVIL_MARKER"], "a") as f:  # import-time side effect
    f.write(f"imported in {os.getpid()}\\n")


class Op(BaseOperator):
    def execute(self, context):
        return "evil ran"


class Trig(BaseTrigger):
    async def run(self):
        yield TriggerEvent("evil fired")
"""

EXITER = """
raise SystemExit(3)
"""


@pytest.fixture
def usercode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """goodpkg (trusted), evilmod (writes a marker on import) and exitmod (SystemExit)."""
    root = tmp_path / "usercode"
    (root / "goodpkg").mkdir(parents=True)
    (root / "goodpkg" / "__init__.py").write_text("")
    (root / "goodpkg" / "core.py").write_text(textwrap.dedent(GOOD))
    (root / "goodpkg" / "alias.py").write_text(textwrap.dedent(ALIAS))
    (root / "evilmod.py").write_text(textwrap.dedent(EVIL))
    (root / "exitmod.py").write_text(textwrap.dedent(EXITER))
    monkeypatch.setenv("EVIL_MARKER", str(tmp_path / "evil-imported"))
    monkeypatch.syspath_prepend(str(root))
    for name in ("goodpkg", "goodpkg.core", "goodpkg.alias", "evilmod", "exitmod"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield root
    classpaths.set_trusted_modules(None)


# --------------------------------------------------------------------------- in-process


def test_untrusted_module_is_refused_before_import(usercode: Path, tmp_path: Path) -> None:
    classpaths.set_trusted_modules(["goodpkg"])
    for classpath in ("evilmod.Op", "deferrun.__main__.X", "antigravity.X", "unittest.__main__.Y"):
        with pytest.raises(ClassLoadError, match="not trusted"):
            classpaths.load_class(classpath, BaseOperator)
    assert not (tmp_path / "evil-imported").exists()
    assert "evilmod" not in sys.modules
    assert classpaths.load_class("goodpkg.core.Hello", BaseOperator).__name__ == "Hello"
    assert classpaths.load_class("triggers.time.DateTimeTrigger", BaseTrigger)


def test_system_exit_at_import_is_a_class_load_error(usercode: Path) -> None:
    with pytest.raises(ClassLoadError, match="SystemExit"):
        classpaths.load_class("exitmod.Op", BaseOperator)


def test_import_trusted_fails_with_one_line(usercode: Path) -> None:
    with pytest.raises(ConfigError, match="--import no_such_pkg_xyz") as info:
        classpaths.import_trusted(["no_such_pkg_xyz"])
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="SystemExit"):
        classpaths.import_trusted(["exitmod"])


def _deferral_of(trigger: BaseTrigger) -> Deferral:
    return prepare_deferral(TaskDeferred(trigger, "done"))


def test_hard_coded_serialize_path_is_stored_as_the_real_class(usercode: Path) -> None:
    from goodpkg.alias import Alias  # type: ignore[import-not-found]
    from goodpkg.core import HardCoded  # type: ignore[import-not-found]

    assert _deferral_of(HardCoded(value=1)).classpath == "goodpkg.core.HardCoded"

    alias = Alias(value=2)
    alias.serialize = lambda: ("goodpkg.alias.Alias", {"value": 2})  # type: ignore[method-assign]
    assert _deferral_of(alias).classpath == "goodpkg.core.Real"


# --------------------------------------------------------------------------- real processes


async def _forge_rows(db_url: str) -> dict[str, str]:
    """Rows a database writer could forge: operators and a trigger in untrusted modules."""
    store = await open_store(db_url)
    try:
        ids: dict[str, str] = {}

        def task(classpath: str) -> NewTask:
            return NewTask(
                id=new_task_id(),
                name="forged",
                classpath=classpath,
                kwargs="{}",
                queue="default",
                max_tries=1,
                retry_delay=0.0,
                execution_timeout=None,
            )

        carrier = task("goodpkg.core.Hello")
        await store.submit(carrier)
        [claimed] = await store.claim_tasks("forger", ["default"], 1)
        deferral = Deferral("evilmod.Trig", "{}", "execute", "{}", None)
        assert await store.defer_task(carrier.id, claimed.claim_token, deferral) is not None
        ids["trigger"] = carrier.id
        for key, classpath in [("op", "evilmod.Op"), ("exit", "exitmod.Op")]:
            new = task(classpath)
            await store.submit(new)
            ids[key] = new.id
        return ids
    finally:
        await store.close()


async def _submit_good(db_url: str) -> list[str]:
    from goodpkg.core import Hello, WaitHardCoded  # type: ignore[import-not-found]

    from deferrun.client import AsyncClient

    async with AsyncClient(db_url) as client:
        return [
            await client.submit(Hello(task_id="hello")),
            await client.submit(WaitHardCoded(task_id="hard-coded")),
        ]


async def _get(db_url: str, ids: list[str]) -> list[TaskInfo]:
    store = await open_store(db_url)
    try:
        return [info for tid in ids if (info := await store.get_task(tid)) is not None]
    finally:
        await store.close()


def _finished(db_url: str, ids: list[str]) -> list[TaskInfo] | None:
    infos = anyio.run(_get, db_url, ids)
    return infos if all(i.finished for i in infos) and len(infos) == len(ids) else None


def _warnings(proc: Proc) -> list[str]:
    lines = []
    for line in proc.output().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if "no --import given" in str(event.get("event")):
            lines.append(line)
    return lines


def test_processes_with_import_never_load_untrusted_rows(
    db_url: str, usercode: Path, tmp_path: Path, procs: Callable[..., Proc]
) -> None:
    forged = anyio.run(_forge_rows, db_url)
    good = anyio.run(_submit_good, db_url)
    env = deferrun_env(db_url, usercode, EVIL_MARKER=str(tmp_path / "evil-imported"))
    worker = procs(["worker", "--import", "goodpkg"], env)
    triggerer = procs(["triggerer"], {**env, "DEFERRUN_IMPORTS": "goodpkg"})
    ids = [forged["op"], forged["exit"], forged["trigger"], *good]
    infos = wait_until(lambda: _finished(db_url, ids), 30, 0.2, "every task finished")
    by_id = {i.id: i for i in infos}
    for key in ("op", "exit", "trigger"):
        info = by_id[forged[key]]
        assert info.state == "failed", info
        assert "not trusted by this process" in (info.error or ""), info.error
    assert [by_id[t].state for t in good] == ["success", "success"]
    assert by_id[good[1]].result == {"value": 7}  # hard-coded path stored as the real one
    assert not (tmp_path / "evil-imported").exists(), "an untrusted module was imported"
    assert worker.popen.poll() is None and triggerer.popen.poll() is None
    assert _warnings(worker) == [] and _warnings(triggerer) == []


@pytest.mark.slow
def test_without_import_rows_of_other_modules_fail_with_the_flag_to_add(
    db_url: str, usercode: Path, tmp_path: Path, procs: Callable[..., Proc]
) -> None:
    forged = anyio.run(_forge_rows, db_url)
    env = deferrun_env(db_url, usercode, EVIL_MARKER=str(tmp_path / "evil-imported"))
    env.pop("DEFERRUN_IMPORTS", None)
    proc = procs(["standalone"], env)
    ids = [forged["exit"], forged["op"], forged["trigger"]]
    infos = wait_until(lambda: _finished(db_url, ids), 30, 0.2, "forged tasks end")
    for info, module in zip(infos, ("exitmod", "evilmod", "goodpkg"), strict=True):
        assert info.state == "failed", info
        assert f"--import {module}" in (info.error or ""), info.error  # the flag to add
    assert not (tmp_path / "evil-imported").exists(), "an untrusted module was imported"
    good = anyio.run(_submit_good, db_url)  # goodpkg is not named either: refused too
    infos = wait_until(lambda: _finished(db_url, good), 30, 0.2, "good tasks end")
    assert all("--import goodpkg" in (i.error or "") for i in infos), infos
    assert proc.popen.poll() is None
    assert len(_warnings(proc)) == 1, proc.output()  # one start line says how to load code


def test_import_of_a_missing_package_stops_with_one_line(
    sqlite_url: str, tmp_path: Path, procs: Callable[..., Proc]
) -> None:
    proc = procs(["worker", "--import", "no_such_pkg_xyz"], deferrun_env(sqlite_url))
    assert proc.popen.wait(30) == 2
    lines = [line for line in proc.output().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--import no_such_pkg_xyz" in lines[0], proc.output()
    assert "Traceback" not in proc.output()
