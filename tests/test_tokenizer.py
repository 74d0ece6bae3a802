"""The orchestrator's tokenizer on the real SmolLM2 vocabulary (byte-level BPE, chat
template) and on a generated SentencePiece vocabulary (BOS added, byte fallback, no
template); the stream decoder and the stop matcher as state machines."""

from __future__ import annotations

import gc
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchcore import modelgen
from orchcore.errors import GGUFError, NotGGUFError
from orchestrator.text.chat import ChatTemplateError, render_jinja
from orchestrator.text.tokenizer import (
    NoChatTemplateError,
    StopMatcher,
    StreamDecoder,
    TokenIdError,
    Tokenizer,
)
from testkit.models import generated_model

EMOJI_TEXT = "Héllo café 😀 ok"
CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> Iterator[Tokenizer]:
    with Tokenizer.from_gguf(smollm2_path) as tok:
        yield tok


@pytest.fixture(scope="module")
def spm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tokenizer]:
    """A generated SentencePiece vocabulary: add_bos, byte fallback, no chat template."""
    path = generated_model(modelgen.ModelSpec(), "tiny.gguf")
    with Tokenizer.from_gguf(path) as tok:
        yield tok


def stream(tok: Tokenizer, tokens: list[int], special: bool = False) -> list[str]:
    decoder = StreamDecoder(tok, special=special)
    return [decoder.feed(t) for t in tokens] + [decoder.flush()]


# --- vocabulary facts ------------------------------------------------------------------


def test_smollm2_vocabulary_facts(smollm2: Tokenizer) -> None:
    assert smollm2.n_vocab == 49152
    assert (smollm2.bos, smollm2.eos, smollm2.eot) == (1, 2, 0)
    assert smollm2.add_bos is False
    assert smollm2.special_text(smollm2.eos) == "<|im_end|>"


def test_spm_vocabulary_facts(spm: Tokenizer) -> None:
    assert spm.add_bos is True
    assert spm.special_text(spm.bos) == "<s>"
    assert spm.eot is None  # LLAMA_TOKEN_NULL comes out as None
    assert spm.chat_template is None


# --- encode / decode -------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "The quick brown fox jumps over the lazy dog.",
    "Ça m'a coûté 12,50 € — déjà vu, naïve façade, Ångström, Straße",
    "Emoji: 😀 👍🏽 🇫🇷 👩‍👩‍👧 and CJK 東京, Ελληνικά, العربية",
    "  leading spaces, tabs\tand\nnew lines\n\n",
    "",
])
def test_round_trip(smollm2: Tokenizer, text: str) -> None:
    tokens = smollm2.encode(text)
    assert all(0 <= t < smollm2.n_vocab for t in tokens)
    assert smollm2.decode(tokens) == text


def test_capital_of_france(smollm2: Tokenizer) -> None:
    tokens = smollm2.encode("The capital of France is")
    assert tokens == [504, 3575, 282, 4649, 314]
    assert [smollm2.piece(t) for t in tokens] == [b"The", b" capital", b" of", b" France",
                                                 b" is"]
    assert smollm2.decode(tokens) == "The capital of France is"


def test_special_tokens_parsed_only_when_asked(smollm2: Tokenizer) -> None:
    text = "<|im_start|>user"
    assert smollm2.encode(text)[0] == smollm2.bos
    plain = smollm2.encode(text, parse_special=False)
    assert smollm2.bos not in plain
    assert smollm2.decode(plain) == text
    assert smollm2.decode(smollm2.encode(text)) == "user"  # control tokens vanish
    assert smollm2.decode(smollm2.encode(text), special=True) == text


def test_bos_not_added_when_vocabulary_says_no(smollm2: Tokenizer) -> None:
    assert smollm2.encode("Hello") == smollm2.encode("Hello", add_special=False)


def test_bos_added_when_vocabulary_asks(spm: Tokenizer) -> None:
    with_bos = spm.encode("hello world")
    without = spm.encode("hello world", add_special=False)
    assert with_bos[0] == spm.bos
    assert with_bos[1:] == without
    assert spm.bos not in without
    assert spm.decode(with_bos) == " hello world"  # SentencePiece's prefix space stays
    assert spm.decode(with_bos, special=True) == "<s> hello world"
    assert spm.encode("") == [spm.bos]


