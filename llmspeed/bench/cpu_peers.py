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

import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
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
SEQS = 8  # sequences of the batched decode rows
PREFILL_RUNS = 5  # timed 256-token prompts per system, after one warm-up; the table takes their median
PROMPT_TOKENS = 400  # pydoc tokens each format reads: prompts, then the tokens its decode steps feed
PREFIX = 128  # prompt tokens prefilled before the decode steps of both systems (the decode context)
BLOCKS = 12  # default blocks of the interleaved one-sequence decode column (4 with quick)
BLOCK_STEPS = 8  # decode steps a block; each block is summarized by its median step
# llama.cpp's side of the interleaved column feeds prompt tokens after the prefix: one untimed step, then a block
# before llmspeed's first and one after each, 1 + (blocks + 1) x BLOCK_STEPS steps of PROMPT_TOKENS - PREFIX
MAX_BLOCKS = (PROMPT_TOKENS - PREFIX - 1) // BLOCK_STEPS - 1
SETTLE_S = 0.02  # pause before each block of the interleaved column
INSTALL = 'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python  (about 20 minutes on 2 cores)'
# a CPU with AMX (Sapphire Rapids and later): ggml's AMX matmul crashes there, its other native kernels do not
INSTALL_NO_AMX = ("CMAKE_ARGS='-DGGML_NATIVE=ON -DCMAKE_C_FLAGS=\"-mno-amx-tile -mno-amx-int8 -mno-amx-bf16\" "
                  "-DCMAKE_CXX_FLAGS=\"-mno-amx-tile -mno-amx-int8 -mno-amx-bf16\"' pip install llama-cpp-python")


def llama_cpp_missing() -> str | None:
    """Why the llama.cpp anchor cannot run here, or ``None``."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as err:
        return f"llama-cpp-python is not installed ({err}); install it with: {INSTALL}"
    return None


def requantized(ftype_name: str, ftype: int, threads: int, source: Path | None = None,
                stem: str = "smollm2-135m-instruct", folder: Path | None = None) -> Path:  # fmt: skip
    """The GGUF ``source`` (default: the embedded one) requantized to ``ftype`` by llama.cpp, kept as
    ``<stem>-<ftype_name>-<key>.gguf`` in ``folder`` (default: the cache's ``gguf`` folder): built once for each
    source file (its path, size and time) and llama-cpp-python version, which ``key`` hashes."""
    import llama_cpp

    src = Path(source or gguf_path())
    stat = src.stat() if src.exists() else None
    ident = f"{getattr(llama_cpp, '__version__', '?')}|{src.resolve()}|{stat and (stat.st_size, stat.st_mtime_ns)}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:10]
    out = (folder or private_dir(cache_root() / "gguf")) / f"{stem}-{ftype_name}-{key}.gguf"
    if not out.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = threads
        params.allow_requantize = True
        tmp = out.with_suffix(".tmp")
        try:
            code = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
            if code != 0:
                raise RuntimeError(f"llama_model_quantize to {ftype_name} failed with code {code}")
            tmp.rename(out)
        finally:
            tmp.unlink(missing_ok=True)  # a failed run's partial file (up to the F32 file's size)
    return out


def pydoc_ids(model, n: int) -> list[int]:
    """The first ``n`` tokens of the pydoc evaluation text: the prompts and perplexity windows of both systems."""
    from ..eval import pydoc_text

    return model.tokenizer.encode(pydoc_text("eval"), add_special_tokens=False)[:n]


def _prefill_rate(ready: Callable[[], Callable[[], Any]]) -> float:
    """Median tok/s of ``PREFILL_RUNS`` 256-token prompts after one untimed warm-up (one-time kernel choices and
    allocations); ``ready()`` sets up a fresh state untimed and returns the prompt evaluation to time."""
    rates = []
    for i in range(PREFILL_RUNS + 1):
        run = ready()
        start = time.perf_counter()
        run()
        if i:
            rates.append(256 / (time.perf_counter() - start))
    return statistics.median(rates)


def _without_extra_bufts() -> None:
    """Load llama.cpp models without its extra buffer types from now on, in this (child) process.

    ``Llama()`` takes no such argument: this patches the model defaults it and the batch API start from.
    """
    import llama_cpp

    defaults = llama_cpp.llama_model_default_params

    def without_extra_bufts():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_model_default_params = without_extra_bufts
    llama_cpp.llama.llama_cpp.llama_model_default_params = without_extra_bufts


def _llama_rows(path: Path, prompt: list[int], windows: torch.Tensor, threads: int, steps: int,
                extra_bufts: bool = True) -> dict[str, Any]:  # fmt: skip
    """llama.cpp's decode, prefill, file size and perplexity. ``extra_bufts=False`` loads the weights without
    llama.cpp's extra buffer types (its AMX and repacked-tile weight layouts), for builds whose AMX path crashes."""
    from llama_cpp import Llama

    if not extra_bufts:
        _without_extra_bufts()
    llm = Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads,
                verbose=False)  # fmt: skip

    def ready(model: Any = llm) -> Callable[[], Any]:  # a parameter: llm is deleted before the scorer loads
        model.reset()
        return lambda: model.eval(prompt[:256])

    prefill = _prefill_rate(ready)
    llm.reset()
    llm.eval(prompt[:PREFIX])
    decode = []
    for token in prompt[PREFIX : PREFIX + steps]:
        start = time.perf_counter()
        llm.eval([token])
        decode.append((time.perf_counter() - start) * 1e3)
    del llm
    decode8 = _llama_decode_rows(path, [prompt[i : i + PREFIX] for i in range(SEQS)], prompt[PREFIX:], threads, steps)
    return {"decode ms": statistics.median(decode), "prefill tok/s": prefill,
            "MB": path.stat().st_size / 1e6, "perplexity": llama_perplexity(path, windows, threads),
            "decode ms, 8 sequences": decode8}  # fmt: skip


