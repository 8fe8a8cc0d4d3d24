"""The protocol on every supported architecture: spec, linear positions, ragged forward, errors."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import llmspeed
from llmspeed.protocol import AttentionBackend, CausalLM


class DenseBackend:
    """A reference attention backend: one sequence per call sequence, dense K/V per layer."""

    def __init__(self):
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def __call__(self, layer_idx, query, key, value, scaling):
        k = torch.cat([self.k[layer_idx], key], dim=2) if layer_idx in self.k else key  # [1, Hkv, S, D]
        v = torch.cat([self.v[layer_idx], value], dim=2) if layer_idx in self.v else value
        self.k[layer_idx], self.v[layer_idx] = k, v
        rep = query.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # [1, H, S, D]
        t, s = query.shape[2], k.shape[2]
        mask = torch.ones(t, s, dtype=torch.bool).tril(diagonal=s - t)  # [T, S]
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling)  # [1, H, T, D]
        return out.transpose(1, 2)  # [1, T, H, D]


def _parameters(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


def test_model_satisfies_protocol(tiny_model):
    assert isinstance(tiny_model, CausalLM)
    # runtime_checkable only checks that the names exist: compare the signatures too
    for name in ("linear_names", "linear_layers", "replace_linear", "forward_batch"):
        assert _parameters(getattr(tiny_model, name)) == _parameters(getattr(CausalLM, name)), name


def test_protocol_check_rejects_incomplete_models(llama):
    class NoForward:
        spec = llama.spec
        module = llama.hf
        tokenizer = None
        linear_names = llama.linear_names
        linear_layers = llama.linear_layers
        replace_linear = llama.replace_linear

    assert not isinstance(NoForward(), CausalLM)
    assert not isinstance(llama.hf, CausalLM)  # a bare transformers model is not a CausalLM: llmspeed.wrap it


def test_dense_backend_has_the_protocol_call_signature():
    assert isinstance(DenseBackend(), AttentionBackend)
    assert _parameters(DenseBackend.__call__) == _parameters(AttentionBackend.__call__)
    assert not isinstance(object(), AttentionBackend)


def test_spec_matches_config(tiny_model):
    spec = tiny_model.spec
    assert spec.architecture == type(tiny_model.hf).__name__
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads) == (2, 4, 2)
    assert spec.head_dim == 16  # hidden 64 over 4 heads; qwen3's config states 16 explicitly
    attn = tiny_model.hf.get_submodule("model.layers.0.self_attn")
    query = attn.q_proj.out_features if hasattr(attn, "q_proj") else attn.qkv_proj.out_features * 4 // 8  # phi3: q, k, v
    assert query == spec.num_heads * spec.head_dim
    assert (spec.vocab_size, spec.max_positions, spec.hidden_size) == (256, 512, 64)
    assert spec.dtype == torch.float32 and spec.device.type == "cpu"
    assert spec.kv_bytes_per_token == 2 * 2 * 2 * spec.head_dim * 4


def test_spec_reads_an_explicit_head_dim():
    # qwen3 states head_dim in its config; it need not equal hidden_size // num_attention_heads (64 // 4)
    spec = llmspeed.models.tiny("qwen3", seed=0, head_dim=32).spec
    assert spec.head_dim == 32
    assert spec.kv_bytes_per_token == 2 * 2 * 2 * 32 * 4


def test_linear_positions_and_replace(tiny_model):
    names = tiny_model.linear_names()
    assert "lm_head" in names
    assert sum(n.endswith(("q_proj", "qkv_proj")) for n in names) == 2
    assert all(isinstance(m, nn.Linear) for _, m in tiny_model.linear_layers())
    name = names[0]
    old = tiny_model.hf.get_submodule(name)
    new = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None)
    assert tiny_model.replace_linear(name, new) is old
    assert dict(tiny_model.linear_layers())[name] is new
    assert tiny_model.hf.get_submodule(name) is new


def test_a_wrapper_made_after_quantize_or_lora_finds_the_same_linear_positions():
    """Regression: a wrapper made over a model that quantize or lora.add_adapter had already changed recorded only
    the nn.Linear modules it found (none after quantize; LoRA's lora_A/lora_B linears after add_adapter), so a
    verb handed ``model.hf`` then saw no quantized layers (cast went ahead on a quantized model)."""
    from llmspeed import lora

    model = llmspeed.models.tiny("llama", seed=0)
    positions = model.linear_names()
    llmspeed.quantize(model, "int4", group_size=32)
    assert llmspeed.wrap(model.hf).linear_names() == positions
    with pytest.raises(TypeError, match="15 layers are .*Cast before quantizing"):
        llmspeed.cast(llmspeed.wrap(model.hf), "bf16")
    lora.add_adapter(model, "a", r=4)
    fresh = llmspeed.wrap(model.hf)
    assert fresh.linear_names() == positions
    assert [type(m) for _, m in fresh.linear_layers()] == [type(m) for _, m in model.linear_layers()]


def test_replace_linear_rejects_unknown_name(llama):
    with pytest.raises(ValueError, match="name must be a linear position"):
        llama.replace_linear("model.layers.0.mlp", nn.Linear(2, 2))
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        llama.replace_linear("lm_head", "not a module")


@torch.no_grad()
def test_forward_batch_matches_hf_prefill_then_decode(tiny_model):
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (12,))
    ref = tiny_model.hf(ids[None]).logits[0]  # [12, V]
    backend = DenseBackend()
    prefill = tiny_model.forward_batch(ids[:8], torch.arange(8), backend, torch.tensor([5, 7]))
    torch.testing.assert_close(prefill, ref[[5, 7]], rtol=1e-5, atol=1e-5)
    for t in range(8, 12):  # decode one token at a time against the stored K/V
        step = tiny_model.forward_batch(ids[t : t + 1], torch.tensor([t]), backend, torch.tensor([0]))
        torch.testing.assert_close(step[0], ref[t], rtol=1e-5, atol=1e-5)
    # forward_batch leaves the model's own attention implementation in place
    assert tiny_model.hf.config._attn_implementation != "llmspeed"


@pytest.mark.parametrize("family, fields, what", [
    ("Gemma2", {"attn_logit_softcapping": 50.0}, r"logit soft-capping \(softcap=...\)"),
    ("GptOss", {"num_local_experts": 2, "num_experts_per_tok": 1}, r"attention sinks \(s_aux=...\)"),
])  # fmt: skip
@torch.no_grad()
def test_forward_batch_refuses_attention_changes_the_backend_does_not_apply(family, fields, what):
    """Regression: Gemma-2 hands its attention function softcap=, gpt-oss its sinks (s_aux=); the llmspeed
    attention dropped both, so generate_batched ran on logits that were not the model's (a first-token logprob 5e-3
    off transformers' on a tiny Gemma-2, 1.1 off and other tokens on a tiny gpt-oss), silently."""
    import transformers

    config = getattr(transformers, f"{family}Config")(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64, sliding_window=64, **fields)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = llmspeed.wrap(transformers.AutoModelForCausalLM.from_config(config).eval())
    ids = torch.arange(1, 9)
    with pytest.raises(TypeError, match=f"{family}Attention asks its attention for {what}, which llmspeed's paged"):
        model.forward_batch(ids, torch.arange(8), DenseBackend(), torch.tensor([7]))
    assert model.hf.config._attn_implementation != "llmspeed"  # switched back
    if family == "Gemma2":  # without soft-capping the same family runs, with the model's own logits
        for layer in model.hf.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        out = model.forward_batch(ids, torch.arange(8), DenseBackend(), torch.tensor([7]))
        torch.testing.assert_close(out[0], model.hf(ids[None]).logits[0, 7], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args, error, match", [
    ((torch.arange(3), torch.arange(3), 2), TypeError, r"logits_indices must be a 1-D integer \(int64\) tensor; got 2"),
    ((torch.arange(3), torch.arange(3), torch.tensor([False, True, True])), TypeError, "logits_indices.*got a bool"),
    ((torch.arange(3)[None], torch.arange(3)[None], torch.tensor([2])), ValueError, r"input_ids must be 1-D.*\[1, 3\]"),
    ((torch.arange(3.0), torch.arange(3), torch.tensor([2])), TypeError, "input_ids must be.*got a float32 tensor"),
    (([1, 2, 3], torch.arange(3), torch.tensor([2])), TypeError, r"input_ids must be.*got \[1, 2, 3\]"),
    ((torch.arange(3), torch.arange(2), torch.tensor([2])), ValueError, "got 3 input_ids and 2 positions"),
])  # fmt: skip
def test_forward_batch_refuses_a_malformed_batch_before_the_backend_stores_it(llama, args, error, match):
    """Regression: forward_batch checked nothing. ``logits_indices=2`` (an int, not ``tensor([2])``) went to
    transformers' ``logits_to_keep``, which reads it as "the last 2 rows": two rows of logits came back where row 2
    was asked for, silently; a boolean mask ran as a mask; other mistakes failed deep in a layer with a shape error
    naming no argument, some after the backend had stored the tokens' keys and values."""
    calls = []

    def backend(layer_idx, query, key, value, scaling):
        calls.append(layer_idx)
        return torch.zeros(1, query.shape[2], query.shape[1], query.shape[3])

    ids, positions, rows = args
    with pytest.raises(error, match=match):
        llama.forward_batch(ids, positions, backend, rows)
    assert calls == [] and llama.hf.config._attn_implementation != "llmspeed"


