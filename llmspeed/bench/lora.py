"""LoRA suite: QLoRA vs LoRA vs full fine-tuning, adapter overhead at inference, PEFT interop.

Three tables, each row naming its baseline measured in the same run:

* ``lora/train``: fine-tune SmolLM2 on the ``"train"`` half of the pydoc text with (a) rank-16
  adapters over an int4 (group 64) base, (b) the same adapters over the fp32 base, (c) every
  parameter of the fp32 model; held-out loss and perplexity on ``"eval"`` windows before and
  after, steps/s, and peak memory. Each configuration runs in its own subprocess so that its
  peak memory is its own: on CPU the peak resident set size of the training loop (``VmHWM``,
  reset after loading), on CUDA ``torch.cuda.max_memory_allocated``.
* ``lora/inference``: decode step time (batch 1, KV cache) with one unmerged adapter vs the
  adapter merged vs no adapter; and a batch of 4 sequences whose rows use 4 different adapters
  (one pass, ``concat``; and PEFT's loop over adapters, ``segment``) vs the same batch with one
  adapter, for decode steps and for prefill.
* ``lora/interop``: max |logit difference| (fp32) when PEFT loads an adapter we saved, and when
  we load one PEFT saved.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

import torch

from .. import lora
from ..memory import memory_footprint
from ..timing import timeit
from .models import load_model, sync

CONFIGS = ("full-fp32", "lora-fp32", "qlora-int4-g64")


def _settings(quick: bool, tiny: bool) -> dict[str, Any]:
    if tiny:  # harness tests: seconds
        return dict(steps=3, seq_len=32, batch_size=2, eval_windows=2, r=4, repeats=3, context=16, prefill=16)
    if quick:
        return dict(
            steps=24, seq_len=128, batch_size=2, eval_windows=6, r=16, repeats=7, context=64, prefill=64
        )
    return dict(
        steps=100, seq_len=256, batch_size=4, eval_windows=16, r=16, repeats=15, context=256, prefill=256
    )


LR = {"full-fp32": 5e-5, "lora-fp32": 1e-3, "qlora-int4-g64": 1e-3}  # each a usual choice for its method


# --- peak memory -----------------------------------------------------------------------------------
def _reset_peak(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
    except OSError:
        pass


def _release_freed_heap() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``) so RSS counts live memory only.

    Without it the fp32 weights that quantization freed stay in the process's resident set, and
    QLoRA's peak would include a model it no longer holds.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS keeps the freed pages
        pass


def _own_storage(m) -> None:
    """Copy every parameter and buffer out of the memory-mapped weights file.

    The embedded model's tensors are views of an ``mmap`` of its safetensors file; one live view
    (the embedding, which quantization leaves float) keeps the whole mapping, and every page
    quantization read stays in the resident set. Copying makes RSS measure what each
    configuration really holds (the same bytes for a float model, far fewer for a quantized one).
    """
    with torch.no_grad():
        for t in [*m.module.parameters(), *m.module.buffers()]:
            if t.device.type == "cpu":
                t.data = t.data.clone()


def _peak_mb(device: str) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_mb(device: str) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- training (one configuration per subprocess) ----------------------------------------------------
def train_config(config: str, model: str, device: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Prepare ``model`` for ``config``, fine-tune it, and measure; run it in a fresh process."""
    torch.manual_seed(0)
    m = load_model(model, device=device, progress=False)  # a child whose stderr is captured
    if config == "qlora-int4-g64":
        from ..quant import quantize

        quantize(m, "int4", group_size=64)
    if config != "full-fp32":
        lora.add_adapter(m, "tuned", r=settings["r"], alpha=2 * settings["r"], targets="all-linear")
    _own_storage(m)
    texts = None if m.tokenizer is not None else torch.randint(0, m.spec.vocab_size, (4096,))
    eval_windows = settings["eval_windows"] if m.tokenizer is not None else 0
    weights_mb = memory_footprint(m)["total"] / 2**20
    sync(device)
    _release_freed_heap()
    before_mb = _current_mb(device)
    _reset_peak(device)
    result = lora.finetune(
        m,
        texts,
        steps=settings["steps"],
        lr=LR[config],
        seq_len=settings["seq_len"],
        batch_size=settings["batch_size"],
        full=config == "full-fp32",
        eval_windows=eval_windows,
        progress=False,
    )
    sync(device)
    return {
        "before": result.eval_loss_before,
        "after": result.eval_loss_after,
        "train_loss_first": result.losses[0],
        "train_loss_last": sum(result.losses[-5:]) / len(result.losses[-5:]),
        "steps_per_s": result.steps_per_second,
        "trainable": result.trainable_params,
        "weights_mb": weights_mb,
        "rss_before_mb": before_mb,
        "peak_mb": _peak_mb(device),
    }


