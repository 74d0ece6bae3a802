"""Stage 0's batching policy and the token ring's rules, without gRPC or engines."""

from __future__ import annotations

from dataclasses import replace

import pytest

from orchcore.chunks import Chunk, ChunkError, Rows, StageTiming
from orchcore.sampling import SamplingParams
from orchcore.speculation.accept import Verdict
from orchestrator.pipeline.ring import TokenRing
from worker.batching import MERGE_WAIT_MAX_S, STRAGGLER_WAIT_S, BatchPolicy
from worker.publish import results_for
from worker.ring import RingFeed, next_step, ring_draft_room


def step(session: str, pos: int = 5, **fields: object) -> Chunk:
    return Chunk(pipeline_id="p", session=session, start_pos=pos, tokens=(7,),
                 want_token=True, **fields)


@pytest.mark.parametrize(("chunk", "held", "why"), [
    (step("a", pos=5), 4, "not at the position the stage holds"),
    (step("a", pos=0), 0, "a session's first chunk"),
    (step("a", pos=100), 100, "at the end of the context"),
    (step("a", sampling=SamplingParams()), 5, "carries sampling parameters"),
    (step("a", error=ChunkError("compute", "x", "w")), 5, "failed already"),
    (step("a", hidden=Rows("f32", 1, 1, bytes(4))), 5, "carries hidden rows"),
    (step("a", end_session=True), 5, "ends its session"),
    (step("a", batched=(step("b"),)), 5, "is a batch already"),
    (Chunk(pipeline_id="p", session="a", start_pos=5, tokens=(1, 2)), 5, "two tokens"),
    (Chunk(pipeline_id="p", session="a", start_pos=5, tokens=(1, 2), drafted=1,
           want_token=True), 5, "a verification chunk"),
    (step("a", pos=5), 7, "below the held position: it rolls back a verdict's rejects"),
])
def test_only_a_plain_decode_step_at_the_held_position_is_batchable(chunk, held, why):
    policy = BatchPolicy(limit=4, stages=2, context_tokens=100)
    assert policy.batchable(step("a"), 5), "a plain decode step"
    assert not policy.batchable(chunk, held), why


def test_a_stage_that_does_not_form_batches_batches_nothing():
    assert not BatchPolicy(limit=1, stages=2, context_tokens=100).batchable(step("a"), 5)


def test_a_batch_size_not_run_yet_is_tried_then_the_cheapest_round_wins():
    policy = BatchPolicy(limit=8, stages=2, context_tokens=100)
    # 4 live sessions over 1 or 2 batches: sizes 4 and 2, neither timed: the smaller
    assert policy.size(4) == 2
    policy.timed(Chunk("p", "a", tokens=(1,), batched=(step("b"),)), 0.010)
    assert policy.size(4) == 4, "size 4 not timed yet: free, so tried"
    policy.timed(Chunk("p", "a", tokens=(1,), batched=tuple(step(s) for s in "bcd")), 0.030)
    assert policy.size(4) == 2, "a batch of 4 costs 30 ms, one of 2 costs 10 ms"
    assert policy.size(20) == 8, "never more than the limit"


def test_costs_are_smoothed_and_failed_or_prompt_chunks_do_not_count():
    policy = BatchPolicy(limit=8, stages=1, context_tokens=100)
    policy.timed(step("a"), 0.010)
    policy.timed(step("a"), 0.020)
    policy.timed(step("a", error=ChunkError("compute", "x", "w")), 9.0)
    policy.timed(Chunk("p", "a", tokens=(1, 2, 3)), 9.0)
    assert policy._batch_s == {1: pytest.approx(0.013)}


