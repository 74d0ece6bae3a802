"""A session's prompt on its way down the pipeline.

A prompt goes in chunks, all in flight at once; the last one asks for the first token.
Two requests change that:

* prompt logprobs (``Session.score_prompt``): the last stage scores every row of every
  chunk, so each chunk is at most its ``output_rows`` long and each one's result comes
  back; a chunk's last row scores the next chunk's first token (``next_token``).
* n answers to one prompt (``share``): the first session sends all but the prompt's last
  token, and every stage copies that KV cache to the other sessions (``copy_to``); then
  each session sends the last token itself, with its own sampling parameters (its seed),
  and samples its first token from that row. The copies wait until the prompt is sent, so
  their chunks reach every stage after the copy; if it never was, they send it whole.
"""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.pipeline.datapath import DataPath
from orchestrator.pipeline.sessionstate import PromptShare, Session


def cut(prompt: Sequence[int], size: int) -> list[tuple[int, ...]]:
    """``prompt`` in chunks of ``size`` tokens (the last one shorter)."""
    return [tuple(prompt[s:s + size]) for s in range(0, len(prompt), size)]


def share(prompt: Sequence[int], size: int, sessions: Sequence[Session]) -> None:
    """Give ``sessions`` their prompt chunks: the first sends the prompt and the others
    copy its KV cache (a prompt of one token has nothing to copy: each sends it)."""
    if len(sessions) == 1 or len(prompt) < 2:
        for session in sessions:
            session.prompt_chunks = cut(prompt, size)
        return
    chunks = [*cut(prompt[:-1], size), (prompt[-1],)]
    shared = PromptShare()
    head, *rest = sessions
    head.prompt_chunks, head.copy_to, head.share = list(chunks), tuple(s.id for s in rest), \
        shared
    for session in rest:
        session.prompt_chunks, session.copied, session.share = list(chunks), len(chunks) - 1, \
            shared


def send(path: DataPath, session: Session, *, want_token: bool, ring_left: int,
         stops: Sequence[int], draft_k: int, draft_ahead: bool = False) -> list[int]:
    """Send the prompt chunks ``session`` has not got by a copy; returns the numbers of the
    chunks whose results come back, in order (the last chunk's, and with prompt logprobs
    every one's)."""
    chunks, first = session.prompt_chunks, session.copied
    start = sum(len(c) for c in chunks[:first])
    answered = []
    for i in range(first, len(chunks)):
        part, last = chunks[i], i + 1 == len(chunks)
        copy_to = session.copy_to if i + 2 == len(chunks) else ()
        number = path.send(
            session.id, start, part, want_token=want_token and last,
            sampling=session.sampling if i == first else None,
            ring_left=ring_left if last else 0, ring_stops=stops,
            draft_k=draft_k if last else 0, draft_ahead=draft_ahead,
            score_rows=session.score_prompt,
            next_token=chunks[i + 1][0] if session.score_prompt and not last else None,
            copy_to=copy_to)
        if copy_to:
            session.share.finish(sent=True)
        if last or session.score_prompt:
            answered.append(number)
        start += len(part)
    return answered


def wait_for_share(session: Session, deadline_s: float) -> None:
    """A copy waits until the prompt it copies is sent; without it, it sends it whole."""
    if session.share is None or not session.copied:
        return
    if not session.share.done.wait(deadline_s) or not session.share.sent:
        session.copied = 0


def unshare(sessions: Sequence[Session]) -> None:
    """On a new pipeline (failover) nothing is copied: each session sends its own prompt."""
    for session in sessions:
        session.copied, session.copy_to = 0, ()
        if session.share is not None:
            session.share.finish(sent=False)
