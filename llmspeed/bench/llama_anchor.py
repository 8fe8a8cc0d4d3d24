"""llama.cpp, the CPU anchor of :mod:`.cpu_peers` and :mod:`.q4_grid`, through ``llama-cpp-python``.

The embedded GGUF requantized by llama.cpp's own ``llama_model_quantize`` (:func:`requantized`); its decode
steps (one sequence through ``Llama``, several through its batch API: :func:`llama_steps`), prompt evaluation
and perplexity (:func:`llama_rows`); each in a child process (:func:`llama_rows_isolated`,
:func:`llama_perplexity_isolated`, :class:`LlamaBlocks`) so that a crash inside llama.cpp becomes a reported
row, not the end of the run, and runs without llama.cpp's extra buffer types where its AMX layout crashes.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable, Generator
from contextlib import closing
from pathlib import Path
from typing import Any

import torch

from ..machine import cache_root, private_dir
from ..models.embedded import gguf_path

SEQS = 8  # sequences of the batched decode rows
PREFILL_RUNS = 5  # timed 256-token prompts per system, after one warm-up; the table takes their median
PREFIX = 128  # prompt tokens prefilled before the decode steps of both systems (the decode context)
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


def prefill_rate(ready: Callable[[], Callable[[], Any]]) -> float:
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


def without_extra_bufts() -> None:
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


def llama_rows(path: Path, prompt: list[int], windows: torch.Tensor, threads: int, steps: int,
                extra_bufts: bool = True) -> dict[str, Any]:  # fmt: skip
    """llama.cpp's decode, prefill, file size and perplexity. ``extra_bufts=False`` loads the weights without
    llama.cpp's extra buffer types (its AMX and repacked-tile weight layouts), for builds whose AMX path crashes."""
    from llama_cpp import Llama

    if not extra_bufts:
        without_extra_bufts()
    llm = Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads,
                verbose=False)  # fmt: skip

    def ready(model: Any = llm) -> Callable[[], Any]:  # a parameter: llm is deleted before the scorer loads
        model.reset()
        return lambda: model.eval(prompt[:256])

    prefill = prefill_rate(ready)
    llm.reset()
    llm.eval(prompt[:PREFIX])
    decode = []
    for token in prompt[PREFIX : PREFIX + steps]:
        start = time.perf_counter()
        llm.eval([token])
        decode.append((time.perf_counter() - start) * 1e3)
    del llm
    decode8 = llama_decode_rows(path, [prompt[i : i + PREFIX] for i in range(SEQS)], prompt[PREFIX:], threads, steps)
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


def llama_decode_rows(path: Path, prompts: list[list[int]], tokens: list[int], threads: int, steps: int) -> float:
    """Median ms of llama.cpp decode steps with ``len(prompts)`` sequences running, one token each per step.

    llama-cpp-python's ``Llama`` decodes one sequence, so this drives llama.cpp's own batch API
    (:func:`llama_steps`).
    """
    with closing(llama_steps(path, prompts, tokens, threads)) as times:
        return statistics.median(next(times) for _ in range(steps))


def llama_steps(path: Path, prompts: list[list[int]], tokens: list[int], threads: int) -> Generator[float, None, None]:
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


def llama_rows_isolated(path: Path, prompt: list[int], windows: torch.Tensor, threads: int, steps: int,
                         extra_bufts: bool = True) -> dict[str, Any]:  # fmt: skip
    """:func:`llama_rows` in a child process: a crash inside llama.cpp becomes a reported row, not the end of the run."""
    import subprocess
    import sys

    job = json.dumps({"path": str(path), "prompt": prompt, "windows": windows.tolist(), "threads": threads,
                      "steps": steps, "extra_bufts": extra_bufts})  # fmt: skip
    script = ("import json, sys, torch; from llmspeed.bench.llama_anchor import llama_rows; a = json.load(sys.stdin); "
              "print(json.dumps(llama_rows(__import__('pathlib').Path(a['path']), a['prompt'], "
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

    script = ("import json, sys, torch; from llmspeed.bench import llama_anchor as c; a = json.load(sys.stdin); "
              "a['plain'] and c.without_extra_bufts(); "
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


class LlamaBlocks:
    """llama.cpp decoding one sequence in a child process, a block of steps per call (the interleaved column).

    The child (:func:`serve_llama_steps`, or ``command``) prefills ``prompt[:PREFIX]``, runs one untimed
    step, and answers each request for ``n`` steps with their times in ms, so that the parent times its
    own steps between two of llama.cpp's blocks. A crash inside llama.cpp ends the child, not the run:
    :meth:`block` raises ``RuntimeError``; a child silent for ``timeout`` seconds is killed the same way.
    llama.cpp's own log lines are dropped, as :func:`llama_rows_isolated` drops them.
    """

    def __init__(self, path: Path, prompt: list[int], threads: int, extra_bufts: bool,
                 command: list[str] | None = None, timeout: float = 600.0):  # fmt: skip
        import subprocess
        import sys

        serve = "from llmspeed.bench.llama_anchor import serve_llama_steps; serve_llama_steps()"
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
    """The child side of :class:`LlamaBlocks`: a JSON job on the first line of stdin, then one step count a line.

    Prints ``[]`` once prefilled and warmed up, then a JSON list of step times for each count.
    """
    import sys

    job = json.loads(sys.stdin.readline())
    if not job["extra_bufts"]:
        without_extra_bufts()
    prompt = job["prompt"]
    with closing(llama_steps(Path(job["path"]), [prompt[:PREFIX]], prompt[PREFIX:], job["threads"])) as times:
        next(times)
        print("[]", flush=True)
        for line in sys.stdin:
            print(json.dumps([next(times) for _ in range(int(line))]), flush=True)
