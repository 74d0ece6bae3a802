"""The stage engine: sessions, chunking, input errors, row 0 of embedding batches, and the
AMX guard, on a real chain of the small model (cuts after layers 10 and 20).

Every numeric comparison is exact against the unsplit model run by ``ReferenceModel``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from orchcore.cpu import CpuInfo, cpu_info, use_extra_buffer_types
from orchcore.engine import EngineConfig
from orchcore.errors import ContextFullError, InvalidInputError, SessionError
from testkit.chain import Chain
from testkit.reference import ReferenceModel

PROMPTS = {
    "A": "The capital of France is Paris. The capital of Italy is",
    "B": "def add(a, b):\n    return",
    "C": "Once upon a time, in a small village,",
}
STEPS = 3
CONTEXT = 64
BATCH = 32
N_EMBD, N_VOCAB = 576, 49152
# One thread: three engines in one process on a busy 2-core machine, where ggml's spinning
# thread barriers made 2 threads ~10x slower (this file: 80 s vs 7 s while a benchmark ran).
THREADS = 1
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Run:
    prompt: list[int]
    generated: list[int]
    logits: list[np.ndarray]  # [prompt rows, n_vocab], then one [1, n_vocab] per step


@pytest.fixture(scope="module")
def refs(smollm2_path) -> dict[str, Run]:
    out = {}
    for name, text in PROMPTS.items():
        model = ReferenceModel(smollm2_path, threads=THREADS)
        try:
            prompt = model.tokenize(text)
            generated, logits = model.greedy(prompt, STEPS)
        finally:
            model.close()
        out[name] = Run(prompt, generated, logits)
    assert all(len(r.prompt) > 6 for r in out.values())
    return out


@pytest.fixture(scope="module")
def chain(smollm2_path, tmp_path_factory):
    config = EngineConfig(threads=THREADS, context_tokens=CONTEXT, max_sessions=2,
                          batch_tokens=BATCH)
    chain = Chain(smollm2_path, [10, 20], tmp_path_factory.mktemp("chain"), config)
    yield chain
    chain.close()


@pytest.fixture(autouse=True)
def _no_sessions_left(request):
    """Every test starts with all session slots free, whatever the previous one did."""
    yield
    if "chain" in request.fixturenames:
        for stage in request.getfixturevalue("chain").stages:
            for session in stage.sessions:
                stage.end_session(session)


def _prompt_logits(chain: Chain, session: str, tokens: list[int], chunks: list[int],
                   start: int = 0) -> np.ndarray:
    """Feed ``tokens`` in chunks of the given sizes (the rest last); every row's logits."""
    out, pos = [], start
    for size in [*chunks, len(tokens) - sum(chunks)]:
        piece = tokens[pos - start:pos - start + size]
        out.append(chain.forward(session, range(pos, pos + size), piece, all_logits=True))
        pos += size
    return np.concatenate(out)


