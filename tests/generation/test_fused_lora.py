"""LoRA adapters in the fused CPU decode step: per-row adapters give the generic path's logits and tokens.

Here the step's logits per row, the adapter changes it follows and its threads; the adapter stacks' layout and
precision are in test_fused_lora_stacks.py, the Generator on the fused path with adapters in
test_fused_lora_generator.py. Their helpers (``_with_adapters``, ...) stay here.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import llmspeed
from llmspeed import lora
from llmspeed.generation import fused_decode
from llmspeed.generation.runner import StepInput

from .test_fused_decode import LOGIT_TOLERANCE, _generic_logits, _prefilled, _regions_then_team

FP16_LORA_TOLERANCE = 2e-3  # logits, relative to their largest: adapters stacked in fp16 (docs/lora.md)


pytestmark = pytest.mark.skipif(fused_decode.unavailable() is not None, reason="the C++ decode kernel cannot build here")


def _with_adapters(model, seed=0, fp16_exact=True):
    """Adapters "a" (r=4, every projection) and "b" (r=8, q and v only) with random, non-zero B.

    ``fp16_exact``: every A and B value is an fp16 value and the scales (2 and 0.5) are powers of two, so
    the fused step's default fp16 stacks hold exactly the adapters the generic path applies in fp32.
    """
    lora.add_adapter(model, "a", r=4, alpha=8)
    lora.add_adapter(model, "b", r=8, alpha=4, targets=["q_proj", "v_proj", "qkv_proj"])  # qkv: Phi-3's
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            for name in layer.lora_A:
                layer.weight_b(name).copy_(torch.randn(layer.weight_b(name).shape, generator=g) * 0.05)
                if fp16_exact:
                    for w in (layer.weight_a(name), layer.weight_b(name)):
                        w.copy_(w.half().float())
    lora.set_adapter(model, None)
    return model


def _fused_step(seed, lengths):
    """A model with adapters "a" and "b", its prefilled generator, the decode list, a FusedDecode and the step."""
    model = _with_adapters(llmspeed.models.tiny("llama", seed=seed))
    gen, decode = _prefilled(model, lengths)
    return model, gen, decode, fused_decode.FusedDecode(model, gen.cache), StepInput.decode(decode, gen.blocks.block_size)


def _routed_logits(model, gen, decode, names):
    with lora.per_token_adapters(model, names):
        return _generic_logits(model, gen, decode)


@pytest.mark.parametrize("fmt", [None, "int8", "int4", "nf4", "int4-rotated", "phi3", "phi3-int4"])
def test_each_row_gets_its_own_adapter(fmt):
    """Phi-3: adapters over its fused qkv_proj / gate_up_proj, whose B stacks the step reads in row ranges."""
    model = llmspeed.models.tiny("phi3" if fmt and fmt.startswith("phi3") else "llama", seed=4)
    fmt = {"phi3": None, "phi3-int4": "int4"}.get(fmt, fmt)
    if fmt == "int4-rotated":  # the step rotates down_proj's input: the adapter's A must be rotated to match
        llmspeed.quantize(model, "int4", group_size=32, hadamard_layers=["*.mlp.down_proj"])
    elif fmt is not None:
        llmspeed.quantize(model, fmt, **({} if fmt == "int8" else {"group_size": 32}))
    _with_adapters(model)
    assert fused_decode.unsupported(model) is None
    gen, decode = _prefilled(model, [3, 9, 4, 17, 6])
    names = ["a", None, "b", "a", "b"]
    fused = fused_decode.FusedDecode(model, gen.cache).run(StepInput.decode(decode, gen.blocks.block_size), names)
    ref = _routed_logits(model, gen, decode, names)
    base = _generic_logits(model, gen, decode)
    assert fused is not None
    # a rotated A is no longer exactly fp16: the default fp16 stacks round it
    tolerance = FP16_LORA_TOLERANCE if fmt == "int4-rotated" else LOGIT_TOLERANCE[torch.float32]
    assert (fused - ref).abs().max() / ref.abs().max() < tolerance
    changed = (ref - base).abs().amax(-1) > 1e-3  # the adapters do change those rows
    assert changed.tolist() == [True, False, True, True, True]


def test_outputs_past_the_last_full_block_of_16_get_their_deltas():
    """gate/up of 40 outputs: two blocks of 16, then a block the step adds 8 outputs of (its partial-block path)."""
    model = _with_adapters(llmspeed.models.tiny("llama", seed=4, intermediate_size=40))
    gen, decode = _prefilled(model, [3, 9, 4])
    names = ["a", None, "a"]
    fused = fused_decode.FusedDecode(model, gen.cache).run(StepInput.decode(decode, gen.blocks.block_size), names)
    ref = _routed_logits(model, gen, decode, names)
    assert fused is not None
    assert (fused - ref).abs().max() / ref.abs().max() < LOGIT_TOLERANCE[torch.float32]


@pytest.mark.parametrize("fmt", [None, "int4"])
def test_rows_sharing_an_adapter_in_packs_of_every_size_get_their_own_deltas(fmt):
    """The step takes the rows of one adapter together, up to 4 at once (decode_cpu's LoraDeltas packs): six rows of
    "a" (a pack of 4 and one of 2), three of "b", one lone "a"-less row of each kind; each row still gets its own
    adapter's delta of its own input, and rows without an adapter none."""
    model = llmspeed.models.tiny("llama", seed=5)
    if fmt is not None:
        llmspeed.quantize(model, fmt, group_size=32)
    _with_adapters(model, seed=1)
    lengths = [3, 9, 4, 17, 6, 5, 11, 2, 8, 7, 13]
    names = ["a", "b", "a", None, "a", "b", "a", "a", None, "b", "a"]
    gen, decode = _prefilled(model, lengths)
    fused = fused_decode.FusedDecode(model, gen.cache).run(StepInput.decode(decode, gen.blocks.block_size), names)
    ref = _routed_logits(model, gen, decode, names)
    base = _generic_logits(model, gen, decode)
    assert fused is not None
    assert (fused - ref).abs().max() / ref.abs().max() < LOGIT_TOLERANCE[torch.float32]
    changed = (ref - base).abs().amax(-1) > 1e-3
    assert changed.tolist() == [n is not None for n in names]
    # every row against the same row given to the step alone: the deltas do not mix rows of one pack
    for i in (0, 6, 10):
        alone = _routed_logits(model, gen, [decode[i]], [names[i]])
        assert (fused[i] - alone[0]).abs().max() / alone.abs().max() < LOGIT_TOLERANCE[torch.float32]


def test_the_active_adapter_applies_when_no_row_names_one():
    model = _with_adapters(llmspeed.models.tiny("llama", seed=1))
    lora.set_adapter(model, "b")
    gen, decode = _prefilled(model, [5, 8])
    fused = fused_decode.FusedDecode(model, gen.cache).run(StepInput.decode(decode, gen.blocks.block_size))
    ref = _generic_logits(model, gen, decode)  # LoraLinear.forward applies the active adapter
    assert (fused - ref).abs().max() / ref.abs().max() < LOGIT_TOLERANCE[torch.float32]


def test_adapters_changed_in_place_are_restacked():
    model, gen, decode, runner, step = _fused_step(2, [4, 7])
    before = runner.run(step, ["a", "a"])
    with torch.no_grad():  # what an optimizer step does: same tensors, new values
        for _, layer in lora.lora_layers(model):
            layer.weight_b("a").mul_(2.0)
    after = runner.run(step, ["a", "a"])
    ref = _routed_logits(model, gen, decode, ["a", "a"])
    assert not torch.allclose(before, after)
    assert (after - ref).abs().max() / ref.abs().max() < LOGIT_TOLERANCE[torch.float32]


def test_an_adapter_no_row_reads_is_checked_when_a_row_reads_it():
    """A step checks the versions of the adapters its rows read only: training adapter "b" in place keeps the
    snapshot for steps of "a" (no restack, same logits), and the first step that reads "b" restacks it."""
    model, gen, decode, runner, step = _fused_step(5, [4, 7])
    before = runner.run(step, ["a", None])
    snap = runner._snapshot
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            if "b" in layer.lora_A:
                layer.weight_b("b").mul_(2.0)
    assert torch.equal(runner.run(step, ["a", None]), before) and runner._snapshot is snap
    assert not snap.valid()  # every adapter's tensors, when no rows are named
    after = runner.run(step, ["b", "a"])
    assert runner._snapshot is not snap
    ref = _routed_logits(model, gen, decode, ["b", "a"])
    assert (after - ref).abs().max() / ref.abs().max() < LOGIT_TOLERANCE[torch.float32]


def test_scales_and_flags_changed_in_place_are_seen():
    """The snapshot compares one process-wide count of LoRA wrapper changes: an in-place scale, the active
    adapter and a disabled layer each make the next step follow (restacked, or the generic path)."""
    model, gen, decode, runner, step = _fused_step(3, [5, 8])
    before = runner.run(step, ["a", "a"])
    layer = next(layer for _, layer in lora.lora_layers(model))
    layer.scaling["a"] *= 4.0  # an item of the dict, not the attribute
    after = runner.run(step, ["a", "a"])
    assert not torch.allclose(before, after)
    ref = _routed_logits(model, gen, decode, ["a", "a"])
    assert (after - ref).abs().max() / ref.abs().max() < LOGIT_TOLERANCE[torch.float32]
    lora.set_adapter(model, "b")  # rows without a name run the active adapter
    ref = _generic_logits(model, gen, decode)
    fused = runner.run(step)
    assert (fused - ref).abs().max() / ref.abs().max() < LOGIT_TOLERANCE[torch.float32]
    layer.disabled = True
    assert runner.run(step) is None  # disabled adapters: the generic path


@pytest.mark.parametrize("fmt", [None, "int4"])
def test_adapters_on_a_step_that_holds_its_threads_are_bit_identical(fmt):
    """The deltas' two loops run on the step's team of threads (step_team.h) like its GEMV groups: each rank
    product and each block of outputs is computed by the same code whichever thread takes it."""
    model = llmspeed.models.tiny("llama", seed=5)
    if fmt is not None:
        llmspeed.quantize(model, fmt, group_size=32)
    _with_adapters(model)
    gen, decode = _prefilled(model, [3, 8, 5])
    step = StepInput.decode(decode, gen.blocks.block_size)
    runner = fused_decode.FusedDecode(model, gen.cache, amx_rows=0)
    regions, team = _regions_then_team(lambda: runner.run(step, ["a", None, "b"]))
    assert torch.equal(team, regions)
    ref = _routed_logits(model, gen, decode, ["a", None, "b"])
    assert (team - ref).abs().max() / ref.abs().max() < LOGIT_TOLERANCE[torch.float32]


@pytest.mark.parametrize("fmt", [None, "int4"])
def test_one_row_steps_add_each_threads_outputs_the_same_on_any_split(fmt):
    """In a one-row step each thread adds the output blocks of the outputs it wrote (lora_deltas.h's add_rows),
    after the other threads' rank products: a share may end inside a block of 16 (1, 2 and 3 threads split gate/up's
    40 outputs differently, the last block partial). On fp32 weights every split gives the same logits, bit for bit
    (the 4-bit row loops' blocks of rows follow where a share starts, with or without adapters, so there the last
    bits move with the split), and every split gives the routed generic path's."""
    model = llmspeed.models.tiny("llama", seed=6, intermediate_size=40)
    if fmt is not None:
        llmspeed.quantize(model, fmt, group_size=32)
    _with_adapters(model)
    gen, decode = _prefilled(model, [7])
    step = StepInput.decode(decode, gen.blocks.block_size)
    runner = fused_decode.FusedDecode(model, gen.cache, amx_rows=0)
    ext, threads = fused_decode.extension(), torch.get_num_threads()
    was = ext.step_team(True)
    results = []
    try:
        for n, team in ((1, True), (2, True), (3, True), (2, False), (3, False)):
            torch.set_num_threads(n)
            ext.step_team(team)
            results.append(runner.run(step, ["a"]))
    finally:
        ext.step_team(was)
        torch.set_num_threads(threads)
    ref = _routed_logits(model, gen, decode, ["a"])
    base = _generic_logits(model, gen, decode)
    for other in results:
        assert fmt is not None or torch.equal(other, results[0])
        assert (other - ref).abs().max() / ref.abs().max() < LOGIT_TOLERANCE[torch.float32]
    assert (ref - base).abs().max() > 1e-3  # the adapter does change the row


_NAMES = ("a", "b", "c")


_OPS = st.one_of(
    st.tuples(st.just("step"), st.tuples(*[st.sampled_from((None,) + _NAMES)] * 2)),
    st.tuples(st.sampled_from(["train", "train one layer", "scale", "add", "delete", "activate"]),
              st.sampled_from((None,) + _NAMES)),  # fmt: skip
)


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(_OPS, min_size=1, max_size=12), seed=st.integers(0, 2**16))
def test_steps_follow_any_sequence_of_adapter_changes(ops, seed):
    """Adapters added, deleted, trained in place (all layers or one), rescaled and activated in any order: every
    fused step gives the generic path's logits for the adapters it runs, never those of stale stacks."""
    model, gen, decode, runner, step = _fused_step(seed % 7, [3, 6])
    g = torch.Generator().manual_seed(seed)
    for op, name in ops:
        present = set(lora.adapter_names(model))
        if op == "step":
            if not set(name) - {None} <= present:
                continue
            active = lora.active_adapter(model)
            rows = [n if n is not None else active for n in name]
            fused = runner.run(step, list(name))
            if fused is None:  # what the fused step cannot run (layers set to different adapters) goes generic
                event("a step the fused path left to the generic one")
                continue
            event("a fused step compared")
            ref = _routed_logits(model, gen, decode, rows)
            assert (fused - ref).abs().max() / ref.abs().max() < LOGIT_TOLERANCE[torch.float32], (ops, op, name)
        elif op == "add" and name is not None and name not in present:
            lora.add_adapter(model, name, r=4, alpha=8, targets=["q_proj", "v_proj"] if name == "b" else "all-linear")
            with torch.no_grad():
                for _, layer in lora.lora_layers(model):
                    if name in layer.lora_A:  # fp16 values: the default stacks hold them exactly
                        layer.weight_b(name).copy_((torch.randn(layer.weight_b(name).shape, generator=g) * 0.05).half())
                        layer.weight_a(name).copy_(layer.weight_a(name).half())
        elif op == "delete" and name in present:
            lora.delete_adapter(model, name)
        elif op == "activate" and (name is None or name in present):
            lora.set_adapter(model, name)
        elif op in ("train", "train one layer", "scale") and name in present:
            layers = [layer for _, layer in lora.lora_layers(model) if name in layer.lora_A]
            for layer in layers[:1] if op != "train" else layers:
                if op == "scale":
                    layer.scaling[name] *= 2.0
                else:
                    with torch.no_grad():  # an optimizer step: same tensors, new values (powers of two: fp16 exact)
                        (layer.weight_b(name) if op == "train" else layer.weight_a(name)).mul_(2.0)
