"""A new request before it is queued: its :class:`~.sequence.Sequence` (prompt tokens, its own RNG, its
detokenizer) and why it cannot run, which ends it with ``"error"`` at once rather than raising; :func:`admit`
does both for :meth:`.engine.Generator.add_request`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..protocol import CausalLM
from .detokenizer import Detokenizer
from .prompts import Prompt, prompt_ids
from .request_adapters import adapter_error, adapter_key, merged_refusal
from .sampling import SamplingParams, is_int, request_generator
from .sequence import Sequence as Seq

if TYPE_CHECKING:
    import torch

    from .engine import Generator


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
    seq.detok = Detokenizer(tokenizer, ids, sampling.stop, sampling.include_stop_str_in_output,
                            sampling.skip_special_tokens)  # fmt: skip
    if sampling.bad_words and tokenizer is not None:
        seq.bad_words = spellings(sampling.bad_words, tokenizer)
    return seq, error


def spellings(words: tuple[str, ...], tokenizer: Any) -> tuple[tuple[int, ...], ...]:
    """The token spellings of ``words`` (``bad_words``): each word tokenized as it starts a text and after a space
    (``" word"``, how it appears mid-text), without special tokens; the distinct non-empty ones."""
    found: dict[tuple[int, ...], None] = {}
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            try:
                ids = tuple(tokenizer.encode(text, add_special_tokens=False))
            except TypeError:  # a tokenizer without the option, which adds no special tokens
                ids = tuple(tokenizer.encode(text))
            if ids:
                found[ids] = None
    return tuple(found)


def refusal(model: CausalLM, tokenizer: Any, sampling: SamplingParams) -> str | None:
    """Why ``sampling`` cannot run on ``model`` (``None`` when it can): stop strings, bad words or structured outputs
    without a tokenizer (there is no text to find them in: never ignored), ``logit_bias`` or ``allowed_token_ids`` ids
    past the vocabulary, an adapter it cannot use
    (:func:`.request_adapters.adapter_error`), or ``adapter=False`` (the base alone) while adapters are merged into
    the base."""
    vocab = model.spec.vocab_size
    past = [tid for tid, _ in sampling.logit_bias if tid >= vocab]
    if past:
        return f"logit_bias token ids must be below the vocabulary size {vocab}; got {past[:8]}"
    past = [tid for tid in sampling.allowed_token_ids or () if tid >= vocab]
    if past:
        return f"allowed_token_ids must be below the vocabulary size {vocab}; got {past[:8]}"
    if sampling.bad_words and tokenizer is None:
        return (f"bad_words {list(sampling.bad_words)} need the model's tokenizer to spell them in tokens, and this "
                f"model has none; ban token ids with logit_bias (-100), or wrap the model with its tokenizer")
    if sampling.structured_outputs is not None and tokenizer is None:
        return (f"structured_outputs ({sampling.structured_outputs.kind}) need the model's tokenizer to know what each "
                f"token spells, and this model has none; wrap the model with its tokenizer")
    if sampling.stop and tokenizer is None:
        return (f"stop strings {list(sampling.stop)} need a tokenizer to find them in the text, and this model "
                f"has none; give stop_token_ids, or wrap the model with its tokenizer")
    if isinstance(sampling.adapter, str):
        return adapter_error(model, sampling.adapter)
    if sampling.adapter is False:  # the base alone: not while an adapter is merged into it
        return merged_refusal(model, False)
    return None  # None runs whatever the model has


def check_priority(priority: object, policy: str) -> None:
    """``ValueError`` unless ``priority`` is an integer that ``policy`` takes (under ``"fcfs"``, only 0, as vLLM)."""
    if not is_int(priority):
        raise ValueError(f"priority must be an integer (lower runs first); got {priority!r}")
    if priority != 0 and policy != "priority":
        raise ValueError(f"priority={priority} needs scheduling_policy='priority' (this generator's is {policy!r}); "
                         f"under 'fcfs' every request has priority 0")  # fmt: skip


def admit(gen: Generator, rid: int, prompt: Prompt, sampling: SamplingParams, index: int, priority: int = 0) -> None:
    """Make request ``rid``'s sequence and queue it on ``gen``'s scheduler, or end it with ``"error"`` at once.

    Called by :meth:`.engine.Generator.add_request` under its lock and the model's step lock.
    """
    seq, error = new_sequence(rid, prompt, sampling, index, tokenizer=gen.tokenizer,
                              chat_template=gen.chat_template, vocab_size=gen.model.spec.vocab_size,
                              device=gen.device)
    if error is None:
        error = refusal(gen.model, gen.tokenizer, sampling)
    if error is None and sampling.structured_outputs is not None:
        try:
            seq.grammar = gen.grammars.state(sampling.structured_outputs)
        except (ImportError, ValueError) as exc:
            error = str(exc)
    seq.priority = int(priority)
    if error is None:  # bound to this adapter, (name, uid), not to its name
        seq.adapter_key = adapter_key(gen.model, sampling.adapter)
        error = gen.scheduler.add(seq)
    gen._seqs[rid] = seq  # only now: a check that raised leaves no request behind, live forever
    if error is not None:
        seq.error = error
        gen._end(seq, "error")


__all__ = ["admit", "new_sequence", "refusal"]
