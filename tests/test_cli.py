"""The command line as a user runs it: real `orch` processes, real local workers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time

import psutil
import pytest

from testkit.cluster import assert_no_workers_left, workers_under
from testkit.waiting import WaitTimeout, wait_until


def orch(*args: str, cache, stdin: str | None = None, timeout: float = 180
         ) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, ORCH_CACHE_DIR=str(cache), COLUMNS="120")
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env,
                          input=stdin, capture_output=True, text=True, timeout=timeout)


def test_run_answers_and_cleans_up(smollm2_path, tmp_path):
    done = orch("run", str(smollm2_path), "What is the capital of France?", "--max-tokens",
                "12", "--stats", cache=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert "decode" in done.stderr and "bytes/token" in done.stderr
    assert "MiB of shards sent" in done.stderr
    assert_no_workers_left(tmp_path)
    again = orch("run", str(smollm2_path), "What is the capital of France?", "--max-tokens",
                 "4", cache=tmp_path)
    assert "0 bytes of shards sent" in again.stderr  # sticky: the same plan, all cached
    logs = sorted((tmp_path / "local" / "logs").glob("worker-*.log"))
    assert logs, f"no worker logs in {tmp_path / 'local' / 'logs'}"
    for log in logs:  # a normal run is quiet
        assert "WARNING" not in log.read_text() and "ERROR" not in log.read_text(), log


def in_terminal(*args: str, cache, typed: str, timeout: float = 180
                ) -> subprocess.CompletedProcess[str]:
    """``orch`` with a terminal for its stdin (a pseudo-terminal ``typed`` is written to);
    its output captured."""
    env = dict(os.environ, ORCH_CACHE_DIR=str(cache), COLUMNS="120")
    terminal, side = os.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], env=env,
                                stdin=side, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        os.close(side)
        os.write(terminal, typed.encode())
        out, err = proc.communicate(timeout=timeout)
    finally:
        os.close(terminal)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_interactive_chat_keeps_turns_apart(smollm2_path, tmp_path):
    done = in_terminal("run", str(smollm2_path), "--max-tokens", "12", cache=tmp_path,
                       typed="What is the capital of France?\nAnd of Italy?\n\n")
    assert done.returncode == 0, done.stderr
    answers = [a for a in done.stdout.split("> ") if a.strip()]
    assert len(answers) == 2, done.stdout
    assert "Paris" in answers[0] and "Rome" in answers[1]


def test_a_piped_prompt_is_one_prompt(smollm2_path, tmp_path):
    """Piped or read with '-', the whole text is the prompt, blank lines and all: the same
    prompt tokens and answer as the text given as an argument."""
    text = "Summarize:\n\nParis is the capital of France. It lies on the Seine.\n"
    runs = [orch("run", str(smollm2_path), *args, "--no-chat", "--max-tokens", "6", "--stats",
                 "--local", "1", cache=tmp_path, stdin=stdin)
            for args, stdin in (((text.rstrip("\n"),), ""), ((), text), (("-",), text))]
    for done in runs:
        assert done.returncode == 0, done.stderr
    prompts = [re.search(r"prompt +. +(\d+) tokens", done.stderr).group(1) for done in runs]
    assert prompts[1] == prompts[0] and prompts[2] == prompts[0], prompts
    assert runs[1].stdout == runs[0].stdout and runs[2].stdout == runs[0].stdout
    empty = orch("run", str(smollm2_path), cache=tmp_path, stdin="\n")
    assert empty.returncode == 1 and "stdin holds no prompt" in empty.stderr, empty.stderr


def test_verify_reports_identical(smollm2_path, tmp_path):
    done = orch("verify", str(smollm2_path), "--stages", "2", "--steps", "4", cache=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "5/5 steps identical" in done.stdout
    # what it prints besides the verdict says what it is, before the text itself
    lines = done.stdout.splitlines()
    assert lines[0] == "layer ranges: [0, 15) [15, 30)", lines
    assert lines[1] == ("the unsplit model's greedy continuation of the prompt, 5 tokens (raw "
                        "text, no chat template; the split model picked the same token at "
                        "every step):"), lines
    assert lines[2].startswith("The capital of France is Paris"), lines


def test_info_describes_the_model(smollm2_path, tmp_path):
    done = orch("info", str(smollm2_path), cache=tmp_path)
    assert done.returncode == 0, done.stderr
    for text in ("llama (supported)", "30", "576", "9 / 3", "49152", "tied"):
        assert text in done.stdout


@pytest.mark.parametrize(("args", "message"), [
    (("run", "no-such-model", "hi"), "smollm2-135m"),
    (("info", "no-such-model"), "smollm2-135m"),
    (("run", "MODEL", "hi", "--top-p", "0"), "--top-p"),
    (("run", "MODEL", "hi", "--codec", "zip"), "f32"),
])
def test_bad_input_is_a_message_not_a_traceback(smollm2_path, tmp_path, args, message):
    args = tuple(str(smollm2_path) if a == "MODEL" else a for a in args)
    done = orch(*args, cache=tmp_path)
    assert done.returncode == 1
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert_no_workers_left(tmp_path)


LEAK = """
import subprocess, sys
# Start a worker and exit without stopping it: the worker is re-parented, as the workers of
# an orchestrator that forgot them would be.
proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "worker", "--host",
                         "127.0.0.1", "--port", "0", "--threads", "1", "--cache-dir",
                         sys.argv[1], "--ready-file", sys.argv[2]], start_new_session=True,
                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
