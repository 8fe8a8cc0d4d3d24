"""The sampler of a step's rows: one token per row from its logits and its request's :class:`~.sampling.SamplingParams`.

Two things loop over rows in Python: the random draw (one ``torch.rand`` of one number per random row, from its own
generator) and the logit biases, penalties, token bans and structured-output masks (per row that has them; none when no request asks). Greedy
rows take one ``argmax``; random rows are sampled together by :func:`.categorical.sample_rows` (temperature, min-p,
top-k and top-p from the host's parameters); one host transfer per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .categorical import filter_rows, host_tensor, min_p_rows, sample_rows
from .sampling import RowContext, SamplingParams, TokenLogprobs


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:  # [V] -> [V]
    """Set logits outside the top-k / top-p (nucleus) set to ``-inf`` (one row)."""
    row = logits[None]  # [1, V]
    k = torch.tensor([min(top_k, logits.shape[-1])], device=logits.device)  # a k past the vocabulary keeps all
    p = torch.tensor([float(top_p)], dtype=torch.float64, device=logits.device)  # fp32 would round 1 - 1e-8 to 1: off
    return filter_rows(row, k, p)[0]


def _penalize(logits: torch.Tensor, params: Sequence[SamplingParams], rows: Sequence[RowContext]) -> torch.Tensor:
    """Apply logit biases, then repetition / presence / frequency penalties, bans and structured outputs' token masks
    (vLLM's order), to the rows that have them (``[N, V]``)."""
    if not any(p.penalized for p in params) and not any(r.banned or r.allowed is not None for r in rows):
        return logits
    logits = logits.clone()
    dev = logits.device
    for i, (p, ctx) in enumerate(zip(params, rows)):
        row = logits[i]  # [V]
        if p.logit_bias:
            ids, biases = zip(*p.logit_bias)
            row.index_add_(0, host_tensor(ids, torch.long, dev), host_tensor(biases, row.dtype, dev))
        if p.repetition_penalty != 1.0:
            seen = host_tensor(sorted({*ctx.prompt_ids, *ctx.output_ids}), torch.long, dev)  # [S]
            vals = row.index_select(0, seen)  # [S]
            new = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)  # [S]
            # an extreme penalty (1e-40 divides, 1e40 multiplies) overflows finite logits to +-inf, and a row of
            # several +inf has no softmax: the largest finite values keep the order and the ties
            big = torch.finfo(row.dtype).max
            row.index_copy_(0, seen, torch.where(vals.isfinite(), new.clamp(-big, big), new))
        if (p.presence_penalty or p.frequency_penalty) and ctx.output_ids:
            out = host_tensor(list(ctx.output_ids), torch.long, dev)  # [O]
            counts = torch.zeros_like(row).index_add_(0, out, torch.ones_like(out, dtype=row.dtype))  # [V]
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
        banned = [t for t in ctx.banned if t < row.shape[0]]  # an id past the vocabulary is never sampled anyway
        if banned:
            row[host_tensor(banned, torch.long, dev)] = float("-inf")
        if ctx.allowed is not None:  # structured outputs: what cannot continue a valid output
            row.masked_fill_(~ctx.allowed.to(dev), float("-inf"))
        if p.allowed_token_ids is not None:  # every other token out (ids past the vocabulary were refused)
            keep = host_tensor(p.allowed_token_ids, torch.long, dev)  # [A]
            kept = row.index_select(0, keep)  # [A]
            row.fill_(float("-inf")).index_copy_(0, keep, kept)
    return logits


def argmax_rows(scores: torch.Tensor) -> torch.Tensor:  # [N] int64
    """The index of each row's largest value: the first one on ties, the first NaN if a row has one.

    On the CPU, fp32 rows go through NumPy's vectorized argmax, with the same rules: torch's CPU argmax
    walks a 49k-token vocabulary at about 2.7 ns a value (130 us a row on the 2-core Xeon, 1% of a
    quantized decode step), NumPy's in about 8 us.
    """
    if scores.device.type == "cpu" and scores.dtype == torch.float32 and not scores.requires_grad:
        return torch.from_numpy(scores.numpy().argmax(-1))
    return scores.argmax(dim=-1)


