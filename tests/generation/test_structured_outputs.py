"""Structured outputs (``SamplingParams(structured_outputs=...)``): SmolLM2's constrained greedy tokens equal what
transformers' ``generate`` picks with xgrammar's own logits processor, on every path a request's tokens can take;
outputs validate; other requests of the batch are untouched; bad specs are refused by name."""

from __future__ import annotations

import json
import re
import sys

import jsonschema
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmspeed import Generator, SamplingParams
from llmspeed.generation import fused_decode
from llmspeed.generation.structured import unpack_bitmask
from llmspeed.generation.structured_params import StructuredOutputsParams

xgr = pytest.importorskip("xgrammar")

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}  # fmt: skip
ASK = [{"role": "user", "content": "Describe a person called Ann who is 31 years old, as JSON."}]
SPECS = {
    "json": dict(json=PERSON, any_whitespace=False),
    "regex": dict(regex=r"[0-9]{3}-[0-9]{4}"),
    "choice": dict(choice=["positive", "negative", "neutral"]),
    "grammar": dict(grammar='root ::= "The answer is " [0-9]+ "."'),
}


def _reference(model, ids: list[int], spec: StructuredOutputsParams, max_new_tokens: int) -> list[int]:
    """Greedy tokens of transformers' generate with xgrammar's logits processor (its own integration)."""
    info = xgr.TokenizerInfo.from_huggingface(model.tokenizer, vocab_size=model.spec.vocab_size, stop_token_ids=[2])
    compiled = xgr.GrammarCompiler(info).compile_grammar(spec.build())
    out = model.hf.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=2,
                            logits_processor=[xgr.contrib.hf.LogitsProcessor(compiled)], pad_token_id=2)  # fmt: skip
    return out[0, len(ids):].tolist()


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "path"), [(k, "generic") for k in sorted(SPECS)] + [("json", "fused"), ("regex", "bursts")])
def test_constrained_greedy_tokens_equal_transformers_with_xgrammars_processor(smollm2_cached, kind, path):
    """Golden: the same greedy tokens as transformers' ``generate`` with xgrammar's Hugging Face logits processor, on
    the generic step, the fused CPU step and with greedy bursts asked for (which a constrained request must not take:
    they pick the model's argmax in C++)."""
    if path != "generic" and fused_decode.unavailable() is not None:
        pytest.skip(f"the C++ decode kernel cannot build here: {fused_decode.unavailable()}")
    model = smollm2_cached
    gen = Generator(model, progress=False, fused_decode=path != "generic",
                    num_scheduler_steps=4 if path == "bursts" else 1)  # fmt: skip
    params = SamplingParams(max_new_tokens=24, structured_outputs=SPECS[kind])
    out = gen.generate_batched([ASK], params)[0]
    assert out.token_ids == _reference(model, out.prompt_token_ids, params.structured_outputs, 24)
    assert out.finish_reason == "stop" and out.token_ids[-1] == 2  # the grammar ended it with the end token
    assert "fused cpu, greedy burst" not in gen.step_paths
    if path == "fused":
        assert "fused cpu" in gen.step_paths  # the fused step ran it: its logits went through the mask


@pytest.fixture(scope="module")
def gen(smollm2_cached):
    return Generator(smollm2_cached, progress=False)


def test_outputs_match_their_spec_greedy_and_sampled_beside_a_free_request(gen):
    """Every constrained output validates; the unconstrained request sharing the batches is the same as alone."""
    free = SamplingParams(max_new_tokens=16)
    alone = gen.generate_batched([ASK], free)[0].token_ids
    params = [SamplingParams(max_new_tokens=40, temperature=t, seed=s, structured_outputs=SPECS[k])
              for k in SPECS for t, s in ((0.0, None), (1.0, 1), (1.0, 2))] + [free]  # fmt: skip
    outs = gen.generate_batched([ASK] * len(params), params)
    assert outs[-1].token_ids == alone
    for p, o in zip(params, outs[:-1]):
        assert o.finish_reason == "stop", (p, o.text)
        spec = p.structured_outputs
        if spec.json is not None:
            jsonschema.validate(json.loads(o.text), PERSON)
        elif spec.regex is not None:
            assert re.fullmatch(spec.regex, o.text)
        elif spec.choice is not None:
            assert o.text in spec.choice
        else:
            assert re.fullmatch(r"The answer is [0-9]+\.", o.text)


