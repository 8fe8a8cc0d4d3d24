"""Request lifecycle of the Generator as the model changes under it: ``Model.generate_batched``'s kept generator
(reused, rebuilt, following a tokenizer set later, dropping its prefix cache after weights change in place), LoRA
adapters deleted or replaced while requests run or turned off by ``lora.disabled``, and the model's own EOS ids.

Moved from ``test_lifecycle.py`` (issue #15), which keeps runs, faults and threads.
"""

from __future__ import annotations

import pytest
import torch

import llmspeed
from llmspeed import Generator, SamplingParams

from .conftest import drain as _drain
from .conftest import random_adapter as _random_adapter

SP = SamplingParams(max_new_tokens=6, ignore_eos=True)


def test_model_generate_batched_reuses_one_generator_until_something_changes(llama):
    a = llama.generate_batched([[1, 2, 3]], SP, progress=False)
    first = llama._cached_generator[1]
    b = llama.generate_batched([[1, 2, 3]], SP, progress=False)
    assert llama._cached_generator[1] is first and a[0].token_ids == b[0].token_ids
    list(llama.stream([[4, 5]], SP, progress=False))
    assert llama._cached_generator[1] is first
    llama.generate_batched([[1, 2, 3]], SP, progress=False, max_seqs=8)  # other arguments: another generator
    second = llama._cached_generator[1]
    assert second is not first
    llmspeed.quantize(llama, "int8")  # other modules: rebuilt
    c = llama.generate_batched([[1, 2, 3]], SP, progress=False, max_seqs=8)
    assert llama._cached_generator[1] is not second and len(c[0].token_ids) == 6


def test_model_generate_batched_follows_a_tokenizer_set_after_its_generator_was_built(llama):
    """Regression: the kept generator read ``model.tokenizer`` once, when built; after ``llmspeed.wrap(model,
    tokenizer)`` (its documented way to give a model a tokenizer) string prompts still failed with "this model has
    no tokenizer" and token-id prompts got no text, until some argument happened to change."""
    from .test_engine import CharTokenizer

    assert llama.generate_batched([[65, 66, 67]], SP, progress=False)[0].text == ""
    llmspeed.wrap(llama, CharTokenizer())
    out = llama.generate_batched(["ABC"], SP, progress=False)[0]
    assert out.finish_reason == "length" and out.prompt_token_ids == [65, 66, 67]
    assert out.text == CharTokenizer().decode(out.token_ids, skip_special_tokens=True) != ""


def test_deleting_an_adapter_fails_only_the_requests_that_use_it(llama):
    from llmspeed import lora

    lora.add_adapter(llama, "a", r=4)
    lora.add_adapter(llama, "b", r=4)
    lora.set_adapter(llama, None)
    gen = Generator(llama, progress=False)
    sp = SamplingParams(max_new_tokens=8, ignore_eos=True)
    rids = [gen.add_request([1, 2, 3], SamplingParams(max_new_tokens=8, ignore_eos=True, adapter=n)) for n in ("a", "b", None)]
    gen.step()
    lora.delete_adapter(llama, "a")
    ends = {e.request_id: e.output for e in _drain(gen) if e.finished}
    assert ends[rids[0]].finish_reason == "error" and "'a' was deleted" in ends[rids[0]].error
    assert ends[rids[1]].finish_reason == ends[rids[2]].finish_reason == "length"
    assert ends[rids[2]].token_ids == Generator(llama, progress=False).generate_batched([[1, 2, 3]], sp)[0].token_ids


def test_generation_config_eos_ids_all_stop(llama):
    ref = llama.generate_batched([[5, 6, 7]], SamplingParams(max_new_tokens=6, ignore_eos=True), progress=False)[0]
    llama.hf.generation_config.eos_token_id = [255, ref.token_ids[3]]
    out = Generator(llama, progress=False).generate_batched([[5, 6, 7]], SamplingParams(max_new_tokens=6))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == ref.token_ids[3]


@pytest.mark.parametrize("fused", [None, False])
def test_an_adapter_replaced_under_its_name_fails_the_requests_bound_to_it(llama, fused):
    """Regression: deleting adapter "a" and adding another "a" while a request ran made the request go on with the
    new adapter over keys/values of the old one; the request is bound to the adapter, not to its name."""
    from llmspeed import lora

    _random_adapter(llama, "a", 1)
    gen = Generator(llama, progress=False, fused_decode=fused)
    rid = gen.add_request([1, 2, 3], SamplingParams(max_new_tokens=8, ignore_eos=True, adapter="a"))
    gen.step()
    gen.step()
    lora.delete_adapter(llama, "a")
    _random_adapter(llama, "a", 2)
    ends = {e.request_id: e.output for e in _drain(gen) if e.finished}
    assert ends[rid].finish_reason == "error"
    assert "'a' was deleted and another adapter added under its name" in ends[rid].error
    again = gen.generate_batched([[1, 2, 3]], SamplingParams(max_new_tokens=8, ignore_eos=True, adapter="a"))[0]
    assert again.finish_reason == "length"  # a request added after the change runs the new "a"


def test_requests_without_an_adapter_run_the_base_inside_disabled_whatever_their_batch(llama):
    """Regression: inside lora.disabled(model), a request without an adapter ran the base model alone but the
    model's active adapter when another request of its batch named an adapter (the routed generic path)."""
    from llmspeed import lora

    _random_adapter(llama, "b", 2)
    _random_adapter(llama, "a", 1)
    lora.set_adapter(llama, "a")
    sp, sp_b = SamplingParams(max_new_tokens=6, ignore_eos=True), SamplingParams(max_new_tokens=6, ignore_eos=True, adapter="b")
    with lora.disabled(llama):
        alone = Generator(llama, progress=False).generate_batched([[1, 2, 3]], sp)[0].token_ids
        mixed = Generator(llama, progress=False).generate_batched([[1, 2, 3], [4, 5, 6]], [sp, sp_b])
    lora.set_adapter(llama, None)
    base = Generator(llama, progress=False).generate_batched([[1, 2, 3]], sp)[0].token_ids
    with_b = Generator(llama, progress=False).generate_batched([[4, 5, 6]], sp_b)[0].token_ids
    assert alone == mixed[0].token_ids == base  # the base alone, next to a request that names an adapter too
    assert mixed[1].token_ids == with_b  # a request that names an adapter still gets it


def test_model_generate_batched_forgets_its_prefix_cache_after_weights_change_in_place(llama):
    """Regression: the generator ``Model.generate_batched`` keeps is reused while the modules and tensor storages stay
    the same, so after weights changed in place (a training step) its prefix cache still served keys and values of
    the old weights: a repeated prompt continued as the old model would, unlike a fresh generator."""
    prompt, kwargs = [list(range(1, 21))], dict(progress=False, prefix_caching=True, block_size=4)
    llama.generate_batched(prompt, SP, **kwargs)
    kept = llama._cached_generator[1]
    with torch.no_grad():
        for name, weight in llama.hf.named_parameters():
            if "mlp" in name or "self_attn" in name:
                weight.mul_(1.7)
    again = llama.generate_batched(prompt, SP, **kwargs)[0]
    assert llama._cached_generator[1] is kept  # still reused: only its prefix cache is dropped
    assert again.metrics.cached_tokens == 0
    assert again.token_ids == Generator(llama, progress=False).generate_batched(prompt, SP)[0].token_ids
    assert llama.generate_batched(prompt, SP, **kwargs)[0].metrics.cached_tokens == 16  # unchanged: cached again
