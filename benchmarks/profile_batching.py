"""Where a continuous-batching run spends its time: torch.profiler over one ``generate_batched`` run.

    python benchmarks/profile_batching.py                                     # SmolLM2 on this CPU
    python benchmarks/profile_batching.py --device cuda --model llama-1b-random --requests 128

Runs the batching suite's workload (prompts of 16-256 tokens from the pydoc text, capped-exponential
output lengths) through one :class:`llmspeed.Generator` after a warm-up, under ``torch.profiler``,
and writes to ``--out`` (default ``bench-out/profile``):

* ``profile.md``: the run's step paths (steps and seconds per path: CUDA graph, fused CPU, eager
  decode, mixed prefill+decode), then the top operators by device time (CUDA) and by host time;
* ``trace.json``: the Chrome trace (open in ``chrome://tracing`` or Perfetto), unless ``--no-trace``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from llmspeed.bench.batch1 import sync as _sync
from llmspeed.bench.batching import _load, generator_config, make_workload
from llmspeed.generation import Generator, SamplingParams


def _table(events, key: str, limit: int) -> str:
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:limit]
    total = sum(getattr(e, key) for e in events) or 1.0
    lines = ["| operator | calls | total ms | share |", "|---|---|---|---|"]
    for e in rows:
        t = getattr(e, key)
        lines.append(f"| `{e.key[:80]}` | {e.count} | {t / 1e3:.1f} | {t / total:.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "llama-1b-random"])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--attention", default="auto", choices=["auto", "sdpa", "triton"])
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default="bench-out/profile")
    parser.add_argument("--no-trace", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    model = _load(args.model, args.device, torch.bfloat16 if gpu else torch.float32)
    prompts, lengths = make_workload(model.tokenizer, args.requests)
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lengths]
    gen = Generator(model, progress=False, attention=args.attention, **generator_config(gpu))
    gen.warmup(context=max(len(p) for p in prompts) + max(lengths))
    gen.generate_batched(prompts[:2], params[:2])
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if gpu else [])
    _sync(device)
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        gen.generate_batched(prompts, params)
        _sync(device)
    elapsed = time.perf_counter() - start
    stats = gen.stats
    assert stats is not None

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    events = prof.key_averages()
    lines = [
        f"# Profile of one generate_batched run ({args.model}, {args.device}, {args.requests} requests)",
        "",
        f"{stats.output_tokens} tokens in {elapsed:.2f} s under the profiler ({stats.output_tokens / elapsed:.1f} tok/s), "
        f"{stats.steps} steps; attention {gen.attention_status}, fused CPU decode "
        f"{gen.fused_decode_status}.",
        "",
        "| step path | steps | seconds | ms per step |",
        "|---|---|---|---|",
    ]
    for path, (n, t) in sorted(stats.step_paths.items()):
        lines.append(f"| {path} | {n} | {t:.2f} | {t / n * 1e3:.1f} |")
    if gpu:
        lines += ["", "## Top operators by CUDA time", "", _table(events, "device_time_total", args.top)]
    lines += ["", "## Top operators by host (CPU) time, self", "", _table(events, "self_cpu_time_total", args.top)]
    (out / "profile.md").write_text("\n".join(lines) + "\n")
    if not args.no_trace:
        prof.export_chrome_trace(str(out / "trace.json"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
