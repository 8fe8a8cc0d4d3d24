"""Greedy bursts (``Generator(num_scheduler_steps=k)``): several fused CPU decode steps in one C++ call.

The tokens, texts and finish reasons must be those of single steps, whatever the model's embedding (float,
bf16, or the rows of a quantized tied head), the requests' lengths and stop conditions, or the free blocks.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmspeed
from llmspeed import Generator, SamplingParams
from llmspeed.generation import fused_decode, fused_snapshot
from llmspeed.generation.rope_table import static

from .test_engine import CharTokenizer
from .test_fused_lora import _with_adapters

BURST = "fused cpu, greedy burst"

pytestmark = pytest.mark.skipif(fused_decode.unavailable() is not None, reason="the C++ decode kernel cannot build here")


def _tied(fmt: str):
    """A tiny llama whose head is tied to its embedding and quantized to ``fmt`` (a ``QuantizedEmbedding``)."""
    model = llmspeed.models.tiny("llama", seed=3)
    hf = model.hf
    hf.lm_head.weight = hf.model.embed_tokens.weight
    group = {"group_size": 32} if fmt != "int8" else {}
    llmspeed.quantize(model, fmt, lm_head=fmt, **group)
    assert type(hf.model.embed_tokens).__name__ == "QuantizedEmbedding"
    return model


MODELS = {
    "llama fp32": lambda: llmspeed.models.tiny("llama", seed=0),
    "qwen3 fp32": lambda: llmspeed.models.tiny("qwen3", seed=1),
    "llama bf16": lambda: llmspeed.cast(llmspeed.models.tiny("llama", seed=2), "bf16"),
    "int8 tied head": lambda: _tied("int8"),
    "int4 tied head": lambda: _tied("int4"),
    "nf4 tied head": lambda: _tied("nf4"),
}


def _run(model, prompts, params, steps: int, **kwargs):
    gen = Generator(model, progress=False, num_scheduler_steps=steps, kv_cache_tokens=kwargs.pop("kv_cache_tokens", 2048),
                    **kwargs)  # fmt: skip
    assert gen.fused_decode_status == "on"
    return gen, gen.generate_batched(prompts, params)


def bursts_match_single_steps(run, model, path: str):
    """Four greedy requests of 5 to 40 tokens through ``run(model, prompts, params, steps)``: in bursts of 8 the
    tokens of single steps, most decode steps run in bursts (recorded under ``path``); returns the burst generator."""
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10], [11] * 20, [200, 3]]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (5, 23, 40, 1)]
    _, single = run(model, prompts, params, 1)
    gen, burst = run(model, prompts, params, 8)
    assert [o.token_ids for o in burst] == [o.token_ids for o in single]
    assert [o.finish_reason for o in burst] == ["length"] * 4
    steps, _ = gen.step_paths[path]
    assert steps > 20 and gen.stats.output_tokens == 5 + 23 + 40 + 1
    return gen


@pytest.mark.parametrize("name", list(MODELS))
def test_bursts_give_the_tokens_of_single_steps(name):
    bursts_match_single_steps(_run, MODELS[name](), BURST)


def stops_match_single_steps(run, llama) -> None:
    """Stop ids, stop strings, ``min_tokens`` and eos end a burst's requests where single steps end them (same tokens,
    text and reason), through ``run(model, prompts, params, steps)``; every block is freed after."""
    llama.tokenizer = CharTokenizer()
    free = run(llama, [[65, 66, 67]], SamplingParams(max_new_tokens=30, ignore_eos=True), 1)[1][0]
    text = CharTokenizer().decode(free.token_ids)
    cases = [
        SamplingParams(max_new_tokens=30, stop_token_ids=[free.token_ids[9]], ignore_eos=True),
        SamplingParams(max_new_tokens=30, stop=[text[11:13]], ignore_eos=True),
        SamplingParams(max_new_tokens=30, min_tokens=12, stop_token_ids=[free.token_ids[3]], ignore_eos=True),
        SamplingParams(max_new_tokens=30),  # the tokenizer's eos (0) ends it if it comes
    ]
    for params in cases:
        single = run(llama, [[65, 66, 67], [70, 71]], params, 1)[1]
        gen, burst = run(llama, [[65, 66, 67], [70, 71]], params, 8)
        for a, b in zip(single, burst):
            assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason)
        assert gen.blocks.num_free == gen.blocks.num_blocks  # the tokens dropped after an end free their blocks
    assert single[0].finish_reason in ("stop", "length")


def test_bursts_end_where_single_steps_end_on_stop_ids_and_strings(llama):
    stops_match_single_steps(_run, llama)


def test_streamed_events_of_a_burst_are_the_tokens_in_order(llama):
    llama.tokenizer = CharTokenizer()
    gen = Generator(llama, progress=False, num_scheduler_steps=6)
    events = list(gen.stream(["ABC", "XY"], SamplingParams(max_new_tokens=17, ignore_eos=True)))
    outs = _run(llama, ["ABC", "XY"], SamplingParams(max_new_tokens=17, ignore_eos=True), 1)[1]
    for index, out in enumerate(outs):
        mine = [e for e in events if e.index == index]
        assert [e.token_id for e in mine] == out.token_ids
        assert "".join(e.text for e in mine) == out.text and mine[-1].finished
        assert sum(e.finished for e in mine) == 1
    assert gen.step_paths[BURST][0] > 0


def test_run_stats_document_the_burst_path_and_count_its_steps(llama):
    """Regression: RunStats' docstring listed the ways a step runs without the greedy bursts' path, which a run
    with ``num_scheduler_steps > 1`` reports in ``step_paths``."""
    from llmspeed.generation.outputs import RunStats

    gen = Generator(llama, progress=False, num_scheduler_steps=6)
    gen.generate_batched([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=17, ignore_eos=True))
    paths = gen.stats.step_paths
    assert BURST in paths and sum(steps for steps, _ in paths.values()) == gen.stats.steps
    assert all(f"``{path!r}``".replace("'", '"') in " ".join(RunStats.__doc__.split()) for path in paths), paths


def test_bursts_run_each_request_with_its_own_adapter():
    model = _with_adapters(llmspeed.models.tiny("llama", seed=4))
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    params = [SamplingParams(max_new_tokens=20, ignore_eos=True, adapter=a) for a in ("a", "b", None)]
    single = _run(model, prompts, params, 1, lora_dtype="fp32")[1]
    gen, burst = _run(model, prompts, params, 8, lora_dtype="fp32")
    assert [o.token_ids for o in burst] == [o.token_ids for o in single]
    assert gen.step_paths[BURST][0] > 0
    plain = _run(model, prompts, SamplingParams(max_new_tokens=20, ignore_eos=True), 8)[1]
    assert [o.token_ids for o in plain] != [o.token_ids for o in burst]  # the adapters change the tokens


def test_blocks_a_burst_computed_serve_later_prompts_from_the_prefix_cache():
    model = llmspeed.models.tiny("llama", seed=0)
    cached = {}
    for steps in (1, 8):
        gen = Generator(model, progress=False, num_scheduler_steps=steps, prefix_caching=True, kv_cache_tokens=2048)
        first = gen.generate_batched([[5] * 10], SamplingParams(max_new_tokens=40, ignore_eos=True))[0]
        # the first request's prompt and 38 of its tokens: 48 tokens in three full blocks, the last recomputed
        # (the prompt's last token needs logits); the second block holds tokens 6-21 of the output, most of
        # them written by bursts
        again = gen.generate_batched([[5] * 10 + first.token_ids[:38]], SamplingParams(max_new_tokens=4, ignore_eos=True))[0]
        cached[steps] = (again.metrics.cached_tokens, again.token_ids, first.token_ids)
    assert cached[8] == cached[1] and cached[8][0] == 32


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=12, temperature=0.8, seed=1, ignore_eos=True),
    SamplingParams(max_new_tokens=12, logprobs=2, ignore_eos=True),
    SamplingParams(max_new_tokens=12, repetition_penalty=1.3, ignore_eos=True),
    SamplingParams(max_new_tokens=12, logit_bias={7: 5.0}, ignore_eos=True),
], ids=["sampled", "logprobs", "penalty", "logit_bias"])  # fmt: skip
def test_requests_that_are_not_plain_greedy_never_burst(llama, params):
    gen, outs = _run(llama, [[1, 2, 3]], params, 8)
    single = _run(llama, [[1, 2, 3]], params, 1)[1]
    assert BURST not in gen.step_paths and outs[0].token_ids == single[0].token_ids


def test_no_burst_while_a_request_waits():
    model = llmspeed.models.tiny("llama", seed=0)
    gen = Generator(model, progress=False, num_scheduler_steps=8, max_seqs=1)
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    for prompt in ([1, 2, 3], [4, 5]):
        gen.add_request(prompt, params)
    firsts = []
    while gen.has_unfinished():
        events = gen.step()
        firsts += [e.request_id for e in events if e.finished]
        if gen.scheduler.waiting:  # the second request waits for the first: every step is a single step
            assert BURST not in gen.step_paths
    assert firsts == [0, 1] and gen.step_paths[BURST][0] > 0


def test_bursts_take_only_free_blocks_and_never_preempt():
    model = llmspeed.models.tiny("llama", seed=0)
    prompts = [[7] * 13, [9] * 14, [3] * 12]
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    # 9 blocks of 16 tokens for three requests of up to 44 tokens: the bursts shrink as blocks run out
    single = _run(model, prompts, params, 1, kv_cache_tokens=144)[1]
    gen, burst = _run(model, prompts, params, 8, kv_cache_tokens=144)
    assert [o.token_ids for o in burst] == [o.token_ids for o in single]
    assert [o.metrics.num_preemptions for o in burst] == [o.metrics.num_preemptions for o in single]
    assert gen.blocks.num_free == 9 and gen.step_paths[BURST][0] > 0


def test_a_burst_that_raises_fails_its_requests_and_keeps_the_events_before_it(llama, monkeypatch):
    gen = Generator(llama, progress=False, num_scheduler_steps=4)
    gen.add_request([1, 2, 3], SamplingParams(max_new_tokens=12, ignore_eos=True))
    while not any(e.token_id is not None for e in gen.step()):  # the prefill's token
        pass

    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(gen.runner.fused, "greedy_steps", broken)
    events = gen.step()
    assert [e.token_id is not None for e in events] == [True, False]  # the step's own token, then the end
    assert events[-1].finished and events[-1].output.finish_reason == "error"
    assert "injected" in events[-1].output.error and gen.blocks.num_free == gen.blocks.num_blocks
    monkeypatch.undo()
    out = gen.generate_batched([[1, 2, 3]], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    assert len(out.token_ids) == 12 and out.finish_reason == "length"


WORKLOADS = dict(  # hypothesis strategies of a burst's length and its requests' output and prompt lengths
    steps=st.integers(2, 9),
    lengths=st.lists(st.integers(1, 25), min_size=1, max_size=4),
    prompt_lengths=st.lists(st.integers(1, 20), min_size=4, max_size=4),
)


def workload(lengths: list[int], prompt_lengths: list[int]) -> tuple[list[list[int]], list[SamplingParams]]:
    """One request per output length, greedy, with the drawn prompt lengths."""
    prompts = [[(i * 31 + j) % 256 for j in range(prompt_lengths[i])] for i in range(len(lengths))]
    return prompts, [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lengths]


@settings(max_examples=12, deadline=None)
@given(**WORKLOADS)
def test_any_burst_length_gives_the_same_tokens(steps, lengths, prompt_lengths):
    model = _BASE[0]
    prompts, params = workload(lengths, prompt_lengths)
    single = _run(model, prompts, params, 1)[1]
    assert [o.token_ids for o in _run(model, prompts, params, steps)[1]] == [o.token_ids for o in single]


_BASE = [llmspeed.models.tiny("llama", seed=5)]


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "8", None])
def test_num_scheduler_steps_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match=r"num_scheduler_steps must be an int >= 1; got"):
        Generator(llmspeed.models.tiny("llama", seed=0), progress=False, num_scheduler_steps=bad)


def test_the_c_loop_reads_only_embeddings_and_rotaries_it_can():
    from torch import nn

    emb = nn.Embedding(10, 4)
    assert fused_snapshot.embedding_parts(emb)[0] is not None
    assert fused_snapshot.embedding_parts(nn.Embedding(10, 4, max_norm=1.0)) is None
    assert fused_snapshot.embedding_parts(nn.Embedding(10, 4).half()) is None
    strided = nn.Embedding(10, 4)
    strided.weight = nn.Parameter(torch.randn(4, 10).t())  # [10, 4], not contiguous: read in Python instead
    assert fused_snapshot.embedding_parts(strided) is None
    quantized = _tied("int8").hf.model.embed_tokens
    table, scale, zero, group = fused_snapshot.embedding_parts(quantized)
    assert table.dtype == torch.int8 and scale.numel() == 256 and zero.numel() == 0 and group == 0
    # a model whose rotary frequencies are recomputed per call: no burst, the same tokens
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    model = llmspeed.models.tiny("llama", seed=0, rope_parameters=dynamic)
    assert not static(model.hf.model.rotary_emb)
    gen, outs = _run(model, [[1, 2, 3]], SamplingParams(max_new_tokens=10, ignore_eos=True), 8)
    assert BURST not in gen.step_paths and len(outs[0].token_ids) == 10


def test_greedy_steps_refuse_block_tables_too_short_for_the_burst():
    model = llmspeed.models.tiny("llama", seed=0)
    gen = Generator(model, progress=False, block_size=4)
    gen.add_request([1, 2, 3], SamplingParams(max_new_tokens=20, ignore_eos=True))
    gen.step()
    (seq,) = gen.scheduler.running
    gen.blocks.grow(seq.seq_id, seq.block_table, seq.num_tokens)  # room for one step, not five
    row = (seq.block_table, seq.num_computed, seq.output_ids[-1])
    with pytest.raises(ValueError, match=r"rows \[0\]: each block table must hold position \+ steps tokens for steps=5"):
        gen.runner.fused.greedy_steps([row], 5)
    with pytest.raises(ValueError, match=r"rows \[0\]: .* for steps=2"):  # one token short
        gen.runner.fused.greedy_steps([row], 2)
    assert gen.runner.fused.greedy_steps([row], 0) is None  # no steps: nothing to run
    assert gen.runner.fused.greedy_steps([row], 1) is not None


def test_the_c_steps_let_other_python_threads_run():
    """A server's event loop keeps running during a step: decode_step and greedy_steps release the GIL."""
    import sys
    import threading
    import time

    from llmspeed.generation.runner import StepInput

    # steps of a few ms: a waiting thread is woken in tens of us, but needs the GIL free for that long
    model = llmspeed.models.tiny("llama", seed=0, num_hidden_layers=6, hidden_size=512, intermediate_size=2048)
    gen = Generator(model, progress=False)
    gen.add_request([1, 2, 3], SamplingParams(max_new_tokens=200, ignore_eos=True))
    gen.step()
    (seq,) = gen.scheduler.running
    gen.blocks.grow(seq.seq_id, seq.block_table, seq.num_tokens + 60)
    fused, rows = gen.runner.fused, [(seq.block_table, seq.num_computed, seq.output_ids[-1])]
    calls = {"decode_step": lambda: fused.run(StepInput.decode(rows, gen.blocks.block_size)),
             "greedy_steps": lambda: fused.greedy_steps(rows, 40)}  # fmt: skip
    count, stop, ran = [0], threading.Event(), {}

    def spin():
        while not stop.is_set():
            count[0] += 1

    class Counting:  # the spinner's loops while each C++ call runs (torch ops around it release the GIL too)
        def __init__(self, ext):
            self.ext = ext

        def __getattr__(self, name):
            return getattr(self.ext, name)

        def decode_step(self, *args):
            return self._counted("decode_step", args)

        def greedy_steps(self, *args):
            return self._counted("greedy_steps", args)

        def _counted(self, name, args):
            before = count[0]
            out = getattr(self.ext, name)(*args)
            ran[name] = count[0] - before
            return out

    fused.ext = Counting(fused.ext)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.5)  # a thread holding the GIL keeps it this long unless it releases it
    spinner = threading.Thread(target=spin)
    try:
        spinner.start()
        for call in calls.values():
            time.sleep(0.01)  # the spinner takes the GIL; the main thread gets it back fresh, for 0.5 s
            call()
    finally:
        stop.set()
        sys.setswitchinterval(interval)
        spinner.join()
    assert set(ran) == set(calls) and all(n > 0 for n in ran.values()), ran


