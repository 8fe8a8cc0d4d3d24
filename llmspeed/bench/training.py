"""Training suite: mixed-precision step time, peak memory and loss curves against fp32.

Two tables, each row's baseline the fp32 run of the same configuration in the same suite run:

* ``training/step``: for LoRA (rank 16, all linears, fp32 base) and full fine-tuning of SmolLM2, the
  median step time (batch, forward, backward, optimizer; the first steps are warm-up and not counted)
  and the peak memory of the training loop with ``precision="fp32"``, ``"bf16"`` and ``"fp16"``
  (autocast over fp32 master weights; fp16 with loss scaling, skipped steps counted). Each run is its
  own subprocess so its peak is its own (CPU: ``VmHWM`` reset after loading; CUDA:
  ``max_memory_allocated``), as in the LoRA suite.
* ``training/loss``: the training loss of the same runs (same windows, same seed) at a few steps, and
  the relative difference to fp32 of the mean loss over the last quarter of the steps.

On a CPU without fast 16-bit GEMM, where ``precision="bf16"`` multiplies in fp32 over bf16 operands
(:mod:`llmspeed.training.cpu_autocast`), a ``bf16 native`` row runs autocast's own bf16 kernels too.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ..training import cpu_autocast, unsupported_reason
from ..training.amp import PRECISIONS
from .lora import _current_mb, _own_storage, _peak_mb, _release_freed_heap, _reset_peak
from .models import load_model, sync

CONFIGS = ("lora", "full")
LR = {"lora": 1e-3, "full": 5e-5}
WARMUP_STEPS = 2  # step times not counted (allocator and kernel warm-up)


def settings(quick: bool, tiny: bool) -> dict[str, Any]:
    """Steps, tokens per step and curve points of one configuration run."""
    if tiny:
        return dict(steps=4, seq_len=32, batch_size=2, r=4, points=2)
    if quick:
        return dict(steps=4, seq_len=64, batch_size=2, r=16, points=2)
    return dict(steps=12, seq_len=128, batch_size=2, r=16, points=4)


def train_one(config: str, precision: str, model: str, device: str, s: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune ``model`` one way and measure step times, peak memory and losses; run it in a fresh process.

    ``precision`` ``"bf16 native"``: bf16 with autocast's own kernels (``MixedPrecision(cpu_matmul="native")``)."""
    import functools
    from contextlib import nullcontext
    from unittest import mock

    from .. import lora
    from ..trainer import finetune
    from ..training import amp, loop

    native = precision.endswith(" native")
    precision = precision.removesuffix(" native")
    kernels = functools.partial(amp.MixedPrecision, cpu_matmul="native")
    autocast_kernels = mock.patch.object(loop, "MixedPrecision", kernels) if native else nullcontext()

    torch.manual_seed(0)
    m = load_model(model, device=device, progress=False)  # a child whose stderr is captured
    if config == "lora":
        lora.add_adapter(m, "tuned", r=s["r"], alpha=2 * s["r"], targets="all-linear")
    _own_storage(m)
    texts = None if m.tokenizer is not None else torch.randint(0, m.spec.vocab_size, (4096,))
    sync(device)
    _release_freed_heap()
    before_mb = _current_mb(device)
    _reset_peak(device)
    with autocast_kernels:
        result = finetune(
            m, texts, steps=s["steps"], lr=LR[config], seq_len=s["seq_len"], batch_size=s["batch_size"],
            train="adapter" if config == "lora" else "full", precision=precision, progress=False,
        )  # fmt: skip
    sync(device)
    return {
        "step_s": statistics.median(result.step_seconds[WARMUP_STEPS:] or result.step_seconds),
        "losses": list(result.losses),
        "skipped": result.skipped_steps,
        "rss_before_mb": before_mb,
        "peak_mb": _peak_mb(device),
    }


def _in_subprocess(config: str, precision: str, model: str, device: str, s: dict[str, Any]) -> dict[str, Any]:
    code = (
        "import json, torch\n"
        f"torch.set_num_threads({torch.get_num_threads()})\n"
        "from llmspeed.bench.training import train_one\n"
        f"out = train_one({config!r}, {precision!r}, {model!r}, {device!r}, json.loads({json.dumps(s)!r}))\n"
        "print('RESULT ' + json.dumps(out))\n"
    )
    root = str(Path(__file__).resolve().parents[2])  # so the child imports this same llmspeed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"training {config} {precision} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def run(*, device: str = "cpu", model: str = "smollm2", quick: bool = False, progress: bool = True) -> list[dict]:
    """Run the training suite: ``training/step`` and ``training/loss`` rows (see the module docstring)."""
    s = settings(quick, model.startswith("tiny-"))
    precisions = [p for p in PRECISIONS if unsupported_reason(torch.device(device), PRECISIONS[p]) is None]
    if "bf16" in precisions and cpu_autocast.wanted(device, torch.bfloat16):
        precisions.append("bf16 native")
    step_rows: list[dict[str, Any]] = []
    loss_rows: list[dict[str, Any]] = []
    for config in CONFIGS:
        results = {}
        for precision in precisions:
            if progress:
                print(f"[training] {config} {precision} ({s['steps']} steps) ...", file=sys.stderr, flush=True)
            results[precision] = _in_subprocess(config, precision, model, device, s)
        base = results["fp32"]
        tail = max(1, s["steps"] // 4)
        base_tail = sum(base["losses"][-tail:]) / tail
        for precision, r in results.items():
            step_rows.append({
                "table": "training/step", "config": config, "precision": precision, "baseline": f"{config} fp32",
                "tokens/step": s["seq_len"] * s["batch_size"], "step_ms": 1000 * r["step_s"],
                "speedup_vs_fp32": base["step_s"] / r["step_s"], "peak_MiB": r["peak_mb"],
                "peak_vs_fp32": r["peak_mb"] / base["peak_mb"], "peak_over_start_MiB": r["peak_mb"] - r["rss_before_mb"],
                "skipped_steps": r["skipped"],
            })  # fmt: skip
            row = {"table": "training/loss", "config": config, "precision": precision, "baseline": f"{config} fp32"}
            for i in range(s["points"]):
                step = (i + 1) * s["steps"] // s["points"]
                row[f"loss@{step}"] = r["losses"][step - 1]
            last = sum(r["losses"][-tail:]) / tail
            row[f"mean_loss_last_{tail}"] = last
            row["vs_fp32_%"] = 100 * (last / base_tail - 1)
            row["max_step_diff_vs_fp32_%"] = max(
                100 * abs(a / b - 1) for a, b in zip(r["losses"], base["losses"])
            )
            loss_rows.append(row)
    return step_rows + loss_rows
