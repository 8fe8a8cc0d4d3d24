"""LoRA adapters changed while a Generator has requests in flight: requests bound to an adapter that cannot run end
alone with a clear error, the others keep the tokens a fresh Generator gives on the model as it is now."""

from __future__ import annotations

import pytest
import torch

from llmspeed import Generator, SamplingParams, lora

from .conftest import drain as _drain
from .conftest import random_adapter as _random_adapter


def _fresh(model, prompt, adapter=None, fused=None, n=8):
    sp = SamplingParams(max_new_tokens=n, ignore_eos=True, adapter=adapter)
    return Generator(model, progress=False, fused_decode=fused).generate_batched([prompt], sp)[0]


@pytest.mark.parametrize("fused", [None, False])
def test_merging_an_adapter_fails_only_the_requests_that_name_one(llama, fused):
    """Regression: merging adapter "a" while requests waited made every later step of theirs run a mixed-adapter
    batch, which refuses merged adapters: the step raised and failed every request of the batch, the one naming no
    adapter included. Now the requests that name an adapter end alone, saying why, and the others run on."""
    _random_adapter(llama, "a", 1)
    _random_adapter(llama, "b", 2)
    gen = Generator(llama, progress=False, fused_decode=fused)
    sps = [SamplingParams(max_new_tokens=8, ignore_eos=True, adapter=n) for n in ("a", "b", None)]
    rids = [gen.add_request([1, 2, 3], sp) for sp in sps]
    lora.merge(llama, "a")
    ends = {e.request_id: e.output for e in _drain(gen) if e.finished}
    for rid, name in zip(rids[:2], "ab"):
        assert ends[rid].finish_reason == "error"
        assert f"adapter {name!r} cannot run while adapters ['a'] are merged into the base" in ends[rid].error
    assert ends[rids[2]].finish_reason == "length"
    assert ends[rids[2]].token_ids == _fresh(llama, [1, 2, 3], fused=fused).token_ids  # the merged model
    refused = _fresh(llama, [1, 2, 3], "b", fused)  # admission says it too, before any step
    assert refused.finish_reason == "error" and "cannot run while adapters ['a'] are merged into the base (lora.merge)" in refused.error
    lora.unmerge(llama, "a")
    assert _fresh(llama, [1, 2, 3], "b", fused).finish_reason == "length"


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("named", [True, False])
def test_prefix_blocks_of_an_adapter_trained_in_place_are_not_reused(llama, fused, named):
    """Regression: the prefix cache keyed an adapter's blocks by its name and uid only, so after training it in place
    (an optimizer step, ``copy_`` into ``lora_B``) a request with a cached prefix ran over keys/values of the old
    weights and got other tokens than a fresh Generator; so did requests running it as the active adapter."""
    _random_adapter(llama, "a", 1)
    if not named:
        lora.set_adapter(llama, "a")
    adapter = "a" if named else None
    gen = Generator(llama, progress=False, fused_decode=fused, prefix_caching=True, block_size=4)
    sp = SamplingParams(max_new_tokens=6, ignore_eos=True, adapter=adapter)
    prompt = list(range(1, 30))
    before = gen.generate_batched([prompt], sp)[0].token_ids
    with torch.no_grad():
        for _, layer in lora.lora_layers(llama):
            layer.weight_b("a").mul_(3.0)
    after = gen.generate_batched([prompt], sp)[0].token_ids
    assert after == _fresh(llama, prompt, adapter, fused, n=6).token_ids != before
    assert gen.generate_batched([prompt], sp)[0].metrics.cached_tokens > 0  # unchanged weights: reused again


@pytest.mark.parametrize("fused", [None, False])
def test_weights_changed_after_writes_through_data_gives_a_fresh_generators_tokens(llama, fused):
    """Regression: writes through ``tensor.data`` bump no version, and the docs' remedy,
    ``generator.blocks.reset_prefix_cache()``, left the fused CPU step's LoRA stacks (and a 16-bit model's norms'
    copies before they were compared by value) on the old values. ``Generator.weights_changed()`` drops them."""
    _random_adapter(llama, "a", 1)
    gen = Generator(llama, progress=False, fused_decode=fused, prefix_caching=True, block_size=4)
    sp = SamplingParams(max_new_tokens=6, ignore_eos=True, adapter="a")
    prompt = list(range(1, 30))
    before = gen.generate_batched([prompt], sp)[0].token_ids
    for _, layer in lora.lora_layers(llama):
        layer.weight_b("a").data.mul_(3.0)  # no version bump
    llama.hf.model.norm.weight.data.mul_(1.5)
    gen.weights_changed()
    after = gen.generate_batched([prompt], sp)[0].token_ids
    assert after == _fresh(llama, prompt, "a", fused, n=6).token_ids != before


@pytest.mark.parametrize("fused", [None, False])
def test_a_request_without_an_adapter_runs_the_active_one_beside_a_request_naming_another(llama, fused):
    """A mixed-adapter batch routes each token: the request naming none gets the adapter set with ``set_adapter``, as
    it would alone (the generic path's routing filled it in; a mutation dropping that went untested)."""
    _random_adapter(llama, "a", 1)
    _random_adapter(llama, "b", 2)
    lora.set_adapter(llama, "a")
    sps = [SamplingParams(max_new_tokens=8, ignore_eos=True, adapter=n) for n in (None, "b")]
    outs = Generator(llama, progress=False, fused_decode=fused).generate_batched([[1, 2, 3], [4, 5, 6, 7]], sps)
    assert outs[0].token_ids == _fresh(llama, [1, 2, 3], "a", fused).token_ids
    assert outs[1].token_ids == _fresh(llama, [4, 5, 6, 7], "b", fused).token_ids
    lora.set_adapter(llama, None)
    assert _fresh(llama, [1, 2, 3], None, fused).token_ids != outs[0].token_ids  # the adapter matters here
