"""The page of `orch serve` in a real headless Chromium, over a real server and real
workers: the layout on a phone and a desktop, the API key, Stop and New chat, a chat longer
than the context, failed messages, streamed text kept in view, the cluster's health.

The server runs in this process (uvicorn in a thread) over the product's session API, so a
test can ask the workers themselves (Info) whether a stopped answer freed its session. One
browser serves the whole module."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from orchestrator.cluster.client import WorkerClient
from orchestrator.pipeline.session import RunningModel
from orchestrator.serve.app import create_app
from orchestrator.settings import OrchSettings
from testkit.cluster import open_model, worker_server
from testkit.serving import running

QUESTION = "What is the capital of France?"
KEY = "page-key-123"
TOKEN = "page-test-token"
WAIT_S = 60
PHONE, DESKTOP = (390, 844), (1280, 800)
LEFT_OUT = "older messages were left out to fit the model's memory"


@contextmanager
def serving(model: RunningModel, settings: OrchSettings) -> Iterator[str]:
    """``orch serve``'s app over ``model`` on a free loopback port; yields its base URL."""
    with running(create_app(model, "smollm2", settings), log_level="warning") as base:
        yield base


def until(check: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> object:
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} (within {timeout_s:.0f} s)")
        time.sleep(0.05)
    return value


@contextmanager
def served_model(smollm2_path: Path, root: Path, context_tokens: int
                 ) -> Iterator[tuple[list[str], RunningModel]]:
    with worker_server(root / "w0", token=TOKEN) as a, \
            worker_server(root / "w1", token=TOKEN) as b, \
            open_model(smollm2_path, [a, b], TOKEN, root, max_sessions=2,
                       context_tokens=context_tokens) as model:
        yield [a, b], model


@pytest.fixture(scope="module")
def keyed(smollm2_path, tmp_path_factory) -> Iterator[dict]:
    """A server with an API key, a short context (a few messages fill it) and short
    answers, over two workers."""
    with served_model(smollm2_path, tmp_path_factory.mktemp("keyed"), 256) as (workers, model), \
            serving(model, OrchSettings.load(api_key=KEY, max_tokens=24)) as base:
        yield {"base": base, "workers": workers}


