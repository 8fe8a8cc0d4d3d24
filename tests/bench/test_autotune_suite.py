"""The autotune suite: its workloads run where ``kernel="auto"``'s choices are called."""

from __future__ import annotations

from llmspeed.bench import autotune
from llmspeed.bench.models import load_model
from llmspeed.quant import quantize


def test_the_prefill_runs_the_quantized_kernels_not_the_fused_step(monkeypatch):
    # the fused step takes prompt chunks too: a default generator's prefill never called the kernels the
    # suite compares (rule table against tuned), and its first-use workload never met the prefill buckets
    made = []

    class Recorded(autotune.Generator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(autotune, "Generator", Recorded)
    model = load_model("tiny-llama", "cpu")
    quantize(model, "int4")
    assert autotune._prefill_ms(model, 96) > 0
    (gen,) = made
    assert gen.num_tokens_computed == 96
    assert gen.step_paths and not any(path.startswith("fused") for path in gen.step_paths), gen.step_paths


def test_progress_false_shows_no_bar_and_true_a_bar_over_the_formats(monkeypatch, tmp_path, shown_bars):
    """Regression: run() took ``progress`` and ignored it: no bar of its own with progress=True, and a checkpoint
    folder's models loaded with transformers' "Loading weights" bar under --no-progress too."""
    from types import SimpleNamespace

    import llmspeed
    from llmspeed.bench.models import hf_bars

    folder = tmp_path / "tiny"
    with hf_bars(False):
        llmspeed.models.tiny("llama").hf.save_pretrained(folder)
    monkeypatch.setattr(autotune, "_first_use", lambda model: (0.1, 0.2, 0))  # the timings, faked
    monkeypatch.setattr(autotune, "_prefill_ms", lambda model, tokens: 1.0)
    monkeypatch.setattr(autotune, "_decode_step_ms", lambda model, batch, steps: 1.0)
    monkeypatch.setattr(autotune.tuning, "store", lambda: SimpleNamespace(choices={}))
    rows = autotune.run(model=str(folder), quick=True, progress=False)
    assert {r["format"] for r in rows} == set(autotune.FORMATS)
    assert shown_bars == []
    autotune.run(model=str(folder), quick=True, progress=True)
    assert shown_bars == ["autotune"] + ["Loading weights"] * len(autotune.FORMATS)  # and each format's load
