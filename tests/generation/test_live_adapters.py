"""LoRA adapters changed while a Generator has requests in flight: requests bound to an adapter that cannot run end
alone with a clear error, the others keep the tokens a fresh Generator gives on the model as it is now."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from llmspeed import Generator, SamplingParams, lora
from llmspeed.generation.request_adapters import adapter_error, adapter_key, follow
from llmspeed.lora.layer import STATE_CHANGES

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
def test_merging_an_adapter_fails_a_base_alone_request_alone(llama, fused):
    """Regression: ``adapter=False`` (the base alone) was admitted, and kept running, while an adapter was merged into
    the base: its step ran a mixed-adapter batch, which refuses merged adapters, and failed every request of the
    batch, the one naming no adapter included. Now it ends alone, saying why (at admission too)."""
    _random_adapter(llama, "a", 1)
    gen = Generator(llama, progress=False, fused_decode=fused)
    rids = [gen.add_request([1, 2, 3], SamplingParams(max_new_tokens=8, ignore_eos=True, adapter=a)) for a in (False, None)]
    lora.merge(llama, "a")
    ends = {e.request_id: e.output for e in _drain(gen) if e.finished}
    assert ends[rids[0]].finish_reason == "error"
    assert "adapter=False (the base model alone) cannot run while adapters ['a'] are merged into the base" in ends[rids[0]].error
    assert ends[rids[1]].finish_reason == "length"
    assert ends[rids[1]].token_ids == _fresh(llama, [1, 2, 3], fused=fused).token_ids  # the merged model
    refused = gen.generate_batched([[1, 2, 3]], SamplingParams(max_new_tokens=8, adapter=False))[0]  # at admission
    assert refused.finish_reason == "error" and refused.error == (
        "adapter=False (the base model alone) cannot run while adapters ['a'] are merged into the base (lora.merge): "
        "unmerge them (lora.unmerge), or name no adapter (None) to run the model as it is")
    lora.unmerge(llama, "a")
    assert _fresh(llama, [1, 2, 3], False, fused).finish_reason == "length"


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


def _req(adapter, key, finished=False):  # what follow reads of a live request
    return SimpleNamespace(params=SimpleNamespace(adapter=adapter), is_finished=finished, adapter_key=key)


def test_follow_rekeys_base_requests_and_ends_only_those_whose_adapter_cannot_run(llama):
    """:func:`request_adapters.follow` unit by unit: what it updates, skips and ends, and the count it returns."""
    base = _req(None, "stale")
    assert follow(llama, None, [base]) == (None, []) and base.adapter_key == "stale"  # no adapters: nothing read
    assert adapter_key(llama, None) is None
    for seed, name in enumerate("abc"):
        _random_adapter(llama, name, seed)
    ka, kb, kc = (adapter_key(llama, n) for n in "abc")
    assert [k[0] for k in (ka, kb, kc)] == ["a", "b", "c"] and adapter_key(llama, None) is None  # none active
    done = _req(None, "stale", finished=True)
    on = {n: _req(n, k) for n, k in zip("abc", (ka, kb, kc))}
    done_b = _req("b", kb, finished=True)
    live = [base, done, *on.values(), done_b]
    seen, ended = follow(llama, None, live)
    assert (seen, ended) == (STATE_CHANGES[0], []) and base.adapter_key is None and done.adapter_key == "stale"
    lora.set_adapter(llama, "a")
    base.adapter_key = "stale"
    assert follow(llama, STATE_CHANGES[0], live) == (STATE_CHANGES[0], []) and base.adapter_key == "stale"  # no change
    seen, ended = follow(llama, seen, live)
    assert (seen, ended) == (STATE_CHANGES[0], []) and base.adapter_key == ka == adapter_key(llama, None)
    with lora.disabled(llama):
        assert follow(llama, seen, live)[1] == [] and base.adapter_key is None
    with torch.no_grad():
        next(lora.lora_layers(llama))[1].weight_b("a").mul_(2.0)  # trained in place: same adapter, other weights
    assert adapter_key(llama, "a")[:2] == ka[:2] and adapter_key(llama, "a") != ka
    lora.delete_adapter(llama, "b")
    lora.delete_adapter(llama, "c")
    _random_adapter(llama, "c", 5)
    assert adapter_key(llama, "c")[1] != kc[1]
    seen, ended = follow(llama, seen, live)
    assert seen == STATE_CHANGES[0] and [(r is on["b"], r is on["c"]) for r, _ in ended] == [(True, False), (False, True)]
    assert ended[0][1] == "adapter 'b' was deleted while this request was running"
    assert ended[1][1] == "adapter 'c' was deleted and another adapter added under its name while this request was running"
    assert adapter_error(llama, "b") == "adapter must be one of the model's adapters ['a', 'c']; got 'b'"
    assert adapter_error(llama, "a") is None
    lora.merge(llama, "c")
    _, ended = follow(llama, seen, [base, on["a"]])
    assert [r for r, _ in ended] == [on["a"]] and ended[0][1] == (
        "adapter 'a' cannot run while adapters ['c'] are merged into the base (merged while this request was running) "
        "(lora.merge): requests that name an adapter need them unmerged (lora.unmerge)")
    assert adapter_error(llama, "a") == ended[0][1].replace(" (merged while this request was running)", "")
    lora.unmerge(llama, "c")
    seen = STATE_CHANGES[0]
    for name in ("a", "c"):
        lora.delete_adapter(llama, name)
    _, ended = follow(llama, seen, [base, on["a"]])  # the last adapter gone: still looked at, and "a" ends
    assert [r for r, _ in ended] == [on["a"]] and "adapter 'a' was deleted" in ended[0][1] and base.adapter_key is None
