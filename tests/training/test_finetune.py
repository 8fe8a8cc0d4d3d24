"""``llmspeed.finetune``, the trainer: what each ``train`` mode trains, the texts and token ids it takes, and bad
arguments refused before anything changes (the precisions are in test_mixed_precision.py)."""

from __future__ import annotations

import copy
import re

import pytest
import torch

import llmspeed
from llmspeed import lora, qat

from .test_mixed_precision import RUN, TOKENS, _state


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(train="some"), "train must be one of"),
        (dict(adapter="a"), "adapter is only used with train='adapter'"),
        # regression: this reached lora.finetune's "... or pass full=True", an argument finetune lacks
        (dict(train="adapter"), "train='adapter' needs a LoRA adapter .* or use train='full' or 'linears'"),
        (dict(steps=0), "steps must be a positive integer"),
        (dict(lr=-1.0), "lr must be a positive number"),
    ],
)
def test_finetune_bad_arguments(llama, kwargs, match):
    with pytest.raises(ValueError, match=match):
        llmspeed.finetune(llama, TOKENS, **{**RUN, **kwargs})


@pytest.mark.parametrize("texts", [5, b"some text", ["some text", 1], [], {"text": "some text"}])
def test_texts_of_the_wrong_kind_are_named(smollm2_cached, texts):
    """Regression: texts=5 failed with a bare "'int' object is not iterable"; the message now says what was given."""
    state = {k: v.clone() for k, v in smollm2_cached.hf.state_dict().items()}
    with pytest.raises(ValueError, match=r"texts must be a non-empty string, a list of non-empty strings or a 1-D "
                                         r"tensor of token ids; got " + re.escape(repr(texts))):  # fmt: skip
        llmspeed.finetune(smollm2_cached, texts, **RUN)
    assert all(torch.equal(v, state[k]) for k, v in smollm2_cached.hf.state_dict().items())


@pytest.mark.parametrize("kind", [set, frozenset, lambda texts: dict.fromkeys(texts).keys()])
def test_texts_in_an_unordered_collection_are_refused(smollm2_cached, kind):
    """Regression: a set of texts was joined in its iteration order, which follows the process's string hash seed: the
    same seed trained on other windows (other losses) in every new interpreter."""
    state = {k: v.clone() for k, v in smollm2_cached.hf.state_dict().items()}
    with pytest.raises(ValueError, match=r"texts must be .*; got a \w+, whose order .* changes from run to run: pass "
                                         r"a list, e.g. sorted\(texts\)"):  # fmt: skip
        llmspeed.finetune(smollm2_cached, kind(["some text to train on " * 8, "other text " * 8]), **RUN)
    assert all(torch.equal(v, state[k]) for k, v in smollm2_cached.hf.state_dict().items())


def test_texts_from_a_generator_are_read_once_and_trained_on(smollm2_cached):
    """Regression: the check read a generator of texts to its end, leaving no text ("texts hold 0 tokens")."""
    model = copy.deepcopy(smollm2_cached)
    result = llmspeed.finetune(model, (t for t in ["some text to train on " * 8]), **{**RUN, "steps": 1, "seq_len": 8})
    assert result.steps == 1