def sample_batch(
    logits: torch.Tensor,  # [N, V], one row per request that needs a token
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    rows: Sequence[RowContext] | None = None,
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """Pick one token per row; return the tokens and, for rows that asked, their log-probabilities.

    Greedy rows take the argmax; random rows take one exact sample of their filtered, temperature-scaled
    softmax from one uniform number of their own generator (:func:`.categorical.sample_rows`), so a row's
    result never depends on the other rows. One host transfer for the whole batch.
    """
    n = logits.shape[0]
    rows = rows if rows is not None else [RowContext()] * n
    raw = logits.float()  # [N, V]
    tokens = sample_ids(raw, params, generators, rows)  # [N]
    token_list = tokens.tolist()
    return token_list, token_logprobs(raw, tokens, [p.logprobs for p in params])


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, wanted: Sequence[int | None]) -> list[TokenLogprobs | None]:
    """For each row of ``logits`` (``[N, V]``) that asked (``wanted[i]`` alternatives, ``None``: none), the
    log-probability of ``tokens[i]`` (``[N]``) under the row's softmax, its rank and the ``wanted[i]`` most likely
    tokens."""
    n = logits.shape[0]
    if all(w is None for w in wanted):
        return [None] * n
    logp = torch.log_softmax(logits.float(), dim=-1)  # [N, V]
    chosen_t = logp.gather(1, tokens.to(logp.device)[:, None])  # [N, 1]
    ranks = ((logp > chosen_t).sum(-1) + 1).tolist()  # [N]
    chosen = chosen_t[:, 0].tolist()  # [N]
    kmax = min(max(w or 0 for w in wanted), logp.shape[1])  # a vocabulary under 20 tokens has that many alternatives
    best = logp.topk(kmax, dim=-1) if kmax else (logp[:, :0], logp[:, :0].long())  # [N, K] each
    top_vals, top_ids, token_list = best[0].tolist(), best[1].tolist(), tokens.tolist()
    out: list[TokenLogprobs | None] = []
    for i, w in enumerate(wanted):
        if w is None:
            out.append(None)
            continue
        top = tuple((int(t), float(v)) for t, v in zip(top_ids[i][:w], top_vals[i][:w]))
        out.append(TokenLogprobs(int(token_list[i]), float(chosen[i]), top, int(ranks[i])))
    return out


def sample_ids(
    logits: torch.Tensor,  # [N, V]
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    rows: Sequence[RowContext] | None = None,
) -> torch.Tensor:  # [N] int64, on the logits' device (or the CPU)
    """The tokens :func:`sample_batch` picks, left where they are computed: no host transfer, so a GPU burst
    (:meth:`.runner.ModelRunner.burst_steps`) can feed them to the next step without waiting for this one."""
    n = logits.shape[0]
    rows = rows if rows is not None else [RowContext()] * n
    scores = _penalize(logits.float(), params, rows)  # [N, V]
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        dev = scores.device
        idx = host_tensor(random_rows, torch.long, dev)  # [R]
        sub = [params[i] for i in random_rows]
        # a temperature past fp32's range would be inf there, and a banned token's -inf / inf a NaN, which is drawn
        temps = host_tensor([min(p.temperature, torch.finfo(torch.float32).max) for p in sub], torch.float32, dev)  # [R]
        top_k, top_p = [p.top_k for p in sub], [float(p.top_p) for p in sub]  # host values: no wait on a GPU
        every = len(random_rows) == n  # the usual batch: one kind of row, no copies of rows
        scaled = (scores if every else scores.index_select(0, idx)) / temps[:, None]  # [R, V]
        scaled = min_p_rows(scaled, [p.min_p for p in sub])  # [R, V]
        picked = sample_rows(scaled, top_k, top_p, [generators[i] for i in random_rows])  # [R]
        return picked if every else argmax_rows(scores).to(dev).index_copy(0, idx, picked)
    return argmax_rows(scores)  # [N]


def sample(
    logits: torch.Tensor,  # [N, V]
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """Pick one token per row (see :func:`sample_batch`, which also returns log-probabilities)."""
    return sample_batch(logits, params, generators)[0]
