"""CPU inference against llama.cpp, format by format, on the same SmolLM2-135M weights in one run.

The anchor is llama.cpp through ``llama-cpp-python`` (an optional bench dependency: build it with
``CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python``, about 20 minutes on 2 cores; keep
the wheel). Its rows are skipped with the reason when it is not importable. The embedded GGUF (Q4_1)
is requantized by llama.cpp's own ``llama_model_quantize`` to F32, F16, Q8_0 and Q4_0 (cached under
``$LLMSPEED_CACHE/gguf``); llmspeed runs the same weights (the embedded model, dequantized to fp32)
in fp32, bf16, int8 and int4 g64. Both use the same number of threads.

Per format: the batch-1 decode step at a 128-token context (median of ``steps``), the prompt
evaluation of 256 tokens from a fresh state (tok/s, median of 3), the bytes of the weights, and the
perplexity of both on the same pydoc evaluation windows (llama.cpp scores them with ``logits_all``).
llmspeed also reports the decode step with 8 sequences running; llama-cpp-python's high-level API
decodes one sequence, so that row has no anchor. A llama.cpp format that crashes (a native build's AMX
weight layout does on some CPUs) is run again without llama.cpp's extra buffer types, and its row says so.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ..generation import Generator, SamplingParams
from ..machine import cache_root, private_dir
from ..memory import memory_footprint
from ..models.embedded import gguf_path, smollm2
from ..precision import cast
from ..quant import quantize
from .steps import decode_step_ms

# llmspeed format -> (llama.cpp type name, llama_ftype value of llama.h); None: an llmspeed-only row
FORMATS: dict[str, tuple[str, int] | None] = {"fp32": ("F32", 0), "bf16": ("F16", 1), "int8": ("Q8_0", 7),
                                              "int4": ("Q4_0", 2), "int8, int8 lm_head": None,
                                              "int4, int8 lm_head": None}
INSTALL = 'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python  (about 20 minutes on 2 cores)'


def llama_cpp_missing() -> str | None:
    """Why the llama.cpp anchor cannot run here, or ``None``."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as err:
        return f"llama-cpp-python is not installed ({err}); install it with: {INSTALL}"
    return None


def requantized(ftype_name: str, ftype: int, threads: int) -> Path:
    """The embedded GGUF requantized to ``ftype`` by llama.cpp (built once, cached)."""
    import llama_cpp

    folder = private_dir(cache_root() / "gguf")
    out = folder / f"smollm2-135m-instruct-{ftype_name}.gguf"
    if not out.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = threads
        params.allow_requantize = True
        tmp = out.with_suffix(".tmp")
        code = llama_cpp.llama_model_quantize(str(gguf_path()).encode(), str(tmp).encode(), params)
        if code != 0:
            raise RuntimeError(f"llama_model_quantize to {ftype_name} failed with code {code}")
        tmp.rename(out)
    return out


def _ids(model, n: int) -> list[int]:
    from ..eval import pydoc_text

    return model.tokenizer.encode(pydoc_text("eval"), add_special_tokens=False)[:n]


def _llama_rows(path: Path, prompt: list[int], windows: torch.Tensor, threads: int, steps: int,
                extra_bufts: bool = True) -> dict[str, Any]:  # fmt: skip
    """llama.cpp's decode, prefill, file size and perplexity. ``extra_bufts=False`` loads the weights without
    llama.cpp's extra buffer types (its AMX and repacked-tile weight layouts), for builds whose AMX path crashes."""
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    if not extra_bufts:  # Llama() takes no such argument: patch the defaults it starts from (a child process)
        defaults = llama_cpp.llama_model_default_params

        def without_extra_bufts():
            params = defaults()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama_model_default_params = without_extra_bufts
        llama_cpp.llama.llama_cpp.llama_model_default_params = without_extra_bufts

    llm = Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads,
                verbose=False)  # fmt: skip
    prefill = []
    for _ in range(3):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt[:256])
        prefill.append(256 / (time.perf_counter() - start))
    llm.reset()
    llm.eval(prompt[:128])
    decode = []
    for token in prompt[128 : 128 + steps]:
        start = time.perf_counter()
        llm.eval([token])
        decode.append((time.perf_counter() - start) * 1e3)
    del llm
    scorer = Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads,
                   logits_all=True, verbose=False)  # fmt: skip
    losses = []
    for window in windows.tolist():
        scorer.reset()
        scorer.eval(window)
        logits = torch.from_numpy(np.array(scorer.scores[: len(window)], dtype=np.float32))  # [W, V]
        losses.append(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(window[1:])).item())
    return {"decode ms": statistics.median(decode), "prefill tok/s": statistics.median(prefill),
            "MB": path.stat().st_size / 1e6, "perplexity": math.exp(statistics.fmean(losses))}  # fmt: skip