def _train_in_subprocess(config: str, model: str, device: str, settings: dict[str, Any]) -> dict[str, Any]:
    code = (
        "import json, sys, torch\n"
        f"torch.set_num_threads({torch.get_num_threads()})\n"
        "from llmspeed.bench.lora import train_config\n"
        f"out = train_config({config!r}, {model!r}, {device!r}, json.loads({json.dumps(settings)!r}))\n"
        "print('RESULT ' + json.dumps(out))\n"
    )
    import os

    root = str(Path(__file__).resolve().parents[2])  # so the child imports this same llmspeed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"training {config} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def _ppl(loss: float | None) -> float | None:
    return None if loss is None else math.exp(loss)


def train_rows(model: str, device: str, settings: dict[str, Any], progress: bool) -> list[dict[str, Any]]:
    """The ``lora/train`` table: one row per configuration, baseline full fine-tuning of the fp32 model."""
    results = {}
    for config in CONFIGS:
        if progress:
            print(f"[lora] training {config} ({settings['steps']} steps) ...", file=sys.stderr, flush=True)
        results[config] = _train_in_subprocess(config, model, device, settings)
    base = results["full-fp32"]
    rows = []
    for config, r in results.items():
        rows.append(
            {
                "table": "lora/train",
                "config": config,
                "baseline": "full-fp32",
                "steps": settings["steps"],
                "tokens/step": settings["seq_len"] * settings["batch_size"],
                "trainable_params": r["trainable"],
                "lr": LR[config],
                "eval_loss_before": r["before"],
                "eval_loss_after": r["after"],
                "ppl_before": _ppl(r["before"]),
                "ppl_after": _ppl(r["after"]),
                "steps/s": r["steps_per_s"],
                "speed_vs_base": r["steps_per_s"] / base["steps_per_s"],
                "weights_MiB": r["weights_mb"],
                "peak_MiB": r["peak_mb"],
                "peak_vs_base": r["peak_mb"] / base["peak_mb"],
                "peak_over_start_MiB": r["peak_mb"] - r["rss_before_mb"],
            }
        )
    return rows


# --- inference overhead ------------------------------------------------------------------------------
def _cache_kwarg(hf) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"


def _decode_fn(m, batch: int, context: int, device: str, ctx=None):
    """One decode step for ``batch`` rows against a KV cache of ``context`` tokens (cropped back after)."""
    from contextlib import nullcontext

    ctx = ctx or nullcontext
    ids = torch.randint(
        0, m.spec.vocab_size, (batch, context + 1), generator=torch.Generator().manual_seed(1)
    )
    ids = ids.to(device)  # [B, context + 1]
    kwarg = _cache_kwarg(m.hf)
    with torch.no_grad(), ctx():
        out = m.hf(input_ids=ids[:, :context], use_cache=True)
    cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
    step = ids[:, context:]  # [B, 1]

    def run():
        with torch.no_grad(), ctx():
            m.hf(input_ids=step, use_cache=True, **{kwarg: cache})
        cache.crop(-1)

    return run


def _prefill_fn(m, batch: int, tokens: int, device: str, ctx=None):
    from contextlib import nullcontext

    ctx = ctx or nullcontext
    ids = torch.randint(0, m.spec.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(2))
    ids = ids.to(device)  # [B, T]

    def run():
        with torch.no_grad(), ctx():
            m.hf(input_ids=ids, use_cache=False, logits_to_keep=1)

    return run


