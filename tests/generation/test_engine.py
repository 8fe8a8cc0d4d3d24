"""The Generator end to end on tiny models: golden tokens vs transformers, whatever the budget, batch, cast,
quantization, adapters or device.

Requests it refuses or fails alone are in test_engine_requests.py; aborts, stops, streaming text and run stats in
test_engine_runs.py. The helpers (``CharTokenizer``, ``ChatTokenizer``, ...) live in conftest.py and stay importable
from here.
"""

from __future__ import annotations

import pytest
import torch

import llmspeed
from llmspeed import Generator, SamplingParams
from llmspeed.generation import fused_decode
from tests.generation.conftest import CharTokenizer, ChatTokenizer, _hf_greedy, _ids, _prompts  # noqa: F401  (other tests import them from here)


@pytest.mark.parametrize("fused_decode", [None, False], ids=["fused-decode-auto", "generic-path"])
def test_greedy_matches_transformers_generate_on_every_architecture(tiny_model, fused_decode):
    prompts = _prompts(6, seed=1)
    lengths = [12, 1, 20, 7, 16, 9]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lengths]
    outs = tiny_model.generate_batched(
        prompts, params, progress=False, max_batch_tokens=40, kv_cache_tokens=1024, fused_decode=fused_decode
    )
    for prompt, n, out in zip(prompts, lengths, outs):
        assert out.finish_reason == "length"
        assert out.token_ids == _hf_greedy(tiny_model, prompt, n)


def test_same_tokens_whatever_the_kv_budget_and_batch_composition(llama):
    prompts = _prompts(24, lo=8, hi=80, seed=2)
    params = [SamplingParams(max_new_tokens=4 + (i * 7) % 29, ignore_eos=True) for i in range(24)]
    big = Generator(llama, progress=False, kv_cache_tokens=8192, max_batch_tokens=2048)
    reference = _ids(big.generate_batched(prompts, params))
    assert big.stats.preemptions == 0
    small = Generator(llama, progress=False, kv_cache_tokens=512, block_size=16, max_batch_tokens=128)
    outs = small.generate_batched(prompts, params)
    assert small.stats.preemptions > 0
    assert [o.finish_reason for o in outs] == ["length"] * 24
    assert _ids(outs) == reference
    assert small.blocks.num_free == small.blocks.num_blocks
    one_by_one = [Generator(llama, progress=False).generate_batched([p], s)[0].token_ids for p, s in zip(prompts[:3], params)]
    assert one_by_one == reference[:3]
    chunked = Generator(llama, progress=False, max_batch_tokens=7, block_size=4).generate_batched(prompts[:4], params[:4])
    assert _ids(chunked) == reference[:4]


def test_seeded_sampling_is_reproducible_regardless_of_batch(llama):
    p = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=50, top_p=0.95, seed=11, ignore_eos=True)
    alone = Generator(llama, progress=False).generate_batched([[9, 8, 7]], p)[0].token_ids
    others = [SamplingParams(max_new_tokens=7, temperature=1.0, seed=i) for i in range(4)]
    outs = Generator(llama, progress=False, max_batch_tokens=16).generate_batched(
        _prompts(4, seed=5)[:2] + [[9, 8, 7]] + _prompts(2, seed=6), others[:2] + [p] + others[2:]
    )
    assert outs[2].token_ids == alone
    unseeded = SamplingParams(max_new_tokens=10, temperature=1.0)
    draws = {tuple(o.token_ids) for o in Generator(llama, progress=False).generate_batched([[9, 8, 7]] * 4, unseeded)}
    assert len(draws) > 1


