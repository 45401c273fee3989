"""StepBatch: what one model step computes, handed from the scheduler to a runner (the role of
vLLM's SchedulerOutput). Sequences sit back to back in one flat row of tokens."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepBatch:
    token_ids: list[int]           # [N] the new tokens of every sequence, back to back
    query_lens: list[int]          # per sequence: tokens it appends this step (sum = N)
    start_positions: list[int]     # per sequence: positions already cached, where its chunk starts
    block_tables: list[list[int]]  # per sequence: physical KV block of each logical block (the live
    #                                tables, blocks for the new positions already reserved)
    logit_rows: list[int]          # flat rows (0..N-1) whose logits run() returns, in this order
    num_draft_tokens: list[int]    # per sequence: how many tokens at the end of its chunk are draft
    #                                (speculative) tokens to verify; 0 until a proposer fills them

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @classmethod
    def single(cls, token_ids: list[int], start: int, block_table: list[int], logit_rows: list[int]) -> "StepBatch":
        """One sequence's chunk (a prompt piece or a decode token)."""
        return cls(token_ids, [len(token_ids)], [start], [block_table], logit_rows, [0])
