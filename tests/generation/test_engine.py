"""The Generator end to end on tiny models: golden tokens vs transformers, budgets, errors, streaming."""

from __future__ import annotations

import pytest
import torch

import llmspeed
from llmspeed import GenerationOutput, Generator, SamplingParams
from llmspeed.generation import fused_decode


def _prompts(n: int, lo: int = 3, hi: int = 60, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(0, 256, (k,), generator=g).tolist() for k in lengths]


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.hf.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def _ids(outs: list[GenerationOutput]) -> list[list[int]]:
    return [o.token_ids for o in outs]


class CharTokenizer:
    """A byte-level stand-in tokenizer (256 ids), enough for stop strings and streaming text."""

    eos_token_id = 0

    def __len__(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return [b for b in text.encode("latin-1")]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(i for i in ids if not (skip_special_tokens and i == 0)).decode("latin-1")


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


def test_bad_request_fails_alone(llama):
    ok = _prompts(3, seed=3)
    too_long = list(range(1, 200)) * 3  # 597 tokens > max_position_embeddings 512
    over_budget = list(range(1, 101))  # fits the model but not a 64-token KV budget
    gen = Generator(llama, progress=False, kv_cache_tokens=96, block_size=16)
    outs = gen.generate_batched([ok[0], too_long, ok[1], over_budget, ok[2]], SamplingParams(max_new_tokens=5))
    assert [o.index for o in outs] == [0, 1, 2, 3, 4]
    assert outs[1].finish_reason == "error" and "context" in outs[1].error
    assert outs[3].finish_reason == "error" and "KV cache" in outs[3].error
    alone = Generator(llama, progress=False).generate_batched([ok[0], ok[1], ok[2]], SamplingParams(max_new_tokens=5))
    assert [outs[i].token_ids for i in (0, 2, 4)] == _ids(alone)
    assert all(outs[i].error is None for i in (0, 2, 4))


def test_empty_list_and_argument_errors(llama):
    gen = Generator(llama, progress=False)
    assert gen.generate_batched([]) == []
    assert list(gen.stream([])) == []
    for run in (gen.generate_batched, lambda p, s: list(gen.stream(p, s))):  # regression: unchecked with no prompts
        with pytest.raises(TypeError, match="sampling must be a SamplingParams"):
            run([], "greedy")
        with pytest.raises(ValueError, match=r"one per prompt \(0\); got 2"):
            run([], [SamplingParams(), SamplingParams()])
    with pytest.raises(ValueError, match="one per prompt"):
        gen.generate_batched([[1, 2]], [SamplingParams(), SamplingParams()])
    for prompts in ("hello", "", b""):  # regression: the empty string or bytes ran as no prompts and returned []
        for run in (gen.generate_batched, lambda p: list(gen.stream(p))):
            with pytest.raises(TypeError, match="single string"):
                run(prompts)
    with pytest.raises(TypeError, match=r"single list of token ids \[1, 2, 3\]"):
        gen.generate_batched([1, 2, 3])
    with pytest.raises(TypeError, match="sampling must be a SamplingParams .*; got int"):
        gen.generate_batched([[1, 2]], 5)
    assert gen.num_live == 0
    with pytest.raises(ValueError, match="kv_cache_tokens"):
        Generator(llama, kv_cache_tokens=4, block_size=16)
    for kwargs, message in [
        (dict(max_batch_tokens=2.5), "max_batch_tokens must be an int; got 2.5"),
        (dict(block_size=8.5), "block_size must be an int; got 8.5"),
        (dict(max_seqs="4"), "max_seqs must be an int; got '4'"),
        (dict(kv_cache_tokens="16"), "kv_cache_tokens must be None or an int; got '16'"),
        (dict(block_size=0), "block_size must be >= 1; got 0"),  # not a ZeroDivisionError sizing the cache
        (dict(num_scheduler_steps=0), "num_scheduler_steps must be an int >= 1; got 0"),
        (dict(kv_cache_bytes=100), r"kv_cache_bytes must hold at least one block \(\d+ bytes\); got 100"),
        (dict(eos_token_ids=3), "eos_token_ids must be None or a list of token ids >= 0; got 3"),
        (dict(eos_token_ids=[-5]), r"eos_token_ids must be None or a list of token ids >= 0; got \[-5\]"),
        (dict(chat_template="yes"), "chat_template must be True or False; got 'yes'"),
        (dict(progress="no"), "progress must be True or False; got 'no'"),
        (dict(cuda_graphs=0), "cuda_graphs must be True or False; got 0"),
        (dict(fused_decode=1), "fused_decode must be None, True or False; got 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            Generator(llama, **kwargs)
    assert Generator(llama, progress=False, eos_token_ids=(t for t in [7])).eos_token_ids == {7}
    for model in ("smollm2", llama.module):  # a name or a bare nn.Module: say what a model must be
        with pytest.raises(TypeError, match="model must be an llmspeed.Model"):
            Generator(model)
    out = gen.generate_batched([[1, 300]])[0]
    assert out.finish_reason == "error" and "[0, 256)" in out.error


def test_token_ids_must_be_integers_not_truncated_floats(llama):
    gen = Generator(llama, progress=False)
    sp = SamplingParams(max_new_tokens=3, ignore_eos=True)
    outs = gen.generate_batched([[1.5, 2.7], torch.tensor([1.0, 2.0]), torch.tensor([1, 2]), [1, 2]], sp)
    for out in outs[:2]:
        assert out.finish_reason == "error" and "must be integers" in out.error and out.token_ids == []
    assert outs[2].token_ids == outs[3].token_ids and outs[2].prompt_token_ids == [1, 2]


def test_a_single_tensor_or_array_of_token_ids_is_refused_as_prompts_not_run_per_token(llama):
    """A 1-D tensor / NumPy array (or a list of NumPy ints) given as ``prompts`` is one prompt's ids, refused as a plain
    list of ids is, not run as one failing request per element."""
    import numpy as np

    gen = Generator(llama, progress=False)
    for ids in (torch.tensor([1, 2, 3]), np.array([1, 2, 3]), [np.int64(1), np.int64(2), np.int64(3)]):
        with pytest.raises(TypeError, match=r"single list of token ids \[1, 2, 3\]"):
            gen.generate_batched(ids)
        with pytest.raises(TypeError, match="wrap it in a list"):
            list(gen.stream(ids))
    assert gen.num_live == 0 and not gen.has_unfinished()
    outs = gen.generate_batched(torch.tensor([[1, 2, 3]]), SamplingParams(max_new_tokens=2, ignore_eos=True))
    assert outs[0].prompt_token_ids == [1, 2, 3] and outs[0].finish_reason == "length"  # rows of a 2-D batch: prompts


def test_prompts_may_be_any_iterable_read_once(llama):
    """A generator of prompts (as transformers' pipelines take) gives what the same list gives; a non-iterable
    is a TypeError naming prompts, not len()'s."""
    gen = Generator(llama, progress=False)
    sp = SamplingParams(max_new_tokens=3, ignore_eos=True)
    prompts = [[1, 2, 3], [4, 5]]
    assert _ids(gen.generate_batched((p for p in prompts), sp)) == _ids(gen.generate_batched(prompts, sp))
    assert [e.token_id for e in gen.stream(iter(prompts), sp)] == [e.token_id for e in gen.stream(prompts, sp)]
    assert llama.generate_batched(iter(prompts), sp, progress=False)[1].prompt_token_ids == [4, 5]
    with pytest.raises(TypeError, match="prompts must be a list \\(or iterable\\) of prompts; got int"):
        gen.generate_batched(5)
    assert gen.num_live == 0


def test_bytes_prompts_are_refused_not_read_as_token_ids(llama):
    gen = Generator(llama, progress=False)
    sp = SamplingParams(max_new_tokens=3, ignore_eos=True)
    outs = gen.generate_batched([b"hello", bytearray(b"hi"), [1, 2]], sp)
    for out in outs[:2]:
        assert out.finish_reason == "error" and out.token_ids == [] and out.prompt_token_ids == []
        assert "got bytes" in out.error and "decode" in out.error
    assert outs[2].finish_reason == "length"
    with pytest.raises(TypeError, match="single string, bytes or chat"):
        gen.generate_batched(b"hello")
    assert gen.num_live == 0


class ChatTokenizer(CharTokenizer):
    """CharTokenizer with a chat template that fails, as jinja does, on a message without ``content``."""

    chat_template = "{{ message['content'] }}"

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        return [b for m in messages for b in m["content"].encode("latin-1")]


def test_a_chat_prompt_the_template_cannot_render_fails_alone(llama):
    llama.tokenizer = ChatTokenizer()
    gen = Generator(llama, progress=False)
    sp = SamplingParams(max_new_tokens=3, ignore_eos=True)
    bad = [{"role": "user"}]
    outs = gen.generate_batched([[1, 2, 3], bad, [{"role": "user", "content": "hi"}]], sp)
    assert [o.index for o in outs] == [0, 1, 2] and bad == [{"role": "user"}]
    assert outs[1].finish_reason == "error" and "chat template" in outs[1].error and "KeyError" in outs[1].error
    alone = Generator(llama, progress=False).generate_batched([[1, 2, 3], [104, 105]], sp)
    assert [outs[0].token_ids, outs[2].token_ids] == _ids(alone)
    assert gen.num_live == 0 and not gen.has_unfinished()


def test_abort_frees_blocks_mid_generation(llama):
    gen = Generator(llama, progress=False, kv_cache_tokens=512)
    a = gen.add_request(list(range(1, 40)), SamplingParams(max_new_tokens=50, ignore_eos=True))
    b = gen.add_request(list(range(1, 20)), SamplingParams(max_new_tokens=5, ignore_eos=True))
    for _ in range(3):
        gen.step()
    held = gen.blocks.num_blocks - gen.blocks.num_free
    gen.abort(a)
    assert gen.blocks.num_blocks - gen.blocks.num_free < held
    events = []
    while gen.has_unfinished():
        events += gen.step()
    ends = {e.request_id: e.output for e in events if e.finished}
    assert ends[a].finish_reason == "abort" and 0 < len(ends[a].token_ids) < 50
    assert ends[b].finish_reason == "length" and len(ends[b].token_ids) == 5
    assert gen.blocks.num_free == gen.blocks.num_blocks
    with pytest.raises(ValueError, match="request_id"):
        gen.abort(999)


def test_many_short_requests_nothing_lost(llama):
    prompts = [[1 + i % 200, 2 + i % 50, 3] for i in range(1000)]
    gen = Generator(llama, progress=False, kv_cache_tokens=8192, max_seqs=512, max_batch_tokens=2048)
    outs = gen.generate_batched(prompts, SamplingParams(max_new_tokens=2, ignore_eos=True))
    assert len(outs) == 1000 and [o.index for o in outs] == list(range(1000))
    assert all(len(o.token_ids) == 2 and o.finish_reason == "length" for o in outs)
    assert gen.stats.output_tokens == 2000 and gen.stats.throughput > 0


def test_stop_conditions_and_stream_text(llama):
    llama.tokenizer = CharTokenizer()
    gen = Generator(llama, progress=False)
    base = gen.generate_batched([[65, 66, 67]], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    full = base.token_ids
    stop_id = full[4]
    first = full.index(stop_id)
    out = gen.generate_batched([[65, 66, 67]], SamplingParams(max_new_tokens=12, stop_token_ids=[stop_id], ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.token_ids == full[: first + 1]
    text = CharTokenizer().decode(full)
    stop = text[6:8]
    cut = text.find(stop)
    out = gen.generate_batched([[65, 66, 67]], SamplingParams(max_new_tokens=12, stop=[stop], ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.text == text[:cut]
    events = list(gen.stream(["ABC"], SamplingParams(max_new_tokens=12, ignore_eos=True)))
    assert [e.token_id for e in events] == full and events[-1].finished and not any(e.finished for e in events[:-1])
    assert "".join(e.text for e in events) == CharTokenizer().decode(full, skip_special_tokens=True)
    m = events[-1].output.metrics
    assert m.output_tokens == 12 and m.prompt_tokens == 3
    assert 0 < m.time_to_first_token <= m.latency and m.inter_token_latency > 0


def test_eos_stops_unless_ignored(llama):
    ref = Generator(llama, progress=False).generate_batched([[5, 6, 7]], SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
    gen = Generator(llama, progress=False, eos_token_ids=[ref.token_ids[2]])
    out = gen.generate_batched([[5, 6, 7]], SamplingParams(max_new_tokens=6))[0]
    assert out.finish_reason == "stop" and out.token_ids == ref.token_ids[: ref.token_ids.index(ref.token_ids[2]) + 1]


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


def test_stop_strings_without_a_tokenizer_fail_alone_not_silently_ignored(llama):
    """Regression: a model without a tokenizer has no text, so its requests' stop strings were never searched:
    ``stop=[...]`` was silently ignored and the request ran to ``max_new_tokens`` with ``finish_reason="length"``."""
    assert llama.tokenizer is None
    sp = SamplingParams(max_new_tokens=4, ignore_eos=True)
    outs = Generator(llama, progress=False).generate_batched(
        [[1, 2, 3], [4, 5, 6]], [sp, SamplingParams(max_new_tokens=4, ignore_eos=True, stop=["\n"])])
    assert outs[1].finish_reason == "error" and "tokenizer" in outs[1].error and outs[1].token_ids == []
    assert outs[0].finish_reason == "length" and len(outs[0].token_ids) == 4


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


def test_run_stats_count_the_prompts_of_requests_refused_at_admission(llama):
    """Regression: RunStats.requests counted a request refused at admission (a prompt past the context, an id
    outside the vocabulary) but prompt_tokens left its prompt out, so the stats disagreed with the outputs'
    metrics (7 prompt tokens reported for outputs whose prompt_tokens add up to 1807)."""
    gen = Generator(llama, progress=False, kv_cache_tokens=4096)
    long = [1] * (llama.spec.max_positions + 10)
    outs = gen.generate_batched([[1, 2, 3, 4], long, [5, 6, 7]], SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert [o.finish_reason for o in outs] == ["length", "error", "length"]
    assert gen.stats.requests == 3
    assert gen.stats.prompt_tokens == sum(o.metrics.prompt_tokens for o in outs) == 7 + len(long)
    assert gen.stats.output_tokens == sum(o.metrics.output_tokens for o in outs) == 6


def test_run_stats_count_the_preemptions_of_the_runs_requests_only(llama):
    """Regression: RunStats.preemptions was the scheduler's count over the run, so requests added with add_request
    and preempted while a generate_batched run stepped were reported as the run's (2 for an output preempted once)."""
    gen = Generator(llama, progress=False, kv_cache_tokens=256, block_size=16, max_batch_tokens=128)
    for _ in range(3):
        gen.add_request(list(range(1, 40)), SamplingParams(max_new_tokens=60, ignore_eos=True))
    for _ in range(3):
        gen.step()
    before = gen.scheduler.num_preemptions
    outs = gen.generate_batched([[5, 6, 7]], SamplingParams(max_new_tokens=40, ignore_eos=True))
    assert gen.scheduler.num_preemptions - before > sum(o.metrics.num_preemptions for o in outs)  # others' too
    assert gen.stats.preemptions == sum(o.metrics.num_preemptions for o in outs)
