"""Continuous batching: llmspeed vs transformers generate / generate_batch, one run, one table.

    python benchmarks/batching.py [--quick] [--device cuda --model llama-1b-random]
"""

from __future__ import annotations

import argparse

from llmspeed.bench.batching import attention_variants, run
from llmspeed.timing import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "llama-1b-random"])
    parser.add_argument("--quick", action="store_true", help="12 short requests instead of 48")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--attention", action="store_true", help="only the decode-attention layout comparison")
    args = parser.parse_args()
    if args.attention:
        print(markdown_table(attention_variants(device=args.device)))
        return
    rows = run(
        device=args.device, model=args.model, quick=args.quick, progress=not args.no_progress,
        on_row=lambda row: print("row:", row, flush=True),
    )
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
