"""The command line as a user runs it: real `orch` processes, real local workers."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest


def orch(*args: str, cache, stdin: str | None = None, timeout: float = 180
         ) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, ORCH_CACHE_DIR=str(cache), COLUMNS="120")
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env,
                          input=stdin, capture_output=True, text=True, timeout=timeout)


def _no_workers_left() -> bool:
    me = psutil.Process()
    return not [c for c in me.children(recursive=True)
                if "worker" in " ".join(c.cmdline()) and c.status() != psutil.STATUS_ZOMBIE]


def test_run_answers_and_cleans_up(smollm2_path, tmp_path):
    done = orch("run", str(smollm2_path), "What is the capital of France?", "--max-tokens",
                "12", "--stats", cache=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert "decode" in done.stderr and "bytes/token" in done.stderr
    assert _no_workers_left()


def test_interactive_chat_keeps_turns_apart(smollm2_path, tmp_path):
    done = orch("run", str(smollm2_path), "--max-tokens", "12", cache=tmp_path,
                stdin="What is the capital of France?\nAnd of Italy?\n\n")
    assert done.returncode == 0, done.stderr
    answers = [a for a in done.stdout.split("> ") if a.strip()]
    assert len(answers) == 2, done.stdout
    assert "Paris" in answers[0] and "Rome" in answers[1]


def test_verify_reports_identical(smollm2_path, tmp_path):
    done = orch("verify", str(smollm2_path), "--stages", "2", "--steps", "4", cache=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "5/5 steps identical" in done.stdout


def test_info_describes_the_model(smollm2_path, tmp_path):
    done = orch("info", str(smollm2_path), cache=tmp_path)
    assert done.returncode == 0, done.stderr
    for text in ("llama (supported)", "30", "576", "9 / 3", "49152", "tied"):
        assert text in done.stdout


@pytest.mark.parametrize(("args", "message"), [
    (("run", "no-such-model", "hi"), "smollm2-135m"),
    (("info", "no-such-model"), "smollm2-135m"),
    (("run", "MODEL", "hi", "--top-p", "0"), "top_p"),
    (("run", "MODEL", "hi", "--codec", "zip"), "f32"),
])
def test_bad_input_is_a_message_not_a_traceback(smollm2_path, tmp_path, args, message):
    args = tuple(str(smollm2_path) if a == "MODEL" else a for a in args)
    done = orch(*args, cache=tmp_path)
    assert done.returncode == 1
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert _no_workers_left()
