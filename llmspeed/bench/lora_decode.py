"""LoRA adapters on the fused CPU decode step: the cost of one adapter, and of a different adapter per row.

A decode step of the quantized model without any adapter (the baseline of the ratios), of the same model with
four r=16 adapters on every projection and no row using one, with one adapter at batch 1 (and with one of
sixteen adapters on the model: what a step reads should not grow with the adapters no row uses), and at batch 8
with the four spread over the rows (one row without), each configuration measured in every repetition in turn so that a
shared machine's drift hits all alike: the fused step with its adapter stacks in fp16 (the default) and in fp32,
and the generic per-layer path. The ``path`` column says which way the steps ran (``fused cpu`` is the C++ step;
before adapters joined it, any adapter sent decode to the generic path). A second table says what each kind of
stack changes in the greedy tokens and their log-probabilities, against the generic path.
"""

from __future__ import annotations

import copy
import statistics
from typing import Any

import torch

from .. import lora
from ..generation import SamplingParams
from ..quant import quantize
from .models import load_model
from .steps import decode_step_ms

ADAPTERS = ("a", "b", "c", "d")
MANY = tuple(f"m{i:02d}" for i in range(16))
PLAIN = "model without adapters"  # the configurations run on a copy of the quantized model with no LoRA wrapper
OF_MANY = f"of {len(MANY)} on the model"  # ... on a copy with the MANY adapters
CONFIGS: dict[str, list[str | None]] = {  # label -> adapter per row
    f"batch 1, {PLAIN}": [None],
    "batch 1, no adapter": [None],
    "batch 1, one adapter": ["a"],
    f"batch 1, one adapter {OF_MANY}": [MANY[0]],
    f"batch 8, {PLAIN}": [None] * 8,
    "batch 8, no adapter": [None] * 8,
    "batch 8, 4 adapters over the rows": ["a", "b", "c", "d", None, "a", "b", "c"],
}
STEPS: dict[str, tuple[bool | None, str]] = {  # label -> (Generator's fused_decode, lora_dtype)
    "fused, fp16 stacks": (None, "float16"),
    "fused, fp32 stacks": (None, "float32"),
    "generic": (False, "float16"),
}


def run(device: str = "cpu", model: str = "smollm2", quick: bool = False, progress: bool = True,
        fmt: str = "int4", rank: int = 16) -> list[dict[str, Any]]:  # fmt: skip
    """Rows ``{table, step, config, path, ms, vs model without adapters}``: the fused step with and without
    adapters, and the generic path for the same configurations (what adapters cost before they joined the fused
    step); each ratio is to the same batch of the model without adapters, in the same kind of step."""
    if device != "cpu":
        raise ValueError(f"the fused decode step runs on the CPU; got device={device!r}")
    reps, steps = (3, 8) if quick else (7, 16)
    m = load_model(model, "cpu", progress=progress)
    quantize(m, fmt)
    plain = copy.deepcopy(m)
    many = copy.deepcopy(m)
    g = torch.Generator().manual_seed(0)
    for target, adapters in ((m, ADAPTERS), (many, MANY)):
        for name in adapters:
            lora.add_adapter(target, name, r=rank, alpha=2 * rank)
            with torch.no_grad():
                for _, layer in lora.lora_layers(target):
                    layer.weight_b(name).copy_(torch.randn(layer.weight_b(name).shape, generator=g) * 0.01)
        lora.set_adapter(target, None)
    samples: dict[tuple[str, str], list[float]] = {}
    paths: dict[tuple[str, str], str] = {}
    with torch.inference_mode():
        for _ in range(reps):
            for step, (fused, dtype) in STEPS.items():
                for label, names in CONFIGS.items():
                    prompts = [list(range(100, 140 + i)) for i in range(len(names))]
                    target = plain if PLAIN in label else many if OF_MANY in label else m
                    ms, path = decode_step_ms(target, prompts, steps, names, fused, lora_dtype=dtype)
                    samples.setdefault((label, step), []).append(ms)
                    paths[(label, step)] = path
    rows = []
    rows += _agreement(m, CONFIGS["batch 8, 4 adapters over the rows"], 8 if quick else 32)
    for step in STEPS:
        for label in CONFIGS:
            base = f"{label.split(',')[0]}, {PLAIN}"
            ms = statistics.median(samples[(label, step)])
            rows.append({"table": f"{fmt} decode step, r={rank} adapters", "step": step,
                         "config": label, "path": paths[(label, step)], "ms": round(ms, 2),
                         "vs model without adapters": round(ms / statistics.median(samples[(base, step)]), 3)})  # fmt: skip
    return rows


def _agreement(model: Any, names: list[str | None], tokens: int) -> list[dict[str, Any]]:
    """What each kind of stack changes in the output: greedy tokens of one request per row (adapters ``names``) on
    every fused step against the generic path (adapters in the model's fp32), and the largest difference of a
    token's log-probability before the first token that differs."""
    prompts = [list(range(100, 140 + i)) for i in range(len(names))]
    params = [SamplingParams(max_new_tokens=tokens, temperature=0.0, ignore_eos=True, logprobs=0, adapter=a)
              for a in names]  # fmt: skip
    outs = {}
    for step, (fused, dtype) in STEPS.items():
        outs[step] = model.generate_batched(prompts, params, fused_decode=fused, lora_dtype=dtype, progress=False)
    ref = outs["generic"]
    rows = []
    for step in STEPS:
        same = worst = 0.0
        for mine, theirs in zip(outs[step], ref):
            for a, b, la, lb in zip(mine.token_ids, theirs.token_ids, mine.logprobs, theirs.logprobs):
                if a != b:
                    break
                same += 1
                worst = max(worst, abs(la.logprob - lb.logprob))
        rows.append({"table": "greedy tokens against the generic path (fp32 adapters)", "step": step,
                     "tokens equal before the first difference": f"{int(same)} / {tokens * len(names)}",
                     "largest logprob difference": f"{worst:.2e}"})  # fmt: skip
    return rows
