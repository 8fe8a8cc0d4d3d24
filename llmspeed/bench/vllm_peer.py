"""vLLM as the GPU peer of the batching suite (issue #22): the same workload through ``vllm.LLM.generate``.

vLLM runs in a child process (:func:`measure`), given the model as a Hugging Face checkpoint folder and the
workload's token ids: its engine sizes its KV cache from the GPU memory it finds free, which the parent's models
would hold, and a crash or a hang inside it becomes a row's note, not the end of the run. Prompts go in as token
ids with detokenizing off (``skip_tokenizer_init``), greedy, ``ignore_eos``, so it computes exactly the tokens
llmspeed's run computes. Its start-up (weights, compilation, CUDA graph capture) is not timed, as llmspeed's
warm-up is not.

Run as ``python -m llmspeed.bench.vllm_peer MODEL_DIR`` with the job (JSON: ``prompts``, ``lengths``,
``context``, ``steps``) on stdin, it prints one line, :data:`RESULT` and then JSON (vLLM logs to stdout too, also
after it): ``seconds`` for the workload, ``decode_step`` (seconds per token at batch 1 over ``context`` tokens) and
``version``.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import time
from typing import Any

RESULT = "llmspeed vllm_peer result: "
"""How the child's result line begins, told from vLLM's log lines (``VLLM_LOGGING_STREAM`` is stdout by default)."""
_RAISED = re.compile(r"\b(\w+(?:Error|Exception): .*)")  # an exception's line in a traceback, logged or printed


def unavailable() -> str | None:
    """Why vLLM cannot be measured here (``None`` when ``vllm`` is importable and a CUDA device is present)."""
    import importlib.util

    import torch

    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed in this environment"
    if not torch.cuda.is_available():
        return "vLLM's GPU engine needs a CUDA device"
    return None


def _run(model_dir: str, job: dict[str, Any]) -> dict[str, Any]:
    """In the child: load vLLM on ``model_dir``, time the workload and a batch-1 decode."""
    import vllm
    from vllm import LLM, SamplingParams

    # no prefix caching (on by default in vLLM's V1 engine): the warm-up's prompts would be cached for the timed
    # run, which would skip their prefill, where llmspeed's generator (prefix_caching=False) computes every token
    llm = LLM(model=model_dir, dtype="bfloat16", skip_tokenizer_init=True, seed=0,
              gpu_memory_utilization=job.get("gpu_memory_utilization", 0.6),
              max_num_seqs=job.get("max_num_seqs", 256), enable_prefix_caching=False)  # fmt: skip

    def params(n: int) -> Any:
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)

    prompts = [{"prompt_token_ids": p} for p in job["prompts"]]
    lengths = job["lengths"]
    llm.generate(prompts[:2], [params(n) for n in lengths[:2]], use_tqdm=False)  # warm-up, as llmspeed's
    start = time.perf_counter()
    outs = llm.generate(prompts, [params(n) for n in lengths], use_tqdm=False)
    seconds = time.perf_counter() - start
    got = [len(o.outputs[0].token_ids) for o in outs]
    if got != lengths:
        raise RuntimeError(f"vLLM returned {sum(got)} tokens where {sum(lengths)} were asked for")

    context = [{"prompt_token_ids": list(range(1, job["context"] + 1))}]

    def one(n: int) -> float:
        t0 = time.perf_counter()
        llm.generate(context, params(n), use_tqdm=False)
        return time.perf_counter() - t0

    one(2)
    short = statistics.median(one(1) for _ in range(3))
    long = statistics.median(one(job["steps"] + 1) for _ in range(3))
    return {"seconds": seconds, "decode_step": (long - short) / job["steps"], "version": vllm.__version__}


def measure(model: Any, prompts: list[list[int]], lengths: list[int], *, context: int = 128, steps: int = 16,
            timeout: float = 600.0, workdir: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Save ``model`` (an ``llmspeed.Model``) as a checkpoint folder and measure vLLM on it in a child process.

    Returns the child's result, or ``{"error": why}`` when vLLM is unavailable, crashes, hangs past ``timeout``
    seconds (then the child and the processes it started, vLLM's engine among them, are killed) or returns other
    token counts.
    """
    import contextlib
    import os
    import signal
    import subprocess
    import tempfile

    why = unavailable()
    if why is not None:
        return {"error": why}
    import torch

    torch.cuda.empty_cache()  # vLLM takes gpu_memory_utilization of the GPU's memory; the parent's cached blocks count
    with tempfile.TemporaryDirectory(dir=workdir) as folder:
        model.hf.save_pretrained(folder, safe_serialization=True)
        job = json.dumps({"prompts": prompts, "lengths": lengths, "context": context, "steps": steps})
        # a session of its own: vLLM runs its engine in processes it starts, which a timeout must end too (killing
        # the child alone left them holding the GPU's memory)
        with subprocess.Popen([sys.executable, "-m", "llmspeed.bench.vllm_peer", folder], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) as child:  # fmt: skip
            try:
                out, err = child.communicate(job, timeout=timeout)
            except BaseException as exc:  # a Ctrl-C too, as subprocess.run kills its child then
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                if isinstance(exc, subprocess.TimeoutExpired):
                    return {"error": f"vLLM did not finish within {timeout:.0f} s"}
                raise
    lines = [line[len(RESULT) :] for line in out.splitlines() if line.startswith(RESULT)]
    if child.returncode != 0 or not lines:
        return {"error": f"vLLM's run failed (exit {child.returncode}): {_failure(out, err)}"}
    return json.loads(lines[-1])


def _failure(out: str, err: str) -> str:
    """The last lines of the child's stderr, after the cause vLLM logged (on stdout) where they do not hold it: a
    failure in vLLM's engine core is logged there, and the child's own traceback ends with "Engine core
    initialization failed. See root cause above"."""
    tail = " ".join(err.strip().splitlines()[-3:])[-400:]
    causes = [m.group(1).strip() for line in (out + "\n" + err).splitlines()
              if (m := _RAISED.search(line)) and "root cause above" not in line]  # fmt: skip
    return tail if not causes or causes[-1] in tail else f"{causes[-1][:300]} ... {tail}"


if __name__ == "__main__":
    print(RESULT + json.dumps(_run(sys.argv[1], json.load(sys.stdin))), flush=True)
