"""LoRA benchmark: QLoRA (int4 g64) vs LoRA (fp32) vs full fine-tuning, adapter overhead, PEFT interop.

    python benchmarks/lora.py [--device cpu|cuda] [--model smollm2] [--quick]

The same suite runs as ``python -m llmspeed bench lora`` (which also saves JSON and plots).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from llmspeed.bench import lora as suite
from llmspeed.bench import markdown_table
from llmspeed.bench.plots import group_rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    rows = suite.run(device=args.device, model=args.model, quick=args.quick)
    print(f"`python benchmarks/lora.py {shlex.join(argv)}`\n")
    for table, table_rows in group_rows(rows, "lora").items():
        print(f"### {table}\n\n{markdown_table(table_rows)}\n")


if __name__ == "__main__":
    main()
