"""llmspeed.huge_pages: weights copied into memory advised for 2 MiB pages keep everything a model depends on."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import llmspeed
from llmspeed import SamplingParams, huge_pages
from llmspeed.generation import Generator
from llmspeed.protocol import step_lock

needs_thp = pytest.mark.skipif(huge_pages.why_not() is not None, reason=f"no huge pages here: {huge_pages.why_not()}")


def _big_tiny(**overrides) -> llmspeed.Model:
    """A tiny Llama whose tied 16384 x 64 embedding (4 MiB) is enough to move."""
    return llmspeed.models.tiny("llama", seed=0, vocab_size=16384, tie_word_embeddings=True, **overrides)


def _smaps_huge_kb(ptr: int) -> int:
    """AnonHugePages (kB) of the mapping of this process that holds address ``ptr``."""
    inside, huge = False, 0
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= ptr < hi
            elif inside and head == "AnonHugePages:":
                huge = int(line.split()[1])
    return huge


@needs_thp
def test_move_keeps_values_identity_sharing_and_strides():
    module = nn.Module()
    module.a = nn.Parameter(torch.randn(1024, 1024))  # 4 MiB
    module.b = nn.Parameter(torch.randn(512, 512).t())  # 1 MiB, a transposed view: strides (1, 512)
    module.tied = module.a  # the same parameter twice (a tied embedding and head)
    base = torch.randn(300, 300)
    module.register_buffer("view1", base[:100])  # two buffers sharing one storage
    module.register_buffer("view2", base[100:])
    module.register_buffer("small", torch.randn(10))  # below MIN_BYTES: stays
    module.a.grad = torch.randn(1024, 1024)
    values = {n: t.clone() for n, t in [*module.named_parameters(), *module.named_buffers()]}
    ids = {n: id(p) for n, p in module.named_parameters()}
    grad, small_ptr = module.a.grad.clone(), module.small.data_ptr()

    moved = huge_pages.move(module)

    assert moved >= 4 * 2**20 + 2**20 + 300 * 300 * 4 + 4 * 2**20  # a, b, base's storage and a's gradient
    assert {n: id(p) for n, p in module.named_parameters()} == ids  # parameters re-pointed, not replaced
    for n, t in [*module.named_parameters(), *module.named_buffers()]:
        assert torch.equal(t, values[n]), n
    assert module.b.stride() == (1, 512) and torch.equal(module.a.grad, grad)
    assert module.tied is module.a and module.a.requires_grad
    assert module.view1.untyped_storage().data_ptr() == module.view2.untyped_storage().data_ptr()  # still shared
    module.view1[0, 0] = 7.0  # ... so a write through one is seen through the other, as before
    assert module.view2.storage_offset() == 100 * 300 and module.small.data_ptr() == small_ptr
    assert module.a.data_ptr() % huge_pages.PAGE == 0  # the copies start on a page boundary
    assert huge_pages.held(module) == moved - 4 * 2**20  # the gradient is moved, but held() counts the weights
    assert huge_pages.move(module) == 0  # already there


@needs_thp
def test_the_kernel_backs_the_moved_weights_with_huge_pages():
    module = nn.Linear(2048, 2048, bias=False)  # 16 MiB: whole 2 MiB pages inside
    huge_pages.move(module)
    assert _smaps_huge_kb(module.weight.data_ptr()) >= 2048  # at least one 2 MiB page backs it


@needs_thp
def test_training_after_a_move_updates_the_moved_parameters():
    module = nn.Linear(1024, 1024)
    huge_pages.move(module)
    before = module.weight.detach().clone()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    module(torch.randn(4, 1024)).square().sum().backward()
    opt.step()
    assert not torch.equal(module.weight, before) and huge_pages.held(module) > 0


@needs_thp
def test_a_move_under_inference_mode_leaves_ordinary_tensors():
    # regression: a generator built under torch.inference_mode() moved the weights into inference tensors, which
    # neither train nor report a version (generate_batched reads the versions of the model's tensors)
    module = nn.Linear(1024, 1024)
    with torch.inference_mode():
        assert huge_pages.move(module) > 0
    assert not module.weight.is_inference() and module.weight._version >= 0
    module(torch.randn(2, 1024)).sum().backward()
    assert module.weight.grad is not None


def test_less_than_one_page_or_inference_tensors_stay():
    small = nn.Linear(64, 64)
    ptr = small.weight.data_ptr()
    assert huge_pages.move(small) == 0 and small.weight.data_ptr() == ptr
    with torch.inference_mode():
        frozen = nn.Linear(1024, 1024)
    ptr = frozen.weight.data_ptr()
    assert huge_pages.move(frozen) == 0 and frozen.weight.data_ptr() == ptr


def test_off_by_environment_or_kernel(monkeypatch, tmp_path):
    module = nn.Linear(1024, 1024)
    ptr = module.weight.data_ptr()
    monkeypatch.setenv(huge_pages.ENV, "0")
    assert huge_pages.why_not() == f"{huge_pages.ENV}=0"
    assert huge_pages.move(module) == 0 and module.weight.data_ptr() == ptr
    monkeypatch.delenv(huge_pages.ENV)
    mode = tmp_path / "enabled"
    mode.write_text("always madvise [never]\n")
    monkeypatch.setattr(huge_pages, "THP_MODE", mode)
    assert "transparent huge pages are off" in huge_pages.why_not()
    monkeypatch.setattr(huge_pages, "THP_MODE", tmp_path / "missing")
    assert "no transparent huge pages" in huge_pages.why_not()
    assert huge_pages.move(module) == 0 and module.weight.data_ptr() == ptr
    assert huge_pages.empty((4, 4), torch.float32).shape == (4, 4)  # torch.empty when there are none


@pytest.mark.parametrize("bad", [-1, 1.5, True, "64"])
def test_bad_min_bytes_is_a_value_error_that_changes_nothing(bad):
    module = nn.Linear(1024, 1024)
    ptr = module.weight.data_ptr()
    with pytest.raises(ValueError, match="min_bytes must be a non-negative int"):
        huge_pages.move(module, min_bytes=bad)
    assert module.weight.data_ptr() == ptr


def test_not_a_module_is_a_type_error():
    with pytest.raises(TypeError, match="module must be a torch.nn.Module; got Tensor"):
        huge_pages.move(torch.zeros(4))


@needs_thp
def test_a_cpu_generator_moves_the_weights_and_its_tokens_do_not_change(monkeypatch):
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    monkeypatch.setenv(huge_pages.ENV, "0")
    plain = _big_tiny()
    ptr = plain.hf.model.embed_tokens.weight.data_ptr()
    gen = Generator(plain, progress=False)
    assert gen.weight_pages_status == f"4 KiB pages ({huge_pages.ENV}=0)"
    assert plain.hf.model.embed_tokens.weight.data_ptr() == ptr
    expected = [o.token_ids for o in gen.generate_batched(prompts, params)]
    monkeypatch.delenv(huge_pages.ENV)
    model = _big_tiny()
    gen = Generator(model, progress=False)
    assert gen.weight_pages_status.startswith("2 MiB pages: ") and huge_pages.held(model.module) >= 4 * 2**20
    assert "MB moved now, in " in gen.weight_pages_status  # what building this generator cost
    assert "moved now" not in Generator(model, progress=False).weight_pages_status  # a second one moves nothing
    assert model.hf.lm_head.weight is model.hf.model.embed_tokens.weight  # still tied
    assert [o.token_ids for o in gen.generate_batched(prompts, params)] == expected


@needs_thp
def test_a_quantized_model_drops_its_bound_kernels_and_gives_the_same_logits():
    model = _big_tiny(hidden_size=256, intermediate_size=512)
    llmspeed.quantize(model, "int4", group_size=64)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = model.hf(ids).logits  # binds each layer's kernel to its buffers
    assert huge_pages.move(model.module) > 0
    layer = model.hf.model.layers[0].self_attn.q_proj
    assert layer.qweight.data_ptr() % 64 == 0 and not layer._kernels  # rebound on the next call
    with torch.no_grad():
        assert torch.equal(model.hf(ids).logits, before)


@needs_thp
def test_generate_batched_keeps_its_generator_after_the_move():
    # regression: the model's generator was keyed on tensor addresses read before the generator moved them, so
    # the second call built a new generator (a fresh KV cache, the prefix cache lost)
    model = _big_tiny()
    model.generate_batched([[1, 2, 3]], SamplingParams(max_new_tokens=2), progress=False)
    first = model._cached_generator[1]
    model.generate_batched([[1, 2, 3]], SamplingParams(max_new_tokens=2), progress=False)
    assert model._cached_generator[1] is first


@needs_thp
def test_a_generator_moves_the_weights_only_between_steps():
    """A step of another generator on the same model holds its step lock; the move waits for it, as cast and quantize
    do, so no step reads half-moved weights."""
    model = _big_tiny()
    ptr = model.hf.model.embed_tokens.weight.data_ptr()
    held, release, built = threading.Event(), threading.Event(), []

    def step() -> None:
        with step_lock(model.module):
            held.set()
            release.wait(30)

    stepping = threading.Thread(target=step)
    stepping.start()
    assert held.wait(30)
    building = threading.Thread(target=lambda: built.append(Generator(model, progress=False)))
    building.start()
    building.join(1.0)
    assert not built and model.hf.model.embed_tokens.weight.data_ptr() == ptr  # waiting for the step
    release.set()
    building.join(30)
    stepping.join(30)
    assert built and huge_pages.held(model.module) >= 4 * 2**20


@needs_thp
def test_side_by_side_copies_in_order_into_huge_pages():
    torch.manual_seed(0)
    tensors = [torch.randn(300, 257), torch.empty(0), torch.randn(17, 3).half(), torch.randn(2048, 512)[:, ::2]]
    out = huge_pages.side_by_side(tensors)
    assert [t.shape for t in out] == [t.shape for t in tensors] and [t.dtype for t in out] == [t.dtype for t in tensors]
    assert all(torch.equal(a, b) for a, b in zip(out, tensors)) and out[1] is tensors[1]
    ptrs = [out[i].data_ptr() for i in (0, 2, 3)]
    assert ptrs == sorted(ptrs) and all(p % huge_pages.ALIGN == 0 for p in ptrs)  # in order, cache-line apart
    assert all(t.is_contiguous() for t in out) and out[3].data_ptr() - out[0].data_ptr() < 2 * out[0].nbytes + 256
    assert _smaps_huge_kb(out[3].data_ptr()) >= 2048
    tensors[0].add_(1)  # copies, not views
    assert not torch.equal(out[0], tensors[0])


def test_side_by_side_leaves_small_sets_and_the_switched_off_as_they_are(monkeypatch):
    small = [torch.randn(8, 8), torch.randn(4)]
    assert all(a is b for a, b in zip(huge_pages.side_by_side(small), small))
    big = [torch.randn(512, 512)]
    monkeypatch.setenv(huge_pages.ENV, "0")
    assert huge_pages.side_by_side(big)[0] is big[0]


@needs_thp
def test_the_fused_steps_lora_stacks_live_in_huge_pages_and_give_the_same_tokens():
    """The fused step's adapter stacks are copied side by side into 2 MiB pages when its snapshot is built (a batch-1
    adapter step 1.13-1.12 of the model without adapters instead of 1.17-1.18, docs/lora.md); tokens unchanged."""
    from llmspeed import lora
    from llmspeed.generation import fused_decode

    if fused_decode.unavailable() is not None:
        pytest.skip(f"the C++ decode kernel cannot build here: {fused_decode.unavailable()}")
    model = llmspeed.models.tiny("llama", seed=3, hidden_size=256, intermediate_size=512)
    lora.add_adapter(model, "a", r=16, alpha=32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            layer.weight_b("a").copy_(torch.randn(layer.weight_b("a").shape, generator=g) * 0.05)
    lora.set_adapter(model, None)
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True, adapter="a")
    outs = {}
    for setting in ("1", "0"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(huge_pages.ENV, setting)
            gen = Generator(model, progress=False)
            gen.add_request(list(range(5, 20)), params)
            outs[setting] = [e.token_id for e in _drain(gen)]
            snap = gen.runner.fused._snapshot
            stacks = [t for t in snap.lora if t.numel() > 0]
            in_arena = [huge_pages._arena_of(t.data_ptr()) for t in stacks]
            assert stacks and all(in_arena) if setting == "1" else not any(in_arena)
    assert outs["1"] == outs["0"] and len(outs["1"]) == 8


def _drain(gen):
    events = []
    while gen.has_unfinished():
        events += [e for e in gen.step() if e.token_id is not None]
    return events
