"""The C++ paged decode attention kernel against gather + SDPA and softmax attention over any layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmspeed
from llmspeed import Generator, SamplingParams
from llmspeed.generation import fused_decode

pytestmark = pytest.mark.skipif(fused_decode.extension() is None, reason="no C++ compiler: the generic path runs")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_paged_decode_kernel_equals_gather_and_sdpa(dtype):
    """The generic path's CPU decode attention reads the blocks in place and agrees with gather + SDPA."""
    torch.manual_seed(0)
    n, heads, kv_heads, dim, num_blocks, bs = 5, 9, 3, 64, 20, 16
    q = torch.randn(n, heads, dim).to(dtype)
    k, v = (torch.randn(num_blocks, bs, kv_heads, dim).to(dtype) for _ in range(2))
    tables = torch.randperm(num_blocks)[: n * 4].view(n, 4)  # [n, W]
    lens = torch.tensor([1, 17, 33, 64, 40])
    out = fused_decode.paged_decode(q, k, v, tables, lens, 0.125)  # [n, H, D]
    assert out.dtype == dtype and out.shape == (n, heads, dim)
    for i in range(n):
        ctx = int(lens[i])
        kk, vv = (c[tables[i]].reshape(-1, kv_heads, dim)[:ctx].float().repeat_interleave(3, 1).transpose(0, 1)
                  for c in (k, v))  # [H, L, D]  # fmt: skip
        ref = torch.nn.functional.scaled_dot_product_attention(q[i].float()[:, None], kk, vv, scale=0.125)[:, 0]
        assert (out[i].float() - ref).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize(
    "heads, kv_heads, dim, lens",
    [
        (9, 3, 64, [300]),  # one sequence: its positions split over the threads, partial softmaxes merged
        (9, 3, 64, [1, 63, 64, 65, 130, 4, 17, 200, 9]),  # more sequences than twice the threads: one range each
        (8, 2, 128, [129, 3]),  # head dim 128 (two heads' outputs in registers at once), group of 4
        (7, 7, 64, [250]),  # no grouping
        (14, 2, 64, [70, 190]),  # groups of 7: four heads, then three
        (6, 3, 40, [150, 31]),  # a head dim that is no whole number of registers: the generic loops
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_paged_decode_kernel_covers_every_layout(heads, kv_heads, dim, lens, dtype):
    """Every code path of the CPU decode attention (head dims, group sizes, split and whole sequences) agrees
    with gather + SDPA; positions come through shuffled block tables."""
    torch.manual_seed(1)
    n, bs = len(lens), 16
    width = max(-(-ctx // bs) for ctx in lens)
    q = torch.randn(n, heads, dim).to(dtype)
    k, v = (torch.randn(n * width + 2, bs, kv_heads, dim).to(dtype) for _ in range(2))
    tables = torch.randperm(n * width + 2)[: n * width].view(n, width)  # [n, W]
    out = fused_decode.paged_decode(q, k, v, tables, torch.tensor(lens), dim**-0.5)  # [n, H, D]
    group = heads // kv_heads
    for i, ctx in enumerate(lens):
        kk, vv = (c[tables[i]].reshape(-1, kv_heads, dim)[:ctx].float().repeat_interleave(group, 1).transpose(0, 1)
                  for c in (k, v))  # [H, L, D]  # fmt: skip
        ref = torch.nn.functional.scaled_dot_product_attention(q[i].float()[:, None], kk, vv, scale=dim**-0.5)[:, 0]
        assert (out[i].float() - ref).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2), (i, ctx)


@settings(max_examples=30, deadline=None)
@given(
    kv_heads=st.integers(1, 4),
    group=st.integers(1, 5),
    dim=st.sampled_from([8, 16, 24, 40, 64, 128]),
    lens=st.lists(st.integers(0, 300), min_size=1, max_size=6),
    block=st.sampled_from([1, 4, 16]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_paged_decode_kernel_equals_softmax_attention(kv_heads, group, dim, lens, block, dtype, seed):
    """Any head layout, context lengths from 0 (an empty sequence gives zeros) and block size against softmax
    attention over the same cached values in fp32."""
    g = torch.Generator().manual_seed(seed)
    n, heads = len(lens), kv_heads * group
    width = max(1, max(-(-ctx // block) for ctx in lens))
    q = torch.randn(n, heads, dim, generator=g)
    k, v = (torch.randn(n * width + 1, block, kv_heads, dim, generator=g).to(dtype) for _ in range(2))
    tables = torch.randperm(n * width + 1, generator=g)[: n * width].view(n, width)  # [n, W]
    out = fused_decode.paged_decode(q, k, v, tables, torch.tensor(lens), dim**-0.5)  # [n, H, D]
    for i, ctx in enumerate(lens):
        if ctx == 0:
            assert torch.equal(out[i], torch.zeros(heads, dim))
            continue
        kk, vv = (c[tables[i]].reshape(-1, kv_heads, dim)[:ctx].float().repeat_interleave(group, 1) for c in (k, v))  # [L, H, D]
        w = torch.einsum("hd,lhd->hl", q[i], kk).mul(dim**-0.5).softmax(-1)  # [H, L]
        ref = torch.einsum("hl,lhd->hd", w, vv)  # [H, D]
        assert (out[i] - ref).abs().max() < 1e-4, (i, ctx)


def test_generic_decode_with_the_cpp_attention_gives_the_sdpa_tokens():
    model = llmspeed.models.tiny("llama", seed=0)
    prompts = [[1, 2, 3], list(range(40, 90)), [7] * 17]
    sp = SamplingParams(max_new_tokens=12, ignore_eos=True)
    auto = Generator(model, progress=False, block_size=8, fused_decode=False)
    sdpa = Generator(model, progress=False, block_size=8, fused_decode=False, attention="sdpa")
    assert auto.attention_status.startswith("C++ paged decode") and auto.runner.decode_kernel is not None
    assert [o.token_ids for o in auto.generate_batched(prompts, sp)] == [o.token_ids for o in sdpa.generate_batched(prompts, sp)]
