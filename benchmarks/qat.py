"""QAT benchmark: int4 g64 quantization-aware training vs RTN and GPTQ of the float fine-tuned model.

    python benchmarks/qat.py [--device cpu|cuda] [--model smollm2] [--quick]

A thin alias of ``python -m llmspeed bench qat ...`` (same options, including ``--out`` for JSON and plots).
"""

from __future__ import annotations

import sys

from llmspeed.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["qat", *sys.argv[1:]]))
