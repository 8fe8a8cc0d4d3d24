"""LoraLinear's own bookkeeping: the count of state changes the fused decode step reads."""

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
