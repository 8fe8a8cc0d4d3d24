"""LoRA adapters in the fused CPU decode step: per-row adapters give the generic path's logits and tokens."""

from __future__ import annotations

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import llmspeed
from llmspeed import lora
from llmspeed.generation import Generator, SamplingParams, fused_decode, fused_lora
from llmspeed.generation.runner import StepInput

from .test_fused_decode import LOGIT_TOLERANCE, _generic_logits, _prefilled, _regions_then_team
from .test_fused_mixed import _staggered

FP16_LORA_TOLERANCE = 2e-3  # logits, relative to their largest: adapters stacked in fp16 (docs/lora.md)

pytestmark = pytest.mark.skipif(fused_decode.unavailable() is not None, reason="the C++ decode kernel cannot build here")


def _with_adapters(model, seed=0, fp16_exact=True):
    """Adapters "a" (r=4, every projection) and "b" (r=8, q and v only) with random, non-zero B.

    ``fp16_exact``: every A and B value is an fp16 value and the scales (2 and 0.5) are powers of two, so
    the fused step's default fp16 stacks hold exactly the adapters the generic path applies in fp32.
    """
    lora.add_adapter(model, "a", r=4, alpha=8)
    lora.add_adapter(model, "b", r=8, alpha=4, targets=["q_proj", "v_proj"])
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


@pytest.mark.parametrize("fmt", [None, "int8", "int4", "nf4", "int4-rotated"])
def test_each_row_gets_its_own_adapter(fmt):
    model = llmspeed.models.tiny("llama", seed=4)
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


def test_b_stacks_hold_blocks_of_16_outputs_zero_padded():
    """B [S, NB, R, 16]: output o of rank r at [s, o // 16, r, o % 16], scale folded in, zeros past out_features."""
    from llmspeed.lora.layer import LoraLinear

    layer = LoraLinear(torch.nn.Linear(24, 40, bias=False))
    layer.add("x", r=3, scale=0.5, init="random")
    layer.add("y", r=2, scale=2.0, init="random")
    a, b = fused_lora.stacks(layer, ["x", "y"], torch.float32)
    assert a.shape == (2, 3, 24) and b.shape == (2, 3, 3, 16)  # 40 outputs: 3 blocks, the last half padding
    for s, (name, scale) in enumerate([("x", 0.5), ("y", 2.0)]):
        r = layer.rank(name)
        flat = b[s].transpose(0, 1).reshape(3, 48)[:r]  # [R, NB * 16]
        assert torch.equal(flat[:, :40], layer.weight_b(name).T * scale)
        assert not flat[:, 40:].any() and not b[s, :, r:].any()  # padding outputs and padding ranks
        assert torch.equal(a[s, :r], layer.weight_a(name))


def test_fp16_stacks_round_each_weight_and_float32_stacks_are_exact():
    model = llmspeed.quantize(llmspeed.models.tiny("llama", seed=6), "int4", group_size=32)
    _with_adapters(model, fp16_exact=False)
    gen, decode = _prefilled(model, [5, 9, 3])
    names = ["a", "b", None]
    step = StepInput.decode(decode, gen.blocks.block_size)
    ref = _routed_logits(model, gen, decode, names)
    exact = fused_decode.FusedDecode(model, gen.cache, lora_dtype=torch.float32).run(step, names)
    half = fused_decode.FusedDecode(model, gen.cache).run(step, names)
    err = [(out - ref).abs().max() / ref.abs().max() for out in (exact, half)]
    assert err[0] < LOGIT_TOLERANCE[torch.float32]
    assert LOGIT_TOLERANCE[torch.float32] < err[1] < FP16_LORA_TOLERANCE  # fp16 rounding shows, and stays small
    with pytest.raises(ValueError, match="lora_dtype must be one of .*got torch.bfloat16"):
        fused_decode.FusedDecode(model, gen.cache, lora_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="lora_dtype must be fp16 or fp32 .*; got 'bf16'"):
        Generator(model, lora_dtype="bf16")
    for spelling in ("float32", torch.float32, "FP32"):
        assert Generator(model, lora_dtype=spelling, kv_cache_tokens=64).runner.fused.lora_dtype == torch.float32


