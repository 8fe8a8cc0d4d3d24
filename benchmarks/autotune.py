"""kernel="auto" on the CPU: tuning cost on first use, and rule table vs timed choices per format.

flock /tmp/llmspeed-cpu.lock python benchmarks/autotune.py [--quick] [--model tiny-llama]
"""

from __future__ import annotations

from llmspeed.bench.autotune import run
from llmspeed.bench.script import main

if __name__ == "__main__":
    main(run, __doc__)
