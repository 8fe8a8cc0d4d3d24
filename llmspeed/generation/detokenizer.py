"""Incremental detokenization with stop strings: each new token's text, UTF-8 safe, in constant time.

Decoding the whole output on every token is quadratic in its length. :class:`Detokenizer` keeps two
offsets into the token list, as vLLM does: the text of ``ids[prefix:read]`` is already emitted, so a
new token costs two decodes of a short window; a window that ends inside a multi-byte character
(``"\\ufffd"``) waits for the next token. A few prompt tokens seed the window, so tokenizers that
drop a word's leading space at the start of a decode (SentencePiece) still give it here.

Stop strings are searched only in the new text plus the ``len(stop) - 1`` characters before it, and
the last ``len(longest stop) - 1`` characters are held back until the request ends or a stop string
is ruled out: text a stop string later removes is never handed out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

PROMPT_CONTEXT = 4  # prompt tokens that seed the window

# Where transformers defines ``decode`` / ``_decode`` for a tokenizer backed by the Rust ``tokenizers`` library.
_PLAIN_DECODE = {"decode": "transformers.tokenization_utils_base", "_decode": "transformers.tokenization_utils_tokenizers"}


def _plain_backend(tokenizer: Any) -> tuple[Any, Callable[[str], str] | None] | None:
    """``(backend, clean)`` where ``tokenizer.decode(ids, skip_special_tokens=True)`` is exactly
    ``clean(backend.decode(ids, skip_special_tokens=True))`` (``clean`` ``None``: no clean-up), else ``None``: see
    :func:`backend_decode`."""
    backend: Any = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not callable(getattr(backend, "decode", None)):
        return None
    decoding: Any = getattr(tokenizer, "_tokenizer", None)
    if decoding is not backend:  # _decode decodes with ``_tokenizer``, and tests ``backend_tokenizer.model``
        return None
    for name, module in _PLAIN_DECODE.items():
        if name in getattr(tokenizer, "__dict__", {}):  # set on the instance (a wrapper, a patch): decode is not plain
            return None
        owner = next((c for c in type(tokenizer).__mro__ if name in c.__dict__), None)
        if owner is None or owner.__module__ != module:
            return None
    if not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return backend, None
    force = getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", None)
    if force is None:
        return None
    if type(backend.model).__name__ == "BPE" and not force:
        return backend, None
    return backend, tokenizer.clean_up_tokenization


def backend_decode(tokenizer: Any) -> Callable[[list[int]], str] | None:
    """``ids -> text`` through the Rust tokenizer itself, where that is exactly what ``tokenizer.decode(ids,
    skip_special_tokens=True)`` returns: a transformers fast tokenizer whose ``decode`` and ``_decode`` no subclass
    overrides (nor the instance itself). ``None`` otherwise (the detokenizer then calls ``decode``).

    transformers' wrapper costs several times the Rust decode of a short window, and a request decodes two windows
    a token: host time a big batch pays every step, which a GPU waits for (measured in docs/batching.md).

    With ``clean_up_tokenization_spaces`` on (Llama 3's config sets it), ``_decode`` (transformers >= 5.7, which has
    ``clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output``) leaves a BPE model's text as the Rust
    decode gives it unless that flag is set, and otherwise passes it through ``self.clean_up_tokenization``: so does
    this, calling the same bound method (a subclass's or the instance's own included). Without the flag (an older
    transformers, which cleans BPE text too), ``None``."""
    return _decoder(_plain_backend(tokenizer))


def _decoder(parts: tuple[Any, Callable[[str], str] | None] | None, skip: bool = True) -> Callable[[list[int]], str] | None:
    """:func:`backend_decode` from what :func:`_plain_backend` found (``skip``: leave special tokens out)."""
    if parts is None:
        return None
    backend, clean = parts
    if clean is None:
        return lambda ids: backend.decode(ids, skip_special_tokens=skip)
    return lambda ids: clean(backend.decode(ids, skip_special_tokens=skip))


# What may follow a space that transformers' ``clean_up_tokenization`` rewrites (``" ."``, ``" ?"``, ``" !"``, ``" ,"``,
# ``" ' "``, ``" n't"``, ``" 'm"``, ``" 's"``, ``" 've"``, ``" 're"``), and a space (a rewrite deletes spaces only).
_REWRITTEN_AFTER_SPACE = frozenset(".?!,'n ")


def _settled(raw: str) -> int:
    """How much of the raw (not yet cleaned) text ``raw`` cleans up the same whatever follows: up to a point ``c`` with
    no space in the 3 characters before it that a rewrite could start at (each rewrite starts at a space and spans at
    most 4 characters, and deleting spaces never brings an earlier one within reach of ``c``)."""
    cut = len(raw)
    while cut > 0:
        opening = [j for j in range(max(0, cut - 3), cut)
                   if raw[j] == " " and (j + 1 == len(raw) or raw[j + 1] in _REWRITTEN_AFTER_SPACE)]  # fmt: skip
        if not opening:
            return cut
        cut = opening[0]
    return 0


BARRIER = 4  # non-space characters that no clean-up rewrite can reach across (each spans at most 4, from a space)


def _barrier(raw: str, start: int, end: int) -> int:
    """The last point ``p`` in ``(start, end]`` with ``BARRIER`` non-space characters just before it, else ``start``.

    transformers' ``clean_up_tokenization`` is a chain of ``str.replace`` whose every pattern starts at a space, spans
    at most 4 characters and deletes only spaces, so no rewrite (nor one a deletion brings about) can include both
    sides of ``p``: ``clean(raw[:q]) == clean(raw[:p]) + clean(raw[p:q])`` for every ``q >= p``."""
    run = 0
    for i in range(end - 1, start - 1, -1):
        run = run + 1 if raw[i] != " " else 0
        if run == BARRIER:
            return i + BARRIER
    return start


def _cleans_locally(clean: Callable[[str], str] | None) -> bool:
    """Whether ``clean`` is transformers' own ``clean_up_tokenization`` (the rewrites :func:`_barrier` reasons about);
    a subclass's or an instance's may rewrite anything, and is applied to the whole text instead."""
    func = getattr(clean, "__func__", None)
    return (getattr(func, "__module__", None) == "transformers.tokenization_utils_base"
            and getattr(func, "__qualname__", None) == "PreTrainedTokenizerBase.clean_up_tokenization")  # fmt: skip


class Detokenizer:
    """Turns one request's generated tokens into text deltas and finds its stop strings.

    Args:
        tokenizer: A tokenizer with ``decode(ids, skip_special_tokens=...)``; ``None`` gives no text.
        prompt_ids: The request's prompt (its last tokens give the first output token its context).
        stop: Stop strings.
        include_stop: Keep the stop string found at the end of the text (``include_stop_str_in_output``).
        skip_special_tokens: Leave special tokens' text out (``decode``'s option; vLLM's ``skip_special_tokens``).

    Where the tokenizer's ``decode`` cleans its text up (transformers' ``clean_up_tokenization``: ``" ."`` -> ``"."``,
    ``" ' "`` -> ``"'"``, ..., which BERT-style WordPiece tokenizers and a BPE with the force flag apply), a window's
    text cannot be cleaned on its own: the space a clean-up removes can sit in text already handed out. The windows
    are then decoded raw, and the text is the clean-up of the raw text up to where later characters can no longer
    change it (:func:`_settled`), so that the deltas add up to what ``decode`` gives the whole. transformers' own
    clean-up cleans only the raw text after the last point no rewrite reaches across (:func:`_barrier`), so a token
    costs the same at the end of a long output as at its start.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], stop: Sequence[str] = (), include_stop: bool = False,
                 skip_special_tokens: bool = True):  # fmt: skip
        self.tokenizer = tokenizer
        self.include_stop = include_stop
        self.skip = skip_special_tokens
        self.stopped_by: str | None = None  # the stop string found (the first in ``stop`` of those found earliest)
        self.ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT:])
        self.prefix = 0
        self.read = len(self.ids)
        self.stop = tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # all decoded output text so far (cut at a stop string once one is found)
        self.sent = 0  # characters of ``text`` already handed out
        self.stopped = False
        parts = _plain_backend(tokenizer)  # once a request: what backend_decode would find
        self._fast = _decoder(parts, skip_special_tokens)
        self._clean = parts[1] if parts is not None else None  # decode == clean(raw decode), or None
        self._raw_fast: Callable[..., str] | None = None if parts is None else parts[0].decode
        self.raw = ""  # with a clean-up: the raw output text so far, of which ``text`` is the settled part cleaned
        self._local = _cleans_locally(self._clean)  # clean only ``raw[anchor:]`` (see _append)
        self._anchor = 0  # a :func:`_barrier` point of ``raw``: text holds clean(raw[:anchor]) + self._tail
        self._tail = ""  # the cleaned settled raw text after the anchor, at the end of ``text``

    def _decode(self, ids: list[int]) -> str:
        """The text of ``ids``: as ``decode`` gives it, or before its clean-up where there is one."""
        if self._clean is not None:
            if self._fast is not None and self._raw_fast is not None:
                return self._raw_fast(ids, skip_special_tokens=self.skip)
            return self.tokenizer.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)
        if self._fast is not None:
            return self._fast(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def _append(self, delta: str, final: bool) -> int:
        """Add decoded text; return where the new part of :attr:`text` starts. With a clean-up, ``text`` becomes the
        clean-up of the raw text up to its settled end (all of it when ``final``), if that extends it (a clean-up
        overridden to rewrite earlier text keeps the text until the end)."""
        start = len(self.text)
        if self._clean is None:
            self.text += delta
            return start
        self.raw += delta
        end = len(self.raw) if final else _settled(self.raw)
        if self._local:
            end = max(end, self._anchor)  # the text before the anchor is final whatever follows it (_barrier)
            cut = _barrier(self.raw, self._anchor, end)
            head = self._clean(self.raw[self._anchor : cut])  # final from here on: nothing later rewrites it
            tail = self._clean(self.raw[cut:end])
            now = head + tail  # clean(raw[anchor:end]), of which self._tail was the part settled before
            if now.startswith(self._tail):
                self.text += now[len(self._tail) :]
            elif final:  # not expected (the settled part never changes): the whole text as decode gives it
                self.text = self.text[: len(self.text) - len(self._tail)] + now
            else:
                return start
            self._anchor, self._tail = cut, tail
            return min(start, len(self.text))
        cleaned = self._clean(self.raw[:end])
        if final or (len(cleaned) > start and cleaned.startswith(self.text)):
            self.text = cleaned
        return min(start, len(self.text))

    def add(self, token_id: int, check_stop: bool = True) -> str:
        """Take one generated token; return the text it releases (``""`` while held back).

        ``check_stop=False`` skips the stop-string search (before ``min_tokens``). After a stop string is
        found, :attr:`stopped` is True and :attr:`text` ends before it.
        """
        if self.tokenizer is None or self.stopped:
            return ""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            start = self._append(now[len(before) :], final=False)
            self.prefix, self.read = self.read, len(self.ids)
            if check_stop and self.stop:
                self._find_stop(start)
        elif now == before and self.read == len(self.ids) - 1:
            # the token added nothing (a special token, which decoding skips): kept in the window, a run of them
            # (an ignore_eos run past end-of-text) would make every later decode longer, each step slower
            self.ids.pop()
            self.read = len(self.ids)
        return self._release(final=self.stopped)

    def _find_stop(self, new_from: int) -> None:
        hits = []
        for s in self.stop:
            i = self.text.find(s, max(0, new_from - len(s) + 1))
            if i >= 0:
                hits.append((i, s))
        if hits:
            i, s = min(hits, key=lambda hit: hit[0])  # the earliest; of those, the first listed
            self.text = self.text[: i + len(s) if self.include_stop else i]
            self.stopped, self.stopped_by = True, s

    def _release(self, final: bool) -> str:
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        delta = self.text[self.sent : end]
        self.sent = end
        return delta

    def finish(self, check_stop: bool = True) -> str:
        """The request ended: flush held-back text and any undecoded tail (searched for stop strings too, unless
        ``check_stop=False`` as before ``min_tokens``: a token whose text ends in part of a character was held back
        with the text before it); return what is released."""
        if self.tokenizer is None:
            return ""
        if not self.stopped and (self.read < len(self.ids) or self._clean is not None):
            before = self._decode(self.ids[self.prefix : self.read])
            start = self._append(self._decode(self.ids[self.prefix :])[len(before) :], final=True)
            self.prefix = self.read = len(self.ids)
            if check_stop and self.stop:
                self._find_stop(start)
        return self._release(final=True)