def test_llmspeed_attention_outside_forward_batch_is_an_error(llama):
    llama.hf.config._attn_implementation = "llmspeed"
    with pytest.raises(RuntimeError, match="only runs inside Model.forward_batch"):
        llama.hf(torch.tensor([[1, 2, 3]]))


def test_wrap_rejects_non_causal_models():
    import transformers

    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                         intermediate_size=32, vocab_size=64))
    with pytest.raises(TypeError, match="decoder-only causal LM.*BertModel"):
        llmspeed.wrap(bert)
    with pytest.raises(TypeError, match="PreTrainedModel causal LM.*Linear"):
        llmspeed.wrap(nn.Linear(2, 2))


def test_wrap_of_a_peft_or_compiled_model_says_what_to_pass(llama):
    """Regression: a PeftModel or a torch.compile'd model (what PEFT and transformers users hold) was refused with
    "must be a transformers PreTrainedModel causal LM; got peft.peft_model.PeftModel", naming no way forward."""
    peft = pytest.importorskip("peft")

    peft_model = peft.get_peft_model(llmspeed.models.tiny("llama").hf, peft.LoraConfig(target_modules=["q_proj"], r=2))
    for verb in (llmspeed.wrap, lambda m: llmspeed.quantize(m, "int8")):
        with pytest.raises(TypeError, match=r"got peft.*PeftModel \(a PEFT model: pass peft_model.merge_and_unload"):
            verb(peft_model)
        with pytest.raises(TypeError, match=r"OptimizedModule \(a torch.compile'd model: pass .*compiled._orig_mod"):
            verb(torch.compile(llama.hf))
    assert llmspeed.wrap(peft_model.merge_and_unload()).linear_names() == llama.linear_names()


