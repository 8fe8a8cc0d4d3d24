"""The shape every small ``benchmarks/<suite>.py`` script shares: parse ``--model``/``--quick``, run, print tables."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ..timing import markdown_table
from .models import name_error


def main(run: Callable[..., list[dict[str, Any]]], doc: str, model_help: str = "smollm2 or tiny-<arch>") -> None:
    """Parse the command line, call ``run(model=..., quick=...)`` and print one Markdown table per ``table`` key."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help=model_help)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions")
    args = parser.parse_args()
    bad_model = name_error(args.model)  # a misspelt name: argparse's one line, not a traceback from the suite
    if bad_model is not None:
        parser.error(f"--model {bad_model}")
    rows = run(model=args.model, quick=args.quick)
    for table in dict.fromkeys(r.get("table", "results") for r in rows):
        print(f"\n## {table}\n")
        print(markdown_table([{k: v for k, v in r.items() if k != "table"} for r in rows if r.get("table", "results") == table]))