def test_stacks_that_overflow_fp16_stay_fp32():
    model = _with_adapters(llmspeed.models.tiny("llama", seed=0))
    layer = next(layer for _, layer in lora.lora_layers(model))
    assert [t.dtype for t in fused_lora.stacks(layer, ["a", "b"])] == [torch.float16] * 2
    with torch.no_grad():
        layer.weight_b("a")[0, 0] = 1e5  # times the scale 2: past fp16's 65504
    a, b = fused_lora.stacks(layer, ["a", "b"])
    assert a.dtype == b.dtype == torch.float32 and b[0, 0, 0, 0] == 2e5  # slot a, block 0, rank 0, output 0


def test_a_group_mixing_fp16_and_fp32_stacks_gives_the_generic_logits():
    """q_proj of layer 0 overflows fp16 (its stacks stay fp32) while k and v, in the same C++ group, are fp16.

    Its B is scaled down with it, so q stays of ordinary size: a delta of 70000 x B saturates attention, where a
    rounding of 1e-7 in q (the reference's matmuls round differently with their buffers' alignment) moved the
    logits by 6e-5 of their largest in one full-suite run (the fused step agrees to 4e-7 otherwise)."""
    model = _with_adapters(llmspeed.models.tiny("llama", seed=7))
    q = model.hf.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.weight_a("a")[0, 0] = 70000.0  # past fp16's 65504
        q.weight_b("a").mul_(1e-4)
    gen, decode = _prefilled(model, [4, 6, 5])
    fused = fused_decode.FusedDecode(model, gen.cache)
    names = ["a", "b", "a"]
    out = fused.run(StepInput.decode(decode, gen.blocks.block_size), names)
    stacks = fused._snapshot.lora
    assert stacks[0].dtype == torch.float32 and stacks[2].dtype == torch.float16  # layer 0: q, then k
    ref = _routed_logits(model, gen, decode, names)
    assert torch.isfinite(ref).all() and (out - ref).abs().max() / ref.abs().max() < LOGIT_TOLERANCE[torch.float32]


def test_it_steps_aside_for_merged_adapters_and_live_dropout():
    model, _, _, runner, step = _fused_step(0, [4, 6])
    assert runner.run(step, ["a", None]) is not None
    assert runner.run(step, ["nope", None]) is None  # an unknown name: the generic path reports it
    lora.add_adapter(model, "c", r=2, dropout=0.1)
    model.hf.train()
    assert "dropout in training mode" in fused_decode.unsupported(model)
    assert runner.run(step, ["a", None]) is None
    model.hf.eval()
    lora.merge(model, "a")
    assert "merged into the base" in fused_decode.unsupported(model)