@pytest.mark.parametrize("model_type, fields, kinds", [
    ("recurrent_gemma", {"lru_width": 32, "attention_window_size": 8, "num_hidden_layers": 3}, "'linear_attention', 'recurrent'"),
    ("minimax", {"num_key_value_heads": 2, "num_local_experts": 2, "head_dim": 16, "num_hidden_layers": 2}, "'linear_attention'"),
])  # fmt: skip
def test_wrap_rejects_models_whose_layers_keep_another_state(model_type, fields, kinds):
    """Regression: RecurrentGemma (recurrent blocks) was wrapped and generated other tokens than transformers (its
    recurrent state is not a KV cache), and MiniMax's lightning (linear) attention would be run as softmax attention;
    hybrid Mamba models failed inside a step. A model with layer kinds the paged KV cache cannot compute is refused."""
    import transformers

    cfg = transformers.AutoConfig.for_model(model_type, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                            vocab_size=64, **fields)  # fmt: skip
    hf = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(TypeError, match=rf"ForCausalLM has {kinds} layers \(its config's layer types\).*supported: "
                                        rf"models whose every layer is attention, chunked_attention"):  # fmt: skip
        llmspeed.wrap(hf)
    assert hf.config._attn_implementation != "llmspeed"  # refused before the model was touched


def test_wrap_rejects_models_without_attention_interface(monkeypatch, llama):
    monkeypatch.setattr(type(llama.hf), "_supports_attention_backend", False)
    with pytest.raises(TypeError, match="LlamaForCausalLM does not route attention"):
        llmspeed.wrap(llama.hf)


