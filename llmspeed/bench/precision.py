"""Precision suite: fp32 vs bf16 vs fp16 (and bf16 autocast) on one model, plus a matmul microbenchmark.

Two tables, every row against fp32 measured in the same run:

* ``precision/model``: perplexity, weight memory, prefill time and batch-1 decode step time of the
  model cast with :func:`llmspeed.cast` (norms and rotary stay fp32), and of the fp32 model run
  under :func:`llmspeed.autocast` (weights fp32, matmuls bf16). On the CPU, ``bf16-native`` is the
  bf16 cast with ``cpu_matmul="native"``, to show what the per-call matmul choice gains, and
  ``bf16-16bit-activations`` the cast with that choice but 16-bit activations between the layers
  (:func:`~llmspeed.precision.cpu_matmul.keep_16_bit_activations`), to show what fp32 activations gain;
* ``precision/matmul``: ``F.linear`` at a few shapes ``[M, K] x [N, K]^T`` in each dtype, as
  GFLOP/s and as weight GB/s, to show what the hardware does with each dtype. On the CPU a
  ``bf16-upcast`` row times :func:`llmspeed.precision.cpu_matmul.upcast_linear` on the same bf16 tensors.

Why the matmul table matters: a CPU without native bf16 (AVX2 only, no AVX512-BF16/AMX) emulates
bf16 and fp16 arithmetic, so a large-M matmul (prefill, perplexity) is several times slower
than fp32. At M=1 (decode) the matmul is bound by reading the weights, and half the bytes can
still make bf16 faster. On a GPU both 16-bit types run on tensor cores and win at every M.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..eval import perplexity, pydoc_text
from ..memory import memory_footprint
from ..precision import autocast, cast, cpu_matmul
from ..precision.cpu_matmul import upcast_linear
from ..timing import timeit, timeit_round_robin
from .models import load_model, sync

VARIANTS = ("fp32", "bf16", "fp16", "autocast-bf16")
# the bf16 cast without the per-call CPU matmul choice, and with it but 16-bit activations (before 2026-12-03)
CPU_VARIANTS = ("bf16-native", "bf16-16bit-activations")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _settings(device: str, quick: bool) -> dict[str, Any]:
    """Sizes per mode: quick fits a few minutes on 2 CPU cores; full uses the reference windows."""
    cuda = torch.device(device).type == "cuda"
    return {
        # quick: a prefix of the eval text holds the same first windows and tokenizes in a fraction of the time
        "ppl_text": pydoc_text("eval")[:40_000] if quick else None,
        "ppl_window": 256 if quick else 512,
        "ppl_windows": 2 if quick else 16,
        "prefill_tokens": 64 if quick else 512,
        "decode_context": 32 if quick else 256,
        "repeats": 3 if quick else 7,
        "decode_repeats": 5 if quick else 30,
        "matmul_shapes": (
            [(1, 4096, 4096), (256, 4096, 4096), (1, 576, 1536)]
            if quick
            else [(1, 4096, 4096), (16, 4096, 4096), (256, 4096, 4096), (1, 576, 1536), (512, 576, 1536)]
        )
        + ([(2048, 4096, 4096)] if cuda else []),
    }


def _variant_model(model: str, device: str, variant: str, progress: bool = False):
    """A fresh model in ``variant``'s precision, and the context its forward passes run under."""
    m = load_model(model, device=device, progress=progress)
    if variant == "autocast-bf16":
        return m, lambda: autocast(m, "bf16")
    if variant == "bf16-native":
        cast(m, "bf16", cpu_matmul="native")
        return m, nullcontext
    if variant == "bf16-16bit-activations":
        cast(m, "bf16")
        cpu_matmul.keep_16_bit_activations(m.module)
        return m, nullcontext
    cast(m, variant)
    return m, nullcontext


def _prefill_fn(m, tokens: int, device: str) -> Callable[[], Any]:
    ids = torch.randint(0, m.spec.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)  # [1, T]

    def run():
        with torch.no_grad():
            m.hf(input_ids=ids, use_cache=False, logits_to_keep=1)

    return run


