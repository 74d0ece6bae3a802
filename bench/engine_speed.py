"""Prompt and decode speed of a two-stage in-process chain vs the unsplit model.

The chain is ``testkit/chain.py``'s ``Chain``: two ``StageEngine`` shards of the even cut,
called one after the other in this process (no sockets). The unsplit baseline is
``testkit/reference.py``'s ``ReferenceModel`` (plain llama-cpp-python on the original file;
``--baseline engine`` takes a whole-model ``StageEngine`` instead). Both use the same
threads, the same context size and batch size, one session.

The variants run alternately (chain, unsplit, chain, unsplit, ...) so that load from
other processes hits both alike; the tables give medians and the ratio chain / unsplit.
One repetition = a fresh session, a ``--prompt-tokens`` prompt in one call, then
``--decode-tokens`` greedy steps of one token each.

In this build the llama.cpp model created first in a process decodes a few percent slower
than identical ones created later (measured: 1B first half-shard, 21.5 vs 20.2 ms per
token). ``--order both`` (default) therefore builds chain and unsplit model twice, once
each way round, half the repetitions each, and prints the ratio per order.

With ``--profile`` (default: when the decode ratio misses the target) the per-token
decode time is taken apart, variants alternating: the unsplit model; each stage through
``StageEngine.forward``; the same shards in bare llama.cpp contexts (no eval callback,
a no-op Python callback, the engine's ``GraphTap``). The callback counts tell how often
llama.cpp calls into Python per token.

    python bench/engine_speed.py                   # both models, default sizes
    python bench/engine_speed.py --models 135m --repeats-135m 40 --profile always
"""

from __future__ import annotations

import argparse
import ctypes
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import _common as common
import llama_cpp
import numpy as np
from _common import median
from rich.console import Console
from rich.table import Table

from orchcore.cpu import use_extra_buffer_types
from orchcore.engine import EngineConfig, StageEngine
from orchcore.facts import read_model_facts
from orchcore.llama_ext import GraphTap
from testkit.chain import Chain
from testkit.reference import ReferenceModel

TARGET = 0.95  # chain / unsplit, decode tokens/s, on the 1B model


# --- the runners: one repetition = fresh session, prompt, greedy decode ----------------


class Runner:
    name: str

    def prompt(self, tokens: list[int]) -> np.ndarray: ...
    def step(self, token: int, pos: int) -> np.ndarray: ...
    def reset(self) -> None: ...
    def close(self) -> None: ...

    def run(self, tokens: list[int], n_decode: int) -> tuple[float, float]:
        """Seconds for the prompt and for ``n_decode`` greedy steps."""
        self.reset()
        t0 = time.perf_counter()
        logits = self.prompt(tokens)
        t1 = time.perf_counter()
        pos = len(tokens)
        for _ in range(n_decode):
            logits = self.step(int(np.argmax(logits[-1])), pos)
            pos += 1
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1


class ChainRunner(Runner):
    def __init__(self, model: Path, workdir: Path, config: EngineConfig) -> None:
        n_layers = read_model_facts(model).n_layers
        self.chain = Chain(model, [n_layers // 2], workdir, config)
        self.name = "chain " + " + ".join(str(r) for r in self.chain.ranges)

    def prompt(self, tokens: list[int]) -> np.ndarray:
        return self.chain.forward("s", range(len(tokens)), tokens)

    def step(self, token: int, pos: int) -> np.ndarray:
        return self.chain.forward("s", [pos], [token])

    def reset(self) -> None:
        self.chain.end_session("s")

    def close(self) -> None:
        self.chain.close()


class EngineRunner(Runner):
    def __init__(self, model: Path, config: EngineConfig) -> None:
        self.engine = StageEngine(model, config)
        self.name = "unsplit: whole-model StageEngine"

    def prompt(self, tokens: list[int]) -> np.ndarray:
        return self.engine.forward("s", range(len(tokens)), tokens=tokens)

    def step(self, token: int, pos: int) -> np.ndarray:
        return self.engine.forward("s", [pos], tokens=[token])

    def reset(self) -> None:
        self.engine.end_session("s")

    def close(self) -> None:
        self.engine.close()


class ReferenceRunner(Runner):
    def __init__(self, model: Path, n_ctx: int, threads: int) -> None:
        self.ref = ReferenceModel(model, n_ctx=n_ctx, threads=threads)
        self.name = "unsplit: ReferenceModel (testkit/reference.py)"

    def prompt(self, tokens: list[int]) -> np.ndarray:
        return self.ref.eval(tokens, all_logits=False)

    def step(self, token: int, pos: int) -> np.ndarray:
        return self.ref.eval([token], all_logits=False)

    def reset(self) -> None:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ref.ctx), True)
        self.ref.positions[0] = 0

    def close(self) -> None:
        self.ref.close()


