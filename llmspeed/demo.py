"""``python -m llmspeed demo``: the main job on the embedded SmolLM2, end to end, with a short table.

Each step works on a fresh copy of the model (loading from the cache takes well under a second)
and adds one row: what was done, the model's memory, perplexity on a few pydoc windows, generation
speed (``generated tok/s``: output tokens over the wall time of the call, the prompt's processing
included, so below the decode rate alone), and a sample of greedy text.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from . import models
from .eval import perplexity, pydoc_text
from .memory import memory_footprint
from .models.embedded import MAX_POSITIONS
from .precision import cast
from .timing import markdown_table

PROMPT = "What is a Python decorator?"


def _chat(model, prompt: str) -> list[int]:
    tok = model.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


@torch.no_grad()
def _greedy(model, prompt: str, new_tokens: int) -> tuple[str, float]:
    """Greedy text with transformers' own ``generate`` (the baseline every module must keep working)."""
    ids = torch.tensor([_chat(model, prompt)], device=model.spec.device)
    pad = model.tokenizer.eos_token_id
    model.hf.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=pad)  # warm-up: kernels built/chosen
    start = time.perf_counter()
    out = model.hf.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    seconds = time.perf_counter() - start
    n = out.shape[1] - ids.shape[1]
    return model.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True), n / seconds


def _row(step: str, model, args, sample: bool = True) -> dict[str, Any]:
    mem = memory_footprint(model)
    row: dict[str, Any] = {
        "step": step,
        "memory MB": round(mem["total"] / 2**20, 1),
        "linear MB": round(mem["linear"] / 2**20, 1),
        "perplexity": round(perplexity(model, window=args.window, n_windows=args.windows), 3),
    }
    if sample:
        text, tok_s = _greedy(model, PROMPT, args.new_tokens)
        row["generated tok/s"] = round(tok_s, 1)
        row["sample"] = " ".join(text.split())[:60]
    return row


def _fp32(args) -> dict[str, Any]:
    return _row("fp32 (baseline)", models.smollm2(), args)


def _bf16(args) -> dict[str, Any]:
    return _row("cast bf16", cast(models.smollm2(), "bf16"), args)


def _int8(args) -> dict[str, Any]:
    from .quant import quantize

    return _row("quantize int8", quantize(models.smollm2(), "int8"), args)


def _int4(args) -> dict[str, Any]:
    from .quant import quantize

    return _row("quantize int4 g64", quantize(models.smollm2(), "int4", group_size=64), args)


def _qlora(args) -> dict[str, Any]:
    from . import lora
    from .eval import pydoc_text
    from .quant import quantize

    model = quantize(models.smollm2(), "int4", group_size=64)
    lora.add_adapter(model, "pydoc", r=8, alpha=16)
    lora.finetune(model, [pydoc_text("train")], steps=args.lora_steps, lr=5e-4, seq_len=128, batch_size=4)
    return _row(f"int4 + LoRA ({args.lora_steps} steps)", model, args)


def _batched(args) -> dict[str, Any]:
    from .generation import Generator, SamplingParams

    model = models.smollm2()
    prompts = [
        "What is a Python decorator?",
        "Explain list comprehensions.",
        "What does the with statement do?",
        "How do generators work?",
    ] * 2
    gen = Generator(model, progress=False, chat_template=True)  # builds the fused decode kernel on first use
    gen.generate_batched(prompts[:1], SamplingParams(max_new_tokens=2))  # warm-up
    start = time.perf_counter()
    outs = gen.generate_batched(prompts, SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0))
    seconds = time.perf_counter() - start
    row = _row("generate_batched x8", model, args, sample=False)
    row["generated tok/s"] = round(sum(len(o.token_ids) for o in outs) / seconds, 1)
    row["sample"] = " ".join(outs[0].text.split())[:60]
    return row


STEPS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "fp32": _fp32,
    "bf16": _bf16,
    "int8": _int8,
    "int4": _int4,
    "qlora": _qlora,
    "batched": _batched,
}


def _at_least(minimum: int, at_most: tuple[int, str] | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= minimum`` (and ``<= at_most[0]``, whose reason is ``at_most[1]``),
    refused at parse time (not after a model has loaded)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}; got {text!r}")
        if at_most is not None and value > at_most[0]:
            raise argparse.ArgumentTypeError(f"must be at most {at_most[0]} ({at_most[1]}); got {text!r}")
        return value

    return parse


def _check_text_length(parser: argparse.ArgumentParser, window: int, windows: int) -> None:
    """Refuse ``--window x --windows`` beyond the evaluation text's tokens now, not after the steps have run.

    A byte-level BPE token holds at least one byte, so the text's bytes bound its tokens from above: only a request
    close to that bound pays for loading the tokenizer and counting exactly.
    """
    text = pydoc_text("eval")
    need, size = window * windows, len(text.encode())  # size: the text's bytes, at least its tokens
    if need * 8 <= size:
        return
    from .models.embedded import tokenizer

    tokens = len(tokenizer().encode(text, add_special_tokens=False)) if need <= size else 0
    if need > tokens:
        parser.error(
            f"--window {window} x --windows {windows} needs {need} tokens; the evaluation text (pydoc topics, "
            f"first half) has {tokens or f'at most {size}'}: pass fewer or shorter windows"
        )


def main(argv: list[str] | None = None) -> int:
    """Run the demo steps and print their table."""
    parser = argparse.ArgumentParser(prog="python -m llmspeed demo", description=__doc__)
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {list(STEPS)}")
    parser.add_argument("--windows", type=_at_least(1), default=4, help="perplexity windows (default 4)")
    window_limit = (MAX_POSITIONS, "SmolLM2's max_position_embeddings: perplexity refuses longer windows")
    parser.add_argument("--window", type=_at_least(2, window_limit), default=256,
                        help=f"tokens per perplexity window, 2 to {MAX_POSITIONS} (default 256)")
    parser.add_argument("--new-tokens", type=_at_least(1), default=32, help="tokens to generate per sample")
    parser.add_argument("--lora-steps", type=_at_least(1), default=20, help="fine-tuning steps in the qlora step")
    args = parser.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        parser.error(f"--steps: {f'unknown {unknown}' if unknown else 'none given'}; accepted: {list(STEPS)}")
    _check_text_length(parser, args.window, args.windows)
    rows = []
    for name in steps:
        print(f"[demo] {name} ...", flush=True)
        rows.append(STEPS[name](args))
    print()
    print(markdown_table(rows, ["step", "memory MB", "linear MB", "perplexity", "generated tok/s", "sample"]))
    return 0
