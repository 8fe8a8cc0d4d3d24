"""The Triton paged decode attention (a CUDA kernel), checked on the CPU through Triton's interpreter."""

from __future__ import annotations

import textwrap

import pytest
import torch

import llmspeed
from llmspeed import Generator, SamplingParams
from llmspeed.generation import triton_attention

pytest.importorskip("triton", reason="triton is part of the test extra (and ships with CUDA builds of torch)")

# Runs in a fresh interpreter: TRITON_INTERPRET must be set before the kernel is compiled.
_KERNEL = textwrap.dedent(
    """
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from llmspeed.generation import triton_attention as ta

    g = torch.Generator().manual_seed(0)
    checked = 0
    # (kv heads, query heads, head dim, block size): GQA groups of 1, 2, 3 and 8; blocks of 16 and 8 tokens
    for kvh, h, d, bs in ((2, 4, 16, 16), (3, 9, 64, 16), (1, 8, 32, 8), (4, 4, 16, 8)):
        for dtype in (torch.float32, torch.bfloat16):
            blocks = 40
            kc = torch.randn(blocks, bs, kvh, d, generator=g).to(dtype)
            vc = torch.randn(blocks, bs, kvh, d, generator=g).to(dtype)
            lens = torch.tensor([1, 2, bs, bs + 1, 64, 65, 127, 150])  # across blocks and the kernel's 64-token tiles
            width = -(-int(lens.max()) // bs)
            tables = torch.stack([torch.randperm(blocks, generator=g)[:width] for _ in lens])  # [n, W], scattered
            q = torch.randn(len(lens), h, d, generator=g).to(dtype)
            got = ta.paged_decode(q, kc, vc, tables.int(), lens.int(), 0.3)
            want = ta.reference(q, kc, vc, tables, lens, 0.3)
            assert got.dtype == dtype and got.shape == (len(lens), h, d)
            err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
            assert err < (1e-5 if dtype == torch.float32 else 2e-2), (kvh, h, d, bs, dtype, err)
            # a row reads only its own context: garbage past a row's length changes nothing
            kc2, vc2 = kc.clone(), vc.clone()
            t0 = tables[0, 0]
            kc2[t0, 1:], vc2[t0, 1:] = 1e4, -1e4
            again = ta.paged_decode(q[:1], kc2, vc2, tables[:1], lens[:1], 0.3)
            assert torch.equal(again, got[:1])
            checked += 1
    print("checked", checked)
    """
)

_PREFILL = textwrap.dedent(
    """
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from llmspeed.generation import triton_attention as ta

    g = torch.Generator().manual_seed(1)
    checked = 0
    for kvh, h, d, bs in ((2, 4, 16, 16), (3, 9, 64, 8), (1, 8, 32, 16)):
        for dtype in (torch.float32, torch.bfloat16):
            blocks = 64
            kc = torch.randn(blocks, bs, kvh, d, generator=g).to(dtype)
            vc = torch.randn(blocks, bs, kvh, d, generator=g).to(dtype)
            # (start, length): from position 0, continuing mid-block, longer than a 64-query tile
            spans = [(0, 5), (7, 70), (30, 65), (0, 130)]
            free = torch.randperm(blocks, generator=g).tolist()
            chunks, row = [], 3  # three decode rows come first in the flat batch
            for start, n in spans:
                need = -(-(start + n) // bs)
                chunks.append((free[:need], start, n, row))
                free, row = free[need:], row + n
            q = torch.randn(row, h, d, generator=g).to(dtype)
            plan = ta.prefill_plan(chunks, bs, torch.device("cpu"))
            assert plan.tile_chunk.tolist() == [0, 1, 1, 2, 2, 3, 3, 3]
            got = torch.full((row, h, d), 7.0, dtype=dtype)
            want = got.clone()
            ta.paged_prefill(q, kc, vc, plan, 0.2, got)
            ta.prefill_reference(q, kc, vc, plan, 0.2, want)
            assert (got[:3] == 7).all(), "rows that are not prefill rows must be left alone"
            err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
            assert err < (1e-5 if dtype == torch.float32 else 2e-2), (kvh, h, d, bs, dtype, err)
            # causal: changing the key and value at position p changes the rows of queries at p and after only
            table, start, n, first = chunks[1]
            p = start + 10
            kc2, vc2 = kc.clone(), vc.clone()
            kc2[table[p // bs], p % bs] = 3.0
            vc2[table[p // bs], p % bs] = 1e3
            again = got.clone()
            ta.paged_prefill(q, kc2, vc2, plan, 0.2, again)
            assert torch.equal(again[first : first + 10], got[first : first + 10])
            assert not torch.equal(again[first + 10], got[first + 10])
            checked += 1
    print("checked", checked)
    """
)

