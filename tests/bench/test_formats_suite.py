"""Formats suite pieces on the tiny model: the rows the docs table is made of, and their goals."""

from __future__ import annotations

import pytest
import torch

import llmspeed
from llmspeed.bench.formats import dequantized, gptq, round_trips


def test_dequantized_copy_holds_float_linears_with_the_same_logits():
    model = llmspeed.models.tiny("llama")
    llmspeed.quantize(model, "int4", group_size=32)
    copy = dequantized(model)
    assert all(type(m) is torch.nn.Linear for _, m in copy.linear_layers())
    assert type(model.hf.model.layers[0].mlp.up_proj).__name__ == "Int4Linear"  # the source is untouched
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.allclose(copy.hf(ids).logits, model.hf(ids).logits, atol=1e-5)


@pytest.mark.slow
def test_round_trip_and_gptq_rows_meet_their_goals(tmp_path):
    rows = round_trips("tiny-llama", True, tmp_path) + gptq("tiny-llama", True, tmp_path)
    for r in rows:
        if "vs dequantized model" in r["case"]:
            assert r["value"] <= 1e-4, r
        if r["case"].endswith("-> llmspeed"):  # every quantized layer bit-identical
            assert r["vs_baseline"] == 1, r
    assert sum("vs dequantized model" in r["case"] for r in rows) == 3  # quick: int8, int4 g32 sym and asym
    ref, got = (r["value"] for r in rows if r["table"] == "gptq")
    assert abs(got - ref) <= 1e-5 * ref