def llama_perplexity(path: Path, windows: torch.Tensor, threads: int) -> float:
    """llama.cpp's perplexity of the GGUF at ``path`` on token ``windows`` [n, W] (``logits_all``, fp32 losses)."""
    import numpy as np
    from llama_cpp import Llama

    scorer = Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads,
                   logits_all=True, verbose=False)  # fmt: skip
    losses = []
    for window in windows.tolist():
        scorer.reset()
        scorer.eval(window)
        logits = torch.from_numpy(np.array(scorer.scores[: len(window)], dtype=np.float32))  # [W, V]
        losses.append(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(window[1:])).item())
    return math.exp(statistics.fmean(losses))


def _llama_decode_rows(path: Path, prompts: list[list[int]], tokens: list[int], threads: int, steps: int) -> float:
    """Median ms of llama.cpp decode steps with ``len(prompts)`` sequences running, one token each per step.

    llama-cpp-python's ``Llama`` decodes one sequence, so this drives llama.cpp's own batch API
    (:func:`_llama_steps`).
    """
    with closing(_llama_steps(path, prompts, tokens, threads)) as times:
        return statistics.median(next(times) for _ in range(steps))


def _llama_steps(path: Path, prompts: list[list[int]], tokens: list[int], threads: int) -> Iterator[float]:
    """The ms of each llama.cpp decode step, one token per sequence, with ``len(prompts)`` sequences running.

    One context with a sequence slot per prompt, all prompts prefilled before the first step; step ``i``
    feeds ``tokens[i + s]`` to sequence ``s``. The model loads with the defaults as patched by the caller, so
    a run without extra buffer types stays without them. Close the generator to free the context.
    """
    import llama_cpp

    n = len(prompts)
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_seq_max, params.n_batch, params.n_ubatch = 512 * n, n, 512 * n, 512
    params.n_threads = params.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model, params)
    batch = llama_cpp.llama_batch_init(512 * n, 0, 1)
    try:
        def decode(entries: list[tuple[int, int, int, bool]]) -> None:  # (token, position, sequence, logits)
            batch.n_tokens = len(entries)
            for i, (token, pos, seq, logits) in enumerate(entries):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
                batch.seq_id[i][0] = seq
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            llama_cpp.llama_synchronize(ctx)

        decode([(t, p, s, p == len(ids) - 1) for s, ids in enumerate(prompts) for p, t in enumerate(ids)])
        for step in range(len(tokens) - n + 1):
            start = time.perf_counter()
            decode([(tokens[step + s], len(ids) + step, s, True) for s, ids in enumerate(prompts)])
            yield (time.perf_counter() - start) * 1e3
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)


