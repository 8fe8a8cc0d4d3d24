"""memory_footprint categories and perplexity windows."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import llmspeed
from llmspeed.eval import pydoc_text, window_losses


def test_footprint_counts_every_tensor_once(llama):
    mem = llmspeed.memory_footprint(llama)
    params = sum(p.numel() * p.element_size() for p in llama.hf.parameters())
    buffers = sum(b.numel() * b.element_size() for b in llama.hf.buffers())
    assert mem["total"] == params + buffers
    linear = sum(m.weight.numel() * 4 for _, m in llama.linear_layers())
    assert mem["linear"] == linear
    assert mem["embedding"] == 256 * 64 * 4
    assert mem["adapters"] == 0
    assert mem["total"] == mem["linear"] + mem["embedding"] + mem["adapters"] + mem["other"]


def test_footprint_counts_tied_weight_once_as_embedding():
    model = llmspeed.models.tiny("llama", tie_word_embeddings=True)
    model.hf.lm_head.weight = model.hf.model.embed_tokens.weight
    mem = llmspeed.memory_footprint(model)
    assert mem["embedding"] == 256 * 64 * 4
    assert mem["linear"] == sum(m.weight.numel() * 4 for n, m in model.linear_layers() if n != "lm_head")


@pytest.mark.parametrize("tied", [False, True])
def test_footprint_of_a_meta_model_is_the_bytes_it_would_take(tied):
    """Regression: every meta tensor has data_ptr 0, so the storages were keyed as one and a model built under
    ``torch.device("meta")`` (to size it without memory) reported only its first tensor (the embedding)."""
    import transformers

    real = llmspeed.models.tiny("llama", seed=0, tie_word_embeddings=tied)
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(real.hf.config)
    assert llmspeed.memory_footprint(meta) == llmspeed.memory_footprint(real)
    assert llmspeed.memory_footprint(meta)["total"] == meta.get_memory_footprint()


def test_footprint_puts_lora_modules_under_adapters(llama):
    q = llama.hf.model.layers[0].self_attn.q_proj
    q.lora_A = nn.Linear(64, 4, bias=False)
    assert llmspeed.memory_footprint(llama)["adapters"] == 64 * 4 * 4


def test_footprint_counts_the_layers_a_lora_merge_keeps_for_unmerge(llama):
    """Regression: merging an adapter into a quantized layer re-quantizes it and keeps the replaced quantized module
    (outside the module tree) for unmerge; memory_footprint did not see it, so the merged model reported the bytes
    of the unmerged one although it held both. They count as ``linear`` until unmerge frees them."""
    import warnings

    from llmspeed import lora

    llmspeed.quantize(llama, "int8", lm_head=None)
    lora.add_adapter(llama, "a", r=4, init="random")
    before = llmspeed.memory_footprint(llama)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # merge warns about the re-quantization error
        lora.merge(llama, "a")
    kept = [k for _, layer in lora.lora_layers(llama) for k in layer.premerge.values()]
    kept_bytes = sum(t.untyped_storage().nbytes() for k in kept for t in [*k.parameters(), *k.buffers()])
    assert kept and kept_bytes > 0
    after = llmspeed.memory_footprint(llama)
    assert after["linear"] == before["linear"] + kept_bytes
    assert after["total"] == before["total"] + kept_bytes
    lora.unmerge(llama, "a")
    assert llmspeed.memory_footprint(llama) == before


def test_footprint_counts_the_head_a_quantized_embedding_still_reads_after_a_merge_into_it():
    """After lora.merge of an adapter on a quantized head tied to the input embedding, the embedding (a
    QuantizedEmbedding, which references its head outside the module tree) still reads the head the merge replaced,
    and the layer holds the merged copy: both count, once each. (merge_and_unload, which would leave the replaced
    head held by the embedding alone, is refused for this model: tests/lora/test_merge_and_unload.py.)"""
    import warnings

    from llmspeed import lora

    model = llmspeed.quantize(llmspeed.models.tiny("llama", seed=0, tie_word_embeddings=True), "int8")
    before = llmspeed.memory_footprint(model)
    lora.add_adapter(model, "a", r=4, init="random", targets=["lm_head"])
    adapters = llmspeed.memory_footprint(model)["adapters"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # merge warns about the re-quantization error
        lora.merge(model, "a")
    held, merged = model.hf.model.embed_tokens.head, model.hf.lm_head.base_layer
    assert held is not merged
    merged_bytes = sum(t.untyped_storage().nbytes() for t in [*merged.parameters(), *merged.buffers()])
    after = llmspeed.memory_footprint(model)
    assert after["total"] == before["total"] + adapters + merged_bytes
    assert after["linear"] == before["linear"] + merged_bytes and after["embedding"] == before["embedding"] == 0
    with pytest.raises(ValueError, match="also the model's input embedding"):
        lora.merge_and_unload(model)


def test_footprint_halves_with_bf16(llama):
    before = llmspeed.memory_footprint(llama)
    llmspeed.cast(llama, "bf16")
    after = llmspeed.memory_footprint(llama)
    assert after["linear"] * 2 == before["linear"]
    assert after["embedding"] * 2 == before["embedding"]


def test_pydoc_text_splits():
    full, ev, tr = pydoc_text(), pydoc_text("eval"), pydoc_text("train")
    assert len(full) > 300_000 and ev + tr == full
    assert len(ev) == len(full) // 2  # two halves by characters
    with pytest.raises(ValueError, match="split must be one of"):
        pydoc_text("test")


def test_pydoc_text_says_its_halves_share_paragraphs():
    """Regression: the module docstring called the ``"train"`` half "never overlapping the evaluation windows",
    while whole paragraphs of the ``"eval"`` half recur word for word in it (docs/calibration.md)."""
    from llmspeed.eval import registers, text

    held = " ".join(pydoc_text("eval").split())
    shared = [p for p in pydoc_text("train").split("\n\n") if len(p) > 400 and " ".join(p.split()) in held]
    assert shared  # the overlap is real
    assert "never overlapping" not in " ".join(text.__doc__.split())
    assert "pydoc_unseen_train" in text.__doc__ and registers.pydoc_unseen_train


class CharTokenizer:
    def __len__(self):
        return 256

    def encode(self, text, add_special_tokens=False):
        return [min(ord(c), 255) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_perplexity_is_exp_of_mean_window_loss_and_reproducible(llama):
    model = llmspeed.wrap(llama.hf, CharTokenizer())
    losses = window_losses(model, window=32, n_windows=3, batch_size=2)
    assert losses.shape == (3,)
    ppl = llmspeed.eval.perplexity(model, window=32, n_windows=3, batch_size=3)
    assert math.isclose(ppl, math.exp(losses.mean().item()), rel_tol=1e-5)
    # a random model over 256 symbols is close to uniform: perplexity near 256
    assert 100 < ppl < 600
    # reproducible: the same windows give the same number
    assert llmspeed.eval.perplexity(model, window=32, n_windows=3) == pytest.approx(ppl, rel=1e-6)


def test_perplexity_bad_input(llama):
    model = llmspeed.wrap(llama.hf, CharTokenizer())
    with pytest.raises(ValueError, match="text is too short: 5 tokens"):
        llmspeed.eval.perplexity(model, text="hello", window=4, n_windows=2)
    with pytest.raises(ValueError, match="window must be at least 2"):
        llmspeed.eval.perplexity(model, window=1)
    with pytest.raises(ValueError, match="n_windows must be at least 1"):
        llmspeed.eval.perplexity(model, n_windows=0)
    with pytest.raises(ValueError, match="text must be a non-empty string"):
        llmspeed.eval.perplexity(model, text="")
    with pytest.raises(ValueError, match="model has no tokenizer"):
        llmspeed.eval.perplexity(llama)


def test_perplexity_refuses_windows_beyond_the_models_positions(llama):
    """Regression: a window past max_position_embeddings (512 here) was scored: rotary positions extrapolate silently,
    so the number meant nothing. It is refused, naming window, the value and the limit, before any text is read."""

    class Counting(CharTokenizer):
        calls = 0

        def encode(self, text, add_special_tokens=False):
            Counting.calls += 1
            return super().encode(text, add_special_tokens)

    model = llmspeed.wrap(llama.hf, Counting())
    assert model.spec.max_positions == llama.hf.config.max_position_embeddings == 512
    for fn in (llmspeed.eval.perplexity, window_losses):
        with pytest.raises(ValueError, match=r"window must be at most the model's max_position_embeddings \(512 tokens, "
                                             r"model.spec.max_positions\); got window=513.*pass window <= 512"):  # fmt: skip
            fn(model, window=513, n_windows=1)
    assert Counting.calls == 0 and not llama.hf.training
    assert math.isfinite(llmspeed.eval.perplexity(model, window=512, n_windows=1))  # the limit itself is scored


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(window=32.0), TypeError, "window must be an int; got float 32.0"),
        (dict(window="32"), TypeError, "window must be an int; got str '32'"),
        (dict(n_windows=True), TypeError, "n_windows must be an int; got bool True"),
        (dict(batch_size=0), ValueError, "batch_size must be at least 1; got 0"),
        (dict(batch_size=-1), ValueError, "batch_size must be at least 1; got -1"),
        (dict(batch_size=2.0), TypeError, "batch_size must be an int; got float"),
        (dict(text=5), TypeError, "text must be a non-empty string; got int"),
        (dict(text=["some text"]), TypeError, "text must be a non-empty string; got list"),
    ],
)
def test_perplexity_bad_argument_types_name_the_argument(llama, kwargs, error, message):
    model = llmspeed.wrap(llama.hf, CharTokenizer())
    with pytest.raises(error, match=message):
        llmspeed.eval.perplexity(model, **{"window": 32, "n_windows": 2, **kwargs})


def test_perplexity_takes_a_transformers_model(llama):
    with pytest.raises(ValueError, match="model has no tokenizer"):  # wrapped, then refused clearly
        llmspeed.eval.perplexity(llama.hf, window=32, n_windows=2)
    model = llmspeed.wrap(llama.hf, CharTokenizer())  # the same wrapper, now with a tokenizer
    assert llmspeed.eval.perplexity(llama.hf, window=32, n_windows=2) == llmspeed.eval.perplexity(
        model, window=32, n_windows=2
    )


def test_perplexity_turns_dropout_off_and_restores_training_mode():
    hf = llmspeed.models.tiny("llama", seed=0, attention_dropout=0.5).hf
    model = llmspeed.wrap(hf, CharTokenizer())
    reference = llmspeed.eval.perplexity(model, window=32, n_windows=2)  # tiny() returns it in eval mode
    hf.train()
    assert llmspeed.eval.perplexity(model, window=32, n_windows=2) == reference  # not a dropout sample
    assert hf.training and all(m.training for m in hf.modules())


def test_perplexity_restores_each_modules_own_training_mode():
    """Regression: perplexity restored only the root's mode (``hf.train(was_training)``), which sets every submodule:
    a model training with some dropout switched off on purpose (``module.eval()`` on a part) came back with it on."""
    hf = llmspeed.models.tiny("llama", seed=0, attention_dropout=0.5).hf
    model = llmspeed.wrap(hf, CharTokenizer())
    hf.train()
    hf.model.layers[0].eval()  # the caller's choice: no dropout in the first layer while training
    before = {name: m.training for name, m in hf.named_modules()}
    for fn in (llmspeed.eval.perplexity, window_losses):
        fn(model, window=32, n_windows=2)
        assert {name: m.training for name, m in hf.named_modules()} == before
    with pytest.raises(ValueError, match="text is too short"):  # refused before the model runs: nothing changed
        llmspeed.eval.perplexity(model, text="short", window=32, n_windows=2)
    assert {name: m.training for name, m in hf.named_modules()} == before


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_perplexity_is_the_token_mean_of_a_direct_transformers_computation(llama, dtype):
    """Each window scored alone, no BOS added, its first token unscored; the mean over all scored tokens. A 16-bit
    model's logits are scored in fp32, as transformers' own loss does (bf16 cross-entropy is off in the 3rd digit)."""
    if dtype is not None:
        llmspeed.cast(llama, dtype)
    model = llmspeed.wrap(llama.hf, CharTokenizer())
    text = pydoc_text("eval")[:200]
    ids = torch.tensor(CharTokenizer().encode(text)[: 3 * 40]).view(3, 40)
    with torch.no_grad():
        nll = sum(llama.hf(input_ids=w[None], labels=w[None]).loss.item() * 39 for w in ids)
    expected = math.exp(nll / (3 * 39))
    for batch_size in (1, 2, 3):
        got = llmspeed.eval.perplexity(model, text=text, window=40, n_windows=3, batch_size=batch_size)
        assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_smollm2_fp32_perplexity_matches_reference(smollm2_cached):
    # 4 windows of 256 tokens: a quick check near the full 16x512 score (14.92)
    ppl = llmspeed.eval.perplexity(smollm2_cached, window=256, n_windows=4)
    assert 10 < ppl < 25
    assert torch.is_grad_enabled()


def test_progress_must_be_a_bool():
    """Regression: ``progress="no"`` was accepted as true (a progress bar where none was asked for)."""
    with pytest.raises(TypeError, match="progress must be True or False; got 'no'"):
        llmspeed.eval.perplexity(llmspeed.models.tiny("llama", seed=0), window=8, n_windows=1, progress="no")


def test_perplexity_scores_a_text_of_exactly_window_times_n_windows_tokens(llama):
    """The boundary of the length check: a text of exactly ``window * n_windows`` tokens is enough; one fewer is not."""
    model = llmspeed.wrap(llama.hf, CharTokenizer())
    assert math.isfinite(llmspeed.eval.perplexity(model, text="abcdefgh", window=4, n_windows=2))
    with pytest.raises(ValueError, match="text is too short: 7 tokens, but window=4 x n_windows=2 needs 8"):
        llmspeed.eval.perplexity(model, text="abcdefg", window=4, n_windows=2)


def test_footprint_counts_a_views_whole_storage():
    """Bytes held, not bytes seen: a buffer that views part of a larger storage keeps all of that storage alive."""
    model = llmspeed.models.tiny("llama", seed=0)
    before = llmspeed.memory_footprint(model)["other"]
    model.hf.model.norm.register_buffer("part", torch.zeros(100)[:10], persistent=False)
    assert llmspeed.memory_footprint(model)["other"] == before + 100 * 4


def test_perplexity_scores_the_evaluation_half_by_default(llama):
    """No ``text``: the ``"eval"`` half of the pydoc text, the one no llmspeed training or calibration run reads."""
    model = llmspeed.wrap(llama.hf, CharTokenizer())
    default = window_losses(model, window=16, n_windows=2)
    assert torch.equal(default, window_losses(model, text=pydoc_text("eval"), window=16, n_windows=2))
    assert not torch.equal(default, window_losses(model, text=pydoc_text("train"), window=16, n_windows=2))
