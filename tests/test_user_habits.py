"""Regressions (issue #20): the habits users bring from transformers, vLLM, PEFT and torchao either work
(where the intent is unambiguous) or raise an error that says what to do."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import llmspeed
from llmspeed import SamplingParams, lora, names
from llmspeed.generation.sampling import coerce
from llmspeed.protocol import is_quantized
from llmspeed.training import check_precision


def _quantized_positions(model) -> list[str]:
    return [n for n, m in model.linear_layers() if is_quantized(m)]


# --- a raw transformers model given to a verb -------------------------------------------------------------
def test_quantize_wraps_a_transformers_model_in_place():
    hf = llmspeed.models.tiny("llama", seed=0).hf
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = hf(ids).logits
    model = llmspeed.quantize(hf, "int8")
    assert isinstance(model, llmspeed.Model) and model.hf is hf
    assert type(hf.model.layers[0].mlp.up_proj).__name__ == "Int8Linear"  # changed in place
    with torch.no_grad():
        after = hf(ids).logits  # the transformers model the user holds runs the int8 layers
    assert not torch.equal(before, after) and torch.allclose(before, after, atol=0.05)
    # wrapping it again (to add the tokenizer) finds the quantized layers through the same wrapper
    again = llmspeed.wrap(hf)
    assert again is model and len(_quantized_positions(again)) == 15  # 14 decoder linears and the int8 head


def test_other_verbs_take_a_transformers_model_too():
    hf = llmspeed.models.tiny("llama", seed=0).hf
    assert llmspeed.memory_footprint(hf)["total"] == llmspeed.memory_footprint(llmspeed.wrap(hf))["total"]
    llmspeed.cast(hf, "bf16")
    assert hf.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert hf.model.norm.weight.dtype == torch.float32  # cast's fp32 norms, so it went through llmspeed.cast
    lora.add_adapter(hf, "mine", r=2)
    assert lora.adapter_names(llmspeed.wrap(hf)) == ["mine"]
    qat_hf = llmspeed.models.tiny("llama", seed=0).hf
    assert type(llmspeed.qat.prepare(qat_hf, "int4", group_size=32)).__name__ == "Model"


def test_verbs_name_what_to_pass_for_anything_else():
    with pytest.raises(TypeError, match=r"model must be an llmspeed\.Model \(llmspeed\.wrap\(hf_model, tokenizer\)"):
        llmspeed.quantize(torch.nn.Linear(4, 4), "int8")
    with pytest.raises(TypeError, match="or a transformers causal LM; got builtins.str"):
        llmspeed.cast("smollm2", "bf16")


# --- one normaliser for dtype and format spellings --------------------------------------------------------
@pytest.mark.parametrize("spelling", ["bf16", "BF16", "bfloat16", "BFloat16", " bfloat16 ", "torch.bfloat16", torch.bfloat16])
def test_bf16_spellings(spelling):
    assert names.dtype_name(spelling) == "bf16"
    model = llmspeed.cast(llmspeed.models.tiny("llama", seed=0), spelling)
    assert model.spec.dtype == torch.bfloat16
    assert check_precision(spelling, torch.device("cpu"), []) == torch.bfloat16


@pytest.mark.parametrize("spelling,dtype", [("half", torch.float16), ("FP16", torch.float16), ("float", torch.float32),
                                            ("Float32", torch.float32), (torch.half, torch.float16)])
def test_other_dtype_spellings(spelling, dtype):
    assert llmspeed.cast(llmspeed.models.tiny("llama", seed=0), spelling).spec.dtype == dtype
    assert check_precision(spelling, torch.device("cpu"), []) == dtype


def test_unknown_dtype_lists_the_accepted_spellings():
    with pytest.raises(ValueError, match=r"dtype must be one of \['bf16', 'bfloat16', 'float'.*got 'int8'"):
        llmspeed.cast(llmspeed.models.tiny("llama", seed=0), "int8")
    with pytest.raises(ValueError, match="precision must be one of .*got 'fp8'"):
        check_precision("fp8", torch.device("cpu"), [])
    assert names.dtype_name("fp8") == "fp8" and names.dtype_name(torch.int8) is torch.int8
    # regression: smollm2() checked names only, so a torch dtype such as float64 went to transformers unchecked
    with pytest.raises(ValueError, match=r"dtype must be one of .*got torch.float64"):
        llmspeed.models.smollm2(dtype=torch.float64)


@pytest.mark.parametrize("spelling,fmt,group", [("INT4", "int4", 32), ("Int8", "int8", None), ("NF4", "nf4", 32),
                                                ("int4 ", "int4", 32)])
def test_format_spellings_in_quantize_and_qat(spelling, fmt, group):
    model = llmspeed.quantize(llmspeed.models.tiny("llama", seed=0), spelling, group_size=group)
    assert {m.quant_format for n, m in model.linear_layers() if is_quantized(m) and n != "lm_head"} == {fmt}
    reference = llmspeed.quantize(llmspeed.models.tiny("llama", seed=0), fmt, group_size=group)
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(model.hf(ids).logits, reference.hf(ids).logits)
    if fmt != "nf4":  # QAT has int4 and int8
        prepared = llmspeed.qat.prepare(llmspeed.models.tiny("llama", seed=0), spelling, group_size=group)
        assert {m.quant_format for _, m in llmspeed.qat.convert(prepared).linear_layers() if is_quantized(m)} == {fmt}


def test_lm_head_and_activations_take_the_format_spellings(tmp_path):
    # regression: quantize(model, "INT4") was accepted but lm_head="INT8" or "INT4" and activations="INT8" were refused,
    # against names.py's promise that a spelling one verb accepts every verb accepts
    model = llmspeed.quantize(llmspeed.models.tiny("llama", seed=0), "int4", lm_head="INT8", activations="Int8")
    assert model.module.lm_head.quant_format == "int8"
    assert model.module.model.layers[0].mlp.down_proj.config.activations == "int8"
    model = llmspeed.quantize(llmspeed.models.tiny("llama", seed=0), "INT4", lm_head=" Int4")
    assert model.module.lm_head.quant_format == "int4"
    llmspeed.models.tiny("llama", seed=0).hf.save_pretrained(tmp_path)
    model = llmspeed.models.from_pretrained(tmp_path, quantize=dict(format="int4", lm_head="INT4", activations="INT8"))
    assert model.module.lm_head.quant_format == "int4"
    assert model.module.model.layers[0].mlp.down_proj.config.activations == "int8"


def test_unknown_format_still_lists_the_formats():
    with pytest.raises(ValueError, match=r"format must be one of \['int8', 'int4', 'nf4'\]; got 'int3'"):
        llmspeed.quantize(llmspeed.models.tiny("llama", seed=0), "INT3")


def test_from_pretrained_takes_the_same_spellings(tmp_path):
    source = llmspeed.models.tiny("llama", seed=0)
    source.hf.save_pretrained(tmp_path)
    model = llmspeed.models.from_pretrained(tmp_path, dtype="bfloat16", quantize=dict(format="INT4", group_size=32))
    assert {m.quant_format for n, m in model.linear_layers() if is_quantized(m) and n != "lm_head"} == {"int4"}
    assert model.spec.dtype == torch.bfloat16


# --- load ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_load_on_cuda_without_cuda_says_so(tmp_path):
    llmspeed.save(llmspeed.quantize(llmspeed.models.tiny("llama", seed=0), "int8"), tmp_path)
    with pytest.raises(ValueError, match="device='cuda', but CUDA is not available here .*use device='cpu'"):
        llmspeed.load(tmp_path, device="cuda")
    with pytest.raises(ValueError, match="device='cuda', but CUDA is not available"):
        llmspeed.models.from_pretrained(tmp_path, device="cuda")


def test_load_onto_meta_or_an_absent_backend_is_refused(tmp_path):
    """Regression: ``load(device="meta")`` returned a model whose every weight was dropped, silently."""
    llmspeed.save(llmspeed.quantize(llmspeed.models.tiny("llama", seed=0), "int8"), tmp_path)
    with pytest.raises(ValueError, match="device='meta' holds no data"):
        llmspeed.load(tmp_path, device="meta")
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="device='mps': this torch build has no usable mps backend"):
            llmspeed.load(tmp_path, device="mps")
    assert llmspeed.load(tmp_path, device="cpu").spec.num_layers == 2


def test_load_of_a_file_names_the_folder_to_pass(tmp_path):
    llmspeed.save(llmspeed.quantize(llmspeed.models.tiny("llama", seed=0), "int8"), tmp_path)
    weights = next(tmp_path.glob("*.safetensors"))
    with pytest.raises(ValueError, match="a file, not a folder: pass the folder llmspeed.save wrote"):
        llmspeed.load(weights)
    assert llmspeed.load(tmp_path).spec.num_layers == 2  # the folder itself loads


# --- generation keywords -----------------------------------------------------------------------------------
def test_generate_batched_takes_transformers_and_vllm_habits(llama):
    ref = llama.generate_batched([[1, 2, 3]], SamplingParams(max_new_tokens=8, ignore_eos=True), progress=False)
    kw = llama.generate_batched([[1, 2, 3]], max_new_tokens=8, ignore_eos=True, progress=False)
    as_dict = llama.generate_batched([[1, 2, 3]], sampling={"max_new_tokens": 8, "ignore_eos": True}, progress=False)
    assert kw[0].token_ids == as_dict[0].token_ids == ref[0].token_ids and len(ref[0].token_ids) == 8
    with pytest.raises(TypeError, match=r"unknown keyword arguments \['max_tokens'\] \(max_tokens: use max_new_tokens\)"):
        llama.generate_batched([[1, 2, 3]], max_tokens=8)
    with pytest.raises(TypeError, match=r"\['num_beams'\] \(num_beams: beam search is not implemented\)"):
        llama.generate_batched([[1, 2, 3]], num_beams=2)
    with pytest.raises(TypeError, match=r"\['sampling_params'\] \(sampling_params: pass it as sampling=, or second"):
        llama.generate_batched([[1, 2, 3]], sampling_params=SamplingParams())  # vLLM's LLM.generate keyword
    with pytest.raises(TypeError, match=r"\['temprature'\] \(temprature: did you mean temperature\?\)"):
        llama.generate_batched([[1, 2, 3]], temprature=0.5)


@pytest.mark.parametrize("given,hint", [
    (dict(max_tokens=8), r"\['max_tokens'\] \(max_tokens: use max_new_tokens\); it takes \['max_new_tokens'"),
    (dict(temprature=0.5, stop_strings=["x"]),
     r"\['stop_strings', 'temprature'\] \(stop_strings: use stop; temprature: did you mean temperature\?\)"),
    (dict(zzz=1), r"\['zzz'\]; it takes"),
])  # fmt: skip
def test_sampling_params_names_an_unknown_keyword_with_what_to_use(given, hint):
    """Regression: ``SamplingParams(max_tokens=8)``, vLLM's and OpenAI's spelling, was Python's bare "unexpected
    keyword argument"; a dict of fields said which keys were unknown but not what to use."""
    with pytest.raises(TypeError, match=r"SamplingParams got unknown keyword arguments " + hint):
        SamplingParams(**given)
    with pytest.raises(ValueError, match=r"sampling has unknown keys " + hint.split("; it takes")[0]):
        coerce(given)


