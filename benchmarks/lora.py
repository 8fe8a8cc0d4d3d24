"""LoRA benchmark: QLoRA (int4 g64) vs LoRA (fp32) vs full fine-tuning, adapter overhead, PEFT interop.

    python benchmarks/lora.py [--device cpu|cuda] [--model smollm2] [--quick]

A thin alias of ``python -m llmspeed bench lora ...`` (same options, including ``--out`` for JSON and plots).
"""

from __future__ import annotations

import sys

from llmspeed.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["lora", *sys.argv[1:]]))
