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
