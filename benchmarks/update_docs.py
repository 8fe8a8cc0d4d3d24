"""Copy a bench run into the docs: ``python benchmarks/update_docs.py bench-out [docs]``.

Takes the folder written by ``python -m llmspeed bench ... --out DIR`` and copies each suite's
tables (``<suite>.md``), its PNG plots and ``results.json`` into ``docs/bench/``, then writes
``docs/benchmarks.md``: the command and machine of the run, and per suite its tables and plots.
Module pages can include a suite's tables with ``--8<-- "bench/<suite>.md"``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

TITLES = {
    "precision": "Precision: fp32 vs bf16 vs fp16",
    "quant": "Quantization: int8, int4, NF4 and their kernels",
    "calibration": "Calibration: RTN vs GPTQ/HQQ",
    "lora": "LoRA and QLoRA: training and adapter overhead",
    "batching": "Continuous batching vs transformers",
}
GUIDES = {
    "precision": "precision.md",
    "quant": "quantization.md",
    "calibration": "calibration.md",
    "lora": "lora.md",
    "batching": "batching.md",
}


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (the command line without the program) and copy the run it names into the docs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="folder a bench run wrote (--out), holding results.json")
    parser.add_argument("docs", type=Path, nargs="?", default=Path(__file__).resolve().parent.parent / "docs",
                        help="the docs folder (default: this checkout's docs/)")
    args = parser.parse_args(argv)
    src, docs = args.run, args.docs
    if not (src / "results.json").is_file():
        parser.error(f"run must be a folder holding results.json; got {str(src)!r}")
    payload = json.loads((src / "results.json").read_text())
    dest = docs / "bench"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "results.json", dest / "results.json")
    machine = payload["machine"]
    lines = [
        "# Benchmark results",
        "",
        "All tables on this page come from one run of one command, every baseline measured in the same process:",
        "",
        "```bash",
        payload["command"],
        "```",
        "",
        f"on {machine['processor']} ({machine['cpu_count']} cores, {machine['torch_threads']} torch threads), "
        f"Python {machine['python']}, torch {machine['torch']}, transformers {machine['transformers']}, "
        f"{payload['time_utc']}. Compare rows within a table "
        "(same run, same load), read the spread column, and rerun on your own machine ([reproduce](reproduce.md)). "
        "`--quick` sizes are small: fewer perplexity windows, fewer requests, fewer training steps.",
        "",
        "Raw rows: [results.json](bench/results.json).",
        "",
    ]
    for suite, result in payload["suites"].items():
        lines += [f"## {TITLES.get(suite, suite)}", ""]
        if suite in GUIDES:
            lines += [f"What the columns mean and how to read them: [{GUIDES[suite]}]({GUIDES[suite]}).", ""]
        if (src / f"{suite}.md").exists():
            shutil.copy(src / f"{suite}.md", dest / f"{suite}.md")
            lines += [f'--8<-- "bench/{suite}.md"', ""]
        else:
            lines += [f"Status: **{result['status']}** {result.get('error') or ''}", ""]
        for png in payload.get("plots", {}).get(suite, []):
            shutil.copy(src / png, dest / png)
            lines += [f"![{png}](bench/{png})", ""]
    (docs / "benchmarks.md").write_text("\n".join(lines))
    print(f"wrote {docs / 'benchmarks.md'} and {dest}")


if __name__ == "__main__":
    main()
