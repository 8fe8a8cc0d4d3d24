"""The example notebooks execute top to bottom (small sizes) and match their generator."""

from __future__ import annotations

import importlib.util
import json
import os
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


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, monkeypatch, tmp_path):
    monkeypatch.setenv("LLMSPEED_EXAMPLES_QUICK", "1")
    # the kernel is a new process: make this checkout importable even when llmspeed is not installed
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(EXAMPLES.parent), os.environ.get("PYTHONPATH")]))
    )
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"
    ]
    assert not errors
    assert any(
        o.get("output_type") in ("display_data", "execute_result", "stream")
        for c in nb.cells
        for o in c.get("outputs", [])
    )


def _run_generated(name, tmp_path, monkeypatch, extra=()):
    """Build ``name`` from the generator, run it in quick mode, then run each source of ``extra`` in the same
    kernel; return the text each code cell printed (the extra cells last)."""
    monkeypatch.setenv("LLMSPEED_EXAMPLES_QUICK", "1")
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(EXAMPLES.parent), os.environ.get("PYTHONPATH")]))
    )
    (path,) = _generator().build(tmp_path, [name])
    nb = nbformat.read(path, as_version=4)
    nb.cells += [nbformat.v4.new_code_cell(source) for source in extra]
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    return [
        "".join(o.get("text", "") for o in c.outputs if o.output_type == "stream")
        for c in nb.cells
        if c.cell_type == "code"
    ]


@pytest.mark.slow
def test_qlora_untouched_check_sees_a_changed_packed_weight(tmp_path, monkeypatch):
    # the check compares the packed weights before and after training: it must not be vacuously True
    (check,) = [c.source for c in _generator().QLORA if "untouched by training" in c.source]
    tamper = "b = next(b for b in model.hf.buffers() if b.dtype == torch.uint8)\nb[0, 0] ^= 1"
    printed = _run_generated("03_qlora.ipynb", tmp_path, monkeypatch, [tamper, check])
    assert any("packed int4 weights untouched by training: True" in text for text in printed[:-2])
    assert "packed int4 weights untouched by training: False" in printed[-1]


@pytest.mark.slow
def test_quantization_memory_ratios_compare_the_same_weights(tmp_path, monkeypatch):
    # fp32 counts the tied head as embedding, a quantized model its int8 head as linear: a ratio of linear
    # bytes alone compares different weights; the table must show both columns, and the total ratio agree
    check = (
        "weights = lambda r: r['linear_MB'] + r['embedding_MB']\n"
        "assert not [k for k in rows[0] if k.startswith('linear_vs')], list(rows[0])\n"
        "for r in rows:\n"
        "    assert abs(r['total_vs_fp32'] - weights(r) / weights(rows[0])) < 0.01, r\n"
        "print('ratios checked:', len(rows))"
    )
    printed = _run_generated("02_quantization.ipynb", tmp_path, monkeypatch, [check])
    assert "ratios checked: 3" in printed[-1]


@pytest.mark.slow
def test_batching_shows_every_system_gives_the_same_tokens(tmp_path, monkeypatch):
    # the notebook's premise (EOS ignored, greedy: the same tokens from every system) is counted, not assumed
    printed = "".join(_run_generated("04_continuous_batching.ipynb", tmp_path, monkeypatch))
    assert "same tokens as generate_batched: one at a time 1/1, static batches 4/4" in printed, printed


@pytest.mark.slow
def test_batching_metrics_are_printed_with_their_names(tmp_path, monkeypatch):
    expected = "print(f\"finish reason 'length', {len(prompts[0])} prompt tokens, {lengths[0]} output tokens, \")"
    printed = _run_generated("04_continuous_batching.ipynb", tmp_path, monkeypatch, [expected])
    (metrics,) = [p for p in printed[:-1] if p.startswith("finish reason ")]  # the metrics cell's line
    assert printed[-1].strip() and printed[-1].strip() in metrics, (printed[-1], metrics)
    assert "time to first token " in metrics and "mean inter-token latency " in metrics, metrics


@pytest.mark.slow
def test_all_together_shows_the_adapter_both_kept_and_applied(tmp_path, monkeypatch):
    # 'same tokens alone as in the mixed batch' would also hold if the adapter were ignored everywhere
    printed = "".join(_run_generated("05_all_together.ipynb", tmp_path, monkeypatch))
    assert "same tokens as in the mixed batch: True" in printed, printed
    assert "different tokens on the base model: True" in printed, printed


@pytest.mark.slow
def test_batching_rows_name_the_requests_they_timed(tmp_path, monkeypatch):
    # one at a time runs on a subset of the workload: its row must say so
    printed = _run_generated("04_continuous_batching.ipynb", tmp_path, monkeypatch, ["print(rows[0]['system'])"])
    assert "(first 1 of 4 requests)" in printed[-1], printed[-1]


def test_make_notebooks_refuses_a_name_it_does_not_know(capsys):
    """Regression: ``make_notebooks.py --execute 04_continuous_batching`` (no ``.ipynb``) wrote and ran nothing and
    exited 0; a stem is now taken, and an unknown name is an error listing the notebooks."""
    make = _generator()
    with pytest.raises(SystemExit):
        make.main(["nonesuch"])
    assert "no notebook named ['nonesuch']" in capsys.readouterr().err
