"""Features meeting: LoRA adapters on quantized, cast, copied or reloaded models, checked against a reference
built another way (greedy decoding through the plain forward, the same steps on a fresh model)."""

from __future__ import annotations

import torch

import llmspeed
from llmspeed import SamplingParams, lora
from llmspeed.models import tiny

PROMPT = [44, 39, 133, 160, 163, 179, 27, 103, 97, 83, 101, 66]


def _randomize(model, name: str, seed: int = 0) -> None:
    """Give adapter ``name`` a nonzero ``B`` so that it changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            if name in layer.lora_B:
                b = layer.weight_b(name)
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)


def _greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens from the full forward (no KV cache, no generator)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model.module(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def _generate(model, adapter, **kwargs) -> list:
    gen = llmspeed.Generator(model, progress=False, **kwargs)
    params = [SamplingParams(max_new_tokens=6, ignore_eos=True, adapter=a) for a in adapter]
    return gen.generate_batched([PROMPT] * len(adapter), params)


def test_adapter_on_the_output_head_generates_what_the_forward_gives():
    model = tiny("llama", seed=0)
    lora.add_adapter(model, "a", r=4, targets=["lm_head", "q_proj"])
    _randomize(model, "a")
    want = _greedy(model, PROMPT, 6)
    with lora.disabled(model):
        base = _greedy(model, PROMPT, 6)
    assert want != base  # the head adapter matters
    for fused in (None, False):
        outs = _generate(model, ["a", None], fused_decode=fused)
        assert [o.error for o in outs] == [None, None]
        assert outs[0].token_ids == want
        assert outs[1].token_ids == want  # None runs the active adapter
    lora.set_adapter(model, None)
    outs = _generate(model, ["a", None])
    assert [o.token_ids for o in outs] == [want, base]


def test_merge_without_requantize_on_a_bf16_quantized_base_keeps_the_model_dtype():
    model = tiny("llama", seed=0, dtype=torch.bfloat16)
    llmspeed.quantize(model, "int4")
    lora.add_adapter(model, "a", r=4)
    _randomize(model, "a")
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        want = model.module(ids).logits.float()
        lora.merge(model, "a", requantize=False)
        layer = model.module.get_submodule("model.layers.0.self_attn.q_proj").base_layer
        assert isinstance(layer, torch.nn.Linear) and layer.weight.dtype == torch.bfloat16
        got = model.module(ids).logits.float()
    assert (got - want).abs().max().item() < 0.05  # bf16 rounding of the merged weight only
    out = _generate(model, [None], fused_decode=False)[0]  # the forward that raised before: it generates now
    assert out.error is None and out.finish_reason == "length" and len(out.token_ids) == 6
    # (not compared token for token with the full forward: in bf16 the paged attention's rounding differs from the
    # full forward's, and a random tiny model's near ties then part them, as in a fresh-clone run)
    lora.unmerge(model, "a")
    with torch.no_grad():
        assert torch.equal(model.module(ids).logits.float(), want)
