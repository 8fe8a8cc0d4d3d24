"""Request lifecycle of the Generator: each run gets exactly its own results, faults fail only what they touch.

Every test here is a regression test for a defect reported in issue #15. The model changing under running requests
is in ``test_lifecycle_model.py``; the stateful test of random adds, steps, aborts and faults in
``test_lifecycle_machine.py``.
"""

from __future__ import annotations

import itertools
import re
import threading

import pytest
import torch

import llmspeed
from llmspeed import Generator, SamplingParams
from llmspeed.generation import engine as engine_module
from llmspeed.generation.detokenizer import Detokenizer

from .conftest import drain as _drain

SP = SamplingParams(max_new_tokens=6, ignore_eos=True)


def _prompts(n, seed=0, lo=3, hi=30):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 256, (int(k),), generator=g).tolist() for k in torch.randint(lo, hi, (n,), generator=g)]


def _alone(model, prompts, sp=SP):
    return [Generator(model, progress=False).generate_batched([p], sp)[0].token_ids for p in prompts]


def test_generate_batched_returns_its_own_prompts_and_leaves_other_requests_alone(llama):
    gen = Generator(llama, progress=False)
    other = gen.add_request([7, 7, 7], SamplingParams(max_new_tokens=40, ignore_eos=True))
    batch = _prompts(3, seed=1)
    outs = gen.generate_batched(batch, SP)
    assert [o.prompt_token_ids for o in outs] == batch
    assert [o.token_ids for o in outs] == _alone(llama, batch)
    ends = [e for e in _drain(gen) if e.finished]  # the other request is still there, whole
    assert [e.request_id for e in ends] == [other]
    assert ends[0].output.prompt_token_ids == [7, 7, 7] and len(ends[0].output.token_ids) == 40
    assert ends[0].output.token_ids == _alone(llama, [[7, 7, 7]], SamplingParams(max_new_tokens=40, ignore_eos=True))[0]


def test_a_stream_whose_consumer_raised_does_not_leak_into_the_next_run(llama):
    gen = Generator(llama, progress=False)
    old = _prompts(8, seed=2)
    with pytest.raises(RuntimeError, match="consumer"):
        for i, _ in enumerate(gen.stream(old, SamplingParams(max_new_tokens=30, ignore_eos=True))):
            if i == 5:
                raise RuntimeError("consumer failed")
    assert gen.num_live == 0 and gen.blocks.num_free == gen.blocks.num_blocks and not gen.has_unfinished()
    batch = _prompts(8, seed=3)
    outs = gen.generate_batched(batch, SP)
    assert [o.prompt_token_ids for o in outs] == batch
    assert [o.token_ids for o in outs] == _alone(llama, batch)


def _faulty(monkeypatch, target, name, exc, times=1):
    """Make ``target.name`` raise ``exc`` on its next ``times`` calls, then behave."""
    real = getattr(target, name)
    left = [times]

    def wrapper(*args, **kwargs):
        if left[0] > 0:
            left[0] -= 1
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapper)


@pytest.mark.parametrize("where", ["sampler", "forward"])
def test_a_step_that_raises_fails_only_its_batch_and_the_generator_goes_on(llama, monkeypatch, where):
    gen = Generator(llama, progress=False, max_seqs=4)  # 4 run at once: the rest wait outside the batch
    prompts = _prompts(10, seed=4)
    rids = [gen.add_request(p, SP) for p in prompts]
    gen.step()  # the first four are admitted and prefilled
    if where == "sampler":
        _faulty(monkeypatch, engine_module, "sample_batch", ValueError("boom in the sampler"))
    else:
        _faulty(monkeypatch, gen.runner, "run", RuntimeError("boom in the forward"))
    events = _drain(gen)
    ends = {e.request_id: e.output for e in events if e.finished}
    assert sorted(ends) == rids  # nobody is lost or wedged
    failed = [r for r in rids if ends[r].finish_reason == "error"]
    assert failed == rids[:4] and all("boom" in ends[r].error for r in failed)
    expected = _alone(llama, prompts[4:])
    assert [ends[r].token_ids for r in rids[4:]] == expected
    assert gen.blocks.num_free == gen.blocks.num_blocks and gen.num_live == 0
    # regression: a step whose sampler raised was counted in num_steps but not in step_paths
    assert gen.num_steps == sum(n for n, _ in gen.step_paths.values())


class _DecodeFails:
    """A byte-level tokenizer whose decode raises on id 199, as a slow (sentencepiece) tokenizer does on an id past
    its vocabulary: the model's vocabulary is often padded beyond the tokenizer's."""

    eos_token_id = 0

    def encode(self, text):
        return list(text.encode("latin-1"))

    def decode(self, ids, skip_special_tokens=False):
        if 199 in ids:
            raise IndexError("piece id is out of range")
        return bytes(ids).decode("latin-1")


