"""Prompt chunks that all start their sequences, through one packed causal kernel (FlashAttention varlen on CUDA).

On the CPU the plumbing runs with the SDPA reference in the kernel's place, and the CUDA call with a stand-in for
torch's ``varlen_attn``; ``pytest -m gpu`` runs the real kernel against SDPA.
"""

from __future__ import annotations

import pytest
import torch

import llmspeed
from llmspeed.generation import varlen_attention
from llmspeed.generation.kv_cache import PagedAttention, PagedKVCache, cu_seq
from llmspeed.protocol import ModelSpec

SPEC = ModelSpec("Test", 1, 4, 2, 8, 32, 10, 64, torch.float32, torch.device("cpu"))


def _step(chunks, gen):
    """Queries, keys and values ``[1, heads, T, 8]`` of a step of ``chunks`` ``(table, start, length)``."""
    t = sum(n for _, _, n in chunks)
    return (torch.randn(1, 4, t, 8, generator=gen), torch.randn(1, 2, t, 8, generator=gen),
            torch.randn(1, 2, t, 8, generator=gen))  # fmt: skip


def _counting(calls):
    def kernel(*args):
        calls.append(args[3].tolist())
        varlen_attention.fresh_reference(*args)

    return kernel


def test_chunks_that_all_start_their_sequences_run_packed_and_match_the_paged_path():
    """Two decode rows, then three prompt chunks from position 0: the packed kernel (here the SDPA reference) gives
    what gather + masked SDPA gives over the paged cache, in the same rows."""
    gen = torch.Generator().manual_seed(0)
    tables = [[1, 2], [3, 4], [5], [6, 7, 8], [9, 10]]
    chunks = [(tables[0], 5, 1), (tables[1], 2, 1), (tables[2], 0, 3), (tables[3], 0, 9), (tables[4], 0, 6)]
    q, k, v = _step(chunks, gen)
    outs, calls = [], []
    for fresh in (None, _counting(calls)):
        cache = PagedKVCache(SPEC, num_blocks=16, block_size=4)
        cache.key.copy_(torch.randn(cache.key.shape, generator=torch.Generator().manual_seed(1)))  # decode rows' context
        cache.value.copy_(torch.randn(cache.value.shape, generator=torch.Generator().manual_seed(2)))
        outs.append(PagedAttention(cache, chunks, fresh_kernel=fresh)(0, q, k, v, 8**-0.5)[0])  # [T, H, D]
    assert calls == [[0, 3, 12, 18]]  # once per layer call, the three chunks' boundaries
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunks", [
    [((1, 2), 0, 3), ((3, 4), 4, 2)],  # a chunk continues a cached prefix: its keys are in the cache
    [((1, 2), 0, 5)],  # one chunk: SDPA's causal kernel, as before
    [((1, 2), 3, 1), ((3,), 1, 1)],  # decode rows only
], ids=["continued chunk", "one chunk", "decode only"])  # fmt: skip
def test_the_packed_kernel_runs_only_when_every_chunk_starts_its_sequence(chunks):
    calls = []
    q, k, v = _step(chunks, torch.Generator().manual_seed(0))
    PagedAttention(PagedKVCache(SPEC, num_blocks=16, block_size=4), chunks, fresh_kernel=_counting(calls))(0, q, k, v, 1.0)
    assert calls == []


def test_fresh_prefill_calls_torchs_varlen_kernel_causal_with_grouped_heads(monkeypatch):
    """The CUDA call's arguments, with a stand-in for ``varlen_attn`` (the real one needs a GPU): packed contiguous
    tensors, the chunks' boundaries for queries and keys alike, the longest chunk, causal ``window_size=(-1, 0)``,
    and grouped-query heads left grouped (``enable_gqa``)."""
    from torch.nn.attention import varlen

    seen = {}

    def fake(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False, **rest):
        seen.update(shapes=(q.shape, k.shape), cu=(cu_q.tolist(), cu_k.tolist()), longest=(max_q, max_k),
                    window=tuple(window_size), gqa=enable_gqa, contiguous=q.is_contiguous() and k.is_contiguous())  # fmt: skip
        out = torch.empty_like(q)
        varlen_attention.fresh_reference(q, k, v, cu_q, max_q, scale, out)
        return out

    monkeypatch.setattr(varlen, "varlen_attn", fake)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(4, 11, 8, generator=gen).transpose(0, 1)  # [T, H, D], not contiguous, as the step hands it over
    k, v = torch.randn(11, 2, 8, generator=gen), torch.randn(11, 2, 8, generator=gen)
    cu = cu_seq([4, 7], torch.device("cpu"))
    got, want = torch.zeros(11, 4, 8), torch.zeros(11, 4, 8)
    varlen_attention.fresh_prefill(q, k, v, cu, 7, 0.3, got)
    varlen_attention.fresh_reference(q, k, v, cu, 7, 0.3, want)
    assert seen == {"shapes": ((11, 4, 8), (11, 2, 8)), "cu": ([0, 4, 11], [0, 4, 11]), "longest": (7, 7),
                    "window": (-1, 0), "gqa": True, "contiguous": True}  # fmt: skip
    torch.testing.assert_close(got, want)


