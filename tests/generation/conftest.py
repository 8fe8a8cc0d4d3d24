"""Generation tests run tiny models whose ops are too small to gain from a second thread; helpers the request
lifecycle tests share (``test_lifecycle*.py``, ``test_live_adapters.py``)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every generation test runs with one intra-op thread (see ``one_thread``)."""


def drain(gen):
    """Step ``gen`` until nothing is left; return every event it produced."""
    events = []
    while gen.has_unfinished():
        events += gen.step()
    return events


def random_adapter(model, name, seed):
    """Add adapter ``name`` with non-zero ``B`` drawn from ``seed`` (it changes the tokens), left inactive."""
    import torch

    from llmspeed import lora

    lora.add_adapter(model, name, r=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            if name in layer.lora_A:
                layer.weight_b(name).copy_(torch.randn(layer.weight_b(name).shape, generator=g) * 0.5)
    lora.set_adapter(model, None)
