"""Next-token sampling on the last stage, with llama.cpp's own sampler chain.

``TokenSampler`` turns a session's ``SamplingParams`` (``orchcore.sampling``) into one
``llama_sampler`` chain and samples from logits the stage engine already computed, so the
chain runs exactly the C++ code ``llama_sampler_sample`` would run, without needing the
llama.cpp context that produced the logits.

How the pinned llama.cpp (``src/llama-sampler.cpp``) splits the work, and what follows:

* ``llama_sampler_sample(ctx, idx)`` = fill a ``llama_token_data_array`` with the logits,
  ``llama_sampler_apply`` the chain, read ``data[selected].id``, then
  ``llama_sampler_accept`` that token. ``sample`` here does the first three steps only.
* ``apply`` leaves the penalty history alone: the penalties sampler only reads its token
  counts there, and only ``accept`` adds to them. ``apply`` does advance the ``dist``
  sampler's RNG (one draw per call), which is what makes a seeded session reproducible.
* ``accept`` feeds every sampler of the chain; only the penalties sampler keeps something
  (the last ``repeat_last_n`` tokens). The caller accepts every token that enters the model
  (prompt and fed-back generated tokens), so the history is exactly the model's input.
* Samplers reorder and shrink the candidate array in place (top-k, top-p, min-p sort and
  filter it), so ids and logits are written afresh before every ``apply``.

The chain follows llama.cpp's default order: penalties, top-k, top-p, min-p, temperature,
dist. Top-p and min-p therefore see the probabilities before the temperature is applied.
Temperature 0 is a chain of penalties and ``greedy`` only (argmax, ties to the lowest id).

A session with a ``grammar`` (GBNF) has llama.cpp's grammar sampler too, kept outside the
chain: the chain is fed every token that enters the model (the prompt too), the grammar
only the tokens sampled after the prompt. As llama.cpp's own common sampler does, the
chain picks first and the grammar checks that one token; only when it is refused is the
whole vocabulary checked and the chain run again over the tokens allowed (checking all
49k candidates costs about 16 ms, longer than a 135M model's step). The grammar advances
with each token ``sample`` picks (every token sampled is the next one fed in, so this is
the same as accepting it when it comes back). It needs the model's vocabulary (a token's
text): the last stage's shard carries it.

``logprobs`` is the log-softmax of the row sampled from, before any sampler (as OpenAI
reports the model's distribution), in float64: the sampled token's and the top N.
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Iterable

import llama_cpp
import numpy as np

from orchcore.errors import ComputeError, InvalidInputError
from orchcore.sampling import SamplingParams, TokenLogprobs, check_int

# Layout of llama_token_data (id int32, logit float, p float), taken from the binding itself.
TOKEN_DATA = np.dtype(llama_cpp.llama_token_data)


def _build_chain(params: SamplingParams, n_vocab: int) -> llama_cpp.llama_sampler_p:
    """A new chain for ``params``, holding only the samplers that are on."""
    parts = []
    if params.penalised:
        parts.append(lambda: llama_cpp.llama_sampler_init_penalties(
            n_vocab, params.repeat_last_n, params.repeat_penalty, 0.0, 0.0))
    if params.greedy:
        parts.append(llama_cpp.llama_sampler_init_greedy)
    else:
        if params.top_k > 0:
            parts.append(lambda: llama_cpp.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            parts.append(lambda: llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            parts.append(lambda: llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
        parts.append(lambda: llama_cpp.llama_sampler_init_temp(params.temperature))
        parts.append(lambda: llama_cpp.llama_sampler_init_dist(params.seed))

    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    if not chain:
        raise MemoryError("llama_sampler_chain_init returned NULL")
    for make in parts:
        sampler = make()
        if not sampler:
            llama_cpp.llama_sampler_free(chain)
            raise MemoryError(f"a llama.cpp sampler could not be created for {params}")
        llama_cpp.llama_sampler_chain_add(chain, sampler)  # the chain owns it from here
    return chain


def _build_grammar(grammar: str, vocab: llama_cpp.llama_vocab_p | None
                   ) -> llama_cpp.llama_sampler_p:
    if vocab is None:
        raise InvalidInputError("this stage's shard carries no vocabulary, which a grammar "
                                "needs (a shard cut by an older orch): deploy the model again")
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    if not sampler:
        raise InvalidInputError(f"the grammar does not parse (llama.cpp's log says where); "
                                f"its first line: {grammar.splitlines()[0][:80]!r} "
                                f"({n_vocab}-token vocabulary)")
    return sampler


def token_logprobs(logits: np.ndarray, token: int, top: int) -> TokenLogprobs:
    """``token``'s log-probability in the row ``logits`` and the ``top`` most likely tokens
    (ties to the lower id), from the log-softmax in float64."""
    row = np.asarray(logits, dtype=np.float64).reshape(-1)
    peak = row.max()
    logp = row - (peak + np.log(np.exp(row - peak).sum()))
    best: tuple[tuple[int, float], ...] = ()
    if top:
        ids = np.argpartition(-logp, min(top, row.size - 1))[:top]
        ids = ids[np.lexsort((ids, -logp[ids]))]
        best = tuple((int(i), float(logp[i])) for i in ids)
    return TokenLogprobs(float(logp[token]), best)


class TokenSampler:
    """One session's llama.cpp sampler chain (and grammar). One thread at a time;
    ``close()`` frees it.

    ``accept`` every token that enters the model; ``sample`` accepts its token only into the
    grammar. ``vocab`` (the model's) is needed only with a grammar.
    """

    def __init__(self, params: SamplingParams, n_vocab: int,
                 vocab: llama_cpp.llama_vocab_p | None = None) -> None:
        check_int("n_vocab", n_vocab, 1, 2**31 - 1, allowed=f"an integer in [1, {2**31 - 1}]")
        self.params = params
        self.n_vocab = n_vocab
        self._grammar = _build_grammar(params.grammar, vocab) if params.grammar else None
        try:
            self._chain = _build_chain(params, n_vocab)
        except BaseException:
            _free_all(self._grammar)
            raise
        self._finalizer = weakref.finalize(self, _free_all, self._chain, self._grammar)
        # Reused on every call: the candidates, the ids to restore, and the C array header.
        self._data = np.zeros(n_vocab, dtype=TOKEN_DATA)
        self._data["id"] = self._ids = np.arange(n_vocab, dtype=np.int32)
        self._data_ptr = self._data.ctypes.data_as(llama_cpp.llama_token_data_p)
        self._array = llama_cpp.llama_token_data_array(
            data=self._data_ptr, size=n_vocab, selected=-1, sorted=False)
        self._array_ref = ctypes.byref(self._array)
        # Top-k, top-p and min-p sort and filter the candidates in place; the other samplers
        # only rewrite logits and probabilities, so without those the ids stay where they are.
        self._reorders = not params.greedy and (
            params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0)
        # One candidate, for checking a token against the grammar.
        self._one = np.zeros(1, dtype=TOKEN_DATA)
        self._one_ptr = self._one.ctypes.data_as(llama_cpp.llama_token_data_p)
        self._one_array = llama_cpp.llama_token_data_array(
            data=self._one_ptr, size=1, selected=-1, sorted=False)

    @property
    def chain(self) -> llama_cpp.llama_sampler_p:
        """The llama.cpp chain, for llama.cpp's own entry points (e.g. llama_sampler_sample)."""
        self._check_open()
        return self._chain

    @property
    def seed_used(self) -> int:
        """The seed the dist sampler really uses (a random one for RANDOM_SEED).

        A greedy chain has no RNG and reports RANDOM_SEED.
        """
        return int(llama_cpp.llama_sampler_get_seed(self.chain))

    def accept(self, tokens: Iterable[int]) -> None:
        """Record tokens that entered the model (prompt and fed-back generated tokens)."""
        self._check_open()
        ids = np.fromiter(tokens, dtype=np.int64)
        if ids.size == 0:
            return
        if ids.min() < 0 or ids.max() >= self.n_vocab:
            raise InvalidInputError(f"token ids must be in [0, {self.n_vocab}), got "
                                    f"{int(ids.min())}..{int(ids.max())}")
        if not self.params.penalised:
            return  # no sampler of this chain keeps history
        # Only the newest repeat_last_n tokens stay in the penalty window.
        for token in ids[-self.params.repeat_last_n:].tolist():
            llama_cpp.llama_sampler_accept(self._chain, token)

    def sample(self, logits: np.ndarray) -> int:
        """The next token for ``logits`` (``[n_vocab]`` or ``[1, n_vocab]``, float32).

        Advances the RNG of a random chain; does not add the token to the history (only to
        the grammar's text).
        """
        self._check_open()
        row = np.asarray(logits)
        if row.size != self.n_vocab or (row.ndim == 2 and row.shape[0] != 1) or row.ndim > 2:
            raise InvalidInputError(f"logits of shape {row.shape}, expected ({self.n_vocab},) "
                                    f"or (1, {self.n_vocab})")
        row = row.reshape(-1)
        token = self._run_chain(row, grammar_first=False)
        if self._grammar is not None:
            if not self._allowed(token):  # rare once the text is under way: sample again
                token = self._run_chain(row, grammar_first=True)
            llama_cpp.llama_sampler_accept(self._grammar, token)
        return token

    def _run_chain(self, row: np.ndarray, *, grammar_first: bool) -> int:
        """The chain's pick over every token; with ``grammar_first``, over the tokens the
        grammar allows. Picking first and checking the one token is llama.cpp's own way:
        far cheaper than checking the vocabulary, and the same pick for greedy sampling
        (the best token allowed)."""
        if self._reorders or grammar_first:
            self._data["id"] = self._ids
        self._data["logit"] = row
        array = self._array
        array.data = self._data_ptr
        array.size = self.n_vocab
        array.selected = -1
        array.sorted = False
        if grammar_first:
            llama_cpp.llama_sampler_apply(self._grammar, self._array_ref)
        llama_cpp.llama_sampler_apply(self._chain, self._array_ref)
        selected = array.selected
        if not 0 <= selected < array.size:
            raise ComputeError(f"the sampler chain selected candidate {selected} of "
                               f"{array.size} ({self.params})")
        # llama.h allows samplers to point ``data`` elsewhere: read through the pointer.
        chosen = array.data[selected]
        if grammar_first and chosen.logit == -np.inf:
            raise ComputeError(f"the grammar allows no token after the text so far "
                               f"({self.params})")
        return int(chosen.id)

    def _allowed(self, token: int) -> bool:
        """Whether the grammar allows ``token`` next."""
        one = self._one
        one[0] = (token, 0.0, 0.0)
        self._one_array.data = self._one_ptr
        self._one_array.size = 1
        self._one_array.selected = -1
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(self._one_array))
        return bool(np.isfinite(one[0]["logit"]))

    def logprobs(self, logits: np.ndarray, token: int) -> TokenLogprobs | None:
        """``token_logprobs`` as the session asked for them; None when it did not."""
        if not self.params.logprobs:
            return None
        return token_logprobs(logits, token, self.params.top_logprobs)

    def _check_open(self) -> None:
        if not self._finalizer.alive:
            raise ValueError("this TokenSampler is closed")

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> TokenSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _free_all(*samplers: llama_cpp.llama_sampler_p | None) -> None:
    for sampler in samplers:
        if sampler is not None:
            llama_cpp.llama_sampler_free(sampler)