def test_fresh_prefill_takes_an_older_torchs_varlen_kernel(monkeypatch):
    """torch 2.9's ``varlen_attn`` says ``is_causal`` (no ``window_size``), has no ``enable_gqa`` and no ``scale`` (it
    scales by 1/sqrt(D)): the call asks for causal attention its way, expands the grouped keys and values to every
    query head and puts the rest of a scale on the queries."""
    from torch.nn.attention import varlen

    seen = {}

    def old(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        seen.update(causal=is_causal, heads=(query.shape[1], key.shape[1], value.shape[1]))
        out = torch.empty_like(query)
        varlen_attention.fresh_reference(query, key, value, cu_seq_q, max_q, query.shape[-1] ** -0.5, out)
        return out

    monkeypatch.setattr(varlen, "varlen_attn", old)
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(9, 4, 8, generator=gen), torch.randn(9, 2, 8, generator=gen), torch.randn(9, 2, 8, generator=gen)
    cu = cu_seq([2, 7], torch.device("cpu"))
    got, want = torch.zeros(9, 4, 8), torch.zeros(9, 4, 8)
    varlen_attention.fresh_prefill(q, k, v, cu, 7, 0.3, got)
    varlen_attention.fresh_reference(q, k, v, cu, 7, 0.3, want)
    assert seen == {"causal": True, "heads": (4, 4, 4)}
    torch.testing.assert_close(got, want)


def test_off_cuda_the_probe_says_why_and_generators_keep_their_attention():
    assert "CUDA" in varlen_attention.probe(torch.device("cpu"), torch.bfloat16, 2, 4, 8)
    gen = llmspeed.Generator(llmspeed.models.tiny("llama", seed=0), progress=False)
    assert gen.runner.fresh_kernel is None and "new prompts" not in gen.attention_status


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_varlen_matches_the_paged_path_on_cuda(dtype):
    """A whole tiny Llama's mixed step (decode rows and new prompts) on CUDA: the logits with FlashAttention's varlen
    kernel for the new prompts against gather + masked SDPA."""
    dev = torch.device("cuda")
    assert varlen_attention.probe(dev, dtype, 2, 4, 16) is None
    model = llmspeed.models.tiny("llama", seed=0, dtype=dtype)
    model.hf.to(dev)
    spec = model.spec
    assert varlen_attention.probe(dev, dtype, spec.num_kv_heads, spec.num_heads, spec.head_dim) is None
    lengths = [1, 5, 40, 130]  # a one-token chunk is a decode row: first
    tables = [list(range(20 * i, 20 * i + 20)) for i in range(len(lengths))]
    chunks = [(t, 0, n) for t, n in zip(tables, lengths)]
    ids = torch.randint(0, spec.vocab_size, (sum(lengths),), device=dev)
    positions = torch.cat([torch.arange(n, device=dev) for n in lengths])
    rows = torch.tensor(cu_seq(lengths, dev)[1:].tolist(), device=dev) - 1  # each chunk's last token
    logits = []
    for fresh in (None, varlen_attention.fresh_prefill):
        cache = PagedKVCache(spec, num_blocks=100, block_size=16)
        with torch.inference_mode():
            logits.append(model.forward_batch(ids, positions, PagedAttention(cache, chunks, fresh_kernel=fresh), rows))
    err = (logits[1].float() - logits[0].float()).abs().max() / logits[0].float().abs().max()
    assert err < 2e-2, err
