"""The decode_rows suite's harness (its timings come from ``steps.decode_step_ms``, faked here)."""

from __future__ import annotations

import llmspeed
from llmspeed.bench import decode_rows
from llmspeed.bench.models import hf_bars


def test_progress_false_shows_no_bar_and_true_a_bar_over_the_formats(monkeypatch, tmp_path, shown_bars):
    """Regression: run() took ``progress`` and ignored it: no bar of its own with progress=True, and a checkpoint
    folder's models loaded with transformers' "Loading weights" bar under --no-progress too."""
    folder = tmp_path / "tiny"
    with hf_bars(False):
        llmspeed.models.tiny("llama").hf.save_pretrained(folder)
    monkeypatch.setattr(decode_rows, "decode_step_ms", lambda model, prompts, steps, **kwargs: (1.0, "fused"))
    rows = decode_rows.run(model=str(folder), quick=True, progress=False)
    assert {r["format"] for r in rows} == {"fp32", "int8", "int4", "int4, int8 activations"}
    assert shown_bars == []
    decode_rows.run(model=str(folder), quick=True, progress=True)
    assert shown_bars == ["decode rows"] + ["Loading weights"] * 4  # and each format's load