_GENERATOR = textwrap.dedent(
    """
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import llmspeed
    from llmspeed import Generator, SamplingParams

    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (int(n),), generator=g).tolist() for n in (3, 17, 40, 70)]
    sp = SamplingParams(max_new_tokens=12, ignore_eos=True)
    for arch in ("llama", "qwen3"):
        model = llmspeed.models.tiny(arch, seed=1)
        kw = dict(progress=False, fused_decode=False, block_size=8, max_batch_tokens=48)
        triton = Generator(model, attention="triton", **kw)
        assert triton.attention_status == "triton"
        sdpa = Generator(model, attention="sdpa", **kw)
        hybrid = Generator(model, attention="triton", **kw)
        hybrid.prefill_kernel = None  # what attention="auto" runs on CUDA: Triton decode, SDPA prefill
        a = [o.token_ids for o in triton.generate_batched(prompts, sp)]
        b = [o.token_ids for o in sdpa.generate_batched(prompts, sp)]
        c = [o.token_ids for o in hybrid.generate_batched(prompts, sp)]
        assert a == b == c, (arch, a, b, c)
        assert triton.stats.step_paths["decode"][0] > 0 and triton.stats.step_paths["mixed"][0] > 1
    print("same tokens")
    """
)


def test_paged_decode_matches_gather_sdpa_in_the_interpreter(run_script):
    assert "checked 8" in run_script(_KERNEL)


def test_paged_prefill_matches_per_chunk_sdpa_in_the_interpreter(run_script):
    assert "checked 6" in run_script(_PREFILL)


def test_generator_with_triton_attention_matches_sdpa_in_the_interpreter(run_script):
    assert "same tokens" in run_script(_GENERATOR)


def test_attention_choice_and_errors():
    model = llmspeed.models.tiny("llama")
    from llmspeed.generation import fused_decode

    cpu_auto = "C++ paged decode, sdpa prefill" if fused_decode.unavailable() is None else "sdpa ("
    assert Generator(model, progress=False).attention_status.startswith(cpu_auto)  # auto on the CPU
    assert Generator(model, progress=False, attention="sdpa").runner.per_layer_attention == "sdpa"
    with pytest.raises(ValueError, match="attention must be 'auto', 'sdpa' or 'triton'; got 'flash'"):
        Generator(model, progress=False, attention="flash")
    if not triton_attention.interpreted():
        with pytest.raises(ValueError, match="attention='triton' cannot run here: .*CUDA"):
            Generator(model, progress=False, attention="triton")
    assert triton_attention.probe(torch.device("cpu"), torch.float32, 2, 4, 16) is not None or (
        triton_attention.interpreted()
    )


