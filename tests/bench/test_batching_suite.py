"""The batching suite's helpers on tiny models: decode-step timing per path, path labels, weight bytes."""

from __future__ import annotations

import re

import llmspeed
from llmspeed.bench import batch1
from llmspeed.bench import batching as suite
from llmspeed.generation import fused_decode


def test_decode_path_labels_follow_the_generator():
    llama = llmspeed.models.tiny("llama", seed=0)
    expected = "fused CPU step" if fused_decode.extension() is not None else "generic path"
    assert suite.decode_path(llama, {}) == expected
    assert suite.decode_path(llama, {"fused_decode": False}) == "generic path"
    assert suite.decode_path(llmspeed.models.tiny("llama", seed=0, hidden_act="gelu"), {}) == "generic path"
    # regression: the GPU suite's two batch-1 rows (one token a step, and greedy bursts of 8) had the same label
    from types import SimpleNamespace

    import torch

    gpu = SimpleNamespace(spec=SimpleNamespace(device=torch.device("cuda")))
    assert suite.decode_path(gpu, {}) == "CUDA graphs"
    assert suite.decode_path(gpu, {"num_scheduler_steps": 8}) == "CUDA graphs, greedy bursts of 8"
    assert suite.decode_path(llama, {"fused_decode": False, "num_scheduler_steps": 4}) == "generic path, greedy bursts of 4"


def test_decode_step_is_timed_on_both_paths_and_weights_are_counted_once(monkeypatch):
    llama = llmspeed.models.tiny("llama", seed=0)
    fused = suite.decode_step_llmspeed(llama, context=16, steps=4)
    generic = suite.decode_step_llmspeed(llama, context=16, steps=4, fused_decode=False)
    assert 0 < fused < 5 and 0 < generic < 5
    # per token, each of the 4 timed steps a burst of 6 tokens (the request holds enough for all of them)
    steps = []
    real_step = llmspeed.Generator.step
    monkeypatch.setattr(llmspeed.Generator, "step", lambda self: steps.append(real_step(self)) or steps[-1])
    burst = suite.decode_step_llmspeed(llama, context=16, steps=4, fused_decode=False, num_scheduler_steps=6)
    assert 0 < burst < 5 and [sum(e.token_id is not None for e in s) for s in steps[2:6]] == [6] * 4
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


def test_cpu_run_has_the_int8_activation_variants_against_the_float_generator(monkeypatch):
    """Every converted model gets a throughput row and a decode-step row, and each llmspeed row its ratio to
    llmspeed's own fp32 run (the issue's "quantized batching faster than fp32"), from the same run's numbers."""
    quantized = {}

    def fake_llmspeed(model, prompts, lengths, progress, **kwargs):
        layers = [m for _, m in model.linear_layers() if hasattr(m, "config")]
        label = layers[0].config.format + (", int8 activations" if layers and layers[0].config.activations == "int8" else "") if layers else "float"
        quantized[label] = model
        return {"float": 4.0, "int8": 4.0, "int4": 5.0, "int8, int8 activations": 2.0, "int4, int8 activations": 1.0}.get(label, 3.0), label

    monkeypatch.setattr(suite, "_load", lambda name, device, dtype: llmspeed.models.tiny("llama", seed=0))
    # the 4-request warm-up of generate_batch takes 1 s, its timed run 8 s; static batches 16 s, one at a time 2 s
    monkeypatch.setattr(suite, "_hf_generate_batch", lambda hf, prompts, lengths: 8.0 if len(prompts) > 4 else 1.0)
    monkeypatch.setattr(suite, "_hf_generate", lambda hf, prompts, lengths, batch, pad: 16.0 if batch > 1 else 2.0)
    monkeypatch.setattr(suite, "_llmspeed", fake_llmspeed)
    monkeypatch.setattr(suite, "decode_step_llmspeed", lambda model, **kw: 0.01)
    monkeypatch.setattr(suite, "decode_step_hf", lambda hf: 0.02)
    monkeypatch.setattr(suite, "memory_bandwidth", lambda dev: 1e10)
    monkeypatch.setattr(suite, "make_workload", lambda tok, n, **kw: ([[1, 2, 3]] * n, [4] * n))
    rows = suite.run(quick=True, progress=False)
    gen = {r["dtype"]: r for r in rows if r["system"] == "llmspeed Generator"}
    assert list(gen) == ["fp32", "bf16", "int8", "int4", "int8, int8 activations", "int4, int8 activations"]
    assert {"int8, int8 activations", "int4, int8 activations"} <= set(quantized)
    for row in gen.values():
        assert row["vs_llmspeed_fp32"] == round(row["tok_s"] / gen["fp32"]["tok_s"], 2), row
    assert gen["int4, int8 activations"]["vs_llmspeed_fp32"] == 4.0  # 1 s against the float run's 4 s
    assert all(r.get("vs_llmspeed_fp32", "") == "" for r in rows if r["system"] != "llmspeed Generator")
    hf = {r["system"]: r for r in rows if r["system"].startswith("transformers generate")}
    assert hf[suite.GENERATE_BATCH]["vs_generate_batch"] == 1.0 and hf[suite.GENERATE_BATCH]["seconds"] == 8.0
    # 12 requests of 4 tokens: 6 tok/s for generate_batch, 3 for static batches, 2 requests in 2 s for one at a time
    assert hf["transformers generate, static batches of 8"]["vs_generate_batch"] == 0.5
    assert hf["transformers generate, one at a time"]["vs_generate_batch"] == round(4 / 6, 2)
    assert gen["fp32"]["vs_generate_batch"] == 2.0  # 48 tokens in 4 s against 6 tok/s
    decode = [r["system"] for r in rows if r["system"].startswith("batch-1 decode step: llmspeed (")]
    assert [d.split("(")[1].split(")")[0] for d in decode] == list(gen)[1:]


