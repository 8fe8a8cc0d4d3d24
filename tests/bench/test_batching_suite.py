"""The batching suite's helpers on tiny models: decode-step timing per path, path labels, weight bytes."""

from __future__ import annotations

import re

import llmspeed
from llmspeed.bench import batching as suite
from llmspeed.generation import fused_decode


def test_decode_path_labels_follow_the_generator():
    llama = llmspeed.models.tiny("llama", seed=0)
    expected = "fused CPU step" if fused_decode.extension() is not None else "generic path"
    assert suite._decode_path(llama, {}) == expected
    assert suite._decode_path(llama, {"fused_decode": False}) == "generic path"
    assert suite._decode_path(llmspeed.models.tiny("llama", seed=0, hidden_act="gelu"), {}) == "generic path"


def test_decode_step_is_timed_on_both_paths_and_weights_are_counted_once():
    llama = llmspeed.models.tiny("llama", seed=0)
    fused = suite.decode_step_llmspeed(llama, context=16, steps=4)
    generic = suite.decode_step_llmspeed(llama, context=16, steps=4, fused_decode=False)
    assert 0 < fused < 5 and 0 < generic < 5
    params = {p.data_ptr(): p.nbytes for p in llama.hf.parameters()}
    buffers = {b.data_ptr(): b.nbytes for b in llama.hf.buffers()}
    assert suite.weight_bytes(llama) == sum({**params, **buffers}.values())
    quantized = llmspeed.quantize(llmspeed.models.tiny("llama", seed=0), "int8")
    assert suite.weight_bytes(quantized) < suite.weight_bytes(llama)


def test_llmspeed_run_is_checked_and_reports_how_its_steps_ran():
    llama = llmspeed.models.tiny("llama", seed=0)
    prompts, lengths = suite.make_workload(None, 4, prompt_range=(4, 12), mean=4, cap=6)
    seconds, note = suite._llmspeed(llama, prompts, lengths, False, fused_decode=False)
    assert "mixed steps" in note and " decode steps " in note, note
    steps = re.findall(r"(\d+) [\w ]+? steps ([\d.]+) s", note)  # "12 decode steps 0.031 s, 2 mixed steps ..."
    # every request needs one step per output token; the step times are parts of the timed run
    assert sum(int(n) for n, _ in steps) >= max(lengths), note
    assert 0 < sum(float(t) for _, t in steps) <= seconds + 0.01, (note, seconds)
    # no CUDA graphs on the CPU, so no warm-up clause; decode attention is the C++ kernel where it builds
    assert re.search(r"; attention (C\+\+ paged decode, sdpa prefill|sdpa \(.*\))$", note), note
