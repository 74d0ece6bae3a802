"""How a session picks its next token: ``SamplingParams``, a pure, validated value.

It travels with a session (orchestrator -> last stage), and its defaults are the
defaults of every entry point (``orch run`` flags, settings, the OpenAI API later).
The last stage turns it into llama.cpp's own sampler chain (``worker.sampler``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

from orchcore.errors import InvalidSettingError

RANDOM_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: llama.cpp picks a random seed
MAX_TOP_K = 2**31 - 1  # int32_t in llama_sampler_init_top_k
# The penalties sampler allocates its ring buffer of repeat_last_n tokens up front.
MAX_REPEAT_LAST_N = 1 << 20
MAX_TOP_LOGPROBS = 20  # alternatives returned per token (OpenAI's limit)
MAX_GRAMMAR_BYTES = 1 << 20  # a GBNF grammar travels in the session's first chunk


def _check_float(name: str, value: object, low: float, high: float, *, low_open: bool = False,
                 allowed: str) -> float:
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if not ok or value < low or (low_open and value == low) or value > high:
        raise InvalidSettingError(f"{name} must be {allowed}, got {value!r}")
    return float(value)


def check_int(name: str, value: object, low: int, high: int, *, allowed: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not (
            low <= value <= high):
        raise InvalidSettingError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class SamplingParams:
    """How one session picks its next token. Every "off" value makes its sampler a no-op."""

    temperature: float = 0.0  # 0 = greedy: argmax, ties to the lowest token id
    top_k: int = 40  # keep the k most likely tokens; 0 = off
    top_p: float = 0.95  # keep the smallest set with probability mass >= top_p; 1.0 = off
    min_p: float = 0.05  # drop tokens below min_p x the top probability; 0.0 = off
    repeat_penalty: float = 1.0  # divide (positive) / multiply (negative) logits of recent
    #                              tokens by this; 1.0 = off
    repeat_last_n: int = 64  # how many of the latest input tokens are "recent"; 0 = off
    seed: int = RANDOM_SEED  # RANDOM_SEED (0xFFFFFFFF) = random; any other value reproducible
    grammar: str = ""  # GBNF (llama.cpp's grammar format, root rule "root") every sampled
    #                    token must follow; "" = off. The last stage needs the vocabulary.
    logprobs: bool = False  # return each sampled token's log-probability
    top_logprobs: int = 0  # ... and the most likely tokens' at that step, at most 20

    def __post_init__(self) -> None:
        inf = math.inf
        checked = {
            "temperature": _check_float("temperature", self.temperature, 0.0, inf,
                                        allowed="a finite number >= 0 (0 = greedy)"),
            "top_k": check_int("top_k", self.top_k, 0, MAX_TOP_K,
                                allowed=f"an integer in [0, {MAX_TOP_K}] (0 = off)"),
            "top_p": _check_float("top_p", self.top_p, 0.0, 1.0, low_open=True,
                                  allowed="a number in (0, 1] (1 = off)"),
            "min_p": _check_float("min_p", self.min_p, 0.0, 1.0,
                                  allowed="a number in [0, 1] (0 = off)"),
            "repeat_penalty": _check_float("repeat_penalty", self.repeat_penalty, 0.0, inf,
                                           low_open=True, allowed="a finite number > 0 (1 = off)"),
            "repeat_last_n": check_int(
                "repeat_last_n", self.repeat_last_n, 0, MAX_REPEAT_LAST_N,
                allowed=f"an integer in [0, {MAX_REPEAT_LAST_N}] (0 = off)"),
            "seed": check_int(
                "seed", self.seed, 0, RANDOM_SEED,
                allowed=f"an integer in [0, {RANDOM_SEED:#x}] ({RANDOM_SEED:#x} = random)"),
            "top_logprobs": check_int(
                "top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS,
                allowed=f"an integer in [0, {MAX_TOP_LOGPROBS}]"),
        }
        if not isinstance(self.grammar, str) or len(self.grammar.encode()) > MAX_GRAMMAR_BYTES:
            raise InvalidSettingError(f"grammar must be GBNF text of at most "
                                      f"{MAX_GRAMMAR_BYTES} bytes")
        if not isinstance(self.logprobs, bool):
            raise InvalidSettingError(f"logprobs must be true or false, got {self.logprobs!r}")
        for name, value in checked.items():  # numpy scalars become plain Python numbers
            object.__setattr__(self, name, value)

    def __repr__(self) -> str:  # a grammar can be long: say only how long
        grammar = f"<{len(self.grammar)} characters>" if self.grammar else "''"
        return (f"SamplingParams(temperature={self.temperature}, top_k={self.top_k}, "
                f"top_p={self.top_p}, min_p={self.min_p}, "
                f"repeat_penalty={self.repeat_penalty}, repeat_last_n={self.repeat_last_n}, "
                f"seed={self.seed}, grammar={grammar}, logprobs={self.logprobs}, "
                f"top_logprobs={self.top_logprobs})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        """Whether the repeat penalty does anything (llama.cpp's own "disabled" test)."""
        return self.repeat_last_n > 0 and self.repeat_penalty != 1.0


class TokenLogprobs(NamedTuple):
    """A sampled token's log-probability under the model (the log-softmax of its logits,
    before any sampler), and the ``top`` most likely tokens of that step as ``(id,
    logprob)``, most likely first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()
