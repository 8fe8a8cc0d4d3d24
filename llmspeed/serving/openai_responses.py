"""The OpenAI API's response shapes: plain dicts in the shapes the official ``openai`` client parses (completions,
chat completions, their usage, finish reasons and log-probabilities), from llmspeed's outputs."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from ..generation import GenerationOutput


def new_id(prefix: str) -> str:
    """A response id like OpenAI's."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(outputs: list[GenerationOutput], per_prompt: int | None = None, generated: bool = True) -> dict[str, int]:
    """Token counts of a response: each prompt counted once (``per_prompt`` consecutive outputs share one; ``None``:
    all of them do), the completion tokens of every choice summed (none with ``generated=False``: ``max_tokens: 0``,
    whose one computed token is dropped)."""
    step = per_prompt or max(len(outputs), 1)
    prompt = sum(o.metrics.prompt_tokens for o in outputs[::step])
    completion = sum(o.metrics.output_tokens for o in outputs) if generated else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(output: GenerationOutput) -> str:
    """OpenAI's finish reason of a finished answer: ``"length"`` or ``"stop"`` (errors and aborts are error bodies)."""
    return "length" if output.finish_reason == "length" else "stop"


def _piece(tokenizer: Any, token: int) -> str:
    return tokenizer.decode([token]) if tokenizer is not None else str(token)


def completion_logprobs(tokenizer: Any, items: list[Any] | None, offset: int = 0,
                        alternatives: int | None = None) -> dict[str, Any] | None:  # fmt: skip
    """The legacy completions ``logprobs`` object of ``items`` (``TokenLogprobs``), the first at ``text_offset`` ``offset``.

    Each ``top_logprobs`` entry holds the ``logprobs`` most likely tokens and the sampled one, as OpenAI's API ("up to
    logprobs+1 elements") and vLLM return it, so ``logprobs: 0`` still gives the sampled token's entry.
    ``alternatives``: at most that many of each item's most likely tokens (``None``: all it holds)."""
    if items is None:
        return None
    tokens, values, tops, offsets = [], [], [], []
    pos = offset
    for lp in items:
        piece = _piece(tokenizer, lp.token_id)
        tokens.append(piece)
        values.append(lp.logprob)
        tops.append({**{_piece(tokenizer, t): v for t, v in lp.top[:alternatives]}, piece: lp.logprob})
        offsets.append(pos)
        pos += len(piece)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's (GPT-2's) alphabet: the character a token string writes for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    shifted = iter(range(256, 512))
    return {chr(b if b in printable else next(shifted)): b for b in range(256)}


_BYTE_LEVEL = _byte_level_alphabet()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte tokens


def _token_bytes(tokenizer: Any, token: int, piece: str) -> list[int]:
    """The UTF-8 bytes of ``token`` (its text ``piece``), as OpenAI's ``bytes``: a token holding part of a
    multi-byte character decodes alone to ``"\ufffd"``, so its bytes are read from its token string
    (byte-level BPE's alphabet, or SentencePiece's ``<0xNN>``), and the tokens' bytes join to the text."""
    if "\ufffd" in piece and hasattr(tokenizer, "convert_ids_to_tokens"):
        raw = tokenizer.convert_ids_to_tokens(token)
        if isinstance(raw, str) and raw:
            fallback = _BYTE_FALLBACK.fullmatch(raw)
            if fallback:
                return [int(fallback.group(1), 16)]
            if all(c in _BYTE_LEVEL for c in raw):
                return [_BYTE_LEVEL[c] for c in raw]
    return list(piece.encode("utf-8"))