def test_paged_attention_refuses_operands_the_kernels_would_misread():
    # the kernels index dense caches and out, and run H / Hkv query heads per KV head: a strided view of a
    # cache, a strided out or 3 heads over 2 KV heads ran and returned wrong numbers, with no error
    cache = torch.zeros(8, 16, 4, 16)[:, :, :2]  # [NB, BS, Hkv, D], a view of every other pair of heads
    dense = cache.contiguous()
    tables, lens = torch.zeros(1, 2, dtype=torch.long), torch.ones(1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"key_cache must be contiguous .* strides \(1024, 64, 16, 1\)"):
        triton_attention.paged_decode(torch.zeros(1, 4, 16), cache, dense, tables, lens, 0.25)
    with pytest.raises(ValueError, match="value_cache must be contiguous"):
        triton_attention.paged_decode(torch.zeros(1, 4, 16), dense, cache, tables, lens, 0.25)
    with pytest.raises(ValueError, match=r"H a multiple of Hkv; got query \(1, 3, 16\)"):
        triton_attention.paged_decode(torch.zeros(1, 3, 16), dense, dense, tables, lens, 0.25)
    with pytest.raises(ValueError, match="head_dim must be a power of two >= 16 .* got 80"):
        triton_attention.paged_decode(torch.zeros(1, 4, 80), dense, dense, tables, lens, 0.25)
    plan = triton_attention.prefill_plan([([0, 1], 0, 20, 0)], 16, torch.device("cpu"))
    query = torch.zeros(20, 4, 16)
    with pytest.raises(ValueError, match="key_cache must be contiguous"):
        triton_attention.paged_prefill(query, cache, dense, plan, 0.25, torch.zeros(20, 4, 16))
    with pytest.raises(ValueError, match=r"out must be contiguous .* shape \(20, 4, 16\)"):
        triton_attention.paged_prefill(query, dense, dense, plan, 0.25, torch.zeros(20, 4, 32)[:, :, :16])


@pytest.mark.parametrize("value", ["1", "true", "ON", "Yes", "y", "", "0", "false", "off", "no", "2"])
def test_interpreted_reads_triton_interpret_as_triton_does(monkeypatch, value):
    # "false", "off", "no" (Triton: compile for a GPU) read as "interpreted": on a machine without CUDA the
    # kernels then claimed to be available, and on a GPU the attention ran its interpreter-only fp32 upcast
    from triton import knobs

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert triton_attention.interpreted() is knobs.runtime.interpret
    if not knobs.runtime.interpret and not torch.cuda.is_available():
        assert triton_attention.unavailable("cuda") == "no CUDA device"


def test_warmup_without_cuda_graphs_is_a_no_op():
    gen = Generator(llmspeed.models.tiny("llama"), progress=False)
    assert gen.graphs is None and gen.warmup() == 0
    out = gen.generate_batched([[1, 2, 3]], SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert len(out[0].token_ids) == 3
    paths = gen.stats.step_paths
    assert sum(n for n, _ in paths.values()) == gen.stats.steps and all(t >= 0 for _, t in paths.values())
    assert set(paths) <= {"mixed", "decode", "fused cpu", "fused cpu mixed"}
    assert len({"mixed", "fused cpu mixed"} & set(paths)) == 1  # the prompt's step, one way or the other


@pytest.mark.gpu
def test_cuda_graphs_with_triton_attention_match_sdpa():
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 256, (int(n),), generator=g).tolist() for n in (3, 30, 90, 200, 5, 64)]
    sp = SamplingParams(max_new_tokens=24, ignore_eos=True)
    model = llmspeed.models.tiny("llama", seed=0)
    model.hf.to("cuda")
    outs = {}
    status = {"sdpa": "sdpa", "triton": "triton", "auto": "triton decode, sdpa prefill"}
    for attention in ("sdpa", "triton", "auto"):
        gen = Generator(model, progress=False, kv_cache_tokens=4096, max_batch_tokens=128, attention=attention)
        assert gen.attention_status.split(";")[0] == status[attention]  # auto: "; new prompts: sdpa (fp32)"
        assert gen.warmup(context=512) >= 4  # batch sizes 1, 2, 4, 8, ... up to max_seqs
        outs[attention] = [o.token_ids for o in gen.generate_batched(prompts, sp)]
        assert gen.stats.step_paths["cuda graph"][0] > 0, gen.stats.step_paths
    assert outs["triton"] == outs["sdpa"] == outs["auto"]
