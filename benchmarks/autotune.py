"""kernel="auto" on the CPU: tuning cost on first use, and rule table vs timed choices per format.

flock /tmp/llmspeed-cpu.lock python benchmarks/autotune.py [--quick] [--model tiny-llama]
"""

from __future__ import annotations

import argparse

from llmspeed.bench.autotune import run
from llmspeed.timing import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 or tiny-<arch>")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    rows = run(model=args.model, quick=args.quick)
    for table in dict.fromkeys(r["table"] for r in rows):
        print(f"\n## {table}\n")
        print(markdown_table([r for r in rows if r["table"] == table]))


if __name__ == "__main__":
    main()
