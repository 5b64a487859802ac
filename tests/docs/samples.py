"""Finding the code blocks of README.md and docs/, and running them as a reader would.

The conventions, in the Markdown itself:

- A ```` ```python ```` block runs as a script of its own, in the page's working directory
  (so it imports the modules the page wrote there), with the virtualenv's ``python``.
- A ```` ```python title="NAME.py" ```` block is written to ``NAME.py`` in that directory: a
  module that later blocks and processes of the page import.
- ``<!-- not run: REASON -->`` on the line before a block keeps it from running (a fragment,
  or it needs AWS, dbt Cloud or a real install). Python blocks are still compiled.
- Shell blocks (``sh``, ``bash``) run only when marked:
  ``<!-- run -->`` runs it in the page's one bash session (variables persist, ``set -e``);
  ``<!-- run: background -->`` starts it for the rest of the page (a terminal left open);
  ``<!-- run: until "REGEX" -->`` runs it again until its output matches, for a block that
  only looks (``deferrun task $TASK`` until the task is deferred).
- Other blocks (``text``, ``ini``, ``yaml``...) never run; ``yaml`` blocks must parse.

Every page gets a fresh temporary directory, ``DEFERRUN_DB`` on a SQLite file in it, the
virtualenv's ``bin`` first on ``PATH``, and no other ``DEFERRUN_*`` variable. Background
processes are stopped (SIGTERM, then SIGKILL) when the page ends, whatever happened.
"""

from __future__ import annotations

import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

SHELLS = {"sh", "bash", "shell"}
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)(?P<info>.*)$")
MARKER = re.compile(r"^\s*<!--\s*(?P<body>(?:not run|run)\b.*?)\s*-->\s*$")
TITLE = re.compile(r'title="(?P<title>[^"]*)"')
UNTIL = re.compile(r'^run: until "(?P<pattern>.+)"$')

#: how long one block may take, and how long an ``until`` block may keep looking
BLOCK_TIMEOUT = 120.0
UNTIL_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    title: str | None
    marker: str | None  # what the <!-- ... --> before it says, if anything
    code: str

    @property
    def where(self) -> str:
        page = self.page.relative_to(REPO) if self.page.is_relative_to(REPO) else self.page
        return f"{page}:{self.line}"

    @property
    def runs(self) -> bool:
        if self.marker is not None and self.marker.startswith("not run"):
            return False
        if self.lang == "python":
            return True
        return self.lang in SHELLS and self.marker is not None


def pages() -> list[Path]:
    """README.md and every Markdown page of the docs site."""
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of ``page``, in order, with the marker line before each."""
    lines = page.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines):
            closing = FENCE.match(lines[i])
            if (
                closing
                and closing["fence"][0] == fence[0]
                and len(closing["fence"]) >= len(fence)
                and not closing["lang"]
                and not closing["info"].strip()
            ):
                break
            body.append(lines[i].removeprefix(indent))
            i += 1
        else:
            raise AssertionError(f"{page.relative_to(REPO)}:{start + 1}: a fence never closed")
        i += 1
        marker = None
        before = start - 1
        while before >= 0 and not lines[before].strip():
            before -= 1
        if before >= 0 and (m := MARKER.match(lines[before])):
            marker = m["body"]
        title = TITLE.search(opening["info"])
        found.append(
            Block(
                page=page,
                line=start + 1,
                lang=opening["lang"].lower(),
                title=title["title"] if title else None,
                marker=marker,
                code="\n".join(body) + "\n",
            )
        )
    return found


def page_env(workdir: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("DEFERRUN_") and k != "PYTHONPATH"
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["DEFERRUN_DB"] = f"sqlite:///{workdir / 'deferrun.db'}"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


class SampleFailed(AssertionError):
    pass


class Shell:
    """One bash session, as a reader's terminal: variables and the directory persist."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.run("set -eo pipefail", timeout=10)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def run(self, script: str, timeout: float) -> tuple[int, str]:
        """Run ``script`` in the session: (exit status of its last command, its output).

        Under ``set -e`` a failing command ends the session: that is raised, with the output.
        """
        assert self.proc.stdin is not None
        token = f"__sample_done_{uuid.uuid4().hex}"
        self.proc.stdin.write(f"{script.rstrip()}\nprintf '\\n{token} %s\\n' \"$?\"\n")
        self.proc.stdin.flush()
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise SampleFailed(
                    f"still running after {timeout:g}s:\n{script}\n--- output ---\n" + "".join(out)
                ) from None
            if line is None:
                raise SampleFailed(
                    f"a command failed (exit status {self.proc.wait()}):\n{script}\n"
                    "--- output ---\n" + "".join(out)
                )
            if line.startswith(token):
                if out and out[-1] == "\n":  # the newline printf put before the token
                    out.pop()
                return int(line.split()[1]), "".join(out)
            out.append(line)

    def close(self) -> None:
        stop_group(self.proc)


