"""Adding, activating, disabling and deleting adapters on float and quantized bases."""

from __future__ import annotations

import pytest
import torch

import llmspeed
from llmspeed import lora
from llmspeed.lora import LoraLinear

from .helpers import FakeInt8Linear, fake_quantize

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model.hf(input_ids=ids).logits


def test_zero_init_gives_identical_logits(tiny_model):
    before = logits(tiny_model)
    lora.add_adapter(tiny_model, "a", r=4, alpha=8)
    assert torch.equal(logits(tiny_model), before)


def test_zero_init_identical_on_quantized_base(llama):
    fake_quantize(llama)
    before = logits(llama)
    lora.add_adapter(llama, "a", r=4)
    assert torch.equal(logits(llama), before)
    layer = llama.hf.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLinear) and isinstance(layer.base_layer, FakeInt8Linear)
    assert llmspeed.protocol.is_quantized(layer)


def test_random_init_changes_output_and_disabled_restores(llama):
    before = logits(llama)
    lora.add_adapter(llama, "a", r=4, init="random")
    assert not torch.allclose(logits(llama), before)
    with lora.disabled(llama):
        assert torch.equal(logits(llama), before)
    assert not torch.allclose(logits(llama), before)
    lora.set_adapter(llama, None)
    assert torch.equal(logits(llama), before)


def test_forward_matches_formula(llama):
    lora.add_adapter(llama, "a", r=3, alpha=6, targets=["q_proj"], init="random", use_rslora=True)
    layer = llama.hf.model.layers[1].self_attn.q_proj
    x = torch.randn(5, 64)
    a, b = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    want = x @ layer.base_layer.weight.T + (6 / 3**0.5) * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), want)


def test_targets_all_linear_suffix_regex(llama):
    lora.add_adapter(llama, "all", r=2)
    positions = [n for n, _ in lora.lora_layers(llama)]
    assert "lm_head" not in positions and len(positions) == 14
    assert lora.resolve_targets(llama, ["q_proj", "v_proj"]) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    assert lora.resolve_targets(llama, r".*\.0\..*_proj") == [n for n in positions if ".0." in n]
    assert lora.resolve_targets(llama, "down_proj") == [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]



def test_all_linear_keeps_projections_as_wide_as_the_vocabulary():
    """Regression: "all-linear" left out every linear whose out_features equalled the vocabulary size, not only
    the output head, so with intermediate_size == vocab_size gate_proj and up_proj got no adapter (PEFT's
    "all-linear" gives them one): the adapter silently covered fewer layers than asked."""
    model = llmspeed.models.tiny("llama", seed=0, vocab_size=256, intermediate_size=256)
    positions = lora.resolve_targets(model, "all-linear")
    assert "lm_head" not in positions and len(positions) == 14
    assert "model.layers.1.mlp.up_proj" in positions and "model.layers.0.mlp.gate_proj" in positions

def test_several_adapters_and_switching(llama):
    lora.add_adapter(llama, "a", r=2, init="random")
    out_a = logits(llama)
    lora.add_adapter(llama, "b", r=4, init="random", targets=["v_proj"])
    assert lora.active_adapter(llama) == "b" and lora.adapter_names(llama) == ["a", "b"]
    out_b = logits(llama)
    assert not torch.allclose(out_a, out_b)
    lora.set_adapter(llama, "a")
    assert torch.equal(logits(llama), out_a)