def test_the_wait_is_short_unless_every_stage_has_a_batch_out():
    policy = BatchPolicy(limit=8, stages=2, context_tokens=100)
    assert policy.open("a", queued=0, now=1.0) == (1, STRAGGLER_WAIT_S)
    policy.sent(["a", "b"], now=1.0)
    take, wait = policy.open("c", queued=1, now=1.0)
    assert (take, wait) == (2, STRAGGLER_WAIT_S), "one batch out; a, b, c and one queued"
    policy.sent(["c"], now=1.0)
    policy.sent(["d"], now=1.0)
    policy.ended("d", now=1.02)  # its batch came back after 20 ms; two are still out
    _, wait = policy.open("e", queued=0, now=1.02)
    assert wait == pytest.approx(0.02), "a batch out per stage: wait up to a round trip"
    policy.in_flight.round_trip_s = 5.0
    _, wait = policy.open("e", queued=0, now=1.02)
    assert wait == MERGE_WAIT_MAX_S


def test_a_step_joins_a_batch_once_per_session_and_is_back_when_it_joins():
    policy = BatchPolicy(limit=8, stages=1, context_tokens=100)
    policy.sent(["b"], now=1.0)
    assert not policy.joins(step("a"), 5, ["a"], now=1.01), "its session is in the batch"
    assert not policy.joins(step("b"), 4, ["a"], now=1.01), "not at the held position"
    assert policy.in_flight.busy(1.01) == (1, 1)
    assert policy.joins(step("b"), 5, ["a"], now=1.01)
    assert policy.in_flight.busy(1.01) == (0, 0) and policy.in_flight.round_trip_s == \
        pytest.approx(0.01)


def test_the_ring_goes_on_with_the_next_chunk_until_a_stop_or_its_end():
    sent = Chunk("p", "s", chunk=3, start_pos=10, tokens=(1, 2), want_token=True,
                 ring_left=2, ring_stops=(0,))
    nxt = next_step(sent, Verdict(0, 42))
    assert nxt == Chunk("p", "s", chunk=4, start_pos=12, tokens=(42,), want_token=True,
                        ring_left=1, ring_stops=(0,))
    assert next_step(sent, Verdict(0, 0)) is None, "a stop token"
    assert next_step(sent, Verdict(0, -1)) is None, "no token sampled"
    last = next_step(nxt, Verdict(0, 5))
    assert last.ring_left == 0 and next_step(last, Verdict(0, 6)) is None


def test_the_ring_carries_drafts_and_counts_every_token_a_verdict_adds():
    sent = Chunk("p", "s", chunk=3, start_pos=10, tokens=(1, 2, 3, 4), want_token=True,
                 drafted=3, draft_k=3, ring_left=6, ring_stops=(0,))
    kept_two = Verdict(2, 9)  # pending 1 at 10, drafts 2 and 3 kept (11, 12), 9 is new
    assert ring_draft_room(sent, kept_two, context_tokens=64, batch_tokens=8) == 3
    nxt = next_step(sent, kept_two, (5, 6, 7))
    assert nxt == Chunk("p", "s", chunk=4, start_pos=13, tokens=(9, 5, 6, 7),
                        want_token=True, drafted=3, draft_k=3, ring_left=3, ring_stops=(0,))
    assert ring_draft_room(nxt, Verdict(3, 8), 64, 8) == 0, "the answer's last token"
    assert next_step(nxt, Verdict(3, 8)) is None, "four tokens would overshoot three left"
    assert next_step(nxt, Verdict(1, 8)).ring_left == 1
    assert next_step(sent, Verdict(3, 0)) is None, "a stop among the tokens added"
    assert ring_draft_room(sent, kept_two, context_tokens=15, batch_tokens=8) == 1, \
        "positions stop before the context's end"
    assert ring_draft_room(sent, kept_two, context_tokens=64, batch_tokens=3) == 2, \
        "every row in one forward"
    assert ring_draft_room(replace(sent, draft_k=0), kept_two, 64, 8) == 0


def test_the_orchestrators_ring_follows_the_same_numbers():
    left = TokenRing.length(True, limit=4, generated=0)
    assert left == 3 and TokenRing.numbers(left) == 4
    assert TokenRing.length(False, limit=4, generated=0) == 0
    ring = TokenRing.after(7, left, added=1, stopped=False)
    assert ring == TokenRing(8, 2)
    assert TokenRing.after(7, left, added=1, stopped=True) is None
    assert TokenRing.after(9, 0, added=1, stopped=False) is None
    assert TokenRing.after(7, left, added=3, stopped=False) == TokenRing(8, 0)
    assert TokenRing.after(7, left, added=4, stopped=False) is None


