"""LoraLinear's own bookkeeping: the count of state changes the fused decode step reads."""

import pytest
import torch


def test_every_change_of_a_wrappers_state_is_counted():
    """STATE_CHANGES (read by the fused decode step) moves on each change of names, scales or flags."""
    from llmspeed.lora.layer import STATE_CHANGES, LoraLinear

    layer = LoraLinear(torch.nn.Linear(8, 8))
    changes = [
        lambda: layer.add("a", r=2, scale=1.0),
        lambda: layer.scaling.__setitem__("a", 3.0),
        lambda: layer.scaling.update(a=2.0),
        lambda: setattr(layer, "active", "a"),
        lambda: setattr(layer, "disabled", True),
        lambda: setattr(layer, "merged", ("a",)),
        lambda: layer.train(False),
        lambda: layer.scaling.pop("a"),
    ]
    for change in changes:
        before = STATE_CHANGES[0]
        change()
        assert STATE_CHANGES[0] > before
    assert isinstance(layer.merged, tuple) and layer.scaling == {}
    layer.scaling = {"b": 1.0}  # a plain dict assigned: still counted from then on
    before = STATE_CHANGES[0]
    layer.scaling["b"] = 2.0
    assert STATE_CHANGES[0] > before


def test_layer_level_guards_and_new_adapters_follow_the_layers_mode():
    """LoraLinear is public: adding a name twice, removing a merged adapter and wrapping a wrapper are refused; an
    adapter added to a layer in eval mode gets its dropout in eval mode (deterministic), in train mode active."""
    from llmspeed.lora.layer import LoraLinear

    layer = LoraLinear(torch.nn.Linear(8, 8))
    with pytest.raises(TypeError, match="already a LoraLinear"):
        LoraLinear(layer)
    layer.add("a", r=2, scale=1.0, dropout=0.5)
    assert isinstance(layer.lora_dropout["a"], torch.nn.Dropout) and layer.lora_dropout["a"].training
    with pytest.raises(ValueError, match="adapter 'a' already exists on this layer"):
        layer.add("a", r=4, scale=1.0)
    assert layer.rank("a") == 2
    layer.merged = ("a",)
    with pytest.raises(ValueError, match="adapter 'a' is merged"):
        layer.remove("a")
    assert "a" in layer.lora_A
    layer.merged = ()
    layer.eval()
    layer.add("b", r=2, scale=1.0, dropout=0.5, init="random")
    assert not layer.lora_dropout["b"].training
    layer.active = "b"
    x = torch.randn(16, 8)
    assert torch.equal(layer(x), layer(x))