@pytest.mark.parametrize("variant", ["bf16", "int8", "int4"])
def test_cast_and_quantized_models_run(variant):
    model = llmspeed.models.tiny("llama", seed=0)
    if variant == "bf16":
        llmspeed.cast(model, "bf16")
    else:
        llmspeed.quantize(model, variant)
    prompts = _prompts(5, seed=7)
    outs = Generator(model, progress=False, kv_cache_tokens=256, max_batch_tokens=32).generate_batched(
        prompts, SamplingParams(max_new_tokens=6, ignore_eos=True)
    )
    assert all(o.finish_reason == "length" and len(o.token_ids) == 6 for o in outs)
    again = Generator(model, progress=False).generate_batched(prompts, SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert _ids(again) == _ids(outs)


def test_per_request_lora_adapters(llama):
    from llmspeed import lora

    lora.add_adapter(llama, "a", r=4)
    with torch.no_grad():
        for _, layer in lora.lora_layers(llama):
            for name, param in layer.named_parameters():
                if "lora" in name:
                    param.normal_(0, 0.5, generator=torch.Generator().manual_seed(hash(name) % 1000))
    prompts = _prompts(4, seed=8)
    sp = SamplingParams(max_new_tokens=8, ignore_eos=True)
    adapted = _ids(Generator(llama, progress=False).generate_batched(prompts, sp))  # "a" is active
    lora.set_adapter(llama, None)  # requests without an adapter now run the base model
    base = _ids(Generator(llama, progress=False).generate_batched(prompts, sp))
    assert adapted != base
    mixed = [SamplingParams(max_new_tokens=8, ignore_eos=True, adapter=n) for n in (None, "a", None, "a")]
    outs = Generator(llama, progress=False).generate_batched(prompts, mixed)
    assert _ids(outs) == [base[0], adapted[1], base[2], adapted[3]]
    bad = Generator(llama, progress=False).generate_batched(prompts[:2], [sp, SamplingParams(adapter="nope")])
    assert bad[0].token_ids == base[0]
    assert bad[1].finish_reason == "error" and "nope" in bad[1].error


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smollm2_cached):
    from llmspeed.eval import pydoc_text

    model = smollm2_cached
    ids = model.tokenizer.encode(pydoc_text("eval")[:20000])
    g = torch.Generator().manual_seed(0)
    prompts = []
    for _ in range(32):
        n = int(torch.randint(8, 96, (), generator=g))
        s = int(torch.randint(0, len(ids) - n, (), generator=g))
        prompts.append(ids[s : s + n])
    n_new = 12
    gen = Generator(model, progress=False, max_batch_tokens=256)
    assert gen.fused_decode_status == "on" or fused_decode.extension() is None
    outs = gen.generate_batched(prompts, SamplingParams(max_new_tokens=n_new, ignore_eos=True))
    same = sum(o.token_ids == _hf_greedy(model, p, n_new) for p, o in zip(prompts, outs))
    assert same >= 31, f"only {same}/32 requests identical to transformers generate"
    assert outs[0].text == model.tokenizer.decode(outs[0].token_ids, skip_special_tokens=True)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    prompts = _prompts(6, seed=9)
    sp = SamplingParams(max_new_tokens=10, ignore_eos=True)
    cpu = _ids(Generator(llmspeed.models.tiny("llama", seed=0), progress=False).generate_batched(prompts, sp))
    model = llmspeed.models.tiny("llama", seed=0)
    model.hf.to("cuda")
    eager = Generator(model, progress=False, kv_cache_tokens=1024, max_batch_tokens=16, cuda_graphs=False)
    assert eager.cache.key.is_cuda and eager.graphs is None
    assert _ids(eager.generate_batched(prompts, sp)) == cpu
    graphs = Generator(model, progress=False, kv_cache_tokens=1024, max_batch_tokens=64)
    assert _ids(graphs.generate_batched(prompts, sp)) == cpu
    assert graphs.graphs.enabled and graphs.graphs._graphs, "no decode step was captured"
    seeded = SamplingParams(max_new_tokens=10, temperature=0.8, seed=3, ignore_eos=True)
    a = graphs.generate_batched(prompts, seeded)
    b = eager.generate_batched(prompts, seeded)
    assert sum(x.token_ids == y.token_ids for x, y in zip(a, b)) >= 5


@pytest.mark.parametrize("arch, fields", [("mistral", {"sliding_window": 8}),
                                          ("qwen2", {"sliding_window": 8, "use_sliding_window": True,
                                                     "max_window_layers": 0})])  # fmt: skip
def test_a_sliding_window_model_is_served_up_to_its_window_with_its_own_tokens(arch, fields):
    """Regression: the paged attention attends to every cached token, so past a Mistral (or Qwen2 with
    use_sliding_window) model's window its logits were not the model's (0.34 off transformers' own forward). A
    generator now holds at most the window's tokens, where the two attentions are the same, and says why."""
    model = llmspeed.models.tiny(arch, seed=0, **fields)
    gen = Generator(model, progress=False, block_size=4)
    long, short = gen.generate_batched([list(range(1, 11)), [5, 6, 7]],
                                       SamplingParams(max_new_tokens=20, ignore_eos=True))  # fmt: skip
    assert long.finish_reason == "error" and "sliding window (sliding_window=8" in long.error
    assert short.finish_reason == "length" and len(short.token_ids) == 5  # 3 + 5 = the window
    assert short.token_ids == _hf_greedy(model, [5, 6, 7], 5)
    plain = Generator(llmspeed.models.tiny(arch, seed=0), progress=False)
    assert plain.scheduler.max_seq_len == plain.model.spec.max_positions  # no window: the whole context