def test_a_step_runs_num_scheduler_steps_decode_steps_and_counts_their_tokens_and_times(llama):
    """One ``step()`` after the prefill runs ``num_scheduler_steps`` decode steps (one fused step, then a burst of
    the rest), no more; the burst's tokens count in ``num_tokens_computed`` and each gets its time (the metrics'
    inter-token latency is over every token)."""
    gen = Generator(llama, progress=False, num_scheduler_steps=4)
    rid = gen.add_request([1, 2, 3], SamplingParams(max_new_tokens=20, ignore_eos=True))
    seq = gen._seqs[rid]
    gen.step()  # the prompt and the first token
    assert len(gen.step()) == 4 and gen.step_paths[BURST][0] == 3 and gen.num_steps == 5
    assert gen.num_tokens_computed == 3 + 4
    assert len(seq.token_times) == len(seq.output_ids) == 5 and seq.token_times == sorted(seq.token_times)


def test_a_burst_waits_for_min_tokens_so_the_eos_stays_banned(llama):
    """A request with ``min_tokens`` bursts only once it has them: a burst does not ban the end-of-sequence ids, so one
    started a token early ended the request on the eos its single step would have banned."""
    free = _run(llama, [[1, 2, 3]], SamplingParams(max_new_tokens=12, ignore_eos=True), 1)[1][0].token_ids
    k = next(k for k in range(2, 12) if free[k] not in free[:k])  # made the eos: the request's first is token k
    params = SamplingParams(max_new_tokens=12, min_tokens=k + 1)
    single = _run(llama, [[1, 2, 3]], params, 1, eos_token_ids=[free[k]])[1][0]
    gen, burst = _run(llama, [[1, 2, 3]], params, 8, eos_token_ids=[free[k]])
    assert single.token_ids[:k] == free[:k] and single.token_ids[k] != free[k]  # banned, not taken
    assert burst[0].token_ids == single.token_ids and gen.step_paths[BURST][0] > 0


