"""A new request before it is queued: its :class:`~.sequence.Sequence` (prompt tokens, its own RNG, its
detokenizer) and why it cannot run, which ends it with ``"error"`` at once rather than raising."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..protocol import CausalLM
from .detokenizer import Detokenizer
from .prompts import Prompt, prompt_ids
from .request_adapters import adapter_error
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
    no text to find them in: never ignored), or an adapter it cannot use (:func:`.request_adapters.adapter_error`)."""
    if sampling.stop and tokenizer is None:
        return (f"stop strings {list(sampling.stop)} need a tokenizer to find them in the text, and this model "
                f"has none; give stop_token_ids, or wrap the model with its tokenizer")
    if isinstance(sampling.adapter, str):  # None and False (the base alone) run whatever the model has
        return adapter_error(model, sampling.adapter)
    return None


__all__ = ["new_sequence", "refusal"]
