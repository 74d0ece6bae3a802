"""A cluster with mixed versions is seen: `orch cluster` shows the odd node and what to
run on it; `orch run` refuses it, naming the node and the command that fixes it."""

from __future__ import annotations

import pytest

import worker.service
from orchcore.errors import ProtocolMismatchError
from orchestrator.cluster.topology import survey
from orchestrator.pipeline.connected import Cluster
from orchestrator.settings import OrchSettings
from testkit.cluster import worker_server


def test_an_old_node_is_shown_with_its_fix(tmp_path, monkeypatch) -> None:
    settings = OrchSettings.load(token="t")
    with worker_server(tmp_path / "w", token="t") as address:
        (same,) = survey([address], settings).workers
        assert same.problem is None
        monkeypatch.setattr(worker.service, "PROTOCOL_VERSION", 1)  # now it is an old node
        (old,) = survey([address], settings).workers
        assert old.problem is not None and "protocol 1" in old.problem
        assert "orch worker install" in old.problem
        assert "keeping its id, token and cache" in old.problem
        with pytest.raises(ProtocolMismatchError, match=r"orch worker install") as info:
            Cluster.connect([address], "t", settings)
    assert address in str(info.value)
