"""The random rows of a step's sampler: one exact sample of each row's temperature-scaled, top-k / top-p filtered
softmax, drawn from one uniform number of the row's own generator.

:func:`filter_rows` is the filter written plainly (a full sort of the vocabulary for top-p); :func:`sample_rows`
samples from what it keeps without the sort. Top-p keeps the most likely tokens until their mass reaches ``p``;
those are among the largest ``m`` for the first ``m`` in 64, 256, 1024, ... whose mass reaches ``p``, so a partial
``topk`` finds them (a real model's nucleus is usually short). The sample is the inverse of the kept tokens'
cumulative weights at ``u`` times their total: one uniform a row, where the Gumbel-max trick took one per
vocabulary entry and two logarithms of each (the cost of both is in docs/batching.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_FIRST_NUCLEUS = 64  # candidates of the first top-p pass; grown 4x while some row's nucleus is larger


def filter_rows(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per-row top-k / top-p filtering: logits ``[N, V]``, top_k ``[N]`` (0 = off), top_p ``[N]`` (1 = off); the
    dropped logits become ``-inf``. Top-p drops a token when the mass of the tokens more likely than it has reached
    ``p``."""
    logits = _top_k(logits, top_k.tolist())
    if bool((top_p < 1.0).any()):
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)  # [N, V], [N, V]
        probs = torch.softmax(sorted_logits, dim=-1)  # [N, V]
        before = probs.cumsum(-1) - probs  # [N, V] mass of the more likely tokens
        drop_sorted = (before >= top_p[:, None]) & (top_p < 1.0)[:, None]  # [N, V]
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)  # [N, V]
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def host_tensor(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` (a list on the host) as a tensor on ``device``. ``torch.tensor(values, device=cuda)`` copies with
    ``non_blocking=False``, which synchronizes the stream (the host waits for every queued kernel); this copies from
    pinned memory with ``non_blocking=True``, so the host queues the copy and goes on."""
    cuda = device.type == "cuda"  # elsewhere (the CPU, MPS) a plain copy: no pinned memory to copy from
    return torch.tensor(values, dtype=dtype, pin_memory=cuda).to(device, non_blocking=cuda)


def min_p_rows(scaled: torch.Tensor, min_p: Sequence[float]) -> torch.Tensor:  # [R, V] -> [R, V]
    """Drop (``-inf``) each row's tokens whose probability is below ``min_p`` times the row's largest (``0`` = off): a
    logit more than ``-log(min_p)`` below the row's maximum. The rows are temperature-scaled logits."""
    if not any(min_p):
        return scaled
    floor = host_tensor([math.log(p) if p > 0 else float("-inf") for p in min_p], scaled.dtype, scaled.device)  # [R]
    cut = scaled.amax(dim=-1, keepdim=True) + floor[:, None]  # [R, 1]
    return scaled.masked_fill(scaled < cut, float("-inf"))


def _top_k(logits: torch.Tensor, top_k: Sequence[int]) -> torch.Tensor:  # [N, V] -> [N, V]
    ks = _ks(top_k, logits.shape[-1])
    if not any(ks):
        return logits
    k = host_tensor(ks, torch.long, logits.device)  # [N]
    kth = torch.topk(logits, max(ks), dim=-1).values.gather(1, (k.clamp(min=1) - 1)[:, None])  # [N, 1]
    return logits.masked_fill((logits < kth) & (k > 0)[:, None], float("-inf"))


def sample_rows(
    scaled: torch.Tensor,  # [R, V] fp32 logits already divided by each row's temperature
    top_k: Sequence[int],  # per row (0 = off)
    top_p: Sequence[float],  # per row (1 = off)
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:  # [R] int64
    """One token per row, distributed as the softmax of :func:`filter_rows`' output (up to fp32 rounding of each
    token's weight, and at the nucleus' edge), from one ``torch.rand`` of the row's generator. A row with no
    finite logit (all ``-inf``, or a NaN) takes its argmax, as the sampler's greedy rows do.

    On the CPU a top-k row samples from its ``k`` largest logits alone (in vocabulary order, so its token is the
    one the whole masked row gives), unless other logits tie with its ``k``-th, which the filter keeps too.
    On a GPU nothing here waits for the device (the rows' kinds come from the host's parameters, the nucleus from a
    full ``topk``), so a burst (:mod:`.greedy_burst`) queues its steps' sampling with them."""
    dev = scaled.device
    uniform = torch.cat([torch.rand(1, generator=g, device=dev, dtype=torch.float64) for g in generators])  # [R]
    ks = _ks(top_k, scaled.shape[1])
    if dev.type != "cpu" or not any(ks):
        return _whole_rows(scaled, ks, top_p, uniform)
    tokens = torch.empty(scaled.shape[0], dtype=torch.long, device=dev)  # [R]
    short = [i for i, k in enumerate(ks) if k]  # rows drawn from their top-k candidates
    rows = host_tensor(short, torch.long, dev)  # [S]
    values, ids, tied = _candidates(_rows(scaled, rows), [ks[i] for i in short])  # [S, k], [S, k], [S]
    if any(tied):
        keep = [j for j, t in enumerate(tied) if not t]
        short = [short[j] for j in keep]
        values, ids = values[keep], ids[keep]  # [S', k] each
        rows = host_tensor(short, torch.long, dev)  # [S']
    if short:
        peak = values.amax(-1, keepdim=True)  # [S', 1]
        picked = _draw(values, peak, [top_p[i] for i in short], uniform[rows])  # [S'] places in the candidates
        tokens[rows] = _argmax_where_bad(peak, _rows(scaled, rows), ids.gather(1, picked[:, None])[:, 0])
    if len(short) < len(ks):
        taken = set(short)
        rest = [i for i in range(len(ks)) if i not in taken]
        rows = host_tensor(rest, torch.long, dev)  # [F]
        tokens[rows] = _whole_rows(_rows(scaled, rows), [ks[i] for i in rest], [top_p[i] for i in rest], uniform[rows])
    return tokens


def _whole_rows(scaled: torch.Tensor, ks: list[int], top_p: Sequence[float], uniform: torch.Tensor) -> torch.Tensor:
    """The tokens of rows ``scaled`` ``[F, V]`` drawn over their whole vocabulary, top-k masked (``ks``, 0 = off)."""
    full = _top_k(scaled, ks)  # [F, V]
    peak = full.amax(-1, keepdim=True)  # [F, 1]
    return _argmax_where_bad(peak, full, _draw(full, peak, top_p, uniform))


def _draw(
    logits: torch.Tensor,  # [Q, n] fp32, -inf where dropped
    peak: torch.Tensor,  # [Q, 1] each row's largest logit: NaN where it has a NaN, -inf where nothing is left
    top_p: Sequence[float],  # per row
    uniform: torch.Tensor,  # [Q] float64
) -> torch.Tensor:  # [Q] int64 places in ``logits``' rows
    """The inverse-CDF draw of each row's softmax (its top-p nucleus where ``top_p < 1``) at its ``uniform``."""
    dev = logits.device
    weight = torch.exp(logits - peak)  # [Q, n] unnormalized probabilities, 0 where dropped
    picked = torch.empty(logits.shape[0], dtype=torch.long, device=dev)  # [Q]
    plain = host_tensor([i for i, p in enumerate(top_p) if p >= 1.0], torch.long, dev)  # [P]
    if plain.numel():
        cdf = torch.cumsum(_rows(weight, plain), -1, dtype=torch.float64)  # [P, n]: fp32 would round off tail tokens
        picked[plain] = _invert(cdf, uniform[plain])
    nucleus = [i for i, p in enumerate(top_p) if p < 1.0]
    if nucleus:
        rows = host_tensor(nucleus, torch.long, dev)  # [N]
        ids, kept = nucleus_weights(_rows(weight, rows), [top_p[i] for i in nucleus], partial=dev.type == "cpu")
        pick = _invert(kept.cumsum(-1), uniform[rows]).clamp_(max=kept.shape[1] - 1)  # [N]
        picked[rows] = ids.gather(1, pick[:, None])[:, 0]
    return picked.clamp_(max=logits.shape[1] - 1)


def _argmax_where_bad(peak: torch.Tensor, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:  # [Q]
    """``tokens``, with each row whose ``peak`` [Q, 1] is not finite (nothing to sample from, or a +inf logit) taking
    its argmax of ``logits`` [Q, V] instead."""
    bad = ~torch.isfinite(peak[:, 0])  # [Q]
    if logits.device.type == "cpu" and not bool(bad.any()):  # the CPU's argmax walks every row: only when needed
        return tokens
    return torch.where(bad, logits.argmax(-1), tokens)


def _candidates(
    logits: torch.Tensor, ks: list[int]
) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:  # [S, V] -> [S, k], [S, k], per row
    """Each row's ``k`` largest logits (``-inf`` past its own ``k``) and their ids, both in vocabulary order, and
    whether another logit ties with its ``k``-th (the filter keeps every tie, so that row cannot use these)."""
    k = max(ks)
    values, ids = torch.topk(logits, k + 1, dim=-1)  # [S, k + 1] each, most likely first
    at = torch.tensor(ks)  # [S] each k < V, so the (k+1)-th is there
    kth = values.gather(1, (at - 1)[:, None])[:, 0]  # [S]
    after = values.gather(1, at[:, None])[:, 0]  # [S] the (k+1)-th
    tied = ((after == kth) & (kth > float("-inf"))).tolist()
    values, ids = values[:, :k], ids[:, :k]  # [S, k] each
    values = values.masked_fill(torch.arange(k)[None, :] >= at[:, None], float("-inf"))  # [S, k]
    ids, order = ids.sort(-1)  # [S, k]: vocabulary order, as the whole row's cumulative weights run
    return values.gather(1, order), ids, tied


def _ks(top_k: Sequence[int], vocab: int) -> list[int]:
    """Each row's top-k as a filter: 0 where it keeps every token (off, or a k past the vocabulary)."""
    return [k if 0 < k < vocab else 0 for k in top_k]


def nucleus_weights(weight: torch.Tensor, top_p: Sequence[float], partial: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-p tokens of each row of unnormalized probabilities ``weight`` ``[Q, V]``: the ids of its ``m`` largest
    ``[Q, m]`` (most likely first) and their weights in float64 ``[Q, m]``, zero for those past the nucleus (the
    tokens :func:`filter_rows` keeps for ``top_p``; every token past the ``m`` is dropped). ``partial``: ``m`` from
    64 up, 4x while some row's nucleus is longer (each try reads the rows' masses on the host); else the whole
    vocabulary at once."""
    p = host_tensor(list(top_p), torch.float64, weight.device)  # [Q]
    total = weight.sum(-1, dtype=torch.float64)  # [Q]
    m = min(_FIRST_NUCLEUS if partial else weight.shape[1], weight.shape[1])
    while True:
        if m == weight.shape[1]:  # the whole row (a GPU's one pass: nothing waits for the device)
            top, ids = torch.sort(weight, dim=-1, descending=True, stable=True)  # [Q, V] each, ties in vocabulary order
            mass = torch.cumsum(top, -1, dtype=torch.float64) / total[:, None]  # [Q, V]
            break
        top, ids = torch.topk(weight, m, dim=-1)  # [Q, m] each, most likely first
        mass = torch.cumsum(top, -1, dtype=torch.float64) / total[:, None]  # [Q, m]
        if bool(((mass[:, -1] >= p) | ~torch.isfinite(total)).all()):  # a NaN row takes its argmax
            if bool((top[:, 1:] == top[:, :-1]).any()):  # tied weights, in topk's order: put them in vocabulary order
                top, ids = _ordered(weight, ids)
                mass = torch.cumsum(top, -1, dtype=torch.float64) / total[:, None]  # [Q, m]
            break
        m = min(4 * m, weight.shape[1])
    before = mass - top.double() / total[:, None]  # [Q, m] mass of the more likely tokens
    return ids, top.double().masked_fill(before >= p[:, None], 0.0)


def _ordered(weight: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [Q, m] each
    """The weights of ``ids`` ``[Q, m]`` and their ids, most likely first and tied ones in vocabulary order (as
    :func:`filter_rows`' stable sort has them), so which of two tied tokens a nucleus keeps does not depend on the
    device or the ``topk`` kernel."""
    ids = ids.sort(-1).values  # [Q, m] vocabulary order
    top, order = torch.sort(weight.gather(1, ids), dim=-1, descending=True, stable=True)  # [Q, m] each
    return top, ids.gather(1, order)


def _rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # [R, V], [Q] -> [Q, V]
    """``x``'s rows ``rows``, without a copy when they are all of them (the usual case: one kind of row)."""
    return x if rows.numel() == x.shape[0] else x.index_select(0, rows)


def _invert(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:  # [Q, m] float64, [Q] float64 -> [Q]
    """The first index whose cumulative weight passes ``u`` times the row's total (a zero weight is never picked)."""
    total = cdf[:, -1]  # [Q]
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # [Q]
    return torch.searchsorted(cdf, target[:, None].contiguous(), right=True)[:, 0]  # below the total: never past it
