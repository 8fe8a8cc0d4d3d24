"""CPU inference against llama.cpp, format by format, on the same SmolLM2-135M weights in one run.

The anchor is llama.cpp through ``llama-cpp-python`` (an optional bench dependency: build it with
``CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python``, about 20 minutes on 2 cores; keep
the wheel). Its rows are skipped with the reason when it is not importable. The embedded GGUF (Q4_1)
is requantized by llama.cpp's own ``llama_model_quantize`` to F32, F16, Q8_0 and Q4_0 (cached under
``$LLMSPEED_CACHE/gguf``); llmspeed runs the same weights (the embedded model, dequantized to fp32)
in fp32, bf16, int8 and int4 g64. Both use the same number of threads.

Per format: the batch-1 decode step at a 128-token context (median of ``steps``), the prompt
evaluation of 256 tokens from a fresh state (tok/s, median of ``PREFILL_RUNS`` after a warm-up), the bytes of the weights, and the
perplexity of both on the same pydoc evaluation windows (llama.cpp scores them with ``logits_all``).
A last column times the one-sequence decode steps of the two systems interleaved, blocks of a few
steps at a time (:func:`paired_blocks`), for hosts whose speed changes within a round. Both also report
the decode step with 8 sequences running (llama.cpp through its batch API, one sequence
slot per prompt). The int8 and int4 rows have quantize's default int8 output head, whose rows the tied input
embedding reads (so the fp32 matrix is gone from ``MB``). Variants only llmspeed has (the head in fp32 or int4;
int8 activations; AWQ+GPTQ calibration with its default text) are compared with the llama.cpp row of their base format, measured in the same
rounds (each round times llmspeed's rows of a format, then llama.cpp's). A llama.cpp format that
crashes (a native build's AMX weight layout does on some CPUs: llama.cpp issue 20824) is run again without
llama.cpp's extra buffer types, and its row says so. Those rows lose its repacked Q4_0 / Q8_0 layouts too;
on such a CPU build llama.cpp without AMX instead (:data:`INSTALL_NO_AMX`), which keeps them.
"""

from __future__ import annotations

import collections.abc
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..generation import Generator, SamplingParams
from ..memory import memory_footprint
from ..models.embedded import smollm2
from ..precision import cast
from ..quant import quantize
from .llama_anchor import (
    INSTALL_NO_AMX,
    PREFIX,
    SEQS,
    LlamaBlocks,
    llama_cpp_missing,
    llama_rows_isolated,
    prefill_rate,
    pydoc_ids,
    requantized,
)
from .steps import decode_step_ms

# llmspeed format -> (llama.cpp type name, llama_ftype value of llama.h), or, for an llmspeed-only variant,
# the format whose llama.cpp row it is compared with
FORMATS: dict[str, tuple[str, int] | str] = {
    "fp32": ("F32", 0), "bf16": ("F16", 1), "int8": ("Q8_0", 7), "int4": ("Q4_0", 2),
    "int8, int8 lm_head": "int8", "int4, int8 lm_head": "int4",  # quantize's default head, named
    "int8, fp32 lm_head": "int8", "int4, fp32 lm_head": "int4",  # the head left in float (lm_head=None)
    "int8, int8 activations, int8 lm_head": "int8", "int4, int8 activations, int8 lm_head": "int4",
    "int4, awq+gptq, int8 activations, int8 lm_head": "int4",
    "int4, g32": "int4",  # Q4_0's block size, at 5 bits a weight (fp16 scales and zeros) against its 4.5
    "int4, awq+gptq, int8 activations, int4 lm_head": "int4",
    # llama.cpp caches keys and values in fp16 by default (type_k / type_v f16): the same cache on our side
    "fp32, fp16 kv cache": "fp32", "int8, int8 activations, int8 lm_head, fp16 kv cache": "int8",
    "int4, awq+gptq, int8 activations, int8 lm_head, fp16 kv cache": "int4",
    # Generator(num_scheduler_steps=8): greedy decode steps run back to back in one C++ call
    "fp32, 8 scheduler steps": "fp32", "bf16, 8 scheduler steps": "bf16", "int8, 8 scheduler steps": "int8",
    "int8, int8 activations, int8 lm_head, 8 scheduler steps": "int8",
    "int4, awq+gptq, int8 activations, int8 lm_head, 8 scheduler steps": "int4",
}  # fmt: skip
PROMPT_TOKENS = 400  # pydoc tokens each format reads: prompts, then the tokens its decode steps feed
BLOCKS = 12  # default blocks of the interleaved one-sequence decode column (4 with quick)
BLOCK_STEPS = 8  # decode steps a block; each block is summarized by its median step
# llama.cpp's side of the interleaved column feeds prompt tokens after the prefix: one untimed step, then a block
# before llmspeed's first and one after each, 1 + (blocks + 1) x BLOCK_STEPS steps of PROMPT_TOKENS - PREFIX
MAX_BLOCKS = (PROMPT_TOKENS - PREFIX - 1) // BLOCK_STEPS - 1
SETTLE_S = 0.02  # pause before each block of the interleaved column