def test_end_of_generation(smollm2: Tokenizer) -> None:
    assert smollm2.eos is not None and smollm2.eot is not None
    assert smollm2.is_end_of_generation(smollm2.eos)
    assert smollm2.is_end_of_generation(smollm2.eot)
    assert not smollm2.is_end_of_generation(smollm2.bos)
    assert not any(smollm2.is_end_of_generation(t) for t in smollm2.encode("Paris."))


def test_end_of_generation_spm(spm: Tokenizer) -> None:
    assert spm.eos is not None and spm.is_end_of_generation(spm.eos)
    assert not spm.is_end_of_generation(spm.bos)


@pytest.mark.parametrize("bad", [-1, 49152, 10**9])
def test_token_ids_outside_vocabulary_raise(smollm2: Tokenizer, bad: int) -> None:
    with pytest.raises(TokenIdError, match=f"token id {bad} is outside"):
        smollm2.decode([504, bad])
    with pytest.raises(TokenIdError):
        smollm2.piece(bad)


def test_long_piece_retries_with_larger_buffer(smollm2: Tokenizer) -> None:
    longest = max(range(smollm2.n_vocab), key=lambda t: len(smollm2.piece(t)))
    assert len(smollm2.piece(longest)) > 64  # longer than the first buffer
    assert smollm2.encode(smollm2.decode([longest]), parse_special=False) == [longest]


# --- streaming -------------------------------------------------------------------------


def test_stream_holds_split_emoji(smollm2: Tokenizer) -> None:
    tokens = smollm2.encode(EMOJI_TEXT)
    pieces = [smollm2.piece(t) for t in tokens]
    split = [i for i, p in enumerate(pieces) if not _is_utf8(p)]
    assert split, "the emoji must be split across tokens for this test to mean anything"
    chunks = stream(smollm2, tokens)
    assert "".join(chunks) == smollm2.decode(tokens) == EMOJI_TEXT
    assert all("\ufffd" not in c for c in chunks)
    assert chunks[split[0]] == " "  # the emoji's first bytes are held back
    assert "😀" in chunks[split[0] + 1]


def test_stream_flushes_unfinished_character(smollm2: Tokenizer) -> None:
    tokens = smollm2.encode("ok 😀")
    assert not _is_utf8(smollm2.piece(tokens[-2]))
    chunks = stream(smollm2, tokens[:-1])  # generation stopped mid-character
    assert chunks[-1] == "\ufffd"
    assert "".join(chunks) == smollm2.decode(tokens[:-1])


def test_stream_continues_decoded_prompt_spm(spm: Tokenizer) -> None:
    """Byte-fallback tokens, and no space dropped from the first generated word."""
    prompt = spm.encode("the capital is")
    generated = spm.encode(" paris 😀 ok", add_special=False)
    assert len(generated) > len(" paris 😀 ok".encode()) - 8  # emoji came as 4 byte tokens
    chunks = stream(spm, generated)
    assert spm.decode(prompt) + "".join(chunks) == spm.decode(prompt + generated)
    assert all("\ufffd" not in c for c in chunks)


def test_stream_special_tokens(smollm2: Tokenizer) -> None:
    tokens = smollm2.encode("<|im_start|>user\nhi<|im_end|>")
    assert "".join(stream(smollm2, tokens)) == "user\nhi"
    assert "".join(stream(smollm2, tokens, special=True)) == "<|im_start|>user\nhi<|im_end|>"


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=40))
def test_stream_equals_decode_for_any_text(smollm2: Tokenizer, text: str) -> None:
    tokens = smollm2.encode(text, parse_special=False)
    chunks = stream(smollm2, tokens)
    decoded = smollm2.decode(tokens)
    for chunk in chunks:
        chunk.encode("utf-8")  # valid: no lone surrogates
        assert "\ufffd" not in chunk or "\ufffd" in decoded
    assert "".join(chunks) == decoded


