"""Formats suite pieces on the tiny model: the rows the docs table is made of, and their goals."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import llmspeed
from llmspeed.bench.formats import awq, dequantized, gptq, round_trips


def test_dequantized_copy_holds_float_linears_with_the_same_logits():
    model = llmspeed.models.tiny("llama")
    llmspeed.quantize(model, "int4", group_size=32)
    copy = dequantized(model)
    assert all(type(m) is torch.nn.Linear for _, m in copy.linear_layers())
    assert type(model.hf.model.layers[0].mlp.up_proj).__name__ == "Int4Linear"  # the source is untouched
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.allclose(copy.hf(ids).logits, model.hf(ids).logits, atol=1e-5)


@pytest.mark.slow
def test_round_trip_gptq_and_awq_rows_meet_their_goals(tmp_path):
    rows = round_trips("tiny-llama", True, tmp_path) + gptq("tiny-llama", True, tmp_path) + awq("tiny-llama", True, tmp_path)
    for r in rows:
        if "vs dequantized model" in r["case"]:
            assert r["value"] <= 1e-4, r
        if r["case"].endswith("-> llmspeed"):  # every quantized layer bit-identical
            assert r["vs_baseline"] == 1, r
    assert sum("vs dequantized model" in r["case"] for r in rows) == 3  # quick: int8, int4 g32 sym and asym
    for table in ("gptq", "awq"):
        ref, got = (r["value"] for r in rows if r["table"] == table)
        assert abs(got - ref) <= 1e-5 * ref, table


def test_dequantized_copy_keeps_the_biases():
    model = llmspeed.models.tiny("qwen2")  # q/k/v projections with biases
    llmspeed.quantize(model, "int4", group_size=32)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.allclose(dequantized(model).hf(ids).logits, model.hf(ids).logits, atol=1e-5)


def test_round_trip_rows_name_what_was_quantized_and_compared(monkeypatch, tmp_path):
    """Each case names the format it quantized; each logit row is measured against the model it names, relative
    to that model's logits; "bit-identical" counts exact equality."""
    from llmspeed.bench import formats

    calls = []
    real_quantize, real_dequantized, real_load = llmspeed.quantize, formats.dequantized, llmspeed.load

    def quantize(model, fmt, group_size=None, symmetric=None, **kw):
        calls.append((fmt, group_size, symmetric))
        return real_quantize(model, fmt, group_size=group_size, symmetric=symmetric, **kw)

    def doubled(model):  # the dequantized reference's logits twice the kernels': rel difference 0.5 against it
        copy = real_dequantized(model)
        copy.hf.lm_head.weight.data *= 2
        return copy

    def load(folder):  # one layer off by far less than any tolerance: no longer bit-identical
        back = real_load(folder)
        layer = next(m for _, m in back.linear_layers() if isinstance(m, formats.QuantizedLinearBase))
        dequantize = layer.dequantize
        layer.dequantize = lambda: dequantize() + 1e-6
        return back

    monkeypatch.setattr(llmspeed, "quantize", quantize)
    monkeypatch.setattr(formats, "dequantized", doubled)
    monkeypatch.setattr(llmspeed, "load", load)
    rows = round_trips("tiny-llama", False, tmp_path)
    assert calls == formats.ROUND_TRIPS  # quick=False: all seven
    names = ["int8", *(f"int4 g{g} {s}" for g in (32, 64, 128) for s in ("sym", "asym"))]
    assert [r["case"] for r in rows] == [
        f"tiny-llama {c}{tail}" for c in names
        for tail in (" -> transformers vs dequantized model", " -> transformers vs llmspeed kernels", " -> llmspeed")
    ]  # fmt: skip
    for r in rows:
        if r["case"].endswith("vs dequantized model"):
            assert r["value"] == pytest.approx(0.5, rel=1e-3) and r["vs_baseline"] == pytest.approx(5000, rel=1e-3)
        elif r["case"].endswith("vs llmspeed kernels"):
            assert r["value"] <= 1e-4, r
        else:
            assert r["value"] == 13 and r["unit"] == "of 14 layers bit-identical" and r["vs_baseline"] == 13 / 14


def test_gptq_rows_compare_the_loaded_folder_with_the_reference(monkeypatch, tmp_path):
    from llmspeed.bench import formats

    nll = iter([0.0, math.log(1.5)])  # the reference first, then the loaded folder
    monkeypatch.setattr(formats, "_nll", lambda model, ids: next(nll))
    ref, got = gptq("tiny-llama", True, tmp_path)
    assert (ref["value"], ref["baseline"]) == (1.0, "-")
    assert got["case"] == "GPTQ v1 act-order g64 -> llmspeed (14 permuted layers)"
    assert got["value"] == pytest.approx(1.5) and got["vs_baseline"] == pytest.approx(1.5)
    nll = iter([0.0, math.log(1.25)])
    ref, got = awq("tiny-llama", True, tmp_path)
    assert got["case"] == "AWQ gemm g64 -> llmspeed" and got["vs_baseline"] == pytest.approx(1.25)