def _llmspeed_steps(model, prompt: list[int], kv_cache_dtype: str = "auto",
                    scheduler_steps: int = 1) -> collections.abc.Generator[float, None, None]:
    """The ms of each llmspeed decode step of one sequence, ``prompt[:PREFIX]`` prefilled first (untimed), as
    :func:`llama_steps` times llama.cpp's; the first step after the prefill is untimed too.

    With ``scheduler_steps`` > 1 (the Generator's ``num_scheduler_steps``), a ``step()`` call that gives
    several tokens counts as that many steps of its mean time.
    """
    g = Generator(model, kv_cache_tokens=1024, progress=False, kv_cache_dtype=kv_cache_dtype,
                  num_scheduler_steps=scheduler_steps)  # fmt: skip
    g.add_request(prompt[:PREFIX], SamplingParams(max_new_tokens=len(prompt), ignore_eos=True))
    while not any(e.token_id is not None for e in g.step()):  # the prefill, until its first token
        pass
    g.step()
    while True:
        start = time.perf_counter()
        tokens = sum(e.token_id is not None for e in g.step())
        ms = (time.perf_counter() - start) * 1e3
        if not tokens:
            raise RuntimeError(f"the timed sequence ended after {len(prompt)} tokens")
        for _ in range(tokens):
            yield ms / tokens


def paired_blocks(ours: list[float], theirs: list[float]) -> dict[str, float]:
    """Medians of interleaved blocks, and the median ratio of each of ``ours`` to the two ``theirs`` around it.

    ``ours[k]`` (a block's median step) was timed between ``theirs[k]`` and ``theirs[k + 1]``, so ``theirs``
    has one block more. On a host whose speed drifts, the mean of the blocks just before and after is the
    other system's speed at that moment: the ratio holds where a ratio of the two medians would not.
    """
    if not ours or len(theirs) != len(ours) + 1:
        raise ValueError(f"theirs must have one block more than ours; got {len(theirs)} and {len(ours)}")
    ratios = [o / ((a + b) / 2) for o, a, b in zip(ours, theirs, theirs[1:])]
    return {"llmspeed ms": statistics.median(ours), "llama.cpp ms": statistics.median(theirs),
            "ratio": statistics.median(ratios)}  # fmt: skip


def _interleaved(models: dict[str, Any], anchor: tuple[str, int], prompt: list[int], threads: int, blocks: int,
                 extra_bufts: bool) -> dict[str, dict[str, float]]:  # fmt: skip
    """Per llmspeed row: one-sequence decode steps timed in blocks of ``BLOCK_STEPS`` between llama.cpp's.

    The order is llama.cpp's block 0, each row's block 0, llama.cpp's block 1, ..., llama.cpp's block
    ``blocks``; each side pauses ``SETTLE_S`` before its block, so that the other's threads have stopped
    spinning. :func:`paired_blocks` gives each row's numbers.
    """
    llama = LlamaBlocks(requantized(*anchor, threads), prompt, threads, extra_bufts)
    ours = {fmt: _llmspeed_steps(m, prompt, _kv_cache_dtype(fmt), _scheduler_steps(fmt)) for fmt, m in models.items()}
    mine: dict[str, list[float]] = {fmt: [] for fmt in models}
    try:
        with torch.inference_mode():
            theirs = [statistics.median(llama.block(BLOCK_STEPS))]
            for _ in range(blocks):
                for fmt, steps in ours.items():
                    time.sleep(SETTLE_S)
                    mine[fmt].append(statistics.median(next(steps) for _ in range(BLOCK_STEPS)))
                time.sleep(SETTLE_S)
                theirs.append(statistics.median(llama.block(BLOCK_STEPS)))
    finally:
        llama.close()
        for steps in ours.values():
            steps.close()
    return {fmt: paired_blocks(v, theirs) for fmt, v in mine.items()}


