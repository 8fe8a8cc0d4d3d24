"""The tied input embedding that reads the quantized output head's rows (llmspeed.quant.embedding)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

import llmspeed
from llmspeed.generation import Generator, SamplingParams
from llmspeed.quant import QuantConfig, QuantizedEmbedding

IDS = torch.tensor([[1, 5, 9, 33, 2, 127]])


def _tied(seed: int = 0, vocab: int = 128) -> llmspeed.Model:
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(seed)
    return llmspeed.wrap(transformers.AutoModelForCausalLM.from_config(config).eval())


def _reference(model: llmspeed.Model, fmt: str, **options) -> llmspeed.Model:
    """The same quantization with the float embedding kept and overwritten by the head's dequantized rows."""
    ref = copy.deepcopy(model)
    llmspeed.quantize(ref, fmt, lm_head=fmt, share_embedding=False, **options)
    with torch.no_grad():
        ref.hf.model.embed_tokens.weight.copy_(ref.hf.lm_head.dequantize())
    return ref


@pytest.mark.parametrize("fmt, options", [("int8", {}), ("int4", {"group_size": 32}), ("nf4", {"group_size": 32})])
def test_lookup_is_the_heads_dequantized_rows_and_logits_match(fmt, options):
    model = _tied()
    ref = _reference(model, fmt, **options)
    before = llmspeed.memory_footprint(model)
    llmspeed.quantize(model, fmt, lm_head=fmt, **options)
    emb = model.hf.get_input_embeddings()
    assert isinstance(emb, QuantizedEmbedding) and emb.head is model.hf.lm_head
    assert torch.equal(emb(IDS)[0], model.hf.lm_head.dequantize()[IDS[0]])
    assert emb(IDS).shape == (1, IDS.shape[1], 64)
    grid, scalar = torch.tensor([[3, 4, 5], [6, 7, 8]]), torch.tensor(9)  # any shape of ids, as nn.Embedding
    assert emb(grid).shape == (2, 3, 64) and torch.equal(emb(grid)[1, 2], emb(torch.tensor([8]))[0])
    assert emb(scalar).shape == (64,) and torch.equal(emb(scalar), model.hf.lm_head.dequantize()[9])
    with torch.no_grad():
        assert torch.equal(model.hf(IDS).logits, ref.hf(IDS).logits)
    after = llmspeed.memory_footprint(model)
    assert after["embedding"] == 0 and before["embedding"] == 128 * 64 * 4  # the float matrix is gone
    assert model.spec.dtype == torch.float32 and model.spec.device.type == "cpu"


def test_generator_tokens_match_the_reference_on_every_path():
    model = _tied(vocab=256)
    ref = _reference(model, "int8")
    llmspeed.quantize(model, "int8", lm_head="int8")
    prompts = [[1, 5, 9], [7, 7, 7, 7, 100]]
    params = SamplingParams(max_new_tokens=6)
    got = [o.token_ids for o in Generator(model, progress=False).generate_batched(prompts, params)]
    want = [o.token_ids for o in Generator(ref, progress=False).generate_batched(prompts, params)]
    assert got == want


def test_default_false_and_true():
    untied = llmspeed.models.tiny("llama")
    with pytest.raises(ValueError, match="share_embedding=True needs an output head that is tied"):
        llmspeed.quantize(untied, "int8", lm_head="int8", share_embedding=True)
    assert not any(llmspeed.protocol.is_quantized(m) for _, m in untied.linear_layers())  # nothing changed
    llmspeed.quantize(untied, "int8", lm_head="int8")  # untied: the embedding stays float
    assert isinstance(untied.hf.get_input_embeddings(), torch.nn.Embedding)

    tied = _tied()
    emb = tied.hf.get_input_embeddings()
    with pytest.raises(ValueError, match="lm_head='int8' quantizes it"):
        llmspeed.quantize(tied, "int8", share_embedding=True, lm_head=None)  # a float head cannot be shared
    with pytest.raises(ValueError, match="share_embedding must be None, True or False; got 'yes'"):
        llmspeed.quantize(tied, "int8", share_embedding="yes")
    assert tied.hf.get_input_embeddings() is emb
    llmspeed.quantize(tied, "int8", lm_head=None)  # head left in float: still tied
    assert tied.hf.lm_head.weight is tied.hf.get_input_embeddings().weight
    default = _tied()
    llmspeed.quantize(default, "int4", group_size=32)  # the default: an int8 head, which the embedding reads
    assert isinstance(default.hf.get_input_embeddings(), QuantizedEmbedding)
    assert default.hf.get_input_embeddings().head is default.hf.lm_head

    kept = _tied()
    llmspeed.quantize(kept, "int8", lm_head="int8", share_embedding=False)
    assert isinstance(kept.hf.get_input_embeddings(), torch.nn.Embedding)