def test_a_longrope_model_is_served_up_to_its_original_context_with_its_own_tokens():
    """Regression: longrope (Phi-3's 128k models) rotates every position of a forward pass with its long factors once
    the pass's highest position passes original_max_position_embeddings; a ragged batch is one pass, so a short
    prompt stepped beside a long one was rotated with factors it alone never gets (its logprobs moved by 2e-3 on a
    tiny model, tokens of a real one). A generator now holds at most the original context, and says why."""
    rope = {"rope_type": "longrope", "original_max_position_embeddings": 16, "short_factor": [1.0] * 8,
            "long_factor": [8.0 + i for i in range(8)]}  # fmt: skip
    model = llmspeed.models.tiny("llama", seed=0, rope_scaling=rope)
    gen = Generator(model, progress=False, block_size=4)
    short, other = [5, 6, 7, 8, 9, 10], list(range(20, 28))
    sp = SamplingParams(max_new_tokens=20, ignore_eos=True, logprobs=1)
    alone = gen.generate_batched([short], sp)[0]
    long, batched, beside = gen.generate_batched([list(range(1, 31)), short, other], sp)
    assert long.finish_reason == "error" and "original_max_position_embeddings=16" in long.error
    assert batched.finish_reason == alone.finish_reason == "length" and len(alone.token_ids) == 10  # 6 + 10 = 16
    assert batched.token_ids == alone.token_ids == _hf_greedy(model, short, 10)
    assert beside.token_ids == _hf_greedy(model, other, 8)
    for a, b in zip(alone.logprobs, batched.logprobs):
        assert abs(a.logprob - b.logprob) < 1e-5
    plain = Generator(llmspeed.models.tiny("llama", seed=0), progress=False)
    assert plain.scheduler.max_seq_len == plain.model.spec.max_positions  # default rope: the whole context


@pytest.mark.parametrize("limit", [16.0, 16.5], ids=["integral-float", "fractional-float"])
def test_a_longrope_limit_given_as_a_float_still_bounds_the_context(limit):
    """Regression: original_max_position_embeddings=16.0 (as a JSON config can carry it; transformers takes the float
    and switches to the long factors once seq_len > 16.0) was skipped by an int-only check, so the generator held the
    whole 512-position context and batched short sequences with long ones past the switch. It now holds 16, the
    whole positions below the float (16.5 switches at 17 as well). The refusal names the limit as the config holds it
    (it said original_max_position_embeddings=16 for 16.5)."""
    rope = {"rope_type": "longrope", "original_max_position_embeddings": limit, "short_factor": [1.0] * 8,
            "long_factor": [8.0 + i for i in range(8)]}  # fmt: skip
    gen = Generator(llmspeed.models.tiny("llama", seed=0, rope_scaling=rope), progress=False, block_size=4)
    assert gen.scheduler.max_seq_len == 16
    out = gen.generate_batched([list(range(1, 21))], SamplingParams(max_new_tokens=2))[0]
    assert out.finish_reason == "error" and "holds 16 here" in out.error
    assert f"original_max_position_embeddings={limit}," in out.error  # 16.0 and 16.5, not 16


def test_a_chunked_attention_model_is_served_up_to_its_chunk_with_its_own_tokens():
    """Regression: Llama 4's ``chunked_attention`` layers attend only within ``attention_chunk_size`` tokens; the paged
    attention attends to every cached token, so past the first chunk the tokens were not the model's (a tiny Llama 4
    gave ``24, 24, 24`` where transformers gives ``24, 27, 1``). A generator now holds at most one chunk, and says why."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(
        "llama4_text", hidden_size=32, intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64, num_local_experts=2,
        attention_chunk_size=8, initializer_range=0.3,
    )  # fmt: skip
    model = llmspeed.wrap(transformers.AutoModelForCausalLM.from_config(cfg).eval())
    gen = Generator(model, progress=False, block_size=4)
    long, short = gen.generate_batched([list(range(1, 11)), [5, 6, 7]], SamplingParams(max_new_tokens=20, ignore_eos=True))
    assert long.finish_reason == "error" and "chunked attention (attention_chunk_size=8" in long.error
    assert short.finish_reason == "length" and short.token_ids == _hf_greedy(model, [5, 6, 7], 5)  # 3 + 5 = the chunk
