"""A new request before it is queued: its :class:`~.sequence.Sequence` (prompt tokens, its own RNG, its
detokenizer) and why it cannot run, which ends it with ``"error"`` at once rather than raising."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..protocol import CausalLM
from .detokenizer import Detokenizer
from .prompts import Prompt, prompt_ids
from .request_adapters import adapter_error, merged_refusal
from .sampling import SamplingParams, request_generator
from .sequence import Sequence as Seq

if TYPE_CHECKING:
    import torch


def new_sequence(
    rid: int, prompt: Prompt, sampling: SamplingParams, index: int, *, tokenizer: Any, chat_template: bool,
    vocab_size: int, device: torch.device,
) -> tuple[Seq, str | None]:  # fmt: skip
    """Request ``rid``'s sequence, and the error of a prompt that cannot be tokenized (its prompt is then empty)."""
    error = None
    try:
        ids = prompt_ids(prompt, tokenizer, chat_template, vocab_size)
    except ValueError as exc:
        ids, error = [], str(exc)
    seq = Seq(rid, ids, sampling, index=index, generator=request_generator(sampling, device))
    seq.detok = Detokenizer(tokenizer, ids, sampling.stop)
    return seq, error


def refusal(model: CausalLM, tokenizer: Any, sampling: SamplingParams) -> str | None:
    """Why ``sampling`` cannot run on ``model`` (``None`` when it can): stop strings without a tokenizer (there is
    no text to find them in: never ignored), an adapter it cannot use (:func:`.request_adapters.adapter_error`), or
    ``adapter=False`` (the base alone) while adapters are merged into the base."""
    if sampling.stop and tokenizer is None:
        return (f"stop strings {list(sampling.stop)} need a tokenizer to find them in the text, and this model "
                f"has none; give stop_token_ids, or wrap the model with its tokenizer")
    if isinstance(sampling.adapter, str):
        return adapter_error(model, sampling.adapter)
    if sampling.adapter is False:  # the base alone: not while an adapter is merged into it
        return merged_refusal(model, False)
    return None  # None runs whatever the model has


__all__ = ["new_sequence", "refusal"]