def _assert_equal(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert got.shape == expected.shape, what
    assert np.array_equal(got, expected), f"{what}: max diff {np.abs(got - expected).max()}"


# --- sessions ---------------------------------------------------------------------------


def test_interleaved_sessions_equal_runs_alone(chain, refs):
    a, b = refs["A"], refs["B"]
    ka, kb = len(a.prompt) // 2, 3
    rows = {"A": [], "B": []}
    rows["A"].append(chain.forward("A", range(ka), a.prompt[:ka], all_logits=True))
    rows["B"].append(chain.forward("B", range(kb), b.prompt[:kb], all_logits=True))
    rows["A"].append(chain.forward("A", range(ka, len(a.prompt)), a.prompt[ka:],
                                   all_logits=True))
    rows["B"].append(chain.forward("B", range(kb, len(b.prompt)), b.prompt[kb:],
                                   all_logits=True))
    _assert_equal(np.concatenate(rows["A"]), a.logits[0], "prompt A")
    _assert_equal(np.concatenate(rows["B"]), b.logits[0], "prompt B")
    for step in range(STEPS):
        for name, run in (("B", b), ("A", a)):
            pos = len(run.prompt) + step
            got = chain.forward(name, [pos], [run.generated[step]])
            _assert_equal(got, run.logits[step + 1], f"session {name} step {step}")
    for stage in chain.stages:
        assert stage.sessions == ("A", "B")
        assert stage.session_length("A") == len(a.prompt) + STEPS


@pytest.mark.parametrize("chunks", [[1], [1, 1, 1], [5, 2], [4, 4]])
def test_chunked_prompt_equals_one_shot(chain, refs, chunks):
    run = refs["A"]
    one_shot = chain.forward("one", range(len(run.prompt)), run.prompt, all_logits=True)
    chunked = _prompt_logits(chain, "chunked", run.prompt, chunks)
    _assert_equal(one_shot, run.logits[0], "one shot vs reference")
    _assert_equal(chunked, one_shot, f"chunks {chunks}")
    last_only = chain.forward("one", [len(run.prompt)], [run.generated[0]])
    _assert_equal(last_only, run.logits[1], "decode after one-shot prompt")


def test_end_session_frees_the_slot(chain, refs):
    a, c = refs["A"], refs["C"]
    chain.forward("A", range(4), a.prompt[:4])
    chain.forward("B", [0], refs["B"].prompt[:1])
    with pytest.raises(SessionError, match="2 session slots"):
        chain.forward("C", range(len(c.prompt)), c.prompt)
    assert chain.stages[0].sessions == ("A", "B")

    chain.end_session("A")
    assert all(stage.session_length("A") == 0 for stage in chain.stages)
    assert chain.stages[0].end_session("A") is False  # already gone
    # C takes A's slot; nothing of A's cache leaks into it.
    _assert_equal(_prompt_logits(chain, "C", c.prompt, [2]), c.logits[0], "C in A's slot")
    chain.end_session("C")

    with pytest.raises(InvalidInputError, match="continue at 0"):
        chain.forward("A", [4], a.prompt[4:5])  # a restarted session starts over at 0
    _assert_equal(_prompt_logits(chain, "A", a.prompt, [3]), a.logits[0], "A restarted")
    got = chain.forward("A", [len(a.prompt)], [a.generated[0]])
    _assert_equal(got, a.logits[1], "A restarted, first decode step")


# --- errors keep their meaning ------------------------------------------------------------


def test_context_full(chain):
    first = chain.stages[0]
    for start in (0, BATCH):
        chain.first("s", range(start, start + BATCH), [1] * BATCH)
    assert first.session_length("s") == CONTEXT
    with pytest.raises(ContextFullError, match=f"context length of {CONTEXT}"):
        chain.first("s", [CONTEXT], [1])
    first.end_session("s")
    chain.first("s", range(BATCH), [1] * BATCH)
    chain.first("s", range(BATCH, 40), [1] * (40 - BATCH))
    with pytest.raises(ContextFullError):
        chain.first("s", range(40, 40 + 30), [1] * 30)
    assert first.session_length("s") == 40  # the refused chunk left no trace


def test_positions_must_continue(chain, refs):
    run = refs["A"]
    first = chain.stages[0]
    chain.first("s", [0, 1, 2], run.prompt[:3])
    for bad in ([4], [2], [3, 5], [3, 3], [0]):
        with pytest.raises(InvalidInputError, match="continue at 3"):
            chain.first("s", bad, run.prompt[3:3 + len(bad)])
    assert first.session_length("s") == 3
    # The refusals changed nothing: the session goes on exactly.
    for stage in chain.stages[1:]:
        stage.end_session("s")
    first.end_session("s")
    got = _prompt_logits(chain, "s", run.prompt, [3])
    _assert_equal(got, run.logits[0], "after refused positions")


def test_wrong_kind_of_input(chain):
    first, middle, last = chain.stages
    with pytest.raises(InvalidInputError, match="token ids"):
        first.forward("s", [0], hidden=np.zeros((1, N_EMBD), np.float32))
    with pytest.raises(InvalidInputError, match="token ids"):
        first.forward("s", [0], tokens=[1], hidden=np.zeros((1, N_EMBD), np.float32))
    for stage in (middle, last):
        with pytest.raises(InvalidInputError, match="hidden states"):
            stage.forward("s", [0], tokens=[1])
        with pytest.raises(InvalidInputError, match="hidden states"):
            stage.forward("s", [0], tokens=[1], hidden=np.zeros((1, N_EMBD), np.float32))


@pytest.mark.parametrize("shape", [(1, N_EMBD - 1), (2, N_EMBD), (N_EMBD,), (1, 1, N_EMBD)])
def test_wrong_hidden_shape(chain, shape):
    for stage in chain.stages[1:]:
        with pytest.raises(InvalidInputError, match=rf"expected \(1, {N_EMBD}\)"):
            stage.forward("s", [0], hidden=np.zeros(shape, np.float32))


@pytest.mark.parametrize("token", [N_VOCAB, N_VOCAB + 1000, -1])
def test_token_out_of_vocabulary(chain, token):
    with pytest.raises(InvalidInputError, match="token id out of range"):
        chain.first("s", [0, 1], [1, token])
    out = chain.first("s", [0, 1], [1, N_VOCAB - 1])  # the last id is fine
    assert out.shape == (2, N_EMBD)


def test_row_count_limits(chain):
    first, middle, _ = chain.stages
    with pytest.raises(InvalidInputError, match=f"1..{BATCH} rows, got {BATCH + 1}"):
        chain.first("s", range(BATCH + 1), [1] * (BATCH + 1))
    with pytest.raises(InvalidInputError, match="got 0"):
        chain.first("s", [], [])
    with pytest.raises(InvalidInputError, match=f"1..{BATCH} rows"):
        middle.forward("s", range(BATCH + 1), hidden=np.zeros((BATCH + 1, N_EMBD), np.float32))
    with pytest.raises(InvalidInputError, match="3 tokens for 2 positions"):
        chain.first("s", [0, 1], [1, 2, 3])
    assert first.sessions == () and middle.sessions == ()


def test_refused_first_chunk_takes_no_slot(chain):
    first = chain.stages[0]
    with pytest.raises(InvalidInputError):
        chain.first("x", [5], [1])
    assert first.sessions == ()


def test_first_stage_of_a_tied_split_takes_the_file_s_rows_with_each_chunk(chain):
    """The 135M is tied: stage 0 holds no table, refuses a chunk without its rows or with
    rows of another type, and the last stage reads the very rows of the file from its lm
    head (what the token ring sends)."""
    first, last = chain.stages[0], chain.stages[-1]
    assert first.takes_rows and not last.takes_rows
    with pytest.raises(InvalidInputError, match="takes each token's embedding row"):
        first.forward("s", [0], tokens=[1])
    rows = chain.rows.take([1, 2])
    with pytest.raises(InvalidInputError, match="this stage takes type"):
        first.forward("s", [0, 1], tokens=[1, 2], rows=rows._replace(ggml_type=0))
    with pytest.raises(InvalidInputError, match="2 tokens"):
        first.forward("s", [0, 1], tokens=[1, 2], rows=rows._replace(data=rows.data[:-1]))
    assert first.sessions == ()
    assert last.embedding_rows([5, 49151, 5]) == chain.rows.take([5, 49151, 5])
    assert first.embedding_rows([5]) is None and chain.stages[1].embedding_rows([5]) is None


# --- row 0 of an embedding batch (FINDINGS 3) ----------------------------------------------


def test_row0_of_multi_row_batch_is_exact(chain, refs):
    """Every stage here takes an embedding batch (the first via its input table); row 0 is
    the first position, where the largest activations are."""
    run = refs["A"]
    got = chain.forward("s", range(len(run.prompt)), run.prompt, all_logits=True)
    _assert_equal(got[0], run.logits[0][0], "row 0 of a multi-row prompt")
    _assert_equal(got[1:], run.logits[0][1:], "rows 1..n-1")


def test_row0_of_one_row_batch_is_exact(chain, refs):
    """A 1-row batch: its only row is row 0, at position 0 and during decode."""
    run = refs["B"]
    got = chain.forward("s", [0], run.prompt[:1])
    _assert_equal(got[0], run.logits[0][0], "1-row batch at position 0")
    for pos in range(1, len(run.prompt)):
        got = chain.forward("s", [pos], [run.prompt[pos]])
        _assert_equal(got[0], run.logits[0][pos], f"1-row batch at position {pos}")
    got = chain.forward("s", [len(run.prompt)], [run.generated[0]])
    _assert_equal(got, run.logits[1], "1-row decode step")


# --- the AMX guard (FINDINGS 1) ------------------------------------------------------------


def test_extra_buffer_types_off_exactly_with_amx():
    info = cpu_info()
    assert use_extra_buffer_types() is (not info.has_amx)
    amx = CpuInfo("Xeon", "x86_64", 2, frozenset({"avx512f", "amx_tile", "amx_int8"}))
    plain = CpuInfo("Xeon", "x86_64", 2, frozenset({"avx512f", "avx2"}))
    neon = CpuInfo("Cortex-A76", "aarch64", 4, frozenset({"asimd", "fp"}))
    # arm64 under qemu-user on an AMX host: /proc/cpuinfo is the host's
    emulated = CpuInfo("Xeon", "aarch64", 2, amx.flags)
    assert use_extra_buffer_types(amx) is False
    assert use_extra_buffer_types(plain) is True and use_extra_buffer_types(neon) is True
    assert use_extra_buffer_types(emulated) is True
    assert EngineConfig().extra_buffer_types is None  # the default decides per CPU


_ONE_FORWARD = textwrap.dedent("""
    import sys
    from orchcore.embedrows import RowTable
    from orchcore.engine import EngineConfig, StageEngine
    from orchcore.facts import TOKEN_EMBD, read_model_facts
    extra = {"on": True, "auto": None}[sys.argv[2]]
    config = EngineConfig(threads=1, context_tokens=16, max_sessions=1, batch_tokens=4,
                          extra_buffer_types=extra)
    embd = read_model_facts(sys.argv[3]).by_name[TOKEN_EMBD]
    with RowTable.of_tensor(sys.argv[3], embd) as table, \
            StageEngine(sys.argv[1], config) as engine:
        out = engine.forward("s", [0, 1, 2], tokens=[1, 2, 3], rows=table.take([1, 2, 3]))
    print("rows", out.shape[0], flush=True)
""")


def _one_forward(shard: Path, extra: str, model: Path) -> subprocess.CompletedProcess:
    """Stage 0 of the 135M (tied: the rows come from the model file) in a new process."""
    return subprocess.run([sys.executable, "-c", _ONE_FORWARD, str(shard), extra, str(model)],
                          cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)


def test_default_engine_runs_in_a_fresh_process(chain, smollm2_path):
    result = _one_forward(chain.stages[0].path, "auto", smollm2_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "rows 3"


def test_extra_buffer_types_crash_on_amx(chain, smollm2_path):
    if not cpu_info().has_amx:
        pytest.skip("CPU has no AMX")
    result = _one_forward(chain.stages[0].path, "on", smollm2_path)
    assert result.returncode == -signal.SIGSEGV, (result.returncode, result.stderr[-2000:])
