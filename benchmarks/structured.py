"""Structured outputs: a constrained batch against the same batch writing free text of the same lengths, and against
transformers' generate with xgrammar's logits processor.

OMP_NUM_THREADS=2 flock /tmp/llmspeed-cpu.lock python benchmarks/structured.py [--quick] [--model smollm2]
"""

from __future__ import annotations

from llmspeed.bench.script import main
from llmspeed.bench.structured import run

if __name__ == "__main__":
    main(run, __doc__)
