"""Precision suite pieces: ratios against fp32, overflow rows, the matmul microbenchmark."""

from __future__ import annotations

import torch

from llmspeed.bench.precision import _relative, matmul_rows


def _row(variant, ppl, prefill, decode, note=""):
    return {
        "variant": variant,
        "ppl": ppl,
        "weights_MB": 100.0 if variant == "fp32" else 50.0,
        "linear_MB": 80.0,
        "prefill_ms": prefill,
        "prefill_spread": 0.1,
        "decode_step_ms": decode,
        "decode_spread": 0.2,
        "note": note,
    }


def test_ratios_are_against_fp32_and_tolerate_missing_values():
    rows = _relative(
        [
            _row("fp32", 10.0, 8.0, 4.0),
            _row("bf16", 10.1, 16.0, 2.0),
            _row("fp16", None, None, None, "overflow"),
        ]
    )
    fp32, bf16, fp16 = rows
    assert all(r["baseline"] == "fp32" and r["table"] == "precision/model" for r in rows)
    assert fp32["prefill_speedup"] == 1.0 and fp32["ppl_vs_base_%"] == 0.0
    assert bf16["memory_vs_base"] == 0.5 and bf16["prefill_speedup"] == 0.5 and bf16["decode_speedup"] == 2.0
    assert abs(bf16["ppl_vs_base_%"] - 1.0) < 1e-9
    assert fp16["ppl_vs_base_%"] is None and fp16["decode_speedup"] is None and fp16["note"] == "overflow"
    assert bf16["spread_%"] == 20.0


def test_matmul_rows_cover_each_dtype_with_fp32_baseline():
    rows = matmul_rows([(1, 32, 48), (8, 32, 48)], repeats=2)
    dtypes = ("fp32", "bf16", "fp16", "bf16-upcast")  # the last: the CPU's blocked fp32 path on bf16 tensors
    assert [(r["M"], r["dtype"]) for r in rows] == [(m, d) for m in (1, 8) for d in dtypes]
    assert all(r["speedup_vs_base"] == 1.0 for r in rows if r["dtype"] == "fp32")
    for r in rows:
        assert (
            r["GFLOP/s"] > 0
            and abs(r["GFLOP/s"] * r["ms"] * 1e6 - 2 * r["M"] * 32 * 48) < 1e-6 * 2 * r["M"] * 32 * 48 * 1e3
        )


def test_model_rows_time_every_variant_in_rounds_and_leave_an_overflow_out(monkeypatch):
    """fp16 activations that overflow give a row with a note and no times; the others are timed together."""
    import llmspeed
    from llmspeed.bench import precision

    real = precision._variant_model

    def variant_model(model, device, variant, progress=False):
        m, ctx = real(model, device, variant, progress)
        if variant == "fp16":  # weights past fp16's range in gradient-free inference: activations overflow
            def overflow(*args, **kwargs):
                raise llmspeed.precision.Fp16OverflowError("fp16 activations overflowed")

            monkeypatch.setattr(m.hf, "forward", overflow)
        return m, ctx

    calls: list[list[str]] = []
    real_rr = precision.timeit_round_robin
    monkeypatch.setattr(precision, "_variant_model", variant_model)
    monkeypatch.setattr(precision, "timeit_round_robin", lambda fns, *a, **k: calls.append(list(fns)) or real_rr(fns, *a, **k))
    cfg = dict(precision._settings("cpu", quick=True), ppl_text=None)
    rows = precision.model_rows("tiny-llama", "cpu", ("fp32", "bf16", "fp16"), cfg)
    assert [r["variant"] for r in rows] == ["fp32", "bf16", "fp16"]
    assert calls == [["fp32", "bf16"], ["fp32", "bf16"]]  # prefill rounds, then decode rounds
    fp32, bf16, fp16 = rows
    assert fp32["prefill_ms"] > 0 and bf16["decode_step_ms"] > 0
    assert fp16["prefill_ms"] is None and fp16["decode_step_ms"] is None and fp16["note"] == "overflow: fp16 activations overflowed"


def test_matmul_rows_time_the_named_path_on_the_named_dtype_against_fp32(monkeypatch):
    """speedup_vs_base is fp32's time over the row's at the same shape; weight GB/s counts the weight's bytes."""
    import torch

    from llmspeed.bench import precision
    from llmspeed.timing import Timing

    ms = {("linear", torch.float32): 4.0, ("linear", torch.bfloat16): 2.0, ("linear", torch.float16): 8.0,
          ("upcast_linear", torch.bfloat16): 1.0}  # fmt: skip
    monkeypatch.setattr(precision, "timeit", lambda fn, *a, **k: Timing((ms[(fn.func.__name__, fn.args[1].dtype)] * 1e-3,)))
    rows = matmul_rows([(1, 32, 48), (8, 32, 48)], repeats=2)
    for r in rows:
        want = ms[("upcast_linear", torch.bfloat16)] if r["dtype"] == "bf16-upcast" else ms[("linear", precision.DTYPES[r["dtype"]])]
        assert r["ms"] == want and r["speedup_vs_base"] == 4.0 / want, r
        nbytes = 48 * 32 * (4 if r["dtype"] == "fp32" else 2)
        assert r["weight_GB/s"] == nbytes / (want * 1e-3) / 1e9, r