def _anchor_rows(anchor: tuple[str, int], prompt: list[int], windows: torch.Tensor, threads: int, steps: int,
                 crash: str | None) -> tuple[dict[str, Any] | None, str | None, str | None]:  # fmt: skip
    """One round of llama.cpp's rows for ``anchor``: ``(rows or None, crash, note for the row or None)``.

    ``crash`` is how an earlier round with llama.cpp's extra buffer types failed (``None``: it did not);
    a crash (a native build's AMX weight layout does on some CPUs) is retried without them, and once a
    round needed that, the later rounds of the format start there.
    """
    path = requantized(*anchor, threads)
    if crash is None:
        try:
            return llama_rows_isolated(path, prompt, windows, threads, steps), None, None
        except RuntimeError as err:
            crash = str(err)
    try:
        rows = llama_rows_isolated(path, prompt, windows, threads, steps, extra_bufts=False)
        return rows, crash, (f"{crash}; this row without its extra buffer types (AMX / repacked weights; a build "
                             f"without AMX keeps the repacked ones: {INSTALL_NO_AMX})")
    except RuntimeError as again:
        return None, crash, f"{crash}; without extra buffer types too ({again})"


def _llmspeed_model(fmt: str, progress: bool = False):
    """The embedded model in ``fmt``: a FORMATS key, whose parts after the first are options; ``progress``: the
    calibration's bar over decoder layers (``awq+gptq`` rows)."""
    model = smollm2()
    base, *options = fmt.split(", ")
    if base == "bf16":
        cast(model, "bf16")
    elif base in ("int8", "int4"):
        # quantize's default head is int8 per channel, which also serves as the tied input embedding
        # (share_embedding's default); in fp32 it is 113 MB, half of what an int4 decode step reads
        heads = {"int8 lm_head": "int8", "int4 lm_head": "int4", "fp32 lm_head": None}
        picked = [heads[o] for o in options if o in heads]
        head: dict[str, Any] = {"lm_head": picked[0]} if picked else {}
        acts = "int8" if "int8 activations" in options else "float"
        method = "awq+gptq" if "awq+gptq" in options else "rtn"  # its default calibration text
        group = (32 if "g32" in options else 64) if base == "int4" else None
        calibrated = {"method_options": {"progress": progress}} if method != "rtn" else {}
        quantize(model, base, group_size=group, method=method, activations=acts, **head, **calibrated)
    return model


def _kv_cache_dtype(fmt: str) -> str:
    """The ``kv_cache_dtype`` a FORMATS key asks for (``"auto"``: the model's dtype)."""
    return "fp16" if "fp16 kv cache" in fmt.split(", ")[1:] else "auto"


def _scheduler_steps(fmt: str) -> int:
    """The Generator's ``num_scheduler_steps`` a FORMATS key asks for (1 unless it says ``N scheduler steps``)."""
    wanted = [int(o.split()[0]) for o in fmt.split(", ")[1:] if o.endswith(" scheduler steps")]
    return wanted[0] if wanted else 1


def _llmspeed_rows(model, prompt: list[int], windows: torch.Tensor, steps: int, kv_cache_dtype: str = "auto",
                   scheduler_steps: int = 1) -> dict[str, Any]:  # fmt: skip
    from ..eval.perplexity import window_losses

    def ready() -> Callable[[], Any]:
        g = Generator(model, kv_cache_tokens=1024, progress=False, kv_cache_dtype=kv_cache_dtype)
        g.add_request(prompt[:256], SamplingParams(max_new_tokens=1))
        return g.step

    prefill = prefill_rate(ready)
    text = model.tokenizer.decode(windows.flatten().tolist())
    losses = window_losses(model, text, window=windows.shape[1], n_windows=windows.shape[0])
    one, eight = [prompt[:PREFIX]], [prompt[i : i + PREFIX] for i in range(SEQS)]
    options: dict[str, Any] = {"kv_cache_dtype": kv_cache_dtype, "scheduler_steps": scheduler_steps}
    return {"decode ms": decode_step_ms(model, one, steps, **options)[0],
            "prefill tok/s": prefill,
            "MB": memory_footprint(model)["total"] / 1e6, "perplexity": math.exp(losses.mean().item()),
            "decode ms, 8 sequences": decode_step_ms(model, eight, steps, **options)[0]}  # fmt: skip