@dataclass
class Samples:
    prompt_tps: list[float] = field(default_factory=list)
    decode_tps: list[float] = field(default_factory=list)
    chain_built_first: list[bool] = field(default_factory=list)


@dataclass(frozen=True)
class Comparison:
    model: str
    chain_name: str
    base_name: str
    chain: Samples
    base: Samples

    def ratio(self, what: str) -> float:
        return median(getattr(self.chain, what)) / median(getattr(self.base, what))

    def ratio_when(self, what: str, chain_first: bool) -> float | None:
        """Ratio of medians over the repetitions of one build order."""
        pick = [i for i, f in enumerate(self.chain.chain_built_first) if f == chain_first]
        if not pick:
            return None
        a, b = getattr(self.chain, what), getattr(self.base, what)
        return median([a[i] for i in pick]) / median([b[i] for i in pick])

    def paired(self, what: str) -> float:
        pairs = zip(getattr(self.chain, what), getattr(self.base, what), strict=True)
        return median([a / b for a, b in pairs])


def context_size(args: argparse.Namespace) -> int:
    need = args.prompt_tokens + args.decode_tokens
    return max(512, -(-need // 256) * 256)


def build(args: argparse.Namespace, model: common.BenchModel, workdir: Path,
          chain_first: bool) -> tuple[ChainRunner, Runner]:
    n_ctx = context_size(args)
    config = EngineConfig(context_tokens=n_ctx, max_sessions=1, batch_tokens=n_ctx,
                          threads=args.threads)
    chain_dir = workdir / f"chain-{model.key}"
    chain_dir.mkdir(exist_ok=True)

    def make_chain() -> ChainRunner:
        return ChainRunner(model.path, chain_dir, config)

    def make_base() -> Runner:
        if args.baseline == "engine":
            return EngineRunner(model.path, config)
        return ReferenceRunner(model.path, n_ctx, args.threads)

    if chain_first:
        chain = make_chain()
        return chain, make_base()
    base = make_base()
    return make_chain(), base


def compare(args: argparse.Namespace, model: common.BenchModel, workdir: Path,
            repeats: int, console: Console) -> tuple[Comparison, ChainRunner, Runner]:
    """Alternate chain and unsplit; with ``--order both``, half the repetitions with
    the chain built first and half with the unsplit model built first (see docs)."""
    orders = {"chain-first": [True], "base-first": [False], "both": [True, False]}[args.order]
    tokens = common.prompt_tokens(args.prompt_tokens, read_model_facts(model.path).n_vocab)
    chain_s, base_s = Samples(), Samples()
    for k, chain_first in enumerate(orders):
        chain, base = build(args, model, workdir, chain_first)
        for runner in (chain, base):  # warm-up: first-touch page faults, thread start-up
            runner.run(tokens[:16], 4)
        n = repeats // len(orders) + (k < repeats % len(orders))
        for _ in range(n):
            for runner, s in ((chain, chain_s), (base, base_s)):
                prompt_s, decode_s = runner.run(tokens, args.decode_tokens)
                s.prompt_tps.append(len(tokens) / prompt_s)
                s.decode_tps.append(args.decode_tokens / decode_s)
                s.chain_built_first.append(chain_first)
                console.print(f"  {model.key:5} rep {len(s.decode_tps)}/{repeats} "
                              f"{'chain' if chain_first else 'unsplit'} built first: "
                              f"{runner.name:45} prompt {s.prompt_tps[-1]:7.1f} tok/s  "
                              f"decode {s.decode_tps[-1]:7.2f} tok/s", highlight=False)
        if k < len(orders) - 1:
            base.close()
            chain.close()
    return Comparison(model.key, chain.name, base.name, chain_s, base_s), chain, base


def speed_table(results: list[Comparison], args: argparse.Namespace) -> Table:
    t = Table(title=f"tokens/s, median of the repetitions (min-max); {args.threads} threads, "
                    f"{args.prompt_tokens}-token prompt, {args.decode_tokens} decode steps")
    for name in ("model", "variant", "prompt tok/s", "decode tok/s"):
        t.add_column(name, justify="left" if name in ("model", "variant") else "right")

    def cell(values: list[float]) -> str:
        return f"{median(values):.1f} ({min(values):.1f}-{max(values):.1f})"

    for c in results:
        t.add_row(c.model, c.chain_name, cell(c.chain.prompt_tps), cell(c.chain.decode_tps))
        t.add_row(c.model, c.base_name, cell(c.base.prompt_tps), cell(c.base.decode_tps))
        t.add_row(c.model, "[bold]ratio chain / unsplit[/] (paired median)",
                  f"{c.ratio('prompt_tps'):.3f} ({c.paired('prompt_tps'):.3f})",
                  f"{c.ratio('decode_tps'):.3f} ({c.paired('decode_tps'):.3f})",
                  end_section=True)
    return t


# --- profile: where a stage's per-token time goes --------------------------------------


class _NoOpTap:
    """An eval callback that wants no tensor: the cost of C calling Python per node."""

    def __init__(self) -> None:
        self.calls = 0
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_node)

    def _on_node(self, _tensor: int, _ask: bool, _user_data: int) -> bool:
        self.calls += 1
        return False


class _CountingTap(GraphTap):
    """The engine's GraphTap, counting the calls it gets (its callback, wrapped)."""

    def __init__(self, *a: object) -> None:
        super().__init__(*a)
        self.calls = 0
        inner = self.on_node

        def counting(tensor: int, ask: bool, user_data: int) -> bool:
            self.calls += 1
            return inner(tensor, ask, user_data)

        self.callback = llama_cpp.ggml_backend_sched_eval_callback(counting)


class RawStage:
    """One shard in a bare llama.cpp context (the engine's settings), hidden states in."""

    def __init__(self, shard: Path, n_ctx: int, threads: int,
                 tap: _NoOpTap | _CountingTap | None) -> None:
        facts = read_model_facts(shard)
        self.n_embd, self.tap = facts.n_embd, tap
        mparams = llama_cpp.llama_model_default_params()
        mparams.use_extra_bufts = use_extra_buffer_types()
        self.model = llama_cpp.llama_model_load_from_file(str(shard).encode(), mparams)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_seq_max = 1
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_ctx
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        if tap is not None:
            cparams.cb_eval = tap.callback
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.model or not self.ctx:
            raise RuntimeError(f"{shard}: bare llama.cpp load failed")
        self.batch = llama_cpp.llama_batch_init(n_ctx, self.n_embd, 1)
        self.embd = np.ctypeslib.as_array(self.batch.embd, shape=(n_ctx, self.n_embd))

    def decode(self, hidden: np.ndarray, pos: int) -> None:
        n = len(hidden)
        self.embd[:n] = hidden
        for i in range(n):
            self.batch.pos[i] = pos + i
            self.batch.n_seq_id[i] = 1
            self.batch.seq_id[i][0] = 0
            self.batch.logits[i] = True  # like the engine's non-final stages: every row
        self.batch.n_tokens = n
        if llama_cpp.llama_decode(self.ctx, self.batch) != 0:
            raise RuntimeError("llama_decode failed")

    def reset(self) -> None:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)