def test_a_batch_gets_a_result_for_each_step_that_asks_and_all_see_its_error():
    timing = (StageTiming(0, 1.0),)
    batch = Chunk("p", "a", chunk=1, tokens=(1,), want_token=True, timings=timing,
                  batched=(Chunk("p", "b", chunk=2, tokens=(2,)),
                           Chunk("p", "c", chunk=3, tokens=(3,), want_token=True)))
    got = results_for(batch, [Verdict(0, 10), Verdict(0, -1), Verdict(0, 30)])
    assert [(r.session, r.token, r.batch) for r in got] == [
        ("a", 10, (1, 2, 3)), ("c", 30, (1, 2, 3))]
    assert all(r.timings == timing for r in got)
    failed = batch.failed(ChunkError("compute", "x", "w"))
    verified = Chunk("p", "d", chunk=4, tokens=(1, 2, 3), drafted=2, want_token=True)
    (judged,) = results_for(verified, [Verdict(1, 7)])
    assert (judged.drafts, judged.accepted, judged.tokens) == ((2, 3), 1, (2, 7))
    assert [r.session for r in results_for(failed, [])] == ["a", "b", "c"]
    assert all(r.token == -1 and r.error.code == "compute" for r in results_for(failed, []))


class _Link:
    """What a ring link was asked to send, in order."""

    def __init__(self) -> None:
        self.sent: list[Chunk] = []

    def send(self, chunk: Chunk) -> None:
        self.sent.append(chunk)

    def close(self) -> None:
        pass


def _feed() -> tuple[RingFeed, _Link]:
    link = _Link()
    feed = RingFeed(1, is_first=False, is_last=True, ring_address="stage0:1",
                    link=lambda _address: link, home=lambda _chunk: None)  # type: ignore
    return feed, link


def test_a_step_sent_ahead_is_not_sent_again_when_its_bet_wins():
    feed, link = _feed()
    sent = Chunk("p", "s", chunk=3, start_pos=10, tokens=(1, 2, 3), want_token=True,
                 drafted=2, draft_k=2, draft_ahead=True, ring_left=8)
    assert feed.can_send_ahead(sent)
    bet = Verdict(2, 4)  # both drafts kept, then 4
    feed.send_ahead(next_step(sent, bet, (5, 6)))
    assert link.sent[-1].ahead and link.sent[-1].start_pos == 13
    assert not feed.can_send_ahead(sent), "as many bets in flight as stages before this one"
    feed.send(sent, bet, (5, 6))
    assert len(link.sent) == 1, "the step on its way is the verdict's own"
    assert not feed.stale(link.sent[0]), "it is computed when it comes"
    assert feed.can_send_ahead(link.sent[0]), "which bets on its own successor in turn"


def test_bets_chain_over_three_stages_and_a_lost_one_takes_the_later_ones_with_it():
    link = _Link()
    feed = RingFeed(2, is_first=False, is_last=True, ring_address="stage0:1",
                    link=lambda _address: link, home=lambda _chunk: None,  # type: ignore
                    depth=2)
    sent = Chunk("p", "s", chunk=3, start_pos=10, tokens=(1, 2), want_token=True,
                 drafted=1, draft_k=1, draft_ahead=True, ring_left=8)
    for _ in range(8):
        feed._score("s", won=True)  # a session whose bets have been winning
    first = next_step(sent, Verdict(1, 3), (4,))
    feed.send_ahead(first)
    assert feed.can_send_ahead(sent), "two stages before this one: two bets"
    second = next_step(first, Verdict(1, 5), (6,))
    feed.send_ahead(second)
    assert not feed.can_send_ahead(sent)
    assert [b.chunk for b in feed.bets("s")] == [4, 5]
    feed.send(sent, Verdict(1, 3), (4,))  # the first bet won
    assert len(link.sent) == 2 and [b.chunk for b in feed.bets("s")] == [5]
    lost = Verdict(0, 9)
    feed.send(replace(first, ahead=True), lost, ())  # the second bet lost
    _, ahead_second, real = link.sent
    assert real == next_step(first, lost, ()) and real.chunk == 5 and not real.ahead
    assert feed.bets("s") == []
    assert feed.stale(ahead_second), "the lost bet comes first and is dropped"
    assert not feed.stale(real), "then the real step"
    for _ in range(8):
        feed._score("s", won=True)
    assert feed.send_ahead(first) and feed.send_ahead(second)
    feed.send(sent, lost, ())  # again, lost at once: both bets of the chain stale
    assert feed.stale(replace(first, ahead=True))
    assert not feed.stale(replace(first, ahead=False)), "the real step came: marks cleared"
    assert not feed.stale(ahead_second), "skipped on the way, its number is a new bet's now"