def test_peak_mib_reads_the_peak_and_its_rise_above_the_weight_free_baseline(monkeypatch, tmp_path):
    from llmspeed.bench import formats

    done = SimpleNamespace(returncode=0, stdout="some log line\n100.5\n250.0\n", stderr="")
    monkeypatch.setattr(formats.subprocess, "run", lambda *a, **k: done)
    assert formats._peak_mib("while-loading", tmp_path) == (250.0, 149.5)


def test_quantize_while_loading_rows_compare_with_fp32_then_quantize(monkeypatch, tmp_path):
    from llmspeed.bench import formats

    peaks = {"fp32-then-quantize": (400.0, 300.0), "while-loading": (200.0, 100.0)}
    monkeypatch.setattr(formats, "_peak_mib", lambda mode, folder: peaks[mode])
    rows = {r["case"]: r for r in formats.quantize_while_loading("tiny-llama", tmp_path)}
    assert rows["from_pretrained(quantize=int4 g64)"]["vs_baseline"] == 0.5
    assert rows["from_pretrained(quantize): above baseline"]["vs_baseline"] == pytest.approx(1 / 3)
    assert rows["load fp32, then quantize int4 g64"]["value"] == 400.0
    assert rows["packed tensors bit for bit equal"]["value"] == 1.0

    real = llmspeed.models.from_pretrained

    def one_tensor_off(*args, **kwargs):
        model = real(*args, **kwargs)
        next(iter(model.hf.state_dict().values())).add_(1)
        return model

    monkeypatch.setattr(llmspeed.models, "from_pretrained", one_tensor_off)
    rows = {r["case"]: r for r in formats.quantize_while_loading("tiny-llama", tmp_path / "again")}
    assert rows["packed tensors bit for bit equal"]["value"] == 0.0


def test_load_times_are_medians_of_warm_loads(monkeypatch, tmp_path):
    from llmspeed.bench import formats

    now = [0.0]
    durations = iter([100.0, 1.0, 5.0, 3.0] * 2)  # per format: the warm-up load, then three timed ones

    def load(folder):
        now[0] += next(durations)

    saved = []
    real_save = llmspeed.save

    def save(model, folder, format):  # what is saved: int4 g64 symmetric decoder linears, as the docstring says
        saved.append({(m.config.format, m.config.group_size, m.config.symmetric) for n, m in model.linear_layers()
                      if isinstance(m, formats.QuantizedLinearBase) and n != "lm_head"})  # fmt: skip
        return real_save(model, folder, format=format)

    monkeypatch.setattr(formats, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(llmspeed, "load", load)
    monkeypatch.setattr(llmspeed, "save", save)
    rows = formats.load_times("tiny-llama", True, tmp_path)
    assert saved == [{("int4", 64, True)}] * 2
    assert [(r["case"], r["value"], r["vs_baseline"]) for r in rows] == [
        ("llmspeed.load, llmspeed folder", 3.0, 1.5), ("llmspeed.load, compressed-tensors folder", 3.0, 1.5)]


def test_run_is_cpu_only_and_adds_the_tiny_models_round_trips(monkeypatch):
    from llmspeed.bench import formats

    with pytest.raises(ValueError, match="the formats suite runs on the CPU; got device='cuda'"):
        formats.run(device="cuda")
    calls = []
    for name in ("round_trips", "gptq", "awq", "quantize_while_loading", "load_times"):
        monkeypatch.setattr(formats, name, lambda model, *a, name=name: calls.append((name, model)) or [])
    formats.run(model="smollm2", quick=True)
    assert calls == [("round_trips", "smollm2"), ("round_trips", "tiny-llama"), ("gptq", "smollm2"), ("awq", "smollm2"),
                     ("quantize_while_loading", "smollm2"), ("load_times", "smollm2")]  # fmt: skip
    calls.clear()
    formats.run(model="tiny-llama", quick=True)
    assert [c[0] for c in calls] == ["round_trips", "gptq", "awq", "quantize_while_loading", "load_times"]


def test_run_shows_a_bar_over_its_tables_only_when_asked(monkeypatch, capsys):
    """Regression: run() took ``progress`` and ignored it; the other suites show a tqdm bar when it is True."""
    from llmspeed.bench import formats

    for name in ("round_trips", "gptq", "awq", "quantize_while_loading", "load_times"):
        monkeypatch.setattr(formats, name, lambda model, *a, name=name: [{"table": name}])
    assert len(formats.run(model="tiny-llama", progress=False)) == 5
    assert "formats" not in capsys.readouterr().err
    assert len(formats.run(model="tiny-llama", progress=True)) == 5
    assert "formats: 100%" in capsys.readouterr().err