def test_a_tokenizer_whose_decode_raises_fails_its_batch_and_every_request_still_ends(llama):
    llama.tokenizer = _DecodeFails()
    gen = Generator(llama, progress=False)
    prompts = [[1, 2, 3], [4, 5, 199], [6, 7]]  # the detokenizer decodes the prompt's tail with the first token
    outs = gen.generate_batched(prompts, SP)  # raised IndexError, the other two requests' final events lost
    assert [o.finish_reason for o in outs] == ["error"] * 3
    assert all("IndexError: piece id is out of range" in o.error for o in outs)
    assert gen.num_live == 0 and gen.blocks.num_free == gen.blocks.num_blocks and not gen.has_unfinished()
    with llmspeed.Engine(llama) as engine:  # the requests of the failed step used to wait forever
        handles = [engine.submit(p, SP) for p in prompts]
        assert [h.result(timeout=30).finish_reason for h in handles] == ["error"] * 3
        assert engine.submit([1, 2, 3], SP).result(timeout=30).token_ids == _alone(llama, [[1, 2, 3]])[0]
        assert engine.loop_errors == 0


def test_the_token_whose_decode_raised_is_streamed_with_its_request_s_final_event(llama):
    class Fails(_DecodeFails):
        calls = 0

        def decode(self, ids, skip_special_tokens=False):
            Fails.calls += 1
            if Fails.calls == 12:  # mid-step, in the second request's detokenizer
                raise IndexError("piece id is out of range")
            return bytes(ids).decode("latin-1")

    llama.tokenizer = Fails()
    events: dict[int, list] = {}
    for event in Generator(llama, progress=False).stream([[1, 2, 3], [4, 5]], SP):
        events.setdefault(event.request_id, []).append(event)
    for evs in events.values():  # the token sampled before the raise was in token_ids, never in an event
        out = evs[-1].output
        assert out.finish_reason == "error" and "IndexError" in out.error
        assert [e.token_id for e in evs if e.token_id is not None] == out.token_ids
        assert "".join(e.text for e in evs) == out.text
    assert events[1][-1].token_id is not None


