"""Quant suite pieces: the kernel microbenchmark's rows and baselines."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import llmspeed
from llmspeed.bench.quant import kernel_rows, run
from llmspeed.precision import cpu_matmul
from llmspeed.quant.kernels import KERNELS
from llmspeed.quant.primitives import quantize_activations


def test_kernel_rows_compare_bf16_paths_with_what_a_cast_layer_runs(monkeypatch):
    monkeypatch.setattr(cpu_matmul, "_CROSSOVER", {torch.bfloat16: 4})
    rows = kernel_rows("cpu", [(64, 96)], [1, 8], quick=True, progress=False)
    cases = [r["case"] for r in rows]
    # below the crossover a cast layer runs the native kernel; from it on, the fp32-block path, timed too
    assert "64x96 M=1 bf16 F.linear" in cases and not any(c.startswith("64x96 M=1 bf16 cast layer") for c in cases)
    assert "64x96 M=8 bf16 cast layer (fp32 blocks)" in cases
    for r in rows:
        if " bf16 " in r["case"] and r["case"].split()[2] in ("int8", "int4", "nf4"):
            expected = "bf16 cast layer" if "M=8" in r["case"] else "bf16 F.linear"
            assert r["baseline"] == expected, r
        assert r["value"] > 0 or r["value"] != r["value"]  # a time, or NaN for a failed aten op
    # int4 layers with int8 activations get rows of their own (their kernels see the input on its int8 grid)
    acts = [c for c in cases if " int4 int8-activations fp32 " in c]
    assert any(c.endswith("dequant_fp32") or "dequant_fp32 (auto)" in c for c in acts), acts
    if KERNELS["cpp_panels"].unavailable() is None:
        assert "64x96 M=8 int4 int8-activations fp32 cpp_panels" in cases  # timed (auto takes it from 9 rows)
        assert not any("cpp_panels" in c for c in cases if " int4 fp32 " in c)  # float-activation layers: never


def test_run_refuses_unknown_tables_before_loading_anything():
    with pytest.raises(ValueError, match=r"tables must be among \['perplexity', 'memory', 'kernels', 'decode'\]"):
        run(tables=["kernel"])


def test_memory_rows_count_the_decoders_linears_whether_the_head_is_tied_or_not():
    """Regression: with the int8 head as quantize's default, a tied model's "linear layers" row counted the head
    (its QuantizedEmbedding has no .weight, so the tie check matched None against None)."""
    import transformers

    from llmspeed.bench import quant as Q

    ratios = {}
    for tie in (False, True):
        cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)  # fmt: skip
        torch.manual_seed(0)
        model = llmspeed.wrap(transformers.AutoModelForCausalLM.from_config(cfg).eval())
        ratios[tie] = {r["case"]: r["vs_baseline"] for r in Q.memory_rows(model)}
    assert ratios[True]["int8 linear layers"] == pytest.approx(ratios[False]["int8 linear layers"], rel=1e-6)
    assert ratios[True]["int4 g64 linear layers"] < 0.16  # the head (int8, 512 x 256) would add 0.03


def _tiny():
    return llmspeed.models.tiny("llama", hidden_size=128, intermediate_size=256)


def test_kernel_rows_divide_each_time_by_its_own_baselines_time(monkeypatch):
    """Every timed path is a row of its own, and vs_baseline is the named baseline row's time over the row's."""
    from llmspeed.bench import quant as Q

    monkeypatch.setattr(cpu_matmul, "_CROSSOVER", {torch.bfloat16: 4})
    times = iter(range(1, 10_000))
    monkeypatch.setattr(Q, "_time", lambda fn, device, quick: next(times) * 1e-6)  # a new time per timing
    rows = kernel_rows("cpu", [(64, 96)], [1, 8], quick=True, progress=False)
    values = [r["value"] for r in rows]
    assert len(set(values)) == len(values)  # no row reuses another's timing (the cast layer's included)
    assert not any(" reference" in r["case"] for r in rows)  # the reference kernel is a check, not a path
    for r in rows:
        shape = " ".join(r["case"].split()[:2])
        base_case = {"fp32": "fp32 F.linear", "fp32 F.linear": "fp32 F.linear", "bf16 F.linear": "bf16 F.linear",
                     "bf16 cast layer": "bf16 cast layer (fp32 blocks)"}[r["baseline"]]  # fmt: skip
        base = next(b for b in rows if b["case"] == f"{shape} {base_case}")
        assert r["vs_baseline"] == pytest.approx(base["value"] / r["value"]), r


def test_time_keeps_a_slow_paths_first_median_and_times_a_fast_one_again_with_more_calls(monkeypatch):
    from llmspeed.bench import quant as Q
    from llmspeed.timing import Timing

    for first, calls_want in ((0.5, [(3, 1, 1)]), (1e-4, [(3, 1, 1), (5, 0, 200)])):
        calls = []

        def fake(fn, repeats, warmup, inner, device, first=first, calls=calls):
            calls.append((repeats, warmup, inner))
            return Timing((first, first, first) if len(calls) == 1 else (1.0, 2.0, 9.0))

        monkeypatch.setattr(Q, "timeit", fake)
        assert Q._time(lambda: None, "cpu", quick=True) == (first if first > 0.25 else 2.0)
        assert calls == calls_want


def test_perplexity_rows_measure_the_format_each_row_names(monkeypatch):
    from llmspeed.bench import quant as Q
    from llmspeed.quant.modules import QuantizedLinearBase

    def label(model):
        layers = [m.config for n, m in model.linear_layers() if isinstance(m, QuantizedLinearBase) and "lm_head" not in n]
        (label,) = {c.format + ("" if c.format == "int8" else f" g{c.group_size}") + (" dq" if c.double_quant else "")
                    for c in layers} or {"fp32"}  # fmt: skip
        return label

    names = ["fp32", *(n for n, _ in Q.FORMATS)]
    seen = []
    monkeypatch.setattr(llmspeed.eval, "perplexity", lambda m, n_windows: seen.append(n_windows) or 10.0 + names.index(label(m)))
    rows = Q.perplexity_rows(_tiny(), quick=True, progress=False)
    assert seen == [4] * len(names)
    assert [r["case"] for r in rows] == ["fp32 (4 x 512 tokens)", *names[1:]]
    for i, r in enumerate(rows):
        assert r["value"] == 10.0 + i and r["vs_baseline"] == pytest.approx((10.0 + i) / 10.0), r


def test_greedy_decode_counts_decode_steps_only_and_returns_the_greedy_tokens(monkeypatch):
    from llmspeed.bench import quant as Q

    model = _tiny()
    prompt = torch.arange(100, 108)
    clock = iter([10.0, 12.0])
    monkeypatch.setattr(Q, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    tps, tokens = Q.greedy_decode(model, prompt, 5)
    assert tps == 4 / 2.0  # the first token comes from the prefill, outside the timed loop
    with torch.no_grad():
        want = model.hf.generate(prompt[None], max_new_tokens=5, do_sample=False)[0, 8:].tolist()
    assert tokens == want


def test_decode_rows_take_the_median_run_and_count_tokens_as_the_float_model(monkeypatch):
    from llmspeed.bench import quant as Q

    base = _tiny()
    runs = {"base": iter([30.0, 10.0, 20.0]), "quant": iter([5.0, 15.0, 10.0] * len(Q.DECODE_FORMATS))}

    def fake(model, prompt, new):
        who = "base" if model is base else "quant"
        if new == 4:  # warm-up
            return 0.0, []
        return next(runs[who]), ([1, 2, 3, 4] if who == "base" else [1, 2, 9, 4])

    monkeypatch.setattr(Q, "greedy_decode", fake)
    rows = Q.decode_rows(base, "cpu", quick=True, progress=False, dtype_name="fp32")
    assert [(r["case"], r["value"], r["baseline"]) for r in rows] == [("fp32 batch-1 greedy", 20.0, "fp32")] + [
        (f"{n} (3/4 tokens as fp32)", 10.0, "fp32") for n in Q.DECODE_FORMATS
    ]
    assert [r["vs_baseline"] for r in rows] == [1.0] + [0.5] * len(Q.DECODE_FORMATS)  # tok/s over the float's


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_run_measures_the_tables_asked_for_in_the_devices_setting(monkeypatch, device):
    from llmspeed.bench import quant as Q

    calls = {}

    def record(name):
        return lambda *a, **k: calls.setdefault(name, []).append(a) or []

    loaded = []
    monkeypatch.setattr(Q, "_load", lambda model, device, dtype: loaded.append(dtype) or _tiny())
    for name in ("perplexity_rows", "memory_rows", "kernel_rows", "graph_kernel_rows", "decode_rows"):
        monkeypatch.setattr(Q, name, record(name))
    run(device=device, model="tiny-llama", quick=True, tables=["kernels"])
    assert loaded == [torch.float32 if device == "cpu" else torch.bfloat16]
    assert set(calls) == ({"kernel_rows"} if device == "cpu" else {"kernel_rows", "graph_kernel_rows"})
    (args,) = calls["kernel_rows"]
    assert args[2] == [1, 4, 16, 64, 256 if device == "cpu" else 512]
    assert args[1][-1] == ((4096, 4096) if device == "cpu" else (4096, 14336))
    calls.clear()
    run(device=device, model="tiny-llama", quick=True, tables=["decode"])
    assert list(calls) == ["decode_rows"] and calls["decode_rows"][0][-1] == ("fp32" if device == "cpu" else "bf16")


def test_run_refuses_perplexity_or_memory_where_it_would_not_measure_them(monkeypatch):
    """Regression: tables=["perplexity"] (or memory) with another model or on CUDA returned no rows, silently."""
    from llmspeed.bench import quant as Q

    def no_load(*a, **k):
        raise AssertionError("loaded a model before refusing")

    monkeypatch.setattr(Q, "_load", no_load)
    for model, device in (("tiny-llama", "cpu"), ("smollm2", "cuda")):
        with pytest.raises(ValueError, match=r"tables perplexity and memory are measured for model='smollm2' on "
                           rf"device='cpu' only; got tables=\['kernels', 'memory'\] with model='{model}', device='{device}'"):  # fmt: skip
            run(device=device, model=model, tables=["kernels", "memory"])
    calls = []
    monkeypatch.setattr(Q, "_load", lambda model, device, dtype: _tiny())
    for name in ("perplexity_rows", "memory_rows", "kernel_rows", "graph_kernel_rows", "decode_rows"):
        monkeypatch.setattr(Q, name, lambda *a, name=name, **k: calls.append(name) or [])
    run(device="cuda", model="smollm2", quick=True)  # the default: every table this setting measures
    assert calls == ["kernel_rows", "graph_kernel_rows", "decode_rows"]


def test_kernel_rows_time_each_path_on_the_input_dtype_its_row_names_and_mark_one_auto_path(monkeypatch):
    from llmspeed.bench import quant as Q

    monkeypatch.setattr(cpu_matmul, "_CROSSOVER", {torch.bfloat16: 4})
    inputs = []

    def fake_time(fn, device, quick):  # the timed lambdas bind their input as a default argument
        inputs.append(next(a for a in fn.__defaults__ if isinstance(a, torch.Tensor) and a.dim() == 2))
        return len(inputs) * 1e-6

    monkeypatch.setattr(Q, "_time", fake_time)
    rows = kernel_rows("cpu", [(64, 96)], [1, 8], quick=True, progress=False)
    autos = {}
    for r in rows:
        words = r["case"].split()
        dname = next(w for w in words[2:] if w in ("fp32", "bf16"))
        x = inputs[round(r["value"]) - 1]
        assert x.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dname], r
        if "int8-activations" in words:  # such a layer's kernel sees its input on the int8 grid
            assert torch.allclose(quantize_activations(x).float(), x.float(), rtol=1e-2, atol=0), r
        if words[2] in ("int8", "int4", "nf4"):
            group = " ".join(words[: words.index(dname) + 1])
            autos[group] = autos.get(group, 0) + r["case"].endswith(" (auto)")
    assert autos and all(n == 1 for n in autos.values()), autos  # one auto path per layer and input dtype


def test_memory_rows_whole_model_rows_count_the_whole_quantized_model():
    from llmspeed.bench import quant as Q

    base = _tiny()
    rows = {r["case"]: r for r in Q.memory_rows(base)}
    ref = llmspeed.memory_footprint(base)["total"] / 2**20
    assert rows["fp32 whole model"]["value"] == ref
    for name, _ in Q.FORMATS:
        want = llmspeed.memory_footprint(Q._quantized(base, name))["total"] / 2**20
        assert rows[f"{name} whole model"]["value"] == want and rows[f"{name} whole model"]["vs_baseline"] == want / ref
