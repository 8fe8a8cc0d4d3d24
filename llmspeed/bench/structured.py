"""Structured outputs: what constraining a batch costs, against the same batch writing free text of the same lengths,
and against transformers' ``generate`` with xgrammar's own logits processor (the way transformers users get it).

Each constrained run's requests end when their output is complete; the free-text run beside it gives every request
exactly as many tokens (``min_tokens`` = ``max_new_tokens`` = its constrained length), so both runs step the same
batch shapes through the model and their difference is the grammar's cost: the mask filled per row and step
(xgrammar), unpacked and applied by the sampler. The runs alternate, ``reps`` times each; medians are reported.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from ..generation import Generator, SamplingParams
from ..generation.structured_params import StructuredOutputsParams, xgrammar
from .models import load_model

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"},
          "city": {"type": "string", "maxLength": 16}}, "required": ["name", "age", "city"],
          "additionalProperties": False}  # fmt: skip
SPECS: dict[str, dict[str, Any]] = {
    "json schema": {"json": PERSON, "any_whitespace": False},
    "json object": {"json_object": True, "any_whitespace": False},
    "regex": {"regex": r"[A-Z][a-z]+, [0-9]{2} years, from [A-Z][a-z]+\."},
    "choice": {"choice": ["young", "middle-aged", "old"]},
}
NAMES = ["Ann", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lu", "Max", "Ned", "Oz", "Pia"]


def _prompts(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Describe {NAMES[i % len(NAMES)]}, who is {20 + 3 * i} years old and "
                                         f"lives in a city, as JSON."}] for i in range(n)]  # fmt: skip


def _valid(kind: str, text: str) -> bool:
    if kind == "json schema":
        try:
            value = json.loads(text)
        except ValueError:
            return False
        return list(value) == ["name", "age", "city"] and isinstance(value["age"], int)
    if kind == "json object":
        try:
            return isinstance(json.loads(text), dict)
        except ValueError:
            return False
    if kind == "regex":
        return re.fullmatch(SPECS["regex"]["regex"], text) is not None
    return text in SPECS["choice"]["choice"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(gen: Generator, prompts: list, params: list[SamplingParams]) -> tuple[float, list]:
    start = time.perf_counter()
    outs = gen.generate_batched(prompts, params)
    return time.perf_counter() - start, outs


def _transformers(model: Any, prompts: list, spec: dict[str, Any], max_new_tokens: int) -> tuple[float, list[list[int]]]:
    """Seconds and new tokens of one left-padded ``generate`` call with xgrammar's logits processor (greedy)."""
    xgr = xgrammar()
    tok = model.tokenizer
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=model.spec.vocab_size, stop_token_ids=[tok.eos_token_id])
    compiled = xgr.GrammarCompiler(info).compile_grammar(StructuredOutputsParams(**spec).build())
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    tok.padding_side = "left"
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.spec.device)
    _sync(model.spec.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.hf.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id,
                                logits_processor=[xgr.contrib.hf.LogitsProcessor(compiled)])  # fmt: skip
    _sync(model.spec.device)
    seconds = time.perf_counter() - start
    new = out[:, batch["input_ids"].shape[1]:].tolist()  # [B, T]: each row up to and including its end token
    return seconds, [row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row for row in new]


def run(device: str = "cpu", model: str = "smollm2", quick: bool = False, progress: bool = True, requests: int = 16,
        max_new_tokens: int = 48) -> list[dict[str, Any]]:  # fmt: skip
    """Rows ``{table, output, requests, tokens, constrained s, free text s, constrained / free, valid, ...}`` and the
    transformers comparison; ``progress``: a tqdm bar over the kinds of output."""
    m = load_model(model, device, progress=progress)
    reps = 1 if quick else 3
    kinds = ("json schema",) if quick else tuple(SPECS)
    prompts = _prompts(4 if quick else requests)
    gen = Generator(m, progress=False)
    gen.generate_batched(prompts[:2], SamplingParams(max_new_tokens=4))  # builds the fused step and the tokenizer info
    rows = []
    for kind in tqdm(kinds, disable=not progress, desc="structured outputs"):
        spec = StructuredOutputsParams(**SPECS[kind])
        constrained = [SamplingParams(max_new_tokens=max_new_tokens, structured_outputs=spec)] * len(prompts)
        _, outs = _timed(gen, prompts, constrained)  # compiles the grammar (once per spec) before the timed runs
        lengths = [len(o.token_ids) for o in outs]
        free = [SamplingParams(max_new_tokens=n, min_tokens=n, ignore_eos=True) for n in lengths]
        timed: dict[str, list[float]] = {"constrained": [], "free": []}
        for _ in range(reps):
            seconds, outs = _timed(gen, prompts, constrained)
            timed["constrained"].append(seconds)
            timed["free"].append(_timed(gen, prompts, free)[0])
        c, f = statistics.median(timed["constrained"]), statistics.median(timed["free"])
        hf_s, hf_ids = _transformers(m, prompts, SPECS[kind], max_new_tokens)
        tokens = sum(lengths)
        rows.append({"table": "structured outputs against free text of the same lengths", "output": kind,
                     "requests": len(prompts), "tokens": tokens, "constrained s": round(c, 2), "free text s": round(f, 2),
                     "constrained / free": round(c / f, 3), "valid": f"{sum(_valid(kind, o.text) for o in outs)}/{len(outs)}",
                     "stopped": f"{sum(o.finish_reason == 'stop' for o in outs)}/{len(outs)}"})  # fmt: skip
        rows.append({"table": "against transformers generate with xgrammar's logits processor (one batch, greedy)",
                     "output": kind, "requests": len(prompts), "llmspeed tok/s": round(tokens / c, 1),
                     "transformers tok/s": round(sum(len(r) for r in hf_ids) / hf_s, 1),
                     "llmspeed / transformers": round((tokens / c) / (sum(len(r) for r in hf_ids) / hf_s), 2),
                     "same tokens": f"{sum(o.token_ids == r for o, r in zip(outs, hf_ids))}/{len(outs)}"})  # fmt: skip
    return rows


__all__ = ["run"]
