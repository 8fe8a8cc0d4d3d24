"""Structured outputs at run time: each request's grammar matcher, and the mask of tokens it allows next.

:class:`Grammars` compiles a request's :class:`~.structured_params.StructuredOutputsParams` against the generator's
tokenizer (xgrammar's ``GrammarCompiler``: the vocabulary is walked once per tokenizer, each grammar once per
distinct spec) and gives each request its own :class:`GrammarState`. Before a step samples, the state's
:meth:`GrammarState.allowed` mask reaches the sampler through the row's :class:`~.sampling.RowContext` (the other
tokens' logits become ``-inf``); after, :meth:`GrammarState.accept` moves the matcher on with the sampled token.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch

from .structured_params import StructuredOutputsParams, xgrammar

_BIT = torch.arange(32, dtype=torch.int32)  # [32]: bit j of a 32-bit word is token 32 * word + j (xgrammar's order)
MAX_COMPILED = 64  # distinct grammars kept compiled per generator (least recently used dropped first)


def unpack_bitmask(words: torch.Tensor, vocab_size: int) -> torch.Tensor:  # [W] int32 -> [vocab_size] bool
    """xgrammar's packed token bitmask (one int32 per 32 tokens, lowest bit first) as one bool per token."""
    return ((words[:, None] >> _BIT) & 1).bool().flatten()[:vocab_size]  # [W, 32] -> [W * 32] -> [V]


class GrammarState:
    """One request's place in its grammar: which tokens may come next, and the tokens it has taken."""

    def __init__(self, matcher: Any, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self._words = xgrammar().allocate_token_bitmask(1, vocab_size)  # [1, ceil(V / 32)] int32

    def allowed(self) -> torch.Tensor:  # [V] bool
        """The tokens that keep the output valid (the end-of-sequence ids once it is complete)."""
        self.matcher.fill_next_token_bitmask(self._words, 0)
        return unpack_bitmask(self._words[0], self.vocab_size)

    def accept(self, token: int) -> bool:
        """Move on with ``token``; ``False`` (nothing changed) when the grammar does not allow it here."""
        return bool(self.matcher.accept_token(int(token)))

    @property
    def done(self) -> bool:
        """True once the grammar has taken its end (an end-of-sequence token after a complete output)."""
        return bool(self.matcher.is_terminated())


class Grammars:
    """The structured-output grammars of one generator, compiled against its tokenizer.

    Args:
        tokenizer: The generator's Hugging Face tokenizer.
        vocab_size: Width of the model's logits (token ids past the tokenizer's are never allowed).
        eos: The generator's end-of-sequence ids: the tokens a complete output ends with.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos: Iterable[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos = sorted(eos)
        self._compiler: Any = None
        self._compiled: OrderedDict[tuple, Any] = OrderedDict()
        # the step loop (state) and callers' threads (prepare) share the cache; a compile runs outside the lock,
        # the one vocabulary walk inside its own, so that a second thread waits for it rather than repeating it
        self._lock = threading.Lock()
        self._walk = threading.Lock()

    def _compiler_for_tokenizer(self) -> Any:
        with self._walk:
            if self._compiler is None:  # walks the vocabulary: once, on the first request that asks
                xgr = xgrammar()
                try:
                    info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                              stop_token_ids=self.eos or None)  # fmt: skip
                except Exception as err:  # a tokenizer xgrammar cannot read (not a Hugging Face one)
                    raise ValueError(f"structured outputs need a Hugging Face tokenizer xgrammar can read; "
                                     f"{type(self.tokenizer).__name__} raised {type(err).__name__}: {err}") from None
                self._compiler = xgr.GrammarCompiler(info, max_threads=max(1, torch.get_num_threads()))
            return self._compiler

    def _compile(self, params: StructuredOutputsParams) -> Any:
        key = params.cache_key()
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is not None:
                self._compiled.move_to_end(key)
                return compiled
        compiled = self._compiler_for_tokenizer().compile_grammar(params.build())
        with self._lock:
            self._compiled[key] = compiled
            while len(self._compiled) > MAX_COMPILED:
                self._compiled.popitem(last=False)
        return compiled

    def prepare(self, params: StructuredOutputsParams) -> None:
        """Compile ``params`` now, in the calling thread, so that admitting its request later takes the compiled
        grammar from the cache instead of compiling inside the step loop (where every running request would wait:
        5-9 ms a grammar, and the first request's vocabulary walk). A spec that does not compile is left to
        admission, which ends its request with the message; so is a missing xgrammar."""
        try:
            self._compile(params)
        except (ImportError, ValueError):
            pass

    def state(self, params: StructuredOutputsParams) -> GrammarState:
        """A new request's matcher for ``params``, at the start of its output.

        Raises:
            ImportError: xgrammar is not installed.
            ValueError: the tokenizer is not one xgrammar can read, or the grammar does not compile.
        """
        xgr = xgrammar()
        return GrammarState(xgr.GrammarMatcher(self._compile(params)), self.vocab_size)


__all__ = ["GrammarState", "Grammars", "unpack_bitmask"]
