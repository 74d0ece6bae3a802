"""`orch serve` for real: the official `openai` client against the HTTP API over two real
workers (the web page is tested in a real headless Chromium in test_page.py).

The server runs in this process (uvicorn in a thread) over the product's session API, so
the tests can ask the workers themselves (Info) whether a cancelled stream freed its
session; `orch serve` itself is started once as a command, to check it serves and refuses
a busy port."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from orchestrator.cluster.client import WorkerClient
from orchestrator.serve.app import create_app
from orchestrator.serve.gate import ApiError, Gate
from orchestrator.settings import OrchSettings
from testkit.cluster import open_model, worker_server
from testkit.serving import running
from testkit.waiting import wait_until

QUESTION = "What is the capital of France?"
KEY = "test-key-123"
TOKEN = "serve-test-token"


@pytest.fixture(scope="module")
def served(smollm2_path, tmp_path_factory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("serve")
    with worker_server(root / "w0", token=TOKEN) as a, \
            worker_server(root / "w1", token=TOKEN) as b, \
            open_model(smollm2_path, [a, b], TOKEN, root, max_sessions=2,
                       context_tokens=1024) as model:
        settings = OrchSettings.load(api_key=KEY, serve_queue=4, max_tokens=24)
        with running(create_app(model, "smollm2", settings), log_level="warning") as base:
            yield {"base": base, "workers": [a, b], "model": model}


@pytest.fixture
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served["base"] + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def orch_run_answer(smollm2_path, tmp_path_factory) -> str:
    env = dict(os.environ, ORCH_CACHE_DIR=str(tmp_path_factory.mktemp("c")))
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(smollm2_path),
                           QUESTION, "--max-tokens", "24", "--local", "2"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_chat_equals_orch_run_streamed_or_not(client, orch_run_answer) -> None:
    whole = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": QUESTION}], temperature=0)
    text = whole.choices[0].message.content
    assert orch_run_answer == text + "\n" and "Paris" in text
    assert whole.usage.prompt_tokens > 0 and whole.usage.completion_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": QUESTION}], temperature=0,
        stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_stop_and_max_tokens(client) -> None:
    whole = client.completions.create(model="smollm2", prompt="The capital of France is",
                                      max_tokens=6, temperature=0)
    assert "Paris" in whole.choices[0].text and whole.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=6, temperature=0,
        stream=True))
    assert streamed == whole.choices[0].text
    stopped = client.completions.create(model="smollm2", prompt="The capital of France is",
                                        max_tokens=6, temperature=0, stop=["."])
    assert stopped.choices[0].finish_reason == "stop" and "." not in stopped.choices[0].text
    seeded = [client.completions.create(model="smollm2", prompt="Once upon a time",
                                        max_tokens=8, temperature=0.9, top_p=0.9, seed=7)
              .choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]
    assert [m.id for m in client.models.list().data] == ["smollm2"]


def test_two_clients_at_once(client) -> None:
    answers: list[str] = []

    def ask(prompt: str) -> None:
        answers.append(client.completions.create(model="smollm2", prompt=prompt,
                                                 max_tokens=12, temperature=0).choices[0].text)

    threads = [threading.Thread(target=ask, args=(p,)) for p in
               ("The capital of France is", "The largest planet is")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(answers) == 2 and all(answers)


def test_a_cancelled_stream_frees_its_session(client, served) -> None:
    stream = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Tell me a long story."}],
        max_tokens=200, stream=True)
    for i, _chunk in enumerate(stream):
        if i == 3:
            break
    stream.close()  # the client goes away mid-answer
    workers = [WorkerClient(a, TOKEN, OrchSettings()) for a in served["workers"]]
    try:
        wait_until(lambda: [w.info().loaded.sessions for w in workers] == [0, 0], 10,
                   "both workers to drop the cancelled stream's session")
    finally:
        for w in workers:
            w.close()


def test_answers_right_after_cancelled_streams_find_free_sessions(client) -> None:
    """A cancelled stream gives its place back only once the workers have ended its
    session: answers started at once after never find the workers' sessions all taken."""
    def ask(prompt: str) -> str:
        return client.completions.create(model="smollm2", prompt=prompt, max_tokens=4,
                                         temperature=0).choices[0].finish_reason

    with ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            streams = [client.completions.create(model="smollm2", prompt="Once upon a time",
                                                 max_tokens=200, stream=True)
                       for _ in range(2)]  # both sessions of the plan
            for stream in streams:
                chunks = iter(stream)
                next(chunks), next(chunks)
            for stream in streams:
                stream.close()  # both clients go away mid-answer
            answers = pool.map(ask, ["The capital of France is", "The largest planet is"])
            assert list(answers) == ["length", "length"]


def test_bad_requests_get_openai_errors(client, served) -> None:
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served["base"] + "/v1", api_key="wrong", max_retries=0
                      ).models.list()
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.completions.create(model="smollm2", prompt="", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="smollm2", prompt="word " * 2000, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="smollm2", prompt="Hi", temperature=-1)


def test_the_gate_queues_then_refuses() -> None:
    async def scenario() -> list[str]:
        gate, seen = Gate(slots=1, queue=1), []
        since = await gate.enter()  # the one session
        waiter = asyncio.create_task(gate.enter())  # the one place in the queue
        await asyncio.sleep(0)
        try:
            await gate.enter()
        except ApiError as exc:
            seen.append(f"{exc.status} {exc.kind}")
        gate.leave(since)
        await waiter
        seen.append(f"active {gate.active}, waiting {gate.waiting}")
        return seen

    assert asyncio.run(scenario()) == ["429 rate_limit_error", "active 1, waiting 0"]


def test_orch_serve_command_refuses_a_busy_port(tmp_path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "serve", "x.gguf",
                               "--port", str(port)], capture_output=True, text=True,
                              timeout=60, env=dict(os.environ, ORCH_CACHE_DIR=str(tmp_path)))
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "Traceback" not in done.stderr


def test_a_dead_worker_ends_the_stream_with_an_error_and_stops_the_server(
        smollm2_path, tmp_path) -> None:
    broken: list[str] = []
    last = worker_server(tmp_path / "b", token=TOKEN)  # stopped mid-answer below
    with worker_server(tmp_path / "a", token=TOKEN) as a:
        b = last.__enter__()
        with open_model(smollm2_path, [a, b], TOKEN, tmp_path, max_sessions=1) as model, \
                running(create_app(model, "m", OrchSettings.load(max_tokens=400),
                                   broken.append)) as base:
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
            stream = client.completions.create(model="m", prompt="Once upon a time",
                                               max_tokens=400, stream=True)
            with pytest.raises(openai.APIError, match="worker") as failed:
                for i, _ in enumerate(stream):
                    if i == 2:  # the last stage's worker goes away mid-answer
                        threading.Thread(target=last.__exit__, args=(None, None, None)).start()
            assert b not in str(failed.value), "the client is told the server's own details"
    assert broken and b in broken[0]