@pytest.mark.parametrize("train", ["linears", "adapter"])
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(warmup_steps=-1), "warmup_steps must be None .* or an integer >= 0; got -1"),
        (dict(warmup_steps=2.5), "warmup_steps must be None"),
        # regression: accepted silently; the schedule then never reached lr (warm-up cut off by the last step)
        (dict(warmup_steps=13), "warmup_steps must be at most steps; got warmup_steps=13 with steps=12"),
        (dict(weight_decay=float("nan")), "weight_decay must be a finite number >= 0; got nan"),
        (dict(max_grad_norm=float("nan")), "max_grad_norm must be a finite number > 0; got nan"),
        (dict(max_grad_norm=0), "max_grad_norm must be a finite number > 0; got 0"),
        (dict(eval_windows=-1), "eval_windows must be an integer >= 0; got -1"),
        (dict(seed="x"), "seed must be an integer in \\[0, 2\\*\\*64\\); got 'x'"),
        (dict(gradient_checkpointing="yes"), "gradient_checkpointing must be a bool; got 'yes'"),
        (dict(seq_len=1024), "seq_len must be at most the model's context of 512 tokens .*; got seq_len=1024"),
        # regression: the held-out loss was scored after requires_grad changed, so this error left the
        # whole model frozen but for the trained parameters
        (dict(eval_windows=2), "eval_windows=2 scores held-out pydoc text, which needs a tokenizer"),
    ],
)
def test_bad_training_options_are_refused_before_anything_changes(llama, train, kwargs, match):
    if train == "adapter":
        lora.add_adapter(llama, "a", r=4, alpha=8)
        lora.add_adapter(llama, "b", r=4, alpha=8)  # the active one; the run names "a"
        kwargs = {**kwargs, "adapter": "a"}
    state = {k: v.clone() for k, v in llama.hf.state_dict().items()}
    flags = {n: p.requires_grad for n, p in llama.hf.named_parameters()}
    with pytest.raises(ValueError, match=match):
        llmspeed.finetune(llama, TOKENS, train=train, **{**RUN, **kwargs})
    assert all(torch.equal(v, state[k]) for k, v in llama.hf.state_dict().items())
    assert {n: p.requires_grad for n, p in llama.hf.named_parameters()} == flags
    assert train == "linears" or lora.active_adapter(llama) == "b"


@pytest.mark.parametrize("warmup_steps", [0, 2])  # none, and as long as the run (the peak rate at the last step)
def test_warmup_steps_from_zero_to_steps_are_accepted(llama, warmup_steps):
    result = llmspeed.finetune(llama, TOKENS, train="linears", warmup_steps=warmup_steps, **{**RUN, "steps": 2})
    assert len(result.losses) == 2 and all(loss == loss for loss in result.losses)


def test_full_training_refuses_quantized_or_adapted_models(llama):
    quantized = copy.deepcopy(llama)
    llmspeed.quantize(quantized, "int4", group_size=16)
    with pytest.raises(ValueError, match="layers are quantized"):
        llmspeed.finetune(quantized, TOKENS, train="full", **RUN)
    lora.add_adapter(llama, "a", r=4, alpha=8)
    with pytest.raises(ValueError, match="carries LoRA adapters"):
        llmspeed.finetune(llama, TOKENS, train="linears", **RUN)


def test_linears_trains_only_linear_weights(llama):
    embed = llama.hf.model.embed_tokens.weight.detach().clone()
    norm = llama.hf.model.norm.weight.detach().clone()
    q = llama.hf.model.layers[0].self_attn.q_proj.weight.detach().clone()
    head = llama.hf.lm_head.weight.detach().clone()  # a linear layer, but the output head: not trained
    result = llmspeed.finetune(llama, TOKENS, train="linears", **RUN)
    assert result.trained == "linears"
    assert torch.equal(llama.hf.model.embed_tokens.weight, embed) and torch.equal(llama.hf.model.norm.weight, norm)
    assert torch.equal(llama.hf.lm_head.weight, head)
    assert not torch.equal(llama.hf.model.layers[0].self_attn.q_proj.weight, q)


def test_a_failure_while_setting_up_the_run_restores_flags_and_mode(llama, monkeypatch):
    """Regression: the flags were frozen before the try, so a setup error (checkpointing, the held-out
    loss) left every parameter but the trained ones with requires_grad=False."""
    from llmspeed.training import loop

    def refuse(hf, on, recompute=None):
        raise ValueError("no checkpointing here")

    monkeypatch.setattr(loop, "set_checkpointing", refuse)
    qat.prepare(llama, "int4", group_size=16, learn_scales=True)
    flags = {n: p.requires_grad for n, p in llama.hf.named_parameters()}
    with pytest.raises(ValueError, match="no checkpointing here"):
        llmspeed.finetune(llama, TOKENS, train="linears", gradient_checkpointing=True, **RUN)
    assert {n: p.requires_grad for n, p in llama.hf.named_parameters()} == flags
    assert not llama.hf.training