def test_json_object_and_any_whitespace_give_parseable_json(gen):
    outs = gen.generate_batched([ASK] * 2, [SamplingParams(max_new_tokens=48, structured_outputs={"json": PERSON}),
                                            SamplingParams(max_new_tokens=48, structured_outputs={"json_object": True})])
    assert outs[0].finish_reason == "stop"
    jsonschema.validate(json.loads(outs[0].text), PERSON)
    if outs[1].finish_reason == "stop":
        assert isinstance(json.loads(outs[1].text), dict)
    else:  # cut at max_new_tokens: what it wrote is the start of an object
        assert outs[1].finish_reason == "length" and outs[1].text.lstrip().startswith("{")


def test_a_schemas_property_order_is_the_order_the_output_writes_them(gen):
    spec = {"type": "object", "properties": {"zeta": {"type": "integer"}, "alpha": {"type": "integer"}},
            "required": ["zeta", "alpha"], "additionalProperties": False}  # fmt: skip
    out = gen.generate_batched([ASK], SamplingParams(max_new_tokens=32, structured_outputs=dict(json=spec,
                                                                                                 any_whitespace=False)))
    assert list(json.loads(out[0].text)) == ["zeta", "alpha"]


def test_streamed_text_is_the_final_text_and_a_length_cut_leaves_a_valid_prefix(gen):
    params = SamplingParams(max_new_tokens=5, structured_outputs=SPECS["json"])
    events = list(gen.stream([ASK], params))
    final = events[-1].output
    assert "".join(e.text for e in events) == final.text and final.finish_reason == "length"
    assert len(final.token_ids) == 5 and final.text.startswith('{"name": "')


def test_min_tokens_gives_way_once_the_output_is_complete(gen):
    """``min_tokens`` bans the end only while the grammar allows something else: a finished choice ends."""
    out = gen.generate_batched([ASK], SamplingParams(max_new_tokens=20, min_tokens=15,
                                                     structured_outputs={"choice": ["yes", "no"]}))[0]
    assert out.text in ("yes", "no") and out.finish_reason == "stop" and len(out.token_ids) < 15


def test_the_same_tokens_after_preemption(smollm2_cached):
    """A 64-token cache preempts and recomputes the requests; their matchers keep their place."""
    params = SamplingParams(max_new_tokens=30, structured_outputs=SPECS["json"])
    roomy = Generator(smollm2_cached, progress=False).generate_batched([ASK] * 3, params)
    tight_gen = Generator(smollm2_cached, progress=False, kv_cache_tokens=96, block_size=16)
    tight = tight_gen.generate_batched([ASK] * 3, params)
    assert sum(o.metrics.num_preemptions for o in tight) > 0
    assert [o.token_ids for o in tight] == [o.token_ids for o in roomy]


def test_a_model_without_a_tokenizer_ends_the_request_with_an_error(smollm2_cached):
    gen = Generator(smollm2_cached, progress=False)
    gen.tokenizer = None
    out = gen.generate_batched([[1, 2, 3]], SamplingParams(structured_outputs={"choice": ["a"]}))[0]
    assert out.finish_reason == "error" and "structured_outputs (choice) need the model's tokenizer" in out.error


