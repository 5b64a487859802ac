"""The status page's alerts in a real headless Chromium (issue 24, items 5 and 6): the
overview's red banner while triggers wait and no triggerer lives, and, once a triggerer runs
a trigger whose polls fail, the warning band on its task's page and the failing-triggers
table on the Triggers page - the error redacted. Screenshots as in test_web_browser.py."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path

import anyio
from selenium import webdriver
from selenium.webdriver.common.by import By

from deferrun.client import build_task
from deferrun.store import make_store
from tests.support.hostile_ops import Returns
from tests.support.pgcluster import free_port
from tests.support.processes import Proc, deferrun_env, wait_until
from tests.web.test_web_browser import browser, pytestmark, shoot, wait_text
from triggers.http import HttpTrigger

__all__ = ["browser", "pytestmark"]  # the fixture and the slow mark, shared

API_PASSWORD = "api-pass-b4nd-secret"


def test_alert_banner_failing_trigger_band_and_table(
    sqlite_url: str, procs: Callable[..., Proc], browser: webdriver.Chrome, tmp_path: Path
) -> None:
    closed = free_port()  # nothing listens: every poll is refused (a TransientError)

    async def setup() -> str:
        store = make_store(sqlite_url, dead_after=3.0)
        await store.open()
        try:
            task = build_task(
                Returns(what="ok", task_id="wait-for-api"),
                start_trigger=HttpTrigger(
                    endpoint="health", http_conn_id="flaky_api", poll_interval=1.0
                ),
            )
            await store.submit(task)
            return task.id
        finally:
            await store.close()

    task_id = anyio.run(setup)
    env = deferrun_env(
        sqlite_url, DEFERRUN_CONN_FLAKY_API=f"http://app:{API_PASSWORD}@127.0.0.1:{closed}"
    )
    port = free_port()
    procs(["web", "--port", str(port)], env)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            with urllib.request.urlopen(base + "/api/overview", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    wait_until(up, 30, 0.2, "web server listening")

    # no triggerer yet: the trigger waits and nobody can run it
    browser.get(base + "/")
    banner = browser.find_element(By.ID, "alert-no-triggerer")
    assert "No live triggerer" in banner.text
    assert banner.value_of_css_property("background-color") == "rgba(198, 40, 40, 1)"
    shoot(browser, tmp_path, "overview-no-triggerer", ["No live triggerer while triggers wait"])

    # a triggerer takes it; its polls keep failing
    procs(["triggerer"], env)

    def band() -> str:
        browser.get(f"{base}/tasks/{task_id}")
        found = browser.find_elements(By.ID, "trigger-failing")
        return found[0].text if found else ""

    text = wait_until(lambda: "poll(s) in a row failed" in band() and band(), 40, 0.5, "band")
    assert "Its trigger is failing" in text and "never" in text
    assert API_PASSWORD not in browser.page_source
    shoot(browser, tmp_path, "task-trigger-failing", ["Its trigger is failing", "Trigger"])

    browser.get(base + "/triggers")
    wait_text(browser, "#failing-triggers", "triggers.http.HttpTrigger")
    assert task_id in browser.find_element(By.ID, "failing-triggers").text
    shoot(browser, tmp_path, "triggers-failing", ["Failing triggers (1)", "Cannot connect to host"])

    # the overview: the triggerer is live now, the failing trigger is a banner instead
    def banner_gone() -> bool:
        browser.get(base + "/")
        return not browser.find_elements(By.ID, "alert-no-triggerer")

    wait_until(banner_gone, 20, 0.5, "the no-triggerer banner gone")
    assert "fail every poll" in browser.find_element(By.ID, "alert-failing-triggers").text