@pytest.mark.parametrize("free, expected", [(0, 0), (1, 4), (2, 7)])
def test_burst_length_is_the_longest_burst_the_free_blocks_hold(free, expected):
    """The one running request has 5 tokens, the first 4 in its one block of 4: a burst of ``s`` steps writes the
    positions 4 to ``s + 3``, so one free block holds a burst of 4, two the 7 of ``num_scheduler_steps=8``, none no
    burst (a burst one step longer would write a position no block holds)."""
    from types import SimpleNamespace

    from llmspeed.generation.block_manager import BlockManager
    from llmspeed.generation.greedy_burst import burst_length
    from llmspeed.generation.sequence import Sequence

    seq = Sequence(0, [1, 2, 3], SamplingParams(max_new_tokens=100), output_ids=[7, 8], num_computed=4)
    blocks = BlockManager(1 + free, 4)
    blocks.grow(0, seq.block_table, 4)
    scheduler = SimpleNamespace(waiting=[], running=[seq], max_tokens_per_seq=1000)
    assert blocks.num_free == free and burst_length([seq], scheduler, blocks, 8) == expected
    scheduler.running.append(Sequence(1, [4], SamplingParams()))  # a running request the batch left out: no burst
    assert burst_length([seq], scheduler, blocks, 8) == 0


def test_a_batch_the_fused_step_leaves_to_the_generic_path_bursts_there():
    """Regression: with the fused step on, a decode step it left to ``forward_batch`` (more rows than its
    ``max_rows``: 32 on AVX-512 CPUs without AMX) took the burst's blocks and then asked the fused step for the burst,
    which declined it as well: no batch that big ever burst."""
    model = llmspeed.models.tiny("llama", seed=0)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8]]
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    single = _run(model, prompts, params, 1)[1]
    gen = Generator(model, progress=False, num_scheduler_steps=8, kv_cache_tokens=2048)
    gen.runner.fused.max_rows = 2  # three requests: their decode steps run on the generic path
    burst = gen.generate_batched(prompts, params)
    assert [o.token_ids for o in burst] == [o.token_ids for o in single]
    assert "fused cpu" not in gen.step_paths and gen.step_paths["decode, burst"][0] > 20, gen.step_paths
    assert gen.blocks.num_free == gen.blocks.num_blocks