@pytest.mark.parametrize(("spec", "message"), [
    ({}, "exactly one of"),
    ({"regex": "a", "choice": ["a"]}, r"exactly one of .*got \['regex', 'choice'\]"),
    ({"json": "not json"}, "`structured_outputs.json` must be a JSON schema"),
    ({"json": 5}, "`structured_outputs.json` must be a JSON schema"),
    ({"json": {"type": "nonsense"}}, r"`structured_outputs.json` cannot be compiled: .*nonsense"),
    ({"regex": "[a-"}, r"`structured_outputs.regex` cannot be compiled: .*Unclosed"),
    ({"regex": ""}, "`structured_outputs.regex` must be a non-empty string"),
    ({"grammar": "root ::= undefined_rule"}, "`structured_outputs.grammar` cannot be compiled"),
    ({"choice": []}, "`structured_outputs.choice` must be a non-empty list"),
    ({"choice": ["a", ""]}, "`structured_outputs.choice` must be a non-empty list"),
    ({"choice": ["a\x00b"]}, "cannot hold a NUL character"),
    ({"grammar": 'root ::= "caf" "éa"'}, r"`structured_outputs.grammar` writes \['éa'\] in a literal: xgrammar 0.2"),
    ({"json": {"enum": ["x", "éa"]}}, r"`structured_outputs.json` writes \['éa'\]"),
    ({"json": {"type": "object", "properties": {"ñ1": {"const": 1}}}}, r"writes \['ñ1'\]"),
    ({"json": {"properties": {"a": {"const": {"k": "日b"}}}}}, r"writes \['日b'\]"),
    ({"choice": ["a"], "any_whitespace": "no"}, "`structured_outputs.any_whitespace` must be a bool"),
    ({"jsn": {}}, r"unknown keys \['jsn'\]"),
])  # fmt: skip
def test_a_bad_spec_is_refused_naming_the_field(spec, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(structured_outputs=spec)


def test_specs_are_plain_hashable_data_and_a_pydantic_class_is_a_schema():
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    a = SamplingParams(structured_outputs={"json": Person})
    assert json.loads(a.structured_outputs.json)["required"] == ["name", "age"]
    assert a == SamplingParams(structured_outputs=StructuredOutputsParams(json=json.dumps(Person.model_json_schema())))
    assert hash(a) == hash(SamplingParams(structured_outputs={"json": Person.model_json_schema()}))
    assert a.penalized and not SamplingParams().penalized  # kept out of the loops that take the argmax themselves
    with pytest.raises(ValueError, match="`structured_outputs` must be None, a StructuredOutputsParams or a dict"):
        SamplingParams(structured_outputs="json")


def test_without_xgrammar_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)
    with pytest.raises(ImportError, match=r"structured outputs need the xgrammar package: pip install"):
        SamplingParams(structured_outputs={"choice": ["a"]})
    assert SamplingParams(max_new_tokens=3).structured_outputs is None  # nothing else needs it


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=8), st.data())
def test_unpacked_bitmask_is_the_mask_xgrammar_applies(words, data):
    vocab = data.draw(st.integers(32 * (len(words) - 1) + 1, 32 * len(words)))
    packed = torch.tensor(words, dtype=torch.int32)  # [W]
    # xgrammar's CPU kernel writes a whole 32-token word past a vocabulary that ends inside one (a heap overflow that
    # aborts the process later): the reference runs on the full words, the unpacked mask is cut to the vocabulary
    logits = torch.zeros(1, 32 * len(words))  # [1, 32 W]
    xgr.apply_token_bitmask_inplace(logits, packed[None])
    assert torch.equal(unpack_bitmask(packed, vocab), logits[0, :vocab].isfinite())


