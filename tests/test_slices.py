"""A worker's own slice of a published model, fetched with Range requests from a real HTTP
server on loopback: the shard it cuts is the shard the whole file gives (same sha256), for a
single file and a split set; cuts resume; a changed or unreachable file is refused; the
orchestrator's header copy reads as the model's facts and vocabulary."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from orchcore import modelgen
from orchcore.errors import InvalidInputError, SourceFetchError
from orchcore.facts import read_model_facts
from orchcore.ggufscan import scan_header
from orchcore.rangefetch import RemoteFile, describe_url
from orchcore.shard import LayerRange, shard_layout, write_shard
from orchcore.slices import ByteRange, merge, shard_ranges, total_bytes, uncovered
from orchestrator.models.registry import Expected
from orchestrator.models.remote import check_header, open_remote
from orchestrator.models.store import Store, header_sha256
from orchestrator.pipeline.deploy import model_files, read_ranges
from orchestrator.text.tokenizer import Tokenizer
from testkit.httpserver import serve
from testkit.models import generated_model
from worker.shardcache import ShardCache
from worker.slicefetch import Built, SliceFetcher

CUTS = [LayerRange(0, 1), LayerRange(1, 3), LayerRange(3, 4), LayerRange(0, 4)]


@pytest.fixture(scope="module")
def models() -> dict[str, Path]:
    spec = modelgen.preset("tiny-llama-mha-untied")
    one = generated_model(spec, "one.gguf")
    first = generated_model(spec, "set.gguf", split_max_tensors=7)
    return {"one": one, "set": first}


def _published(server, first: Path) -> tuple[RemoteFile, ...]:
    facts = read_model_facts(first)
    for part in facts.parts:
        server.add_file(part.name, part.read_bytes())
    return tuple(describe_url(server.url(p.name)) for p in facts.parts)


def _build(cache_root: Path, files, ranges, layers) -> Built:
    steps = list(SliceFetcher(ShardCache(cache_root), "w1").build(files, ranges, layers, set()))
    assert all(isinstance(s, int) for s in steps[:-1])
    return steps[-1]


def test_merge_and_coverage_are_exact() -> None:
    merged = merge([ByteRange(0, 100, 10), ByteRange(0, 0, 50), ByteRange(0, 60, 10),
                    ByteRange(1, 0, 5)], gap=10)
    assert merged == (ByteRange(0, 0, 70), ByteRange(0, 100, 10), ByteRange(1, 0, 5))
    assert uncovered([ByteRange(0, 10, 20)], merged) == []
    assert uncovered([ByteRange(0, 60, 50)], merged) == [ByteRange(0, 60, 50)]


@pytest.mark.parametrize("kind", ["one", "set"])
def test_the_ranges_are_the_headers_and_the_shards_tensors(models, kind) -> None:
    facts = read_model_facts(models[kind])
    for layers in CUTS:
        ranges = shard_ranges(facts, layers)
        headers = ranges[:len(facts.parts)]
        assert [r.part for r in headers] == list(range(len(facts.parts)))
        layout = shard_layout(facts, layers)
        copied = [t.source for t in layout.tensors if t.source] + \
            ([layout.input_table] if layout.input_table else [])
        tensors = total_bytes(ranges[len(facts.parts):])
        # Merged ranges carry only the alignment padding between neighbouring tensors.
        assert sum(t.n_bytes for t in copied) <= tensors
        assert tensors <= sum(t.n_bytes for t in copied) + layout.alignment * len(copied)


@pytest.mark.parametrize("kind", ["one", "set"])
def test_a_worker_cuts_the_same_shard_as_the_whole_file(models, kind, tmp_path) -> None:
    facts = read_model_facts(models[kind])
    with serve() as server:
        files = _published(server, models[kind])
        for layers in CUTS:
            ranges = shard_ranges(facts, layers)
            before = server.served_by_client.get("w1", 0)
            built = _build(tmp_path / "cache", files, ranges, layers)
            whole = write_shard(models[kind], layers, tmp_path / f"{layers.start}.gguf")
            assert (built.sha256, built.size, built.fetched) == (whole.sha256, whole.size, True)
            assert server.served_by_client["w1"] - before == total_bytes(ranges)
            again = _build(tmp_path / "cache", files, ranges, layers)  # the index knows it
            assert again == Built(whole.sha256, whole.size, False)
            assert server.served_by_client["w1"] - before == total_bytes(ranges)
    assert not list((tmp_path / "cache" / "fetching").glob("*/*.gguf"))  # sparse copies gone



@pytest.mark.parametrize("kind", ["one", "set"])
def test_an_uploaded_slice_is_cut_into_the_same_shard(models, kind, tmp_path) -> None:
    """The orchestrator's bytes of a slice, streamed: the shard the whole file gives, kept
    once (no sparse copy left), and known by the index without a byte the second time."""
    facts = read_model_facts(models[kind])
    files = model_files(facts)
    fetcher = SliceFetcher(ShardCache(tmp_path / "cache"), "w1")
    for layers in CUTS:
        ranges = shard_ranges(facts, layers)
        assert fetcher.find(files, layers) is None
        steps = list(fetcher.receive(files, ranges, layers, set(),
                                     read_ranges(facts.parts, ranges, chunk=1000)))
        whole = write_shard(models[kind], layers, tmp_path / f"{layers.start}.gguf")
        assert steps[-1] == Built(whole.sha256, whole.size, True)
        assert steps[-2] == total_bytes(ranges), "every byte of the ranges was written"
        pulled = []
        again = list(fetcher.receive(files, ranges, layers, set(),
                                     (pulled.append(b) or b for b in [b"x"])))
        assert again == [Built(whole.sha256, whole.size, False)] and pulled == []
        assert fetcher.find(files, layers) == again[0]
    assert not list((tmp_path / "cache" / "fetching").glob("*/*")), "a sparse copy was left"


def test_an_upload_of_the_wrong_length_is_refused_and_leaves_nothing(models, tmp_path):
    facts = read_model_facts(models["one"])
    layers = LayerRange(1, 3)
    ranges = shard_ranges(facts, layers)
    fetcher = SliceFetcher(ShardCache(tmp_path / "cache"), "w1")
    data = b"".join(read_ranges(facts.parts, ranges))
    for wrong, says in ((data[:-1], "ended after"), (data + b"!", "more than")):
        with pytest.raises(InvalidInputError, match=says):
            list(fetcher.receive(model_files(facts), ranges, layers, set(), iter([wrong])))
        assert not list((tmp_path / "cache").glob("**/*.gguf")), "a partial shard was left"
        assert not list((tmp_path / "cache" / "fetching").glob("*/*")), "a copy was left"


def test_cut_connections_resume_mid_range(models, tmp_path) -> None:
    facts = read_model_facts(models["one"])
    layers = LayerRange(1, 3)
    ranges = shard_ranges(facts, layers)
    with serve(cut_after=3000, cuts=4) as server:
        files = _published(server, models["one"])
        built = _build(tmp_path / "cache", files, ranges, layers)
        resumed = [r for m, _, r in server.requests if m == "GET" and r and
                   not any(r == f"bytes={x.offset}-{x.end - 1}" for x in ranges)]
    assert built.sha256 == write_shard(models["one"], layers, tmp_path / "s.gguf").sha256
    assert resumed, "a cut range must resume from its last byte, not start over"


def test_a_changed_file_is_refused(models, tmp_path) -> None:
    facts = read_model_facts(models["one"])
    with serve() as server:
        (planned,) = _published(server, models["one"])
        assert planned.etag
        server.add_file("one.gguf", models["one"].read_bytes()[:-1] + b"\x01")  # new version
        with pytest.raises(SourceFetchError, match="changed since it was planned"):
            _build(tmp_path / "c", [planned], shard_ranges(facts, LayerRange(0, 2)),
                   LayerRange(0, 2))


def test_an_unreachable_source_fails_within_seconds(models, tmp_path) -> None:
    facts = read_model_facts(models["one"])
    with serve(only_clients={"orchestrator"}) as server:
        files = _published(server, models["one"])
        started = time.monotonic()
        with pytest.raises(SourceFetchError, match="cannot fetch"):
            _build(tmp_path / "c", files, shard_ranges(facts, LayerRange(0, 2)),
                   LayerRange(0, 2))
    assert time.monotonic() - started < 10


def test_the_orchestrator_reads_headers_only(smollm2_path, tmp_path) -> None:
    data = Path(smollm2_path).read_bytes()
    with serve({"smollm2.gguf": data}) as server:
        first = describe_url(server.url("smollm2.gguf"))
        remote = open_remote(first, tmp_path)
        fetched = server.served_by_client["orchestrator"]
        assert open_remote(first, tmp_path).header_bytes == 0  # kept for the next run
    assert remote.header_bytes <= fetched < 0.03 * len(data)
    here, there = read_model_facts(smollm2_path), read_model_facts(remote.path)
    assert there.tensors == here.tensors and there.metadata == here.metadata
    with Tokenizer.from_gguf(smollm2_path) as a, Tokenizer.from_gguf(remote.path) as b:
        text = "The capital of France is Paris. 🇫🇷"
        assert a.encode(text) == b.encode(text)
    assert remote.copy.folder.stat().st_size < 1 << 20
    held = sum(p.stat().st_blocks * 512 for p in remote.copy.folder.iterdir())
    assert held < 0.05 * len(data)  # sparse: only the header takes disk


def test_a_split_set_is_found_from_its_first_part(models, tmp_path) -> None:
    with serve() as server:
        files = _published(server, models["set"])
        remote = open_remote(files[0], tmp_path)
    assert [f.url for f in remote.files] == [f.url for f in files]
    here, there = read_model_facts(models["set"]), read_model_facts(remote.path)
    assert there.tensors == here.tensors


def test_the_header_scan_agrees_with_gguf_py(smollm2_path, models) -> None:
    for path in [Path(smollm2_path), *read_model_facts(models["set"]).parts]:
        data = path.read_bytes()[:4 << 20]
        facts = read_model_facts(path) if path == Path(smollm2_path) else None
        scan = scan_header(data)
        assert scan is not None
        if facts is not None:
            assert (scan.end, scan.split_count) == (facts.data_offset, 1)
        else:
            assert scan.split_count == 6
        for cut in (0, 17, scan.end // 3, scan.end - 64):  # a prefix without the whole header
            assert scan_header(data[:cut]) is None


def test_pulling_a_split_set_by_url_fetches_every_file(models, tmp_path) -> None:
    with serve() as server:
        files = _published(server, models["set"])
        first = Store(tmp_path, progress=False).resolve(files[0].url)
    assert first.name == models["set"].name
    assert read_model_facts(first).tensors == read_model_facts(models["set"]).tensors
    assert [p.name for p in read_model_facts(first).parts] == \
        [p.name for p in read_model_facts(models["set"]).parts]


def test_a_fetched_header_is_held_to_the_registered_hash(models, tmp_path) -> None:
    with serve() as server:
        (first,) = _published(server, models["one"])
        remote = open_remote(first, tmp_path)
    check_header(remote, Expected(header_sha256=header_sha256(models["one"])))
    with pytest.raises(SourceFetchError, match="not the registered one"):
        check_header(remote, Expected(header_sha256="0" * 64))


def test_a_published_file_that_is_not_whole_is_refused(smollm2_path, tmp_path) -> None:
    """Cut short on the server: the orchestrator refuses it from its header alone. Bytes
    after the last tensor: a worker refuses it before cutting a shard."""
    data = Path(smollm2_path).read_bytes()
    facts = read_model_facts(smollm2_path)
    layers = LayerRange(10, 12)
    with serve({"cut.gguf": data[:30 << 20], "long.gguf": data + b"\0" * 4096}) as server:
        with pytest.raises(SourceFetchError, match=r"not a whole model file.*cut short"):
            open_remote(describe_url(server.url("cut.gguf")), tmp_path / "o")
        assert server.served_by_client["orchestrator"] < 0.05 * len(data)
        long = describe_url(server.url("long.gguf"))
        with pytest.raises(SourceFetchError, match=r"not a whole model file.*follow its last"):
            _build(tmp_path / "cache", [long], shard_ranges(facts, layers), layers)
    assert not list((tmp_path / "cache").glob("*.gguf")), "no shard may come of it"


def test_a_header_is_read_in_doubling_steps_not_whole(smollm2_path, monkeypatch):
    """Checking a copy whole read up to 256 MiB at once, a worker's whole budget on a Pi:
    a slice's cut raised a worker's peak from 110 to 357 MiB for a 1B model."""
    from orchcore import rangefetch

    seen: list[int] = []
    real = rangefetch.scan_header
    monkeypatch.setattr(rangefetch, "scan_header", lambda data: seen.append(len(data))
                        or real(data))
    size = smollm2_path.stat().st_size
    scan = rangefetch._read_header(smollm2_path, size)
    assert scan is not None
    assert max(seen) <= 2 * scan.end + rangefetch.FIRST_HEADER_BYTES, seen