Step = Callable[[int], object]


@dataclass
class ProfileRow:
    """One way of decoding: per token, its steps run in order (the stages of a chain)."""

    key: str
    what: str
    prefill: Callable[[], None]
    steps: list[Step]
    tap: _NoOpTap | _CountingTap | None = None
    ms_per_step: list[list[float]] = field(default_factory=list)  # per round, per step
    calls_per_token: float | None = None

    def ms(self, step: int | None = None) -> float:
        """Median over rounds of ms per token: all steps, or one."""
        pick = (lambda r: sum(r)) if step is None else (lambda r: r[step])
        return median([pick(r) for r in self.ms_per_step])


def _timed_decode(row: ProfileRow, n_tokens: int) -> None:
    """Prefill, then time ``n_tokens`` tokens, each step separately; count callbacks."""
    row.prefill()
    calls = row.tap.calls if row.tap else 0
    spent = [0.0] * len(row.steps)
    clock = time.perf_counter
    for i in range(n_tokens):
        for j, step in enumerate(row.steps):
            t0 = clock()
            step(i)
            spent[j] += clock() - t0
    row.ms_per_step.append([t * 1000 / n_tokens for t in spent])
    if row.tap is not None:
        row.calls_per_token = (row.tap.calls - calls) / n_tokens