def _llama_rows_isolated(path: Path, prompt: list[int], windows: torch.Tensor, threads: int, steps: int,
                         extra_bufts: bool = True) -> dict[str, Any]:  # fmt: skip
    """:func:`_llama_rows` in a child process: a crash inside llama.cpp becomes a reported row, not the end of the run."""
    import json
    import subprocess
    import sys

    job = json.dumps({"path": str(path), "prompt": prompt, "windows": windows.tolist(), "threads": threads,
                      "steps": steps, "extra_bufts": extra_bufts})  # fmt: skip
    script = ("import json, sys, torch; from llmspeed.bench.cpu_peers import _llama_rows; a = json.load(sys.stdin); "
              "print(json.dumps(_llama_rows(__import__('pathlib').Path(a['path']), a['prompt'], "
              "torch.tensor(a['windows']), a['threads'], a['steps'], a['extra_bufts'])))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], input=job, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
        raise RuntimeError(f"llama.cpp crashed ({how}) on {path.name}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _llmspeed_model(fmt: str):
    model = smollm2()
    if fmt == "bf16":
        cast(model, "bf16")
    elif fmt.startswith("int8"):
        quantize(model, "int8")
    elif fmt.startswith("int4"):
        quantize(model, "int4", group_size=64)
    if fmt.endswith("int8 lm_head"):  # the output head is 113 MB of fp32 by default: half of what int4 decode reads
        from ..quant import Int8Linear

        model.replace_linear("lm_head", Int8Linear.from_linear(model.module.get_submodule("lm_head")))
    return model


def _llmspeed_rows(model, prompt: list[int], windows: torch.Tensor, steps: int) -> dict[str, Any]:
    from ..eval.perplexity import window_losses

    prefill = []
    for _ in range(3):
        g = Generator(model, kv_cache_tokens=1024, progress=False)
        g.add_request(prompt[:256], SamplingParams(max_new_tokens=1))
        start = time.perf_counter()
        g.step()
        prefill.append(256 / (time.perf_counter() - start))
    text = model.tokenizer.decode(windows.flatten().tolist())
    losses = window_losses(model, text, window=windows.shape[1], n_windows=windows.shape[0])
    return {"decode ms": decode_step_ms(model, [prompt[:128]], steps)[0], "prefill tok/s": statistics.median(prefill),
            "MB": memory_footprint(model)["total"] / 1e6, "perplexity": math.exp(losses.mean().item()),
            "decode ms, 8 sequences": decode_step_ms(model, [prompt[i : i + 128] for i in range(8)], steps)[0]}  # fmt: skip


def run(device: str = "cpu", model: str = "smollm2", quick: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """One row per format: llmspeed and llama.cpp side by side, with the ratios the issue asks for."""
    if device != "cpu" or model != "smollm2":
        raise ValueError(f"cpu_peers compares the embedded SmolLM2 on the CPU; got device={device!r}, model={model!r}")
    threads = torch.get_num_threads()
    steps, n_windows = (16, 2) if quick else (32, 8)
    missing = llama_cpp_missing()
    rows = []
    for fmt, anchor in FORMATS.items():
        m = _llmspeed_model(fmt)
        prompt = _ids(m, 400)
        windows = torch.tensor(_ids(m, 256 * n_windows)).view(n_windows, 256)  # the same token windows for both
        with torch.inference_mode():
            ours = _llmspeed_rows(m, prompt, windows, steps)
        row: dict[str, Any] = {"format": f"{fmt} / {anchor[0]}" if anchor else fmt, "threads": threads,
                               "llmspeed decode ms": round(ours["decode ms"], 2),
                               "llmspeed decode ms, 8 seqs": round(ours["decode ms, 8 sequences"], 2),
                               "llmspeed prefill tok/s": round(ours["prefill tok/s"]),
                               "llmspeed MB": round(ours["MB"]), "llmspeed ppl": round(ours["perplexity"], 3)}  # fmt: skip
        if anchor is None:
            row["llama.cpp"] = "(no row: llmspeed only)"
        elif missing is None:
            path = requantized(*anchor, threads)
            try:
                theirs = _llama_rows_isolated(path, prompt, windows, threads, steps)
            except RuntimeError as err:  # a native build's AMX weight layout crashes on some CPUs: retry without it
                try:
                    theirs = _llama_rows_isolated(path, prompt, windows, threads, steps, extra_bufts=False)
                    row["llama.cpp"] = f"{err}; this row without its extra buffer types (AMX / repacked weights)"
                except RuntimeError as again:
                    row["llama.cpp"] = f"{err}; without extra buffer types too ({again})"
                    rows.append(row)
                    continue
            row.update({"llama.cpp decode ms": round(theirs["decode ms"], 2),
                        "llama.cpp prefill tok/s": round(theirs["prefill tok/s"]),
                        "llama.cpp MB": round(theirs["MB"]), "llama.cpp ppl": round(theirs["perplexity"], 3),
                        "decode llmspeed / llama.cpp": round(ours["decode ms"] / theirs["decode ms"], 2),
                        "prefill llmspeed / llama.cpp": round(ours["prefill tok/s"] / theirs["prefill tok/s"], 2)})  # fmt: skip
        else:
            row["llama.cpp"] = f"skipped: {missing}"
        rows.append(row)
        del m
    return rows