# SmolLM2's vocabulary lacks the byte tokens of a few C0 controls and of 0xF1 and 0xF2, the
# UTF-8 lead bytes of the unassigned planes 4-13: llama.cpp drops such bytes when encoding.
_ENCODABLE = st.characters(max_codepoint=0x3FFFF, include_characters="\n\t",
                           exclude_categories=("Cc", "Cs", "Co", "Cn"))


@settings(max_examples=150, deadline=None)
@given(st.text(_ENCODABLE, max_size=40))
def test_round_trip_property(smollm2: Tokenizer, text: str) -> None:
    assert smollm2.decode(smollm2.encode(text, parse_special=False)) == text


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# --- stop strings ----------------------------------------------------------------------


def test_stop_spanning_chunks() -> None:
    matcher = StopMatcher(["<|end|>", "\nUser:"])
    assert matcher.feed("Paris is the capital <|e") == ("Paris is the capital ", False)
    assert matcher.feed("nd") == ("", False)
    assert matcher.feed("|> and more") == ("", True)
    assert matcher.stop == "<|end|>"
    assert matcher.feed("ignored") == ("", True)
    assert matcher.flush() == ""


def test_held_prefix_released_when_not_a_stop() -> None:
    matcher = StopMatcher(["\nUser:"])
    assert matcher.feed("one\nUs") == ("one", False)
    assert matcher.feed("ually two") == ("\nUsually two", False)
    assert matcher.feed("\n") == ("", False)
    assert matcher.flush() == "\n"
    assert not matcher.stopped


def test_first_completed_stop_wins() -> None:
    matcher = StopMatcher(["world", "lo w"])
    assert matcher.feed("hello world") == ("hel", True)
    assert matcher.stop == "lo w"
    for chunks in (["baa"], ["ba", "a"]):  # "a" ends before "baa" however the text is cut
        assert _run_stops(["baa", "a"], chunks) == ("b", "a")


def test_no_stops_passes_text_through() -> None:
    matcher = StopMatcher([])
    assert matcher.feed("anything") == ("anything", False)