def profile_stages(args: argparse.Namespace, model: common.BenchModel, chain: ChainRunner,
                   base: Runner) -> dict[str, ProfileRow]:
    """ms per decode token of the chain and of the unsplit model, taken apart.

    Every row decodes ``--profile-tokens`` tokens after a ``--prompt-tokens`` prefill, both
    stages per token as the chain does (so each stage's weights leave the CPU caches
    between tokens, as in real use); the rows alternate within each of
    ``--profile-rounds`` rounds. The bare rows run the same shard files in llama.cpp
    contexts of our own, the first stage with no eval callback, a no-op Python callback
    or the engine's GraphTap; their last stage gets fixed hidden states.
    """
    chain.reset()  # the comparison's session; the profile uses its own
    first, last = chain.chain.stages
    n_ctx, n_prompt = context_size(args), args.prompt_tokens
    rng = np.random.default_rng(1)
    hidden_prompt = rng.standard_normal((n_prompt, first.n_embd), dtype=np.float32)
    hidden_step = rng.standard_normal((1, first.n_embd), dtype=np.float32)
    tokens = common.prompt_tokens(n_prompt, read_model_facts(model.path).n_vocab)
    raw_stages: list[RawStage] = []

    def raw(shard: Path, tap: _NoOpTap | _CountingTap | None) -> RawStage:
        raw_stages.append(RawStage(shard, n_ctx, args.threads, tap))
        return raw_stages[-1]

    def base_prefill() -> None:
        base.reset()
        base.prompt(tokens)

    def engine_prefill() -> None:
        chain.reset()
        chain.chain.forward("s", range(n_prompt), tokens)

    handoff: list[np.ndarray] = [hidden_step]

    def engine_first(i: int) -> None:
        handoff[0] = first.forward("s", [n_prompt + i], tokens=[5])

    def engine_last(i: int) -> None:
        last.forward("s", [n_prompt + i], hidden=handoff[0])

    bare_last = raw(last.path, None)

    def bare_row(key: str, what: str, tap: _NoOpTap | _CountingTap | None) -> ProfileRow:
        bare_first = raw(first.path, tap)

        def prefill() -> None:
            for stage in (bare_first, bare_last):
                stage.reset()
                stage.decode(hidden_prompt, 0)

        return ProfileRow(key, what, prefill, [
            lambda i: bare_first.decode(hidden_step, n_prompt + i),
            lambda i: bare_last.decode(hidden_step, n_prompt + i)], tap)

    bare_rows = [
        bare_row("bare", "chain, bare llama_decode x 2, no eval callback", None),
        bare_row("noop", "chain, bare, first stage with a no-op Python callback",
                 _NoOpTap()),
        bare_row("tap", "chain, bare, first stage with the engine's GraphTap",
                 _CountingTap(f"l_out-{first.facts.n_layers - 1}", first.n_embd, n_ctx)),
    ]
    whole = raw(model.path, None)  # created after the bare stages: no first-created bonus

    def whole_prefill() -> None:
        whole.reset()
        whole.decode(hidden_prompt, 0)

    rows = [
        ProfileRow("unsplit", f"unsplit ({base.name.split(': ')[1]})", base_prefill,
                   [lambda i: base.step(5, n_prompt + i)]),
        ProfileRow("unsplit_bare", "unsplit, bare llama_decode, hidden in", whole_prefill,
                   [lambda i: whole.decode(hidden_step, n_prompt + i)]),
        ProfileRow("engines", "chain: StageEngine.forward x 2 (as benchmarked above)",
                   engine_prefill, [engine_first, engine_last]),
        *bare_rows,
    ]
    try:
        for _ in range(args.profile_rounds):
            for row in rows:
                _timed_decode(row, args.profile_tokens)
    finally:
        chain.reset()
        base.reset()
        for stage in raw_stages:
            stage.close()
    return {row.key: row for row in rows}


def callback_call_us(n: int = 100_000) -> float:
    """Microseconds of one call through a ctypes eval callback (minus a plain C call).

    Called from Python through the C thunk: ctypes drops the GIL for the foreign call and
    the thunk takes it back, as when llama.cpp calls it during ``llama_decode``.
    """
    noop = _NoOpTap()
    proto = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p)
    through_c = ctypes.cast(noop.callback, proto)
    c_call = ctypes.CDLL(None).labs
    t0 = time.perf_counter()
    for _ in range(n):
        through_c(None, True, None)
    t1 = time.perf_counter()
    for _ in range(n):
        c_call(-3)
    t2 = time.perf_counter()
    return ((t1 - t0) - (t2 - t1)) / n * 1e6


def profile_table(model: str, rows: dict[str, ProfileRow], args: argparse.Namespace) -> Table:
    t = Table(title=f"{model}: ms per decode token (median of {args.profile_rounds} "
                    f"alternating rounds of {args.profile_tokens} tokens, after a "
                    f"{args.prompt_tokens}-token prefill)")
    for name in ("what", "total", "first stage", "last stage", "callback calls / token"):
        t.add_column(name, justify="left" if name == "what" else "right")
    for r in rows.values():
        stages = [f"{r.ms(j):.3f}" for j in range(len(r.steps))] if len(r.steps) > 1 else []
        calls = "-" if r.calls_per_token is None else f"{r.calls_per_token:.0f}"
        t.add_row(r.what, f"{r.ms():.3f}", *(stages or ["-", "-"]), calls)
    return t