def test_a_skipped_variant_has_no_rate_ratio_or_bar(monkeypatch):
    """A converted model that cannot be built (ImportError) gets a row that says so, with no tok/s, no ratio and no
    bar in the chart: it used to carry 0 tok/s and a 0x ratio, charted as a run that never happened."""
    from llmspeed.bench import charts

    def quantize_or_skip(model, fmt, **options):
        if fmt == "int4":
            raise ImportError("no int4 today")
        return llmspeed.quantize(model, fmt, **options)

    monkeypatch.setattr(llmspeed.quant, "quantize", quantize_or_skip)
    monkeypatch.setattr(suite, "_load", lambda name, device, dtype: llmspeed.models.tiny("llama", seed=0))
    monkeypatch.setattr(suite, "_hf_generate_batch", lambda hf, prompts, lengths: 8.0)
    monkeypatch.setattr(suite, "_hf_generate", lambda hf, prompts, lengths, batch, pad: 16.0)
    monkeypatch.setattr(suite, "_llmspeed", lambda model, prompts, lengths, progress, **kw: (4.0, "ran"))
    monkeypatch.setattr(suite, "decode_step_llmspeed", lambda model, **kw: 0.01)
    monkeypatch.setattr(suite, "decode_step_hf", lambda hf: 0.02)
    monkeypatch.setattr(suite, "memory_bandwidth", lambda dev: 1e10)
    monkeypatch.setattr(suite, "make_workload", lambda tok, n, **kw: ([[1, 2, 3]] * n, [4] * n))
    rows = suite.run(quick=True, progress=False)
    skipped = [r for r in rows if r["system"] == "llmspeed Generator" and r["dtype"] == "int4"]
    assert len(skipped) == 1 and skipped[0]["note"] == "skipped: no int4 today"
    assert skipped[0]["tok_s"] == skipped[0]["vs_generate_batch"] == skipped[0]["vs_llmspeed_fp32"] == ""
    assert charts._number(skipped[0]["vs_generate_batch"]) is None  # charts.batching draws bars for numbers only


def test_the_decode_step_is_the_median_of_an_even_count(monkeypatch):
    """16 steps: the mean of the two middle times, as statistics.median (it took the upper one)."""
    ticks = iter([0.0, 1.0, 1.0, 4.0, 4.0, 6.0, 6.0, 10.0] + [10.0] * 100)  # steps of 1, 3, 2 and 4 s
    monkeypatch.setattr(batch1, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: next(ticks))}))
    assert suite.decode_step_llmspeed(llmspeed.models.tiny("llama", seed=0), context=8, steps=4) == 2.5