def test_wrap_rejects_mismatched_tokenizer(llama):
    class BigTokenizer:
        def __len__(self):
            return 1000

        def encode(self, text):
            return []

        def decode(self, ids):
            return ""

    with pytest.raises(ValueError, match="tokenizer does not match the model: it has 1000 tokens.*256"):
        llmspeed.wrap(llama.hf, BigTokenizer())
    with pytest.raises(TypeError, match="tokenizer must be a Hugging Face tokenizer"):
        llmspeed.wrap(llama.hf, object())


def test_wrap_is_idempotent(llama):
    assert llmspeed.wrap(llama) is llama
    assert "LlamaForCausalLM" in repr(llama)


def test_wrap_of_a_model_takes_the_tokenizer_given(llama):
    # Regression: wrap(Model, tokenizer) returned the Model unchanged, dropping the tokenizer, so
    # perplexity(llmspeed.wrap(llmspeed.models.tiny(), tok)) said "model has no tokenizer; wrap it with llmspeed.wrap".
    class Tokenizer:
        def __len__(self):
            return 256

        def encode(self, text, add_special_tokens=False):
            return [ord(c) % 256 for c in text]

        def decode(self, ids):
            return ""

    model = llmspeed.models.tiny()
    tok = Tokenizer()
    assert llmspeed.wrap(model, tok) is model and model.tokenizer is tok
    assert llmspeed.eval.perplexity(model, "abcdefgh" * 4, window=8, n_windows=2) > 1
    assert llmspeed.wrap(model) is model and model.tokenizer is tok  # no tokenizer given: the one it has stays
    with pytest.raises(ValueError, match="tokenizer does not match the model"):
        llmspeed.wrap(model, type("Big", (Tokenizer,), {"__len__": lambda self: 1000})())
    assert model.tokenizer is tok  # a refused tokenizer changes nothing


def test_replace_linear_rejects_a_module_of_other_features(llama):
    """Regression: a module of the wrong shape was put in place and the model failed at its next forward."""
    name = "model.layers.0.mlp.down_proj"
    old = llama.hf.get_submodule(name)
    with pytest.raises(ValueError, match=f"module for '{name}' maps 3 -> {old.out_features} features"):
        llama.replace_linear(name, nn.Linear(3, old.out_features))
    assert llama.hf.get_submodule(name) is old


def test_fair_lock_is_reentrant_refuses_a_foreign_release_and_lets_no_one_jump_the_queue():
    import threading

    from llmspeed.protocol import FairRLock

    lock = FairRLock()
    assert lock.acquire() and lock.acquire()  # re-entrant
    lock.release()
    errors = []

    def foreign_release():
        try:
            lock.release()
        except RuntimeError as e:
            errors.append(str(e))

    t = threading.Thread(target=foreign_release)
    t.start()
    t.join(30)
    assert errors == ["cannot release a lock this thread does not hold"] and lock._owner == threading.get_ident()
    lock.release()
    lock._queue.append(object())  # a thread waits for the free lock (not yet woken): none may take it before it
    got = []
    barger = threading.Thread(target=lambda: got.append(lock.acquire(blocking=False)), daemon=True)
    barger.start()
    barger.join(10)  # a non-blocking acquire that queued would wait forever
    assert got == [False] and lock._owner is None
    lock._queue.clear()
    assert lock.acquire(blocking=False)
    lock.release()


def test_wrap_takes_a_tokenizer_as_large_as_the_vocabulary_and_no_larger(llama):
    class Tokenizer:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def encode(self, text):
            return []

        def decode(self, ids):
            return ""

    assert llmspeed.wrap(llama.hf, Tokenizer(256)).tokenizer.n == 256
    with pytest.raises(ValueError, match="it has 257 tokens but the model's vocabulary has 256 rows"):
        llmspeed.wrap(llama.hf, Tokenizer(257))


def test_fair_lock_acquire_times_out_and_leaves_no_ticket_behind():
    import threading

    from llmspeed.protocol import FairRLock

    lock = FairRLock()
    lock.acquire()
    got = []
    waiter = threading.Thread(target=lambda: got.append(lock.acquire(timeout=0.1)), daemon=True)
    waiter.start()
    waiter.join(10)  # a timeout ignored would wait for the holder forever
    assert got == [False] and not lock._queue
    lock.release()
    taker = threading.Thread(target=lambda: got.append(lock.acquire(timeout=10) and (lock.release() or True)))
    taker.start()
    taker.join(30)
    assert got == [False, True]
