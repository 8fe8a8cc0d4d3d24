"""The Generator over a run: aborts free their blocks, nothing is lost, stop conditions and streamed text, EOS,
and the run stats."""

from __future__ import annotations

import pytest

from llmspeed import Generator, SamplingParams
from tests.generation.conftest import CharTokenizer


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