def _decode_fn(m, context: int, device: str) -> Callable[[], Any]:
    """One batch-1 decode step against a KV cache of ``context`` tokens (cropped back after each step)."""
    ids = torch.randint(0, m.spec.vocab_size, (1, context + 1), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)  # [1, context + 1]
    # transformers renamed `past_key_values` to `cache` (5.2x); pass whichever this version takes
    cache_kwarg = "cache" if "cache" in inspect.signature(m.hf.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = m.hf(input_ids=ids[:, :context], use_cache=True)
    cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
    step_ids = ids[:, context:]  # [1, 1]

    def run():
        with torch.no_grad():
            m.hf(input_ids=step_ids, use_cache=True, **{cache_kwarg: cache})
        cache.crop(-1)  # negative: remove that many tokens (the meaning every transformers version shares)

    return run


def _inside(ctx: Callable[[], Any], fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` called inside a fresh ``ctx()`` (a variant's autocast or nothing) each time."""
    def run() -> None:
        with ctx():
            fn()

    return run


def model_rows(model: str, device: str, variants: Sequence[str], cfg: dict[str, Any], progress: bool = False) -> list[dict[str, Any]]:
    """Perplexity, memory, prefill and decode-step time of ``model`` in each of ``variants``.

    Every variant is built first and the timings run in rounds, one prefill (then one decode step) of
    each variant per round (:func:`~llmspeed.timing.timeit_round_robin`): on a shared machine the
    configurations see the same noise, so their ratios hold. A variant whose activations overflow
    (fp16) gets a row saying so and is left out of the timing.
    """
    built = {v: _variant_model(model, device, v, progress) for v in tqdm(variants, disable=not progress, desc="precision")}
    rows: dict[str, dict[str, Any]] = {}
    prefills, decodes = {}, {}
    for variant, (m, ctx) in built.items():
        mem = memory_footprint(m)
        row = rows[variant] = {"variant": variant, "ppl": None, "weights_MB": mem["total"] / 1e6,
                               "linear_MB": mem["linear"] / 1e6, "prefill_ms": None, "prefill_spread": 0.0,
                               "decode_step_ms": None, "decode_spread": 0.0,
                               "note": "" if m.tokenizer is not None else "no tokenizer: no perplexity"}  # fmt: skip
        with ctx():
            try:
                if m.tokenizer is not None:
                    row["ppl"] = perplexity(m, cfg["ppl_text"], cfg["ppl_window"], cfg["ppl_windows"], batch_size=1)
                prefill, decode = _prefill_fn(m, cfg["prefill_tokens"], device), _decode_fn(m, cfg["decode_context"], device)
                prefill()  # an overflow shows here, before the timed rounds
                decode()
            except FloatingPointError as err:  # fp16 overflow on this model: a row that says so
                row["note"] = f"overflow: {str(err)[:60]}"
                continue
        prefills[variant], decodes[variant] = _inside(ctx, prefill), _inside(ctx, decode)
    # (what, calls, repeats, warm-up rounds, column of the median)
    for what, fns, repeats, warmup, column in (("prefill", prefills, cfg["repeats"], 1, "prefill_ms"),
                                               ("decode", decodes, cfg["decode_repeats"], 2, "decode_step_ms")):  # fmt: skip
        for variant, t in timeit_round_robin(fns, repeats, warmup, device=device).items():
            rows[variant][column] = t.median * 1e3
            rows[variant][f"{what}_spread"] = t.spread
    return [rows[v] for v in variants]


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def _relative(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add ratios against the fp32 row of the same run, and name that baseline in every row."""
    base = next(r for r in rows if r["variant"] == "fp32")
    out = []
    for r in rows:
        ppl_delta = None
        if r["ppl"] is not None and base["ppl"] is not None:
            ppl_delta = 100 * (r["ppl"] / base["ppl"] - 1)
        out.append(
            {
                "table": "precision/model",
                "variant": r["variant"],
                "baseline": "fp32",
                "ppl": r["ppl"],
                "ppl_vs_base_%": ppl_delta,
                "weights_MB": r["weights_MB"],
                "memory_vs_base": r["weights_MB"] / base["weights_MB"],
                "prefill_ms": r["prefill_ms"],
                "prefill_speedup": _ratio(base["prefill_ms"], r["prefill_ms"]),
                "decode_step_ms": r["decode_step_ms"],
                "decode_speedup": _ratio(base["decode_step_ms"], r["decode_step_ms"]),
                "spread_%": 100 * max(r["prefill_spread"], r["decode_spread"]),
                "note": r["note"],
            }
        )
    return out


def matmul_rows(
    shapes: list[tuple[int, int, int]], device: str = "cpu", repeats: int = 5, progress: bool = False
) -> list[dict[str, Any]]:
    """Time ``F.linear(x[M, K], w[N, K])`` in fp32, bf16 and fp16 at each ``(M, K, N)``; fp32 is the baseline.

    On the CPU, ``bf16-upcast`` rows time :func:`~llmspeed.precision.cpu_matmul.upcast_linear` on bf16 tensors.
    """
    rows = []
    gen = torch.Generator().manual_seed(0)
    cpu = torch.device(device).type == "cpu"
    names = [*DTYPES, *(["bf16-upcast"] if cpu else [])]
    todo = [(shape, name) for shape in shapes for name in names]
    base_ms: dict[tuple[int, int, int], float] = {}
    for (m, k, n), name in tqdm(todo, disable=not progress, desc="matmul", leave=False):
        dtype = DTYPES[name.removesuffix("-upcast")]
        x = torch.randn(m, k, generator=gen).to(device, dtype)  # [M, K]
        w = torch.randn(n, k, generator=gen).to(device, dtype)  # [N, K]
        flops = 2 * m * k * n
        # enough inner calls that one sample lasts a few milliseconds
        inner = max(1, min(200, int(2e8 / flops))) if cpu else 20
        fn = partial(upcast_linear, x, w) if name.endswith("-upcast") else partial(F.linear, x, w)
        t = timeit(fn, repeats, 1, inner, device=device)
        base_ms.setdefault((m, k, n), t.median * 1e3)
        rows.append(
            {
                "table": "precision/matmul",
                "M": m,
                "K": k,
                "N": n,
                "dtype": name,
                "baseline": "fp32",
                "ms": t.median * 1e3,
                "GFLOP/s": flops / t.median / 1e9,
                "weight_GB/s": w.numel() * w.element_size() / t.median / 1e9,
                "speedup_vs_base": base_ms[(m, k, n)] / (t.median * 1e3),
                "spread_%": 100 * t.spread,
            }
        )
    return rows


def load_rows(device: str) -> list[dict]:
    """Time of ``llmspeed.models.smollm2()`` once the safetensors cache exists (the first call converts it)."""
    from ..models import smollm2

    smollm2(device=device)  # make sure the cache exists; this call may be the slow first conversion
    t = timeit(lambda: smollm2(device=device), repeats=5, warmup=1)
    return [{"table": "precision/load", "what": "llmspeed.models.smollm2(), cached", "median_s": t.median,
             "spread_%": t.spread * 100, "goal_s": 1.0}]


def run(
    *, device: str = "cpu", model: str = "smollm2", quick: bool = False, progress: bool = True
) -> list[dict]:
    """Run the precision suite; return the ``precision/model`` and ``precision/matmul`` rows."""
    cfg = _settings(device, quick)
    if model.startswith("tiny-"):  # harness tests: a microbenchmark at the tiny model's own shapes
        cfg["matmul_shapes"] = [(1, 64, 128), (16, 64, 128)]
    variants = VARIANTS + (CPU_VARIANTS if torch.device(device).type == "cpu" else ())
    rows = _relative(model_rows(model, device, variants, cfg, progress))
    sync(device)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    rows += matmul_rows(cfg["matmul_shapes"], device, cfg["repeats"], progress)
    if model == "smollm2":
        rows += load_rows(device)
    for r in rows:
        for key, value in r.items():
            if isinstance(value, float) and not math.isfinite(value):
                r[key] = None
    return rows
