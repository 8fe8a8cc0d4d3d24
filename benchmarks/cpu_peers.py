"""CPU inference against llama.cpp (llama-cpp-python), format by format, on the same SmolLM2 weights.

flock /tmp/llmspeed-cpu.lock python benchmarks/cpu_peers.py [--quick]
"""

from __future__ import annotations

from llmspeed.bench.cpu_peers import run
from llmspeed.bench.script import main

if __name__ == "__main__":
    main(run, __doc__)