@pytest.mark.parametrize(("verdict", "drafts"), [
    (Verdict(1, 9), (5, 6)),  # a draft rejected: the real step starts lower
    (Verdict(2, 7), (5, 6)),  # every draft kept, but another token than the guess
    (Verdict(2, 4), (5,)),  # the guess right, but the lookup drafts otherwise from there
])
def test_a_step_sent_ahead_of_a_lost_bet_is_dropped_and_the_real_one_follows(verdict, drafts):
    feed, link = _feed()
    sent = Chunk("p", "s", chunk=3, start_pos=10, tokens=(1, 2, 3), want_token=True,
                 drafted=2, draft_k=2, draft_ahead=True, ring_left=8)
    feed.send_ahead(next_step(sent, Verdict(2, 4), (5, 6)))
    feed.send(sent, verdict, drafts)
    ahead, real = link.sent
    assert real == next_step(sent, verdict, drafts) and not real.ahead
    assert real.chunk == ahead.chunk, "the real step takes the number the bet took"
    assert feed.stale(ahead), "the lost bet is dropped when it arrives"
    assert not feed.stale(real) and not feed.stale(ahead), "only once, and never the real one"


def test_no_step_goes_ahead_without_a_ring_drafts_or_the_ask():
    feed, _ = _feed()
    ring = Chunk("p", "s", chunk=3, start_pos=10, tokens=(1,), want_token=True, draft_k=2,
                 draft_ahead=True, ring_left=8)
    assert feed.can_send_ahead(ring), "a ring step without drafts bets on the guess alone"
    for why in (replace(ring, draft_ahead=False), replace(ring, draft_k=0),
                replace(ring, ring_left=0), replace(ring, want_token=False),
                replace(ring, batched=(ring,))):
        assert not feed.can_send_ahead(why)
    home, _ = RingFeed(0, is_first=True, is_last=True, ring_address="self:1",
                       link=lambda _a: _Link(), home=lambda _c: None), None  # type: ignore
    assert not home.can_send_ahead(ring), "a lone stage has nothing to overlap"
    policy, plain = BatchPolicy(4, 2, 64), replace(ring, draft_k=0)
    assert policy.batchable(plain, 10)
    assert not policy.batchable(replace(plain, ahead=True), 10), \
        "a step sent ahead is never batched: the last stage may drop it"


def test_bets_stop_while_they_lose_and_come_back_when_they_would_have_won():
    """A lost bet is not free (the real step waits behind it at stage 0): a session whose
    bets lose stops betting; the bets it does not place are still scored against the
    verdicts, and when they would have won, betting resumes."""
    feed, link = _feed()
    sent = Chunk("p", "s", chunk=3, start_pos=10, tokens=(1, 2), want_token=True,
                 drafted=1, draft_k=1, draft_ahead=True, ring_left=50)
    bet = next_step(sent, Verdict(1, 3), (4,))
    assert feed.send_ahead(bet), "even odds at first: one bet"
    feed.send(sent, Verdict(0, 9), ())  # lost
    assert not feed.send_ahead(bet), "after a loss, no bet"
    assert len(link.sent) == 2  # the bet and the real step
    feed.send(sent, Verdict(1, 3), (4,))  # the bet not placed would have won
    assert len(link.sent) == 3, "the real step goes, since no bet was placed"
    assert feed.send_ahead(bet), "it would have won: betting again"
