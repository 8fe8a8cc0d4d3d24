"""Prompt log-probabilities (``SamplingParams.prompt_logprobs``, vLLM's): which rows of a step's flat batch give them,
and recording them on their requests.

The logits at position ``p`` of a prompt are the model's distribution of token ``p + 1``, so a prompt chunk covering
positions ``[start, start + length)`` gives the log-probabilities of prompt tokens ``start + 1`` to
``start + length`` (the last prompt position's logits are the first generated token's, which the sampler takes). Each
token's entry is recorded once: a request preempted part way through its prompt recomputes it (the scheduler gives it
no prefix-cache block until every entry is in) and skips what it has.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from .sampler import token_logprobs

if TYPE_CHECKING:
    from .runner import StepInput
    from .scheduler import Batch
    from .sequence import Sequence

PromptRow = tuple["Sequence", int, int]  # (request, prompt token index from 1, row of the step's flat batch)


def prompt_rows(batch: Batch) -> list[PromptRow]:
    """The rows of ``batch``'s flat token list whose logits give a prompt token's log-probability its request still
    lacks, in flat order."""
    rows: list[PromptRow] = []
    offset = 0  # the chunk's first row in the flat batch
    for chunk in batch.chunks:
        seq = chunk.seq
        if seq.needs_prompt_logprobs:
            end = min(chunk.start + chunk.length, len(seq.prompt_ids) - 1)  # positions whose next token is a prompt one
            rows += [(seq, p + 1, offset + p - chunk.start) for p in range(chunk.start, end)
                     if p + 1 not in seq.prompt_logprobs]  # fmt: skip
        offset += chunk.length
    return rows


def with_prompt_rows(step: StepInput, batch: Batch) -> tuple[StepInput, list[PromptRow]]:
    """``step`` (built from ``batch``) with :func:`prompt_rows` appended to its logit rows (``extra_rows``), and them."""
    extra = prompt_rows(batch)
    if not extra:
        return step, extra
    return replace(step, rows=step.rows + [row for *_, row in extra], extra_rows=len(extra)), extra


def take(rows: list[PromptRow], logits: torch.Tensor) -> torch.Tensor:  # [sampled + len(rows), V] -> [sampled, V]
    """Store on each request of ``rows`` the log-probability of its prompt token (the logits' last ``len(rows)``
    rows) and the alternatives it asked for; return the sampled rows' logits."""
    if not rows:
        return logits
    sampled = logits.shape[0] - len(rows)
    targets = torch.tensor([seq.prompt_ids[j] for seq, j, _ in rows], dtype=torch.long)  # [E]
    wanted = [seq.params.prompt_logprobs for seq, _, _ in rows]
    for (seq, j, _), entry in zip(rows, token_logprobs(logits[sampled:], targets, wanted)):
        seq.prompt_logprobs[j] = entry
    return logits[:sampled]


__all__ = ["PromptRow", "prompt_rows", "take", "with_prompt_rows"]