def test_model_rows_put_each_timing_in_its_column_and_run_it_in_its_variants_context(monkeypatch):
    """The prefill and decode timings land in their own columns with their own spreads, and autocast-bf16's
    timed calls (not only its warm-up) run under its autocast."""
    import torch

    from llmspeed.bench import precision
    from llmspeed.timing import Timing

    log = []

    def marked(what):
        return lambda m, n, device: lambda: log.append((what, torch.is_autocast_enabled("cpu")))

    monkeypatch.setattr(precision, "_prefill_fn", marked("prefill"))
    monkeypatch.setattr(precision, "_decode_fn", marked("decode"))

    def round_robin(fns, repeats, warmup, device=None):
        out = {}
        for variant, fn in fns.items():
            log.clear()
            fn()
            ((what, autocast),) = log
            assert autocast == (variant == "autocast-bf16"), (variant, what)
            out[variant] = Timing((0.010, 0.011, 0.012) if what == "prefill" else (0.002, 0.003, 0.004))
        return out

    monkeypatch.setattr(precision, "timeit_round_robin", round_robin)
    real = precision._variant_model

    def with_tokenizer(model, device, variant, progress=False):  # the tiny model has none: give it one, so perplexity runs
        m, ctx = real(model, device, variant, progress)
        m.tokenizer = object()
        return m, ctx

    ppl_calls = []
    monkeypatch.setattr(precision, "_variant_model", with_tokenizer)
    monkeypatch.setattr(precision, "perplexity", lambda m, *a, **k: ppl_calls.append((a, k, torch.is_autocast_enabled("cpu"))) or 12.0)
    cfg = dict(precision._settings("cpu", quick=True), ppl_text="some text")
    rows = precision.model_rows("tiny-llama", "cpu", ("fp32", "bf16", "autocast-bf16"), cfg)
    args = (("some text", 256, 2), {"batch_size": 1})  # text, window, number of windows
    assert ppl_calls == [(*args, False), (*args, False), (*args, True)]
    fp32, bf16, autocast = rows  # each its own weights: bf16's about half (norms stay fp32)
    assert autocast["weights_MB"] == fp32["weights_MB"] and 0.5 < bf16["weights_MB"] / fp32["weights_MB"] < 0.6
    for r in rows:
        assert r["ppl"] == 12.0
        assert r["prefill_ms"] == 11.0 and r["decode_step_ms"] == 3.0
        assert r["prefill_spread"] == 2 / 11 and r["decode_spread"] == 2 / 3


def test_decode_fn_steps_against_the_same_context_every_call():
    from llmspeed.bench import precision
    from llmspeed.bench.models import load_model

    m = load_model("tiny-llama", device="cpu")
    lengths = []
    forward = m.hf.forward

    def spy(*args, cache=None, **kwargs):  # takes `cache` by name, as this transformers' forward does
        if cache is not None:
            lengths.append(cache.get_seq_length())
        return forward(*args, cache=cache, **kwargs)

    m.hf.forward = spy
    step = precision._decode_fn(m, 8, "cpu")
    for _ in range(3):
        step()
    assert lengths == [8, 8, 8]


def test_cpu_variants_are_the_bf16_cast_with_and_without_its_cpu_choices(monkeypatch):
    import torch

    from llmspeed.bench import precision
    from llmspeed.precision import cpu_matmul

    monkeypatch.setattr(cpu_matmul, "_CROSSOVER", {torch.bfloat16: 4})
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    seen = {}
    for variant in ("bf16", "bf16-native", "bf16-16bit-activations"):
        m, _ = precision._variant_model("tiny-llama", "cpu", variant)
        with torch.no_grad():
            acts = m.hf.get_input_embeddings()(ids).dtype
        seen[variant] = (cpu_matmul.installed(m.module) > 0, acts)
    assert seen == {"bf16": (True, torch.float32), "bf16-native": (False, torch.bfloat16),
                    "bf16-16bit-activations": (True, torch.bfloat16)}  # fmt: skip


def test_run_times_the_cpu_variants_on_the_cpu_and_turns_non_finite_numbers_into_none(monkeypatch):
    from llmspeed.bench import precision

    seen = {}

    def model_rows(model, device, variants, cfg, progress):
        seen["variants"] = variants
        return [_row(v, 10.0, 8.0, 4.0) for v in variants]

    monkeypatch.setattr(precision, "model_rows", model_rows)
    monkeypatch.setattr(precision, "matmul_rows", lambda shapes, *a: seen.setdefault("shapes", shapes) and [{"ms": float("nan")}])
    monkeypatch.setattr(precision, "load_rows", lambda device: seen.setdefault("load", device) and [{"median_s": float("inf")}])
    rows = precision.run(model="tiny-llama", quick=True, progress=False)
    assert seen == {"variants": precision.VARIANTS + precision.CPU_VARIANTS, "shapes": [(1, 64, 128), (16, 64, 128)]}
    assert rows[-1] == {"ms": None}
    rows = precision.run(model="smollm2", quick=True, progress=False)
    assert seen["load"] == "cpu" and rows[-1] == {"median_s": None}


def test_model_rows_leave_out_a_variant_whose_decode_step_overflows(monkeypatch):
    """The decode step is tried before the timed rounds too: an overflow there gives a note, not a crash."""
    import llmspeed
    from llmspeed.bench import precision

    real = precision._decode_fn

    def decode_fn(m, context, device):
        step = real(m, context, device)
        if next(m.hf.parameters()).dtype == torch.float16:
            def overflow():
                raise llmspeed.precision.Fp16OverflowError("fp16 decode overflowed")

            return overflow
        return step

    monkeypatch.setattr(precision, "_decode_fn", decode_fn)
    cfg = dict(precision._settings("cpu", quick=True), ppl_text=None, repeats=1, decode_repeats=1)
    fp32, fp16 = precision.model_rows("tiny-llama", "cpu", ("fp32", "fp16"), cfg)
    assert fp32["decode_step_ms"] > 0 and fp16["decode_step_ms"] is None and fp16["prefill_ms"] is None
    assert fp16["note"] == "overflow: fp16 decode overflowed"
