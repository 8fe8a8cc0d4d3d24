"""Bursts off the fused CPU step: each step through ``forward_batch`` (or a CUDA graph), its ids the previous step's
tokens on the device (argmax, or random sampling from each request's generator), each step's tokens read back behind
it (:meth:`ModelRunner.burst_steps`).

The tokens, texts and finish reasons must be those of single steps, as for the fused bursts
(test_greedy_bursts.py); on a GPU the bursts replay the captured decode graphs.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

import llmspeed
from llmspeed import Generator, SamplingParams
from llmspeed.generation import greedy_burst

from .test_engine import CharTokenizer
from .test_fused_lora import _with_adapters
from .test_greedy_bursts import WORKLOADS, bursts_match_single_steps, stops_match_single_steps, workload

BURST = "decode, burst"


def _run(model, prompts, params, steps: int, **kwargs):
    gen = Generator(model, progress=False, num_scheduler_steps=steps, fused_decode=False,
                    kv_cache_tokens=kwargs.pop("kv_cache_tokens", 2048), **kwargs)  # fmt: skip
    return gen, gen.generate_batched(prompts, params)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_bursts_through_forward_batch_give_the_tokens_of_single_steps(arch):
    gen = bursts_match_single_steps(_run, llmspeed.models.tiny(arch, seed=1), BURST)
    assert not any(path.startswith("fused") for path in gen.step_paths)


def test_bursts_end_where_single_steps_end_on_stop_ids_and_strings(llama):
    stops_match_single_steps(_run, llama)


def test_bursts_through_forward_batch_route_each_request_to_its_adapter():
    model = _with_adapters(llmspeed.models.tiny("llama", seed=4))
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    params = [SamplingParams(max_new_tokens=20, ignore_eos=True, adapter=a) for a in ("a", "b", None)]
    single = _run(model, prompts, params, 1)[1]
    gen, burst = _run(model, prompts, params, 8)
    assert [o.token_ids for o in burst] == [o.token_ids for o in single]
    assert gen.step_paths[BURST][0] > 0
    plain = _run(model, prompts, SamplingParams(max_new_tokens=20, ignore_eos=True), 8)[1]
    assert [o.token_ids for o in plain] != [o.token_ids for o in burst]  # the adapters change the tokens


def test_a_burst_through_forward_batch_that_raises_fails_its_requests(llama, monkeypatch):
    gen = Generator(llama, progress=False, num_scheduler_steps=4, fused_decode=False)
    gen.add_request([1, 2, 3], SamplingParams(max_new_tokens=12, ignore_eos=True))
    gen.step()  # the prefill's token
    calls = []
    forward = llama.forward_batch

    def third_call_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the second step of the burst
            raise RuntimeError("injected")
        return forward(*args, **kwargs)

    monkeypatch.setattr(llama, "forward_batch", third_call_fails)
    events = gen.step()
    assert [e.token_id is not None for e in events] == [True, False]  # the step's own token, then the end
    assert events[-1].output.finish_reason == "error" and "injected" in events[-1].output.error
    assert gen.blocks.num_free == gen.blocks.num_blocks
    monkeypatch.undo()
    out = gen.generate_batched([[1, 2, 3]], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    assert len(out.token_ids) == 12 and out.finish_reason == "length"


def test_burst_steps_refuse_block_tables_too_short_for_the_burst(llama):
    gen = Generator(llama, progress=False, block_size=4, fused_decode=False)
    gen.add_request([1, 2, 3], SamplingParams(max_new_tokens=20, ignore_eos=True))
    gen.step()
    (seq,) = gen.scheduler.running
    gen.blocks.grow(seq.seq_id, seq.block_table, seq.num_tokens)  # room for one step, not five
    row = (seq.block_table, seq.num_computed, seq.output_ids[-1])
    with pytest.raises(ValueError, match=r"rows \[0\]: each block table must hold position \+ steps tokens for steps=5; "
                                         r"row 0 is at position 3, its 1 blocks of 4 hold 4: grow them first"):
        gen.runner.burst_steps([row], 5, None)  # what was given too (regression: only what was wanted)
    assert gen.runner.burst_steps([row], 0, None) is None
    ((tokens, known),) = list(gen.runner.burst_steps([row], 1, None))
    assert len(tokens) == 1 and known > 0


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_sampled_requests_burst_with_the_tokens_of_single_steps(arch):
    """Random sampling runs on the device too: each row draws from its own generator once a step, as single steps
    do, so seeded requests give the same tokens (and greedy rows beside them their argmaxes)."""
    model = llmspeed.models.tiny(arch, seed=3)
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10], [11] * 20, [200, 3]]
    params = [SamplingParams(max_new_tokens=n, temperature=t, top_p=p, top_k=k, seed=s, ignore_eos=True)
              for n, t, p, k, s in ((9, 0.8, 0.9, 0, 1), (23, 1.3, 1.0, 5, 2), (40, 0.0, 1.0, 0, None), (17, 0.7, 0.5, 0, 4))]
    _, single = _run(model, prompts, params, 1)
    gen, burst = _run(model, prompts, params, 8)
    assert [o.token_ids for o in burst] == [o.token_ids for o in single]
    assert gen.step_paths[BURST][0] > 20
    again = _run(model, prompts, [SamplingParams(**{**p.__dict__, "seed": 99}) if p.seed else p for p in params], 8)[1]
    assert [o.token_ids for o in again][:2] != [o.token_ids for o in burst][:2]  # the seeds, not the burst, decide


def test_a_burst_with_a_sampled_request_on_the_fused_step_stays_single_steps(llama):
    """The fused C++ loop takes argmaxes only: a batch with a sampled request runs one step at a time there."""
    params = [SamplingParams(max_new_tokens=12, ignore_eos=True), SamplingParams(max_new_tokens=12, temperature=0.9,
                                                                                seed=5, ignore_eos=True)]  # fmt: skip
    gen = Generator(llama, progress=False, num_scheduler_steps=8)
    outs = gen.generate_batched([[1, 2, 3], [4, 5]], params)
    assert gen.fused_decode_status == "on" and not any("burst" in path for path in gen.step_paths)
    assert [o.token_ids for o in outs] == [o.token_ids for o in _run(llama, [[1, 2, 3], [4, 5]], params, 8)[1]]


@pytest.mark.gpu
def test_bursts_replay_the_cuda_graphs_with_the_tokens_of_single_steps():
    model = llmspeed.models.tiny("llama", seed=2)
    model.hf.to("cuda")
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10], [11] * 20]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (7, 23, 40)]
    _, single = _run(model, prompts, params, 1)
    gen, burst = _run(model, prompts, params, 8)
    assert [o.token_ids for o in burst] == [o.token_ids for o in single]
    assert gen.step_paths["cuda graph, burst"][0] > 20
    torch.cuda.synchronize()


@settings(max_examples=10, deadline=None)
@given(**WORKLOADS)
def test_bursts_past_a_request_end_drop_its_extra_tokens_and_free_its_blocks(steps, lengths, prompt_lengths):
    """As on a GPU (``past_ends``): a burst runs as long as the request with most tokens left needs; those that end
    before it drop what the burst computed after their end."""
    model = _BASE[0]
    prompts, params = workload(lengths, prompt_lengths)
    single = _run(model, prompts, params, 1)[1]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(greedy_burst, "past_ends", lambda device: True)
        gen, burst = _run(model, prompts, params, steps)
    assert [o.token_ids for o in burst] == [o.token_ids for o in single]
    assert [len(o.token_ids) for o in burst] == lengths and gen.blocks.num_free == gen.blocks.num_blocks


def test_past_ends_bursts_are_as_long_as_the_longest_request_needs():
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (4, 13, 30)]
    counts = {}
    for past in (False, True):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(greedy_burst, "past_ends", lambda device, past=past: past)
            gen, outs = _run(_BASE[0], prompts, params, 8)
        assert [len(o.token_ids) for o in outs] == [4, 13, 30]
        counts[past] = gen.step_paths.get(BURST, (0, 0.0))[0]
    assert counts[True] > counts[False]  # more of the steps in bursts: none cut short at the first request's end
    assert not greedy_burst.past_ends(torch.device("cpu")) and greedy_burst.past_ends(torch.device("cuda"))


_BASE = [llmspeed.models.tiny("llama", seed=5)]


def test_a_burst_turns_each_step_into_events_before_reading_the_next_steps_tokens(llama, monkeypatch):
    """What lets the host work while a GPU runs the burst's later steps: the runner queues every step, and each
    step's tokens are read back (``Readback.get``) only when the events reach that step."""
    from llmspeed.generation import readback

    order = []
    real_get, real_event = readback.Readback.get, Generator._token_event
    monkeypatch.setattr(readback.Readback, "get", lambda self: order.append("get") or real_get(self))
    monkeypatch.setattr(Generator, "_token_event", lambda self, *a: order.append("event") or real_event(self, *a))
    gen = Generator(llama, progress=False, num_scheduler_steps=4, fused_decode=False)
    gen.add_request([1, 2, 3], SamplingParams(max_new_tokens=10, ignore_eos=True))
    gen.step(), gen.step()  # the prefill, then a decode step and a burst of three
    assert order == ["event", "event", "get", "event", "get", "event", "get", "event"]
    assert readback.Readback(torch.tensor([3, 4])).get()[0] == [3, 4]


