"""`orch publish` builds orch's wheel from the checkout with what this environment has (no
`wheel` package needed), and when pip fails, its error fits on a screen."""

from __future__ import annotations

import importlib.util
import zipfile

import pytest

from orchcore.errors import PublishError
from orchestrator.pi.publish import build_orch_wheel, builds_wheels_here, pip_tail, source_root


def test_the_wheel_is_built_from_this_checkout_without_the_wheel_package(tmp_path):
    assert source_root() is not None, "the checkout holding pyproject.toml was not found"
    if importlib.util.find_spec("wheel") is not None:
        pytest.skip("the wheel package is installed here: the case is not shown")
    assert builds_wheels_here(), "this setuptools needs the wheel package"
    wheel = build_orch_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as built:
        names = built.namelist()
    assert "orchestrator/pi/publish.py" in names and "worker/firstboot.py" in names


def test_a_failed_build_says_why_in_a_few_lines(tmp_path):
    broken = tmp_path / "checkout"
    broken.mkdir()
    (broken / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = '
        '"setuptools.build_meta"\n[project]\nname = "orch-cluster"\n'
        'version = "not a version"\n')
    with pytest.raises(PublishError) as caught:
        build_orch_wheel(tmp_path / "out", broken)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 800, f"{len(message)} characters: {message}"
    assert "not a version" in message or "version" in message.lower(), message
    assert "--orch-wheel" in message


def test_pip_tail_keeps_the_lines_that_matter():
    output = "\n".join(["  building...", *[f"  log line {i}" for i in range(500)],
                        "  error: subprocess-exited-with-error", "  ╰─> [1 lines of output]",
                        "      ValueError: bad version", "      [end of output]",
                        "  note: This error originates from a subprocess, and is likely "
                        "not a problem with pip.", "", "ERROR: Failed to build orch-cluster"])
    tail = pip_tail(output)
    assert tail.endswith("ValueError: bad version | ERROR: Failed to build orch-cluster")
    assert "note:" not in tail and len(tail) <= 503