def stop_group(proc: subprocess.Popen[str]) -> None:
    """SIGTERM the process group, SIGKILL it if it has not stopped within STOP_TIMEOUT."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT)
    else:  # it ended; children it left in its group go too
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class Background:
    block: Block
    proc: subprocess.Popen[str]
    log: Path

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class PageRun:
    """Runs one page's blocks in order in ``workdir``; ``close()`` stops what it started."""

    workdir: Path
    env: dict[str, str] = field(init=False)
    shell: Shell | None = None
    background: list[Background] = field(default_factory=list)
    outputs: dict[int, str] = field(default_factory=dict)  # block line -> last output

    def __post_init__(self) -> None:
        self.env = page_env(self.workdir)

    def run_page(self, page: Path) -> None:
        for block in blocks(page):
            self.run(block)

    def run(self, block: Block) -> None:
        if block.lang == "python" and block.title:
            (self.workdir / block.title).write_text(block.code)
            return
        if not block.runs:
            return
        try:
            if block.lang == "python":
                self._python(block)
            elif block.marker == "run: background":
                self._background(block)
            elif block.marker == "run":
                _, self.outputs[block.line] = self._session().run(block.code, BLOCK_TIMEOUT)
            elif until := UNTIL.match(block.marker or ""):
                self._until(block, re.compile(until["pattern"]))
            else:
                raise SampleFailed(f"unknown marker {block.marker!r}")
        except SampleFailed as exc:
            raise SampleFailed(f"{block.where}: {exc}{self._background_report()}") from None

    def _python(self, block: Block) -> None:
        script = self.workdir / f"_sample_{block.page.stem}_{block.line}.py"
        script.write_text(block.code)
        try:
            done = subprocess.run(
                [sys.executable, script.name],
                cwd=self.workdir,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=BLOCK_TIMEOUT,
            )
        except subprocess.TimeoutExpired as exc:
            raise SampleFailed(f"still running after {BLOCK_TIMEOUT:g}s: {exc.output}") from None
        self.outputs[block.line] = done.stdout
        if done.returncode != 0:
            raise SampleFailed(
                f"the Python sample exited {done.returncode}\n--- stdout ---\n{done.stdout}"
                f"\n--- stderr ---\n{done.stderr}"
            )

    def _session(self) -> Shell:
        if self.shell is None:
            self.shell = Shell(self.workdir, self.env)
        return self.shell

    def _until(self, block: Block, pattern: re.Pattern[str]) -> None:
        """Run a looking block until its output matches: bounded, with growing pauses."""
        shell = self._session()
        # in a subshell, so a command that fails (no database yet) ends only this try
        wrapped = f"set +e\n(\nset -e\n{block.code.rstrip()}\n)\necho __rc=$?\nset -e\n"
        deadline = time.monotonic() + UNTIL_TIMEOUT
        pause, tries, out = 0.1, 0, ""
        while time.monotonic() < deadline:
            tries += 1
            _, out = shell.run(wrapped, BLOCK_TIMEOUT)
            status = re.search(r"__rc=(\d+)\s*$", out)
            out = re.sub(r"\n?__rc=\d+\s*$", "", out)
            if status and status[1] == "0" and pattern.search(out):
                self.outputs[block.line] = out
                return
            time.sleep(min(pause, max(deadline - time.monotonic(), 0)))
            pause = min(pause * 1.5, 1.0)
        raise SampleFailed(
            f"output never matched {pattern.pattern!r} within {UNTIL_TIMEOUT:g}s "
            f"({tries} tries); last output:\n{out}"
        )

    def _background(self, block: Block) -> None:
        log = self.workdir / f"_background_{block.line}.log"
        with log.open("w") as sink:
            proc = subprocess.Popen(
                ["bash", "--noprofile", "--norc", "-c", "set -e\n" + block.code],
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        self.background.append(Background(block, proc, log))

    def check_background(self) -> None:
        """A background process must still run: one that ended (an import error, a bad
        flag) is what a reader would see as a terminal that returned to its prompt."""
        for bg in self.background:
            if bg.proc.poll() is not None:
                raise SampleFailed(
                    f"{bg.block.where}: the background command ended (exit status "
                    f"{bg.proc.returncode}) before the page did:\n{bg.block.code}"
                    f"--- its output ---\n{bg.tail()}"
                )

    def _background_report(self) -> str:
        parts = [
            f"\n--- background {bg.block.where} ({shlex.join(bg.block.code.split()[-3:])}, "
            f"{'running' if bg.proc.poll() is None else f'exited {bg.proc.returncode}'}) ---\n"
            f"{bg.tail(20)}"
            for bg in self.background
        ]
        return "".join(parts)

    def close(self) -> None:
        for bg in self.background:
            stop_group(bg.proc)
        if self.shell is not None:
            self.shell.close()
