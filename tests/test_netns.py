"""orch across separate network hosts: two workers and the orchestrator, each in a network
namespace of its own (testkit/netns.py), talking over a bridge, not loopback."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import pytest

from testkit.netns import netns_available, network, ns_exec
from testkit.reference import ReferenceModel
from testkit.waiting import wait_until

PROMPT = "The capital of France is Paris. The capital of Germany is"
STEPS = 16

_unavailable = netns_available()
pytestmark = pytest.mark.skipif(_unavailable is not None, reason=_unavailable or "")


def _start_worker(host, address, token, root, iface):
    ready = root / f"{host}.ready"
    log = (root / f"{host}.log").open("w")
    proc = subprocess.Popen(
        [*ns_exec(host), sys.executable, "-m", "orchestrator.cli", "worker", "--host", address,
         "--port", "50151", "--cache-dir", str(root / host), "--ready-file", str(ready),
         "--threads", "1"],
        env=dict(os.environ, ORCH_WORKER_TOKEN=token, ORCH_WORKER_DISCOVERY=iface),
        stdout=log, stderr=log)
    return proc, ready


def _run(args, env_cache, timeout=180, **env):
    return subprocess.run([*ns_exec("orch"), sys.executable, "-m", "orchestrator.cli", *args],
                          env=dict(os.environ, ORCH_CACHE_DIR=str(env_cache), COLUMNS="200",
                                   **env),
                          capture_output=True, text=True, timeout=timeout)


def test_run_across_hosts_equals_unsplit(smollm2_path, tmp_path, threads):
    ref = ReferenceModel(smollm2_path, threads=threads)
    generated, _ = ref.greedy(ref.tokenize(PROMPT), STEPS)
    want = ref.detokenize(generated)
    ref.close()
    token = secrets.token_urlsafe(16)
    hosts = ["orch", "w0", "w1", "w2"]  # in namespace i the link is called oh{i}
    with network(hosts) as net:
        addresses = net.addresses
        procs = [_start_worker(h, addresses[h], token, tmp_path, f"oh{hosts.index(h)}")
                 for h in hosts[1:]]
        try:
            wait_until(lambda: all(r.exists() for _, r in procs), 60, "the workers to start")
            workers = ",".join(f"{addresses[h]}:50151" for h in ("w0", "w1"))
            done = _run(["run", str(smollm2_path), PROMPT, "--no-chat", "--workers", workers,
                         "--token", token, "--max-tokens", str(STEPS), "--objective",
                         "throughput"], tmp_path)
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip() == want.strip()
            assert f"on {addresses['w1']}:50151" in done.stderr
            # No list: the three workers are found by multicast across the bridge.
            found = _run(["run", str(smollm2_path), PROMPT, "--no-chat", "--max-tokens",
                          str(STEPS), "--objective", "throughput"], tmp_path,
                         ORCH_DISCOVERY="oh0", ORCH_TOKEN=token)
            assert found.returncode == 0, found.stderr
            assert "found 3 workers" in found.stderr
            assert found.stdout.strip() == want.strip()
            refused = _run(["run", str(smollm2_path), PROMPT, "--no-chat", "--workers",
                            workers, "--token", "wrong", "--max-tokens", "2"], tmp_path)
            assert refused.returncode == 1
            assert "token" in refused.stderr and addresses["w0"] in refused.stderr
        finally:
            for proc, _ in procs:
                proc.terminate()
            for proc, _ in procs:
                proc.wait(timeout=20)
