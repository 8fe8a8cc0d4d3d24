"""Precision suite pieces: ratios against fp32, overflow rows, the matmul microbenchmark."""

from __future__ import annotations

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

    def variant_model(model, device, variant):
        m, ctx = real(model, device, variant)
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
    assert fp16["prefill_ms"] is None and fp16["decode_step_ms"] is None and fp16["note"].startswith("overflow")


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