def test_the_generator_serves_many_adapters_on_the_fused_path():
    model = _with_adapters(llmspeed.models.tiny("llama", seed=5))
    prompts = [[1, 2, 3], list(range(40, 70)), [7] * 11, [9, 8, 7, 6]]
    params = [SamplingParams(max_new_tokens=12, ignore_eos=True, adapter=a) for a in ("a", None, "b", "a")]
    on = Generator(model, progress=False, block_size=8)
    off = Generator(model, progress=False, block_size=8, fused_decode=False)
    assert on.fused_decode_status == "on"
    fused_out = [on.generate_batched([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    batched = on.generate_batched(prompts, params)
    generic = off.generate_batched(prompts, params)
    assert [o.token_ids for o in batched] == [o.token_ids for o in generic] == fused_out
    assert on.step_paths["fused cpu"][0] > 0 and "fused cpu" not in off.step_paths


def test_fused_decode_status_follows_a_model_changed_under_the_generator():
    """Regression: the status was set once, when the generator was built: after an adapter was added to the
    output head (which the fused step does not take) it still said "on" while every step ran the generic path."""
    model = llmspeed.models.tiny("llama", seed=5)
    gen = Generator(model, progress=False, block_size=8)
    assert gen.fused_decode_status == "on"
    lora.add_adapter(model, "head", r=4, targets=["lm_head"])
    gen.generate_batched([[1, 2, 3]], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert not any(path.startswith("fused") for path in gen.stats.step_paths)
    assert gen.fused_decode_status.startswith("off (lm_head"), gen.fused_decode_status
    lora.delete_adapter(model, "head")
    gen.generate_batched([[1, 2, 3]], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert gen.fused_decode_status == "on" and "fused cpu" in gen.stats.step_paths


def test_mixed_steps_route_each_chunk_to_its_adapter():
    """Prompt chunks on the fused step (``mixed=True``): every token row of a chunk takes its request's adapter,
    beside decode rows with other adapters; same tokens as the per-layer path."""
    model = _with_adapters(llmspeed.models.tiny("llama", seed=5))
    prompts = [[1, 2, 3], list(range(40, 110)), [7] * 11, [9, 8, 7, 6]]
    params = [SamplingParams(max_new_tokens=8, ignore_eos=True, adapter=a) for a in ("a", None, "b", "a")]
    out = []
    for mixed in (True, False):
        gen = Generator(model, progress=False, block_size=8, max_batch_tokens=48)
        gen.runner.fused.mixed = mixed
        out.append((_staggered(gen, prompts, params), set(gen.step_paths)))
    (fused, fused_paths), (generic, generic_paths) = out
    assert fused == generic and all(len(t) == 8 for t in fused)
    assert "fused cpu mixed" in fused_paths and "fused cpu mixed" not in generic_paths


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


def test_layers_set_to_different_adapters_take_the_generic_path():
    """One snapshot-wide active adapter cannot describe layers set to different ones: the step steps aside."""
    model = _with_adapters(llmspeed.models.tiny("llama", seed=1))
    lora.set_adapter(model, "a")
    model.hf.model.layers[0].self_attn.q_proj.active = "b"  # one layer set otherwise
    gen, decode = _prefilled(model, [5, 8])
    assert fused_decode.FusedDecode(model, gen.cache).run(StepInput.decode(decode, gen.blocks.block_size)) is None


@pytest.mark.parametrize("fused", [True, False])
def test_adapter_false_runs_the_base_alone_whatever_adapter_is_active(fused):
    """``SamplingParams(adapter=False)`` (what the server runs for the base model's name beside served adapters)
    gives the model's tokens before any adapter was added, batched beside rows that run the active adapter and
    rows that name one, in single steps and greedy bursts; its prefix-cache blocks are not the active adapter's."""
    model = llmspeed.models.tiny("llama", seed=6)
    prompts = [list(range(40, 70)), [1, 2, 3], [9, 8, 7, 6]]
    sp = dict(max_new_tokens=10, ignore_eos=True)
    base = [o.token_ids for o in Generator(model, progress=False).generate_batched(prompts, SamplingParams(**sp))]
    _with_adapters(model)
    lora.set_adapter(model, "a")
    kw = dict(progress=False, block_size=8, fused_decode=fused, prefix_caching=True)
    alone = {a: [Generator(model, **kw).generate_batched([p], SamplingParams(**sp, adapter=a))[0].token_ids
                 for p in prompts] for a in ("a", "b")}  # fmt: skip
    assert alone["a"] != base and alone["b"] != base  # the adapters change the tokens
    gen = Generator(model, **kw)
    mixed = [SamplingParams(**sp, adapter=a) for a in (False, None, "b")]
    outs = [o.token_ids for o in gen.generate_batched(prompts, mixed)]
    assert outs == [base[0], alone["a"][1], alone["b"][2]]
    # the same prompt under the active adapter, then alone: the second must not reuse the first's cached blocks
    assert gen.generate_batched([prompts[0]], SamplingParams(**sp))[0].token_ids == alone["a"][0]
    assert gen.generate_batched([prompts[0]], SamplingParams(**sp, adapter=False))[0].token_ids == base[0]
    burst = Generator(model, **kw, num_scheduler_steps=4)
    assert [o.token_ids for o in burst.generate_batched(prompts, SamplingParams(**sp, adapter=False))] == base
    assert ("fused cpu" in gen.step_paths) == fused
    if fused:
        assert "fused cpu, greedy burst" in burst.step_paths


def test_adapter_accepts_false_but_not_true():
    assert SamplingParams(adapter=False).adapter is False
    with pytest.raises(ValueError, match=r"`adapter` must be None \(the active adapter\), False"):
        SamplingParams(adapter=True)