def _ratios(ours: dict[str, Any], theirs: dict[str, Any], against: str) -> dict[str, Any]:
    """llmspeed over llama.cpp: decode time at 1 and 8 sequences (lower is better) and prefill tok/s."""
    return {"against": against,
            "decode llmspeed / llama.cpp": round(ours["decode ms"] / theirs["decode ms"], 2),
            "decode, 8 seqs, llmspeed / llama.cpp": round(ours["decode ms, 8 sequences"] / theirs["decode ms, 8 sequences"], 2),
            "prefill llmspeed / llama.cpp": round(ours["prefill tok/s"] / theirs["prefill tok/s"], 2),
            "ppl llmspeed / llama.cpp": round(ours["perplexity"] / theirs["perplexity"], 4)}  # fmt: skip


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per key, the median of the rounds' values (numbers) or the first round's (anything else)."""
    return {k: statistics.median(r[k] for r in runs) if isinstance(v, (int, float)) else v for k, v in runs[0].items()}


def run(device: str = "cpu", model: str = "smollm2", quick: bool = False, progress: bool = True,
        formats: Sequence[str] | None = None, rounds: int = 1, interleave: int | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """One row per format: llmspeed and llama.cpp side by side, with the ratios the issue asks for.

    ``formats``: the :data:`FORMATS` keys to run (default all); a variant's anchor format runs with it.
    ``rounds``: how many times each anchor's measurements alternate with llmspeed's. A llama.cpp format and
    the llmspeed rows compared with it (its own format and that format's variants) are timed in the same
    round, each ratio against that round's llama.cpp numbers. On a shared host whose speed drifts from
    minute to minute, one round times the two systems minutes apart; with several, the numbers are the
    medians over rounds and each ratio the median of the rounds' ratios, so a slow minute lands on both
    sides of some ratio and not on one side of all of them.

    ``interleave``: blocks of the interleaved one-sequence decode column (default :data:`BLOCKS`, 4 with
    ``quick``; 0: none). After the rounds, each anchor's llama.cpp decodes one sequence in a child process
    block by block, and each llmspeed row of the anchor times a block of its own steps between two of
    llama.cpp's (:func:`paired_blocks`): a host that changes speed within a round moves both sides of each
    ratio, which the rounds' minutes-apart measurements cannot promise.

    ``progress``: a tqdm bar over the llama.cpp anchors, and the awq+gptq rows' calibration bars (none when False).
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int; got {rounds!r}")
    if interleave is None:
        interleave = 4 if quick else BLOCKS
    most = MAX_BLOCKS
    if isinstance(interleave, bool) or not isinstance(interleave, int) or not 0 <= interleave <= most:
        raise ValueError(f"interleave must be an int of 0 to {most} blocks; got {interleave!r}")
    if device != "cpu" or model != "smollm2":
        raise ValueError(f"cpu_peers compares the embedded SmolLM2 on the CPU; got device={device!r}, model={model!r}")
    if formats is not None:
        if isinstance(formats, str) or not formats:
            raise ValueError(f"formats must be a list of FORMATS keys (or None: all); got {formats!r}"
                             + (f" (pass [{formats!r}])" if isinstance(formats, str) else ""))  # fmt: skip
        unknown = [f for f in formats if f not in FORMATS]
        if unknown:
            raise ValueError(f"formats {unknown} are not cpu_peers rows; known: {list(FORMATS)}")
        wanted = set(formats) | {FORMATS[f] for f in formats if isinstance(FORMATS[f], str)}
    else:
        wanted = set(FORMATS)
    groups: dict[str, list[str]] = {}  # llmspeed base format -> the rows timed against its llama.cpp anchor
    for fmt, anchor in FORMATS.items():
        if fmt in wanted:
            groups.setdefault(fmt if isinstance(anchor, tuple) else anchor, []).append(fmt)
    rows = []
    for base, members in tqdm(groups.items(), disable=not progress, desc="cpu_peers"):
        rows += _group_rows(base, members, quick, rounds, interleave, progress)
    return rows


def _group_rows(base: str, members: list[str], quick: bool, rounds: int, interleave: int = 0,
                progress: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """The rows of one llama.cpp anchor (``base``'s) and the llmspeed ``members`` timed against it, round by round
    (``progress``: the calibration bars of the members that calibrate)."""
    anchor = FORMATS[base]
    assert isinstance(anchor, tuple)
    threads = torch.get_num_threads()
    steps, n_windows = (16, 2) if quick else (32, 8)
    missing = llama_cpp_missing()
    models = {fmt: _llmspeed_model(fmt, progress) for fmt in members}
    prompt = pydoc_ids(models[base], PROMPT_TOKENS)
    windows = torch.tensor(pydoc_ids(models[base], 256 * n_windows)).view(n_windows, 256)  # the same windows for both
    ours_runs: dict[str, list[dict[str, Any]]] = {fmt: [] for fmt in members}
    theirs_runs: list[dict[str, Any] | None] = []  # llama.cpp's rows of each round (None: it failed)
    crash = note = None  # how llama.cpp crashed with its extra buffer types; the row's note on it
    for _ in range(rounds):
        for fmt, m in models.items():
            with torch.inference_mode():
                ours_runs[fmt].append(_llmspeed_rows(m, prompt, windows, steps, _kv_cache_dtype(fmt), _scheduler_steps(fmt)))
        theirs = None
        if missing is None and (crash is None or any(theirs_runs)):  # both ways failed in every round so far: stop
            theirs, crash, note = _anchor_rows(anchor, prompt, windows, threads, steps, crash)
        theirs_runs.append(theirs)
    blocks: dict[str, dict[str, float]] = {}
    blocks_note = None
    if interleave and any(theirs_runs):
        try:
            blocks = _interleaved(models, anchor, prompt, threads, interleave, extra_bufts=crash is None)
        except RuntimeError as err:
            blocks_note = str(err)
    del models
    rows = []
    for fmt in members:
        ours = _medians(ours_runs[fmt])
        name = f"{fmt} / {anchor[0]}" if fmt == base else f"{fmt} (llmspeed only)"
        row: dict[str, Any] = {"format": name, "threads": threads,
                               "llmspeed decode ms": round(ours["decode ms"], 2),
                               "llmspeed decode ms, 8 seqs": round(ours["decode ms, 8 sequences"], 2),
                               "llmspeed prefill tok/s": round(ours["prefill tok/s"]),
                               "llmspeed MB": round(ours["MB"]), "llmspeed ppl": round(ours["perplexity"], 3)}  # fmt: skip
        pairs = [(o, t) for o, t in zip(ours_runs[fmt], theirs_runs) if t is not None]  # the same round's
        if missing is not None:
            row["llama.cpp"] = f"skipped: {missing}"
        elif note is not None:
            row["llama.cpp"] = note
        if pairs and fmt == base:
            theirs = _medians([t for _, t in pairs])
            row.update({"llama.cpp decode ms": round(theirs["decode ms"], 2),
                        "llama.cpp decode ms, 8 seqs": round(theirs["decode ms, 8 sequences"], 2),
                        "llama.cpp prefill tok/s": round(theirs["prefill tok/s"]),
                        "llama.cpp MB": round(theirs["MB"]), "llama.cpp ppl": round(theirs["perplexity"], 3)})  # fmt: skip
        if pairs:
            row.update(_medians([_ratios(o, t, "same row" if fmt == base else f"{base} / {anchor[0]}") for o, t in pairs]))
            if rounds > 1:
                row["rounds"] = len(pairs)
        if fmt in blocks:
            row["llmspeed decode ms, interleaved"] = round(blocks[fmt]["llmspeed ms"], 2)
            if fmt == base:
                row["llama.cpp decode ms, interleaved"] = round(blocks[fmt]["llama.cpp ms"], 2)
            row["decode, interleaved, llmspeed / llama.cpp"] = round(blocks[fmt]["ratio"], 3)
            row["blocks"] = interleave
        elif blocks_note is not None:
            row["interleaved"] = blocks_note
        rows.append(row)
    return rows
