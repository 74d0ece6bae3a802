"""Speculative decoding: several tokens per pass through the stages.

A drafter proposes the next k tokens cheaply (``drafters``); the target model scores the
pending token and the k drafts in one verification batch, logits for every row
(``StageEngine.forward(..., all_logits=True)``); the rule in ``accept`` keeps the longest
acceptable prefix plus one token of the target's own, so the output is exactly the
target's (greedy: bit for bit; sampled: in distribution); every stage then drops the
rejected positions (``StageEngine.rollback``). ``cost`` predicts whether that pays on this
machine and picks k, or turns speculation off; ``decode`` is the loop over one session.
"""
