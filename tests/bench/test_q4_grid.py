"""The int4 grid study's reorderings: the same function, other columns in each block, in llmspeed and in the GGUF."""

from __future__ import annotations

import pytest
import torch

import llmspeed
from llmspeed.bench import q4_grid


def _logits(model, ids):
    with torch.no_grad():
        return model.module(input_ids=ids).logits  # [1, T, vocab]


@pytest.mark.parametrize("seed", [1, 7])
def test_a_reordered_model_computes_the_same_function_with_its_columns_moved(seed):
    model = llmspeed.models.tiny("llama", seed=0)  # GQA: 4 heads read 2 value heads
    ids = torch.randint(0, model.module.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    before = _logits(model, ids)
    up = model.module.model.layers[0].mlp.up_proj.weight.detach().clone()
    q4_grid.permute_model(model, seed)
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-5, atol=1e-5)
    moved = model.module.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(moved, up)  # the reordering moved the columns (and rows) ...
    assert torch.equal(moved.flatten().sort().values, up.flatten().sort().values)  # ... and kept every value


def test_the_permutations_are_permutations_and_each_query_head_follows_its_value_head():
    config = llmspeed.models.tiny("llama", seed=0).module.config
    res, layers = q4_grid.permutations(config, seed=3)
    dim = config.hidden_size // config.num_attention_heads
    rep = config.num_attention_heads // config.num_key_value_heads
    assert torch.equal(res.sort().values, torch.arange(config.hidden_size))
    for perms in layers:
        assert torch.equal(perms["mlp"].sort().values, torch.arange(config.intermediate_size))
        kv, q = perms["kv"].view(-1, dim), perms["q"].view(-1, dim)  # [heads, dim]
        for j in range(config.num_attention_heads):
            assert torch.equal(q[j] - j * dim, kv[j // rep] - (j // rep) * dim)  # stays within its head
        assert torch.equal(perms["kv"].sort().values, torch.arange(config.num_key_value_heads * dim))
    again, _ = q4_grid.permutations(config, seed=3)
    other, _ = q4_grid.permutations(config, seed=4)
    assert torch.equal(res, again) and not torch.equal(res, other)


def test_bad_arguments_name_what_was_given():
    with pytest.raises(ValueError, match="device='cuda'"):
        q4_grid.run(device="cuda")
    with pytest.raises(ValueError, match=r"seeds must be .*got \[-1\]"):
        q4_grid.run(seeds=[-1])
    with pytest.raises(ValueError, match=r"seeds must be .*got \(\)"):
        q4_grid.run(seeds=())


@pytest.mark.slow
def test_the_reordered_gguf_holds_what_the_reordered_model_holds(tmp_path):
    """Golden: transformers reads the written GGUF back to exactly the weights permute_model gives."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    from llmspeed.models.embedded import gguf_path

    model = llmspeed.models.smollm2()
    q4_grid.permute_model(model, seed=5)
    out = q4_grid.write_permuted_gguf(model.module.config, 5, tmp_path / "reordered.gguf")
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    ours = model.module.state_dict()
    theirs = back.state_dict()
    assert set(theirs) <= set(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs), [k for k in theirs if not torch.equal(theirs[k], ours[k])][:5]
    assert gguf_path().stat().st_size < out.stat().st_size  # F32 now, Q4_1 before


def test_a_model_with_weights_it_has_no_rule_for_is_refused_untouched():
    model = llmspeed.models.tiny("qwen2", seed=0)  # q/k/v biases: no reordering rule
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    with pytest.raises(ValueError, match=r"without biases; these have no rule: \['model.layers.0.self_attn.k_proj.bias'"):
        q4_grid.permute_model(model, seed=1)
    assert all(torch.equal(v, model.module.state_dict()[k]) for k, v in before.items())


@pytest.mark.slow
def test_run_scores_each_reordering_and_adds_their_median_without_llama_cpp(monkeypatch):
    monkeypatch.setattr(q4_grid, "llama_cpp_missing", lambda: "llama-cpp-python is not installed (test)")
    rows = q4_grid.run(quick=True, progress=False, seeds=[1, 2])
    assert [r["weights"] for r in rows] == ["reordered, seed 1", "reordered, seed 2", "median of 2 reorderings"]
    first, second, median = rows
    assert first["llmspeed fp32 ppl"] == pytest.approx(second["llmspeed fp32 ppl"], rel=1e-4)  # the same function
    assert first["llmspeed int4 g64 ppl"] != second["llmspeed int4 g64 ppl"]  # other columns in each group
    assert all(r["llama.cpp"].startswith("skipped: llama-cpp-python") for r in (first, second))
    assert median["llmspeed int4 g64 ppl"] == pytest.approx((first["llmspeed int4 g64 ppl"] + second["llmspeed int4 g64 ppl"]) / 2)
