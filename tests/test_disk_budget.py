"""Disk as a budget: what is about to be written is checked against the free space first,
on the orchestrator and on a worker, and a full disk is one line naming the machine, the
folder, what is needed and what is free, with no partial file left that counts as present.

Models of GB size are sparse files (their tensors a hole, no disk); the small disks are
size-limited tmpfs mounts, which need root.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orchcore import modelgen
from orchcore.errors import DiskFullError
from orchcore.facts import read_model_facts
from orchcore.shard import LayerRange, write_shard
from orchcore.slices import shard_ranges
from orchestrator.cluster.client import WorkerClient
from orchestrator.pipeline.deploy import model_files, read_ranges
from orchestrator.settings import OrchSettings
from testkit.cluster import worker_server
from testkit.disks import GB_SPEC, NEEDS_ROOT, can_mount, small_disk, write_sparse_model

pytestmark = pytest.mark.skipif(not can_mount(), reason=NEEDS_ROOT)

# Two F16 layers of 1024 wide: a 25 MB slice per layer, no disk while it is a hole.
MID_SPEC = modelgen.ModelSpec(n_layers=2, n_embd=1024, n_head=8, n_head_kv=8, n_ff=2816,
                              weight_type=modelgen.GType.F16)


@pytest.fixture(scope="module")
def gb_model(tmp_path_factory) -> Path:
    return write_sparse_model(tmp_path_factory.mktemp("sparse") / "gb.gguf", GB_SPEC)


def _one_line(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message, message
    assert "needs" in message and "are free" in message, message


def _files(root: Path) -> list[Path]:
    """What a failed write could leave behind: shards, part files and sparse copies."""
    return [p for p in root.rglob("*") if p.is_file() and (
        p.suffix in (".gguf", ".part") or p.parent.parent.name == "fetching")]


def test_a_shard_larger_than_this_disk_is_refused_before_writing(gb_model, tmp_path):
    with small_disk(tmp_path / "disk", 64) as disk:
        written = []
        with pytest.raises(DiskFullError) as caught:
            write_shard(gb_model, LayerRange(0, 2), disk / "shard.gguf",
                        progress=lambda done, total: written.append(done))
        assert written == [], "tensor bytes were written before the disk was checked"
        message = str(caught.value)
        _one_line(message)
        assert message.startswith("this machine: ") and str(disk) in message, message
        assert _files(disk) == []


def test_a_worker_whose_disk_is_too_small_refuses_the_slice(gb_model, tmp_path):
    """A 700 MB slice for a worker whose cache is on a 64 MiB disk: refused with the
    worker's address and the numbers, before its bytes are written; nothing left."""
    facts = read_model_facts(gb_model)
    layers = LayerRange(0, 2)
    ranges = shard_ranges(facts, layers)
    files = model_files(facts)
    with small_disk(tmp_path / "disk", 64) as disk, worker_server(disk) as address:
        client = WorkerClient(address, None, OrchSettings.load())
        try:
            with pytest.raises(DiskFullError) as caught:
                client.upload_slice(files, ranges, layers, read_ranges(facts.parts, ranges))
            message = str(caught.value)
            _one_line(message)
            assert message.startswith(f"worker {address}: "), message
            assert str(disk / "cache") in message and "--cache-dir" in message, message
            assert _files(disk) == [], "a partial file was left"
            assert client.find_shard(files, ranges, layers) is None
        finally:
            client.close()


def test_a_disk_that_fills_up_mid_upload_leaves_no_partial_file(tmp_path):
    """The slice fits when the upload starts; another writer fills the disk meanwhile: the
    worker's write fails, which is the same one-line error, and its sparse copy is gone."""
    model = write_sparse_model(tmp_path / "mid.gguf", MID_SPEC)
    facts = read_model_facts(model)
    layers = LayerRange(0, 1)
    ranges = shard_ranges(facts, layers)
    files = model_files(facts)
    with small_disk(tmp_path / "disk", 160) as disk, worker_server(disk) as address:
        ballast = disk / "ballast"

        def data():
            chunks = read_ranges(facts.parts, ranges)
            yield next(chunks)
            with ballast.open("wb") as out:  # fill the disk to the last byte
                try:
                    while True:
                        out.write(bytes(1 << 20))
                        out.flush()
                except OSError:
                    pass
            yield from chunks

        client = WorkerClient(address, None, OrchSettings.load())
        try:
            with pytest.raises(DiskFullError) as caught:
                client.upload_slice(files, ranges, layers, data())
            _one_line(str(caught.value))
            assert str(caught.value).startswith(f"worker {address}: ")
            ballast.unlink()
            assert _files(disk) == [], "a partial file was left"
            assert client.find_shard(files, ranges, layers) is None
        finally:
            client.close()
