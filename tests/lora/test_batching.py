"""Mixed-adapter batches: every row/token equals a run with its adapter alone, in one pass."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmspeed import lora
from llmspeed.lora import LoraLinear
from llmspeed.lora.routing import Routing, concat_delta, segment_delta

from .helpers import DenseAttention, fake_quantize, packed_batch, quantize_real

NAMES = ["a", "b", None, "c"]


def three_adapters(model):
    lora.add_adapter(model, "a", r=2, init="random")
    lora.add_adapter(model, "b", r=4, alpha=4, init="random", targets=["q_proj", "v_proj", "down_proj"])
    lora.add_adapter(model, "c", r=8, init="random", use_rslora=True)
    return model


def alone(model, name, **kwargs):
    """Logits with only ``name`` active (``None``: base)."""
    lora.set_adapter(model, name)
    with torch.no_grad():
        return model.hf(**kwargs).logits


@pytest.mark.parametrize("method", ["concat", "segment", "auto"])
def test_per_row_equals_single_adapter_runs(llama, method):
    three_adapters(llama)
    ids = torch.randint(0, 256, (4, 9), generator=torch.Generator().manual_seed(0))
    with lora.per_row_adapters(llama, NAMES, method=method), torch.no_grad():
        mixed = llama.hf(input_ids=ids).logits  # [4, 9, V]
    for row, name in enumerate(NAMES):
        # fp32 GEMMs of 36 and 9 rows may take different MKL kernels: the full suite saw 1.9e-5 once logits'
        # accumulation order changed with the allocator's state, so the bound is a few float32 ulps of the sums
        torch.testing.assert_close(
            mixed[row], alone(llama, name, input_ids=ids[row : row + 1])[0], atol=1e-4, rtol=1e-5
        )


@pytest.mark.parametrize("quantized", [None, "fake", "int4"])
def test_per_token_forward_batch_equals_single_adapter_runs(llama, quantized):
    if quantized == "fake":
        fake_quantize(llama)
    elif quantized:
        quantize_real(llama, quantized)
    three_adapters(llama)
    gen = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, 256, (n,), generator=gen) for n in (5, 3, 7, 4)]
    ids, positions, seq_ids, last = packed_batch(sequences)
    token_names = [NAMES[i] for i in seq_ids.tolist()]
    with lora.per_token_adapters(llama, token_names), torch.no_grad():
        mixed = llama.forward_batch(ids, positions, DenseAttention(seq_ids, positions), last)  # [4, V]
    for i, (seq, name) in enumerate(zip(sequences, NAMES)):
        want = alone(llama, name, input_ids=seq[None])[0, -1]
        torch.testing.assert_close(mixed[i], want, atol=1e-5, rtol=1e-5)


def test_routing_is_removed_after_the_block(llama):
    three_adapters(llama)
    lora.set_adapter(llama, "a")
    ids = torch.randint(0, 256, (2, 5))
    before = alone(llama, "a", input_ids=ids)
    with lora.per_row_adapters(llama, ["b", "c"]):
        pass
    assert all(layer.routing is None for _, layer in lora.lora_layers(llama))
    assert torch.equal(alone(llama, "a", input_ids=ids), before)


def test_mismatched_token_count_is_a_clear_error(llama):
    three_adapters(llama)
    with lora.per_token_adapters(llama, ["a", "b"]), pytest.raises(ValueError, match="2 tokens"):
        llama.hf(input_ids=torch.zeros(1, 3, dtype=torch.long))


def test_bad_logits_indices_or_a_row_count_that_does_not_fit_are_clear_errors(llama):
    three_adapters(llama)
    bad_rows = [(torch.tensor([0, -1]), r"must index the 3 tokens named; got \[0, -1\]"),
                (torch.tensor([0, 3]), r"must index the 3 tokens named; got \[0, 3\]"),
                (torch.tensor([0.0, 1.0]), "must be a 1-D integer tensor"),
                (torch.tensor([[0, 1]]), "must be a 1-D integer tensor")]  # fmt: skip
    for rows, message in bad_rows:
        with pytest.raises(ValueError, match=f"logits_indices {message}"):
            with lora.per_token_adapters(llama, ["a", "b", None], logits_indices=rows):
                pass
    # the message named neither the argument nor the batch's row count (regression)
    with lora.per_row_adapters(llama, ["a", "b"]), pytest.raises(ValueError, match=r"per_row_adapters got names for "
                                                                              r"2 rows, but the batch has 3 rows"):
        llama.hf(input_ids=torch.zeros(3, 4, dtype=torch.long))  # 3 rows: not spread over 2 names
    assert all(layer.routing is None for _, layer in lora.lora_layers(llama))


def test_unknown_or_merged_adapter_rejected(llama):
    three_adapters(llama)
    with pytest.raises(ValueError, match="not adapters"):
        with lora.per_row_adapters(llama, ["a", "zzz"]):
            pass
    lora.merge(llama, "a")
    with pytest.raises(ValueError, match="merged"):
        with lora.per_row_adapters(llama, ["b"]):
            pass


def _layer(ranks: list[int]) -> LoraLinear:
    layer = LoraLinear(torch.nn.Linear(16, 12, bias=False))
    for i, r in enumerate(ranks):
        layer.add(f"n{i}", r, scale=0.5 + i, init="random")
    return layer


@settings(max_examples=25, deadline=None)
@given(ranks=st.lists(st.integers(1, 6), min_size=1, max_size=4), data=st.data())
def test_concat_and_segment_match_a_per_token_loop(ranks, data):
    layer = _layer(ranks)
    n_tokens = data.draw(st.integers(1, 12))
    choice = data.draw(st.lists(st.integers(-1, len(ranks) - 1), min_size=n_tokens, max_size=n_tokens))
    names = [None if c < 0 else f"n{c}" for c in choice]
    layer.routing = Routing.from_names(names, "token", "auto", torch.device("cpu"))
    x = torch.randn(n_tokens, 16)
    ids = layer.routing.ids
    want = torch.stack(
        [
            torch.zeros(12) if n is None else layer.scaling[n] * layer.lora_B[n](layer.lora_A[n](x[t]))
            for t, n in enumerate(names)
        ]
    )
    with torch.no_grad():
        torch.testing.assert_close(concat_delta(layer, layer.routing, x, ids), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(segment_delta(layer, layer.routing, x, ids), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["concat", "segment", "auto"])
def test_adapters_of_different_dtypes_share_a_batch(llama, method):
    """Regression: add_adapter(dtype=torch.bfloat16) next to an fp32 adapter made every mixed batch fail with
    "expected m1 and m2 to have the same dtype" (the input was cast to the first adapter's dtype only)."""
    lora.add_adapter(llama, "a", r=2, init="random", dtype=torch.bfloat16)
    lora.add_adapter(llama, "b", r=4, init="random", targets=["q_proj", "v_proj"])
    names = ["a", "b", None, "b"]
    ids = torch.randint(0, 256, (4, 9), generator=torch.Generator().manual_seed(0))
    with lora.per_row_adapters(llama, names, method=method), torch.no_grad():
        mixed = llama.hf(input_ids=ids).logits  # [4, 9, V]
    for row, name in enumerate(names):
        want = alone(llama, name, input_ids=ids[row : row + 1])[0]  # each adapter in its own dtype, as alone
        torch.testing.assert_close(mixed[row], want, atol=1e-4, rtol=1e-5)


def test_adapters_changed_inside_the_block_are_restacked(llama):
    """Regression: "concat" cached each layer's concatenated A and B on first use, so an adapter trained in
    place (or rescaled) inside a per_row_adapters block kept running its old weights there."""
    three_adapters(llama)
    ids = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(0))
    names = ["a", "c", None]
    with lora.per_row_adapters(llama, names, method="concat"), torch.no_grad():
        llama.hf(input_ids=ids)  # fills the cache
        for p in lora.trainable_parameters(llama, "a"):
            p.mul_(2)  # as an optimizer step does
        for _, layer in lora.lora_layers(llama):
            layer.scaling["c"] = 0.5
        mixed = llama.hf(input_ids=ids).logits  # [3, 9, V]
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone(llama, name, input_ids=ids[row : row + 1])[0], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("names", [[], "a", ("a", 5)])
def test_names_that_are_not_a_list_of_adapters_are_refused(llama, names):
    three_adapters(llama)
    with pytest.raises(ValueError, match="names"):
        with lora.per_row_adapters(llama, names):
            pass
    with pytest.raises(ValueError, match="method must be one of"):
        with lora.per_row_adapters(llama, ["a"], method="fast"):
            pass
    assert all(layer.routing is None for _, layer in lora.lora_layers(llama))


def test_a_mixed_batch_with_dropout_on_is_refused(llama):
    lora.add_adapter(llama, "a", r=2, dropout=0.1, init="random")
    llama.module.train()
    with lora.per_row_adapters(llama, ["a"]), pytest.raises(RuntimeError, match="for inference.*eval"):
        llama.hf(input_ids=torch.zeros(1, 4, dtype=torch.long))
    llama.module.eval()
    with lora.per_row_adapters(llama, ["a"]):
        llama.hf(input_ids=torch.zeros(1, 4, dtype=torch.long))


def test_a_merge_inside_the_block_is_refused_at_the_next_forward(llama):
    three_adapters(llama)
    with lora.per_row_adapters(llama, ["a", "b"]):
        lora.merge(llama, "c")
        with pytest.raises(RuntimeError, match=r"adapters \('c',\) are merged"):
            llama.hf(input_ids=torch.zeros(2, 4, dtype=torch.long))