@pytest.mark.parametrize("train", ["full", "adapter"])
def test_a_checkpointed_run_leaves_no_hook_on_the_embedding(llama, train):
    """Regression: transformers' checkpointing switch registers a hook making the embedding's output require grad and
    leaves it when switched off (outside PEFT), so every checkpointed run added one for good: a frozen model then
    recorded an autograd graph in every later forward outside no_grad."""
    if train == "adapter":
        lora.add_adapter(llama, "a", r=4, alpha=8)

    def hooks():
        return [(name, len(m._forward_hooks)) for name, m in llama.hf.named_modules() if m._forward_hooks]

    before = hooks()
    for _ in range(2):
        llmspeed.finetune(llama, TOKENS, gradient_checkpointing=True, **{**RUN, "steps": 1})
        assert hooks() == before
    assert not hasattr(llama.hf, "_require_grads_hooks")
    llama.hf.requires_grad_(False)
    assert not llama.hf(TOKENS[None, :8]).logits.requires_grad  # frozen: no graph from the embedding on


def test_each_module_gets_its_own_training_mode_back(llama):
    """Regression: only the root's mode was put back (``hf.train(was_training)`` sets every submodule alike), so a
    layer the caller had put in eval mode inside a model in training mode came back in training mode."""
    llama.hf.train()
    llama.hf.model.layers[0].eval()
    llmspeed.finetune(llama, TOKENS, **{**RUN, "steps": 1})
    assert llama.hf.training and llama.hf.model.layers[1].training
    assert not any(m.training for m in llama.hf.model.layers[0].modules())


def test_a_model_whose_adapters_are_all_inactive_trains_the_named_adapter(llama):
    """Regression: with adapters on the model but none active (set_adapter(None), or the active one deleted),
    train="auto" chose "full", so adapter="b" was refused ("only used with train='adapter'") and train="auto"
    or "adapter" alone said the model had no adapter, or suggested full fine-tuning, which it refuses."""
    lora.add_adapter(llama, "a", r=4, alpha=8)
    lora.add_adapter(llama, "b", r=4, alpha=8)
    lora.delete_adapter(llama, "b")
    lora.add_adapter(llama, "b", r=4, alpha=8)
    lora.delete_adapter(llama, "b")  # the active adapter: none is active now
    state = {k: v.clone() for k, v in llama.hf.state_dict().items()}
    for run in (lambda: llmspeed.finetune(llama, TOKENS, **RUN),
                lambda: llmspeed.finetune(llama, TOKENS, train="adapter", **RUN),
                lambda: lora.finetune(llama, TOKENS, **RUN)):  # fmt: skip
        with pytest.raises(ValueError, match=r"none of the model's adapters \['a'\] is active; pass adapter="):
            run()
    assert all(torch.equal(v, state[k]) for k, v in llama.hf.state_dict().items())
    result = llmspeed.finetune(llama, TOKENS, adapter="a", **{**RUN, "steps": 2})
    assert result.adapter == "a" and result.trained == "adapter" and lora.active_adapter(llama) == "a"


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8])
def test_token_ids_in_a_narrow_integer_dtype_train(llama, dtype):
    """Regression: ids were compared with the vocabulary size in their own dtype, where 256 wraps to 0, so
    every uint8/int8 stream was refused with a range inside the vocabulary ("must be in [0, 256); got [0, 120]")."""
    ids = torch.arange(121, dtype=dtype).repeat(3)  # [363], within every dtype's range and the vocabulary
    result = llmspeed.finetune(llama, ids, train="linears", **{**RUN, "steps": 1})
    assert len(result.losses) == 1