@pytest.mark.parametrize("fused", [False, None], ids=["forward_batch", "fused cpu"])
def test_a_burst_whose_detokenizer_raises_part_way_still_records_its_steps(fused):
    """Regression: a burst counted its steps in ``num_steps`` before turning them into events, and recorded them in
    ``step_paths`` only after the last, so a tokenizer raising part way left ``RunStats.steps`` above the sum of
    ``step_paths``."""
    from llmspeed.generation import fused_decode

    if fused is None and fused_decode.unavailable() is not None:
        pytest.skip("the C++ decode kernel cannot build here")

    class Raising(CharTokenizer):
        calls = 0

        def decode(self, ids, skip_special_tokens=False):
            Raising.calls += 1
            if Raising.calls == 9:  # two windows a token: the burst's third token
                raise RuntimeError("injected")
            return super().decode(ids, skip_special_tokens)

    model = llmspeed.models.tiny("llama", seed=0)
    model.tokenizer = Raising()
    gen = Generator(model, progress=False, num_scheduler_steps=4, fused_decode=fused)
    out = gen.generate_batched([[65, 66, 67]], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    assert out.finish_reason == "error" and "injected" in out.error and len(out.token_ids) == 5
    paths = gen.stats.step_paths
    assert any(path.endswith("burst") for path in paths), paths
    assert sum(steps for steps, _ in paths.values()) == gen.stats.steps == gen.num_steps
    assert gen.blocks.num_free == gen.blocks.num_blocks


def test_bursts_past_a_request_end_stay_within_the_context_of_every_row():
    """A burst past a request's end still computes every row each step: it may not be longer than the room the
    request nearest the context limit has, or that row would run positions past the model's (past a longrope
    model's original context, the whole batch's rotary factors change)."""
    model = llmspeed.models.tiny("llama", seed=5, max_position_embeddings=40)
    prompts = [[7] * 33, [1, 2, 3]]  # the first has 5 tokens of room at its first burst, the second 27 left
    params = [SamplingParams(max_new_tokens=100, ignore_eos=True), SamplingParams(max_new_tokens=30, ignore_eos=True)]
    single = _run(model, prompts, params, 1)[1]
    positions = []
    forward = model.forward_batch

    def spy(ids, pos, *args, **kwargs):
        positions.append(int(pos.max()))
        return forward(ids, pos, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(greedy_burst, "past_ends", lambda device: True)
        mp.setattr(model, "forward_batch", spy)
        gen, burst = _run(model, prompts, params, 8)
    assert [o.token_ids for o in burst] == [o.token_ids for o in single]
    assert [(len(o.token_ids), o.finish_reason) for o in burst] == [(7, "length"), (30, "length")]
    assert gen.step_paths[BURST][0] > 0 and max(positions) == 38  # a 40-token context's last computed position
    assert gen.blocks.num_free == gen.blocks.num_blocks


def test_a_burst_hands_each_step_its_ids_on_the_device_to_the_cuda_graphs(llama):
    """A burst's step offers the CUDA graphs the previous step's argmax as its ids (the host's ``step.ids`` are
    placeholders); a stand-in for the graphs records them and declines, so ``forward_batch`` runs the steps."""
    calls = []

    class Graphs:
        def run(self, step, ids=None):
            calls.append((step.positions, None if ids is None else ids.tolist()))
            return None

    gen = Generator(llama, progress=False, num_scheduler_steps=4, fused_decode=False)
    rid = gen.add_request([1, 2, 3], SamplingParams(max_new_tokens=10, ignore_eos=True))
    gen.step()  # the prefill (a mixed step: not offered to the graphs)
    gen.runner.graphs = Graphs()
    gen.step()  # a decode step and a burst of three
    out = gen._seqs[rid].output_ids
    assert calls == [([3], None), ([4], [out[1]]), ([5], [out[2]]), ([6], [out[3]])]


def test_a_readback_on_a_gpu_waits_for_the_copy_on_the_stream_of_the_ids_device(monkeypatch):
    """Regression: the read-back's event was recorded on the current device's stream, so for a model on another GPU
    (cuda:1) ``get`` waited for nothing and could read the pinned buffer before the copy of the ids landed. Checked on
    the CPU with stand-ins for the CUDA calls."""
    from llmspeed.generation import readback

    recorded, copied = [], []

    class Event:
        def record(self, stream=None):
            recorded.append(stream)

        def synchronize(self):
            pass

    class Host:
        def copy_(self, src, non_blocking=False):
            copied.append(non_blocking)

        def tolist(self):
            return [5, 6]

    class Ids:  # what Readback reads of a CUDA tensor
        device, shape, dtype = torch.device("cuda", 1), (2,), torch.long

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream", device))
    monkeypatch.setattr(readback.torch, "empty", lambda *args, **kwargs: Host())
    back = readback.Readback(Ids())
    assert copied == [True] and recorded == [("stream", torch.device("cuda", 1))]
    assert back.get()[0] == [5, 6]


def test_bursts_past_a_request_end_leave_the_prefix_cache_as_single_steps_do():
    """A burst past a request's end writes only into blocks the request holds alone, beyond its last token: the
    blocks it shares (a common prompt prefix) and those it registered stay as single steps leave them, so a later
    prompt served from them gets the single steps' tokens."""
    model = _BASE[0]
    shared = [(7 * j) % 256 for j in range(20)]  # a full block of 16 shared by both prompts
    prompts = [shared + [1, 2], shared + [3, 4, 5]]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (13, 30)]  # the first ends mid-burst
    results = {}
    for past in (False, True):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(greedy_burst, "past_ends", lambda device, past=past: past)
            gen = Generator(model, progress=False, num_scheduler_steps=8, fused_decode=False, prefix_caching=True,
                            kv_cache_tokens=512)  # fmt: skip
            first = gen.generate_batched(prompts, params)
            again = gen.generate_batched([prompts[0] + first[0].token_ids[:12]],
                                         SamplingParams(max_new_tokens=6, ignore_eos=True))[0]  # fmt: skip
        assert gen.blocks.num_free == gen.blocks.num_blocks and gen.step_paths[BURST][0] > 0
        results[past] = ([o.token_ids for o in first], again.token_ids, again.metrics.cached_tokens)
    assert results[True] == results[False] and results[True][2] == 32  # two full blocks served from the cache


def test_a_burst_whose_later_steps_no_graph_runs_records_them_as_decode_steps(llama):
    """Regression: a burst was recorded under its first step's path, so after a decode step a CUDA graph ran, the burst's
    steps that ran eagerly (a capture failing part way, a context past the widest graph) counted as ``"cuda graph,
    burst"``. A stand-in for the graphs (it runs the model eagerly) serves the first decode step only."""
    from llmspeed.generation.kv_cache import PagedAttention

    gen = Generator(llama, progress=False, num_scheduler_steps=4, fused_decode=False)
    runner, served = gen.runner, []

    class FirstStepOnly:
        def run(self, step, ids=None):
            if served:
                return None
            served.append(step)
            attention = PagedAttention(runner.cache, step.chunks, runner.decode_kernel, runner.prefill_kernel,
                                       slots=step.slots)  # fmt: skip
            with torch.inference_mode():
                return llama.forward_batch(torch.tensor(step.ids), torch.tensor(step.positions), attention,
                                           torch.tensor(step.rows))  # fmt: skip

    runner.graphs = FirstStepOnly()
    out = gen.generate_batched([[1, 2, 3]], SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
    assert out.token_ids == _run(llama, [[1, 2, 3]], SamplingParams(max_new_tokens=6, ignore_eos=True), 1)[1][0].token_ids
    paths = {path: n for path, (n, _) in gen.stats.step_paths.items()}
    assert paths == {"mixed": 1, "cuda graph": 1, "decode, burst": 3, "decode": 1}, paths