def test_only_adapters_are_trainable(llama):
    lora.add_adapter(llama, "a", r=2)
    trainable = {n for n, p in llama.hf.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.a." in n or ".lora_B.a." in n for n in trainable)
    assert len(lora.trainable_parameters(llama, "a")) == 28
    footprint = llmspeed.memory_footprint(llama)
    assert footprint["adapters"] == sum(p.numel() * 4 for p in lora.trainable_parameters(llama, "a"))


def test_fp32_adapter_on_bf16_base():
    model = llmspeed.models.tiny("llama", seed=0)
    llmspeed.cast(model, "bf16")
    lora.add_adapter(model, "a", r=4, init="random")
    layer = model.hf.model.layers[0].mlp.up_proj
    assert layer.lora_A["a"].weight.dtype == torch.float32
    out = model.hf(input_ids=IDS).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().sum().backward()
    assert layer.lora_B["a"].weight.grad is not None and layer.lora_B["a"].weight.grad.dtype == torch.float32


def test_gradients_reach_adapters_and_input_not_packed_weights(llama):
    fake_quantize(llama)
    lora.add_adapter(llama, "a", r=4, init="random")
    layer = llama.hf.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.lora_A["a"].weight.grad is not None
    assert layer.base_layer.qweight.grad is None and not layer.base_layer.qweight.requires_grad


def test_delete_adapter_restores_base_modules(llama):
    originals = dict(llama.linear_layers())
    lora.add_adapter(llama, "a", r=2)
    lora.delete_adapter(llama, "a")
    assert lora.adapter_names(llama) == []
    assert all(m is originals[n] for n, m in llama.linear_layers())


@pytest.mark.parametrize("method", ["int8", "int4", "nf4"])
def test_real_quantized_base_zero_init_and_gradients(llama, method):
    from .helpers import quantize_real

    quantize_real(llama, method)
    before = logits(llama)
    lora.add_adapter(llama, "a", r=4)
    assert torch.equal(logits(llama), before)
    layer = llama.hf.model.layers[0].self_attn.q_proj
    assert layer.base_layer.quant_format == method
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.lora_B["a"].weight.grad is not None
    assert all(not t.requires_grad for t in (*layer.base_layer.parameters(), *layer.base_layer.buffers()))


def test_lora_disabled_blocks_left_out_of_order_restore_the_flags_when_the_last_leaves(llama):
    """Regression: each ``lora.disabled`` block put back the flags it saw on entering, so two blocks (two threads)
    left in the order A, B ran B's rest with the adapters enabled, and left them disabled for good."""
    lora.add_adapter(llama, "a", r=4, alpha=8, init="random")
    flags = lambda: {layer.disabled for _, layer in lora.lora_layers(llama)}  # noqa: E731
    first, second = lora.disabled(llama), lora.disabled(llama)
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert flags() == {True}  # the second block is still open
    second.__exit__(None, None, None)
    assert flags() == {False}
    with lora.disabled(llama), lora.disabled(llama):  # nested in one thread, as before
        assert flags() == {True}
    assert flags() == {False}


def test_deleting_the_active_adapter_leaves_no_layer_pointing_at_it(llama):
    lora.add_adapter(llama, "a", r=2, init="random")
    before = logits(llama)
    lora.add_adapter(llama, "b", r=2, init="random")
    lora.delete_adapter(llama, "b")
    assert lora.active_adapter(llama) is None
    assert all(layer.active is None for _, layer in lora.lora_layers(llama))
    lora.set_adapter(llama, "a")
    assert torch.equal(logits(llama), before)


def test_deleting_a_merged_adapter_is_refused_and_changes_nothing(llama):
    lora.add_adapter(llama, "a", r=2, init="random")
    lora.merge(llama, "a")
    with pytest.raises(ValueError, match="adapter 'a' is merged into 14 layers.*unmerge it first"):
        lora.delete_adapter(llama, "a")
    assert lora.adapter_names(llama) == ["a"]
    assert all("a" in layer.lora_A and layer.merged == ("a",) for _, layer in lora.lora_layers(llama))


def test_trainable_parameters_of_an_adapter_on_some_layers(llama):
    lora.add_adapter(llama, "a", r=2)
    lora.add_adapter(llama, "b", r=2, targets=["v_proj"])
    params = lora.trainable_parameters(llama, "b")
    layers = [llama.hf.model.layers[i].self_attn.v_proj for i in range(2)]
    assert [id(p) for p in params] == [id(p) for layer in layers for p in (layer.weight_a("b"), layer.weight_b("b"))]


def test_adapter_identity_is_none_inside_disabled(llama):
    from llmspeed.lora.inject import adapter_identity, registry

    lora.add_adapter(llama, "a", r=2)
    uid = registry(llama)["a"].uid
    assert adapter_identity(llama, None) == ("a", uid)
    with lora.disabled(llama):
        assert adapter_identity(llama, None) is None
        assert adapter_identity(llama, "a") == ("a", uid)  # a request naming it still runs it


def test_add_adapter_failing_half_way_takes_everything_off_again(llama, monkeypatch):
    lora.add_adapter(llama, "a", r=2, targets=["q_proj"])
    originals = dict(llama.linear_layers())
    real_add, calls = LoraLinear.add, []

    def add(self, name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 5:
            raise RuntimeError("out of memory")
        return real_add(self, name, *args, **kwargs)

    monkeypatch.setattr(LoraLinear, "add", add)
    with pytest.raises(RuntimeError, match="out of memory"):
        lora.add_adapter(llama, "b", r=2)
    assert dict(llama.linear_layers()) == originals  # wrappers made for "b" are gone, "a"'s stay
    assert all(list(layer.lora_A) == ["a"] for _, layer in lora.lora_layers(llama))
    assert lora.adapter_names(llama) == ["a"] and lora.active_adapter(llama) == "a"


def test_add_adapter_refuses_a_config_of_another_type(llama):
    with pytest.raises(TypeError, match="config must be a LoraConfig; got dict"):
        lora.add_adapter(llama, "a", config={"r": 2})
    assert lora.adapter_names(llama) == [] and not list(lora.lora_layers(llama))


def test_an_adapter_added_inside_disabled_stays_off_until_the_block_ends(llama):
    """Regression: add_adapter inside ``lora.disabled(model)`` wrapped new positions with adapters enabled, so the
    block (documented to run the base alone) ran the new adapter on those layers."""
    base_only = logits(llama)
    lora.add_adapter(llama, "a", r=2, init="random", targets=["q_proj"])
    lora.set_adapter(llama, "a")
    with lora.disabled(llama):
        lora.add_adapter(llama, "b", r=2, init="random", targets=["v_proj", "q_proj"])
        assert torch.equal(logits(llama), base_only)
    assert all(not layer.disabled for _, layer in lora.lora_layers(llama))
    assert not torch.allclose(logits(llama), base_only)


def test_every_verb_takes_the_transformers_model_add_adapter_took(tmp_path):
    """add_adapter wraps a transformers model in place; the verbs after it took only the wrapper (AttributeError:
    'LlamaForCausalLM' object has no attribute 'module')."""
    hf = llmspeed.models.tiny("llama", seed=0).hf
    lora.add_adapter(hf, "a", r=2, init="random", targets=["q_proj", "v_proj"])
    assert lora.adapter_names(hf) == ["a"] and lora.active_adapter(hf) == "a"
    assert len(list(lora.lora_layers(hf))) == 4 and len(lora.trainable_parameters(hf, "a")) == 8
    assert lora.resolve_targets(hf, ["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    lora.save_adapter(hf, tmp_path, "a")
    other = llmspeed.models.tiny("llama", seed=0).hf
    lora.load_adapter(other, tmp_path, "a")
    with torch.no_grad():
        assert torch.equal(other(input_ids=IDS).logits, hf(input_ids=IDS).logits)
    with lora.disabled(hf), lora.per_row_adapters(hf, ["a", None]):
        pass
    lora.set_adapter(hf, None)
    lora.merge(hf, "a")
    lora.unmerge(hf, "a")
    lora.delete_adapter(hf, "a")
    lora.merge_and_unload(other, "a")
    assert lora.adapter_names(hf) == [] == lora.adapter_names(other)