def test_keyboard_interrupt_mid_step_keeps_events_and_fails_the_batch(llama, monkeypatch):
    gen = Generator(llama, progress=False, max_seqs=2)
    rids = [gen.add_request(p, SP) for p in _prompts(4, seed=5)]
    gen.step()
    gen.abort(rids[3])  # an end decided between steps: its event must survive the interrupted step
    _faulty(monkeypatch, engine_module, "sample_batch", KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        gen.step()
    ends = {e.request_id: e.output for e in _drain(gen) if e.finished}
    assert sorted(ends) == rids
    assert ends[rids[3]].finish_reason == "abort"
    assert [ends[r].finish_reason for r in rids[:2]] == ["error", "error"]
    assert ends[rids[2]].finish_reason == "length"


def test_a_second_thread_inside_a_step_gets_a_clear_error(llama, monkeypatch):
    gen = Generator(llama, progress=False)
    entered, release = threading.Event(), threading.Event()
    real = gen.runner.run

    def slow(step):
        entered.set()
        release.wait(10)
        return real(step)

    monkeypatch.setattr(gen.runner, "run", slow)
    rid = gen.add_request([1, 2, 3], SP)
    stepper = threading.Thread(target=gen.step)
    stepper.start()
    assert entered.wait(10)
    errors = []
    for call in (lambda: gen.add_request([4, 5], SP), gen.step, lambda: gen.abort(rid)):
        with pytest.raises(RuntimeError, match="single-threaded.*llmspeed.Engine") as info:
            call()
        errors.append(info.value)
    release.set()
    stepper.join(10)
    monkeypatch.setattr(gen.runner, "run", real)
    out = [e.output for e in _drain(gen) if e.finished]
    assert len(errors) == 3 and len(out) == 1 and out[0].token_ids == _alone(llama, [[1, 2, 3]])[0]


def test_finished_requests_are_released_on_the_add_request_step_path(llama):
    gen = Generator(llama, progress=False, max_seqs=128, max_batch_tokens=1024)
    for p in _prompts(300, seed=6, hi=8):
        gen.add_request(p, SamplingParams(max_new_tokens=2, ignore_eos=True))
    ends = [e for e in _drain(gen) if e.finished]
    assert len(ends) == 300 and gen.num_live == 0 and not gen._seqs
    gen.abort(ends[0].request_id)  # aborting a finished request is a no-op, not an error


def test_tiny_temperature_is_greedy_and_huge_seeds_are_refused(llama):
    greedy = llama.generate_batched([[1, 2, 3]], SP, progress=False)[0].token_ids
    tiny = SamplingParams(max_new_tokens=6, ignore_eos=True, temperature=1e-320, seed=1)
    assert tiny.greedy and llama.generate_batched([[1, 2, 3]], tiny, progress=False)[0].token_ids == greedy
    SamplingParams(seed=2**64 - 1)
    with pytest.raises(ValueError, match="`seed`.*2\\*\\*64"):
        SamplingParams(seed=2**64)


def test_sampling_fields_as_keywords_or_a_dict(llama):
    """Regression (issue #20): the habits transformers and vLLM users bring work, or say what to do."""
    ref = llama.generate_batched([[1, 2, 3]], SamplingParams(max_new_tokens=4, ignore_eos=True), progress=False)
    kw = llama.generate_batched([[1, 2, 3]], max_new_tokens=4, ignore_eos=True, progress=False)
    as_dict = Generator(llama, progress=False).generate_batched([[1, 2, 3]], {"max_new_tokens": 4, "ignore_eos": True})
    assert kw[0].token_ids == as_dict[0].token_ids == ref[0].token_ids
    assert len(list(llama.stream([[1, 2]], max_new_tokens=3, ignore_eos=True, progress=False))) == 3
    with pytest.raises(ValueError, match="either as sampling=SamplingParams"):
        llama.generate_batched([[1]], SamplingParams(), max_new_tokens=4)
    with pytest.raises(ValueError, match="unknown keys \\['max_tokens'\\]"):
        Generator(llama, progress=False).generate_batched([[1]], {"max_tokens": 4})
    with pytest.raises(TypeError, match="SamplingParams \\(or a dict"):
        Generator(llama, progress=False).generate_batched([[1]], "greedy")


@pytest.mark.parametrize("steps", [1, 4])
def test_a_step_that_raises_after_a_request_ended_keeps_that_requests_final_event(llama, monkeypatch, steps):
    """Regression: the events of a step (and of a greedy burst) were gathered in a list local to ``_run``; a raise
    while taking the tokens (here the detokenizer of a later request) lost the final event of a request that had
    already ended in that step, so it was released without ever reporting, and ``generate_batched`` waited forever."""
    gen = Generator(llama, progress=False, num_scheduler_steps=steps)
    first = gen.add_request([1, 2, 3], SamplingParams(max_new_tokens=steps, ignore_eos=True))
    later = gen.add_request([4, 5, 6], SamplingParams(max_new_tokens=10, ignore_eos=True))
    ended, doomed = gen._seqs[first], gen._seqs[later].detok
    real = Detokenizer.add

    def add(self, *args, **kwargs):
        if self is doomed and ended.is_finished:
            raise RuntimeError("boom in the detokenizer")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Detokenizer, "add", add)
    events = []
    for _ in range(20):
        if not gen.has_unfinished():
            break
        events += gen.step()
    ends = {e.request_id: e.output for e in events if e.finished}
    assert sorted(ends) == [first, later]
    assert ends[first].finish_reason == "length" and len(ends[first].token_ids) == steps
    assert ends[later].finish_reason == "error" and "boom" in ends[later].error
    assert gen.blocks.num_free == gen.blocks.num_blocks and gen.num_live == 0


def test_abort_refuses_a_bool_instead_of_aborting_request_one(llama):
    """Regression: ``abort`` checked ``isinstance(request_id, int)``, which ``True`` passes, so ``abort(True)``
    silently aborted request 1 (and ``abort(False)`` request 0)."""
    gen = Generator(llama, progress=False)
    rids = [gen.add_request([1, 2, 3], SP) for _ in range(2)]
    for flag in (True, False):
        with pytest.raises(ValueError, match=r"request_id must be an id returned by add_request .*got " + str(flag)):
            gen.abort(flag)
    ends = {e.request_id: e.output for e in _drain(gen) if e.finished}
    assert [ends[r].finish_reason for r in rids] == ["length", "length"]


@pytest.mark.parametrize("index", ["x", -1, 1.5, True, None])
def test_add_request_refuses_an_index_that_is_not_a_non_negative_int(llama, index):
    """Regression: ``add_request(..., index="x")`` was queued and its outputs carried ``"x"`` as their index."""
    gen = Generator(llama, progress=False)
    with pytest.raises(ValueError, match=r"index must be a non-negative integer; got " + re.escape(repr(index))):
        gen.add_request([1, 2, 3], SP, index=index)
    assert gen.num_live == 0 and not gen.has_unfinished()
    rid = gen.add_request([1, 2, 3], SP, index=3)
    assert rid == 0 and [e.output.index for e in _drain(gen) if e.finished] == [3]


