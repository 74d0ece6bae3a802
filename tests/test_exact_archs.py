"""The architectures beyond llama/qwen2/qwen3 (``orchcore.archs``): a split run equals the
unsplit model bit for bit, with f32 hidden states, on generated models of each; their
shards carry what the table says; a mixture-of-experts stage stays within its memory
estimate while the planner counts only the experts a token reads; what cannot be split
is refused with the reason.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGUFValueType, Keys
from test_plan import device
from typer.testing import CliRunner

from orchcore.archs import SUPPORTED_ARCHITECTURES, sqrt_n_embd
from orchcore.config import EngineConfig
from orchcore.errors import PlanError, UnsupportedModelError
from orchcore.facts import OUTPUT, TOKEN_EMBD, read_model_facts
from orchcore.memory import StageMemory, estimate_shard, kv_cells
from orchcore.modelgen import GType, preset
from orchcore.probe import layer_shape
from orchcore.shard import KEY_INPUT_SCALE, LayerRange, shard_layout, write_shard
from orchcore.slices import shard_ranges
from orchestrator.cli import app
from orchestrator.cluster.local import LocalCluster
from orchestrator.planning.plan import PlanOptions, head_layers, make_plan
from testkit.chain import Chain, assert_split_exact
from testkit.cluster import greedy_tokens, open_model
from testkit.models import generated_model
from testkit.reference import ReferenceModel

STEPS = 12
PROMPT = [1, 17, 300, 42, 99, 5, 260, 77]  # 8 tokens: past gemma3's window of 4 at once
WIDE = {"n_embd": 256, "n_ff": 512}  # rows of whole K-quant blocks

# gemma3 (7 layers, period 6): layers 0-4 and 6 slide, 5 is global. The cuts put a
# sliding layer first and last in stages, and [5, 6) is a stage of one global layer.
GEMMA3_CUTS = [[1], [5, 6], [3, 6]]
CUTS = [[1], [3], [1, 2]]  # 4 layers, every one with experts in the MoE models
CASES = [
    ("arch-qwen3moe", GType.Q8_0, {}, CUTS),
    ("arch-qwen3moe", GType.Q4_K, {**WIDE, "n_ff_exp": 256}, CUTS),
    ("arch-qwen2moe", GType.Q8_0, {}, CUTS),
    ("arch-qwen2moe", GType.Q4_K, {**WIDE, "n_ff_exp": 256, "n_ff_shexp": 256}, CUTS),
    ("arch-llama-moe", GType.Q8_0, {}, CUTS),
    ("arch-llama-moe", GType.Q4_K, WIDE, CUTS),
    ("arch-phi3", GType.Q8_0, {}, CUTS),
    ("arch-phi3", GType.Q4_K, WIDE, CUTS),
    ("arch-gemma3", GType.Q8_0, {}, GEMMA3_CUTS),
    # per-layer flags in the source; the one-layer stage [2, 3) is the global layer
    ("arch-gemma3", GType.Q4_K, {**WIDE, "swa_pattern": (True, True, False) * 2 + (True,)},
     [[2, 3], [1, 5]]),
    # a period of 3 instead of the default: layers 2 and 5 are global
    ("arch-gemma3", GType.F16, {"swa_pattern": 3}, [[2, 3], [5]]),
]


def _check_exact(model, tmp_path, threads, cuts_list):
    assert_split_exact(model, tmp_path, threads, cuts_list, PROMPT, STEPS)


@pytest.mark.parametrize(("name", "wtype", "changes", "cuts"), CASES,
                         ids=[f"{c[0]}-{c[1].name}-{i}" for i, c in enumerate(CASES)])
def test_split_equals_unsplit(name, wtype, changes, cuts, tmp_path, threads):
    model = generated_model(preset(name, weight_type=wtype, **changes))
    _check_exact(model, tmp_path, threads, cuts)


def _rewritten(src: Path, dst: Path, changes: dict[str, tuple]) -> Path:
    """``src`` with some metadata keys set to ``(value, type, item type)``."""
    reader = gguf.GGUFReader(src)
    changes = dict(changes)
    writer = gguf.GGUFWriter(dst, reader.get_field(Keys.General.ARCHITECTURE).contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == Keys.General.ARCHITECTURE:
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY else None
        value, vtype, sub = changes.pop(key, (field.contents(), vtype, sub))
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for key, (value, vtype, sub) in changes.items():
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def _per_layer(key: str, values: list[int]) -> dict[str, tuple]:
    return {key: (values, GGUFValueType.ARRAY, GGUFValueType.UINT32)}


def test_uniform_per_layer_expert_keys_are_sliced_and_exact(tmp_path, threads):
    """expert_used_count and expert_feed_forward_length given per layer (llama.cpp checks
    the arrays' length against block_count): each shard carries its own slice."""
    spec = preset("arch-qwen3moe", weight_type=GType.Q8_0)
    used, width = (k.format(arch="qwen3moe") for k in (
        Keys.LLM.EXPERT_USED_COUNT, Keys.LLM.EXPERT_FEED_FORWARD_LENGTH))
    model = _rewritten(generated_model(spec), tmp_path / "model.gguf",
                       _per_layer(used, [2] * 4) | _per_layer(width, [64] * 4))
    facts = read_model_facts(model)
    assert facts.is_supported and (facts.n_expert_used, facts.n_ff_exp) == (2, 64)
    shard = write_shard(model, LayerRange(1, 3), tmp_path / "s.gguf", facts=facts)
    field = gguf.GGUFReader(shard.path).get_field(used)
    assert field.contents() == [2, 2]
    _check_exact(model, tmp_path, threads, [[1, 3]])


def test_nonuniform_expert_count_is_refused(tmp_path):
    spec = preset("arch-qwen3moe", weight_type=GType.Q8_0)
    used = Keys.LLM.EXPERT_USED_COUNT.format(arch="qwen3moe")
    model = _rewritten(generated_model(spec), tmp_path / "model.gguf",
                       _per_layer(used, [2, 2, 1, 2]))
    facts = read_model_facts(model)
    with pytest.raises(UnsupportedModelError, match="expert_used_count differ between layers"):
        shard_layout(facts, LayerRange(0, 2))


# --- what the shards carry -------------------------------------------------------------


def _keys(path: Path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()
            if not k.startswith("tokenizer.ggml.token")}


def test_gemma3_shards_carry_their_own_sliding_layers_and_the_input_scale(tmp_path):
    model = generated_model(preset("arch-gemma3"), "g.gguf")
    facts = read_model_facts(model)
    assert facts.swa_layers == (True,) * 5 + (False, True) and facts.sliding_window == 4
    pattern, window = "gemma3.attention.sliding_window_pattern", "gemma3.attention.sliding_window"
    shards = {r: _keys(write_shard(model, r, tmp_path / f"{r.start}.gguf", facts=facts).path)
              for r in (LayerRange(0, 3), LayerRange(3, 6), LayerRange(5, 6), LayerRange(6, 7))}
    first, mixed, global_only, last = shards.values()
    assert first[pattern] == [True] * 3 and first[KEY_INPUT_SCALE] == sqrt_n_embd(64) == 8.0
    assert mixed[pattern] == [True, True, False] and KEY_INPUT_SCALE not in mixed
    assert global_only[window] == 0 and pattern not in global_only
    assert last[pattern] == [True] and last[window] == 4
    # a shard read back gives the flags of its own layers
    shard = write_shard(model, LayerRange(3, 6), tmp_path / "back.gguf", facts=facts)
    assert read_model_facts(shard.path).swa_layers == (True, True, False)


def test_qwen2moe_shards_keep_an_output_matrix(tmp_path):
    """llama.cpp requires output.weight for qwen2moe: 1-row zeros before the last stage; the
    last keeps the real one next to a token_embd of zeros it never reads."""
    model = generated_model(preset("arch-qwen2moe", **WIDE, n_ff_exp=256, n_ff_shexp=256,
                                   weight_type=GType.Q8_0), "q.gguf")
    facts = read_model_facts(model)
    middle = {t.name: t for t in shard_layout(facts, LayerRange(1, 3)).tensors}
    assert middle[OUTPUT].source is None and middle[OUTPUT].shape == (256, 1)
    last = {t.name: t for t in shard_layout(facts, LayerRange(3, 4)).tensors}
    assert last[OUTPUT].source == facts.by_name[OUTPUT]
    assert last[TOKEN_EMBD].source is None and last[TOKEN_EMBD].shape == (256, facts.n_vocab)
    assert last[TOKEN_EMBD].ggml_type == GType.IQ1_S  # the smallest type a 256 row fits
    # the bytes a worker fetches for the last stage hold output.weight, not the embedding
    ranges = shard_ranges(facts, LayerRange(3, 4))
    covered = [(r.offset, r.end) for r in ranges]
    out, embd = facts.by_name[OUTPUT], facts.by_name[TOKEN_EMBD]
    assert any(a <= out.offset and out.offset + out.n_bytes <= b for a, b in covered)
    assert not any(a <= embd.offset < b for a, b in covered)
    # ... and a copy holding only those bytes cuts the same shard
    sparse = tmp_path / "sparse" / "q.gguf"
    sparse.parent.mkdir()
    data = model.read_bytes()
    holes = bytearray(len(data))
    for r in ranges:
        holes[r.offset:r.end] = data[r.offset:r.end]
    sparse.write_bytes(holes)
    whole = write_shard(model, LayerRange(3, 4), tmp_path / "a.gguf", facts=facts)
    cut = write_shard(sparse, LayerRange(3, 4), tmp_path / "b.gguf")
    assert cut.sha256 == whole.sha256


@pytest.mark.parametrize("name", ["arch-qwen2moe", "arch-gemma3", "arch-phi3",
                                  "arch-llama-moe"])
def test_planner_and_worker_estimate_the_same_bytes(name, tmp_path):
    model = generated_model(preset(name), "m.gguf")
    facts = read_model_facts(model)
    config = EngineConfig(context_tokens=256, max_sessions=2, batch_tokens=32)
    memory = StageMemory(facts, config)
    n = facts.n_layers
    for start, end in [(0, n), (0, 1), (1, n - 1), (n - 1, n), (2, 3)]:
        shard = write_shard(model, LayerRange(start, end), tmp_path / "s.gguf", facts=facts)
        assert memory(start, end) == estimate_shard(read_model_facts(shard.path), config)


def test_sliding_layers_hold_the_whole_context_as_llama_cpp_allocates_them():
    config = EngineConfig(context_tokens=4096, max_sessions=2, batch_tokens=256)
    assert kv_cells(True, 512, config) == kv_cells(False, 512, config) == 8192  # swa_full
    assert kv_cells(True, 500, config, swa_full=False) == 768 * 2  # window + batch, padded
    assert kv_cells(True, 4000, config, swa_full=False) == 4096 * 2  # never above the context


# --- mixture of experts: memory holds all, time counts the used ---------------------------


@pytest.fixture(scope="module")
def moe_mini(tmp_path_factory) -> Path:
    return generated_model(preset("qwen3moe-30b-a3b-mini"), "mini.gguf")


def test_moe_facts_count_every_expert_for_memory_and_the_used_ones_for_time(moe_mini):
    facts = read_model_facts(moe_mini)
    assert (facts.n_expert, facts.n_expert_used, facts.n_ff_exp) == (128, 8, 64)
    layer = facts.layer_tensors(0)
    experts = sum(t.n_bytes for t in layer if "_exps." in t.name)
    shared = sum(t.n_bytes for t in layer) - experts
    assert facts.layer_bytes[0] == shared + experts
    assert facts.active_layer_bytes[0] == shared + experts * 8 // 128
    shape = layer_shape(facts)  # the probe times a layer as wide as a token's experts
    assert shape.n_ff == 8 * 64 and shape.layer_bytes == facts.active_layer_bytes[0]
    assert head_layers(facts) == facts.output_bytes / facts.active_layer_bytes[0]


def test_plan_shows_memory_and_bytes_read_per_token(moe_mini):
    facts = read_model_facts(moe_mini)
    plan = make_plan(facts, [device(i) for i in range(3)], PlanOptions(use_all=True))
    text = "\n".join(plan.describe())
    assert "8 of 128 experts per token" in text and text.count("MiB, a token reads") == 3
    for stage, row in zip(plan.stages, plan.to_json()["stages"], strict=True):
        held = sum(facts.layer_bytes[stage.layers.start:stage.layers.end])
        assert row["weights_bytes"] == stage.memory.weights >= held
        assert row["active_bytes"] < held / 5  # 8 of 128 experts, plus attention
    assert plan.to_json()["experts"] == {"used": 8, "per_layer": 128}


def test_moe_stage_peaks_within_its_estimate(moe_mini, tmp_path):
    from test_memory import _peak_rss

    with LocalCluster(2, tmp_path / "w", threads_per_worker=1) as cluster, \
            open_model(moe_mini, cluster.addresses, cluster.token, tmp_path,
                       context_tokens=512, batch_tokens=128, max_sessions=1) as model:
        greedy_tokens(model, [1 + i % 700 for i in range(300)], 4)  # 3 chunks, then decode
        for stage, client, proc in zip(model.plan.stages, model.path.clients, cluster.procs,
                                       strict=True):
            assert client.info().loaded.resident_bytes == stage.memory.total
            peak = _peak_rss(proc.pid)
            print(f"stage {stage.index}: peak {peak >> 20} MiB, estimate "
                  f"{stage.memory.describe()}")
            assert peak <= stage.memory.total < 2 * peak


# --- refusals ------------------------------------------------------------------------------


def _header_only(path: Path, arch: str, n_layers: int, n_embd: int = 64, n_head: int = 2,
                 key_length: int | None = None) -> Path:
    """A small GGUF with ``arch``'s keys and one tensor per layer: enough for the facts."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(n_layers)
    writer.add_embedding_length(n_embd)
    writer.add_head_count(n_head)
    if key_length is not None:
        writer.add_key_length(key_length)
        writer.add_value_length(key_length)
    writer.add_tensor(TOKEN_EMBD, np.zeros((8, n_embd), np.float32))
    for i in range(n_layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gemma3_27b_is_refused_with_the_reason(tmp_path):
    """62 layers and n_embd / n_head != key_length: llama.cpp's attention scale would
    change with a shard's layer count. The same shape with 61 layers splits."""
    big = read_model_facts(_header_only(tmp_path / "27b.gguf", "gemma3", 62, key_length=16))
    assert not big.is_supported
    for refused in (lambda: shard_layout(big, LayerRange(0, 31)),
                    lambda: make_plan(big, [device(1), device(2)])):
        with pytest.raises((UnsupportedModelError, PlanError), match=r"27B.*layer count"):
            refused()
    assert read_model_facts(_header_only(tmp_path / "61.gguf", "gemma3", 61, key_length=16)
                            ).is_supported
    assert read_model_facts(_header_only(tmp_path / "62.gguf", "gemma3", 62, key_length=32)
                            ).is_supported  # n_embd / n_head == key_length: same scale


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    facts = read_model_facts(_header_only(tmp_path / "f.gguf", "falcon", 4))
    with pytest.raises(UnsupportedModelError) as info:
        shard_layout(facts, LayerRange(0, 2))
    assert "'falcon'" in str(info.value)
    for arch in ("llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "phi3", "gemma3"):
        assert arch in SUPPORTED_ARCHITECTURES and arch in str(info.value)


def test_orch_info_shows_the_table(moe_mini):
    runner = CliRunner()
    listing = runner.invoke(app, ["info", "--archs"], env={"COLUMNS": "200"})
    assert listing.exit_code == 0
    for arch in SUPPORTED_ARCHITECTURES:
        assert f" {arch} " in listing.output or f"\n{arch}\n" in listing.output, arch
    one = runner.invoke(app, ["info", str(moe_mini)], env={"COLUMNS": "200"})
    assert one.exit_code == 0
    assert "128 per layer, 8 per token, 64 wide" in one.output
    assert "split: experts" in one.output


@pytest.fixture(scope="module")
def gemma3_reference(gemma3_path, threads):
    """The unsplit Gemma 3 270M on a prompt longer than its 512-token window, then three
    greedy steps: (prompt, tokens, logits of each step)."""
    rng = np.random.default_rng(0)
    prompt = [2] + [int(t) for t in rng.integers(1000, 200_000, 519)]
    ref = ReferenceModel(gemma3_path, n_ctx=1024, threads=threads)
    expected = [ref.eval(prompt, all_logits=False)]
    tokens = []
    for _ in range(3):
        tokens.append(int(np.argmax(expected[-1][-1])))
        expected.append(ref.eval([tokens[-1]]))
    ref.close()
    return prompt, tokens, expected


@pytest.mark.slow
@pytest.mark.parametrize("cuts", [[9], [6, 12], [5, 6, 12]],
                         ids=["2-stages", "3-stages", "4-stages-one-global-layer"])
def test_real_gemma3_270m_split_equals_unsplit_past_its_window(gemma3_path, gemma3_reference,
                                                               cuts, tmp_path, threads):
    """The real Gemma 3 270M (Gemma Terms of Use; window 512, every sixth layer global),
    over 2, 3 and 4 stages, one of them the single global layer 5."""
    prompt, tokens, expected = gemma3_reference
    chain = Chain(gemma3_path, cuts, tmp_path, EngineConfig(
        threads=threads, context_tokens=1024, max_sessions=1, batch_tokens=len(prompt)))
    try:
        got = [chain.forward("s", range(len(prompt)), prompt)]
        got += [chain.forward("s", [len(prompt) + i], [t]) for i, t in enumerate(tokens)]
    finally:
        chain.close()
    for step, (a, b) in enumerate(zip(expected, got, strict=True)):
        assert np.array_equal(a, b), (step, float(np.abs(a - b).max()))


@pytest.fixture(scope="module")
def gemma3_greedy(gemma3_path, threads):
    """The unsplit Gemma 3 270M's greedy answer to a short prompt: (prompt, tokens)."""
    ref = ReferenceModel(gemma3_path, threads=threads)
    prompt = ref.tokenize("The capital of France is Paris. The capital of Germany is")
    generated, _ = ref.greedy(prompt, 16)
    ref.close()
    return prompt, generated


@pytest.fixture(scope="module")
def gemma3_workers(tmp_path_factory):
    with LocalCluster(3, tmp_path_factory.mktemp("gemma3"), threads_per_worker=1) as cluster:
        yield cluster


@pytest.mark.slow
@pytest.mark.parametrize("ring", [True, False], ids=["ring", "no-ring"])
@pytest.mark.parametrize("n_workers", [2, 3])
def test_real_gemma3_270m_through_workers_equals_unsplit(gemma3_path, gemma3_greedy,
                                                         gemma3_workers, n_workers, ring,
                                                         tmp_path):
    """Through real workers, with the token ring and without it: Gemma 3's embedding is
    tied (63% of the file) and scaled by sqrt(n_embd), so stage 0 holds no table and takes
    each token's row with the chunk, from the orchestrator or the last stage. The first
    deployment of a cut sends the workers at most 1.10x the file, headers included."""
    prompt, want = gemma3_greedy
    with open_model(gemma3_path, gemma3_workers.addresses[:n_workers], gemma3_workers.token,
                    tmp_path, token_ring=ring) as model:
        got = greedy_tokens(model, prompt, len(want))
        sent = model.deployment.sent_bytes
    assert got == want
    size = gemma3_path.stat().st_size
    assert sent <= 1.10 * size, f"{n_workers} workers were sent {sent / size:.3f}x the file"