@pytest.mark.parametrize("dtype", [torch.bool, torch.complex64])
def test_token_ids_that_are_not_integers_are_refused(llama, dtype):
    """Regression: a bool tensor trained silently on ids 0 and 1; a complex one failed inside torch's min()."""
    lora.add_adapter(llama, "a", r=4, alpha=8)
    state = {k: v.clone() for k, v in llama.hf.state_dict().items()}
    with pytest.raises(ValueError, match=f"texts as a tensor must be 1-D integer token ids; got {dtype}"):
        lora.finetune(llama, torch.ones(100, dtype=dtype), **RUN)
    assert all(torch.equal(v, state[k]) for k, v in llama.hf.state_dict().items())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=2.0), "steps must be a positive integer; got 2.0"),
        (dict(steps=True), "steps must be a positive integer; got True"),
        (dict(lr="1e-3"), "lr must be a positive number; got '1e-3'"),
        (dict(lr=float("inf")), "lr must be a positive number; got inf"),
        (dict(seq_len=1), "seq_len must be at least 2; got 1"),
        (dict(batch_size=0), "batch_size must be a positive integer; got 0"),
        (dict(texts=TOKENS[:15]), "texts hold 15 tokens; seq_len=16 needs at least 16"),
        (dict(texts=TOKENS[:0]), "texts as a tensor must be 1-D integer token ids"),
        (dict(texts=["some text"]), "model has no tokenizer"),
        (dict(precision="fp8"), "precision must be one of"),
    ],
)
def test_bad_input_to_a_prepared_model_changes_nothing(llama, kwargs, match):
    qat.prepare(llama, "int4", group_size=16, learn_scales=True)
    state = _state(llama)
    flags = {n: p.requires_grad for n, p in llama.hf.named_parameters()}
    torch.manual_seed(7)
    rng = torch.random.get_rng_state()
    with pytest.raises(ValueError, match=match):
        llmspeed.finetune(llama, **{**RUN, "texts": TOKENS, **kwargs})
    assert all(torch.equal(v, state[k]) for k, v in llama.hf.state_dict().items())
    assert {n: p.requires_grad for n, p in llama.hf.named_parameters()} == flags and not llama.hf.training
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_a_step_that_raises_closes_the_progress_bar(llama, monkeypatch):
    """Regression: a training step that raised left its tqdm bar open, half drawn (the amptrain audit)."""
    from llmspeed.training import loop

    bars = []

    class Bar:
        def __init__(self, iterable, **kwargs):
            self.iterable, self.closed = iterable, False
            bars.append(self)

        def __iter__(self):
            return iter(self.iterable)

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            self.closed = True

    def fail(*args, **kwargs):
        raise RuntimeError("step failed")

    monkeypatch.setattr(loop, "tqdm", Bar)
    monkeypatch.setattr(loop.MixedPrecision, "backward", fail)
    with pytest.raises(RuntimeError, match="step failed"):
        llmspeed.finetune(llama, TOKENS, train="linears", **RUN)
    assert len(bars) == 1 and bars[0].closed


def test_auto_picks_what_trains_and_its_default_learning_rate(llama, monkeypatch):
    """train='auto': "full" at 2e-5 on a plain model (the result says "full", not "auto"); the adapter at 2e-4 once
    the model carries one (the docstring's defaults)."""
    import llmspeed.trainer as trainer

    calls = []
    monkeypatch.setattr(trainer, "run_training", lambda model, params, data, **kw: calls.append(("model", kw)))
    monkeypatch.setattr(trainer, "lora_finetune", lambda model, texts, steps, lr, *a, **kw: calls.append(("lora", lr)))
    run = {k: v for k, v in RUN.items() if k != "lr"}
    llmspeed.finetune(llama, TOKENS, **run)
    llmspeed.finetune(llama, TOKENS, train="linears", **run)
    lora.add_adapter(llama, "a", r=4, alpha=8)
    llmspeed.finetune(llama, TOKENS, **run)
    (_, full), (_, linears), lora_call = calls
    assert (full["trained"], full["lr"], linears["trained"], linears["lr"]) == ("full", 2e-5, "linears", 2e-5)
    assert lora_call == ("lora", 2e-4)