def chat_logprobs(tokenizer: Any, items: list[Any] | None) -> dict[str, Any] | None:
    """The chat ``logprobs`` object: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    if items is None:
        return None

    def entry(token: int, value: float) -> dict[str, Any]:
        piece = _piece(tokenizer, token)
        return {"token": piece, "logprob": value, "bytes": _token_bytes(tokenizer, token, piece)}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in items]}


def prompt_logprobs(tokenizer: Any, output: GenerationOutput, alternatives: int | None) -> list[Any] | None:
    """vLLM's ``prompt_logprobs`` of ``output`` (``None`` when not asked, ``alternatives is None``): one entry per
    prompt token, ``None`` for the first, then ``{token id: {logprob, rank, decoded_token}}`` holding the token and its
    ``alternatives`` most likely alternatives (JSON keys are the ids as strings, as vLLM's)."""
    if alternatives is None or output.prompt_logprobs is None:
        return None

    def entry(lp: Any) -> dict[str, Any] | None:
        if lp is None:
            return None
        entries = {str(t): {"logprob": v, "rank": r, "decoded_token": _piece(tokenizer, t)}
                   for r, (t, v) in enumerate(lp.top[:alternatives], 1)}  # fmt: skip
        entries.setdefault(str(lp.token_id), {"logprob": lp.logprob, "rank": lp.rank,
                                              "decoded_token": _piece(tokenizer, lp.token_id)})  # fmt: skip
        return entries

    return [entry(lp) for lp in output.prompt_logprobs]


def completion_response(rid: str, model: str, tokenizer: Any, outputs: list[GenerationOutput], n: int = 1,
                        echo: list[str] | None = None, generated: bool = True,
                        prompt_alternatives: tuple[int | None, int | None] = (None, None)) -> dict[str, Any]:  # fmt: skip
    """A whole ``text_completion`` response: ``n`` consecutive choices per prompt (choice ``i`` answers prompt
    ``i // n``, as OpenAI's API orders them); ``echo``: each prompt's text, put before its choices' text (and, when
    the request asked for log-probabilities, the prompt's tokens before the generated ones, the first with ``null``
    log-probability and alternatives, as OpenAI's and vLLM's echo); ``generated=False`` (``max_tokens: 0``): the
    prompt alone, its one computed token dropped. ``prompt_alternatives``: the request's ``logprobs`` (what an echoed
    prompt token shows) and ``prompt_logprobs`` (each choice's vLLM ``prompt_logprobs``, :func:`prompt_logprobs`)."""
    echoed, scored = prompt_alternatives
    choices = []
    for i, o in enumerate(outputs):
        text = o.text if generated else ""
        lps = completion_logprobs(tokenizer, o.logprobs if generated else [] if o.logprobs is not None else None)
        if echo is not None:
            text = echo[i // n] + text
            lps = echoed_logprobs(tokenizer, o.prompt_token_ids, o.prompt_logprobs, lps, len(echo[i // n]), echoed)
        choice = {"index": i, "text": text, "logprobs": lps, "finish_reason": finish_reason(o) if generated else "length",
                  "stop_reason": o.stop_reason if generated else None}
        if scored is not None:
            choice["prompt_logprobs"] = prompt_logprobs(tokenizer, o, scored)
        choices.append(choice)
    counts = usage(outputs, n, generated)
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": choices,
            "usage": counts}


def echoed_logprobs(tokenizer: Any, prompt_ids: list[int], entries: list[Any] | None, generated: dict[str, Any] | None,
                    shift: int, alternatives: int | None) -> dict[str, Any] | None:  # fmt: skip
    """``generated`` (a legacy ``logprobs`` object) with the prompt's tokens (``prompt_ids``, scored in ``entries``:
    ``GenerationOutput.prompt_logprobs``) in front, each with ``alternatives`` most likely tokens, and its offsets
    moved past the echoed prompt text (``shift`` characters)."""
    if generated is None or entries is None:
        return generated
    first = _piece(tokenizer, prompt_ids[0])
    rest = completion_logprobs(tokenizer, [lp for lp in entries[1:] if lp is not None], len(first), alternatives)
    assert rest is not None
    return {"tokens": [first, *rest["tokens"], *generated["tokens"]],
            "token_logprobs": [None, *rest["token_logprobs"], *generated["token_logprobs"]],
            "top_logprobs": [None, *rest["top_logprobs"], *generated["top_logprobs"]],
            "text_offset": [0, *rest["text_offset"], *(shift + o for o in generated["text_offset"])]}


def chat_response(rid: str, model: str, tokenizer: Any, outputs: list[GenerationOutput],
                  echo: str = "", prompt_alternatives: int | None = None) -> dict[str, Any]:  # fmt: skip
    """A whole ``chat.completion`` response; ``echo``: text put before each choice's (the message it continues);
    ``prompt_alternatives``: the request's ``prompt_logprobs``, answered as vLLM's response-level ``prompt_logprobs``
    (the rendered prompt's tokens, :func:`prompt_logprobs`)."""
    answer = {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": echo + o.text},
                     "logprobs": chat_logprobs(tokenizer, o.logprobs), "finish_reason": finish_reason(o),
                     "stop_reason": o.stop_reason}
                    for i, o in enumerate(outputs)],
        "usage": usage(outputs),
    }
    if prompt_alternatives is not None:
        answer["prompt_logprobs"] = prompt_logprobs(tokenizer, outputs[0], prompt_alternatives)
    return answer
