"""Property tests of structured outputs: a tiny random Llama with SmolLM2's tokenizer, sampled at temperature 1 (its
near-uniform logits wander through the grammar where a trained model walks one path), against random regular
expressions, choices and JSON schemas. Every output that stops is a full match; every output cut at
``max_new_tokens`` is a prefix xgrammar's own matcher accepts."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import llmspeed
from llmspeed import Generator, SamplingParams

xgr = pytest.importorskip("xgrammar")

WORDS = st.text(alphabet="abcxyz ,-", min_size=1, max_size=6)
PIECES = st.one_of(
    WORDS,  # letters, spaces, commas and hyphens: literal in a regular expression as they are
    st.sampled_from([r"[0-9]{1,3}", r"[a-z]+", r"(yes|no|maybe)", r"[A-Z][a-z]{0,4}", r" ?", r"\.", r"(ab)*"]),
)
REGEXES = st.lists(PIECES, min_size=1, max_size=4).map("".join)
CHOICES = st.lists(st.text(alphabet="abcdefgh {}\"é", min_size=1, max_size=8), min_size=1, max_size=4, unique=True)
LEAVES = st.sampled_from([{"type": "integer"}, {"type": "boolean"}, {"type": "string", "maxLength": 6},
                          {"enum": ["red", "green", 3]}, {"type": "number"}])  # fmt: skip
SCHEMAS = st.dictionaries(st.text(alphabet="abkz_", min_size=1, max_size=5), LEAVES, min_size=1, max_size=3).map(
    lambda props: {"type": "object", "properties": props, "required": sorted(props), "additionalProperties": False})


@pytest.fixture(scope="module")
def wander(smollm2_cached):
    tok = smollm2_cached.tokenizer
    model = llmspeed.wrap(llmspeed.models.tiny("llama", seed=3, vocab_size=len(tok)), tok)
    return Generator(model, progress=False)


@pytest.fixture(scope="module")
def compiler(smollm2_cached):
    """xgrammar's compiler for SmolLM2's tokenizer (its vocabulary walked once for the module)."""
    tok = smollm2_cached.tokenizer
    return xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok), stop_token_ids=[2]))


def _accepted_prefix(compiler, spec: llmspeed.StructuredOutputsParams, ids: list[int]) -> bool:
    matcher = xgr.GrammarMatcher(compiler.compile_grammar(spec.build()))
    return all(matcher.accept_token(t) for t in ids)


def _check(gen, compiler, spec: dict, valid, seed: int) -> None:
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=seed, structured_outputs=spec)
    out = gen.generate_batched([[{"role": "user", "content": "go"}]], params)[0]
    assert out.finish_reason in ("stop", "length"), out.error
    if out.finish_reason == "stop":
        assert out.token_ids[-1] == 2 and valid(out.text), out.text
    else:
        assert _accepted_prefix(compiler, params.structured_outputs, out.token_ids), out.text


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pattern=REGEXES, seed=st.integers(0, 2**16))
def test_sampled_outputs_fully_match_a_random_regex(wander, compiler, pattern, seed):
    _check(wander, compiler, {"regex": pattern}, lambda text: re.fullmatch(pattern, text) is not None, seed)


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(choices=CHOICES, seed=st.integers(0, 2**16))
def test_sampled_outputs_are_one_of_random_choices(wander, compiler, choices, seed):
    _check(wander, compiler, {"choice": choices}, lambda text: text in choices, seed)


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=SCHEMAS, compact=st.booleans(), seed=st.integers(0, 2**16))
def test_sampled_outputs_validate_against_a_random_schema(wander, compiler, schema, compact, seed):
    def valid(text: str) -> bool:
        jsonschema.validate(json.loads(text), schema)
        return True

    _check(wander, compiler, {"json": schema, "any_whitespace": not compact}, valid, seed)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(min_size=1, max_size=12))
def test_a_choice_literal_is_read_back_as_exactly_its_text(smollm2_cached, compiler, text):
    """Regression: choices went to xgrammar as JSON-escaped EBNF literals, and xgrammar 0.2 reads a non-ASCII character
    followed by a hex digit as one code point (``"éa"`` became U+0E9A): such a choice could never be written."""
    from llmspeed.generation.structured_params import ebnf_literal

    tok = smollm2_cached.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    assume(tok.decode(ids) == text)  # the tokenizer's own limits (it writes U+40000 as three unknown bytes)
    assume("\x00" not in text)  # refused by StructuredOutputsParams: xgrammar matches no NUL
    grammar = xgr.Grammar.from_ebnf(f"root ::= {ebnf_literal(text)}")
    matcher = xgr.GrammarMatcher(compiler.compile_grammar(grammar))
    assert all(matcher.accept_token(t) for t in ids) and matcher.accept_token(2)
