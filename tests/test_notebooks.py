"""The example notebooks execute top to bottom (small sizes) and match their generator."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook tests need nbformat, nbclient and ipykernel")
nbclient = pytest.importorskip("nbclient")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NOTEBOOKS = sorted(p.name for p in EXAMPLES.glob("*.ipynb"))


def _generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", EXAMPLES / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sources(path: Path) -> list[str]:
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"]]


def test_notebooks_match_their_generator(tmp_path):
    built = _generator().build(tmp_path)
    assert sorted(p.name for p in built) == NOTEBOOKS, "run: python examples/make_notebooks.py"
    for path in built:
        assert _sources(path) == _sources(EXAMPLES / path.name), (
            f"{path.name} is stale: run examples/make_notebooks.py"
        )


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebooks_are_executed_on_the_public_api(name):
    cells = [c for c in json.loads((EXAMPLES / name).read_text())["cells"] if c["cell_type"] == "code"]
    source = "\n".join("".join(c["source"]) for c in cells)
    assert "llmspeed.bench" not in source, "notebooks use the public API, not benchmark internals"
    unrun = [i for i, c in enumerate(cells) if c.get("execution_count") is None]
    assert not unrun, f"{name}: code cells {unrun} have no outputs: run python examples/make_notebooks.py --execute"
    machine = "".join("".join(o.get("text", "")) for o in cells[0]["outputs"] if o.get("output_type") == "stream")
    assert " cores, " in machine and "torch " in machine and "quick=False" in machine, machine


# Cells appended to a notebook, after its own, by the tests that read what they print; each notebook then runs
# once (quick sizes) for all of its tests. A check that changes state (03's tamper) comes last in its notebook.
QLORA_TAMPER = "b = next(b for b in model.hf.buffers() if b.dtype == torch.uint8)\nb[0, 0] ^= 1"
RATIOS_CHECK = (
    "weights = lambda r: r['linear_MB'] + r['embedding_MB']\n"
    "assert not [k for k in rows[0] if k.startswith('linear_vs')], list(rows[0])\n"
    "for r in rows:\n"
    "    assert abs(r['total_vs_fp32'] - weights(r) / weights(rows[0])) < 0.01, r\n"
    "print('ratios checked:', len(rows))"
)
METRICS_LINE = "print(f\"finish reason 'length', {len(prompts[0])} prompt tokens, {lengths[0]} output tokens, \")"


def _extra_cells() -> dict[str, dict[str, str]]:
    (untouched,) = [c.source for c in _generator().QLORA if "untouched by training" in c.source]
    return {
        "02_quantization.ipynb": {"ratios": RATIOS_CHECK},
        "03_qlora.ipynb": {"tamper": QLORA_TAMPER, "untouched after tampering": untouched},
        "04_continuous_batching.ipynb": {"metrics line": METRICS_LINE, "first row": "print(rows[0]['system'])"},
    }


@dataclass
class Executed:
    """A notebook run top to bottom: what each of its own code cells printed, their errors, whether they showed
    anything (printed, displayed or returned), and per appended cell (by key) what it printed or the error it raised."""

    printed: list[str]
    errors: list[str]
    shown: bool
    extra: dict[str, str]


def _printed(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def _errors(cell) -> list[str]:
    first = cell.source.splitlines()[0] if cell.source else ""
    return [f"{first!r}: {o.ename}: {o.evalue}" for o in cell.get("outputs", []) if o.output_type == "error"]


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """``executed(name)``: the generated notebook ``name`` (the committed one's sources, by
    test_notebooks_match_their_generator) with its appended cells, run once in quick mode for every test."""
    runs: dict[str, Executed] = {}
    extras = _extra_cells()

    def run(name: str) -> Executed:
        if name not in runs:
            folder = tmp_path_factory.mktemp(Path(name).stem)
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("LLMSPEED_EXAMPLES_QUICK", "1")
                # the kernel is a new process: make this checkout importable even when llmspeed is not installed
                patch.setenv(
                    "PYTHONPATH", os.pathsep.join(filter(None, [str(EXAMPLES.parent), os.environ.get("PYTHONPATH")]))
                )
                (path,) = _generator().build(folder, [name])
                nb = nbformat.read(path, as_version=4)
                own = sum(c.cell_type == "code" for c in nb.cells)
                keys = list(extras.get(name, {}))
                nb.cells += [nbformat.v4.new_code_cell(extras[name][k]) for k in keys]
                client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=True,
                                                 resources={"metadata": {"path": str(folder)}})  # fmt: skip
                client.execute()
            code = [c for c in nb.cells if c.cell_type == "code"]
            mine, added = code[:own], code[own:]
            runs[name] = Executed(
                printed=[_printed(c) for c in mine],
                errors=[e for c in mine for e in _errors(c)],
                shown=any(o.output_type in ("display_data", "execute_result", "stream") for c in mine for o in c.outputs),
                extra={k: "\n".join(_errors(c)) or _printed(c) for k, c in zip(keys, added)},
            )
        return runs[name]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, executed):
    run = executed(name)
    assert not run.errors, run.errors
    assert run.shown, f"{name} showed nothing"


@pytest.mark.slow
def test_qlora_untouched_check_sees_a_changed_packed_weight(executed):
    # the check compares the packed weights before and after training: it must not be vacuously True
    run = executed("03_qlora.ipynb")
    assert any("packed int4 weights untouched by training: True" in text for text in run.printed)
    assert "packed int4 weights untouched by training: False" in run.extra["untouched after tampering"]


@pytest.mark.slow
def test_quantization_memory_ratios_compare_the_same_weights(executed):
    # fp32 counts the tied head as embedding, a quantized model its int8 head as linear: a ratio of linear
    # bytes alone compares different weights; the table must show both columns, and the total ratio agree
    assert "ratios checked: 3" in executed("02_quantization.ipynb").extra["ratios"]


@pytest.mark.slow
def test_batching_shows_every_system_gives_the_same_tokens(executed):
    # the notebook's premise (EOS ignored, greedy: the same tokens from every system) is counted, not assumed
    printed = "".join(executed("04_continuous_batching.ipynb").printed)
    assert "same tokens as generate_batched: one at a time 1/1, static batches 4/4" in printed, printed


@pytest.mark.slow
def test_batching_metrics_are_printed_with_their_names(executed):
    run = executed("04_continuous_batching.ipynb")
    (metrics,) = [p for p in run.printed if p.startswith("finish reason ")]  # the metrics cell's line
    expected = run.extra["metrics line"].strip()
    assert expected and expected in metrics, (expected, metrics)
    assert "time to first token " in metrics and "mean inter-token latency " in metrics, metrics


@pytest.mark.slow
def test_all_together_shows_the_adapter_both_kept_and_applied(executed):
    # 'same tokens alone as in the mixed batch' would also hold if the adapter were ignored everywhere
    printed = "".join(executed("05_all_together.ipynb").printed)
    assert "same tokens as in the mixed batch: True" in printed, printed
    assert "different tokens on the base model: True" in printed, printed


@pytest.mark.slow
def test_batching_rows_name_the_requests_they_timed(executed):
    # one at a time runs on a subset of the workload: its row must say so
    assert "(first 1 of 4 requests)" in executed("04_continuous_batching.ipynb").extra["first row"]


def test_make_notebooks_refuses_a_name_it_does_not_know(capsys):
    """Regression: ``make_notebooks.py --execute 04_continuous_batching`` (no ``.ipynb``) wrote and ran nothing and
    exited 0; a stem is now taken, and an unknown name is an error listing the notebooks."""
    make = _generator()
    with pytest.raises(SystemExit):
        make.main(["nonesuch"])
    assert "no notebook named ['nonesuch']" in capsys.readouterr().err