def test_two_streams_of_one_generator_read_in_turn_each_get_their_own_events_in_order(llama, monkeypatch):
    """Regression: a run passed the events of other runs back to the generator only after yielding its own events of
    the step, so a second stream read in between stepped first: events came twice and out of order, a run's final
    event was taken by the other, and the two streams then handed each other's events back and forth forever."""
    gen = Generator(llama, progress=False)
    real, steps = gen.step, [0]

    def step():
        steps[0] += 1
        assert steps[0] < 50, "the streams spin"
        return real()

    monkeypatch.setattr(gen, "step", step)
    first, second = [[1, 2, 3], [7, 8, 9]], [[4, 5, 6]]
    a, b = [], []
    for ea, eb in itertools.zip_longest(gen.stream(first, SP), gen.stream(second, SP)):
        a += [ea] if ea is not None else []
        b += [eb] if eb is not None else []
    expected = _alone(llama, first + second)
    for events, rids, want in ((a, [0, 1], expected[:2]), (b, [2], expected[2:])):
        for rid, tokens in zip(rids, want):
            mine = [e for e in events if e.request_id == rid]
            assert [e.token_id for e in mine] == tokens and [e.finished for e in mine] == [False] * 5 + [True]
            assert mine[-1].output.token_ids == tokens
        assert {e.request_id for e in events} == set(rids)
    assert gen.num_live == 0 and not gen.has_unfinished()


def test_a_step_called_while_a_stream_is_read_leaves_the_stream_its_events(llama):
    """Regression: ``step()`` called by the add_request / step user while a ``stream`` of the same generator was being
    read returned that stream's events too; the stream never saw its requests end and stepped an empty generator
    forever."""
    gen = Generator(llama, progress=False)
    other = gen.add_request([1, 2, 3], SamplingParams(max_new_tokens=3, ignore_eos=True))
    stream = gen.stream([[4, 5, 6]], SamplingParams(max_new_tokens=3, ignore_eos=True))
    first = next(stream)
    events = _drain(gen)  # the add_request user steps its own request to its end
    assert {e.request_id for e in events} == {other} and events[-1].finished
    real, steps = gen._step, [0]

    def step():
        steps[0] += 1
        assert steps[0] < 20, "the stream spins"
        return real()

    gen._step = step
    rest = [first, *stream]
    tokens = _alone(llama, [[4, 5, 6]], SamplingParams(max_new_tokens=3, ignore_eos=True))[0]
    assert [e.token_id for e in rest] == tokens and rest[-1].finished and rest[-1].output.token_ids == tokens
    assert gen.num_live == 0 and not gen.has_unfinished()


def test_an_admission_check_that_raises_leaves_no_request_behind(llama, monkeypatch):
    gen = Generator(llama, progress=False)

    def broken(seq):
        raise RuntimeError("scheduler fault")

    monkeypatch.setattr(gen.scheduler, "add", broken)
    with pytest.raises(RuntimeError, match="scheduler fault"):
        gen.add_request([5, 6, 7], SP)
    assert gen.num_live == 0 and not gen.has_unfinished() and not gen._pending  # nothing live forever
    monkeypatch.undo()
    batch = _prompts(2, seed=9)
    assert [o.token_ids for o in gen.generate_batched(batch, SP)] == _alone(llama, batch)
    assert gen.num_live == 0


def test_a_stream_closed_after_an_outside_step_drops_the_events_kept_for_it(llama):
    """A ``step()`` called from outside while a stream is read keeps the stream's events for it; closing the stream
    then aborts its requests and drops those events: none is handed to the next ``step()`` caller, nothing is left
    unfinished, and the run's request ids are released."""
    gen = Generator(llama, progress=False)
    stream = gen.stream([[4, 5, 6], [7, 8]], SamplingParams(max_new_tokens=6, ignore_eos=True))
    next(stream)
    assert gen.step() == [] and gen._pending  # the stream's events of this step, kept for it
    stream.close()
    assert not gen.has_unfinished() and gen.num_live == 0 and not gen._pending and not gen._run_rids
    assert gen.step() == []


def test_run_stats_count_this_runs_steps_and_refused_prompts_only(llama):
    """``stats`` of a run counts its own steps (not the generator's since it was made) and the prompts of its own
    requests refused at admission (not those of a refused ``add_request`` whose event is still queued)."""
    gen = Generator(llama, progress=False)
    other = gen.add_request([1, 2, 3, 4, 5], SamplingParams(max_new_tokens=2, adapter="nope"))  # refused, not stepped
    sps = [SamplingParams(max_new_tokens=4, ignore_eos=True), SamplingParams(max_new_tokens=2, adapter="nope")]
    outs = gen.generate_batched([[1, 2], [3, 4, 5]], sps)
    assert [o.finish_reason for o in outs] == ["length", "error"]
    assert gen.stats.prompt_tokens == 5 and gen.stats.requests == 2
    first = gen.stats.steps
    gen.generate_batched([[1, 2], [3, 4, 5]], sps)
    assert gen.stats.steps == first == sum(n for n, _ in gen.stats.step_paths.values())
    assert [e.request_id for e in gen.step() if e.finished] == [other]  # still there for whoever steps