def decomposition(rows: dict[str, ProfileRow], per_call_us: float) -> list[str]:
    """Where the chain's extra time per token goes, from the profile rows."""
    ms = {k: v.ms() for k, v in rows.items()}
    calls = rows["tap"].calls_per_token or 0
    parts = [
        ("the unsplit side's own Python, taken off (unsplit bare - unsplit)",
         ms["unsplit_bare"] - ms["unsplit"]),
        ("two bare llama_decode calls instead of one (bare - unsplit bare)",
         ms["bare"] - ms["unsplit_bare"]),
        ("the engine's GraphTap on the first stage (tap - bare)", ms["tap"] - ms["bare"]),
        ("  of which C->Python calls alone (no-op callback - bare)", ms["noop"] - ms["bare"]),
        ("StageEngine Python around llama_decode, both stages (engines - tap)",
         ms["engines"] - ms["tap"]),
    ]
    total = ms["engines"] - ms["unsplit"]
    lines = [f"chain {ms['engines']:.3f} ms vs unsplit {ms['unsplit']:.3f} ms per token: "
             f"{total:+.3f} ms ({ms['engines'] / ms['unsplit'] - 1:+.1%}), of which"]
    lines += [f"  {name}: {value:+.3f} ms" for name, value in parts]
    lines.append(f"  (microbenchmark: one C->Python callback call ~{per_call_us:.2f} us x "
                 f"{calls:.0f} calls per token = ~{per_call_us * calls / 1000:.3f} ms)")
    return lines


# --- main ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="1b,135m", help="comma list of: 1b, 135m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10, help="repetitions per variant, 1B")
    p.add_argument("--repeats-135m", type=int, default=20,
                   help="repetitions per variant, 135M (fast, noisier)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--baseline", choices=("reference", "engine"), default="reference",
                   help="unsplit side: ReferenceModel or a whole-model StageEngine")
    p.add_argument("--order", choices=("both", "chain-first", "base-first"), default="both",
                   help="which side's llama.cpp models are created first in the process; "
                        "both = half the repetitions each (the first-created runs slower)")
    p.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                   help=f"take the first stage apart (auto: when decode ratio < {TARGET})")
    p.add_argument("--profile-tokens", type=int, default=64)
    p.add_argument("--profile-rounds", type=int, default=5)
    p.add_argument("--workdir", help="keep generated model and shards here (default: temp)")
    args = p.parse_args(argv)
    args.models = common.parse_models(args.models)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    console = common.console()
    common.print_header(console, "Engine speed: two-stage chain vs unsplit model")
    results: list[Comparison] = []
    profiles: list[tuple[str, dict[str, ProfileRow]]] = []
    with common.work_directory(args.workdir) as workdir:
        for key in args.models:
            model = common.get_model(key, workdir)
            console.print(f"[bold]{key}[/]: {model.label}: {model.path}", highlight=False)
            repeats = args.repeats if key == "1b" else args.repeats_135m
            result, chain, base = compare(args, model, workdir, repeats, console)
            results.append(result)
            if args.profile == "always" or (args.profile == "auto"
                                            and result.ratio("decode_tps") < TARGET):
                with console.status(f"{key}: profiling the stages"):
                    profiles.append((key, profile_stages(args, model, chain, base)))
            base.close()
            chain.close()
    console.print(speed_table(results, args))
    for c in results:
        by_order = [(label, c.ratio_when("decode_tps", first)) for label, first in
                    (("chain built first", True), ("unsplit built first", False))]
        console.print(f"{c.model}: decode ratio by build order: " + ", ".join(
            f"{label} {r:.3f}" for label, r in by_order if r is not None), highlight=False)
        ratio = c.ratio("decode_tps")
        verdict = "met" if ratio >= TARGET else "NOT met"
        console.print(f"{c.model}: decode chain/unsplit = {ratio:.3f} (target >= {TARGET}: "
                      f"{verdict}{'' if c.model == '1b' else ', target is for 1b'})",
                      highlight=False)
    per_call = callback_call_us() if profiles else 0.0
    for key, rows in profiles:
        console.print(profile_table(key, rows, args))
        for line in decomposition(rows, per_call):
            console.print(f"{key}: {line}", highlight=False)


if __name__ == "__main__":
    main()
