"""LoRA adapters on the fused CPU decode step: one adapter, and a different adapter per row, against none.

flock /tmp/llmspeed-cpu.lock python benchmarks/lora_decode.py [--quick] [--model tiny-llama]
"""

from __future__ import annotations

import argparse

from llmspeed.bench.lora_decode import run
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
