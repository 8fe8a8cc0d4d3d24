"""Steps with a prompt chunk: the fused C++ step against the per-layer path (fp32, bf16, int8, int4, NF4).

flock /tmp/llmspeed-cpu.lock python benchmarks/mixed_steps.py [--quick] [--model tiny-llama]
"""

from __future__ import annotations

from llmspeed.bench.mixed_steps import run
from llmspeed.bench.script import main

if __name__ == "__main__":
    main(run, __doc__)