print(proc.pid)
"""


def test_a_leaked_worker_fails_the_check_for_leftover_workers(tmp_path):
    ready = tmp_path / "ready"
    env = dict(os.environ, ORCH_WORKER_TOKEN="a-token-for-the-leak-test")
    done = subprocess.run([sys.executable, "-c", LEAK, str(tmp_path / "local" / "worker-0"),
                           str(ready)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout)
    try:
        wait_until(ready.exists, 60, "the leaked worker to be ready")
        assert pid not in [c.pid for c in psutil.Process().children(recursive=True)], \
            "the leaked worker should no longer be a child of this process"
        assert [p.pid for p in workers_under(tmp_path)] == [pid]
        with pytest.raises(WaitTimeout, match=f"pid {pid}: .*orchestrator.cli worker"):
            assert_no_workers_left(tmp_path, timeout=1)
        assert workers_under(tmp_path / "elsewhere") == []  # only this folder's workers
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    assert_no_workers_left(tmp_path, timeout=30)


@pytest.mark.parametrize(("args", "message"), [
    (("run", "MODEL", "", "--no-chat"), "the prompt is empty"),
    (("run", "MODEL", b"caf\xe9 \xff"), "not valid UTF-8 (the byte 0xe9 at character 3)"),
    (("run", "MODEL", "word " * 200, "--context", "64"), "holds 64; shorten it"),
    (("run", "MODEL", "hi", "--workers", "127.0.0.1:99999"), "outside 1..65535"),
    (("run", "MODEL", "hi", "--workers", "127.0.0.1:5,127.0.0.1:5"), "listed twice"),
    (("run", "MODEL", "hi", "--workers", "127.0.0.1:5,"), "empty entry"),
    (("run", "MODEL", "hi", "--temperature", "-1"), "temperature"),
    (("worker", "--port", "99999"), "port"),
])
def test_refused_early_with_a_message(smollm2_path, tmp_path, args, message):
    """Refused before any worker starts or any gRPC call, without log noise."""
    args = tuple(str(smollm2_path) if a == "MODEL" else a for a in args)
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args],
                          env=dict(os.environ, ORCH_CACHE_DIR=str(tmp_path), COLUMNS="200"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert message in done.stderr.replace("\n", " ")
    assert "Traceback" not in done.stderr and "stage 0" not in done.stderr
    assert "grpc" not in done.stderr.lower()
    assert not (tmp_path / "local").exists()  # no local worker was started


@pytest.mark.parametrize(("args", "env", "named", "internal"), [
    (("run", "MODEL", "hi", "--local", "0"), {}, "--local: ", "local_workers"),
    (("plan", "MODEL", "--context", "8"), {}, "--context: ", "context_tokens"),
    (("serve", "MODEL", "--max-sessions", "0"), {}, "--max-sessions: ", "max_sessions"),
    (("run", "MODEL", "hi"), {"ORCH_CONTEXT_TOKENS": "8"}, "ORCH_CONTEXT_TOKENS: ",
     "context_tokens:"),
])
def test_a_bad_setting_is_named_as_the_user_gave_it(smollm2_path, tmp_path, args, env, named,
                                                     internal):
    """By its flag, or by its variable when it came from the environment: never by the
    name of a field inside."""
    args = tuple(str(smollm2_path) if a == "MODEL" else a for a in args)
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args],
                          env=dict(os.environ, ORCH_CACHE_DIR=str(tmp_path), COLUMNS="200",
                                   **env), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert named in done.stderr and internal not in done.stderr, done.stderr


def test_header_errors_and_unsupported_architectures_say_what_is_wrong(smollm2_path, tmp_path):
    data = smollm2_path.read_bytes()[:4 << 20]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:1000])
    done = orch("info", str(cut), cache=tmp_path)
    assert "truncated or corrupt" in done.stderr and "numpy" not in done.stderr
    assert "out of bounds" not in done.stderr and "dtype" not in done.stderr
    other = tmp_path / "bloom.gguf"  # same bytes, another architecture name (same length)
    other.write_bytes(smollm2_path.read_bytes().replace(b"llama", b"bloom"))
    done = orch("verify", str(other), "--steps", "1", cache=tmp_path)
    assert done.returncode == 1
    assert "'bloom' is not supported" in done.stderr and "vocabulary" not in done.stderr


def test_worker_help_lists_its_environment_variables(tmp_path):
    done = orch("worker", "--help", cache=tmp_path)
    assert done.returncode == 0, done.stderr
    for name in ("ORCH_WORKER_PORT", "ORCH_WORKER_TOKEN", "ORCH_WORKER_MEMORY_BUDGET_MB"):
        assert name in done.stdout
    # it reads like every other command's help, not argparse's
    assert "Options" in done.stdout and "--memory-budget-mb" in done.stdout
    assert "SecretStr" not in done.stdout and "{" not in done.stdout, done.stdout


def test_cluster_map_lists_workers_and_measured_links(tmp_path):
    from orchestrator.cluster.local import LocalCluster

    with LocalCluster(2, tmp_path / "w", memory_budgets_mb=[700, 900]) as workers:
        env = dict(os.environ, ORCH_TOKEN=workers.token, ORCH_CACHE_DIR=str(tmp_path))
        done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "cluster", "--workers",
                               ",".join(workers.addresses), "--json"], env=env,
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    mapped = json.loads(done.stdout)
    assert mapped["unreachable"] == []
    views = mapped["workers"]
    assert [v["address"] for v in views] == workers.addresses
    assert [v["budget_mb"] for v in views] == [700, 900]
    assert all(v["link"]["rtt_ms"] > 0 and v["link"]["bandwidth_mb_s"] > 0 for v in views)
    assert views[0]["next_link"]["rtt_ms"] > 0 and views[1]["next_link"] is None


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def test_local_workers_share_the_cores(smollm2_path, tmp_path):
    """N local workers on one machine get its cores shared among them, not each all of them
    (two workers of 2 threads on 2 cores decode at a third of the speed); --threads wins."""
    each = max(1, _cores() // 3)
    planned = orch("plan", str(smollm2_path), "--local", "3", "--json", cache=tmp_path)
    assert planned.returncode == 0, planned.stderr
    assert [s["threads"] for s in json.loads(planned.stdout)["stages"]] == [each] * 3
    done = orch("run", str(smollm2_path), "The capital of France is", "--no-chat", "--local",
                "3", "--max-tokens", "2", cache=tmp_path)
    assert done.returncode == 0, done.stderr
    plan = [line for line in done.stderr.splitlines() if line.startswith("stage ")]
    assert len(plan) == 3 and all(f", {each} thread" in line for line in plan), done.stderr
    given = orch("plan", str(smollm2_path), "--local", "3", "--threads", "2", "--json",
                 cache=tmp_path)
    assert given.returncode == 0, given.stderr
    assert [s["threads"] for s in json.loads(given.stdout)["stages"]] == [2] * 3


def test_cluster_map_shows_what_it_reaches_and_names_the_rest(tmp_path):
    """A worker that does not answer, or holds another token, is listed with its reason;
    the others are still mapped, their links measured to the next one that answers."""
    from orchestrator.cluster.local import LocalCluster

    closed = "127.0.0.1:1"
    with LocalCluster(2, tmp_path / "w") as ours, LocalCluster(1, tmp_path / "x") as theirs:
        listed = [ours.addresses[0], closed, theirs.addresses[0], ours.addresses[1]]
        env = dict(os.environ, ORCH_TOKEN=ours.token, ORCH_CACHE_DIR=str(tmp_path),
                   COLUMNS="200")
        runs = [subprocess.run([sys.executable, "-m", "orchestrator.cli", "cluster",
                                "--workers", ",".join(listed), *extra], env=env,
                               capture_output=True, text=True, timeout=60)
                for extra in (("--json",), ())]
    as_json, table = runs
    assert as_json.returncode == 1 and table.returncode == 1, as_json.stderr
    mapped = json.loads(as_json.stdout)
    assert [v["address"] for v in mapped["workers"]] == ours.addresses
    assert mapped["workers"][0]["next_link"]["rtt_ms"] > 0  # to the next that answers
    reasons = {u["address"]: u["reason"] for u in mapped["unreachable"]}
    assert list(reasons) == [closed, theirs.addresses[0]], reasons
    assert "unreachable" in reasons[closed] and "prove" in reasons[theirs.addresses[0]], reasons
    for address in ours.addresses:
        assert address in table.stdout, table.stdout
    for address, reason in reasons.items():
        assert f"{address} not mapped: {reason}" in table.stderr, table.stderr
    assert "Traceback" not in as_json.stderr + table.stderr


def test_an_interrupted_answer_ends_its_line(smollm2_path, tmp_path):
    """Ctrl-C mid-answer: "interrupted" goes on a line of its own, not after the last word
    (stdout and stderr share one terminal)."""
    env = dict(os.environ, ORCH_CACHE_DIR=str(tmp_path), COLUMNS="120")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(smollm2_path),
                             "Write a long story about a cat.", "--max-tokens", "400",
                             "--local", "1"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    seen = b""
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:  # until the answer has begun
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                seen += os.read(proc.stdout.fileno(), 4096)
            answer = seen.partition(b"shards sent")[2].partition(b"\n")[2]
            if len(answer.strip()) > 20 or proc.poll() is not None:
                break
        assert proc.poll() is None, seen.decode()
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = (seen + rest).decode()
    assert proc.returncode == 130, out
    assert "\ninterrupted\n" in out, out
    assert not out.partition("shards sent")[2].strip().startswith("interrupted"), out
