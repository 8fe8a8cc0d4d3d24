"""Per-request sampling: :class:`SamplingParams` and the batched sampler.

Every request carries its own parameters and its own ``torch.Generator``; the sampler draws a
request's randomness only from that generator, so a seeded request produces the same tokens
whatever else shares the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the tokens of one request.

    Attributes:
        max_new_tokens: Most tokens to generate (finish reason ``"length"`` when reached).
        temperature: Softmax temperature; ``0`` means greedy (argmax).
        top_k: Keep only the ``top_k`` most likely tokens (``0`` keeps all).
        top_p: Keep the smallest set of tokens whose probability reaches ``top_p`` (``1.0`` keeps all).
        seed: Seed of this request's own random generator; the same seed gives the same tokens
            whatever the batch composition. ``None`` draws a seed from torch's global RNG.
        stop: Strings that end generation when they appear in the output text (they are cut off).
        stop_token_ids: Token ids that end generation (kept in ``token_ids``).
        ignore_eos: Keep generating after the tokenizer's end-of-sequence token.
        adapter: Name of a LoRA adapter to run this request with (``None`` = base model).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    adapter: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be an integer >= 1; got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0 or self.temperature == float("inf"):
            raise ValueError(f"`temperature` must be a finite number >= 0 (0 = greedy); got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"`top_k` must be an integer >= 0 (0 = no top-k filter); got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"`top_p` must be in (0, 1]; got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"`seed` must be None or an integer >= 0; got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"`stop` must be non-empty strings; got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        ids = tuple(self.stop_token_ids)
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise ValueError(f"`stop_token_ids` must be integers >= 0; got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", ids)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"`ignore_eos` must be a bool; got {self.ignore_eos!r}")
        if self.adapter is not None and (not isinstance(self.adapter, str) or not self.adapter):
            raise ValueError(f"`adapter` must be None or a non-empty adapter name; got {self.adapter!r}")

    @property
    def greedy(self) -> bool:
        """True when tokens are picked by argmax (temperature 0)."""
        return self.temperature == 0


def request_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The request's own RNG (``None`` for greedy requests, which need none)."""
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:  # [V] -> [V]
    """Set logits outside the top-k / top-p (nucleus) set to ``-inf``."""
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k).values[-1]  # []
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)  # [V], [V]
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)  # [V]
        drop_sorted = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # mass before this token already enough
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)  # [V]
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,  # [N, V], one row per request that needs a token
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """Pick one token per row: argmax for greedy rows, seeded Gumbel-max sampling otherwise.

    Greedy rows are handled together in one ``argmax``; each random row draws its noise from its
    own generator, so the result of a row never depends on the other rows.
    """
    tokens = logits.argmax(dim=-1).tolist()  # [N] (greedy rows keep these)
    for row, (p, gen) in enumerate(zip(params, generators)):
        if p.greedy:
            continue
        scaled = filter_logits(logits[row].float() / p.temperature, p.top_k, p.top_p)  # [V]
        uniform = torch.rand(scaled.shape, generator=gen, device=scaled.device)  # [V]
        gumbel = -torch.log(-torch.log(uniform.clamp_(min=1e-20)))  # [V]
        tokens[row] = int((scaled + gumbel).argmax())
    return tokens
