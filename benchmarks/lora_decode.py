"""LoRA adapters on the fused CPU decode step: one adapter, and a different adapter per row, against none.

flock /tmp/llmspeed-cpu.lock python benchmarks/lora_decode.py [--quick] [--model tiny-llama]
"""

from __future__ import annotations

from llmspeed.bench.lora_decode import run
from llmspeed.bench.script import main

if __name__ == "__main__":
    main(run, __doc__)