def test_failed_quantize_restores_the_embedding(monkeypatch):
    model = _tied()
    emb = model.hf.get_input_embeddings()
    import llmspeed.quant.api as api

    def boom(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(api, "share_tied_embedding", boom)
    with pytest.raises(RuntimeError, match="injected"):
        llmspeed.quantize(model, "int4", group_size=32, lm_head="int4")
    assert model.hf.get_input_embeddings() is emb
    assert isinstance(model.hf.lm_head, torch.nn.Linear) and model.hf.lm_head.weight is emb.weight


@pytest.mark.parametrize("bad", [-1, -128, 128])
def test_an_id_outside_the_vocabulary_is_an_index_error_as_nn_embedding(bad):
    """Regression: a negative id (a -100 label or a -1 pad fed back as input) indexed the head's rows from the end and
    returned the last token's vector silently; nn.Embedding raises IndexError for it."""
    model = _tied()
    llmspeed.quantize(model, "int8", lm_head="int8")
    emb = model.hf.get_input_embeddings()
    with pytest.raises(IndexError, match=f"ids must be token ids in \\[0, 128\\); got {bad}"):
        emb(torch.tensor([[3, bad, 4]]))
    assert torch.equal(emb(torch.tensor([0, 127])), model.hf.lm_head.dequantize()[[0, 127]])  # both ends still read


def test_refuses_heads_it_cannot_read():
    model = _tied()
    llmspeed.quantize(model, "nf4", group_size=32, lm_head="nf4", double_quant=True, share_embedding=False)
    with pytest.raises(ValueError, match="double_quant"):
        QuantizedEmbedding(model.hf.lm_head, torch.float32)
    with pytest.raises(ValueError, match="head must be a quantized linear module; got Linear"):
        QuantizedEmbedding(torch.nn.Linear(4, 4), torch.float32)


def test_a_double_quantized_nf4_head_keeps_the_float_embedding_by_default(tmp_path):
    """Regression: share_embedding=None (the default) tried to share an NF4 head with double_quant, which cannot
    serve as the embedding, so quantize and from_pretrained(quantize=...) failed after quantizing every layer."""
    from llmspeed.models import from_pretrained

    options = dict(group_size=32, lm_head="nf4", double_quant=True)
    model = _tied()
    model.hf.save_pretrained(tmp_path)
    want = _tied()
    llmspeed.quantize(want, "nf4", share_embedding=False, **options)
    llmspeed.quantize(model, "nf4", **options)
    got = from_pretrained(tmp_path, quantize=dict(format="nf4", **options))
    for m in (model, got):
        assert type(m.hf.get_input_embeddings()) is torch.nn.Embedding and m.hf.lm_head.config.double_quant
        with torch.no_grad():
            assert torch.equal(m.hf(IDS).logits, want.hf(IDS).logits)
    untouched = _tied()
    weights = {k: v.clone() for k, v in untouched.hf.state_dict().items()}
    with pytest.raises(ValueError, match="share_embedding=True needs .* NF4 head with double_quant"):
        llmspeed.quantize(untouched, "nf4", share_embedding=True, **options)
    assert all(torch.equal(v, weights[k]) for k, v in untouched.hf.state_dict().items())
    with pytest.raises(ValueError, match="share_embedding'\\]=True needs .* NF4 head with double_quant"):
        from_pretrained(tmp_path, quantize=dict(format="nf4", share_embedding=True, **options))


def test_deepcopy_follows_the_copy_and_a_16_bit_model_gets_16_bit_rows():
    model = _tied()
    llmspeed.quantize(model, "int8", lm_head="int8")
    twin = copy.deepcopy(model)
    assert twin.hf.get_input_embeddings().head is twin.hf.lm_head
    with torch.no_grad():
        twin.hf.lm_head.scales.mul_(2)  # the copy's head only
        assert torch.equal(twin.hf.get_input_embeddings()(IDS), 2 * model.hf.get_input_embeddings()(IDS))
    half = llmspeed.cast(_tied(), "bf16")
    llmspeed.quantize(half, "int8", lm_head="int8")
    rows = half.hf.get_input_embeddings()(IDS)
    assert rows.dtype == torch.bfloat16 and half.spec.dtype == torch.bfloat16
    assert torch.equal(rows[0], half.hf.lm_head.dequantize(torch.bfloat16)[IDS[0]])


def test_save_load_bit_exact_and_tampering_named(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = _tied()
    llmspeed.quantize(model, "int4", group_size=32, lm_head="int4")
    llmspeed.save(model, tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert "model.embed_tokens.weight" not in f.keys()
    assert json.loads(meta["embeddings"]) == {"model.embed_tokens": "lm_head"}
    loaded = llmspeed.load(tmp_path / "q")
    assert isinstance(loaded.hf.get_input_embeddings(), QuantizedEmbedding)
    assert loaded.hf.get_input_embeddings().head is loaded.hf.lm_head
    with torch.no_grad():
        assert torch.equal(loaded.hf(IDS).logits, model.hf(IDS).logits)

    bad = {"model.embed_tokens": "model.layers.0.mlp.nowhere"}
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    save_file(tensors, str(tmp_path / "q" / "model.safetensors"), metadata={**meta, "embeddings": json.dumps(bad)})
    with pytest.raises(ValueError, match="shared embedding 'model.embed_tokens' -> 'model.layers.0.mlp.nowhere'"):
        llmspeed.load(tmp_path / "q")


def test_float_folder_quantized_while_loading_shares(tmp_path):
    from llmspeed.models import from_pretrained

    model = _tied()
    model.hf.save_pretrained(tmp_path)
    got = from_pretrained(tmp_path, quantize=dict(format="int8", lm_head="int8"))
    assert isinstance(got.hf.get_input_embeddings(), QuantizedEmbedding)
    want = copy.deepcopy(model)
    llmspeed.quantize(want, "int8", lm_head="int8")
    with torch.no_grad():
        assert torch.equal(got.hf(IDS).logits, want.hf(IDS).logits)
    kept = from_pretrained(tmp_path, quantize=dict(format="int8", lm_head="int8", share_embedding=False))
    assert isinstance(kept.hf.get_input_embeddings(), torch.nn.Embedding)
    with pytest.raises(ValueError, match="share_embedding'\\]=True needs an output head"):
        from_pretrained(tmp_path, quantize=dict(format="int8", share_embedding=True, lm_head=None))


def test_compressed_tensors_export_writes_the_dense_rows(tmp_path):
    model = _tied()
    llmspeed.quantize(model, "int8", lm_head="int8")
    llmspeed.save(model, tmp_path, format="compressed-tensors")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(hf.get_input_embeddings().weight, model.hf.lm_head.dequantize())
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, model.hf(IDS).logits, atol=1e-4, rtol=1e-4)


def test_an_act_order_head_cannot_serve_as_the_embedding():
    from llmspeed.quant.embedding import unshareable

    assert unshareable(QuantConfig("int4", 32, act_order=True)) == "a head with act_order (permuted columns)"
    assert unshareable(QuantConfig("int4", 32)) is None and unshareable(QuantConfig("nf4", 32)) is None


def test_the_padding_idx_of_the_replaced_embedding_is_kept():
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                      pad_token_id=2)  # fmt: skip
    model = llmspeed.wrap(transformers.AutoModelForCausalLM.from_config(config).eval())
    assert model.hf.get_input_embeddings().padding_idx == 2
    llmspeed.quantize(model, "int8", lm_head="int8")
    emb = model.hf.get_input_embeddings()
    assert isinstance(emb, QuantizedEmbedding) and emb.padding_idx == 2