def _ended(code: int) -> str:
    """How a child process ended, from its return code: ``"signal 11"`` or ``"exit 3"``."""
    return f"signal {-code}" if code < 0 else f"exit {code}"


def _llama_rows_isolated(path: Path, prompt: list[int], windows: torch.Tensor, threads: int, steps: int,
                         extra_bufts: bool = True) -> dict[str, Any]:  # fmt: skip
    """:func:`_llama_rows` in a child process: a crash inside llama.cpp becomes a reported row, not the end of the run."""
    import subprocess
    import sys

    job = json.dumps({"path": str(path), "prompt": prompt, "windows": windows.tolist(), "threads": threads,
                      "steps": steps, "extra_bufts": extra_bufts})  # fmt: skip
    script = ("import json, sys, torch; from llmspeed.bench.cpu_peers import _llama_rows; a = json.load(sys.stdin); "
              "print(json.dumps(_llama_rows(__import__('pathlib').Path(a['path']), a['prompt'], "
              "torch.tensor(a['windows']), a['threads'], a['steps'], a['extra_bufts'])))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], input=job, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp crashed ({_ended(done.returncode)}) on {path.name}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def llama_perplexity_isolated(path: Path, windows: torch.Tensor, threads: int) -> tuple[float, str | None]:
    """:func:`llama_perplexity` in a child process, retried without llama.cpp's extra buffer types if it crashes
    with them: ``(perplexity, note)``, the note saying so (``None`` when the first try ran)."""
    import subprocess
    import sys

    script = ("import json, sys, torch; from llmspeed.bench import cpu_peers as c; a = json.load(sys.stdin); "
              "a['plain'] and c._without_extra_bufts(); "
              "print(c.llama_perplexity(__import__('pathlib').Path(a['path']), torch.tensor(a['windows']), a['threads']))")  # fmt: skip
    crash = None
    for plain in (False, True):
        job = json.dumps({"path": str(path), "windows": windows.tolist(), "threads": threads, "plain": plain})
        done = subprocess.run([sys.executable, "-c", script], input=job, capture_output=True, text=True, timeout=1800)
        if done.returncode == 0:
            note = None if crash is None else f"{crash}; scored without its extra buffer types (see {INSTALL_NO_AMX})"
            return float(done.stdout.strip().splitlines()[-1]), note
        crash = f"llama.cpp crashed ({_ended(done.returncode)}) on {path.name}"
    raise RuntimeError(f"{crash}, without its extra buffer types too")


class _LlamaBlocks:
    """llama.cpp decoding one sequence in a child process, a block of steps per call (the interleaved column).

    The child (:func:`serve_llama_steps`, or ``command``) prefills ``prompt[:PREFIX]``, runs one untimed
    step, and answers each request for ``n`` steps with their times in ms, so that the parent times its
    own steps between two of llama.cpp's blocks. A crash inside llama.cpp ends the child, not the run:
    :meth:`block` raises ``RuntimeError``; a child silent for ``timeout`` seconds is killed the same way.
    llama.cpp's own log lines are dropped, as :func:`_llama_rows_isolated` drops them.
    """

    def __init__(self, path: Path, prompt: list[int], threads: int, extra_bufts: bool,
                 command: list[str] | None = None, timeout: float = 600.0):  # fmt: skip
        import subprocess
        import sys

        serve = "from llmspeed.bench.cpu_peers import serve_llama_steps; serve_llama_steps()"
        self.timeout = timeout
        self.child = subprocess.Popen(command or [sys.executable, "-c", serve], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
        job = {"path": str(path), "prompt": prompt, "threads": threads, "extra_bufts": extra_bufts}
        self._send(json.dumps(job))
        self._read()  # ready: prefilled and warmed up

    def block(self, n: int) -> list[float]:
        """The ms of each of llama.cpp's next ``n`` decode steps."""
        self._send(str(n))
        return self._read()

    def close(self) -> None:
        """End the child (it exits when its input closes), killing it if it does not."""
        import subprocess

        if self.child.stdin is not None and not self.child.stdin.closed:
            try:
                self.child.stdin.close()
            except BrokenPipeError:  # it had already died
                pass
        try:
            self.child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.child.kill()
            self.child.wait()

    def _send(self, line: str) -> None:
        assert self.child.stdin is not None
        try:
            self.child.stdin.write(line + "\n")
            self.child.stdin.flush()
        except BrokenPipeError:
            self._crashed()

    def _read(self) -> list[float]:
        import select

        assert self.child.stdout is not None
        ready, _, _ = select.select([self.child.stdout], [], [], self.timeout)
        line = self.child.stdout.readline() if ready else ""
        if not ready:
            self.child.kill()
        if not line:
            self._crashed()
        return json.loads(line)

    def _crashed(self) -> None:
        raise RuntimeError(f"llama.cpp crashed ({_ended(self.child.wait())}) in the interleaved decode steps")


def serve_llama_steps() -> None:
    """The child side of :class:`_LlamaBlocks`: a JSON job on the first line of stdin, then one step count a line.

    Prints ``[]`` once prefilled and warmed up, then a JSON list of step times for each count.
    """
    import sys

    job = json.loads(sys.stdin.readline())
    if not job["extra_bufts"]:
        _without_extra_bufts()
    prompt = job["prompt"]
    with closing(_llama_steps(Path(job["path"]), [prompt[:PREFIX]], prompt[PREFIX:], job["threads"])) as times:
        next(times)
        print("[]", flush=True)
        for line in sys.stdin:
            print(json.dumps([next(times) for _ in range(int(line))]), flush=True)


def _llmspeed_steps(model, prompt: list[int], kv_cache_dtype: str = "auto", scheduler_steps: int = 1) -> Iterator[float]:
    """The ms of each llmspeed decode step of one sequence, ``prompt[:PREFIX]`` prefilled first (untimed), as
    :func:`_llama_steps` times llama.cpp's; the first step after the prefill is untimed too.

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
    llama = _LlamaBlocks(requantized(*anchor, threads), prompt, threads, extra_bufts)
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
            return _llama_rows_isolated(path, prompt, windows, threads, steps), None, None
        except RuntimeError as err:
            crash = str(err)
    try:
        rows = _llama_rows_isolated(path, prompt, windows, threads, steps, extra_bufts=False)
        return rows, crash, (f"{crash}; this row without its extra buffer types (AMX / repacked weights; a build "
                             f"without AMX keeps the repacked ones: {INSTALL_NO_AMX})")
    except RuntimeError as again:
        return None, crash, f"{crash}; without extra buffer types too ({again})"


def _llmspeed_model(fmt: str):
    """The embedded model in ``fmt``: a FORMATS key, whose parts after the first are options."""
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
        quantize(model, base, group_size=group, method=method, activations=acts, **head)
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

    prefill = _prefill_rate(ready)
    text = model.tokenizer.decode(windows.flatten().tolist())
    losses = window_losses(model, text, window=windows.shape[1], n_windows=windows.shape[0])
    one, eight = [prompt[:PREFIX]], [prompt[i : i + PREFIX] for i in range(SEQS)]
    options = {"kv_cache_dtype": kv_cache_dtype, "scheduler_steps": scheduler_steps}
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
    for base, members in groups.items():
        rows += _group_rows(base, members, quick, rounds, interleave)
    return rows


def _group_rows(base: str, members: list[str], quick: bool, rounds: int, interleave: int = 0) -> list[dict[str, Any]]:
    """The rows of one llama.cpp anchor (``base``'s) and the llmspeed ``members`` timed against it, round by round."""
    anchor = FORMATS[base]
    assert isinstance(anchor, tuple)
    threads = torch.get_num_threads()
    steps, n_windows = (16, 2) if quick else (32, 8)
    missing = llama_cpp_missing()
    models = {fmt: _llmspeed_model(fmt) for fmt in members}
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
