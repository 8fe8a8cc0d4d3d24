"""Prompts as the generator takes them: text, chat messages or token ids, to the token ids a request runs."""

from __future__ import annotations

import operator
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from ..protocol import CausalLM
from .chat_content import template_messages

Prompt = str | Sequence[int] | Sequence[dict]


def prompt_ids(prompt: Prompt, tokenizer: Any, chat_template: bool, vocab_size: int) -> list[int]:
    """The token ids of one prompt: a string (encoded, or rendered as one user turn with ``chat_template``), a
    list of chat messages (rendered with the tokenizer's chat template; content parts as it takes them,
    :func:`.chat_content.template_messages`) or token ids (checked against
    ``vocab_size``); ``ValueError`` naming what is wrong and what a prompt may be."""
    if isinstance(prompt, str) or is_chat(prompt):
        if tokenizer is None:
            raise ValueError("this model has no tokenizer; pass prompts as lists of token ids")
        _check_unicode(prompt, "prompt")
        if isinstance(prompt, str) and not chat_template:
            try:
                return list(tokenizer.encode(prompt))
            except Exception as exc:  # e.g. a lone surrogate ("\ud800", valid JSON): this request's fault alone
                raise ValueError(
                    f"the tokenizer cannot encode this prompt ({type(exc).__name__}: {exc}); "
                    f"prompt must be valid Unicode text or a list of token ids"
                ) from exc
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if getattr(tokenizer, "chat_template", None) is None:
            if isinstance(prompt, str):  # chat_template=True: the user gave text, not messages
                raise ValueError("chat_template=True renders string prompts with the tokenizer's chat template, but "
                                 "this model's tokenizer has none; give chat_template=False to continue the text as is")
            raise ValueError("prompt is a chat message list, but this model's tokenizer has no chat template")
        messages = template_messages(tokenizer, messages)  # text parts joined, unless the template takes parts
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # a template error (jinja's, a KeyError) is this request's fault alone
            raise ValueError(
                f"the tokenizer's chat template cannot render this prompt ({type(exc).__name__}: {exc}); "
                f"chat messages look like [{{'role': 'user', 'content': 'text'}}]"
            ) from exc
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
        return [int(t) for t in ids]
    if isinstance(prompt, (bytes, bytearray)):  # list() would read each byte as a token id
        raise ValueError(f"prompt must be a string, a list of token ids or a list of chat messages; "
                         f"got bytes {prompt[:20]!r}: decode it (prompt.decode()) first")  # fmt: skip
    shape = getattr(prompt, "shape", None)
    if shape is not None and len(shape) > 1:  # transformers' input_ids [1, n]: its rows, not ids
        raise ValueError(f"prompt token ids must be 1-D; got a {type(prompt).__name__} of shape {tuple(shape)}: give "
                         f"one row (input_ids[0]), or pass the rows as a list of prompts")  # fmt: skip
    try:
        items: list[Any] = list(prompt)  # token ids, or whatever else was given: checked one by one below
    except TypeError:
        raise ValueError(
            f"prompt must be a string, a list of token ids or a list of chat messages; got {type(prompt).__name__}"
        ) from None
    ids = []
    for t in items:
        try:
            if isinstance(t, bool) or str(getattr(t, "dtype", "")) in ("bool", "torch.bool"):
                raise TypeError  # index() reads True as token 1: a mask or a flag, never a token id
            ids.append(operator.index(t))  # an int, NumPy or 0-d tensor integer; never a truncated float
        except TypeError:
            raise ValueError(f"prompt token ids must be integers; got {t!r} in the prompt") from None
    bad = next((i for i, t in enumerate(ids) if not 0 <= t < vocab_size), None)
    if bad is not None:  # the offending id and where, not the prompt's first ids (all valid, as often as not)
        raise ValueError(f"prompt token ids must be in [0, {vocab_size}); got {ids[bad]} at position {bad} "
                         f"(of {len(ids)})")  # fmt: skip
    return ids


def _check_unicode(value: Any, where: str) -> None:
    """``ValueError`` naming the first string in ``value`` (a prompt, or chat messages' fields) that is not valid
    Unicode (a lone surrogate such as ``"\\ud800"``, which JSON allows), before a tokenizer or a chat template
    fails on it with an error that names neither."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"{where} is not valid Unicode text: {exc.reason} ({value[exc.start : exc.end]!r} at index {exc.start}); "
                f"give valid text (the halves of a UTF-16 pair joined) or a list of token ids"
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_unicode(item, f"{where}[{i}]")


def prompt_list(prompts: Any) -> Any:
    """``prompts`` as given when it has a length, else (a generator of prompts) read once into a list.

    A single string or bytes is refused here, the empty one too (it has no length to be run as no prompts).
    """
    if isinstance(prompts, (str, bytes, bytearray)):
        raise TypeError("prompts must be a list of prompts; got a single string, bytes or chat (wrap it in a list)")
    if hasattr(prompts, "__len__"):
        return prompts  # a single chat is refused by runs.add_all, with the fix
    if not hasattr(prompts, "__iter__"):
        raise TypeError(f"prompts must be a list (or iterable) of prompts; got {type(prompts).__name__}")
    return list(prompts)


def is_chat(prompt: Any) -> bool:
    """Whether ``prompt`` is a list of chat messages (dicts), not token ids or text."""
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(isinstance(m, dict) for m in prompt)


def is_token_id(x: Any) -> bool:
    """Whether ``x`` is one integer token id: an ``int``, a NumPy integer or a 0-d integer tensor (an element of a
    1-D tensor or array of ids), never a bool."""
    if isinstance(x, bool) or str(getattr(x, "dtype", "")) in ("bool", "torch.bool"):
        return False
    if getattr(x, "ndim", 0) != 0:
        return False
    try:
        operator.index(x)
    except TypeError:
        return False
    return True


def eos_ids(model: CausalLM) -> set[int]:
    """End-of-sequence ids: the tokenizer's and every one of the model's generation config."""
    ids: set[int] = set()
    for source in (getattr(model.tokenizer, "eos_token_id", None),
                   getattr(getattr(getattr(model, "hf", None), "generation_config", None), "eos_token_id", None)):
        if source is None:
            continue
        ids.update([int(source)] if is_token_id(source) else [int(t) for t in source])  # an int, np.int64 or a list
    return ids


def hint_chat_template(tokenizer: Any, prompts: Sequence[Prompt], outputs: Sequence[Any], eos: Any) -> None:
    """Warn when a plain-text prompt to a chat model ended its turn (an ``eos`` id) before writing anything.

    As in transformers' pipelines and vLLM's ``LLM.generate``, a string is continued as raw text;
    an instruct model such as SmolLM2-Instruct often answers raw text with end-of-turn at once.
    ``outputs``: the run's :class:`~.outputs.GenerationOutput`s, in prompt order; one cut by a stop string or a
    stop token id that is no end-of-sequence id is the user's doing, not the model's.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        return
    empty = [o.index for o in outputs if o.finish_reason == "stop" and not o.text.strip()
             and o.token_ids and o.token_ids[-1] in eos and isinstance(prompts[o.index], str)]  # fmt: skip
    if empty:
        warnings.warn(
            f"prompt {empty[0]} ({len(empty)} of {len(outputs)} empty) is plain text and the model ended its "
            f"turn at once: this model has a chat template, so pass chat messages "
            f"([{{'role': 'user', 'content': ...}}]) or chat_template=True to apply it to strings",
            UserWarning,
            stacklevel=_caller_level(),
        )


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside llmspeed, so a warning names the user's line."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame: Any = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level