# --- adapter files -----------------------------------------------------------------------------------------
@pytest.fixture
def adapter_folder(tmp_path):
    model = llmspeed.models.tiny("llama", seed=0)
    lora.add_adapter(model, "a", r=4)
    lora.save_adapter(model, tmp_path, "a")
    return tmp_path


def _load(folder):
    lora.load_adapter(llmspeed.models.tiny("llama", seed=0), folder, "b")


def test_adapter_rank_zero_tensors(adapter_folder):
    from safetensors.torch import load_file, save_file

    path = adapter_folder / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({k: (v[:0] if "lora_A" in k else v[:, :0]).contiguous() for k, v in tensors.items()}, path)
    with pytest.raises(ValueError, match="adapter_model.safetensors: lora_A of .* has rank 0"):
        _load(adapter_folder)


def test_adapter_corrupt_weights(adapter_folder):
    (adapter_folder / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a readable safetensors file"):
        _load(adapter_folder)


@pytest.mark.parametrize(
    "config,message",
    [
        ([1, 2], "adapter_config.json must hold a JSON object .* got a list"),
        ("{", "adapter_config.json is not valid JSON"),
        ({"r": [4], "lora_alpha": 8}, "adapter_config.json fields r, lora_alpha and lora_dropout must be numbers \\(r an integer\\); got r=\\[4\\]"),
        ({"r": 4, "alpha_pattern": {"([": 2}}, "adapter_config.json field alpha_pattern has '\\(\\[', which is not a regular"),
    ],
)
def test_adapter_bad_config(adapter_folder, config, message):
    text = config if isinstance(config, str) else json.dumps(config)
    (adapter_folder / "adapter_config.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        _load(adapter_folder)


def test_adapter_targets_bad_regex(llama):
    with pytest.raises(ValueError, match=r"targets '\(\[' is not a regular expression .* pass 'all-linear'"):
        lora.add_adapter(llama, "x", targets="([")
    assert lora.adapter_names(llama) == []


# --- plain text to an instruct model -----------------------------------------------------------------------
@pytest.mark.slow
def test_plain_text_to_a_chat_model_that_ends_at_once_warns(smollm2):
    question = "What is a decorator?"
    with pytest.warns(UserWarning, match="model has a chat template, so pass chat messages"):
        raw = smollm2.generate_batched([question], max_new_tokens=8, progress=False)
    assert raw[0].text == ""  # SmolLM2-Instruct ends a raw-text turn at once: why the examples use chat lists
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chat = smollm2.generate_batched([[{"role": "user", "content": question}]], max_new_tokens=8, progress=False)
        templated = smollm2.generate_batched([question], max_new_tokens=8, chat_template=True, progress=False)
    assert chat[0].text and chat[0].token_ids == templated[0].token_ids


def test_the_chat_template_hint_is_given_only_when_the_model_ended_its_turn_not_at_a_stop_string(llama):
    """Regression: the warning "the model ended its turn at once" came for any empty "stop" output of a plain-text
    prompt, also one cut at its first character by the user's stop string or ended by a stop token id."""
    from tests.generation.test_engine import ChatTokenizer

    llama.tokenizer = ChatTokenizer()
    first = llama.generate_batched(["ABC"], max_new_tokens=1, ignore_eos=True, progress=False)[0].token_ids[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cut = llama.generate_batched(["ABC"], max_new_tokens=4, ignore_eos=True, stop=[chr(first)], progress=False)
        token = llama.generate_batched(["ABC"], max_new_tokens=4, stop_token_ids=[first], progress=False)
    assert cut[0].finish_reason == token[0].finish_reason == "stop" and cut[0].text == token[0].text == ""
    with pytest.warns(UserWarning, match="ended its turn at once"):  # the model's own end of turn still warns
        ended = llama.generate_batched(["ABC"], max_new_tokens=4, eos_token_ids=[first], progress=False)
    assert ended[0].finish_reason == "stop" and ended[0].token_ids == [first]
    # regression: docs/batching.md promises the warning for prompts, but a model.stream run never gave it
    with pytest.warns(UserWarning, match="ended its turn at once"):
        events = list(llama.stream(["ABC"], max_new_tokens=4, eos_token_ids=[first], progress=False))
    assert [e.token_id for e in events] == [first]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(llama.stream(["ABC"], max_new_tokens=4, stop_token_ids=[first], progress=False))


def test_a_model_copied_after_generating_generates_on_its_own(llama):
    """Regression: ``copy.deepcopy(model)`` after ``generate_batched`` (to quantize a copy and compare, say) failed
    with "cannot pickle 'module' object": the copy tried to take the kept generator (its lock, KV cache and the C++
    step's handle) along (noted by the QAT audit)."""
    import copy

    prompts = [[1, 2, 3], [7, 8]]
    before = [o.token_ids for o in llama.generate_batched(prompts, max_new_tokens=4, progress=False)]
    twin = copy.deepcopy(llama)
    assert getattr(twin, "_cached_generator", None) is None
    assert [o.token_ids for o in twin.generate_batched(prompts, max_new_tokens=4, progress=False)] == before
    llmspeed.quantize(twin, "int8")
    twin.generate_batched(prompts, max_new_tokens=4, progress=False)
    assert [o.token_ids for o in llama.generate_batched(prompts, max_new_tokens=4, progress=False)] == before


def test_eos_edited_in_the_generation_config_between_calls_is_honoured(llama):
    """Regression: the kept generator read the end-of-sequence ids once, when it was built, so
    ``model.hf.generation_config.eos_token_id = ...`` (the transformers habit) after a first ``generate_batched``
    was ignored: the second call ran past the new eos to ``max_new_tokens``, where a fresh model stopped."""
    first = llama.generate_batched([[1, 2, 3]], max_new_tokens=8, progress=False)[0].token_ids
    stop = first[2]
    llama.hf.generation_config.eos_token_id = stop
    again = llama.generate_batched([[1, 2, 3]], max_new_tokens=8, progress=False)[0]
    assert again.finish_reason == "stop" and again.token_ids == first[: first.index(stop) + 1]
    llama.hf.generation_config.eos_token_id = None  # and back: no eos, the full length again
    assert llama.generate_batched([[1, 2, 3]], max_new_tokens=8, progress=False)[0].token_ids == first


def test_generate_batched_from_several_threads_takes_turns(llama):
    """Regression: ``model.generate_batched`` called from two threads at once (a web handler's habit with
    transformers' ``generate``) failed all but one with "a Generator is single-threaded"; the calls now take turns
    on the model's kept generator and each gets the same tokens as alone. A stream holds its turn until it ends."""
    import threading

    sp = SamplingParams(max_new_tokens=12, ignore_eos=True)
    alone = llama.generate_batched([[1, 2, 3]], sp, progress=False)[0].token_ids
    results, errors = [], []

    def call():
        try:
            results.append([o.token_ids for o in llama.generate_batched([[1, 2, 3]] * 3, sp, progress=False)])
        except Exception as exc:  # noqa: BLE001 - any failure is the regression
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and results == [[alone] * 3] * 3
    stream = llama.stream([[1, 2, 3]], sp, progress=False)
    next(stream)  # the stream holds the model's turn
    waiting = threading.Thread(target=call)
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive()
    stream.close()  # closing it hands the turn on
    waiting.join(60)
    assert not waiting.is_alive() and errors == [] and len(results) == 4


def test_the_chat_template_hint_is_not_given_for_chat_prompts(llama):
    """The hint is for plain text the model ended at once, not for chat messages, to which the template is applied
    (mutation: dropping the plain-text condition survived)."""
    from tests.generation.test_engine import ChatTokenizer

    llama.tokenizer = ChatTokenizer()
    first = llama.generate_batched(["ABC"], max_new_tokens=1, ignore_eos=True, progress=False)[0].token_ids[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chat = llama.generate_batched([[{"role": "user", "content": "ABC"}]], max_new_tokens=4, eos_token_ids=[first],
                                      progress=False)  # fmt: skip
    assert chat[0].finish_reason == "stop" and chat[0].token_ids == [first] and chat[0].text == ""


def test_the_chat_template_hint_is_not_given_to_a_model_without_one(llama):
    """The hint tells the user to apply the model's chat template: never when there is none (mutation: dropping
    the early return survived)."""
    from tests.generation.test_engine import CharTokenizer

    llama.tokenizer = CharTokenizer()
    first = llama.generate_batched(["ABC"], max_new_tokens=1, ignore_eos=True, progress=False)[0].token_ids[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ended = llama.generate_batched(["ABC"], max_new_tokens=4, eos_token_ids=[first], progress=False)
    assert ended[0].finish_reason == "stop" and ended[0].token_ids == [first] and ended[0].text == ""