def _small_random_b(m, name: str, std: float = 0.01) -> None:
    """Give adapter ``name`` a non-zero ``B`` of realistic size (what a few hundred steps produce)."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    with torch.no_grad():
        for _, layer in lora.lora_layers(m):
            w = layer.weight_b(name)
            w.copy_(torch.randn(w.shape, generator=gen) * std)


def inference_rows(model: str, device: str, settings: dict[str, Any], progress: bool) -> list[dict[str, Any]]:
    """The ``lora/inference`` table: decode/prefill time with adapters unmerged, merged, mixed."""
    m = load_model(model, device=device, progress=progress)
    names = [f"a{i}" for i in range(4)]
    for name in names:
        lora.add_adapter(m, name, r=settings["r"], alpha=2 * settings["r"])
        _small_random_b(m, name)
    rep, ctx_len, prefill = settings["repeats"], settings["context"], settings["prefill"]
    rows: list[dict[str, Any]] = []

    def add(phase, batch, variant, baseline, fn):
        t = timeit(fn, rep, 2, device=device)
        rows.append(
            {
                "table": "lora/inference",
                "phase": phase,
                "batch": batch,
                "variant": variant,
                "baseline": baseline,
                "ms": t.median * 1e3,
                "spread_%": 100 * t.spread,
            }
        )

    if progress:
        print("[lora] timing adapter overhead ...", file=sys.stderr, flush=True)
    one = "merged"
    lora.set_adapter(m, None)
    add("decode", 1, "no adapter", one, _decode_fn(m, 1, ctx_len, device))
    lora.set_adapter(m, "a0")
    add("decode", 1, "1 adapter, unmerged", one, _decode_fn(m, 1, ctx_len, device))
    lora.merge(m, "a0")
    add("decode", 1, "merged", one, _decode_fn(m, 1, ctx_len, device))
    lora.unmerge(m, "a0")
    mixed = lambda method: lambda: lora.per_row_adapters(m, names, method=method)  # noqa: E731
    same = lambda: lora.per_row_adapters(m, ["a0"] * 4)  # noqa: E731
    for phase, make in (
        ("decode", lambda c: _decode_fn(m, 4, ctx_len, device, c)),
        ("prefill", lambda c: _prefill_fn(m, 4, prefill, device, c)),
    ):
        base = "4 rows, 1 adapter"
        add(phase, 4, base, base, make(None))
        add(phase, 4, "4 rows, 1 adapter via per_row_adapters", base, make(same))
        add(phase, 4, "4 rows, 4 adapters, concat (one pass)", base, make(mixed("concat")))
        add(phase, 4, "4 rows, 4 adapters, segment (loop, as PEFT)", base, make(mixed("segment")))
    for phase in ("decode", "prefill"):
        group = [r for r in rows if r["phase"] == phase]
        for r in group:
            ref = next(g for g in group if g["variant"] == r["baseline"])
            r["vs_baseline"] = r["ms"] / ref["ms"]
    return rows


# --- PEFT interop ------------------------------------------------------------------------------------
def interop_rows(model: str, device: str, settings: dict[str, Any], progress: bool) -> list[dict[str, Any]]:
    """The ``lora/interop`` table: PEFT loads ours, we load PEFT's; max |logit diff| in fp32."""
    try:
        import peft
    except ImportError:
        return [
            {
                "table": "lora/interop",
                "direction": "peft not installed",
                "baseline": "-",
                "max_abs_logit_diff": None,
                "max_abs_logit": None,
                "within_1e-4": None,
            }
        ]
    ids = torch.randint(
        0,
        load_model(model, device=device, progress=progress).spec.vocab_size,
        (2, 48),
        generator=torch.Generator().manual_seed(3),
    ).to(device)

    def logits(hf):
        with torch.no_grad():
            return hf(input_ids=ids).logits.float()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ours = load_model(model, device=device, progress=progress)
        lora.add_adapter(ours, "x", r=settings["r"], alpha=2 * settings["r"], targets="all-linear")
        _small_random_b(ours, "x")
        lora.save_adapter(ours, Path(tmp) / "ours", "x")
        base = load_model(model, device=device, progress=progress).hf
        theirs = peft.PeftModel.from_pretrained(base, Path(tmp) / "ours")
        want, got = logits(ours.hf), logits(theirs)
        rows.append(("llmspeed saves, PEFT loads", want, got))
        hf = load_model(model, device=device, progress=progress).hf
        pm = peft.get_peft_model(
            hf, peft.LoraConfig(r=settings["r"], lora_alpha=2 * settings["r"], target_modules="all-linear")
        )
        gen = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
        pm.save_pretrained(str(Path(tmp) / "peft"))
        want = logits(pm)
        mine = load_model(model, device=device, progress=progress)
        lora.load_adapter(mine, Path(tmp) / "peft", "p")
        rows.append(("PEFT saves, llmspeed loads", want, logits(mine.hf)))
    out = []
    for direction, want, got in rows:
        diff = (want - got).abs().max().item()
        out.append(
            {
                "table": "lora/interop",
                "direction": direction,
                "baseline": "the saving library's logits",
                "max_abs_logit_diff": diff,
                "max_abs_logit": want.abs().max().item(),
                "within_1e-4": diff <= 1e-4,
            }
        )
    return out


def run(
    *, device: str = "cpu", model: str = "smollm2", quick: bool = False, progress: bool = True
) -> list[dict]:
    """Run the LoRA suite: ``lora/train``, ``lora/inference`` and ``lora/interop`` rows."""
    settings = _settings(quick, model.startswith("tiny-"))
    rows = train_rows(model, device, settings, progress)
    rows += inference_rows(model, device, settings, progress)
    rows += interop_rows(model, device, settings, progress)
    return rows