@pytest.fixture(scope="module")
def open_server(smollm2_path, tmp_path_factory) -> Iterator[dict]:
    """A server without a key whose answers run long (for Stop and scrolling)."""
    with served_model(smollm2_path, tmp_path_factory.mktemp("open"), 1024) as (workers, model), \
            serving(model, OrchSettings.load(max_tokens=400)) as base:
        yield {"base": base, "workers": workers}


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.binary_location = "/usr/bin/chromium"
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def open_page(driver, base: str, key: str | None = KEY, size: tuple[int, int] = PHONE):
    """The page at ``size`` (a phone's, by default), with ``key`` in the tab's storage."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": size[0], "height": size[1], "deviceScaleFactor": 1,
        "mobile": size[0] < 600})
    driver.get(base + "/")
    driver.execute_script("sessionStorage.clear(); localStorage.clear();"
                          + (f"sessionStorage.setItem('orch-key', '{key}')" if key else ""))
    driver.refresh()
    return driver


def js(driver, script: str, *args: object) -> object:
    return driver.execute_script(script, *args)


def wait(driver, check: Callable[[object], object], what: str) -> object:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S).until(check, what)


def send(driver, text: str) -> None:
    from selenium.webdriver.common.by import By

    js(driver, "document.getElementById('prompt').value = arguments[0]", text)
    driver.find_element(By.ID, "send").click()


def answers(driver) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, ".assistant[data-done='1']")


def rect(driver, selector: str) -> dict:
    return js(driver, f"return document.querySelector({selector!r}).getBoundingClientRect()"
                      f".toJSON()")


def test_on_a_phone_the_chat_takes_the_width_and_send_is_on_screen(browser, keyed) -> None:
    page = open_page(browser, keyed["base"], size=PHONE)
    chat, send_button = rect(page, "main > section"), rect(page, "#send")
    assert chat["width"] >= 300, f"the chat column is {chat['width']:.0f} px wide at 390 px"
    inside = (send_button["left"] >= 0 and send_button["right"] <= PHONE[0]
              and send_button["top"] >= 0 and send_button["bottom"] <= PHONE[1])
    assert inside, f"Send lies at {send_button}, outside the 390x844 viewport"
    page = open_page(browser, keyed["base"], size=DESKTOP)
    chat, cluster = rect(page, "main > section"), rect(page, "main > section + section")
    assert cluster["left"] > chat["right"] and cluster["top"] == chat["top"], \
        f"on a desktop the cluster is no longer beside the chat: {chat} {cluster}"


def test_the_page_asks_for_the_key_keeps_it_for_the_tab_and_sends_it(browser, keyed) -> None:
    from selenium.webdriver.common.by import By

    page = open_page(browser, keyed["base"], key=None)
    key_box = wait(page, lambda d: d.find_element(By.ID, "key").is_displayed() and
                   d.find_element(By.ID, "key"), "the page does not ask for the API key")
    key_box.send_keys(KEY + "\n")
    stages = wait(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".stage[data-health='up']"))
                  == 2 and d.find_element(By.ID, "stages"), "the cluster pane stays blank")
    for worker in keyed["workers"]:
        assert worker in stages.text
    assert "MiB" in stages.text and "sends f32" in stages.text, \
        f"the stages show no memory or codec: {stages.text}"
    assert js(page, "return sessionStorage.getItem('orch-key')") == KEY
    assert js(page, "return localStorage.getItem('orch-key')") is None, \
        "the key outlives the tab"
    send(page, QUESTION)
    answer = wait(page, answers, "no answer came")
    assert "Paris" in answer[0].text
    wait(page, lambda d: "tokens/s" in d.find_element(By.ID, "stages").text,
         "the stages show no speed after an answer")


def test_a_failed_message_is_marked_with_its_error_and_can_be_retried(browser, keyed) -> None:
    from selenium.webdriver.common.by import By

    page = open_page(browser, keyed["base"], key="wrong")
    send(page, QUESTION)
    problem = wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, ".problem"),
                   "a failed message is not marked")[0]
    assert "API key" in problem.text and page.find_elements(By.CSS_SELECTOR, ".user.failed")
    assert not page.find_elements(By.CSS_SELECTOR, ".assistant"), \
        "a failed message is shown as if answered"
    page.find_element(By.ID, "key").send_keys(KEY + "\n")
    problem.find_element(By.CSS_SELECTOR, "button.retry").click()
    answer = wait(page, answers, "the retried message got no answer")
    assert "Paris" in answer[0].text
    assert not page.find_elements(By.CSS_SELECTOR, ".problem, .user.failed")


def test_a_long_chat_leaves_out_its_oldest_turns_and_says_so(browser, keyed) -> None:
    from selenium.webdriver.common.by import By

    page = open_page(browser, keyed["base"])
    page.find_element(By.CSS_SELECTOR, "#instructions summary").click()
    page.find_element(By.ID, "system").send_keys("Answer briefly.")
    topics = ("rivers of France", "mountains of Spain", "lakes of Italy")
    for n, topic in enumerate(topics, 1):  # about 80 tokens each: the third overflows 256
        send(page, f"Here are notes on the {topic}. " + "The water is cold and clear. " * 10)
        wait(page, lambda d, n=n: len(answers(d)) == n, f"no answer to message {n}")
    log = page.find_element(By.ID, "log").text
    assert LEFT_OUT in log.lower(), f"the page does not say messages were left out: {log[-300:]}"
    assert "--" not in log, "the page speaks of server flags"
    assert "left-out" in page.find_elements(By.CSS_SELECTOR, ".user")[0].get_attribute("class")
    sent = js(page, "return orch.lastSent.map((m) => m.role)")
    assert sent[0] == "system" and sent[1] == "user" and len(sent) < 6, sent
    page.find_element(By.ID, "new").click()
    assert not page.find_elements(By.CSS_SELECTOR, "#log > *"), "New chat kept the log"
    send(page, "word " * 300)  # too long alone
    problem = wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, ".problem"),
                   "a message longer than the context is not marked failed")[0]
    assert "too long for the model's memory" in problem.text, problem.text


def test_streamed_text_stays_in_view_and_stop_ends_the_session(browser, open_server) -> None:
    from selenium.webdriver.common.by import By

    page = open_page(browser, open_server["base"], key=None, size=(390, 560))
    send(page, "Tell me a long story about a dragon and a knight.")
    at_bottom = ("const l = document.getElementById('log');"
                 "return [l.scrollHeight - l.clientHeight, l.scrollTop]")
    wait(page, lambda d: js(d, at_bottom)[0] > 60, "the answer never filled the log")
    overflow, top = js(page, at_bottom)
    assert overflow - top < 24, f"the log is {overflow - top:.0f} px above the streamed text"
    page.find_element(By.ID, "stop").click()
    stopped = wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant.stopped"),
                   "Stop did not stop the answer")
    assert page.find_element(By.ID, "send").is_displayed() and stopped[0].text
    workers = [WorkerClient(a, TOKEN, OrchSettings()) for a in open_server["workers"]]
    try:
        until(lambda: all(w.info().loaded.sessions == 0 for w in workers),
              "a stopped answer still holds its session on the workers", 15)
    finally:
        for w in workers:
            w.close()
    page.find_element(By.ID, "new").click()
    assert not page.find_elements(By.CSS_SELECTOR, "#log > *"), "New chat kept the log"


def test_a_dead_worker_is_marked_down_within_seconds(browser, smollm2_path, tmp_path) -> None:
    from selenium.webdriver.common.by import By

    last = worker_server(tmp_path / "b", token=TOKEN)
    with worker_server(tmp_path / "a", token=TOKEN) as a:
        b = last.__enter__()
        with open_model(smollm2_path, [a, b], TOKEN, tmp_path) as model, \
                serving(model, OrchSettings.load()) as base:
            page = open_page(browser, base, key=None)
            wait(page, lambda d: len(d.find_elements(
                By.CSS_SELECTOR, ".stage[data-health='up']")) == 2, "the stages are not up")
            last.__exit__(None, None, None)
            started = time.monotonic()
            wait(page, lambda d: not d.find_elements(
                By.CSS_SELECTOR, f".stage[data-worker='{b}']:not([data-health='down'])"),
                 "a dead worker stays listed as if up")
            assert time.monotonic() - started < 10, "the dead worker was marked down late"
            badge = page.find_element(By.CSS_SELECTOR, f".stage[data-worker='{b}'] .badge")
            assert badge.text == "down"
