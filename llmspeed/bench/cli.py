"""``python -m llmspeed bench {precision,quant,calibration,lora,batching,serving,http_serving,formats,training,qat,autotune,lora_decode,cpu_peers,q4_grid,decode_rows,decode_attention,mixed_steps,weight_pages,structured,all}``: run suites side by side.

All suites named run in this one process, one after the other, so their rows share a machine
state. For each suite the command prints the command line and Markdown tables; with ``--out``
it writes ``results.json`` (rows, machine, command, status per suite), ``results.md`` (the
tables as printed), ``<suite>.md`` (one suite's tables, for docs pages) and one PNG per table. A suite whose module is missing or raises is
reported with its status and error, never silently dropped; the exit status is 1 then.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from ..names import folder_path
from ..timing import markdown_table
from .models import name_error
from .plots import group_rows

SUITES = ("precision", "quant", "calibration", "lora", "batching", "serving", "http_serving", "formats", "training", "qat", "autotune", "lora_decode", "cpu_peers", "q4_grid", "decode_rows", "decode_attention", "mixed_steps", "weight_pages", "structured")


def build_parser() -> argparse.ArgumentParser:
    """The ``bench`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m llmspeed bench",
        description="Run llmspeed's benchmark suites in one process; print Markdown tables, save JSON and plots.",
    )
    parser.add_argument("suite", choices=[*SUITES, "all"], help="suite to run, or all of them")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default cpu)")
    parser.add_argument(
        "--model",
        default="smollm2",
        help="smollm2 (default), llama-1b-random, tiny-<arch> (tests), or a folder with a transformers checkpoint "
        "(taken by precision, lora, serving, training, qat, autotune, lora_decode, decode_rows, decode_attention, "
        "mixed_steps, weight_pages and structured; quant takes smollm2, llama-1b-random and tiny-<arch>, formats smollm2 and tiny-<arch>; the "
        "other suites name the models they run)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for results.json, results.md and PNG plots"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a few minutes on 2 CPU cores")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def machine_info(device: str) -> dict[str, Any]:
    """What the numbers were measured on: CPU, threads, library versions, GPU name."""
    import transformers

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_suite(name: str, device: str, model: str, quick: bool, progress: bool) -> dict[str, Any]:
    """Import ``llmspeed.bench.<name>`` and run it; return ``{status, seconds, rows, error}``.

    ``status`` is ``"ok"``, ``"missing"`` (the module does not exist yet) or ``"failed"``.
    """
    start = time.perf_counter()
    module_name = f"{__package__}.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            return {"status": "missing", "seconds": 0.0, "rows": [], "error": f"no module {module_name}"}
        return _failure(start, err)
    except Exception as err:  # an import error inside the suite is a failure of that suite only
        return _failure(start, err)
    if not callable(getattr(module, "run", None)):
        return {"status": "missing", "seconds": 0.0, "rows": [], "error": f"{module_name} has no run()"}
    try:
        rows = module.run(device=device, model=model, quick=quick, progress=progress)
    except Exception as err:
        return _failure(start, err)
    return {
        "status": "ok",
        "seconds": time.perf_counter() - start,
        "rows": _jsonable(list(rows)),
        "error": None,
    }


def _failure(start: float, err: BaseException) -> dict[str, Any]:
    tb = traceback.format_exception(type(err), err, err.__traceback__)
    return {
        "status": "failed",
        "seconds": time.perf_counter() - start,
        "rows": [],
        "error": f"{type(err).__name__}: {err}",
        "traceback": "".join(tb[-6:]),
    }


def _jsonable(value: Any) -> Any:
    """Rows as plain JSON values (tensors and numpy scalars become numbers, dtypes become strings)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if torch.is_tensor(value) and value.numel() == 1:
        return _jsonable(value.item())
    if hasattr(value, "item"):
        try:
            return _jsonable(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)


def suite_markdown(name: str, result: dict[str, Any], command: str) -> str:
    """The Markdown block for one suite: heading, command, one table per ``table`` key, or the error."""
    lines = [f"## {name}", "", f"`{command}` ({result['status']}, {result['seconds']:.0f} s)", ""]
    if result["status"] != "ok":
        lines += [f"**{result['status']}**: {result['error']}", ""]
        return "\n".join(lines)
    if not result["rows"]:
        lines += ["(the suite ran and returned no rows: nothing to show)", ""]
    for table, rows in group_rows(result["rows"], name).items():
        columns = list(dict.fromkeys(k for r in rows for k in r if k != "table"))
        shown = [{k: ("n/a" if v is None else v) for k, v in r.items()} for r in rows]
        lines += [f"### {table}", "", markdown_table(shown, columns), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m llmspeed bench``; returns 0 when every suite ran."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    bad_model = name_error(args.model)  # before the suites run, as --out
    if bad_model is not None:
        parser.error(f"--model {bad_model}")
    if args.out is not None:  # checked before the suites run, not when their results are written
        try:
            folder_path(args.out, "--out", write=True)
        except ValueError as err:
            parser.error(str(err))
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available here; use --device cpu", file=sys.stderr)
        return 2
    command = "python -m llmspeed bench " + shlex.join(argv)
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    results: dict[str, dict[str, Any]] = {}
    blocks = []
    for name in suites:
        print(f"[bench] running {name} ...", file=sys.stderr, flush=True)
        results[name] = run_suite(name, args.device, args.model, args.quick, not args.no_progress)
        blocks.append(suite_markdown(name, results[name], command))
        print(blocks[-1], flush=True)
        if args.out is not None:  # write as we go: a later crash keeps the finished suites
            _write(args.out, command, args, results, blocks)
    bad = [n for n, r in results.items() if r["status"] != "ok"]
    if bad:
        summary = ", ".join(f"{n} ({results[n]['status']})" for n in bad)
        print(f"[bench] not ok: {summary}", file=sys.stderr)
    return 1 if bad else 0


def _write(out: Path, command: str, args: argparse.Namespace, results: dict, blocks: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, list[str]] = {}
    for name, result in results.items():
        if result["status"] == "ok" and result["rows"]:
            plots[name] = _plot(name, result["rows"], out)
    payload = {
        "command": command,
        "device": args.device,
        "model": args.model,
        "quick": args.quick,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(args.device),
        "suites": results,
        "plots": plots,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    header = (
        f"# llmspeed bench\n\n`{command}` on {payload['machine']['processor']}, {payload['time_utc']}\n\n"
    )
    (out / "results.md").write_text(header + "\n".join(blocks))
    for name, block in zip(results, blocks):  # one file per suite, for docs pages to include
        (out / f"{name}.md").write_text(block.replace(f"## {name}\n\n", "", 1))


def _plot(name: str, rows: list[dict[str, Any]], out: Path) -> list[str]:
    try:
        from .plots import plot_rows

        return [p.name for p in plot_rows(name, rows, out)]
    except Exception as err:  # a plot must never lose the numbers
        print(f"[bench] plots for {name} failed: {type(err).__name__}: {err}", file=sys.stderr)
        return []