@pytest.mark.parametrize("fault", ["mask raises", "token refused"])
def test_a_failing_matcher_ends_its_own_request_only(smollm2_cached, monkeypatch, fault):
    """Fault injection: one request's grammar matcher raising while its mask is filled (or refusing the token it was
    given) ends that request alone with an error; the requests beside it get exactly what they get without it."""
    from llmspeed.generation import structured

    free = SamplingParams(max_new_tokens=12)
    fine = SamplingParams(max_new_tokens=30, structured_outputs=SPECS["json"])
    doomed = SamplingParams(max_new_tokens=30, structured_outputs=SPECS["regex"])
    clean = Generator(smollm2_cached, progress=False).generate_batched([ASK] * 2, [fine, free])
    real_state = structured.Grammars.state

    def state(self, params):
        s = real_state(self, params)
        if params.kind == "regex":
            calls = [0]
            if fault == "mask raises":
                real_allowed = s.allowed

                def allowed():
                    calls[0] += 1
                    if calls[0] == 3:
                        raise RuntimeError("injected matcher fault")
                    return real_allowed()

                s.allowed = allowed
            else:
                s.accept = lambda token: False
        return s

    monkeypatch.setattr(structured.Grammars, "state", state)
    outs = Generator(smollm2_cached, progress=False).generate_batched([ASK] * 3, [fine, doomed, free])
    assert outs[1].finish_reason == "error"
    if fault == "mask raises":
        assert outs[1].error == "choosing its next token raised RuntimeError: injected matcher fault"
        assert len(outs[1].token_ids) == 2  # the two tokens before the fault are kept
    else:
        assert "does not continue its structured output" in outs[1].error and len(outs[1].token_ids) == 1
    assert [o.token_ids for o in (outs[0], outs[2])] == [o.token_ids for o in clean]
    assert [o.finish_reason for o in (outs[0], outs[2])] == [o.finish_reason for o in clean]


@pytest.mark.slow
def test_many_threads_share_one_engine_with_their_own_specs(smollm2_cached):
    """Six threads submit at once to one ``llmspeed.Engine``, each with its own kind of output (and a free-text one):
    every answer matches its own spec, never a neighbour's, and equals what the same requests get in one
    ``generate_batched`` call."""
    from concurrent.futures import ThreadPoolExecutor

    from llmspeed import Engine

    specs = [SPECS["json"], SPECS["regex"], SPECS["choice"], SPECS["grammar"], {"choice": ["red", "blue"]}, None]
    params = [SamplingParams(max_new_tokens=30, structured_outputs=s) for s in specs]
    wanted = [o.token_ids for o in Generator(smollm2_cached, progress=False).generate_batched([ASK] * 6, params)]
    with Engine(smollm2_cached) as engine, ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(lambda p: engine.submit(ASK, p).result(timeout=120), params))
    assert [o.token_ids for o in outs] == wanted
    assert outs[4].text in ("red", "blue") and re.fullmatch(SPECS["regex"]["regex"], outs[1].text)


def test_grammars_compile_in_the_submitting_thread_not_in_the_step_loop(smollm2_cached, monkeypatch):
    """``Engine.submit`` and the asyncio methods compile a request's grammar before queueing it, so the step loop,
    where every running request would wait for a compile, finds it compiled; the answers are unchanged."""
    import asyncio
    import threading

    from llmspeed import Engine
    from llmspeed.generation.structured import Grammars

    compiled_in = []
    real = Grammars._compiler_for_tokenizer

    def spy(self):  # called once per grammar compiled (a cache miss)
        compiled_in.append(threading.current_thread().name)
        return real(self)

    monkeypatch.setattr(Grammars, "_compiler_for_tokenizer", spy)
    choice = SamplingParams(max_new_tokens=8, structured_outputs={"choice": ["yes", "no"]})
    regex = SamplingParams(max_new_tokens=8, structured_outputs={"regex": "[a-c]{3}"})
    with Engine(smollm2_cached) as engine:
        first = engine.submit(ASK, choice).result(timeout=120)
        second = asyncio.run(engine.generate(ASK, regex))
        assert engine.submit(ASK, choice).result(timeout=120).text == first.text  # from the cache: no compile
    assert first.text in ("yes", "no") and re.fullmatch("[a-c]{3}", second.text)
    assert len(compiled_in) == 2 and "llmspeed-engine" not in compiled_in, compiled_in
