"""The status page in a real browser: Debian's headless Chromium driven by Selenium, against
a real triggerer, worker and `deferrun web` (SQLite).

It loads the overview with a task in every state, follows a task from the tasks page to its
detail, watches that task's log lines arrive while it waits on its trigger, is refused when it
acts without the token (the read-only page says how to act), signs in with the token and
cancels the task through the confirmation page, and follows a pipeline drawn on a task page.
Each page is saved as a screenshot (to tmp_path, and to $DEFERRUN_SCREENSHOTS when set:
README's images come from there) and checked: a non-empty PNG, and the expected text in the DOM.
"""

from __future__ import annotations

import base64
import os
import shutil
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from deferrun.client import build_task
from deferrun.core.models import TaskState
from deferrun.store import make_store
from tests.support.pgcluster import free_port
from tests.support.processes import Proc, deferrun_env, wait_until
from tests.support.userland import Outcome
from tests.support.webland import DSN, SECRET_PASSWORD, SECRETS, Sleepy, WaitChatty, every_state

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TOKEN = "browser-test-token"

if not (os.path.exists(CHROMEDRIVER) and os.path.exists(CHROMIUM)):
    if os.environ.get("CI") == "true":
        pytest.fail(
            "chromium / chromium-driver not installed; .ci/run installs them", pytrace=False
        )
    pytest.skip(
        "headless Chromium not installed (apt-get install chromium chromium-driver) - "
        "browser tests skipped",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import (  # noqa: E402
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def shoot(driver: webdriver.Chrome, tmp_path: Path, name: str, expect: list[str]) -> None:
    """Check the page's text, then save and check its screenshot."""
    body = driver.find_element(By.TAG_NAME, "body").text
    for text in expect:
        assert text in body, f"{text!r} not on {name}: {body[:500]}"
    source = driver.page_source
    for secret in SECRETS:
        assert secret not in source, f"{secret} shown on {name}"
    path = tmp_path / f"{name}.png"
    shot = driver.execute_cdp_cmd(  # the whole page, not only the window
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}
    )
    path.write_bytes(base64.b64decode(shot["data"]))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, f"{name}.png looks empty"
    out = os.environ.get("DEFERRUN_SCREENSHOTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(out) / f"{name}.png")


def wait_text(driver: webdriver.Chrome, selector: str, text: str, timeout: float = 20) -> Any:
    def shown() -> bool:
        try:
            return text in driver.find_element(By.CSS_SELECTOR, selector).text
        except StaleElementReferenceException:  # the page replaced it while updating live
            return False
        except NoSuchElementException:  # a click's next page has not replaced this one yet
            return False

    return wait_until(shown, timeout, message=f"{text!r} in {selector}")


def test_status_page_in_chromium(
    sqlite_url: str, procs: Callable[..., Proc], browser: webdriver.Chrome, tmp_path: Path
) -> None:
    async def setup() -> tuple[dict[str, str], str, str]:
        store = make_store(sqlite_url, dead_after=3.0)
        await store.open()
        try:
            ids = await every_state(store, running=False)
            chatty = build_task(
                WaitChatty(task_id="wait-for-warehouse", dsn=DSN, password=SECRET_PASSWORD)
            )
            sleepy = build_task(Sleepy(task_id="long-report"))
            await store.submit_many([sleepy, chatty])
            # a pipeline on a queue no worker serves: succeeded >> transform >> publish, and
            # transform + failed-task >> notify (upstream_failed at once)
            transform = pipeline_task("transform", [ids["success"]])
            publish = pipeline_task("publish", [transform.id])
            notify = pipeline_task("notify", [transform.id, ids["failed"]])
            await store.submit_many([transform, publish, notify])
            ids.update(transform=transform.id, publish=publish.id, notify=notify.id)
            return ids, chatty.id, sleepy.id
        finally:
            await store.close()

    ids, chatty, sleepy = anyio.run(setup)
    env = deferrun_env(sqlite_url)
    procs(["triggerer"], env)
    procs(["worker", "--slots", "2", "--grace-period", "1"], env)
    port, ro_port = free_port(), free_port()
    procs(["web", "--port", str(port)], {**env, "DEFERRUN_WEB_TOKEN": TOKEN})
    procs(["web", "--port", str(ro_port)], env)
    base, ro_base = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{ro_port}"

    def up(url: str) -> bool:
        try:
            with urllib.request.urlopen(url + "/api/overview", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    wait_until(lambda: up(base) and up(ro_base), 30, 0.2, "both web servers listening")

    def state_of(task_id: str) -> str:
        browser.get(f"{base}/api/tasks/{task_id}")
        return str(browser.find_element(By.TAG_NAME, "body").text)

    wait_until(lambda: '"state":"running"' in state_of(sleepy), 30, 0.3, "the sleepy task runs")
    wait_until(lambda: '"state":"deferred"' in state_of(chatty), 30, 0.3, "the chatty task waits")

    # overview: every state counted, both processes listed with their load
    browser.get(base + "/")
    counts = browser.find_element(By.ID, "counts").text
    for state in TaskState:
        assert str(state) in counts
    wait_text(browser, "#processes", "triggerer")
    shoot(browser, tmp_path, "overview", ["Tasks by state", "worker", "triggerer", "loop lag"])

    # tasks page -> follow the waiting task to its detail
    browser.get(base + "/tasks")
    shoot(browser, tmp_path, "tasks", ["wait-for-warehouse", "upstream_failed", "deferred"])
    browser.find_element(By.LINK_TEXT, chatty).click()
    wait_text(browser, "h1", "wait-for-warehouse")
    assert "tests.webland.ChattyTrigger" in browser.find_element(By.ID, "trigger").text or (
        "tests.support.webland.ChattyTrigger" in browser.find_element(By.ID, "trigger").text
    )

    # its log lines arrive while it waits (the page polls; nothing reloads it)
    def lines() -> int:
        return len(browser.find_elements(By.CSS_SELECTOR, "#logs .log-line"))

    first = wait_until(lambda: lines() >= 2 and lines(), 20, 0.2, "first log lines")
    wait_until(lambda: lines() >= first + 3, 20, 0.2, "more log lines, live")
    assert "still waiting on postgresql://app:***@" in browser.find_element(By.ID, "logs").text
    shoot(browser, tmp_path, "task", ["Trigger", "Timeline", "Log lines", "Sign in"])

    # refused without the token: no buttons, and a forged post is turned away
    status = browser.execute_script(
        "return fetch(arguments[0], {method: 'POST', body: new URLSearchParams({csrf: 'x'})})"
        ".then(r => r.status)",
        f"{base}/tasks/{chatty}/cancel",
    )
    assert status == 403
    browser.get(f"{ro_base}/tasks/{chatty}")
    assert browser.find_elements(By.ID, "cancel") == []
    assert "read-only" in browser.find_element(By.TAG_NAME, "header").text
    how = browser.find_element(By.ID, "how-to-act").text  # says how to act instead
    assert f"deferrun cancel {chatty}" in how and "--token" in how
    browser.get(f"{base}/login?next=/tasks/{chatty}")
    browser.find_element(By.ID, "token").send_keys("not-the-token")
    browser.find_element(By.ID, "sign-in").click()
    wait_text(browser, "#error", "wrong token")
    assert "deferred" in state_of(chatty)

    # with the token: sign in, cancel from the page
    browser.get(f"{base}/login?next=/tasks/{chatty}")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "sign-in").click()
    wait_text(browser, "h1", "wait-for-warehouse")
    browser.find_element(By.ID, "cancel").click()
    wait_text(browser, "h1", "Cancel wait-for-warehouse?")  # one click never acts
    assert "deferred" in browser.find_element(By.TAG_NAME, "h1").text
    shoot(browser, tmp_path, "confirm", ["tasks waiting on it settle at once", "Yes, cancel it"])
    browser.find_element(By.ID, "back").click()
    wait_text(browser, "h1", "wait-for-warehouse")
    assert "deferred" in browser.find_element(By.ID, "state").text
    browser.find_element(By.ID, "cancel").click()
    wait_text(browser, "h1", "Cancel wait-for-warehouse?")
    browser.find_element(By.ID, "confirm").click()
    wait_text(browser, "#message", "cancelled")
    wait_text(browser, "#state", "cancelled")
    wait_text(browser, "#logs", "cancel by 127.0.0.1")
    assert '"state":"cancelled"' in state_of(chatty)

    # triggers grouped by class, and one class's triggers
    browser.get(base + "/triggers")
    shoot(browser, tmp_path, "triggers", ["tests.support.userland.NeverTrigger", "owner triggerer"])
    browser.get(base + "/tasks/" + ids["failed"])
    shoot(browser, tmp_path, "task-failed", ["Error", "Traceback", "upstream_failed"])

    # the pipeline, drawn: each task a link, filled by its state
    browser.get(base + "/tasks/" + ids["transform"])
    nodes = browser.find_elements(By.CSS_SELECTOR, "#pipeline-graph svg a.node")
    drawn = {n.get_attribute("data-task-id"): n.get_attribute("data-state") for n in nodes}
    assert drawn == {
        ids["success"]: "success",
        ids["transform"]: "queued",
        ids["publish"]: "deferred",
        ids["notify"]: "upstream_failed",
    }
    assert len(browser.find_elements(By.CSS_SELECTOR, "#pipeline-graph svg path.edge")) == 3
    shoot(browser, tmp_path, "pipeline", ["Pipeline", "transform", "publish", "notify"])
    link = f'#pipeline-graph a.node[data-task-id="{ids["publish"]}"]'
    browser.find_element(By.CSS_SELECTOR, link).click()
    wait_text(browser, "h1", "publish")
    assert browser.current_url == f"{base}/tasks/{ids['publish']}"


def pipeline_task(name: str, after: list[str]) -> Any:
    return build_task(Outcome(what="ok", task_id=name, queue="manual"), after=after)