def test_empty_stop_string_rejected() -> None:
    with pytest.raises(ValueError, match="empty stop string"):
        StopMatcher(["ok", ""])


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(alphabet="abc", max_size=30),
    stops=st.lists(st.text(alphabet="ab", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=8),
)
def test_stop_matcher_property(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    chunks = [text[a:b] for a, b in itertools.pairwise(bounds)]
    emitted, stop = _run_stops(stops, chunks)
    assert (emitted, stop) == _run_stops(stops, [text])  # however the text was cut
    assert not any(s in emitted for s in stops)
    if stop is not None:
        assert text.startswith(emitted + stop)
        assert len(emitted + stop) == min(text.find(s) + len(s) for s in stops if s in text)
    else:
        assert emitted == text
        assert not any(s in text for s in stops)


def _run_stops(stops: list[str], chunks: list[str]) -> tuple[str, str | None]:
    """Emitted text (plus what flush() releases when no stop came) and the stop found."""
    matcher = StopMatcher(stops)
    emitted = ""
    for chunk in chunks:
        out, stopped = matcher.feed(chunk)
        emitted += out
        if stopped:
            return emitted, matcher.stop
    return emitted + matcher.flush(), None


# --- chat templates --------------------------------------------------------------------


def test_chat_template_system_user(smollm2: Tokenizer) -> None:
    prompt = smollm2.apply_chat_template(CONVERSATION)
    positions = [prompt.index(m["content"]) for m in CONVERSATION]
    assert positions == sorted(positions)
    assert prompt.index("system") < positions[0] < prompt.index("user") < positions[1]
    assert prompt.endswith("<|im_start|>assistant\n")
    closed = smollm2.apply_chat_template(CONVERSATION, add_generation_prompt=False)
    assert closed.endswith("<|im_end|>\n")
    assert prompt.startswith(closed)


def test_builtin_and_jinja_rendering_agree(smollm2: Tokenizer) -> None:
    assert smollm2.chat_template is not None
    for add in (True, False):
        builtin = smollm2.apply_chat_template(CONVERSATION, add_generation_prompt=add)
        jinja = render_jinja(smollm2.chat_template, CONVERSATION, add_generation_prompt=add)
        assert builtin == jinja


def test_jinja_fallback_for_unknown_template(smollm2: Tokenizer) -> None:
    template = ("{{ bos_token }}{% for m in messages %}[{{ m.role | upper }}] {{ m.content }}"
                "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[ASSISTANT] {% endif %}")
    prompt = smollm2.apply_chat_template(CONVERSATION, template=template)
    assert prompt == ("<|im_start|>[SYSTEM] You answer in one word.<|im_end|>"
                      "[USER] What is the capital of France?<|im_end|>[ASSISTANT] ")


def test_template_raise_exception(smollm2: Tokenizer) -> None:
    template = ("{% if messages[0].role != 'user' %}"
                "{{ raise_exception('Conversations must start with the user') }}{% endif %}")
    with pytest.raises(ChatTemplateError, match="must start with the user"):
        smollm2.apply_chat_template(CONVERSATION, template=template)


def test_template_sandboxed(smollm2: Tokenizer) -> None:
    with pytest.raises(ChatTemplateError, match="failed"):
        smollm2.apply_chat_template(CONVERSATION, template="{{ messages.append(1) }}")


@pytest.mark.parametrize("messages", [[], [{"role": "user"}], [{"role": "user", "content": 3}]])
def test_bad_messages(smollm2: Tokenizer, messages: list) -> None:
    with pytest.raises(ChatTemplateError, match="message"):
        smollm2.apply_chat_template(messages)


def test_no_chat_template(spm: Tokenizer) -> None:
    with pytest.raises(NoChatTemplateError, match="raw prompt") as info:
        spm.apply_chat_template(CONVERSATION)
    assert info.value.path == spm.path
    assert str(spm.path) in str(info.value)


def test_encode_chat_single_bos(smollm2: Tokenizer, spm: Tokenizer) -> None:
    tokens = smollm2.encode_chat(CONVERSATION)
    assert tokens == smollm2.encode(smollm2.apply_chat_template(CONVERSATION))
    assert smollm2.decode(tokens, special=True) == smollm2.apply_chat_template(CONVERSATION)
    assert smollm2.decode(tokens[-4:], special=True) == "<|im_start|>assistant\n"
    template = "{{ bos_token }}{% for m in messages %}{{ m.content }} {% endfor %}"
    prompt = spm.apply_chat_template(CONVERSATION, template=template)
    assert prompt.startswith("<s>")
    assert spm.encode(prompt, add_special=False).count(spm.bos) == 1


# --- files and lifetime ----------------------------------------------------------------


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.gguf"
    path.write_text("These are my notes, not a model.\n" * 10)
    with pytest.raises(NotGGUFError) as info:
        Tokenizer.from_gguf(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", ["missing.gguf", "."])
def test_missing_file_or_directory(tmp_path: Path, name: str) -> None:
    with pytest.raises(NotGGUFError, match=str(tmp_path)):
        Tokenizer.from_gguf(tmp_path / name)


def test_truncated_gguf(tmp_path: Path, smollm2_path: Path) -> None:
    path = tmp_path / "cut.gguf"
    with smollm2_path.open("rb") as f:
        path.write_bytes(f.read(100_000))  # ends inside the vocabulary array
    with pytest.raises(GGUFError, match=r"cut\.gguf"):
        Tokenizer.from_gguf(path)


def test_close_frees_and_refuses_use(smollm2_path: Path) -> None:
    tok = Tokenizer.from_gguf(smollm2_path)
    finalizer = tok._finalizer
    with tok:
        assert tok.encode("hi")
    assert tok.closed and not finalizer.alive
    tok.close()  # twice is fine
    with pytest.raises(ValueError, match="closed"):
        tok.encode("hi")
    with pytest.raises(ValueError, match="closed"):
        tok.decode([1])


def test_garbage_collection_frees(smollm2_path: Path) -> None:
    finalizer = Tokenizer.from_gguf(smollm2_path)._finalizer
    gc.collect()
    assert not finalizer.alive
